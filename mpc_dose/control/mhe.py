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

How it is solved (the same minimiser, not an approximation): for fixed etas the problem in
the disturbance path is linear-Gaussian, the random walk observed through ``y_i - h_i(eta)``
with the prior of ``d_0`` given ``eta`` from the arrival cost. Its minimum over the path is
the Kalman filter's sum of squared innovations over their variances (the prediction-error
decomposition), and its minimiser is the Rauch-Tung-Striebel smoother's mean. So

    min_{eta, d} J(eta, d) = min_eta [ (eta - eta_bar)' P_ee^-1 (eta - eta_bar)
                                       + sum_i e_i(eta)^2 / S_i ]

where ``e_i`` are the filter's innovations (affine in ``y - h(eta)``) and ``S_i`` their
variances (independent of eta). The NLP has only the etas (three for BIS) under their
bounds; its objective is one filter pass over the window, O(window), and its exact Hessian
comes by automatic differentiation through that pass. It is built once per model and
structure (every number of the window, the arrival cost and the noise crosses as a
parameter), shared by every MHE of the same model in the process, and evaluated through
CasADi's buffers (no conversion of arguments per call). Solver: SQP with the exact Hessian
made convex and a dense QP (qrqp), warm-started at the previous estimate; IPOPT as the
fallback; every call reports success and status.

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
        if not self.parameters:
            if not self.disturbance:
                raise ConfigError("mhe.parameters: empty and no disturbance: nothing to "
                                  "estimate")
            omega = omega.reshape(0, 0)  # only the output disturbance is estimated
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



class _Buffered:
    """A CasADi function evaluated in place through its buffer: the inputs and outputs are
    numpy arrays owned here, filled and read without a conversion per call (a numpy vector
    crossing into CasADi costs tens of microseconds, DESIGN). Not thread-safe: one per
    user."""

    def __init__(self, function: ca.Function) -> None:
        self.function = function
        self.args = [np.zeros(function.nnz_in(i)) for i in range(function.n_in())]
        self.res = [np.zeros(function.nnz_out(i)) for i in range(function.n_out())]
        self._buffer, self._evaluate = function.buffer()
        for i, a in enumerate(self.args):
            self._buffer.set_arg(i, memoryview(a))
        for i, r in enumerate(self.res):
            self._buffer.set_res(i, memoryview(r))

    def __call__(self) -> None:
        self._evaluate()

    def stats(self) -> dict:
        return self._buffer.stats()


# Problems built once per model and structure, shared by every estimator of the process (a
# trial runs one patient after another; building costs tens of milliseconds). A handful of
# entries: tuning sweeps change numbers, and numbers are parameters.
_BUILT: dict[tuple, object] = {}
_BUILT_MAX = 16


def _shared(key: tuple, build):
    made = _BUILT.get(key)
    if made is None:
        if len(_BUILT) >= _BUILT_MAX:
            _BUILT.clear()
        made = _BUILT[key] = build()
    return made


