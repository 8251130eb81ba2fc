"""The Cambridge glucose-insulin model (Hovorka 2004) with the Wilinska 2010 population and a
dawn rhythm of glucose production: steady state, meal mass balance, published values,
reproducible cohorts, and errors."""

import math

import numpy as np
import pytest

from mpc_dose.errors import ModelError
from mpc_dose.model.dosing import Dose
from mpc_dose.model.library import load
from mpc_dose.model.library.diabetes import (WILINSKA_CV, WILINSKA_LOG_SD, basal_insulin_rate,
                                             steady_state_insulin)
from mpc_dose.model.simulation import simulate
from mpc_dose.plant.cohort import CovariateDistribution, patient_from_population, streams
from mpc_dose.units import GLUCOSE, convert_substance

DAY_S = 86400.0
NAME = "glucose-cambridge"


@pytest.fixture(scope="module")
def cambridge():
    return load(NAME)


def typical(cambridge, weight=70.0, amplitude=0.0, **changes):
    params = cambridge.population.typical_parameters({"weight": weight})
    params["cambridge_egp0_amplitude_1"] = amplitude
    params.update(changes)
    return params


def insulin_by_hand(params, glucose):
    """The steady state of Hovorka 2004's equations solved for plasma insulin, written out
    independently of the library: x1 = SIT I, x2 = SID I, x3 = SIE I, Q2 = x1 Q1/(k12 + x2)
    and dQ1/dt = 0 give a quadratic in I."""
    p = {k.removeprefix("cambridge_"): v for k, v in params.items()}
    q1 = glucose * p["vg"]
    f01c = p["f01"] * min(1.0, glucose / 4.5)
    renal = 0.003 * max(0.0, glucose - 9.0) * p["vg"]
    egp0, k12, sit, sid, sie = p["egp0"], p["k12"], p["sit"], p["sid"], p["sie"]
    roots = np.roots([sid * (egp0 * sie + sit * q1),
                      (f01c + renal - egp0) * sid + egp0 * sie * k12,
                      (f01c + renal - egp0) * k12])
    return max(r.real for r in roots if abs(r.imag) < 1e-12)


def test_published_nominal_values(cambridge):
    """The fixed effects are Hovorka 2004's Table 1 values (per kg where the paper gives them
    per kg) and a 70-kg patient's volumes and fluxes scale with weight."""
    theta = cambridge.population.theta
    published = {"hovorka_k12": 0.066, "hovorka_ka1": 0.006, "hovorka_ka2": 0.06,
                 "hovorka_ka3": 0.03, "hovorka_sit": 51.2e-4, "hovorka_sid": 8.2e-4,
                 "hovorka_sie": 520e-4, "hovorka_ke": 0.138, "hovorka_vi_per_kg": 0.12,
                 "hovorka_vg_per_kg": 0.16, "hovorka_f01_per_kg": 0.0097,
                 "hovorka_egp0_per_kg": 0.0161, "hovorka_ag": 0.8, "hovorka_tmax_g": 40.0,
                 "hovorka_tmax_i": 55.0, "hovorka_renal_threshold": 9.0,
                 "hovorka_renal_clearance": 0.003, "hovorka_f01_threshold": 4.5,
                 "wilinska_interstitial_tau": 15.0}
    for name, value in published.items():
        assert theta[name] == value, name
    p70, p35 = typical(cambridge, 70.0), typical(cambridge, 35.0)
    assert p70["cambridge_vg"] == pytest.approx(0.16 * 70)
    assert p70["cambridge_egp0"] == pytest.approx(0.0161 * 70)
    for name in ("vg", "vi", "f01", "egp0"):
        assert p70[f"cambridge_{name}"] == pytest.approx(2 * p35[f"cambridge_{name}"])
    assert p70["cambridge_sit"] == p35["cambridge_sit"]


