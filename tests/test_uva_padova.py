"""The UVA/Padova model (Dalla Man 2007, type 1 form): steady state, meal mass balance, a
closed-form meal response, the population, pump settings, and simglucose's cohort table."""

import math

import numpy as np
import pytest

from mpc_dose.errors import ConfigError
from mpc_dose.model.dosing import Dose
from mpc_dose.model.library import entry, load
from mpc_dose.model.library.uva_padova import (MG_DL_PER_MMOL_L, P, SIMGLUCOSE_COLUMNS,
                                               basal_insulin_rate, params_from_simglucose,
                                               steady_state)
from mpc_dose.model.simulation import simulate
from mpc_dose.model.therapy import patient_therapy
from mpc_dose.scenario import parse_scenario
from mpc_dose.trial.build import build_patient
from mpc_dose.units import parse_unit

NAME = "glucose-uva-padova"
DAY_S = 24 * 3600.0


def _nominal(weight=70.0):
    lm = load(NAME)
    return lm, lm.population.typical_parameters({"weight": weight})


def _basal_day(lm, params, glucose_mmol_per_L, extra=(), step_s=300.0, hours=24.0):
    rate = basal_insulin_rate(params, glucose_mmol_per_L)
    times = np.arange(0.0, hours * 3600.0 + step_s / 2, step_s)
    doses = [Dose.infusion(0.0, "insulin", rate / 3600.0, times[-1] + step_s), *extra]
    return times, simulate(lm.model, lm.model.parameter_vector(params), doses, times)


def test_inputs_and_outputs_match_the_other_glucose_model():
    """Scenarios swap models: insulin (U) and carbohydrate (g) in, glucose, interstitial
    glucose (mmol/L) and plasma insulin out."""
    m = load(NAME).model
    assert {i.name: i.amount_unit for i in m.inputs} == {"insulin": "U", "carbohydrate": "g"}
    units = {o.name: o.unit for o in m.outputs}
    assert units["glucose"] == units["interstitial_glucose"] == "mmol/L"
    assert units["plasma_insulin"] == "pmol/L"
    assert set(load("glucose-cambridge").model.input_names) == set(m.input_names)


def test_every_parameter_has_a_unit_and_a_reference():
    e = entry(NAME)
    for theta in e.population.thetas:
        parse_unit(theta.unit)
        assert theta.doc and theta.reference, theta.name
    for p in load(NAME).model.params:
        parse_unit(p.unit)
        assert p.doc, p.name


@pytest.mark.parametrize("glucose", [5.0, 6.0, 8.0])
def test_basal_insulin_holds_basal_glucose_for_a_day(glucose):
    """The steady-state basal rate holds glucose within 0.5 % for 24 h, started from the
    model's own initial state (the steady state at uva_basal_glucose)."""
    lm, params = _nominal()
    params = {**params, P + "basal_glucose": glucose}
    _, result = _basal_day(lm, params, glucose)
    g = result.output("glucose")
    assert np.max(np.abs(g / glucose - 1.0)) < 0.005
    assert np.max(np.abs(result.output("interstitial_glucose") / glucose - 1.0)) < 0.005


def test_basal_rate_of_the_nominal_patient():
    """Closed form: kp1 and Vm0 make Dalla Man 2007's basal state (Gb 91.76 mg/dL, Ib 25.49
    pmol/L, EGPb 1.92 mg/kg/min) a steady state; Vm0 comes out as Table 1's 2.50 and kp1 as
    Table 1's 2.70 less the portal-insulin term. The rate is Ip (m2 + m4 - m1 m2/(m1 + m30))
    x BW / 6000 pmol/U."""
    _, params = _nominal()
    assert params[P + "vm0"] == pytest.approx(2.50, rel=0.01)
    assert params[P + "kp1"] == pytest.approx(1.92 + 0.0021 * 91.76 * 1.88 + 0.009 * 25.49)
    assert steady_state(params, 91.76 / MG_DL_PER_MMOL_L)["insulin"] == \
        pytest.approx(25.49, rel=1e-9)
    state = steady_state(params, 6.0)
    assert state["insulin"] == pytest.approx(19.44, abs=0.01)
    ip = state["insulin"] * 0.05
    m1, m2, m4, m30 = 0.19, 0.484, 0.194, 0.19 * 0.6 / 0.4
    expected = ip * (m2 + m4 - m1 * m2 / (m1 + m30)) * 70 / 6000 * 60
    assert basal_insulin_rate(params, 6.0) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.33, abs=0.005)


