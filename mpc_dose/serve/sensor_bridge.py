"""``mpc-dose serve sensor-bridge CONFIG``: a monitor or a CGM server behind the telemetry
protocol. Readings go out as ``measurement`` messages on a PUB socket (as the plant and the
pump bridge publish theirs), with ``alarm`` messages for link loss, stale data, lead-off,
signal-quality loss and bad data, and a ``heartbeat`` every *heartbeat_s*; every message out
and every fault, reading and post is in the audit log.

Two kinds, chosen by ``[bridge] kind``:

- ``bis_vista``: a BIS Vista monitor's serial data output (``mpc_dose.protocol.bis_vista``);
  the bridge asks for processed variables at start and every *request_every_s*.
- ``nightscout``: a Nightscout site as a CGM source (``GET entries`` every *poll_s*) and,
  with ``[nightscout.sink]``, as the sink of what the loop delivered (the insulin pump's
  ``pump_status`` on the telemetry it subscribes to -> treatments and devicestatus).

The config file (TOML)::

    [bridge]
    kind = "bis_vista"               # or "nightscout"
    telemetry = "tcp://127.0.0.1:5570"
    src = "bis-bridge"               # the sender id of its messages
    heartbeat_s = 1.0

    [bis_vista]
    serial = "/dev/ttyUSB0"          # or a pyserial URL, or the emulator's device
    baudrate = 57600
    var = "bis"                      # the published variables ("" leaves one out)
    sqi_var = "bis_sqi"
    sr_var = "bis_sr"
    sqi_invalid_below = 15           # [%]
    sqi_questionable_below = 50      # [%]
    emg_questionable_above_db = 55   # [dB]
    stale_after_s = 5                # no fresh packet for this long: sensor.stale
    link_timeout_s = 3               # no byte for this long: sensor.link_lost
    request_every_s = 10

    # kind = "nightscout":
    [nightscout]
    url = "https://my-site.example"  # http:// only to loopback (the secret's digest travels)
    api_secret_env = "NIGHTSCOUT_API_SECRET"   # or api_secret = "..." (not in a shared file)
    var = "glucose"
    poll_s = 30
    timeout_s = 2
    stale_after_s = 600              # the newest SGV older than this: no reading, an alarm
    link_timeout_s = 120

    [nightscout.sink]                # optional
    telemetry = ["tcp://127.0.0.1:5563"]   # where the insulin pump's pump_status is published
    pump = "insulin"
    concentration_u_per_ml = 100
    status_every_s = 60
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import zmq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..audit import AuditLog
from ..errors import ConfigError
from ..node.sensor_bridge import (BIS_KEYS_KEPT, KEYS_KEPT, BisVars, SensorBridgeNode,
                                  TreatmentSink, bis_reading, nightscout_reading)
from ..protocol import bis_vista, nightscout
from ..protocol.messages import Heartbeat, PumpStatus, _Message
from ..transport.sensor_links import LinkError, NightscoutClient, SerialBytes
from ..transport.zmq_link import Authenticator, Keys, Telemetry, TelemetryReader
from .config_file import read_config

__all__ = ["SensorBridgeConfig", "load_sensor_bridge_config", "SensorBridgeProcess"]

_BIS_RULES = bis_vista.QualityRules()
_NS_RULES = nightscout.QualityRules()
_BIS_VARS = BisVars()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class BridgeSection(_Strict):
    kind: Literal["bis_vista", "nightscout"]
    telemetry: str
    #: the sender id of its messages: by default its kind's (``bis-vista-bridge``,
    #: ``nightscout-bridge``), so two kinds feeding one controller never share one
    src: str | None = Field(None, min_length=1, max_length=128)
    heartbeat_s: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _kind_src(self):
        if self.src is None:
            self.src = f"{self.kind.replace('_', '-')}-bridge"
        return self


class BisSection(_Strict):
    serial: str
    baudrate: int = Field(bis_vista.BAUDRATE, gt=0)
    var: str = Field(_BIS_VARS.bis, max_length=128)
    sqi_var: str = Field(_BIS_VARS.sqi, max_length=128)
    sr_var: str = Field(_BIS_VARS.sr, max_length=128)
    sqi_invalid_below: float = Field(_BIS_RULES.sqi_invalid_below, ge=0, le=100)
    sqi_questionable_below: float = Field(_BIS_RULES.sqi_questionable_below, ge=0, le=100)
    emg_questionable_above_db: float | None = Field(_BIS_RULES.emg_questionable_above_db,
                                                    gt=0)
    lead_off_from_impedance: bool = _BIS_RULES.lead_off_from_impedance
    #: [s] BIS is updated every second: a packet missing for 5 s is a stale monitor
    stale_after_s: float = Field(5.0, gt=0)
    link_timeout_s: float = Field(3.0, gt=0)
    request_every_s: float = Field(10.0, gt=0)


class SinkSection(_Strict):
    telemetry: list[str] = Field(min_length=1)
    pump: str = Field(min_length=1)
    concentration_u_per_ml: float = Field(gt=0)
    status_every_s: float = Field(60.0, gt=0)
    #: [min] a rate without a lease is posted as a temp basal of this length (re-posted
    #: while it runs)
    unleased_min: float = Field(30.0, gt=0)


class NightscoutSection(_Strict):
    url: str
    api_secret: str | None = Field(None, min_length=1)
    api_secret_env: str | None = Field(None, min_length=1)
    var: str = Field("glucose", min_length=1, max_length=128)
    poll_s: float = Field(30.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)
    count: int = Field(10, ge=1, le=1000)
    low_mg_dl: float = Field(_NS_RULES.low_mg_dl, gt=0)
    high_mg_dl: float = Field(_NS_RULES.high_mg_dl, gt=0)
    noise_questionable_from: int | None = Field(_NS_RULES.noise_questionable_from, ge=1)
    #: [s] a CGM reads every 5 min: two missed readings make the source stale
    stale_after_s: float = Field(600.0, gt=0)
    link_timeout_s: float = Field(120.0, gt=0)
    sink: SinkSection | None = None


class SensorBridgeConfig(_Strict):
    bridge: BridgeSection
    bis_vista: BisSection | None = None
    nightscout: NightscoutSection | None = None

    @property
    def device(self) -> BisSection | NightscoutSection:
        return getattr(self, self.bridge.kind)


def load_sensor_bridge_config(path: str | Path | dict) -> SensorBridgeConfig:
    """Read and check a sensor-bridge config; errors name the field, the value and what
    was expected."""
    config = read_config(path, SensorBridgeConfig, "sensor-bridge config")
    kind = config.bridge.kind
    other = "nightscout" if kind == "bis_vista" else "bis_vista"
    if getattr(config, kind) is None:
        raise ConfigError(f"sensor-bridge config: bridge.kind = {kind!r} needs a [{kind}] "
                          f"section")
    if getattr(config, other) is not None:
        raise ConfigError(f"sensor-bridge config: a [{other}] section with bridge.kind = "
                          f"{kind!r}; remove it or change the kind")
    if kind == "bis_vista":
        b = config.bis_vista
        if b.sqi_questionable_below < b.sqi_invalid_below:
            raise ConfigError(f"sensor-bridge config bis_vista.sqi_questionable_below: "
                              f"{b.sqi_questionable_below} is below sqi_invalid_below "
                              f"({b.sqi_invalid_below}); expected >= it")
        if not b.var:
            raise ConfigError("sensor-bridge config bis_vista.var: expected the BIS "
                              "variable's name, got ''")
    else:
        _check_nightscout(config.nightscout)
    return config


def _check_nightscout(n: NightscoutSection) -> None:
    parts = urlsplit(n.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"sensor-bridge config nightscout.url: {n.url!r} is not an "
                          f"http(s)://HOST URL")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(f"sensor-bridge config nightscout.url: {n.url!r} sends the API "
                          f"secret's digest in clear; use https:// (http:// only to loopback)")
    if (n.api_secret is None) == (n.api_secret_env is None):
        raise ConfigError("sensor-bridge config nightscout: give exactly one of api_secret "
                          "and api_secret_env (the name of an environment variable)")
    if n.api_secret_env is not None and not os.environ.get(n.api_secret_env):
        raise ConfigError(f"sensor-bridge config nightscout.api_secret_env: the environment "
                          f"variable {n.api_secret_env!r} is not set")
    if n.low_mg_dl >= n.high_mg_dl:
        raise ConfigError(f"sensor-bridge config nightscout.low_mg_dl: {n.low_mg_dl} is not "
                          f"below high_mg_dl ({n.high_mg_dl})")
    if n.link_timeout_s <= n.poll_s:
        raise ConfigError(f"sensor-bridge config nightscout.link_timeout_s: "
                          f"{n.link_timeout_s} s must be more than poll_s ({n.poll_s} s)")


# ---------------------------------------------------------------------------- devices
class _BisDevice:
    """The serial line, the parser and the monitor's polling."""

    def __init__(self, section: BisSection, node: SensorBridgeNode, link=None) -> None:
        self.section, self.node = section, node
        self.link = link or SerialBytes(section.serial, baudrate=section.baudrate)
        self.parser = bis_vista.BisVistaParser()
        self.rules = bis_vista.QualityRules(
            sqi_invalid_below=section.sqi_invalid_below,
            sqi_questionable_below=section.sqi_questionable_below,
            emg_questionable_above_db=section.emg_questionable_above_db,
            lead_off_from_impedance=section.lead_off_from_impedance)
        self.names = BisVars(section.var, section.sqi_var, section.sr_var)
        self._next_request = -math.inf
        self._link_seq = 0

    def turn(self, now: float, wall: float, wait_s: float) -> list[_Message]:
        node, out = self.node, []
        if now >= self._next_request:
            self._next_request = now + self.section.request_every_s
            try:
                self.link.write(now, bis_vista.request_processed_vars(self._link_seq))
                self._link_seq = (self._link_seq + 1) & 0xFFFF
            except LinkError as err:
                out += node.fault(err.code, err.detail)
        try:
            data = self.link.read(now, wait_s)
        except LinkError as err:
            return out + node.fault(err.code, err.detail)
        if not data:
            return out
        now, wall = time.monotonic(), time.time()  # the bytes' arrival
        out += node.contact(now)
        self.parser.receive_data(data)
        garbage = 0
        while (event := self.parser.next_event()) is not bis_vista.NEED_DATA:
            if isinstance(event, bis_vista.ProcessedVars):
                out += node.reading(bis_reading(event, self.rules, self.names), now, wall)
            elif isinstance(event, bis_vista.FrameError):
                if event.code == "garbage":  # one fault per read, however many runs
                    garbage += event.n_bytes
                else:
                    out += node.fault(event.code, event.detail, n_bytes=event.n_bytes)
            elif isinstance(event, bis_vista.LinkReply):
                node.counts["link_ack" if event.ok else "link_nak"] += 1
            else:
                node.counts["other_message"] += 1
        if garbage:
            out += node.fault("garbage", f"{garbage} bytes outside any frame",
                              n_bytes=garbage)
        return out

    def close(self) -> None:
        try:
            self.link.write(time.monotonic(), bis_vista.stop_processed_vars(self._link_seq))
        except LinkError:
            pass
        self.link.close()