def test_basal_rate_is_the_closed_form_steady_state(cambridge):
    """The library's basal rate equals I VI ke with I solved by hand from the steady-state
    equations, in each declared unit (mU/min and U/h differ by 60/1000)."""
    params = typical(cambridge)
    for glucose in (4.0, 6.0, 10.0):  # below F01's threshold, between, above the renal one
        insulin = insulin_by_hand(params, glucose)
        assert steady_state_insulin(params, glucose) == pytest.approx(insulin, rel=1e-10)
        by_hand_mu_per_min = insulin * params["cambridge_vi"] * params["cambridge_ke"]
        assert basal_insulin_rate(params, glucose, unit="mU/min") == \
            pytest.approx(by_hand_mu_per_min, rel=1e-10)
        assert basal_insulin_rate(params, glucose) == \
            pytest.approx(by_hand_mu_per_min * 60 / 1000, rel=1e-10)


@pytest.mark.parametrize("glucose", [5.0, 6.0, 10.0])
def test_basal_rate_holds_glucose_for_a_day_without_rhythm(cambridge, glucose):
    """With the rhythm off, the closed-form basal rate holds the basal glucose (and the
    interstitial glucose beside it) constant for 24 h."""
    params = typical(cambridge, cambridge_basal_glucose=glucose)
    rate_u_per_h = basal_insulin_rate(params, glucose)
    result = simulate(cambridge.model, params,
                      [Dose.infusion(0.0, "insulin", rate_u_per_h / 3600, DAY_S)],
                      np.arange(0.0, DAY_S + 1, 600.0))
    assert np.max(np.abs(result.output("glucose") - glucose)) < 1e-6
    assert np.max(np.abs(result.output("interstitial_glucose") - glucose)) < 1e-6


def test_basal_rate_off_by_ten_percent_does_not_hold(cambridge):
    """The steady-state test can fail: 10 % more insulin than the closed form lowers glucose
    by more than 0.3 mmol/L within a day."""
    params = typical(cambridge)
    rate_u_per_h = 1.1 * basal_insulin_rate(params, 6.0)
    result = simulate(cambridge.model, params,
                      [Dose.infusion(0.0, "insulin", rate_u_per_h / 3600, DAY_S)], [DAY_S])
    assert result.output("glucose")[-1] < 6.0 - 0.3


def test_dawn_amplitude_reproduces_perriello(cambridge):
    """The declared EGP0 amplitude makes the nominal patient's steady-state insulin need at
    the EGP peak / trough equal Perriello 1991's 0.135 / 0.102 mU/kg/min (held at 5.5)."""
    params = typical(cambridge)
    amplitude = cambridge.population.theta["perriello_egp_amplitude"]
    egp0 = params["cambridge_egp0"]
    need = [steady_state_insulin({**params, "cambridge_egp0": egp0 * (1 + s * amplitude)}, 5.5)
            for s in (1, -1)]
    assert need[0] / need[1] == pytest.approx(0.135 / 0.102, rel=0.01)


def test_rhythm_on_oscillates_with_the_published_phase(cambridge):
    """With the dawn rhythm on and the mesor's basal rate, glucose oscillates every 24 h;
    its daily peak follows the EGP peak at 06:40 by less than a quarter period (a lagged
    response) and its trough comes about 12 h after the peak."""
    params = typical(cambridge, amplitude=cambridge.population.theta["perriello_egp_amplitude"])
    rate_u_per_h = basal_insulin_rate(params, params["cambridge_basal_glucose"])
    result = simulate(cambridge.model, params,
                      [Dose.infusion(0.0, "insulin", rate_u_per_h / 3600, 4 * DAY_S)],
                      np.arange(0.0, 4 * DAY_S + 1, 300.0))
    day3, day4 = (result.output("glucose")[k * 288:(k + 1) * 288] for k in (2, 3))
    assert np.max(np.abs(day3 - day4)) < 0.1  # periodic by day 3
    clock_h = np.arange(288) * 5 / 60
    peak_h, trough_h = clock_h[day4.argmax()], clock_h[day4.argmin()]
    assert 6.667 < peak_h < 6.667 + 6.0
    assert abs((trough_h - peak_h) % 24 - 12.0) < 1.5
    assert day4.max() - day4.min() > 1.0


