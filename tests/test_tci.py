"""Target-controlled infusion: Jacobs plasma targeting and Shafer & Gregg effect-site targeting,
in closed loop with a patient equal to the controller's model (Schnider, 35 yr, 170 cm,
70 kg, male; pump limit 1200 mL/h of propofol 10 mg/mL)."""

import numpy as np
import pytest

from mpc_dose.control.base import Controller, Reading, check_rates
from mpc_dose.control.tci import TargetControlledInfusion
from mpc_dose.errors import ConfigError
from mpc_dose.model import Cosinor, Model, mammillary
from mpc_dose.model.dosing import Dose
from mpc_dose.model.library import load
from mpc_dose.model.simulation import simulate

MAX_RATE = 1200.0 / 3600.0 * 10.0  # mg/s: 1200 mL/h of 10 mg/mL propofol
PERIOD = 10.0  # s


@pytest.fixture(scope="module")
def patient():
    """(model, typical parameters) of the reference patient."""
    lm = load("propofol-schnider")
    return lm.model, lm.population.typical_parameters(
        {"age": 35, "height_cm": 170, "weight_kg": 70, "sex": "male"})


def tci(patient, targets, mode, **kw):
    model, params = patient
    out = "propofol_cp" if mode == "plasma" else "propofol_ce"
    kw.setdefault("max_rate", MAX_RATE)
    return TargetControlledInfusion(model, params, "propofol", out, targets, mode=mode, **kw)


def closed_loop(patient, controller, t_end, decision_times=None):
    """Run *controller* against the patient (equal to its model) until *t_end* [s]: each
    decided rate is given piecewise constant until the next decision. Returns the decisions
    and the simulation on a 1 s grid plus the decision times."""
    model, params = patient
    times = (np.arange(0.0, t_end, controller.period_s) if decision_times is None
             else np.asarray(decision_times, dtype=float))
    decisions = [controller.decide(t, {}) for t in times]
    ends = np.append(times[1:], t_end)
    doses = [Dose.infusion(d.t_s, "propofol", d.rates["propofol"], end - d.t_s)
             for d, end in zip(decisions, ends) if d.rates["propofol"] > 0]
    grid = np.union1d(np.arange(0.0, t_end + 0.5, 1.0), times)
    return decisions, simulate(model, params, doses, grid)


def at(res, t):
    """Index of time *t* [s] in a result."""
    return int(np.searchsorted(res.time_s, t))


def test_plasma_mode_reaches_target_in_one_period_and_stays_within_1_percent(patient):
    """Plasma TCI puts Cp at the target at the end of the first period and keeps it within 1 %."""
    _, res = closed_loop(patient, tci(patient, [(0.0, 3.0)], "plasma"), 1800.0)
    cp = res.output("propofol_cp")
    assert cp[at(res, PERIOD)] == pytest.approx(3.0, rel=1e-6)
    assert np.all(np.abs(cp[at(res, PERIOD):] / 3.0 - 1) < 0.01)


def test_plasma_mode_pauses_when_target_is_lowered(patient):
    """Lowering the plasma target stops the pump until Cp can be met, then resumes at it."""
    decisions, res = closed_loop(patient, tci(patient, [(0.0, 4.0), (600.0, 2.0)], "plasma"),
                                 1200.0)
    cp = res.output("propofol_cp")
    after = [d for d in decisions if d.t_s >= 600.0]
    paused = [d for d in after if d.rates["propofol"] == 0.0]
    assert paused and all("paused" in d.reason for d in paused)
    resumed = after[len(paused)]
    assert resumed.rates["propofol"] > 0
    assert np.all(np.abs(cp[at(res, resumed.t_s + PERIOD):] / 2.0 - 1) < 0.01)


def test_effect_mode_reaches_target_without_overshoot_near_pump_limited_optimum(patient):
    """Effect TCI brings Ce to 3 ug/mL with < 1 % overshoot, about as fast as the pump allows."""
    model, params = patient
    target = 3.0
    _, res = closed_loop(patient, tci(patient, [(0.0, target)], "effect"), 1800.0)
    ce = res.output("propofol_ce")
    t_reach = int(np.argmax(ce >= 0.99 * target))
    assert ce.max() <= 1.01 * target
    assert t_reach < 180
    assert np.all(np.abs(ce[t_reach:] / target - 1) < 0.01)

    # The pump-limited optimum: full rate for the duration whose Ce peak is the target.
    def ce_after(duration):
        return simulate(model, params, [Dose.infusion(0.0, "propofol", MAX_RATE, duration)],
                        np.arange(0.0, 400.0, 1.0)).output("propofol_ce")
    lo, hi = 0.0, 60.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ce_after(mid).max() < target else (lo, mid)
    t_optimum = int(np.argmax(ce_after(lo) >= 0.99 * target))
    assert t_reach <= t_optimum + PERIOD


