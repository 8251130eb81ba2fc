"""Bayesian (MAP) estimation of any chosen log-normal parameters from a record of doses and
readings: the a-posteriori step of model-informed precision dosing, in the closed loop and
one-off alike.

The individual's parameter ``j`` is ``theta_j(t) = theta_typ_j(covariates at t) *
exp(eta_j + kappa_j,occasion(t))``. The chosen ``eta`` (between subjects, prior
``N(0, Omega)``), the ``kappa`` of every occasion (prior ``N(0, Pi)`` each, when the
population declares inter-occasion variability on a chosen parameter) and optionally an
additive output disturbance ``d`` are the maximum a posteriori estimate (NONMEM's POSTHOC
objective, -2 log of the posterior up to a constant)::

    min  sum_i ((y_i - f_i) / g_i)^2 + log(g_i^2)          readings above the LLOQ
       + sum_i -2 log Phi((LLOQ_i - f_i) / g_i)            readings below it (Beal's M3)
       + (w - m)' Lambda (w - m)                           prior / arrival cost, w = [eta, kappa, d]

The population prior of ``eta`` and ``kappa`` enters ``Lambda`` multiplied by the prior
weight ``lambda_p`` (:attr:`EstimationConfig.prior_weight`): 1 is the MAP above, 0 maximum
likelihood, values in between a flattened prior (Omega divided by the weight), as MIPD tools
offer for patients unlike the model's population (Hughes & Keizer, Br J Clin Pharmacol
2021;87:2155).

``f_i`` is the model's prediction at reading ``i``'s *sample* time: the model integrated from
the start of the record (drug-naive, ``x0(theta)``) through the delivered inputs (a
piecewise-constant rate per input, and boluses) under ``theta(eta, kappa)``; parameters that
act on the dynamics (clearance, volumes, absorption) therefore move the predicted states.
``g_i`` is the model's own residual error (:meth:`PopulationModel.residual_error`): additive,
proportional, combined as a sum or in quadrature, or exponential (log-transformed both sides:
``f, y, LLOQ`` enter as logarithms and ``g`` is the SD on the log scale).

Integration. Models whose dynamics are affine in the state (every compartmental PK model,
effect sites, transit chains: :attr:`Model.is_affine`, the criterion
:mod:`mpc_dose.model.propagate` uses for its exact zero-order hold) are discretised exactly
between events, symbolically in ``eta``: the matrix exponential of the augmented matrix
``[[A dt, (B u + c) dt], [0, 0]]`` by scaling and squaring (a degree-12 Taylor polynomial of
``M / 2^s``, ``|M / 2^s|_1 <= 1/2``, then ``s`` squarings). ``s`` is fixed when the problem is
built, from the largest rate ``|A(theta)|_1`` over the box of random effects the solver may
visit (``eta_bound_sd`` prior SDs) and a 24-h segment; any longer segment is split, so the
bound holds for every segment of every record. When the dynamics vary in time (circadian
parameters), ``A, B, c`` are taken at each segment's midpoint and segments are at most
``max_step_s`` long. Nonlinear models take RK4 steps. Either way the problem is one CasADi
graph (a ``map`` of the per-segment discretisations and a ``mapaccum`` along the record)
built once per capacity of segments and reused patient after patient; a record's data are
its parameters. IPOPT solves it with the exact Hessian.

Conventions.

* Time is seconds everywhere; rates are in each input's amount unit per second, boluses in
  its amount unit, readings in the output's unit.
* Covariates are last-observation-carried-forward (LOCF): a value given ``from t_s`` holds on
  ``[t_s, next change)``. This is how the virtual patient applies a change
  (:func:`mpc_dose.plant.patient.parameter_schedule`), and it is causal: the controller learns
  a covariate when it is measured. NONMEM carries a record's covariates backward over the
  interval that ends at it (NOCB); shift such a table's covariate times to the start of the
  interval they describe to use it here.
* A reading at the time of a bolus sees the state before the bolus (a trough drawn before
  the dose); readings at one time enter in the order they arrived.
* Occasions: occasion 0 starts with the record, :meth:`BayesianEstimator.new_occasion` starts
  the next. The parameters for planning are the typical values now with ``exp(eta)`` only:
  a future dose is planned without the past occasions' share (Abrantes et al., Br J Clin
  Pharmacol 2019;85:1326: including IOV in the estimate but excluding it from the dose
  computation performed best).
* Readings come back late: they enter at their sample time and the fit covers the whole
  record, so the past is re-estimated. With a ``window`` of readings, the oldest leave it into
  a quadratic arrival cost (see :class:`EstimationConfig`).

This module knows model/, not plant/ nor transports. It does not print or sleep.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import casadi as ca
import numpy as np

from ..errors import ConfigError, ModelError, closest
from ..model.dosing import Dose
from ..model.library import LibraryModel
from ..model.population import ResidualError, parse_covariates
from ..model.spec import Model
from ..units import UnitError, convert, split_unit_suffix
from .solvers import ipopt_solver

__all__ = ["EstimationConfig", "EstimationResult", "BayesianEstimator", "map_fit",
           "expm_taylor"]

#: Degree of the Taylor polynomial of the scaled matrix and the largest 1-norm of the
#: scaled matrix: the remainder is below ``e^0.5 0.5^13 / 13! ~ 3e-14`` relative to 1.
#: Scaling and squaring: Moler & Van Loan, "Nineteen dubious ways to compute the
#: exponential of a matrix, twenty-five years later", SIAM Rev 2003;45:3 (method 3); a
#: Taylor polynomial needs no matrix inverse, so the symbolic expression stays small.
_TAYLOR_DEGREE = 12
_SCALED_NORM = 0.5
#: The segment length [s] the squarings are chosen for (longer segments are split).
_REFERENCE_SEGMENT_S = 86400.0
#: RK4 (nonlinear models): the step times the fastest rate.
_RK4_STEP_RATE = 0.2


def expm_taylor(m: ca.SX, squarings: int) -> ca.SX:
    """``exp(m)`` by a degree-12 Taylor polynomial of ``m / 2^squarings`` (Horner), squared
    *squarings* times: symbolic and differentiable. Accurate to double precision while
    ``|m|_1 <= 0.5 * 2^squarings``."""
    x = m / 2.0**squarings
    eye = ca.SX.eye(m.shape[0])
    e = eye
    for k in range(_TAYLOR_DEGREE, 0, -1):
        e = eye + ca.mtimes(x, e) / k
    for _ in range(squarings):
        e = ca.mtimes(e, e)
    return e


# ---------------------------------------------------------------------------- config
@dataclass(frozen=True)
class EstimationConfig:
    """What to estimate from which output, and how.

    Attributes
    ----------
    output : str
        The measured model output.
    parameters : tuple of str, optional
        Parameters whose random effects are estimated (each must have one in the population
        model); every parameter with a random effect when not given.
    occasions : bool
        Estimate the occasions' kappas of the chosen parameters that have inter-occasion
        variability in the population model.
    lloq : float, optional
        Lower limit of quantification (output unit): readings below it are treated as below
        the LLOQ (M3) with this limit. A reading may also be flagged as such when added.
    window : int, optional
        Readings in the fit. None: every reading of the record (full information, the
        default: sparse levels cost little). With a window, the oldest readings leave the
        fit into the arrival cost: the second-order expansion of their terms (exact
        Hessian) at the last successful fit, i.e. the Laplace approximation of what they
        said, added to the prior (the sum kept positive definite); the state at the new
        start of the fit becomes its first-order expansion in the random effects at that
        fit, so a refit integrates the window only. A late reading sampled before the
        window enters the arrival cost directly.
    disturbance : bool
        Estimate an additive output disturbance ``d`` (constant over the fit), prior
        ``N(0, disturbance_sd^2)``. Off by default: a drug level has none.
    disturbance_sd : float
        Prior SD of the disturbance (output unit).
    q_d : float
        Variance (output unit squared) added to the disturbance's arrival cost per reading
        leaving the window: it may drift between what the window sees and what it forgot.
    eta_bound_sd : float
        Every random effect stays within this many prior SDs (a box the solver cannot leave;
        the matrix exponential is made accurate over it). An estimate at the box is reported
        (status ``at_bound``).
    max_step_s : float, optional
        Longest segment [s] of a model whose dynamics vary in time (a 96th of its circadian
        period when not given) or the RK4 step of a nonlinear one (0.2 over its fastest
        rate with the random effects at +-2 prior SDs when not given).
    max_iter : int
    tol : float
        IPOPT's tolerance.
    prior_weight : float
        Weight of the population prior of the random effects (eta, and the occasions'
        kappas) in the objective: 1 the MAP estimate, 0 maximum likelihood (the readings
        alone; needs as many informative readings as estimated effects, and no occasion
        effects, which the readings cannot tell apart from eta without a prior), between
        them a flattened prior (Omega / weight). The box of *eta_bound_sd* stays in units of
        the population's SDs. The disturbance's prior is not weighted.
    """

    output: str
    parameters: tuple[str, ...] | None = None
    occasions: bool = True
    lloq: float | None = None
    window: int | None = None
    disturbance: bool = False
    disturbance_sd: float = 1.0
    q_d: float = 0.0
    eta_bound_sd: float = 5.0
    max_step_s: float | None = None
    max_iter: int = 100
    tol: float = 1e-8
    prior_weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.output, str) or not self.output:
            raise ConfigError(f"estimation.output: expected a model output name, "
                              f"got {self.output!r}")
        if self.parameters is not None:
            object.__setattr__(self, "parameters", tuple(self.parameters))
            if not self.parameters:
                raise ConfigError("estimation.parameters: give at least one parameter, or "
                                  "None for every parameter with a random effect")
        for name in ("disturbance_sd", "eta_bound_sd", "tol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ConfigError(f"estimation.{name}: expected a finite number > 0, "
                                  f"got {value!r}")
        if isinstance(self.prior_weight, bool) or not (
                isinstance(self.prior_weight, (int, float)) and 0 <= self.prior_weight < math.inf):
            raise ConfigError(f"estimation.prior_weight: expected a finite number >= 0 (1: the "
                              f"population prior, 0: maximum likelihood), got "
                              f"{self.prior_weight!r}")
        if not (isinstance(self.q_d, (int, float)) and 0 <= self.q_d < math.inf):
            raise ConfigError(f"estimation.q_d: expected a finite variance >= 0, "
                              f"got {self.q_d!r}")
        if self.lloq is not None and not (isinstance(self.lloq, (int, float))
                                          and math.isfinite(self.lloq)):
            raise ConfigError(f"estimation.lloq: expected a finite number (output unit) or "
                              f"None, got {self.lloq!r}")
        if self.max_step_s is not None and not (isinstance(self.max_step_s, (int, float))
                                                and 0 < self.max_step_s < math.inf):
            raise ConfigError(f"estimation.max_step_s: expected a step > 0 s or None, got "
                              f"{self.max_step_s!r}")
        for name, low in (("window", 1), ("max_iter", 1)):
            value = getattr(self, name)
            if value is None and name == "window":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"estimation.{name}: expected a whole number >= {low}"
                                  f"{' or None' if name == 'window' else ''}, got {value!r}")


# ---------------------------------------------------------------------------- result
@dataclass(frozen=True)
class EstimationResult:
    """One fit. Failure is a result: *success* False with IPOPT's *status* (or why no solve
    was possible); the estimator keeps planning with its last successful estimate.

    Attributes
    ----------
    success, status, iterations, solve_time_s
        How the solve went (``solve_time_s``: wall time of data preparation, solve and
        curvature [s]).
    t_s : float
        The fit covers the record up to this time [s].
    eta : dict
        The estimated between-subject random effects, by parameter name.
    kappa : tuple of dict
        The estimated inter-occasion effects of each occasion so far, by parameter name.
    disturbance : float
        The additive output disturbance (output unit; 0 when not estimated).
    params : dict
        Every model parameter for planning, in its declared unit: typical values at *t_s*
        with ``exp(eta)`` (not the occasions' kappas).
    objective : float
        The minimised objective (-2 log posterior up to a constant, NONMEM's scale; with a
        window, including the arrival cost of the readings that left it).
    names : tuple of str
        Names of the estimated quantities: ``eta_<param>``, ``kappa<o>_<param>``, ``d``.
    estimate : array
        Their values, in the order of *names*.
    covariance : array
        Posterior covariance of *estimate* from the curvature: the inverse of half the
        Hessian of the objective at the optimum (NaN when it is not positive definite).
    reading_times_s, readings, predictions, below_lloq : arrays
        The readings in the fit (sample time [s], value, the model's prediction, M3 flag);
        for a reading below the LLOQ the value is the limit.
    excluded : tuple of (t_s, value, reason)
        Readings left out, and why.
    """

    success: bool
    status: str
    iterations: int
    solve_time_s: float
    t_s: float
    eta: dict[str, float]
    kappa: tuple[dict[str, float], ...]
    disturbance: float
    params: dict[str, float]
    objective: float
    names: tuple[str, ...]
    estimate: np.ndarray
    covariance: np.ndarray
    reading_times_s: np.ndarray
    readings: np.ndarray
    predictions: np.ndarray
    below_lloq: np.ndarray
    excluded: tuple[tuple[float, float, str], ...] = ()

    def sd(self, name: str) -> float:
        """Posterior SD of an estimated quantity (``eta_cl``, ``kappa0_cl``, ``d``)."""
        try:
            k = self.names.index(name)
        except ValueError:
            raise ConfigError(f"no estimated quantity {name!r}{closest(name, self.names)}; "
                              f"estimated: {', '.join(self.names)}") from None
        return float(math.sqrt(self.covariance[k, k])) if self.covariance[k, k] >= 0 \
            else math.nan

    def interval(self, param: str, level: float = 0.95) -> tuple[float, float]:
        """Equal-tailed credible interval of a planning parameter (declared unit) from the
        Laplace approximation: ``params[param] * exp(+-z sd(eta))``."""
        from scipy.stats import norm

        if not 0 < level < 1:
            raise ConfigError(f"interval level must be in (0, 1), got {level!r}")
        if param not in self.eta:
            raise ConfigError(f"no random effect of {param!r} estimated"
                              f"{closest(param, self.eta)}; estimated: {', '.join(self.eta)}")
        z = float(norm.ppf(0.5 + level / 2)) * self.sd(f"eta_{param}")
        return self.params[param] * math.exp(-z), self.params[param] * math.exp(z)


# ---------------------------------------------------------------------------- problem
@dataclass(frozen=True)
class _Layout:
    """Structure of a problem: everything the graph depends on except the record."""

    exact: bool
    squarings: int
    n_seg: int            # capacity of segments
    n_occ: int            # capacity of occasions (0 without kappas)
    eta_idx: tuple[int, ...]    # model parameter index of each eta
    kappa_of: tuple[int, ...]   # eta position of each kappa
    disturbance: bool
    output: int
    error: tuple[str, float, float]   # (kind, additive, proportional)
    max_iter: int
    tol: float

    @property
    def n_eta(self) -> int:
        return len(self.eta_idx)

    @property
    def n_w(self) -> int:
        return self.n_eta + len(self.kappa_of) * self.n_occ + (1 if self.disturbance else 0)


def _log_normal_cdf(z: ca.SX) -> ca.SX:
    """``log Phi(z)``, accurate and smooth far into the lower tail: from ``erf`` above
    z = -4 (relative error of Phi below 1e-11 there), below it from the continued fraction of
    Mills' ratio, ``Phi(z) = phi(z) / (x + 1/(x + 2/(x + 3/(x + ...))))`` with ``x = -z``, 30
    terms (error below 1e-14 for x >= 4), where ``1 + erf`` would cancel to 0."""
    # each branch is evaluated inside its own range, so that neither it nor its derivatives
    # are infinite where it is not taken (0 * inf is NaN in reverse mode)
    direct = ca.log(0.5 * (1.0 + ca.erf(ca.fmax(z, -4.0) / math.sqrt(2.0))))
    x = ca.fmax(-z, 4.0)
    fraction = x
    for k in range(30, 0, -1):
        fraction = x + k / fraction
    tail = -0.5 * x**2 - 0.5 * math.log(2 * math.pi) - ca.log(fraction)
    return ca.if_else(z > -4.0, direct, tail)


class _Problem:
    """The MAP problem of one layout: an IPOPT solver and evaluation functions, whose
    parameters are the record (segment table), the arrival cost and the start state."""

    def __init__(self, model: Model, layout: _Layout) -> None:
        self.model, self.layout = model, layout
        m, L = model, layout
        n, nu, npar = m.n_states, m.n_inputs, len(m.params)
        self.n_col = 2 + 2 * nu + npar + L.n_occ + 3
        col = ca.SX.sym("col", self.n_col)
        w = ca.SX.sym("w", L.n_w)
        t, dt = col[0], col[1]
        u, bolus = col[2:2 + nu], col[2 + nu:2 + 2 * nu]
        theta = col[2 + 2 * nu:2 + 2 * nu + npar]
        occ = col[2 + 2 * nu + npar:2 + 2 * nu + npar + L.n_occ]
        y, obs, blq = col[-3], col[-2], col[-1]
        p = self._parameters(theta, occ, w)
        x = ca.SX.sym("x", n)
        lik = ca.SX.sym("lik")
        d = w[-1] if L.disturbance else 0.0
        f = m.h(t, x, u, p)[L.output] + d
        # Where there is no reading the term is switched off, and evaluated at a harmless
        # prediction: reverse-mode derivatives multiply the zero weight of a switched-off
        # branch by its partial derivatives, and 0 * inf (a proportional error at f = 0,
        # before the first dose) would be NaN.
        term = self._reading_term(ca.if_else(obs > 0, f, 1.0), y, blq)
        lik_next = lik + ca.if_else(obs > 0, term, 0.0)
        x_jump = x + self._jump(bolus, p)
        d_col = ca.MX.sym("D", self.n_col, L.n_seg)
        w_mx = ca.MX.sym("w", L.n_w)
        x_init_args = [ca.MX.sym(name, k) for name, k in
                       (("xbar", n), ("jx", n * L.n_w), ("wbar", L.n_w), ("exact_start", 1))]
        if L.exact:
            # A, B, c at the segment's midpoint: exact for a time-invariant model, second
            # order in the segment for one that varies in time (the exponential midpoint rule)
            a, b, c = m.affine_terms(t + dt / 2, p)
            aug = ca.SX.zeros(n + 1, n + 1)
            aug[:n, :n] = a * dt
            aug[:n, n] = (ca.mtimes(b, u) + c) * dt
            e = expm_taylor(aug, L.squarings)
            disc = ca.Function("disc", [col, w], [ca.vertcat(ca.vec(e[:n, :n]), e[:n, n])])
            z = ca.SX.sym("z", n * n + n)
            x_next = ca.mtimes(ca.reshape(z[:n * n], n, n), x_jump) + z[n * n:]
            step = ca.Function("step", [x, lik, col, w, z], [x_next, lik_next, f])
            fold = step.mapaccum("record", L.n_seg, [0, 1], [0, 1])
            discs = disc.map(L.n_seg)(d_col, w_mx)
            extra = [discs]
        else:
            h, rhs = dt, m.f
            k1 = rhs(t, x_jump, u, p)
            k2 = rhs(t + h / 2, x_jump + h / 2 * k1, u, p)
            k3 = rhs(t + h / 2, x_jump + h / 2 * k2, u, p)
            k4 = rhs(t + h, x_jump + h * k3, u, p)
            x_next = x_jump + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            step = ca.Function("step", [x, lik, col, w], [x_next, lik_next, f])
            fold = step.mapaccum("record", L.n_seg, [0, 1], [0, 1])
            extra = []
        xbar, jx, wbar, exact_start = x_init_args
        p0 = ca.Function("p0", [col, w], [p])(d_col[:, 0], w_mx)
        x_start = exact_start * m.x0(p0) + (1 - exact_start) * (
            xbar + ca.mtimes(ca.reshape(jx, n, L.n_w), w_mx - wbar))
        xs, liks, preds = fold(x_start, 0.0, d_col, w_mx, *extra)
        lam = ca.MX.sym("lam", L.n_w, L.n_w)
        mean = ca.MX.sym("mean", L.n_w)
        dw = w_mx - mean
        objective = liks[-1] + ca.mtimes([dw.T, lam, dw])
        self.params_mx = ca.vertcat(ca.vec(d_col), ca.vec(lam), mean, *x_init_args)
        self._w, self._objective, self._lik = w_mx, objective, liks[-1]
        self._x_end, self._preds = xs[:, -1], preds
        # The box is far from the optimum: the adaptive barrier parameter does not spend
        # a dozen iterations lowering a barrier that never binds (6 instead of 19 here).
        # The exact Hessian: 5-6 iterations where a Gauss-Newton Hessian (the readings'
        # curvature in the prediction times J'J) took 40 and L-BFGS over 100 (a 4-day record
        # of 576 segments: 0.19 s against 2.2 s and 4 s). The adaptive barrier parameter:
        # the box never binds at a sound estimate, and the monotone strategy spent a dozen
        # iterations lowering its barrier (19 instead of 6).
        self.solver = ipopt_solver("map_fit", {"x": w_mx, "p": self.params_mx, "f": objective},
                                   layout.max_iter, show_eval_warnings=False, tol=layout.tol,
                                   mu_strategy="adaptive", acceptable_tol=100 * layout.tol,
                                   acceptable_iter=1)
        # (acceptable: the gradient of an objective near 10 computed through a dozen
        # squarings has noise near 1e-7; below that the line search only stalls, 10 more
        # iterations for an eta that moves by 1e-8)
        self.evaluate = ca.Function("evaluate", [w_mx, self.params_mx],
                                    [objective, preds, xs[:, -1]])
        self._hessian: ca.Function | None = None
        self._parts: ca.Function | None = None

    # -------------------------------------------------------------- pieces of the graph
    def _parameters(self, theta: ca.SX, occ: ca.SX, w: ca.SX) -> ca.SX:
        """The model's parameter vector: typical values times exp(eta + kappa of the
        segment's occasion) for the estimated parameters."""
        L = self.layout
        p = ca.SX(theta)
        offsets = [w[j] for j in range(L.n_eta)]
        n_k = len(L.kappa_of)
        for slot, j in enumerate(L.kappa_of):
            kappas = ca.vertcat(*[w[L.n_eta + o * n_k + slot] for o in range(L.n_occ)])
            offsets[j] = offsets[j] + ca.dot(occ, kappas)
        for j, k in enumerate(L.eta_idx):
            p[k] = theta[k] * ca.exp(offsets[j])
        return p

    def _jump(self, bolus: ca.SX, p: ca.SX) -> ca.SX:
        """State increments of boluses (amounts in each input's unit; scaled by the input's
        bioavailability parameter when it declares one)."""
        m = self.model
        jump = ca.SX.zeros(m.n_states)
        for j, inp in enumerate(m.inputs):
            amount = bolus[j]
            if inp.bioavailability is not None:
                amount = amount * p[m.param_index(inp.bioavailability)]
            k = m.state_index(inp.bolus_state)
            jump[k] = jump[k] + amount
        return jump

    def _reading_term(self, f: ca.SX, y: ca.SX, blq: ca.SX) -> ca.SX:
        """-2 log-likelihood of one reading up to a constant: normal, or Beal's M3 for a
        reading below the LLOQ (then *y* is the limit)."""
        kind, additive, proportional = self.layout.error
        if kind == "exponential":
            f, y, g = ca.log(f), ca.log(y), ca.SX(proportional)
        elif kind == "sum":
            g = additive + proportional * ca.fabs(f)
        else:
            g = ca.sqrt(additive**2 + (proportional * f) ** 2)
        normal = ((y - f) / g) ** 2 + ca.log(g**2)
        m3 = -2.0 * _log_normal_cdf((y - f) / g)
        return ca.if_else(blq > 0, m3, normal)

    # -------------------------------------------------------------- evaluation
    def hessian(self, w: np.ndarray, params: np.ndarray) -> np.ndarray:
        """The objective's Hessian in w: IPOPT's own (upper triangle), made whole."""
        if self._hessian is None:
            self._hessian = self.solver.get_function("nlp_hess_l")
        upper = np.asarray(ca.densify(self._hessian(w, params, 1.0, np.zeros(0))), float)
        return upper + np.triu(upper, 1).T

    def parts(self) -> ca.Function:
        """The likelihood's value, gradient and Hessian in w, and the final state with its
        Jacobian in w: what the arrival cost takes from readings leaving the window."""
        if self._parts is None:
            hess, grad = ca.hessian(self._lik, self._w)
            self._parts = ca.Function("parts", [self._w, self.params_mx],
                                      [self._lik, grad, hess, self._x_end,
                                       ca.jacobian(self._x_end, self._w)])
        return self._parts


_problems: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _problem(model: Model, layout: _Layout) -> _Problem:
    """The problem of *layout*, built once per model and layout (trials reuse it patient
    after patient; one estimator uses it at a time)."""
    per_model = _problems.setdefault(model, {})
    if layout not in per_model:
        if len(per_model) > 32:   # many capacities over a long trial: keep memory bounded
            per_model.clear()
        per_model[layout] = _Problem(model, layout)
    return per_model[layout]


# ---------------------------------------------------------------------------- record
@dataclass(frozen=True)
class _Reading:
    t_s: float
    value: float
    blq: bool
    seq: int


@dataclass
class _Table:
    """A stretch of the record as segments (the columns of a problem's data)."""

    columns: np.ndarray              # (n_col, n_segments)
    reading_segments: list[int]      # segment of each reading in the fit, in fit order
    readings: list[_Reading]
    n_occ: int                       # occasions up to t_end


class BayesianEstimator:
    """MAP estimates of one patient's random effects from a growing record.

    Tell it what happens, in any order (late readings and corrections are fine): readings
    (:meth:`add_reading`), the rates the pumps delivered (:meth:`delivered`), boluses and
    dose records (:meth:`bolus`, :meth:`add_dose`), covariate changes
    (:meth:`covariates_from`), new occasions (:meth:`new_occasion`). :meth:`update` refits
    when something new arrived; plan with :attr:`theta` and :meth:`state`.

    Parameters
    ----------
    library_model : LibraryModel
        The model and its population statistics (Omega, Pi, residual error).
    covariates : mapping
        The patient's covariates at the start of the record (checked; unit suffixes such as
        ``weight_lb`` are converted).
    config : EstimationConfig
    t0_s : float
        Start of the record [s]: the patient is drug-naive there (state ``x0(theta)``).
    fixed : mapping, optional
        Values (declared units) of model parameters outside the population model, or
        overriding it, for every covariate value (e.g. the clock time of a circadian model).

    Raises
    ------
    ConfigError
        For an unknown output or parameter, a parameter without a random effect, no
        residual error for the output, an estimated lag time, or bad covariates.
    """

    def __init__(self, library_model: LibraryModel, covariates: Mapping[str, object],
                 config: EstimationConfig, *, t0_s: float = 0.0,
                 fixed: Mapping[str, float] | None = None) -> None:
        self.lm, self.config = library_model, config
        self.model = m = library_model.model
        pop = library_model.population
        if config.output not in m.output_names:
            raise ConfigError(f"estimation.output: model {m.name!r} has no output "
                              f"{config.output!r}{closest(config.output, m.output_names)}; "
                              f"outputs: {', '.join(m.output_names)}")
        residual = pop.residual_error(config.output)
        if residual is None:
            raise ConfigError(f"model {m.name!r} declares no residual error for "
                              f"{config.output!r}: MAP estimation needs one")
        self.residual: ResidualError = residual
        names = list(config.parameters) if config.parameters is not None else pop.eta_names
        if not names:
            raise ConfigError(f"model {m.name!r} has no random effects to estimate")
        for name in names:
            if name not in pop.eta_names:
                raise ConfigError(f"estimation.parameters: {name!r} has no random effect in "
                                  f"model {m.name!r}{closest(name, pop.eta_names)}; with "
                                  f"one: {', '.join(pop.eta_names)}")
        lags = {inp.lag for inp in m.inputs if inp.lag is not None} & set(names)
        if lags:
            raise ConfigError(f"estimation.parameters: lag times {sorted(lags)} cannot be "
                              f"estimated (a dose's time is not differentiable)")
        self.eta_names = tuple(names)
        pos = [pop.eta_names.index(n) for n in names]
        # The prior of the chosen etas is their MARGINAL, the submatrix of Omega: the etas
        # not estimated are not observed to be 0, they are left out (integrated over).
        # Conditioning on them being 0 (the inverse of the submatrix of Omega^-1) would
        # claim knowledge nobody has and shrink the chosen etas too far.
        self.omega = pop.omega[np.ix_(pos, pos)]
        iov = {r.param: r.omega2 for r in pop.occasion_effects} if config.occasions else {}
        self.kappa_names = tuple(n for n in names if n in iov)
        if self.kappa_names and config.prior_weight == 0:
            raise ConfigError(f"estimation.prior_weight = 0 with occasion effects on "
                              f"{', '.join(self.kappa_names)}: without a prior the readings "
                              f"cannot tell eta from the occasions' kappas; set occasions = "
                              f"False, or a prior weight > 0")
        # occasion effects are independent per parameter (PopulationModel.sample_occasion)
        self.pi = np.diag([iov[n] for n in self.kappa_names])
        self.t0_s = _time(t0_s, "t0_s")
        self._fixed = dict(fixed or {})
        self._eta_idx = tuple(m.param_index(n) for n in names)
        self._kappa_of = tuple(names.index(n) for n in self.kappa_names)
        # the record
        self._initial_covariates = dict(covariates)
        self._cov_changes: list[tuple[float, int, dict]] = []
        self._pieces: list[tuple[float, np.ndarray, dict]] = []
        self._rebuild_pieces(0)
        self._occasions = [self.t0_s]
        self._rates: list[list[tuple[float, float]]] = [[] for _ in m.inputs]
        self._boluses: list[tuple[float, int, float]] = []
        self._readings: list[_Reading] = []
        self._excluded: list[tuple[float, float, str]] = []
        self._seq = itertools.count()
        self._lags = self._lag_times()
        # how to integrate
        # affine dynamics: exact discretisation (at each segment's midpoint if they vary in
        # time); otherwise RK4
        self._affine = m.is_affine
        self._varying = self._varies_in_time()
        self._squarings = self._choose_squarings() if self._affine else 0
        self._rk4 = 0.0 if self._affine else self._rk4_step(self._pieces[0][1])
        self._limits: dict[bytes, float] = {}
        # the estimate w = [eta, kappa of each occasion slot, d] and the arrival cost
        self._n_occ = 1 if self.kappa_names else 0
        self._lam, self._mean = self._prior(self._n_occ)
        self._arrival_const = 0.0
        self._w_hat = np.zeros(self._lam.shape[0])
        # the window: the fit starts here, from this state (None: x0 at the record's start)
        self._start_s = self.t0_s
        self._start_state: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._retired: set[int] = set()
        self._last: EstimationResult | None = None
        self._fit_readings: tuple[int, ...] = ()
        self._earliest_change = math.inf
        self._now = self.t0_s
        self._state_cache: tuple[float, np.ndarray, np.ndarray] | None = None
        #: number of fits solved so far
        self.refits = 0

    # ------------------------------------------------------------------ telling it
    def add_reading(self, t_meas_s: float, value: float, *, blq: bool = False) -> None:
        """A reading sampled at *t_meas_s* [s] (it may arrive hours later), in the output's
        unit. With *blq* it is below the limit of quantification and *value* is that limit.
        A reading that cannot be used (not a number, before the record, not > 0 under an
        exponential error) is left out of every fit and listed in the results'
        ``excluded``: it never raises."""
        try:
            t, y = float(t_meas_s), float(value)
        except (TypeError, ValueError):
            self._excluded.append((math.nan, math.nan,
                                   f"not a number: t={t_meas_s!r}, value={value!r}"))
            return
        reason = None
        if not (math.isfinite(t) and math.isfinite(y)):
            reason = "not a finite number"
        elif t < self.t0_s:
            reason = f"sampled before the record starts ({self.t0_s} s)"
        elif self.residual.kind == "exponential" and y <= 0:
            reason = "not > 0 under an exponential residual error"
        if reason is not None:
            self._excluded.append((t, y, reason))
            self._earliest_change = -math.inf   # the results list it
            return
        lloq = self.config.lloq
        if lloq is not None and y < lloq and not blq:
            y, blq = float(lloq), True
        reading = _Reading(t, y, bool(blq), next(self._seq))
        bisect.insort_right(self._readings, reading, key=lambda r: (r.t_s, r.seq))
        if t < self._start_s:
            # older than the window: straight into the arrival cost
            self._absorb(self._table(self.t0_s, t, [reading]), None, [reading], None)
            self._earliest_change = -math.inf

    def delivered(self, t_s: float, rates_by_input: Mapping[str, float]) -> None:
        """The rates [input amount unit / s] the pumps delivered from *t_s* [s] on, until the
        next change recorded (a report about the past, e.g. an occlusion, takes its place in
        time; as MPCController.applied keeps its timeline). Inputs not named keep theirs."""
        t = self._record_time(t_s, "delivered")
        checked = {self._input(name, "delivered"): _amount(rate, f"delivered {name!r} rate")
                   for name, rate in rates_by_input.items()}
        for j, rate in checked.items():
            steps = self._rates[j]
            k = bisect.bisect_left(steps, t, key=lambda s: s[0])
            if k < len(steps) and steps[k][0] == t:
                if steps[k][1] == rate:
                    continue
                steps[k] = (t, rate)
            elif rate == (steps[k - 1][1] if k else 0.0):
                continue                        # no breakpoint where nothing changes
            else:
                steps.insert(k, (t, rate))
            self._changed(t)

    def add_dose(self, dose: Dose) -> None:
        """A dose record: a bolus, or an infusion added to whatever else runs."""
        j = self._input(dose.input, "dose")
        t = self._record_time(dose.time_s, "dose")
        if dose.is_bolus:
            self._boluses.append((t, j, float(dose.amount)))
        else:
            steps, end = self._rates[j], t + dose.duration_s
            for at in (t, end):
                k = bisect.bisect_right(steps, at, key=lambda s: s[0])
                if k == 0 or steps[k - 1][0] != at:
                    steps.insert(k, (at, steps[k - 1][1] if k else 0.0))
            steps[:] = [(at, r + dose.rate if t <= at < end else r) for at, r in steps]
        self._changed(t)

    def bolus(self, t_s: float, input: str, amount: float) -> None:
        """A bolus of *amount* (the input's amount unit) given at *t_s* [s]."""
        self.add_dose(Dose.bolus(t_s, input, amount))

    def covariates_from(self, t_s: float, covariates: Mapping[str, object]) -> None:
        """Covariates that hold from *t_s* [s] on (LOCF), merged over the values before.

        Raises
        ------
        ConfigError
            For an unknown covariate or a value outside its range; nothing is changed.
        """
        t = self._record_time(t_s, "covariates_from")
        change = (t, next(self._seq), dict(covariates))
        saved = list(self._cov_changes), list(self._pieces)
        bisect.insort_right(self._cov_changes, change, key=lambda c: (c[0], c[1]))
        try:
            self._rebuild_pieces(self._cov_changes.index(change))
        except (ConfigError, ModelError):
            self._cov_changes, self._pieces = saved
            raise
        self._changed(t)

    def new_occasion(self, t_s: float) -> None:
        """A new occasion (inter-occasion variability) starts at *t_s* [s]."""
        t = self._record_time(t_s, "new_occasion")
        if t not in self._occasions:
            bisect.insort(self._occasions, t)
            self._changed(t)

    # ------------------------------------------------------------------ estimating
    def update(self, now_s: float) -> EstimationResult:
        """The MAP estimate given the record up to *now_s* [s]. Refits when a reading was
        sampled, or the record changed before the latest reading, since the last fit;
        otherwise returns the last result itself."""
        now = _time(now_s, "now_s")
        if now < self._now:
            raise ConfigError(f"update: now_s went back from {self._now} s to {now} s")
        self._now = now
        usable = self._usable(now)
        window = self.config.window
        if window is not None and len(usable) > window and \
                (self._last is None or self._last.success):
            self._slide_window(usable)
            usable = self._usable(now)
        latest = max((r.t_s for r in self._readings if r.seq in set(usable)),
                     default=-math.inf)
        if self._last is not None and usable == self._fit_readings and \
                self._earliest_change > latest:
            self._earliest_change = math.inf
            return self._last
        self._earliest_change = math.inf
        self._fit_readings = usable
        self._last = self._fit(now)
        self.refits += 1
        return self._last

    def _usable(self, now: float) -> tuple[int, ...]:
        """The readings a fit at *now* takes (sampled by then, not yet left the window)."""
        return tuple(r.seq for r in self._readings
                     if r.t_s <= now and r.seq not in self._retired)

    @property
    def result(self) -> EstimationResult | None:
        """The last result (None before the first update)."""
        return self._last

    @property
    def theta(self) -> np.ndarray:
        """The parameter vector for planning (model order, declared units): the typical
        values at the last update's time with the last successful ``exp(eta)``, without the
        occasions' kappas."""
        return self.theta_at(self._now)

    def theta_at(self, t_s: float) -> np.ndarray:
        """The planning parameter vector with the covariates in force at *t_s* [s]."""
        theta = self._piece(t_s)[1].copy()
        theta[list(self._eta_idx)] *= np.exp(self._w_hat[:len(self.eta_names)])
        return theta

    def state(self, now_s: float) -> np.ndarray:
        """The state at *now_s* [s] (declared units) under the last successful estimate
        (etas and the occasions' kappas), propagated through the delivered record (from the
        state last asked for when the estimate and the record before it are unchanged: a
        controller asking every cycle integrates one cycle, not the record)."""
        now = _time(now_s, "now_s")
        if now < self._start_s:
            raise ConfigError(f"state: {now} s is before the start of the fit "
                              f"({self._start_s} s)")
        cached = self._state_cache
        if cached is not None and cached[0] <= now and np.array_equal(cached[2], self._w_hat):
            table = self._table(cached[0], now, [])    # (may add occasion slots to w)
            start_state = (cached[1], np.zeros((self.model.n_states, self._w_hat.size)),
                           self._w_hat.copy())
        else:
            table, start_state = self._table(self._start_s, now, []), self._start_state
        problem, params = self._problem_for(table, start_state)
        _, _, x_end = problem.evaluate(self._w_hat, params)
        x = np.asarray(x_end, dtype=float).ravel()
        self._state_cache = (now, x.copy(), self._w_hat.copy())
        return x

    # ------------------------------------------------------------------ the fit
    def _fit(self, now: float) -> EstimationResult:
        start = time.perf_counter()
        in_fit = set(self._fit_readings)
        table = self._table(self._start_s, now, [r for r in self._readings if r.seq in in_fit])
        problem, params = self._problem_for(table, self._start_state)
        lbx, ubx = self._bounds(table.n_occ)
        free = np.flatnonzero(lbx < ubx)
        if not table.readings:
            # nothing to fit: the prior (or the arrival cost) is the estimate
            w = self._mean.copy()
            precision = self._lam[np.ix_(free, free)]
            # (no prior either, prior_weight 0: nothing is known, said by NaN)
            cov = np.linalg.inv(precision) if np.linalg.matrix_rank(precision) == \
                precision.shape[0] else np.full(precision.shape, np.nan)
            return self._result(True, "no readings: the prior", 0, start, now, w,
                                self._arrival_const, cov, free, table, np.empty(0))
        out = problem.solver(x0=np.clip(self._w_hat, lbx, ubx), p=params, lbx=lbx, ubx=ubx)
        stats = problem.solver.stats()
        w = np.asarray(out["x"], dtype=float).ravel()
        status = str(stats.get("return_status", "unknown"))
        success = bool(stats.get("success", False)) and bool(np.all(np.isfinite(w)))
        boxed = free[np.isfinite(ubx[free])]
        near = 1e-6 * (1.0 + ubx[boxed])
        if success and np.any((w[boxed] - lbx[boxed] < near) | (ubx[boxed] - w[boxed] < near)):
            success, status = False, "at_bound"     # an estimate 5 SDs out: not planned with
        objective, preds, _ = problem.evaluate(w, params)
        cov = self._covariance(problem, w, params, free)
        if success:
            self._w_hat = w.copy()
        preds = np.asarray(preds, dtype=float).ravel()[table.reading_segments]
        return self._result(success, status, int(stats.get("iter_count", 0)), start, now, w,
                            float(objective) + self._arrival_const, cov, free, table, preds)

    @staticmethod
    def _covariance(problem: _Problem, w: np.ndarray, params: np.ndarray,
                    free: np.ndarray) -> np.ndarray:
        """The inverse of half the objective's Hessian at *w* over the free entries (the
        Laplace approximation of the posterior); NaN when not positive definite."""
        hess = problem.hessian(w, params)[np.ix_(free, free)]
        half = 0.25 * (hess + hess.T)
        if not np.all(np.isfinite(half)):
            return np.full(half.shape, np.nan)
        try:
            inv = np.linalg.inv(np.linalg.cholesky(half))
        except np.linalg.LinAlgError:
            return np.full(half.shape, np.nan)
        return inv.T @ inv

    def _result(self, success: bool, status: str, iterations: int, start: float, now: float,
                w: np.ndarray, objective: float, covariance: np.ndarray, free: np.ndarray,
                table: _Table, predictions: np.ndarray) -> EstimationResult:
        ne, nk = len(self.eta_names), len(self.kappa_names)
        names = [f"eta_{n}" for n in self.eta_names]
        names += [f"kappa{o}_{n}" for o in range(self._n_occ) for n in self.kappa_names]
        names += ["d"] if self.config.disturbance else []
        kappa = tuple({n: float(w[ne + o * nk + s]) for s, n in enumerate(self.kappa_names)}
                      for o in range(table.n_occ))
        theta = self._piece(now)[1].copy()
        theta[list(self._eta_idx)] *= np.exp(w[:ne])
        readings = table.readings
        return EstimationResult(
            success, status, iterations, time.perf_counter() - start, now,
            {n: float(v) for n, v in zip(self.eta_names, w[:ne])}, kappa,
            float(w[-1]) if self.config.disturbance else 0.0,
            {q.name: float(v) for q, v in zip(self.model.params, theta)}, objective,
            tuple(names[k] for k in free), w[free].copy(), covariance,
            np.array([r.t_s for r in readings]), np.array([r.value for r in readings]),
            predictions, np.array([r.blq for r in readings], dtype=bool),
            tuple(self._excluded))

    # ------------------------------------------------------------------ the window
    def _slide_window(self, usable: tuple[int, ...]) -> None:
        """The oldest readings beyond the window leave into the arrival cost, expanded at the
        last successful fit (which had them, unless they came back late); the fit then
        starts at the first reading kept (readings sampled at one time leave together)."""
        in_fit = [r for r in self._readings if r.seq in set(usable)]
        excess = len(in_fit) - self.config.window
        while 0 < excess < len(in_fit) and in_fit[excess].t_s == in_fit[excess - 1].t_s:
            excess -= 1
        if excess <= 0:
            return
        leaving, new_start = in_fit[:excess], in_fit[excess].t_s
        self._absorb(self._table(self._start_s, new_start, leaving), self._start_state,
                     leaving, new_start)

    def _absorb(self, table: _Table, start_state, leaving: Sequence[_Reading],
                new_start: float | None) -> None:
        """Add the second-order expansion of the terms of *leaving* (the readings of *table*)
        at the current estimate to the arrival cost; with *new_start* [s] (the end of
        *table*), the fit then starts there, from the state's first-order expansion."""
        problem, params = self._problem_for(table, start_state)
        w0 = self._w_hat.copy()
        lik, grad, hess, x_end, jac = (np.asarray(v, dtype=float)
                                       for v in problem.parts()(w0, params))
        lam, mean = self._lam, self._mean
        hess = 0.5 * (hess + hess.T)
        lam_new = lam + 0.5 * hess
        vals, vecs = np.linalg.eigh(lam_new)
        floor = 1e-9 * np.max(vals)
        if np.min(vals) < floor:
            lam_new = (vecs * np.clip(vals, floor, None)) @ vecs.T
            hess = 2 * (lam_new - lam)
        mean_new = np.linalg.solve(lam_new, lam @ mean + 0.5 * hess @ w0 - 0.5 * grad.ravel())
        if self.config.disturbance and self.config.q_d > 0:
            cov = np.linalg.inv(lam_new)
            cov[-1, -1] += self.config.q_d * len(leaving)
            lam_new = np.linalg.inv(cov)
        # the constant keeps the objective's value: old arrival + their terms at w0
        self._arrival_const += (float((w0 - mean) @ lam @ (w0 - mean)) + lik.item()
                                - float((w0 - mean_new) @ lam_new @ (w0 - mean_new)))
        self._lam, self._mean = lam_new, mean_new
        self._retired.update(r.seq for r in leaving)
        if new_start is not None:
            self._start_state = (x_end.ravel(), jac.reshape(self.model.n_states, -1), w0)
            self._start_s = new_start

    # ------------------------------------------------------------------ the record as data
    def _table(self, t_start: float, t_end: float, readings: Sequence[_Reading]) -> _Table:
        """Segments from *t_start* to *t_end* [s], with breakpoints at every event (rate
        change, bolus, covariate change, occasion, reading), too long ones split.

        A reading at *t_end* is in the table (a zero-length segment); the state after the
        last segment is the state at *t_end*, before any bolus given then."""
        m = self.model
        occ_used = self._occasion_index(t_end) + 1
        if self.kappa_names and occ_used > self._n_occ:
            self._grow_occasions(occ_used)
        times = {t_start, t_end}
        times.update(p[0] for p in self._pieces)
        times.update(self._occasions)
        for j, steps in enumerate(self._rates):
            times.update(t + self._lags[j] for t, _ in steps)
        times.update(t + self._lags[j] for t, j, _ in self._boluses)
        times.update(r.t_s for r in readings)
        breaks = sorted(t for t in times if t_start <= t <= t_end)
        at_time: dict[float, list[_Reading]] = {}
        for r in sorted(readings, key=lambda r: (r.t_s, r.seq)):
            at_time.setdefault(r.t_s, []).append(r)
        cols: list[np.ndarray] = []
        reading_segments, ordered = [], []
        no_bolus = np.zeros(m.n_inputs)
        boluses: dict[float, np.ndarray] = {}
        for tb, j, amount in self._boluses:
            boluses.setdefault(tb + self._lags[j], np.zeros(m.n_inputs))[j] += amount
        for i, t in enumerate(breaks):
            dt = breaks[i + 1] - t if i + 1 < len(breaks) else 0.0
            here = at_time.get(t, [])
            if dt == 0.0 and not here:
                continue
            theta = self._piece(t)[1]
            occ = self._occasion_index(t)
            u = np.array([self._rate_at(j, t - self._lags[j]) for j in range(m.n_inputs)])
            bolus = boluses.get(t, no_bolus) if t < t_end else no_bolus
            # readings first (at the state before the bolus), the last one carries the step
            for k, r in enumerate(here):
                last = k == len(here) - 1
                reading_segments.append(len(cols))
                ordered.append(r)
                cols.append(self._column(t, dt if last else 0.0, u,
                                         bolus if last else no_bolus, theta, occ, r))
            if not here:
                cols.append(self._column(t, dt, u, bolus, theta, occ, None))
            limit = self._segment_limit(theta)
            if dt > limit:
                parts = math.ceil(dt / limit)
                cols[-1][1] = dt / parts
                cols += [self._column(t + k * dt / parts, dt / parts, u, no_bolus, theta, occ,
                                      None) for k in range(1, parts)]
        if not cols:   # nothing happens: one empty segment at the start
            cols.append(self._column(t_start, 0.0, np.zeros(m.n_inputs), no_bolus,
                                     self._piece(t_start)[1], self._occasion_index(t_start),
                                     None))
        return _Table(np.array(cols, dtype=float).T, reading_segments, ordered, occ_used)

    def _column(self, t: float, dt: float, u: np.ndarray, bolus: np.ndarray,
                theta: np.ndarray, occ: int, reading: _Reading | None) -> np.ndarray:
        """One segment: start [s], length [s], rates, boluses at its start, typical
        parameters, occasion (one-hot), and its reading (value, present, below LLOQ)."""
        onehot = np.zeros(self._n_occ)
        if self._n_occ:
            onehot[occ] = 1.0
        # no reading: a harmless value (its term is switched off, not evaluated as 0 * NaN)
        y, obs, blq = ((reading.value, 1.0, float(reading.blq)) if reading is not None
                       else (1.0, 0.0, 0.0))
        return np.concatenate([[t, dt], u, bolus, theta, onehot, [y, obs, blq]])

    def _problem_for(self, table: _Table, start_state) -> tuple[_Problem, np.ndarray]:
        """The problem with room for *table* and its parameter vector (the table padded with
        segments in which no time passes, the arrival cost, the start state)."""
        m = self.model
        n_seg = table.columns.shape[1]
        layout = self._layout(n_seg)
        problem = _problem(m, layout)
        pad = table.columns[:, -1].copy()
        pad[1] = 0.0                                    # no time passes
        pad[2 + m.n_inputs:2 + 2 * m.n_inputs] = 0.0    # no bolus
        pad[-2] = 0.0                                   # no reading
        cols = np.repeat(pad[:, None], layout.n_seg, axis=1)
        cols[:, :n_seg] = table.columns
        n, nw = m.n_states, layout.n_w
        if start_state is None:
            start = [np.zeros(n), np.zeros(n * nw), np.zeros(nw), np.ones(1)]
        else:
            xbar, jx, wbar = start_state
            start = [xbar, jx.ravel(order="F"), wbar, np.zeros(1)]
        params = np.concatenate([cols.ravel(order="F"), self._lam.ravel(order="F"),
                                 self._mean, *start])
        return problem, params

    def _layout(self, n_seg: int) -> _Layout:
        r = self.residual
        return _Layout(self._affine, self._squarings, _capacity(n_seg), self._n_occ,
                       self._eta_idx, self._kappa_of, self.config.disturbance,
                       self.model.output_index(self.config.output),
                       (r.kind, float(r.additive), float(r.proportional)),
                       self.config.max_iter, self.config.tol)

    # ------------------------------------------------------------------ prior and bounds
    def _prior(self, n_occ: int) -> tuple[np.ndarray, np.ndarray]:
        """Precision and mean of the population prior of w = [eta, kappa of each occasion
        slot, d], on the objective's scale ``(w - m)' Lambda (w - m)``."""
        weight = float(self.config.prior_weight)
        blocks = [weight * np.linalg.inv(self.omega)]
        if self.kappa_names:
            blocks += [weight * np.linalg.inv(self.pi)] * n_occ
        if self.config.disturbance:
            blocks.append(np.array([[1.0 / self.config.disturbance_sd**2]]))
        size = sum(b.shape[0] for b in blocks)
        lam, k = np.zeros((size, size)), 0
        for b in blocks:
            lam[k:k + b.shape[0], k:k + b.shape[0]] = b
            k += b.shape[0]
        return lam, np.zeros(size)

    def _grow_occasions(self, n_occ: int) -> None:
        """Room for more occasions: the new kappas enter with the population prior."""
        ne, nk, old = len(self.eta_names), len(self.kappa_names), self._n_occ
        new = max(n_occ, 2 * old)
        kept = list(range(ne + nk * old))       # eta and the kappas so far keep their place
        old_pos = kept + ([ne + nk * old] if self.config.disturbance else [])
        new_pos = kept + ([ne + nk * new] if self.config.disturbance else [])
        lam, _ = self._prior(new)
        lam[np.ix_(new_pos, new_pos)] = self._lam[np.ix_(old_pos, old_pos)]
        mean, w = np.zeros(lam.shape[0]), np.zeros(lam.shape[0])
        mean[new_pos], w[new_pos] = self._mean[old_pos], self._w_hat[old_pos]
        if self._start_state is not None:
            xbar, jx, wbar = self._start_state
            jx2, wbar2 = np.zeros((jx.shape[0], lam.shape[0])), np.zeros(lam.shape[0])
            jx2[:, new_pos], wbar2[new_pos] = jx[:, old_pos], wbar[old_pos]
            self._start_state = (xbar, jx2, wbar2)
        self._lam, self._mean, self._w_hat, self._n_occ = lam, mean, w, new

    def _bounds(self, n_occ_used: int) -> tuple[np.ndarray, np.ndarray]:
        """The box of *eta_bound_sd* prior SDs; kappas of occasions not begun fixed at 0; the
        disturbance free."""
        b = self.config.eta_bound_sd
        kappa_sd = np.sqrt(np.diag(self.pi)) if self.kappa_names else np.zeros(0)
        ub = [b * np.sqrt(np.diag(self.omega))]
        ub += [b * kappa_sd if o < n_occ_used else 0 * kappa_sd for o in range(self._n_occ)]
        ub += [[math.inf]] if self.config.disturbance else []
        ub = np.concatenate(ub)
        return -ub, ub

    # ------------------------------------------------------------------ integration choices
    def _varies_in_time(self) -> bool:
        """Whether the dynamics vary in time for the values at hand: a circadian model does
        not while its amplitudes are 0 and not estimated (as Propagator decides)."""
        m = self.model
        if not m.is_time_varying:
            return False
        amplitudes = [k for k, q in enumerate(m.params) if "_amplitude_" in q.name
                      and q.name in m.zero_default_params]
        if not amplitudes or set(amplitudes) & set(self._eta_idx):
            return True
        return any(np.any(theta[amplitudes] != 0.0) for _, theta, _ in self._pieces)

    def _varying_step(self) -> float:
        """Longest segment [s] of a time-varying affine model, whose matrices are frozen at
        each segment's midpoint (second order in the segment): a 96th of the shortest
        circadian period, 15 min for 24 h (5-FU during a 46-h infusion: predictions within
        3.5e-4 of CVODES at 15 min, 4e-5 at 5 min; its residual SD is 58 %)."""
        if self.config.max_step_s is not None:
            return float(self.config.max_step_s)
        periods = [c.period_h * 3600.0 for c in self.model.circadian]
        return min(periods) / 96.0 if periods else 900.0

    def _box_corners(self, theta: np.ndarray, width_sd: float):
        """Parameter vectors at the corners of a box of *width_sd* prior SDs (eta + kappa)."""
        sd = np.sqrt(np.diag(self.omega)).copy()
        for slot, j in enumerate(self._kappa_of):
            sd[j] += math.sqrt(self.pi[slot, slot])
        for signs in itertools.product((-1.0, 1.0), repeat=len(sd)):
            p = theta.copy()
            p[list(self._eta_idx)] *= np.exp(width_sd * sd * np.array(signs))
            yield p

    def _largest_rate(self, theta: np.ndarray) -> float:
        """The largest ``|A|_1`` [1/s] over the box the solver stays in, from its corners
        (exact for rate constants monotone in each parameter: mammillary, effect-site,
        transit models) and, for a time-varying model, 48 times over a day."""
        m = self.model
        times = np.linspace(0.0, 86400.0, 48, endpoint=False) if self._varying else [0.0]
        return max(float(np.linalg.norm(np.asarray(m.affine_terms(t, p)[0], dtype=float)
                                        .reshape(m.n_states, m.n_states), 1))
                   for p in self._box_corners(theta, self.config.eta_bound_sd)
                   for t in times)

    def _choose_squarings(self) -> int:
        """Squarings making a 24-h segment at the fastest rate over the box accurate."""
        need = self._largest_rate(self._pieces[0][1]) * _REFERENCE_SEGMENT_S / _SCALED_NORM
        return int(min(30, max(4, math.ceil(math.log2(max(need, 1.0))))))

    def _rk4_step(self, theta: np.ndarray) -> float:
        """RK4 step [s] for a nonlinear model: 0.2 over the largest ``|df/dx|_1`` at the
        initial state with the random effects at +-2 prior SDs (RK4 stays stable up to 14
        times that rate; the box's corners would ask for needlessly small steps)."""
        if self.config.max_step_s is not None:
            return float(self.config.max_step_s)
        m = self.model
        t, x, u = ca.SX.sym("t"), ca.SX.sym("x", m.n_states), ca.SX.sym("u", m.n_inputs)
        p = ca.SX.sym("p", len(m.params))
        jac = ca.Function("state_jacobian", [t, x, u, p], [ca.jacobian(m.f(t, x, u, p), x)])
        rate = max(float(np.linalg.norm(np.asarray(jac(0.0, m.initial_state(q),
                                                        np.zeros(m.n_inputs), q), float), 1))
                   for q in self._box_corners(theta, 2.0))
        return _RK4_STEP_RATE / max(rate, 1e-12)

    def _segment_limit(self, theta: np.ndarray) -> float:
        """The longest segment [s] integrated in one step with typical values *theta*."""
        if not self._affine:
            return self._rk4
        key = theta.tobytes()
        if key not in self._limits:
            rate = self._largest_rate(theta)
            limit = _SCALED_NORM * 2.0**self._squarings / max(rate, 1e-300)
            self._limits[key] = min(limit, self._varying_step()) if self._varying else limit
        return self._limits[key]

    # ------------------------------------------------------------------ small helpers
    def _rebuild_pieces(self, first: int) -> None:
        """Typical parameter vectors of the covariate pieces from change *first* on."""
        if first == 0 or not self._pieces:
            merged = dict(self._initial_covariates)
            pieces = [(self.t0_s, self._typical(merged, "covariates"), merged)]
            first = 0
        else:
            pieces = self._pieces[:first + 1]
            merged = dict(pieces[-1][2])
        for t, _, change in self._cov_changes[first:]:
            merged = _merge_covariates(merged, change, self.lm.population.covariates)
            pieces.append((t, self._typical(merged, f"covariates_from({t} s)"), merged))
        self._pieces = pieces

    def _typical(self, covariates: Mapping[str, object], where: str) -> np.ndarray:
        pop = self.lm.population
        checked = parse_covariates(covariates, pop.covariates, where=where)
        values = dict(pop.fixed)
        values.update(pop.typical(checked, pop.theta))
        values.update(self._fixed)
        return self.model.parameter_vector(values)

    def _piece(self, t: float) -> tuple[float, np.ndarray, dict]:
        k = bisect.bisect_right(self._pieces, t, key=lambda p: p[0]) - 1
        return self._pieces[max(k, 0)]

    def _occasion_index(self, t: float) -> int:
        return max(bisect.bisect_right(self._occasions, t) - 1, 0)

    def _rate_at(self, j: int, t: float) -> float:
        steps = self._rates[j]
        k = bisect.bisect_right(steps, t, key=lambda s: s[0]) - 1
        return steps[k][1] if k >= 0 else 0.0

    def _lag_times(self) -> list[float]:
        """Lag time [s] of each input at the typical values at the start (not estimated)."""
        m, theta = self.model, self._pieces[0][1]
        return [convert(theta[m.param_index(inp.lag)], m.parameter(inp.lag).unit, "s")
                if inp.lag is not None else 0.0 for inp in m.inputs]

    def _input(self, name: str, where: str) -> int:
        if name not in self.model.input_names:
            raise ConfigError(f"{where}: model {self.model.name!r} has no input {name!r}"
                              f"{closest(name, self.model.input_names)}; its inputs: "
                              f"{', '.join(self.model.input_names)}")
        return self.model.input_index(name)

    def _record_time(self, t_s: float, where: str) -> float:
        t = _time(t_s, f"{where}: t_s")
        if t < self.t0_s:
            raise ConfigError(f"{where}: t_s = {t} s is before the start of the record "
                              f"({self.t0_s} s)")
        if t < self._start_s:
            raise ConfigError(f"{where}: t_s = {t} s is before the window, which starts at "
                              f"{self._start_s} s (what came before it is summarised)")
        return t

    def _changed(self, t: float) -> None:
        self._earliest_change = min(self._earliest_change, t)
        if self._state_cache is not None and t < self._state_cache[0]:
            self._state_cache = None


# ---------------------------------------------------------------------------- one-off
def map_fit(library_model: LibraryModel, covariates: Mapping[str, object],
            config: EstimationConfig, doses: Sequence[Dose],
            observations: Sequence[tuple[float, float] | tuple[float, float, bool]], *,
            covariate_changes: Sequence[tuple[float, Mapping[str, object]]] = (),
            occasions_s: Sequence[float] = (), now_s: float | None = None,
            fixed: Mapping[str, float] | None = None) -> EstimationResult:
    """A one-off MAP fit of one patient's record: *doses*, *observations* ``(t_s, value)`` or
    ``(t_s, value, below_lloq)``, covariate changes ``(t_s, covariates)`` and occasion starts
    [s]. The fit covers the record up to *now_s* (the last event when not given)."""
    est = BayesianEstimator(library_model, covariates, config, fixed=fixed)
    for dose in doses:
        est.add_dose(dose)
    for t, cov in covariate_changes:
        est.covariates_from(t, cov)
    for t in occasions_s:
        est.new_occasion(t)
    for obs in observations:
        est.add_reading(obs[0], obs[1], blq=bool(obs[2]) if len(obs) > 2 else False)
    if now_s is None:
        ends = [d.time_s + d.duration_s for d in doses] + \
            [float(o[0]) for o in observations if math.isfinite(float(o[0]))] + \
            [t for t, _ in covariate_changes] + list(occasions_s) + [0.0]
        now_s = max(ends)
    return est.update(now_s)


def _merge_covariates(current: Mapping[str, object], change: Mapping[str, object],
                      declared) -> dict:
    """*current* with *change* applied; a changed key given with a unit suffix replaces the
    declared name (``crcl_mL_per_min`` replaces ``crcl``)."""
    by_name = {c.name for c in declared}
    merged = dict(current)
    for key, value in change.items():
        try:
            name, _ = split_unit_suffix(key, by_name)
        except UnitError:
            name = key
        for old in list(merged):
            try:
                old_name, _ = split_unit_suffix(old, by_name)
            except UnitError:
                old_name = old
            if old_name == name:
                del merged[old]
        merged[key] = value
    return merged


def _capacity(n: int) -> int:
    """Segments the problem is built for: at least *n*, growing by about a quarter, so a
    growing record rebuilds rarely and pads little."""
    cap = 16
    while cap < n:
        cap = int(math.ceil(cap * 1.25 / 8.0)) * 8
    return cap


def _time(value: object, what: str) -> float:
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a time in s, got {value!r}") from None
    if not math.isfinite(t):
        raise ConfigError(f"{what}: expected a finite time in s, got {value!r}")
    return t


def _amount(value: object, what: str) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a number >= 0, got {value!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise ConfigError(f"{what}: expected a finite number >= 0, got {value!r}")
    return v
