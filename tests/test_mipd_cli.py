"""`mpc-dose mipd` (issue 17.2): one patient's history -> MAP parameters with their
uncertainty, the predicted levels with a credible band, and the dose for an exposure target.
Exact values come from independent references: `tests/reference/vancomycin_map.py` (scipy
fit, matrix exponential), `tests/reference/map_textbook.py` (closed-form two-compartment
solution) and closed forms of linear pharmacokinetics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mpc_dose.cli import main
from mpc_dose.clinic import read_patient_history
from mpc_dose.control.dose_targets import ExposureTarget, Regimen, dose_for_target, round_dose
from mpc_dose.control.estimation import EstimationConfig, map_fit
from mpc_dose.errors import ConfigError
from mpc_dose.model.dosing import Dose
from mpc_dose.model.library import load
from tests.reference import map_textbook as tb
from tests.reference import vancomycin_map as ref

H = 3600.0
REPO = Path(__file__).resolve().parents[1]
GOTI_CSV = REPO / "scenarios" / "data" / "vancomycin_patient_goti_case.csv"
MODEL = "vancomycin-goti"
OUT = "vancomycin_cp"
ETAS = ("vancomycin_cl1", "vancomycin_v1", "vancomycin_v2")
HEADER = "time_h,input,amount_mg,duration_h,evid,dv_mg_per_L,crcl,weight,dialysis"
ROWS = ["0,vancomycin,2000,2,1,,65,70,no", "13,,,,0,12.0,,,", "24.2,vancomycin,1400,2,1,,,,",
        "48,,,,0,10.5,,,"]
# the same record as `mpc-dose export --nonmem` writes it (TIME h, RATE mg/h, codes)
NONMEM_CSV = """ID,TIME,AMT,RATE,EVID,MDV,DV,CMT,CRCL,WEIGHT,DIALYSIS
1,0.0,2000.0,1000.0,1,1,.,1,65,70,0
1,13.0,.,.,0,0,12.0,2,65,70,0
1,24.2,1400.0,700.0,1,1,.,1,65,70,0
1,48.0,.,.,0,0,10.5,2,65,70,0
"""
NONMEM_SIDECAR = """mpc-dose NONMEM-style dataset: columns, units and codes
TIME: h since the start of the run
EVID: 1 dose, 0 observation; MDV: 1 for doses
DV: vancomycin_level [mg/L] at its sample time
AMT (CMT 1: vancomycin): mg
RATE (CMT 1: vancomycin): mg/h
CMT 2: the observation
DIALYSIS: no = 0, yes = 1
"""


@pytest.fixture(scope="module")
def reference():
    """The independent MAP fit of the Goti case: (eta, (CL, V1, Q, V2), objective)."""
    return ref.map_estimate(65, 70, [(0, 2, 2000), (24.2, 2, 1400)], [13.0, 48.0],
                            [12.0, 10.5])


def _mipd(tmp_path, data, *extra, name="out"):
    out = tmp_path / name
    code = main(["mipd", "--model", MODEL, "--data", str(data), "--out", str(out),
                 "--samples", "50", *extra])
    document = json.loads((out / "estimate.json").read_text()) \
        if (out / "estimate.json").exists() else None
    return code, document, out


def _csv(tmp_path, rows, header=HEADER, name="patient.csv"):
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _params(p):
    """Model parameter values from the reference's (CL L/h, V1 L, Q L/h, V2 L)."""
    return {"vancomycin_cl1": p[0], "vancomycin_v1": p[1], "vancomycin_cl2": p[2],
            "vancomycin_v2": p[3]}


