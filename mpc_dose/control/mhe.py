"""Estimation of output-map parameters and an output disturbance: a moving-horizon
estimator (MHE) and an extended Kalman filter (EKF) of the same model.

With only an effect measured (BIS), estimating PK states and PD parameters jointly is poorly
conditioned (DESIGN). So the states are propagated exactly from the infusions actually given,
with the controller's PK model, and the estimators estimate what the measurement informs
well: the parameters of the output map (e.g. c50p, c50r, gamma of the BIS surface) and an
additive output disturbance.

The model of both: the parameters are log-normal (``theta = theta_pop * exp(eta)``) with the
population prior ``eta ~ N(0, Omega)`` at the start, and random walks ``eta_i = eta_{i-1} +
N(0, q_eta)``, ``d_i = d_{i-1} + N(0, q_d)`` from sample to sample; ``d_0 ~ N(0,
disturbance_sd^2)``; each reading ``y_i = h(x_i, theta(eta_i)) + d_i + N(0, noise_sd^2)``.

The EKF takes one reading at a time. The MHE solves, over a window of the latest readings,
the Bayesian MAP problem (Rao, Rawlings & Lee 2003: the arrival cost is the EKF's estimate
and covariance of everything before the window, so the population prior enters at the start
and is carried forward)::

    min  |L'(z_0 - z_bar)|^2 + sum_i ((y_i - h(x_i, theta(eta)) - d_i) / noise_sd)^2
         + sum_i (d_i - d_{i-1})^2 / q_d,        z_0 = [eta, d_0],  L L' = P_bar^-1
    s.t. |eta_j| <= eta_bound_sd * sqrt(Omega_jj)

with the parameters constant inside the window (their random walk is slow; it widens the
arrival cost) and the disturbance a random walk, one value per reading, so a step shows in
a few readings instead of half a window. Readings leaving the window are filtered into the
arrival cost by the EKF; with an output linear in the unknowns the MHE is the Kalman filter.
The problem is built once (window values are parameters) and solved by SQP with the exact
Hessian (made convex) and a sparse QP (qrqp), IPOPT as the fallback; every call reports
success and status.

This module knows model/, not plant/ nor transports.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass

import casadi as ca
import numpy as np

from ..errors import ConfigError
from ..model.spec import Model
from .solvers import ipopt_solver, quiet_native_stdout, sqp_solver

__all__ = ["MHEConfig", "MHEResult", "OutputMapMHE", "OutputMapEKF"]


@dataclass(frozen=True)
class MHEConfig:
    """What to estimate from which output, and the random walks of the estimators' model.

    Attributes
    ----------
    output : str
        The measured output.
    parameters : tuple of str
        Model parameters estimated (log-normal around the values given at construction).
    omega : array
        Prior covariance of their etas (log scale), ordered as *parameters*.
    noise_sd : float
        Measurement noise standard deviation (output unit).
    window : int
        Readings in the moving horizon (MHE).
    disturbance : bool
        Estimate an additive output disturbance.
    disturbance_sd : float
        Prior standard deviation of the disturbance at the start (output unit).
    q_eta, q_d : float
        Variances of the parameters' (log scale) and the disturbance's random walk per
        reading.
    eta_bound_sd : float
        The MHE keeps each eta within this many prior standard deviations (a constraint,
        which the EKF cannot impose): early in an induction an unmodelled delay reads as
        an insensitive patient, and an unbounded estimate overdoses.
    min_samples : int
        Readings before the MHE estimates anything (the prior is kept until then).
    """

    output: str
    parameters: tuple[str, ...]
    omega: tuple[tuple[float, ...], ...]
    noise_sd: float
    window: int = 60
    disturbance: bool = True
    disturbance_sd: float = 5.0
    q_eta: float = 1e-6
    q_d: float = 0.01
    eta_bound_sd: float = math.inf
    min_samples: int = 5

    def __post_init__(self) -> None:
        omega = np.asarray(self.omega, dtype=float)
        if omega.shape != (len(self.parameters),) * 2 or not np.all(np.isfinite(omega)) or \
                not np.allclose(omega, omega.T) or np.any(np.linalg.eigvalsh(omega) <= 0):
            raise ConfigError(f"mhe.omega: expected a symmetric positive definite "
                              f"{len(self.parameters)}x{len(self.parameters)} matrix")
        if not self.noise_sd > 0:
            raise ConfigError(f"mhe.noise_sd must be > 0, got {self.noise_sd!r}")
        for name in ("window", "min_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"mhe.{name} must be a whole number >= 0, got {value!r}")
        if not 1 <= self.min_samples <= self.window:
            raise ConfigError(f"mhe.min_samples: need 1 <= min_samples "
                              f"({self.min_samples}) <= window ({self.window})")
        if self.disturbance and not self.disturbance_sd > 0:
            raise ConfigError(f"mhe.disturbance_sd must be > 0, got {self.disturbance_sd!r}")
        for name in ("q_eta", "q_d"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ConfigError(f"mhe.{name}: expected a finite variance >= 0, "
                                  f"got {value!r}")
        if not self.eta_bound_sd > 0:
            raise ConfigError(f"mhe.eta_bound_sd: expected > 0 (prior standard deviations; "
                              f"inf for no bound), got {self.eta_bound_sd!r}")


@dataclass(frozen=True)
class MHEResult:
    """One estimate: parameter values, disturbance, and how the solve went."""

    success: bool
    status: str
    values: dict[str, float]
    eta: np.ndarray
    disturbance: float
    solve_time_s: float
    samples: int


class _OutputMap:
    """What both estimators share: the estimated parameters' indices and prior values."""

    def __init__(self, model: Model, theta: np.ndarray, config: MHEConfig) -> None:
        self.model, self.config = model, config
        self._k = model.output_index(config.output)
        self._idx = [model.param_index(name) for name in config.parameters]
        self.theta_prior = np.asarray(theta, dtype=float).copy()
        if np.any(self.theta_prior[self._idx] <= 0):
            raise ConfigError("mhe: estimated parameters must be positive (log-normal)")

    def _symbolic_theta(self, theta: ca.SX, eta: ca.SX) -> ca.SX:
        """*theta* with the estimated entries scaled by exp(eta)."""
        th = ca.SX(theta)
        for j, k in enumerate(self._idx):
            th[k] = theta[k] * ca.exp(eta[j])
        return th

    def _theta_of(self, eta: np.ndarray) -> np.ndarray:
        th = self.theta_prior.copy()
        th[self._idx] = self.theta_prior[self._idx] * np.exp(eta)
        return th

    def _values_of(self, eta: np.ndarray) -> dict[str, float]:
        th = self._theta_of(eta)
        return {name: float(th[k]) for name, k in zip(self.config.parameters, self._idx)}


