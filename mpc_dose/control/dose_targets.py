"""The dose that meets an exposure target: AUC24, trough, concentration at a time after the
dose, or the fraction of the dosing interval above a threshold, for a regimen of one input
(a dose every *interval*, each given over *infusion*), found by a bracketing root search on
the simulated output, so that it holds for any model, linear or not.

Every target is judged on one **evaluated interval** ``[t_a, t_a + tau]`` that starts with a
dose of the regimen; the state at ``t_a`` depends on the basis:

``steady-state``
    the regimen given until the state at each dose repeats (the periodic steady state:
    solved exactly for models with affine, time-invariant dynamics, by iteration otherwise);
``next``
    the state a patient's history leaves at the regimen's start (given by the caller);
``first-dose``
    a drug-naive patient (the model's initial state): a loading dose.

Target kinds (values in the output's unit ``C``):

==============  ============================================================================
``auc24``       ``24 h / tau`` times the AUC over the evaluated interval [C x h]: the AUC over
                24 h at steady state, the AUC(0-24 h) of a first dose given every 24 h
``trough``      the level at the end of the evaluated interval, just before the next dose
``conc``        the level a given time after the start of the evaluated interval's dose
``time_above``  the fraction of the evaluated interval with the level above a threshold
==============  ============================================================================

Every kind grows with the dose for the models of this library (more drug, higher levels); the
search brackets the target between 0 and a dose that reaches it and refines it by Brent's
method, so a model where that fails gets a result that says so, never a silent value.

This module knows model/; it reads no files and does not print.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..model.dosing import Dose, schedule
from ..model.propagate import shared_propagator
from ..model.simulation import simulate
from ..model.spec import Model
from ..units import UnitError, parse_quantity

__all__ = ["ExposureTarget", "Regimen", "DoseForTarget", "TARGET_KINDS", "BASES",
           "exposure", "dose_for_target", "interval_start_state", "round_dose"]

TARGET_KINDS = ("auc24", "trough", "conc", "time_above")
BASES = ("steady-state", "next", "first-dose")
#: Grid steps per piece of the evaluated interval (pieces end at the infusion's end and at a
#: conc target's time): Simpson's rule on them is exact to ~1e-9 for a smooth level.
_STEPS_PER_PIECE = 400
#: The search stops when the dose is known to this relative width.
_DOSE_RTOL = 1e-10
#: Doublings of the upper bracket before the target is declared out of reach (2^80 x the
#: first guess: any dose a ward could give).
_MAX_DOUBLINGS = 80
#: Periodic steady state by iteration (models that are not affine and time-invariant): stop
#: when the estimated distance to the fixed point (Aitken) is below this relative size.
_STEADY_RTOL = 1e-10
_STEADY_MAX_INTERVALS = 5000


# ---------------------------------------------------------------------------- the target
@dataclass(frozen=True)
class ExposureTarget:
    """What the dose must achieve on the evaluated interval.

    Attributes
    ----------
    kind : str
        One of :data:`TARGET_KINDS`.
    value : float
        ``auc24``: AUC over 24 h [output unit x h]; ``trough``, ``conc``: a level [output
        unit]; ``time_above``: a fraction of the interval in (0, 1).
    unit : str
        The unit of *value* (``"1"`` for a fraction).
    at_s : float, optional
        ``conc``: the time [s] after the start of the dose.
    threshold : float, optional
        ``time_above``: the level [output unit].
    """

    kind: str
    value: float
    unit: str
    at_s: float | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ConfigError(f"target: unknown kind {self.kind!r}; expected one of "
                              f"{', '.join(TARGET_KINDS)}")
        if not (math.isfinite(self.value) and self.value > 0):
            raise ConfigError(f"target {self.kind}: expected a value > 0, got {self.value!r}")
        if self.kind == "time_above" and not self.value < 1:
            raise ConfigError(f"target time_above: the fraction of the interval must be in "
                              f"(0, 1), got {self.value!r}")
        if self.kind == "conc" and not (self.at_s is not None and self.at_s > 0):
            raise ConfigError(f"target conc: expected a time > 0 after the dose, got "
                              f"{self.at_s!r}")
        if self.kind == "time_above" and not (self.threshold is not None
                                              and self.threshold > 0):
            raise ConfigError(f"target time_above: expected a threshold > 0, got "
                              f"{self.threshold!r}")

    @classmethod
    def parse(cls, text: str, output_unit: str) -> ExposureTarget:
        """Read ``auc24=400``, ``trough=15``, ``conc=20@6h``, ``time_above=10:0.6``.

        Levels may carry a unit (``trough=15mg/L``, ``auc24=400mg*h/L``,
        ``time_above=10mg/L:60%``); a bare number is in *output_unit* (x h for an AUC). The
        time of ``conc`` needs its unit (``6h``, ``90min``).

        Raises
        ------
        ConfigError
            Naming the text and the expected syntax.
        """
        syntax = ("expected auc24=VALUE, trough=VALUE, conc=VALUE@TIME or "
                  "time_above=THRESHOLD:FRACTION (e.g. auc24=400, trough=15mg/L, conc=20@6h, "
                  "time_above=10:0.6)")
        kind, sep, rest = str(text).partition("=")
        kind, rest = kind.strip().lower(), rest.strip()
        if not sep or not rest or kind not in TARGET_KINDS:
            raise ConfigError(f"--target {text!r}: {syntax}")
        level_unit, auc_unit = output_unit, f"{output_unit}*h"
        try:
            if kind == "auc24":
                return cls(kind, parse_quantity(rest, auc_unit, what=f"--target {text}"),
                           auc_unit)
            if kind == "trough":
                return cls(kind, parse_quantity(rest, level_unit, what=f"--target {text}"),
                           level_unit)
            if kind == "conc":
                level, at_sep, at = rest.partition("@")
                if not at_sep or not level.strip() or not at.strip():
                    raise ConfigError(f"--target {text!r}: conc needs a time after the dose, "
                                      f"e.g. conc=20@6h")
                if re.fullmatch(r"\s*[-+]?[\d.]+(e[-+]?\d+)?\s*", at):
                    raise ConfigError(f"--target {text!r}: give the time's unit, e.g. "
                                      f"conc={level.strip()}@{at.strip()}h")
                return cls(kind, parse_quantity(level, level_unit, what=f"--target {text}"),
                           level_unit, at_s=parse_quantity(at, "s", what=f"--target {text}"))
            threshold, colon, fraction = rest.partition(":")
            if not colon or not threshold.strip() or not fraction.strip():
                raise ConfigError(f"--target {text!r}: time_above needs a threshold and a "
                                  f"fraction of the interval, e.g. time_above=10:0.6")
            return cls(kind, parse_quantity(fraction, "1", what=f"--target {text}"), "1",
                       threshold=parse_quantity(threshold, level_unit,
                                                what=f"--target {text}"))
        except UnitError as err:
            raise ConfigError(f"{err}; {syntax}") from None

    def describe(self) -> str:
        """The target in words, with its unit."""
        if self.kind == "auc24":
            return f"AUC over 24 h = {self.value:g} {self.unit}"
        if self.kind == "trough":
            return f"trough (end of the interval) = {self.value:g} {self.unit}"
        if self.kind == "conc":
            return f"level {self.at_s / 3600:g} h after the dose starts = {self.value:g} " \
                   f"{self.unit}"
        return f"{self.value:.0%} of the interval above {self.threshold:g} " \
               f"(level unit of the output)"


@dataclass(frozen=True)
class Regimen:
    """A dose of *input* every *interval_s*, each given over *infusion_s* (0: a bolus),
    the first at *start_s* [s], judged on the interval of the given *basis*."""

    input: str
    interval_s: float
    infusion_s: float
    basis: str = "steady-state"
    start_s: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise ConfigError(f"regimen: interval must be > 0 s, got {self.interval_s!r}")
        if not (math.isfinite(self.infusion_s) and 0 <= self.infusion_s <= self.interval_s):
            raise ConfigError(f"regimen: infusion time must be in [0, interval = "
                              f"{self.interval_s / 3600:g} h], got {self.infusion_s / 3600:g} h")
        if self.basis not in BASES:
            raise ConfigError(f"regimen: unknown basis {self.basis!r}; expected one of "
                              f"{', '.join(BASES)}")

    def dose(self, amount: float, time_s: float = 0.0) -> Dose:
        return Dose.from_record(time_s, self.input, amount=amount,
                                duration_s=self.infusion_s or None)


@dataclass(frozen=True)
class DoseForTarget:
    """The result of a dose search. Failure is a result: *success* False, *status* and
    *message* say why (the target is out of reach, met without a dose, ...).

    Attributes
    ----------
    dose, dose_exact : float
        The dose rounded to *round_step* (the exact one when no step) and the dose that
        meets the target exactly, in *dose_unit*.
    achieved, achieved_exact : float
        The target quantity (the target's unit) at the rounded and at the exact dose.
    evaluations : int
        Simulations of the evaluated interval the search took.
    """

    success: bool
    status: str
    message: str
    dose: float
    dose_exact: float
    dose_unit: str
    achieved: float
    achieved_exact: float
    round_step: float | None
    evaluations: int


# ---------------------------------------------------------------------------- evaluation
def _pieces(regimen: Regimen, target: ExposureTarget | None) -> list[float]:
    cuts = {0.0, regimen.interval_s}
    if 0 < regimen.infusion_s < regimen.interval_s:
        cuts.add(regimen.infusion_s)
    if target is not None and target.kind == "conc":
        if target.at_s > regimen.interval_s:
            raise ConfigError(f"target conc at {target.at_s / 3600:g} h after the dose is "
                              f"beyond the interval ({regimen.interval_s / 3600:g} h)")
        cuts.add(float(target.at_s))
    return sorted(cuts)


def interval_curve(model: Model, params: np.ndarray, regimen: Regimen, amount: float,
                   x_start: np.ndarray, output: str, target: ExposureTarget | None = None,
                   steps_per_piece: int = _STEPS_PER_PIECE) -> tuple[np.ndarray, np.ndarray]:
    """Times [s, from the dose] and levels over one interval starting with a dose of
    *amount* from state *x_start*; the grid has a point at every kink (end of infusion) and
    at a conc target's time, with an even number of steps between them (Simpson)."""
    cuts = _pieces(regimen, target)
    times = np.unique(np.concatenate([np.linspace(a, b, steps_per_piece + 1)
                                      for a, b in zip(cuts[:-1], cuts[1:])]))
    result = simulate(model, params, [regimen.dose(amount)], times, x0=x_start)
    return times, result.output(output)


def _simpson(times: np.ndarray, values: np.ndarray, cuts: list[float]) -> float:
    from scipy.integrate import simpson

    total = 0.0
    for a, b in zip(cuts[:-1], cuts[1:]):
        inside = (times >= a) & (times <= b)
        total += float(simpson(values[inside], x=times[inside]))
    return total


def _fraction_above(times: np.ndarray, values: np.ndarray, threshold: float) -> float:
    """Fraction of [times[0], times[-1]] with values above *threshold*, the level linear
    between grid points (crossings interpolated)."""
    a, b = values[:-1] - threshold, values[1:] - threshold
    dt = np.diff(times)
    above = np.where((a > 0) & (b > 0), dt, 0.0)
    crossing = (a > 0) != (b > 0)
    # on a crossing a and b differ in sign: the share of the step above is |a| / |a - b|
    # for a falling level (a > 0), |b| / |a - b| for a rising one
    share = np.where(a[crossing] > 0, a[crossing], b[crossing]) / \
        np.abs(a[crossing] - b[crossing])
    above[crossing] = share * dt[crossing]
    return float(above.sum() / (times[-1] - times[0]))


def exposure(model: Model, params: np.ndarray, regimen: Regimen, target: ExposureTarget,
             amount: float, x_start: np.ndarray, output: str) -> float:
    """The target quantity (the target's unit) of a dose *amount* given from *x_start*."""
    times, levels = interval_curve(model, params, regimen, amount, x_start, output, target)
    if target.kind == "auc24":
        auc_h = _simpson(times, levels, _pieces(regimen, target)) / 3600.0
        return auc_h * 86400.0 / regimen.interval_s
    if target.kind == "trough":
        return float(levels[-1])
    if target.kind == "conc":
        return float(levels[np.argmin(np.abs(times - target.at_s))])
    return _fraction_above(times, levels, target.threshold)


def interval_start_state(model: Model, params: np.ndarray, regimen: Regimen, amount: float,
                         x_history: np.ndarray | None = None) -> np.ndarray:
    """The state at the start of the evaluated interval (before its dose): the periodic
    steady state of the regimen, the state the history left (*x_history*, basis ``next``),
    or the drug-naive initial state (``first-dose``)."""
    if regimen.basis == "next":
        if x_history is None:
            raise ConfigError("regimen basis 'next' needs the state the history leaves at "
                              "the regimen's start")
        return np.asarray(x_history, dtype=float)
    x0 = model.initial_state(params)
    if regimen.basis == "first-dose":
        return x0
    return _steady_state(model, params, regimen, amount, x0)


def _steady_state(model: Model, params: np.ndarray, regimen: Regimen, amount: float,
                  x0: np.ndarray) -> np.ndarray:
    """The state before a dose once the regimen repeats: for affine, time-invariant
    dynamics the fixed point of the interval's affine map ``x -> Phi x + c`` (one linear
    solve); otherwise the map iterated until Aitken's estimate of the distance to the fixed
    point is negligible."""
    prop = shared_propagator(model, params)
    plan = schedule(model, params, [regimen.dose(amount)])
    tau = regimen.interval_s
    segments = []
    breaks = [b for b in plan.breaks if b < tau]
    for i, start in enumerate(breaks):
        end = breaks[i + 1] if i + 1 < len(breaks) else tau
        segments.append((start, end, plan.jumps[i], plan.rates[i]))

    def one_interval(x: np.ndarray) -> np.ndarray:
        for start, end, jump, rate in segments:
            x = prop.advance(x + jump, start, end, rate)
        return x

    if prop.is_exact:
        n = model.n_states
        phi, c = np.eye(n), np.zeros(n)
        for start, end, jump, rate in segments:
            step_phi, step_gamma = prop.transition(end - start, rate)
            phi, c = step_phi @ phi, step_phi @ (c + jump) + step_gamma
        return np.linalg.solve(np.eye(n) - phi, c)
    x, previous_step = np.asarray(x0, dtype=float), None
    for _ in range(_STEADY_MAX_INTERVALS):
        x_next = one_interval(x)
        step = float(np.max(np.abs(x_next - x)))
        scale = float(np.max(np.abs(x_next))) + 1e-300
        if previous_step is not None and previous_step > 0:
            ratio = step / previous_step
            if ratio < 1 and step * ratio / (1 - ratio) <= _STEADY_RTOL * scale:
                return x_next
        if step <= 1e-15 * scale:
            return x_next
        x, previous_step = x_next, step
    raise ConfigError(f"steady state: the regimen ({amount:g} every {tau / 3600:g} h) did not "
                      f"reach a periodic steady state in {_STEADY_MAX_INTERVALS} intervals")


def round_dose(dose: float, step: float | None) -> float:
    """*dose* to the nearest multiple of *step* (ties up); unchanged without a step."""
    if step is None:
        return dose
    return math.floor(dose / step + 0.5) * step


# ---------------------------------------------------------------------------- the search
def dose_for_target(model: Model, params: np.ndarray | Mapping[str, float], regimen: Regimen,
                    target: ExposureTarget, *, output: str, x_history: np.ndarray | None = None,
                    round_step: float | None = None, first_guess: float | None = None
                    ) -> DoseForTarget:
    """The dose of *regimen* whose exposure on the evaluated interval meets *target*, with
    parameter values *params* (declared units; the planning values of an estimate).

    Parameters
    ----------
    model : Model
    params : array or mapping
    regimen : Regimen
    target : ExposureTarget
    output : str
        The model output the target is about.
    x_history : array, optional
        Basis ``next``: the state (state units) at ``regimen.start_s`` the history leaves.
    round_step : float, optional
        Dose step (the input's amount unit): the recommended dose is the nearest multiple.
    first_guess : float, optional
        A dose (amount unit) to start the bracket from (the first upper bracket; 1 unit
        when not given).

    Returns
    -------
    DoseForTarget
    """
    p = np.asarray(params, dtype=float) if isinstance(params, np.ndarray) \
        else model.parameter_vector(params)
    if output not in model.output_names:
        raise ConfigError(f"dose for target: model {model.name!r} has no output {output!r}; "
                          f"outputs: {', '.join(model.output_names)}")
    if regimen.input not in model.input_names:
        raise ConfigError(f"dose for target: model {model.name!r} has no input "
                          f"{regimen.input!r}; inputs: {', '.join(model.input_names)}")
    if round_step is not None and not (math.isfinite(round_step) and round_step > 0):
        raise ConfigError(f"dose step must be > 0, got {round_step!r}")
    unit = model.inputs[model.input_index(regimen.input)].amount_unit
    count = 0

    def achieved(amount: float) -> float:
        nonlocal count
        count += 1
        x_a = interval_start_state(model, p, regimen, amount, x_history)
        return exposure(model, p, regimen, target, amount, x_a, output)

    def result(success, status, message, exact, value_exact):
        rounded = round_dose(exact, round_step)
        value = value_exact if rounded == exact else achieved(rounded)
        return DoseForTarget(success, status, message, rounded, exact, unit, value,
                             value_exact, round_step, count)

    at_zero = achieved(0.0)
    if at_zero >= target.value:
        return result(False, "met_without_dose",
                      f"without a dose the {target.kind} is already {at_zero:.4g} "
                      f"{target.unit} (target {target.value:g}): give no dose now", 0.0,
                      at_zero)
    lo = 0.0
    hi = float(first_guess) if first_guess and first_guess > 0 else 1.0
    f_hi = achieved(hi)
    doublings = 0
    while f_hi < target.value:
        if doublings >= _MAX_DOUBLINGS or not math.isfinite(f_hi):
            return result(False, "out_of_reach",
                          f"no dose up to {hi:.4g} {unit} reaches the target (reached "
                          f"{f_hi:.4g} {target.unit}, target {target.value:g})", hi, f_hi)
        lo = hi
        # the secant through (0, at_zero) and (hi, f_hi) points at the target (exactly, for
        # an exposure linear in the dose): go a little beyond it, at least double
        grow = 2.0
        if f_hi > at_zero:
            grow = min(max(1.05 * (target.value - at_zero) / (f_hi - at_zero), 2.0), 2.0**20)
        hi, doublings = grow * hi, doublings + 1
        f_hi = achieved(hi)
    from scipy.optimize import brentq

    if f_hi == target.value:
        exact = hi
    else:
        exact = float(brentq(lambda d: achieved(d) - target.value, lo, hi,
                             xtol=1e-12 * hi, rtol=_DOSE_RTOL, maxiter=200))
    return result(True, "ok", f"{target.describe()}: {exact:.6g} {unit} per dose", exact,
                  achieved(exact))
