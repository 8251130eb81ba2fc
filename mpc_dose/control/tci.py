"""Open-loop target-controlled infusion (TCI): the standard anaesthesia baseline.

A TCI pump is told a target concentration, not a rate. Every control period it predicts the
patient's concentrations from the rates it has itself commanded (it never looks at a
measurement) and chooses the rate that steers the *predicted* concentration to the target:

* **plasma** targeting (Jacobs 1990): the rate that puts the predicted concentration at the
  target at the end of the period. The concentration responds linearly to a constant rate,
  so this is one division; rates outside ``[0, max_rate]`` are clamped, which gives the
  familiar TCI profile: the pump at its maximum until the target is reached, then an
  exponentially declining rate, and a pause when the target is lowered.
* **effect**-site targeting (Shafer & Gregg 1992): the effect site lags the plasma, so
  driving it to the target at the end of one period would need a plasma overshoot that the
  effect site follows later. Instead, while the effect site is below the target, the pump
  gives, each period, the largest infusion whose effect-site *peak* (over the following
  minutes, with nothing given afterwards) does not exceed the target. Once the effect site
  is at the target, it holds it there; when the target is lowered it pauses until the effect
  site has fallen to the new target.

References
----------
Jacobs JR. Algorithm for optimal linear model-based control with application to
pharmacokinetic model-driven drug delivery. IEEE Trans Biomed Eng 1990;37(1):107-9.
doi:10.1109/10.43622

Shafer SL, Gregg KM. Algorithms to rapidly achieve and maintain stable drug concentrations
at the site of drug effect with a computer-controlled infusion pump. J Pharmacokinet
Biopharm 1992;20(2):147-69. doi:10.1007/BF01070999
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import casadi as ca
import numpy as np

from ..errors import ConfigError, closest
from ..model.propagate import Propagator
from ..model.spec import Model
from ..units import unit_to_token
from .base import Decision, Reading

__all__ = ["TargetControlledInfusion", "MODES"]

#: The targeting algorithms.
MODES = ("plasma", "effect")

#: Resolution of the future-time grid on which effect-site peaks are searched [s]. At 1 s the
#: peak found on the grid lies within ~1e-5 (relative) of the continuous peak for propofol
#: and remifentanil, far below any clinical tolerance.
_PEAK_GRID_S = 1.0

#: A rate response is counted only where it exceeds this fraction of its maximum, so that
#: rounding noise of the matrix exponential near tau = 0 never enters a division.
_NEGLIGIBLE = 1e-12


def _is_number(value: object) -> bool:
    # numbers.Real admits numpy scalars too (a schedule built with numpy is common).
    return isinstance(value, numbers.Real) and not isinstance(value, bool) \
        and math.isfinite(value)


class TargetControlledInfusion:
    """Open-loop plasma or effect-site target-controlled infusion of one drug input.

    The controller carries its own copy of the model state, started at the model's initial
    state (drug-free for PK models) at its first decision, and advances it exactly (zero-order
    hold) under the rates it has decided. Readings are ignored: this is the open-loop TCI of
    commercial pumps, the baseline a closed-loop controller is compared against.

    Parameters
    ----------
    model : Model
        The controller's model: linear and time-invariant (every mammillary PK model with an
        effect site; a circadian model only with all amplitudes 0). The same compiled
        equations as the simulator are used, so with ``params`` equal to the patient's the
        prediction is exact. Other inputs of the model are taken as zero.
    params : mapping
        The controller's parameter values (in each parameter's declared unit), e.g. the
        typical values for the patient's covariates.
    input : str
        The model input (drug) the controller sets; rates in its amount unit per second.
    target_output : str
        The output whose target is given: the plasma concentration in plasma mode, the
        effect-site concentration in effect mode (e.g. ``"propofol_ce"``).
    targets : sequence of (time_s, concentration)
        The target schedule: from ``time_s`` [s] on, the target is ``concentration`` (in the
        output's unit), until the next entry. Times strictly increasing and >= 0;
        concentrations >= 0. Before the first entry the target is 0 (nothing is given).
    mode : {"plasma", "effect"}
        Jacobs plasma targeting or Shafer & Gregg effect-site targeting (see module doc).
    period_s : float
        Time between two decisions [s]; 10 s is the usual TCI update interval (STANPUMP).
    max_rate : float
        Highest rate the pump can deliver [amount/s] (e.g. 1200 mL/h of propofol 10 mg/mL
        = 3.33 mg/s).
    name : str
        Name for records.
    peak_horizon_s : float
        Effect mode: how far ahead the effect-site peak is searched [s]. Must cover the time
        to peak of the effect site after a short infusion (about 1.6 min for propofol and
        remifentanil); 20 min by default.
    at_target_tolerance : float
        Effect mode: the effect site counts as "at target" within this fraction of the
        target (0.5 % by default, as in the R package ``tci``).

    Raises
    ------
    ConfigError
        For a non-linear or time-varying model (naming the model), an unknown input or
        output (naming it), an output that is not a linear function of the states, an
        invalid target schedule, period or maximum rate, or an effect-site response that
        does not peak within ``peak_horizon_s``.
    ModelError
        For unknown, missing or out-of-domain parameter values.

    Notes
    -----
    Effect mode, in detail. Let ``Ce0(tau)`` be the predicted effect-site concentration
    ``tau`` seconds ahead with nothing given, and ``Ce1(tau)`` its response to one period at
    unit rate followed by nothing (computed once). Both are exact (zero-order hold) on a
    1 s grid. Ce is linear in the rate ``r``: ``Ce(tau) = Ce0(tau) + r Ce1(tau)``, so the
    largest ``r`` whose planned trajectory never exceeds the target ``c`` is
    ``min over tau of (c - Ce0(tau)) / Ce1(tau)`` (no search needed). This *peak-limited*
    rate is used while loading. Since the plan of one decision is exactly the free response
    of the next, the predicted effect site never exceeds the target (to within the grid).

    Holding the effect site by putting ``Ce`` at the target at the end of each period (the
    plasma rule applied to Ce) rings: the effect site responds to the rate only through the
    plasma (relative degree 2), and a one-period deadbeat on such an output alternates high
    and low rates (a sampling zero near -1). Once at target the controller therefore holds
    the *driver* of the effect site at the target (as the R package ``tci`` does, switching
    to plasma targeting once the effect site is at target): it chooses ``r`` so that ``Ce(T) + Ce'(T) / ke0 = c`` at the end of the
    period, where ``ke0 = -(C A C') / (C C')`` is the relaxation rate of the target output.
    For an effect compartment ``dCe/dt = ke0 (Cp - Ce)`` this is exactly ``Cp(T) = c``:
    Jacobs' plasma rule. The rate is also capped by the peak-limited rate, which keeps the
    no-overshoot property. A target reached by loading stays "held" until the target
    changes, even if Ce dips below the tolerance band (as it does briefly after the loading
    peak); a target reached by pausing is not, so that an undershoot after a lowered target
    is recovered by loading.
    """

    def __init__(self, model: Model, params: Mapping[str, float], input: str,
                 target_output: str, targets: Sequence[tuple[float, float]], *, mode: str,
                 period_s: float = 10.0, max_rate: float, name: str = "tci",
                 peak_horizon_s: float = 1200.0, at_target_tolerance: float = 0.005) -> None:
        who = f"TCI controller {name!r}"
        if mode not in MODES:
            raise ConfigError(f"{who}: mode = {mode!r}; expected one of {', '.join(MODES)}")
        if not (_is_number(period_s) and period_s > 0):
            raise ConfigError(f"{who}: period_s = {period_s!r}; expected a number > 0 (s)")
        if not (_is_number(max_rate) and max_rate > 0):
            raise ConfigError(f"{who}: max_rate = {max_rate!r}; expected a number > 0 "
                              f"(amount per second)")
        if not (_is_number(peak_horizon_s) and peak_horizon_s > period_s):
            raise ConfigError(f"{who}: peak_horizon_s = {peak_horizon_s!r}; expected a number "
                              f"> period_s ({period_s} s)")
        if not (_is_number(at_target_tolerance) and 0 <= at_target_tolerance < 1):
            raise ConfigError(f"{who}: at_target_tolerance = {at_target_tolerance!r}; "
                              f"expected a fraction in [0, 1)")
        if input not in model.input_names:
            raise ConfigError(f"{who}: model {model.name!r} has no input {input!r}"
                              f"{closest(str(input), model.input_names)}; its inputs: "
                              f"{', '.join(model.input_names)}")
        if target_output not in model.output_names:
            raise ConfigError(f"{who}: model {model.name!r} has no output {target_output!r}"
                              f"{closest(str(target_output), model.output_names)}; its "
                              f"outputs: {', '.join(model.output_names)}")
        # TCI rests on superposition (the concentration is linear in the rate); a model
        # where that fails would get silently wrong rates, so it is refused outright.
        if not model.is_affine:
            raise ConfigError(f"{who}: model {model.name!r} is not linear in its states and "
                              f"inputs (e.g. saturable elimination); TCI needs a linear "
                              f"model")
        p = model.parameter_vector(params)
        self._propagator = Propagator(model, p)
        if not self._propagator.is_exact:
            raise ConfigError(f"{who}: model {model.name!r} is time-varying (circadian "
                              f"amplitudes not 0); TCI needs a time-invariant model")

        self.name = name
        self.period_s = float(period_s)
        self.inputs: tuple[str, ...] = (input,)
        self.model = model
        self.mode = mode
        self.input = input
        self.target_output = target_output
        self.max_rate = float(max_rate)
        self.peak_horizon_s = float(peak_horizon_s)
        self.at_target_tolerance = float(at_target_tolerance)
        self._p = p
        self._unit = model.outputs[model.output_index(target_output)].unit
        self._rate_unit = model.inputs[model.input_index(input)].rate_unit
        self._times, self._levels = self._check_targets(targets, who)
        self._c, self._e = self._output_row(who)
        self._unit_u = np.zeros(model.n_inputs)
        self._unit_u[model.input_index(input)] = 1.0
        self._zero_u = np.zeros(model.n_inputs)

        # One period: x(T) = Phi x + g0 + g1 r, with g1 the response to a unit rate alone.
        self._phi, self._g0, self._g1 = self._split_transition(self.period_s)
        if mode == "plasma":
            self._gain = float(self._c @ self._g1)
            if not self._gain > 0:
                raise ConfigError(f"{who}: output {target_output!r} does not rise within one "
                                  f"period of infusing {input!r}; plasma mode needs an output "
                                  f"the input reaches directly (use mode='effect' for an "
                                  f"effect site)")
        else:
            self._prepare_effect_mode(who)

        self._x: np.ndarray | None = None
        self._held_target: float | None = None  # effect mode: the target latched for holding
        self._regime = "loading"  # effect mode: "loading", "holding" or "paused"
        self._t: float | None = None
        self._rate = 0.0

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _check_targets(targets: Sequence[tuple[float, float]], who: str
                       ) -> tuple[np.ndarray, np.ndarray]:
        try:
            rows = [tuple(row) for row in targets]
        except TypeError:
            raise ConfigError(f"{who}: targets = {targets!r}; expected a sequence of "
                              f"(time_s, concentration) pairs") from None
        if not rows:
            raise ConfigError(f"{who}: targets is empty; give at least one (time_s, "
                              f"concentration) pair")
        times, levels = [], []
        for k, row in enumerate(rows):
            if len(row) != 2 or not all(_is_number(v) for v in row):
                raise ConfigError(f"{who}: target {k + 1} = {row!r}; expected a pair of "
                                  f"finite numbers (time_s, concentration)")
            t, c = float(row[0]), float(row[1])
            if t < 0 or c < 0:
                raise ConfigError(f"{who}: target {k + 1} = ({t!r}, {c!r}); time_s and "
                                  f"concentration must be >= 0")
            if times and t <= times[-1]:
                raise ConfigError(f"{who}: target {k + 1} at {t!r} s does not come after "
                                  f"the previous one ({times[-1]!r} s); times must increase")
            times.append(t)
            levels.append(c)
        return np.array(times), np.array(levels)

    def _output_row(self, who: str) -> tuple[np.ndarray, float]:
        """``(C, e)`` with ``y = C x + e`` for the target output, at the controller's
        parameters (y in the output's unit, x in state units)."""
        m = self.model
        t, x, u = ca.SX.sym("t"), ca.SX.sym("x", m.n_states), ca.SX.sym("u", m.n_inputs)
        y = m.h(t, x, u, self._p)[m.output_index(self.target_output)]
        jac = ca.jacobian(y, ca.vertcat(x, u))
        # Only this output has to be linear: a composed model may also carry a Hill-type
        # effect (BIS) on other outputs.
        if ca.depends_on(jac, ca.vertcat(t, x, u)) or ca.depends_on(y, t):
            raise ConfigError(f"{who}: output {self.target_output!r} of model {m.name!r} is "
                              f"not a linear, time-invariant function of the states; target "
                              f"a concentration (e.g. an effect site) instead")
        zero = ca.Function("row", [t, x, u], [jac, y])(0.0, np.zeros(m.n_states),
                                                       np.zeros(m.n_inputs))
        row = np.asarray(zero[0], dtype=float).ravel()
        if np.any(row[m.n_states:] != 0.0):
            raise ConfigError(f"{who}: output {self.target_output!r} depends directly on an "
                              f"input rate; target a concentration instead")
        return row[:m.n_states].copy(), float(zero[1])

    def _split_transition(self, dt: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(Phi, g0, g1)`` with ``x(t + dt) = Phi x + g0 + g1 r`` for rate *r* of the
        controller's input. Two cached transitions serve every rate, instead of one matrix
        exponential per new rate."""
        phi, g0 = self._propagator.transition(dt, self._zero_u)
        _, g_unit = self._propagator.transition(dt, self._unit_u)
        return phi, g0, g_unit - g0

    def _prepare_effect_mode(self, who: str) -> None:
        """Precompute, on the future grid ``tau_k = k h`` (``h`` ~ 1 s and dividing the
        period, so that ``tau = T`` is a grid point): the free-response map
        ``Ce0 = M x + o`` and the unit-period response ``Ce1``."""
        steps_per_period = max(1, math.ceil(self.period_s / _PEAK_GRID_S - 1e-9))
        h = self.period_s / steps_per_period
        n_grid = math.ceil(self.peak_horizon_s / h - 1e-9)
        tau = h * np.arange(1, n_grid + 1)
        prop, n = self._propagator, self.model.n_states
        base = prop.trajectory(np.zeros(n), 0.0, tau, self._zero_u)
        # Column j of Phi(tau) applied to the output row: the free response is linear in x.
        self._free_map = np.column_stack([
            (prop.trajectory(np.eye(n)[j], 0.0, tau, self._zero_u) - base) @ self._c
            for j in range(n)])
        self._free_offset = base @ self._c + self._e
        # Unit rate for one period from zero, then nothing: by linearity, the response during
        # the period, then the free response of the state it leaves.
        during = prop.trajectory(np.zeros(n), 0.0, tau[:steps_per_period], self._unit_u) \
            - base[:steps_per_period]
        after = self._free_map[:n_grid - steps_per_period] @ during[-1]
        self._unit_response = np.concatenate([during @ self._c, after])
        self._tau = tau
        peak = int(np.argmax(self._unit_response))
        if not self._unit_response[peak] > 0:
            raise ConfigError(f"{who}: output {self.target_output!r} does not respond to "
                              f"{self.input!r}; effect mode needs a concentration the drug "
                              f"reaches")
        if peak >= n_grid - 1:
            raise ConfigError(f"{who}: the response of {self.target_output!r} to one period "
                              f"of {self.input!r} still rises at {self.peak_horizon_s:g} s; "
                              f"increase peak_horizon_s")
        self._counted = self._unit_response > _NEGLIGIBLE * self._unit_response[peak]

        # Hold rule: Ce(T) + Ce'(T) / lam = c, with lam the output's own relaxation rate
        # (ke0 for an effect site, which makes Ce + Ce'/ke0 the plasma concentration).
        a, b, c_aff = (np.asarray(v, dtype=float) for v in
                       self.model.affine_terms(0.0, self._p))
        a = a.reshape(n, n)
        b = b.reshape(n, self.model.n_inputs)
        c_aff = c_aff.ravel()
        lam = -float(self._c @ a @ self._c) / float(self._c @ self._c)
        if lam > 0:
            lead = self._c + (self._c @ a) / lam
            self._hold_row = lead
            self._hold_offset = self._e + float(self._c @ c_aff) / lam
            self._hold_direct = float(self._c @ b @ self._unit_u) / lam
            self._hold_gain = float(lead @ self._g1) + self._hold_direct
        else:
            self._hold_gain = 0.0  # no driver to hold: the peak-limited rate is used alone

    # ------------------------------------------------------------------ queries
    def target_at(self, t_s: float) -> float:
        """The target [output unit] in force at *t_s* [s] (0 before the first entry)."""
        k = int(np.searchsorted(self._times, t_s, side="right")) - 1
        return float(self._levels[k]) if k >= 0 else 0.0

    @property
    def predicted_state(self) -> np.ndarray | None:
        """The controller's predicted state at its last decision (state units), or None
        before the first decision."""
        return None if self._x is None else self._x.copy()

    # ------------------------------------------------------------------ decisions
    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        """The rate from *t_s* [s] on; *readings* are ignored (open loop).

        The rate is planned for ``period_s``; when the next decision comes later, the rate
        has run longer than planned (the prediction accounts for it, but the effect site
        may then exceed the target).

        Raises
        ------
        ConfigError
            When *t_s* is not finite or earlier than the previous decision.
        """
        if not _is_number(t_s):
            raise ConfigError(f"TCI controller {self.name!r}: t_s = {t_s!r}; expected a "
                              f"finite time in s")
        t_s = float(t_s)
        if self._x is None:
            self._x = self.model.initial_state(self._p)
        elif t_s < self._t:
            raise ConfigError(f"TCI controller {self.name!r}: decision at {t_s} s comes "
                              f"before the previous one at {self._t} s")
        else:
            # The rate decided last applied until now (possibly longer than one period if
            # the caller was late); integrate it exactly.
            phi, g0, g1 = self._split_transition(t_s - self._t)
            self._x = phi @ self._x + g0 + g1 * self._rate
        self._t = t_s
        x = self._x
        target = self.target_at(t_s)
        now = float(self._c @ x + self._e)
        details: dict[str, float] = {}
        if self.mode == "plasma":
            rate, reason = self._plasma(x, target, now)
        else:
            rate, reason = self._effect(x, target, now, details)
        self._rate = rate
        u = self._unit_u * rate
        y = np.asarray(self.model.h(t_s, x, u, self._p), dtype=float).ravel()
        for out, value in zip(self.model.outputs, y):
            details[f"predicted_{out.name}_{unit_to_token(out.unit)}"] = float(value)
        details[f"target_{unit_to_token(self._unit)}"] = target
        details[f"rate_{unit_to_token(self._rate_unit)}"] = rate
        return Decision(t_s, {self.input: rate}, reason, details=details)

    def _clamp(self, rate: float) -> tuple[float, str]:
        if rate >= self.max_rate:
            return self.max_rate, f" (at max rate {self.max_rate:g} {self._rate_unit})"
        return max(rate, 0.0), ""

    def _plasma(self, x: np.ndarray, target: float, now: float) -> tuple[float, str]:
        # Jacobs: C (Phi x + g0 + g1 r) + e = target, one equation in r.
        free = float(self._c @ (self._phi @ x + self._g0) + self._e)
        rate, note = self._clamp((target - free) / self._gain)
        what = f"{self.target_output} {now:.3g} {self._unit}"
        if rate == 0.0 and free > target:
            return 0.0, (f"plasma TCI: paused until {self.target_output} falls to "
                         f"{target:g} {self._unit} ({what})")
        return rate, f"plasma TCI: to {target:g} {self._unit} ({what}){note}"

    def _effect(self, x: np.ndarray, target: float, now: float, details: dict[str, float]
                ) -> tuple[float, str]:
        tol = self.at_target_tolerance * target
        what = f"{self.target_output} {now:.3g} {self._unit}"
        if now > target + tol:
            # Nothing given can bring Ce down faster than giving nothing.
            self._regime = "paused"
            return 0.0, (f"effect-site TCI: paused until {self.target_output} falls to "
                         f"{target:g} {self._unit} ({what})")
        free = self._free_map @ x + self._free_offset
        ratios = (target - free[self._counted]) / self._unit_response[self._counted]
        peak_limited = float(np.min(ratios))
        # Once loading has brought Ce to the target, hold it until the target changes:
        # falling back to the peak-limited rate on every small dip would alternate a plasma
        # overshoot with a pause (a limit cycle seen with remifentanil at 10 s periods).
        # After a pause the target is not latched: if Ce then sinks below the band (the
        # plasma is still low when Ce arrives), loading recovers it faster than holding.
        latched = self._held_target == target
        if (latched or now >= target - tol) and self._hold_gain > 0:
            if self._regime == "loading":
                self._held_target = target
            self._regime = "holding"
            hold_free = float(self._hold_row @ (self._phi @ x + self._g0) + self._hold_offset)
            hold = (target - hold_free) / self._hold_gain
            rate, note = self._clamp(min(hold, peak_limited))
            reason = f"effect-site TCI: holding {target:g} {self._unit} ({what}){note}"
        else:
            self._regime = "loading"
            rate, note = self._clamp(peak_limited)
            if rate == 0.0:
                note = "; the drug already given brings it there"
            reason = f"effect-site TCI: loading to {target:g} {self._unit} ({what}){note}"
        planned = free + rate * self._unit_response
        top = int(np.argmax(planned))
        details[f"planned_peak_{unit_to_token(self._unit)}"] = float(planned[top])
        details["planned_peak_after_s"] = float(self._tau[top])
        return rate, reason
