"""The model library: published parameter values for reference patients, and composition."""

import math

import numpy as np
import pytest

from mpc_dose.errors import ModelError
from mpc_dose.model.dosing import Dose
from mpc_dose.model.library import ENTRIES, entry, load
from mpc_dose.model.simulation import simulate
from mpc_dose.units import parse_unit

MAN_35 = {"age": 35, "height": 170, "weight": 70, "sex": "male"}


@pytest.mark.parametrize("name", [n for n, e in ENTRIES.items() if not e.requires])
def test_every_entry_compiles_with_its_typical_patient(name):
    """Every stand-alone entry builds, and its typical parameters fill the model."""
    lm = load(name)
    covariates = {c.name: (c.choices[0] if c.choices else
                           {"age": 50, "height": 170, "weight": 70, "crcl": 80}[c.name])
                  for c in lm.population.covariates if c.default is None}
    p = lm.model.parameter_vector(lm.population.typical_parameters(covariates))
    assert np.all(np.isfinite(lm.model.initial_state(p)))


@pytest.mark.parametrize("name", list(ENTRIES))
def test_declarations_carry_units_and_references(name):
    """Every fixed effect has a readable unit, a meaning and a reference."""
    e = entry(name)
    assert e.references
    for theta in e.population.thetas:
        parse_unit(theta.unit)
        assert theta.doc and theta.reference, theta.name


def test_schnider_reference_man():
    """Schnider 1998 for 35 yr, 170 cm, 70 kg male: CL1 1.63813 L/min, V2 25.938 L."""
    p = load("propofol-schnider").population.typical_parameters(MAN_35)
    assert p["propofol_cl1"] == pytest.approx(1.638135, abs=2e-6)
    assert p["propofol_v2"] == pytest.approx(25.938)
    assert p["propofol_cl2"] == pytest.approx(1.722)
    assert (p["propofol_v1"], p["propofol_v3"], p["propofol_cl3"], p["propofol_ke0"]) == \
        (4.27, 238.0, 0.836, 0.456)


def test_schnider_female_uses_the_female_lean_body_mass():
    """Female 35 yr, 170 cm, 70 kg: LBM 49.8066 kg gives CL1 2.01207 L/min."""
    p = load("propofol-schnider").population.typical_parameters({**MAN_35, "sex": "female"})
    assert p["propofol_cl1"] == pytest.approx(2.01207, abs=1e-5)


def test_marsh_scales_v1_with_weight():
    """Marsh: V1 = 0.228 L/kg (15.96 L at 70 kg), ke0 0.26/min."""
    p = load("propofol-marsh").population.typical_parameters({"weight": 70})
    assert p["propofol_v1"] == pytest.approx(15.96)
    assert p["propofol_ke0"] == 0.26


@pytest.mark.parametrize("opiates, v3, cl", [("no", 272.817, 1.78958), ("yes", 168.2112, 1.6193)])
def test_eleveld_propofol_reference_man(opiates, v3, cl):
    """Eleveld 2018: the reference man has the reference thetas; opiates shrink V3 and CL."""
    p = load("propofol-eleveld").population.typical_parameters({**MAN_35, "opiates": opiates})
    assert p["propofol_v1"] == pytest.approx(6.28308, rel=1e-5)
    assert p["propofol_v2"] == pytest.approx(25.5013, rel=1e-5)
    assert p["propofol_v3"] == pytest.approx(v3, rel=1e-4)
    assert p["propofol_cl1"] == pytest.approx(cl, rel=1e-4)
    assert p["propofol_cl2"] == pytest.approx(1.8309, rel=1e-4)  # 1.75 x (1 + 1.30 (1 - fQ3mat))
    assert p["propofol_ke0"] == pytest.approx(0.146)


def test_eleveld_propofol_older_woman():
    """Eleveld 2018, female 50 yr, 60 kg, 160 cm, opiates: published-model values."""
    p = load("propofol-eleveld").population.typical_parameters(
        {"age": 50, "weight": 60, "height": 160, "sex": "female"})
    expected = {"propofol_v1": 5.9612, "propofol_v2": 17.2892, "propofol_v3": 97.3908,
                "propofol_cl1": 1.6219, "propofol_cl2": 1.3506, "propofol_cl3": 0.5174,
                "propofol_ke0": 0.146 * (60 / 70) ** -0.25}
    for k, v in expected.items():
        assert p[k] == pytest.approx(v, rel=2e-4), k


def test_minto_reference_man():
    """Minto 1997, male 40 yr, 170 cm, 70 kg (LBM 55.2976 kg)."""
    p = load("remifentanil-minto").population.typical_parameters({**MAN_35, "age": 40})
    assert p["remifentanil_v1"] == pytest.approx(5.12143, abs=1e-5)
    assert p["remifentanil_v2"] == pytest.approx(9.85214, abs=1e-5)
    assert p["remifentanil_cl1"] == pytest.approx(2.60568, abs=1e-5)
    assert (p["remifentanil_cl2"], p["remifentanil_cl3"], p["remifentanil_ke0"]) == \
        pytest.approx((2.05, 0.076, 0.595))


