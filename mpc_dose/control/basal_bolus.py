"""Open-loop basal-bolus insulin therapy, as a pump wearer doses (issue 18's baseline): a
basal rate that follows a daily profile, and at each announced meal the bolus calculator's
bolus from the carbohydrate entered, the latest glucose reading and the insulin on board.

A :class:`~mpc_dose.control.base.Controller`. Announcements arrive as readings of the
announcement variable (``<carbohydrate input>_announced``, in g, sent by the plant when the
patient eats); glucose readings of *glucose_var* only serve the correction. With
*bolus_commands* (a pump that takes ``bolus`` commands, protocol 1.1) the bolus leaves as a
bolus in the decision's ``boluses`` and the pump gives it at its bolus speed, after rounding
it down to its increment; insulin on board then counts what the pump says it gave
(``given_bolus``). Without, the bolus is given as a rate over the next control period (a
period of 5 min spreads it over 5). Rates in the insulin input's amount unit per second.

This module knows model/ (nothing of plant/ nor transports).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..errors import ConfigError
from .base import Decision, Reading
from .insulin import BolusCalculator, InsulinCurve, MealBoluses, latest_valid, profile_rate

__all__ = ["BasalBolusController"]


class BasalBolusController:
    """Basal by *basal_profile* ``(clock hour, rate [amount/s])`` rows (each from its hour
    until the next; the first row's hour must be 0), boluses by *calculator* (through
    :class:`~mpc_dose.control.insulin.MealBoluses`, as the hybrid closed loops dose meals).

    *clock_at_t0_h* is the clock time at t = 0. Amounts (bolus, insulin on board) in the
    insulin input's amount unit, which must be the calculator's units. *bolus_commands*: the
    pump takes bolus commands (else a bolus is a rate over one period).
    """

    def __init__(self, *, input: str, basal_profile: Sequence[tuple[float, float]],
                 calculator: BolusCalculator, glucose_var: str, announcement_var: str,
                 period_s: float, clock_at_t0_h: float = 0.0,
                 curve: InsulinCurve = InsulinCurve(), name: str = "basal-bolus",
                 bolus_commands: bool = False) -> None:
        rows = sorted((float(h), float(r)) for h, r in basal_profile)
        if not rows or rows[0][0] != 0.0 or any(not 0 <= h < 24 for h, _ in rows) or \
                any(not (math.isfinite(r) and r >= 0) for _, r in rows):
            raise ConfigError(f"{name}: basal_profile must start at 0 h, with clock hours in "
                              f"[0, 24) and rates >= 0, got {basal_profile!r}")
        if not period_s > 0:
            raise ConfigError(f"{name}: period_s must be > 0, got {period_s!r}")
        self.name, self.period_s, self.inputs = name, float(period_s), (input,)
        self.input, self.basal_profile = input, tuple(rows)
        self.calculator, self.curve = calculator, curve
        self.glucose_var, self.announcement_var = glucose_var, announcement_var
        self.clock_at_t0_h = float(clock_at_t0_h)
        self._glucose: Reading | None = None
        self.meals = MealBoluses(calculator, announcement_var, period_s, curve,
                                 bolus_commands=bolus_commands)

    @property
    def boluses(self) -> list[tuple[float, float]]:
        """(time [s], amount) of every bolus given."""
        return self.meals.boluses

    def observe(self, reading: Reading) -> None:
        if not self.meals.observe(reading) and reading.var == self.glucose_var:
            self._glucose = latest_valid(self._glucose, reading)

    def basal_at(self, t_s: float) -> float:
        """The profile's basal rate at model time *t_s* [amount/s]."""
        return profile_rate(self.basal_profile, self.clock_at_t0_h + t_s / 3600.0)

    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        glucose = self._glucose.value if self._glucose is not None else None
        reason = self.meals.give_due(t_s, glucose) or "basal"
        boluses = self.meals.take_command()
        return Decision(t_s, {self.input: self.basal_at(t_s) + self.meals.rate_at(t_s)},
                        reason, boluses={self.input: boluses} if boluses else {})

    def given_bolus(self, t_s: float, name: str, amount: float) -> None:
        """A pump gave a bolus of *amount* from *t_s* (counted in insulin on board)."""
        if name == self.input:
            self.meals.given(t_s, amount)
