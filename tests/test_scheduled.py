"""Dosing by rule on a clock: rounding, the printed vancomycin nomogram with trough-guided
adjustment, and both standard-practice kinds (nomogram, Bayesian MIPD) from scenario files."""

from __future__ import annotations

import math

import pytest

from mpc_dose.control.base import Reading
from mpc_dose.control.scheduled import NomogramBand, NomogramController, round_dose
from mpc_dose.errors import ConfigError
from mpc_dose.scenario import load_scenario
from mpc_dose.trial.build import build_setup
from mpc_dose.trial.closed_loop import run_closed_loop

H = 3600.0
#: Bugs & Drugs (Alberta) vancomycin nomogram, trough target 15-20 mg/L column
#: (therapy-and-device-anchors.md 1(c) SOC-A)
BANDS = [NomogramBand(80, 8 * H), NomogramBand(40, 12 * H), NomogramBand(20, 24 * H),
         NomogramBand(10, 48 * H), NomogramBand(0, None)]
ROUNDING = [(500.0, 50.0), (math.inf, 250.0)]


@pytest.mark.parametrize("amount, expected", [(1124, 1000), (1125, 1250), (1376, 1500),
                                              (474, 450), (475, 500), (499, 500), (24, 0)])
def test_round_dose_follows_the_source_rule(amount, expected):
    """Nearest 50 mg under 500 mg, else nearest 250 mg (ties up)."""
    assert round_dose(amount, ROUNDING) == expected


def nomogram(crcl=90.0, weight=70.0, **kw):
    options = dict(input="vancomycin", measured="level", bands=BANDS, band_covariate="crcl",
                   weight_covariate="weight", covariates={"crcl": crcl, "weight": weight},
                   loading_per_kg=25.0, maintenance_per_kg=15.0, infusion_s=H, period_s=H,
                   rounding=ROUNDING, max_dose=2000.0, trough_target=17.5, trough_low=15.0,
                   trough_high=20.0)
    options.update(kw)
    return NomogramController(**options)


def doses_until(c, end_h):
    for k in range(int(end_h)):
        c.decide(k * H, {})
    return [(t / H, amount) for t, amount, _ in c.doses]


@pytest.mark.parametrize("crcl, interval_h", [(120, 8), (80, 8), (79.9, 12), (40, 12),
                                               (39, 24), (20, 24), (15, 48)])
def test_the_interval_is_the_band_of_the_creatinine_clearance(crcl, interval_h):
    """70 kg: loading 25 mg/kg = 1750 mg, then 15 mg/kg = 1050 -> 1000 mg at the band's
    interval."""
    doses = doses_until(nomogram(crcl), 2 * interval_h + 1)
    assert doses[0] == (0.0, 1750.0)
    assert doses[1:] == [(interval_h, 1000.0), (2 * interval_h, 1000.0)]


def test_caps_and_rounding_and_the_consult_band():
    """150 kg: 15 mg/kg = 2250 mg is capped at 2000 mg; CrCL < 10: the loading dose only."""
    assert doses_until(nomogram(90, 150), 9)[1] == (8.0, 2000.0)
    assert [a for _, a in doses_until(nomogram(5, 70), 100)] == [1750.0, 0.0, 0.0, 0.0, 0.0]


def test_a_steady_state_trough_outside_the_range_scales_the_dose():
    """q12h (CrCL 60): the trough before the 4th dose (35.5 h) of 25 mg/L turns 1000 mg into
    1000 x 17.5/25 = 700 -> 750 mg; a trough in range, or one before steady state, changes
    nothing."""
    c = nomogram(60)
    doses_until(c, 24)                                    # doses at 0, 12 h
    c.observe(Reading("level", 30.0, "mg/L", 23.5 * H))   # before the 3rd dose: not yet
    c.decide(24 * H, {})
    c.observe(Reading("level", 25.0, "mg/L", 35.5 * H))   # before the 4th: steady state
    for k in range(25, 50):
        c.decide(k * H, {})
    amounts = [a for _, a, _ in c.doses]
    assert amounts == [1750.0, 1000.0, 1000.0, 750.0, 750.0]
    assert c.adjustments == [(36 * H, 25.0, 1000.0, 700.0)]
    in_range = nomogram(60)
    doses_until(in_range, 36)
    in_range.observe(Reading("level", 17.0, "mg/L", 35.5 * H))
    for k in range(36, 50):
        in_range.decide(k * H, {})
    assert [a for _, a, _ in in_range.doses] == [1750.0, 1000.0, 1000.0, 1000.0, 1000.0]


