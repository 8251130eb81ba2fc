"""A rule-based temporary-basal algorithm of the OpenAPS kind (issue 18's baseline), written
from the OpenAPS documentation, not from its code: "Understanding the determine-basal logic"
and "Understanding your preferences and safety settings" (openaps.readthedocs.io, the
openaps/docs repository, docs/docs/While You Wait For Gear/).

Every control period (5 min), from the latest CGM reading, the pump's delivery history and
the patient's own settings (basal profile, ISF = the correction factor, carb ratio), all in
mg/dL, U and U/h:

* ``delta`` = the change of glucose over the last 5 min (the reading 2.5-7.5 min before the
  latest; 0 without one);
* ``IOB`` and insulin ``activity``: net of the scheduled basal (the documentation's net IOB:
  negative while low-temping), from every rate the pump delivered, cut into 5-min
  pseudo-boluses (:class:`~mpc_dose.control.insulin.DeliveryHistory`) on the exponential
  insulin curve;
* ``BGI = -activity x ISF`` over 5 min: how glucose "should" move from insulin alone;
  ``deviation = delta - BGI``;
* ``naive_eventualBG = BG - IOB x ISF``; ``eventualBG = naive_eventualBG + 30 min of the
  deviation`` (the documented projection: the current deviation for 30 min, i.e. falling
  linearly to zero over 60 min); announced carbohydrate not yet absorbed adds
  ``COB x CSF`` (the "basic diabetes math": carbs raise glucose by CSF = ISF / CR per g);
* predictions every 5 min for 4 h: ``IOBpredBGs`` (insulin activity to come, the deviation
  falling linearly to zero over 60 min) and, with carbs on board, ``COBpredBGs`` (the carbs'
  impact in place of the deviation); ``minPredBG`` = the lowest from 90 min on (with carbs
  on board, the two blended by the fraction of the carbs left); ``minGuardBG`` = the lowest
  of the prediction in use from now on;
* rules: glucose or ``minGuardBG`` below the threshold (the documented safety threshold
  ``min_bg - 0.5 (min_bg - 40)`` mg/dL, or the low glucose suspend threshold given) ->
  temp 0 (suspend); otherwise ``insulinReq = (min(eventualBG, minPredBG) - target) / ISF``
  and the temp ``basal + insulinReq / duration`` (30 min): a low temp (never below 0) when
  negative, a high temp when positive, capped by ``max_iob`` (the loop's own net basal
  insulin on board never beyond it: the documented definition, meal boluses not counted)
  and by the documented maxSafeBasal = min(max basal of the pump,
  max_daily_safety_multiplier (3) x the highest scheduled basal,
  current_basal_safety_multiplier (4) x the current scheduled basal).

Announced meals are bolused by the patient's carb ratio (the hybrid mode AndroidAPS users
run), by the same :class:`~mpc_dose.control.insulin.MealBoluses` as the open-loop
basal-bolus therapy; the loop's net basal insulin on board counts against the correction.

Simplified or left out (said here so no one mistakes this for oref0): no autosens/autotune,
no super-micro-boluses, no unannounced-meal (UAM) or zero-temp predictions, no
``adv_target_adjustments``; carbs absorb linearly over 3 h (the documentation's starting
estimate for meals up to 60 g) instead of its /\\-shaped observed absorption; one target
(``min_bg = max_bg``). The temp's 30-min duration is the documented one; the decision
renews it every period, and the pump's lease (``controller.lease_periods``) is what ends
it when the loop goes quiet.

This module knows nothing of simpy, sockets or files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from .base import Decision, Reading
from .insulin import (DeliveryHistory, GlucoseHistory, InsulinCurve, MealBoluses,
                      profile_rate)

__all__ = ["OpenAPSController", "eventual_bg", "max_safe_basal", "safety_threshold",
           "MAX_DAILY_SAFETY_MULTIPLIER", "CURRENT_BASAL_SAFETY_MULTIPLIER",
           "MAX_IOB_BASAL_HOURS", "TEMP_DURATION_S"]

OPENAPS_DOCS = ("OpenAPS documentation, openaps.readthedocs.io: 'Understanding the "
                "determine-basal logic' and 'Understanding your preferences and safety "
                "settings'")

#: a temp never above this x the highest scheduled basal (preferences: default 3)
MAX_DAILY_SAFETY_MULTIPLIER = 3.0
#: ... nor above this x the current scheduled basal (preferences: default 4)
CURRENT_BASAL_SAFETY_MULTIPLIER = 4.0
#: [h] max_iob when not given: this many hours of the highest scheduled basal (preferences:
#: "a good rule of thumb is for max_iob to be no more than 3 times your highest basal rate")
MAX_IOB_BASAL_HOURS = 3.0
#: [s] a temporary basal runs 30 min (determine-basal sets 30-min temps)
TEMP_DURATION_S = 30 * 60.0
#: [s] the current deviation is projected this long into eventualBG ...
DEVIATION_PROJECTION_S = 30 * 60.0
#: [s] ... and falls linearly to zero over this long in the predictions
DEVIATION_DECAY_S = 60 * 60.0
#: [s] predictions every 5 min over 4 h
PREDICTION_STEP_S, PREDICTION_HORIZON_S = 300.0, 4 * 3600.0
#: [s] minPredBG is the lowest prediction from this far ahead on
MIN_PRED_FROM_S = 90 * 60.0
#: [s] announced carbohydrate absorbs (linearly) over this long (the documented first
#: estimate for meals up to 60 g)
CARB_ABSORPTION_S = 3 * 3600.0
#: [mg/dL] the safety threshold's floor: min_bg - 0.5 (min_bg - 40)
SAFETY_THRESHOLD_FLOOR_MG_DL = 40.0
#: [s] delta reads the reading 2.5-7.5 min before the latest
DELTA_WINDOW_S = (150.0, 450.0)


def eventual_bg(bg: float, iob: float, isf: float, delta: float, bgi: float,
                projection_s: float = DEVIATION_PROJECTION_S, step_s: float = 300.0
                ) -> tuple[float, float, float]:
    """``(naive_eventualBG, deviation, eventualBG)`` [mg/dL] from glucose *bg* [mg/dL],
    net insulin on board *iob* [U], *isf* [mg/dL per U], *delta* and *bgi* [mg/dL per
    *step_s*]: ``naive = bg - iob isf``, ``deviation = (projection_s / step_s) (delta -
    bgi)``, ``eventual = naive + deviation``."""
    naive = bg - iob * isf
    deviation = projection_s / step_s * (delta - bgi)
    return naive, deviation, naive + deviation


def safety_threshold(target_mg_dl: float) -> float:
    """The documented safety threshold [mg/dL]: ``min_bg - 0.5 (min_bg - 40)``."""
    return target_mg_dl - 0.5 * (target_mg_dl - SAFETY_THRESHOLD_FLOOR_MG_DL)


def max_safe_basal(current_U_per_h: float, highest_U_per_h: float,
                   pump_max_U_per_h: float = math.inf,
                   max_daily_safety_multiplier: float = MAX_DAILY_SAFETY_MULTIPLIER,
                   current_basal_safety_multiplier: float = CURRENT_BASAL_SAFETY_MULTIPLIER
                   ) -> float:
    """The documented ceiling of a temp [U/h]: the lowest of the pump's max basal, the
    daily multiplier x the highest scheduled basal and the current multiplier x the current
    scheduled basal."""
    return min(pump_max_U_per_h, max_daily_safety_multiplier * highest_U_per_h,
               current_basal_safety_multiplier * current_U_per_h)


class OpenAPSController:
    """The temp-basal rules above for one insulin input.

    *basal_profile_U_per_h*: ``(clock hour, U/h)`` rows (the first at 0 h);
    *isf_mg_dl_per_U*, *target_mg_dl*; *max_iob_U* (default
    :data:`MAX_IOB_BASAL_HOURS` x the highest scheduled basal); *pump_max_basal_U_per_h*;
    *suspend_below_mg_dl* (default :func:`safety_threshold`); *meals*: the meal boluses
    (calculator in mg/dL and U) or None (no announcements); *carb_ratio_g_per_U* for the
    carbs' impact (the calculator's when meals are given). Rates out in the input's amount
    unit per second: *amount_per_U* of it per U. Readings of *glucose_var* in any glucose
    unit.
    """

    def __init__(self, *, input: str, glucose_var: str,
                 basal_profile_U_per_h: Sequence[tuple[float, float]], isf_mg_dl_per_U: float,
                 target_mg_dl: float, period_s: float = 300.0, clock_at_t0_h: float = 0.0,
                 curve: InsulinCurve = InsulinCurve(), max_iob_U: float | None = None,
                 pump_max_basal_U_per_h: float = math.inf,
                 max_daily_safety_multiplier: float = MAX_DAILY_SAFETY_MULTIPLIER,
                 current_basal_safety_multiplier: float = CURRENT_BASAL_SAFETY_MULTIPLIER,
                 suspend_below_mg_dl: float | None = None, meals: MealBoluses | None = None,
                 carb_ratio_g_per_U: float | None = None, amount_per_U: float = 1.0,
                 temp_duration_s: float = TEMP_DURATION_S, name: str = "openaps") -> None:
        rows = sorted((float(h), float(r)) for h, r in basal_profile_U_per_h)
        if not rows or rows[0][0] != 0.0 or any(not 0 <= h < 24 for h, _ in rows) or \
                any(not (math.isfinite(r) and r > 0) for _, r in rows):
            raise ConfigError(f"{name}: basal_profile_U_per_h must start at 0 h with clock "
                              f"hours in [0, 24) and rates > 0 U/h (a zero basal leaves "
                              f"nothing to low-temp), got {basal_profile_U_per_h!r}")
        for field, value in (("isf_mg_dl_per_U", isf_mg_dl_per_U),
                             ("target_mg_dl", target_mg_dl), ("period_s", period_s),
                             ("amount_per_U", amount_per_U),
                             ("temp_duration_s", temp_duration_s),
                             ("max_daily_safety_multiplier", max_daily_safety_multiplier),
                             ("current_basal_safety_multiplier",
                              current_basal_safety_multiplier),
                             ("pump_max_basal_U_per_h", pump_max_basal_U_per_h)):
            if not (isinstance(value, (int, float)) and value > 0 and not math.isnan(value)):
                raise ConfigError(f"{name}: {field} = {value!r}; expected a number > 0")
        highest = max(r for _, r in rows)
        self.max_iob_U = MAX_IOB_BASAL_HOURS * highest if max_iob_U is None \
            else float(max_iob_U)
        if not (math.isfinite(self.max_iob_U) and self.max_iob_U >= 0):
            raise ConfigError(f"{name}: max_iob_U = {max_iob_U!r}; expected a number >= 0 "
                              f"(0: low-glucose suspend and low temps only)")
        self.suspend_below_mg_dl = safety_threshold(target_mg_dl) \
            if suspend_below_mg_dl is None else float(suspend_below_mg_dl)
        if not self.suspend_below_mg_dl < target_mg_dl:
            raise ConfigError(f"{name}: suspend_below = {self.suspend_below_mg_dl:g} mg/dL; "
                              f"expected below the target ({target_mg_dl:g} mg/dL)")
        self.name, self.period_s, self.inputs = name, float(period_s), (input,)
        self.input, self.glucose_var = input, glucose_var
        self.basal_profile_U_per_h = tuple(rows)
        self.highest_basal_U_per_h = highest
        self.isf, self.target = float(isf_mg_dl_per_U), float(target_mg_dl)
        self.clock_at_t0_h, self.curve = float(clock_at_t0_h), curve
        self.pump_max_basal_U_per_h = float(pump_max_basal_U_per_h)
        self.max_daily_safety_multiplier = float(max_daily_safety_multiplier)
        self.current_basal_safety_multiplier = float(current_basal_safety_multiplier)
        self.meals = meals
        ratio = carb_ratio_g_per_U if carb_ratio_g_per_U is not None else \
            (meals.calculator.carb_ratio if meals is not None else None)
        #: [mg/dL per g] carb sensitivity factor ISF / CR (None without a carb ratio)
        self.csf = self.isf / ratio if ratio else None
        self.amount_per_U, self.temp_duration_s = float(amount_per_U), float(temp_duration_s)
        self.delivery = DeliveryHistory(curve, step_s=300.0)
        self._history = GlucoseHistory(glucose_var, 3600.0, name)   # (t_meas [s], mg/dL)
        self._carbs: list[tuple[float, float]] = []          # (announced at [s], g)
        self._to_mg_dl: dict[str, float] = {}
        #: every decision's figures (for tests and records): dicts of the details
        self.log: list[dict[str, float | str]] = []

    # ------------------------------------------------------------------ in
    def basal_at(self, t_s: float) -> float:
        """The scheduled basal [U/h] at model time *t_s*."""
        return profile_rate(self.basal_profile_U_per_h, self.clock_at_t0_h + t_s / 3600.0)

    def _scheduled_U_per_s(self, t_s: float) -> float:
        return self.basal_at(t_s) / 3600.0

    def observe(self, reading: Reading) -> None:
        if self.meals is not None and self.meals.observe(reading):
            if reading.quality == "valid" and math.isfinite(reading.value) and \
                    reading.value > 0:
                self._carbs.append((reading.t_meas_s, reading.value))
            return
        self._history.add(reading)

    def applied(self, t_s: float, rates: Mapping[str, float]) -> None:
        """What the pump delivers from *t_s* on (after the supervisor): the IOB's history."""
        self.delivery.record(t_s, rates.get(self.input, 0.0) / self.amount_per_U)

    # ------------------------------------------------------------------ figures
    def _delta(self) -> float:
        """[mg/dL per 5 min] latest minus the reading 2.5-7.5 min before (mean of those)."""
        t_last, bg = self._history[-1]
        before = [g for t, g in self._history
                  if DELTA_WINDOW_S[0] <= t_last - t <= DELTA_WINDOW_S[1]]
        return bg - sum(before) / len(before) if before else 0.0

    def carbs_on_board(self, t_s: float) -> tuple[float, float]:
        """(carbs still to absorb [g], of the carbs announced within the absorption time)."""
        left = total = 0.0
        for t, grams in self._carbs:
            age = t_s - t
            if 0 <= age < CARB_ABSORPTION_S:
                total += grams
                left += grams * (1 - age / CARB_ABSORPTION_S)
        return left, total

    def _carb_impact(self, t_s: float, steps: np.ndarray) -> np.ndarray:
        """[mg/dL] the carbs' glucose rise in each 5-min step ahead (linear absorption)."""
        out = np.zeros(len(steps))
        for t, grams in self._carbs:
            start = steps - PREDICTION_STEP_S + t_s - t      # age at each step's start
            a = np.clip(start, 0.0, CARB_ABSORPTION_S)
            b = np.clip(start + PREDICTION_STEP_S, 0.0, CARB_ABSORPTION_S)
            out += self.csf * grams * (b - a) / CARB_ABSORPTION_S
        return out

    # ------------------------------------------------------------------ decide
    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        self._carbs = [(t, g) for t, g in self._carbs if t_s - t < CARB_ABSORPTION_S]
        basal = self.basal_at(t_s)
        latest = readings.get(self.glucose_var)
        glucose = self._history[-1][1] if self._history else None
        bolus_reason = None
        net_doses = self.delivery.doses(t_s, self._scheduled_U_per_s)
        iob = self.curve.on_board(net_doses, t_s)
        bolus_iob = self.meals.on_board(t_s) if self.meals is not None else 0.0
        basal_iob = iob - bolus_iob
        if self.meals is not None:
            bolus_reason = self.meals.give_due(t_s, glucose if latest is not None else None,
                                               extra_on_board=basal_iob)
        bolus_rate = self.meals.rate_at(t_s) if self.meals is not None else 0.0
        if latest is None or not self._history:
            rates = {self.input: (basal + bolus_rate * 3600.0) * self.amount_per_U / 3600.0}
            return Decision(t_s, rates, "no usable glucose: the scheduled basal",
                            status="no_measurement", backup=rates)
        figures = self._figures(t_s, glucose, net_doses, iob, basal_iob)
        rate_U_per_h, reason = self._temp(basal, figures)
        figures.update(temp_U_per_h=rate_U_per_h, scheduled_U_per_h=basal)
        self.log.append({"t_s": t_s, **figures})
        if bolus_reason:
            reason = f"{reason}; {bolus_reason}"
        total_U_per_s = rate_U_per_h / 3600.0 + bolus_rate
        return Decision(t_s, {self.input: total_U_per_s * self.amount_per_U}, reason,
                        details={k: v for k, v in figures.items()})

    def _figures(self, t_s: float, bg: float, net_doses, iob: float, basal_iob: float
                 ) -> dict[str, float]:
        step = PREDICTION_STEP_S
        times = np.array([t for t, _ in net_doses])
        amounts = np.array([a for _, a in net_doses])
        activity = float(amounts @ self.curve.activity_array(t_s - times)) \
            if len(times) else 0.0
        bgi = -activity * step * self.isf                 # mg/dL per 5 min
        delta = self._delta()
        naive, deviation, eventual = eventual_bg(bg, iob, self.isf, delta, bgi)
        cob, carbs_total = self.carbs_on_board(t_s) if self.csf else (0.0, 0.0)
        eventual_with_carbs = eventual + cob * (self.csf or 0.0)
        # predictions: insulin to come (the schedule continuing) and the deviation decaying
        steps = np.arange(1, int(PREDICTION_HORIZON_S / step) + 1) * step
        if len(times):
            acting = self.curve.activity_array(t_s + steps[:, None] - times[None, :]) @ amounts
        else:
            acting = np.zeros(len(steps))
        pred_bgi = -acting * step * self.isf
        decay = np.clip(1 - steps / DEVIATION_DECAY_S, 0.0, None)
        iob_pred = bg + np.cumsum(pred_bgi + (delta - bgi) * decay)
        later = steps >= MIN_PRED_FROM_S
        min_iob_pred = float(iob_pred[later].min())
        out = dict(bg=bg, delta=delta, iob=iob, basal_iob=basal_iob, activity=activity,
                   bgi=bgi, deviation=deviation, naive_eventual_bg=naive,
                   eventual_bg=eventual_with_carbs, cob=cob)
        if cob > 0:
            cob_pred = bg + np.cumsum(pred_bgi + self._carb_impact(t_s, steps))
            fraction_left = cob / carbs_total if carbs_total > 0 else 0.0
            min_pred = fraction_left * float(cob_pred[later].min()) + \
                (1 - fraction_left) * min_iob_pred
            min_guard = float(min(bg, cob_pred.min()))
        else:
            min_pred = min_iob_pred
            min_guard = float(min(bg, iob_pred.min()))
        out.update(min_pred_bg=min_pred, min_guard_bg=min_guard)
        return out

    def _temp(self, basal: float, f: Mapping[str, float]) -> tuple[float, str]:
        """The temp [U/h] and why, from the figures."""
        head = (f"BG {f['bg']:.0f}, delta {f['delta']:+.1f}, IOB {f['iob']:.2f} U, BGI "
                f"{f['bgi']:+.1f}, dev {f['deviation']:+.0f}, eventualBG "
                f"{f['eventual_bg']:.0f}, minPredBG {f['min_pred_bg']:.0f}, minGuardBG "
                f"{f['min_guard_bg']:.0f}")
        threshold = self.suspend_below_mg_dl
        if f["bg"] < threshold or f["min_guard_bg"] < threshold:
            return 0.0, (f"{head}: below the threshold {threshold:.0f}: temp 0 for "
                         f"{self.temp_duration_s / 60:.0f} min (suspend)")
        duration_h = self.temp_duration_s / 3600.0
        insulin_req = (min(f["eventual_bg"], f["min_pred_bg"]) - self.target) / self.isf
        if insulin_req <= 0:
            rate = max(basal + insulin_req / duration_h, 0.0)
            return rate, (f"{head}: below target {self.target:.0f}: insulinReq "
                          f"{insulin_req:.2f} U, temp {rate:.2f} U/h")
        room = self.max_iob_U - f["basal_iob"]
        if room <= 0:
            return basal, (f"{head}: basal IOB {f['basal_iob']:.2f} > max_iob "
                           f"{self.max_iob_U:.2f}: the scheduled basal {basal:.2f} U/h")
        capped_req = min(insulin_req, room)
        rate = basal + capped_req / duration_h
        ceiling = max_safe_basal(basal, self.highest_basal_U_per_h,
                                 self.pump_max_basal_U_per_h,
                                 self.max_daily_safety_multiplier,
                                 self.current_basal_safety_multiplier)
        reason = f"{head}: insulinReq {insulin_req:.2f} U"
        if capped_req < insulin_req:
            reason += f" (max_iob leaves {room:.2f})"
        if rate > ceiling:
            reason += f", adj. req. rate {rate:.2f} to maxSafeBasal {ceiling:.2f}"
            rate = ceiling
        return rate, f"{reason}, temp {rate:.2f} U/h"
