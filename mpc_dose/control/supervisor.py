"""The safety supervisor: independent of the optimiser, it gates measurements and checks every
decision against hard limits before it leaves the controller.

* Readings that are stale, from the future, flagged invalid, outside the physiological range
  or flat-lined are unusable: the dose is never increased on them, the mode switches to
  FALLBACK and a technical alarm is raised. CLOSED_LOOP resumes only after *resume_after*
  good readings in a row (hysteresis).
* A failed solve uses the shifted previous plan while it still covers the present, else the
  configured fallback (stop or a preset rate, never above the last rate).
* Hard clamps: maximum rate, maximum change per decision, maximum dose per sliding window.

Every decision carries a human-readable reason, recorded with it. Modes:
``INIT -> CLOSED_LOOP <-> FALLBACK``, ``any -> STOPPED`` (by an operator).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field


from .base import Reading

__all__ = ["SafetyConfig", "SafetySupervisor", "Verdict"]


@dataclass(frozen=True)
class SafetyConfig:
    """Limits and data-quality rules (rates in each input's amount unit per second)."""

    measured: str
    max_rates: Mapping[str, float]
    max_step: Mapping[str, float] = field(default_factory=dict)
    dose_windows: tuple[tuple[str, float, float], ...] = ()
    fallback_rates: Mapping[str, float] = field(default_factory=dict)
    stale_after_s: float = 15.0
    future_tolerance_s: float = 2.0
    valid_range: tuple[float, float] = (-math.inf, math.inf)
    flatline_samples: int = 20
    flatline_tolerance: float = 1e-9
    resume_after: int = 3


@dataclass(frozen=True)
class Verdict:
    """What the supervisor lets through, in which mode, and why (and an alarm if raised)."""

    rates: dict[str, float]
    mode: str
    reason: str
    alarm: str | None = None


class SafetySupervisor:
    """Gates readings (:meth:`gate`) and decisions (:meth:`check`); see module docstring."""

    def __init__(self, config: SafetyConfig) -> None:
        self.config = config
        self.mode = "INIT"
        self._recent: deque[float] = deque(maxlen=max(2, config.flatline_samples))
        self._good_in_row = 0
        self._delivered: deque[tuple[float, dict[str, float]]] = deque()
        self.transitions: list[tuple[float, str, str, str]] = []
        self.data_code = ""

    def _to(self, t_s: float, mode: str, cause: str) -> None:
        if mode != self.mode:
            self.transitions.append((t_s, self.mode, mode, cause))
            self.mode = mode

    def gate(self, t_s: float, reading: Reading | None) -> tuple[bool, str]:
        """Whether the latest reading may drive the dose at *t_s*, and why not (the alarm
        code of the last refusal is kept in :attr:`data_code`)."""
        ok, reason, code = self._gate(t_s, reading)
        self.data_code = code
        return ok, reason

    def _gate(self, t_s: float, reading: Reading | None) -> tuple[bool, str, str]:
        c = self.config
        if reading is None:
            return False, f"no {c.measured} reading yet", "data.missing"
        if not math.isfinite(reading.value):
            return False, f"{c.measured} is not a finite number ({reading.value!r})", \
                "data.invalid"
        if reading.quality != "valid":
            return False, f"{c.measured} flagged {reading.quality}", "data.invalid"
        if reading.t_meas_s > t_s + c.future_tolerance_s:
            return False, (f"{c.measured} from the future ({reading.t_meas_s - t_s:.1f} s "
                           f"ahead)"), "data.future"
        if t_s - reading.t_meas_s > c.stale_after_s:
            return False, f"{c.measured} stale ({t_s - reading.t_meas_s:.1f} s old)", \
                "data.stale"
        low, high = c.valid_range
        if not low <= reading.value <= high:
            return False, f"{c.measured} = {reading.value:g} outside [{low:g}, {high:g}]", \
                "data.out_of_range"
        return True, "ok", ""

    def observe(self, reading: Reading) -> bool:
        """Track every reading for flat-line detection; False when the signal is flat."""
        self._recent.append(reading.value)
        return not self.flat

    @property
    def flat(self) -> bool:
        c = self.config
        if len(self._recent) < c.flatline_samples:
            return False
        values = list(itertools.islice(reversed(self._recent), c.flatline_samples))
        return max(values) - min(values) <= c.flatline_tolerance

    def check(self, t_s: float, proposed: Mapping[str, float], last: Mapping[str, float], *,
              usable: bool, data_reason: str, plan_ok: bool, plan_reason: str,
              backup: Mapping[str, float] | None = None) -> Verdict:
        """The rates to apply from *t_s*.

        *proposed* are the optimiser's rates, *last* the rates in force, *usable* whether the
        data may drive the dose, *plan_ok* whether the solve succeeded, *backup* the shifted
        previous plan's rates for now (or None when it no longer covers the present).
        """
        c = self.config
        alarm = None
        if self.mode == "STOPPED":
            return Verdict(dict.fromkeys(proposed, 0.0), "STOPPED", "stopped by the operator")
        data_ok = usable and not self.flat
        if not data_ok:
            reason = data_reason if not usable else f"{c.measured} flat-lined"
            self._good_in_row = 0
            if self.mode != "FALLBACK":
                alarm = (self.data_code or "data.invalid") if not usable else "data.flatline"
            self._to(t_s, "FALLBACK", reason)
            rates = {k: min(c.fallback_rates.get(k, 0.0), last.get(k, 0.0)) for k in proposed}
            return self._clamp(t_s, rates, last, "FALLBACK",
                               f"fallback, no dose increase: {reason}", alarm)
        self._good_in_row += 1
        if self.mode in ("INIT", "FALLBACK"):
            if self.mode == "FALLBACK" and self._good_in_row < c.resume_after:
                rates = {k: min(c.fallback_rates.get(k, 0.0), last.get(k, 0.0))
                         for k in proposed}
                return self._clamp(t_s, rates, last, "FALLBACK",
                                   f"fallback: {self._good_in_row}/{c.resume_after} good "
                                   f"readings before resuming", None)
            self._to(t_s, "CLOSED_LOOP", "data usable")
        if plan_ok:
            return self._clamp(t_s, dict(proposed), last, "CLOSED_LOOP", plan_reason, None)
        if backup is not None:
            return self._clamp(t_s, dict(backup), last, "CLOSED_LOOP",
                               f"solver failed ({plan_reason}): shifted previous plan",
                               "controller.solver_failed")
        self._to(t_s, "FALLBACK", f"solver failed: {plan_reason}")
        rates = {k: min(c.fallback_rates.get(k, 0.0), last.get(k, 0.0)) for k in proposed}
        return self._clamp(t_s, rates, last, "FALLBACK",
                           f"solver failed ({plan_reason}), no previous plan: fallback",
                           "controller.solver_failed")

    def _clamp(self, t_s, rates, last, mode, reason, alarm) -> Verdict:
        c = self.config
        notes = []
        for name, value in rates.items():
            value = value if math.isfinite(value) else 0.0
            cap = c.max_rates.get(name, math.inf)
            step = c.max_step.get(name, math.inf)
            prev = last.get(name, 0.0)
            # the change limit first, then the hard cap: the cap always wins
            new = min(max(value, prev - step), prev + step)
            new = min(max(new, 0.0), cap)
            if abs(new - value) > 1e-12 * max(1.0, abs(value)):
                notes.append(f"{name} clamped {value:.4g} -> {new:.4g}")
            rates[name] = new
        for name, window_s, max_amount in c.dose_windows:
            used = sum(r.get(name, 0.0) * dt for t, dt, r in self._window(t_s, window_s))
            if name in rates and used >= max_amount:
                notes.append(f"{name} dose limit {max_amount:g} per {window_s:g} s reached")
                rates[name] = 0.0
        return Verdict(rates, mode, reason + ("; " + "; ".join(notes) if notes else ""), alarm)

    def record(self, t_s: float, rates: Mapping[str, float]) -> None:
        """Record the rates applied from *t_s* (for the dose windows)."""
        self._delivered.append((t_s, dict(rates)))

    def _window(self, t_s: float, window_s: float):
        items = list(self._delivered)
        for k, (t, r) in enumerate(items):
            end = items[k + 1][0] if k + 1 < len(items) else t_s
            start = max(t, t_s - window_s)
            if end > start:
                yield t, end - start, r

    def stop(self, t_s: float, cause: str) -> None:
        """An operator stops the loop (any -> STOPPED)."""
        self._to(t_s, "STOPPED", cause)

    def acknowledge(self, t_s: float) -> None:
        """An operator acknowledges a stop: STOPPED -> INIT."""
        if self.mode == "STOPPED":
            self._to(t_s, "INIT", "operator acknowledged")