def test_a_new_creatinine_clearance_changes_the_interval_from_the_next_dose():
    """CrCL 90 -> 30 mL/min at 20 h: q8h until then, q24h after (the next dose due at 24 h
    starts it)."""
    c = nomogram(90)
    c.covariates_from(20 * H, {"crcl": 30.0})
    starts = [t for t, _ in doses_until(c, 73)]
    assert starts == [0.0, 8.0, 16.0, 24.0, 48.0, 72.0]


def test_bad_nomograms_are_refused():
    with pytest.raises(ConfigError, match="trough_target, trough_low and trough_high"):
        nomogram(trough_low=None)
    with pytest.raises(ConfigError, match="covariate 'crcl' = None; expected a number"):
        nomogram(covariates={"weight": 70.0})
    with pytest.raises(ConfigError, match="must be a multiple of the controller period"):
        nomogram(period_s=7 * 60)


def _scenario(tmp_path, kind_table: str, kind: str):
    text = (REPO / "scenarios" / "vancomycin_nmpc.toml").read_text()
    head = text.split("[controller]")[0]
    (tmp_path / "s.toml").write_text(
        head + f'[controller]\nkind = "{kind}"\nperiod_s = 3600\n\n[controller.safety]\n'
        'dose_before_first_reading = true\nbelow_lloq_usable = true\nstale_after_s = 172800\n\n'
        + kind_table + '\n[metrics]\noutput = "vancomycin_cp"\nclinical = "auc"\n')
    return load_scenario(tmp_path / "s.toml")


from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOMOGRAM = """[controller.nomogram]
input = "vancomycin"
output = "vancomycin_cp"
infusion_s = 3600
dose_clock_h = 8.0
band_covariate = "crcl"
loading_dose_mg_per_kg = 25
maintenance_dose_g_per_kg = 0.015
max_dose_mg = 2000
rounding = [{below_mg = 500, step_mg = 50}, {step_g = 0.25}]
band = [{at_least = 80, interval_h = 8}, {at_least = 40, interval_h = 12}, {at_least = 0}]
trough_target = "17.5 mg/L"
trough_low = "15 mg/L"
trough_high = "0.02 g/L"
"""


def test_the_nomogram_from_a_scenario_doses_through_the_pumps(tmp_path):
    """The scenario's patients (CrCL 85-95, AKI to 30 mL/min at 48 h): 25 mg/kg at 08:00,
    15 mg/kg q8h, units converted (g/kg, g, g/L); what the pumps delivered is the plan."""
    setup, patient = build_setup(_scenario(tmp_path, NOMOGRAM, "nomogram"), 0, 0)
    result = run_closed_loop(setup)
    c = setup.controller
    weight = patient.covariates["weight"]
    assert c.doses[0][1] == round_dose(25 * weight, ROUNDING)
    assert [t / H for t, _, _ in c.doses[:4]] == [0.0, 8.0, 16.0, 24.0]
    assert c.trough_high == pytest.approx(20.0)
    steps = [(t, rate) for t, _, rate, _ in result.deliveries] + [(96 * H, 0.0)]
    given = sum(rate * (t1 - t0) for (t0, rate), (t1, _) in zip(steps, steps[1:]))
    assert given == pytest.approx(sum(a for t, a, _ in c.doses if t + H <= 96 * H), rel=1e-6)


def test_bayesian_mipd_from_a_scenario_learns_and_doses(tmp_path):
    """kind = "mipd": a loading dose from the prior, capped at 3000 mg, then doses for an
    AUC24 of 500 mg.h/L in 250-mg steps from the MAP estimate of the levels back."""
    table = """[controller.mipd]
input = "vancomycin"
output = "vancomycin_cp"
infusion_s = 3600
dose_clock_h = 8.0
dose_interval_s = 43200
auc_target = "500 mg*h/L"
max_dose_mg = 2000
loading_dose_max_mg = 3000
rounding = [{step_mg = 250}]

[controller.mipd.estimator]
kind = "map"
parameters = ["vancomycin_cl1", "vancomycin_v1"]
"""
    setup, _ = build_setup(_scenario(tmp_path, table, "mipd"), 1, 0)
    run_closed_loop(setup)
    c = setup.controller
    amounts = [a for _, a, _ in c.doses]
    assert amounts[0] > amounts[1] and amounts[0] <= 3000
    assert all(a % 250 == 0 and a <= 2000 for a in amounts[1:])
    assert c.last_estimate is not None and c.last_estimate.success
    assert "MAP of" in c.doses[-1][2]
    with pytest.raises(ConfigError, match=r"controller\.mipd\.estimator\.kind = 'ekf'"):
        build_setup(_scenario(tmp_path, table.replace('kind = "map"', 'kind = "ekf"'),
                              "mipd"), 0, 0)
    with pytest.raises(ConfigError, match=r"controller\.mipd\.output = 'nope': no \[\[sensor\]\] "
                                          r"measures it"):
        build_setup(_scenario(tmp_path, table.replace('output = "vancomycin_cp"',
                                                      'output = "nope"'), "mipd"), 0, 0)