@pytest.mark.parametrize("patient, expected", [
    (MAN_35, (5.81, 8.82, 5.03, 2.58, 1.72, 0.124, 1.09)),
    ({**MAN_35, "sex": "female"}, (4.7876, 10.0602, 4.1449, 3.0887, 2.6277, 0.10725, 1.09)),
    ({"age": 70, "weight": 80, "height": 175, "sex": "male"},
     (5.2874, 8.6904, 1.4227, 2.4805, 1.4012, 0.039616, 0.39640)),
])
def test_eleveld_remifentanil(patient, expected):
    """Eleveld 2017 with KSEX on V2, CL and Q2 (PAS omits it on V2: a slip); values to the
    4-5 digits they were computed to by hand from the published formulas."""
    p = load("remifentanil-eleveld").population.typical_parameters(patient)
    names = ["v1", "v2", "v3", "cl1", "cl2", "cl3", "ke0"]
    got = [p[f"remifentanil_{k}"] for k in names]
    assert got == pytest.approx(list(expected), rel=3e-4)


def test_goti_vancomycin():
    """Goti 2018: CL = 4.5 (CrCL/120)^0.8 0.7^DIAL L/h; V1 = 58.4 WT/70 0.5^DIAL L."""
    pop = load("vancomycin-goti").population
    p = pop.typical_parameters({"crcl": 62, "weight": 79, "dialysis": "no"})
    assert p["vancomycin_cl1"] == pytest.approx(2.6533, abs=1e-4)
    assert p["vancomycin_v1"] == pytest.approx(65.909, abs=1e-3)
    dial = pop.typical_parameters({"crcl": 62, "weight": 79, "dialysis": "yes"})
    assert dial["vancomycin_cl1"] == pytest.approx(2.6533 * 0.7, abs=1e-4)
    capped = pop.typical_parameters({"crcl": 200, "weight": 70, "dialysis": "no"})
    assert capped["vancomycin_cl1"] == pytest.approx(4.5 * (150 / 120) ** 0.8)
    assert [round(r.cv, 3) for r in pop.random_effects] == [0.398, 0.816, 0.571]


def test_norepinephrine_starts_at_its_endogenous_level():
    """Without infusion, norepinephrine stays at 0.473 ng/mL and MAP at its baseline."""
    lm = load("norepinephrine-map")
    p = lm.population.typical_parameters({"weight": 70})
    res = simulate(lm.model, p, [], np.linspace(0, 3600, 13))
    assert res.output("norepinephrine_cp") == pytest.approx(0.473, rel=1e-9)
    assert res.output("map") == pytest.approx(55 + 32 * 0.473 / (0.473 + 4.11), rel=1e-9)


def test_fluorouracil_clearance_is_circadian():
    """5-FU clearance peaks at its acrophase: constant infusion gives a trough near 16:30."""
    lm = load("fluorouracil-circadian")
    assert lm.model.is_time_varying
    p = lm.population.typical_parameters({})
    p["clock_time_at_t0"] = 0.0
    times = np.arange(48 * 3600, 72 * 3600 + 1, 600.0)
    res = simulate(lm.model, p, [Dose.infusion(0, "fluorouracil", 1000 / 3600, 80 * 3600)],
                   times)
    c = res.output("fluorouracil_cp")
    clock = (times / 3600) % 24
    assert abs(clock[np.argmin(c)] - 16.5) < 0.5
    assert c.max() / c.min() == pytest.approx(1.2, abs=0.02)


def test_docetaxel_friberg_nadir():
    """A 75 mg/m^2-like docetaxel dose (135 mg over 1 h) gives a neutrophil nadir after ~1 week."""
    lm = load("docetaxel-onoue+neutropenia-friberg-docetaxel")
    p = lm.population.typical_parameters({})
    times = np.arange(0, 21 * 86400 + 1, 3600.0)
    res = simulate(lm.model, p, [Dose.infusion(0, "docetaxel", 135 / 3600, 3600)], times)
    anc = res.output("anc")
    nadir_day = times[np.argmin(anc)] / 86400
    assert anc[0] == pytest.approx(5.05)
    assert 5 < nadir_day < 12
    assert anc.min() < 0.5 * 5.05


def test_unknown_model_name_suggests_the_nearest():
    """A misspelt model name is an error with a suggestion."""
    with pytest.raises(ModelError, match="did you mean 'propofol-schnider'"):
        load("propofol-schnyder")


def test_pd_entry_needs_its_pk_first():
    """The BIS surface composed without remifentanil names what is missing."""
    with pytest.raises(ModelError, match="needs remifentanil_ce"):
        load("propofol-schnider+bis-bouillon")


def test_eleveld_tiva_composite():
    """Both Eleveld models and the Bouillon surface compose into one 8-state model."""
    lm = load("propofol-eleveld+remifentanil-eleveld+bis-bouillon")
    assert lm.model.n_states == 8 and lm.model.input_names == ["propofol", "remifentanil"]
    assert math.isclose(lm.population.typical_parameters(MAN_35)["bis_c50p"], 4.47)
