"""The PID with insulin feedback of the Medtronic external PID (ePID) line (issue 18's
baseline): a PID emulating the beta cell's response to glucose (Steil GM, Rebrin K,
Darwin C, Hariri F, Saad MF. Feasibility of automating insulin delivery for the treatment
of type 1 diabetes. Diabetes 2006;55(12):3344-50), with the model-predicted plasma insulin
fed back (Steil GM, Palerm CC, Kurtz N, et al. The effect of insulin feedback on closed
loop glucose control. J Clin Endocrinol Metab 2011;96(5):1402-8; in adolescents, Ruiz JL,
Sherr JL, Cengiz E, et al. Effect of insulin feedback on closed-loop glucose control: a
crossover study. J Diabetes Sci Technol 2012;6(5):1123-30, target 120 mg/dL).

Every control period (5 min), with sensor glucose SG [mg/dL], the error ``e = SG - target``
and the period ``dt`` [min]::

    P(n) = KP e(n)
    I(n) = I(n-1) + KP / TI e(n) dt          I(0) = the scheduled basal at the start
    D(n) = KP TD dSG/dt
    PID(n) = P(n) + I(n) + D(n)
    u(n) = (1 + gamma) PID(n) - gamma Ip(n)                                    [U/h]

where ``Ip`` is the insulin model's plasma insulin in delivery units (U/h: equal to the
delivery at steady state), from every rate delivered (meal boluses included) through two
first-order compartments, subcutaneous then plasma::

    Isc(k) = a1 Isc(k-1) + (1 - a1) ID(k),   Ip(k) = a2 Ip(k-1) + (1 - a2) Isc(k),
    a_i = exp(-1 min / tau_i)   (every minute; both start at the basal: steady state)

At steady state ``Ip = u`` so ``u = PID``: the feedback changes the transient only, as if
insulin acted faster (Steil 2011). ``(1 + gamma)`` is the gain increase that keeps the
steady-state response (Steil 2011). The integral is held in [0, max_rate] (anti-windup),
``u`` clipped to [0, max_rate]; dSG/dt is the least-squares slope of the readings of the
last 15 min (a raw two-point difference of CGM noise would drive D: the ePID differentiates
filtered sensor glucose). Announced meals, when a carbohydrate input is named, get the
patient's bolus-calculator bolus (:class:`~mpc_dose.control.insulin.MealBoluses`, the same
as the basal-bolus therapy): the hybrid closed loop most AP systems are; without, the
fully closed loop of the ePID studies ("no premeal manual boluses", Ruiz 2012).

The gains: ``KP = TDD / 135`` [U/h per mg/dL] from the total daily dose (the ePID rule the
issue's brief cites for Ruiz 2012; the constant 135 is :data:`KP_TDD_DIVISOR` and every gain
can be set), ``TI = 450 min`` and ``TD = 90 min`` (Steil 2006), ``gamma = 0.5`` and the
insulin model's time constants 50 and 70 min (Steil 2011). These were read from secondary
descriptions, not checked against the papers' full text here: the constants are each
declared once below so they can be corrected in one place.

This module knows nothing of simpy, sockets or files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..errors import ConfigError
from .base import Decision, Reading
from .insulin import GlucoseHistory, MealBoluses, profile_rate

__all__ = ["PIDIFBController", "proportional_gain", "KP_TDD_DIVISOR", "TI_MIN", "TD_MIN",
           "INSULIN_FEEDBACK_GAMMA", "IFB_TIME_CONSTANTS_MIN", "TARGET_MG_DL"]

#: KP = TDD / this [U/h per mg/dL with TDD in U/day] (ePID gain rule, as cited for Ruiz 2012)
KP_TDD_DIVISOR = 135.0
#: [min] integral time (Steil 2006)
TI_MIN = 450.0
#: [min] derivative time (Steil 2006, daytime)
TD_MIN = 90.0
#: the insulin-feedback fraction gamma (Steil 2011: 0.5)
INSULIN_FEEDBACK_GAMMA = 0.5
#: [min] the insulin model's subcutaneous and plasma time constants (Steil 2011)
IFB_TIME_CONSTANTS_MIN = (50.0, 70.0)
#: [mg/dL] the ePID studies' target (Steil 2006, Ruiz 2012)
TARGET_MG_DL = 120.0
#: [s] dSG/dt is the least-squares slope of the readings this far back
SLOPE_WINDOW_S = 15 * 60.0


def proportional_gain(total_daily_dose_U: float, divisor: float = KP_TDD_DIVISOR) -> float:
    """KP [U/h per mg/dL] from the total daily dose [U/day]: ``TDD / divisor``."""
    if not (math.isfinite(total_daily_dose_U) and total_daily_dose_U > 0):
        raise ConfigError(f"pid_ifb: total daily dose = {total_daily_dose_U!r} U; expected "
                          f"> 0 (KP = TDD / {divisor:g})")
    if not (math.isfinite(divisor) and divisor > 0):
        raise ConfigError(f"pid_ifb: kp_tdd_divisor = {divisor!r}; expected a number > 0")
    return total_daily_dose_U / divisor


class PIDIFBController:
    """The ePID with insulin feedback for one insulin input; the gains in U/h, mg/dL and
    min (*kp_U_per_h_per_mg_dl*, *ti_min*, *td_min*), *gamma* and the insulin model's
    *ifb_time_constants_min*; *basal_profile_U_per_h* ``(clock hour, U/h)`` rows start the
    integral and the insulin model at the basal of t = 0. Rates out in the input's amount
    unit per second (*amount_per_U* of it per U); *max_rate_U_per_h* clips the output and
    the integral; readings of *glucose_var* in any glucose unit."""

    def __init__(self, *, input: str, glucose_var: str, kp_U_per_h_per_mg_dl: float,
                 basal_profile_U_per_h: Sequence[tuple[float, float]],
                 target_mg_dl: float = TARGET_MG_DL, ti_min: float = TI_MIN,
                 td_min: float = TD_MIN, gamma: float = INSULIN_FEEDBACK_GAMMA,
                 ifb_time_constants_min: tuple[float, float] = IFB_TIME_CONSTANTS_MIN,
                 max_rate_U_per_h: float = math.inf, period_s: float = 300.0,
                 clock_at_t0_h: float = 0.0, meals: MealBoluses | None = None,
                 amount_per_U: float = 1.0, name: str = "pid-ifb") -> None:
        for field, value in (("kp_U_per_h_per_mg_dl", kp_U_per_h_per_mg_dl),
                             ("target_mg_dl", target_mg_dl), ("ti_min", ti_min),
                             ("period_s", period_s),
                             ("max_rate_U_per_h", max_rate_U_per_h),
                             ("amount_per_U", amount_per_U)):
            if not (isinstance(value, (int, float)) and value > 0 and not math.isnan(value)):
                raise ConfigError(f"{name}: {field} = {value!r}; expected a number > 0")
        if not (isinstance(td_min, (int, float)) and math.isfinite(td_min) and td_min >= 0):
            raise ConfigError(f"{name}: td_min = {td_min!r}; expected a number >= 0")
        if not (isinstance(gamma, (int, float)) and 0 <= gamma < 10):
            raise ConfigError(f"{name}: gamma = {gamma!r}; expected a number in [0, 10)")
        if len(ifb_time_constants_min) != 2 or \
                any(not (isinstance(v, (int, float)) and v > 0) for v in ifb_time_constants_min):
            raise ConfigError(f"{name}: ifb_time_constants_min = {ifb_time_constants_min!r}; "
                              f"expected two numbers > 0 [min]")
        rows = sorted((float(h), float(r)) for h, r in basal_profile_U_per_h)
        if not rows or rows[0][0] != 0.0 or any(not (math.isfinite(r) and r >= 0)
                                               for _, r in rows):
            raise ConfigError(f"{name}: basal_profile_U_per_h must start at 0 h with rates "
                              f">= 0 U/h, got {basal_profile_U_per_h!r}")
        self.name, self.period_s, self.inputs = name, float(period_s), (input,)
        self.input, self.glucose_var = input, glucose_var
        self.kp, self.ti_min, self.td_min = float(kp_U_per_h_per_mg_dl), float(ti_min), \
            float(td_min)
        self.gamma, self.target = float(gamma), float(target_mg_dl)
        self.max_rate = float(max_rate_U_per_h)
        self.alpha = tuple(math.exp(-1.0 / tau) for tau in ifb_time_constants_min)
        self.meals, self.amount_per_U = meals, float(amount_per_U)
        start = profile_rate(rows, clock_at_t0_h)
        #: [U/h] the integral term, the insulin model's subcutaneous and plasma insulin
        self.integral = min(start, self.max_rate)
        self.insulin_sc = self.insulin_plasma = start
        self._delivering, self._since_s = start, 0.0       # U/h, from when
        self._history = GlucoseHistory(glucose_var, SLOPE_WINDOW_S + 1.0, name)
        self._last_decision_s: float | None = None

    # ------------------------------------------------------------------ in
    def observe(self, reading: Reading) -> None:
        if self.meals is not None and self.meals.observe(reading):
            return
        self._history.add(reading)

    def _advance(self, t_s: float) -> None:
        """Run the insulin model to *t_s* on the rate delivered since the last change."""
        minutes = (t_s - self._since_s) / 60.0
        if minutes <= 0:
            return
        whole = int(minutes)
        a1, a2 = self.alpha
        for step in [1.0] * whole + ([minutes - whole] if minutes - whole > 1e-9 else []):
            b1, b2 = a1 ** step, a2 ** step
            self.insulin_sc = b1 * self.insulin_sc + (1 - b1) * self._delivering
            self.insulin_plasma = b2 * self.insulin_plasma + (1 - b2) * self.insulin_sc
        self._since_s = t_s

    def applied(self, t_s: float, rates: Mapping[str, float]) -> None:
        """What the pump delivers from *t_s* on (meal boluses included): the feedback's."""
        self._advance(t_s)
        self._delivering = rates.get(self.input, 0.0) / self.amount_per_U * 3600.0

    # ------------------------------------------------------------------ decide
    def slope_mg_dl_per_min(self) -> float:
        """Least-squares slope of the readings of the last 15 min [mg/dL/min] (0 with
        fewer than two)."""
        if len(self._history) < 2:
            return 0.0
        ts = [t / 60.0 for t, _ in self._history]
        gs = [g for _, g in self._history]
        mt, mg = sum(ts) / len(ts), sum(gs) / len(gs)
        sxx = sum((t - mt) ** 2 for t in ts)
        return sum((t - mt) * (g - mg) for t, g in zip(ts, gs)) / sxx if sxx > 0 else 0.0

    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        self._advance(t_s)
        latest = readings.get(self.glucose_var)
        glucose = self._history[-1][1] if self._history and latest is not None else None
        bolus_reason = self.meals.give_due(t_s, glucose) if self.meals is not None else None
        bolus_U_per_h = self.meals.rate_at(t_s) * 3600.0 if self.meals is not None else 0.0
        dt_min = self.period_s / 60.0 if self._last_decision_s is None else \
            (t_s - self._last_decision_s) / 60.0
        if glucose is None:
            u = min(max(self.integral, 0.0), self.max_rate)
            rates = {self.input: (u + bolus_U_per_h) * self.amount_per_U / 3600.0}
            return Decision(t_s, rates, "no usable glucose: hold the integral",
                            status="no_measurement", backup=rates)
        self._last_decision_s = t_s
        error = glucose - self.target
        self.integral = min(max(self.integral + self.kp / self.ti_min * error * dt_min, 0.0),
                            self.max_rate)
        proportional = self.kp * error
        derivative = self.kp * self.td_min * self.slope_mg_dl_per_min()
        pid = proportional + self.integral + derivative
        u = (1 + self.gamma) * pid - self.gamma * self.insulin_plasma
        u = min(max(u, 0.0), self.max_rate)
        reason = (f"SG {glucose:.0f} mg/dL: P {proportional:+.2f} I {self.integral:.2f} D "
                  f"{derivative:+.2f} U/h, Ip {self.insulin_plasma:.2f} U/h -> "
                  f"{u:.2f} U/h")
        if bolus_reason:
            reason += f"; {bolus_reason}"
        return Decision(t_s, {self.input: (u + bolus_U_per_h) * self.amount_per_U / 3600.0},
                        reason, details={"error_mg_dl": error, "p": proportional,
                                         "i": self.integral, "d": derivative, "pid": pid,
                                         "insulin_plasma": self.insulin_plasma, "u": u})
