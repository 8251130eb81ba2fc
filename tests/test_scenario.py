"""Scenario files: strict validation with dotted paths and suggestions; cohorts."""

import math
from pathlib import Path

import numpy as np
import pytest

from mpc_dose.errors import ConfigError
from mpc_dose.model.library import load
from mpc_dose.plant.cohort import (CovariateDistribution, patient_from_population,
                                   patient_from_row, streams)
from mpc_dose.scenario import load_scenario, parse_scenario
from mpc_dose.trial.build import build_patient, build_setup

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "scenarios"
PID = (SCENARIOS / "pid_induction_13.toml").read_text()


def _write(tmp_path, text):
    path = tmp_path / "s.toml"
    path.write_text(text.replace('path = "data/', f'path = "{REPO}/scenarios/data/'))
    return path


@pytest.mark.parametrize("old, new, match", [
    ("record_step_s = 1", "record_stp_s = 1",
     r"scenario.record_stp_s: unknown key \(did you mean 'record_step_s'\?\)"),
    ("max_rate_ml_per_h = 2500", "max_rate_ml_per_hr = 2500",
     r"pump\[0\].max_rate_ml_per_hr: unknown key \(did you mean 'max_rate_ml_per_h'\?\)"),
    ('setpoint = 50', 'set_point = 50',
     r"controller.pid.set_point: unknown key \(did you mean 'setpoint'\?\)"),
    ("period_s = 1\n\n[controller]", "periode_s = 1\n\n[controller]",
     r"sensor\[0\].periode_s: unknown key.*did you mean 'period_s'"),
    ("duration_s = 600", 'duration_s = "long"', r"scenario.duration_s: .*got 'long'"),
    ("duration_s = 600", "duration_s = -5", r"scenario.duration_s: .*greater than 0"),
    ('kind = "pid"', 'kind = "mpc"', r"controller.kind: .*'pid', 'fixed', 'tci', 'python', 'nmpc', 'nomogram', 'mipd', 'basal_bolus', 'pid_ifb' or 'openaps'"),
])
def test_scenario_errors_name_the_dotted_path(tmp_path, old, new, match):
    """A misspelt key, a wrong type or value fails on load, naming the place and the fix."""
    assert old in PID
    with pytest.raises(ConfigError, match=match):
        load_scenario(_write(tmp_path, PID.replace(old, new, 1)))


@pytest.mark.parametrize("old, new, match", [
    ('concentration = "10 mg/mL"', 'concentration = "10 mg/furlong"', "unknown unit 'furlong'"),
    ('concentration = "10 mg/mL"', 'concentration = "10 mg"', "cannot be converted"),
    ('input = "propofol"\nconcentration', 'input = "propofl"\nconcentration',
     "has no input 'propofl'"),
    ('output = "bis"', 'output = "bispectral"', "has no output 'bispectral'"),
    ('bis_c50p = "C50p_ug_per_mL"', 'bis_c50p = "C50_ug_per_mL"', "no column 'C50_ug_per_mL'"),
])
def test_build_errors_name_the_field(tmp_path, old, new, match):
    """Errors found when building a run name the field and the value."""
    scenario = load_scenario(_write(tmp_path, PID.replace(old, new, 1)))
    with pytest.raises(ConfigError, match=match):
        build_setup(scenario, 0, 0)