# ---------------------------------------------------------------------- the Goti case
@pytest.mark.parametrize("layout", ["dosing-table", "nonmem"])
def test_goti_case_reproduces_the_independent_map_and_dose(tmp_path, reference, layout):
    """From a CSV in either layout: eta equals the independent fit to 1e-4 and the single
    2-h dose giving AUC(0-24 h) = 400 mg.h/L equals the reference's to 0.1 % (~2378 mg)."""
    if layout == "nonmem":
        data = tmp_path / "goti.csv"
        data.write_text(NONMEM_CSV)
        data.with_suffix(".txt").write_text(NONMEM_SIDECAR)
    else:
        data = GOTI_CSV
    code, doc, out = _mipd(tmp_path, data, "--target", "auc24=400", "--interval", "24h",
                           "--infusion", "2h", "--basis", "first-dose")
    eta, params, _ = reference
    assert code == 0 and doc["success"] and doc["layout"] == layout
    assert [doc["eta"][k] for k in ETAS] == pytest.approx(list(eta), abs=1e-4)
    assert doc["parameters"]["vancomycin_cl1"] == pytest.approx(params[0], rel=1e-4)
    assert doc["parameter_units"]["vancomycin_cl1"] == "L/h"
    rec = doc["recommendation"]
    assert rec["success"] and rec["dose_unit"] == "mg"
    assert rec["dose"] == pytest.approx(ref.dose_for_auc_24h(params), rel=1e-3)
    assert 2300 < rec["dose"] < 2450
    assert "\nrecommended dose: 2377.9" in (out / "report.txt").read_text()
    assert (out / "prediction.png").stat().st_size > 10_000


def test_uncertainty_is_the_laplace_posterior(tmp_path, reference):
    """The parameter intervals are theta_hat exp(+-1.96 sd(eta)), sd from the posterior
    covariance (inverse of half the Hessian; equal to the textbook's numerical Hessian to
    1 %), and the band brackets the MAP curve."""
    code, doc, out = _mipd(tmp_path, GOTI_CSV)
    assert code == 0 and "recommendation" not in doc
    record = tb.Record([(0.0, 65, 70)], [(0, 2, 2000), (24.2, 2, 1400)],
                       [(13.0, 12.0, False), (48.0, 10.5, False)])
    omega = np.diag([tb.OMEGA_GOTI[n] for n in ("cl", "v1", "v2")])
    eta = dict(zip(("cl", "v1", "v2"), reference[0]))
    hess = tb.hessian(record, omega, eta)
    expected_sd = np.sqrt(np.diag(np.linalg.inv(hess / 2)))
    got_sd = [doc["eta_sd"][k] for k in ETAS]
    assert got_sd == pytest.approx(expected_sd, rel=1e-2)
    unc = doc["parameter_uncertainty"]["vancomycin_cl1"]
    value = doc["parameters"]["vancomycin_cl1"]
    assert unc["low"] == pytest.approx(value * math.exp(-1.959964 * got_sd[0]), rel=1e-6)
    assert unc["high"] == pytest.approx(value * math.exp(1.959964 * got_sd[0]), rel=1e-6)
    curve = np.genfromtxt(out / "prediction.csv", delimiter=",", names=True)
    inside = (curve["band_low_mg_per_L"] <= curve["vancomycin_cp_mg_per_L"] + 1e-9) & \
        (curve["vancomycin_cp_mg_per_L"] <= curve["band_high_mg_per_L"] + 1e-9)
    assert inside[curve["time_h"] > 0.5].mean() > 0.95


# ---------------------------------------------------------------------- targets
@pytest.fixture(scope="module")
def typical():
    """A model and the reference's typical parameters for CrCL 65 mL/min, 70 kg."""
    return load(MODEL).model, ref.typical(65, 70)


def _steady_levels(p, dose_mg, tau_h, infusion_h, times_h):
    """Levels at *times_h* after a dose at steady state, by superposition of 80 doses
    (the reference's matrix exponential)."""
    infusions = [(k * tau_h, infusion_h, dose_mg) for k in range(80)]
    return ref.concentrations(p, infusions, [79 * tau_h + t for t in times_h])


def test_auc24_at_steady_state_is_dose_over_clearance(typical):
    """Linear PK: AUC over 24 h at steady state = (24 h / tau) dose / CL, so the dose for
    400 mg.h/L every 12 h is 400 CL / 2."""
    model, p = typical
    found = dose_for_target(model, _params(p), Regimen("vancomycin", 12 * H, H),
                            ExposureTarget.parse("auc24=400", "mg/L"), output=OUT)
    assert found.success
    assert found.dose_exact == pytest.approx(400 * p[0] * 12 / 24, rel=1e-6)
    assert found.achieved_exact == pytest.approx(400, rel=1e-8)


