"""Advance a model's state over an interval of constant input: the one integrator of mpc_dose.

The open-loop simulator, the virtual patient between events and the estimators all move
states forward with :class:`Propagator`:

* affine and time-invariant models (every linear PK model, effect sites and transit chains;
  circadian models whose amplitudes are all 0) use the exact zero-order hold: the matrix
  exponential of the augmented system ``[[A, B, c], [0, 0, 0]] dt``, cached per step
  length, so a new input costs a matrix-vector product, not an exponential. Runs of equal steps are evaluated in blocks of matrix powers, so a 24 h run at
  1 s resolution costs a few milliseconds instead of 86,400 Python iterations.
* every other model (saturable elimination, target binding, Hill-driven turnover, circadian
  parameters) uses CVODES through CasADi, on a time axis normalised to [0, 1] so that one
  compiled integrator serves every interval length and start time.
"""

from __future__ import annotations

import weakref

import casadi as ca
import numpy as np
from scipy.linalg import expm

from ..errors import ModelError
from .spec import Model

__all__ = ["Propagator", "DEFAULT_RTOL", "DEFAULT_ATOL"]

DEFAULT_RTOL = 1e-10
DEFAULT_ATOL = 1e-12
_BLOCK = 64  # steps evaluated at once from precomputed matrix powers

_integrators: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _normalised_integrator(model: Model, rtol: float, atol: float, points: int = 1
                           ) -> ca.Function:
    """A CVODES integrator of ``dx/dtau = dt f(t0 + tau dt, x, u, p)`` over tau in [0, 1],
    reporting the state at *points* equally spaced tau in (0, 1].

    Its parameter vector is ``[u; p; t0; dt]``; compiled once per model, tolerance and
    number of points. With ``points > 1`` one call covers a run of equal output steps
    without restarting the solver at each output time.
    """
    per_model = _integrators.setdefault(model, {})
    key = (rtol, atol, points)
    if key not in per_model:
        x = ca.SX.sym("x", model.n_states)
        u = ca.SX.sym("u", model.n_inputs)
        p = ca.SX.sym("p", len(model.params))
        t0, dt, tau = ca.SX.sym("t0"), ca.SX.sym("dt"), ca.SX.sym("tau")
        ode = dt * model.f(t0 + tau * dt, x, u, p)
        dae = {"x": x, "p": ca.vertcat(u, p, t0, dt), "t": tau, "ode": ode}
        grid = [k / points for k in range(1, points + 1)]
        per_model[key] = ca.integrator("propagate_cvodes", "cvodes", dae, 0.0, grid,
                                       {"reltol": rtol, "abstol": atol, "max_num_steps": 100000})
    return per_model[key]


def shared_propagator(model: Model, p: np.ndarray, *, rtol: float = DEFAULT_RTOL,
                      atol: float = DEFAULT_ATOL) -> "Propagator":
    """A :class:`Propagator` for *model* and *p* kept across calls (the last few): repeated
    simulations with the same parameter values (a dose search, a controller planning each
    dose) reuse its matrix exponentials instead of computing them again."""
    key = (id(model), np.asarray(p, dtype=float).tobytes(), rtol, atol)
    hit = _SHARED.get(key)
    if hit is None or hit.model is not model:
        hit = Propagator(model, p, rtol=rtol, atol=atol)
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.pop(next(iter(_SHARED)))
        _SHARED[key] = hit
    return hit


#: shared_propagator's propagators, oldest first
_SHARED: dict[tuple, "Propagator"] = {}
_SHARED_MAX = 8