def test_random_covariate_changes_are_drawn_per_patient_and_shared_by_a_cohort(tmp_path):
    """An AKI in 30 % of patients at a time drawn in 24-96 h halving CrCL, and a recovery
    (x 1.5) in 50 % of them: the share and the times follow the spec, the factors compose
    in time order, and two scenarios of one cohort give each patient the same changes."""
    from mpc_dose.trial.build import build_patient, covariate_changes

    text = (REPO / "scenarios" / "vancomycin_nmpc.toml").read_text()
    text = text.replace("[[covariate_change]]\ntime_s = 172800               # 48 h\n"
                        "covariates = { crcl = 30 }\n",
                        "[[covariate_change]]\ntime_range_s = [86400, 345600]\n"
                        "probability = 0.3\nscale = { crcl = 0.5 }\n\n"
                        "[[covariate_change]]\ntime_range_s = [86400, 345600]\n"
                        "probability = 0.5\nscale = { crcl = 1.5 }\n").replace(
        "size = 100", "size = 400")
    (tmp_path / "a.toml").write_text(text)
    (tmp_path / "b.toml").write_text(text.replace('kind = "nmpc"', 'kind = "fixed"'))
    a, b = load_scenario(tmp_path / "a.toml"), load_scenario(tmp_path / "b.toml")
    halved = raised = 0
    for index in range(400):
        patient = build_patient(a, index, 0)
        changes = covariate_changes(a, patient, 0)
        assert changes == covariate_changes(b, build_patient(b, index, 0), 0)
        crcl = patient.covariates["crcl"]
        for t, values in changes:
            assert 86400 <= t <= 345600
            ratio = values["crcl"] / crcl
            assert ratio == pytest.approx(0.5) or ratio == pytest.approx(1.5)
            halved += ratio == pytest.approx(0.5)
            raised += ratio == pytest.approx(1.5)
            crcl = values["crcl"]
    assert 0.3 * 400 - 30 < halved < 0.3 * 400 + 30      # binomial: sd 9
    assert 0.5 * 400 - 35 < raised < 0.5 * 400 + 35      # sd 10
    with pytest.raises(Exception, match="give either time_s or time_range_s"):
        load_scenario(tmp_path / "a.toml", {"covariate_change": [{"scale": {"crcl": 0.5}}]})


def test_the_trial_s_clinical_auc_figures_on_hand_worked_days():
    """7 days at 20 mg/L (AUC24 480: in 400-600), then the same at 30 mg/L (720: above 600,
    not 800; troughs above 20), and 10 mg/L for two days then 25 mg/L (240, 240, 600...)."""
    import numpy as np

    from mpc_dose.trial.metrics import auc_attainment

    t = np.arange(0.0, 7 * 86400.0 + 1, 600.0)
    at20 = auc_attainment(t, np.full(t.size, 20.0))
    assert at20["auc24_days"] == 7 and at20["auc24_first_mg_h_per_L"] == pytest.approx(480)
    assert (at20["auc24_in_target_day1_pct"], at20["auc24_in_target_day2_pct"],
            at20["auc24_in_target_days3to7_pct"]) == (100.0, 100.0, 100.0)
    assert at20["auc24_in_target_first_day"] == 1 and at20["auc24_above_600_days"] == 0
    at30 = auc_attainment(t, np.full(t.size, 30.0))
    assert at30["auc24_in_target_pct"] == 0 and math.isnan(at30["auc24_in_target_first_day"])
    assert at30["auc24_above_600_days"] == 7 and at30["auc24_above_800_days"] == 0
    assert at30["days_minimum_above_20_mg_per_L"] == 7
    late = auc_attainment(t, np.where(t < 2 * 86400.0, 10.0, 25.0))
    # day 3 starts at 48 h: its first point is 25 mg/L, the 24 h after it 600 (in target)
    assert late["auc24_in_target_day1_pct"] == 0 and late["auc24_in_target_day2_pct"] == 0
    assert late["auc24_in_target_first_day"] == 3
    assert late["auc24_in_target_days3to7_pct"] == 100.0


@pytest.mark.parametrize("auc24, above_600, above_800", [(600.0, 0, 0), (600.5, 1, 0),
                                                         (800.0, 1, 0), (800.5, 1, 1)])
