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

import numpy as np

__all__ = ["tiva_metrics"]


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
