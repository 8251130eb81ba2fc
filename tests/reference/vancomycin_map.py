"""Independent MAP Bayesian estimate for the vancomycin case of issue 5 (numpy/scipy only).

Goti 2018 two-compartment model written out by hand: CL = 4.5 (CrCL/120)^0.8 L/h,
V1 = 58.4 WT/70 L, Q = 6.5 L/h, V2 = 38.4 L (no dialysis); log-normal etas on CL, V1, V2 with
CVs 39.8 %, 81.6 %, 57.1 % (omega^2 = ln(1 + CV^2)); residual sd g = 3.4 + 0.227 f.
Objective: sum(((y - f)/g)^2 + log g^2) + eta' Omega^-1 eta, minimised with scipy (BFGS, then
Nelder-Mead polish). Predictions by the exact matrix exponential of the linear system with
piecewise-constant infusions. No mpc_dose import.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.integrate import quad
from scipy.linalg import expm
from scipy.optimize import minimize

OMEGA = np.diag([math.log1p(0.398**2), math.log1p(0.816**2), math.log1p(0.571**2)])


def typical(crcl_ml_min: float, weight_kg: float) -> tuple[float, float, float, float]:
    """(CL L/h, V1 L, Q L/h, V2 L) for a patient without dialysis."""
    return 4.5 * (min(crcl_ml_min, 150.0) / 120.0) ** 0.8, 58.4 * weight_kg / 70.0, 6.5, 38.4


def concentrations(params, infusions, times_h):
    """Central concentrations [mg/L] at *times_h* for infusions (start_h, dur_h, amount_mg)."""
    cl, v1, q, v2 = params
    a = np.array([[-(cl + q) / v1, q / v2], [q / v1, -q / v2]])
    edges = sorted({0.0, *times_h, *[s for s, _, _ in infusions],
                    *[s + d for s, d, _ in infusions]})
    x = np.zeros(2)
    out = {}
    for t0, t1 in zip(edges[:-1], edges[1:]):
        if t0 in times_h:
            out[t0] = x[0] / v1
        rate = sum(amt / d for s, d, amt in infusions if s <= t0 < s + d)
        m = np.zeros((3, 3))
        m[:2, :2] = a * (t1 - t0)
        m[0, 2] = rate * (t1 - t0)
        e = expm(m)
        x = e[:2, :2] @ x + e[:2, 2]
    out[edges[-1]] = x[0] / v1
    return np.array([out[t] for t in times_h])


def objective(eta, base, infusions, times_h, levels):
    params = (base[0] * math.exp(eta[0]), base[1] * math.exp(eta[1]), base[2],
              base[3] * math.exp(eta[2]))
    f = concentrations(params, infusions, times_h)
    g = 3.4 + 0.227 * f
    return float(np.sum(((levels - f) / g) ** 2 + np.log(g**2))
                 + eta @ np.linalg.solve(OMEGA, eta))


def map_estimate(crcl, weight, infusions, times_h, levels):
    base = typical(crcl, weight)
    times_h, levels = list(times_h), np.asarray(levels, float)
    res = minimize(objective, np.zeros(3), args=(base, infusions, times_h, levels),
                   method="BFGS", options={"gtol": 1e-10})
    res = minimize(objective, res.x, args=(base, infusions, times_h, levels),
                   method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12,
                                                   "maxiter": 20000})
    eta = res.x
    params = (base[0] * math.exp(eta[0]), base[1] * math.exp(eta[1]), base[2],
              base[3] * math.exp(eta[2]))
    return eta, params, res.fun


def dose_for_auc_24h(params, target=400.0, infusion_h=2.0):
    """Single infusion over *infusion_h* from 0 giving AUC(0-24 h) = target [mg.h/L]."""
    def c(t):
        return concentrations(params, [(0.0, infusion_h, 1.0)], [t])[0]
    auc_unit = quad(c, 0, infusion_h, epsabs=1e-12, epsrel=1e-12, limit=200)[0] + \
        quad(c, infusion_h, 24.0, epsabs=1e-12, epsrel=1e-12, limit=200)[0]
    return target / auc_unit
