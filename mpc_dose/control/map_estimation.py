"""Bayesian MAP estimation from sparse drug levels, and the model-informed precision dosing
(MIPD) baseline built on it.

The individual's random effects ``eta`` are the maximum a posteriori estimate given the
population prior and the measured levels (NONMEM's POSTHOC objective)::

    min_eta  sum_i ((y_i - f_i) / g_i)^2 + log(g_i^2)  +  eta' Omega^-1 eta,
    g_i = the residual error model's sd at the prediction f_i (e.g. 3.4 + 0.227 f)

Predictions are differentiable functions of eta: the model is integrated by CVODES inside a
CasADi graph, segment by segment between dose events and sample times, so levels drawn at any
time (and reported hours later) enter at their draw time. IPOPT solves the small problem.

This module knows model/, not plant/ nor transports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import casadi as ca
import numpy as np

from ..errors import ConfigError
from ..model.dosing import Dose, schedule
from ..model.library import LibraryModel
from ..model.propagate import _normalised_integrator
from ..model.simulation import simulate
from .base import Decision, Reading
from .solvers import ipopt_solver

__all__ = ["MapResult", "MapEstimator", "dose_for_auc", "MIPDController"]


@dataclass(frozen=True)
class MapResult:
    """The MAP estimate: random effects, the individual's parameters, predictions."""

    success: bool
    status: str
    eta: dict[str, float]
    params: dict[str, float]
    objective: float
    predictions: np.ndarray


class MapEstimator:
    """MAP estimates of one patient's random effects for a library model.

    Parameters
    ----------
    library_model : LibraryModel
    covariates : mapping
        The patient's covariates (the typical values follow from them).
    output : str
        The measured output.
    """

    def __init__(self, library_model: LibraryModel, covariates: Mapping[str, object],
                 output: str) -> None:
        self.lm = library_model
        self.model = library_model.model
        pop = library_model.population
        self.output = output
        self._k = self.model.output_index(output)
        self.residual = pop.residual_error(output)
        if self.residual is None:
            raise ConfigError(f"model {self.model.name!r} declares no residual error for "
                              f"{output!r}: MAP estimation needs one")
        if not pop.random_effects:
            raise ConfigError(f"model {self.model.name!r} has no random effects to estimate")
        self.covariates = dict(covariates)
        self.typical = self.model.parameter_vector(pop.typical_parameters(covariates))
        self.eta_names = pop.eta_names
        self._idx = [self.model.param_index(n) for n in self.eta_names]
        self._omega_inv = np.linalg.inv(pop.omega)
        self._integrator = _normalised_integrator(self.model, 1e-9, 1e-11, 1)

    def params_for(self, eta: Mapping[str, float] | np.ndarray) -> np.ndarray:
        values = np.array([eta[n] for n in self.eta_names]) if isinstance(eta, Mapping) \
            else np.asarray(eta, float)
        p = self.typical.copy()
        p[self._idx] = self.typical[self._idx] * np.exp(values)
        return p

    def _predictions(self, eta: ca.MX, doses: Sequence[Dose], times: np.ndarray) -> ca.MX:
        m = self.model
        p = ca.MX(ca.DM(self.typical))
        for j, k in enumerate(self._idx):
            p[k] = self.typical[k] * ca.exp(eta[j])
        plan = schedule(m, self.typical, doses)  # lags and F are not estimated here
        events = sorted(set(plan.breaks.tolist()) | set(times.tolist()))
        x = ca.MX(ca.DM(m.initial_state(self.typical)))
        t = 0.0
        out = []
        for t_event in events:
            if t_event > t:
                i = int(np.searchsorted(plan.breaks, t, side="right") - 1)
                u = plan.rates[max(i, 0)]
                x = self._integrator(x0=x, p=ca.vertcat(ca.DM(u), p, t, t_event - t))["xf"]
                t = t_event
            hit = np.flatnonzero(plan.breaks == t_event)
            if hit.size:
                x = x + ca.DM(plan.jumps[hit[0]])
            for _ in np.flatnonzero(times == t_event):
                i = int(np.searchsorted(plan.breaks, t, side="right") - 1)
                out.append(m.h(t, x, ca.DM(plan.rates[max(i, 0)]), p)[self._k])
        return ca.vertcat(*out)

    def estimate(self, doses: Sequence[Dose], observations: Sequence[tuple[float, float]]
                 ) -> MapResult:
        """MAP of the random effects given *doses* and *observations* ``(t_s, value)``."""
        if not observations:
            zero = np.zeros(len(self.eta_names))
            return MapResult(True, "no observations: the prior", dict(zip(self.eta_names, zero)),
                             self._named(self.typical), 0.0, np.empty(0))
        obs = sorted(observations)
        times = np.array([t for t, _ in obs], dtype=float)
        y = np.array([v for _, v in obs], dtype=float)
        eta = ca.MX.sym("eta", len(self.eta_names))
        f = self._predictions(eta, doses, times)
        r = self.residual
        g = (r.additive + r.proportional * ca.fabs(f) if r.kind == "sum"
             else ca.sqrt(r.additive**2 + (r.proportional * f) ** 2))
        objective = ca.sum1(((ca.DM(y) - f) / g) ** 2 + ca.log(g**2)) + \
            ca.mtimes([eta.T, ca.DM(self._omega_inv), eta])
        solver = ipopt_solver("map", {"x": eta, "f": objective},
                              hessian_approximation="limited-memory", tol=1e-10)
        out = solver(x0=np.zeros(len(self.eta_names)))
        stats = solver.stats()
        eta_hat = np.asarray(out["x"], float).ravel()
        predict = ca.Function("predict", [eta], [f])
        return MapResult(bool(stats["success"]), str(stats["return_status"]),
                         dict(zip(self.eta_names, eta_hat.tolist())),
                         self._named(self.params_for(eta_hat)), float(out["f"]),
                         np.asarray(predict(eta_hat), float).ravel())

    def _named(self, p: np.ndarray) -> dict[str, float]:
        return {q.name: float(v) for q, v in zip(self.model.params, p)}