class _OutputMap:
    """What both estimators share: the estimated parameters' indices and prior values."""

    def __init__(self, model: Model, theta: np.ndarray, config: MHEConfig) -> None:
        self.model, self.config = model, config
        self._k = model.output_index(config.output)
        self._idx = [model.param_index(name) for name in config.parameters]
        self._n_states, self._n_inputs = model.n_states, model.n_inputs
        self.theta_prior = np.asarray(theta, dtype=float).copy()
        if self.theta_prior.shape != (len(model.params),):
            raise ConfigError(f"mhe: expected {len(model.params)} parameter values, got "
                              f"shape {self.theta_prior.shape}")
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

    def _row(self, t_s: float, x: np.ndarray, u: np.ndarray, y: float) -> np.ndarray:
        """One reading as the vector ``[t, x, u, y]``."""
        n = self._n_states
        row = np.empty(n + self._n_inputs + 2)
        row[0] = t_s
        row[1:1 + n] = x
        row[1 + n:-1] = u
        row[-1] = y
        return row


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
        c = config
        key = ("ekf", id(model), c.output, c.parameters, c.noise_sd, c.q_eta,
               c.q_d if c.disturbance else 0.0)
        self._step = _shared(key, lambda: (model, self._build_step()))[1]
        self._runs: dict[int, _Buffered] = {}
        self._pending: list[np.ndarray] = []

    def _build_step(self) -> ca.Function:
        """One filter step (random-walk prediction, then the measurement update) of the
        filter state ``[z; vec(P); theta]`` (theta is carried through unchanged) for one
        reading ``[t; x; u; y]``: the readings of a cycle run through it in one call (fold),
        not as a dozen small numpy operations per reading."""
        m, c = self.model, self.config
        ne = len(self._idx)
        eta, d = ca.SX.sym("eta", ne), ca.SX.sym("d")
        P = ca.SX.sym("P", ne + 1, ne + 1)
        theta = ca.SX.sym("theta", len(m.params))
        row = ca.SX.sym("row", m.n_states + m.n_inputs + 2)
        t, x, u, y_meas = (row[0], row[1:1 + m.n_states], row[1 + m.n_states:-1], row[-1])
        y = m.h(t, x, u, self._symbolic_theta(theta, eta))[self._k] + d
        z = ca.vertcat(eta, d)
        P_pred = P + ca.DM(self.process_noise)
        h = ca.jacobian(y, z)
        hp = ca.mtimes(h, P_pred)  # = (P h')' as P is symmetric
        gain = hp.T / (ca.mtimes(hp, h.T) + c.noise_sd**2)
        # P - K h P as an outer product: fewer operations, and P stays symmetric
        state = ca.vertcat(z, ca.vec(P), theta)
        return ca.Function("ekf_step", [state, row],
                           [ca.vertcat(z + gain * (y_meas - y),
                                       ca.vec(P_pred - ca.mtimes(gain, hp)), theta)])

    def add(self, t_s: float, x: np.ndarray, u: np.ndarray, y: float) -> None:
        self._pending.append(self._row(t_s, x, u, y))

    def update(self) -> MHEResult:
        """Process the readings added since the last update, in order."""
        start = time.perf_counter()
        count = len(self._pending)
        ok = self._filter()
        return MHEResult(ok, "updated" if ok else "diverged: reset to the prior",
                         self._values_of(self._z[:-1]), self._z[:-1].copy(),
                         self.disturbance, time.perf_counter() - start, count)

    def _filter(self) -> bool:
        """Filter the pending readings; False when the filter diverged (reset to the prior)."""
        count = len(self._pending)
        if not count:
            return True
        run = self._runs.get(count)
        if run is None:  # the state after the last reading only
            run = self._runs[count] = _Buffered(self._step.fold(count))
        n = self._z.size
        state, rows = run.args
        state[:n] = self._z
        state[n:n + n * n] = self._P.ravel(order="F")
        state[n + n * n:] = self.theta_prior
        rows[:] = np.ravel(self._pending)  # the columns [t; x; u; y], one per reading
        self._pending.clear()
        run()
        out = run.res[0][:n + n * n]
        if not np.isfinite(out).all():  # keep the filter usable: back to the prior
            self._z = np.zeros(n)
            self._P = self._prior_covariance()
            return False
        self._z = out[:n].copy()
        self._P = out[n:].reshape(n, n, order="F")  # a copy (the slice above)
        return True

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


