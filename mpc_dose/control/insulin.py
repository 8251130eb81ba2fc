"""What a patient's pump software computes about insulin: insulin on board from the doses
given, and the meal and correction bolus of a bolus calculator (issue 18).

Insulin on board follows the exponential insulin-activity curve documented by the OpenAPS
project ("Understanding insulin on board calculations", oref0 documentation; the curve of
D. Maksimovic, 2017): with peak time ``tp`` and duration of insulin action ``td``,

    tau = tp (1 - tp/td) / (1 - 2 tp/td),   a = 2 tau / td,
    S = 1 / (1 - a + (1 + a) exp(-td/tau)),
    activity(t) = S / tau^2 * t (1 - t/td) exp(-t/tau),
    IOB(t) = 1 - S (1 - a) ((t^2 / (tau td (1 - a)) - t/tau - 1) exp(-t/tau) + 1),

for 0 <= t <= td (the fraction of a unit dose still to act; 1 at 0, 0 at td). Written from
the formula, not from any code. Defaults: peak 75 min and 5 h of action, the documented
curve for rapid-acting analogues ("rapid-acting" preset: peak 75 min; the docs recommend an
action time of at least 5 h).

The bolus calculator is the one patients use (e.g. Walsh & Roberts, "Pumping Insulin"):
``bolus = carbohydrate / carb_ratio + max((glucose - target) / correction_factor - IOB, 0)``:
insulin on board offsets the correction only, never the meal part, and below target no
negative correction is taken off the meal bolus (the setting most pump calculators ship
with).

This module knows nothing of simpy, sockets or files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["InsulinCurve", "BolusCalculator"]


@dataclass(frozen=True)
class InsulinCurve:
    """The exponential insulin-activity curve: *peak_s* and *duration_s* [s]."""

    peak_s: float = 75 * 60.0
    duration_s: float = 5 * 3600.0

    def __post_init__(self) -> None:
        if not (0 < self.peak_s < self.duration_s / 2):
            raise ConfigError(f"insulin curve: need 0 < peak ({self.peak_s} s) < half the "
                              f"duration of action ({self.duration_s} s)")

    @property
    def _shape(self) -> tuple[float, float, float]:
        tp, td = self.peak_s, self.duration_s
        tau = tp * (1 - tp / td) / (1 - 2 * tp / td)
        a = 2 * tau / td
        s = 1 / (1 - a + (1 + a) * math.exp(-td / tau))
        return tau, a, s

    def remaining(self, age_s: float) -> float:
        """Fraction of a dose given *age_s* ago still to act (1 at 0, 0 from the end)."""
        if age_s <= 0:
            return 1.0
        if age_s >= self.duration_s:
            return 0.0
        tau, a, s = self._shape
        t, td = age_s, self.duration_s
        return 1 - s * (1 - a) * ((t * t / (tau * td * (1 - a)) - t / tau - 1)
                                  * math.exp(-t / tau) + 1)

    def activity(self, age_s: float) -> float:
        """Fraction of a dose acting per second *age_s* after it was given [1/s]."""
        if not 0 < age_s < self.duration_s:
            return 0.0
        tau, _, s = self._shape
        return s / tau ** 2 * age_s * (1 - age_s / self.duration_s) * math.exp(-age_s / tau)

    def on_board(self, doses: Iterable[tuple[float, float]], t_s: float) -> float:
        """Insulin on board at *t_s* [s] from *doses* ``(time [s], amount)`` given before it
        (same unit as the amounts)."""
        return sum(amount * self.remaining(t_s - t) for t, amount in doses if t <= t_s)


@dataclass(frozen=True)
class BolusCalculator:
    """A pump's bolus calculator: *carb_ratio* [g per unit], *correction_factor* [glucose
    unit per unit], *target* [glucose unit]; amounts in units of insulin."""

    carb_ratio: float
    correction_factor: float
    target: float

    def __post_init__(self) -> None:
        for name in ("carb_ratio", "correction_factor", "target"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"bolus calculator: {name} = {value!r}; expected > 0")

    def bolus(self, carbohydrate_g: float, glucose: float | None,
              insulin_on_board: float = 0.0) -> float:
        """The bolus for a meal of *carbohydrate_g* at *glucose* (None: no reading, meal
        part only) with *insulin_on_board* units still acting; never negative."""
        meal = max(carbohydrate_g, 0.0) / self.carb_ratio
        correction = 0.0
        if glucose is not None and math.isfinite(glucose) and glucose > self.target:
            # insulin on board first covers the correction it was given for
            correction = max((glucose - self.target) / self.correction_factor
                             - insulin_on_board, 0.0)
        return meal + correction