def test_trough_and_conc_at_steady_state_match_superposition(typical):
    """The dose for a steady-state trough of 15 mg/L (end of the interval) and for 20 mg/L
    6 h after the start of the dose equal the superposition of 80 reference doses."""
    model, p = typical
    for text, t_h, level in (("trough=15", 12.0, 15.0), ("conc=20mg/L@6h", 6.0, 20.0)):
        found = dose_for_target(model, _params(p), Regimen("vancomycin", 12 * H, H),
                                ExposureTarget.parse(text, "mg/L"), output=OUT)
        per_mg = _steady_levels(p, 1.0, 12.0, 1.0, [t_h])[0]
        assert found.success
        assert found.dose_exact == pytest.approx(level / per_mg, rel=1e-5), text


def test_time_above_threshold_matches_the_reference_curve(typical):
    """The dose keeping 60 % of a 12-h interval above 10 mg/L at steady state: the
    reference's curve at that dose is above 10 mg/L for 60 % of the interval (1e-3)."""
    model, p = typical
    found = dose_for_target(model, _params(p), Regimen("vancomycin", 12 * H, H),
                            ExposureTarget.parse("time_above=10:0.6", "mg/L"), output=OUT)
    grid = np.linspace(0.0, 12.0, 2401)
    levels = _steady_levels(p, found.dose_exact, 12.0, 1.0, list(grid))
    assert found.success
    assert np.mean(levels[:-1] > 10.0) == pytest.approx(0.6, abs=1e-3)


def test_next_dose_after_the_history_counts_the_drug_on_board(typical):
    """Basis 'next': the AUC over the interval after a history equals the target when the
    history's remaining drug is added (reference superposition), and is less than the dose
    a drug-naive patient would need."""
    model, p = typical
    history = [(0.0, 1.0, 1000.0), (12.0, 1.0, 1000.0)]
    x = _state_after(model, p, [Dose.from_record(t * H, "vancomycin", amount=a,
                                                 duration_s=d * H) for t, d, a in history],
                     24 * H)
    regimen = Regimen("vancomycin", 12 * H, H, basis="next", start_s=24 * H)
    found = dose_for_target(model, _params(p), regimen, ExposureTarget("auc24", 500,
                                                                       "mg/L*h"),
                            output=OUT, x_history=x)
    from scipy.integrate import quad

    infusions = history + [(24.0, 1.0, found.dose_exact)]
    auc = quad(lambda t: ref.concentrations(p, infusions, [t])[0], 24.0, 36.0,
               points=[25.0], epsabs=1e-10, limit=200)[0]
    assert auc * 2 == pytest.approx(500, rel=1e-5)
    naive = dose_for_target(model, _params(p), Regimen("vancomycin", 12 * H, H,
                                                       basis="first-dose"),
                            ExposureTarget("auc24", 500, "mg/L*h"), output=OUT)
    assert found.dose_exact < naive.dose_exact


def _state_after(model, p, doses, t_s):
    from mpc_dose.model.simulation import simulate

    return simulate(model, _params(p), doses, [0.0, t_s]).states[-1]


def test_rounding_goes_to_the_nearest_step(tmp_path):
    """--round 250: the dose is the multiple of 250 mg nearest the exact dose, and the
    report gives the exposure at the rounded dose."""
    assert round_dose(2377.9, 250) == 2500 and round_dose(2370.0, 250) == 2250
    assert round_dose(2375.0, 250) == 2500 and round_dose(1234.5, None) == 1234.5
    code, doc, _ = _mipd(tmp_path, GOTI_CSV, "--target", "auc24=400", "--interval", "12h",
                         "--infusion", "1h", "--round", "250")
    rec = doc["recommendation"]
    assert code == 0 and rec["dose"] % 250 == 0
    assert abs(rec["dose"] - rec["dose_exact"]) <= 125
    assert rec["achieved"] == pytest.approx(400 * rec["dose"] / rec["dose_exact"], rel=1e-6)


