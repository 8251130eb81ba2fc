"""Independent validation of the anaesthesia library models (issue "done when").

``mpc-dose simulate`` of the Schnider, Marsh, Minto and Eleveld models (propofol Eleveld 2018,
remifentanil Eleveld 2017) must agree with an independent implementation to 0.1 % of each
curve's peak concentration and 0.05 BIS, for several patients and regimens (bolus as a short
infusion, maintenance infusions, both drugs).

Two independent references are used (see ``tests/reference/README.md``):

* ``tests/reference/anaesthesia.py``: numpy/scipy only, written from the papers, integrates
  with Radau (rtol 1e-10). It is the arbiter wherever the sources disagree.
* PAS curves (python-anesthesia-simulator 1.0.0) in ``tests/reference/data/c*.csv``. PAS is
  right for Schnider, Minto and Eleveld propofol (with the unrounded NONMEM thetas) and has
  parameter slips for Eleveld remifentanil and Marsh; for those the package is held to the
  reference instead, and :func:`test_package_with_pas_parameters_reproduces_pas` shows that
  the remaining PAS differences are the parameter slips and nothing else.

Tolerances: the requirement (``REQ_*``) is asserted everywhere; tighter bounds (``TIGHT_*``)
guard against regressions, with the measured values in comments. Measured on this machine:
package vs reference at most 2.5e-11 of peak (1.8e-6 for Eleveld propofol, from the package
rounding its thetas to 6 significant figures) and 2.6e-4 BIS (the package's ``HILL_EPS``).
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repo root holds the `tests` package with the reference
    sys.path.insert(0, str(ROOT))

from tests.reference import anaesthesia as ref  # noqa: E402

from mpc_dose.cli import main as cli_main  # noqa: E402
from mpc_dose.model.dosing import Dose  # noqa: E402
from mpc_dose.model.library import load  # noqa: E402
from mpc_dose.model.simulation import simulate  # noqa: E402

DATA = ROOT / "tests" / "reference" / "data"
CASES = json.loads((DATA / "cases.json").read_text())["cases"]
CASE_BY_NAME = {c["name"]: c for c in CASES}
PAS_MANIFEST = json.loads((DATA / "pas_manifest.json").read_text())["cases"]

# Issue "done when": 0.1 % of each curve's peak, 0.05 BIS.
REQ_REL = 1e-3
REQ_BIS = 0.05
# Regression bounds. Curves vs the reference: measured <= 2.5e-11 of peak (5e-10 through
# the CLI's 10-digit CSV); Eleveld propofol uses the unrounded NONMEM thetas on both sides.
TIGHT_REL = 1e-6
TIGHT_REL_ELEVELD_PROPOFOL = TIGHT_REL
# BIS: the Hill smoothing changes BIS by at most Emax * pd.HILL_FLOOR (1e-6).
TIGHT_BIS = 1e-4
PARAM_REL = 1e-9
# Eleveld propofol parameters: the same unrounded thetas on both sides.
PARAM_REL_ELEVELD_ROUNDED = 1e-12

PROPOFOL_ENTRY = {"Schnider": "propofol-schnider", "Marsh_initial": "propofol-marsh",
                  "Eleveld": "propofol-eleveld"}
REMIFENTANIL_ENTRY = {"Minto": "remifentanil-minto", "Eleveld": "remifentanil-eleveld"}
PK_KEYS = {"v1": "v1_l", "v2": "v2_l", "v3": "v3_l", "cl1": "cl1_l_per_min",
           "cl2": "cl2_l_per_min", "cl3": "cl3_l_per_min", "ke0": "ke0_per_min"}
CURVES = ("propofol_cp", "propofol_ce", "remifentanil_cp", "remifentanil_ce")
BIS_KEYS = ("c50p", "c50r", "gamma", "beta", "e0", "emax")

# Package theta names in Eleveld 2018 Table 2 order (theta 7, the residual error, is unused).
ELEVELD_PROPOFOL_THETA_NAMES = (
    None, "eleveld_p_v1", "eleveld_p_v2", "eleveld_p_v3", "eleveld_p_cl_male", "eleveld_p_q2",
    "eleveld_p_q3", None, "eleveld_p_cl_maturation_e50", "eleveld_p_cl_maturation_slope",
    "eleveld_p_v2_ageing", "eleveld_p_cl_opiates", "eleveld_p_v1_weight_e50",
    "eleveld_p_v3_opiates", "eleveld_p_q3_maturation_e50", "eleveld_p_cl_female",
    "eleveld_p_q2_immature", "eleveld_p_v1_venous", "eleveld_p_q2_venous")


# ----------------------------------------------------------------------------- helpers

def model_name(case: dict) -> str:
    return (f"{PROPOFOL_ENTRY[case['propofol_model']]}+"
            f"{REMIFENTANIL_ENTRY[case['remifentanil_model']]}+bis-bouillon")


def patient(case: dict) -> tuple[float, float, float, bool]:
    age, height, weight, gender = case["patient"]
    return float(age), float(height), float(weight), bool(gender)


def covariates(case: dict) -> dict:
    age, height, weight, male = patient(case)
    return {"age": age, "height_cm": height, "weight_kg": weight,
            "sex": "male" if male else "female"}


def package_eleveld_propofol_theta() -> tuple:
    """The package's Eleveld 2018 thetas as a tuple indexed like the paper's Table 2."""
    th = {t.name: t.value for t in load("propofol-eleveld").population.thetas}
    return tuple(ref.ELEVELD_PROPOFOL_THETA_NONMEM[i] if n is None else th[n]
                 for i, n in enumerate(ELEVELD_PROPOFOL_THETA_NAMES))


def reference_params(case: dict, eleveld_theta=ref.ELEVELD_PROPOFOL_THETA_NONMEM
                     ) -> tuple[dict, dict]:
    age, height, weight, male = patient(case)
    propofol = {
        "Schnider": lambda: ref.schnider_propofol(age, height, weight, male),
        "Marsh_initial": lambda: ref.marsh_propofol(weight),
        "Eleveld": lambda: ref.eleveld_propofol(age, height, weight, male,
                                                theta=eleveld_theta),
    }[case["propofol_model"]]()
    remifentanil = {
        "Minto": lambda: ref.minto_remifentanil(age, height, weight, male),
        "Eleveld": lambda: ref.eleveld_remifentanil(age, height, weight, male),
    }[case["remifentanil_model"]]()
    return propofol, remifentanil


def package_params(case: dict) -> dict:
    values = load(model_name(case)).population.typical_parameters(covariates(case))
    values.update({f"bis_{k}": float(v) for k, v in case["bis_params"].items()})
    return values


def doses(case: dict) -> list[Dose]:
    out = [Dose.infusion(a, "propofol", r, b - a) for a, b, r in case["propofol_segments"]]
    out += [Dose.infusion(a, "remifentanil", r, b - a)
            for a, b, r in case["remifentanil_segments"]]
    return out


@lru_cache(maxsize=None)
def pas_curves(name: str) -> pd.DataFrame:
    return pd.read_csv(DATA / f"{name}.csv")


def pas_times(name: str) -> np.ndarray:
    """Every 1 s to 300 s, then every 5 s (all integers, so they hold any 5-s grid)."""
    return pas_curves(name)["t_s"].to_numpy(float)


def _reference_curves(case: dict, eleveld_theta) -> dict[str, np.ndarray]:
    t = pas_times(case["name"])
    propofol, remifentanil = reference_params(case, eleveld_theta)
    p = ref.simulate_three_compartment(propofol, case["propofol_segments"], t)
    r = ref.simulate_three_compartment(remifentanil, case["remifentanil_segments"], t)
    b = case["bis_params"]
    bis = ref.bouillon_bis(p["ce"], r["ce"], *(b[k] for k in BIS_KEYS))
    return {"t": t, "propofol_cp": p["cp"], "propofol_ce": p["ce"],
            "remifentanil_cp": r["cp"], "remifentanil_ce": r["ce"], "bis": np.asarray(bis)}


@lru_cache(maxsize=None)
def reference_curves(name: str) -> dict[str, np.ndarray]:
    """The reference on the PAS time grid (Eleveld propofol on the NONMEM thetas)."""
    return _reference_curves(CASE_BY_NAME[name], ref.ELEVELD_PROPOFOL_THETA_NONMEM)


@lru_cache(maxsize=None)
def package_curves(name: str) -> dict[str, np.ndarray]:
    case = CASE_BY_NAME[name]
    t = pas_times(name)
    res = simulate(load(model_name(case)).model, package_params(case), doses(case), t)
    return {"t": res.time_s, **{k: res.output(k) for k in CURVES + ("bis",)}}


def rel_to_peak(x, y) -> float:
    """max |x - y| / max |y|; max |x| when y is identically 0 (drug not given)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    peak = np.max(np.abs(y))
    return float(np.max(np.abs(x - y)) / peak) if peak > 0 else float(np.max(np.abs(x)))


