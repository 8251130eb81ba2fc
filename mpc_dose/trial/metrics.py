"""Clinical metrics of one run.

Which signal a metric reads is part of its name, just before its unit (or last when it has
none):

* ``true``: the patient's true output at every record step (the series' ``true_`` column,
  no noise, no sampling): what the patient went through. Time in / below / above the window
  (each record counts for its record step), IAE, lowest and highest value, AUC.
* ``measured``: the sensor's readings of the output, each valid reading at its sample time
  (``LoopResult.samples_frame()``; readings of quality other than "valid", and missing
  readings, are left out): what the controller saw. The IEC 60601-1-10 performance terms
  (response and settling time, overshoot, steady-state deviation, tracking error) and the
  lowest and highest reading; when readings are dense, also time in / below / above the
  window and IAE, each reading standing for the time until the next one.

Readings are *sparse* when the output's sensors together read it less often than the series
is recorded: the sum over its sensors of 1 / interval (``period_s``, or 24 h over the number
of daily clock times) times ``record_step_s`` is below 1 (a sensor period longer than the
record step). Time-weighted terms of sparse readings would weigh each level by the hours it
was held, so they are replaced by shares of readings (``readings_in_window_measured_pct``).

Output-valued metrics name the output and carry its unit (``max_vancomycin_cp_true_mg_per_L``,
``iae_bis_measured_s``; a unitless output such as BIS has no unit token, IAE is in output
unit x s, AUC in output unit x h).

The clinical sets keep their published names and have a fixed basis:

* ``tiva`` follows DESIGN and the published tables of Aubouin-Pairault, Fiacchini & Dang
  (2024), computed on the measured (noisy) BIS of every second (the last reading at each
  1-s record):

  - induction (0-599 s): IAE (trapezoid of |BIS - 50| dt, BIS.s), sleep time (min, the time
    after the last sample with BIS >= 60), settling time (min, after the last sample
    outside [40, 60]), low-BIS time (s with BIS < 40), lowest BIS;
  - maintenance (600-1199 s): IAE, time outside [40, 60] (s), lowest and highest BIS;
  - drug totals per kg in each phase (propofol mg/kg, remifentanil ug/kg);

* ``auc`` (daily AUC24 attainment) and ``neutropenia`` (CTCAE grades) read the true output.
* ``glucose`` (:mod:`~mpc_dose.trial.glucose`): the international consensus CGM metrics
  (Battelino 2019), GMI, LBGI/HBGI and the CVGA zone, each on both signals
  (``tir_70_180_true_pct``, ``tir_70_180_measured_pct``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["tiva_metrics", "performance_metrics", "true_output_metrics",
           "readings_are_sparse", "drug_totals", "summarise", "auc_attainment",
           "neutropenia_metrics"]


def _after_last(t: np.ndarray, bad: np.ndarray) -> float:
    """Minutes after which the condition holds: the time after the last bad sample."""
    if not bad.any():
        return float(t[0]) / 60.0
    last = int(np.flatnonzero(bad)[-1])
    return float(t[last + 1]) / 60.0 if last + 1 < t.size else float("nan")


def _durations(t: np.ndarray) -> np.ndarray:
    """How long each sample stands for: until the next one, the last for the gap before it
    (1 s when it is alone)."""
    return np.diff(t, append=t[-1] + (t[-1] - t[-2] if t.size > 1 else 1.0))


def _name(term: str, output: str, basis: str, unit: str, suffix: str = "") -> str:
    """``<term>_<output>_<basis>[_<unit token>]<suffix>`` (no token for a unitless output)."""
    from ..units import unit_to_token

    token = "" if unit == "1" else f"_{unit_to_token(unit)}"
    return f"{term}_{output}_{basis}{token}{suffix}"


def _window(target: float | None, window: tuple[float, float] | None
            ) -> tuple[float, float] | None:
    """*window*, else +-5 % of *target*, else none."""
    if window is not None:
        return float(window[0]), float(window[1])
    if target is not None:
        return target - 0.05 * abs(target), target + 0.05 * abs(target)
    return None


def readings_are_sparse(intervals_s: Iterable[float], record_step_s: float) -> bool:
    """Whether sensors reading an output every *intervals_s* (one per sensor) read it less
    often than a series recorded every *record_step_s*: sum(record_step_s / interval) < 1.
    A sensor as fast as the record (BIS every second, recorded every second) is dense."""
    rate = sum(1.0 / float(i) for i in intervals_s)
    return rate * float(record_step_s) < 1.0 - 1e-9


def tiva_metrics(time_s: np.ndarray, bis: np.ndarray, propofol_mg_per_s: np.ndarray,
                 remifentanil_ug_per_s: np.ndarray, weight_kg: float, *,
                 target: float = 50.0, step_s: float = 1.0) -> dict[str, float]:
    """The TIVA benchmark metrics of one patient (see the module docstring).

    *time_s* are 1-s samples from 0; rates are those in force at each sample (the drug
    given is the sum of rate x step over the phase).
    """
    t = np.asarray(time_s, dtype=float)
    y = np.asarray(bis, dtype=float)
    prop = np.asarray(propofol_mg_per_s, dtype=float)
    remi = np.asarray(remifentanil_ug_per_s, dtype=float)
    ind = t <= 599
    main = (t > 599) & (t < 1200)
    out: dict[str, float] = {}
    ti, yi = t[ind], y[ind]
    out["induction_iae_bis_s"] = float(np.trapezoid(np.abs(yi - target), ti))
    out["induction_sleep_time_min"] = _after_last(ti, yi >= 60)
    out["induction_settling_time_min"] = _after_last(ti, (yi < 40) | (yi > 60))
    out["induction_low_bis_time_s"] = float(np.sum(yi < 40) * step_s)
    out["induction_lowest_bis"] = float(yi.min())
    out["induction_propofol_mg_per_kg"] = float(prop[ind].sum() * step_s / weight_kg)
    out["induction_remifentanil_ug_per_kg"] = float(remi[ind].sum() * step_s / weight_kg)
    if main.any():
        tm, ym = t[main], y[main]
        out["maintenance_iae_bis_s"] = float(np.trapezoid(np.abs(ym - target), tm))
        out["maintenance_time_out_of_range_s"] = float(np.sum((ym < 40) | (ym > 60)) * step_s)
        out["maintenance_lowest_bis"] = float(ym.min())
        out["maintenance_highest_bis"] = float(ym.max())
        out["maintenance_propofol_mg_per_kg"] = float(prop[main].sum() * step_s / weight_kg)
        out["maintenance_remifentanil_ug_per_kg"] = float(remi[main].sum() * step_s
                                                          / weight_kg)
    return out


def performance_metrics(time_s, measured, target: float | None,
                        window: tuple[float, float] | None = None, *, output: str,
                        unit: str = "1", sparse: bool = False) -> dict[str, float]:
    """The IEC 60601-1-10 performance terms of one run on the *measured* readings of
    *output* (in *unit*) at their sample times *time_s* (NaN values, i.e. no valid reading,
    are left out), with the definitions used here (names end in ``measured``):

    * ``response_time_measured_s``: first time the readings have covered 90 % of the way
      from the first reading to *target*;
    * ``settling_time_measured_s``: from the first reading to the reading after the last one
      outside *window* (+-5 % of *target* without a window); NaN if it ends outside;
    * ``overshoot_measured_pct``: largest excursion beyond the target, in % of the initial
      step;
    * ``steady_state_deviation_<output>_measured``: mean |target - y| over the last 20 % of
      the readings' span;
    * ``tracking_error_rms_<output>_measured``: RMS of target - y over all readings;
    * ``min_/max_<output>_measured``: the lowest and highest reading; ``valid_readings``;
    * dense readings (*sparse* False): ``time_in_window_measured_s``, ``time_below_...``,
      ``time_above_...`` (each reading counts until the next one, the last for the gap
      before it) and ``iae_<output>_measured_s`` (trapezoid of |y - target|);
    * sparse readings: ``readings_in_window_measured_pct``, ``readings_below_...``,
      ``readings_above_...``: the share of readings (no time weighting).

    Without a *target* only the window terms (settling time included) and the extremes are
    given; without *target* and *window* only the extremes. Output-valued names carry
    *unit* (none when "1").
    """
    t = np.asarray(time_s, dtype=float)
    y = np.asarray(measured, dtype=float)
    keep = np.isfinite(y)
    t, y = t[keep], y[keep]
    out: dict[str, float] = {"valid_readings": float(y.size)}
    if y.size == 0:
        return out
    bounds = _window(target, window)
    if target is not None:
        step = target - y[0]
        crossed = np.flatnonzero((target - y) * np.sign(step) <= 0.1 * abs(step)) \
            if step else np.array([0])
        out["response_time_measured_s"] = float(t[crossed[0]] - t[0]) if crossed.size \
            else float("nan")
    if bounds is not None:
        low, high = bounds
        outside = (y < low) | (y > high)
        out["settling_time_measured_s"] = _after_last(t, outside) * 60.0 - float(t[0])
    if target is not None:
        beyond = (y - target) * np.sign(step) if step else np.abs(y - target)
        out["overshoot_measured_pct"] = float(max(0.0, beyond.max()) / abs(step) * 100.0) \
            if step else 0.0
        tail = t >= t[0] + 0.8 * (t[-1] - t[0])
        out[_name("steady_state_deviation", output, "measured", unit)] = float(
            np.mean(np.abs(target - y[tail])))
        out[_name("tracking_error_rms", output, "measured", unit)] = float(
            np.sqrt(np.mean((target - y) ** 2)))
    if bounds is not None:
        if sparse:
            n = float(y.size)
            out["readings_in_window_measured_pct"] = float((~outside).sum() / n * 100.0)
            out["readings_below_window_measured_pct"] = float((y < low).sum() / n * 100.0)
            out["readings_above_window_measured_pct"] = float((y > high).sum() / n * 100.0)
        else:
            dt = _durations(t)
            out["time_in_window_measured_s"] = float(dt[~outside].sum())
            out["time_below_window_measured_s"] = float(dt[y < low].sum())
            out["time_above_window_measured_s"] = float(dt[y > high].sum())
    if target is not None and not sparse:
        out[_name("iae", output, "measured", unit, "_s")] = \
            float(np.trapezoid(np.abs(y - target), t)) if t.size > 1 else 0.0
    out[_name("min", output, "measured", unit)] = float(y.min())
    out[_name("max", output, "measured", unit)] = float(y.max())
    return out


def true_output_metrics(time_s, true, *, output: str, unit: str = "1",
                        target: float | None = None,
                        window: tuple[float, float] | None = None) -> dict[str, float]:
    """What the patient went through: terms of the *true* output *output* (in *unit*) at
    every record (*time_s*), names ending in ``true``:

    * ``auc_<output>_true_<unit>_h``: trapezoid AUC, output unit x h;
    * ``min_/max_<output>_true_<unit>``: the lowest and highest value;
    * with a *window* (or a *target*: +-5 % of it): ``time_in_window_true_s``,
      ``time_below_window_true_s``, ``time_above_window_true_s``, each record counting for
      the time until the next one (the last for the record step);
    * with a *target*: ``iae_<output>_true_s`` (trapezoid of |y - target|, unit x s).
    """
    t = np.asarray(time_s, dtype=float)
    y = np.asarray(true, dtype=float)
    out: dict[str, float] = {
        _name("auc", output, "true", unit, "_h"): float(np.trapezoid(y, t / 3600.0)),
        _name("min", output, "true", unit): float(y.min()),
        _name("max", output, "true", unit): float(y.max())}
    bounds = _window(target, window)
    if bounds is not None:
        low, high = bounds
        dt = _durations(t)
        out["time_in_window_true_s"] = float(dt[(y >= low) & (y <= high)].sum())
        out["time_below_window_true_s"] = float(dt[y < low].sum())
        out["time_above_window_true_s"] = float(dt[y > high].sum())
    if target is not None:
        out[_name("iae", output, "true", unit, "_s")] = float(
            np.trapezoid(np.abs(y - target), t))
    return out


def drug_totals(deliveries, end_s: float, input_units: dict[str, str],
                weight_kg: float | None) -> dict[str, float]:
    """Each input's delivered amount over [0, *end_s*], exactly from the record of every
    rate change (*deliveries*: time_s, input, rate [amount/s]), per kg when the weight is
    known; keys carry the unit."""
    from ..units import unit_to_token

    out = {}
    for name, amount_unit in input_units.items():
        mine = deliveries[deliveries["input"] == name]
        # a change recorded after the end (the run stops half a step late) counts nothing
        times = np.minimum(np.append(mine["time_s"].to_numpy(dtype=float), end_s), end_s)
        rates = mine["rate"].to_numpy(dtype=float)
        total = float(np.sum(rates * np.clip(np.diff(times), 0.0, None)))
        out[f"{name}_total_{unit_to_token(amount_unit)}"] = total
        if weight_kg:
            out[f"{name}_per_kg_{unit_to_token(amount_unit + '/kg')}"] = total / weight_kg
    return out


def summarise(metrics):
    """mean, sd, median, IQR and extremes of every numeric metric column of the *metrics*
    DataFrame (one row per metric)."""
    import pandas as pd

    numeric = metrics.select_dtypes("number").drop(columns=["patient"], errors="ignore")
    return pd.DataFrame({"mean": numeric.mean(), "sd": numeric.std(),
                         "median": numeric.median(), "q25": numeric.quantile(0.25),
                         "q75": numeric.quantile(0.75), "min": numeric.min(),
                         "max": numeric.max(), "n": numeric.count()})


def auc_attainment(time_s, concentration, low: float = 400.0, high: float = 600.0,
                   toxic: float = 800.0, trough_high: float = 20.0) -> dict[str, float]:
    """Vancomycin-style exposure targets on the true concentration [mg/L], by whole 24-h day
    from the start: the AUC of each day [mg.h/L] (trapezoid) and:

    * ``auc24_in_target_pct``: the share of days with AUC24 in [*low*, *high*] (the 2020
      ASHP/IDSA consensus 400-600 mg.h/L); ``auc24_in_target_day1_pct``,
      ``..._day2_pct`` (100 or 0: their mean over patients is the share of patients) and
      ``..._days3to7_pct`` (the share of days 3-7 that the run has);
    * ``auc24_above_target_days`` / ``auc24_above_600_days`` (days above *high*),
      ``auc24_above_800_days`` (above *toxic*: the exposure linked to kidney injury);
    * ``days_minimum_above_20_mg_per_L``: days whose lowest concentration (the trough of a
      dosing interval) is above *trough_high*;
    * ``auc24_in_target_first_day``: the day (1, 2, ...) of the first AUC24 in target, NaN
      if none; ``auc24_days``: the whole days counted; the first and last day's AUC24 and
      the highest daily minimum."""
    t = np.asarray(time_s, dtype=float)
    c = np.asarray(concentration, dtype=float)
    days = int((t[-1] - t[0]) // 86400.0 + 1e-9)
    aucs, minima = [], []
    for d in range(days):
        inside = (t >= t[0] + d * 86400.0) & (t <= t[0] + (d + 1) * 86400.0)
        aucs.append(float(np.trapezoid(c[inside], t[inside] / 3600.0)))
        minima.append(float(c[inside].min()))
    if not aucs:
        return {}
    aucs_arr = np.asarray(aucs)
    in_target = (aucs_arr >= low) & (aucs_arr <= high)
    first = np.flatnonzero(in_target)
    out = {"auc24_first_mg_h_per_L": aucs[0], "auc24_last_mg_h_per_L": aucs[-1],
           "auc24_in_target_pct": float(np.mean(in_target) * 100.0),
           "auc24_above_target_days": float(np.sum(aucs_arr > high)),
           "auc24_above_600_days": float(np.sum(aucs_arr > 600.0)),
           "auc24_above_800_days": float(np.sum(aucs_arr > toxic)),
           "days_minimum_above_20_mg_per_L": float(np.sum(np.asarray(minima) > trough_high)),
           "auc24_in_target_first_day": float(first[0] + 1) if first.size else math.nan,
           "auc24_days": float(days),
           "highest_daily_minimum_mg_per_L": max(minima),
           "auc24_in_target_day1_pct": 100.0 * float(in_target[0])}
    if days >= 2:
        out["auc24_in_target_day2_pct"] = 100.0 * float(in_target[1])
    if days >= 3:
        out["auc24_in_target_days3to7_pct"] = float(np.mean(in_target[2:7]) * 100.0)
    return out


def neutropenia_metrics(time_s, anc) -> dict[str, float]:
    """Cytotoxic toxicity on the true neutrophil count [10^9/L]: nadir, its day, and days of
    grade 4 (ANC < 0.5) and grade 3 or worse (ANC < 1.0), CTCAE v5."""
    t = np.asarray(time_s, dtype=float)
    a = np.asarray(anc, dtype=float)
    dt = np.diff(t, append=t[-1] + (t[-1] - t[-2] if t.size > 1 else 0.0))
    k = int(np.argmin(a))
    return {"anc_nadir_1e9_per_L": float(a[k]), "anc_nadir_day": float(t[k] / 86400.0),
            "grade4_neutropenia_days": float(dt[a < 0.5].sum() / 86400.0),
            "grade3plus_neutropenia_days": float(dt[a < 1.0].sum() / 86400.0)}