def test_effect_mode_lower_target_gives_zero_rate_until_reached(patient):
    """A lowered effect-site target stops the pump exactly until the predicted Ce has fallen."""
    controller = tci(patient, [(0.0, 3.0), (900.0, 2.0)], "effect")
    decisions, res = closed_loop(patient, controller, 1500.0)
    ce = res.output("propofol_ce")
    tol = controller.at_target_tolerance * 2.0
    after = [d for d in decisions if d.t_s >= 900.0]
    for d in after:
        assert d.details["predicted_propofol_ce_ug_per_mL"] == pytest.approx(
            ce[at(res, d.t_s)], rel=1e-9)
        if ce[at(res, d.t_s)] > 2.0 + tol:
            assert d.rates["propofol"] == 0.0 and "paused until propofol_ce falls" in d.reason
    resumed = next(d for d in after if d.rates["propofol"] > 0)
    assert ce[at(res, resumed.t_s)] <= 2.0 + tol
    assert ce[at(res, resumed.t_s):].max() <= 2.0 * 1.01


def test_max_rate_is_never_exceeded(patient):
    """Rates stay in [0, max_rate] in both modes, and the limit is stated when it binds."""
    for mode in ("plasma", "effect"):
        controller = tci(patient, [(0.0, 6.0), (300.0, 1.0), (600.0, 8.0)], mode,
                         max_rate=1.0)
        decisions, res = closed_loop(patient, controller, 900.0)
        rates = np.array([d.rates["propofol"] for d in decisions])
        assert np.all(rates >= 0) and np.all(rates <= 1.0)
        assert rates[0] == 1.0 and "max rate" in decisions[0].reason
        check_rates(decisions[0].rates, controller.inputs, controller.name)


def test_effect_mode_holds_target_for_remifentanil():
    """Effect TCI of remifentanil (Minto) reaches and holds 4 ng/mL without overshoot."""
    lm = load("remifentanil-minto")
    params = lm.population.typical_parameters(
        {"age": 35, "height_cm": 170, "weight_kg": 70, "sex": "male"})
    controller = TargetControlledInfusion(lm.model, params, "remifentanil", "remifentanil_ce",
                                          [(0.0, 4.0)], mode="effect", max_rate=50.0 / 3.0)
    decisions = [controller.decide(t, {}) for t in np.arange(0.0, 1200.0, PERIOD)]
    doses = [Dose.infusion(d.t_s, "remifentanil", d.rates["remifentanil"], PERIOD)
             for d in decisions if d.rates["remifentanil"] > 0]
    ce = simulate(lm.model, params, doses, np.arange(0.0, 1200.0, 1.0)).output(
        "remifentanil_ce")
    t_reach = int(np.argmax(ce >= 0.99 * 4.0))
    assert t_reach < 120 and ce.max() <= 4.0 * 1.01
    assert np.all(np.abs(ce[t_reach:] / 4.0 - 1) < 0.01)


def test_predictions_follow_the_rates_given_even_at_irregular_times(patient):
    """The controller's predicted concentrations are those of the simulated patient."""
    times = np.cumsum([0.0] + [10.0, 7.5, 12.5, 10.0, 3.0, 20.0] * 10)
    decisions, res = closed_loop(patient, tci(patient, [(0.0, 3.0)], "effect"), 700.0, times)
    for d in decisions:
        k = at(res, d.t_s)
        assert res.time_s[k] == d.t_s
        assert d.details["predicted_propofol_cp_ug_per_mL"] == pytest.approx(
            res.output("propofol_cp")[k], rel=1e-9, abs=1e-12)
        assert d.details["predicted_propofol_ce_ug_per_mL"] == pytest.approx(
            res.output("propofol_ce")[k], rel=1e-9, abs=1e-12)


def test_readings_are_ignored_and_reasons_say_what_it_does(patient):
    """Open loop: readings change nothing; the reason names the regime and the target."""
    a, b = tci(patient, [(0.0, 3.0)], "effect"), tci(patient, [(0.0, 3.0)], "effect")
    assert isinstance(a, Controller) and a.inputs == ("propofol",) and a.period_s == PERIOD
    reading = {"propofol_ce": Reading("propofol_ce", 9.0, "ug/mL", 0.0)}
    for t in np.arange(0.0, 300.0, PERIOD):
        da, db = a.decide(t, {}), b.decide(t, reading)
        assert da.rates == db.rates and da.reason == db.reason
    assert a.decide(300.0, {}).reason.startswith("effect-site TCI: holding 3 ug/mL")
    assert tci(patient, [(0.0, 3.0)], "effect").decide(0.0, {}).reason.startswith(
        "effect-site TCI: loading to 3 ug/mL")
    assert tci(patient, [(5.0, 3.0)], "plasma").target_at(4.9) == 0.0