def max_abs(x, y) -> float:
    return float(np.max(np.abs(np.asarray(x, float) - np.asarray(y, float))))


def assert_params(package: dict, drug: str, reference: dict, rtol: float, what: str):
    for short, key in PK_KEYS.items():
        got, want = package[f"{drug}_{short}"], reference[key]
        assert got == pytest.approx(want, rel=rtol, abs=0), \
            f"{what}: {drug}_{short} = {got!r}, reference {want!r}"


case_params = pytest.mark.parametrize("name", [c["name"] for c in CASES])


# ------------------------------------------------------------------ typical parameters

@case_params
def test_typical_parameters_match_reference(name):
    case = CASE_BY_NAME[name]
    age, height, weight, male = patient(case)
    got = package_params(case)
    propofol, remifentanil = reference_params(case)
    if case["propofol_model"] == "Marsh_initial":
        # The package parameterises Marsh by V1 and the paper's micro constants; the
        # reference by volumes and clearances chosen to reproduce exactly those constants.
        v1 = propofol["v1_l"]
        implied = {"k10": propofol["cl1_l_per_min"] / v1, "k12": propofol["cl2_l_per_min"] / v1,
                   "k13": propofol["cl3_l_per_min"] / v1,
                   "k21": propofol["cl2_l_per_min"] / propofol["v2_l"],
                   "k31": propofol["cl3_l_per_min"] / propofol["v3_l"]}
        paper = {"k10": ref.MARSH_K10, "k12": ref.MARSH_K12, "k13": ref.MARSH_K13,
                 "k21": ref.MARSH_K21, "k31": ref.MARSH_K31}
        assert got["propofol_v1"] == pytest.approx(ref.MARSH_V1_L_PER_KG * weight, rel=PARAM_REL)
        assert got["propofol_v1"] == pytest.approx(v1, rel=PARAM_REL)
        for k in paper:
            assert got[f"propofol_{k}"] == pytest.approx(paper[k], rel=PARAM_REL), k
            assert got[f"propofol_{k}"] == pytest.approx(implied[k], rel=PARAM_REL), k
        assert got["propofol_ke0"] == pytest.approx(propofol["ke0_per_min"], rel=PARAM_REL)
    elif case["propofol_model"] == "Eleveld":
        # Formula structure: the reference fed the package's own thetas agrees exactly.
        own = ref.eleveld_propofol(age, height, weight, male,
                                   theta=package_eleveld_propofol_theta())
        assert_params(got, "propofol", own, PARAM_REL, f"{name} (package thetas)")
        # Values: the package's thetas are the NONMEM estimates to 6 significant figures.
        assert_params(got, "propofol", propofol, PARAM_REL_ELEVELD_ROUNDED,
                      f"{name} (NONMEM thetas)")
    else:
        assert_params(got, "propofol", propofol, PARAM_REL, name)
    assert_params(got, "remifentanil", remifentanil, PARAM_REL, name)