class Propagator:
    """Moves the state of *model* with parameter vector *p* through time.

    Parameters
    ----------
    model : Model
    p : array
        Parameter vector in declared units (from :meth:`Model.parameter_vector`).
    rtol, atol : float
        CVODES tolerances for models that are not affine and time-invariant.
    """

    def __init__(self, model: Model, p: np.ndarray, *, rtol: float = DEFAULT_RTOL,
                 atol: float = DEFAULT_ATOL) -> None:
        self.model = model
        self.p = np.asarray(p, dtype=float).ravel()
        if self.p.shape != (len(model.params),):
            raise ModelError(f"model {model.name!r}: expected {len(model.params)} parameter "
                             f"values, got {self.p.shape[0]}")
        self.rtol, self.atol = rtol, atol
        #: True when the exact zero-order hold is used.
        self.is_exact = model.is_affine and not self._varies_in_time()
        self._cache: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._last_transition: tuple[tuple, np.ndarray] | None = None
        if self.is_exact:
            a, b, c = model.affine_terms(0.0, self.p)
            self._a = np.asarray(a, dtype=float).reshape(model.n_states, model.n_states)
            self._b = np.asarray(b, dtype=float).reshape(model.n_states, model.n_inputs)
            self._c = np.asarray(c, dtype=float).ravel()
        else:
            self._integrator = _normalised_integrator(model, rtol, atol)

    def _varies_in_time(self) -> bool:
        if not self.model.is_time_varying:
            return False
        # With every circadian amplitude at 0 the modulated parameter is exactly its mesor.
        amplitudes = [k for k, q in enumerate(self.model.params) if "_amplitude_" in q.name
                      and q.name in self.model.zero_default_params]
        return bool(np.any(self.p[amplitudes] != 0.0)) if amplitudes else True

    # ------------------------------------------------------------------ exact ZOH
    def discrete(self, dt: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(Phi, Gamma, gamma_c)``: ``x(t+dt) = Phi x + Gamma u + gamma_c`` for any constant
        *u*, from one matrix exponential of ``[[A, B, c], [0, 0, 0]] dt`` per step length."""
        key = float(dt)
        hit = self._cache.get(key)
        if hit is None:
            n, m = self.model.n_states, self.model.n_inputs
            aug = np.zeros((n + m + 1, n + m + 1))
            aug[:n, :n] = self._a * dt
            aug[:n, n:n + m] = self._b * dt
            aug[:n, n + m] = self._c * dt
            e = expm(aug)
            hit = (e[:n, :n], e[:n, n:n + m].copy(), e[:n, n + m].copy())
            if len(self._cache) > 4096:  # irregular event times: keep memory bounded
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def transition(self, dt: float, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(Phi, gamma)`` with ``x(t + dt) = Phi x(t) + gamma`` under constant input *u*."""
        phi, gamma_u, gamma_c = self.discrete(dt)
        u = np.asarray(u, dtype=float)
        key = (float(dt), u.tobytes())
        if self._last_transition is None or self._last_transition[0] != key:
            # a plant steps with the same rates for many samples in a row
            self._last_transition = (key, gamma_u @ u + gamma_c)
        return phi, self._last_transition[1]

    @staticmethod
    def _run(x: np.ndarray, phi: np.ndarray, gamma: np.ndarray, n: int) -> np.ndarray:
        """States after 1..n equal steps of ``x <- Phi x + gamma``, shape (n, n_states)."""
        m = min(n, _BLOCK)
        powers = np.empty((m, *phi.shape))
        offsets = np.empty((m, phi.shape[0]))
        powers[0], offsets[0] = phi, gamma
        for k in range(1, m):
            powers[k] = phi @ powers[k - 1]
            offsets[k] = phi @ offsets[k - 1] + gamma
        out = np.empty((n, phi.shape[0]))
        for start in range(0, n, m):
            k = min(m, n - start)
            out[start:start + k] = powers[:k] @ x + offsets[:k]
            x = out[start + k - 1]
        return out

    # ------------------------------------------------------------------ public
    def advance(self, x: np.ndarray, t0: float, t1: float, u: np.ndarray) -> np.ndarray:
        """State at *t1* [s] from state *x* at *t0* [s] under constant input *u*."""
        x = np.asarray(x, dtype=float)
        dt = t1 - t0
        if dt < 0:
            raise ModelError(f"cannot propagate backwards in time (t0={t0} s, t1={t1} s)")
        if dt == 0:
            return x.copy()
        if self.is_exact:
            phi, gamma = self.transition(dt, u)
            return phi @ x + gamma
        out = self._integrator(x0=x, p=np.concatenate([np.asarray(u, float), self.p, [t0, dt]]))
        return np.asarray(out["xf"], dtype=float).ravel()

    def _runs(self, steps: np.ndarray):
        """Yield ``(start, end, dt)`` of runs of equal steps (to rounding)."""
        k = 0
        while k < steps.size:
            dt = steps[k]
            differs = np.abs(steps[k + 1:] - dt) > 1e-12 * max(1.0, abs(dt))
            end = k + 1 + (int(np.argmax(differs)) if differs.any() else differs.size)
            yield k, end, dt
            k = end

    def _integrate_runs(self, x, t0, times, steps, u, out):
        block = _normalised_integrator(self.model, self.rtol, self.atol, _BLOCK)
        u = np.asarray(u, dtype=float)
        t = t0
        for start, end, dt in self._runs(steps):
            k = start
            while end - k >= _BLOCK:
                res = block(x0=x, p=np.concatenate([u, self.p, [t, dt * _BLOCK]]))
                out[k:k + _BLOCK] = np.asarray(res["xf"], dtype=float).T
                x, t, k = out[k + _BLOCK - 1], times[k + _BLOCK - 1], k + _BLOCK
            for j in range(k, end):
                x = self.advance(x, t, times[j], u)
                out[j], t = x, times[j]
        return out

    def trajectory(self, x: np.ndarray, t0: float, times: np.ndarray, u: np.ndarray
                   ) -> np.ndarray:
        """States at each of the sorted *times* (all >= *t0*), shape (len(times), n_states)."""
        times = np.asarray(times, dtype=float)
        out = np.empty((times.size, self.model.n_states))
        if times.size == 0:
            return out
        steps = np.diff(np.concatenate([[t0], times]))
        x = np.asarray(x, dtype=float)
        if not self.is_exact:
            return self._integrate_runs(x, t0, times, steps, u, out)
        for start, end, dt in self._runs(steps):
            phi, gamma = self.transition(dt, u)
            out[start:end] = self._run(x, phi, gamma, end - start)
            x = out[end - 1]
        return out
