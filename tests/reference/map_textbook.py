"""Independent textbook MAP fit of a two-compartment model (numpy/scipy only, no mpc_dose, no
CasADi): the reference for `tests/test_estimation.py`.

Model (Goti 2018 vancomycin, written out by hand, hours and mg): CL = 4.5 (min(CrCL, 150) /
120)^0.8 L/h, V1 = 58.4 WT/70 L, Q = 6.5 L/h, V2 = 38.4 L (no dialysis); residual SD
g = 3.4 + 0.227 f (mg/L), or an exponential error (log y = log f + eps, SD sigma). Individual parameters ``P = P_typ(covariates at t) *
exp(eta_P + kappa_P,occasion(t))``.

Predictions: the state (amounts in both compartments) is advanced between events by the
closed-form solution of the linear system under a constant infusion rate R,
``x(t + h) = E(h) (x - x_ss) + x_ss``, with ``x_ss = (R / k10, R k12 / (k10 k21))`` and
``E(h)`` from Sylvester's formula with the two disposition rates alpha, beta:
``E(h) = (e^{-alpha h} (A + beta I) - e^{-beta h} (A + alpha I)) / (beta - alpha)``.
No matrix exponential, no ODE solver.

Objective (NONMEM POSTHOC, -2 log posterior up to a constant)::

    sum_i ((y_i - f_i) / g_i)^2 + log g_i^2         (readings above the LLOQ)
  + sum_i -2 log Phi((LLOQ_i - f_i) / g_i)          (readings below it, Beal's M3)
  + eta' Omega^-1 eta + sum_o kappa_o' Pi^-1 kappa_o

minimised by BFGS, then polished by Nelder-Mead.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize
from scipy.stats import norm

NAMES = ("cl", "v1", "q", "v2")
OMEGA_GOTI = {"cl": math.log1p(0.398**2), "v1": math.log1p(0.816**2),
              "v2": math.log1p(0.571**2)}


def typical(crcl_ml_min: float, weight_kg: float) -> dict[str, float]:
    """Typical CL [L/h], V1 [L], Q [L/h], V2 [L] without dialysis."""
    return {"cl": 4.5 * (min(crcl_ml_min, 150.0) / 120.0) ** 0.8, "v1": 58.4 * weight_kg / 70.0,
            "q": 6.5, "v2": 38.4}


def _advance(x: np.ndarray, p: dict[str, float], rate: float, h: float) -> np.ndarray:
    """Amounts [mg] after *h* hours of constant infusion *rate* [mg/h] into compartment 1."""
    if h == 0.0:
        return x
    k10, k12, k21 = p["cl"] / p["v1"], p["q"] / p["v1"], p["q"] / p["v2"]
    a = np.array([[-(k10 + k12), k21], [k12, -k21]])
    s, prod = k10 + k12 + k21, k10 * k21
    root = math.sqrt(s * s - 4.0 * prod)
    alpha, beta = 0.5 * (s + root), 0.5 * (s - root)
    eye = np.eye(2)
    e = (math.exp(-alpha * h) * (a + beta * eye) - math.exp(-beta * h) * (a + alpha * eye)) \
        / (beta - alpha)
    x_ss = np.array([rate / k10, rate * k12 / (k10 * k21)])
    return e @ (x - x_ss) + x_ss


class Record:
    """One patient's record in hours: covariate pieces ``(t_h, crcl, weight)``, infusions
    ``(start_h, duration_h, amount_mg)``, readings ``(t_h, value, below_lloq)`` (for a
    reading below the LLOQ, value is the limit), occasion starts [h] (0 first)."""

    def __init__(self, pieces, infusions, readings, occasions_h=(0.0,)):
        self.pieces = sorted(pieces)
        self.infusions = list(infusions)
        self.readings = list(readings)
        self.occasions_h = sorted(occasions_h)

    def _params(self, t: float, eta: dict, kappas: list[dict]) -> dict[str, float]:
        piece = [p for p in self.pieces if p[0] <= t][-1]
        occasion = sum(1 for s in self.occasions_h if s <= t) - 1
        base = typical(piece[1], piece[2])
        return {n: base[n] * math.exp(eta.get(n, 0.0) + kappas[occasion].get(n, 0.0))
                for n in NAMES}

    def predictions(self, eta: dict, kappas: list[dict]) -> np.ndarray:
        """Central concentrations [mg/L] at the readings' times."""
        edges = {0.0, *(r[0] for r in self.readings), *(p[0] for p in self.pieces),
                 *self.occasions_h}
        for s, d, _ in self.infusions:
            edges.update((s, s + d))
        edges = sorted(edges)
        x, conc = np.zeros(2), {}
        for t0, t1 in zip(edges, edges[1:] + [edges[-1]]):
            conc[t0] = x[0] / self._params(t0, eta, kappas)["v1"]
            rate = sum(a / d for s, d, a in self.infusions if s <= t0 < s + d)
            x = _advance(x, self._params(t0, eta, kappas), rate, t1 - t0)
        return np.array([conc[r[0]] for r in self.readings])


