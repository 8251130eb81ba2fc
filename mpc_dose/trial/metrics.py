"""Clinical metrics of one run.

The TIVA benchmark metrics follow DESIGN and the published tables of Aubouin-Pairault,
Fiacchini & Dang (2024), computed on the measured (noisy) BIS sampled every second:

* induction (0-599 s): IAE (trapezoid of |BIS - 50| dt, BIS.s), sleep time (min, the time
  after the last sample with BIS >= 60), settling time (min, after the last sample outside
  [40, 60]), low-BIS time (s with BIS < 40), lowest BIS;
* maintenance (600-1199 s): IAE, time outside [40, 60] (s), lowest and highest BIS;
* drug totals per kg in each phase (propofol mg/kg, remifentanil ug/kg).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["tiva_metrics", "performance_metrics", "drug_totals", "summarise",
           "auc_attainment", "neutropenia_metrics"]


def _after_last(t: np.ndarray, bad: np.ndarray) -> float:
    """Minutes after which the condition holds: the time after the last bad sample."""
    if not bad.any():
        return float(t[0]) / 60.0
    last = int(np.flatnonzero(bad)[-1])
    return float(t[last + 1]) / 60.0 if last + 1 < t.size else float("nan")


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


def performance_metrics(time_s, measured, target: float,
                        window: tuple[float, float] | None = None) -> dict[str, float]:
    """The IEC 60601-1-10 performance terms of one run, on the measured output (NaN samples,
    i.e. no valid reading, are left out), with the definitions used here:

    * response time [s]: first time the output has covered 90 % of the way from its first
      value to *target*;
    * settling time [s]: time after the last sample outside *window* (or +-5 % of the
      target without a window); NaN if it ends outside;
    * overshoot [%]: largest excursion beyond the target, in % of the initial step;
    * steady-state deviation: mean |target - y| over the last 20 % of the run;
    * tracking error: RMS of target - y over the whole run;
    * time in / below / above the window [s], IAE (trapezoid of |y - target|), lowest and
      highest value.
    """
    t = np.asarray(time_s, dtype=float)
    y = np.asarray(measured, dtype=float)
    keep = np.isfinite(y)
    t, y = t[keep], y[keep]
    out: dict[str, float] = {}
    if y.size == 0:
        return out
    low, high = window if window is not None else (target - 0.05 * abs(target),
                                                   target + 0.05 * abs(target))
    step = target - y[0]
    crossed = np.flatnonzero((target - y) * np.sign(step) <= 0.1 * abs(step)) \
        if step else np.array([0])
    out["response_time_s"] = float(t[crossed[0]] - t[0]) if crossed.size else float("nan")
    outside = (y < low) | (y > high)
    out["settling_time_s"] = _after_last(t, outside) * 60.0 - float(t[0])
    beyond = (y - target) * np.sign(step) if step else np.abs(y - target)
    out["overshoot_pct"] = float(max(0.0, beyond.max()) / abs(step) * 100.0) if step else 0.0
    tail = t >= t[0] + 0.8 * (t[-1] - t[0])
    out["steady_state_deviation"] = float(np.mean(np.abs(target - y[tail])))
    out["tracking_error_rms"] = float(np.sqrt(np.mean((target - y) ** 2)))
    dt = np.diff(t, append=t[-1] + (t[-1] - t[-2] if t.size > 1 else 1.0))
    out["time_in_window_s"] = float(dt[~outside].sum())
    out["time_below_window_s"] = float(dt[y < low].sum())
    out["time_above_window_s"] = float(dt[y > high].sum())
    out["iae"] = float(np.trapezoid(np.abs(y - target), t)) if t.size > 1 else 0.0
    out["lowest"] = float(y.min())
    out["highest"] = float(y.max())
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
        times = np.append(mine["time_s"].to_numpy(dtype=float), end_s)
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
