"""Nonlinear model-predictive control built once from a CasADi model.

Condensed or multiple shooting over ``horizon`` control periods, decisions blocked over ``move_block``
periods. The objective tracks a (possibly time-varying) reference on one output and
penalises input changes, drug use (economic) and violations of a soft output window
(exact-penalty slack, linear plus quadratic). Constraints: per-input rate bounds, a hard
limit on rate changes, cumulative dose over sliding windows, a hard output window,
optionally a fixed ratio between two inputs.

The problem is built once per model structure. Per cycle only numbers cross from Python:
the initial state, the previous rates, the reference, the model parameters (estimates), the
output disturbance, the clock time, the weights, and the limits (as bounds). So a sweep over
limits and weights never rebuilds it (:func:`problem_structure`, :meth:`NonlinearMPC.reset`).
Linear time-invariant dynamics are discretised exactly (zero-order hold) outside. Condensed,
the problem then keeps only the states its outputs read (e.g. the two effect sites of a
BIS model), as affine functions of the decisions whose coefficients (free response and
impulse response of the exact discretisation) are computed per patient outside; multiple
shooting keeps every state with the discretisation matrices as parameters. Other models use
RK4 with the model's circadian parameters evaluated at each stage's clock time.

Default solver: ``sqpmethod`` with qpOASES (then ``qrqp``) and a Gauss-Newton Hessian (the
objective is a sum of squares plus linear terms); IPOPT is the fallback for cold or failed
steps. Every call
returns a :class:`DosePlan` with success, status, iterations and solve time, and a plan that
leaves its bounds is marked failed: an unchecked plan never leaves the controller.

This module knows model/, not plant/ nor transports.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields

import casadi as ca
import numpy as np

from ..errors import ConfigError
from ..model.propagate import Propagator
from ..model.spec import Model
from .solvers import gauss_newton_hessian, ipopt_solver, quiet_native_stdout, sqp_solver

__all__ = ["NMPCConfig", "DosePlan", "NonlinearMPC", "problem_structure"]


@dataclass(frozen=True)
class NMPCConfig:
    """Structure of the problem (fixed at build time) and default numbers (changeable per
    call without rebuilding). Rates in each input's amount unit per second.

    Attributes
    ----------
    output : str
        The tracked model output.
    inputs : tuple of str
        The inputs the controller sets.
    period_s : float
        Control period [s]; one shooting interval.
    horizon : int
        Prediction horizon in periods.
    move_block : int
        Periods per decision block (1: a decision each period).
    reference : float
        Default reference of *output* (its unit).
    output_weight : float
        Weight of the squared tracking error.
    change_weights : mapping
        Weight of the squared change of each input's rate between periods.
    use_weights : mapping
        Linear (economic) weight of each input's amount.
    rate_bounds : mapping of input -> (min, max)
        Hard bounds on each rate.
    max_change : mapping of input -> float
        Hard bound on the change of a rate between periods (inf: none).
    soft_window : (low, high)
        Soft bounds on the output, penalised with *soft_weights* (linear, quadratic).
    hard_window : (low, high)
        Hard bounds on the output (-inf, inf: none).
    ratio : (input_a, input_b, r), optional
        Fix ``rate_b = r * rate_a`` (the decision is then *input_a* only).
    dose_windows : tuple of (input, window_s, max_amount)
        Cumulative dose limits: delivered in the last *window_s* plus planned within it.
    disturbance : bool
        Include an additive output disturbance parameter (offset-free tracking).
    solver : "sqpmethod" or "ipopt"
    """

    output: str
    inputs: tuple[str, ...]
    period_s: float
    horizon: int
    move_block: int = 1
    reference: float = 0.0
    output_weight: float = 1.0
    change_weights: Mapping[str, float] = field(default_factory=dict)
    use_weights: Mapping[str, float] = field(default_factory=dict)
    rate_bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    max_change: Mapping[str, float] = field(default_factory=dict)
    soft_window: tuple[float, float] = (-math.inf, math.inf)
    #: the output the soft and hard windows apply to (the tracked output by default), e.g. a
    #: therapeutic window on a concentration while tracking an effect
    window_output: str | None = None
    soft_weights: tuple[float, float] = (100.0, 100.0)
    #: the soft window is checked at every *soft_every*-th stage (and the last): fewer slack
    #: variables, a smaller QP (the output moves slowly against the period)
    soft_every: int = 1
    hard_window: tuple[float, float] = (-math.inf, math.inf)
    #: hard bounds on the window output at the end of the horizon (terminal constraint)
    terminal_window: tuple[float, float] = (-math.inf, math.inf)
    ratio: tuple[str, str, float] | None = None
    dose_windows: tuple[tuple[str, float, float], ...] = ()
    disturbance: bool = True
    #: intermittent dosing: decisions only in periods starting at multiples of this interval
    #: [s] of clock time since t = 0 (each dose is then an infusion lasting one period, e.g.
    #: period 1 h, interval 12 h for vancomycin); None: continuous infusion
    dose_interval_s: float | None = None
    solver: str = "sqpmethod"
    #: QP solver inside sqpmethod, tried in this order before IPOPT. Measured on the DESIGN
    #: reference problem here: qpOASES (dense) 0.87 ms median per step, qrqp 5.8 ms.
    qp_solvers: tuple[str, ...] = ("qpoases", "qrqp")
    #: "condensed" (states eliminated; linear time-invariant models only) or
    #: "multiple_shooting" (states as decision variables, any model)
    transcription: str = "condensed"
    max_iter: int = 30
    #: SQP stops when the Lagrangian's gradient is below this (and the constraints hold to
    #: 1e-6): on the 32 TIVA training patients 1e-4 gives the metrics of 1e-6 to four
    #: digits with a quarter fewer iterations
    dual_tolerance: float = 1e-4
    rk4_steps: int = 4

    def __post_init__(self) -> None:
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ConfigError(f"nmpc.period_s must be > 0, got {self.period_s!r}")
        if not (isinstance(self.horizon, int) and self.horizon >= 1):
            raise ConfigError(f"nmpc.horizon must be a whole number >= 1, got {self.horizon!r}")
        if not (isinstance(self.soft_every, int) and self.soft_every >= 1):
            raise ConfigError(f"nmpc.soft_every must be a whole number >= 1, "
                              f"got {self.soft_every!r}")
        if not (isinstance(self.move_block, int) and 1 <= self.move_block <= self.horizon):
            raise ConfigError(f"nmpc.move_block must be in [1, horizon], "
                              f"got {self.move_block!r}")
        if self.transcription not in ("condensed", "multiple_shooting"):
            raise ConfigError(f"nmpc.transcription must be 'condensed' or "
                              f"'multiple_shooting', got {self.transcription!r}")
        if self.dose_interval_s is not None:
            ratio = self.dose_interval_s / self.period_s
            if not (self.dose_interval_s > 0 and abs(ratio - round(ratio)) < 1e-9
                    and self.move_block == 1):
                raise ConfigError(f"nmpc.dose_interval_s = {self.dose_interval_s!r}: must be a "
                                  f"whole number of periods ({self.period_s} s), with "
                                  f"move_block 1")
        if not self.dual_tolerance > 0:
            raise ConfigError(f"nmpc.dual_tolerance must be > 0, got {self.dual_tolerance!r}")
        if self.solver not in ("sqpmethod", "ipopt"):
            raise ConfigError(f"nmpc.solver must be 'sqpmethod' or 'ipopt', "
                              f"got {self.solver!r}")
        for field_name in ("rate_bounds", "max_change", "change_weights", "use_weights"):
            unknown = set(getattr(self, field_name)) - set(self.inputs)
            if unknown:
                raise ConfigError(f"nmpc.{field_name}: {sorted(unknown)} are not among the "
                                  f"controlled inputs {list(self.inputs)}")
        for name in self.rate_bounds:
            low, high = self.rate_bounds[name]
            if not (0 <= low <= high):
                raise ConfigError(f"nmpc.rate_bounds[{name!r}] = ({low}, {high}): expected "
                                  f"0 <= min <= max")


@dataclass(frozen=True)
class DosePlan:
    """One NMPC solution: the first move and the whole plan, with how the solve went.

    ``success`` is False when the solver failed or its plan left its bounds (then *rates*
    must not be applied: the supervisor decides). *solver* is the one that produced it.
    """

    t_s: float
    success: bool
    status: str
    iterations: int
    solve_time_s: float
    solver: str
    rates: dict[str, float]
    plan: np.ndarray
    objective: float
    reason: str
    #: computes the predicted output on demand (controllers rarely read it; it costs a
    #: function evaluation per cycle)
    predict: Callable[[], np.ndarray] = field(repr=False, compare=False,
                                              default=lambda: np.zeros(0))

    @functools.cached_property
    def predicted_output(self) -> np.ndarray:
        """The tracked output predicted at the end of each period of the horizon."""
        return self.predict()


class NonlinearMPC:
    """The NMPC for *model* (the controller's model) and *config*; see the module docstring.

    Call :meth:`plan` each cycle with the estimated state and parameters.
    """

    def __init__(self, model: Model, config: NMPCConfig) -> None:
        self.model, self.config = model, config
        c = config
        for name in c.inputs:
            model.input_index(name)
        self._k_out = model.output_index(c.output)
        self._k_win = model.output_index(c.window_output or c.output)
        if c.ratio is not None:
            a, b, r = c.ratio
            if a not in c.inputs or b not in c.inputs or a == b or not r >= 0:
                raise ConfigError(f"nmpc.ratio = {c.ratio!r}: expected two different inputs "
                                  f"of {c.inputs} and a ratio >= 0")
        self._free = [i for i in c.inputs if c.ratio is None or i != c.ratio[1]]
        self._free_columns = [model.input_index(name) for name in self._free]
        self._exact = model.is_affine and not model.is_time_varying
        self._lift_layout: tuple[list[int], list[tuple[int, int, int, int]]] | None = None
        t, x, u, th = self._symbols()
        f = model.f(t, x, u, th)
        self._dynamics_params = [k for k in range(len(model.params)) if ca.depends_on(f, th[k])]
        self._build()
        # the first solver is built now, not inside the first control period's deadline
        self._solver(f"sqpmethod:{c.qp_solvers[0]}" if c.solver == "sqpmethod" else "ipopt")
        self._warm: dict[str, np.ndarray] | None = None
        self._pk_cache: tuple[bytes, np.ndarray] | None = None
        #: the bounds and weights of the config's own numbers, built on the first plan
        self._static: tuple[np.ndarray, ...] | None = None

    def reset(self, config: NMPCConfig | None = None) -> None:
        """Forget the previous patient's warm start and discretisation (reuse the built
        problem for another patient of the same model), and optionally take the numbers of
        *config* (weights, limits, reference), which must have this problem's structure.

        Raises
        ------
        ConfigError
            When *config* differs in structure (see :func:`problem_structure`).
        """
        if config is not None:
            if problem_structure(config) != problem_structure(self.config):
                raise ConfigError("nmpc: the new config changes the problem's structure "
                                  "(horizon, inputs, which limits exist, ...); build a new "
                                  "NonlinearMPC for it")
            self.config = config
        self._warm = None
        self._pk_cache = None
        self._static = None

    # ------------------------------------------------------------------ build
    def _rates_expr(self, free: ca.SX) -> ca.SX:
        """All model inputs' rates from the free decision variables of one block."""
        c, m = self.config, self.model
        rates = [ca.SX(0)] * m.n_inputs
        for j, name in enumerate(self._free):
            rates[m.input_index(name)] = free[j]
        if c.ratio is not None:
            a, b, r = c.ratio
            rates[m.input_index(b)] = r * free[self._free.index(a)]
        return ca.vertcat(*rates)

    def _build(self) -> None:
        c, m = self.config, self.model
        n, nu, nf, N = m.n_states, m.n_inputs, len(self._free), c.horizon
        n_blocks = -(-N // c.move_block)
        # Structure from the config: rows and slacks exist only for limits that are finite
        # at build time (their values remain per-call numbers).
        condensed = self._exact and c.transcription == "condensed"
        soft_low, soft_high = math.isfinite(c.soft_window[0]), math.isfinite(c.soft_window[1])
        hard = any(math.isfinite(v) for v in c.hard_window)
        change = any(math.isfinite(v) for v in c.max_change.values())
        X = None if condensed else ca.SX.sym("X", n, N + 1)
        U = ca.SX.sym("U", nf, n_blocks)
        soft_stages = [k for k in range(N) if (k + 1) % c.soft_every == 0 or k == N - 1]
        SL = ca.SX.sym("SL", len(soft_stages) if soft_low else 0)
        SH = ca.SX.sym("SH", len(soft_stages) if soft_high else 0)
        slack_of = {k: j for j, k in enumerate(soft_stages)}
        blocks = ([ca.vec(X)] if X is not None else []) + [ca.vec(U), SL, SH]
        w = ca.vertcat(*blocks)
        sizes = [int(b.numel()) for b in blocks]
        offsets = np.cumsum([0] + sizes)
        names = (["X"] if X is not None else []) + ["U", "SL", "SH"]
        self._slices = {name: slice(int(offsets[i]), int(offsets[i + 1]))
                        for i, name in enumerate(names)}
        # parameters: state, previous free rates, reference, model params, disturbance,
        # clock, weights, exact-discretisation matrices
        x0 = ca.SX.sym("x0", n)
        u_prev = ca.SX.sym("u_prev", nf)
        ref = ca.SX.sym("ref", N)
        theta = ca.SX.sym("theta", len(m.params))
        dist = ca.SX.sym("d")
        t0 = ca.SX.sym("t0")
        w_y = ca.SX.sym("w_y")
        w_du = ca.SX.sym("w_du", nf)
        w_use = ca.SX.sym("w_use", nf)
        w_soft = ca.SX.sym("w_soft", 2)
        window = ca.SX.sym("window", 2)
        parts = [x0, u_prev, ref, theta, dist, t0, w_y, w_du, w_use, w_soft, window]
        if condensed:
            # Only the states the outputs read are kept, as affine functions of the decisions
            # with numeric coefficients (computed per patient outside): z_k = free_k +
            # sum_b G_kb rates_b. The NLP then carries a few products per stage instead of
            # the whole state rollout, and its derivatives are the coefficients themselves.
            watched = self._watched_states()
            reach = self._reachability(watched)
            free_resp = ca.SX.sym("free", len(watched), N)
            gain_entries = [(k, b, i, j) for k in range(N) for b in range(k // c.move_block + 1)
                            for i, j in zip(*np.nonzero(reach))]
            gains = ca.SX.sym("gain", len(gain_entries))
            parts += [ca.vec(free_resp), gains]
            self._lift_layout = (watched, gain_entries)
        elif self._exact:
            phi = ca.SX.sym("phi", n, n)
            gam = ca.SX.sym("gam", n, nu)
            gc = ca.SX.sym("gc", n)
            parts += [ca.vec(phi), ca.vec(gam), gc]
        p = ca.vertcat(*parts)
        self._p_sizes = [int(q.numel()) for q in parts]

        T = c.period_s
        if condensed:
            gain_of: dict[tuple[int, int], list] = {}
            for q, (k, b, i, j) in enumerate(gain_entries):
                gain_of.setdefault((k, b), []).append((i, j, gains[q]))

            def watched_state(k):
                z = [free_resp[i, k] for i in range(len(watched))]
                for b in range(k // c.move_block + 1):
                    rates_b = self._rates_expr(U[:, b])
                    for i, j, g_kb in gain_of.get((k, b), ()):
                        z[i] = z[i] + g_kb * rates_b[j]
                x_full = [ca.SX(0)] * n  # states no output reads stay 0
                for i, state in enumerate(watched):
                    x_full[state] = z[i]
                return ca.vertcat(*x_full)
        elif self._exact:
            def step(t_k, x_k, u_k):
                return ca.mtimes(phi, x_k) + ca.mtimes(gam, u_k) + gc
        else:
            def step(t_k, x_k, u_k):
                h_rk = T / c.rk4_steps
                xs = x_k
                for s in range(c.rk4_steps):
                    ts = t_k + s * h_rk
                    k1 = m.f(ts, xs, u_k, theta)
                    k2 = m.f(ts + h_rk / 2, xs + h_rk / 2 * k1, u_k, theta)
                    k3 = m.f(ts + h_rk / 2, xs + h_rk / 2 * k2, u_k, theta)
                    k4 = m.f(ts + h_rk, xs + h_rk * k3, u_k, theta)
                    xs = xs + h_rk / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
                return xs

        g, residuals, linear = [], [], 0
        self._g_labels = []
        if X is not None:
            g.append(x0 - X[:, 0])
            self._g_labels += ["initial"] * n
        y_pred = []
        for k in range(N):
            b = k // c.move_block
            rates = self._rates_expr(U[:, b])
            t_k = t0 + k * T
            if X is None:
                x_next = watched_state(k)
            else:
                g.append(step(t_k, X[:, k], rates) - X[:, k + 1])
                self._g_labels += ["dynamics"] * n
                x_next = X[:, k + 1]
            outputs = m.h(t_k + T, x_next, rates, theta)
            y = outputs[self._k_out] + dist
            y_pred.append(y)
            residuals.append(ca.sqrt(w_y) * (y - ref[k]))
            # the disturbance belongs to the tracked (measured) output only
            y_win = y if self._k_win == self._k_out else outputs[self._k_win]
            # soft window: y + SL >= low, y - SH <= high (slacks >= 0 by bounds)
            j = slack_of.get(k)
            if soft_low and j is not None:
                g.append(y_win + SL[j] - window[0])
                self._g_labels.append("soft_low")
                residuals.append(ca.sqrt(w_soft[1]) * SL[j])
                linear += w_soft[0] * SL[j]
            if soft_high and j is not None:
                g.append(window[1] - y_win + SH[j])
                self._g_labels.append("soft_high")
                residuals.append(ca.sqrt(w_soft[1]) * SH[j])
                linear += w_soft[0] * SH[j]
            if hard:
                g.append(y_win)  # the hard window, by its bounds
                self._g_labels.append("hard")
        if any(math.isfinite(v) for v in c.terminal_window):
            g.append(y_win)  # the last stage's window output, by the terminal bounds
            self._g_labels.append("terminal")
        for b in range(n_blocks):
            previous = u_prev if b == 0 else U[:, b - 1]
            residuals.append(ca.sqrt(w_du) * (U[:, b] - previous))
            if change:
                g.append(U[:, b] - previous)  # rate-change limits, by their bounds
                self._g_labels += ["change"] * nf
            periods = min(c.move_block, N - b * c.move_block)
            linear += periods * T * ca.dot(w_use, U[:, b])
        self._n_blocks = n_blocks
        # warm start: block b of the next plan averages the old plan's rates over its
        # periods shifted by one (the last period repeated)
        owner = np.minimum(np.arange(1, N + 1), N - 1) // c.move_block  # old block per period
        self._shift = np.zeros((n_blocks, n_blocks))
        for k in range(N):
            self._shift[k // c.move_block, owner[k]] += 1.0
        self._shift /= self._shift.sum(axis=1, keepdims=True)
        # cumulative dose windows: planned amount within the window, bounded per call
        for name, window_s, _ in c.dose_windows:
            periods = max(1, min(N, int(round(window_s / T))))
            j = m.input_index(name)
            amount = 0
            for k in range(periods):
                amount += self._rates_expr(U[:, k // c.move_block])[j] * T
            g.append(amount)
            self._g_labels += ["dose_window"]
        r = ca.vertcat(*residuals)
        f = 0.5 * ca.sumsqr(r) + linear
        G = ca.vertcat(*g) if g else ca.SX(0, 1)
        self._nlp = {"x": w, "p": p, "f": f, "g": G}
        self._hess = gauss_newton_hessian(r, w, p, G.numel())
        self._solvers: dict[str, ca.Function] = {}
        self._y_pred = ca.Function("y_pred", [w, p], [ca.vertcat(*y_pred)])
        # constraint rows by kind, for filling their bounds per call without a Python loop
        labels = np.array(self._g_labels)
        self._rows = {kind: np.flatnonzero(np.isin(labels, names)) for kind, names in (
            ("soft", ["soft_low", "soft_high"]), ("hard", ["hard"]),
            ("terminal", ["terminal"]), ("change", ["change"]),
            ("dose_window", ["dose_window"]))}
        self._n = n
        self._nf = nf
        self._nw = w.numel()
        self._ng = G.numel()

    def _solver(self, name: str) -> ca.Function:
        """``"sqpmethod:<qp>"`` or ``"ipopt"``, built on first use."""
        if name not in self._solvers:
            if name.startswith("sqpmethod"):
                self._solvers[name] = sqp_solver("nmpc_sqp", self._nlp, self._hess,
                                                 name.split(":", 1)[1], self.config.max_iter,
                                                 dual_tolerance=self.config.dual_tolerance)
            else:
                self._solvers[name] = ipopt_solver("nmpc_ipopt", self._nlp)
        return self._solvers[name]

    def _symbols(self) -> tuple[ca.SX, ca.SX, ca.SX, ca.SX]:
        """Symbols ``(t, x, u, theta)`` of the model, to read its structure."""
        m = self.model
        return (ca.SX.sym("t"), ca.SX.sym("x", m.n_states), ca.SX.sym("u", m.n_inputs),
                ca.SX.sym("th", len(m.params)))

    def _watched_states(self) -> list[int]:
        """Indices of the states the tracked and the window outputs depend on."""
        m = self.model
        t, x, u, th = self._symbols()
        h = m.h(t, x, u, th)
        y = ca.vertcat(h[self._k_out], h[self._k_win])
        return [i for i in range(m.n_states) if ca.depends_on(y, x[i])]

    def _reachability(self, watched: list[int]) -> np.ndarray:
        """``reach[i, j]``: input *j* can move watched state *i* (structurally, through the
        model's A and B); the other gains are zero for every parameter value."""
        t, x, u, th = self._symbols()
        f = self.model.f(t, x, u, th)
        a = np.array(ca.DM(ca.jacobian(f, x).sparsity(), 1)) != 0
        reach = np.array(ca.DM(ca.jacobian(f, u).sparsity(), 1)) != 0
        while True:  # closure: a state moves when anything feeding it moves
            grown = reach | ((a.astype(int) @ reach.astype(int)) > 0)
            if (grown == reach).all():
                return reach[watched]
            reach = grown

    # ------------------------------------------------------------------ per cycle
    def _discretisation(self, theta: np.ndarray) -> tuple:
        """Per-patient numbers of the exact discretisation, cached on the parameters the
        dynamics depend on (the estimators change output-map parameters every cycle)."""
        key = theta[self._dynamics_params].tobytes()
        if self._pk_cache is None or self._pk_cache[0] != key:
            phi, gam, gc = Propagator(self.model, theta).discrete(self.config.period_s)
            if self._lift_layout is None:
                numbers = (np.concatenate([phi.ravel(order="F"), gam.ravel(order="F"), gc]),)
            else:
                numbers = self._lifted(phi, gam, gc)
            self._pk_cache = (key, numbers)
        return self._pk_cache[1]

    def _lifted(self, phi, gam, gc) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(P, c, gains)``: watched states after period k are ``P[k] x0 + c[k]`` plus
        the gains (in the built problem's order) times each block's rates."""
        watched, entries = self._lift_layout
        N, mb = self.config.horizon, self.config.move_block
        power = np.eye(phi.shape[0])
        constant = np.zeros(phi.shape[0])
        impulse, P, c = [], [], []
        for _ in range(N):  # impulse[j]: effect of a period's rates j periods later
            impulse.append((power @ gam)[watched])
            constant = constant + power @ gc
            power = phi @ power
            P.append(power[watched])
            c.append(constant[watched])
        impulse = np.array(impulse)
        gains = np.empty(len(entries))
        for q, (k, b, i, j) in enumerate(entries):
            lags = k - np.arange(b * mb, min((b + 1) * mb, k + 1))
            gains[q] = impulse[lags, i, j].sum()
        return np.array(P), np.array(c), gains

    def plan(self, t_s: float, x0: np.ndarray, theta: np.ndarray, u_prev: Mapping[str, float],
             *, reference: float | Sequence[float] | None = None, disturbance: float = 0.0,
             delivered_in_window: Mapping[str, float] | None = None,
             weights: Mapping[str, object] | None = None,
             limits: Mapping[str, object] | None = None) -> DosePlan:
        """Plan from *t_s* given the state estimate *x0*, parameter vector *theta* (the
        controller's current model of the patient), the rates in force (*u_prev*), and
        optionally a reference (number or one value per period), the output disturbance, the
        amounts already delivered inside each dose window (by input), and new *weights* or
        *limits* (same keys as the config) without rebuilding."""
        c = self.config
        N = c.horizon
        ref = np.full(N, c.reference if reference is None else 0.0)
        if reference is not None:
            ref[:] = np.asarray(reference, dtype=float) if np.ndim(reference) else reference
        numbers = self._static if not weights and not limits else None
        if numbers is None:
            numbers = self._numbers(dict(weights or {}), dict(limits or {}))
            if not weights and not limits:  # the config's own numbers: the same every cycle
                self._static = numbers
        weight_part, lbx, ubx, lbg, ubg, self._cold_rates = (a.copy() for a in numbers)
        prev = np.array([u_prev.get(name, 0.0) for name in self._free], dtype=float)
        parts = [np.asarray(x0, float), prev, ref, np.asarray(theta, float), [disturbance],
                 [t_s], weight_part]
        if self._exact:
            discrete = self._discretisation(np.asarray(theta, float))
            if self._lift_layout is None:
                parts.append(discrete[0])
            else:
                P, const, gains = discrete
                parts += [(P @ np.asarray(x0, float) + const).ravel(), gains]
        p = np.concatenate([np.ravel(q) for q in parts])
        su = self._slices["U"]
        if c.dose_interval_s is not None:  # no decision between scheduled doses
            for k in range(N):
                phase = (t_s + k * c.period_s) % c.dose_interval_s
                if min(phase, c.dose_interval_s - phase) > 1e-6 * c.period_s:
                    block = slice(su.start + k * self._nf, su.start + (k + 1) * self._nf)
                    lbx[block], ubx[block] = 0.0, 0.0
        for k_dose, idx in enumerate(self._rows["dose_window"]):
            name, _, max_amount = c.dose_windows[k_dose]
            used = (delivered_in_window or {}).get(name, 0.0)
            ubg[idx] = max(0.0, max_amount - used)
        x_init = self._initial_guess(x0, prev, N)
        return self._solve(t_s, p, x_init, lbx, ubx, lbg, ubg)

    def _numbers(self, weights: dict, limits: dict) -> tuple[np.ndarray, ...]:
        """The weights' part of the parameter vector, the bounds (lbx, ubx, lbg, ubg) and
        the cold-start rates of the config's numbers with *weights* and *limits* on top (the
        dose windows' amounts and the dosing times are set per call)."""
        c = self.config
        change_w = {**c.change_weights, **weights.get("change_weights", {})}
        use_w = {**c.use_weights, **weights.get("use_weights", {})}
        soft_w = weights.get("soft_weights", c.soft_weights)
        window = limits.get("soft_window", c.soft_window)
        hard = limits.get("hard_window", c.hard_window)
        bounds = {**c.rate_bounds, **limits.get("rate_bounds", {})}
        max_change = {**c.max_change, **limits.get("max_change", {})}
        built_change = any(math.isfinite(v) for v in c.max_change.values())
        if not built_change and any(math.isfinite(v) for v in
                                    limits.get("max_change", {}).values()):
            raise ConfigError("limits.max_change: no rate-change limit was finite when the "
                              "problem was built; give a finite default in the config to "
                              "make it a parameter")
        for label, value in (("soft_window", window), ("hard_window", hard)):
            structural = c.soft_window if label == "soft_window" else c.hard_window
            for side in (0, 1):
                if math.isfinite(value[side]) and not math.isfinite(structural[side]):
                    raise ConfigError(f"limits.{label}: side {side} was not finite when the "
                                      f"problem was built; give a finite default in the "
                                      f"config to make it a parameter")
        weight_part = np.concatenate([
            [weights.get("output_weight", c.output_weight)],
            [change_w.get(i, 0.0) for i in self._free], [use_w.get(i, 0.0) for i in self._free],
            list(soft_w), [_finite_or(window[0], -1e6), _finite_or(window[1], 1e6)]])
        lbx = np.full(self._nw, -np.inf)
        ubx = np.full(self._nw, np.inf)
        lo = np.array([bounds.get(i, (0.0, np.inf))[0] for i in self._free])
        hi = np.array([bounds.get(i, (0.0, np.inf))[1] for i in self._free])
        if c.ratio is not None:  # the dependent input's bounds limit the decided one
            a, b, r = c.ratio
            if r > 0 and b in bounds:
                j = self._free.index(a)
                hi[j] = min(hi[j], bounds[b][1] / r)
                lo[j] = max(lo[j], bounds[b][0] / r)
        su, sl, sh = self._slices["U"], self._slices["SL"], self._slices["SH"]
        lbx[su], ubx[su] = np.tile(lo, self._n_blocks), np.tile(hi, self._n_blocks)
        lbx[sl], lbx[sh] = 0.0, 0.0
        lbg = np.zeros(self._ng)
        ubg = np.zeros(self._ng)
        rows = self._rows
        lbg[rows["soft"]], ubg[rows["soft"]] = 0.0, np.inf
        lbg[rows["hard"]], ubg[rows["hard"]] = hard
        lbg[rows["terminal"]], ubg[rows["terminal"]] = limits.get("terminal_window",
                                                                  c.terminal_window)
        if rows["change"].size:
            dmax = np.array([max_change.get(i, np.inf) for i in self._free])
            limit = np.tile(dmax, rows["change"].size // self._nf)
            lbg[rows["change"]], ubg[rows["change"]] = -limit, limit
        lbg[rows["dose_window"]] = -np.inf
        # a cold start begins at small positive rates (see _initial_guess)
        cold_rates = np.where(np.isfinite(hi), lo + 0.05 * (hi - lo), lo + 1e-3)
        return weight_part, lbx, ubx, lbg, ubg, cold_rates

    def _initial_guess(self, x0: np.ndarray, prev: np.ndarray, N: int) -> np.ndarray:
        su = self._slices["U"]
        if self._warm is not None:
            w = self._warm["x"].copy()
            if "X" in self._slices:
                X = w[self._slices["X"]].reshape(N + 1, self._n)
                X = np.vstack([X[1:], X[-1:]])  # shift by one period
                X[0] = x0
                w[self._slices["X"]] = X.ravel()
            # shift the rates by one period (a block now starts one period later in the
            # old plan): a fixed averaging matrix over the blocks
            w[su] = (self._shift @ w[su].reshape(self._n_blocks, self._nf)).ravel()
            return w
        # Cold start away from zero drug: with no drug on board every Hill-type output has a
        # zero gradient in the rates (it is flat at C = 0), so "no drug" is a stationary
        # point of the problem; start from small positive rates instead (5 % of the range:
        # large rates drive a stiff output deep past its window, and the first step then
        # jumps back to no drug).
        w = np.zeros(self._nw)
        if "X" in self._slices:
            w[self._slices["X"]] = np.tile(np.asarray(x0, float), N + 1)
        guess = np.where(prev > 0, prev, self._cold_rates)
        w[su] = np.tile(guess, self._n_blocks)
        return w

    def _solve(self, t_s, p, w0, lbx, ubx, lbg, ubg) -> DosePlan:
        c = self.config
        order = ([f"sqpmethod:{qp}" for qp in c.qp_solvers] if c.solver == "sqpmethod"
                 else []) + ["ipopt"]
        reasons = []
        start = time.perf_counter()
        for name in order:
            solver = self._solver(name)
            # qpOASES prints some failures even when told to print nothing
            with quiet_native_stdout():
                out = solver(x0=w0, p=p, lbx=lbx, ubx=ubx, lbg=lbg, ubg=ubg)
            stats = solver.stats()
            w = np.asarray(out["x"], dtype=float).ravel()
            status = str(stats.get("return_status", "unknown"))
            ok = bool(stats.get("success", False))
            problem = self._check(w, lbx, ubx)
            if ok and problem is None:
                self._warm = {"x": w}
                return self._result(t_s, True, status, int(stats.get("iter_count", -1)),
                                    time.perf_counter() - start, name, w, p, float(out["f"]),
                                    "; ".join(reasons + [f"{name}: {status}"]))
            reasons.append(f"{name}: {status}" + (f" ({problem})" if problem else ""))
        self._warm = None
        return self._result(t_s, False, reasons[-1], int(stats.get("iter_count", -1)),
                            time.perf_counter() - start, order[-1], w, p, math.nan,
                            "; ".join(reasons))

    def _check(self, w: np.ndarray, lbx: np.ndarray, ubx: np.ndarray) -> str | None:
        """Why the solution may not be used (non-finite, or rates outside their bounds)."""
        if not np.all(np.isfinite(w)):
            return "non-finite solution"
        k = self._slices["U"]
        tol = 1e-6 * np.maximum(1.0, np.minimum(np.abs(ubx[k]), 1e6))
        u = w[k]
        if (u < lbx[k] - tol).any() or (u > ubx[k] + tol).any():
            return "rates outside their bounds"
        return None

    def _result(self, t_s, success, status, iterations, seconds, solver, w, p, objective,
                reason) -> DosePlan:
        c, m = self.config, self.model
        U = w[self._slices["U"]].reshape(self._n_blocks, self._nf)
        U = np.clip(U, 0.0, None)
        per_stage = U[np.arange(c.horizon) // c.move_block]     # (horizon, free inputs)
        plan = np.zeros((c.horizon, m.n_inputs))
        plan[:, self._free_columns] = per_stage
        if c.ratio is not None:
            a, b, r = c.ratio
            plan[:, m.input_index(b)] = r * per_stage[:, self._free.index(a)]
        rates = {name: float(plan[0, m.input_index(name)]) for name in c.inputs}
        y_pred = self._y_pred
        return DosePlan(t_s, success, status, iterations, seconds, solver, rates, plan,
                        objective, reason,
                        lambda: np.asarray(y_pred(w, p), dtype=float).ravel())


#: config fields that are numbers of the built problem (per call), not its structure
_PER_CALL_FIELDS = ("reference", "output_weight", "change_weights", "use_weights",
                    "rate_bounds", "max_change", "soft_window", "soft_weights",
                    "hard_window", "terminal_window", "dose_windows")


def problem_structure(config: NMPCConfig) -> tuple:
    """What the built problem depends on: two configs with the same structure share one
    built problem (a tuning sweep over weights and limits never rebuilds it)."""
    fixed = tuple((f.name, repr(getattr(config, f.name))) for f in fields(config)
                  if f.name not in _PER_CALL_FIELDS)

    def finite(values) -> tuple[bool, ...]:
        return tuple(math.isfinite(v) for v in values)

    return fixed + (finite(config.soft_window), finite(config.hard_window),
                    finite(config.terminal_window),
                    any(math.isfinite(v) for v in config.max_change.values()),
                    tuple((name, window) for name, window, _ in config.dose_windows))


def _finite_or(value: float, fallback: float) -> float:
    return value if math.isfinite(value) else fallback