def test_meal_mass_balance(cambridge):
    """The integral of the gut's glucose appearance equals AG times the carbohydrate eaten,
    and its shape is Hovorka's AG D t exp(-t/tmaxG)/tmaxG^2."""
    params = typical(cambridge)
    meal_g, eaten_at_s = 60.0, 3600.0
    rate_u_per_h = basal_insulin_rate(params, 6.0)
    times = np.arange(0.0, 12 * 3600 + 1, 30.0)
    result = simulate(cambridge.model, params,
                      [Dose.infusion(0.0, "insulin", rate_u_per_h / 3600, 12 * 3600),
                       Dose.bolus(eaten_at_s, "carbohydrate", meal_g)], times)
    appearance = result.output("meal_glucose_appearance")  # g/min
    absorbed_g = np.trapezoid(appearance, times / 60)
    tail_g = params["cambridge_ag"] * meal_g * (1 + 660 / 40) * math.exp(-660 / 40)
    assert absorbed_g + tail_g == pytest.approx(0.8 * meal_g, rel=1e-4)
    t_min = np.clip(times - eaten_at_s, 0, None) / 60
    expected = 0.8 * meal_g * t_min * np.exp(-t_min / 40) / 40**2
    assert np.max(np.abs(appearance - expected)) < 1e-6 * meal_g
    assert result.output("glucose").max() > 6.0 + 2.0  # an unbolused meal raises glucose


def test_glucose_units():
    """mmol/L and mg/dL of glucose convert through 180.16 g/mol (18.016 mg/dL per mmol/L)."""
    assert convert_substance(1.0, "mmol/L", "mg/dL", GLUCOSE) == pytest.approx(18.016)
    assert convert_substance(180.0, "mg/dL", "mmol/L", GLUCOSE) == pytest.approx(9.991, abs=1e-3)


def test_same_seed_same_patients(cambridge):
    """A patient is reproducible from (scenario, seed, index) and differs between indices."""
    weight = {"weight": CovariateDistribution("weight", "normal", 40.0, 150.0, mean=74.9, sd=12)}

    def draw(index):
        rng = streams("t1d", 7, index)["parameters"]
        return patient_from_population(cambridge, weight, index, rng)

    assert draw(3).params == draw(3).params
    assert draw(3).params != draw(4).params


def test_population_variability_matches_wilinska(cambridge):
    """Over 2000 draws the log-SD of each parameter is Wilinska 2010's (as a CV: sqrt(ln(1 +
    CV^2))) within sampling error, and the median is the Hovorka 2004 nominal value."""
    from dataclasses import replace

    # the declared variability, before implausible draws are drawn again (that truncation
    # narrows EGP0 a little: test_every_drawn_patient_has_a_basal_insulin)
    population = replace(cambridge.population, plausible=None)
    rng = np.random.default_rng(2010)
    draws = [population.sample({"weight": 70.0}, rng).params for _ in range(2000)]
    nominal = typical(cambridge)
    expected = {name: math.sqrt(math.log1p(cv * cv)) for name, (cv, _) in WILINSKA_CV.items()}
    expected.update({name: sd for name, (sd, _) in WILINSKA_LOG_SD.items()})
    assert len(expected) == 14
    for name, sd_log in expected.items():
        logs = np.log([d[f"cambridge_{name}"] for d in draws])
        assert np.std(logs) == pytest.approx(sd_log, rel=0.06), name
        assert np.median(logs) == pytest.approx(math.log(nominal[f"cambridge_{name}"]),
                                                abs=0.1 * sd_log), name


def test_no_basal_rate_below_what_production_sustains(cambridge):
    """A glucose the patient's own production cannot reach is an error naming the value."""
    params = typical(cambridge, cambridge_egp0=0.5)  # EGP0 below F01 (0.679 mmol/min)
    with pytest.raises(ModelError, match=r"no basal insulin holds glucose at 6\.0 mmol/L"):
        basal_insulin_rate(params, 6.0)


def test_basal_rate_refuses_a_rate_unit_of_another_dimension(cambridge):
    """The basal rate is an insulin amount per time: mg/h is refused, naming the quantity."""
    from mpc_dose.errors import UnitError

    with pytest.raises(UnitError, match="basal insulin rate: unit 'mU/min'.*'mg/h'"):
        basal_insulin_rate(typical(cambridge), 6.0, unit="mg/h")


def test_unknown_parameter_is_named(cambridge):
    """A misspelt parameter is an error with the nearest declared one."""
    with pytest.raises(ModelError, match="cambridge_egp0"):
        cambridge.model.parameter_vector({**typical(cambridge), "cambridge_egp": 1.0})