@pytest.mark.parametrize("opiates", ["yes", "no"])
@pytest.mark.parametrize("sampling", ["arterial", "venous"])
@pytest.mark.parametrize("who", ["P1", "P2", "P3", "P4"])
def test_eleveld_propofol_covariate_variants(who, opiates, sampling):
    case = next(c for c in CASES if c["name"].split("_")[1] == who)
    age, height, weight, male = patient(case)
    got = load("propofol-eleveld").population.typical_parameters(
        {**covariates(case), "opiates": opiates, "sampling": sampling})
    kwargs = {"opiates": opiates == "yes", "sampling": sampling}
    own = ref.eleveld_propofol(age, height, weight, male,
                               theta=package_eleveld_propofol_theta(), **kwargs)
    assert_params(got, "propofol", own, PARAM_REL, f"{who} {opiates} {sampling}")
    nonmem = ref.eleveld_propofol(age, height, weight, male,
                                  theta=ref.ELEVELD_PROPOFOL_THETA_NONMEM, **kwargs)
    assert_params(got, "propofol", nonmem, PARAM_REL_ELEVELD_ROUNDED,
                  f"{who} {opiates} {sampling}")


def test_package_eleveld_propofol_thetas_are_the_nonmem_values():
    """The package's Eleveld propofol thetas are the unrounded NONMEM estimates."""
    own = package_eleveld_propofol_theta()
    for i, name in enumerate(ELEVELD_PROPOFOL_THETA_NAMES):
        if name is None:
            continue
        nonmem = ref.ELEVELD_PROPOFOL_THETA_NONMEM[i]
        assert own[i] == pytest.approx(nonmem, rel=1e-13), (i, name, own[i], nonmem)


