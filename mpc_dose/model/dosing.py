"""Dosing events in model units and their translation into a piecewise-constant input.

A :class:`Dose` is one record (NONMEM-like): a bolus (``amount``) or a zero-order infusion
(``rate`` for ``duration_s``) of one model input, at ``time_s``. Amounts are in the input's
amount unit and rates in that unit per second; the table reader in
:mod:`mpc_dose.scenario.dosing_table` converts from whatever units a table states.

This module is pure: no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, closest
from ..units import convert
from .spec import Model

__all__ = ["Dose", "InputSchedule", "schedule"]


@dataclass(frozen=True)
class Dose:
    """One dose of *input* at *time_s* [s]: a bolus of *amount*, or an infusion of *rate*
    [amount/s] for *duration_s* [s].

    Build with :meth:`bolus`, :meth:`infusion` or :meth:`from_record` (NONMEM AMT/RATE/DUR
    semantics), which check the values.
    """

    time_s: float
    input: str
    amount: float = 0.0
    rate: float = 0.0
    duration_s: float = 0.0

    @property
    def is_bolus(self) -> bool:
        return self.duration_s == 0.0

    @classmethod
    def bolus(cls, time_s: float, input: str, amount: float) -> Dose:
        return cls.from_record(time_s, input, amount=amount)

    @classmethod
    def infusion(cls, time_s: float, input: str, rate: float, duration_s: float) -> Dose:
        return cls.from_record(time_s, input, rate=rate, duration_s=duration_s)

    @classmethod
    def from_record(cls, time_s: float, input: str, *, amount: float | None = None,
                    rate: float | None = None, duration_s: float | None = None,
                    where: str = "dose") -> Dose:
        """Resolve a record the way NONMEM reads AMT, RATE and DUR.

        ``amount`` alone: a bolus. ``amount`` and ``rate > 0``: an infusion lasting
        ``amount/rate``. ``amount`` and ``duration_s > 0``: rate ``amount/duration``. ``rate``
        and ``duration_s``: amount ``rate*duration``. Any other combination, a negative or
        non-finite value, or an amount that disagrees with rate times duration, is an error
        naming *where* (e.g. ``"doses.csv row 3"``), the field and the value.
        """
        def check(name: str, value: float | None, positive: bool = False) -> float | None:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                return None
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {name} must be a number, got {value!r}") from None
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise ConfigError(f"{where}: {name} must be a finite number "
                                  f"{'> 0' if positive else '>= 0'}, got {value!r}")
            return value

        t = check("time", time_s)
        if t is None:
            raise ConfigError(f"{where}: time is missing")
        amount, rate, duration = check("amount", amount), check("rate", rate), \
            check("duration", duration_s)
        if not isinstance(input, str) or not input:
            raise ConfigError(f"{where}: input must name a model input, got {input!r}")
        if rate == 0:
            rate = None  # NONMEM: RATE = 0 means a bolus
        if duration == 0:
            duration = None
        given = (amount is not None, rate is not None, duration is not None)
        if given == (True, False, False):
            return cls(t, input, amount=amount)
        if given == (True, True, False):
            if amount == 0:
                raise ConfigError(f"{where}: an infusion needs amount > 0, got 0")
            return cls(t, input, amount=amount, rate=rate, duration_s=amount / rate)
        if given == (True, False, True):
            return cls(t, input, amount=amount, rate=amount / duration, duration_s=duration)
        if given == (False, True, True):
            return cls(t, input, amount=rate * duration, rate=rate, duration_s=duration)
        if given == (True, True, True):
            if not math.isclose(amount, rate * duration, rel_tol=1e-6):
                raise ConfigError(f"{where}: amount {amount} differs from rate x duration = "
                                  f"{rate * duration}; give two of the three")
            return cls(t, input, amount=amount, rate=rate, duration_s=duration)
        raise ConfigError(f"{where}: give an amount (bolus), or two of amount, rate and "
                          f"duration (infusion); got amount={amount}, rate={rate}, "
                          f"duration={duration}")


@dataclass(frozen=True)
class InputSchedule:
    """Doses turned into what an integrator needs.

    ``breaks`` are the sorted times [s] where something happens; ``rates[i]`` is the input
    vector on ``[breaks[i], breaks[i+1])`` (and after the last break for the last row);
    ``jumps[i]`` is the state increment applied at ``breaks[i]`` (boluses).
    """

    breaks: np.ndarray
    rates: np.ndarray
    jumps: np.ndarray


def schedule(model: Model, p: np.ndarray, doses: Sequence[Dose]) -> InputSchedule:
    """Translate *doses* for *model* with parameter vector *p* into an :class:`InputSchedule`.

    Lag times shift doses of inputs that declare one; bioavailability scales bolus amounts
    (infusions into a depot are scaled inside the model equations).

    Raises
    ------
    ConfigError
        For a dose of an input the model does not have.
    """
    lag_s = {}
    boluses, infusions = [], []
    for k, dose in enumerate(doses):
        if dose.input not in model.input_names:
            raise ConfigError(f"dose {k + 1}: model {model.name!r} has no input {dose.input!r}"
                              f"{closest(dose.input, model.input_names)}; its inputs: "
                              f"{', '.join(model.input_names)}")
        j = model.input_index(dose.input)
        inp = model.inputs[j]
        if inp.name not in lag_s:
            lag_s[inp.name] = 0.0
            if inp.lag is not None:
                lag_param = model.parameter(inp.lag)
                lag_s[inp.name] = convert(p[model.param_index(inp.lag)], lag_param.unit, "s")
        start = dose.time_s + lag_s[inp.name]
        if dose.is_bolus:
            f = p[model.param_index(inp.bioavailability)] if inp.bioavailability else 1.0
            boluses.append((start, model.state_index(inp.bolus_state), dose.amount * f))
        else:
            infusions.append((start, start + dose.duration_s, j, dose.rate))
    times = {0.0}
    times.update(b[0] for b in boluses)
    for start, end, _, _ in infusions:
        times.update((start, end))
    breaks = np.array(sorted(times))
    rates = np.zeros((breaks.size, model.n_inputs))
    jumps = np.zeros((breaks.size, model.n_states))
    index = {t: i for i, t in enumerate(breaks)}
    for start, end, j, rate in infusions:
        rates[index[start]:index[end], j] += rate
    for t, s, amount in boluses:
        jumps[index[t], s] += amount
    return InputSchedule(breaks, rates, jumps)