class _WindowProblem:
    """The MHE's MAP problem over a window with the disturbance path eliminated (module
    docstring), built once per model and structure.

    Parameter vector ``p = [vec(data), count, theta, noise_var, q, z_bar, vec(P_bar)]``:
    *data* holds one column per slot of the window with the entries of ``[t, x, u]`` that the
    output depends on, then the reading (slots from *count* on are empty: they repeat the
    latest reading, and are masked); *q* the disturbance's random-walk variance (0: one
    value for the window).
    """

    def __init__(self, estimator: _OutputMap, random_walk: bool) -> None:
        m, c = estimator.model, estimator.config
        M, ne = c.window, len(estimator._idx)
        nz = ne + (1 if c.disturbance else 0)
        t, x, u = ca.SX.sym("t"), ca.SX.sym("x", m.n_states), ca.SX.sym("u", m.n_inputs)
        theta = ca.SX.sym("theta", len(m.params))
        tx = ca.vertcat(t, x, u)
        y_h = m.h(t, x, u, theta)[estimator._k]
        # only what the output reads crosses per call (for BIS two effect sites of 8 states)
        used = [j for j in range(tx.numel()) if ca.depends_on(y_h, tx[j])]
        self.columns = np.array(used + [tx.numel()], dtype=int)  # indices into [t, x, u, y]
        nc = len(self.columns)
        h_used = ca.Function("h_used", [ca.vertcat(*[tx[j] for j in used]) if used
                                        else ca.SX(0, 1), theta], [y_h])
        eta = ca.SX.sym("eta", ne)
        data = ca.SX.sym("data", nc, M)
        count, noise_var, q = ca.SX.sym("count"), ca.SX.sym("noise_var"), ca.SX.sym("q")
        z_bar, P = ca.SX.sym("z_bar", nz), ca.SX.sym("P_bar", nz, nz)
        th = estimator._symbolic_theta(theta, eta)
        de = eta - z_bar[:ne]
        Pee = P[:ne, :ne]
        J = ca.dot(de, ca.solve(Pee, de))  # the etas' marginal prior: P_ee^-1 = Schur complement
        if c.disturbance:  # d_0 given the etas, from the arrival cost's joint Gaussian
            Ped = P[:ne, ne]
            gain = ca.solve(Pee, Ped)
            d_hat = z_bar[ne] + ca.dot(gain, de)
            var = P[ne, ne] - ca.dot(gain, Ped)
        filtered, variances = [], []
        for i in range(M):
            observed = count > i  # 1 for a reading, 0 for an empty slot
            r = data[nc - 1, i] - h_used(data[:nc - 1, i], th)
            if c.disturbance:
                S = var + noise_var
                e = r - d_hat
                J = J + observed * e * e / S
                K = observed * var / S
                d_hat = d_hat + K * e
                var = var - K * var
                filtered.append(d_hat)
                variances.append(var)
                var = var + q
            else:
                J = J + observed * r * r / noise_var
        f = 0.5 * J
        p = ca.vertcat(ca.vec(data), count, theta, noise_var, q, z_bar, ca.vec(P))
        sizes = [nc * M, 1, len(m.params), 1, 1, nz, nz * nz]
        offsets = np.cumsum([0] + sizes)
        self.slices = dict(zip(("data", "count", "theta", "noise_var", "q", "z_bar", "P"),
                               (slice(a, b) for a, b in zip(offsets[:-1], offsets[1:]))))
        # the disturbance path at the optimum: the smoother's mean (Rauch-Tung-Striebel)
        path = []
        if c.disturbance:
            smoothed = filtered[-1]
            path = [smoothed]
            if random_walk:
                for i in range(M - 2, -1, -1):
                    smoothed = filtered[i] + variances[i] / (variances[i] + q) * \
                        (smoothed - filtered[i])
                    path.append(smoothed)
                path.reverse()
        self.path = ca.Function("mhe_path", [eta, p], [ca.vertcat(*path) if path
                                                       else ca.SX(0, 1)])
        self.nlp = {"x": eta, "p": p, "f": f}
        # The exact Hessian: the residuals' curvature matters here (Gauss-Newton's Hessian
        # underestimated gamma's curvature 2-3 fold in TIVA inductions and took over 50
        # iterations). The dual tolerance is on the gradient of f (half the sum of squared
        # whitened innovations and prior terms), whose curvature is at least the prior's
        # (about 2 for c50r): the etas within about 1e-6 of the minimiser.
        # Trial points of the line search far out may evaluate to NaN; they are shortened,
        # and not worth a warning each.
        self.sqp = sqp_solver("mhe_sqp", self.nlp, None, "qrqp", 50, dual_tolerance=1e-6,
                              show_eval_warnings=False)
        self._ipopt = None

    @property
    def ipopt(self) -> ca.Function:
        """The fallback, built when first needed."""
        if self._ipopt is None:
            self._ipopt = ipopt_solver("mhe_ipopt", self.nlp, show_eval_warnings=False)
        return self._ipopt


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
        self._samples: list[np.ndarray] = []  # the window, rows [t, x, u, y] in time order
        ne = len(self._idx)
        self._eta = np.zeros(ne)
        # the disturbance at each slot of the window (one value when it is constant)
        random_walk = config.q_d > 0
        self._n_d = 0 if not config.disturbance else config.window if random_walk else 1
        self._d_path = np.zeros(self._n_d)
        self._d = 0.0
        # the etas within eta_bound_sd prior SDs
        bound = config.eta_bound_sd * np.sqrt(np.diag(np.asarray(config.omega)))
        self._bounds = (-bound, bound)
        c = config
        key = ("mhe", id(model), c.output, c.parameters, c.window, c.disturbance, random_walk)
        self._problem = _shared(key, lambda: (model, _WindowProblem(self, random_walk)))[1]
        problem = self._problem
        self._solver = _Buffered(problem.sqp)
        self._path = _Buffered(problem.path)
        p, lbx, ubx = self._solver.args[1:4]
        lbx[:], ubx[:] = self._bounds
        p[problem.slices["theta"]] = self.theta_prior
        p[problem.slices["noise_var"]] = config.noise_sd**2
        p[problem.slices["q"]] = config.q_d if random_walk else 0.0
        self._data = p[problem.slices["data"]].reshape(config.window, -1)  # a view: slot rows
        self._p = p

    def add(self, t_s: float, x: np.ndarray, u: np.ndarray, y: float) -> None:
        """Record one valid measurement *y* with the state *x* and rates *u* at *t_s*; the
        oldest reading leaves a full window into the arrival cost. A late reading takes its
        place in time order."""
        row = self._row(t_s, x, u, y)
        if not self._samples or t_s >= self._samples[-1][0]:
            self._samples.append(row)
        else:
            bisect.insort_right(self._samples, row, key=lambda r: r[0])
        if len(self._samples) > self.config.window:
            self.arrival._pending.append(self._samples.pop(0))

    @property
    def theta(self) -> np.ndarray:
        """The current parameter vector (prior values with the estimated ones replaced)."""
        return self._theta_of(self._eta)

    @property
    def disturbance(self) -> float:
        """The disturbance at the latest reading."""
        return self._d

    @property
    def disturbance_path(self) -> np.ndarray:
        """The estimated disturbance at each slot of the window (the latest estimate; one
        value when it is constant over the window, none without a disturbance)."""
        return self._d_path.copy()

    def update(self) -> MHEResult:
        """Re-estimate over the current window (keeps the previous estimate on failure)."""
        c = self.config
        start = time.perf_counter()
        count = len(self._samples)
        if count < c.min_samples:
            return MHEResult(False, "too few samples", self._values_of(self._eta),
                             self._eta.copy(), self._d, 0.0, count)
        self.arrival._filter()
        ne = len(self._idx)
        nz = ne + (1 if c.disturbance else 0)
        problem, p = self._problem, self._p
        P_bar = (self.arrival._P + self.arrival.process_noise)[:nz, :nz]
        p[problem.slices["z_bar"]] = self.arrival._z[:nz]
        p[problem.slices["P"]] = (0.5 * (P_bar + P_bar.T)).ravel(order="F")
        p[problem.slices["count"]] = count
        window = np.array(self._samples)[:, problem.columns]
        self._data[:count] = window
        # empty slots repeat the latest reading (masked): no 0/0 of an output at zero drug
        self._data[count:] = window[-1]
        lbx, ubx = self._bounds
        w0 = np.clip(self._eta, lbx, ubx)
        ok, w, status = self._solve(w0)
        if not ok:  # IPOPT on the same problem
            with quiet_native_stdout():
                out = problem.ipopt(x0=w0, p=p, lbx=lbx, ubx=ubx)
            stats = problem.ipopt.stats()
            w = np.asarray(out["x"], dtype=float).ravel()
            status = str(stats.get("return_status", "unknown"))
            ok = self._accept(stats, w)
        if ok and self._n_d:  # the disturbance path at these etas: the smoother's mean
            path = self._path
            path.args[0][:] = w
            path.args[1][:] = p
            path()
            d_path = path.res[0].copy()
            ok = bool(np.all(np.isfinite(d_path)))
        if not ok:
            return MHEResult(False, status, self._values_of(self._eta), self._eta.copy(),
                             self._d, time.perf_counter() - start, count)
        self._eta = w
        if self._n_d:
            self._d_path = d_path
            self._d = float(d_path[min(count, self._n_d) - 1])
        return MHEResult(True, status, self._values_of(self._eta), self._eta.copy(),
                         self._d, time.perf_counter() - start, count)

    def _solve(self, w0: np.ndarray) -> tuple[bool, np.ndarray, str]:
        """SQP from *w0*: (accepted, etas, status)."""
        solver = self._solver
        solver.args[0][:] = w0
        try:
            solver()
            stats = solver.stats()
        except RuntimeError:  # sqpmethod leaves no status when its first QP fails
            stats = {"return_status": "QP failed at the first iteration"}
        w = solver.res[0].copy()
        return self._accept(stats, w), w, str(stats.get("return_status", "unknown"))

    @staticmethod
    def _accept(stats: dict, w: np.ndarray) -> bool:
        # |eta| < 5: within e^5 of the prior
        return bool(stats.get("success", False) and np.all(np.isfinite(w)) and
                    np.all(np.abs(w) < 5))
