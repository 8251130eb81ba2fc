"""``mpc-dose serve pump-bridge CONFIG``: New Era NE-1000/NE-500 pumps on a serial line
behind the ZeroMQ command protocol.

Commands arrive on a ROUTER socket and are checked and applied by
:class:`~mpc_dose.node.pump_bridge.PumpBridgeNode`; acks go back to the sender; pump status
and alarms go out on a PUB socket (after every applied command, carrying its ``t_sim``, and
every *poll_s*). The pumps run in safe mode: the bridge polls them (which feeds the pump's
watchdog), so if this process dies the pumps stop by themselves within ``safe_mode_s``.

No frame may end this process: each is handled by :class:`BridgeCore`, which refuses a
malformed one with a reason code (answered when it names a ``cmd_id``), counts it and audits
it, and survives any defect of its own in handling a frame the same way. Lease ends are
checked between any two frames, at most *frames_per_turn* frames are handled between two
looks at the clock, and each client has a budget of frames per second, so no stream of
frames holds a lease past its end.

The config file (TOML)::

    [bridge]
    serial = "/dev/ttyUSB0"          # or a pyserial URL, or the emulator's device
    commands = "tcp://127.0.0.1:5562"
    telemetry = "tcp://127.0.0.1:5563"
    safe_mode_s = 5                  # NE safe-mode timeout, 1-255 s
    # no_hardware_watchdog = true    # with safe_mode_s = 0: run without it (explicit choice)
    poll_s = 0.5
    max_cmd_age_s = 2.0
    frames_per_turn = 32             # frames handled between two looks at the clock
    peer_frames_per_s = 50           # each client's budget (token bucket)
    peer_burst = 100

    [[pump]]
    pump = "propofol"
    address = 0
    concentration = 10.0             # drug amount per mL, in amount_unit
    amount_unit = "mg"
    max_rate_ml_per_h = 2500
    syringe_diameter_mm = 26.59

    [[pump]]                         # an insulin pump (protocol 1.1 boluses)
    pump = "insulin"
    address = 1
    concentration = 100.0            # U-100
    amount_unit = "U"
    max_rate_ml_per_h = 0.05         # the maximum basal: 5 U/h
    programmed_basal_ml_per_h = 0.004  # 0.4 U/h: where a temporary basal ends
    max_bolus = 10.0                 # U
    bolus_increment = 0.05           # U; boluses are rounded down to it
    bolus_ml_per_h = 0.9             # the bolus speed: 1.5 U/min
    max_on_board = 12.0              # U above the programmed basal, by the insulin curve
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import zmq
from pydantic import BaseModel, ConfigDict, Field

from ..audit import AuditLog
from ..errors import ConfigError
from ..node.pump_bridge import BridgePump, PumpBridgeNode
from ..protocol.codec import Envelope, refusal
from ..protocol.messages import (MAX_TEXT_CHARS, Ack, Heartbeat, Hello,
                                 RemoteProtocolError, _Message)
from ..protocol.session import PeerBudget
from ..transport.zmq_link import Authenticator, CommandServer, Keys, Telemetry
from .config_file import read_config

__all__ = ["BridgeConfig", "load_bridge_config", "BridgeCore", "Outgoing",
           "PumpBridgeProcess"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class BridgeSection(_Strict):
    serial: str
    commands: str
    telemetry: str
    baudrate: int = 19200
    safe_mode_s: int = Field(5, ge=0, le=255)
    #: safe_mode_s = 0 runs the pumps without their hardware watchdog: a dead bridge then
    #: leaves them infusing. Only with this set to true (an explicit, logged choice).
    no_hardware_watchdog: bool = False
    poll_s: float = Field(0.5, gt=0)
    max_cmd_age_s: float = Field(2.0, gt=0)
    reply_timeout_s: float = Field(0.2, gt=0)
    frames_per_turn: int = Field(32, ge=1)
    peer_frames_per_s: float = Field(50.0, gt=0)
    peer_burst: int = Field(100, ge=1)


class PumpSection(_Strict):
    pump: str
    address: int = Field(ge=0, le=99)
    concentration: float = Field(gt=0)
    amount_unit: str
    max_rate_ml_per_h: float = Field(gt=0)
    max_step_ml_per_h: float = Field(math.inf, gt=0)
    max_volume_per_h_ml: float = Field(math.inf, gt=0)
    max_lease_s: float = Field(60.0, gt=0)
    syringe_diameter_mm: float = Field(26.59, gt=0)
    # an insulin pump's boluses (amounts in amount_unit; left out: BridgePump's defaults)
    max_bolus: float | None = Field(None, ge=0)
    bolus_increment: float | None = Field(None, ge=0)
    bolus_ml_per_h: float | None = Field(None, gt=0)
    max_on_board: float | None = Field(None, gt=0)
    programmed_basal_ml_per_h: float | None = Field(None, ge=0)


class BridgeConfig(_Strict):
    bridge: BridgeSection
    pump: list[PumpSection]

    @property
    def watchdog_s(self) -> float | None:
        return float(self.bridge.safe_mode_s) if self.bridge.safe_mode_s else None


def load_bridge_config(path: str | Path | dict) -> BridgeConfig:
    """Read and check a bridge config; errors name the field and the value (T38)."""
    config = read_config(path, BridgeConfig, "pump-bridge config")
    b = config.bridge
    if b.safe_mode_s == 0 and not b.no_hardware_watchdog:
        raise ConfigError("pump-bridge config bridge.safe_mode_s = 0 runs the pumps without "
                          "their hardware watchdog (a dead bridge leaves them infusing); set "
                          "bridge.no_hardware_watchdog = true to choose that explicitly")
    if b.safe_mode_s and b.no_hardware_watchdog:
        raise ConfigError(f"pump-bridge config bridge.no_hardware_watchdog = true with "
                          f"safe_mode_s = {b.safe_mode_s}: choose one")
    if b.safe_mode_s and b.safe_mode_s <= 2 * b.poll_s:
        raise ConfigError(f"pump-bridge config bridge.safe_mode_s = {b.safe_mode_s}: must be "
                          f"more than twice poll_s ({b.poll_s} s), or the pumps stop while "
                          f"the bridge is healthy")
    for p in config.pump:
        # the pump's own checks (its amount unit, its limits)
        BridgePump(**p.model_dump(exclude_none=True))
        if b.safe_mode_s and p.max_lease_s < b.safe_mode_s:
            raise ConfigError(f"pump-bridge config pump {p.pump!r}: max_lease_s "
                              f"{p.max_lease_s} is shorter than safe_mode_s {b.safe_mode_s}")
    names = [p.pump for p in config.pump]
    if len(set(names)) != len(names) or len({p.address for p in config.pump}) != len(names):
        raise ConfigError(f"pump-bridge config pump: names and addresses must be unique, "
                          f"got {names}")
    return config


@dataclass(frozen=True)
class Outgoing:
    """A message to send: back to the client *reply_to* (a routing id), or on telemetry."""

    message: _Message
    reply_to: bytes | None = None
    t_sim: float | None = None


class BridgeCore:
    """Every frame the bridge receives, handled without I/O of its own beyond the driver and
    the audit log: *handle* returns what to send. Nothing it is given ends it.

    Parameters
    ----------
    node : PumpBridgeNode
    log : AuditLog, optional
        Every accepted frame is recorded before it is acted on; refusals, rate limiting and
        internal errors as notes.
    budget : PeerBudget
        Frames per second per client.
    """

    def __init__(self, node: PumpBridgeNode, log: AuditLog | None, budget: PeerBudget) -> None:
        self.node, self.log, self.budget = node, log, budget
        self.counts: Counter[str] = Counter()
        self._seen_transitions = 0
        self._reported_limits_s = -math.inf

    def handle(self, peer: bytes, item: Envelope | RemoteProtocolError, now: float,
               wall: float) -> list[Outgoing]:
        """One frame from client *peer*: a decoded envelope or the reason it was refused."""
        self.counts["frames"] += 1
        if not self.budget.allow(peer, now):
            self.counts["rate_limited"] += 1
            return []
        try:
            if isinstance(item, RemoteProtocolError):
                self.counts[f"refused.{item.code}"] += 1
                self.note("refused", code=item.code, text=str(item)[:500],
                           cmd_id=item.cmd_id, peer=peer.hex())
                answer = refusal(item)
                return [] if answer is None else [Outgoing(answer, peer)]
            if self.log is not None:  # recorded before it is acted on
                self.log.message("in", item)
            out = []
            for message in self.node.receive(item, now, wall):
                reply = isinstance(message, (Ack, Hello))
                out.append(Outgoing(message, peer if reply else None, item.t_sim))
            return out
        except Exception as err:  # noqa: BLE001 - a defect must not end a pump's bridge
            self.counts["internal_error"] += 1
            self.note("internal_error", error=repr(err)[:500], peer=peer.hex())
            cmd_id = getattr(getattr(item, "message", None), "cmd_id", None)
            if not isinstance(cmd_id, str):
                return []
            return [Outgoing(Ack(cmd_id=cmd_id, ok=False, code="internal",
                                 text=f"refused: the bridge failed handling it "
                                      f"({type(err).__name__}); logged"[:MAX_TEXT_CHARS]),
                             peer)]

    def expire(self, now: float) -> list[Outgoing]:
        """Lease ends and fallback volume, between any two frames."""
        return [Outgoing(m) for m in self.node.expire(now)]

    def poll(self, now: float) -> list[Outgoing]:
        return [Outgoing(m) for m in self.node.poll(now)]

    def record(self, now: float) -> None:
        """Mode changes and rate limiting into the audit log (at most a second late)."""
        node = self.node
        for t, pump, old, new, cause in node.transitions[self._seen_transitions:]:
            self.note("mode", pump=pump, source=old, target=new, cause=cause,
                       t_monotonic=t)
        self._seen_transitions = len(node.transitions)
        if now - self._reported_limits_s >= 1.0:
            self._reported_limits_s = now
            for peer, dropped in self.budget.take_dropped().items():
                self.note("rate_limited", peer=peer.hex(), dropped=dropped)

    def note(self, kind: str, **fields) -> None:
        if self.log is not None:
            try:
                self.log.note(kind, None, **fields)
            except Exception:  # noqa: BLE001 - a full disk must not stop lease checks
                self.counts["audit_error"] += 1


class PumpBridgeProcess:
    """The bridge program: the core, the serial driver and the sockets."""

    def __init__(self, config: BridgeConfig, *, audit: str | Path | None = None,
                 keys: Keys | None = None, driver=None) -> None:
        from ..transport.serial_link import NewEraDriver

        b = config.bridge
        self.config = config
        self.driver = driver or NewEraDriver(b.serial, baudrate=b.baudrate,
                                             timeout_s=b.reply_timeout_s,
                                             safe_s=b.safe_mode_s)
        node = PumpBridgeNode([BridgePump(**p.model_dump(exclude_none=True))
                               for p in config.pump],
                              self.driver, max_cmd_age_s=b.max_cmd_age_s,
                              watchdog_s=config.watchdog_s)
        self.log = AuditLog(audit, "pump-bridge") if audit else None
        self.core = BridgeCore(node, self.log, PeerBudget(b.peer_frames_per_s, b.peer_burst))
        self.node = node
        self.context = zmq.Context()
        self.auth = None
        try:
            # the allow-list runs before any server socket exists (deny by default)
            self.auth = Authenticator(self.context, keys.clients) if keys is not None \
                else None
            self.server = CommandServer(self.context, b.commands, src="pump-bridge",
                                        keys=keys)
            self.pub = Telemetry(self.context, b.telemetry, src="pump-bridge", keys=keys)
        except BaseException:
            # an address in use or a bad key: close what was opened (a context left to
            # the garbage collector with open sockets hangs in zmq_ctx_term)
            self.close()
            raise
        if self.log is not None:  # every frame out is recorded before it leaves
            self.pub.on_send = self.server.on_send = \
                lambda envelope: self.log.message("out", envelope)
            self.log.note("start", None, watchdog_s=config.watchdog_s,
                          allowed_keys=sorted(keys.clients) if keys is not None else None)
        self._running = True

    def _send(self, items: list[Outgoing]) -> None:
        for item in items:
            try:
                if item.reply_to is not None:
                    self.server.reply(item.reply_to, item.message, item.t_sim)
                else:
                    self.pub.send(item.message, item.t_sim)
            except Exception as err:  # noqa: BLE001 - e.g. its audit row failed: not sent
                self.core.counts["send_error"] += 1
                self.core.note("send_error", error=repr(err)[:500], type=item.message.type)

    def _audit_refused_handshakes(self) -> None:
        if self.auth is None:
            return
        for refused in self.auth.drain():
            self.core.counts["zap_refused"] += 1
            self.core.note("zap_refused", **refused)

    def run(self, duration_s: float | None = None) -> None:
        b = self.config.bridge
        core = self.core
        self._send([Outgoing(m) for m in self.node.initialise(time.monotonic(),
                                                               self.driver.initialise)])
        core.record(time.monotonic())
        start = next_poll = time.monotonic()
        while self._running and (duration_s is None or
                                 time.monotonic() - start < duration_s):
            now = time.monotonic()
            wait = min(next_poll, self.node.next_deadline(now), now + 0.05) - now
            for peer, item in self.server.frames(max(0.0, wait), limit=b.frames_per_turn):
                self._send(core.handle(peer, item, time.monotonic(), time.time()))
                self._send(core.expire(time.monotonic()))
            self._send(core.expire(time.monotonic()))
            if time.monotonic() >= next_poll:
                self._send(core.poll(time.monotonic()))
                self.pub.send(Heartbeat(role="pump-bridge", state="running", period_s=b.poll_s))
                next_poll = time.monotonic() + b.poll_s
            self._audit_refused_handshakes()
            core.record(time.monotonic())

    def stop(self) -> None:
        """Ask :meth:`run` to return (e.g. from a SIGTERM handler)."""
        self._running = False

    def close(self) -> None:
        for state in self.node.pumps.values():  # leave the pumps stopped
            try:
                self.driver.stop(state.config.address)
            except Exception:  # noqa: BLE001 - safe mode stops them anyway
                pass
        if self.auth is not None:
            self.auth.stop()
        if self.log is not None:
            self.core.record(math.inf)
            self.log.close()
        self.context.destroy(linger=0)
