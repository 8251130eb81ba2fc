"""The pump-bridge node: commands for real (or emulated) pumps in, acks and pump status out.

It does not trust the controller (IEC 62304 segregation): every ``set_rate`` is checked again
here - sender epoch and sequence (stale and replayed commands are refused), age
(``max_cmd_age_s``, on the sender's wall clock: a clock skew beyond it is refused, not
accepted), idempotency (a repeated ``cmd_id`` gets its cached ack), limits on the rate *and*
on the fallback the pump will run when the lease ends (rate, step up, volume per hour, lease
length), the dose-rate cross-check - then applied through the *driver*, read back, and held
for its lease on the bridge's own monotonic clock. When a lease ends without a new command
the bridge applies the command's fallback itself (B1, B3), and stops a preset-rate fallback
that reaches the hourly volume.

Boluses (protocol 1.1, an insulin pump's): a ``bolus`` of a pump with ``max_bolus > 0`` is
checked the same way (age and lease, sequence, idempotency, then its amount against
``max_bolus``, its rise against the step and rate limits, the hourly volume, the insulin on
board against ``max_on_board``), rounded DOWN to ``bolus_increment`` (a bolus that rounds to
nothing is refused, ``out_of_range``), and given as a short infusion at the pump's bolus
speed on top of the rate in force: the bridge raises the pump's rate by the bolus speed and
lowers it again when the bolus volume is in (the end is a deadline of :meth:`expire`, like a
lease end), so it works on any rate-commanded pump and the pump's watchdog stops a bolus whose
bridge died. One bolus at a time (another is ``busy``); a ``stop`` or a fault cancels it. For
an insulin pump the lease-end fallback is the pump's programmed basal
(``programmed_basal_ml_per_h``): a temporary basal is a ``set_rate`` whose lease ends into a
``preset_rate`` fallback no higher than it.

``STOPPED`` means one of two things, both said in the pump's status and cause: a stop was
commanded and read back (``stopped`` or ``alarm``), or the pump cannot be reached and its
hardware watchdog owns it (``disconnected``). A pump whose state is unknown (power reset,
unreachable, read-back mismatch, alarm) takes no rate until an operator acknowledges it
(B7, B8); meanwhile every poll checks that it stays stopped.

No sockets and no clock: times are arguments. The *driver* does the device I/O:
``set_rate(address, mL/h) -> read-back mL/h``, ``stop(address)``, ``read(address)`` with
``state``, ``rate_ml_per_h``, ``dispensed_ml`` and ``alarm``; its exceptions may carry a
``code`` (``out_of_range``, ``alarm``, ``pump_error``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace

from ..control.insulin import InsulinCurve
from ..errors import ConfigError
from ..plant.pump import DEFAULT_BOLUS_ML_PER_H, round_down
from ..protocol.codec import Envelope
from ..protocol.messages import (MAX_TEXT_CHARS, WIRE_UNITS, Ack, Alarm, Bolus, GetStatus,
                                 Hello, LocalProtocolError, PumpStatus, SetRate, Stop,
                                 _Message, wire_factor)
from ..protocol.session import Lease, SequenceTracker

__all__ = ["BridgePump", "PumpBridgeNode"]

#: what a pump reads when it delivers nothing
_NOT_INFUSING = ("stopped", "paused", "alarm")
#: how often an unreachable STOPPED pump is tried again [s] (each try may wait out the
#: driver's reply time-outs, during which no frame is handled)
_UNREACHABLE_RETRY_S = 5.0


@dataclass(frozen=True)
class BridgePump:
    """One pump behind the bridge, with the bridge's own hard limits.

    *concentration* is drug amount per mL in *amount_unit* (for the dose cross-check).
    *max_step_ml_per_h* limits every rise of the rate, including a preset fallback above the
    commanded rate and a bolus's rise; a fall is always allowed (a stop is always safe).
    *max_rate_ml_per_h* limits the commanded rates (for an insulin pump: its maximum basal);
    a bolus runs on top of them at its own speed, bounded by *max_bolus*.

    Boluses (an insulin pump's; amounts in *amount_unit*): *max_bolus* the largest (0: the
    pump takes no ``bolus`` command), *bolus_increment* the step amounts are rounded down to
    (0: none), *bolus_ml_per_h* the pump's bolus speed, *max_on_board* the most insulin on
    board after a bolus or over a command's lease (counted by the bridge from what it ran
    above *programmed_basal_ml_per_h*, decayed by *curve*; inf: not checked).
    *programmed_basal_ml_per_h*, when set, is the pump's programmed basal: a lease-end
    fallback above it is refused.
    """

    pump: str
    address: int
    concentration: float
    amount_unit: str
    max_rate_ml_per_h: float
    max_step_ml_per_h: float = math.inf
    max_volume_per_h_ml: float = math.inf
    max_lease_s: float = 60.0
    syringe_diameter_mm: float = 26.59
    max_bolus: float = 0.0
    bolus_increment: float = 0.0
    bolus_ml_per_h: float = DEFAULT_BOLUS_ML_PER_H
    max_on_board: float = math.inf
    programmed_basal_ml_per_h: float | None = None
    curve: InsulinCurve = field(default_factory=InsulinCurve)

    def __post_init__(self) -> None:
        where = f"pump-bridge pump {self.pump!r}"
        for name in ("concentration", "max_rate_ml_per_h", "max_step_ml_per_h",
                     "max_volume_per_h_ml", "max_lease_s", "bolus_ml_per_h", "max_on_board"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{where}: {name} must be > 0, got {value!r}")
        for name in ("max_bolus", "bolus_increment"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{where}: {name} must be a finite number >= 0, "
                                  f"got {value!r}")
        basal = self.programmed_basal_ml_per_h
        if basal is not None and not 0 <= basal <= self.max_rate_ml_per_h:
            raise ConfigError(f"{where}: programmed_basal_ml_per_h must be in [0, "
                              f"{self.max_rate_ml_per_h:g}], got {basal!r}")
        if not 0 <= self.address <= 99:
            raise ConfigError(f"{where}: address must be in 0-99, got {self.address!r}")
        if self.amount_unit not in WIRE_UNITS["amount"]:
            raise ConfigError(f"{where}: amount_unit {self.amount_unit!r} is not one of the "
                              f"protocol's drug amounts ({', '.join(WIRE_UNITS['amount'])})")


@dataclass
class _PumpState:
    config: BridgePump
    mode: str = "INIT"           # INIT, READY, COMMANDED, FALLBACK, STOPPED
    state: str = "unknown"       # the device's state as last read (or "disconnected")
    rate_ml_per_h: float = 0.0
    delivered_ml: float = 0.0
    lease: Lease | None = None
    fallback_ml_per_h: float = 0.0
    cause: str = "not initialised"
    volume_log: list[tuple[float, float]] = field(default_factory=list)  # (t, mL/h) set
    #: a STOPPED pump that kept infusing after a stop: no more packets, so that its own
    #: watchdog stops it (reads would keep feeding it)
    starved: bool = False
    #: when an unreachable STOPPED pump is tried again [bridge monotonic s]
    retry_s: float = 0.0
    #: the bolus running, if any, and the amount of every bolus given so far [amount unit]
    bolus: _RunningBolus | None = None
    bolus_given: float = 0.0
    #: (t, mL/h) every rate run, kept for the insulin-action time (insulin on board)
    dose_log: list[tuple[float, float]] = field(default_factory=list)

    @property
    def bolus_ml_per_h(self) -> float:
        """The running bolus's part of the pump's rate [mL/h] (0 when none)."""
        return self.bolus.ml_per_h if self.bolus is not None else 0.0

    def log_rate(self, now: float, rate_ml_per_h: float) -> None:
        """The pump runs *rate_ml_per_h* (everything: basal and bolus) from *now*."""
        self.volume_log.append((now, rate_ml_per_h))
        if self.config.max_bolus > 0 or math.isfinite(self.config.max_on_board):
            self.dose_log.append((now, rate_ml_per_h))  # insulin on board needs them


@dataclass(frozen=True)
class _RunningBolus:
    """A bolus being given: *amount* [pump amount unit] at *ml_per_h* from *start_s* to
    *end_s* [bridge monotonic s]."""

    cmd_id: str
    amount: float
    ml_per_h: float
    start_s: float
    end_s: float

    def given(self, now: float) -> float:
        """The amount in by *now*."""
        span = self.end_s - self.start_s
        return self.amount if span <= 0 else \
            self.amount * min(1.0, max(0.0, (now - self.start_s) / span))


class PumpBridgeNode:
    """Checks and applies commands for *pumps* through *driver*.

    Parameters
    ----------
    pumps : sequence of BridgePump
    driver : object
        Device I/O (see the module docstring).
    max_cmd_age_s : float
        Commands older than this by their ``t_sent`` (sender's wall clock) are ``expired``.
    allowed_sources : set of str, optional
        Controller ids allowed to command.
    watchdog_s : float, optional
        The pumps' hardware watchdog (New Era safe mode) [s]; None when they run without one
        (an explicit choice of the bridge's configuration), which alarms say.
    """

    def __init__(self, pumps, driver, *, max_cmd_age_s: float = 2.0,
                 allowed_sources: set[str] | None = None, cache_size: int = 64,
                 watchdog_s: float | None = None) -> None:
        self.driver = driver
        self.pumps = {p.pump: _PumpState(p) for p in pumps}
        self.max_cmd_age_s = max_cmd_age_s
        self.allowed_sources = allowed_sources
        self.watchdog_s = watchdog_s
        self.sequences = SequenceTracker()
        self._acks: OrderedDict[tuple[str, str, str], Ack] = OrderedDict()
        self._key: tuple[str, str, str] = ("", "", "")
        self._cache_size = cache_size
        self.controller_epoch: dict[str, str] = {}
        self.transitions: list[tuple[float, str, str, str, str]] = []
        self.rejected: dict[str, int] = {}

    # ------------------------------------------------------------------ set-up
    def initialise(self, now: float, initialise_device) -> list[_Message]:
        """Run *initialise_device(address, diameter)* for each pump; they start stopped
        (never infusing on start-up) and need no operator ack for this first start."""
        out: list[_Message] = []
        for state in self.pumps.values():
            try:
                initialise_device(state.config.address, state.config.syringe_diameter_mm)
                state.state = "stopped"
                self._mode(state, now, "READY", "initialised: stopped, waiting for a command")
            except Exception as err:  # noqa: BLE001 - any device failure: stay STOPPED
                out.append(self._fault(state, now, "pump.unreachable", f"init failed: {err}"))
        return out

    def acknowledge(self, pump: str, now: float) -> list[_Message]:
        """An operator acknowledges a stopped pump after checking it: the bridge stops it,
        re-reads its state and accepts commands again (B8)."""
        state = self.pumps[pump]
        state.starved = False
        try:
            self.driver.stop(state.config.address)
            reading = self.driver.read(state.config.address)
        except Exception as err:  # noqa: BLE001
            return [self._fault(state, now, "pump.unreachable", f"acknowledge failed: {err}")]
        if reading.alarm is not None:
            return [self._fault(state, now, f"pump.alarm_{reading.alarm}",
                                "alarm persists after acknowledge")]
        state.state, state.rate_ml_per_h, state.lease = "stopped", 0.0, None
        self._mode(state, now, "READY", "operator acknowledged")
        return [self.status(pump, now)]

    # ------------------------------------------------------------------ commands
    def receive(self, envelope: Envelope, now: float, wall_now: float) -> list[_Message]:
        """One command from a controller (*now*: bridge monotonic s; *wall_now*: UTC s)."""
        message = envelope.message
        if isinstance(message, Hello):
            self.controller_epoch[envelope.src] = envelope.epoch
            self.sequences.classify(envelope.src, envelope.epoch, envelope.seq)
            return [Hello(role="pump-bridge")]
        if not isinstance(message, (SetRate, Bolus, Stop, GetStatus)):
            return []
        cmd_id = message.cmd_id
        if self.allowed_sources is not None and envelope.src not in self.allowed_sources:
            self.rejected["not_authorized"] = self.rejected.get("not_authorized", 0) + 1
            return [Ack(cmd_id=cmd_id, ok=False, code="not_authorized",
                        text=f"source {envelope.src!r} may not command pumps")]
        # the cache is per sender and epoch: a restarted controller numbering its cmd_ids
        # from 1 again is not answered with the old epoch's acks
        key = (envelope.src, envelope.epoch, cmd_id)
        cached = self._acks.get(key)
        if cached is not None:  # idempotent: the same answer, nothing applied twice (B9)
            return [replace(cached, code="duplicate") if cached.ok else cached]
        self._key = key
        age = wall_now - envelope.t_sent
        if isinstance(message, Bolus) and not age <= message.lease_s:
            # a bolus not started within its lease is not given (checked like the age)
            return [self._nack(cmd_id, "expired", f"bolus {age:.2f} s old: its lease of "
                                                  f"{message.lease_s:g} s ended before it "
                                                  f"could start"),
                    Alarm(code="bridge.command_expired", priority="medium", kind="technical",
                          text=f"{message.pump}: bolus {cmd_id} {age:.2f} s old")]
        if isinstance(message, (SetRate, Bolus)) and not abs(age) <= self.max_cmd_age_s:
            # checked before the sequence: an expired replay must not retire a live epoch
            return [self._nack(cmd_id, "expired", f"command age {age:.2f} s outside "
                                                  f"+-{self.max_cmd_age_s} s (late, replayed "
                                                  f"or clocks skewed)"),
                    Alarm(code="bridge.command_expired", priority="medium", kind="technical",
                          text=f"{message.pump}: command {cmd_id} {age:.2f} s old")]
        order = self.sequences.classify(envelope.src, envelope.epoch, envelope.seq)
        if order != "new" and not isinstance(message, Stop):
            return [self._nack(cmd_id, "stale", f"{order} command (epoch {envelope.epoch}, "
                                                f"seq {envelope.seq})")]
        state = self.pumps.get(message.pump)
        if state is None:
            return [self._nack(cmd_id, "schema", f"no pump {message.pump!r}")]
        if isinstance(message, GetStatus):
            return [self._remember(Ack(cmd_id=cmd_id, ok=True, code="applied")),
                    self.status(message.pump, now)]
        if isinstance(message, Stop):  # always accepted
            return self._stop(state, cmd_id, now, message.reason or "stop command")
        if isinstance(message, Bolus):
            return self._bolus(state, message, now)
        return self._set_rate(state, message, now)

    def _set_rate(self, state: _PumpState, message: SetRate, now: float) -> list[_Message]:
        c = state.config
        if state.mode in ("STOPPED", "INIT"):
            return [self._nack(message.cmd_id, "pump_error",
                               f"{c.pump} is {state.mode}: {state.cause}; needs an operator "
                               f"acknowledge")]
        try:
            rate = message.rate * wire_factor(message.unit, "mL/h")
            fallback = message.fallback.rate * wire_factor(message.fallback.unit, "mL/h")
            if message.dose_rate is not None:
                per_s = message.dose_rate * wire_factor(message.dose_unit,
                                                        f"{c.amount_unit}/s")
                expected = per_s * 3600.0 / c.concentration
                if not math.isclose(expected, rate, rel_tol=0.01, abs_tol=1e-9):
                    return [self._nack(message.cmd_id, "unit",
                                       f"dose rate gives {expected:g} mL/h, rate says "
                                       f"{rate:g} mL/h"),
                            Alarm(code="bridge.dose_mismatch", priority="high",
                                  kind="technical", text=f"{c.pump}: {message.cmd_id}")]
        except LocalProtocolError as err:
            return [self._nack(message.cmd_id, "unit", str(err))]
        problem = self._beyond_limits(state, now, rate, fallback, message.lease_s)
        if problem:
            # the previous lease keeps running to its end (T14)
            return [self._nack(message.cmd_id, "out_of_range", problem),
                    Alarm(code="bridge.out_of_range", priority="medium", kind="technical",
                          text=f"{c.pump}: {problem}")]
        bolus = state.bolus_ml_per_h      # a running bolus goes on on top of the new rate
        applied, refused = self._drive(state, message.cmd_id, now, rate + bolus)
        if refused:
            return refused
        state.rate_ml_per_h, state.state = applied, "infusing" if applied > 0 else "stopped"
        state.lease = Lease(message.cmd_id, now, message.lease_s)
        state.fallback_ml_per_h = fallback
        state.log_rate(now, applied)
        self._mode(state, now, "COMMANDED", f"command {message.cmd_id}")
        ack = Ack(cmd_id=message.cmd_id, ok=True, code="applied",
                  applied_rate=max(0.0, applied - bolus), unit="mL/h",
                  lease_remaining_s=message.lease_s)
        return [self._remember(ack), self.status(c.pump, now)]

    def _drive(self, state: _PumpState, cmd_id: str, now: float, rate: float
               ) -> tuple[float, list[_Message]]:
        """Set *rate* [mL/h] and read it back, one retry on a mismatch (B7): the rate read
        back, or the answers of a refusal (a driver's fault leaves the pump STOPPED)."""
        c = state.config
        applied = math.nan
        for _ in range(2):
            try:
                applied = self.driver.set_rate(c.address, rate)
            except Exception as err:  # noqa: BLE001
                code = getattr(err, "code", "pump_error")
                if code == "out_of_range":
                    return applied, [self._nack(cmd_id, "out_of_range", str(err))]
                return applied, [self._nack(cmd_id, "pump_error", str(err)),
                                 self._fault(state, now, f"pump.{code}", str(err))]
            if _close(applied, rate):
                return applied, []
        return applied, [self._nack(cmd_id, "pump_error",
                                    f"read back {applied:g} mL/h for {rate:g}"),
                         self._fault(state, now, "pump.readback_mismatch",
                                     f"read back {applied:g} mL/h for {rate:g} mL/h")]

    def _bolus(self, state: _PumpState, message: Bolus, now: float) -> list[_Message]:
        """A bolus: checked, rounded down to the increment, started at once as a rise of
        the rate by the bolus speed (or by amount / duration_s for an extended bolus)."""
        c, cmd_id = state.config, message.cmd_id
        if state.mode in ("STOPPED", "INIT"):
            return [self._nack(cmd_id, "pump_error", f"{c.pump} is {state.mode}: "
                                                     f"{state.cause}; needs an operator "
                                                     f"acknowledge")]
        if not c.max_bolus > 0:
            return [self._nack(cmd_id, "out_of_range", f"{c.pump} takes no bolus command "
                                                       f"(its max_bolus is 0)")]
        if state.bolus is not None:
            left = state.bolus.amount - state.bolus.given(now)
            return [self._nack(cmd_id, "busy", f"bolus {state.bolus.cmd_id} is running "
                                               f"({left:.4g} {c.amount_unit} to go)")]
        try:
            amount = message.amount * wire_factor(message.unit, c.amount_unit)
        except LocalProtocolError as err:
            return [self._nack(cmd_id, "unit", f"amount: {err}")]
        if message.volume is not None:
            volume = message.volume * wire_factor(message.vol_unit, "mL")
            if not math.isclose(volume * c.concentration, amount, rel_tol=0.01,
                                abs_tol=1e-9):
                return [self._nack(cmd_id, "unit", f"volume {volume:g} mL holds "
                                                   f"{volume * c.concentration:g} "
                                                   f"{c.amount_unit}, amount says "
                                                   f"{amount:g}"),
                        Alarm(code="bridge.dose_mismatch", priority="high",
                              kind="technical", text=f"{c.pump}: {cmd_id}")]
        if not amount <= c.max_bolus:
            return self._out_of_range(c.pump, cmd_id, f"bolus {amount:g} {c.amount_unit} "
                                                      f"above max_bolus {c.max_bolus:g}")
        given = round_down(amount, c.bolus_increment)
        if not given > 0:
            return self._out_of_range(c.pump, cmd_id, f"bolus {amount:g} {c.amount_unit} "
                                                      f"rounds down to 0 at the "
                                                      f"{c.bolus_increment:g} step")
        volume = given / c.concentration
        if message.duration_s > 0:
            ml_per_h = volume / message.duration_s * 3600.0
            if not ml_per_h <= c.bolus_ml_per_h:
                return self._out_of_range(c.pump, cmd_id, f"extended bolus at {ml_per_h:g} "
                                                          f"mL/h beyond the bolus speed "
                                                          f"{c.bolus_ml_per_h:g} mL/h")
        else:
            ml_per_h = c.bolus_ml_per_h
        duration_s = volume / ml_per_h * 3600.0
        problem = self._bolus_beyond_limits(state, now, given, ml_per_h, duration_s)
        if problem:
            return self._out_of_range(c.pump, cmd_id, problem)
        applied, refused = self._drive(state, cmd_id, now, state.rate_ml_per_h + ml_per_h)
        if refused:
            return refused
        state.bolus = _RunningBolus(cmd_id, given, ml_per_h, now, now + duration_s)
        state.rate_ml_per_h, state.state = applied, "infusing"
        state.log_rate(now, applied)
        if state.mode == "READY":  # nothing commanded before: the pump runs the bolus
            self._mode(state, now, "COMMANDED", f"bolus {cmd_id}")
        back = given * wire_factor(c.amount_unit, message.unit)
        ack = Ack(cmd_id=cmd_id, ok=True, code="applied", applied_amount=back,
                  amount_unit=message.unit, bolus_s=duration_s,
                  text=f"bolus {back:g} {message.unit} over {duration_s:.0f} s"
                       + (f" (asked {message.amount:g}, rounded down to the "
                          f"{c.bolus_increment:g} {c.amount_unit} step)"
                          if given < amount else ""))
        return [self._remember(ack), self.status(c.pump, now)]

    def _bolus_beyond_limits(self, state: _PumpState, now: float, amount: float,
                             ml_per_h: float, duration_s: float) -> str | None:
        """Why a bolus (its rise on top of the rate in force and of the lease-end fallback,
        its volume in the hour, the insulin on board after it) is beyond the pump's limits,
        or None. NaN fails every test."""
        c = state.config
        if not ml_per_h <= c.max_step_ml_per_h:
            return f"bolus rise {ml_per_h:g} mL/h beyond the step {c.max_step_ml_per_h:g}"
        volume = self._volume_last_hour(state, now) + \
            (state.rate_ml_per_h + ml_per_h) * duration_s / 3600.0
        if not volume <= c.max_volume_per_h_ml:
            return f"volume in the last hour would exceed {c.max_volume_per_h_ml:g} mL"
        on_board = self.insulin_on_board(state.config.pump, now)
        if not on_board + amount <= c.max_on_board:
            return (f"insulin on board {on_board:.4g} + bolus {amount:g} {c.amount_unit} "
                    f"above max_on_board {c.max_on_board:g}")
        return None

    def _out_of_range(self, pump: str, cmd_id: str, problem: str) -> list[_Message]:
        return [self._nack(cmd_id, "out_of_range", problem),
                Alarm(code="bridge.out_of_range", priority="medium", kind="technical",
                      text=f"{pump}: {problem}")]

    def insulin_on_board(self, pump: str, now: float) -> float:
        """What the pump ran above its programmed basal (every bolus, temporary basal
        above it) and still acts at *now* by the pump's insulin curve [amount unit];
        taken in steps of at most 5 min, each counted from its end
        (InsulinCurve.on_board_above)."""
        state = self.pumps[pump]
        c = state.config
        log = state.dose_log
        while len(log) > 1 and log[1][0] <= now - c.curve.duration_s:
            log.pop(0)
        per_s = c.concentration / 3600.0   # mL/h -> amount/s
        return c.curve.on_board_above([(t, rate * per_s) for t, rate in log],
                                      (c.programmed_basal_ml_per_h or 0.0) * per_s, now)

    def _beyond_limits(self, state: _PumpState, now: float, rate: float, fallback: float,
                       lease_s: float) -> str | None:
        """Why a command (its rate, and the fallback the pump runs when its lease ends) is
        beyond the pump's limits, or None. Written so that NaN fails every test. A running
        bolus goes on on top of both."""
        c = state.config
        bolus = state.bolus_ml_per_h
        if not (0.0 <= rate <= c.max_rate_ml_per_h and 0.0 <= fallback <= c.max_rate_ml_per_h):
            return f"rate {rate:g} (fallback {fallback:g}) mL/h above {c.max_rate_ml_per_h:g}"
        step = rate + bolus - state.rate_ml_per_h
        if not step <= c.max_step_ml_per_h:
            return f"step {step:+g} mL/h beyond {c.max_step_ml_per_h:g}"
        if not fallback - rate <= c.max_step_ml_per_h:
            return (f"fallback step {fallback - rate:+g} mL/h at the lease end beyond "
                    f"{c.max_step_ml_per_h:g}")
        basal = c.programmed_basal_ml_per_h
        if basal is not None and not fallback <= basal * (1 + 1e-9):
            return (f"fallback {fallback:g} mL/h above the programmed basal {basal:g} mL/h "
                    f"(a temporary basal ends into it)")
        if not lease_s <= c.max_lease_s:
            return f"lease {lease_s:g} s above {c.max_lease_s:g} s"
        volume = self._volume_next_hour(state, now, rate, lease_s)
        if state.bolus is not None:
            volume += bolus * max(0.0, state.bolus.end_s - now) / 3600.0
        if not volume <= c.max_volume_per_h_ml:
            return f"volume in the last hour would exceed {c.max_volume_per_h_ml:g} mL"
        if math.isfinite(c.max_on_board):
            above = max(0.0, rate - (basal or 0.0)) * lease_s / 3600.0 * c.concentration
            on_board = self.insulin_on_board(c.pump, now)
            if not on_board + above <= c.max_on_board:
                return (f"insulin on board {on_board:.4g} + {above:.4g} {c.amount_unit} "
                        f"above the programmed basal over the lease exceeds max_on_board "
                        f"{c.max_on_board:g}")
        # a preset fallback may run for an hour unattended: it must fit the hourly volume
        if not fallback <= c.max_volume_per_h_ml:
            return (f"fallback {fallback:g} mL/h would exceed {c.max_volume_per_h_ml:g} mL "
                    f"in an hour")
        return None

    def _volume_last_hour(self, state: _PumpState, now: float) -> float:
        """Volume set over the last hour up to *now* [mL], from the set rates."""
        log = [(t, r) for t, r in state.volume_log if t > now - 3600.0]
        # the rate in force when the window opened counts from the window's start
        earlier = [r for t, r in state.volume_log if t <= now - 3600.0]
        if earlier:
            log.insert(0, (now - 3600.0, earlier[-1]))
        state.volume_log[:] = log
        total, times = 0.0, [t for t, _ in log] + [now]
        for (t, r), t_next in zip(log, times[1:]):
            total += r * (t_next - t) / 3600.0
        return total

    def _volume_next_hour(self, state: _PumpState, now: float, rate: float,
                          lease_s: float) -> float:
        """Volume of the last hour plus this command's lease [mL]."""
        return self._volume_last_hour(state, now) + rate * lease_s / 3600.0

    def _stop(self, state: _PumpState, cmd_id: str, now: float, cause: str) -> list[_Message]:
        try:
            self.driver.stop(state.config.address)
        except Exception as err:  # noqa: BLE001
            return [self._nack(cmd_id, "pump_error", str(err)),
                    self._fault(state, now, "pump.unreachable", str(err))]
        state.rate_ml_per_h, state.lease = 0.0, None
        self._end_bolus(state, now)
        if state.state != "disconnected":
            state.state = "stopped"
        state.log_rate(now, 0.0)
        if state.mode not in ("STOPPED", "INIT"):
            self._mode(state, now, "READY", cause)
        return [self._remember(Ack(cmd_id=cmd_id, ok=True, code="applied", applied_rate=0.0,
                                   unit="mL/h")), self.status(state.config.pump, now)]

    # ------------------------------------------------------------------ time passes
    def next_deadline(self, now: float) -> float:
        """When :meth:`expire` next has work [bridge monotonic s]: the earliest lease end, or
        the earliest time a running preset fallback can reach its hourly volume (inf when
        neither)."""
        times = [math.inf]
        for s in self.pumps.values():
            if s.bolus is not None:
                times.append(s.bolus.end_s)
            if s.mode == "COMMANDED" and s.lease is not None:
                times.append(s.lease.end_s)
            elif s.mode == "FALLBACK" and s.rate_ml_per_h > 0 and \
                    math.isfinite(s.config.max_volume_per_h_ml):
                left = s.config.max_volume_per_h_ml - self._volume_last_hour(s, now)
                times.append(now + max(0.0, left) / s.rate_ml_per_h * 3600.0)
        return min(times)

    def expire(self, now: float) -> list[_Message]:
        """Lease ends -> fallback; a preset fallback that reaches the hourly volume -> stop.
        Cheap when nothing is due: the bridge calls it between any two frames."""
        out: list[_Message] = []
        for state in self.pumps.values():
            lease_first = state.lease is None or state.bolus is None or \
                state.lease.end_s <= state.bolus.end_s
            if state.bolus is not None and now >= state.bolus.end_s and not lease_first:
                out += self._bolus_done(state, now)
            if state.mode == "COMMANDED" and state.lease is not None and \
                    state.lease.expired(now):
                out += self._apply_fallback(state, now)
            if state.bolus is not None and now >= state.bolus.end_s:
                out += self._bolus_done(state, now)
            if state.mode == "COMMANDED" and state.lease is None and state.bolus is None \
                    and state.rate_ml_per_h == 0:
                self._mode(state, now, "READY", "bolus given, no rate commanded")
            elif state.mode == "FALLBACK" and state.rate_ml_per_h > 0 and \
                    not self._volume_last_hour(state, now) < state.config.max_volume_per_h_ml:
                out += self._volume_stop(state, now)
        return out

    def _bolus_done(self, state: _PumpState, now: float) -> list[_Message]:
        """The bolus volume is in: the pump goes back to the rate under it."""
        c = state.config
        rate = max(0.0, state.rate_ml_per_h - state.bolus_ml_per_h)
        applied, faults = self._set_unasked(state, now, rate, "after the bolus")
        if faults:
            return faults
        self._end_bolus(state, now)
        state.rate_ml_per_h = applied
        state.state = "infusing" if applied > 0 else "stopped"
        state.log_rate(now, applied)
        return [self.status(c.pump, now)]

    def _set_unasked(self, state: _PumpState, now: float, rate: float, what: str
                     ) -> tuple[float, list[_Message]]:
        """Set *rate* [mL/h] that no command asked for now (a fallback, the end of a bolus)
        and read it back: the rate read back, or the fault (the pump left STOPPED)."""
        try:
            applied = self.driver.set_rate(state.config.address, rate)
        except Exception as err:  # noqa: BLE001
            return math.nan, [self._fault(state, now, "pump.unreachable", str(err))]
        if not _close(applied, rate):
            return applied, [self._fault(state, now, "pump.readback_mismatch",
                                         f"{what} read back {applied:g} mL/h for {rate:g} "
                                         f"mL/h")]
        return applied, []

    def _end_bolus(self, state: _PumpState, now: float) -> None:
        """The running bolus ends (given, or cancelled by a stop or a fault): what went in
        counts as given."""
        if state.bolus is not None:
            state.bolus_given += state.bolus.given(now)
            state.bolus = None

    def _apply_fallback(self, state: _PumpState, now: float) -> list[_Message]:
        c = state.config
        rate = state.fallback_ml_per_h
        action = f"preset rate {rate:g} mL/h" if rate > 0 else "stop"
        rate += state.bolus_ml_per_h     # a running bolus goes on to its end
        applied, faults = self._set_unasked(state, now, rate, "fallback")
        if faults:
            return faults
        state.rate_ml_per_h, state.lease = applied, None
        state.state = "infusing" if applied > 0 else "stopped"
        state.log_rate(now, applied)
        self._mode(state, now, "FALLBACK",
                   f"lease of {c.pump} ended without a new command: {action}")
        return [Alarm(code="pump.lease_expired", priority="medium", kind="technical",
                      text=f"{c.pump}: no command within the lease: {action}"),
                self.status(c.pump, now)]

    def _volume_stop(self, state: _PumpState, now: float) -> list[_Message]:
        c = state.config
        try:
            self.driver.stop(c.address)
        except Exception as err:  # noqa: BLE001
            return [self._fault(state, now, "pump.unreachable", str(err))]
        state.rate_ml_per_h, state.state = 0.0, "stopped"
        self._end_bolus(state, now)
        state.log_rate(now, 0.0)
        state.cause = (f"fallback stopped: {c.max_volume_per_h_ml:g} mL delivered in the last "
                       f"hour")
        self.transitions.append((now, c.pump, "FALLBACK", "FALLBACK", state.cause))
        return [Alarm(code="bridge.volume_limit", priority="high", kind="technical",
                      text=f"{c.pump}: {state.cause}"), self.status(c.pump, now)]

    def poll(self, now: float) -> list[_Message]:
        """Leases (:meth:`expire`), then read every pump: a running one feeds its safe-mode
        watchdog (B2); a STOPPED one is checked to stay stopped."""
        out = self.expire(now)
        reported = {m.pump for m in out if isinstance(m, PumpStatus)}
        for state in self.pumps.values():
            c = state.config
            if state.mode in ("STOPPED", "INIT"):
                out += self._check_stopped(state, now)
                continue
            # Reading the pump feeds its safe-mode watchdog: done while this bridge is
            # healthy, so only a dead or hung bridge (or a pulled cable) lets it fire; the
            # controller's leases are enforced by expire(), on the bridge's clock.
            try:
                reading = self.driver.read(c.address)
            except Exception as err:  # noqa: BLE001
                out.append(self._fault(state, now, "pump.unreachable", str(err)))
                continue
            if reading.alarm is not None:  # an alarm reply carries no volume
                out.append(self._fault(state, now, f"pump.alarm_{reading.alarm}",
                                       f"pump alarm A?{reading.alarm}"))
                continue
            state.delivered_ml = reading.dispensed_ml
            if reading.state != state.state:
                out.append(self._fault(state, now, "pump.state_mismatch",
                                       f"pump says {reading.state}, bridge expected "
                                       f"{state.state}"))
                continue
            if c.pump not in reported:
                out.append(self.status(c.pump, now))
        return out

    def _check_stopped(self, state: _PumpState, now: float) -> list[_Message]:
        """A STOPPED pump: an unreachable one is stopped and read back once it answers again
        (tried every few seconds: each try waits out the driver's time-outs); a reachable
        one must read not infusing, else it is stopped again, and when that fails too it is
        left to its watchdog."""
        status = [self.status(state.config.pump, now)]
        if state.starved:
            return status
        if state.state == "disconnected":
            if now >= state.retry_s:
                state.retry_s = now + _UNREACHABLE_RETRY_S
                if self._stop_confirmed(state):
                    state.cause += "; stop read back once the pump answered again"
                    status = [self.status(state.config.pump, now)]
            return status
        try:
            reading = self.driver.read(state.config.address)
        except Exception:  # noqa: BLE001 - unreachable now: its watchdog owns it
            state.state, state.retry_s = "disconnected", now + _UNREACHABLE_RETRY_S
            return [self.status(state.config.pump, now)]
        if reading.state in _NOT_INFUSING:
            return status
        out: list[_Message] = [Alarm(
            code="pump.infusing_while_stopped", priority="high", kind="technical",
            text=f"{state.config.pump}: reads {reading.state} while STOPPED; stopping it again")]
        if not self._stop_confirmed(state) and state.state != "disconnected":
            state.starved = self.watchdog_s is not None
            out.append(Alarm(code="pump.stop_failed", priority="high", kind="technical",
                             text=f"{state.config.pump}: does not stop; "
                                  + (f"no more packets: its watchdog stops it within "
                                     f"{self.watchdog_s:g} s" if state.starved else
                                     "NO hardware watchdog: stop it by hand now")))
        return out + [self.status(state.config.pump, now)]

    def status(self, pump: str, now: float) -> PumpStatus:
        state = self.pumps[pump]
        remaining = state.lease.remaining(now) if state.lease is not None else None
        bolus = {}
        if state.config.max_bolus > 0:  # an insulin pump says what its boluses gave
            running = state.bolus
            given = running.given(now) if running is not None else 0.0
            bolus = dict(bolus_delivered=state.bolus_given + given,
                         bolus_remaining=running.amount - given if running else 0.0,
                         amount_unit=state.config.amount_unit)
        return PumpStatus(pump=pump, state=state.state if state.state in (
            "infusing", "stopped", "alarm", "disconnected") else "unknown",
            rate=state.rate_ml_per_h, delivered=max(0.0, state.delivered_ml),
            lease_remaining_s=remaining, mode=state.mode, **bolus)

    # ------------------------------------------------------------------ helpers
    def _mode(self, state: _PumpState, now: float, mode: str, cause: str) -> None:
        if mode != state.mode:
            self.transitions.append((now, state.config.pump, state.mode, mode, cause))
            state.mode, state.cause = mode, cause

    def _stop_confirmed(self, state: _PumpState) -> bool:
        """Command a stop and read it back; True when the pump reads not infusing."""
        try:
            self.driver.stop(state.config.address)
            reading = self.driver.read(state.config.address)
        except Exception:  # noqa: BLE001 - unreachable: the caller says who owns it
            state.state = "disconnected"
            return False
        state.state = "alarm" if reading.alarm is not None else reading.state
        return reading.state in _NOT_INFUSING

    def _fault(self, state: _PumpState, now: float, code: str, text: str) -> Alarm:
        """STOPPED: the stop commanded and read back, or the pump unreachable and its
        watchdog in charge (or none: said loudly)."""
        state.lease, state.rate_ml_per_h = None, 0.0
        self._end_bolus(state, now)
        state.log_rate(now, 0.0)
        if self._stop_confirmed(state):
            where = "stop read back"
        elif state.state == "disconnected":
            where = (f"unreachable: its safe-mode watchdog stops it within "
                     f"{self.watchdog_s:g} s" if self.watchdog_s is not None else
                     "unreachable and NO hardware watchdog: check the pump now")
        else:
            where = f"does not stop (reads {state.state})"
        self._mode(state, now, "STOPPED", f"{text}; {where}")
        state.cause = f"{text}; {where}"  # already STOPPED: the newest cause counts
        state.retry_s = now + _UNREACHABLE_RETRY_S
        return Alarm(code=code, priority="high", kind="technical",
                     text=f"{state.config.pump}: {text}; {where}; stopped until an operator "
                          f"acknowledges"[:MAX_TEXT_CHARS])

    def _nack(self, cmd_id: str, code: str, text: str) -> Ack:
        self.rejected[code] = self.rejected.get(code, 0) + 1
        return self._remember(Ack(cmd_id=cmd_id, ok=False, code=code,
                                  text=text[:MAX_TEXT_CHARS]))

    def _remember(self, ack: Ack) -> Ack:
        """Cache *ack* under the command being handled (sender, epoch, cmd_id)."""
        self._acks[self._key] = ack
        while len(self._acks) > self._cache_size:
            self._acks.popitem(last=False)
        return ack


def _close(applied: float, rate: float) -> bool:
    """A read-back agrees with the set rate (1 %, or the pump's 0.001 mL/h resolution)."""
    return math.isclose(applied, rate, rel_tol=0.01, abs_tol=1e-3)