def test_meal_mass_balance():
    """Everything eaten is absorbed: the integral of Ra x BW is f x the meal within 1 %."""
    lm, params = _nominal()
    times, result = _basal_day(lm, params, 6.0, step_s=60.0, hours=12.0,
                               extra=[Dose.bolus(1800.0, "carbohydrate", 60.0)])
    absorbed_g = np.trapezoid(result.output("meal_glucose_appearance"), times / 60.0)
    assert absorbed_g == pytest.approx(0.9 * 60.0, rel=0.01)
    g = result.output("glucose")
    assert g.max() > 9.0 and g[-1] < g.max()  # without a bolus glucose rises well above 6


def test_meal_response_with_constant_emptying_is_the_closed_form_chain():
    """With kmin = kmax, kempt is constant and the gut is a linear chain Qeat -> Qsto1 ->
    Qsto2 -> Qgut (rates keat, kmax, kmax, kabs; Dalla Man 2006 eqs. 1-3 after the swallowing
    minute): Ra x BW = f kabs Qgut with Qgut(t) = [exp(A t) q0]_gut."""
    from scipy.linalg import expm

    from mpc_dose.model.library.uva_padova import INGESTION_PER_MIN

    lm, params = _nominal()
    params = {**params, P + "kmin": params[P + "kmax"]}
    times, result = _basal_day(lm, params, 6.0, step_s=60.0, hours=8.0,
                               extra=[Dose.bolus(0.0, "carbohydrate", 75.0)])
    keat, k, ka, f = INGESTION_PER_MIN, params[P + "kmax"], params[P + "kabs"], params[P + "f"]
    chain = np.array([[-keat, 0, 0, 0], [keat, -k, 0, 0], [0, k, -k, 0], [0, 0, k, -ka]])
    qgut = np.array([(expm(chain * m) @ [75.0, 0, 0, 0])[3] for m in times / 60.0])
    assert np.allclose(result.output("meal_glucose_appearance"), f * ka * qgut,
                       rtol=1e-4, atol=1e-6)


def test_gastric_emptying_slows_during_a_meal():
    """The nonlinear kempt: a large meal leaves the stomach more slowly than a constant kmax
    would (kempt falls towards kmin between b D and d D)."""
    lm, params = _nominal()
    fast = {**params, P + "kmin": params[P + "kmax"]}
    peaks = []
    for p in (params, fast):
        times, result = _basal_day(lm, p, 6.0, step_s=60.0, hours=8.0,
                                   extra=[Dose.bolus(0.0, "carbohydrate", 75.0)])
        peaks.append(result.output("meal_glucose_appearance").max())
    assert peaks[0] < peaks[1]


def test_population_draws_reproducibly_with_a_seed():
    pop = load(NAME).population
    a = pop.sample({"weight": 70}, np.random.default_rng(7))
    b = pop.sample({"weight": 70}, np.random.default_rng(7))
    c = pop.sample({"weight": 70}, np.random.default_rng(8))
    assert a.params == b.params and a.eta == b.eta
    assert a.params != c.params
    # every draw has a basal state at its basal glucose (the plausible predicate)
    rng = np.random.default_rng(1)
    for _ in range(20):
        individual = pop.sample({"weight": 70}, rng)
        assert steady_state(individual.params, individual.params[P + "basal_glucose"])


def test_nominal_patient_therapy():
    """model/therapy.py derives the nominal patient's pump settings from basal_insulin."""
    lm, params = _nominal()
    therapy = patient_therapy(lm, params, 6.0)
    assert therapy.basal_at(3.0) == pytest.approx(basal_insulin_rate(params, 6.0))
    assert 2.0 < therapy.carb_ratio_g_per_U < 100.0
    assert math.isfinite(therapy.correction_mmol_per_L_per_U)


# ---------------------------------------------------------------- simglucose's table
def _simglucose_row(name, weight, gb_mg_dl, **changes):
    """A synthetic row in simglucose's vpatient_params.csv layout from the nominal values,
    with the basal columns it carries derived as the UVA/Padova simulator derives them."""
    _, params = _nominal(weight)
    params.update({P + k: v for k, v in changes.items()})
    column = {target: col for target, (col, _, _) in SIMGLUCOSE_COLUMNS.items()}
    row = {col: params[target] for target, col in column.items()
           if target not in ("weight", P + "basal_glucose")}
    row.update({"Name": name, "BW": weight, "Gb": gb_mg_dl})
    gp = gb_mg_dl * params[P + "vg"]
    # simglucose's kp1 and Vm0 make (Gb, Ib) the basal state: EGPb = kp1 - kp2 Gpb - kp3 Ib
    egp = params[P + "fcns"] + 0.92
    gt = (params[P + "fcns"] - egp + params[P + "k1"] * gp) / params[P + "k2"]
    row.update({"Gpb": gp, "Gtb": gt, "EGPb": egp,
                "kp1": egp + params[P + "kp2"] * gp + params[P + "kp3"] * params[P + "ib"],
                "Vm0": (egp - params[P + "fcns"]) * (params[P + "km0"] + gt) / gt,
                "dosekempt": 90000, "HEb": 0.6, "patient_history": 0})
    ipb = params[P + "ib"] * params[P + "vi"]
    m1, m2, m4, m30 = (params[P + k] for k in ("m1", "m2", "m4", "m30"))
    row.update({"Ipb": ipb, "Ilb": m2 * ipb / (m1 + m30),
                "u2ss": ipb * (m2 + m4 - m1 * m2 / (m1 + m30))})
    return row


