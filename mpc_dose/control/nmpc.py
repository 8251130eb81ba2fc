"""Nonlinear model-predictive control built once from a CasADi model.

Condensed, linearised or multiple shooting over ``horizon`` control periods, decisions
blocked over ``move_block`` periods. The objective tracks a (possibly time-varying)
reference on one output and penalises input changes, drug use (economic) and violations of a
soft output window (exact-penalty slack, linear plus quadratic). Constraints: per-input rate
bounds, a hard limit on rate changes, cumulative dose over sliding windows, a hard output
window, optionally a fixed ratio between two inputs.

Exposure and dosing forms (issue 15):

* **Scheduled doses** (``dose_interval_s``): the decisions are the amounts of doses given
  at fixed clock times (solved for as each dose's infusion rate, the scale of continuous
  rates), each an infusion of ``infusion_s`` (any length up to the interval, not tied to
  the period; the sample grid splits periods where infusions end or peaks are read), with
  per-dose, loading-dose and per-day caps and amounts rounded to what can be given
  (``dose_step``: the relaxed problem is solved, then the first dose, the only one
  applied, is fixed to the step below and to the step above and the rest re-solved; the
  better objective wins). An infusion under way at t_s goes on at the rate in force to its
  end. Continuous infusion (no schedule) is the default.
* **AUC over windows** of the exposure output: a target and/or soft and hard windows, for
  the fixed windows ``[start + i W, start + (i + 1) W)`` of model time (daily AUC 0-24 h,
  24-48 h, ... as the trial metrics count them; the AUC already accrued in the current window
  is a per-call number). For linear time-invariant dynamics and an output affine in the state
  the integral over each period is exact (augmented matrix exponential); a nonlinear output
  uses the trapezoid over the stage (and sub-stage) outputs, a time-varying or nonlinear
  model RK4 quadrature along its integration steps.
* **Troughs and peaks**: the output just before each scheduled dose and at a fixed time
  after each dose's start (end of infusion by default), within soft and/or hard windows.
* **Time above a threshold** (fT>MIC) as an objective (soft lower limit) and/or a hard lower
  limit on the fraction of the horizon, with a logistic indicator integrated exactly over
  the output's linear interpolation between samples.

Clock: stage *k* of a plan made at ``t_s`` starts at model time ``t_s + k * period_s`` and the
model's circadian parameters read that time; scheduled doses use the same clock (the clock
time of day at t = 0 is the model's ``clock_time_at_t0`` parameter, or
``clock_time_at_t0_h`` for a model without one).

The problem is built once per model structure. Per cycle only numbers cross from Python:
the initial state, the previous rates, the reference, the model parameters (estimates), the
output disturbance, the clock time, the weights, and the limits (as bounds). So a sweep over
limits and weights never rebuilds it (:func:`problem_structure`, :meth:`NonlinearMPC.reset`).
Linear time-invariant dynamics are discretised exactly (zero-order hold) outside. Condensed,
the problem then keeps only the states its outputs read (e.g. the two effect sites of a
BIS model), as affine functions of the decisions whose coefficients (free response and
impulse response of the exact discretisation) are computed per patient outside; multiple
shooting keeps every state with the discretisation matrices as parameters. Other models use
RK4 with the model's circadian parameters evaluated at each stage's clock time: multiple
shooting (the states as decisions), or **linearised** (a real-time iteration, Diehl et al.
2005, J Process Control 15:703): each cycle the RK4 rollout and its Jacobian along the
previous plan shifted by one period give the watched states as affine functions of the
decisions, and the condensed problem is solved on them (``linearisation_passes`` times,
each pass along the plan just found; converged, it meets multiple shooting's first-order
conditions). On the Cambridge glucose model that is about a fifth of multiple shooting's
time for the same plans.

Default solver: ``sqpmethod`` with qpOASES (then ``qrqp``) and a Gauss-Newton Hessian (the
objective is a sum of squares plus linear terms); IPOPT is the fallback for cold or failed
steps. The dosing and exposure problems of a linear model are QPs, solved by full SQP
steps without a line search. Every call
returns a :class:`DosePlan` with success, status, iterations and solve time, and a plan that
leaves its bounds is marked failed: an unchecked plan never leaves the controller.

This module knows model/, not plant/ nor transports.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import casadi as ca
import numpy as np
from scipy.linalg import expm

from ..errors import ConfigError, closest
from ..model.propagate import Propagator
from ..model.spec import CLOCK_PARAM, Model
from .solvers import gauss_newton_hessian, ipopt_solver, quiet_native_stdout, sqp_solver

__all__ = ["NMPCConfig", "DosePlan", "PlannedDose", "DoseRounding", "Exposure",
           "NonlinearMPC", "problem_structure"]

_NONE = (-math.inf, math.inf)


@dataclass(frozen=True)
class NMPCConfig:
    """Structure of the problem (fixed at build time) and default numbers (changeable per
    call without rebuilding). Rates in each input's amount unit per second, amounts in its
    amount unit, times in seconds, outputs in their model unit.

    Attributes
    ----------
    output : str
        The tracked model output.
    inputs : tuple of str
        The inputs the controller sets.
    period_s : float
        Control period [s]; one shooting interval.
    horizon : int
        Prediction horizon in periods.
    move_block : int
        Periods per decision block (1: a decision each period).
    reference : float
        Default reference of *output* (its unit).
    output_weight : float
        Weight of the squared tracking error.
    change_weights : mapping
        Weight of the squared change of each input's rate between periods (with scheduled
        doses: between consecutive doses' infusion rates).
    use_weights : mapping
        Linear (economic) weight of each input's amount.
    rate_bounds : mapping of input -> (min, max)
        Hard bounds on each rate (with scheduled doses: on each dose's infusion rate, so a
        dose is at most ``max * infusion_s``).
    max_change : mapping of input -> float
        Hard bound on the change of a rate between periods (inf: none).
    soft_window : (low, high)
        Soft bounds on the output, penalised with *soft_weights* (linear, quadratic); the
        low side with *soft_low_weights* when given (an asymmetric cost: a low glucose
        far costlier than a high one).
    hard_window : (low, high)
        Hard bounds on the output (-inf, inf: none).
    ratio : (input_a, input_b, r), optional
        Fix ``rate_b = r * rate_a`` (the decision is then *input_a* only).
    dose_windows : tuple of (input, window_s, max_amount)
        Cumulative dose limits: delivered in the last *window_s* plus planned within the
        first *window_s* of the plan, and planned within every later window of that length
        that lies wholly in the horizon (so a per-day cap binds on every day planned).
    disturbance : bool
        Include an additive output disturbance parameter (offset-free tracking).
    solver : "sqpmethod" or "ipopt"

    The fields from ``dose_interval_s`` on are described where they are declared.
    """

    output: str
    inputs: tuple[str, ...]
    period_s: float
    horizon: int
    move_block: int = 1
    reference: float = 0.0
    output_weight: float = 1.0
    change_weights: Mapping[str, float] = field(default_factory=dict)
    use_weights: Mapping[str, float] = field(default_factory=dict)
    rate_bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    max_change: Mapping[str, float] = field(default_factory=dict)
    soft_window: tuple[float, float] = _NONE
    #: the output the soft and hard windows apply to (the tracked output by default), e.g. a
    #: therapeutic window on a concentration while tracking an effect
    window_output: str | None = None
    soft_weights: tuple[float, float] = (100.0, 100.0)
    #: the soft window's low side's (linear, quadratic) weights; None: soft_weights
    soft_low_weights: tuple[float, float] | None = None
    #: the soft window is checked at every *soft_every*-th stage (and the last): fewer slack
    #: variables, a smaller QP (the output moves slowly against the period)
    soft_every: int = 1
    hard_window: tuple[float, float] = _NONE
    #: hard bounds on the window output at the end of the horizon (terminal constraint)
    terminal_window: tuple[float, float] = _NONE
    ratio: tuple[str, str, float] | None = None
    dose_windows: tuple[tuple[str, float, float], ...] = ()
    disturbance: bool = True

    # ---------------------------------------------------------------- scheduled doses
    #: intermittent dosing: doses start at clock times a multiple of this interval [s] apart
    #: (a whole number of periods), and the decisions are their amounts; None: continuous
    #: infusion (a rate decided every period)
    dose_interval_s: float | None = None
    #: duration of each scheduled infusion [s], any length in (0, dose_interval_s] (None:
    #: one period). When it is not a whole number of periods the rate changes inside a
    #: period: the node must stop the infusion at its end (DosePlan.doses says when)
    infusion_s: float | None = None
    #: clock time of day [h after midnight] of one scheduled dose (the others are whole
    #: intervals away), read on the model's clock (see clock_time_at_t0_h); None: doses at
    #: whole multiples of dose_interval_s since t = 0
    dose_clock_h: float | None = None
    #: clock time of day [h] at model time t = 0, for models without the parameter
    #: ``clock_time_at_t0`` (a circadian model's own parameter sets it; giving both is an error)
    clock_time_at_t0_h: float | None = None
    #: input -> largest amount of one dose (maintenance cap) [amount]
    max_dose: Mapping[str, float] = field(default_factory=dict)
    #: input -> largest amount of the course's first dose [amount] (a loading dose may exceed
    #: max_dose); applies when plan(doses_given=...) says no dose of the input was given yet
    loading_dose_max: Mapping[str, float] = field(default_factory=dict)
    #: input -> the amount step a dose is rounded to (e.g. 250 mg) [amount]
    dose_step: Mapping[str, float] = field(default_factory=dict)
    #: time from a dose's start to its peak sample [s] (None: the end of the infusion)
    peak_offset_s: float | None = None
    #: soft and hard windows on the exposure output just before each scheduled dose (troughs)
    #: and at its peak time (peaks); soft violations cost *soft_weights* like soft_window's
    trough_soft_window: tuple[float, float] = _NONE
    trough_hard_window: tuple[float, float] = _NONE
    peak_soft_window: tuple[float, float] = _NONE
    peak_hard_window: tuple[float, float] = _NONE

    # ---------------------------------------------------------------- exposure
    #: the output whose AUC, troughs, peaks and time above threshold count (window_output,
    #: else the tracked output, by default)
    exposure_output: str | None = None
    #: length of the AUC windows [s] (a whole number of periods, e.g. 86400 for AUC24); the
    #: windows are [auc_window_start_s + i W, auc_window_start_s + (i + 1) W) of model time;
    #: None: no AUC terms
    auc_window_s: float | None = None
    #: start of the AUC windows [s of model time] (a whole number of periods)
    auc_window_start_s: float = 0.0
    #: target AUC of every window that ends within the horizon [output unit x h], penalised
    #: as auc_weight * (100 (AUC - target) / target)^2 (the miss in percent); None: no target
    auc_target: float | None = None
    auc_weight: float = 1.0
    #: soft bounds on each window's AUC [output unit x h]; a violation is measured in percent
    #: of the bound crossed and costs auc_soft_weights (linear, quadratic) per percent: the
    #: linear weight keeps the window exactly while it exceeds the target term's pull
    #: (auc_weight x the target's distance from the bound in percent)
    auc_soft_window: tuple[float, float] = _NONE
    auc_soft_weights: tuple[float, float] = (100.0, 10.0)
    #: hard bounds on each window's AUC [output unit x h]
    auc_hard_window: tuple[float, float] = _NONE
    #: threshold of the exposure output for the time above it (e.g. the MIC) [output unit];
    #: None: no time-above terms
    time_above_threshold: float | None = None
    #: width of the logistic indicator 1 / (1 + exp(-(y - threshold) / width)) [output unit]
    time_above_width: float | None = None
    #: the wanted fraction of the horizon above the threshold; a shortfall costs
    #: time_above_weights (linear, quadratic)
    time_above_target: float = 1.0
    time_above_weights: tuple[float, float] = (0.0, 0.0)
    #: hard lower limit on that fraction (None: none)
    time_above_min: float | None = None

    solver: str = "sqpmethod"
    #: QP solver inside sqpmethod, tried in this order before IPOPT. Measured on the DESIGN
    #: reference problem here: qpOASES (dense) 0.87 ms median per step, qrqp 5.8 ms.
    qp_solvers: tuple[str, ...] = ("qpoases", "qrqp")
    #: "condensed" (states eliminated; linear time-invariant models only: other models
    #: take multiple shooting), "multiple_shooting" (states as decision variables, any
    #: model) or "linearised" (condensed for any model: the dynamics linearised along the
    #: previous plan every cycle, a real-time iteration; ``linearisation_passes`` times)
    transcription: str = "condensed"
    #: linearise, solve, and linearise again along the new plan, this many times a cycle
    #: (transcription "linearised" with a nonlinear or time-varying model)
    linearisation_passes: int = 1
    max_iter: int = 30
    #: SQP stops when the Lagrangian's gradient is below this (and the constraints hold to
    #: 1e-6): on the 32 TIVA training patients 1e-4 gives the metrics of 1e-6 to four
    #: digits with a quarter fewer iterations
    dual_tolerance: float = 1e-4
    rk4_steps: int = 4

    def __post_init__(self) -> None:
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ConfigError(f"nmpc.period_s must be > 0, got {self.period_s!r}")
        if not (isinstance(self.horizon, int) and self.horizon >= 1):
            raise ConfigError(f"nmpc.horizon must be a whole number >= 1, got {self.horizon!r}")
        if not (isinstance(self.soft_every, int) and self.soft_every >= 1):
            raise ConfigError(f"nmpc.soft_every must be a whole number >= 1, "
                              f"got {self.soft_every!r}")
        if not (isinstance(self.move_block, int) and 1 <= self.move_block <= self.horizon):
            raise ConfigError(f"nmpc.move_block must be in [1, horizon], "
                              f"got {self.move_block!r}")
        if self.transcription not in ("condensed", "multiple_shooting", "linearised"):
            raise ConfigError(f"nmpc.transcription must be 'condensed', 'multiple_shooting' "
                              f"or 'linearised', got {self.transcription!r}")
        if not (isinstance(self.linearisation_passes, int) and self.linearisation_passes >= 1):
            raise ConfigError(f"nmpc.linearisation_passes must be a whole number >= 1, "
                              f"got {self.linearisation_passes!r}")
        if self.dose_interval_s is not None:
            ratio = self.dose_interval_s / self.period_s
            if not (self.dose_interval_s > 0 and abs(ratio - round(ratio)) < 1e-9
                    and self.move_block == 1):
                raise ConfigError(f"nmpc.dose_interval_s = {self.dose_interval_s!r}: must be a "
                                  f"whole number of periods ({self.period_s} s), with "
                                  f"move_block 1")
        if not self.dual_tolerance > 0:
            raise ConfigError(f"nmpc.dual_tolerance must be > 0, got {self.dual_tolerance!r}")
        if self.solver not in ("sqpmethod", "ipopt"):
            raise ConfigError(f"nmpc.solver must be 'sqpmethod' or 'ipopt', "
                              f"got {self.solver!r}")
        for field_name in ("rate_bounds", "max_change", "change_weights", "use_weights",
                           "max_dose", "loading_dose_max", "dose_step"):
            unknown = set(getattr(self, field_name)) - set(self.inputs)
            if unknown:
                raise ConfigError(f"nmpc.{field_name}: {sorted(unknown)} are not among the "
                                  f"controlled inputs {list(self.inputs)}")
        for name in self.rate_bounds:
            low, high = self.rate_bounds[name]
            if not (0 <= low <= high):
                raise ConfigError(f"nmpc.rate_bounds[{name!r}] = ({low}, {high}): expected "
                                  f"0 <= min <= max")
        self._check_schedule()
        self._check_exposure()

    def _check_schedule(self) -> None:
        scheduled = self.dose_interval_s is not None
        for name in ("infusion_s", "dose_clock_h", "peak_offset_s"):
            if getattr(self, name) is not None and not scheduled:
                raise ConfigError(f"nmpc.{name} = {getattr(self, name)!r}: only with scheduled "
                                  f"doses (set dose_interval_s)")
        for name in ("max_dose", "loading_dose_max", "dose_step", "trough_soft_window",
                     "trough_hard_window", "peak_soft_window", "peak_hard_window"):
            value = getattr(self, name)
            if value and value != _NONE and not scheduled:
                raise ConfigError(f"nmpc.{name} = {value!r}: only with scheduled doses (set "
                                  f"dose_interval_s)")
        for name in ("infusion_s", "peak_offset_s"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= self.dose_interval_s):
                raise ConfigError(f"nmpc.{name} = {value!r}: expected a duration in "
                                  f"(0, dose_interval_s = {self.dose_interval_s}] s")
        for name in ("dose_clock_h", "clock_time_at_t0_h"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise ConfigError(f"nmpc.{name} = {value!r}: expected a clock time in hours")
        for name, minimum in (("max_dose", 0.0), ("loading_dose_max", 0.0), ("dose_step", None)):
            for key, value in getattr(self, name).items():
                if not (_is_number(value) and (value > 0 if minimum is None else value >= 0)):
                    raise ConfigError(f"nmpc.{name}[{key!r}] = {value!r}: expected an amount "
                                      f"{'> 0' if minimum is None else '>= 0'}")
        if scheduled and any(math.isfinite(v) for v in self.max_change.values()):
            raise ConfigError(f"nmpc.max_change = {dict(self.max_change)!r}: a limit on rate "
                              f"changes between periods does not apply to scheduled doses "
                              f"(cap the doses with max_dose)")

    def _check_exposure(self) -> None:
        windows = ("soft_window", "hard_window", "terminal_window", "auc_soft_window",
                   "auc_hard_window", "trough_soft_window", "trough_hard_window",
                   "peak_soft_window", "peak_hard_window")
        for name in windows:
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 2
                    and all(isinstance(v, (int, float)) and not math.isnan(v) for v in value)
                    and value[0] <= value[1]):
                raise ConfigError(f"nmpc.{name} = {value!r}: expected (low, high) with "
                                  f"low <= high (-inf, inf: none)")
        for name in ("soft_weights", "auc_soft_weights", "time_above_weights",
                     "soft_low_weights"):
            value = getattr(self, name)
            if name == "soft_low_weights" and value is None:
                continue
            if not (len(value) == 2 and all(_is_number(v) and v >= 0 for v in value)):
                raise ConfigError(f"nmpc.{name} = {value!r}: expected (linear, quadratic) "
                                  f"weights >= 0")
        if not (_is_number(self.auc_weight) and self.auc_weight >= 0):
            raise ConfigError(f"nmpc.auc_weight = {self.auc_weight!r}: expected a weight >= 0")
        auc = self.auc_window_s is not None
        if auc:
            periods = self.auc_window_s / self.period_s
            start = self.auc_window_start_s / self.period_s
            if not (self.auc_window_s > 0 and math.isfinite(periods)
                    and abs(periods - round(periods)) < 1e-9):
                raise ConfigError(f"nmpc.auc_window_s = {self.auc_window_s!r}: expected a whole "
                                  f"number of periods ({self.period_s} s)")
            if not (math.isfinite(start) and abs(start - round(start)) < 1e-9):
                raise ConfigError(f"nmpc.auc_window_start_s = {self.auc_window_start_s!r}: "
                                  f"expected a whole number of periods ({self.period_s} s)")
        for name in ("auc_target", "auc_soft_window", "auc_hard_window"):
            value = getattr(self, name)
            if value is not None and value != _NONE and not auc:
                raise ConfigError(f"nmpc.{name} = {value!r}: only with AUC windows (set "
                                  f"auc_window_s)")
        if self.auc_target is not None and not (_is_number(self.auc_target)
                                                and self.auc_target > 0):
            raise ConfigError(f"nmpc.auc_target = {self.auc_target!r}: expected an AUC > 0 "
                              f"(output unit x h)")
        for side, bound in zip(("low", "high"), self.auc_soft_window):
            if math.isfinite(bound) and not bound > 0:
                raise ConfigError(f"nmpc.auc_soft_window = {self.auc_soft_window!r}: a finite "
                                  f"{side} bound must be > 0 (violations are measured as a "
                                  f"fraction of it)")
        above = self.time_above_threshold is not None
        if above:
            if not _is_number(self.time_above_threshold):
                raise ConfigError(f"nmpc.time_above_threshold = "
                                  f"{self.time_above_threshold!r}: expected a number")
            if not (self.time_above_width is not None and _is_number(self.time_above_width)
                    and self.time_above_width > 0):
                raise ConfigError(f"nmpc.time_above_width = {self.time_above_width!r}: "
                                  f"expected a width > 0 (output unit) with a threshold")
        for name in ("time_above_target", "time_above_min"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 <= value <= 1):
                raise ConfigError(f"nmpc.{name} = {value!r}: expected a fraction in [0, 1]")
        if not above and (self.time_above_min is not None or self.time_above_width is not None
                          or any(self.time_above_weights)):
            raise ConfigError("nmpc.time_above_min, time_above_width, time_above_weights: "
                              "only with a threshold (set time_above_threshold)")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True)
class PlannedDose:
    """One scheduled dose of a plan: *amount* of *input* infused at a constant rate from
    *t_start_s* for *duration_s* [s]."""

    input: str
    t_start_s: float
    amount: float
    duration_s: float

    @property
    def rate(self) -> float:
        """The infusion rate [amount/s]."""
        return self.amount / self.duration_s


@dataclass(frozen=True)
class DoseRounding:
    """How the first dose was rounded to *step* (input -> amount step): the relaxed
    optimum, each candidate (amounts, objective, success) solved with the first dose fixed,
    and the chosen amounts; *extra_solve_time_s* is what the re-solves cost."""

    step: dict[str, float]
    relaxed: dict[str, float]
    candidates: tuple[tuple[dict[str, float], float, bool], ...]
    chosen: dict[str, float]
    extra_solve_time_s: float


@dataclass(frozen=True)
class Exposure:
    """Predicted exposure of the exposure output over a plan.

    *auc*: (window start [s], window end [s], AUC [output unit x h]) of each window that
    ends within the horizon (the first includes the AUC already accrued). *troughs*: (time
    [s], output) just before each scheduled dose in the horizon. *peaks*: (time [s], output)
    at each dose's peak time within the horizon. *time_above*: the fraction of the horizon
    above the threshold (smooth estimate; nan without a threshold).
    """

    auc: tuple[tuple[float, float, float], ...] = ()
    troughs: tuple[tuple[float, float], ...] = ()
    peaks: tuple[tuple[float, float], ...] = ()
    time_above: float = math.nan


@dataclass(frozen=True)
class DosePlan:
    """One NMPC solution: the first move and the whole plan, with how the solve went.

    ``success`` is False when the solver failed or its plan left its bounds (then *rates*
    must not be applied: the supervisor decides). *solver* is the one that produced it.
    *plan* holds the rate of each input at the start of each period. With scheduled doses,
    *doses* lists the planned doses (amount, start, duration) and *rounding* how the first
    dose was rounded (None when it was not).
    """

    t_s: float
    success: bool
    status: str
    iterations: int
    solve_time_s: float
    solver: str
    rates: dict[str, float]
    plan: np.ndarray
    objective: float
    reason: str
    #: computes the predicted output on demand (controllers rarely read it; it costs a
    #: function evaluation per cycle)
    predict: Callable[[], np.ndarray] = field(repr=False, compare=False,
                                              default=lambda: np.zeros(0))
    doses: tuple[PlannedDose, ...] = ()
    rounding: DoseRounding | None = None
    report: Callable[[], Exposure] = field(repr=False, compare=False, default=Exposure)

    @functools.cached_property
    def predicted_output(self) -> np.ndarray:
        """The tracked output predicted at the end of each period of the horizon."""
        return self.predict()

    @functools.cached_property
    def exposure(self) -> Exposure:
        """Predicted AUC per window, troughs, peaks and time above threshold (on demand)."""
        return self.report()


@dataclass(frozen=True)
class _Schedule:
    """Where the scheduled doses fall in one plan (stage indices from t_s)."""

    starts: np.ndarray        # stage index of each planned dose (>= horizon: not planned)
    active: np.ndarray        # planned within the horizon
    first_t_s: float          # model time of the first planned dose
    previous_start: int       # stage index (< 0... <= 0) of the dose before the first
    remaining_s: float        # of the previous dose's infusion after t_s (0: finished)
    elapsed_periods: int      # periods since the previous dose started


def _exact_pieces(a: np.ndarray, b: np.ndarray, c: np.ndarray, dt: float) -> tuple:
    """``(Phi, Gamma, gc, Phi_i, Gamma_i, gc_i)`` of ``dx/dt = A x + B u + c`` over *dt*
    with constant *u*: ``x(dt) = Phi x + Gamma u + gc`` and
    ``int_0^dt x = Phi_i x + Gamma_i u + gc_i``, from one matrix exponential of
    ``[[M, I], [0, 0]] dt`` with ``M = [[A, B, c], [0, 0, 0]]`` (its upper right block is
    ``int_0^dt exp(M s) ds``; Van Loan 1978)."""
    n, m = b.shape
    k = n + m + 1
    big = np.zeros((2 * k, 2 * k))
    big[:n, :n], big[:n, n:n + m], big[:n, n + m] = a * dt, b * dt, c * dt
    big[:k, k:] = np.eye(k) * dt
    e = expm(big)
    step, integral = e[:k, :k], e[:k, k:]
    return (step[:n, :n], step[:n, n:n + m], step[:n, n + m],
            integral[:n, :n], integral[:n, n:n + m], integral[:n, n + m])


def _rk4(m: Model, theta, t, x, u, h, steps: int, output: int | None = None):
    """*steps* classical RK4 steps of length *h* [s] of the model from (*t*, *x*) under
    rates *u*; with *output* also the RK4 quadrature of that output over them (the same
    stage points, so 4th order like the state): ``(x, integral)``."""
    q = 0
    for i in range(steps):
        ts = t + i * h
        k1 = m.f(ts, x, u, theta)
        x2 = x + h / 2 * k1
        k2 = m.f(ts + h / 2, x2, u, theta)
        x3 = x + h / 2 * k2
        k3 = m.f(ts + h / 2, x3, u, theta)
        x4 = x + h * k3
        k4 = m.f(ts + h, x4, u, theta)
        if output is not None:
            q = q + h / 6 * sum(w_ * m.h(t_, x_, u, theta)[output] for w_, t_, x_ in (
                (1, ts, x), (2, ts + h / 2, x2), (2, ts + h / 2, x3), (1, ts + h, x4)))
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x if output is None else (x, q)


def _softplus(x):
    """log(1 + exp(x)) without overflow."""
    return ca.fmax(x, 0) + ca.log1p(ca.exp(-ca.fabs(x)))


def _mean_above(y0, y1, threshold, width):
    """Mean of the logistic indicator ``1 / (1 + exp(-(y - threshold) / width))`` while *y*
    runs linearly from *y0* to *y1*: ``(sp(v) - sp(u)) / (v - u)`` with ``sp`` the softplus
    (the indicator's antiderivative), the midpoint value where ``u ~ v``."""
    u, v = (y0 - threshold) / width, (y1 - threshold) / width
    d = v - u
    far = ca.fabs(d) > 1e-4
    safe = ca.if_else(far, d, 1.0)
    mid = 1 / (1 + ca.exp(-(u + v) / 2))
    return ca.if_else(far, (_softplus(v) - _softplus(u)) / safe, mid)


class NonlinearMPC:
    """The NMPC for *model* (the controller's model) and *config*; see the module docstring.

    Call :meth:`plan` each cycle with the estimated state and parameters.
    """

    def __init__(self, model: Model, config: NMPCConfig) -> None:
        self.model, self.config = model, config
        c = config
        for name in c.inputs:
            model.input_index(name)
        self._k_out = model.output_index(c.output)
        self._k_win = model.output_index(c.window_output or c.output)
        self._k_exp = model.output_index(c.exposure_output or c.window_output or c.output)
        if c.ratio is not None:
            a, b, r = c.ratio
            if a not in c.inputs or b not in c.inputs or a == b or not r >= 0:
                raise ConfigError(f"nmpc.ratio = {c.ratio!r}: expected two different inputs "
                                  f"of {c.inputs} and a ratio >= 0")
        self._free = [i for i in c.inputs if c.ratio is None or i != c.ratio[1]]
        self._free_columns = [model.input_index(name) for name in self._free]
        # model inputs per unit of each free decision (the ratio's second input follows)
        self._b_eff = np.zeros((model.n_inputs, len(self._free)))
        for j, name in enumerate(self._free):
            self._b_eff[model.input_index(name), j] = 1.0
            if c.ratio is not None and name == c.ratio[0]:
                self._b_eff[model.input_index(c.ratio[1]), j] = c.ratio[2]
        self._exact = model.is_affine and not model.is_time_varying
        self._lift_layout: tuple[list[int], list[tuple[int, int, int, int]]] | None = None
        t, x, u, th = self._symbols()
        f = model.f(t, x, u, th)
        h = model.h(t, x, u, th)
        self._dynamics_params = [k for k in range(len(model.params)) if ca.depends_on(f, th[k])]
        self._clock_index = (model.param_index(CLOCK_PARAM) if CLOCK_PARAM in model.param_names
                             else None)
        if self._clock_index is not None and c.clock_time_at_t0_h is not None:
            raise ConfigError(f"nmpc.clock_time_at_t0_h = {c.clock_time_at_t0_h!r}: model "
                              f"{model.name!r} sets its clock with its parameter "
                              f"{CLOCK_PARAM!r}; leave this unset")
        self._dosing = c.dose_interval_s is not None
        if self._dosing:
            for k in {self._k_out, self._k_win, self._k_exp}:
                if ca.depends_on(h[k], u):
                    raise ConfigError(f"nmpc.dose_interval_s: output "
                                      f"{model.output_names[k]!r} depends on the infusion "
                                      f"rate itself; scheduled doses need outputs of the "
                                      f"state only")
        y_e = h[self._k_exp]
        #: the exposure output is C(p) x + e(p): its integral over a period is exact
        self._exposure_affine = not (ca.depends_on(ca.jacobian(y_e, x), x)
                                     or ca.depends_on(y_e, u) or ca.depends_on(y_e, t))
        self._infusion_s = (c.infusion_s or c.period_s) if self._dosing else c.period_s
        self._peak_s = c.peak_offset_s or self._infusion_s
        self._offsets = self._sub_offsets()
        self._build()
        # the first solver is built now, not inside the first control period's deadline
        self._solver(f"sqpmethod:{c.qp_solvers[0]}" if c.solver == "sqpmethod" else "ipopt")
        self._warm: dict | None = None
        self._pk_cache: tuple[bytes, dict] | None = None
        #: the bounds and weights of the config's own numbers, built on the first plan
        self._static: tuple | None = None

    def reset(self, config: NMPCConfig | None = None) -> None:
        """Forget the previous patient's warm start and discretisation (reuse the built
        problem for another patient of the same model), and optionally take the numbers of
        *config* (weights, limits, reference), which must have this problem's structure.

        Raises
        ------
        ConfigError
            When *config* differs in structure (see :func:`problem_structure`).
        """
        if config is not None:
            if problem_structure(config) != problem_structure(self.config):
                raise ConfigError("nmpc: the new config changes the problem's structure "
                                  "(horizon, inputs, which limits exist, ...); build a new "
                                  "NonlinearMPC for it")
            self.config = config
        self._warm = None
        self._pk_cache = None
        self._static = None

    # ------------------------------------------------------------------ build
    def _sub_offsets(self) -> np.ndarray:
        """Offsets [s] splitting each period where scheduled doses change the rate or are
        sampled (the end of an infusion and the peak time, when not on a period boundary);
        doses start on period boundaries, so the same split serves every period."""
        T = self.config.period_s
        cuts = []
        if self._dosing:
            for value in (self._infusion_s, self._peak_s):
                r = math.fmod(value, T)
                if 1e-9 * T < r < T * (1 - 1e-9) and all(abs(r - q) > 1e-9 * T for q in cuts):
                    cuts.append(r)
        return np.array([0.0, *sorted(cuts), T])

    def _rates_expr(self, free: ca.SX) -> ca.SX:
        """All model inputs' rates from the free decision variables of one block."""
        c, m = self.config, self.model
        rates = [ca.SX(0)] * m.n_inputs
        for j, name in enumerate(self._free):
            rates[m.input_index(name)] = free[j]
        if c.ratio is not None:
            a, b, r = c.ratio
            rates[m.input_index(b)] = r * free[self._free.index(a)]
        return ca.vertcat(*rates)

    def _build(self) -> None:
        c, m = self.config, self.model
        n, nu, nf, N = m.n_states, m.n_inputs, len(self._free), c.horizon
        T = c.period_s
        dosing = self._dosing
        deltas = np.diff(self._offsets)
        S = deltas.size
        NS = N * S
        if dosing:
            K = int(round(c.dose_interval_s / T))
            n_blocks = -(-N // K)
        else:
            n_blocks = -(-N // c.move_block)
        J = n_blocks if dosing else 0
        self._n_doses = J
        # Structure from the config: rows and slacks exist only for limits that are finite
        # at build time (their values remain per-call numbers).
        # linearised: condensed for any model, on affine responses re-linearised per call
        condensed = (self._exact and c.transcription in ("condensed", "linearised")
                     or c.transcription == "linearised")
        self._condensed = condensed
        self._linearised = condensed and not self._exact
        if self._linearised and (dosing or c.auc_window_s is not None):
            raise ConfigError("nmpc.transcription = 'linearised' with a nonlinear or "
                              "time-varying model: scheduled doses (dose_interval_s) and AUC "
                              "windows (auc_window_s) need 'multiple_shooting'")
        soft_low, soft_high = math.isfinite(c.soft_window[0]), math.isfinite(c.soft_window[1])
        hard = any(math.isfinite(v) for v in c.hard_window)
        change = any(math.isfinite(v) for v in c.max_change.values())
        auc = c.auc_window_s is not None
        n_auc = math.ceil(N * T / c.auc_window_s - 1e-9) if auc else 0
        self._n_auc = n_auc
        # the period integral of the exposure output: exact for LTI dynamics and an affine
        # output; else RK4 quadrature (time-varying or nonlinear dynamics) or trapezoid
        self._auc_kind = (None if not auc else "exact" if self._exact and self._exposure_affine
                          else "rk4" if not self._exact else "trapezoid")
        finite = {name: tuple(math.isfinite(v) for v in getattr(c, name)) for name in (
            "auc_soft_window", "auc_hard_window", "trough_soft_window", "trough_hard_window",
            "peak_soft_window", "peak_hard_window")}
        above = c.time_above_threshold is not None
        X = None if condensed else ca.SX.sym("X", n, N + 1)
        U = ca.SX.sym("U", nf, n_blocks)
        soft_stages = [k for k in range(N) if (k + 1) % c.soft_every == 0 or k == N - 1]
        SL = ca.SX.sym("SL", len(soft_stages) if soft_low else 0)
        SH = ca.SX.sym("SH", len(soft_stages) if soft_high else 0)
        slack_of = {k: j for j, k in enumerate(soft_stages)}
        extra_slacks = {
            "ASL": n_auc if finite["auc_soft_window"][0] else 0,
            "ASH": n_auc if finite["auc_soft_window"][1] else 0,
            "TSL": J if finite["trough_soft_window"][0] else 0,
            "TSH": J if finite["trough_soft_window"][1] else 0,
            "PSL": J + 1 if finite["peak_soft_window"][0] else 0,
            "PSH": J + 1 if finite["peak_soft_window"][1] else 0,
            "TAS": 1 if above else 0}
        slack = {name: ca.SX.sym(name, size) for name, size in extra_slacks.items()}
        blocks = ([ca.vec(X)] if X is not None else []) + [ca.vec(U), SL, SH,
                                                           *slack.values()]
        w = ca.vertcat(*blocks)
        sizes = [int(b.numel()) for b in blocks]
        offsets = np.cumsum([0] + sizes)
        names = (["X"] if X is not None else []) + ["U", "SL", "SH", *slack]
        self._slices = {name: slice(int(offsets[i]), int(offsets[i + 1]))
                        for i, name in enumerate(names)}
        # parameters: state, previous free rates, reference, model params, disturbance,
        # clock, weights, exact-discretisation matrices
        x0 = ca.SX.sym("x0", n)
        u_prev = ca.SX.sym("u_prev", nf)
        ref = ca.SX.sym("ref", N)
        theta = ca.SX.sym("theta", len(m.params))
        dist = ca.SX.sym("d")
        t0 = ca.SX.sym("t0")
        w_y = ca.SX.sym("w_y")
        w_du = ca.SX.sym("w_du", nf)
        w_use = ca.SX.sym("w_use", nf)
        w_soft = ca.SX.sym("w_soft", 4)  # (linear, quadratic) high side, then low side
        window = ca.SX.sym("window", 2)
        parts = [x0, u_prev, ref, theta, dist, t0, w_y, w_du, w_use, w_soft, window]
        if condensed:
            watched = self._watched_states()
            self._watched = watched
        if condensed and not dosing:
            # Only the states the outputs read are kept, as affine functions of the decisions
            # with numeric coefficients (computed per patient outside): z_k = free_k +
            # sum_b G_kb rates_b. The NLP then carries a few products per stage instead of
            # the whole state rollout, and its derivatives are the coefficients themselves.
            reach = self._reachability(watched)
            free_resp = ca.SX.sym("free", len(watched), N)
            gain_entries = [(k, b, i, j) for k in range(N) for b in range(k // c.move_block + 1)
                            for i, j in zip(*np.nonzero(reach))]
            gains = ca.SX.sym("gain", len(gain_entries))
            parts += [ca.vec(free_resp), gains]
            self._lift_layout = (watched, gain_entries)
            if self._linearised:
                self._rollout = self._build_rollout(watched, n_blocks)
        elif self._exact and not condensed:
            pieces = [(ca.SX.sym(f"phi{s}", n, n), ca.SX.sym(f"gam{s}", n, nu),
                       ca.SX.sym(f"gc{s}", n)) for s in range(S)]
            for piece in pieces:
                parts += [ca.vec(q) for q in piece]
        # Parameters added by the exposure and dosing terms, filled per call by name
        self._extra: list[tuple[str, int]] = []

        def extra(name: str, size: int) -> ca.SX:
            sym = ca.SX.sym(name, size)
            parts.append(sym)
            self._extra.append((name, size))
            return sym

        nw = len(self._watched) if condensed else 0
        if condensed and dosing:
            dose_free = extra("dose_free", NS * nw)
            dose_gain = extra("dose_gain", NS * nw * J * nf)
            if self._auc_kind == "exact":
                dose_free_int = extra("dose_free_int", N * nw)
                dose_gain_int = extra("dose_gain_int", N * nw * J * nf)
        if condensed and not dosing and self._auc_kind == "exact":
            free_int = extra("int_free", nw * N)
            gains_int = extra("int_gain", len(gain_entries))
        if self._exact and not condensed and self._auc_kind == "exact":
            int_pieces = []
            for s in range(S):
                q = extra(f"int_piece{s}", n * n + n * nu + n)
                int_pieces.append((ca.reshape(q[:n * n], n, n),
                                   ca.reshape(q[n * n:n * n + n * nu], n, nu), q[n * n + n * nu:]))
        if dosing and not condensed:
            dose_coef = extra("dose_coef", NS * J)
            dose_known = extra("dose_known", NS)
        if dosing:
            dose_active = extra("dose_active", J)
        if auc:
            auc_mask = extra("auc_mask", n_auc * N)
            auc_base = extra("auc_base", n_auc)
            auc_active = extra("auc_active", n_auc)
            auc_numbers = extra("auc_numbers", 6)  # weight, target, soft weights, soft window
        trough_rows = any(finite["trough_soft_window"] + finite["trough_hard_window"])
        peak_rows = any(finite["peak_soft_window"] + finite["peak_hard_window"])
        if trough_rows:
            trough_mask = extra("trough_mask", J * NS)
            trough_window = extra("trough_window", 2)
        if peak_rows:
            peak_mask = extra("peak_mask", (J + 1) * NS)
            peak_window = extra("peak_window", 2)
        if above:
            above_numbers = extra("time_above", 5)  # threshold, width, target, 2 weights
        # dose-window rows: (window index, None) for the window from t_s, which also counts
        # what was delivered before; with scheduled doses also (window index, j) for the
        # window from each planned dose's start (rows with distinct supports: overlapping
        # windows sliding by a period would make many rows alike and stall the QP)
        dw_layout = [(k_w, anchor) for k_w in range(len(c.dose_windows))
                     for anchor in [None] + (list(range(J)) if dosing else [])]
        self._dw_layout = dw_layout
        if dosing and dw_layout:
            dw_coef = extra("dose_window_coef", len(dw_layout) * J)
        p = ca.vertcat(*parts)
        self._p_sizes = [int(q.numel()) for q in parts]

        # ---- the state at every sample point (sub-period ends) and period integrals
        if condensed and not dosing:
            gain_of: dict[tuple[int, int], list] = {}
            for q, (k, b, i, j) in enumerate(gain_entries):
                gain_of.setdefault((k, b), []).append((i, j, q))

            def lifted(free_part, coefficients, k):
                z = [free_part[i, k] for i in range(len(watched))]
                for b in range(k // c.move_block + 1):
                    rates_b = self._rates_expr(U[:, b])
                    for i, j, q in gain_of.get((k, b), ()):
                        z[i] = z[i] + coefficients[q] * rates_b[j]
                x_full = [ca.SX(0)] * n  # states no output reads stay 0
                for i, state in enumerate(watched):
                    x_full[state] = z[i]
                return ca.vertcat(*x_full)

            def watched_state(k):
                return lifted(free_resp, gains, k)
        if condensed and dosing:
            a_vec = ca.vec(U)  # dose j's free amounts at j * nf ...

            def affine_state(free_part, gain_part, q):
                row = gain_part[q * nw * J * nf:(q + 1) * nw * J * nf]
                z = free_part[q * nw:(q + 1) * nw] + ca.mtimes(
                    ca.reshape(row, J * nf, nw).T, a_vec)
                x_full = [ca.SX(0)] * n
                for i, state in enumerate(watched):
                    x_full[state] = z[i]
                return ca.vertcat(*x_full)
        if not condensed:
            if self._exact:
                def step(t_k, x_k, u_k, s):
                    phi, gam, gc = pieces[s]
                    return ca.mtimes(phi, x_k) + ca.mtimes(gam, u_k) + gc
            else:
                def step(t_k, x_k, u_k, s, quadrature=False):
                    steps = max(1, int(round(c.rk4_steps * deltas[s] / T)))
                    h_rk = deltas[s] / steps if S > 1 else T / c.rk4_steps
                    return _rk4(m, theta, t_k, x_k, u_k, h_rk, steps,
                                self._k_exp if quadrature else None)

        def sub_rates(k, s):
            """Model input rates in sub-interval s of period k."""
            if not dosing:
                return self._rates_expr(U[:, k // c.move_block])
            if condensed:  # the outputs do not read the rates (checked at build)
                return ca.SX.zeros(nu)
            q = k * S + s
            return self._rates_expr(ca.mtimes(U, dose_coef[q * J:(q + 1) * J])
                                    + dose_known[q] * u_prev)

        g, residuals, linear = [], [], 0
        self._g_labels = []

        def soft(excess, slack_j, label, w_lin, w_quad):
            """A soft limit ``excess + slack >= 0`` (slack >= 0 by its bounds) whose slack
            costs ``w_lin slack + 0.5 w_quad slack^2`` (an exact penalty above the
            multiplier)."""
            nonlocal linear
            g.append(excess + slack_j)
            self._g_labels.append(label)
            residuals.append(ca.sqrt(w_quad) * slack_j)
            linear += w_lin * slack_j

        if X is not None:
            g.append(x0 - X[:, 0])
            self._g_labels += ["initial"] * n
        same_exp = self._k_exp == self._k_out
        d_exp = dist if same_exp else 0  # the disturbance belongs to the measured output
        y_pred, y_exp, integrals = [], [], []
        for k in range(N):
            b = k // c.move_block
            rates = self._rates_expr(U[:, b]) if not dosing else sub_rates(k, S - 1)
            t_k = t0 + k * T
            sub_states = []
            integral = 0
            if X is None:
                if not dosing:
                    x_next = watched_state(k)
                else:
                    sub_states = [affine_state(dose_free, dose_gain, k * S + s)
                                  for s in range(S - 1)]
                    x_next = affine_state(dose_free, dose_gain, k * S + S - 1)
                if self._auc_kind == "exact":
                    x_int = (lifted(ca.reshape(free_int, nw, N), gains_int, k) if not dosing
                             else affine_state(dose_free_int, dose_gain_int, k))
                    integral = T * m.h(t_k, x_int / T, rates, theta)[self._k_exp]
            else:
                x_s = X[:, k]
                for s in range(S):
                    r_s = sub_rates(k, s)
                    t_sub = t_k + self._offsets[s]
                    if self._auc_kind == "exact":
                        phi_i, gam_i, gc_i = int_pieces[s]
                        x_int = ca.mtimes(phi_i, x_s) + ca.mtimes(gam_i, r_s) + gc_i
                        integral += deltas[s] * m.h(t_sub, x_int / deltas[s], r_s,
                                                    theta)[self._k_exp]
                    if self._auc_kind == "rk4":
                        x_s, piece = step(t_sub, x_s, r_s, s, quadrature=True)
                        integral += piece
                    else:
                        x_s = step(t_sub, x_s, r_s, s)
                    if s < S - 1:
                        sub_states.append(x_s)
                g.append(x_s - X[:, k + 1])
                self._g_labels += ["dynamics"] * n
                x_next = X[:, k + 1]
            outputs = m.h(t_k + T, x_next, rates, theta)
            y = outputs[self._k_out] + dist
            y_pred.append(y)
            for s, x_sub in enumerate(sub_states):
                y_exp.append(m.h(t_k + self._offsets[s + 1], x_sub, sub_rates(k, s),
                                 theta)[self._k_exp] + d_exp)
            y_exp.append(y if same_exp else outputs[self._k_exp])
            if auc:
                integrals.append(integral + T * d_exp if self._auc_kind != "trapezoid"
                                 else None)
            residuals.append(ca.sqrt(w_y) * (y - ref[k]))
            # the disturbance belongs to the tracked (measured) output only
            y_win = y if self._k_win == self._k_out else outputs[self._k_win]
            # soft window: y + SL >= low, y - SH <= high (slacks >= 0 by bounds)
            j = slack_of.get(k)
            if soft_low and j is not None:
                g.append(y_win + SL[j] - window[0])
                self._g_labels.append("soft_low")
                residuals.append(ca.sqrt(w_soft[3]) * SL[j])
                linear += w_soft[2] * SL[j]
            if soft_high and j is not None:
                g.append(window[1] - y_win + SH[j])
                self._g_labels.append("soft_high")
                residuals.append(ca.sqrt(w_soft[1]) * SH[j])
                linear += w_soft[0] * SH[j]
            if hard:
                g.append(y_win)  # the hard window, by its bounds
                self._g_labels.append("hard")
        if any(math.isfinite(v) for v in c.terminal_window):
            g.append(y_win)  # the last stage's window output, by the terminal bounds
            self._g_labels.append("terminal")
        if not dosing:
            for b in range(n_blocks):
                previous = u_prev if b == 0 else U[:, b - 1]
                residuals.append(ca.sqrt(w_du) * (U[:, b] - previous))
                if change:
                    g.append(U[:, b] - previous)  # rate-change limits, by their bounds
                    self._g_labels += ["change"] * nf
                periods = min(c.move_block, N - b * c.move_block)
                linear += periods * T * ca.dot(w_use, U[:, b])
        else:
            # doses (decided as their infusion rates, on the scale of continuous rates): the
            # change of rate between consecutive planned doses, and the amounts (economic);
            # doses beyond the horizon are inactive
            for j in range(J):
                if j:
                    residuals.append(ca.sqrt(w_du) * dose_active[j] * (U[:, j] - U[:, j - 1]))
                linear += self._infusion_s * ca.dot(w_use, U[:, j])
        # warm start: block b of the next plan averages the old plan's rates over its
        # periods shifted by one (the last period repeated)
        owner = np.minimum(np.arange(1, N + 1), N - 1) // c.move_block  # old block per period
        self._shift = np.zeros((n_blocks, n_blocks))
        if not dosing:
            for k in range(N):
                self._shift[k // c.move_block, owner[k]] += 1.0
            self._shift /= self._shift.sum(axis=1, keepdims=True)
        # cumulative dose windows: planned amount within each window, bounded per call (the
        # first window also counts what was delivered before t_s)
        for row, (k_w, _) in enumerate(dw_layout):
            name, window_s, _ = c.dose_windows[k_w]
            periods = max(1, min(N, int(round(window_s / T))))
            jm = m.input_index(name)
            amount = 0
            if not dosing:
                for k in range(periods):
                    amount += self._rates_expr(U[:, k // c.move_block])[jm] * T
            else:  # the coefficients are the seconds of each dose's infusion in the window
                for j in range(J):
                    amount += dw_coef[row * J + j] * self._rates_expr(U[:, j])[jm]
            g.append(amount)
            self._g_labels += ["dose_window"]
        # ---- exposure: the output at t_s, at every sample point, and each period's integral
        y0 = m.h(t0, x0, self._rates_expr(u_prev), theta)[self._k_exp] + d_exp
        samples = [y0] + y_exp
        durations = np.tile(deltas, N)
        if auc:
            if self._auc_kind == "trapezoid":
                integrals = [sum(durations[q] * (samples[q] + samples[q + 1]) / 2
                                 for q in range(k * S, (k + 1) * S)) for k in range(N)]
            I = ca.vertcat(*integrals)
            auc_values = []
            for i in range(n_auc):
                value = auc_base[i] + ca.dot(auc_mask[i * N:(i + 1) * N], I) / 3600.0
                auc_values.append(value)
                if c.auc_target is not None:
                    # the deviation in percent of the target: a 1 % miss costs auc_weight
                    residuals.append(ca.sqrt(auc_numbers[0] * auc_active[i])
                                     * 100.0 * (value - auc_numbers[1]) / auc_numbers[1])
                low, high = auc_numbers[4], auc_numbers[5]
                # violations in percent of the bound crossed
                if finite["auc_soft_window"][0]:
                    soft(100.0 * (value - low) / low, slack["ASL"][i], "auc_soft_low",
                         auc_numbers[2], auc_numbers[3])
                if finite["auc_soft_window"][1]:
                    soft(100.0 * (high - value) / high, slack["ASH"][i], "auc_soft_high",
                         auc_numbers[2], auc_numbers[3])
                if any(finite["auc_hard_window"]):
                    g.append(value)
                    self._g_labels.append("auc_hard")
        else:
            auc_values = []
        y_fine = ca.vertcat(*y_exp)
        for kind, rows, mask, bounds in (("trough", J if trough_rows else 0,
                                          trough_mask if trough_rows else None,
                                          trough_window if trough_rows else None),
                                         ("peak", J + 1 if peak_rows else 0,
                                          peak_mask if peak_rows else None,
                                          peak_window if peak_rows else None)):
            low_slack, high_slack = slack[kind[0].upper() + "SL"], slack[kind[0].upper() + "SH"]
            for r in range(rows):
                value = ca.dot(mask[r * NS:(r + 1) * NS], y_fine)
                if finite[f"{kind}_soft_window"][0]:
                    soft(value - bounds[0], low_slack[r], f"{kind}_soft_low", w_soft[0],
                         w_soft[1])
                if finite[f"{kind}_soft_window"][1]:
                    soft(bounds[1] - value, high_slack[r], f"{kind}_soft_high", w_soft[0],
                         w_soft[1])
                if any(finite[f"{kind}_hard_window"]):
                    g.append(value)
                    self._g_labels.append(f"{kind}_hard")
        if above:
            threshold, width, target, w_lin, w_quad = (above_numbers[i] for i in range(5))
            fraction = sum(durations[q] * _mean_above(samples[q], samples[q + 1], threshold,
                                                      width) for q in range(NS)) / (N * T)
            soft(fraction - target, slack["TAS"][0], "above_soft", w_lin, w_quad)
            if c.time_above_min is not None:
                g.append(fraction)
                self._g_labels.append("above_hard")
        else:
            fraction = ca.SX(0, 1)
        r = ca.vertcat(*residuals)
        f = 0.5 * ca.sumsqr(r) + linear
        G = ca.vertcat(*g) if g else ca.SX(0, 1)
        self._nlp = {"x": w, "p": p, "f": f, "g": G}
        #: the dosing and exposure problems of a linear model are QPs (the older problems
        #: keep their line search: their tuned iterates stay as they were)
        self._is_qp = bool(self._extra) and ca.is_quadratic(f, w) and ca.is_linear(G, w)
        self._hess = gauss_newton_hessian(r, w, p, G.numel())
        self._solvers: dict[str, ca.Function] = {}
        self._y_pred = ca.Function("y_pred", [w, p], [ca.vertcat(*y_pred)])
        # what the problem itself predicts, for DosePlan.exposure
        self._exposure_fn = ca.Function("exposure", [w, p], [y_fine, ca.vertcat(*auc_values),
                                                             fraction])
        # constraint rows by kind, for filling their bounds per call without a Python loop
        labels = np.array(self._g_labels)
        kinds = ["soft", "hard", "terminal", "change", "dose_window", "auc_soft_low",
                 "auc_soft_high", "auc_hard", "trough_soft_low", "trough_soft_high",
                 "trough_hard", "peak_soft_low", "peak_soft_high", "peak_hard", "above_soft",
                 "above_hard"]
        self._rows = {kind: np.flatnonzero(np.isin(labels, ["soft_low", "soft_high"]
                                                   if kind == "soft" else [kind]))
                      for kind in kinds}
        self._n = n
        self._nf = nf
        self._n_blocks = n_blocks
        self._nw = w.numel()
        self._ng = G.numel()

    def _solver(self, name: str) -> ca.Function:
        """``"sqpmethod:<qp>"`` or ``"ipopt"``, built on first use."""
        if name not in self._solvers:
            if name.startswith("sqpmethod"):
                # A QP is solved by one full step; a line search would only reject a zero
                # step on round-off (when the warm start is already optimal but its
                # multipliers are not) and stop without convergence.
                full_steps = {"max_iter_ls": 0} if self._is_qp else {}
                self._solvers[name] = sqp_solver("nmpc_sqp", self._nlp, self._hess,
                                                 name.split(":", 1)[1], self.config.max_iter,
                                                 dual_tolerance=self.config.dual_tolerance,
                                                 **full_steps)
            else:
                self._solvers[name] = ipopt_solver("nmpc_ipopt", self._nlp)
        return self._solvers[name]

    def _symbols(self) -> tuple[ca.SX, ca.SX, ca.SX, ca.SX]:
        """Symbols ``(t, x, u, theta)`` of the model, to read its structure."""
        m = self.model
        return (ca.SX.sym("t"), ca.SX.sym("x", m.n_states), ca.SX.sym("u", m.n_inputs),
                ca.SX.sym("th", len(m.params)))

    def _watched_states(self) -> list[int]:
        """Indices of the states the tracked, window and exposure outputs depend on."""
        m = self.model
        t, x, u, th = self._symbols()
        h = m.h(t, x, u, th)
        y = ca.vertcat(h[self._k_out], h[self._k_win], h[self._k_exp])
        return [i for i in range(m.n_states) if ca.depends_on(y, x[i])]

    def _reachability(self, watched: list[int]) -> np.ndarray:
        """``reach[i, j]``: input *j* can move watched state *i* (structurally, through the
        model's A and B); the other gains are zero for every parameter value."""
        t, x, u, th = self._symbols()
        f = self.model.f(t, x, u, th)
        a = np.array(ca.DM(ca.jacobian(f, x).sparsity(), 1)) != 0
        reach = np.array(ca.DM(ca.jacobian(f, u).sparsity(), 1)) != 0
        while True:  # closure: a state moves when anything feeding it moves
            grown = reach | ((a.astype(int) @ reach.astype(int)) > 0)
            if (grown == reach).all():
                return reach[watched]
            reach = grown

    def _build_rollout(self, watched: list[int], n_blocks: int) -> ca.Function:
        """``(x0, theta, t0, rates) -> (z, dz/drates)``: the watched states at the end of
        each period under per-block rates of the inputs the decisions drive (``rates``:
        block after block; the other inputs are 0 in a plan), by the RK4 steps multiple
        shooting would take, and their Jacobian - the affine response the linearised
        transcription plans on. Also keeps where each lifted gain sits in that Jacobian."""
        c, m = self.config, self.model
        driven = [j for j in range(m.n_inputs) if self._b_eff[j].any()]
        x0, th = ca.SX.sym("x0", m.n_states), ca.SX.sym("th", len(m.params))
        t0 = ca.SX.sym("t0")
        rates = ca.SX.sym("rates", len(driven) * n_blocks)
        x, z = x0, []
        for k in range(c.horizon):
            b = k // c.move_block
            u = [ca.SX(0)] * m.n_inputs
            for position, j in enumerate(driven):
                u[j] = rates[b * len(driven) + position]
            x = _rk4(m, th, t0 + k * c.period_s, x, ca.vertcat(*u), c.period_s / c.rk4_steps,
                     c.rk4_steps)
            z.append(x[watched])
        z = ca.vertcat(*z)
        # a gain of an input no decision drives multiplies a rate that is always 0
        _, entries = self._lift_layout
        kept = [q for q, (_, _, _, j) in enumerate(entries) if j in driven]
        self._rollout_driven = driven
        self._rollout_gains = (np.array(kept, dtype=int),
                               np.array([entries[q][0] * len(watched) + entries[q][2]
                                         for q in kept], dtype=int),
                               np.array([entries[q][1] * len(driven)
                                         + driven.index(entries[q][3]) for q in kept],
                                        dtype=int))
        return ca.Function("rollout", [x0, th, t0, rates], [z, ca.jacobian(z, rates)],
                           {"cse": True})

    def _rates_along(self, prev: np.ndarray, N: int) -> np.ndarray:
        """The free rates per block to linearise along: the previous plan shifted by one
        period (as the warm start), else the rates in force (a cold start)."""
        if self._warm is not None:
            blocks = self._warm["x"][self._slices["U"]].reshape(self._n_blocks, self._nf)
            return self._shift @ blocks
        return np.tile(np.where(prev > 0, prev, self._cold_rates), (self._n_blocks, 1))

    def _linearisation(self, t_s: float, x0: np.ndarray, theta: np.ndarray,
                       blocks: np.ndarray) -> list[np.ndarray]:
        """The lifted problem's numbers (free response, gains) of the dynamics linearised
        along the free rates *blocks* (n_blocks x free inputs): ``z ~ z(r) + G (r' - r)``,
        so the free response is ``z(r) - G r`` and the gains are G's lifted entries."""
        rates = (np.clip(blocks, 0.0, None) @ self._b_eff[self._rollout_driven].T).ravel()
        z, jac = self._rollout(x0, theta, t_s, rates)
        z, jac = z.full().ravel(), jac.full()
        kept, rows, columns = self._rollout_gains
        gains = np.zeros(len(self._lift_layout[1]))
        gains[kept] = jac[rows, columns]
        return [z - jac @ rates, gains]

    # ------------------------------------------------------------------ per cycle
    def _discretisation(self, theta: np.ndarray) -> dict:
        """Per-patient numbers of the exact discretisation, cached on the parameters the
        dynamics depend on (the estimators change output-map parameters every cycle)."""
        key = theta[self._dynamics_params].tobytes()
        if self._pk_cache is None or self._pk_cache[0] != key:
            c = self.config
            numbers: dict = {}
            if self._dosing and self._condensed:
                numbers["pieces"] = self._pieces(theta)
                numbers["free"] = self._free_tables(numbers["pieces"])
                numbers["dose"] = self._infusion_tables(numbers["pieces"], self._infusion_s)
                numbers["in_progress"] = {}
            else:
                phi, gam, gc = Propagator(self.model, theta).discrete(c.period_s)
                if self._lift_layout is None:
                    if self._dosing:  # multiple shooting: one set per sub-interval
                        numbers["pieces"] = self._pieces(theta)
                        numbers["ms"] = np.concatenate([
                            np.concatenate([q.ravel(order="F") for q in piece[:3]])
                            for piece in numbers["pieces"]])
                    else:
                        numbers["ms"] = np.concatenate([phi.ravel(order="F"),
                                                        gam.ravel(order="F"), gc])
                    if self._auc_kind == "exact":
                        pieces = numbers.get("pieces") or self._pieces(theta)
                        numbers["int_pieces"] = [
                            np.concatenate([q.ravel(order="F") for q in piece[3:]])
                            for piece in pieces]
                else:
                    numbers["lift"] = self._lifted(phi, gam, gc)
                    if self._auc_kind == "exact":
                        numbers["lift_int"] = self._lifted_integrals(theta, phi, gam, gc)
            self._pk_cache = (key, numbers)
        return self._pk_cache[1]

    def _pieces(self, theta: np.ndarray) -> list[tuple]:
        """:func:`_exact_pieces` of each sub-interval of a period."""
        a, b, cvec = (np.asarray(q, dtype=float) for q in self.model.affine_terms(0.0, theta))
        a = a.reshape(self.model.n_states, self.model.n_states)
        b = b.reshape(self.model.n_states, self.model.n_inputs)
        return [_exact_pieces(a, b, cvec.ravel(), float(dt)) for dt in np.diff(self._offsets)]

    def _lifted(self, phi, gam, gc) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(P, c, gains)``: watched states after period k are ``P[k] x0 + c[k]`` plus
        the gains (in the built problem's order) times each block's rates."""
        watched, entries = self._lift_layout
        N, mb = self.config.horizon, self.config.move_block
        power = np.eye(phi.shape[0])
        constant = np.zeros(phi.shape[0])
        impulse, P, c = [], [], []
        for _ in range(N):  # impulse[j]: effect of a period's rates j periods later
            impulse.append((power @ gam)[watched])
            constant = constant + power @ gc
            power = phi @ power
            P.append(power[watched])
            c.append(constant[watched])
        return np.array(P), np.array(c), _block_gains(np.array(impulse), entries, mb)

    def _lifted_integrals(self, theta, phi, gam, gc) -> tuple[np.ndarray, np.ndarray,
                                                              np.ndarray]:
        """Like :meth:`_lifted` for the integral of the watched states over each period:
        ``int_k = Phi_i x_k + Gamma_i u_k + gc_i`` with ``x_k`` the state at its start."""
        watched, entries = self._lift_layout
        N, mb = self.config.horizon, self.config.move_block
        *_, phi_i, gam_i, gc_i = self._pieces(theta)[0]
        power = np.eye(phi.shape[0])
        constant = np.zeros(phi.shape[0])
        impulse, P, c = [gam_i[watched]], [], []
        for k in range(N):
            P.append((phi_i @ power)[watched])
            c.append((phi_i @ constant + gc_i)[watched])
            if k < N - 1:
                impulse.append((phi_i @ power @ gam)[watched])
            constant = phi @ constant + gc
            power = phi @ power
        return np.array(P), np.array(c), _block_gains(np.array(impulse), entries, mb)

    def _free_tables(self, pieces) -> tuple[np.ndarray, ...]:
        """``(P, c, P_i, c_i)``: the watched states at each sample point are ``P[q] x0 +
        c[q]`` and their integral over period k ``P_i[k] x0 + c_i[k]`` with no dose."""
        n, N, w = self.model.n_states, self.config.horizon, self._watched
        S = len(pieces)
        Z, z = np.eye(n), np.zeros(n)
        P, c = np.empty((N * S, len(w), n)), np.empty((N * S, len(w)))
        Pi, ci = np.zeros((N, len(w), n)), np.zeros((N, len(w)))
        for k in range(N):
            for s, (phi, _, gc, phi_i, _, gc_i) in enumerate(pieces):
                Pi[k] += (phi_i @ Z)[w]
                ci[k] += (phi_i @ z + gc_i)[w]
                Z, z = phi @ Z, phi @ z + gc
                P[k * S + s], c[k * S + s] = Z[w], z[w]
        return P, c, Pi, ci

    def _infusion_tables(self, pieces, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Watched states at each sample point and their period integrals after an infusion
        at unit rate of each free decision, starting at a period boundary from zero and
        lasting *duration_s*: ``(Z[q, watched, free], Zi[k, watched, free])``."""
        n, N, w = self.model.n_states, self.config.horizon, self._watched
        S = len(pieces)
        nf = len(self._free)
        z = np.zeros((n, nf))
        Z, Zi = np.empty((N * S, len(w), nf)), np.zeros((N, len(w), nf))
        for k in range(N):
            for s, (phi, gam, _, phi_i, gam_i, _) in enumerate(pieces):
                on = k * self.config.period_s + self._offsets[s] < duration_s - 1e-9
                u = self._b_eff * (1.0 if on else 0.0)
                Zi[k] += (phi_i @ z + gam_i @ u)[w]
                z = phi @ z + gam @ u
                Z[k * S + s] = z[w]
        return Z, Zi

    def _clock0(self, theta: np.ndarray, c: NMPCConfig) -> float:
        """Clock time of day [h] at model time t = 0 (see NMPCConfig.clock_time_at_t0_h)."""
        if self._clock_index is not None:
            return float(theta[self._clock_index])
        return c.clock_time_at_t0_h or 0.0

    def _schedule(self, t_s: float, theta: np.ndarray, c: NMPCConfig) -> _Schedule:
        """Where the scheduled doses fall from *t_s*; they must start on the control grid."""
        T, N, interval = c.period_s, c.horizon, c.dose_interval_s
        K = int(round(interval / T))
        offset = (0.0 if c.dose_clock_h is None
                  else ((c.dose_clock_h - self._clock0(theta, c)) * 3600.0) % interval)
        first = offset + math.ceil((t_s - offset) / interval - 1e-9) * interval
        phase = (first - t_s) / T
        if abs(phase - round(phase)) > 1e-6:
            raise ConfigError(f"nmpc: a plan at t_s = {t_s} s cannot give the doses scheduled "
                              f"every {interval} s from {offset} s of model time: they do not "
                              f"start on its control grid (period {T} s)")
        starts = round(phase) + K * np.arange(self._n_doses)
        elapsed = (t_s - (first - interval)) / T
        remaining = max(0.0, self._infusion_s - round(elapsed) * T)
        return _Schedule(starts, starts < N, first, round(phase) - K, remaining,
                         int(round(elapsed)))

    def between_doses(self, t_s: float, theta: np.ndarray) -> bool:
        """True when doses are scheduled, none starts at *t_s* and none is still running:
        every input's rate now is 0 whatever a plan would say (the decisions are the doses'
        amounts), so the controller need not solve."""
        c = self.config
        if c.dose_interval_s is None:
            return False
        schedule = self._schedule(t_s, theta, c)
        return schedule.first_t_s > t_s + 1e-6 and schedule.remaining_s <= 0.0

    def plan(self, t_s: float, x0: np.ndarray, theta: np.ndarray, u_prev: Mapping[str, float],
             *, reference: float | Sequence[float] | None = None, disturbance: float = 0.0,
             delivered_in_window: Mapping[str, float] | None = None,
             auc_accrued: float = 0.0, doses_given: Mapping[str, int] | None = None,
             weights: Mapping[str, object] | None = None,
             limits: Mapping[str, object] | None = None) -> DosePlan:
        """Plan from *t_s* [s, model time] given the state estimate *x0*, parameter vector
        *theta* (the controller's current model of the patient), the rates in force
        (*u_prev*; with scheduled doses an infusion under way goes on at this rate to its
        end), and optionally:

        reference
            Number or one value per period (the tracked output's unit).
        disturbance
            The output disturbance (tracked output's unit).
        delivered_in_window
            Input -> amount delivered in the last ``window_s`` of each dose window.
        auc_accrued
            AUC of the exposure output already accrued in the AUC window that contains
            *t_s*, from its start to *t_s* [output unit x h] (0 at the window's start).
        doses_given
            Input -> number of doses given so far in the course; an input with 0 may get a
            loading dose (``loading_dose_max``) as its next dose.
        weights, limits
            New values of the config's per-call fields, without rebuilding (a mapping field
            is merged key by key). *weights*: ``output_weight``, ``change_weights``,
            ``use_weights``, ``soft_weights``, ``auc_weight``, ``auc_soft_weights``,
            ``time_above_weights``. *limits*: ``rate_bounds``, ``max_change``,
            ``soft_window``, ``hard_window``, ``terminal_window``, ``dose_windows``,
            ``max_dose``, ``loading_dose_max``, ``dose_step``, ``dose_clock_h``,
            ``clock_time_at_t0_h``, ``auc_window_start_s``, ``auc_target``,
            ``auc_soft_window``, ``auc_hard_window``, ``trough_soft_window``,
            ``trough_hard_window``, ``peak_soft_window``, ``peak_hard_window``,
            ``time_above_threshold``, ``time_above_width``, ``time_above_target``,
            ``time_above_min``. A window side, limit or term that was absent (infinite,
            None) when the problem was built cannot be set per call.

        Raises
        ------
        ConfigError
            For an unknown weight or limit, one that changes the problem's structure, or a
            plan time off the grid of the scheduled doses or AUC windows.
        """
        c = self.config
        N = c.horizon
        ref = np.full(N, c.reference if reference is None else 0.0)
        if reference is not None:
            ref[:] = np.asarray(reference, dtype=float) if np.ndim(reference) else reference
        numbers = self._static if not weights and not limits else None
        if numbers is None:
            eff = self._effective(dict(weights or {}), dict(limits or {}))
            numbers = (eff, *self._numbers(eff))
            if not weights and not limits:  # the config's own numbers: the same every cycle
                self._static = numbers
        eff = numbers[0]
        weight_part, lbx, ubx, lbg, ubg, self._cold_rates = (a.copy() for a in numbers[1:7])
        extras = numbers[7]
        theta = np.asarray(theta, float)
        x0 = np.asarray(x0, float)
        prev = np.array([u_prev.get(name, 0.0) for name in self._free], dtype=float)
        parts = [x0, prev, ref, theta, [disturbance], [t_s], weight_part]
        lifted_at = None  # where the linearised parameters go in parts
        if self._exact:
            discrete = self._discretisation(theta)
            if "lift" in discrete:
                P, const, gains = discrete["lift"]
                parts += [(P @ x0 + const).ravel(), gains]
            elif "ms" in discrete:
                parts.append(discrete["ms"])
        else:
            discrete = {}
            if self._linearised:
                lifted_at = len(parts)
                parts += self._linearisation(t_s, x0, theta, self._rates_along(prev, N))
        schedule = self._schedule(t_s, theta, eff) if self._dosing else None
        layout: dict = {}  # where troughs, peaks and AUC windows fall in this plan
        if self._extra:
            values = dict(extras)
            values.update(self._per_call(t_s, x0, prev, eff, discrete, schedule, auc_accrued,
                                         lbx, ubx, lbg, ubg, doses_given, layout))
            parts += [values[name] for name, _ in self._extra]
        p = np.concatenate([np.ravel(q) for q in parts])
        if self._dw_layout:
            self._dose_window_bounds(ubg, eff, delivered_in_window, schedule, prev)
        w0 = self._initial_guess(x0, prev, N, schedule, lbx, ubx)
        raw = self._solve(p, w0, lbx, ubx, lbg, ubg, eff)
        for _ in range(eff.linearisation_passes - 1 if lifted_at is not None else 0):
            if not raw["ok"]:
                break
            # linearise again along the plan just found, and solve from it
            blocks = raw["w"][self._slices["U"]].reshape(self._n_blocks, self._nf)
            parts[lifted_at:lifted_at + 2] = self._linearisation(t_s, x0, theta, blocks)
            p = np.concatenate([np.ravel(q) for q in parts])
            raw_next = self._solve(p, raw["w"], lbx, ubx, lbg, ubg, eff)
            raw_next["seconds"] += raw["seconds"]
            raw_next["iterations"] += raw["iterations"]
            raw = raw_next
        rounding = None
        if raw["ok"] and self._dosing and eff.dose_step and schedule.starts[0] == 0:
            raw, rounding = self._round_first_dose(raw, p, lbx, ubx, lbg, ubg, eff)
        self._warm = ({"x": raw["w"], "first": schedule.first_t_s if schedule else t_s,
                       "duals": raw["duals"]} if raw["ok"] else None)
        return self._result(t_s, raw, p, schedule, prev, layout, rounding)

    def _solve(self, p, w0, lbx, ubx, lbg, ubg, c: NMPCConfig) -> dict:
        """Solve from the warm (or cold) start *w0*."""
        first = None
        if self._warm is None and c.time_above_threshold is not None:
            # The logistic indicator is flat far from its threshold (no drug: no gradient),
            # so a cold start first solves with it ten times wider and goes on from there.
            wide = p.copy()
            wide[self._extra_at("time_above") + 1] *= 10.0
            first = self._run_solvers(wide, w0, lbx, ubx, lbg, ubg)
            if first["ok"]:
                w0 = first["w"]
        # Nonlinear exposure problems also start from the previous multipliers: when the
        # shifted plan is still optimal the QP step is zero, and from zero multipliers the
        # line search rejects it on round-off and sqpmethod stops without convergence. The
        # decisions' bound multipliers are dropped (the decisions moved). QPs take full
        # steps instead (see _solver); the older problems keep their tuned iterates.
        duals = None
        if self._warm is not None and self._extra and not self._is_qp:
            lam_x, lam_g = self._warm["duals"]
            lam_x = lam_x.copy()
            lam_x[self._slices["U"]] = 0.0
            duals = (lam_x, lam_g)
        raw = self._run_solvers(p, w0, lbx, ubx, lbg, ubg, duals)
        if first is not None:
            raw["seconds"] += first["seconds"]
            raw["iterations"] += max(0, first["iterations"])
        return raw

    def _extra_at(self, name: str) -> int:
        """Position of the per-call parameter *name* in the parameter vector."""
        start = sum(self._p_sizes) - sum(size for _, size in self._extra)
        for other, size in self._extra:
            if other == name:
                return start
            start += size
        raise KeyError(name)

    def _effective(self, weights: dict, limits: dict) -> NMPCConfig:
        """The config with per-call *weights* and *limits* (mappings merged key by key),
        validated like any config; its structure must be the built problem's."""
        c = self.config
        changes = {}
        for kind, given, allowed in (("weights", weights, _WEIGHT_FIELDS),
                                     ("limits", limits, _LIMIT_FIELDS)):
            for key, value in given.items():
                if key not in allowed:
                    raise ConfigError(f"{kind}: unknown key {key!r}{closest(key, allowed)}; "
                                      f"expected one of {', '.join(allowed)}")
                current = getattr(c, key)
                if isinstance(current, Mapping) and isinstance(value, Mapping):
                    value = {**current, **value}
                elif isinstance(current, tuple) and isinstance(value, list):
                    value = tuple(value)
                changes[key] = value
        effective = replace(c, **changes)
        if problem_structure(effective) != problem_structure(c):
            for key, value in changes.items():
                if problem_structure(replace(c, **{key: value})) != problem_structure(c):
                    kind = "weights" if key in weights else "limits"
                    raise ConfigError(f"{kind}.{key} = {value!r}: a limit or window side that "
                                      f"was not finite when the problem was built (or a term "
                                      f"absent then) cannot be set per call; give a finite "
                                      f"default in the config to make it a parameter")
            raise ConfigError(f"weights/limits {sorted(changes)}: together they change the "
                              f"problem's structure")
        return effective

    def _numbers(self, c: NMPCConfig) -> tuple:
        """The weights' part of the parameter vector, the bounds (lbx, ubx, lbg, ubg), the
        cold-start rates and the per-call numbers of the exposure terms for config *c* (the
        dose windows' amounts, dosing times and window positions are set per call)."""
        weight_part = np.concatenate([
            [c.output_weight],
            [c.change_weights.get(i, 0.0) for i in self._free],
            [c.use_weights.get(i, 0.0) for i in self._free],
            list(c.soft_weights),
            list(c.soft_weights if c.soft_low_weights is None else c.soft_low_weights),
            [_finite_or(c.soft_window[0], -1e6), _finite_or(c.soft_window[1], 1e6)]])
        bounds = c.rate_bounds
        lbx = np.full(self._nw, -np.inf)
        ubx = np.full(self._nw, np.inf)
        lo = np.array([bounds.get(i, (0.0, np.inf))[0] for i in self._free])
        hi = np.array([bounds.get(i, (0.0, np.inf))[1] for i in self._free])
        if c.ratio is not None:  # the dependent input's bounds limit the decided one
            a, b, r = c.ratio
            if r > 0 and b in bounds:
                j = self._free.index(a)
                hi[j] = min(hi[j], bounds[b][1] / r)
                lo[j] = max(lo[j], bounds[b][0] / r)
        su = self._slices["U"]
        lbx[su], ubx[su] = np.tile(lo, self._n_blocks), np.tile(hi, self._n_blocks)
        for name in ("SL", "SH", "ASL", "ASH", "TSL", "TSH", "PSL", "PSH", "TAS"):
            lbx[self._slices[name]] = 0.0
        lbg = np.zeros(self._ng)
        ubg = np.zeros(self._ng)
        rows = self._rows
        lbg[rows["soft"]], ubg[rows["soft"]] = 0.0, np.inf
        lbg[rows["hard"]], ubg[rows["hard"]] = c.hard_window
        lbg[rows["terminal"]], ubg[rows["terminal"]] = c.terminal_window
        if rows["change"].size:
            dmax = np.array([c.max_change.get(i, np.inf) for i in self._free])
            limit = np.tile(dmax, rows["change"].size // self._nf)
            lbg[rows["change"]], ubg[rows["change"]] = -limit, limit
        lbg[rows["dose_window"]] = -np.inf
        for kind in ("auc_soft_low", "auc_soft_high", "trough_soft_low", "trough_soft_high",
                     "peak_soft_low", "peak_soft_high", "above_soft"):
            lbg[rows[kind]], ubg[rows[kind]] = 0.0, np.inf
        for kind, window in (("auc_hard", c.auc_hard_window), ("trough_hard",
                                                               c.trough_hard_window),
                             ("peak_hard", c.peak_hard_window),
                             ("above_hard", (c.time_above_min or 0.0, np.inf))):
            lbg[rows[kind]], ubg[rows[kind]] = window
        # a cold start begins at small positive rates (see _initial_guess)
        cold_rates = np.where(np.isfinite(hi), lo + 0.05 * (hi - lo), lo + 1e-3)
        extras = {}
        if self._n_auc:
            extras["auc_numbers"] = [c.auc_weight, c.auc_target or 1.0, *c.auc_soft_weights,
                                     _finite_or(c.auc_soft_window[0], 1.0),
                                     _finite_or(c.auc_soft_window[1], 1.0)]
        extras["trough_window"] = [_finite_or(c.trough_soft_window[0], -1e6),
                                   _finite_or(c.trough_soft_window[1], 1e6)]
        extras["peak_window"] = [_finite_or(c.peak_soft_window[0], -1e6),
                                 _finite_or(c.peak_soft_window[1], 1e6)]
        if c.time_above_threshold is not None:
            extras["time_above"] = [c.time_above_threshold, c.time_above_width,
                                    c.time_above_target, *c.time_above_weights]
        return weight_part, lbx, ubx, lbg, ubg, cold_rates, extras

    def _dose_caps(self, c: NMPCConfig, doses_given: Mapping[str, int] | None
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Largest infusion rate of each free input's next dose and of any later one from
        max_dose and, for the next dose of an input with no dose given yet,
        loading_dose_max instead (amounts over the infusion's duration)."""
        later, first = np.full(self._nf, np.inf), np.full(self._nf, np.inf)
        scale = {name: 1.0 for name in self._free}
        if c.ratio is not None:
            scale[c.ratio[1]] = c.ratio[2]
        for name in c.inputs:
            # a cap on the ratio's second input caps the first through the ratio
            owner = c.ratio[0] if c.ratio is not None and name == c.ratio[1] else name
            j = self._free.index(owner)
            factor = scale.get(name, 1.0) * self._infusion_s
            if factor <= 0:
                continue
            loading = doses_given is not None and doses_given.get(name, 1) == 0
            if name in c.max_dose:
                later[j] = min(later[j], c.max_dose[name] / factor)
                if not (loading and name in c.loading_dose_max):
                    first[j] = min(first[j], c.max_dose[name] / factor)
            if loading and name in c.loading_dose_max:
                first[j] = min(first[j], c.loading_dose_max[name] / factor)
        return first, later

    def _per_call(self, t_s, x0, prev, c, discrete, schedule, auc_accrued, lbx, ubx, lbg, ubg,
                  doses_given, layout) -> dict:
        """The per-call parameters of the dosing and exposure terms, and their bounds;
        *layout* receives where the troughs, peaks and AUC windows fall."""
        cfg = self.config
        N, T = cfg.horizon, cfg.period_s
        S = self._offsets.size - 1
        J, nf = self._n_doses, self._nf
        out: dict[str, np.ndarray] = {}
        starts_fine = self._offsets[:-1][None, :] + T * np.arange(N)[:, None]
        starts_fine = starts_fine.ravel()   # start of each sub-interval, from t_s [s]
        ends_fine = (self._offsets[1:][None, :] + T * np.arange(N)[:, None]).ravel()
        if schedule is not None:
            starts, active = schedule.starts, schedule.active
            su = self._slices["U"]
            first_cap, later_cap = self._dose_caps(c, doses_given)
            U_lo = lbx[su].reshape(J, nf).copy()
            base = ubx[su].reshape(J, nf).copy()
            U_hi = np.minimum(base, later_cap)
            U_hi[0] = np.minimum(base[0], first_cap)
            U_lo[~active], U_hi[~active] = 0.0, 0.0
            lbx[su], ubx[su] = np.minimum(U_lo, U_hi).ravel(), U_hi.ravel()
            out["dose_active"] = active.astype(float)
            D = self._infusion_s
            in_progress = schedule.remaining_s > 1e-9 and np.any(prev > 0)
            if self._condensed:
                P, cst, Pi, ci = discrete["free"]
                Z, Zi = discrete["dose"]
                F = P @ x0 + cst
                FI = Pi @ x0 + ci
                if in_progress:
                    cache = discrete["in_progress"]
                    if schedule.elapsed_periods not in cache:
                        cache[schedule.elapsed_periods] = self._infusion_tables(
                            discrete["pieces"], schedule.remaining_s)
                    Q, Qi = cache[schedule.elapsed_periods]
                    F = F + Q @ prev
                    FI = FI + Qi @ prev
                idx = np.arange(N * S)[:, None] - (starts * S)[None, :]
                valid = (idx >= 0) & active[None, :]
                G = Z[np.clip(idx, 0, None)] * valid[:, :, None, None]   # (q, j, w, free)
                out["dose_free"] = F.ravel()
                out["dose_gain"] = G.transpose(0, 2, 1, 3).ravel()
                if self._auc_kind == "exact":
                    idx = np.arange(N)[:, None] - starts[None, :]
                    valid = (idx >= 0) & active[None, :]
                    GI = Zi[np.clip(idx, 0, None)] * valid[:, :, None, None]
                    out["dose_free_int"] = FI.ravel()
                    out["dose_gain_int"] = GI.transpose(0, 2, 1, 3).ravel()
            else:
                since = starts_fine[:, None] - T * starts[None, :]
                on = (since > -1e-9) & (since < D - 1e-9) & active[None, :]
                out["dose_coef"] = on.astype(float).ravel()
                out["dose_known"] = ((starts_fine < schedule.remaining_s - 1e-9)
                                     & in_progress).astype(float)
                for s, piece in enumerate(discrete.get("int_pieces", ())):
                    out[f"int_piece{s}"] = piece
            # troughs: just before each dose starting in (t_s, t_s + horizon]; constrained
            # only when a planned dose comes before it. Peaks: the dose before the first
            # (reported only) and each planned one.
            all_starts = schedule.starts[0] + (cfg.dose_interval_s / T) * np.arange(J + 1)
            trough_at = [int(round(s_)) for s_ in all_starts if 1 <= s_ <= N][:J]
            layout["trough"] = [(s_ * S - 1, s_ > schedule.starts[0]) for s_ in trough_at]
            peaks = [(schedule.previous_start * T + self._peak_s, False)] + [
                (starts[j] * T + self._peak_s, bool(active[j])) for j in range(J)]
            layout["peak"] = []
            for time_s, planned in peaks:
                hit = np.flatnonzero(np.abs(ends_fine - time_s) < 1e-6 * T)
                layout["peak"].append((int(hit[0]), planned) if hit.size else None)
            for kind, located, rows_n in (("trough", layout["trough"], J),
                                          ("peak", layout["peak"], J + 1)):
                if f"{kind}_mask" not in dict(self._extra):
                    continue
                mask = np.zeros((rows_n, N * S))
                on_rows = np.zeros(rows_n, dtype=bool)
                for r, item in enumerate(located[:rows_n]):
                    if item is not None:
                        mask[r, item[0]] = 1.0
                        on_rows[r] = item[1]
                out[f"{kind}_mask"] = mask.ravel()
                for suffix in ("soft_low", "soft_high", "hard"):
                    rows = self._rows[f"{kind}_{suffix}"]
                    if rows.size:
                        lbg[rows[~on_rows]], ubg[rows[~on_rows]] = -np.inf, np.inf
            if self._dw_layout:
                coef = np.zeros((len(self._dw_layout), J))
                rows = self._rows["dose_window"]
                for row, (k_w, anchor) in enumerate(self._dw_layout):
                    a, b = self._dose_window_span(k_w, anchor, schedule)
                    if a is None:  # no such window in this plan: an empty row
                        lbg[rows[row]], ubg[rows[row]] = -np.inf, np.inf
                        continue
                    s0 = starts * T
                    overlap = np.clip(np.minimum(b, s0 + D) - np.maximum(a, s0), 0.0, None)
                    coef[row] = overlap * active
                out["dose_window_coef"] = coef.ravel()
        if self._n_auc:
            W, start = c.auc_window_s, c.auc_window_start_s
            position = (t_s - start) / T
            if abs(position - round(position)) > 1e-6:
                raise ConfigError(f"nmpc: a plan at t_s = {t_s} s is off the grid of the AUC "
                                  f"windows (from {start} s, period {T} s)")
            first = start + math.floor((t_s - start) / W + 1e-9) * W
            mask = np.zeros((self._n_auc, N))
            active = np.zeros(self._n_auc)
            period_start = t_s + T * np.arange(N)
            layout["auc"] = []
            for i in range(self._n_auc):
                a, b = first + i * W, first + (i + 1) * W
                mask[i] = (period_start >= a - 1e-6 * T) & (period_start + T <= b + 1e-6 * T)
                active[i] = b <= t_s + N * T + 1e-6 * T
                layout["auc"].append((a, b, bool(active[i])))
            out["auc_mask"] = mask.ravel()
            out["auc_base"] = np.r_[auc_accrued, np.zeros(self._n_auc - 1)]
            out["auc_active"] = active
            for kind in ("auc_soft_low", "auc_soft_high", "auc_hard"):
                rows = self._rows[kind]
                if rows.size:
                    off = rows[active == 0]
                    lbg[off], ubg[off] = -np.inf, np.inf
            if "int_free" in dict(self._extra):
                Pi, ci, gains_i = discrete["lift_int"]
                out["int_free"] = (Pi @ x0 + ci).ravel()
                out["int_gain"] = gains_i
            if not self._dosing:
                for s, piece in enumerate(discrete.get("int_pieces", ())):
                    out[f"int_piece{s}"] = piece
        return out

    def _dose_window_span(self, k_w: int, anchor: int | None, schedule) -> tuple:
        """(start, end) [s from t_s] of a dose-window row: the first window_s of the plan,
        or window_s from the start of planned dose *anchor* when that window lies wholly
        in the horizon (and is not the first window itself); (None, None) otherwise."""
        T, N = self.config.period_s, self.config.horizon
        length = max(1, min(N, int(round(self.config.dose_windows[k_w][1] / T)))) * T
        if anchor is None:
            return 0.0, length
        start = schedule.starts[anchor] * T
        if not schedule.active[anchor] or start == 0 or start + length > N * T + 1e-6 * T:
            return None, None
        return start, start + length

    def _dose_window_bounds(self, ubg, c, delivered_in_window, schedule, prev) -> None:
        """Upper bounds of the dose-window rows: the cap, less what was delivered in the
        window before t_s (first window) and what an infusion under way still gives."""
        rows = self._rows["dose_window"]
        for row, (k_w, anchor) in zip(rows, self._dw_layout):
            name, _, max_amount = c.dose_windows[k_w]
            if anchor is not None and not ubg[row] < np.inf:
                continue  # an empty row this call
            used = (delivered_in_window or {}).get(name, 0.0) if anchor is None else 0.0
            if schedule is not None and schedule.remaining_s > 0 and anchor is None:
                a, b = self._dose_window_span(k_w, anchor, schedule)
                rate = float((self._b_eff @ prev)[self.model.input_index(name)])
                used += rate * max(0.0, min(b, schedule.remaining_s) - a)
            ubg[row] = max(0.0, max_amount - used)

    def _initial_guess(self, x0: np.ndarray, prev: np.ndarray, N: int, schedule, lbx,
                       ubx) -> np.ndarray:
        su = self._slices["U"]
        if self._warm is not None:
            w = self._warm["x"].copy()
            if "X" in self._slices:
                X = w[self._slices["X"]].reshape(N + 1, self._n)
                X = np.vstack([X[1:], X[-1:]])  # shift by one period
                X[0] = x0
                w[self._slices["X"]] = X.ravel()
            blocks = w[su].reshape(self._n_blocks, self._nf)
            if schedule is None:
                # shift the rates by one period (a block now starts one period later in the
                # old plan): a fixed averaging matrix over the blocks
                w[su] = (self._shift @ blocks).ravel()
            else:
                if schedule.first_t_s > self._warm["first"] + 1e-9:  # a dose went by
                    blocks = np.vstack([blocks[1:], blocks[-1:]])
                w[su] = np.clip(blocks.ravel(), lbx[su], ubx[su])
            return w
        # Cold start away from zero drug: with no drug on board every Hill-type output has a
        # zero gradient in the rates (it is flat at C = 0), so "no drug" is a stationary
        # point of the problem; start from small positive rates instead (5 % of the range:
        # large rates drive a stiff output deep past its window, and the first step then
        # jumps back to no drug).
        w = np.zeros(self._nw)
        if "X" in self._slices:
            w[self._slices["X"]] = np.tile(np.asarray(x0, float), N + 1)
        guess = np.where(prev > 0, prev, self._cold_rates)
        w[su] = np.tile(guess, self._n_blocks)
        if schedule is not None:
            w[su] = np.clip(w[su], lbx[su], ubx[su])
        return w

    def _run_solvers(self, p, w0, lbx, ubx, lbg, ubg, duals=None, ipopt=True) -> dict:
        """Solve with each solver of the chain until one succeeds within its bounds;
        *duals*: the multipliers (lam_x, lam_g) to start from; *ipopt* False: not IPOPT."""
        c = self.config
        start_duals = {} if duals is None else {"lam_x0": duals[0], "lam_g0": duals[1]}
        order = ([f"sqpmethod:{qp}" for qp in c.qp_solvers] if c.solver == "sqpmethod"
                 else []) + (["ipopt"] if ipopt or c.solver != "sqpmethod" else [])
        reasons = []
        start = time.perf_counter()
        for name in order:
            solver = self._solver(name)
            # qpOASES prints some failures even when told to print nothing
            with quiet_native_stdout():
                out = solver(x0=w0, p=p, lbx=lbx, ubx=ubx, lbg=lbg, ubg=ubg,
                             **(start_duals if name.startswith("sqp") else {}))
            stats = solver.stats()
            w = np.asarray(out["x"], dtype=float).ravel()
            status = str(stats.get("return_status", "unknown"))
            ok = bool(stats.get("success", False))
            problem = self._check(w, lbx, ubx)
            if ok and problem is None:
                return {"ok": True, "status": status, "iterations":
                        int(stats.get("iter_count", -1)), "seconds": time.perf_counter() - start,
                        "solver": name, "w": w, "f": float(out["f"]),
                        # only the exposure problems restart from them (see plan)
                        "duals": (np.asarray(out["lam_x"]).ravel(),
                                  np.asarray(out["lam_g"]).ravel()) if self._extra else None,
                        "reason": "; ".join(reasons + [f"{name}: {status}"])}
            reasons.append(f"{name}: {status}" + (f" ({problem})" if problem else ""))
        return {"ok": False, "status": reasons[-1], "iterations": int(stats.get("iter_count", -1)),
                "seconds": time.perf_counter() - start, "solver": order[-1], "w": w,
                "f": math.nan, "reason": "; ".join(reasons)}

    def _round_first_dose(self, raw, p, lbx, ubx, lbg, ubg, c) -> tuple[dict, DoseRounding]:
        """Round the first dose (the only one applied) to its step: fix it to the step
        below and above the relaxed optimum (each free input; every combination), re-solve
        the rest from the relaxed solution, and keep the candidate with the lowest
        objective. Doses further out stay relaxed: they are rounded when they come first."""
        su = self._slices["U"]
        D = self._infusion_s
        relaxed = raw["w"][su][:self._nf] * D          # amounts
        options = []
        for j, name in enumerate(self._free):
            step = c.dose_step.get(name)
            value = relaxed[j]
            lo, hi = lbx[su.start + j] * D, ubx[su.start + j] * D
            if step is None:
                options.append([value])
                continue
            below, above = step * math.floor(value / step + 1e-9), step * math.ceil(value / step
                                                                                   - 1e-9)
            options.append([v for v in dict.fromkeys((below, above))
                            if lo - 1e-9 <= v <= hi + 1e-9])
        candidates, best, spent = [], None, 0.0
        for combo in itertools.product(*options):
            lbx_c, ubx_c = lbx.copy(), ubx.copy()
            w0 = raw["w"].copy()
            for j, v in enumerate(combo):
                lbx_c[su.start + j] = ubx_c[su.start + j] = w0[su.start + j] = v / D
            # a QP the QP solvers find infeasible is infeasible: IPOPT would only take longer
            out = self._run_solvers(p, w0, lbx_c, ubx_c, lbg, ubg, raw["duals"],
                                    ipopt=not self._is_qp)
            spent += out["seconds"]
            candidates.append((dict(zip(self._free, map(float, combo))), out["f"], out["ok"]))
            if out["ok"] and (best is None or out["f"] < best["f"]):
                best = out
        relaxed_d = dict(zip(self._free, map(float, relaxed)))
        if best is None:
            failed = {**raw, "ok": False, "f": math.nan, "status": "no dose on the step grid "
                      "is feasible", "reason": f"{raw['reason']}; rounding to "
                      f"{dict(c.dose_step)}: no candidate feasible"}
            failed["seconds"] = raw["seconds"] + spent
            return failed, DoseRounding(dict(c.dose_step), relaxed_d, tuple(candidates),
                                        {}, spent)
        best = {**best, "seconds": raw["seconds"] + spent,
                "iterations": raw["iterations"] + best["iterations"]}
        chosen = dict(zip(self._free, map(float, best["w"][su][:self._nf] * D)))
        return best, DoseRounding(dict(c.dose_step), relaxed_d, tuple(candidates), chosen,
                                  spent)

    def _check(self, w: np.ndarray, lbx: np.ndarray, ubx: np.ndarray) -> str | None:
        """Why the solution may not be used (non-finite, or rates outside their bounds)."""
        if not np.all(np.isfinite(w)):
            return "non-finite solution"
        k = self._slices["U"]
        tol = 1e-6 * np.maximum(1.0, np.minimum(np.abs(ubx[k]), 1e6))
        u = w[k]
        if (u < lbx[k] - tol).any() or (u > ubx[k] + tol).any():
            return "rates outside their bounds"
        return None

    def _result(self, t_s, raw, p, schedule, prev, layout, rounding) -> DosePlan:
        cfg, m = self.config, self.model
        w = raw["w"]
        U = w[self._slices["U"]].reshape(self._n_blocks, self._nf)
        U = np.clip(U, 0.0, None)
        N, T = cfg.horizon, cfg.period_s
        doses = ()
        if schedule is None:
            per_stage = U[np.arange(N) // cfg.move_block]     # (horizon, free inputs)
        else:
            # the rate in force at the start of each period: the planned doses' infusions
            # and the one under way
            D = self._infusion_s
            since = T * (np.arange(N)[:, None] - schedule.starts[None, :])
            on = (since >= 0) & (since < D - 1e-9) & schedule.active[None, :]
            per_stage = on @ U
            if schedule.remaining_s > 0:
                per_stage[T * np.arange(N) < schedule.remaining_s - 1e-9] += prev
            doses = tuple(PlannedDose(name, t_s + T * float(schedule.starts[j]),
                                      float(self._b_eff[m.input_index(name)] @ U[j]) * D, D)
                          for j in range(self._n_doses) if schedule.active[j]
                          for name in cfg.inputs)
        plan = per_stage @ self._b_eff.T
        rates = {name: float(plan[0, m.input_index(name)]) for name in cfg.inputs}
        y_pred = self._y_pred
        report = functools.partial(self._report, w, p, t_s, schedule, layout)
        return DosePlan(t_s, raw["ok"], raw["status"], raw["iterations"], raw["seconds"],
                        raw["solver"], rates, plan, raw["f"], raw["reason"],
                        lambda: np.asarray(y_pred(w, p), dtype=float).ravel(),
                        doses, rounding, report)

    def _report(self, w, p, t_s, schedule, layout) -> Exposure:
        """The plan's predicted exposure (see :class:`Exposure`), as the problem sees it."""
        cfg = self.config
        N, T = cfg.horizon, cfg.period_s
        y_fine, aucs, fraction = (np.asarray(v, dtype=float).ravel()
                                  for v in self._exposure_fn(w, p))
        auc = tuple((float(a), float(b), float(value))
                    for (a, b, active), value in zip(layout.get("auc", ()), aucs) if active)
        troughs = peaks = ()
        if schedule is not None:
            ends = (self._offsets[1:][None, :] + T * np.arange(N)[:, None]).ravel()
            troughs = tuple((t_s + float(ends[q]), float(y_fine[q])) for q, _ in layout["trough"])
            peaks = tuple((t_s + float(ends[item[0]]), float(y_fine[item[0]]))
                          for item in layout["peak"] if item is not None)
        return Exposure(auc, troughs, peaks, float(fraction[0]) if fraction.size else math.nan)


#: per-call weights and limits: names of NMPCConfig fields that plan() takes in *weights*
#: and *limits*; with the reference they are the numbers of a built problem
_WEIGHT_FIELDS = ("output_weight", "change_weights", "use_weights", "soft_weights",
                  "soft_low_weights",
                  "auc_weight", "auc_soft_weights", "time_above_weights")
_LIMIT_FIELDS = ("rate_bounds", "max_change", "soft_window", "hard_window", "terminal_window",
                 "dose_windows", "max_dose", "loading_dose_max", "dose_step", "dose_clock_h",
                 "clock_time_at_t0_h", "auc_window_start_s", "auc_target", "auc_soft_window",
                 "auc_hard_window", "trough_soft_window", "trough_hard_window",
                 "peak_soft_window", "peak_hard_window", "time_above_threshold",
                 "time_above_width", "time_above_target", "time_above_min")
def _block_gains(impulse: np.ndarray, entries, move_block: int) -> np.ndarray:
    """Each lifted entry (stage k, block b, watched state i, input j): the sum of the impulse
    responses of the periods of block b up to stage k."""
    gains = np.empty(len(entries))
    for q, (k, b, i, j) in enumerate(entries):
        lags = k - np.arange(b * move_block, min((b + 1) * move_block, k + 1))
        gains[q] = impulse[lags, i, j].sum()
    return gains


#: config fields that are numbers of the built problem (per call), not its structure
_PER_CALL_FIELDS = ("reference",) + _WEIGHT_FIELDS + _LIMIT_FIELDS


def problem_structure(config: NMPCConfig) -> tuple:
    """What the built problem depends on: two configs with the same structure share one
    built problem (a tuning sweep over weights and limits never rebuilds it)."""
    fixed = tuple((f.name, repr(getattr(config, f.name))) for f in fields(config)
                  if f.name not in _PER_CALL_FIELDS)

    def finite(values) -> tuple[bool, ...]:
        return tuple(math.isfinite(v) for v in values)

    return fixed + (finite(config.soft_window), finite(config.hard_window),
                    finite(config.terminal_window),
                    any(math.isfinite(v) for v in config.max_change.values()),
                    tuple((name, window) for name, window, _ in config.dose_windows),
                    finite(config.auc_soft_window), finite(config.auc_hard_window),
                    finite(config.trough_soft_window), finite(config.trough_hard_window),
                    finite(config.peak_soft_window), finite(config.peak_hard_window),
                    config.auc_target is not None, config.time_above_threshold is not None,
                    config.time_above_min is not None)


def _finite_or(value: float, fallback: float) -> float:
    return value if math.isfinite(value) else fallback
