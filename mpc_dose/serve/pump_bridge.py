"""``mpc-dose serve pump-bridge CONFIG``: New Era NE-1000/NE-500 pumps on a serial line
behind the ZeroMQ command protocol.

Commands arrive on a ROUTER socket and are checked and applied by
:class:`~mpc_dose.node.pump_bridge.PumpBridgeNode`; acks go back to the sender; pump status
and alarms go out on a PUB socket (after every applied command, carrying its ``t_sim``, and
every *poll_s*). The pumps run in safe mode: the bridge polls them (which feeds the pump's
watchdog) only while a lease or a software fallback is running, so if this process dies the
pumps stop by themselves within ``safe_mode_s``.

The config file (TOML)::

    [bridge]
    serial = "/dev/ttyUSB0"          # or a pyserial URL, or the emulator's device
    commands = "tcp://127.0.0.1:5562"
    telemetry = "tcp://127.0.0.1:5563"
    safe_mode_s = 5                  # NE safe-mode timeout, 1-255 s (0: basic mode)
    poll_s = 0.5
    max_cmd_age_s = 2.0

    [[pump]]
    pump = "propofol"
    address = 0
    concentration = 10.0             # drug amount per mL, in amount_unit
    amount_unit = "mg"
    max_rate_ml_per_h = 2500
    syringe_diameter_mm = 26.59
"""

from __future__ import annotations

import math
import time
import tomllib
from pathlib import Path

import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..audit import AuditLog
from ..errors import ConfigError
from ..node.pump_bridge import BridgePump, PumpBridgeNode
from ..protocol.messages import Ack, Heartbeat, Hello
from ..transport.zmq_link import CommandServer, Keys, Telemetry

__all__ = ["BridgeConfig", "load_bridge_config", "PumpBridgeProcess"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class BridgeSection(_Strict):
    serial: str
    commands: str
    telemetry: str
    baudrate: int = 19200
    safe_mode_s: int = Field(5, ge=0, le=255)
    poll_s: float = Field(0.5, gt=0)
    max_cmd_age_s: float = Field(2.0, gt=0)
    reply_timeout_s: float = Field(0.2, gt=0)


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


class BridgeConfig(_Strict):
    bridge: BridgeSection
    pump: list[PumpSection]


def load_bridge_config(path: str | Path | dict) -> BridgeConfig:
    """Read and check a bridge config; errors name the field and the value (T38)."""
    data = path if isinstance(path, dict) else tomllib.loads(Path(path).read_text("utf-8"))
    try:
        config = BridgeConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"pump-bridge config {where}: {first['msg']} "
                          f"(got {first.get('input')!r})") from None
    b = config.bridge
    if b.safe_mode_s and b.safe_mode_s <= 2 * b.poll_s:
        raise ConfigError(f"pump-bridge config bridge.safe_mode_s = {b.safe_mode_s}: must be "
                          f"more than twice poll_s ({b.poll_s} s), or the pumps stop while "
                          f"the bridge is healthy")
    for p in config.pump:
        if b.safe_mode_s and p.max_lease_s < b.safe_mode_s:
            raise ConfigError(f"pump-bridge config pump {p.pump!r}: max_lease_s "
                              f"{p.max_lease_s} is shorter than safe_mode_s {b.safe_mode_s}")
    names = [p.pump for p in config.pump]
    if len(set(names)) != len(names) or len({p.address for p in config.pump}) != len(names):
        raise ConfigError(f"pump-bridge config pump: names and addresses must be unique, "
                          f"got {names}")
    return config


class PumpBridgeProcess:
    """The bridge program: the node, the serial driver and the sockets."""

    def __init__(self, config: BridgeConfig, *, audit: str | Path | None = None,
                 keys: Keys | None = None, driver=None) -> None:
        from ..transport.serial_link import NewEraDriver

        b = config.bridge
        self.config = config
        self.driver = driver or NewEraDriver(b.serial, baudrate=b.baudrate,
                                             timeout_s=b.reply_timeout_s,
                                             safe_s=b.safe_mode_s)
        self.node = PumpBridgeNode([BridgePump(**p.model_dump()) for p in config.pump],
                                   self.driver, max_cmd_age_s=b.max_cmd_age_s)
        self.context = zmq.Context()
        self.server = CommandServer(self.context, b.commands, src="pump-bridge", keys=keys)
        self.pub = Telemetry(self.context, b.telemetry, src="pump-bridge", keys=keys)
        self.log = AuditLog(audit, "pump-bridge") if audit else None
        if self.log is not None:  # every frame out is recorded before it leaves
            self.pub.on_send = self.server.on_send = \
                lambda envelope: self.log.message("out", envelope)
        self._seen_transitions = 0
        self._running = True

    def _out(self, message, t_sim=None) -> None:
        self.pub.send(message, t_sim)

    def _transitions(self) -> None:
        for t, pump, old, new, cause in self.node.transitions[self._seen_transitions:]:
            if self.log is not None:
                self.log.note("mode", None, pump=pump, source=old, target=new, cause=cause,
                              t_monotonic=t)
        self._seen_transitions = len(self.node.transitions)

    def run(self, duration_s: float | None = None) -> None:
        for message in self.node.initialise(time.monotonic(), self.driver.initialise):
            self._out(message)
        self._transitions()
        poll_s = self.config.bridge.poll_s
        start = next_poll = time.monotonic()
        while self._running and (duration_s is None or
                                 time.monotonic() - start < duration_s):
            for identity, envelope in self.server.receive(max(0.0, next_poll -
                                                              time.monotonic())):
                if self.log is not None:
                    self.log.message("in", envelope)
                for answer in self.node.receive(envelope, time.monotonic(), time.time()):
                    if isinstance(answer, (Ack, Hello)):
                        self.server.reply(identity, answer, envelope.t_sim)
                    else:
                        self._out(answer, envelope.t_sim)
                self._transitions()
            if time.monotonic() >= next_poll:
                for message in self.node.poll(time.monotonic()):
                    self._out(message)
                self._out(Heartbeat(role="pump-bridge", state="running", period_s=poll_s))
                self._transitions()
                next_poll = time.monotonic() + poll_s

    def stop(self) -> None:
        """Ask :meth:`run` to return (e.g. from a SIGTERM handler)."""
        self._running = False

    def close(self) -> None:
        for state in self.node.pumps.values():  # leave the pumps stopped
            try:
                self.driver.stop(state.config.address)
            except Exception:  # noqa: BLE001 - safe mode stops them anyway
                pass
        if self.log is not None:
            self.log.close()
        self.context.destroy(linger=0)