class OutputMapEKF(_OutputMap):
    """Extended Kalman filter of the estimators' model, one reading at a time.

    The filter state ``z = [eta, d]`` starts at ``N(0, blockdiag(Omega, disturbance_sd^2))``.
    Same interface as the MHE: :meth:`add` each reading, :meth:`update`, then
    :attr:`theta` and :attr:`disturbance`; :attr:`mean` and :attr:`covariance` are the
    filter's ``z`` and ``P``.
    """

    def __init__(self, model: Model, theta: np.ndarray, config: MHEConfig) -> None:
        super().__init__(model, theta, config)
        ne = len(self._idx)
        self._z = np.zeros(ne + 1)
        self._P = self._prior_covariance()
        self.process_noise = np.diag([config.q_eta] * ne +
                                     [config.q_d if config.disturbance else 0.0])
        eta = ca.SX.sym("eta", ne)
        d, t = ca.SX.sym("d"), ca.SX.sym("t")
        x, u = ca.SX.sym("x", model.n_states), ca.SX.sym("u", model.n_inputs)
        th = self._symbolic_theta(ca.SX(ca.DM(self.theta_prior)), eta)
        y = model.h(t, x, u, th)[self._k] + d
        z = ca.vertcat(eta, d)
        # One filter step (random-walk prediction, then the measurement update) of the filter
        # state [z; vec(P)] as a CasADi function; the readings of a cycle run through it in
        # one call (fold), not as a dozen small numpy operations per reading.
        P = ca.SX.sym("P", ne + 1, ne + 1)
        y_meas = ca.SX.sym("y_meas")
        P_pred = P + ca.DM(self.process_noise)
        h = ca.jacobian(y, z)
        hp = ca.mtimes(h, P_pred)  # = (P h')' as P is symmetric
        gain = hp.T / (ca.mtimes(hp, h.T) + config.noise_sd**2)
        # P - K h P as an outer product: fewer operations, and P stays symmetric
        self._step = ca.Function("ekf_step", [ca.vertcat(z, ca.vec(P)), t, x, u, y_meas],
                                 [ca.vertcat(z + gain * (y_meas - y),
                                             ca.vec(P_pred - ca.mtimes(gain, hp)))])
        self._runs: dict[int, ca.Function] = {}
        self._pending: list[tuple[float, np.ndarray, np.ndarray, float]] = []

    def add(self, t_s: float, x: np.ndarray, u: np.ndarray, y: float) -> None:
        self._pending.append((t_s, np.asarray(x, float), np.asarray(u, float), float(y)))

    def update(self) -> MHEResult:
        """Process the readings added since the last update, in order."""
        start = time.perf_counter()
        count = len(self._pending)
        if count:
            run = self._runs.get(count)
            if run is None:  # the state after the last reading only
                run = self._runs[count] = self._step.fold(count)
            t, x, u, y = zip(*self._pending)
            state = np.asarray(run(np.concatenate([self._z, self._P.ravel(order="F")]),
                                   np.array(t)[None, :], np.array(x).T, np.array(u).T,
                                   np.array(y)[None, :]), float).ravel()
            n = self._z.size
            self._z = state[:n]
            self._P = state[n:].reshape(n, n, order="F")
        self._pending.clear()
        ok = bool(np.all(np.isfinite(self._z)) and np.all(np.isfinite(self._P)))
        if not ok:  # keep the filter usable: back to the prior
            self._z = np.zeros_like(self._z)
            self._P = self._prior_covariance()
        return MHEResult(ok, "updated" if ok else "diverged: reset to the prior",
                         self._values_of(self._z[:-1]), self._z[:-1].copy(),
                         self.disturbance, time.perf_counter() - start, count)

    def _prior_covariance(self) -> np.ndarray:
        ne = len(self._idx)
        P = np.zeros((ne + 1, ne + 1))
        P[:ne, :ne] = np.asarray(self.config.omega, dtype=float)
        P[ne, ne] = self.config.disturbance_sd**2 if self.config.disturbance else 0.0
        return P

    @property
    def mean(self) -> np.ndarray:
        """The filter state ``[eta, d]``."""
        return self._z.copy()

    @property
    def covariance(self) -> np.ndarray:
        return self._P.copy()

    @property
    def theta(self) -> np.ndarray:
        return self._theta_of(self._z[:-1])

    @property
    def disturbance(self) -> float:
        return float(self._z[-1]) if self.config.disturbance else 0.0