# -------------------------------------------------------------- curves vs the reference

@case_params
def test_simulation_matches_reference(name):
    case = CASE_BY_NAME[name]
    got, want = package_curves(name), reference_curves(name)
    assert np.array_equal(got["t"], want["t"])
    for curve in CURVES:
        err = rel_to_peak(got[curve], want[curve])
        tight = (TIGHT_REL_ELEVELD_PROPOFOL
                 if curve.startswith("propofol") and case["propofol_model"] == "Eleveld"
                 else TIGHT_REL)
        assert err <= REQ_REL, f"{name} {curve}: {err:.3g} of peak > requirement {REQ_REL}"
        assert err <= tight, f"{name} {curve}: {err:.3g} of peak > {tight}"
    err = max_abs(got["bis"], want["bis"])
    assert err <= REQ_BIS, f"{name} BIS: {err:.3g} > requirement {REQ_BIS}"
    assert err <= TIGHT_BIS, f"{name} BIS: {err:.3g} > {TIGHT_BIS}"


@pytest.mark.parametrize("name", [c["name"] for c in CASES
                                  if c["propofol_model"] == "Eleveld" and c["propofol_segments"]])
def test_eleveld_propofol_difference_is_theta_rounding_only(name):
    """With the package's own (6-figure) thetas the reference reproduces the package's
    Eleveld propofol curves to integration accuracy (measured <= 1e-11 of peak)."""
    want = _reference_curves(CASE_BY_NAME[name], package_eleveld_propofol_theta())
    got = package_curves(name)
    for curve in ("propofol_cp", "propofol_ce"):
        err = rel_to_peak(got[curve], want[curve])
        assert err <= TIGHT_REL, f"{name} {curve}: {err:.3g} of peak"


# ------------------------------------------------------------------- curves vs PAS curves

# PAS 1.0.0 slips (tests/reference/README.md, "Disagreements"; both confirmed from the
# parameters recovered into data/pas_manifest.json, see the asserts below):
# * Eleveld 2017 remifentanil: PAS uses V2ref = 8.882 L where the paper's abstract gives
#   8.82 L, and leaves KSEX off V2 (paper, opentiva and R tci apply it to V2, CL and Q2).
#   Up to 2.1e-2 of peak and 0.44 BIS (women aged 12-70 most).
# * Marsh: PAS uses the rounded table values V2 = 0.463 and V3 = 2.893 L/kg and k13 = 0.042
#   (Absalom 2009) instead of the paper's rate constants k13 0.0419, k21 0.055, k31 0.0033;
#   1.1e-4 to 1.5e-4 of peak. The package follows the paper (as opentiva does).
# For these the package is held to the independent reference instead.
PAS_RIGHT_PROPOFOL = {"Schnider", "Eleveld"}   # Eleveld: PAS has the unrounded NONMEM thetas
PAS_RIGHT_REMIFENTANIL = {"Minto"}


