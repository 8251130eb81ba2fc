"""Intermittent infusions at scheduled times, as a ward gives them: the part every
dose-by-rule controller shares (a dosing clock, doses rounded to what can be drawn up, the
infusion rate in force), and the standard-of-care nomogram built on it.

A :class:`ScheduledInfusions` subclass only says how much the dose starting at a given time
is (:meth:`ScheduledInfusions.dose_at`); the schedule, the rounding, the caps and the rate the
pumps are commanded live here once. The Bayesian MIPD controller
(:class:`~mpc_dose.control.map_estimation.MIPDController`) is the other subclass.

This module knows model/ (nothing of plant/ nor transports).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from .base import Decision, Reading
from .dose_targets import round_dose as round_to_step

__all__ = ["round_dose", "ScheduledInfusions", "NomogramBand", "NomogramController"]


def round_dose(amount: float, rounding: Sequence[tuple[float, float]]) -> float:
    """*amount* rounded to the nearest multiple of the step of the first ``(below, step)``
    row with ``amount < below`` (the last row's *below* may be ``inf``); unchanged when no
    row applies or the step is 0. Ties round up (a half step more, as a pharmacy does)."""
    for below, step in rounding:
        if amount < below:
            return round_to_step(amount, step if step > 0 else None)
    return amount


class ScheduledInfusions:
    """Doses given as infusions of *infusion_s* at scheduled times: the first at
    *first_dose_s*, each next one an interval later (the interval may change between
    doses: :attr:`interval_s` at the time a dose starts sets when the next one starts).

    At the decision at or after a dose's start the subclass's :meth:`dose_at` gives its
    amount (input amount unit); it is capped (*loading_dose_max* for the first, *max_dose*
    for the others) and rounded (*rounding*: ``(below, step)`` rows, see :func:`round_dose`).
    The rate in force is that amount over *infusion_s* until the infusion ends, else 0.
    A controller period longer than the infusion would miss it: refused.
    """

    def __init__(self, *, input: str, interval_s: float, infusion_s: float,
                 first_dose_s: float = 0.0, period_s: float,
                 rounding: Sequence[tuple[float, float]] = (),
                 max_dose: float = math.inf, loading_dose_max: float | None = None,
                 name: str) -> None:
        if not (0 < infusion_s <= interval_s):
            raise ConfigError(f"{name}: need 0 < infusion_s <= interval_s, got {infusion_s} "
                              f"and {interval_s}")
        if not (period_s > 0 and infusion_s % period_s < 1e-9 * period_s
                or period_s - infusion_s % period_s < 1e-9 * period_s):
            raise ConfigError(f"{name}: infusion_s ({infusion_s} s) must be a multiple of the "
                              f"controller period ({period_s} s): a dose ends at a decision")
        if not first_dose_s >= 0:
            raise ConfigError(f"{name}: first dose at {first_dose_s} s; expected >= 0")
        self.name, self.period_s, self.inputs = name, float(period_s), (input,)
        self.input = input
        self.interval_s, self.infusion_s = float(interval_s), float(infusion_s)
        self.rounding = tuple((float(b), float(s)) for b, s in rounding)
        self.max_dose = float(max_dose)
        self.loading_dose_max = self.max_dose if loading_dose_max is None \
            else float(loading_dose_max)
        self._next_s = float(first_dose_s)
        #: (start [s], amount, why) of every dose decided, in order
        self.doses: list[tuple[float, float, str]] = []

    def dose_at(self, start_s: float) -> tuple[float, str]:
        """The amount of the dose starting at *start_s* and why (before caps and rounding)."""
        raise NotImplementedError

    def _give(self, start_s: float) -> None:
        amount, why = self.dose_at(start_s)
        cap = self.loading_dose_max if not self.doses else self.max_dose
        if not math.isfinite(amount) or amount < 0:
            amount, why = 0.0, f"{why}; not a dose ({amount!r}): none given"
        capped = min(amount, cap)
        given = min(round_dose(capped, self.rounding), cap)
        if capped < amount:
            why = f"{why}; capped at {cap:g}"
        self.doses.append((start_s, given, why))
        self._next_s = start_s + self.interval_s

    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        # a decision late by up to a period still starts the dose due (scheduled at the
        # decision times of a regular clock, it never is)
        while t_s + 1e-6 >= self._next_s:
            self._give(self._next_s)
        rate, reason = 0.0, "between doses"
        if self.doses:
            start, amount, why = self.doses[-1]
            if start <= t_s + 1e-6 < start + self.infusion_s:
                rate = amount / self.infusion_s
            reason = (f"{self.name}: dose {amount:g} over {self.infusion_s / 3600:g} h at "
                      f"{start / 3600:g} h ({why}); next at {self._next_s / 3600:g} h")
        return Decision(t_s, {self.input: rate}, reason)


#: below the nomogram's bands (the source sends the patient to a pharmacist): no maintenance
#: dose, the covariates looked at again after this long [s]
_CONSULT_S = 24 * 3600.0


@dataclass(frozen=True)
class NomogramBand:
    """One row of a dosing nomogram: from *at_least* (the covariate's unit) on, doses every
    *interval_s*; None: a loading dose only (the source sends the patient to a pharmacist)."""

    at_least: float
    interval_s: float | None


class NomogramController(ScheduledInfusions):
    """A printed dosing nomogram with trough-guided adjustment, as wards dose vancomycin.

    * Loading dose: *loading_per_kg* x body weight; then *maintenance_per_kg* x body weight
      at the interval of the band the covariate (e.g. creatinine clearance) falls in,
      re-read at every dose from the covariates in force (:meth:`covariates_from`).
    * Trough adjustment: a level sampled within *trough_before_s* before a scheduled dose,
      after at least *steady_state_doses* doses of the current regimen, is a steady-state
      trough; outside [*trough_low*, *trough_high*] the maintenance dose becomes
      ``dose x trough_target / trough`` (linear pharmacokinetics), from the next dose on.
      A level below the limit of quantification counts as that limit.

    Amounts in the input's amount unit (per kg for the per-kg doses), levels in the
    measured output's unit.
    """

    def __init__(self, *, input: str, measured: str, bands: Sequence[NomogramBand],
                 band_covariate: str, weight_covariate: str,
                 covariates: Mapping[str, object], loading_per_kg: float,
                 maintenance_per_kg: float, infusion_s: float, period_s: float,
                 first_dose_s: float = 0.0, rounding: Sequence[tuple[float, float]] = (),
                 max_dose: float = math.inf, loading_dose_max: float | None = None,
                 trough_target: float | None = None, trough_low: float | None = None,
                 trough_high: float | None = None, trough_before_s: float = 7200.0,
                 steady_state_doses: int = 3, name: str = "nomogram") -> None:
        self.name = name
        rows = sorted(bands, key=lambda b: -b.at_least)
        if not rows:
            raise ConfigError(f"{name}: the nomogram has no band")
        self.bands, self.band_covariate = tuple(rows), band_covariate
        self.weight_covariate, self.measured = weight_covariate, measured
        self.covariates: dict[str, object] = dict(covariates)
        self._changes: list[tuple[float, dict]] = []
        for key in (band_covariate, weight_covariate):
            self._number(key, self.covariates)
        self.loading_per_kg, self.maintenance_per_kg = loading_per_kg, maintenance_per_kg
        adjust = (trough_target, trough_low, trough_high)
        if any(v is not None for v in adjust) and not all(v is not None for v in adjust):
            raise ConfigError(f"{name}: trough adjustment needs trough_target, trough_low and "
                              f"trough_high together, got {adjust}")
        if trough_target is not None and not (0 < trough_low <= trough_target <= trough_high):
            raise ConfigError(f"{name}: need 0 < trough_low <= trough_target <= trough_high, "
                              f"got {trough_low}, {trough_target}, {trough_high}")
        self.trough_target, self.trough_low, self.trough_high = adjust
        self.trough_before_s, self.steady_state_doses = trough_before_s, steady_state_doses
        interval = self._band_interval(self.covariates) or _CONSULT_S
        super().__init__(input=input, interval_s=interval, infusion_s=infusion_s,
                         first_dose_s=first_dose_s, period_s=period_s, rounding=rounding,
                         max_dose=max_dose, loading_dose_max=loading_dose_max, name=name)
        self._maintenance: float | None = None     # after a trough adjustment
        self._regimen_start = 0                    # index of the current regimen's first dose
        self._troughs: list[Reading] = []          # levels not yet looked at
        #: (time [s], trough, old dose, new dose) of every adjustment
        self.adjustments: list[tuple[float, float, float, float]] = []

    # ------------------------------------------------------------------ telling it
    def covariates_from(self, t_s: float, covariates: Mapping[str, object]) -> None:
        """Covariates in force from *t_s* on (a new creatinine clearance, a new weight)."""
        self._changes.append((float(t_s), dict(covariates)))
        self._changes.sort(key=lambda c: c[0])

    def observe(self, reading: Reading) -> None:
        if reading.var == self.measured and reading.quality in ("valid", "underflow") and \
                math.isfinite(reading.value):
            self._troughs.append(reading)

    # ------------------------------------------------------------------ deciding
    def _number(self, key: str, covariates: Mapping[str, object]) -> float:
        value = covariates.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise ConfigError(f"{self.name}: covariate {key!r} = {value!r}; expected a number "
                              f"(the nomogram reads it)")
        return float(value)

    def _covariates_at(self, t_s: float) -> dict:
        now = dict(self.covariates)
        for t, change in self._changes:
            if t <= t_s + 1e-6:
                now.update(change)
        return now

    def _band_interval(self, covariates: Mapping[str, object]) -> float | None:
        value = self._number(self.band_covariate, covariates)
        for band in self.bands:
            if value >= band.at_least:
                return band.interval_s
        return None

    def dose_at(self, start_s: float) -> tuple[float, str]:
        now = self._covariates_at(start_s)
        weight = self._number(self.weight_covariate, now)
        if not self.doses:
            return self.loading_per_kg * weight, \
                f"loading {self.loading_per_kg:g}/kg x {weight:g} kg"
        interval = self._band_interval(now)
        band = f"{self.band_covariate} {self._number(self.band_covariate, now):g}"
        if interval is None:
            self.interval_s = _CONSULT_S
            return 0.0, f"{band}: below the nomogram, no maintenance dose"
        if interval != self.interval_s:   # a new band: the nomogram's regimen again
            self.interval_s, self._maintenance = interval, None
            self._regimen_start = len(self.doses)
        self._adjust(start_s)
        if self._maintenance is not None:
            return self._maintenance, f"adjusted to trough; q{interval / 3600:g}h ({band})"
        return self.maintenance_per_kg * weight, \
            f"{self.maintenance_per_kg:g}/kg x {weight:g} kg q{interval / 3600:g}h ({band})"

    def _adjust(self, start_s: float) -> None:
        """Look at the levels back since the last dose: a steady-state trough outside its
        range sets the maintenance dose from now on."""
        if self.trough_target is None:
            self._troughs.clear()
            return
        starts = [d[0] for d in self.doses]
        for level in sorted(self._troughs, key=lambda r: r.t_meas_s):
            given_before = sum(1 for k, s in enumerate(starts)
                               if s <= level.t_meas_s and k >= self._regimen_start)
            next_dose = min((s for s in starts + [start_s] if s > level.t_meas_s),
                            default=math.inf)
            is_trough = next_dose - level.t_meas_s <= self.trough_before_s
            if not (is_trough and given_before >= self.steady_state_doses):
                continue
            if self.trough_low <= level.value <= self.trough_high:
                continue
            old = self.doses[-1][1]
            new = old * self.trough_target / max(level.value, 1e-9)
            self._maintenance = new
            self._regimen_start = len(self.doses)   # its troughs count after 3 new doses
            self.adjustments.append((start_s, level.value, old, new))
        self._troughs.clear()
