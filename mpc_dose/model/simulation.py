"""Open-loop simulation of a model under a dosing regimen, and its result object.

:func:`simulate` is exact at every event boundary: the input is piecewise constant between
breakpoints (infusion starts and ends, boluses), a bolus is a jump of its state, and each
interval is propagated by :class:`~mpc_dose.model.propagate.Propagator` (exact zero-order
hold for linear time-invariant models, CVODES otherwise). Values at a time where a bolus is
given are recorded just after it (the state is right-continuous), and so are input rates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..units import unit_to_token
from .dosing import Dose, schedule
from .propagate import DEFAULT_ATOL, DEFAULT_RTOL, shared_propagator
from .spec import Model

__all__ = ["simulate", "SimulationResult"]


@dataclass(frozen=True)
class SimulationResult:
    """Time series of one simulation, with names and units (after python-control's
    ``TimeResponseData``).

    Attributes
    ----------
    time_s : (n,) array
    states : (n, n_states) array, in each state's unit
    inputs : (n, n_inputs) array, rates in each input's amount unit per second
    outputs : (n, n_outputs) array, in each output's unit
    params : (n_params,) array, the parameter vector used
    """

    model: Model
    time_s: np.ndarray
    states: np.ndarray
    inputs: np.ndarray
    outputs: np.ndarray
    params: np.ndarray

    def output(self, name: str) -> np.ndarray:
        return self.outputs[:, self.model.output_index(name)]

    def state(self, name: str) -> np.ndarray:
        return self.states[:, self.model.state_index(name)]

    def input(self, name: str) -> np.ndarray:
        return self.inputs[:, self.model.input_index(name)]

    def columns(self) -> dict[str, tuple[np.ndarray, str]]:
        """Column name (with its unit) -> (values, unit), in the order of :meth:`to_pandas`."""
        m = self.model
        cols: dict[str, tuple[np.ndarray, str]] = {"time_s": (self.time_s, "s")}
        for k, o in enumerate(m.outputs):
            cols[_column(o.name, o.unit)] = (self.outputs[:, k], o.unit)
        for k, s in enumerate(m.states):
            cols[_column(f"state_{s.name}", s.unit)] = (self.states[:, k], s.unit)
        for k, i in enumerate(m.inputs):
            cols[_column(f"{i.name}_rate", i.rate_unit)] = (self.inputs[:, k], i.rate_unit)
        return cols

    def to_pandas(self):
        """A DataFrame with a ``time_s`` column and one column per output, state and input
        rate, units in the column names (``propofol_cp_ug_per_mL``)."""
        import pandas as pd

        return pd.DataFrame({name: values for name, (values, _) in self.columns().items()})


def _column(name: str, unit: str) -> str:
    return f"{name}_{unit_to_token(unit)}" if unit != "1" else f"{name}_unitless"


def simulate(model: Model, params: Mapping[str, float] | np.ndarray, doses: Sequence[Dose],
             times_s: Sequence[float] | np.ndarray, *, x0: np.ndarray | None = None,
             rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> SimulationResult:
    """Simulate *model* from t = 0 under *doses* and report it at *times_s*.

    Parameters
    ----------
    model : Model
    params : mapping or array
        Parameter values in their declared units, by name (checked) or as the vector ``p``.
    doses : sequence of Dose
        Boluses and infusions; times in s, amounts in each input's amount unit.
    times_s : array
        Output times [s], non-decreasing and >= 0.
    x0 : array, optional
        State at t = 0 (state units); the model's own initial state (e.g. a turnover
        baseline) by default.

    Raises
    ------
    ConfigError
        For unsorted, negative or non-finite output times, or a dose of an unknown input.
    ModelError
        For unknown, missing or out-of-domain parameter values.
    """
    p = (np.asarray(params, dtype=float) if isinstance(params, np.ndarray)
         else model.parameter_vector(params))
    times = np.asarray(times_s, dtype=float).ravel()
    if times.size == 0:
        raise ConfigError("times_s: no output times given")
    if not np.all(np.isfinite(times)) or times[0] < 0 or np.any(np.diff(times) < 0):
        raise ConfigError("times_s: output times must be finite, >= 0 and non-decreasing; got "
                          f"first {times[0]!r}, last {times[-1]!r}")
    plan = schedule(model, p, doses)
    propagator = shared_propagator(model, p, rtol=rtol, atol=atol)
    x = model.initial_state(p) if x0 is None else np.asarray(x0, dtype=float).copy()
    if x.shape != (model.n_states,):
        raise ConfigError(f"x0: expected {model.n_states} states, got shape {x.shape}")

    states = np.empty((times.size, model.n_states))
    inputs = np.empty((times.size, model.n_inputs))
    n_breaks = plan.breaks.size
    for i in range(n_breaks):
        start = plan.breaks[i]
        end = plan.breaks[i + 1] if i + 1 < n_breaks else np.inf
        if start > times[-1]:
            break
        x = x + plan.jumps[i]
        u = plan.rates[i]
        lo, hi = np.searchsorted(times, [start, end], side="left")
        if hi > lo:
            at_start = times[lo:hi] == start
            states[lo:hi][at_start] = x
            inside = slice(lo + int(at_start.sum()), hi)
            states[inside] = propagator.trajectory(x, start, times[inside], u)
            inputs[lo:hi] = u
        if np.isfinite(end) and end <= times[-1]:
            x = propagator.advance(x, start, end, u)
    return SimulationResult(model, times, states, inputs,
                            evaluate_outputs(model, times, states, inputs, p), p)


_CHUNK = 2048


def evaluate_outputs(model: Model, times: np.ndarray, states: np.ndarray, inputs: np.ndarray,
                     p: np.ndarray) -> np.ndarray:
    """``h`` at every row of *states* and *inputs*, shape (len(times), n_outputs).

    Affine outputs (concentrations of linear PK) are one matrix product; others are replayed
    with numpy (:class:`~mpc_dose.model.vectorize.NumpyFunction`). Otherwise a mapped copy of ``h`` of fixed width is compiled once per model and reused in chunks:
    mapping ``h`` to each new length would cost more than the evaluation itself.
    """
    n = times.size
    if model.outputs_affine:
        c, d, e = (np.asarray(m, dtype=float) for m in model.output_affine_terms(p))
        return (states @ c.reshape(model.n_outputs, model.n_states).T
                + inputs @ d.reshape(model.n_outputs, model.n_inputs).T + e.ravel())
    if n < 16:  # a few points (a plant sample): the plain function is cheaper
        return np.vstack([np.asarray(model.h(times[k], states[k], inputs[k], p),
                                     dtype=float).ravel() for k in range(n)]
                         ) if n else np.empty((0, model.n_outputs))
    vectorised = model.h_numpy()
    if vectorised is not None:
        return vectorised(times[None, :], states.T, inputs.T, p)[0].T
    mapped = model.h_mapped(_CHUNK)
    out = np.empty((n, model.n_outputs))
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        width = stop - start
        t = np.zeros(_CHUNK)
        x = np.zeros((model.n_states, _CHUNK))
        u = np.zeros((model.n_inputs, _CHUNK))
        t[:width], x[:, :width], u[:, :width] = times[start:stop], states[start:stop].T, \
            inputs[start:stop].T
        y = np.asarray(mapped(t, x, u, p), dtype=float).reshape(model.n_outputs, _CHUNK)
        out[start:stop] = y[:, :width].T
    return out