def test_simglucose_row_maps_and_converts(tmp_path):
    row = _simglucose_row("adult#001", 80.0, 140.0)
    values = params_from_simglucose(row)
    assert values["weight"] == values[P + "bw"] == 80.0
    assert values[P + "basal_glucose"] == pytest.approx(140.0 / 18.016)
    assert values[P + "fcns"] == row["Fsnc"]
    # the basal state the columns imply comes back: basal insulin at Gb is u2ss
    params = {**_nominal(80.0)[1], **{k: v for k, v in values.items() if k != "weight"}}
    assert steady_state(params, values[P + "basal_glucose"])["insulin"] == \
        pytest.approx(row["Ib"], rel=1e-9)
    assert basal_insulin_rate(params, values[P + "basal_glucose"]) == \
        pytest.approx(row["u2ss"] * 80.0 / 6000 * 60, rel=1e-9)
    with pytest.raises(ConfigError, match=r"row 3: no column 'Vmx'"):
        params_from_simglucose({k: v for k, v in row.items() if k != "Vmx"}, where="row 3")
    with pytest.raises(ConfigError, match=r"column 'Gb' = 'high': expected a number in mg/dL"):
        params_from_simglucose({**row, "Gb": "high"})


def _cohort_scenario(tmp_path, layout="simglucose"):
    import pandas as pd

    rows = [_simglucose_row("adolescent#001", 50.0, 150.0, vmx=0.03),
            _simglucose_row("adult#001", 80.0, 140.0),
            _simglucose_row("child#001", 30.0, 135.0, kp3=0.012)]
    path = tmp_path / "vpatient_params.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return parse_scenario({
        "scenario": {"name": "uva", "duration_s": 3600},
        "patient": {"model": NAME, "table": {"path": str(path), "layout": layout}},
        "pump": [{"pump": "insulin", "input": "insulin", "concentration": "100 U/mL"}],
        "sensor": [{"output": "glucose", "period_s": 300}],
        "controller": {"kind": "pid", "period_s": 300,
                       "pid": {"ratios": {"insulin": 1.0}, "max_rates": {"insulin": 1}}},
    }, base_dir=str(tmp_path))


def test_simglucose_cohort_holds_basal_glucose(tmp_path):
    """A scenario reads a simglucose-layout CSV as the cohort: each patient's basal holds
    its own Gb for 24 h within 0.5 %."""
    scenario = _cohort_scenario(tmp_path)
    lm = load(NAME)
    for index, gb in enumerate((150.0, 140.0, 135.0)):
        patient = build_patient(scenario, index, 0)
        glucose = gb / 18.016
        assert patient.params[P + "basal_glucose"] == pytest.approx(glucose)
        _, result = _basal_day(lm, patient.params, glucose)
        assert np.max(np.abs(result.output("glucose") / glucose - 1.0)) < 0.005


def test_unknown_layout_names_the_field_and_the_known_ones(tmp_path):
    scenario = _cohort_scenario(tmp_path, layout="t1dms")
    with pytest.raises(ConfigError, match=r"patient.table.layout = 't1dms'.*reads: "
                                          r"'simglucose'"):
        build_patient(scenario, 0, 0)


def test_the_meal_size_of_gastric_emptying_is_remembered_and_reset():
    """kempt's D (the paper's 'amount of the meal') is the meal while it is digested and
    the next meal's own size once the stomach has emptied (not the larger earlier one)."""
    lm, params = _nominal()
    times, result = _basal_day(lm, params, 6.0, step_s=60.0, hours=14.0,
                               extra=[Dose.bolus(0.0, "carbohydrate", 70.0),
                                      Dose.bolus(10 * 3600.0, "carbohydrate", 20.0)])
    meal = result.state(P + "meal")  # one row a minute
    at = {h: meal[int(h * 60)] for h in (0.5, 3.0, 9.0, 9.9, 10.5)}
    assert at[0.5] == pytest.approx(70.0, rel=0.02) and at[3.0] == pytest.approx(at[0.5])
    # Table 1's stomach empties slowly (kmin 0.008/min until 1 % of the meal is left): D is
    # held for 9 h, then falls as the last of the meal leaves
    assert at[9.0] == pytest.approx(at[0.5]) and at[9.9] < at[9.0] / 2
    assert at[10.5] == pytest.approx(20.0, rel=0.02)