@case_params
def test_simulation_matches_pas_where_pas_is_right(name):
    case = CASE_BY_NAME[name]
    age, height, weight, male = patient(case)
    got, pas, want = package_curves(name), pas_curves(name), reference_curves(name)
    assert np.array_equal(got["t"], pas["t_s"].to_numpy(float))
    pas_params = PAS_MANIFEST[name]
    propofol_ok = case["propofol_model"] in PAS_RIGHT_PROPOFOL or not case["propofol_segments"]
    remifentanil_ok = (case["remifentanil_model"] in PAS_RIGHT_REMIFENTANIL
                       or not case["remifentanil_segments"])
    for drug, ok in (("propofol", propofol_ok), ("remifentanil", remifentanil_ok)):
        for curve in (f"{drug}_cp", f"{drug}_ce"):
            if ok:
                err = rel_to_peak(got[curve], pas[curve])
                assert err <= REQ_REL, f"{name} {curve} vs PAS: {err:.3g} of peak"
            else:  # PAS slip: hold the package to the literature (the reference) instead
                err = rel_to_peak(got[curve], want[curve])
                assert err <= REQ_REL, f"{name} {curve} vs reference: {err:.3g} of peak"
    if propofol_ok and remifentanil_ok:
        err = max_abs(got["bis"], pas["bis"])
        assert err <= REQ_BIS, f"{name} BIS vs PAS: {err:.3g}"
    else:
        assert max_abs(got["bis"], want["bis"]) <= REQ_BIS
    # The slips are exactly as documented (parameters PAS actually used):
    if case["remifentanil_model"] == "Eleveld":
        ksex = 1.0 if male else 1.0 + 0.470 * ref._sigmoid(age, 12.0, 6.0) \
            * (1.0 - ref._sigmoid(age, 45.0, 6.0))
        v2 = package_params(case)["remifentanil_v2"]
        assert pas_params["remifentanil_params"]["v2_l"] == pytest.approx(
            v2 * 8.882 / 8.82 / ksex, rel=1e-12)
    if case["propofol_model"] == "Marsh_initial":
        pas_p = pas_params["propofol_params"]
        assert pas_p["v2_l"] == pytest.approx(0.463 * weight, rel=1e-12)
        assert pas_p["v3_l"] == pytest.approx(2.893 * weight, rel=1e-12)
        assert pas_p["cl3_l_per_min"] / pas_p["v1_l"] == pytest.approx(0.042, rel=1e-12)


def _pas_parameters_for_package(case: dict) -> dict:
    """The package's parameter dict with the values PAS used (pas_manifest.json)."""
    values = package_params(case)
    manifest = PAS_MANIFEST[case["name"]]
    for drug in ("propofol", "remifentanil"):
        p = manifest[f"{drug}_params"]
        if drug == "propofol" and case["propofol_model"] == "Marsh_initial":
            v1 = p["v1_l"]
            values.update({"propofol_v1": v1, "propofol_ke0": p["ke0_per_min"],
                           "propofol_k10": p["cl1_l_per_min"] / v1,
                           "propofol_k12": p["cl2_l_per_min"] / v1,
                           "propofol_k13": p["cl3_l_per_min"] / v1,
                           "propofol_k21": p["cl2_l_per_min"] / p["v2_l"],
                           "propofol_k31": p["cl3_l_per_min"] / p["v3_l"]})
        else:
            values.update({f"{drug}_{short}": p[key] for short, key in PK_KEYS.items()})
    values.update({f"bis_{k}": v for k, v in zip(BIS_KEYS, manifest["hill_param"])})
    return values


@case_params
def test_package_with_pas_parameters_reproduces_pas(name):
    """Fed PAS's own parameters, the package reproduces every PAS curve (measured <= 1e-11 of
    peak): what remains against PAS is the parameter slips above, not the simulator."""
    case = CASE_BY_NAME[name]
    res = simulate(load(model_name(case)).model, _pas_parameters_for_package(case),
                   doses(case), pas_times(name))
    pas = pas_curves(name)
    for curve in CURVES:
        err = rel_to_peak(res.output(curve), pas[curve])
        assert err <= TIGHT_REL, f"{name} {curve}: {err:.3g} of peak"
    # PAS: phi = Up/(U + 1e-6); package: Up/(U + 1e-5) and its Hill eps. Measured <= 2.4e-4.
    assert max_abs(res.output("bis"), pas["bis"]) <= TIGHT_BIS