def test_non_linear_model_is_refused(patient):
    """A model with saturable elimination is refused, naming the model."""
    mm = Model("saturable-drug", [mammillary("d", 1, elimination="michaelis_menten")])
    with pytest.raises(ConfigError, match="'saturable-drug' is not linear"):
        TargetControlledInfusion(mm, {"d_v1": 10.0, "d_vmax": 1.0, "d_km": 1.0}, "d", "d_cp",
                                 [(0.0, 1.0)], mode="plasma", max_rate=1.0)


def test_time_varying_model_is_refused_unless_amplitudes_are_zero():
    """A circadian model is refused, naming it, unless its amplitudes are 0."""
    circ = Model("circadian-drug", [mammillary("d", 1)], circadian=[Cosinor("d_cl1")])
    params = {"d_v1": 10.0, "d_cl1": 1.0, "d_cl1_acrophase_1": 4.0}
    with pytest.raises(ConfigError, match="'circadian-drug' is time-varying"):
        TargetControlledInfusion(circ, {**params, "d_cl1_amplitude_1": 0.3}, "d", "d_cp",
                                 [(0.0, 1.0)], mode="plasma", max_rate=1.0)
    flat = TargetControlledInfusion(circ, params, "d", "d_cp", [(0.0, 1.0)], mode="plasma",
                                    max_rate=1.0)
    assert flat.decide(0.0, {}).rates["d"] > 0


def test_unknown_or_unusable_signals_are_refused(patient):
    """Unknown input or output names, and a non-linear output, are refused by name."""
    model, params = patient
    with pytest.raises(ConfigError, match="no input 'propfol'.*did you mean 'propofol'"):
        TargetControlledInfusion(model, params, "propfol", "propofol_ce", [(0.0, 3.0)],
                                 mode="effect", max_rate=MAX_RATE)
    with pytest.raises(ConfigError, match="no output 'propofol_cx'"):
        TargetControlledInfusion(model, params, "propofol", "propofol_cx", [(0.0, 3.0)],
                                 mode="effect", max_rate=MAX_RATE)
    lm = load("propofol-schnider+bis-propofol")
    full = {**params, "bis_e0": 97.4, "bis_emax": 97.4, "bis_c50": 4.47, "bis_gamma": 1.43}
    with pytest.raises(ConfigError, match="output 'bis'.*not a linear"):
        TargetControlledInfusion(lm.model, full, "propofol", "bis", [(0.0, 50.0)],
                                 mode="effect", max_rate=MAX_RATE)
    # The concentrations of the same composed model are fine.
    TargetControlledInfusion(lm.model, full, "propofol", "propofol_ce", [(0.0, 3.0)],
                             mode="effect", max_rate=MAX_RATE)


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "cp"}, "mode = 'cp'"),
    ({"max_rate": 0.0}, "max_rate = 0.0"),
    ({"max_rate": float("nan")}, "max_rate = nan"),
    ({"period_s": -1.0}, "period_s = -1.0"),
    ({"targets": []}, "targets is empty"),
    ({"targets": [(0.0, 3.0), (0.0, 2.0)]}, "target 2 at 0.0 s does not come after"),
    ({"targets": [(0.0, -3.0)]}, r"target 1 = \(0.0, -3.0\)"),
    ({"targets": [(0.0, 3.0, 1.0)]}, "target 1 = .*expected a pair"),
    ({"peak_horizon_s": 30.0}, "still rises at 30 s; increase peak_horizon_s"),
])
def test_bad_settings_are_refused(patient, kwargs, match):
    """Bad settings raise a ConfigError naming the setting and the value."""
    model, params = patient
    settings = {"targets": [(0.0, 3.0)], "mode": "effect", "max_rate": MAX_RATE, **kwargs}
    targets = settings.pop("targets")
    with pytest.raises(ConfigError, match=match):
        TargetControlledInfusion(model, params, "propofol", "propofol_ce", targets, **settings)


def test_time_may_not_go_backwards(patient):
    """A decision earlier than the previous one is refused."""
    controller = tci(patient, [(0.0, 3.0)], "plasma")
    controller.decide(20.0, {})
    with pytest.raises(ConfigError, match="decision at 10.0 s comes before"):
        controller.decide(10.0, {})
