"""The true patient: a model integrated between events, with disturbances on its outputs.

:class:`VirtualPatient` is a plain object, not a simpy process: whoever owns the clock (the
plant's simpy processes) calls :meth:`advance` when something happens (a sample is taken, a
rate changes) and the state moves from the last event to now in one exact step (zero-order
hold for linear parts, CVODES otherwise), never by small fixed ticks.

The patient's model may differ from the controller's (structure and parameters).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, ModelError
from ..model.propagate import Propagator
from ..model.spec import Model
from .clock import ACT, at

__all__ = ["OutputDisturbance", "VirtualPatient", "parameter_schedule"]


@dataclass(frozen=True)
class OutputDisturbance:
    """An additive disturbance on output *output* given by knots *times_s* and *values* (in
    the output's unit).

    ``kind="steps"``: ``values[i]`` holds from ``times_s[i]`` to the next knot;
    ``kind="linear"``: linear between knots. Before the first knot the disturbance is 0 and
    after the last the last value holds, so the DESIGN's +10 BIS from 600 s to 900 s is
    ``times_s=(600, 900), values=(10, 0)``.
    """

    output: str
    times_s: tuple[float, ...]
    values: tuple[float, ...]
    kind: str = "steps"

    def __post_init__(self) -> None:
        if len(self.times_s) != len(self.values) or not self.times_s:
            raise ConfigError(f"disturbance on {self.output!r}: times_s and values must have "
                              f"the same, non-zero length")
        if any(b < a for a, b in zip(self.times_s, self.times_s[1:])):
            raise ConfigError(f"disturbance on {self.output!r}: times_s must be increasing")
        if self.kind not in ("steps", "linear"):
            raise ConfigError(f"disturbance on {self.output!r}: kind must be 'steps' or "
                              f"'linear', got {self.kind!r}")

    def value(self, t_s: np.ndarray | float) -> np.ndarray | float:
        """The disturbance at *t_s* [s] (a float for a single time)."""
        if isinstance(t_s, (int, float)) or np.ndim(t_s) == 0:  # once per sample: no arrays
            t, knots = float(t_s), self.times_s
            if t < knots[0]:
                return 0.0
            i = bisect.bisect_right(knots, t) - 1
            if self.kind == "linear" and i + 1 < len(knots):
                share = (t - knots[i]) / (knots[i + 1] - knots[i])
                return self.values[i] + share * (self.values[i + 1] - self.values[i])
            return float(self.values[i])
        t = np.asarray(t_s, dtype=float)
        knots = np.asarray(self.times_s, dtype=float)
        vals = np.asarray(self.values, dtype=float)
        if self.kind == "linear":
            out = np.interp(t, knots, vals)
        else:
            out = vals[np.clip(np.searchsorted(knots, t, side="right") - 1, 0, None)]
        return np.where(t >= knots[0], out, 0.0)


@dataclass(frozen=True)
class Meal:
    """A meal the patient eats at *t_s* [s]: *amount* of model input *input* (its amount
    unit) given as a bolus no pump delivers; *announced*: the amount the patient says it
    ate (a counting error makes it differ), None when it says nothing."""

    t_s: float
    input: str
    amount: float
    announced: float | None = None


def meal_process(env, patient: "VirtualPatient", meals, events: list, announce=None,
                 grams_per_amount: float = 1.0) -> object:
    """simpy process: each meal enters its input's bolus state at its time (and the run's
    events say so); an announced one is also reported through *announce* as a reading of
    ``<input>_announced`` in g (what the patient enters in the pump or app;
    *grams_per_amount* converts from the input's amount unit)."""
    from .sensor import SensorReading
    for meal in sorted(meals, key=lambda m: m.t_s):
        yield at(env, meal.t_s, ACT)
        patient.give_bolus(meal.t_s, patient.model.input_index(meal.input), meal.amount)
        told = "unannounced" if meal.announced is None else f"announced {meal.announced:.4g}"
        events.append((float(meal.t_s), "meal", f"{meal.input} {meal.amount:.4g} ({told})"))
        if meal.announced is not None and announce is not None:
            announce(SensorReading(f"{meal.input}_announced",
                                   float(meal.announced) * grams_per_amount, "g",
                                   float(meal.t_s), "valid", "patient"))


class VirtualPatient:
    """A model with true parameters, its state, the delivered rates and output disturbances.

    Parameters
    ----------
    model : Model
        The patient's true model.
    params : mapping or array
        True parameter values (declared units).
    disturbances : sequence of OutputDisturbance
    x0 : array, optional
        Initial state (the model's own by default).
    """

    def __init__(self, model: Model, params: Mapping[str, float] | np.ndarray,
                 disturbances: Sequence[OutputDisturbance] = (), *, x0: np.ndarray | None = None
                 ) -> None:
        self.model = model
        self._set_params(params)
        self.x = model.initial_state(self.p) if x0 is None else np.asarray(x0, float).copy()
        self.t_s = 0.0
        self.rates = np.zeros(model.n_inputs)
        #: every change of what reaches the patient: (time [s], input index, amount/s)
        self.deliveries: list[tuple[float, int, float]] = []
        for d in disturbances:
            model.output_index(d.output)
        self.disturbances = tuple(disturbances)

    def _set_params(self, params: Mapping[str, float] | np.ndarray) -> None:
        self.p = (np.asarray(params, dtype=float).copy() if isinstance(params, np.ndarray)
                  else self.model.parameter_vector(params))
        self._propagator = Propagator(self.model, self.p)
        self._outputs = self.model.output_function(self.p)
        self._last_outputs: tuple[tuple, np.ndarray] | None = None

    def advance(self, t_s: float) -> None:
        """Integrate the true state from the last event to *t_s* under the delivered rates."""
        if t_s < self.t_s:
            raise ModelError(f"patient: cannot go back in time from {self.t_s} s to {t_s} s")
        if t_s > self.t_s:
            self.x = self._propagator.advance(self.x, self.t_s, t_s, self.rates)
            self.t_s = t_s

    def set_rate(self, t_s: float, input_index: int, rate: float) -> None:
        """From *t_s* on, *rate* [amount/s] of input *input_index* reaches the patient."""
        self.advance(t_s)
        if self.rates[input_index] != rate:
            self.deliveries.append((float(t_s), input_index, float(rate)))
        self.rates = self.rates.copy()
        self.rates[input_index] = rate

    def give_bolus(self, t_s: float, input_index: int, amount: float) -> None:
        """Add *amount* of input *input_index* to its bolus state at *t_s*."""
        self.advance(t_s)
        inp = self.model.inputs[input_index]
        self.x = self.x.copy()
        self.x[self.model.state_index(inp.bolus_state)] += amount

    def set_parameters(self, t_s: float, params: Mapping[str, float] | np.ndarray) -> None:
        """From *t_s* on the patient has new parameter values (e.g. renal function fell)."""
        self.advance(t_s)
        self._set_params(params)

    def true_outputs(self, t_s: float) -> np.ndarray:
        """Outputs at *t_s* (after advancing), disturbances included."""
        self.advance(t_s)
        # sensor and recorder ask at one instant: the same state and rate objects (they are
        # replaced, never changed in place, so identity means equality; the cache keeps them)
        last = self._last_outputs
        if last is not None and last[0][0] == t_s and last[0][1] is self.x and \
                last[0][2] is self.rates:
            return last[1].copy()
        key = (t_s, self.x, self.rates)
        y = self._outputs(np.concatenate([[t_s], self.x, self.rates]))
        for d in self.disturbances:
            y[self.model.output_index(d.output)] += float(d.value(t_s))
        self._last_outputs = (key, y)
        return y.copy()


def parameter_schedule(env, patient: VirtualPatient,
                       changes: Sequence[tuple[float, Mapping[str, float]]]):
    """simpy process: from each time [s] on, the patient has the given parameter values
    (covariates that change, e.g. renal function falling; a new occasion's variability)."""
    from .clock import ACT, at

    for t_s, params in sorted(changes, key=lambda c: c[0]):
        yield at(env, t_s, ACT)
        patient.set_parameters(t_s, params)