def objective(record: Record, eta: dict, kappas: list[dict], omega: np.ndarray,
              eta_names: tuple[str, ...], pi: dict[str, float] | None = None,
              error: tuple = ("sum", 3.4, 0.227)) -> float:
    """*error*: ``("sum", additive, proportional)`` or ``("exponential", sigma)``."""
    f = record.predictions(eta, kappas)
    y = np.array([r[1] for r in record.readings])
    blq = np.array([bool(r[2]) for r in record.readings])
    if error[0] == "exponential":
        f, y, g = np.log(f), np.log(y), np.full(f.shape, error[1])
    else:
        g = error[1] + error[2] * f
    terms = np.where(blq, -2.0 * norm.logcdf((y - f) / g), ((y - f) / g) ** 2 + np.log(g**2))
    e = np.array([eta[n] for n in eta_names])
    prior = e @ np.linalg.solve(omega, e)
    for k in kappas:
        prior += sum(v * v / pi[n] for n, v in k.items())
    return float(np.sum(terms) + prior)


def map_fit(record: Record, omega: np.ndarray, eta_names=("cl", "v1", "v2"),
            kappa_names=(), pi: dict[str, float] | None = None,
            error: tuple = ("sum", 3.4, 0.227)):
    """The MAP estimate: ``(eta dict, list of kappa dicts per occasion, objective)``."""
    n_occ = len(record.occasions_h)
    ne, nk = len(eta_names), len(kappa_names)

    def unpack(z):
        eta = dict(zip(eta_names, z[:ne]))
        kappas = [dict(zip(kappa_names, z[ne + o * nk:ne + (o + 1) * nk]))
                  for o in range(n_occ)]
        return eta, kappas

    def fun(z):
        return objective(record, *unpack(z), omega, eta_names, pi, error)

    z = np.zeros(ne + nk * n_occ)
    res = minimize(fun, z, method="BFGS", options={"gtol": 1e-9})
    res = minimize(fun, res.x, method="Nelder-Mead",
                   options={"xatol": 1e-10, "fatol": 1e-13, "maxiter": 40000,
                            "maxfev": 40000})
    eta, kappas = unpack(res.x)
    return eta, kappas, float(res.fun)


def hessian(record: Record, omega: np.ndarray, eta: dict, eta_names=("cl", "v1", "v2"),
            step: float = 1e-4) -> np.ndarray:
    """Central-difference Hessian of the objective in the etas (no kappas)."""
    z0 = np.array([eta[n] for n in eta_names])

    def fun(z):
        return objective(record, dict(zip(eta_names, z)), [{}], omega, eta_names)

    n = z0.size
    h = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            ei, ej = np.eye(n)[i] * step, np.eye(n)[j] * step
            h[i, j] = (fun(z0 + ei + ej) - fun(z0 + ei - ej) - fun(z0 - ei + ej)
                       + fun(z0 - ei - ej)) / (4 * step * step)
    return h
