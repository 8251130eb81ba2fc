"""A virtual patient's own insulin-pump settings, derived from its model the way a clinician
titrates them: the basal that holds a target overnight, the carbohydrate ratio from a meal
test, the correction factor from the total daily dose.

In-silico artificial-pancreas trials give every controller the patient's settings (the UVA/
Padova simulator ships each virtual patient's carbohydrate ratio and correction factor); here
they are derived from the patient's parameters by one procedure for every glucose model:

* **basal**: the model's steady-state rate at the target (each library entry's own closed
  form, ``LibraryEntry.basal_insulin``), by the hour, ahead of the model's rhythm of glucose
  production by the time insulin takes to act;
* **carbohydrate ratio**: a *meal test* as in clinical titration (Walsh & Roberts 2006,
  ch. 11: glucose back within range of its pre-meal value 4-5 h after a measured meal with
  its bolus): from steady state at the target on the basal, a meal of
  :data:`TEST_MEAL_G` with a bolus *B* at the meal; *B* is the bolus that brings glucose back
  to the target :data:`TEST_HOURS` after the meal, lowered if needed so the nadir stays at
  or above :data:`TEST_NADIR_MMOL_L` for :data:`TEST_WATCH_HOURS`; the ratio is meal / B;
* **correction factor**: the 1800 rule (Walsh 2006): 1800/TDD mg/dL per U, the total daily
  dose being the day's basal plus the insulin for :data:`DAILY_CARBS_G` of carbohydrate.

This module knows model/ only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from ..errors import ModelError
from ..units import GLUCOSE, convert_substance
from .dosing import Dose
from .library.base import LibraryEntry, LibraryModel
from .simulation import simulate
from .spec import Model

__all__ = ["TherapySettings", "profile_rate", "patient_therapy", "titrated_therapy", "meal_test_carb_ratio", "meal_test_excess", "at_clock", "BASAL_LEAD_H", "TEST_MEAL_G", "TEST_HOURS",
           "TEST_NADIR_MMOL_L", "TEST_WATCH_HOURS", "DAILY_CARBS_G", "CORRECTION_RULE_MG_DL"]

WALSH_2006 = ("Walsh J, Roberts R. Pumping Insulin, 4th ed. San Diego: Torrey Pines Press, "
              "2006 (basal testing, carbohydrate-ratio meal tests, the 1800 rule)")

#: a basal profile leads the rhythm it covers by the time insulin takes to act (s.c.
#: absorption peaks about 55 min after a dose, its action on glucose output some 30 min
#: later): pump wearers raise the basal 1-2 h before the dawn rise (Walsh 2006)
BASAL_LEAD_H = 1.5
#: [g] the test meal (Walsh 2006 asks for a meal of known carbohydrate, typically 50-80 g)
TEST_MEAL_G = 50.0
#: [h] glucose is back at the target this long after the test meal (Walsh 2006: 4-5 h)
TEST_HOURS = 5.0
#: [mmol/L] the test's bolus never takes glucose below this (70 mg/dL + 2 mg/dL) ...
TEST_NADIR_MMOL_L = 4.0
#: [h] ... within this long after the meal (a slow absorber's bolus acts for 6-8 h)
TEST_WATCH_HOURS = 8.0
#: [g/day] the diet the total daily dose counts (a typical adult's 180-200 g)
DAILY_CARBS_G = 180.0
#: the 1800 rule: correction factor = 1800 / TDD [mg/dL per U] (Walsh 2006)
CORRECTION_RULE_MG_DL = 1800.0


def profile_rate(rows: Iterable[tuple[float, float]], clock_h: float) -> float:
    """The value of a daily profile of ``(clock hour, value)`` rows sorted by hour (each from
    its hour until the next, the first at 0 h) at *clock_h* [h, any day]: a basal profile,
    a reference that follows the clock."""
    clock = clock_h % 24.0
    rows = tuple(rows)
    rate = rows[0][1]
    for hour, value in rows:
        if clock + 1e-9 >= hour:
            rate = value
    return rate


@dataclass(frozen=True)
class TherapySettings:
    """A patient's own insulin-pump settings (amounts in U, glucose in mmol/L)."""

    #: (clock hour, rate [U/h]) rows, each from its hour until the next; the first at 0 h
    basal_U_per_h: tuple[tuple[float, float], ...]
    #: [g/U] grams of carbohydrate one unit covers
    carb_ratio_g_per_U: float
    #: [mmol/L per U] glucose one unit lowers
    correction_mmol_per_L_per_U: float
    #: [U/day] the total daily dose the correction factor was derived from
    total_daily_dose_U: float
    #: how the numbers were derived
    basis: str

    def basal_at(self, clock_h: float) -> float:
        """The profile's rate [U/h] at *clock_h* (hours after midnight)."""
        return profile_rate(self.basal_U_per_h, clock_h)


