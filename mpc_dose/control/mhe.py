"""Moving-horizon estimation of output-map parameters and an output disturbance.

With only an effect measured (BIS), estimating PK states and PD parameters jointly is poorly
conditioned (DESIGN). So the states are propagated exactly from the infusions actually given,
with the controller's PK model, and the moving-horizon estimator (MHE) estimates what the
measurement informs well: the parameters of the output map (e.g. c50p, c50r, gamma of the
BIS surface) and an additive output disturbance, over a window of recent samples.

The parameters are log-normal (``theta = theta_pop * exp(eta)``) and the population prior
``eta ~ N(0, Omega)`` is the arrival cost, so each estimate is the Bayesian MAP of
model-informed precision dosing over the window::

    min  sum_i ((y_i - h(x_i, theta(eta)) - d) / sd)^2 + eta' Omega^-1 eta
         + ((d - d_prev) / sd_d)^2

The problem is built once (window values are parameters) and solved by Gauss-Newton SQP
(qpOASES), with IPOPT as the fallback; every call reports success and status.

This module knows model/, not plant/ nor transports.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import casadi as ca
import numpy as np

from ..errors import ConfigError
from ..model.spec import Model
from .solvers import gauss_newton_hessian, ipopt_solver, quiet_native_stdout, sqp_solver

__all__ = ["MHEConfig", "MHEResult", "OutputMapMHE", "OutputMapEKF"]


@dataclass(frozen=True)
class MHEConfig:
    """What to estimate from which output.

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
        Samples in the moving horizon.
    disturbance : bool
        Estimate an additive output disturbance.
    disturbance_sd : float
        Prior standard deviation of the disturbance's change between estimates.
    """

    output: str
    parameters: tuple[str, ...]
    omega: tuple[tuple[float, ...], ...]
    noise_sd: float
    window: int = 60
    disturbance: bool = True
    disturbance_sd: float = 5.0
    #: samples over which the disturbance reported to the controller is re-estimated once
    #: the parameters are (the mean residual): a step (surgical stimulation) shows in
    #: seconds instead of half a window. 0: use the window's own estimate.
    disturbance_window: int = 0
    min_samples: int = 5

    def __post_init__(self) -> None:
        omega = np.asarray(self.omega, dtype=float)
        if omega.shape != (len(self.parameters),) * 2 or not np.all(np.isfinite(omega)) or \
                not np.allclose(omega, omega.T) or np.any(np.linalg.eigvalsh(omega) <= 0):
            raise ConfigError(f"mhe.omega: expected a symmetric positive definite "
                              f"{len(self.parameters)}x{len(self.parameters)} matrix")
        if not self.noise_sd > 0:
            raise ConfigError(f"mhe.noise_sd must be > 0, got {self.noise_sd!r}")
        for name in ("window", "min_samples", "disturbance_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"mhe.{name} must be a whole number >= 0, got {value!r}")
        if not 1 <= self.min_samples <= self.window:
            raise ConfigError(f"mhe.min_samples: need 1 <= min_samples "
                              f"({self.min_samples}) <= window ({self.window})")
        if self.disturbance and not self.disturbance_sd > 0:
            raise ConfigError(f"mhe.disturbance_sd must be > 0, got {self.disturbance_sd!r}")


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


class OutputMapMHE:
    """MHE of output-map parameters and a disturbance given known state trajectories.

    Parameters
    ----------
    model : Model
        The controller's model.
    theta : array
        Its parameter vector; the estimated parameters' values are the prior medians.
    config : MHEConfig
    """

    def __init__(self, model: Model, theta: np.ndarray, config: MHEConfig) -> None:
        self.model, self.config = model, config
        self._k = model.output_index(config.output)
        self._idx = [model.param_index(name) for name in config.parameters]
        self.theta_prior = np.asarray(theta, dtype=float).copy()
        if np.any(self.theta_prior[self._idx] <= 0):
            raise ConfigError("mhe: estimated parameters must be positive (log-normal)")
        self._omega_inv_chol = np.linalg.cholesky(np.linalg.inv(np.asarray(config.omega)))
        self._samples: deque[tuple[float, np.ndarray, np.ndarray, float]] = deque(
            maxlen=config.window)
        self._eta = np.zeros(len(self._idx))
        self._d = 0.0
        self._build()

    def _build(self) -> None:
        c, m = self.config, self.model
        M, n, nu, ne = c.window, m.n_states, m.n_inputs, len(self._idx)
        eta = ca.SX.sym("eta", ne)
        d = ca.SX.sym("d")
        xs = ca.SX.sym("xs", n, M)
        us = ca.SX.sym("us", nu, M)
        ts = ca.SX.sym("ts", M)
        ys = ca.SX.sym("ys", M)
        mask = ca.SX.sym("mask", M)   # 1 for a sample in the window, 0 for an empty slot
        theta = ca.SX.sym("theta", len(m.params))
        d_prev = ca.SX.sym("d_prev")
        sqrt_info = ca.SX.sym("L", ne, ne)  # chol(Omega^-1)' applied to eta
        th = ca.SX(theta)
        for j, k in enumerate(self._idx):
            th[k] = theta[k] * ca.exp(eta[j])
        residuals = []
        for i in range(M):
            y = m.h(ts[i], xs[:, i], us[:, i], th)[self._k] + (d if c.disturbance else 0)
            residuals.append(mask[i] * (ys[i] - y) / c.noise_sd)
        residuals.append(ca.mtimes(sqrt_info.T, eta))
        if c.disturbance:
            residuals.append((d - d_prev) / c.disturbance_sd)
        r = ca.vertcat(*residuals)
        w = ca.vertcat(eta, d) if c.disturbance else eta
        p = ca.vertcat(ca.vec(xs), ca.vec(us), ts, ys, mask, theta, d_prev, ca.vec(sqrt_info))
        f = 0.5 * ca.sumsqr(r)
        nlp = {"x": w, "p": p, "f": f}
        hessian = gauss_newton_hessian(r, w, p, 0, regularisation=1e-10)
        self._sqp = sqp_solver("mhe_sqp", nlp, hessian, "qpoases", 50)
        self._ipopt = ipopt_solver("mhe_ipopt", nlp)

    def add(self, t_s: float, x: np.ndarray, u: np.ndarray, y: float) -> None:
        """Record one valid measurement *y* with the state *x* and rates *u* at *t_s*."""
        self._samples.append((t_s, np.asarray(x, float).copy(), np.asarray(u, float).copy(),
                              float(y)))

    @property
    def theta(self) -> np.ndarray:
        """The current parameter vector (prior values with the estimated ones replaced)."""
        th = self.theta_prior.copy()
        th[self._idx] = self.theta_prior[self._idx] * np.exp(self._eta)
        return th

    @property
    def disturbance(self) -> float:
        return self._d

    def update(self) -> MHEResult:
        """Re-estimate over the current window (keeps the previous estimate on failure)."""
        c, m = self.config, self.model
        start = time.perf_counter()
        count = len(self._samples)
        if count < c.min_samples:
            return MHEResult(False, "too few samples", self._values(), self._eta.copy(),
                             self._d, 0.0, count)
        M = c.window
        xs = np.zeros((m.n_states, M))
        us = np.zeros((m.n_inputs, M))
        ts, ys, mask = np.zeros(M), np.zeros(M), np.zeros(M)
        for i, (t, x, u, y) in enumerate(self._samples):
            xs[:, i], us[:, i], ts[i], ys[i], mask[i] = x, u, t, y, 1.0
        p = np.concatenate([xs.ravel(order="F"), us.ravel(order="F"), ts, ys, mask,
                            self.theta_prior, [self._d], self._omega_inv_chol.ravel(order="F")])
        w0 = np.concatenate([self._eta, [self._d]]) if c.disturbance else self._eta.copy()
        status = "unknown"
        for solver in (self._sqp, self._ipopt):
            with quiet_native_stdout():  # qpOASES prints some failures regardless
                out = solver(x0=w0, p=p)
            stats = solver.stats()
            w = np.asarray(out["x"], dtype=float).ravel()
            status = str(stats.get("return_status", "unknown"))
            if stats.get("success", False) and np.all(np.isfinite(w)) and \
                    np.all(np.abs(w[:len(self._idx)]) < 5):  # |eta| < 5: within e^5 of prior
                self._eta = w[:len(self._idx)]
                if c.disturbance:
                    self._d = float(w[-1])
                    if c.disturbance_window > 0:
                        self._d = self._recent_residual(c.disturbance_window)
                return MHEResult(True, status, self._values(), self._eta.copy(), self._d,
                                 time.perf_counter() - start, count)
        return MHEResult(False, status, self._values(), self._eta.copy(), self._d,
                         time.perf_counter() - start, count)

    def _recent_residual(self, count: int) -> float:
        """Mean of measured minus predicted output over the last *count* samples."""
        th = self.theta
        recent = list(self._samples)[-count:]
        residuals = [y - float(self.model.h(t, x, u, th)[self._k]) for t, x, u, y in recent]
        return float(np.mean(residuals))

    def _values(self) -> dict[str, float]:
        th = self.theta
        return {name: float(th[k]) for name, k in zip(self.config.parameters, self._idx)}


class OutputMapEKF:
    """Extended Kalman filter of the same quantities as :class:`OutputMapMHE` (log-normal
    output-map parameters and an additive disturbance), one measurement at a time.

    The filter state ``z = [eta, d]`` is a random walk (``q_eta`` and ``q_d`` per sample,
    variances); it starts at the population prior ``N(0, prior_inflation * Omega)`` and
    ``N(0, sd_d0^2)``.
    Same interface as the MHE: :meth:`add` each reading, :meth:`update`, then
    :attr:`theta` and :attr:`disturbance`.
    """

    def __init__(self, model: Model, theta: np.ndarray, config: MHEConfig, *,
                 q_eta: float = 1e-6, q_d: float = 0.05, sd_d0: float = 5.0,
                 prior_inflation: float = 1.0) -> None:
        self.model, self.config = model, config
        self._k = model.output_index(config.output)
        self._idx = [model.param_index(name) for name in config.parameters]
        self.theta_prior = np.asarray(theta, dtype=float).copy()
        ne = len(self._idx)
        self._z = np.zeros(ne + 1)
        self._P = np.zeros((ne + 1, ne + 1))
        # an inflated start lets the filter move faster than the population spread at first
        self._P[:ne, :ne] = prior_inflation * np.asarray(config.omega, dtype=float)
        self._P[ne, ne] = sd_d0**2
        self._Q = np.diag([q_eta] * ne + [q_d if config.disturbance else 0.0])
        if not config.disturbance:
            self._P[ne, ne] = 0.0
        eta = ca.SX.sym("eta", ne)
        d, t = ca.SX.sym("d"), ca.SX.sym("t")
        x, u = ca.SX.sym("x", model.n_states), ca.SX.sym("u", model.n_inputs)
        th = ca.SX(ca.DM(self.theta_prior))
        for j, k in enumerate(self._idx):
            th[k] = self.theta_prior[k] * ca.exp(eta[j])
        y = model.h(t, x, u, th)[self._k] + d
        z = ca.vertcat(eta, d)
        # One filter step (random-walk prediction, then the measurement update) of the filter
        # state [z; vec(P)] as a CasADi function; the readings of a cycle run through it in
        # one call (fold), not as a dozen small numpy operations per reading.
        P = ca.SX.sym("P", ne + 1, ne + 1)
        y_meas = ca.SX.sym("y_meas")
        P_pred = P + ca.DM(self._Q)
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
        ok = bool(np.all(np.isfinite(self._z)))
        if not ok:  # keep the filter usable: back to the prior
            self._z[:] = 0.0
        return MHEResult(ok, "updated" if ok else "diverged: reset to the prior",
                         self._values(), self._z[:-1].copy(), self.disturbance,
                         time.perf_counter() - start, count)

    @property
    def theta(self) -> np.ndarray:
        th = self.theta_prior.copy()
        th[self._idx] = self.theta_prior[self._idx] * np.exp(self._z[:len(self._idx)])
        return th

    @property
    def disturbance(self) -> float:
        return float(self._z[-1]) if self.config.disturbance else 0.0

    def _values(self) -> dict[str, float]:
        th = self.theta
        return {name: float(th[k]) for name, k in zip(self.config.parameters, self._idx)}