class OutputMapMHE(_OutputMap):
    """Moving-horizon estimator of the estimators' model (see the module's docstring).

    Parameters
    ----------
    model : Model
        The controller's model.
    theta : array
        Its parameter vector; the estimated parameters' values are the prior medians.
    config : MHEConfig
    """

    def __init__(self, model: Model, theta: np.ndarray, config: MHEConfig) -> None:
        super().__init__(model, theta, config)
        # readings that leave the window are filtered into the arrival cost
        self.arrival = OutputMapEKF(model, theta, config)
        self._samples: list[tuple[float, np.ndarray, np.ndarray, float]] = []  # time order
        ne = len(self._idx)
        self._eta = np.zeros(ne)
        # the disturbance at each slot of the window (one value when it is constant)
        self._n_d = (0 if not config.disturbance else
                     config.window if config.q_d > 0 else 1)
        self._d_path = np.zeros(self._n_d)
        self._d = 0.0
        self._dropped = 0  # readings gone to the arrival cost since the last solve
        # the etas within eta_bound_sd prior SDs; the disturbance free
        bound = config.eta_bound_sd * np.sqrt(np.diag(np.asarray(config.omega)))
        self._bounds = (np.concatenate([-bound, np.full(self._n_d, -np.inf)]),
                        np.concatenate([bound, np.full(self._n_d, np.inf)]))
        self._build()

    def _build(self) -> None:
        c, m = self.config, self.model
        M, n, nu, ne, nd = c.window, m.n_states, m.n_inputs, len(self._idx), self._n_d
        nz = ne + (1 if c.disturbance else 0)
        eta, d = ca.SX.sym("eta", ne), ca.SX.sym("d", nd)
        xs, us = ca.SX.sym("xs", n, M), ca.SX.sym("us", nu, M)
        ts, ys = ca.SX.sym("ts", M), ca.SX.sym("ys", M)
        mask = ca.SX.sym("mask", M)   # 1 for a reading in the window, 0 for an empty slot
        theta = ca.SX.sym("theta", len(m.params))
        z_bar = ca.SX.sym("z_bar", nz)
        sqrt_info = ca.SX.sym("L", nz, nz)  # chol(P_bar^-1): |L'(z - z_bar)|^2
        th = self._symbolic_theta(theta, eta)
        z0 = ca.vertcat(eta, d[0]) if nd else eta
        residuals = [ca.mtimes(sqrt_info.T, z0 - z_bar)]
        for i in range(M):
            y = m.h(ts[i], xs[:, i], us[:, i], th)[self._k]
            if nd:
                y = y + d[min(i, nd - 1)]
            residuals.append(mask[i] * (ys[i] - y) / c.noise_sd)
        if nd > 1:  # the random walk, also through empty slots (they carry d forward)
            residuals.append((d[1:] - d[:-1]) / np.sqrt(c.q_d))
        r = ca.vertcat(*residuals)
        w = ca.vertcat(eta, d)
        p = ca.vertcat(ca.vec(xs), ca.vec(us), ts, ys, mask, theta, z_bar, ca.vec(sqrt_info))
        nlp = {"x": w, "p": p, "f": 0.5 * ca.sumsqr(r)}
        # The exact Hessian: with a window of autocorrelated residuals their curvature is not
        # negligible (Gauss-Newton's Hessian underestimates gamma's curvature 2-3 fold in
        # TIVA inductions and took over 50 iterations). Unconstrained but for the
        # parameters' bounds, and banded: a sparse QP solver. A dual tolerance of 1e-4 is
        # far below what noisy readings resolve. Trial points of the line search far out
        # may evaluate to NaN; they are shortened, and not worth a warning each.
        self._sqp = sqp_solver("mhe_sqp", nlp, None, "qrqp", 50, dual_tolerance=1e-4,
                               show_eval_warnings=False)
        self._ipopt = ipopt_solver("mhe_ipopt", nlp, show_eval_warnings=False)

    def add(self, t_s: float, x: np.ndarray, u: np.ndarray, y: float) -> None:
        """Record one valid measurement *y* with the state *x* and rates *u* at *t_s*; the
        oldest reading leaves a full window into the arrival cost. A late reading takes its
        place in time order."""
        bisect.insort_right(self._samples, (t_s, np.asarray(x, float).copy(),
                                             np.asarray(u, float).copy(), float(y)),
                            key=lambda sample: sample[0])
        if len(self._samples) > self.config.window:
            self.arrival.add(*self._samples.pop(0))
            self._dropped += 1

    @property
    def theta(self) -> np.ndarray:
        """The current parameter vector (prior values with the estimated ones replaced)."""
        return self._theta_of(self._eta)

    @property
    def disturbance(self) -> float:
        """The disturbance at the latest reading."""
        return self._d

    def update(self) -> MHEResult:
        """Re-estimate over the current window (keeps the previous estimate on failure)."""
        c, m = self.config, self.model
        start = time.perf_counter()
        count = len(self._samples)
        if count < c.min_samples:
            return MHEResult(False, "too few samples", self._values_of(self._eta),
                             self._eta.copy(), self._d, 0.0, count)
        self.arrival.update()
        ne = len(self._idx)
        z_bar = self.arrival.mean if c.disturbance else self.arrival.mean[:ne]
        P_bar = (self.arrival.covariance + self.arrival.process_noise)[:z_bar.size, :z_bar.size]
        sqrt_info = np.linalg.cholesky(np.linalg.inv(0.5 * (P_bar + P_bar.T)))
        M = c.window
        xs = np.zeros((m.n_states, M))
        us = np.zeros((m.n_inputs, M))
        ts, ys, mask = np.zeros(M), np.zeros(M), np.zeros(M)
        for i, (t, x, u, y) in enumerate(self._samples):
            xs[:, i], us[:, i], ts[i], ys[i], mask[i] = x, u, t, y, 1.0
        # empty slots repeat the latest reading (masked): no 0/0 of an output at zero drug
        xs[:, count:], us[:, count:] = xs[:, count - 1:count], us[:, count - 1:count]
        ts[count:], ys[count:] = ts[count - 1], ys[count - 1]
        p = np.concatenate([xs.ravel(order="F"), us.ravel(order="F"), ts, ys, mask,
                            self.theta_prior, z_bar, sqrt_info.ravel(order="F")])
        # warm start: the previous path shifted by the readings that left the window
        shift = min(self._dropped, self._n_d)
        d0 = np.concatenate([self._d_path[shift:], np.full(shift, self._d)])
        w0 = np.concatenate([self._eta, d0])
        lbx, ubx = self._bounds
        w0 = np.clip(w0, lbx, ubx)
        status = "unknown"
        for solver in (self._sqp, self._ipopt):
            with quiet_native_stdout():
                out = solver(x0=w0, p=p, lbx=lbx, ubx=ubx)
            try:
                stats = solver.stats()
            except RuntimeError:  # sqpmethod leaves no status when its first QP fails
                stats = {"return_status": "QP failed at the first iteration"}
            w = np.asarray(out["x"], dtype=float).ravel()
            status = str(stats.get("return_status", "unknown"))
            if stats.get("success", False) and np.all(np.isfinite(w)) and \
                    np.all(np.abs(w[:ne]) < 5):  # |eta| < 5: within e^5 of the prior
                self._eta, self._d_path = w[:ne], w[ne:]
                if self._n_d:
                    self._d = float(self._d_path[min(count, self._n_d) - 1])
                self._dropped = 0
                return MHEResult(True, status, self._values_of(self._eta), self._eta.copy(),
                                 self._d, time.perf_counter() - start, count)
        return MHEResult(False, status, self._values_of(self._eta), self._eta.copy(),
                         self._d, time.perf_counter() - start, count)
