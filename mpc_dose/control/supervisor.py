"""The safety supervisor: independent of the controller, it gates measurements and checks
every decision against hard limits before it leaves the controller node. Every controller
kind (fixed regimen, PID, TCI, a user's own, NMPC) runs behind it alike
(:class:`SupervisedController`): one safety rule, one place.

* Readings that are stale, from the future, flagged invalid, outside the physiological range
  or flat-lined are unusable: the dose is never increased on them, the mode switches to
  FALLBACK and a technical alarm is raised. CLOSED_LOOP resumes only after *resume_after*
  good readings in a row (hysteresis). Rejected readings never reach the controller's
  estimator.
* A failed decision (a failed solve, a controller error, a solve abandoned past its time
  budget, a lost controller process) uses the controller's backup (the NMPC's shifted
  previous plan) while it has one, else the configured fallback (stop or a preset rate,
  never above the last rate). This rule lives here only (:meth:`SafetySupervisor.check`);
  a host that runs the controller elsewhere hands it the failure and the backup it knows.
* Hard clamps: maximum rate, maximum change per decision, maximum dose per sliding window.
  They apply to open-loop controllers too (no measured variable: no data gate).
* Maximum insulin on board (``max_on_board``, OpenAPS's max_iob): a rate above the basal
  is cut so that the insulin on board above the basal - boluses included, by the insulin
  curve - plus what the rate adds over the next ``on_board_horizon_s`` stays within the
  limit. Boluses themselves are not cut by it (a meal bolus is the patient's), but they
  count: after one the loop adds nothing above the basal until it has acted.
* Boluses (a decision's ``boluses``, e.g. an insulin meal bolus) leave only with an ``ok``
  decision in CLOSED_LOOP, and never for an input the low suspend holds at zero: such a
  bolus waits for the suspend to end (``held_bolus_s``), others are dropped, and the
  controller is told at once that it was not given; the pump side checks their amount
  (max bolus, increment, insulin on board). The dose windows count
  rates only (not yet boluses).

Every decision carries a human-readable reason, recorded with it. Modes:
``INIT -> CLOSED_LOOP <-> FALLBACK``, ``any -> STOPPED`` (by an operator),
``STOPPED -> INIT`` (acknowledged). This module knows no messages, pumps or clocks.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..errors import ConfigError
from ..units import GLUCOSE, UnitError, convert, convert_substance
from .base import Controller, Decision, Reading, check_boluses, check_rates
from .insulin import InsulinCurve

__all__ = ["PendingDecision", "SafetyConfig", "SafetySupervisor", "SupervisedController",
           "Verdict"]


def _number(where: str, value: object, *, minimum: float = -math.inf,
            strict: bool = False, allow_inf: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and \
        not math.isnan(value) and (allow_inf or math.isfinite(value)) and \
        (value > minimum if strict else value >= minimum)
    if not ok:
        raise ConfigError(f"safety.{where} = {value!r}: expected a "
                          f"{'finite ' if not allow_inf else ''}number "
                          f"{'>' if strict else '>='} {minimum:g}")
    return float(value)


@dataclass(frozen=True)
class SafetyConfig:
    """Limits and data-quality rules (rates in each input's amount unit per second).

    Parameters
    ----------
    measured : str or None
        The reading variable (a sensor's ``var`` as it arrives) whose readings drive the
        dose; None for an open-loop controller (fixed regimen, TCI): no data gate, every
        clamp still applies.
    max_rates : mapping input -> amount/s
        Hard maximum rate of each input (none for an input not named).
    max_step : mapping input -> amount/s
        Largest change of an input's rate from one decision to the next.
    dose_windows : tuple of (input, window [s], max amount)
        At most *max amount* of the input over any sliding window of that length.
    fallback_rates : mapping input -> amount/s
        The preset fallback (0, stop, when not named); never applied above the last rate.
    stale_after_s : float
        A reading older than this [s] at a decision is stale.
    future_tolerance_s : float
        A reading dated more than this [s] after the decision is from the future.
    valid_range : (low, high)
        Physiologically possible values of the measured variable (its unit).
    flatline_samples : int
        This many admitted readings in a row within *flatline_tolerance* of each other mean
        the signal is flat-lined (a frozen sensor); 0 turns the check off.
    flatline_tolerance : float
    resume_after : int
        Good decisions in a row before FALLBACK gives way to CLOSED_LOOP.
    dose_before_first_reading : bool
        Whether the controller may dose (within the clamps) before the first reading.
    below_lloq_usable : bool
        Whether a reading below its limit of quantification is usable (censored) data.
    above_range_usable : bool
        Whether a reading above the device's range (a CGM's HIGH) is usable (censored) data.
    """

    measured: str | None = None
    max_rates: Mapping[str, float] = field(default_factory=dict)
    max_step: Mapping[str, float] = field(default_factory=dict)
    dose_windows: tuple[tuple[str, float, float], ...] = ()
    fallback_rates: Mapping[str, float] = field(default_factory=dict)
    stale_after_s: float = 15.0
    future_tolerance_s: float = 2.0
    valid_range: tuple[float, float] = (-math.inf, math.inf)
    flatline_samples: int = 20
    flatline_tolerance: float = 1e-9
    resume_after: int = 3
    #: the controller may dose before the first reading of the measured variable arrives (a
    #: loading dose before any level, standard for many drugs); its rates pass the clamps
    #: in INIT. False: nothing before the first reading (the closed loop waits for data).
    dose_before_first_reading: bool = False
    #: a reading below its limit of quantification (quality "underflow": a laboratory's
    #: "< LLOQ") is usable data - it says "low" - and reaches the controller's estimator
    #: (which treats it as censored, M3). False: it is unusable like any flagged reading.
    below_lloq_usable: bool = False
    #: a reading above the device's range (quality "overflow": a CGM's HIGH, above 400
    #: mg/dL) is usable data - it says "high" - and drives the dose at the range's limit.
    #: False: unusable like any flagged reading (a glucose that runs away above the range
    #: would then leave the pump on its fallback while it most needs insulin)
    above_range_usable: bool = False
    #: predictive low suspend (a CGM-driven insulin pump's, e.g. SmartGuard's "suspend
    #: before low"): the inputs in *suspend_inputs* (those that lower the measured value)
    #: are held at 0 while the measured value, extrapolated *suspend_horizon_s* ahead along
    #: its least-squares trend over the last *suspend_trend_s* of readings, or the latest
    #: reading itself, is below *suspend_below* (measured unit); None: no suspend
    suspend_below: float | None = None
    suspend_horizon_s: float = 1800.0
    suspend_trend_s: float = 1200.0
    suspend_inputs: tuple[str, ...] = ()
    #: [s] a bolus the low suspend holds (a meal bolus asked for while glucose is predicted
    #: low) is given when the suspend ends, if that is within this long of the request, as
    #: a pump wearer low before a meal boluses after eating (Walsh 2006); later, it is
    #: dropped. 0: dropped at once. Boluses held for any other reason are dropped.
    held_bolus_s: float = 3600.0
    #: the unit the limits above and the controller take the measured variable in; a
    #: reading in another unit (a Nightscout site's mg/dL for a model in mmol/L) is
    #: converted into it on the way in - a glucose reading between mass and molar
    #: concentration by glucose's molar mass when *measured_substance* is "glucose" - and
    #: one that cannot be is refused (``data.unit``); None: readings are taken as they come
    measured_unit: str | None = None
    measured_substance: str | None = None
    #: maximum insulin on board (OpenAPS's max_iob, the pump bridge's max_on_board): per
    #: input, the most [amount] it may have on board above *on_board_basal* [amount/s, the
    #: pump's programmed basal] by *on_board_curve*, counting every rate and bolus given;
    #: a rate above the basal is cut to ``basal + (max - on board) / on_board_horizon_s``
    max_on_board: Mapping[str, float] = field(default_factory=dict)
    on_board_basal: Mapping[str, float] = field(default_factory=dict)
    on_board_curve: InsulinCurve = InsulinCurve()
    #: [s] the extra insulin a rate adds over this long counts against the limit (the
    #: 30-min temporary basal of the OpenAPS documentation's max_iob rule)
    on_board_horizon_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.measured_substance not in (None, "glucose"):
            raise ConfigError(f"safety.measured_substance = {self.measured_substance!r}: "
                              f"expected 'glucose' or None")
        if self.measured is not None and (not isinstance(self.measured, str)
                                          or not self.measured):
            raise ConfigError(f"safety.measured = {self.measured!r}: expected a reading "
                              f"variable name or None")
        for label in ("max_rates", "max_step", "fallback_rates"):
            for name, value in dict(getattr(self, label)).items():
                _number(f"{label}[{name!r}]", value, minimum=0.0,
                        allow_inf=label != "fallback_rates")
        for name, value in dict(self.max_on_board).items():
            _number(f"max_on_board[{name!r}]", value, minimum=0.0)
        for name, value in dict(self.on_board_basal).items():
            _number(f"on_board_basal[{name!r}]", value, minimum=0.0)
            if name not in self.max_on_board:
                raise ConfigError(f"safety.on_board_basal[{name!r}]: no max_on_board for "
                                  f"{name!r} (the basal is what its limit does not count)")
        if not isinstance(self.on_board_curve, InsulinCurve):
            raise ConfigError(f"safety.on_board_curve = {self.on_board_curve!r}: expected "
                              f"an InsulinCurve")
        _number("on_board_horizon_s", self.on_board_horizon_s, minimum=0.0, strict=True)
        for k, window in enumerate(self.dose_windows):
            if len(window) != 3 or not isinstance(window[0], str):
                raise ConfigError(f"safety.dose_windows[{k}] = {window!r}: expected "
                                  f"(input, window_s, max_amount)")
            _number(f"dose_windows[{k}].window_s", window[1], minimum=0.0, strict=True)
            _number(f"dose_windows[{k}].max_amount", window[2], minimum=0.0)
        _number("stale_after_s", self.stale_after_s, minimum=0.0, strict=True, allow_inf=True)
        _number("future_tolerance_s", self.future_tolerance_s, minimum=0.0, allow_inf=True)
        low, high = self.valid_range
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v)
               for v in (low, high)) or low > high:
            raise ConfigError(f"safety.valid_range = {self.valid_range!r}: expected "
                              f"[low, high] with low <= high")
        if isinstance(self.flatline_samples, bool) or \
                not isinstance(self.flatline_samples, int) or \
                not (self.flatline_samples == 0 or self.flatline_samples >= 2):
            raise ConfigError(f"safety.flatline_samples = {self.flatline_samples!r}: expected "
                              f"a whole number >= 2 (0: no flat-line check)")
        _number("flatline_tolerance", self.flatline_tolerance, minimum=0.0)
        if not isinstance(self.above_range_usable, bool):
            raise ConfigError(f"safety.above_range_usable = {self.above_range_usable!r}: "
                              f"expected true or false")
        if not isinstance(self.below_lloq_usable, bool):
            raise ConfigError(f"safety.below_lloq_usable = {self.below_lloq_usable!r}: "
                              f"expected true or false")
        if not isinstance(self.dose_before_first_reading, bool):
            raise ConfigError(f"safety.dose_before_first_reading = "
                              f"{self.dose_before_first_reading!r}: expected true or false")
        if isinstance(self.resume_after, bool) or not isinstance(self.resume_after, int) or \
                self.resume_after < 1:
            raise ConfigError(f"safety.resume_after = {self.resume_after!r}: expected a whole "
                              f"number >= 1")
        if self.suspend_below is not None:
            _number("suspend_below", self.suspend_below)
            _number("suspend_horizon_s", self.suspend_horizon_s, minimum=0.0)
            _number("suspend_trend_s", self.suspend_trend_s, minimum=0.0, strict=True)
            if not self.suspend_inputs or self.measured is None:
                raise ConfigError("safety.suspend_below: needs suspend_inputs (the inputs "
                                  "that lower the measured value) and a measured variable")
        _number("held_bolus_s", self.held_bolus_s, minimum=0.0)


@dataclass(frozen=True)
class Verdict:
    """What the supervisor lets through, in which mode, and why (and an alarm if raised)."""

    rates: dict[str, float]
    mode: str
    reason: str
    alarm: str | None = None


@dataclass(frozen=True)
class PendingDecision:
    """A supervised decision between its two halves (:meth:`SupervisedController.prepare`
    and :meth:`~SupervisedController.settle`): its time, the readings the controller is
    given (the measured variable left out when unusable), and the data gate's verdict."""

    t_s: float
    given: dict[str, Reading]
    usable: bool
    data_reason: str


class SafetySupervisor:
    """Gates readings (:meth:`screen`, :meth:`gate`) and decisions (:meth:`check`); see the
    module docstring. :class:`SupervisedController` drives it for a controller."""

    def __init__(self, config: SafetyConfig) -> None:
        self.config = config
        self.mode = "INIT"
        self._recent: deque[float] = deque(maxlen=max(2, config.flatline_samples))
        self._good_in_row = 0
        self._delivered: deque[tuple[float, dict[str, float]]] = deque()
        self._longest_window = max([w for _, w, _ in config.dose_windows] + (
            [config.on_board_curve.duration_s] if config.max_on_board else []), default=0.0)
        #: (time, input, amount) of the boluses given, for the insulin on board
        self._boluses: deque[tuple[float, str, float]] = deque()
        self.transitions: list[tuple[float, str, str, str]] = []
        self.data_code = ""
        #: (sample time, value) of the admitted readings the low suspend's trend reads
        self._trend: deque[tuple[float, float]] = deque(maxlen=256)
        #: the low suspend holds its inputs at 0
        self.suspended = False

    def _to(self, t_s: float, mode: str, cause: str) -> None:
        if mode != self.mode:
            self.transitions.append((t_s, self.mode, mode, cause))
            self.mode = mode

    def in_unit(self, reading: Reading) -> tuple[Reading | None, str]:
        """*reading* of the measured variable in :attr:`SafetyConfig.measured_unit` (the
        same reading when it already is, or no unit is set), or ``(None, why)`` when its
        unit cannot be converted."""
        c = self.config
        if c.measured_unit is None or reading.unit == c.measured_unit:
            return reading, ""
        try:
            if c.measured_substance == "glucose":
                value = convert_substance(reading.value, reading.unit, c.measured_unit,
                                          GLUCOSE, what=c.measured or "reading")
            else:
                value = convert(reading.value, reading.unit, c.measured_unit,
                                what=c.measured or "reading")
        except UnitError as err:
            return None, f"{c.measured} in {reading.unit!r}, not convertible to " \
                f"{c.measured_unit!r} ({err})"
        return replace(reading, value=value, unit=c.measured_unit), ""

    def screen(self, reading: Reading) -> tuple[str, str]:
        """Why a reading of the measured variable may not be used whatever its time: (reason,
        alarm code), or ``("", "")`` when its value is usable (finite, flagged valid, inside
        the valid range)."""
        c = self.config
        if not math.isfinite(reading.value):
            return f"{c.measured} is not a finite number ({reading.value!r})", "data.invalid"
        if reading.quality != "valid" and not (
                (reading.quality == "underflow" and c.below_lloq_usable)
                or (reading.quality == "overflow" and c.above_range_usable)):
            return f"{c.measured} flagged {reading.quality}", "data.invalid"
        low, high = c.valid_range
        if not low <= reading.value <= high:
            return (f"{c.measured} = {reading.value:g} outside [{low:g}, {high:g}]",
                    "data.out_of_range")
        return "", ""

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
        reason, code = self.screen(reading)
        if code and code != "data.out_of_range":
            return False, reason, code
        if reading.t_meas_s > t_s + c.future_tolerance_s:
            return False, (f"{c.measured} from the future ({reading.t_meas_s - t_s:.1f} s "
                           f"ahead)"), "data.future"
        if t_s - reading.t_meas_s > c.stale_after_s:
            return False, f"{c.measured} stale ({t_s - reading.t_meas_s:.1f} s old)", \
                "data.stale"
        if code:
            return False, reason, code
        return True, "ok", ""

    def observe(self, reading: Reading) -> bool:
        """Track an admitted reading for flat-line detection (and the low suspend's trend);
        False when the signal is flat. A reading at the device's range limit (underflow,
        overflow) is the same value each time by nature: it neither counts towards a flat
        line nor breaks one."""
        if reading.quality == "valid":
            self._recent.append(reading.value)
        if self.config.suspend_below is not None and math.isfinite(reading.value):
            self._trend.append((float(reading.t_meas_s), float(reading.value)))
        return not self.flat

    def predicted_low(self, t_s: float) -> tuple[bool, str]:
        """Whether the low suspend holds at *t_s*, and the prediction it acted on."""
        c = self.config
        if c.suspend_below is None:
            return False, ""
        recent = [(t, v) for t, v in self._trend if t_s - c.suspend_trend_s <= t <= t_s]
        if not recent:
            return False, ""
        latest_t, latest = recent[-1]
        predicted = latest
        if len(recent) >= 2:
            ts = [t for t, _ in recent]
            mean_t, mean_v = sum(ts) / len(ts), sum(v for _, v in recent) / len(recent)
            spread = sum((t - mean_t) ** 2 for t in ts)
            if spread > 0:
                slope = sum((t - mean_t) * (v - mean_v) for t, v in recent) / spread
                predicted = latest + slope * (t_s - latest_t + c.suspend_horizon_s)
        low = min(latest, predicted) < c.suspend_below
        return low, (f"{c.measured} {latest:.4g}, predicted {predicted:.4g} in "
                     f"{c.suspend_horizon_s / 60:g} min, below {c.suspend_below:g}")

    @property
    def flat(self) -> bool:
        c = self.config
        if c.flatline_samples == 0 or len(self._recent) < c.flatline_samples:
            return False
        values = list(itertools.islice(reversed(self._recent), c.flatline_samples))
        return max(values) - min(values) <= c.flatline_tolerance

    def check(self, t_s: float, proposed: Mapping[str, float], last: Mapping[str, float], *,
              usable: bool, data_reason: str, plan_ok: bool, plan_reason: str,
              backup: Mapping[str, float] | None = None,
              failure: str = "solver_failed") -> Verdict:
        """The rates to apply from *t_s*.

        *proposed* are the controller's rates, *last* the rates in force, *usable* whether
        the data may drive the dose (:meth:`gate`), *plan_ok* whether the controller's
        decision succeeded (*failure* names its status when not, e.g. ``solver_failed``),
        *backup* the controller's rates for a failed decision (the shifted previous plan;
        None when it has none).
        """
        c = self.config
        alarm = None
        if self.mode == "STOPPED":
            return Verdict(dict.fromkeys(proposed, 0.0), "STOPPED", "stopped by the operator")
        data_ok = usable and not self.flat
        if not data_ok:
            reason = data_reason if not usable else f"{c.measured} flat-lined"
            self._good_in_row = 0
            rates = {k: min(c.fallback_rates.get(k, 0.0), last.get(k, 0.0)) for k in proposed}
            if self.mode == "INIT" and not usable and self.data_code == "data.missing":
                if c.dose_before_first_reading:  # e.g. a loading dose before any level
                    chosen = proposed if plan_ok else backup if backup is not None else rates
                    return self._clamp(t_s, dict(chosen), last, "INIT",
                                       f"before the first reading, dosing allowed: "
                                       f"{plan_reason if plan_ok else 'fallback'}", None)
                # nothing to act on yet: wait for the first reading, without an alarm
                return self._clamp(t_s, rates, last, "INIT", f"waiting: {reason}", None)
            if self.mode != "FALLBACK":
                alarm = (self.data_code or "data.invalid") if not usable else "data.flatline"
            self._to(t_s, "FALLBACK", reason)
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
            self._to(t_s, "CLOSED_LOOP", "data usable" if c.measured is not None
                     else "started (open loop: no measured variable)")
        if plan_ok:
            return self._clamp(t_s, dict(proposed), last, "CLOSED_LOOP", plan_reason, None)
        what = failure.replace("_", " ")
        code = "controller." + failure.removeprefix("controller_")
        if backup is not None:
            return self._clamp(t_s, dict(backup), last, "CLOSED_LOOP",
                               f"{what} ({plan_reason}): shifted previous plan", code)
        self._to(t_s, "FALLBACK", f"{what}: {plan_reason}")
        rates = {k: min(c.fallback_rates.get(k, 0.0), last.get(k, 0.0)) for k in proposed}
        return self._clamp(t_s, rates, last, "FALLBACK",
                           f"{what} ({plan_reason}), no previous plan: fallback", code)

    def _clamp(self, t_s, rates, last, mode, reason, alarm) -> Verdict:
        c = self.config
        notes = []
        low, why = self.predicted_low(t_s)
        if low:
            # it only takes insulin away: whatever the mode, before every other clamp
            for name in c.suspend_inputs:
                if name in rates:
                    rates[name] = 0.0
            notes.append(f"low suspend: {why}")
            if not self.suspended:
                alarm = alarm or "low.suspend"
        elif self.suspended:
            notes.append("low suspend ends")
        self.suspended = low
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
        for name, limit in c.max_on_board.items():
            basal = c.on_board_basal.get(name, 0.0)
            if name not in rates or rates[name] <= basal:
                continue
            on_board = self.on_board(t_s, name)
            allowed = basal + max(0.0, limit - on_board) / c.on_board_horizon_s
            if rates[name] > allowed:
                notes.append(f"{name} on board {on_board:.3g} of max {limit:g}: "
                             f"{rates[name]:.4g} -> {allowed:.4g}")
                rates[name] = allowed
        return Verdict(rates, mode, reason + ("; " + "; ".join(notes) if notes else ""), alarm)

    def on_board(self, t_s: float, name: str) -> float:
        """Insulin on board of input *name* at *t_s* above its ``on_board_basal`` by the
        ``on_board_curve``: the rates recorded and the boluses given."""
        c = self.config
        curve = c.on_board_curve
        rates = [(t, r.get(name, 0.0)) for t, r in self._delivered if t <= t_s]
        boluses = [(t, amount) for t, n, amount in self._boluses if n == name]
        return curve.on_board_above(rates, c.on_board_basal.get(name, 0.0), t_s) + \
            curve.on_board(boluses, t_s)

    def record_bolus(self, t_s: float, name: str, amount: float) -> None:
        """A pump gave a bolus of *amount* of *name* from *t_s* (its ack): counted in the
        insulin on board while it acts."""
        if name in self.config.max_on_board and amount > 0:
            self._boluses.append((t_s, name, float(amount)))
        while self._boluses and \
                self._boluses[0][0] <= t_s - self.config.on_board_curve.duration_s:
            self._boluses.popleft()

    def record(self, t_s: float, rates: Mapping[str, float]) -> None:
        """Record the rates applied from *t_s* (for the dose windows and the insulin on
        board); a second record at the same time replaces the first (the rates in force
        were corrected)."""
        if self._delivered and self._delivered[-1][0] == t_s:
            self._delivered.pop()
        self._delivered.append((t_s, dict(rates)))
        # what ended before the longest window no longer counts
        while len(self._delivered) > 1 and \
                self._delivered[1][0] <= t_s - self._longest_window:
            self._delivered.popleft()

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


class SupervisedController:
    """Any :class:`~mpc_dose.control.base.Controller` behind a :class:`SafetySupervisor`;
    itself a controller (same name, period and inputs), so it runs and is tested as one.

    * :meth:`observe`: a reading of the measured variable reaches the controller's own
      ``observe`` (its estimator) only when finite, flagged valid and inside the valid
      range; rejected ones are counted by alarm code in :attr:`rejected`. Readings of other
      variables pass unchanged.
    * :meth:`decide`: the latest reading of the measured variable (whatever its quality) is
      gated; the controller sees only usable readings (the measured variable is left out
      when the data is unusable, so a PID holds instead of integrating on stale data); an
      exception from the controller is a failed decision (status ``controller_error``), not
      a crash; then :meth:`SafetySupervisor.check` sets the rates, which are recorded and
      told to the controller (its optional ``applied(t_s, rates)``).

    The decision's reason starts with the mode (``"CLOSED_LOOP: ..."``,
    ``"FALLBACK: ..."``) and keeps the controller's own reason where the rates are its own;
    its status is the controller's, its details the controller's plus ``mode``, its
    ``alarm`` the code of an alarm raised (also listed in :attr:`alarms`).

    Parameters
    ----------
    controller : Controller
    supervisor : SafetySupervisor or SafetyConfig, optional
        Without one: no data gate and no limits (only the rate check).
    """

    def __init__(self, controller: Controller,
                 supervisor: SafetySupervisor | SafetyConfig | None = None) -> None:
        if isinstance(controller, SupervisedController):
            raise ConfigError(f"controller {controller.name!r} is already supervised")
        if supervisor is None or isinstance(supervisor, SafetyConfig):
            supervisor = SafetySupervisor(supervisor or SafetyConfig())
        self.controller = controller
        self.supervisor = supervisor
        self.name = controller.name
        self.period_s = controller.period_s
        self.inputs = tuple(controller.inputs)
        #: the rates in force [amount/s]
        self.rates = dict.fromkeys(self.inputs, 0.0)
        #: readings of the measured variable kept from the controller, by alarm code
        self.rejected: Counter[str] = Counter()
        #: (time, alarm code, reason) of every alarm raised
        self.alarms: list[tuple[float, str, str]] = []
        #: whether the data could drive the dose at the last decision (True when open loop)
        self.data_usable = False
        self._observe = getattr(controller, "observe", None)
        self._applied = getattr(controller, "applied", None)
        self._given_bolus = getattr(controller, "given_bolus", None)
        #: input -> (time asked [s], amount) of a bolus the low suspend holds
        self._deferred: dict[str, tuple[float, float]] = {}

    @property
    def mode(self) -> str:
        return self.supervisor.mode

    @property
    def measured(self) -> str | None:
        return self.supervisor.config.measured

    def observe(self, reading: Reading) -> None:
        """Every reading as it arrives; see the class docstring."""
        if reading.var == self.measured:
            reading, _ = self.supervisor.in_unit(reading)
            if reading is None:
                self.rejected["data.unit"] += 1
                return
            _, code = self.supervisor.screen(reading)
            if code:
                self.rejected[code] += 1
                return
            self.supervisor.observe(reading)
        if self._observe is not None:
            self._observe(reading)

    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        """The supervised decision at *t_s*: :meth:`prepare`, the controller's own decide,
        :meth:`settle`."""
        pending = self.prepare(t_s, readings)
        try:
            outcome: Decision | Exception = self.controller.decide(t_s, pending.given)
        except Exception as err:  # noqa: BLE001 - a controller's failure is a result
            outcome = err
        return self.settle(pending, outcome)

    def prepare(self, t_s: float, readings: Mapping[str, Reading]) -> PendingDecision:
        """The first half of :meth:`decide`: gate the latest reading of the measured
        variable and say what the controller is given. A caller that asks the controller
        elsewhere (another process, under a time budget) hands its answer to
        :meth:`settle`; nothing else may reach this supervisor in between."""
        sup, measured = self.supervisor, self.measured
        given = dict(readings)
        if measured is None:
            usable, why = True, "open loop"
        elif measured in given:
            latest, why = sup.in_unit(given[measured])
            if latest is None:
                usable, sup.data_code = False, "data.unit"
            else:
                given[measured] = latest
                usable, why = sup.gate(t_s, latest)
        else:
            usable, why = sup.gate(t_s, None)
        self.data_usable = usable and not sup.flat
        if measured is not None and not self.data_usable:
            given.pop(measured, None)
        return PendingDecision(t_s, given, usable, why)

    def settle(self, pending: PendingDecision, outcome: Decision | Exception) -> Decision:
        """The second half of :meth:`decide`: the controller's *outcome* (its decision, or
        the exception it raised: a failed decision, ``controller_error``) through
        :meth:`SafetySupervisor.check`. A decision that did not come (``solver_timeout``, a
        lost controller) is a failed decision with the backup its caller knows, and gets
        the same treatment: the backup while there is one, else the fallback."""
        sup, t_s = self.supervisor, pending.t_s
        decision, backup, boluses = None, None, {}
        try:
            if isinstance(outcome, Exception):
                raise outcome
            decision = outcome
            status, reason = decision.status, decision.reason
            if status == "ok":
                proposed = check_rates(decision.rates, self.inputs, self.name)
                boluses = check_boluses(getattr(decision, "boluses", {}), self.inputs,
                                        self.name)
            else:
                proposed = dict.fromkeys(self.inputs, 0.0)
                backup = self._backup(decision.backup)
        except ConfigError as err:  # e.g. check_rates: it names the controller and value
            status, reason = "controller_error", str(err)
            proposed = dict.fromkeys(self.inputs, 0.0)
        except Exception as err:  # noqa: BLE001 - a controller's failure is a result
            status, reason = "controller_error", f"{type(err).__name__}: {err}"
            proposed = dict.fromkeys(self.inputs, 0.0)
        verdict = sup.check(t_s, proposed, self.rates, usable=pending.usable,
                            data_reason=pending.data_reason, plan_ok=status == "ok",
                            plan_reason=reason, backup=backup, failure=status)
        self.applied(t_s, verdict.rates)
        if verdict.alarm is not None:
            self.alarms.append((t_s, verdict.alarm, verdict.reason))
        details = dict(decision.details) if decision is not None else {}
        details["mode"] = verdict.mode
        reason = f"{verdict.mode}: {verdict.reason}"
        boluses, notes = self._hold_boluses(t_s, boluses, verdict.mode, status)
        return Decision(t_s, dict(self.rates), reason + notes, status, details,
                        alarm=verdict.alarm, boluses=boluses)

    def _hold_boluses(self, t_s: float, boluses: dict[str, float], mode: str,
                      status: str) -> tuple[dict[str, float], str]:
        """The boluses that leave now, and the reason's notes: none but in CLOSED_LOOP on an
        ``ok`` decision, none into the low suspend. One the suspend holds waits for it to
        end (``held_bolus_s``), added to what is asked then; the controller hears at once
        that it was not given (``given_bolus`` 0, as for a refusal), and of the later one
        from the pump's ack like any bolus."""
        sup, c = self.supervisor, self.supervisor.config
        out, notes = {}, ""
        for name in sorted(set(boluses) | set(self._deferred)):
            asked = boluses.get(name, 0.0)
            held_by_suspend = sup.suspended and name in c.suspend_inputs
            if mode != "CLOSED_LOOP" or status != "ok":
                if asked:
                    notes += f"; bolus of {name} not given ({mode})"
                    self._tell_not_given(t_s, name)
                continue
            since, waiting = self._deferred.pop(name, (t_s, 0.0))
            if waiting and t_s - since > c.held_bolus_s:
                notes += (f"; held bolus of {name} {waiting:.3g} dropped (the low suspend "
                          f"outlasted {c.held_bolus_s / 60:g} min)")
                since, waiting = t_s, 0.0
            if held_by_suspend:
                if asked:
                    self._tell_not_given(t_s, name)
                    notes += f"; bolus of {name} {asked:.3g} held (low suspend)"
                    if c.held_bolus_s > 0:
                        self._deferred[name] = (since if waiting else t_s, waiting + asked)
                    else:
                        notes += ": not given"
                elif waiting:
                    self._deferred[name] = (since, waiting)
                continue
            if waiting:
                notes += (f"; held bolus of {name} {waiting:.3g} given now (asked "
                          f"{(t_s - since) / 60:.0f} min ago, the low suspend over)")
            if asked + waiting > 0:
                out[name] = asked + waiting
        return out, notes

    def _tell_not_given(self, t_s: float, name: str) -> None:
        if self._given_bolus is not None:
            self._given_bolus(t_s, name, 0.0)

    def given_bolus(self, t_s: float, name: str, amount: float) -> None:
        """A pump gave a bolus of *amount* of input *name* from *t_s* (as its ack says):
        counted in the supervisor's insulin on board and told to the controller (its
        optional ``given_bolus``)."""
        self.supervisor.record_bolus(t_s, name, amount)
        if self._given_bolus is not None:
            self._given_bolus(t_s, name, amount)

    def _backup(self, backup: Mapping[str, float] | None) -> dict[str, float] | None:
        if backup is None or any(name not in backup for name in self.inputs):
            return None
        out = {}
        for name in self.inputs:
            value = backup[name]
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            out[name] = float(value) if ok else math.nan  # the clamp makes NaN no drug
        return out

    def applied(self, t_s: float, rates: Mapping[str, float]) -> None:
        """The rates in force from *t_s* on: recorded for the dose windows and told to the
        controller. :meth:`decide` calls it with its own rates; the controller node calls it
        again when the pumps do otherwise (a lease left to run out into the pump's
        fallback)."""
        self.rates = {name: float(rates.get(name, 0.0)) for name in self.inputs}
        self.supervisor.record(t_s, self.rates)
        if self._applied is not None:
            self._applied(t_s, dict(self.rates))
