"""The model-predictive dosing controller: state propagation, MHE and NMPC behind the one
controller interface.

Each cycle: the PK states are propagated exactly from the rates actually applied (the
supervisor tells the controller what it let through: :meth:`MPCController.applied`); every
reading of the measured variable since the last cycle enters the MHE window with the state at
its sample time; the MHE updates the output-map parameters and the output disturbance; the
NMPC plans from the estimate. The first move leaves as the decision; when the solve failed,
the shifted previous plan goes with it as the backup. The safety supervisor is not in here:
it wraps every controller alike in the controller node
(:class:`~mpc_dose.control.supervisor.SupervisedController`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence

import casadi as ca
import numpy as np

from ..errors import ConfigError
from ..model.dosing import Dose, schedule
from ..model.propagate import Propagator
from ..model.spec import Model
from .base import Decision, Forecast, Reading
from .estimation import BayesianEstimator
from .insulin import MealBoluses
from .model_bank import ModelBank
from .mhe import MHEConfig, OutputMapEKF, OutputMapMHE
from .nmpc import DosePlan, NMPCConfig, NonlinearMPC

__all__ = ["MPCController"]

#: decisions whose states are kept for readings that arrive late (at a 5-s period: 21 min;
#: at an hourly period: 10 days)
_CHECKPOINTS = 256


class MPCController:
    """NMPC + MHE as a :class:`~mpc_dose.control.base.Controller`.

    Parameters
    ----------
    model : Model
        The controller's model.
    params : mapping or array
        Its parameter values for this patient (e.g. population typical values from the
        covariates); estimated parameters start from (and are pulled towards) these.
    nmpc : NMPCConfig
    mhe : MHEConfig, optional
        What to estimate. Without it the parameters stay fixed and no disturbance is
        estimated.
    measured : str, optional
        The reading variable (a sensor's ``var``) that measures the tracked output
        *nmpc.output*; the output's name when not given. Only its readings reach the
        estimator.
    estimator : {"mhe", "ekf"}
        Moving-horizon estimation (default) or an extended Kalman filter of the same
        quantities.
    reference : callable, optional
        A time-varying reference ``r(t_s)`` (output unit), evaluated at the end of each
        period of the horizon; the config's constant reference otherwise.
    mpc : NonlinearMPC, optional
        The problem built for *model* and *nmpc* (reused across patients; reset first).
    bayes : BayesianEstimator, optional
        The MAP estimator of any parameters, those of the dynamics included (instead of
        *mhe*): it is told every reading and every delivered rate; the NMPC plans from its
        state estimate and its parameters (the typical values at the decision's time, so a
        covariate change it was told of counts from its time on).
    state_correction : (state names, gain), optional
        Output injection for a model whose states the readings can correct: at each
        decision the named states are multiplied by ``(measured / predicted) ** gain`` of
        the latest valid reading of the measured variable against the tracked output at
        that state (0 < gain <= 1: 1 moves the output onto the reading, less filters the
        sensor's noise over several readings). For a glucose model the glucose masses: a
        mismatch then acts through the model's dynamics (an offset added to the output
        would not: insulin acts in proportion to the model's own glucose).
    meal_boluses : MealBoluses, optional
        The hybrid closed loop of the commercial systems: each announced meal gets the
        patient's bolus-calculator bolus (its own carb ratio, correction factor and target,
        in the model's units) as a bolus command to a pump that takes them; the bolus
        enters the states at once (what the pump says it gave replaces it), so the plan
        counts it, and the NMPC shapes the rates around it.
    bolus_fractions : sequence of float, optional
        With *meal_boluses*: the NMPC chooses each bolus among these fractions of the
        calculator's, the one whose plan (from the state with that bolus in it) has the
        least objective - a bolus the model sees driving glucose low hours after the meal
        is cut (the calculator knows no time course; the horizon must reach that far).
    bank : ModelBank, optional
        Multiple-model estimation instead of one fixed model: every decision the bank's
        candidates follow what the patient got, and the NMPC plans with the candidate whose
        open-loop predictions met the readings best, from its state (the bank applies the
        output injection to every candidate). Not with *mhe* or *bayes*.
    announcements : mapping, optional
        Reading variable -> (model input, factor): a reading of the variable announces a
        bolus of the input that no pump gives (a meal the patient eats: ``carbohydrate_
        announced`` -> ``carbohydrate``), of the reading's value times the factor (to the
        input's amount unit), at the reading's sample time. The states and the estimator
        take it in, so the prediction sees the meal coming.
    """

    def __init__(self, model: Model, params: Mapping[str, float] | np.ndarray,
                 nmpc: NMPCConfig, mhe: MHEConfig | None = None, *,
                 measured: str | None = None, estimator: str = "mhe",
                 reference: Callable[[float], float] | None = None,
                 name: str = "nmpc", mpc: NonlinearMPC | None = None,
                 bayes: BayesianEstimator | None = None,
                 announcements: Mapping[str, tuple[str, float]] | None = None,
                 state_correction: tuple[Sequence[str], float] | None = None,
                 meal_boluses: MealBoluses | None = None,
                 bolus_fractions: Sequence[float] = (),
                 bank: ModelBank | None = None) -> None:
        if bayes is not None and mhe is not None:
            raise ConfigError(f"{name}: give one estimator (mhe or bayes), not both")
        if bayes is not None and bayes.model is not model:
            raise ConfigError(f"{name}: the estimator's model {bayes.model.name!r} is not the "
                              f"controller's {model.name!r}")
        self.model, self.name = model, name
        self.theta = (np.asarray(params, float).copy() if isinstance(params, np.ndarray)
                      else model.parameter_vector(params))
        self.period_s = nmpc.period_s
        self.inputs = tuple(nmpc.inputs)
        self._reference = reference
        self._horizon = nmpc.horizon
        # a problem already built for this model and config may be handed in (trials reuse
        # it patient after patient); it must not serve two patients at once
        self.mpc = mpc if mpc is not None else NonlinearMPC(model, nmpc)
        self.measured = nmpc.output if measured is None else measured
        self.mhe = None
        if mhe is not None:
            # The states are propagated with the prior PK: the estimated parameters must only
            # act on the outputs, or the propagation would use stale values.
            x, u, t = (ca.SX.sym(n, k) for n, k in (("x", model.n_states),
                                                    ("u", model.n_inputs), ("t", 1)))
            p = ca.SX.sym("p", len(model.params))
            f = model.f(t, x, u, p)
            for name_ in mhe.parameters:
                if ca.depends_on(f, p[model.param_index(name_)]):
                    raise ConfigError(f"mhe.parameters: {name_!r} acts on the dynamics; the "
                                      f"output-map MHE and EKF propagate the states with the "
                                      f"prior (estimator kind 'map' estimates it, the states "
                                      f"with it)")
            if estimator not in ("mhe", "ekf"):
                raise ConfigError(f"estimator must be 'mhe' or 'ekf', got {estimator!r}")
            self.mhe = (OutputMapMHE if estimator == "mhe" else OutputMapEKF)(
                model, self.theta, mhe)
        self._correction = None
        if state_correction is not None:
            names, gain = state_correction
            if not names or not (isinstance(gain, (int, float)) and 0 < gain <= 1):
                raise ConfigError(f"{name}: state_correction = {state_correction!r}: expected "
                                  f"state names and a gain in (0, 1]")
            # the output map with this patient's values, built once (not every cycle)
            self._correction = ([model.state_index(n) for n in names], float(gain),
                                model.output_index(nmpc.output),
                                model.output_function(self.theta))
        if meal_boluses is not None and bayes is not None:
            raise ConfigError(f"{name}: meal boluses with a Bayesian estimator are not "
                              f"supported (it cannot take a counted bolus back)")
        if meal_boluses is not None and not meal_boluses.bolus_commands:
            raise ConfigError(f"{name}: meal boluses need a pump that takes bolus commands "
                              f"(its max_bolus)")
        self.meal_boluses = meal_boluses
        if bolus_fractions and (meal_boluses is None or
                                not all(0 < f <= 2 for f in bolus_fractions)):
            raise ConfigError(f"{name}: bolus_fractions = {list(bolus_fractions)!r}: expected "
                              f"fractions in (0, 2] of the meal boluses' calculator (and meal "
                              f"boluses)")
        self._bolus_fractions = tuple(float(f) for f in bolus_fractions)
        if bank is not None and (mhe is not None or bayes is not None):
            raise ConfigError(f"{name}: a model bank is an estimator of its own; not with "
                              f"the MHE, EKF or MAP estimator")
        if bank is not None and bank.model is not model:
            raise ConfigError(f"{name}: the bank's model {bank.model.name!r} is not the "
                              f"controller's {model.name!r}")
        self.bank = bank
        #: the bank has taken in readings up to this sample time [s]
        self._bank_read_s = -math.inf
        self._bank_started = False
        #: the bolus jumps the controller put in itself, by time [s], until the pump says
        #: what it gave
        self._own_boluses: dict[float, np.ndarray] = {}
        self._announcements = {var: (model.input_index(name), float(factor))
                               for var, (name, factor) in (announcements or {}).items()}
        #: (time [s], state jump) of every announced bolus, in time order
        self._jumps: list[tuple[float, np.ndarray]] = []
        self._propagator = Propagator(model, self.theta)
        self._t = 0.0
        self._rates = dict.fromkeys(self.inputs, 0.0)
        self._pending: list[Reading] = []
        # What the patient got: (from time [s], rates vector [amount/s]) in time order, as
        # decided and as the pumps then reported (a refused command, a pump's own rounding,
        # a fallback, an occlusion) - the states follow what was delivered, not the plan.
        self._deliveries: list[tuple[float, np.ndarray]] = [(0.0, np.zeros(model.n_inputs))]
        # _auc's memo: ((theta, output, window start), end [s], state there, AUC so far),
        # valid while no delivery at or before its end changed (the earliest change since)
        self._auc_memo: tuple | None = None
        self._auc_model: tuple | None = None
        self._delivery_changed_s = math.inf
        # (time, state) at recent decisions, in time order: the state of any later time is
        # propagated from the latest checkpoint before it through the deliveries
        #: the first checkpoint is still the model's initial state (before any bolus at 0)
        self._initial_kept = True
        self._checkpoints: list[tuple[float, np.ndarray]] = [
            (0.0, model.initial_state(self.theta))]
        self._last_plan: DosePlan | None = None
        #: (plan, its Forecast from its own time), built when asked
        self._planned: tuple[DosePlan, Forecast] | None = None
        self.last_estimate = None
        self.bayes = bayes
        #: (decision time, readings the estimate used, estimated parameter values) after
        #: every refit of the Bayesian estimator: how the estimate converged
        self.estimates: list[tuple[float, int, dict[str, float]]] = []

    @property
    def planned(self) -> Forecast | None:
        """The last successful plan from its own time: a failed solve's backup is this plan
        shifted to its time (:meth:`Forecast.shifted`), here and in a host that keeps it in
        another process."""
        plan = self._last_plan
        if plan is None:
            return None
        if self._planned is None or self._planned[0] is not plan:
            output = self.mpc.config.output
            predicted = np.asarray(plan.predicted_output, dtype=float).ravel()
            self._planned = (plan, Forecast(
                plan.t_s, self.period_s,
                {name: plan.plan[:, self.model.input_index(name)].tolist()
                 for name in self.inputs},
                output, self.model.outputs[self.model.output_index(output)].unit,
                predicted.tolist() if len(predicted) == len(plan.plan) else []))
        return self._planned[1]

    def _u(self, rates: Mapping[str, float]) -> np.ndarray:
        u = np.zeros(self.model.n_inputs)
        for name, value in rates.items():
            u[self.model.input_index(name)] = value
        return u

    def observe(self, reading: Reading) -> None:
        """Every reading as it arrives (the supervisor passes on the usable ones); readings
        of the measured variable enter the estimator at the next decision."""
        if self.meal_boluses is not None:
            self.meal_boluses.observe(reading)
        if reading.var == self.measured:
            self._pending.append(reading)
        elif reading.var in self._announcements and reading.quality == "valid" and \
                math.isfinite(reading.value) and reading.value > 0:
            self._announced(reading)

    def _announced(self, reading: Reading) -> None:
        """A bolus the patient took (an announced meal) at the reading's sample time: into
        the states from then (re-propagating what came after) and into the estimator."""
        j, factor = self._announcements[reading.var]
        self._bolus_into_states(float(reading.t_meas_s), self.model.input_names[j],
                                reading.value * factor)

    def _bolus_into_states(self, t: float, input_name: str, amount: float) -> np.ndarray:
        """A bolus of *amount* of *input_name* at *t* into the states (re-propagating what
        came after) and the estimator."""
        # the state increment of the bolus (its compartment, bioavailability, units)
        # (a bolus at t = 0 of a schedule is its first break's jump)
        jump = schedule(self.model, self.theta, [Dose.bolus(0.0, input_name, amount)]).jumps[0]
        bisect.insort(self._jumps, (t, jump), key=lambda item: item[0])
        self._jump_into_records(t, jump)
        self._delivery_changed_s = min(self._delivery_changed_s, t)
        if self.bayes is not None:
            self.bayes.bolus(t, input_name, amount)
        return jump

    def _jump_into_records(self, t: float, jump: np.ndarray) -> None:
        """A state jump at *t* (a bolus, or minus one taken back) into what is recorded:
        the checkpoints after *t* were propagated without it and go (the states are
        propagated again from the one before when needed); a checkpoint at *t* itself
        holds the boluses at its time, so the jump is added to it (keeping the output
        injection done there); the bank's candidates, already past *t*, take it now."""
        while len(self._checkpoints) > 1 and self._checkpoints[-1][0] > t:
            self._checkpoints.pop()
        last_t, last_x = self._checkpoints[-1]
        if last_t == t and not (len(self._checkpoints) == 1 and self._initial_kept):
            self._checkpoints[-1] = (last_t, last_x + jump)
        if self.bank is not None and self._bank_started and t <= self._t:
            self.bank.add_jump(jump)

    def given_bolus(self, t_s: float, name: str, amount: float) -> None:
        """A pump gave a bolus of *amount* of *name* from *t_s*: it replaces the bolus this
        controller counted at that time (the pump rounds to its increment)."""
        if self.meal_boluses is not None:
            self.meal_boluses.given(t_s, amount)
        mine = self._own_boluses.pop(float(t_s), None)
        if mine is not None:  # the counted bolus (this very jump) gives way to the given one
            self._jumps = [(t, jump) for t, jump in self._jumps if jump is not mine]
            self._jump_into_records(float(t_s), -mine)
        self._bolus_into_states(float(t_s), name, amount)

    def applied(self, t_s: float, rates: Mapping[str, float]) -> None:
        """The rates in force from *t_s* on (the supervisor's verdict at a decision, then
        what the pumps report: their rounding, a refusal, a fallback, an occlusion). A
        report about the past re-propagates the states from the last decision before it."""
        u = self._u({name: float(rates.get(name, 0.0)) for name in self.inputs})
        self._delivery_changed_s = min(self._delivery_changed_s, t_s)
        times = [t for t, _ in self._deliveries]
        k = bisect.bisect_left(times, t_s)
        if k < len(times) and times[k] == t_s:
            self._deliveries[k] = (t_s, u)
        else:
            self._deliveries.insert(k, (t_s, u))
        # checkpoints after t_s were propagated with what was then believed
        while len(self._checkpoints) > 1 and self._checkpoints[-1][0] > t_s:
            self._checkpoints.pop()
        if t_s >= self._t:
            self._rates = {name: float(rates.get(name, 0.0)) for name in self.inputs}
        if self.bayes is not None:
            self.bayes.delivered(t_s, {name: float(rates.get(name, 0.0))
                                       for name in self.inputs})

    def _rates_vector_at(self, t_s: float) -> np.ndarray:
        k = bisect.bisect_right([t for t, _ in self._deliveries], t_s) - 1
        return self._deliveries[max(k, 0)][1]

    def _state_at(self, t_s: float) -> tuple[np.ndarray, np.ndarray] | None:
        """The state at *t_s* and the rates then, propagated from the latest checkpoint at or
        before it through every change of the delivered rates; None when older than the
        record (a reading delayed beyond the checkpoints kept)."""
        k = bisect.bisect_right([t for t, _ in self._checkpoints], t_s) - 1
        if k < 0:
            return None
        t, x = self._checkpoints[k]
        u = self._rates_vector_at(t)
        for t_event, u_next, jump in self._events(t, t_s, k == 0 and self._initial_kept):
            if t_event > t:
                x = self._propagator.advance(x, t, t_event, u)
                t = t_event
            if jump is not None:
                x = x + jump
            else:
                u = u_next
        if t_s > t:
            x = self._propagator.advance(x, t, t_s, u)
        return x, self._rates_vector_at(t_s)

    def _events(self, t: float, t_s: float, initial: bool) -> list:
        """What changed the patient's inputs in (t, t_s], in time order: rate changes
        ``(time, rates, None)`` and announced boluses ``(time, None, jump)``. A bolus at
        t_s itself counts (it was taken by then); a state at *t* holds the boluses at its
        own time, except the model's initial state (*initial*)."""
        return sorted([(tc, un, None) for tc, un in self._deliveries if t < tc < t_s]
                      + [(tj, None, jump) for tj, jump in self._jumps
                         if (t <= tj if initial else t < tj) and tj <= t_s],
                      key=lambda e: e[0])

    def _from_bank(self, t_s: float, latest: Reading | None) -> tuple[np.ndarray, str]:
        """The bank's candidates moved to *t_s* and scored; the chosen one's state (and its
        parameters, from now on the controller's), and a note."""
        new = latest is not None and latest.t_meas_s > self._bank_read_s
        if new:
            self._bank_read_s = latest.t_meas_s
        x, theta, changed = self.bank.update(
            t_s, self._rates_vector_at(self._t),
            self._events(self._t, t_s, not self._bank_started),
            latest.value if new else None)
        self._bank_started = True
        if changed:
            # the other candidate's model from now on: its state replaces the record
            self.theta = theta
            self._propagator = Propagator(self.model, theta)
            if self._correction is not None:
                states, gain, k, _ = self._correction
                self._correction = (states, gain, k, self.model.output_function(theta))
            self._checkpoints.clear()
            self._initial_kept = False
            self._jumps = [(t, jump) for t, jump in self._jumps if t > t_s]
        return x, (f"; bank: candidate {self.bank.current}"
                   + (" (changed)" if changed else ""))

    def _delivered_so_far(self, t_s: float, theta: np.ndarray) -> dict:
        """What the NMPC's windows need of the past, from what was delivered: the amount of
        each input in each dose window, the doses given (infusions started), and the AUC
        of the exposure output since the current AUC window began (under the current
        estimate *theta*)."""
        c, out = self.mpc.config, {}
        if c.dose_windows:
            out["delivered_in_window"] = {
                name: self._amount_delivered(name, t_s - window_s, t_s)
                for name, window_s, _ in c.dose_windows}
        if c.dose_interval_s is not None:
            given = {}
            for name in self.inputs:
                j = self.model.input_index(name)
                rates = [u[j] for t, u in self._deliveries if t <= t_s]
                given[name] = sum(1 for a, b in zip([0.0] + rates, rates) if a <= 0 < b)
            out["doses_given"] = given
        if c.auc_window_s is not None and t_s > c.auc_window_start_s:
            start = c.auc_window_start_s + math.floor(
                (t_s - c.auc_window_start_s) / c.auc_window_s + 1e-9) * c.auc_window_s
            if t_s - start > 1e-9:
                output = c.exposure_output or c.window_output or c.output
                out["auc_accrued"] = self._auc(theta, self.model.output_index(output),
                                               start, t_s)
        return out

    def _amount_delivered(self, name: str, t0: float, t1: float) -> float:
        j = self.model.input_index(name)
        times = [t for t, _ in self._deliveries] + [t1]
        total = 0.0
        for (t, u), t_next in zip(self._deliveries, times[1:]):
            a, b = max(t, t0), min(t_next, t1)
            if b > a:
                total += u[j] * (b - a)
        return total

    def _auc(self, theta: np.ndarray, k: int, t0: float, t1: float) -> float:
        """The AUC [output unit x h] of output *k* over [t0, t1] under *theta*, the states
        propagated from the start through what was delivered (Simpson's rule on steps of
        at most 10 min within each constant-rate stretch).

        Asked every period for the same window and estimate, it goes on from where the
        last answer ended (its state and AUC kept) unless the estimate, the window or a
        delivery before that end changed: a week of hourly decisions integrates the week
        once, not once per decision."""
        key = (theta.tobytes(), k, t0)
        memo = self._auc_memo
        if self._auc_model is None or self._auc_model[0] != key[0]:
            self._auc_model = (key[0], Propagator(self.model, theta),
                               self.model.output_function(theta))
        _, propagator, h = self._auc_model
        times = [tc for tc, _ in self._deliveries]
        if memo is not None and memo[0] == key and t1 >= memo[1] and \
                self._delivery_changed_s >= memo[1]:
            _, t, x, total = memo
        else:
            x, t, total = self.model.initial_state(theta), self._deliveries[0][0], 0.0
            while t < t0:  # up to the window through earlier rate changes
                nxt = times[bisect.bisect_right(times, t)] if \
                    bisect.bisect_right(times, t) < len(times) else t0
                nxt = min(nxt, t0)
                x = propagator.advance(x, t, nxt, self._rates_vector_at(t))
                t = nxt
        edges = sorted({t, t1} | {tc for tc in times if t < tc < t1})
        for a, b in zip(edges, edges[1:]):
            u = self._rates_vector_at(a)
            n = max(2, 2 * math.ceil((b - a) / 1200.0))
            grid = np.linspace(a, b, n + 1)
            ys = [float(np.ravel(h(np.concatenate([[a], x, u])))[k])]
            for g0, g1 in zip(grid, grid[1:]):
                x = propagator.advance(x, g0, g1, u)
                ys.append(float(np.ravel(h(np.concatenate([[g1], x, u])))[k]))
            weights = np.ones(n + 1)
            weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
            total += float(np.dot(weights, ys)) * (b - a) / (3.0 * n) / 3600.0
        self._auc_memo = (key, max(t1, t), x, total)
        self._delivery_changed_s = math.inf
        return total

    def _checkpoint(self, t_s: float, x: np.ndarray) -> None:
        """Keep the state at a decision; forget what no reading can need any more."""
        self._checkpoints.append((t_s, x))
        if len(self._checkpoints) > _CHECKPOINTS:
            del self._checkpoints[0]
            self._initial_kept = False
            first = self._checkpoints[0][0]
            # the delivery in force at the first checkpoint stays
            while len(self._deliveries) > 1 and self._deliveries[1][0] <= first:
                del self._deliveries[0]
            # boluses before the first checkpoint are in its state: no reading needs them
            self._jumps = [(t, jump) for t, jump in self._jumps if t > first]

    def _corrected(self, t_s: float, x: np.ndarray, u: np.ndarray, measured: float
                   ) -> np.ndarray:
        """*x* with the state correction's states scaled towards *measured*."""
        states, gain, k, output = self._correction
        predicted = float(np.ravel(output(np.concatenate([[t_s], x, u])))[k])
        if not predicted > 0:
            return x
        x = x.copy()
        x[states] *= (measured / predicted) ** gain
        return x

    def _chosen_bolus(self, t_s: float, amount: float, latest: Reading | None,
                      reference: list[float] | None) -> tuple[float, str]:
        """The fraction of the calculator's bolus *amount* whose plan costs least (see
        *bolus_fractions*), and a note; the calculator's when no plan succeeds."""
        x, u_now = self._state_at(t_s)
        if self._correction is not None and latest is not None:
            x = self._corrected(t_s, x, u_now, latest.value)
        jump = schedule(self.model, self.theta, [Dose.bolus(0.0, self.inputs[0],
                                                            amount)]).jumps[0]
        costs = []
        for fraction in self._bolus_fractions:  # trial plans: the warm start stays
            plan = self.mpc.plan(t_s, x + fraction * jump, self.theta, self._rates,
                                 reference=reference, keep_warm=False,
                                 **self._delivered_so_far(t_s, self.theta))
            costs.append(plan.objective if plan.success else math.inf)
        if not np.isfinite(costs).any():
            return amount, "; no plan for a fraction of it succeeded: the calculator's"
        best = int(np.argmin(costs))
        fraction = self._bolus_fractions[best]
        return fraction * amount, (f"; NMPC chose {fraction:.0%} of it "
                                   f"(objective {costs[best]:.4g})")

    def forecast(self, t_s: float) -> Forecast | None:
        """The latest successful plan from *t_s* on (its stages before *t_s* dropped: after
        a failed solve, the shifted plan that serves as backup), with the tracked output
        it predicts; None when no plan covers *t_s*."""
        planned = self.planned
        return None if planned is None else planned.since(t_s)

    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        """The plan's first move (status ``ok``) or a failed solve (``solver_failed``, with
        the shifted previous plan's rates for now as *backup* while it covers the present).
        Until :meth:`applied` says otherwise, the decision is taken as applied (the backup
        for a failed solve; the rates in force when there is none)."""
        if t_s < self._t:
            raise ConfigError(f"{self.name}: decision time went back from {self._t} to {t_s}")
        measured = self.measured
        # readings since the last decision enter the MHE with the state at their sample time
        if self.mhe is not None:
            for reading in sorted(self._pending, key=lambda r: r.t_meas_s):
                if reading.var != measured or reading.quality != "valid" or \
                        not math.isfinite(reading.value) or reading.t_meas_s > t_s:
                    continue
                found = self._state_at(reading.t_meas_s)
                if found is not None:
                    self.mhe.add(reading.t_meas_s, found[0], found[1], reading.value)
        if self.bayes is not None:  # every reading, at its sample time (late ones too)
            for reading in self._pending:
                if reading.var == measured and math.isfinite(reading.value) and \
                        reading.quality in ("valid", "underflow"):
                    self.bayes.add_reading(reading.t_meas_s, reading.value,
                                           blq=reading.quality == "underflow")
        latest = max((r for r in self._pending if r.var == measured and r.quality == "valid"
                      and math.isfinite(r.value) and r.value > 0 and r.t_meas_s <= t_s),
                     key=lambda r: r.t_meas_s, default=None)
        self._pending.clear()
        reference = None
        if self._reference is not None:
            reference = [float(self._reference(t_s + (k + 1) * self.period_s))
                         for k in range(self._horizon)]
        boluses, bolus_note = {}, ""
        if self.meal_boluses is not None:
            glucose = latest.value if latest is not None else None
            bolus_note = self.meal_boluses.give_due(t_s, glucose) or ""
            amount = self.meal_boluses.take_command()
            if amount and self._bolus_fractions:
                amount, chosen = self._chosen_bolus(t_s, amount, latest, reference)
                bolus_note += chosen
            if amount:
                name = self.inputs[0]
                boluses = {name: amount}
                self._own_boluses[float(t_s)] = self._bolus_into_states(float(t_s), name,
                                                                        amount)
            bolus_note = f"; {bolus_note}" if bolus_note else ""
        est_note = ""
        if self.bank is not None:
            x, est_note = self._from_bank(t_s, latest)
        else:
            x, u_now = self._state_at(t_s)
            if self._correction is not None and latest is not None:
                x = self._corrected(t_s, x, u_now, latest.value)
        self._checkpoint(t_s, x)
        self._t = t_s
        theta, disturbance = self.theta, 0.0
        if self.bayes is not None:
            estimate = self.bayes.update(t_s)
            if estimate is not self.last_estimate:
                self.estimates.append((t_s, len(estimate.readings),
                                       {k: estimate.params[k] for k in self.bayes.eta_names}))
            self.last_estimate = estimate
            x, theta = self.bayes.state(t_s), self.bayes.theta
            disturbance = float(estimate.disturbance)
            est_note = (f"; MAP {'ok' if estimate.success else estimate.status} from "
                        f"{len(estimate.readings)} reading(s): "
                        + ", ".join(f"{k}={estimate.params[k]:.3g}"
                                    for k in self.bayes.eta_names))
        if self.mhe is not None:
            estimate = self.mhe.update()
            self.last_estimate = estimate
            theta, disturbance = self.mhe.theta, self.mhe.disturbance
            est_note = (f"; MHE {'ok' if estimate.success else estimate.status}: "
                        + ", ".join(f"{k}={v:.3g}" for k, v in estimate.values.items())
                        + f", d={disturbance:.2f}")
        if self.mpc.between_doses(t_s, theta):
            # no dose starts now and none runs: the rates are 0 whatever the plan; the next
            # dose is planned at its time with everything known by then
            self._rates = dict.fromkeys(self.inputs, 0.0)
            return Decision(t_s, dict(self._rates), f"nmpc: between scheduled doses{est_note}",
                            details={"solve_time_s": 0.0, "iterations": 0.0,
                                     "disturbance": disturbance})
        plan = self.mpc.plan(t_s, x, theta, self._rates, disturbance=disturbance,
                             reference=reference, **self._delivered_so_far(t_s, theta))
        backup = None
        if not plan.success and self._last_plan is not None:
            backup = self.planned.shifted(t_s)
        if plan.success:
            self._last_plan = plan
            self._rates = dict(plan.rates)
        elif backup is not None:
            self._rates = dict(backup)
        details = {"solve_time_s": plan.solve_time_s, "iterations": float(plan.iterations),
                   "disturbance": disturbance}
        return Decision(t_s, dict(plan.rates),
                        f"nmpc {plan.solver}: {plan.status}{est_note}{bolus_note}",
                        status="ok" if plan.success else "solver_failed", details=details,
                        backup=backup, boluses=boluses)