class _NightscoutDevice:
    """Polling entries; the treatment sink's posts."""

    def __init__(self, section: NightscoutSection, node: SensorBridgeNode, src: str, *,
                 context: zmq.Context, keys: Keys | None, client=None) -> None:
        self.section, self.node = section, node
        secret = section.api_secret if section.api_secret is not None else \
            os.environ.get(section.api_secret_env or "", "")
        self.client = client or NightscoutClient(
            section.url, nightscout.api_secret_digest(secret), timeout_s=section.timeout_s,
            max_body_bytes=nightscout.MAX_BODY_BYTES)
        self.rules = nightscout.QualityRules(
            low_mg_dl=section.low_mg_dl, high_mg_dl=section.high_mg_dl,
            noise_questionable_from=section.noise_questionable_from)
        self._next_poll = -math.inf
        self._next_flush = -math.inf
        self._newest_ms: int | None = None
        self.sink = self.reader = None
        if section.sink is not None:
            s = section.sink
            self.sink = TreatmentSink(pump=s.pump, concentration_u_per_ml=s.concentration_u_per_ml,
                                      device=f"mpc-dose://{src}", status_every_s=s.status_every_s,
                                      unleased_min=s.unleased_min)
            self.reader = TelemetryReader(context, s.telemetry, keys=keys)

    def turn(self, now: float, wall: float, wait_s: float) -> list[_Message]:
        out: list[_Message] = []
        if now >= self._next_poll:
            self._next_poll = now + self.section.poll_s
            out += self._poll(now, wall)
        if self.reader is not None:
            for envelope in self.reader.drain(wait_s):
                if isinstance(envelope.message, PumpStatus):
                    self.sink.observe(envelope.message, time.time())
            self.sink.tick(time.time())
            if self.sink.outbox and time.monotonic() >= self._next_flush:
                out += self._flush()
        else:
            time.sleep(max(0.0, min(wait_s, self._next_poll - time.monotonic())))
        return out

    def _poll(self, now: float, wall: float) -> list[_Message]:
        node = self.node
        params: dict = {"count": self.section.count}
        if self._newest_ms is not None:
            params["find[date][$gt]"] = self._newest_ms
        try:
            body = self.client.get(nightscout.ENTRIES_PATH, params)
        except LinkError as err:
            out = []
            if err.code not in ("timeout", "unreachable"):  # the server did answer
                out += node.contact(now)
            return out + node.fault(err.code, err.detail)
        out = node.contact(now) + node.answered()
        entries, faults = nightscout.parse_entries(body)
        for fault in faults:
            out += node.fault(fault.code, fault.detail)
        for entry in entries:
            out += node.reading(nightscout_reading(entry, self.rules, self.section.var),
                                now, wall)
            self._newest_ms = max(self._newest_ms or 0, entry.date_ms)
        return out

    def _flush(self) -> list[_Message]:
        node, out = self.node, []
        while self.sink.outbox:
            path, body = self.sink.outbox[0]
            try:
                self.client.post(path, [body] if path == nightscout.TREATMENTS_PATH else body)
            except LinkError as err:
                node.counts[f"post_failed.{err.code}"] += 1
                node.note("nightscout_post", path=path, body=body, ok=False, code=err.code,
                          detail=err.detail[:200])
                # try again a poll later; the outbox keeps it (bounded)
                self._next_flush = time.monotonic() + self.section.poll_s
                if err.code == "unauthorized":
                    out += node.fault(err.code, err.detail)
                return out
            self.sink.outbox.pop(0)
            node.counts["posted"] += 1
            node.note("nightscout_post", path=path, body=body, ok=True)
        return out

    def close(self) -> None:
        self.client.close()


