"""Byte movers for the sensor bridges: a serial line that reads what is there (pyserial) and
a Nightscout HTTP client (httpx). No decisions here: what the bytes mean is in
``mpc_dose.protocol.bis_vista`` / ``nightscout``, what to do about them in
``mpc_dose.node.sensor_bridge``.

Every failure comes out as :class:`LinkError` with a reason code, so the caller counts it
and goes on: ``serial`` (the port vanished or cannot be opened), ``timeout``,
``unreachable`` (connection refused, DNS), ``unauthorized`` (401/403), ``http_<status>``,
``too_large``.
"""

from __future__ import annotations

import time

__all__ = ["LinkError", "SerialBytes", "NightscoutClient"]


class LinkError(RuntimeError):
    """The device or server could not be read or written; *code* says why."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code, self.detail = code, detail


class SerialBytes:
    """A serial line (device path or pyserial URL) opened lazily and re-opened after a
    failure at most every *reopen_s* seconds."""

    def __init__(self, port: str, *, baudrate: int, reopen_s: float = 2.0) -> None:
        self.port_name, self.baudrate, self.reopen_s = port, baudrate, reopen_s
        self._port = None
        self._next_open = 0.0

    def _open(self, now: float):
        if self._port is not None:
            return self._port
        if now < self._next_open:
            return None
        self._next_open = now + self.reopen_s
        import serial

        try:
            self._port = serial.serial_for_url(self.port_name, baudrate=self.baudrate,
                                               bytesize=8, parity="N", stopbits=1,
                                               timeout=0, write_timeout=0.5)
        except (serial.SerialException, OSError, ValueError) as err:
            raise LinkError("serial", f"cannot open {self.port_name!r}: {err}") from None
        return self._port

    def _fail(self, err: Exception) -> LinkError:
        try:
            self._port.close()
        except Exception:  # noqa: BLE001 - it is gone already
            pass
        self._port = None
        return LinkError("serial", f"{self.port_name}: {err}")

    def read(self, now: float, wait_s: float) -> bytes:
        """What has arrived, after waiting up to *wait_s* [s] for the first byte."""
        port = self._open(now)
        if port is None:  # waiting to re-open: wait as a read would
            time.sleep(wait_s)
            return b""
        try:
            port.timeout = wait_s
            first = port.read(1)
            if not first:
                return b""
            return first + port.read(port.in_waiting or 0)
        except Exception as err:  # noqa: BLE001 - SerialException, OSError, termios.error
            raise self._fail(err) from None

    def write(self, now: float, data: bytes) -> None:
        port = self._open(now)
        if port is None:
            raise LinkError("serial", f"{self.port_name} is not open")
        try:
            port.write(data)
        except Exception as err:  # noqa: BLE001
            raise self._fail(err) from None

    def close(self) -> None:
        if self._port is not None:
            try:
                self._port.close()
            except Exception:  # noqa: BLE001
                pass
            self._port = None


class NightscoutClient:
    """GET and POST against one Nightscout site with the ``api-secret`` header (the SHA-1
    hex digest, computed by the caller); every request bounded by *timeout_s* [s]."""

    def __init__(self, url: str, api_secret_sha1: str, *, timeout_s: float,
                 max_body_bytes: int) -> None:
        import httpx

        self._httpx = httpx
        self.max_body_bytes = max_body_bytes
        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s,
                                   headers={"api-secret": api_secret_sha1,
                                            "accept": "application/json"},
                                   follow_redirects=False)

    def _request(self, method: str, path: str, **kwargs) -> bytes:
        httpx = self._httpx
        try:
            with self.client.stream(method, path, **kwargs) as response:
                status = response.status_code
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > self.max_body_bytes:
                        raise LinkError("too_large", f"answer over {self.max_body_bytes} B")
        except httpx.TimeoutException as err:
            raise LinkError("timeout", str(err) or type(err).__name__) from None
        except (httpx.TransportError, httpx.InvalidURL) as err:
            raise LinkError("unreachable", str(err) or type(err).__name__) from None
        if status in (401, 403):
            raise LinkError("unauthorized", f"HTTP {status}")
        if not 200 <= status < 300:
            raise LinkError(f"http_{status}", bytes(body[:200]).decode("utf-8", "replace"))
        return bytes(body)

    def get(self, path: str, params: dict) -> bytes:
        return self._request("GET", path, params=params)

    def post(self, path: str, body) -> bytes:
        return self._request("POST", path, json=body)

    def close(self) -> None:
        self.client.close()
