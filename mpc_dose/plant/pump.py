"""Infusion pumps: commanded in volume rates, with limits, quantisation, start-up lag, syringe
volume, faults and leases.

A pump applies a command only until its lease runs out, then its fallback (stop, or a
preset rate) by itself. It *rejects* out-of-range commands instead of clamping them. Drug
reaches the patient at ``rate [mL/h] * concentration [amount/mL] / 3600`` amount/s.

Faults: an occlusion from ``occlusion_at_s`` stops delivery at once while the pump still
believes it infuses, and raises a high-priority alarm after ``occlusion_detection_s``; an
empty syringe stops delivery and raises an alarm. After a fault the pump stays in ``alarm``
and refuses commands until it is reset by an operator.

Boluses (an insulin pump's, protocol 1.1): a pump with ``max_bolus > 0`` gives a bolus as a
short infusion at its bolus speed (``bolus_ml_per_h``; an extended bolus over its duration)
on top of the rate in force, after rounding the amount DOWN to ``bolus_increment``; it
refuses a bolus above ``max_bolus``, one that rounds to nothing (``out_of_range``) and one
while another runs (``busy``). A stop or a fault cancels a running bolus (what went in
counts as given). A bolus starts at once (no start-up lag).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import simpy

from ..errors import ConfigError
from .clock import ACT, at
from .patient import VirtualPatient

__all__ = ["PumpConfig", "InfusionPump", "PumpAlarm", "PumpSnapshot", "CommandResult",
           "DEFAULT_BOLUS_ML_PER_H", "round_down"]

#: a pump's bolus speed unless configured [mL/h]: 1.5 U/min of U-100 insulin (0.015 mL/min),
#: the "standard" bolus speed of Medtronic MiniMed pumps (user guides of the 600 and 700
#: series; their "quick" speed is 15 U/min)
DEFAULT_BOLUS_ML_PER_H = 0.9


def round_down(amount: float, increment: float) -> float:
    """*amount* rounded down to a whole number of *increment* (0: unchanged); a hair below a
    step (2.35 / 0.05 = 46.999...) counts as the step."""
    if not increment > 0:
        return amount
    steps = math.floor(amount / increment + 1e-9)
    return round(steps * increment, 12)


@dataclass(frozen=True)
class PumpAlarm:
    """An alarm raised by a pump (technical): *code*, *priority* and a sentence."""

    pump: str
    code: str
    priority: str
    text: str


@dataclass(frozen=True)
class PumpSnapshot:
    """A pump's state: what it believes it infuses [mL/h], delivered volume [mL], lease."""

    pump: str
    state: str
    rate_ml_per_h: float
    delivered_ml: float
    lease_remaining_s: float | None
    mode: str
    #: a bolus pump's: the amount of every bolus given so far and what is left of the one
    #: running [input amount unit]; None for a pump that takes no bolus
    bolus_delivered: float | None = None
    bolus_remaining: float | None = None


@dataclass(frozen=True)
class CommandResult:
    """A pump's answer to a command: *code* as the protocol's ack codes; for a bolus the
    amount it gives [input amount unit] and how long it takes [s]."""

    ok: bool
    code: str
    applied_ml_per_h: float | None = None
    text: str = ""
    applied_amount: float | None = None
    bolus_s: float | None = None