def test_exposure_thresholds_are_strict(auc24, above_600, above_800):
    """A day at exactly 600 or 800 mg.h/L is not above it."""
    import numpy as np

    from mpc_dose.trial.metrics import auc_attainment

    t = np.arange(0.0, 25.0) * 3600.0
    m = auc_attainment(t, np.full(t.size, auc24 / 24.0))
    assert (m["auc24_above_600_days"], m["auc24_above_800_days"]) == (above_600, above_800)


MEALS = """
[meals]
input = "vancomycin"

[[meals.meal]]
clock_h = 12.0
amount_mg = 500
time_sd_min = 20
amount_cv = 0.1
count_error_cv = 0.2

[[meals.meal]]
clock_h = 16.0
amount_g = 0.1
probability = 0.3
announced = false
"""


def test_meals_are_drawn_per_patient_day_and_enter_the_patient(tmp_path):
    """Issue 18.2 (the plant side): a daily meal at 12:00 (+-20 min, CV 10 %, counted with a
    20 % error) and a snack at 16:00 on 30 % of days, given as boluses of a model input no
    pump delivers; the draws are the patient's own, the same in every scenario of a cohort;
    each meal reaches the patient whole (the bolus state jumps by its amount)."""
    import numpy as np

    from mpc_dose.trial.build import build_patient, meal_schedule

    text = (REPO / "scenarios" / "vancomycin_nmpc.toml").read_text() + MEALS
    (tmp_path / "m.toml").write_text(text.replace("duration_s = 345600", "duration_s = 3456000"))
    scenario = load_scenario(tmp_path / "m.toml")
    meals = meal_schedule(scenario, build_patient(scenario, 0, 0), 0)
    lunches = [m for m in meals if m.announced is not None]
    snacks = [m for m in meals if m.announced is None]
    assert len(lunches) == 40 and 4 <= len(snacks) <= 20          # 40 days; 30 % of them
    clock = np.array([(m.t_s / 3600.0 + 8.0) % 24.0 for m in lunches])  # start at 08:00
    assert abs(clock.mean() - 12.0) < 0.15 and 0.2 < clock.std() < 0.5
    sizes = np.array([m.amount for m in lunches])
    assert abs(sizes.mean() / 500.0 - 1.0) < 0.06 and 0.06 < sizes.std() / 500.0 < 0.15
    errors = np.array([m.announced / m.amount for m in lunches])
    assert 0.1 < np.log(errors).std() < 0.3
    assert all(m.amount == pytest.approx(100.0) for m in snacks)  # 0.1 g = 100 mg, no CV
    again = meal_schedule(scenario, build_patient(scenario, 0, 0), 0)
    assert [(m.t_s, m.amount) for m in again] == [(m.t_s, m.amount) for m in meals]
    # the first meal enters the patient whole, without any pump
    setup, _ = build_setup(load_scenario(tmp_path / "m.toml", {
        "scenario.duration_s": 86400, "controller.safety.dose_before_first_reading": False}),
        0, 0)
    first = setup.meals[0]
    from mpc_dose.plant.patient import VirtualPatient

    patient = VirtualPatient(setup.model, setup.params)
    before = patient.x.sum()
    patient.give_bolus(first.t_s, setup.model.input_index("vancomycin"), first.amount)
    # vancomycin's states are amounts [mg]: the body holds what it held plus the meal
    assert float(patient.x.sum() - before) == pytest.approx(first.amount, rel=1e-9)
    result = run_closed_loop(setup)
    assert any(kind == "meal" for _, kind, _ in result.events)
    # an announced meal reaches the controller as a reading of what the patient entered [g]
    told = result.samples_frame()
    told = told[told["var"] == "vancomycin_announced"]
    announced = [m for m in setup.meals if m.announced is not None]
    assert list(told.t_meas_s) == [m.t_s for m in announced]
    assert list(told.value) == pytest.approx([m.announced / 1000.0 for m in announced])
    assert set(told.unit) == {"g"}
    with pytest.raises(ConfigError, match=r"meals\.meal\[0\]: 'amount_mL': 'mL' is not an "
                                          r"amount"):
        load_scenario(tmp_path / "m.toml", {"meals.meal": [{"clock_h": 12, "amount_mL": 5}]})
    with pytest.raises(ConfigError, match=r"meals\.input: model 'vancomycin-goti' has no "
                                          r"input 'carbs'"):
        meal_schedule(load_scenario(tmp_path / "m.toml", {"meals.input": "carbs"}),
                      build_patient(scenario, 0, 0), 0)