# ------------------------------------------------------------------------ CLI end to end

def _dosing_csv(case: dict, style: str) -> str:
    """The case's infusion segments as a dosing table, in one of two unit styles."""
    _, _, weight, _ = patient(case)
    rows = []
    segments = [("propofol", s) for s in case["propofol_segments"]] + \
        [("remifentanil", s) for s in case["remifentanil_segments"]]
    if style == "per_kg":  # rate in ug/kg/min, duration in min (clinical units)
        lines = ["time_s,input,rate_ug_per_kg_per_min,duration_min"]
        for drug, (a, b, r) in segments:
            ug_per_s = r * 1000.0 if drug == "propofol" else r
            rows.append(f"{a!r},{drug},{ug_per_s * 60.0 / weight!r},{(b - a) / 60.0!r}")
    else:  # amount in mg (remifentanil converted from ug) and duration in s
        lines = ["time_s,input,amount_mg,duration_s"]
        for drug, (a, b, r) in segments:
            mg = r * (b - a) * (1.0 if drug == "propofol" else 1e-3)
            rows.append(f"{a!r},{drug},{mg!r},{b - a!r}")
    return "\n".join(lines + rows) + "\n"


@pytest.mark.parametrize("name, style", [
    ("c01_P1_schnider_minto_std", "per_kg"),      # Schnider + Minto, male, beta 0
    ("c06_P2_eleveld_eleveld_step", "amounts"),   # Eleveld both, female, beta 0.5, top-up
    ("c12_P4_marsh_eleveld_step", "per_kg"),      # Marsh + Eleveld remifentanil, female
])
def test_cli_simulate_matches_reference(name, style, tmp_path, capsys):
    case = CASE_BY_NAME[name]
    dosing = tmp_path / "doses.csv"
    dosing.write_text(_dosing_csv(case, style))
    out = tmp_path / "out.csv"
    cov = covariates(case)
    bis = ",".join(f"bis_{k}={case['bis_params'][k]!r}" for k in BIS_KEYS)
    argv = ["simulate", "--model", model_name(case),
            "--covariates", ",".join(f"{k}={v}" for k, v in cov.items()),
            "--params", bis, "--doses", str(dosing),
            "--duration", str(case["duration_s"]), "--step", "5", "--out", str(out)]
    assert cli_main(argv) == 0, capsys.readouterr().err
    df = pd.read_csv(out)
    want = reference_curves(name)
    t = df["time_s"].to_numpy(float)
    assert t[0] == 0.0 and t[-1] == case["duration_s"] and np.allclose(np.diff(t), 5.0)
    rows = np.searchsorted(want["t"], t)  # the reference grid holds every 5-s point
    assert np.array_equal(want["t"][rows], t)
    columns = {"propofol_cp": "propofol_cp_ug_per_mL", "propofol_ce": "propofol_ce_ug_per_mL",
               "remifentanil_cp": "remifentanil_cp_ng_per_mL",
               "remifentanil_ce": "remifentanil_ce_ng_per_mL"}
    for curve, column in columns.items():
        # peak of the reference on its own (1-s early) grid, as in the other tests
        peak = np.max(np.abs(want[curve]))
        err = np.max(np.abs(df[column].to_numpy(float) - want[curve][rows]))
        err = err / peak if peak > 0 else err
        tight = (TIGHT_REL_ELEVELD_PROPOFOL
                 if curve.startswith("propofol") and case["propofol_model"] == "Eleveld"
                 else TIGHT_REL)
        assert err <= REQ_REL, f"CLI {name} {column}: {err:.3g} of peak"
        assert err <= tight, f"CLI {name} {column}: {err:.3g} of peak"
    err = max_abs(df["bis_unitless"], want["bis"][rows])
    assert err <= REQ_BIS, f"CLI {name} BIS: {err:.3g}"
    assert err <= TIGHT_BIS, f"CLI {name} BIS: {err:.3g}"