@dataclass(frozen=True)
class PumpConfig:
    """One syringe pump driving model input *input* with a drug at *concentration*
    (input amount unit per mL)."""

    pump: str
    input: str
    concentration: float
    max_rate_ml_per_h: float = 1200.0
    resolution_ml_per_h: float = 0.0
    startup_lag_s: float = 0.0
    syringe_volume_ml: float = math.inf
    #: rate applied by the pump itself when a lease runs out; 0 means stop
    fallback_ml_per_h: float = 0.0
    occlusion_at_s: float | None = None
    occlusion_detection_s: float = 30.0
    #: boluses [input amount unit]: the largest (0: the pump takes no bolus command), the
    #: step amounts are rounded down to (0: none); the bolus speed [mL/h]
    max_bolus: float = 0.0
    bolus_increment: float = 0.0
    bolus_ml_per_h: float = DEFAULT_BOLUS_ML_PER_H

    def __post_init__(self) -> None:
        where = f"pump {self.pump!r}"
        if not (self.concentration > 0 and math.isfinite(self.concentration)):
            raise ConfigError(f"{where}: concentration must be > 0, got {self.concentration!r}")
        if not self.max_rate_ml_per_h > 0:
            raise ConfigError(f"{where}: max_rate_ml_per_h must be > 0, "
                              f"got {self.max_rate_ml_per_h!r}")
        for name in ("resolution_ml_per_h", "startup_lag_s", "occlusion_detection_s",
                     "max_bolus", "bolus_increment"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{where}: {name} must be a finite number >= 0, "
                                  f"got {value!r}")
        if not (self.bolus_ml_per_h > 0 and math.isfinite(self.bolus_ml_per_h)):
            raise ConfigError(f"{where}: bolus_ml_per_h must be a finite number > 0, "
                              f"got {self.bolus_ml_per_h!r}")
        if not self.syringe_volume_ml > 0:
            raise ConfigError(f"{where}: syringe_volume_ml must be > 0, "
                              f"got {self.syringe_volume_ml!r}")
        if not 0 <= self.fallback_ml_per_h <= self.max_rate_ml_per_h:
            raise ConfigError(f"{where}: fallback_ml_per_h must be in [0, "
                              f"{self.max_rate_ml_per_h}], got {self.fallback_ml_per_h!r}")

    def quantise(self, rate_ml_per_h: float) -> float:
        """The rate the mechanism can deliver: the nearest multiple of the resolution that
        does not exceed the maximum rate."""
        q = self.resolution_ml_per_h
        if q == 0:
            return rate_ml_per_h
        nearest = round(rate_ml_per_h / q) * q
        return nearest if nearest <= self.max_rate_ml_per_h else \
            math.floor(self.max_rate_ml_per_h / q) * q

    def amount_per_s(self, rate_ml_per_h: float) -> float:
        return rate_ml_per_h * self.concentration / 3600.0

    def ml_per_h(self, amount_per_s: float) -> float:
        return amount_per_s * 3600.0 / self.concentration


