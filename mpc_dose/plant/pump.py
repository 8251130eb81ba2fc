"""Infusion pumps: commanded in volume rates, with limits, quantisation, start-up lag, syringe
volume, faults and leases.

A pump applies a command only until its lease runs out, then its fallback (stop, or a
preset rate) by itself. It *rejects* out-of-range commands instead of clamping them. Drug
reaches the patient at ``rate [mL/h] * concentration [amount/mL] / 3600`` amount/s.

Faults: an occlusion from ``occlusion_at_s`` stops delivery at once while the pump still
believes it infuses, and raises a high-priority alarm after ``occlusion_detection_s``; an
empty syringe stops delivery and raises an alarm. After a fault the pump stays in ``alarm``
and refuses commands until it is reset by an operator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import simpy

from ..errors import ConfigError
from .clock import ACT, at
from .patient import VirtualPatient

__all__ = ["PumpConfig", "InfusionPump", "PumpAlarm", "PumpSnapshot", "CommandResult"]


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


@dataclass(frozen=True)
class CommandResult:
    """A pump's answer to a command: *code* as the protocol's ack codes."""

    ok: bool
    code: str
    applied_ml_per_h: float | None = None
    text: str = ""


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

    def __post_init__(self) -> None:
        where = f"pump {self.pump!r}"
        if not (self.concentration > 0 and math.isfinite(self.concentration)):
            raise ConfigError(f"{where}: concentration must be > 0, got {self.concentration!r}")
        if not self.max_rate_ml_per_h > 0:
            raise ConfigError(f"{where}: max_rate_ml_per_h must be > 0, "
                              f"got {self.max_rate_ml_per_h!r}")
        for name in ("resolution_ml_per_h", "startup_lag_s", "occlusion_detection_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{where}: {name} must be a finite number >= 0, "
                                  f"got {value!r}")
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
        if config.occlusion_at_s is not None:
            env.process(self._occlusion(config.occlusion_at_s))

    # ------------------------------------------------------------------ delivery
    def _account(self) -> None:
        now = self.env.now
        self.delivered_ml += self.delivered_ml_per_h * (now - self._accounted_at) / 3600.0
        self._accounted_at = now

    def _deliver(self, rate_ml_per_h: float) -> None:
        """Change what reaches the patient (and schedule the syringe running empty)."""
        self._account()
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
        self.state = "infusing" if rate_ml_per_h > 0 else "stopped"
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

    def stop(self, *, cmd_id: str) -> CommandResult:
        """Stop now (always accepted). A pump in alarm stays in alarm: only an operator
        :meth:`reset` clears a fault."""
        if self.state == "alarm":
            self.active_cmd = cmd_id
            return CommandResult(True, "applied", 0.0, text="pump in alarm: already stopped")
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
        return PumpSnapshot(self.config.pump, self.state, self.rate_ml_per_h,
                            self.delivered_ml, remaining, self.mode)

    def _publish(self) -> None:
        self._emit(self.status())