# ---------------------------------------------------------------------------- process
class SensorBridgeProcess:
    """The bridge program: the device, the node, the telemetry socket and the audit log.

    *link* (a BIS line) or *client* (a Nightscout client) may be given to stand in for the
    real one in tests.
    """

    def __init__(self, config: SensorBridgeConfig, *, audit: str | Path | None = None,
                 keys: Keys | None = None, link=None, client=None) -> None:
        b, device = config.bridge, config.device
        self.config = config
        self.node = SensorBridgeNode(sensor=f"{b.kind}:{b.src}",
                                     stale_after_s=device.stale_after_s,
                                     link_timeout_s=device.link_timeout_s,
                                     now=time.monotonic(), wall=time.time(),
                                     keys_kept=BIS_KEYS_KEPT if b.kind == "bis_vista"
                                     else KEYS_KEPT)
        self.counts: Counter[str] = self.node.counts
        self.log = AuditLog(audit, "sensor-bridge") if audit else None
        self.context = zmq.Context()
        self.auth = self.device = None
        try:
            self.auth = Authenticator(self.context, keys.clients) if keys is not None \
                else None
            self.pub = Telemetry(self.context, b.telemetry, src=b.src, keys=keys)
            if b.kind == "bis_vista":
                self.device = _BisDevice(device, self.node, link)
            else:
                self.device = _NightscoutDevice(device, self.node, b.src,
                                                context=self.context, keys=keys,
                                                client=client)
        except BaseException:
            self.close()
            raise
        if self.log is not None:
            self.pub.on_send = lambda envelope: self.log.message("out", envelope)
            self.log.note("start", None, bridge_kind=b.kind, config=config.model_dump(
                exclude={"nightscout": {"api_secret"}}),
                allowed_keys=sorted(keys.clients) if keys is not None else None)
        self._running = True
        self._next_heartbeat = -math.inf

    def _send(self, messages: list[_Message]) -> None:
        for message in messages:
            try:
                self.pub.send(message)
            except Exception as err:  # noqa: BLE001 - e.g. the audit row failed: not sent
                self.counts["send_error"] += 1
                self._note("send_error", error=repr(err)[:500], type=message.type)

    def _note(self, kind: str, **fields) -> None:
        if self.log is not None:
            try:
                self.log.note(kind, None, **fields)
            except Exception:  # noqa: BLE001 - a full disk must not stop the readings
                self.counts["audit_error"] += 1

    def _state(self) -> str:
        active = [code for code, on in self.node.active.items() if on]
        return "running" if not active else ",".join(c.split(".", 1)[1] for c in active)

    def turn(self, wait_s: float = 0.05) -> None:
        """One pass: the device (waiting up to *wait_s* [s] for it), the watchdogs, the
        heartbeat, the audit notes. Nothing the device sends ends it."""
        try:
            self._send(self.device.turn(time.monotonic(), time.time(), wait_s))
        except Exception as err:  # noqa: BLE001 - a defect must not end the bridge
            self.counts["internal_error"] += 1
            self._note("internal_error", error=repr(err)[:500])
        self._send(self.node.check(time.monotonic(), time.time()))
        now = time.monotonic()
        if now >= self._next_heartbeat:
            hb = self.config.bridge.heartbeat_s
            self._send([Heartbeat(role="sensor-bridge", state=self._state(), period_s=hb)])
            self._next_heartbeat = now + hb
        for kind, fields in self.node.take_notes():
            self._note(kind, **fields)

    def run(self, duration_s: float | None = None) -> None:
        start = time.monotonic()
        while self._running and (duration_s is None or time.monotonic() - start < duration_s):
            self.turn()

    def stop(self) -> None:
        """Ask :meth:`run` to return (e.g. from a SIGTERM handler)."""
        self._running = False

    def close(self) -> None:
        if self.device is not None:
            try:
                self.device.close()
            except Exception:  # noqa: BLE001
                pass
        if self.auth is not None:
            self.auth.stop()
        if self.log is not None:
            self._note("stop", counts=dict(self.counts))
            self.log.close()
            self.log = None
        self.context.destroy(linger=0)