def test_a_target_met_without_a_dose_is_a_result_not_an_error(tmp_path):
    """Basis 'next' with a trough already above the target: no dose, success false with
    the reason, exit status 1, files written."""
    code, doc, out = _mipd(tmp_path, GOTI_CSV, "--target", "trough=1", "--interval", "12h",
                           "--infusion", "1h", "--basis", "next", "--start", "48h")
    rec = doc["recommendation"]
    assert code == 1 and doc["success"] and not rec["success"]
    assert rec["status"] == "met_without_dose"
    assert "NO DOSE RECOMMENDED" in (out / "report.txt").read_text()


# ---------------------------------------------------------------------- BLQ, prior, IOV
def test_a_level_below_the_lloq_raises_clearance_by_m3(tmp_path):
    """A third level 'below 5 mg/L' at 72 h (M3): the estimated clearance rises compared
    with the record without it, and equals the textbook M3 fit (1e-4)."""
    rows = ROWS + ["72,,,,0,,,,"]
    data = _csv(tmp_path, rows, header=HEADER + ",blq")
    data.write_text(data.read_text().replace("72,,,,0,,,,", "72,,,,0,,,,,1"))
    code, doc, _ = _mipd(tmp_path, data, "--lloq", "5mg/L", name="blq")
    _, without, _ = _mipd(tmp_path, GOTI_CSV, name="without")
    assert code == 0 and doc["levels"][-1]["below_lloq"]
    assert doc["eta"]["vancomycin_cl1"] > without["eta"]["vancomycin_cl1"] + 0.01
    record = tb.Record([(0.0, 65, 70)], [(0, 2, 2000), (24.2, 2, 1400)],
                       [(13.0, 12.0, False), (48.0, 10.5, False), (72.0, 5.0, True)])
    eta, _, _ = tb.map_fit(record, np.diag([tb.OMEGA_GOTI[n] for n in ("cl", "v1", "v2")]))
    assert [doc["eta"][k] for k in ETAS] == pytest.approx([eta["cl"], eta["v1"], eta["v2"]],
                                                          abs=1e-4)


LEVELS_5 = [(2 * H, 31.0), (11.8 * H, 9.0), (23.8 * H, 12.5), (35.8 * H, 10.0),
            (47.8 * H, 14.0)]
DOSES_5 = [Dose.from_record(k * 12 * H, "vancomycin", amount=1000, duration_s=H)
           for k in range(6)]


@pytest.mark.parametrize("weight", [1.0, 0.5, 0.0])
def test_prior_weight_scales_the_prior(weight):
    """Prior weight 1 is the MAP, 0.5 the MAP with Omega / 0.5, 0 maximum likelihood (the
    textbook fit with a prior a million times flatter), for CL and V1 from five levels."""
    config = EstimationConfig(OUT, parameters=("vancomycin_cl1", "vancomycin_v1"),
                              prior_weight=weight)
    result = map_fit(load(MODEL), {"crcl": 90, "weight": 75, "dialysis": "no"}, config,
                     DOSES_5, LEVELS_5)
    record = tb.Record([(0.0, 90, 75)], [(k * 12.0, 1.0, 1000.0) for k in range(6)],
                       [(t / H, y, False) for t, y in LEVELS_5])
    omega = np.diag([tb.OMEGA_GOTI["cl"], tb.OMEGA_GOTI["v1"]]) / max(weight, 1e-6)
    eta, _, _ = tb.map_fit(record, omega, eta_names=("cl", "v1"))
    assert result.success
    assert [result.eta["vancomycin_cl1"], result.eta["vancomycin_v1"]] == pytest.approx(
        [eta["cl"], eta["v1"]], abs=2e-4)


def test_prior_weight_on_the_command_line_changes_the_estimate(tmp_path):
    """--prior-weight 0.2 moves eta away from 0 compared with the MAP (a weaker pull to the
    population), and is recorded in estimate.json."""
    _, flat, _ = _mipd(tmp_path, GOTI_CSV, "--prior-weight", "0.2", name="flat")
    _, full, _ = _mipd(tmp_path, GOTI_CSV, name="full")
    assert flat["prior_weight"] == 0.2
    assert abs(flat["eta"]["vancomycin_cl1"]) > abs(full["eta"]["vancomycin_cl1"])


