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
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import ConfigError
from ..model.therapy import profile_rate
from ..units import GLUCOSE, convert_substance
from .base import Reading

__all__ = ["InsulinCurve", "BolusCalculator", "MealBoluses", "DeliveryHistory",
           "latest_valid", "profile_rate", "GlucoseHistory"]


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

    def activity_array(self, age_s):
        """:meth:`activity` of every age in the array *age_s* [1/s] (numpy)."""
        import numpy as np

        age = np.asarray(age_s, dtype=float)
        tau, _, s = self._shape
        inside = (age > 0) & (age < self.duration_s)
        safe = np.where(inside, age, 0.0)
        return np.where(inside, s / tau ** 2 * safe * (1 - safe / self.duration_s)
                        * np.exp(-safe / tau), 0.0)

    def on_board(self, doses: Iterable[tuple[float, float]], t_s: float) -> float:
        """Insulin on board at *t_s* [s] from *doses* ``(time [s], amount)`` given before it
        (same unit as the amounts)."""
        return sum(amount * self.remaining(t_s - t) for t, amount in doses if t <= t_s)

    def on_board_above(self, rates: Iterable[tuple[float, float]], basal: float,
                       t_s: float, step_s: float = 300.0) -> float:
        """Insulin on board at *t_s* from what ran above *basal* [amount/s]: *rates* are
        ``(time [s], rate [amount/s])`` changes in time order, each in force until the next
        (the last until *t_s*); the part above the basal, taken in steps of at most
        *step_s*, each counted from its end (at least the exact figure, by at most *step_s*
        of decay: a limit errs on the safe side). Rates older than the duration of action
        no longer count."""
        changes = list(rates)
        horizon = t_s - self.duration_s
        total = 0.0
        for (t, rate), t_next in zip(changes, [t for t, _ in changes[1:]] + [t_s]):
            t = max(t, horizon)
            above = max(0.0, rate - basal)
            while above > 0 and t < t_next:
                end = min(t + step_s, t_next)
                total += above * (end - t) * self.remaining(t_s - end)
                t = end
        return total

    def acting(self, doses: Iterable[tuple[float, float]], t_s: float) -> float:
        """Insulin acting at *t_s* [amount/s]: the doses' activity summed."""
        return sum(amount * self.activity(t_s - t) for t, amount in doses if t <= t_s)


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


class GlucoseHistory(deque):
    """The valid glucose readings of one variable over the last *span_s*, in mg/dL (the
    glucose controllers' own unit; each reading's unit converted once per unit), in time
    order: ``(t_meas [s], mg/dL)``. Readings older than the newest are left out."""

    def __init__(self, var: str, span_s: float, owner: str) -> None:
        super().__init__()
        self.var, self.span_s, self.owner = var, float(span_s), owner
        self._to_mg_dl: dict[str, float] = {}

    def add(self, reading: Reading) -> None:
        if reading.var != self.var or reading.quality != "valid" or \
                not math.isfinite(reading.value):
            return
        if self and reading.t_meas_s <= self[-1][0]:
            return
        factor = self._to_mg_dl.get(reading.unit)
        if factor is None:
            factor = convert_substance(1.0, reading.unit, "mg/dL", GLUCOSE,
                                       what=f"{self.owner}: reading of {reading.var!r}")
            self._to_mg_dl[reading.unit] = factor
        self.append((reading.t_meas_s, reading.value * factor))
        while self[0][0] < reading.t_meas_s - self.span_s:
            self.popleft()


def latest_valid(kept: Reading | None, reading: Reading) -> Reading | None:
    """*reading* when it is valid, finite and not older than *kept*, else *kept*."""
    if reading.quality != "valid" or not math.isfinite(reading.value):
        return kept
    if kept is None or reading.t_meas_s >= kept.t_meas_s:
        return reading
    return kept


