"""Many virtual patients stepped together: the plant without simpy, for plant-only studies
and throughput.

The simpy plant handles events one by one, as a controller in the loop needs. When the
inputs are known in advance (an open-loop regimen, a recorded infusion, a throughput
benchmark) :class:`BatchPlant` advances all patients at once at a fixed step with the exact
zero-order hold (one matrix exponential per patient, then one batched matrix product per
step), evaluates the sensed outputs with numpy and applies each patient's sensor chain in
one vectorised call (:meth:`SensorNoise.sample_many`, draw-for-draw what the simpy sensor
would report with the same generator).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import casadi as ca
import numpy as np
from scipy.linalg import expm

from ..errors import ConfigError
from ..model.spec import Model
from ..model.vectorize import NumpyFunction
from .sensor import SensorConfig, SensorNoise

__all__ = ["BatchPlant", "BatchResult"]


@dataclass(frozen=True)
class BatchResult:
    """Sample times [s], true outputs and readings, shape (n_samples, n_patients)."""

    time_s: np.ndarray
    true: np.ndarray
    measured: np.ndarray
    valid: np.ndarray
    emitted: np.ndarray


def _apply(matrices: np.ndarray, series: np.ndarray) -> np.ndarray:
    """``out[t, b] = matrices[b] @ series[t, b]`` as a sum of broadcast products."""
    out = np.zeros((series.shape[0], matrices.shape[0], matrices.shape[1]),
                   dtype=np.result_type(matrices, series))
    for j in range(matrices.shape[2]):
        out += matrices[None, :, :, j] * series[:, :, j:j + 1]
    return out


class BatchPlant:
    """Patients of one linear time-invariant *model*, one parameter set each.

    Parameters
    ----------
    model : Model
        Must be affine and time-invariant in its states (linear PK, effect sites); outputs
        may be nonlinear (e.g. BIS).
    params : sequence
        One mapping (declared units) or parameter vector per patient.
    step_s : float
        The fixed step [s]: inputs change and sensors sample at its multiples.
    """

    def __init__(self, model: Model, params: Sequence[Mapping[str, float] | np.ndarray],
                 step_s: float) -> None:
        if not model.is_affine or model.is_time_varying:
            raise ConfigError(f"model {model.name!r} is not linear time-invariant: use the "
                              f"simpy plant (mpc_dose.plant.patient)")
        if not step_s > 0:
            raise ConfigError(f"step_s must be > 0, got {step_s!r}")
        self.model, self.step_s = model, float(step_s)
        self.p = np.array([np.asarray(q, dtype=float) if isinstance(q, np.ndarray)
                           else model.parameter_vector(q) for q in params])
        n, m = model.n_states, model.n_inputs
        aug = np.zeros((len(self.p), n + m + 1, n + m + 1))
        for k, p in enumerate(self.p):
            a, b, c = (np.asarray(v, dtype=float) for v in model.affine_terms(0.0, p))
            aug[k, :n, :n] = a.reshape(n, n)
            aug[k, :n, n:n + m] = b.reshape(n, m)
            aug[k, :n, n + m] = c.ravel()
        e = expm(aug * self.step_s)  # one exponential per patient, batched
        self._phi, self._gamma, self._gc = e[:, :n, :n], e[:, :n, n:n + m], e[:, :n, n + m]
        self.x0 = np.array([model.initial_state(p) for p in self.p])

    def _states_of_output(self, k: int) -> list[int]:
        """Indices of the states output *k* depends on (from its Jacobian's sparsity)."""
        x = ca.SX.sym("x", self.model.n_states)
        y = self.model.h(ca.SX.sym("t"), x, ca.SX.sym("u", self.model.n_inputs),
                         ca.SX.sym("p", len(self.model.params)))[k]
        return [i for i in range(self.model.n_states) if ca.depends_on(y, x[i])]

    @property
    def n_patients(self) -> int:
        return len(self.p)

    def _rates(self, rates: np.ndarray) -> np.ndarray:
        rates = np.asarray(rates, dtype=float)
        if rates.ndim == 2:
            rates = np.broadcast_to(rates[:, None, :], (rates.shape[0], self.n_patients,
                                                        rates.shape[1]))
        if rates.ndim != 3 or rates.shape[0] < 1 or \
                rates.shape[1:] != (self.n_patients, self.model.n_inputs):
            raise ConfigError(f"rates: expected shape (n_steps >= 1, {self.n_patients}, "
                              f"{self.model.n_inputs}), got {rates.shape}")
        return rates

    def states(self, rates: np.ndarray) -> np.ndarray:
        """States at the step boundaries, shape (n_steps + 1, n_patients, n_states), under
        *rates* of shape (n_steps, n_patients, n_inputs) or (n_steps, n_inputs) for all."""
        rates = self._rates(rates)
        return np.concatenate([x for x, _ in self._chunks(rates, range(self.model.n_states))])

    def _chunks(self, rates: np.ndarray, wanted, chunk: int = 256):
        """Yield ``(states, rates)`` of consecutive time chunks (states at the boundaries
        0..n_steps, the rate in force at each; the last rate holds at the end).

        The recursion runs in each patient's modal coordinates (``Phi = V diag(l) V^-1``):
        one multiply-add per step on all patients at once. Work is done chunk by chunk so
        the arrays stay in cache; the small matrices are applied as broadcast products.
        States not in *wanted* are left at 0.
        """
        steps, n = rates.shape[0], self.model.n_states
        modal = self._modal()
        padded = np.concatenate([rates, rates[-1:]])  # the rate in force at the last sample
        if modal is None:  # defective or ill-conditioned: plain recursion
            lam = v = None
            weights, offset, z = self._gamma, self._gc, self.x0.copy()
        else:
            lam, v, v_inv = modal
            weights = v_inv @ self._gamma
            offset = np.einsum("bij,bj->bi", v_inv, self._gc)
            z = np.einsum("bij,bj->bi", v_inv, self.x0)
        columns = [np.ascontiguousarray(self._phi[:, :, j]) for j in range(n)]
        for start in range(0, steps + 1, chunk):
            stop = min(start + chunk, steps + 1)
            u = padded[start:stop]
            g = _apply(weights, u) + offset
            block = np.empty((stop - start, self.n_patients, n), dtype=np.result_type(z, g))
            for k in range(stop - start):
                block[k] = z
                if lam is None:
                    nxt = g[k].copy()
                    for j, column in enumerate(columns):
                        nxt += column * z[:, j:j + 1]
                    z = nxt
                else:
                    z = lam * z + g[k]
            if lam is None:
                x = block
            else:
                x = np.zeros((stop - start, self.n_patients, n))
                for i in wanted:
                    x[:, :, i] = _apply(v[:, i:i + 1, :], block)[:, :, 0].real
            yield x, u

    def _modal(self):
        """``(eigenvalues, V, V^-1)`` of every patient's Phi, or None if any is unsafe."""
        if not hasattr(self, "_modal_cache"):
            lam, v = np.linalg.eig(self._phi)
            self._modal_cache = None
            if np.all(np.linalg.cond(v) < 1e8):
                self._modal_cache = (lam, v, np.linalg.inv(v))
        return self._modal_cache

    def run(self, rates: np.ndarray, sensor: SensorConfig,
            rngs: Sequence[np.random.Generator]) -> BatchResult:
        """Advance every patient under *rates* and read *sensor* at every step boundary
        (``sensor.period_s`` must equal the step; noise from one generator per patient)."""
        if abs(sensor.period_s - self.step_s) > 1e-12 or sensor.first_sample_s != 0:
            raise ConfigError("the batched plant samples at every step from t = 0: set the "
                              "sensor period to the step and first_sample_s to 0")
        if len(rngs) != self.n_patients:
            raise ConfigError(f"expected {self.n_patients} generators, got {len(rngs)}")
        k = self.model.output_index(sensor.output)
        rates = self._rates(rates)
        t_sym = ca.SX.sym("t")
        xs = ca.SX.sym("x", self.model.n_states)
        us = ca.SX.sym("u", self.model.n_inputs)
        ps = ca.SX.sym("p", len(self.model.params))
        sensed = NumpyFunction(ca.Function("sensed", [t_sym, xs, us, ps],
                                           [self.model.h(t_sym, xs, us, ps)[k]]))
        params = self.p.T[:, None, :]  # (n_params, 1 time, n_patients)
        parts, t0 = [], 0
        for x, u in self._chunks(rates, self._states_of_output(k)):
            t = (t0 + np.arange(x.shape[0])) * self.step_s
            parts.append(sensed(t[None, :, None], x.transpose(2, 0, 1), u.transpose(2, 0, 1),
                                params)[0][0])
            t0 += x.shape[0]
        true = np.ascontiguousarray(np.concatenate(parts).T)  # (patients, samples)
        time_s = np.arange(true.shape[1]) * self.step_s
        measured = np.empty_like(true)
        valid = np.empty(true.shape, dtype=bool)
        emitted = np.empty(true.shape, dtype=bool)
        for j in range(self.n_patients):
            noise = SensorNoise(sensor, rngs[j])
            measured[j], valid[j], emitted[j] = noise.sample_many(true[j], time_s)
        true, measured, valid, emitted = true.T, measured.T, valid.T, emitted.T
        return BatchResult(time_s, true, measured, valid, emitted)