def test_prior_weight_zero_with_occasion_effects_is_refused():
    """Without a prior, eta and the occasions' kappas cannot be told apart."""
    from dataclasses import replace

    from mpc_dose.model.population import RandomEffect

    lm = load(MODEL)
    lm_iov = replace(lm, population=replace(lm.population, occasion_effects=(
        RandomEffect("vancomycin_cl1", 0.09),)))
    with pytest.raises(ConfigError, match="prior_weight = 0 with occasion effects"):
        map_fit(lm_iov, {"crcl": 90, "weight": 75, "dialysis": "no"},
                EstimationConfig(OUT, prior_weight=0.0), DOSES_5, LEVELS_5)
    with pytest.raises(ConfigError, match="prior_weight: expected a finite number >= 0"):
        EstimationConfig(OUT, prior_weight=-1.0)


def test_occasions_and_covariate_changes_are_read_from_the_table(tmp_path):
    """An occasion column starts occasions where it changes; a later covariate value is a
    change from that row's time (LOCF), and planning uses the last values."""
    rows = ["0,vancomycin,2000,2,1,,65,70,no,1", "13,,,,0,12.0,,,,1",
            "24.2,vancomycin,1400,2,1,,40,,,2", "48,,,,0,10.5,,,,2"]
    data = _csv(tmp_path, rows, header=HEADER + ",occasion")
    history = read_patient_history(data, load(MODEL))
    assert history.occasions_s == (24.2 * H,)
    assert history.covariate_changes == ((24.2 * H, {"crcl": "40"}),)
    code, doc, _ = _mipd(tmp_path, data)
    assert code == 0
    assert doc["typical_parameters"]["vancomycin_cl1"] == pytest.approx(
        4.5 * (40 / 120) ** 0.8, rel=1e-9)
    assert any("inter-occasion" in n for n in doc["notes"])   # Goti declares none


# ---------------------------------------------------------------------- errors
ERRORS = [
    ("unknown covariate", HEADER + ",age", [r + ",50" for r in ROWS], (),
     r"unknown column 'age'.*covariate of model 'vancomycin-goti': crcl, weight, dialysis"),
    ("missing covariate", HEADER.replace(",crcl", ""),
     ["0,vancomycin,2000,2,1,,70,no", "13,,,,0,12.0,,", "24.2,vancomycin,1400,2,1,,,",
      "48,,,,0,10.5,,"], (),
     r"missing covariate 'crcl'"),
    ("no time column", HEADER.replace("time_h", "when"), ROWS, (), r"unknown column 'when'"),
    ("level before a dose", HEADER, ["0,,,,0,3.0,65,70,no", *ROWS[0:1]], (),
     r"level \(3 mg/L\) at 0 h, before any dose"),
    ("dv unit", HEADER.replace("dv_mg_per_L", "dv_mg"), ROWS, (),
     r"unit 'mg' \(mass\) cannot be converted to 'mg/L'"),
    ("dv without unit", HEADER.replace("dv_mg_per_L", "dv"), ROWS, (),
     r"column 'dv' has no unit"),
    ("bad covariate value", HEADER, [ROWS[0].replace(",no", ",maybe"), *ROWS[1:]], (),
     r"dialysis = 'maybe': expected one of yes, no"),
    ("target syntax", HEADER, ROWS, ("--target", "auc=400", "--interval", "12h",
                                     "--infusion", "1h"), r"expected auc24=VALUE"),
    ("target without regimen", HEADER, ROWS, ("--target", "auc24=400"),
     r"give the regimen's --interval and --infusion"),
    ("conc time without unit", HEADER, ROWS, ("--target", "conc=20@6", "--interval", "12h",
                                              "--infusion", "1h"), r"give the time's unit"),
    ("conc beyond the interval", HEADER, ROWS, ("--target", "conc=20@13h", "--interval",
                                                "12h", "--infusion", "1h"),
     r"beyond the interval \(12 h\)"),
    ("time_above fraction", HEADER, ROWS, ("--target", "time_above=10:1.5", "--interval",
                                           "12h", "--infusion", "1h"),
     r"fraction of the interval must be in \(0, 1\)"),
    ("lloq without unit", HEADER, ROWS, ("--lloq", "2"), r'--lloq = \'2\': give its unit'),
    ("interval without unit", HEADER, ROWS, ("--target", "trough=15", "--interval", "12",
                                             "--infusion", "1h"), r"--interval = '12'"),
    ("negative prior weight", HEADER, ROWS, ("--prior-weight", "-1"),
     r"prior_weight: expected a finite number >= 0"),
    ("start inside an infusion", HEADER, ROWS, ("--target", "trough=15", "--interval", "12h",
                                                "--infusion", "1h", "--start", "25h"),
     r"--start 25 h: the record's last infusion runs until 26.2 h"),
]