class MealBoluses:
    """Announced meals to boluses, as a pump wearer doses them: each announcement (a valid
    reading of *announcement_var*, g) waits for the next decision, which gives the
    *calculator*'s bolus for all the carbohydrate announced since, at the latest glucose and
    with the insulin on board of the boluses given (plus *extra_on_board* a closed loop
    adds), spread over one control period *period_s* (a pump's bolus takes about a minute;
    a period of 5 min spreads it over 5). Amounts in the calculator's units.

    With *bolus_commands* the pump takes bolus commands: the bolus is not a rate but a
    command (:meth:`take_command`), counted once the pump says it gave it (:meth:`given`).
    A bolus above *max_bolus* (the pump's, which would refuse it whole) is cut to it, as a
    pump's own calculator does, and the reason says so.
    """

    def __init__(self, calculator: BolusCalculator, announcement_var: str, period_s: float,
                 curve: InsulinCurve = InsulinCurve(), *, bolus_commands: bool = False,
                 max_bolus: float = math.inf) -> None:
        if not max_bolus > 0:
            raise ConfigError(f"meal boluses: max_bolus = {max_bolus!r}; expected > 0")
        self.calculator, self.curve = calculator, curve
        self.announcement_var, self.period_s = announcement_var, float(period_s)
        self.bolus_commands = bool(bolus_commands)
        self.max_bolus = float(max_bolus)
        self._command: float | None = None
        self._waiting: list[Reading] = []
        #: (time [s], amount) of every bolus given
        self.boluses: list[tuple[float, float]] = []
        self._end_s, self._rate = -math.inf, 0.0

    def observe(self, reading: Reading) -> bool:
        """Keep *reading* if it announces a meal; whether it was an announcement."""
        if reading.var != self.announcement_var:
            return False
        if reading.quality == "valid" and math.isfinite(reading.value):
            self._waiting.append(reading)
        return True

    def on_board(self, t_s: float) -> float:
        """The boluses' insulin still to act at *t_s*."""
        return self.curve.on_board(self.boluses, t_s)

    def give_due(self, t_s: float, glucose: float | None, extra_on_board: float = 0.0
                 ) -> str | None:
        """At a decision: the bolus for the meals announced since the last one, if any
        (its reason), else None. *glucose* in the calculator's unit (None: meal part
        only)."""
        if not self._waiting:
            return None
        carbs = sum(m.value for m in self._waiting)
        self._waiting.clear()
        on_board = self.on_board(t_s) + max(extra_on_board, 0.0)
        asked = self.calculator.bolus(carbs, glucose, on_board)
        amount = min(asked, self.max_bolus)
        capped = f", cut from {asked:.3g} to the pump's max bolus" if amount < asked else ""
        if self.bolus_commands:  # the pump gives it; given() says what it gave
            self._command = amount
        else:
            self.boluses.append((t_s, amount))
            self._end_s, self._rate = t_s + self.period_s, amount / self.period_s
        return (f"bolus {amount:.3g} for {carbs:.3g} g at glucose "
                f"{'unknown' if glucose is None else f'{glucose:.4g}'} "
                f"({on_board:.3g} on board{capped})")

    def take_command(self) -> float | None:
        """The bolus to command now (with bolus commands), once; None when there is none."""
        amount, self._command = self._command, None
        return amount

    def given(self, t_s: float, amount: float) -> None:
        """A pump gave a bolus of *amount* from *t_s*."""
        self.boluses.append((float(t_s), float(amount)))

    def rate_at(self, t_s: float) -> float:
        """The bolus being given at *t_s* [amount/s] (0 outside a bolus)."""
        return self._rate if t_s < self._end_s - 1e-9 else 0.0


class DeliveryHistory:
    """The rates a pump delivered, ``record(t_s, rate)`` each from its time until the next
    [amount/s], kept for *curve*'s duration of action; :meth:`doses` cuts them into
    pseudo-boluses of at most *step_s* at each piece's midpoint (the OpenAPS documentation
    counts basal and temporary basal insulin so, as a series of small boluses), net of a
    *scheduled* rate when one is given (``scheduled(t_s)`` [amount/s]): net insulin on
    board is negative while less than the schedule was given."""

    def __init__(self, curve: InsulinCurve = InsulinCurve(), step_s: float = 300.0,
                 start_s: float = 0.0) -> None:
        if not step_s > 0:
            raise ConfigError(f"delivery history: step_s = {step_s!r}; expected > 0")
        self.curve, self.step_s = curve, float(step_s)
        self._changes: list[tuple[float, float]] = []
        self.start_s = float(start_s)

    def record(self, t_s: float, rate: float) -> None:
        """*rate* [amount/s] delivered from *t_s* on (a later record ends it)."""
        while self._changes and self._changes[-1][0] >= t_s:
            self._changes.pop()           # replaced from t_s on
        self._changes.append((float(t_s), float(rate)))
        horizon = t_s - self.curve.duration_s - self.step_s
        while len(self._changes) > 1 and self._changes[1][0] <= horizon:
            self._changes.pop(0)

    def doses(self, t_s: float, scheduled: Callable[[float], float] | None = None
              ) -> list[tuple[float, float]]:
        """``(time [s], amount)`` pseudo-boluses delivered before *t_s* (net of
        *scheduled*), within the duration of action."""
        out = []
        since = t_s - self.curve.duration_s
        for k, (start, rate) in enumerate(self._changes):
            end = self._changes[k + 1][0] if k + 1 < len(self._changes) else t_s
            a, b = max(start, since), min(end, t_s)
            while a < b - 1e-9:
                piece_end = min(a + self.step_s, b)
                mid = 0.5 * (a + piece_end)
                net = rate - (scheduled(mid) if scheduled is not None else 0.0)
                out.append((mid, net * (piece_end - a)))
                a = piece_end
        return out

    def on_board(self, t_s: float, scheduled: Callable[[float], float] | None = None
                 ) -> float:
        """Insulin on board at *t_s* (net of *scheduled* when given)."""
        return self.curve.on_board(self.doses(t_s, scheduled), t_s)