def dose_for_auc(library_model: LibraryModel, params: Mapping[str, float], *, input: str,
                 output: str, target_auc: float, infusion_s: float, window_s: float) -> float:
    """The dose of a single infusion over *infusion_s* from t = 0 whose output AUC over
    [0, *window_s*] equals *target_auc* (output unit x h): AUC is linear in the dose for a
    linear model, so one unit-dose simulation (Simpson on a fine grid) gives it."""
    model = library_model.model
    times = np.linspace(0.0, window_s, 4801)
    unit = simulate(model, params, [Dose.from_record(0.0, input, amount=1.0,
                                                     duration_s=infusion_s)], times)
    from scipy.integrate import simpson

    auc_per_unit = simpson(unit.output(output), x=times) / 3600.0
    if not auc_per_unit > 0:
        raise ConfigError(f"dose_for_auc: the AUC of a unit dose is {auc_per_unit!r}")
    return target_auc / auc_per_unit


class MIPDController:
    """Model-informed precision dosing without MPC: at each scheduled dose, a MAP estimate
    from the levels received so far, then the dose whose AUC over the dosing interval (as a
    single infusion) meets the target AUC scaled to the interval.

    A :class:`~mpc_dose.control.base.Controller`: it returns the infusion rate in force
    (dose / infusion time during an infusion, else 0).
    """

    def __init__(self, library_model: LibraryModel, covariates: Mapping[str, object], *,
                 input: str, output: str, measured: str, interval_s: float, infusion_s: float,
                 target_auc_24h: float, period_s: float = 600.0, name: str = "mipd") -> None:
        if not (0 < infusion_s <= interval_s):
            raise ConfigError(f"mipd: need 0 < infusion_s <= interval_s, got {infusion_s} and "
                              f"{interval_s}")
        self.lm, self.name, self.period_s = library_model, name, period_s
        self.inputs = (input,)
        self.input, self.output, self.measured = input, output, measured
        self.interval_s, self.infusion_s = interval_s, infusion_s
        self.target = target_auc_24h * interval_s / 86400.0
        self.estimator = MapEstimator(library_model, covariates, output)
        self._doses: list[Dose] = []
        self._levels: dict[float, float] = {}
        self.last_estimate: MapResult | None = None

    def observe(self, reading: Reading) -> None:
        if reading.var == self.measured and reading.quality == "valid" and \
                math.isfinite(reading.value):
            self._levels[reading.t_meas_s] = reading.value

    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        k = int(math.floor(t_s / self.interval_s + 1e-9))
        start = k * self.interval_s
        if not any(abs(d.time_s - start) < 1e-6 for d in self._doses):
            estimate = self.estimator.estimate(self._doses, sorted(self._levels.items()))
            self.last_estimate = estimate
            dose = self._dose(estimate, start)
            self._doses.append(Dose.from_record(start, self.input, amount=dose,
                                                duration_s=self.infusion_s))
        current = next(d for d in self._doses if abs(d.time_s - start) < 1e-6)
        on = start <= t_s < start + self.infusion_s
        reason = (f"MIPD: dose {current.amount:.0f} over {self.infusion_s / 3600:g} h at "
                  f"{start / 3600:g} h from {len(self._levels)} level(s)")
        return Decision(t_s, {self.input: current.rate if on else 0.0}, reason)

    def _dose(self, estimate: MapResult, start: float) -> float:
        """Dose making the AUC over the next interval meet the target, given earlier doses."""
        model = self.lm.model
        times = np.linspace(start, start + self.interval_s, 1201)
        from scipy.integrate import simpson

        base = simulate(model, estimate.params, self._doses, np.concatenate([[0.0], times]))
        auc_base = simpson(base.output(self.output)[1:], x=times) / 3600.0
        unit = simulate(model, estimate.params, [Dose.from_record(
            start, self.input, amount=1.0, duration_s=self.infusion_s)],
            np.concatenate([[0.0], times]))
        auc_unit = simpson(unit.output(self.output)[1:], x=times) / 3600.0
        return max(0.0, (self.target - auc_base) / auc_unit)
