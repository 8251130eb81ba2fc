"""Open-loop basal-bolus insulin therapy, as a pump wearer doses (issue 18's baseline): a
basal rate that follows a daily profile, and at each announced meal the bolus calculator's
bolus from the carbohydrate entered, the latest glucose reading and the insulin on board.

A :class:`~mpc_dose.control.base.Controller`. Announcements arrive as readings of the
announcement variable (``<carbohydrate input>_announced``, in g, sent by the plant when the
patient eats); glucose readings of *glucose_var* only serve the correction. With *bolus_commands* (a pump
that takes ``bolus`` commands, protocol 1.1) the bolus leaves as a bolus in the decision's
``boluses`` and the pump gives it at its bolus speed, after rounding it down to its
increment; insulin on board then counts what the pump says it gave (``given_bolus``).
Without, the bolus is given as a rate over the next control period (a period of 5 min
spreads it over 5). Rates in the insulin input's amount unit per second.

This module knows model/ (nothing of plant/ nor transports).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..errors import ConfigError
from .base import Decision, Reading
from .insulin import BolusCalculator, InsulinCurve

__all__ = ["BasalBolusController"]


class BasalBolusController:
    """Basal by *basal_profile* ``(clock hour, rate [amount/s])`` rows (each from its hour
    until the next; the first row's hour must be 0), boluses by *calculator*.

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
        self.bolus_commands = bool(bolus_commands)
        self._glucose: Reading | None = None
        self._meals: list[Reading] = []          # announced, not yet dosed
        #: (time [s], amount) of every bolus given (insulin on board counts them)
        self.boluses: list[tuple[float, float]] = []
        self._bolus_end_s = -math.inf
        self._bolus_rate = 0.0

    def observe(self, reading: Reading) -> None:
        if reading.var == self.announcement_var and reading.quality == "valid" and \
                math.isfinite(reading.value):
            self._meals.append(reading)
        elif reading.var == self.glucose_var and reading.quality == "valid" and \
                math.isfinite(reading.value):
            if self._glucose is None or reading.t_meas_s >= self._glucose.t_meas_s:
                self._glucose = reading

    def basal_at(self, t_s: float) -> float:
        """The profile's basal rate at model time *t_s* [amount/s]."""
        clock = (self.clock_at_t0_h + t_s / 3600.0) % 24.0
        rate = self.basal_profile[0][1]
        for hour, value in self.basal_profile:
            if clock + 1e-9 >= hour:
                rate = value
        return rate

    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        reason = "basal"
        if self._meals:
            carbs = sum(m.value for m in self._meals)
            self._meals.clear()
            on_board = self.curve.on_board(self.boluses, t_s)
            glucose = self._glucose.value if self._glucose is not None else None
            amount = self.calculator.bolus(carbs, glucose, on_board)
            reason = (f"bolus {amount:.3g} for {carbs:.3g} g at glucose "
                      f"{'unknown' if glucose is None else f'{glucose:.4g}'} "
                      f"({on_board:.3g} on board)")
            if self.bolus_commands:  # the pump gives it; given_bolus says what it gave
                return Decision(t_s, {self.input: self.basal_at(t_s)}, reason,
                                boluses={self.input: amount})
            self.boluses.append((t_s, amount))
            self._bolus_end_s, self._bolus_rate = t_s + self.period_s, amount / self.period_s
        bolus = self._bolus_rate if t_s < self._bolus_end_s - 1e-9 else 0.0
        return Decision(t_s, {self.input: self.basal_at(t_s) + bolus}, reason)

    def given_bolus(self, t_s: float, name: str, amount: float) -> None:
        """A pump gave a bolus of *amount* from *t_s* (counted in insulin on board)."""
        if name == self.input:
            self.boluses.append((t_s, amount))