def at_clock(entries: Sequence[LibraryEntry], params: Mapping[str, float],
             clock_h: float | None) -> dict[str, float]:
    """*params* as they are at *clock_h* [h after midnight]: every circadian parameter of
    *entries* at its cosinor's value there, the rhythm then switched off (amplitudes 0);
    with *clock_h* None, the mesors (the rhythm off)."""
    out = dict(params)
    for entry in entries:
        for cosinor in entry.circadian:
            factor = 1.0
            for k in range(1, cosinor.harmonics + 1):
                amplitude = out.get(f"{cosinor.param}_amplitude_{k}", 0.0)
                phase = out.get(f"{cosinor.param}_acrophase_{k}", 0.0)
                if clock_h is not None:
                    factor += amplitude * math.cos(2 * math.pi * k * (clock_h - phase)
                                                   / cosinor.period_h)
                if f"{cosinor.param}_amplitude_{k}" in out:
                    out[f"{cosinor.param}_amplitude_{k}"] = 0.0
            out[cosinor.param] = params[cosinor.param] * factor
    return out


def patient_therapy(library_model: LibraryModel, params: Mapping[str, float],
                    target_mmol_per_L: float) -> TherapySettings:
    """The pump settings of one patient of *library_model* (an insulin model: an entry with
    ``basal_insulin``) at *target_mmol_per_L*: :func:`titrated_therapy` with the entry's
    steady-state basal and the model's circadian rhythm.

    Raises
    ------
    ModelError
        When the model has no insulin entry, or the titration fails for this patient.
    """
    entries = [e for e in library_model.entries if e.basal_insulin is not None]
    if not entries:
        raise ModelError(f"model {library_model.name!r} has no steady-state basal insulin "
                         f"(not an insulin model): no pump settings can be derived")
    return titrated_therapy(library_model.model, params, target_mmol_per_L,
                            basal_U_per_h=entries[0].basal_insulin,
                            rhythm=lambda p, h: at_clock(library_model.entries, p, h))


def titrated_therapy(model: Model, params: Mapping[str, float], target_mmol_per_L: float, *,
                     basal_U_per_h: Callable[[Mapping[str, float], float], float],
                     rhythm: Callable[[Mapping[str, float], float], Mapping[str, float]],
                     insulin: str = "insulin", carbohydrate: str = "carbohydrate",
                     glucose: str = "glucose") -> TherapySettings:
    """The pump settings of one patient (*params*, declared units) at *target_mmol_per_L*.

    *basal_U_per_h(params, target)* is the model's steady-state basal rate [U/h];
    *rhythm(params, clock_h)* returns the parameters as they are at that clock hour (its
    circadian ones applied, the rhythm itself switched off) and *params* with the rhythm
    off when *clock_h* is None. The insulin input's amount unit must be U, the
    carbohydrate's g, the glucose output's mmol/L (the library's glucose models).

    Raises
    ------
    ModelError
        When no basal holds the target at some hour, or no bolus brings the test meal back.
    """
    for name, unit, kind in ((insulin, "U", "input"), (carbohydrate, "g", "input")):
        if model.inputs[model.input_index(name)].amount_unit != unit:
            raise ModelError(f"titrated_therapy: {kind} {name!r} must be in {unit}")
    if model.outputs[model.output_index(glucose)].unit != "mmol/L":
        raise ModelError(f"titrated_therapy: output {glucose!r} must be in mmol/L")
    rows = tuple((float(h), basal_U_per_h(rhythm(params, h + BASAL_LEAD_H), target_mmol_per_L))
                 for h in range(24))
    flat = dict(rhythm(params, None))
    carb_ratio = meal_test_carb_ratio(model, flat, basal_U_per_h(flat, target_mmol_per_L),
                                      target_mmol_per_L, insulin=insulin,
                                      carbohydrate=carbohydrate, glucose=glucose)
    total = sum(rate for _, rate in rows) + DAILY_CARBS_G / carb_ratio
    correction = convert_substance(CORRECTION_RULE_MG_DL / total, "mg/dL", "mmol/L", GLUCOSE)
    if not (math.isfinite(carb_ratio) and math.isfinite(correction)):
        raise ModelError(f"titrated_therapy: non-finite settings (CR {carb_ratio!r}, "
                         f"CF {correction!r})")
    return TherapySettings(
        basal_U_per_h=rows, carb_ratio_g_per_U=carb_ratio,
        correction_mmol_per_L_per_U=correction, total_daily_dose_U=total,
        basis=f"basal: steady state at {target_mmol_per_L:g} mmol/L by the hour, "
              f"{BASAL_LEAD_H:g} h ahead of the rhythm; CR: a {TEST_MEAL_G:g}-g meal test, "
              f"glucose back at the target {TEST_HOURS:g} h later (nadir >= "
              f"{TEST_NADIR_MMOL_L:g} mmol/L for {TEST_WATCH_HOURS:g} h); CF: 1800/TDD with TDD = basal + "
              f"{DAILY_CARBS_G:g} g/CR (Walsh 2006)")


