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

    @property
    def n_patients(self) -> int:
        return len(self.p)

    def states(self, rates: np.ndarray) -> np.ndarray:
        """States at the step boundaries, shape (n_steps + 1, n_patients, n_states), under
        *rates* of shape (n_steps, n_patients, n_inputs) or (n_steps, n_inputs) for all."""
        rates = np.asarray(rates, dtype=float)
        if rates.ndim == 2:
            rates = np.broadcast_to(rates[:, None, :], (rates.shape[0], self.n_patients,
                                                        rates.shape[1]))
        if rates.shape[1:] != (self.n_patients, self.model.n_inputs):
            raise ConfigError(f"rates: expected shape (n_steps, {self.n_patients}, "
                              f"{self.model.n_inputs}), got {rates.shape}")
        forced = np.einsum("bij,tbj->tbi", self._gamma, rates) + self._gc
        x = np.empty((rates.shape[0] + 1, self.n_patients, self.model.n_states))
        x[0] = self.x0
        # Phi x as a sum over columns of broadcast products: for the few states of a PK
        # model this beats a batched matrix product by several times per step
        columns = [np.ascontiguousarray(self._phi[:, :, j]) for j in range(x.shape[2])]
        for k in range(rates.shape[0]):
            xk = x[k]
            nxt = forced[k].copy()
            for j, column in enumerate(columns):
                nxt += column * xk[:, j:j + 1]
            x[k + 1] = nxt
        return x

    def run(self, rates: np.ndarray, sensor: SensorConfig,
            rngs: Sequence[np.random.Generator]) -> BatchResult:
        """Advance every patient under *rates* and read *sensor* at every step boundary
        (``sensor.period_s`` must equal the step; noise from one generator per patient)."""
        if abs(sensor.period_s - self.step_s) > 1e-12 or sensor.first_sample_s != 0:
            raise ConfigError("the batched plant samples at every step from t = 0: set the "
                              "sensor period to the step and first_sample_s to 0")
        if len(rngs) != self.n_patients:
            raise ConfigError(f"expected {self.n_patients} generators, got {len(rngs)}")
        x = self.states(rates)
        steps = x.shape[0]
        time_s = np.arange(steps) * self.step_s
        k = self.model.output_index(sensor.output)
        t_sym = ca.SX.sym("t")
        xs = ca.SX.sym("x", self.model.n_states)
        us = ca.SX.sym("u", self.model.n_inputs)
        ps = ca.SX.sym("p", len(self.model.params))
        sensed = NumpyFunction(ca.Function("sensed", [t_sym, xs, us, ps],
                                           [self.model.h(t_sym, xs, us, ps)[k]]))
        rates = np.asarray(rates, dtype=float)
        true = np.empty((steps, self.n_patients))
        measured = np.empty_like(true)
        valid = np.empty(true.shape, dtype=bool)
        emitted = np.empty(true.shape, dtype=bool)
        for j in range(self.n_patients):
            u = rates[:, j] if rates.ndim == 3 else rates
            u = np.vstack([u, u[-1:]])  # rate in force at each sample (the last one holds)
            true[:, j] = sensed(time_s[None, :], x[:, j].T, u.T, self.p[j])[0][0]
            noise = SensorNoise(sensor, rngs[j])
            measured[:, j], valid[:, j], emitted[:, j] = noise.sample_many(true[:, j], time_s)
        return BatchResult(time_s, true, measured, valid, emitted)