@pytest.mark.parametrize("header, rows, extra, message", [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_errors_name_the_field_value_and_expectation(tmp_path, capsys, header, rows, extra,
                                                     message):
    """Exit status 2, one line on stderr, nothing written."""
    data = _csv(tmp_path, rows, header=header)
    code, doc, out = _mipd(tmp_path, data, *extra)
    err = capsys.readouterr().err
    assert code == 2 and doc is None
    assert err.startswith("mpc-dose mipd: error:")
    import re

    assert re.search(message, err), err


def test_nonmem_layout_errors(tmp_path):
    """A NONMEM file needs its sidecar (units are never assumed), --id when it holds
    several patients, and codes for categorical covariates."""
    lm = load(MODEL)
    data = tmp_path / "nm.csv"
    data.write_text(NONMEM_CSV)
    with pytest.raises(ConfigError, match=r"sidecar 'nm.txt'.*never assumed"):
        read_patient_history(data, lm)
    data.write_text(NONMEM_CSV + NONMEM_CSV.splitlines()[1].replace("1,", "2,", 1) + "\n")
    data.with_suffix(".txt").write_text(NONMEM_SIDECAR)
    with pytest.raises(ConfigError, match=r"2 patients \(ID 1, 2\); choose one with --id"):
        read_patient_history(data, lm)
    assert len(read_patient_history(data, lm, patient_id="1").doses) == 2
    data.with_suffix(".txt").write_text(NONMEM_SIDECAR.replace("DIALYSIS: no = 0, yes = 1\n",
                                                               ""))
    with pytest.raises(ConfigError, match="DIALYSIS is categorical but the sidecar gives no"):
        read_patient_history(data, lm, patient_id="1")
    data.with_suffix(".txt").write_text(NONMEM_SIDECAR.replace("[mg/L]", "[mg]"))
    with pytest.raises(ConfigError, match=r"DV: unit 'mg' \(mass\) cannot be converted"):
        read_patient_history(data, lm, patient_id="1")


def test_inter_occasion_variability_from_a_model_file(tmp_path):
    """A model file declaring IOV on clearance (the Goti entry as a file plus ``[iov]``):
    a second occasion whose level is lower than the first occasion's clearance predicts gets
    a positive clearance kappa there; the first occasion's kappa is smaller; the plan uses
    exp(eta) without the kappas."""
    text = (Path(__file__).resolve().parents[1] / "scenarios" / "models" /
            "vancomycin-goti.toml").read_text()
    model = tmp_path / "goti_iov.toml"
    model.write_text(text + '\n[iov]\nvancomycin_cl1 = { cv = 0.3 }\n')
    rows = ["0,vancomycin,1000,1,1,,65,70,no,1", "11.5,,,,0,10.0,,,,1",
            "48,vancomycin,1000,1,1,,,,,2", "59.5,,,,0,3.0,,,,2"]
    data = _csv(tmp_path, rows, header=HEADER + ",occasion")
    out = tmp_path / "iov"
    assert main(["mipd", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--samples", "50"]) == 0
    doc = json.loads((out / "estimate.json").read_text())
    assert doc["success"]
    kappas = [k.get("vancomycin_cl1", 0.0) for k in doc["kappa"]]
    assert len(kappas) == 2 and kappas[1] > 0.05 and kappas[1] > kappas[0]
    assert not any("inter-occasion" in n and "ignored" in n for n in doc["notes"])