#: [s] the meal test's glucose is read every 5 min (a CGM's period)
_TEST_STEP_S = 300.0


def _meal_test(model: Model, params: Mapping[str, float], basal_U_per_h: float, *,
               insulin: str, carbohydrate: str,
               glucose: str) -> Callable[[float], np.ndarray]:
    """The meal test's glucose [mmol/L] every 5 min for :data:`TEST_WATCH_HOURS`, as a
    function of the bolus [U] given with the meal, from steady state on the basal."""
    p = model.parameter_vector(params)
    step_s = _TEST_STEP_S
    times = np.arange(0.0, TEST_WATCH_HOURS * 3600.0 + step_s / 2, step_s)
    base = [Dose.infusion(0.0, insulin, basal_U_per_h / 3600.0,
                          TEST_WATCH_HOURS * 3600.0 + step_s),
            Dose.bolus(0.0, carbohydrate, TEST_MEAL_G)]

    def after(bolus_U: float) -> np.ndarray:
        doses = base + ([Dose.bolus(0.0, insulin, bolus_U)] if bolus_U > 0 else [])
        return simulate(model, p, doses, times).output(glucose)

    return after


def _misses(glucose: np.ndarray, target_mmol_per_L: float) -> tuple[float, float]:
    """(glucose :data:`TEST_HOURS` after the meal - target, nadir - :data:`TEST_NADIR_MMOL_L`)
    [mmol/L] of one meal test's 5-min *glucose*."""
    at_test = int(round(TEST_HOURS * 3600.0 / _TEST_STEP_S))
    return (float(glucose[at_test]) - target_mmol_per_L,
            float(glucose.min()) - TEST_NADIR_MMOL_L)


def meal_test_excess(model: Model, params: Mapping[str, float], basal_U_per_h: float,
                     target_mmol_per_L: float, bolus_U: float, *, insulin: str = "insulin",
                     carbohydrate: str = "carbohydrate", glucose: str = "glucose") -> float:
    """How far *bolus_U* falls short of the meal test's bolus, in glucose [mmol/L]: the
    smaller of (glucose :data:`TEST_HOURS` after the meal - target) and (nadir -
    :data:`TEST_NADIR_MMOL_L`) with that bolus. Both fall as the bolus grows, so it is > 0
    when the test's bolus is larger than *bolus_U* (the carb ratio smaller than
    ``TEST_MEAL_G / bolus_U``), < 0 when smaller, 0 when *bolus_U* is the test's bolus: one
    simulation where :func:`meal_test_carb_ratio` takes a dozen."""
    after = _meal_test(model, params, basal_U_per_h, insulin=insulin,
                       carbohydrate=carbohydrate, glucose=glucose)
    return min(_misses(after(bolus_U), target_mmol_per_L))


def meal_test_carb_ratio(model: Model, params: Mapping[str, float], basal_U_per_h: float,
                         target_mmol_per_L: float, *, insulin: str = "insulin",
                         carbohydrate: str = "carbohydrate",
                         glucose: str = "glucose") -> float:
    """The carbohydrate ratio [g/U] of the meal test (module docstring) on *model* with
    *params* (declared units, the rhythm off), from steady state on *basal_U_per_h*: the
    :data:`TEST_MEAL_G` meal over the bolus that brings glucose back to *target_mmol_per_L*
    :data:`TEST_HOURS` later, nadir kept at or above :data:`TEST_NADIR_MMOL_L`.

    Raises
    ------
    ModelError
        When no bolus up to 1000 U brings the meal back, or the meal needs none.
    """
    after = _meal_test(model, params, basal_U_per_h, insulin=insulin,
                       carbohydrate=carbohydrate, glucose=glucose)

    def miss(bolus_U: float) -> float:
        return _misses(after(bolus_U), target_mmol_per_L)[0]

    def nadir(bolus_U: float) -> float:
        return _misses(after(bolus_U), target_mmol_per_L)[1]

    high = 1.0
    while miss(high) > 0:
        high *= 2.0
        if high > 1e3:
            raise ModelError(f"titrated_therapy: no bolus up to 1000 U brings a "
                             f"{TEST_MEAL_G:g}-g meal back to {target_mmol_per_L:g} mmol/L")
    bolus = brentq(miss, 0.0, high, xtol=1e-4) if miss(0.0) > 0 else 0.0
    if bolus > 0 and nadir(bolus) < 0:
        bolus = brentq(nadir, 0.0, bolus, xtol=1e-4) if nadir(0.0) > 0 else 0.0
    if not bolus > 0:
        raise ModelError(f"titrated_therapy: a {TEST_MEAL_G:g}-g meal needs no bolus in this "
                         f"patient (glucose back at {target_mmol_per_L:g} mmol/L without one)")
    return TEST_MEAL_G / bolus
