"""The controller interface every dosing controller implements (baselines, NMPC, a user's).

A controller is called once per control period with the latest reading of each measured
variable and returns a :class:`Decision`: infusion rates per model input, in the input's
amount unit per second (propofol mg/s, remifentanil ug/s), with a human-readable reason, and
optionally boluses (amounts in the input's amount unit, e.g. insulin U) for pumps that take
bolus commands. A controller that gives boluses may learn what the pump gave through an
optional ``given_bolus(t_s, input, amount)``.
It does not own the clock (time is an argument) and knows nothing of pumps, messages or
simpy. It runs behind the safety supervisor (:class:`~mpc_dose.control.supervisor.
SupervisedController`), which gates its readings and limits its rates; it may learn what
was applied through an optional ``applied(t_s, rates)``. A controller that plans over a
horizon may say what it plans and predicts through an optional ``forecast(t_s)`` returning
a :class:`Forecast` (shown live by ``mpc-dose monitor --web``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..errors import ConfigError

__all__ = ["Reading", "Decision", "Forecast", "Controller", "check_rates", "check_boluses"]


@dataclass(frozen=True)
class Reading:
    """The latest reading of one measured variable: value in *unit*, taken at *t_meas_s*."""

    var: str
    value: float
    unit: str
    t_meas_s: float
    quality: str = "valid"


@dataclass(frozen=True)
class Decision:
    """Rates to apply from *t_s*, per model input [amount/s], and why.

    *status* is ``"ok"`` or a failure kind the supervisor acts on (``"solver_failed"``,
    ``"no_measurement"``, ...): only an ``"ok"`` decision's rates are applied as they are.
    *details* carries controller-specific figures (e.g. PID terms, solver statistics) for the
    record. *backup* are the rates the controller would fall back to for now when its
    decision failed (e.g. the NMPC's shifted previous plan); None when it has none. *alarm* is
    the code of an alarm raised with this decision (set by the supervisor). *boluses* are
    amounts to give once, now, per model input [input amount unit] (empty: none), on top of
    the rates; only pumps that take bolus commands give them.
    """

    t_s: float
    rates: dict[str, float]
    reason: str
    status: str = "ok"
    details: dict[str, float | str] = field(default_factory=dict)
    backup: dict[str, float] | None = None
    alarm: str | None = None
    boluses: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Forecast:
    """What a controller plans from *t_s* on: stage k runs from ``t_s + k * period_s`` for
    one period, with ``rates[input][k]`` [amount/s] over it and ``predicted[k]`` (output
    *output*, in *unit*) at its end. Plain numbers: a monitor draws it, and a host keeps a
    controller's last plan in another process for its shifted backup (:meth:`shifted`)."""

    t_s: float
    period_s: float
    rates: dict[str, list[float]]
    output: str
    unit: str
    predicted: list[float]

    def shifted(self, t_s: float) -> dict[str, float] | None:
        """The plan shifted to *t_s*: its rates for the period that starts there, which
        is what a failed (or abandoned) decision at *t_s* falls back on; None at the plan's
        own time (the decision that replaces it failed) and once the plan no longer covers
        *t_s*."""
        k = int(round((t_s - self.t_s) / self.period_s))
        return {name: float(r[k]) for name, r in self.rates.items()} \
            if 0 < k < self.stages else None

    @property
    def stages(self) -> int:
        return min((len(r) for r in self.rates.values()), default=0)

    def since(self, t_s: float) -> Forecast | None:
        """The plan from *t_s* on (its stages before dropped); None when it does not cover
        *t_s*."""
        k = int(round((t_s - self.t_s) / self.period_s))
        if not 0 <= k < self.stages:
            return None
        predicted = list(self.predicted[k:]) if len(self.predicted) == self.stages else []
        return Forecast(self.t_s + k * self.period_s, self.period_s,
                        {name: list(r[k:]) for name, r in self.rates.items()}, self.output,
                        self.unit, predicted)


@runtime_checkable
class Controller(Protocol):
    """What the controller node needs of a controller."""

    #: a short name for records
    name: str
    #: time between two decisions [s]
    period_s: float
    #: the model inputs it sets
    inputs: tuple[str, ...]

    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        """Rates from *t_s* on, given the latest reading of each variable."""
        ...

    # Optional (not part of the runtime check; a controller may define either):
    #
    # def observe(self, reading: Reading) -> None:
    #     """Every reading as it arrives (estimators use every sample, not only the latest)."""
    #
    # def applied(self, t_s: float, rates: Mapping[str, float]) -> None:
    #     """The rates actually applied from *t_s* on (after the supervisor's limits and
    #     fallbacks); a controller that propagates its own state uses these, not its own
    #     decision."""
    #
    # def forecast(self, t_s: float) -> Forecast | None:
    #     """Its plan from *t_s* on (the latest one shifted to *t_s*), None when it has none
    #     for that time. Called only by a node that publishes it: it may cost a model
    #     evaluation."""


def check_rates(rates: Mapping[str, float], inputs: tuple[str, ...], who: str
                ) -> dict[str, float]:
    """Check a controller's rates: one finite, non-negative rate per input it declares.

    Raises
    ------
    ConfigError
        Naming the controller, the input and the value.
    """
    out = {}
    for name in inputs:
        if name not in rates:
            raise ConfigError(f"controller {who!r} returned no rate for input {name!r}")
        value = rates[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
                not math.isfinite(value) or value < 0:
            raise ConfigError(f"controller {who!r}: rate of {name!r} = {value!r}; expected a "
                              f"finite number >= 0 (amount per second)")
        out[name] = float(value)
    extra = set(rates) - set(inputs)
    if extra:
        raise ConfigError(f"controller {who!r} returned rates for undeclared inputs "
                          f"{sorted(extra)}")
    return out


def check_boluses(boluses: Mapping[str, float], inputs: tuple[str, ...], who: str
                  ) -> dict[str, float]:
    """Check a controller's boluses: finite amounts >= 0 of inputs it declares (zeros are
    left out).

    Raises
    ------
    ConfigError
        Naming the controller, the input and the value.
    """
    out = {}
    for name, value in boluses.items():
        if name not in inputs:
            raise ConfigError(f"controller {who!r} gave a bolus of undeclared input {name!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
                not math.isfinite(value) or value < 0:
            raise ConfigError(f"controller {who!r}: bolus of {name!r} = {value!r}; expected a "
                              f"finite number >= 0 (amount)")
        if value > 0:
            out[name] = float(value)
    return out
