"""``mpc-dose serve sdc-bridge CONFIG``: an IEEE 11073 SDC provider (a monitor, a pump)
behind the ZeroMQ protocol, through the ``sdc11073`` package.

Metrics: the bridge subscribes to the provider's metric reports and publishes each configured
numeric metric as a ``measurement`` on its telemetry socket (quality from the metric's
validity, :mod:`mpc_dose.protocol.sdc`), with alarms for a stale metric, a lost link, a
descriptor that does not match the configuration and values it cannot use
(:class:`~mpc_dose.node.sdc_bridge.SdcMetricsNode`). Every ``probe_s`` it reads the metrics'
states with a GetMdState: a failed read, an ended subscription, or states that moved on while
no report came (the provider dropped the subscription, e.g. after a report the bridge's schema
check refused) is a lost link; it reconnects every ``reconnect_s`` (re-discovering the
provider by its EPR when configured so).

Pumps: ``set_rate``, ``bolus``, ``stop`` and ``get_status`` on the command socket go through
the pump bridge's own checks (:class:`~mpc_dose.node.pump_bridge.PumpBridgeNode` and
:class:`~mpc_dose.serve.pump_bridge.BridgeCore`: leases, order and replay, idempotency by
``cmd_id``, limits, fallback at the lease end, read-back, STOPPED until an operator restarts
it), with :class:`~mpc_dose.transport.sdc_link.SdcPumpDriver` as the pump: a rate is a
SetValue operation on the pump's rate setting, its final invocation state is the answer
(``Fin``/``FinMod`` -> applied after the read-back, ``Fail`` with ``Inv`` -> ``out_of_range``,
any other failure -> ``pump_error`` and the pump stopped), a lost link stops taking rates.

The config file (TOML)::

    [bridge]
    address = "http://127.0.0.1:40123/5f2a..."   # the provider's address, or:
    # epr = "urn:uuid:..."                        # found by WS-Discovery on `adapter`
    # adapter = "127.0.0.1"                       # an IPv4 address of this host
    telemetry = "tcp://127.0.0.1:5573"
    commands = "tcp://127.0.0.1:5572"             # needed with [[pump]]
    stale_s = 5.0                                 # a metric silent this long -> alarm
    probe_s = 1.0                                 # link check (GetMdState)
    reconnect_s = 2.0

    [[metric]]
    handle = "bis"                                # the metric's descriptor handle
    var = "bis"                                   # published as
    unit = "1"                                    # a measurement unit of the protocol
    # low = 0, high = 100                         # plausible range (default: TechnicalRange)
    # mdc_unit_code = 262656                      # for units mpc_dose has no code for

    [[pump]]
    pump = "propofol"
    operation = "op.propofol.rate"                # the SetValue operation of its rate
    delivered = "propofol.delivered"              # optional: its volume delivered [mL]
    concentration = 10.0
    amount_unit = "mg"
    max_rate_ml_per_h = 1200
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from pathlib import Path

import zmq
from pydantic import BaseModel, ConfigDict, Field

from ..audit import AuditLog
from ..errors import ConfigError
from ..node.pump_bridge import BridgePump, PumpBridgeNode
from ..node.sdc_bridge import SdcMetricsNode
from ..protocol.messages import Heartbeat, WIRE_UNITS
from ..protocol.sdc import MetricMapping
from ..protocol.session import PeerBudget
from ..transport.sdc_link import SdcLink, SdcLinkError, SdcPumpBinding, SdcPumpDriver
from ..transport.zmq_link import Authenticator, CommandServer, Keys, Telemetry
from .config_file import read_config
from .pump_bridge import BridgeCore, Outgoing

__all__ = ["SdcBridgeConfig", "load_sdc_bridge_config", "SdcBridgeProcess"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class SdcBridgeSection(_Strict):
    address: str | None = None
    epr: str | None = None
    adapter: str = "127.0.0.1"
    telemetry: str
    commands: str | None = None
    sensor: str = Field("sdc", min_length=1, max_length=128)
    #: the sender id of its messages (two SDC bridges feeding one controller each need
    #: their own: readings under one name hide each other's)
    src: str = Field("sdc-bridge", min_length=1, max_length=128)
    stale_s: float = Field(5.0, gt=0)
    max_future_s: float = Field(2.0, ge=0)
    probe_s: float = Field(1.0, gt=0)
    reconnect_s: float = Field(2.0, gt=0)
    start_wait_s: float = Field(10.0, ge=0)
    socket_timeout_s: float = Field(2.0, gt=0)
    discovery_timeout_s: float = Field(3.0, gt=0)
    operation_timeout_s: float = Field(2.0, gt=0)
    #: pumps whose SetValue has no InvocationEffectiveTimeout keep a rate if the bridge dies:
    #: only with this set to true (an explicit, logged choice)
    no_device_watchdog: bool = False
    poll_s: float = Field(0.5, gt=0)
    max_cmd_age_s: float = Field(2.0, gt=0)
    frames_per_turn: int = Field(32, ge=1)
    peer_frames_per_s: float = Field(50.0, gt=0)
    peer_burst: int = Field(100, ge=1)


class MetricSection(_Strict):
    handle: str = Field(min_length=1, max_length=128)
    var: str = Field(min_length=1, max_length=128)
    unit: str
    low: float | None = None
    high: float | None = None
    mdc_unit_code: int | None = Field(None, ge=0)


class SdcPumpSection(_Strict):
    pump: str = Field(min_length=1, max_length=128)
    operation: str = Field(min_length=1)
    delivered: str | None = None
    concentration: float = Field(gt=0)
    amount_unit: str
    max_rate_ml_per_h: float = Field(gt=0)
    max_step_ml_per_h: float = Field(math.inf, gt=0)
    max_volume_per_h_ml: float = Field(math.inf, gt=0)
    max_lease_s: float = Field(60.0, gt=0)


class SdcBridgeConfig(_Strict):
    bridge: SdcBridgeSection
    metric: list[MetricSection] = []
    pump: list[SdcPumpSection] = []

    def mappings(self) -> list[MetricMapping]:
        return [MetricMapping(handle=m.handle, var=m.var, unit=m.unit, low=m.low, high=m.high,
                              mdc_unit_code=m.mdc_unit_code, sensor=self.bridge.sensor)
                for m in self.metric]

    def bridge_pumps(self) -> list[BridgePump]:
        # the pump's "address" is its place in the list (the SDC driver's index)
        return [BridgePump(pump=p.pump, address=i, concentration=p.concentration,
                           amount_unit=p.amount_unit, max_rate_ml_per_h=p.max_rate_ml_per_h,
                           max_step_ml_per_h=p.max_step_ml_per_h,
                           max_volume_per_h_ml=p.max_volume_per_h_ml, max_lease_s=p.max_lease_s)
                for i, p in enumerate(self.pump)]


def load_sdc_bridge_config(path: str | Path | dict) -> SdcBridgeConfig:
    """Read and check an SDC bridge config; errors name the field and the value."""
    config = read_config(path, SdcBridgeConfig, "sdc-bridge config")
    b = config.bridge
    if (b.address is None) == (b.epr is None):
        raise ConfigError(f"sdc-bridge config bridge: give the provider's address (its "
                          f"http://host:port/path) or its epr (found by WS-Discovery), "
                          f"exactly one; got address={b.address!r}, epr={b.epr!r}")
    if b.address is not None and not b.address.startswith("http://"):
        raise ConfigError(f"sdc-bridge config bridge.address {b.address!r}: expected "
                          f"http://host:port/path (https needs TLS certificates, which this "
                          f"bridge does not load yet)")
    if not config.metric and not config.pump:
        raise ConfigError("sdc-bridge config: no [[metric]] and no [[pump]]: nothing to do")
    if config.pump and not b.commands:
        raise ConfigError("sdc-bridge config bridge.commands: needed with [[pump]] (the "
                          "address the controller sends its commands to)")
    for i, m in enumerate(config.metric):
        if m.unit not in WIRE_UNITS["measurement"]:
            raise ConfigError(f"sdc-bridge config metric.{i}.unit {m.unit!r}: expected one of "
                              f"{', '.join(WIRE_UNITS['measurement'])}")
        try:
            MetricMapping(handle=m.handle, var=m.var, unit=m.unit, low=m.low, high=m.high,
                          mdc_unit_code=m.mdc_unit_code)
        except ValueError as err:
            raise ConfigError(f"sdc-bridge config metric.{i}: {err}") from None
    for i, p in enumerate(config.pump):
        try:
            BridgePump(pump=p.pump, address=i, concentration=p.concentration,
                       amount_unit=p.amount_unit, max_rate_ml_per_h=p.max_rate_ml_per_h)
        except ConfigError as err:
            raise ConfigError(f"sdc-bridge config pump.{i}: {err}") from None
    for name, values in (("metric.handle", [m.handle for m in config.metric]),
                         ("metric.var", [m.var for m in config.metric]),
                         ("pump.pump", [p.pump for p in config.pump]),
                         ("pump.operation", [p.operation for p in config.pump])):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"sdc-bridge config {name}: must be unique, {repeated} repeated")
    return config


class SdcBridgeProcess:
    """The SDC bridge program: the SDC link, the metrics node, the pump bridge core and the
    sockets.

    *link* replaces the :class:`~mpc_dose.transport.sdc_link.SdcLink` made from the config
    (tests)."""

    def __init__(self, config: SdcBridgeConfig, *, audit: str | Path | None = None,
                 keys: Keys | None = None, link: SdcLink | None = None) -> None:
        b = config.bridge
        self.config = config
        self.metrics = SdcMetricsNode(config.mappings(), stale_s=b.stale_s,
                                      max_future_s=b.max_future_s)
        self.link = link or SdcLink(address=b.address, epr=b.epr, adapter=b.adapter,
                                    handles=[m.handle for m in config.metric],
                                    socket_timeout_s=b.socket_timeout_s,
                                    discovery_timeout_s=b.discovery_timeout_s)
        self.driver = SdcPumpDriver(self.link, [SdcPumpBinding(p.operation, p.delivered)
                                                for p in config.pump],
                                    operation_timeout_s=b.operation_timeout_s,
                                    no_device_watchdog=b.no_device_watchdog)
        self.node = PumpBridgeNode(config.bridge_pumps(), self.driver,
                                   max_cmd_age_s=b.max_cmd_age_s)
        self.log = AuditLog(audit, "sdc-bridge") if audit else None
        self.core = BridgeCore(self.node, self.log, PeerBudget(b.peer_frames_per_s,
                                                               b.peer_burst))
        self.context = zmq.Context()
        self.auth = self.server = None
        try:
            # the allow-list runs before any server socket exists (deny by default)
            self.auth = Authenticator(self.context, keys.clients) if keys is not None \
                else None
            if config.pump:
                self.server = CommandServer(self.context, b.commands, src=b.src,
                                            keys=keys)
            self.pub = Telemetry(self.context, b.telemetry, src=b.src, keys=keys)
        except BaseException:
            self.close()
            raise
        if self.log is not None:  # every frame out is recorded before it leaves
            self.pub.on_send = lambda envelope: self.log.message("out", envelope)
            if self.server is not None:
                self.server.on_send = self.pub.on_send
            self.log.note("start", None, provider=b.address or b.epr,
                          metrics=[m.handle for m in config.metric],
                          pumps=[p.pump for p in config.pump],
                          allowed_keys=sorted(keys.clients) if keys is not None else None)
        self._wake = threading.Event()     # set by stop(): the loop's waits end at once
        self._running = True
        self._next_connect = 0.0
        self._attempt: threading.Thread | None = None
        self._attempt_result = None
        self._last_connect_error = ""
        self._seen_version: dict[str, int] = {}   # the newest StateVersion reported
        #: the StateVersions the last two probes read
        self._expected: deque[dict[str, int]] = deque(maxlen=2)
        self.probe_handles = [m.handle for m in config.metric] + [p.operation
                                                                  for p in config.pump]

    # ------------------------------------------------------------------ the link
    def connect(self, now: float) -> bool:
        """Connect when due, in a thread of its own (discovery and the first requests can
        take seconds, during which leases are still checked and commands answered);
        publish what the attempt changed once it is over."""
        attempt = self._attempt
        if attempt is not None:
            if attempt.is_alive():
                return False
            self._attempt = None
            self._connected(now, self._attempt_result)
            return self.link.connected
        if self.link.connected or now < self._next_connect:
            return self.link.connected
        self._next_connect = now + self.config.bridge.reconnect_s

        def attempt_connect() -> None:
            try:
                self._attempt_result = self.link.connect()
            except Exception as err:  # noqa: BLE001 - SdcLinkError, or a defect: not up
                self._attempt_result = err

        self._attempt = threading.Thread(target=attempt_connect, daemon=True,
                                         name="sdc-connect")
        self._attempt.start()
        return False

    def _connected(self, now: float, result) -> None:
        """The end of a connection attempt: *result* is the descriptors, or the error."""
        if isinstance(result, BaseException):
            text = str(result) if isinstance(result, SdcLinkError) else \
                f"connecting failed: {type(result).__name__}: {result}"[:500]
            if text != self._last_connect_error:  # each new reason once in the log
                self._last_connect_error = text
                self.core.note("sdc_connect_failed", error=text)
            self._publish(self.metrics.disconnected(now, text))
            return
        self._last_connect_error = ""
        self._seen_version = {}
        self._expected.clear()
        self.core.note("sdc_connected", provider=self.link.connected_to,
                       sequence_id=self.link.sequence_id)
        self._publish(self.metrics.connected(now, result, self.link.connected_to or ""))

    def lost(self, now: float, reason: str) -> None:
        """The link is lost: drop it, alarm, read the pumps at once (unreadable: each is
        stopped as unreachable and STOPPED until an operator restarts the bridge), and
        reconnect from the next turn on."""
        self.link.close()
        self._next_connect = now
        self._publish(self.metrics.disconnected(now, reason))
        if self.config.pump:
            self._send(self.core.poll(now))

    def probe(self, now: float) -> None:
        """Check the link: the subscriptions, a GetMdState, and that reports keep up."""
        if not self.link.connected or self._attempt is not None:
            return                         # an attempt's outcome is taken first
        try:
            problem = self._probe_problem()
        except Exception as err:  # noqa: BLE001 - a defect must not end the bridge
            self.core.counts["internal_error"] += 1
            self.core.note("internal_error", error=repr(err)[:500], where="probe")
            problem = f"link check failed: {type(err).__name__}"
        if problem is not None:
            self.lost(now, problem)

    def _probe_problem(self) -> str | None:
        problem = self.link.healthy()
        if problem is None and self.probe_handles:
            try:
                states = self.link.states(self.probe_handles)
            except SdcLinkError as err:
                problem = str(err)
            else:
                # a state the provider had two probes ago must have been reported by now
                # (a report late by more than a probe period is not a lost link; one late
                # by two is): else the reports stopped coming
                older = self._expected[0] if len(self._expected) == 2 else {}
                missing = sorted(h for h, version in older.items()
                                 if self._seen_version.get(h, -1) < version)
                if missing:
                    problem = (f"metric reports stopped arriving ({', '.join(missing)} moved "
                               f"on without a report for {2 * self.config.bridge.probe_s:g} "
                               f"s): subscription lost")
                self._expected.append({h: s.state_version for h, s in states.items()
                                       if h in self.metrics.streams
                                       and isinstance(s.state_version, int)})
        return problem

    def take_samples(self) -> None:
        """Every queued metric sample -> measurements and alarms."""
        for t_mono, t_wall, sample in self.link.samples():
            if sample.state_version is not None:
                self._seen_version[sample.handle] = max(
                    self._seen_version.get(sample.handle, -1), sample.state_version)
            try:
                self._publish(self.metrics.receive(sample, t_mono, t_wall))
            except Exception as err:  # noqa: BLE001 - a defect must not end the bridge
                self.core.counts["internal_error"] += 1
                self.core.note("internal_error", error=repr(err)[:500], handle=sample.handle)

    # ------------------------------------------------------------------ the loop
    def _publish(self, messages) -> None:
        self._send([Outgoing(m) for m in messages])

    def _send(self, items: list[Outgoing]) -> None:
        for item in items:
            try:
                if item.reply_to is not None and self.server is not None:
                    self.server.reply(item.reply_to, item.message, item.t_sim)
                else:
                    self.pub.send(item.message, item.t_sim)
            except Exception as err:  # noqa: BLE001 - e.g. its audit row failed: not sent
                self.core.counts["send_error"] += 1
                self.core.note("send_error", error=repr(err)[:500], type=item.message.type)

    def _record(self, now: float) -> None:
        for kind, fields in self.metrics.take_notes() + self.driver.take_events():
            self.core.note(kind, **fields)
        self.core.record(now)
        if self.auth is not None:
            for refused in self.auth.drain():
                self.core.counts["zap_refused"] += 1
                self.core.note("zap_refused", **refused)

    def start(self) -> None:
        """Connect (waiting up to ``start_wait_s`` for the provider), then initialise the
        pumps: stopped and read back, or STOPPED with the reason until a restart."""
        b = self.config.bridge
        deadline = time.monotonic() + b.start_wait_s
        while self._running and not self.connect(time.monotonic()) and \
                (time.monotonic() < deadline or self._attempt is not None):
            self._wake.wait(0.02)
        if self.config.pump:
            self._send([Outgoing(m) for m in self.node.initialise(
                time.monotonic(), self.driver.initialise)])
            self.node.watchdog_s = self.driver.watchdog_s()
            self.core.note("pumps", watchdog_s=self.node.watchdog_s,
                           no_device_watchdog=b.no_device_watchdog)
            self._record(time.monotonic())
            if self.node.watchdog_s is not None and b.poll_s > self.node.watchdog_s / 4:
                # the renewal comes at half the watchdog plus up to one poll: keep a margin
                raise ConfigError(f"sdc-bridge config bridge.poll_s = {b.poll_s:g}: the "
                                  f"device's watchdog (InvocationEffectiveTimeout) is "
                                  f"{self.node.watchdog_s:g} s; poll at most every "
                                  f"{self.node.watchdog_s / 4:g} s so that a healthy bridge "
                                  f"renews it in time")
        self._record(time.monotonic())

    def run(self, duration_s: float | None = None) -> None:
        b = self.config.bridge
        core = self.core
        start = time.monotonic()
        self.start()
        next_poll = next_probe = time.monotonic()
        while self._running and (duration_s is None or time.monotonic() - start < duration_s):
            now = time.monotonic()
            self.connect(now)
            wait = min(next_poll, next_probe, self.node.next_deadline(now),
                       self.metrics.next_deadline(now), now + 0.05) - now
            if self.server is not None:
                for peer, item in self.server.frames(max(0.0, wait), limit=b.frames_per_turn):
                    self._send(core.handle(peer, item, time.monotonic(), time.time()))
                    self._send(core.expire(time.monotonic()))
            else:
                self._wake.wait(max(0.0, wait))
            self._send(core.expire(time.monotonic()))
            self.take_samples()
            now = time.monotonic()
            if now >= next_probe:
                self.probe(now)
                next_probe = now + b.probe_s
            self._publish(self.metrics.check(now))
            if now >= next_poll:
                self._send(core.poll(now))
                self.pub.send(Heartbeat(role="sdc-bridge", state="running" if
                                        self.link.connected else "link_down",
                                        period_s=b.poll_s))
                next_poll = time.monotonic() + b.poll_s
            self._record(time.monotonic())

    def stop(self) -> None:
        """Ask :meth:`run` to return (e.g. from a SIGTERM handler)."""
        self._running = False
        self._wake.set()

    def close(self) -> None:
        attempt = getattr(self, "_attempt", None)
        if attempt is not None:            # a connection attempt ends within its time-outs
            attempt.join(self.config.bridge.socket_timeout_s * 3
                               + self.config.bridge.discovery_timeout_s)
        for state in self.node.pumps.values():  # leave the pumps stopped
            try:
                self.driver.stop(state.config.address)
            except Exception:  # noqa: BLE001 - the device's watchdog reverts them anyway
                pass
        self.link.shutdown()
        if self.auth is not None:
            self.auth.stop()
        if self.log is not None:
            self._record(math.inf)
            self.log.close()
        self.context.destroy(linger=0)
