"""``mpc-dose monitor --web``: the loops live in a browser.

A Starlette application on uvicorn (both maintained ASGI projects: no HTTP code of ours)
serves one page (``static/index.html``, drawing with the vendored uPlot, MIT) and pushes the
monitor's view (:class:`~mpc_dose.monitor.state.MonitorState`) as server-sent events
(``sse-starlette``) twice a second, each with only the points the page has not had. A thread
reads the telemetry sockets (one SUB per address, so each message is known by the address it
came from) and hands the envelopes to the event loop, which alone touches the state, the
audit log and the acknowledgement socket.

Access: on loopback by default. Binding any other host needs an access token (``--token``),
checked in constant time on every request: the page, its files, the event stream and the
acknowledgement; it comes as ``Authorization: Bearer TOKEN``, as the ``token`` query
parameter of the first page load (answered with a redirect that stores it in an HttpOnly,
SameSite=Strict cookie and drops it from the address bar) or as that cookie. Bound to
loopback, the server answers only requests whose ``Host`` is a loopback name (no DNS
rebinding). An acknowledgement must be a JSON POST from the page's own origin (a form on
another site can send neither). The token travels in clear over HTTP: beyond a trusted
network, reach the page through an SSH tunnel.

Acknowledging an alarm from the page needs ``--audit``: the ``alarm_ack`` (protocol 1.2) is
written to the audit log first, then published on ``--ack ADDRESS`` when given; only then is
the alarm shown acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import queue
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import (FileResponse, JSONResponse, PlainTextResponse,
                                 RedirectResponse, Response)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocketClose

from ..audit import AuditLog
from ..errors import ConfigError
from ..protocol.codec import Envelope
from ..protocol.messages import ProtocolError
from ..transport.zmq_link import Authenticator, Keys, Telemetry, TelemetryReader
from .state import DEFAULT_WINDOW_S, MonitorState, UnknownAlarm

__all__ = ["WebMonitor", "check_access", "read_token", "serve_web", "STATIC"]

STATIC = Path(__file__).parent / "static"
#: [s] between two pushes of the view to a page
PUSH_S = 0.5
#: the shortest access token taken (a guessable one protects nothing)
MIN_TOKEN_CHARS = 16
_COOKIE = "mpc_dose_monitor_token"
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_token(value: str | None) -> str | None:
    """``--token``: the token itself, or ``@FILE`` to read it from a file (a command line
    is visible to every user of the machine)."""
    if value is None:
        return None
    if value.startswith("@"):
        try:
            value = Path(value[1:]).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ConfigError(f"--token {value!r}: cannot read the token file ({err})") \
                from None
    return value


def check_access(host: str, token: str | None) -> None:
    """Refuse a page reachable beyond loopback without a token, and a weak token.

    Raises
    ------
    ConfigError
        Naming the option, the value and what is expected.
    """
    if token is not None and (len(token) < MIN_TOKEN_CHARS or not token.isprintable()
                              or not token.isascii() or " " in token):
        raise ConfigError(f"--token: {len(token)} characters; expected at least "
                          f"{MIN_TOKEN_CHARS} printable ASCII characters without spaces "
                          f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
    if token is None and not is_loopback(host):
        raise ConfigError(f"--host {host!r} is not loopback: anyone who reaches it would see "
                          f"the loops and acknowledge their alarms; give --token TOKEN (or "
                          f"--token @FILE), or keep --host 127.0.0.1")


@dataclass
class _Batch:
    items: list[tuple[str, str, Envelope]]
    received: float
    rejected: dict[str, int]


class _Reader(threading.Thread):
    """Reads every telemetry address (sockets opened by the caller's thread, used only
    here from then on) and hands batches to *deliver* (thread-safe)."""

    def __init__(self, context: zmq.Context, addresses: Sequence[tuple[str, str]],
                 keys: Keys | None, deliver) -> None:
        super().__init__(name="telemetry-reader", daemon=True)
        self.readers = [(loop, address, TelemetryReader(context, [address], keys=keys))
                        for loop, address in addresses]
        self.deliver = deliver
        self.stopping = threading.Event()

    def run(self) -> None:
        poller = zmq.Poller()
        for _, _, reader in self.readers:
            poller.register(reader.sock, zmq.POLLIN)
        while not self.stopping.is_set():
            try:
                ready = dict(poller.poll(200))
            except zmq.ZMQError:  # the context is being closed
                return
            items = []
            for loop, address, reader in self.readers:
                if reader.sock in ready:
                    items.extend((loop, address, env) for env in reader.drain())
            if items:
                self.deliver(_Batch(items, time.monotonic(), {
                    address: sum(reader.rejected.values())
                    for _, address, reader in self.readers}))

    def close(self) -> None:
        self.stopping.set()
        self.join(timeout=2.0)
        for _, _, reader in self.readers:
            reader.sock.close(0)


class WebMonitor:
    """The monitor's state, sockets and audit log behind the web application.

    Parameters
    ----------
    addresses : (loop, address) pairs of telemetry publishers
    keys : CURVE keys (``--keys``, ``--server-key``; with ``--allow-keys`` for ``--ack``)
    ack : address to publish acknowledgements on (a PUB bound here), or None
    audit : SQLite audit log; without it alarms cannot be acknowledged from the page
    """

    def __init__(self, addresses: Sequence[tuple[str, str]], *, keys: Keys | None = None,
                 ack: str | None = None, audit: str | Path | None = None,
                 window_s: float = DEFAULT_WINDOW_S) -> None:
        self.state = MonitorState(window_s)
        self.context = zmq.Context()
        self.log: AuditLog | None = None
        self.ack_pub: Telemetry | None = None
        self.auth: Authenticator | None = None
        self.reader: _Reader | None = None
        self._pending: queue.SimpleQueue[_Batch] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            self.log = AuditLog(audit, "monitor") if audit else None
            if ack is not None:
                if keys is not None:
                    self.auth = Authenticator(self.context, keys.clients)
                self.ack_pub = Telemetry(self.context, ack, src="monitor", keys=keys)
                if self.log is not None:  # recorded before it leaves
                    self.ack_pub.on_send = lambda env: self.log.message("out", env)
            self.reader = _Reader(self.context, addresses, keys, self._deliver)
        except BaseException:
            self.close()
            raise
        if self.log is not None:
            self.log.note("start", None, telemetry=[f"{loop}={address}"
                                                    for loop, address in addresses],
                          ack=ack)

    @property
    def can_acknowledge(self) -> bool:
        return self.log is not None

    def _deliver(self, batch: _Batch) -> None:
        """From the reader thread: queue the batch and wake the event loop."""
        self._pending.put(batch)
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                self._loop.call_soon_threadsafe(self._take)

    def _take(self) -> None:
        while True:
            try:
                batch = self._pending.get_nowait()
            except queue.Empty:
                return
            for loop, address, envelope in batch.items:
                self.state.receive(loop, address, envelope, batch.received)
            self.state.rejected.update(batch.rejected)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.reader.start()

    def acknowledge(self, alarm_id: int, operator: str, note: str) -> dict:
        """Log, publish, then show an alarm acknowledged (see the module docstring)."""
        ack = self.state.ack_message(alarm_id, operator, note)
        published = False
        if self.ack_pub is not None:
            dropped = self.ack_pub.dropped
            self.ack_pub.send(ack)  # its on_send writes the audit row first
            published = self.ack_pub.dropped == dropped  # else its queue was full
        else:
            self.log.note("alarm_ack", None, **ack.body())
        t_wall = time.time()
        self.state.acknowledged(alarm_id, ack, t_wall)
        return {"id": alarm_id, "operator": ack.operator, "t_wall": t_wall,
                "published": published}

    def close(self) -> None:
        if self.reader is not None and self.reader.is_alive():
            self.reader.close()
        if self.auth is not None:
            self.auth.stop()
        if self.log is not None:
            self.log.close()
        self.context.destroy(linger=0)


# ---------------------------------------------------------------------- the application

class _TokenGate:
    """ASGI middleware: every request needs the token (see the module docstring)."""

    def __init__(self, app, token: str) -> None:
        self.app, self.token = app, token.encode()

    def _valid(self, given: str | None) -> bool:
        return given is not None and secrets.compare_digest(given.encode(), self.token)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # none is served; refuse any without the token
            conn = HTTPConnection(scope)
            if self._valid(conn.cookies.get(_COOKIE)):
                return await self.app(scope, receive, send)
            return await WebSocketClose(code=1008)(scope, receive, send)
        conn = HTTPConnection(scope)
        header = conn.headers.get("authorization", "")
        bearer = header[7:] if header.lower().startswith("bearer ") else None
        if self._valid(bearer) or self._valid(conn.cookies.get(_COOKIE)):
            return await self.app(scope, receive, send)
        if self._valid(conn.query_params.get("token")):
            # keep it in a cookie the page's own requests carry, out of the address bar
            response = RedirectResponse(conn.url.path, status_code=303)
            response.set_cookie(_COOKIE, self.token.decode(), httponly=True,
                                samesite="strict", path="/")
            return await response(scope, receive, send)
        response = PlainTextResponse(
            "401 Unauthorized: this monitor needs its access token (open "
            "/?token=TOKEN once, or send Authorization: Bearer TOKEN)\n", status_code=401,
            headers={"WWW-Authenticate": "Bearer"})
        return await response(scope, receive, send)


def build_app(monitor: WebMonitor, *, host: str = "127.0.0.1", token: str | None = None,
              push_s: float = PUSH_S) -> Starlette:
    """The application (routes, token gate, host check) around *monitor*."""
    shutdown = asyncio.Event()

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def state(request: Request):
        view, _ = monitor.state.view(None, time.monotonic())
        view["can_acknowledge"] = monitor.can_acknowledge
        return JSONResponse(view)

    async def events(request: Request):
        async def stream():
            cursor = None
            while not shutdown.is_set():
                view, cursor = monitor.state.view(cursor, time.monotonic())
                view["can_acknowledge"] = monitor.can_acknowledge
                yield {"event": "state", "data": json.dumps(view, allow_nan=False)}
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(shutdown.wait(), push_s)
        return EventSourceResponse(stream(), ping=15, headers={"Cache-Control": "no-store"})

    async def acknowledge(request: Request):
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin is not None and origin != own:
            return JSONResponse({"error": f"origin {origin!r} is not this page's"}, 403)
        if request.headers.get("content-type", "").split(";")[0].strip() != \
                "application/json":
            return JSONResponse({"error": "expected a JSON body (application/json)"}, 415)
        if not monitor.can_acknowledge:
            return JSONResponse({"error": "acknowledging needs an audit log: start the "
                                          "monitor with --audit FILE"}, 409)
        try:
            body = json.loads(await request.body())
            alarm_id, operator = body["id"], body.get("operator", "")
            note = body.get("note", "")
            if isinstance(alarm_id, bool) or not isinstance(alarm_id, int) or \
                    not isinstance(operator, str) or not isinstance(note, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            return JSONResponse({"error": "expected {\"id\": ALARM_ID, \"operator\": NAME, "
                                          "\"note\": TEXT}"}, 400)
        try:
            return JSONResponse(monitor.acknowledge(alarm_id, operator.strip(), note))
        except UnknownAlarm as err:
            return JSONResponse({"error": str(err)}, 409)
        except ProtocolError as err:  # an empty or overlong operator name or note
            return JSONResponse({"error": str(err)}, 400)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        monitor.start()
        try:
            yield
        finally:
            shutdown.set()

    middleware = []
    if is_loopback(host):
        middleware.append(Middleware(TrustedHostMiddleware,
                                     allowed_hosts=["localhost", "127.0.0.1", "[::1]",
                                                    "::1"]))
    if token is not None:
        middleware.append(Middleware(_TokenGate, token=token))
    routes = [Route("/", index), Route("/api/state", state), Route("/events", events),
              Route("/favicon.ico", lambda request: Response(status_code=204)),
              Route("/api/ack", acknowledge, methods=["POST"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


def serve_web(addresses: Sequence[tuple[str, str]], *, host: str, port: int,
              token: str | None = None, keys: Keys | None = None, ack: str | None = None,
              audit: str | Path | None = None, window_s: float | None = None,
              duration_s: float | None = None) -> None:
    """Serve the page on *host*:*port* until Ctrl-C (or for *duration_s* seconds).

    Raises
    ------
    ConfigError
        For a host beyond loopback without a token, a weak token, a bad address, or a
        server that could not start (the port in use).
    """
    import uvicorn

    check_access(host, token)
    monitor = WebMonitor(addresses, keys=keys, ack=ack, audit=audit,
                         window_s=DEFAULT_WINDOW_S if window_s is None else window_s)
    try:
        app = build_app(monitor, host=host, token=token)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                                access_log=False, timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)

        async def main():
            if duration_s is not None:
                asyncio.get_running_loop().call_later(
                    duration_s, lambda: setattr(server, "should_exit", True))
            await server.serve()

        try:
            asyncio.run(main())
        except SystemExit:  # uvicorn's answer to a socket it cannot bind (logged)
            pass
        if not server.started:
            raise ConfigError(f"--host {host!r} --port {port}: the web server could not "
                              f"start (is the port in use?)")
    finally:
        monitor.close()
