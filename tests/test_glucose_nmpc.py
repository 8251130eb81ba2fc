"""The NMPC as an artificial pancreas (issue 18): the pieces it needs and one patient-day of
scenarios/t1d_nmpc.toml end to end.

* a meal announcement enters the controller's states (the gut gets the announced amount
  times the bioavailability) at its sample time, also when it arrives late;
* output injection moves the model's glucose masses by (measured / predicted) ^ gain;
* a reference schedule follows the clock; the controller model scaled to the patient's
  basal holds the patient's own basal steady state;
* the asymmetric soft window: a low-side weight far above the high side's makes the plan
  give less insulin when the prediction dips;
* the supervisor takes a CGM's HIGH as a reading when told to, and range-limit readings
  never make a flat line.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from mpc_dose.control.base import Reading
from mpc_dose.control.supervisor import SafetyConfig, SafetySupervisor, SupervisedController
from mpc_dose.errors import ConfigError
from mpc_dose.scenario import load_scenario
from mpc_dose.trial.build import build_setup
from mpc_dose.trial.closed_loop import run_closed_loop

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "t1d_nmpc.toml"


NO_MEAL_BOLUS = {"controller.nmpc.meal_bolus": None,
                 "controller.nmpc.meal_bolus_fractions": []}


#: the scenario's controller with one fixed model: its bank of candidate models (built in
#: about 1 s) serves the tests that name it
NO_BANK = {"controller.nmpc.estimator": {"kind": "none"}}


def _controller(overrides=None, index=0, bank=False):
    overrides = dict(overrides or {})
    if not bank and not any(k.startswith("controller.nmpc.estimator") for k in overrides):
        overrides.update(NO_BANK)
    setup, patient = build_setup(load_scenario(SCENARIO, {"scenario.duration_s": 7200.0,
                                                          **overrides}), index, 0)
    controller = setup.controller
    return getattr(controller, "controller", controller), setup, patient


def test_an_announced_meal_enters_the_gut_at_its_time_even_when_told_late():
    """The announcement of 40 g at t = 1000 s: the state at 1000 s has 40 x AG g more in
    the first gut compartment than without it, whether the reading arrives before the
    decision at 1200 s or after it (the later states are propagated again: the state at
    1500 s is the same either way)."""
    later = {}
    for late in (False, True):
        mpc, _, _ = _controller({**NO_MEAL_BOLUS,
                                 "controller.nmpc.corrected_states": []})
        model = mpc.model
        gut = model.state_index("cambridge_gut1")
        ag = mpc.theta[model.param_index("cambridge_ag")]
        meal = Reading("carbohydrate_announced", 40.0, "g", 1000.0)
        if not late:
            mpc.observe(meal)
        mpc.decide(0.0, {})
        mpc.decide(1200.0, {})
        if late:
            mpc.observe(meal)
        before, _ = mpc._state_at(999.999)
        after, _ = mpc._state_at(1000.0)
        assert after[gut] - before[gut] == pytest.approx(40.0 * ag, rel=1e-6)
        later[late], _ = mpc._state_at(1500.0)
    np.testing.assert_allclose(later[True], later[False], rtol=1e-6)


def test_the_pumps_own_bolus_amount_replaces_the_counted_one_at_its_time():
    """A meal bolus is counted in the states when commanded; the amount the pump says it
    gave (its rounding) replaces it in the state at that decision, whose output injection
    stays (the checkpoint is corrected, not dropped)."""
    mpc, _, _ = _controller()
    depot = mpc.model.state_index("cambridge_s1")
    mpc.observe(Reading("cgm", 7.0, "mmol/L", 300.0))
    mpc.observe(Reading("carbohydrate_announced", 60.0, "g", 300.0))
    decision = mpc.decide(300.0, {})
    counted = decision.boluses["insulin"]
    t, before = mpc._checkpoints[-1]
    mpc.given_bolus(300.0, "insulin", counted - 0.5)  # the pump gave 0.5 U less
    t_after, after = mpc._checkpoints[-1]
    assert t_after == t == 300.0
    assert before[depot] - after[depot] == pytest.approx(0.5, rel=1e-9)  # U
    np.testing.assert_array_equal(np.delete(after, depot), np.delete(before, depot))


def test_a_meal_bolus_the_low_suspend_holds_leaves_the_nmpcs_states_until_given():
    """Announced into a predicted low, the NMPC's meal bolus is held by the supervisor: the
    NMPC hears it was not given, so its insulin depot is that of a twin told of no meal
    (a bolus that never left is not in its states); the suspend over, the bolus leaves."""
    twins = []
    for meal in (True, False):
        mpc, setup, _ = _controller()
        supervised = SupervisedController(mpc, setup.safety)
        decisions = []
        for k, value in enumerate((5.5, 4.9, 4.3, 5.2, 6.4)):
            t = 300.0 * k
            reading = Reading("cgm", value, "mmol/L", t)
            supervised.observe(reading)
            if meal and k == 2:
                supervised.observe(Reading("carbohydrate_announced", 60.0, "g", t))
            decisions.append(supervised.decide(t, {"cgm": reading}))
            if k == 2:
                depot = mpc._checkpoints[-1][1][mpc.model.state_index("cambridge_s1")]
        twins.append((decisions, depot))
    (held, depot_held), (none, depot_none) = twins
    assert "held (low suspend)" in held[2].reason and held[2].boluses == {}
    assert depot_held == pytest.approx(depot_none, rel=1e-12, abs=1e-12)
    given = [d.boluses.get("insulin", 0.0) for d in held[3:]]
    assert max(given) > 1.0 and sum(g > 0 for g in given) == 1
    assert all(not d.boluses for d in none)


def test_output_injection_moves_the_glucose_masses_by_the_ratio_to_the_gain():
    """A reading twice the model's glucose with gain 0.5: Q1 and Q2 grow by sqrt(2), the
    other states stay."""
    mpc, _, _ = _controller({"controller.nmpc.corrected_states":
                             ["cambridge_q1", "cambridge_q2"],
                             "controller.nmpc.correction_gain": 0.5,
                             **NO_MEAL_BOLUS})
    model = mpc.model
    x0 = model.initial_state(mpc.theta)
    glucose = x0[model.state_index("cambridge_q1")] / mpc.theta[model.param_index(
        "cambridge_vg")]
    mpc.observe(Reading("cgm", 2 * glucose, "mmol/L", 0.0))
    mpc.decide(0.0, {})
    _, x = mpc._checkpoints[-1]
    for name in ("cambridge_q1", "cambridge_q2"):
        k = model.state_index(name)
        assert x[k] == pytest.approx(x0[k] * math.sqrt(2.0), rel=1e-9)
    k = model.state_index("cambridge_insulin")
    assert x[k] == pytest.approx(x0[k])


def test_the_reference_follows_the_clock_and_the_model_holds_the_patients_basal():
    """reference_schedule: 7.0 mmol/L from 0 h, 6.0 from 3 h, 6.5 from 7 h, 7.0 from 18 h
    (the scenario starts at 06:00); scaled_to_basal: the controller model's steady-state
    basal at basal_target (6.0) is the patient's own (its titrated basal with the rhythm
    off)."""
    from mpc_dose.model.library import load
    from mpc_dose.model.library.diabetes import basal_insulin_rate
    from mpc_dose.model.therapy import at_clock

    mpc, _, patient = _controller()
    reference = mpc._reference
    assert [reference(h * 3600.0) for h in (0.0, 0.999, 1.0, 11.999, 12.0, 20.999, 21.0)] == \
        [6.0, 6.0, 6.5, 6.5, 7.0, 7.0, 6.0]
    lm = load("glucose-cambridge")
    mine = dict(zip(mpc.model.param_names, mpc.theta))
    assert basal_insulin_rate(at_clock(lm.entries, mine, None), 6.0) == pytest.approx(
        basal_insulin_rate(at_clock(lm.entries, patient.params, None), 6.0), rel=1e-5)


def test_the_model_holds_the_patients_carb_ratio_by_one_factor_on_production_and_uptake():
    """scaled_to_carb_ratio: EGP0 and F01 multiplied by one factor, the sensitivities
    re-scaled to the basal, so the controller model's meal-test carbohydrate ratio is the
    patient's own and its basal still is; without the key the ratio is the population's."""
    from mpc_dose.model.library import load
    from mpc_dose.model.library.diabetes import basal_insulin_rate
    from mpc_dose.model.therapy import at_clock, meal_test_carb_ratio, patient_therapy

    lm = load("glucose-cambridge")
    mpc, _, patient = _controller()
    mine = dict(zip(mpc.model.param_names, mpc.theta))
    basal = basal_insulin_rate(at_clock(lm.entries, patient.params, None), 6.0)
    assert basal_insulin_rate(at_clock(lm.entries, mine, None), 6.0) == pytest.approx(
        basal, rel=1e-5)
    theirs = patient_therapy(lm, patient.params, 6.0).carb_ratio_g_per_U

    def ratio(params):
        return meal_test_carb_ratio(mpc.model, at_clock(lm.entries, params, None), basal, 6.0)

    assert ratio(mine) == pytest.approx(theirs, rel=2e-3)
    basal_only, _, _ = _controller({"controller.nmpc.scaled_to_carb_ratio": []})
    before = dict(zip(basal_only.model.param_names, basal_only.theta))
    assert abs(math.log(ratio(before) / theirs)) > 0.05  # the key changed something
    factors = [mine[k] / before[k] for k in ("cambridge_egp0", "cambridge_f01")]
    assert factors[0] == pytest.approx(factors[1], rel=1e-9)
    assert 0.37 < factors[0] < 2.7


def test_the_carb_ratio_factor_stops_at_the_nearer_end_of_its_range():
    """No factor within carb_ratio_factor_range gives the patient's ratio: the end nearer
    it is taken (the basal still matched)."""
    wide, _, _ = _controller()
    narrow, _, _ = _controller({"controller.nmpc.carb_ratio_factor_range": [0.999, 1.001]})
    basal_only, _, _ = _controller({"controller.nmpc.scaled_to_carb_ratio": []})
    k = basal_only.model.param_index("cambridge_egp0")
    wanted = wide.theta[k] / basal_only.theta[k]
    got = narrow.theta[k] / basal_only.theta[k]
    assert got == pytest.approx(0.999 if wanted < 1 else 1.001, rel=1e-9)


@pytest.mark.parametrize("overrides, match", [
    ({"controller.nmpc.scaled_to_basal": []}, "scaled_to_carb_ratio needs scaled_to_basal"),
    ({"controller.nmpc.carb_ratio_factor_range": [1.5, 3.0]},
     r"carb_ratio_factor_range = \[1.5, 3.0\]: expected \[low, high\] with low < 1 < high"),
    ({"controller.nmpc.scaled_to_carb_ratio": ["cambridge_nope"]},
     "controller.nmpc.scaled_to_carb_ratio: .* no parameter .cambridge_nope."),
])
def test_carb_ratio_scaling_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _controller(overrides)


def test_a_costlier_low_side_gives_less_insulin_when_the_prediction_dips():
    """The same state and plan with the low side of the soft window weighted 100x the high
    side, then equal: the asymmetric cost gives less insulin in the first hour."""
    firsts = []
    for low in ((100.0, 100.0), (1.0, 1.0)):
        mpc, _, _ = _controller({"controller.nmpc.soft_low_weights": list(low),
                                 "controller.nmpc.soft_low": "5.5 mmol/L",
                                 **NO_MEAL_BOLUS,
                                 "controller.nmpc.corrected_states": []})
        mpc.observe(Reading("carbohydrate_announced", 60.0, "g", 0.0))
        decision = mpc.decide(0.0, {})
        assert decision.status == "ok"
        plan = mpc._last_plan.plan[:12, mpc.model.input_index("insulin")]
        firsts.append(float(plan.sum()))
    assert firsts[0] < firsts[1]


def test_one_patient_day_of_the_hybrid_closed_loop():
    """scenarios/t1d_nmpc.toml as shipped (its bank included), one patient, one day: every
    announced meal gets one bolus command (the patient's calculator, rounded down to 0.05
    U); a solve that fails (at most 1 % of them) is a result that says so and uses the
    shifted previous plan; every plan names the bank's candidate; no rate above the NMPC's
    5 U/h; the glucose stays between 40 and 400 mg/dL."""
    setup, _ = build_setup(load_scenario(SCENARIO, {"scenario.duration_s": 86400.0}), 1, 0)
    result = run_closed_loop(setup)
    frame = result.to_pandas()
    boluses = [text for _, kind, text in result.events if kind == "bolus"]
    announced = [m for m in setup.meals if m.announced is not None]
    assert len(boluses) == len(announced) >= 3
    reasons = frame.controller_reason.astype(str)
    failed = frame.controller_status == "solver_failed"
    assert failed.mean() <= 0.01
    assert reasons[failed].str.contains("shifted previous plan").all()
    assert reasons[~failed].str.contains("Solve_Succeeded").all()
    # the scenario's online estimation: every plan says which candidate model it used
    assert reasons.str.contains("bank: candidate").all()
    assert (frame.commanded_insulin_rate_U_per_s * 3600.0 <= 5.0 + 1e-6).all()
    glucose = frame.true_glucose_mmol_per_L * 18.016
    assert glucose.min() > 40.0 and glucose.max() < 400.0


def test_meal_boluses_need_a_bolus_pump():
    with pytest.raises(ConfigError, match="max_bolus"):
        _controller({"pump.0.max_bolus": None, "pump.0.bolus_increment": None,
                     "pump.0.bolus_speed": None})


def _cgm(value, t, quality="valid"):
    return Reading("cgm", value, "mmol/L", t, quality)


def test_a_cgm_high_is_a_reading_when_told_and_range_limits_make_no_flat_line():
    """above_range_usable: a HIGH (overflow at 22.2 mmol/L) passes the screen, else it is
    invalid data; 30 LOW readings in a row (underflow at its limit) are no flat line, and
    they do not break one either."""
    told = SafetySupervisor(SafetyConfig(measured="cgm", above_range_usable=True,
                                         below_lloq_usable=True, flatline_samples=20))
    plain = SafetySupervisor(SafetyConfig(measured="cgm"))
    high = _cgm(22.2, 0.0, "overflow")
    assert told.screen(high) == ("", "")
    assert plain.screen(high)[1] == "data.invalid"
    for k in range(30):
        assert told.observe(_cgm(2.22, 300.0 * k, "underflow"))
    assert not told.flat
    for k in range(19):
        told.observe(_cgm(5.0, 300.0 * (30 + k)))
    told.observe(_cgm(2.22, 300.0 * 49, "underflow"))
    told.observe(_cgm(5.0, 300.0 * 50))
    assert told.flat                     # 20 equal valid readings, a LOW between them
    with pytest.raises(ConfigError, match="above_range_usable"):
        SafetyConfig(measured="cgm", above_range_usable="yes")


def test_the_patients_own_settings_reach_every_glucose_reading_of_the_plan():
    """The glucose the NMPC predicts at its first stage starts from the model's glucose at
    the decision (the patient's basal steady state at t = 0: 6.0 mmol/L)."""
    mpc, _, _ = _controller({**NO_MEAL_BOLUS,
                             "controller.nmpc.corrected_states": []})
    mpc.decide(0.0, {})
    predicted = np.asarray(mpc._last_plan.predicted_output)
    assert abs(predicted[0] - 6.0) < 0.5


def test_the_nmpc_cuts_a_meal_bolus_its_plan_sees_driving_glucose_low():
    """meal_bolus_fractions: the NMPC gives the fraction of the calculator's bolus whose
    plan costs least over its 6-h horizon - all of it at a high glucose with nothing on
    board; 40 % when 6 U were just given (the calculator takes insulin on board off its
    correction only, so it asks for the whole meal part again)."""
    chosen = {}
    for glucose, on_board in ((10.0, 0.0), (6.0, 6.0)):
        mpc, _, _ = _controller({"controller.nmpc.meal_bolus_fractions": [0.4, 0.7, 1.0],
                                 "controller.nmpc.horizon": 72,
                                 "controller.nmpc.move_block": 6})
        if on_board:
            mpc.given_bolus(0.0, "insulin", on_board)
        mpc.observe(Reading("cgm", glucose, "mmol/L", 300.0))
        mpc.observe(Reading("carbohydrate_announced", 60.0, "g", 300.0))
        decision = mpc.decide(300.0, {})
        calculator = mpc.meal_boluses.calculator.bolus(60.0, glucose, on_board)
        chosen[on_board] = decision.boluses["insulin"] / calculator
        assert f"NMPC chose {chosen[on_board]:.0%} of it" in decision.reason
    assert chosen == {0.0: pytest.approx(1.0), 6.0: pytest.approx(0.4)}


def test_bolus_fractions_need_meal_boluses():
    with pytest.raises(ConfigError, match="meal_bolus_fractions.*need.*controller.nmpc.meal_bolus"):
        _controller({"controller.nmpc.meal_bolus": None,
                     "controller.nmpc.meal_bolus_fractions": [0.5, 1.0]})
    with pytest.raises(ConfigError, match=r"meal_bolus_fractions"):
        _controller({"controller.nmpc.meal_bolus_fractions": [0.0, 1.0]})


def test_a_model_bank_estimates_online_in_the_scenario():
    """estimator.kind = "bank" from the scenario file: every decision says which candidate
    it planned with; the controller plans with the parameters of the bank's current
    candidate, and the bank's candidates are the controller's own model and draws scaled
    to the patient's basal (so every one holds the same basal)."""
    from mpc_dose.model.library import load
    from mpc_dose.model.library.diabetes import basal_insulin_rate
    from mpc_dose.model.therapy import at_clock

    # the estimator table replaced whole: a bank of whole draws (the scenario's own bank
    # varies tmax_i alone)
    overrides = {"scenario.duration_s": 8 * 3600.0,
                 "controller.nmpc.estimator": {"kind": "bank", "candidates": 4,
                                               "warmup_s": 2 * 3600.0}}
    setup, _ = build_setup(load_scenario(SCENARIO, overrides), 2, 0)
    frame = run_closed_loop(setup).to_pandas()
    mpc = getattr(setup.controller, "controller", setup.controller)
    assert frame.controller_reason.astype(str).str.contains("bank: candidate").all()
    bank = mpc.bank
    np.testing.assert_array_equal(mpc.theta, bank.thetas[bank.current])
    lm = load("glucose-cambridge")
    basals = [basal_insulin_rate(at_clock(lm.entries, dict(zip(mpc.model.param_names, th)),
                                          None), 6.0) for th in bank.thetas]
    assert basals == pytest.approx([basals[0]] * 4, rel=1e-5)
    assert len({tuple(th) for th in bank.thetas}) == 4


def test_the_scenarios_bank_varies_tmax_i_alone_and_matches_each_candidate():
    """scenarios/t1d_nmpc.toml's estimator, ``varied = ["cambridge_tmax_i"]``: its 12
    candidates are the controller's own model with other insulin absorption times, each
    matched to the patient's basal and carb ratio again (to 0.2 %); every parameter
    neither varied nor matched is the controller model's."""
    from mpc_dose.model.library import load
    from mpc_dose.model.library.diabetes import basal_insulin_rate
    from mpc_dose.model.therapy import at_clock, meal_test_carb_ratio, patient_therapy

    mpc, _, patient = _controller(bank=True)
    names = mpc.model.param_names
    thetas = mpc.bank.thetas
    count = len(thetas)
    assert count == 12
    assert len(set(thetas[:, names.index("cambridge_tmax_i")])) == count
    matched = {"cambridge_sit", "cambridge_sid", "cambridge_sie", "cambridge_egp0",
               "cambridge_f01", "cambridge_tmax_i"}
    kept = [k for k, name in enumerate(names) if name not in matched]
    np.testing.assert_array_equal(thetas[1:, kept], np.tile(thetas[0, kept], (count - 1, 1)))
    # a slower insulin needs other sensitivities for the same basal: the match ran again
    assert len(set(thetas[:, names.index("cambridge_sit")])) == count
    lm = load("glucose-cambridge")
    basals = [basal_insulin_rate(at_clock(lm.entries, dict(zip(names, th)), None), 6.0)
              for th in thetas]
    assert basals == pytest.approx([basals[0]] * count, rel=1e-5)
    # and the patient's carb ratio (found by secant steps from the controller model's
    # factor), for the slowest and the fastest candidate
    theirs = patient_therapy(lm, patient.params, 6.0).carb_ratio_g_per_U
    tmax_i = thetas[:, names.index("cambridge_tmax_i")]
    for k in (int(np.argmin(tmax_i)), int(np.argmax(tmax_i))):
        flat = at_clock(lm.entries, dict(zip(names, thetas[k])), None)
        assert meal_test_carb_ratio(mpc.model, flat, basals[0], 6.0) == pytest.approx(
            theirs, rel=2e-3)


@pytest.mark.parametrize("overrides, match", [
    ({"controller.nmpc.estimator.varied": ["cambridge_ag"]},
     r"estimator.varied: 'cambridge_ag' has no population variability"),
    ({"controller.nmpc.estimator.varied": ["cambridge_sit"]},
     r"estimator.varied: 'cambridge_sit' is also matched to the settings"),
    ({"controller.nmpc.estimator": {"kind": "none", "varied": ["cambridge_tmax_i"]}},
     r"estimator: varied: keys of kind = \"bank\", but kind is 'none'")])
def test_a_varied_bank_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _controller(overrides)


def test_a_perfect_model_is_the_virtual_patients_own():
    """perfect_model (in silico only): the controller's model takes the patient's values,
    clock included, not the population's scaled to the basal."""
    mpc, _, patient = _controller({"controller.nmpc.perfect_model": True})
    mine = dict(zip(mpc.model.param_names, mpc.theta))
    assert {k: mine[k] for k in patient.params} == pytest.approx(patient.params, rel=1e-12)
    typical, _, _ = _controller()
    assert typical.theta[typical.model.param_index("cambridge_sit")] != pytest.approx(
        patient.params["cambridge_sit"], rel=1e-3)


def test_perfect_parameters_take_the_patients_values_of_those_alone():
    """perfect_parameters = ["cambridge_tmax_i"] (in silico only): the controller's model
    has the patient's insulin absorption time, the other parameters stay as the match to
    the settings makes them (the sensitivities still give the patient's basal: they differ
    from both the patient's and the model's without the key)."""
    mpc, _, patient = _controller({"controller.nmpc.perfect_parameters": ["cambridge_tmax_i"]})
    plain, _, _ = _controller()
    index = mpc.model.param_index
    assert mpc.theta[index("cambridge_tmax_i")] == pytest.approx(
        patient.params["cambridge_tmax_i"], rel=1e-12)
    assert plain.theta[index("cambridge_tmax_i")] != pytest.approx(
        patient.params["cambridge_tmax_i"], rel=1e-3)
    for name in ("cambridge_sit", "cambridge_egp0"):
        assert mpc.theta[index(name)] != pytest.approx(patient.params[name], rel=1e-3)
        assert mpc.theta[index(name)] != pytest.approx(plain.theta[index(name)], rel=1e-6)
    assert mpc.theta[index("cambridge_vg")] == pytest.approx(
        plain.theta[index("cambridge_vg")], rel=1e-12)


@pytest.mark.parametrize("overrides, match", [
    ({"controller.nmpc.perfect_parameters": ["cambridge_sit"]},
     r"perfect_parameters: 'cambridge_sit' is also matched to the settings"),
    ({"controller.nmpc.perfect_parameters": ["cambridge_nope"]},
     r"perfect_parameters: .*cambridge_nope"),
    ({"controller.nmpc.perfect_parameters": ["cambridge_tmax_i"],
      "controller.nmpc.perfect_model": True},
     r"perfect_parameters: with perfect_model = true .* give one of the two")])
def test_perfect_parameters_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _controller(overrides)


def test_max_insulin_on_board_from_the_scenario_guards_the_nmpc(monkeypatch):
    """``[controller.safety.input.insulin] max_on_board_U = 2`` on scenarios/t1d_nmpc.toml:
    the supervisor gets the limit in U, the pump's programmed basal (0.4 U/h) as what it
    does not count and the insulin curve of the NMPC's meal-bolus settings; over 8 h with
    breakfast (a pump-acked bolus above 2 U) no rate the supervisor passes takes the insulin
    on board above the limit over 30 min, and after the bolus the loop is held at the basal
    (cuts noted in the reasons)."""
    overrides = {"scenario.duration_s": 8 * 3600.0,
                 "controller.safety.input": {"insulin": {"max_on_board_U": 2}}}
    setup, _ = build_setup(load_scenario(SCENARIO, overrides), 1, 0)
    config = setup.safety
    assert config.max_on_board == {"insulin": 2.0}
    assert config.on_board_basal["insulin"] == pytest.approx(0.4 / 3600)
    assert config.on_board_curve.duration_s == 5 * 3600.0
    seen, check = [], SafetySupervisor.check

    def watched(sup, t_s, proposed, last, **kw):
        on_board = sup.on_board(t_s, "insulin")
        verdict = check(sup, t_s, proposed, last, **kw)
        seen.append((t_s, on_board, verdict.rates["insulin"]))
        return verdict

    monkeypatch.setattr(SafetySupervisor, "check", watched)
    result = run_closed_loop(setup)
    basal = 0.4 / 3600
    for t, on_board, rate in seen:
        assert rate <= max(basal, basal + (2.0 - on_board) / 1800.0) + 1e-12, t
    assert max(on_board for _, on_board, _ in seen) > 2.0          # the meal bolus counted
    assert any(on_board > 2.0 and rate <= basal + 1e-12 for _, on_board, rate in seen)
    reasons = result.to_pandas().controller_reason.astype(str)
    assert reasons.str.contains("insulin on board").any()


def test_max_insulin_on_board_needs_an_amount_and_a_programmed_basal():
    overrides = {"controller.safety.input": {"insulin": {"max_on_board_mg": 2}}}
    with pytest.raises(ConfigError, match=r"max_on_board"):
        build_setup(load_scenario(SCENARIO, overrides), 0, 0)
    scenario = load_scenario(SCENARIO, {"controller.safety.input":
                                        {"insulin": {"max_on_board_U": 2}}})
    scenario = scenario.model_copy(update={"pump": [scenario.pump[0].model_copy(
        update={"programmed_basal": None})]})
    with pytest.raises(ConfigError, match=r"input.insulin.max_on_board: needs one \[\[pump\]\] "
                                          r"of input 'insulin' with a programmed_basal"):
        build_setup(scenario, 0, 0)