class InfusionPump:
    """A simulated pump attached to *patient*; *emit* receives its :class:`PumpAlarm` and
    :class:`PumpSnapshot` events. :meth:`set_rate` and :meth:`stop` answer every command
    with a :class:`CommandResult`."""

    def __init__(self, env: simpy.Environment, config: PumpConfig, patient: VirtualPatient,
                 emit: Callable[[object], None] = lambda message: None) -> None:
        self.env, self.config, self.patient, self._emit = env, config, patient, emit
        self._input = patient.model.input_index(config.input)
        self.state = "stopped"
        self.rate_ml_per_h = 0.0          # what the pump believes it infuses
        self.delivered_ml_per_h = 0.0     # what reaches the patient
        self.delivered_ml = 0.0
        self._accounted_at = env.now
        self.lease_until: float | None = None
        self.active_cmd: str | None = None
        self.mode = "init"
        self._generation = 0              # invalidates scheduled lease/empty/lag events
        self._occluded = False
        self._lag_until: float | None = None
        self._basal_ml_per_h = 0.0        # what reaches the patient apart from a bolus
        #: the running bolus (cmd_id, amount, mL/h, start, end) and what boluses gave
        self.bolus_running: tuple[str, float, float, float, float] | None = None
        self.bolus_given = 0.0
        if config.occlusion_at_s is not None:
            env.process(self._occlusion(config.occlusion_at_s))

    # ------------------------------------------------------------------ delivery
    def _account(self) -> None:
        now = self.env.now
        self.delivered_ml += self.delivered_ml_per_h * (now - self._accounted_at) / 3600.0
        self._accounted_at = now

    def _deliver(self, rate_ml_per_h: float) -> None:
        """Change what reaches the patient (*rate_ml_per_h* and a running bolus on top; and
        schedule the syringe running empty)."""
        self._account()
        self._basal_ml_per_h = rate_ml_per_h
        if self.bolus_running is not None:
            rate_ml_per_h += self.bolus_running[2]
        if self._occluded:
            rate_ml_per_h = 0.0
        self.delivered_ml_per_h = rate_ml_per_h
        self.patient.set_rate(self.env.now, self._input,
                              self.config.amount_per_s(rate_ml_per_h))
        remaining = self.config.syringe_volume_ml - self.delivered_ml
        if rate_ml_per_h > 0 and math.isfinite(remaining):
            self.env.process(self._empty_after(remaining / rate_ml_per_h * 3600.0,
                                               self._generation))

    def _set(self, rate_ml_per_h: float) -> None:
        self._generation += 1
        previous_state = self.state
        self.rate_ml_per_h = rate_ml_per_h
        self.state = "infusing" if rate_ml_per_h > 0 or self.bolus_running else "stopped"
        if rate_ml_per_h == 0:
            self._lag_until = None
            self._deliver(0.0)
        elif self._lag_until is not None:
            pass  # still starting up: delivery begins when the start-up lag ends
        elif self.delivered_ml_per_h == 0 and self.config.startup_lag_s > 0:
            self._lag_until = self.env.now + self.config.startup_lag_s
            self.env.process(self._start_after_lag(self._lag_until))
        else:
            self._deliver(rate_ml_per_h)
        if self.state != previous_state:  # rates are reported in every ack; states here
            self._publish()

    def _start_after_lag(self, until: float):
        yield at(self.env, until, ACT)
        if self._lag_until == until:
            self._lag_until = None
            if self.state == "infusing":
                self._deliver(self.rate_ml_per_h)

    def _empty_after(self, delay_s: float, generation: int):
        yield at(self.env, self.env.now + delay_s, ACT)
        self._account()
        # the volume decides, not the schedule: an occlusion may have stopped delivery since
        empty = self.delivered_ml >= self.config.syringe_volume_ml * (1 - 1e-12)
        if generation == self._generation and self.state == "infusing" and empty:
            self._fault("syringe_empty", "syringe empty: infusion stopped")

    def _occlusion(self, t_s: float):
        yield at(self.env, max(t_s, self.env.now), ACT)
        self._occluded = True
        self._deliver(0.0)
        yield at(self.env, self.env.now + self.config.occlusion_detection_s, ACT)
        self._fault("occlusion", "occlusion detected: infusion stopped")

    def _fault(self, code: str, text: str) -> None:
        self._generation += 1
        self._end_bolus()
        self.rate_ml_per_h = 0.0
        self._deliver(0.0)
        self.state = "alarm"
        self.lease_until = None
        self._emit(PumpAlarm(self.config.pump, code, "high", text))
        self._publish()

    # ------------------------------------------------------------------ leases
    def _lease(self, lease_s: float, fallback_ml_per_h: float, generation: int):
        yield at(self.env, self.env.now + lease_s, ACT)
        if generation != self._generation or self.state == "alarm":
            return
        self.mode = "fallback"
        self.active_cmd = None
        self.lease_until = None
        action = f"preset rate {fallback_ml_per_h:g} mL/h" if fallback_ml_per_h else "stop"
        self._emit(PumpAlarm(self.config.pump, "lease_expired", "medium",
                             f"no command within the lease: fallback {action}"))
        self._set(fallback_ml_per_h)

    # ------------------------------------------------------------------ commands
    def set_rate(self, rate_ml_per_h: float, lease_s: float, *, cmd_id: str,
                 fallback_ml_per_h: float | None = None) -> CommandResult:
        """Infuse *rate_ml_per_h* now, for at most *lease_s*, then the fallback (the
        command's, else the configured one)."""
        c = self.config
        if self.state == "alarm":
            return CommandResult(False, "pump_error", text="pump in alarm: needs an operator")
        if not (math.isfinite(rate_ml_per_h) and 0 <= rate_ml_per_h <= c.max_rate_ml_per_h):
            self._emit(PumpAlarm(c.pump, "out_of_range", "medium",
                                 f"rejected {rate_ml_per_h:g} mL/h (limit "
                                 f"{c.max_rate_ml_per_h:g} mL/h)"))
            return CommandResult(False, "out_of_range",
                                 text=f"rate {rate_ml_per_h:g} mL/h outside [0, "
                                      f"{c.max_rate_ml_per_h:g}] mL/h")
        fallback = c.fallback_ml_per_h if fallback_ml_per_h is None else fallback_ml_per_h
        if not 0 <= fallback <= c.max_rate_ml_per_h:
            return CommandResult(False, "out_of_range",
                                 text=f"fallback {fallback:g} mL/h outside [0, "
                                      f"{c.max_rate_ml_per_h:g}] mL/h")
        applied = c.quantise(rate_ml_per_h)
        self._set(applied)
        self.active_cmd, self.mode = cmd_id, "commanded"
        self.lease_until = self.env.now + lease_s
        self.env.process(self._lease(lease_s, fallback, self._generation))
        return CommandResult(True, "applied", applied)

    def bolus(self, amount: float, *, cmd_id: str, duration_s: float = 0.0) -> CommandResult:
        """Give *amount* [input amount unit], rounded down to the increment, at the bolus
        speed (over *duration_s* when > 0: an extended bolus) on top of the rate in force."""
        c = self.config
        if self.state == "alarm":
            return CommandResult(False, "pump_error", text="pump in alarm: needs an operator")
        if not c.max_bolus > 0:
            return CommandResult(False, "out_of_range",
                                 text=f"pump {c.pump!r} takes no bolus (max_bolus 0)")
        if self.bolus_running is not None:
            return CommandResult(False, "busy", text=f"bolus {self.bolus_running[0]} is "
                                                     f"running")
        if not (math.isfinite(amount) and 0 <= amount <= c.max_bolus):
            self._emit(PumpAlarm(c.pump, "out_of_range", "medium",
                                 f"rejected a bolus of {amount:g} (max_bolus {c.max_bolus:g})"))
            return CommandResult(False, "out_of_range", text=f"bolus {amount:g} outside "
                                                             f"[0, {c.max_bolus:g}]")
        given = round_down(amount, c.bolus_increment)
        if not given > 0:
            return CommandResult(False, "out_of_range",
                                 text=f"bolus {amount:g} rounds down to 0 at the "
                                      f"{c.bolus_increment:g} step")
        volume_ml = given / c.concentration
        ml_per_h = c.bolus_ml_per_h
        if duration_s > 0:
            ml_per_h = volume_ml / duration_s * 3600.0
            if not ml_per_h <= c.bolus_ml_per_h:
                return CommandResult(False, "out_of_range",
                                     text=f"extended bolus at {ml_per_h:g} mL/h beyond the "
                                          f"bolus speed {c.bolus_ml_per_h:g} mL/h")
        length_s = volume_ml / ml_per_h * 3600.0
        now = self.env.now
        self.bolus_running = (cmd_id, given, ml_per_h, now, now + length_s)
        self._deliver(self._basal_ml_per_h)
        if self.state != "infusing":
            self.state = "infusing"
            self._publish()
        self.env.process(self._bolus_end(self.bolus_running))
        return CommandResult(True, "applied", self.rate_ml_per_h, applied_amount=given,
                             bolus_s=length_s,
                             text=f"bolus {given:g} over {length_s:.0f} s"
                                  + (f" (asked {amount:g}, rounded down)"
                                     if given < amount else ""))

    def _bolus_end(self, running):
        yield at(self.env, running[4], ACT)
        if self.bolus_running is running:
            self._end_bolus()
            self._deliver(self._basal_ml_per_h)
            if self.state == "infusing" and self.rate_ml_per_h == 0:
                self.state = "stopped"
            self._publish()

    def _end_bolus(self) -> None:
        """The running bolus ends (given, or cancelled): what went in counts as given."""
        if self.bolus_running is None:
            return
        _, amount, _, start, end = self.bolus_running
        span = end - start
        self.bolus_given += amount if span <= 0 else \
            amount * min(1.0, max(0.0, (self.env.now - start) / span))
        self.bolus_running = None

    def stop(self, *, cmd_id: str) -> CommandResult:
        """Stop now (always accepted). A pump in alarm stays in alarm: only an operator
        :meth:`reset` clears a fault."""
        if self.state == "alarm":
            self.active_cmd = cmd_id
            return CommandResult(True, "applied", 0.0, text="pump in alarm: already stopped")
        self._end_bolus()
        self._set(0.0)
        self.lease_until, self.active_cmd, self.mode = None, cmd_id, "stopped"
        return CommandResult(True, "applied", 0.0)

    def reset(self) -> None:
        """An operator acknowledges a fault (e.g. after clearing an occlusion or changing the
        syringe, with *syringe_volume_ml* fresh): the pump is stopped and takes commands."""
        self._account()
        if self._occluded:
            self._occluded = False
        self.delivered_ml = 0.0
        self.state, self.mode = "stopped", "init"
        self._set(0.0)

    def status(self) -> PumpSnapshot:
        self._account()
        remaining = None if self.lease_until is None else max(0.0, self.lease_until
                                                              - self.env.now)
        delivered = left = None
        if self.config.max_bolus > 0:
            delivered, left = self.bolus_given, 0.0
            if self.bolus_running is not None:
                _, amount, _, start, end = self.bolus_running
                part = amount * min(1.0, max(0.0, (self.env.now - start) / (end - start)))
                delivered, left = delivered + part, amount - part
        return PumpSnapshot(self.config.pump, self.state, self.rate_ml_per_h,
                            self.delivered_ml, remaining, self.mode, delivered, left)

    def _publish(self) -> None:
        self._emit(self.status())