def test_every_drawn_patient_has_a_basal_insulin(cambridge):
    """Implausible draws (production not above insulin-independent uptake at the basal
    glucose: no basal insulin holds it, about 6 % of independent draws) are drawn again, as
    Wilinska 2010 kept only plausible subjects: 1000 patients, each with a basal rate."""
    rng = np.random.default_rng(7)
    for _ in range(1000):
        params = cambridge.population.sample({"weight": 70.0}, rng).params
        assert basal_insulin_rate(params, params["cambridge_basal_glucose"]) > 0


def test_titrated_pump_settings_hold_the_target_and_pass_their_meal_test():
    """model/therapy.py: with the rhythm off the hourly basal is the steady-state rate (24 h
    at it hold the target), and the carbohydrate ratio's bolus brings the 50-g test meal
    back to the target 5 h later with no glucose below 4.0 mmol/L for 8 h; the correction
    factor is the 1800 rule of the total daily dose."""
    import numpy as np

    from mpc_dose.model.dosing import Dose
    from mpc_dose.model.simulation import simulate
    from mpc_dose.model.therapy import (CORRECTION_RULE_MG_DL, DAILY_CARBS_G, TEST_HOURS,
                                        TEST_MEAL_G, TEST_NADIR_MMOL_L, at_clock,
                                        meal_test_excess, patient_therapy)

    lm = load("glucose-cambridge")
    for index in range(3):
        rng = streams("t1d-therapy", 3, index)["parameters"]
        weight = {"weight": CovariateDistribution("weight", "normal", 50.0, 110.0, mean=75.0,
                                                  sd=10.0)}
        params = patient_from_population(lm, weight, index, rng).params
        flat = at_clock(lm.entries, params, None)
        settings = patient_therapy(lm, {**flat}, 6.0)
        basal = settings.basal_at(3.0)
        assert all(rate == pytest.approx(basal) for _, rate in settings.basal_U_per_h)
        times = np.arange(0.0, 8 * 3600.0 + 1, 300.0)
        held = simulate(lm.model, flat, [Dose.infusion(0.0, "insulin", basal / 3600.0, 9e4)],
                        times).output("glucose")
        assert np.max(np.abs(held - 6.0)) < 1e-3
        bolus = TEST_MEAL_G / settings.carb_ratio_g_per_U
        meal = simulate(lm.model, flat, [Dose.infusion(0.0, "insulin", basal / 3600.0, 9e4),
                                         Dose.bolus(0.0, "carbohydrate", TEST_MEAL_G),
                                         Dose.bolus(0.0, "insulin", bolus)],
                        times).output("glucose")
        at_test = meal[int(TEST_HOURS * 12)]
        assert meal.min() >= TEST_NADIR_MMOL_L - 1e-3
        assert at_test == pytest.approx(6.0, abs=1e-2) or meal.min() == \
            pytest.approx(TEST_NADIR_MMOL_L, abs=1e-2)      # the nadir limited the bolus
        total = 24 * basal + DAILY_CARBS_G / settings.carb_ratio_g_per_U
        assert settings.total_daily_dose_U == pytest.approx(total)
        assert settings.correction_mmol_per_L_per_U == pytest.approx(
            CORRECTION_RULE_MG_DL / total / 18.016, rel=1e-3)
        # meal_test_excess: 0 at the test's own bolus, > 0 below it, < 0 above it
        excess = [meal_test_excess(lm.model, flat, basal, 6.0, bolus * f)
                  for f in (0.8, 1.0, 1.25)]
        assert excess[0] > 0.05 and abs(excess[1]) < 0.02 and excess[2] < -0.05


def test_the_titrated_basal_leads_the_dawn_rise():
    """With the EGP rhythm on, the basal profile peaks 1.5 h before the EGP acrophase
    (06:40 -> 05:00-05:30) and its trough is 12 h away."""
    from mpc_dose.model.therapy import patient_therapy

    lm = load("glucose-cambridge")
    params = lm.population.typical_parameters({"weight": 70.0})
    rows = patient_therapy(lm, params, 6.0).basal_U_per_h
    peak = max(rows, key=lambda row: row[1])[0]
    trough = min(rows, key=lambda row: row[1])[0]
    assert peak in (5.0, 6.0) and abs((trough - peak) % 24 - 12) <= 1