def test_missing_and_invalid_files(tmp_path):
    """A missing file or broken TOML is an error naming the file."""
    with pytest.raises(ConfigError, match="cannot read it"):
        load_scenario(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[scenario\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_scenario(bad)


def test_streams_are_reproducible_and_independent():
    """Streams depend on (scenario, seed, index) only, and differ between purposes."""
    a, b = streams("s", 1, 3), streams("s", 1, 3)
    assert a["noise"].random() == b["noise"].random()
    c = streams("s", 1, 3)
    assert c["noise"].random() != c["parameters"].random()
    assert streams("s", 1, 4)["noise"].random() != streams("s", 1, 3)["noise"].random()
    assert streams("t", 1, 3)["noise"].random() != streams("s", 1, 3)["noise"].random()
    with pytest.raises(ConfigError, match="whole numbers >= 0"):
        streams("s", -1, 0)


def test_population_patient_does_not_depend_on_cohort_size():
    """Patient 7 is the same whether drawn alone or among others."""
    lm = load("propofol-eleveld")
    dists = {"age": CovariateDistribution("age", "uniform", 18, 80),
             "height": CovariateDistribution("height", "normal", 140, 200, 170, 10),
             "weight": CovariateDistribution("weight", "uniform", 50, 110),
             "sex": CovariateDistribution("sex", "choice", values=("male", "female"))}
    first = patient_from_population(lm, dists, 7, streams("x", 5, 7)["parameters"],
                                    random_effects=True)
    for k in range(7):
        patient_from_population(lm, dists, k, streams("x", 5, k)["parameters"])
    again = patient_from_population(lm, dists, 7, streams("x", 5, 7)["parameters"],
                                    random_effects=True)
    assert first == again and first.eta


def test_table_rows_map_columns_codes_and_units():
    """A table row gives covariates (with codes and units) and parameter overrides."""
    lm = load("propofol-schnider+remifentanil-minto+bis-bouillon")
    row = {"a": 40, "h": 1.63, "w": 54, "g": "0", "c": 4.73}
    p = patient_from_row(lm, row, {"age": "a", "height_m": "h", "weight_kg": "w", "sex": "g",
                                   "bis_c50p": "c"}, {"sex": {"0": "female", "1": "male"}}, 0,
                         np.random.default_rng(0))
    assert p.covariates == {"age": 40.0, "height": pytest.approx(163.0), "weight": 54.0,
                            "sex": "female"}
    assert p.params["bis_c50p"] == 4.73
    with pytest.raises(ConfigError, match=r"neither a covariate .* nor a model parameter "
                                          r"\(did you mean 'height'\?\)"):
        patient_from_row(lm, row, {"hieght": "h"}, {}, 0, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="has no code"):
        patient_from_row(lm, {**row, "g": "2"}, {"sex": "g"}, {"sex": {"0": "female"}}, 0,
                         np.random.default_rng(0))


def test_population_cohort_from_scenario():
    """A population cohort in a scenario draws reproducible patients with random effects."""
    data = {
        "scenario": {"name": "pop", "duration_s": 60},
        "patient": {"model": "propofol-schnider+bis-propofol", "random_effects": True,
                    "population": {"size": 5, "covariates": {
                        "age": {"kind": "uniform", "low": 20, "high": 60},
                        "height": {"kind": "normal", "mean": 170, "sd": 8, "low": 150,
                                   "high": 195},
                        "weight": {"kind": "uniform", "low": 55, "high": 95},
                        "sex": {"kind": "choice", "values": ["male", "female"]}}}},
        "pump": [{"pump": "p", "input": "propofol", "concentration": "10 mg/mL"}],
        "sensor": [{"output": "bis", "period_s": 5, "noise": "bis"}],
        "controller": {"kind": "pid", "period_s": 5,
                       "pid": {"ratios": {"propofol": 1.0}, "max_rates": {"propofol": 3}}},
    }
    scenario = parse_scenario(data)
    a, b = build_patient(scenario, 3, 11), build_patient(scenario, 3, 11)
    assert a == b and a.eta
    assert build_patient(scenario, 3, 12) != a
    with pytest.raises(ConfigError, match="the cohort has 5 patients"):
        build_patient(scenario, 5, 11)


def test_user_controller_from_a_file(tmp_path):
    """A `python` controller given as file.py:factory runs in the loop with its options."""
    from mpc_dose.trial.closed_loop import run_closed_loop

    text = PID.replace('kind = "pid"', 'kind = "python"').replace(
        '[controller.pid]\nmeasured = "bis"\nsetpoint = 50',
        f'[controller.python]\ntarget = "{REPO}/scenarios/controllers/bang_bang.py:bang_bang"\n'
        'inputs = ["propofol"]\noptions = { high_rate = 2.0, threshold = 60.0 }')
    setup, _ = build_setup(load_scenario(_write(tmp_path, text)), 0, 0)
    frame = run_closed_loop(setup).to_pandas()
    assert set(frame["commanded_propofol_rate_mg_per_s"].dropna()) <= {0.0, 2.0}
    assert (frame["commanded_propofol_rate_mg_per_s"] == 0).any()
    with pytest.raises(ConfigError, match="cannot import"):
        build_setup(load_scenario(_write(tmp_path, text.replace("bang_bang.py", "nope.py"))),
                    0, 0)


def test_falling_renal_function_raises_vancomycin_troughs():
    """A creatinine clearance fall at 48 h lowers clearance from then on (same eta)."""
    from mpc_dose.trial.build import parameter_changes

    scenario = load_scenario(REPO / "scenarios" / "vancomycin_renal_decline.toml")
    patient = build_patient(scenario, 3, 0)
    [(t, params)] = parameter_changes(scenario, patient, 0)
    assert t == 48 * 3600
    ratio = params["vancomycin_cl1"] / patient.params["vancomycin_cl1"]
    assert ratio == pytest.approx((30 / patient.covariates["crcl"]) ** 0.8)
    assert params["vancomycin_v1"] == patient.params["vancomycin_v1"]


def test_occasions_need_inter_occasion_variability(tmp_path):
    """Occasions on a model without inter-occasion variability are refused."""
    text = (REPO / "scenarios" / "vancomycin_renal_decline.toml").read_text().replace(
        "random_effects = true", "random_effects = true\noccasions_s = [86400]").replace(
        'doses = "doses/', f'doses = "{REPO}/scenarios/doses/')
    path = tmp_path / "v.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="declares no inter-occasion variability"):
        build_setup(load_scenario(path), 0, 0)


def test_user_controller_from_a_module():
    """A `package.module:name` target imports like any module."""
    from mpc_dose.control.baselines import FixedRegimen, load_user_controller

    assert load_user_controller("mpc_dose.control.baselines:FixedRegimen") is FixedRegimen
    with pytest.raises(ConfigError, match="has no 'Nope'"):
        load_user_controller("mpc_dose.control.baselines:Nope")
    with pytest.raises(ConfigError, match="expected 'package.module:name'"):
        load_user_controller("no_colon")


# ---------------------------------------------------------------- [controller.safety]

TIVA = REPO / "scenarios" / "tiva_nmpc_training.toml"


def test_nmpc_safety_keys_moved_to_the_safety_table():
    """valid_range, stale_after_s and fallback_rates under [controller.nmpc] are refused
    with a pointer to [controller.safety]."""
    with pytest.raises(ConfigError, match=r"controller\.nmpc: valid_range moved to "
                                          r"\[controller\.safety\]"):
        load_scenario(TIVA, {"controller.nmpc.valid_range": [0, 100]})


@pytest.mark.parametrize("path, overrides, measured, max_rates", [
    ("pid_induction_13.toml", {}, "bis", {"propofol": 6.67, "remifentanil": 16.67}),
    ("tiva_nmpc_training.toml", {}, "bis", {"propofol": 6.67, "remifentanil": 16.67}),
    ("tci_effect_site.toml", {}, None, {"propofol": 3.33}),
    ("fluorouracil_flat.toml", {}, None, {}),
    # a limit per input, with its unit in the key, over the kind's default; 60 mg/min
    ("pid_induction_13.toml", {"controller.safety.input": {"propofol": {
                                   "max_rate_mg_per_min": 60.0}},
                               "controller.safety.stale_after_s": 5.0},
     "bis", {"propofol": 1.0, "remifentanil": 16.67}),
])
def test_safety_defaults_per_kind(path, overrides, measured, max_rates):
    """The supervisor's measured variable and maximum rates default from the controller's
    own table; keys of [controller.safety] win; the rest are SafetyConfig's defaults."""
    from mpc_dose.control.supervisor import SafetyConfig

    setup, _ = build_setup(load_scenario(REPO / "scenarios" / path, overrides), 0, 0)
    safety = setup.safety
    assert safety.measured == measured and dict(safety.max_rates) == max_rates
    assert safety.stale_after_s == overrides.get("controller.safety.stale_after_s",
                                                 SafetyConfig.stale_after_s)
    assert safety.valid_range == ((0.0, 100.0) if "tiva" in path
                                  else SafetyConfig.valid_range)


@pytest.mark.parametrize("overrides, match", [
    ({"controller.safety.input": {"ketamine": {"max_rate_mg_per_s": 1.0}}},
     r"controller\.safety\.input\.ketamine: model .* has no input 'ketamine'"),
    ({"controller.safety.dose_windows": [{"input": "ketamine", "window_s": 60,
                                          "max_amount_mg": 1}]},
     r"controller\.safety\.dose_windows\[0\]\.input: model .* has no input 'ketamine'"),
    ({"controller.safety.measured": "bis_monitor"},
     r"controller\.safety\.measured = 'bis_monitor': no \[\[sensor\]\] sends it"),
    ({"controller.pid.measured": "bsi"}, r"controller\.pid\.measured = 'bsi'"),
    ({"controller.safety.flatline_samples": 1}, r"controller\.safety\.flatline_samples"),
])
def test_safety_table_errors_name_the_field(overrides, match):
    """Inputs the controller does not set and reading variables no sensor sends are errors
    when the scenario is built, naming the key."""
    with pytest.raises(ConfigError, match=match):
        build_setup(load_scenario(REPO / "scenarios" / "pid_induction_13.toml", overrides),
                    0, 0)


def test_nmpc_without_a_sensor_of_its_output_is_an_error():
    """An NMPC whose output no sensor measures would wait forever: an error naming it."""
    with pytest.raises(ConfigError, match=r"controller\.nmpc\.output = 'bis': no \[\[sensor\]\] "
                                          r"measures it"):
        build_setup(load_scenario(TIVA, {"sensor.0.output": "propofol_ce"}), 0, 0)


def test_nmpc_follows_a_sensor_whose_var_differs_from_the_output():
    """A sensor var ('bis_monitor') that is not the output's name ('bis') still drives the
    NMPC and its estimator: it doses and stays in CLOSED_LOOP."""
    from dataclasses import replace

    from mpc_dose.trial.closed_loop import run_closed_loop

    setup, _ = build_setup(load_scenario(TIVA, {"sensor.0.var": "bis_monitor"}), 0, 0)
    assert setup.safety.measured == "bis_monitor" == setup.controller.measured
    result = run_closed_loop(replace(setup, duration_s=60.0))
    frame = result.to_pandas()
    assert frame["commanded_propofol_rate_mg_per_s"].max() > 0.5
    assert frame["controller_reason"].iloc[-1].startswith("CLOSED_LOOP")
    assert len(setup.controller.mhe._samples) == 45  # readings reached the estimator


# ---------------------------------------------------------------- issue 15: wiring
def _fluorouracil_nmpc(**extra):
    """The 5-FU scenario with an NMPC that tracks 1.5 mg/L, reading plasma every 2 h."""
    from mpc_dose.scenario.schema import read_scenario_data, with_overrides

    data = read_scenario_data(SCENARIOS / "fluorouracil_chrono.toml")
    data["sensor"] = [{"output": "fluorouracil_cp", "var": "fu_level", "period_s": 7200.0}]
    data["controller"] = {"kind": "nmpc", "period_s": 3600.0, "nmpc": {
        "output": "fluorouracil_cp", "reference": 1.5, "horizon": 12,
        "input": {"fluorouracil": {"max_rate_mg_per_h": 180.0}},
        "estimator": {"kind": "none"}}}
    data = with_overrides(data, extra)
    return parse_scenario(data, base_dir=str(SCENARIOS))


def test_the_start_clock_reaches_patient_and_controller():
    """Issue 15.8: `scenario.start_clock_h` sets the body clock of the patient's model and of
    the controller's own model alike (the 5-FU scenario's 22:00 start reached the patient but
    not a controller); a start clock no model reads is an error."""
    from mpc_dose.model.spec import CLOCK_PARAM

    setup, patient = build_setup(_fluorouracil_nmpc(), 0, 0)
    assert patient.params[CLOCK_PARAM] == 22.0
    mpc = setup.controller
    assert mpc.theta[mpc.model.param_index(CLOCK_PARAM)] == 22.0
    later, _ = build_setup(_fluorouracil_nmpc(**{"scenario.start_clock_h": 10.0}), 0, 0)
    assert later.controller.theta[mpc.model.param_index(CLOCK_PARAM)] == 10.0
    with pytest.raises(ConfigError, match=r"scenario.start_clock_h = 8.0: nothing of this "
                                          r"scenario reads the clock"):
        build_setup(load_scenario(SCENARIOS / "pid_induction_13.toml",
                                  {"scenario.start_clock_h": 8.0}), 0, 0)


def test_a_loading_dose_before_the_first_reading_is_a_setting():
    """Issue 15.7: by default the supervisor holds every dose until the first reading of the
    measured variable; with `dose_before_first_reading = true` the controller's rates pass
    (clamped) in INIT - a loading dose before any level."""
    from mpc_dose.node import ControllerNode
    from mpc_dose.trial.closed_loop import PlantSide

    for allowed in (False, True):
        scenario = _fluorouracil_nmpc(**{"controller.safety.dose_before_first_reading":
                                         allowed})
        setup, _ = build_setup(scenario, 0, 0)
        node = ControllerNode(setup.controller, PlantSide.routes_for(setup),
                              safety=setup.safety)
        node.tick(0.0)
        assert node.supervisor.mode == "INIT"
        rate = node.commanded["fluorouracil"]
        if allowed:
            assert 0.0 < rate <= 0.05 and "dosing allowed" in node.last_decision.reason
        else:
            assert rate == 0.0 and "waiting" in node.last_decision.reason


def _nmpc_scenario(nmpc: dict, **extra):
    from mpc_dose.scenario.schema import read_scenario_data, with_overrides

    data = read_scenario_data(SCENARIOS / "tiva_nmpc_training.toml")
    data["controller"]["nmpc"].update(nmpc)
    return parse_scenario(with_overrides(data, extra), base_dir=str(SCENARIOS))


@pytest.mark.parametrize("change, match", [
    ({"input": {"propofol": {"max_rate": 6.67}}},
     r"'max_rate' needs its unit in the key: max_rate_<unit>"),
    ({"input": {"propofol": {"max_rate_mL_per_h": 6.67}}},
     r"'max_rate_mL_per_h': 'mL/h' is not an amount per time"),
    ({"input": {"propofol": {"max_rat_mg_per_s": 6.67}}},
     r"unknown key 'max_rat_mg_per_s'.*valid keys here: change_weight, use_weight, "
     r"max_rate_<unit>, max_change_<unit>"),
    ({"input": {"propofol": {"max_rate_mg_per_s": -1}}}, r"expected a finite number >= 0"),
    ({"max_rates": {"propofol": 6.67}},
     r"max_rates: give each input a table \[controller.nmpc.input.NAME\]"),
    ({"input": {"propofol": {"change_weight": 1.0}}},
     r"controller.nmpc.input.propofol: needs max_rate_<unit>"),
    ({"input": {"ketamine": {"max_rate_mg_per_s": 1.0}}},
     r"controller.nmpc.input.ketamine: model .* has no input 'ketamine'"),
])
def test_nmpc_settings_carry_units_in_their_keys(change, match):
    """Issue 15.8: NMPC rates in TOML carried no unit; each input now has a table whose
    quantities name their unit in the key, checked for its kind, with errors naming the key
    and what was expected."""
    with pytest.raises(ConfigError, match=match):
        build_setup(_nmpc_scenario(change), 0, 0)


def test_every_nmpc_setting_reaches_the_controller_in_its_units():
    """Issue 15.8: windows on another output, hard and terminal windows, intermittent dosing,
    dose windows and the optimiser's settings are reachable from the scenario file, converted
    to each input's amount unit; what is not given takes NMPCConfig's (and MHEConfig's) own
    default, declared once (15.6: the schema's 200 vs 100 soft weights, 120 vs 60 window)."""
    from mpc_dose.control.mhe import MHEConfig
    from mpc_dose.control.nmpc import NMPCConfig

    scenario = _nmpc_scenario({
        "input": {"propofol": {"max_rate_mg_per_h": 3600.0, "max_change_mg_per_min": 30.0,
                               "change_weight": 5.0},
                  "remifentanil": {"max_rate_ug_per_min": 600.0}},
        "hard_low": 30.0, "terminal_low": 45.0, "terminal_high": 55.0,
        "window_output": "bis", "move_block": 1,
        "dose_windows": [{"input": "propofol", "window_h": 1, "max_amount_g": 1.5}],
        "max_iter": 17, "soft_weights": None}, **{"controller.nmpc.estimator.window": None})
    data = scenario.controller.nmpc.model_dump()
    assert data["soft_weights"] is None
    setup, _ = build_setup(scenario, 0, 0)
    config = setup.controller.mpc.config
    assert config.rate_bounds == {"propofol": (0.0, 1.0), "remifentanil": (0.0, 10.0)}
    assert config.max_change == {"propofol": 0.5}
    assert config.change_weights == {"propofol": 5.0}
    assert config.hard_window == (30.0, math.inf)
    assert config.terminal_window == (45.0, 55.0)
    assert config.max_iter == 17
    assert config.dose_windows == (("propofol", 3600.0, 1500.0),)
    assert config.soft_weights == NMPCConfig.__dataclass_fields__["soft_weights"].default
    assert setup.controller.mhe.config.window == \
        MHEConfig.__dataclass_fields__["window"].default
    assert setup.safety.max_rates == {"propofol": 1.0, "remifentanil": 10.0}


def test_a_value_with_a_unit_is_accepted_where_a_number_is():
    """Issue 16.7: `reference = "70 mmHg"` was refused while 7000 was taken; output values
    take their unit ("0.05 ug/mL" of propofol is 50 ng/mL: converted), AUC values a unit of
    concentration x time; a drug concentration needs its unit ("10" could be mg/mL or
    mg/L), and a unit of the wrong kind is an error naming the key."""
    setup, _ = build_setup(_nmpc_scenario({"reference": "0.5 1", "soft_low": "51.75"}), 0, 0)
    assert setup.controller.mpc.config.reference == 0.5
    assert setup.controller.mpc.config.soft_window[0] == 51.75
    vanco = load_scenario(SCENARIOS / "vancomycin_nmpc.toml",
                          {"controller.nmpc.auc_target": "30000 mg.min/L",
                           "controller.nmpc.auc_soft_low": "0.4 g.h/L"})
    config = build_setup(vanco, 0, 0)[0].controller.mpc.config
    assert config.auc_target == pytest.approx(500.0)
    assert config.auc_soft_window[0] == pytest.approx(400.0)
    vanco = load_scenario(SCENARIOS / "vancomycin_nmpc.toml",
                          {"sensor.0.lloq": "2000 ug/L", "sensor.0.additive_sd": "0.34 ug/mL",
                           "controller.safety.valid_range": [0, "1 g/L"]})
    setup = build_setup(vanco, 0, 0)[0]
    assert setup.sensors[0].lloq == pytest.approx(2.0)
    assert setup.sensors[0].additive_sd == pytest.approx(0.34)  # ug/mL = mg/L
    assert setup.safety.valid_range == pytest.approx((0.0, 1000.0))
    with pytest.raises(ConfigError, match=r"controller.nmpc.reference: unit 'mmHg'"):
        build_setup(_nmpc_scenario({"reference": "70 mmHg"}), 0, 0)
    with pytest.raises(ConfigError, match=r"pump\[0\]\.concentration = '10': give its unit"):
        build_setup(load_scenario(SCENARIOS / "pid_induction_13.toml",
                                  {"pump.0.concentration": "10"}), 0, 0)


def test_metrics_target_and_window_take_values_with_units():
    """Issue 16.7: ``[metrics] target = "70 mmHg"`` is taken like 70 (the output's unit);
    another unit is converted and a unit of another kind is refused, naming the key."""
    from mpc_dose.trial.build import metrics_target

    path = Path(__file__).resolve().parents[1] / "scenarios" / "norepinephrine_nmpc.toml"
    given = load_scenario(path, {"metrics.target": "70 mmHg",
                                 "metrics.window": ["65 mmHg", 75]})
    assert metrics_target(given) == (70.0, (65.0, 75.0))
    with pytest.raises(ConfigError, match=r"metrics\.target"):
        metrics_target(load_scenario(path, {"metrics.target": "70 mg/L"}))
    with pytest.raises(ConfigError, match=r"metrics\.window: expected low < high"):
        metrics_target(load_scenario(path, {"metrics.window": ["75 mmHg", "65 mmHg"]}))
