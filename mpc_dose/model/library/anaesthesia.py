"""Anaesthesia models: propofol (Schnider, Marsh, Eleveld), remifentanil (Minto, Eleveld) and
the BIS response (Bouillon surface, single-drug Hill curve).

Units: propofol amounts mg, concentrations ug/mL (= mg/L), infusion mg/s; remifentanil
amounts ug, concentrations ng/mL (= ug/L), infusion ug/s; volumes L, clearances L/min,
rate constants 1/min. Every number carries its source; where sources disagree the choice is
said in the entry's ``notes`` (sources were compared in May-Nov 2026: the papers' tables as
transcribed by stanpumpR (S. Shafer), PyTCI, opentiva, nlmixr2lib and the
python-anesthesia-simulator (PAS)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..links import effect_compartment
from ..pd import bouillon_bis, emax_effect
from ..pk import mammillary
from ..population import (Covariate, FixedEffect, PopulationModel, RandomEffect,
                          omega2_from_cv)
from .base import AGE, HEIGHT, SEX, WEIGHT, LibraryEntry

__all__ = ["ENTRIES", "james_lean_body_mass", "al_sallami_fat_free_mass"]

SCHNIDER_1998 = ("Schnider TW, Minto CF, Gambus PL, et al. The influence of method of "
                 "administration and covariates on the pharmacokinetics of propofol in adult "
                 "volunteers. Anesthesiology 1998;88(5):1170-82. doi:10.1097/00000542-199805000-00006")
SCHNIDER_1999 = ("Schnider TW, Minto CF, Shafer SL, et al. The influence of age on propofol "
                 "pharmacodynamics. Anesthesiology 1999;90(6):1502-16. "
                 "doi:10.1097/00000542-199906000-00003")
MARSH_1991 = ("Marsh B, White M, Morton N, Kenny GNC. Pharmacokinetic model driven infusion of "
              "propofol in children. Br J Anaesth 1991;67(1):41-8. doi:10.1093/bja/67.1.41")
ELEVELD_2018 = ("Eleveld DJ, Colin P, Absalom AR, Struys MMRF. Pharmacokinetic-pharmacodynamic "
                "model for propofol for broad application in anaesthesia and sedation. "
                "Br J Anaesth 2018;120(5):942-59. doi:10.1016/j.bja.2018.01.018")
MINTO_1997 = ("Minto CF, Schnider TW, Egan TD, et al. Influence of age and gender on the "
              "pharmacokinetics and pharmacodynamics of remifentanil. I. Model development. "
              "Anesthesiology 1997;86(1):10-23. doi:10.1097/00000542-199701000-00004")
ELEVELD_2017 = ("Eleveld DJ, Proost JH, Vereecke H, et al. An allometric model of remifentanil "
                "pharmacokinetics and pharmacodynamics. Anesthesiology 2017;126(6):1005-18. "
                "doi:10.1097/ALN.0000000000001634")
BOUILLON_2004 = ("Bouillon TW, Bruhn J, Radulescu L, et al. Pharmacodynamic interaction between "
                 "propofol and remifentanil regarding hypnosis, tolerance of laryngoscopy, "
                 "bispectral index, and electroencephalographic approximate entropy. "
                 "Anesthesiology 2004;100(6):1353-72. doi:10.1097/00000542-200406000-00006")
JAMES_1976 = "James WPT. Research on obesity. London: HMSO; 1976 (lean body mass formula)."
AL_SALLAMI_2015 = ("Al-Sallami HS, Goulding A, Grant A, et al. Prediction of fat-free mass in "
                   "children. Clin Pharmacokinet 2015;54(11):1169-78. "
                   "doi:10.1007/s40262-015-0277-z")

_MALE = "male"


def james_lean_body_mass(weight_kg: float, height_cm: float, sex: str) -> float:
    """James lean body mass [kg] (used by Schnider and Minto)."""
    if sex == _MALE:
        return 1.1 * weight_kg - 128.0 * (weight_kg / height_cm) ** 2
    return 1.07 * weight_kg - 148.0 * (weight_kg / height_cm) ** 2


def al_sallami_fat_free_mass(weight_kg: float, height_cm: float, age_yr: float, sex: str
                             ) -> float:
    """Al-Sallami fat-free mass [kg] (used by both Eleveld models)."""
    bmi = weight_kg / (height_cm / 100.0) ** 2
    if sex == _MALE:
        return (0.88 + (1 - 0.88) / (1 + (age_yr / 13.4) ** -12.7)) \
            * 9270.0 * weight_kg / (6680.0 + 216.0 * bmi)
    return (1.11 + (1 - 1.11) / (1 + (age_yr / 7.1) ** -1.1)) \
        * 9270.0 * weight_kg / (8780.0 + 244.0 * bmi)


def _three_compartment_with_effect_site(drug: str, amount_unit: str, concentration_unit: str,
                                        parameterisation: str = "clearance"):
    def build(_available: Mapping) -> list:
        pk = mammillary(drug, 3, amount_unit=amount_unit, concentration_unit=concentration_unit,
                        parameterisation=parameterisation)
        ce = effect_compartment(f"{drug}_ce", pk.output(f"{drug}_cp"), ke0_name=f"{drug}_ke0")
        return [pk, ce]
    return build


def _omegas(drug: str, values: Mapping[str, float], doc: str) -> tuple[RandomEffect, ...]:
    return tuple(RandomEffect(f"{drug}_{k}", v, doc) for k, v in values.items())



# ---------------------------------------------------------------- propofol, Schnider
_SCHNIDER = (
    FixedEffect("schnider_v1", 4.27, "L", "central volume", SCHNIDER_1998),
    FixedEffect("schnider_v2", 18.9, "L", "rapid peripheral volume at age 53", SCHNIDER_1998),
    FixedEffect("schnider_v2_age", -0.391, "L/yr", "change of V2 per year of age over 53",
                SCHNIDER_1998),
    FixedEffect("schnider_v3", 238.0, "L", "slow peripheral volume", SCHNIDER_1998),
    FixedEffect("schnider_cl1", 1.89, "L/min", "elimination clearance at 77 kg, 59 kg LBM, "
                "177 cm", SCHNIDER_1998),
    FixedEffect("schnider_cl1_weight", 0.0456, "L/min/kg", "change of CL1 per kg of weight",
                SCHNIDER_1998),
    FixedEffect("schnider_cl1_lbm", -0.0681, "L/min/kg", "change of CL1 per kg of LBM",
                SCHNIDER_1998),
    FixedEffect("schnider_cl1_height", 0.0264, "L/min/cm", "change of CL1 per cm of height",
                SCHNIDER_1998),
    FixedEffect("schnider_cl2", 1.29, "L/min", "rapid distribution clearance at age 53",
                SCHNIDER_1998),
    FixedEffect("schnider_cl2_age", -0.024, "L/min/yr", "change of CL2 per year over 53",
                SCHNIDER_1998),
    FixedEffect("schnider_cl3", 0.836, "L/min", "slow distribution clearance", SCHNIDER_1998),
    FixedEffect("schnider_ke0", 0.456, "1/min", "effect-site equilibration rate constant",
                SCHNIDER_1999),
)


def _schnider_typical(c: Mapping, th: Mapping) -> dict[str, float]:
    lbm = james_lean_body_mass(c["weight"], c["height"], c["sex"])
    return {
        "propofol_v1": th["schnider_v1"],
        "propofol_v2": th["schnider_v2"] + th["schnider_v2_age"] * (c["age"] - 53),
        "propofol_v3": th["schnider_v3"],
        "propofol_cl1": th["schnider_cl1"] + th["schnider_cl1_weight"] * (c["weight"] - 77)
        + th["schnider_cl1_lbm"] * (lbm - 59) + th["schnider_cl1_height"] * (c["height"] - 177),
        "propofol_cl2": th["schnider_cl2"] + th["schnider_cl2_age"] * (c["age"] - 53),
        "propofol_cl3": th["schnider_cl3"],
        "propofol_ke0": th["schnider_ke0"],
    }


PROPOFOL_SCHNIDER = LibraryEntry(
    name="propofol-schnider",
    title="propofol, Schnider 1998/1999 (3 compartments + effect site, ke0 0.456/min)",
    references=(SCHNIDER_1998, SCHNIDER_1999, JAMES_1976),
    blocks=_three_compartment_with_effect_site("propofol", "mg", "ug/mL"),
    population=PopulationModel(
        (AGE, HEIGHT, WEIGHT, SEX), _SCHNIDER, _schnider_typical,
        # Schnider 1998 reports the interindividual variances on the log scale (omega^2);
        # PAS multiplies them by the typical value first, which is dimensionally wrong.
        _omegas("propofol", {"v1": 0.0404, "v2": 0.01, "v3": 0.1435, "cl1": 0.1005,
                             "cl2": 0.01, "cl3": 0.1179}, "Schnider 1998 (omega^2)")),
    notes="LBM by James. No IIV on ke0 was published; none is invented here. "
          "Use V2 = 18.9 - 0.391 (age - 53) (opentiva's 52 is a slip).",
)

# ---------------------------------------------------------------- propofol, Marsh
_MARSH = (
    FixedEffect("marsh_v1_per_kg", 0.228, "L/kg", "central volume per kg", MARSH_1991),
    FixedEffect("marsh_k10", 0.119, "1/min", "elimination rate constant", MARSH_1991),
    FixedEffect("marsh_k12", 0.112, "1/min", "rate constant central -> rapid", MARSH_1991),
    FixedEffect("marsh_k21", 0.055, "1/min", "rate constant rapid -> central", MARSH_1991),
    FixedEffect("marsh_k13", 0.0419, "1/min", "rate constant central -> slow", MARSH_1991),
    FixedEffect("marsh_k31", 0.0033, "1/min", "rate constant slow -> central", MARSH_1991),
    FixedEffect("marsh_ke0", 0.26, "1/min", "effect-site rate constant of the Diprifusor",
                MARSH_1991),
)


def _marsh_typical(c: Mapping, th: Mapping) -> dict[str, float]:
    return {"propofol_v1": th["marsh_v1_per_kg"] * c["weight"],
            **{f"propofol_{k}": th[f"marsh_{k}"] for k in ("k10", "k12", "k21", "k13", "k31",
                                                           "ke0")}}


PROPOFOL_MARSH = LibraryEntry(
    name="propofol-marsh",
    title="propofol, Marsh 1991 (Diprifusor; micro constants, ke0 0.26/min)",
    references=(MARSH_1991,),
    blocks=_three_compartment_with_effect_site("propofol", "mg", "ug/mL", "micro"),
    population=PopulationModel((WEIGHT,), _MARSH, _marsh_typical),
    notes="k13 0.0419 and k31 0.0033 (opentiva; PyTCI 0.0031, PAS derives 0.042 and 0.00331 "
          "from V2 = 0.463 and V3 = 2.893 L/kg). No IIV was published. ke0 1.2/min is the "
          "'modified Marsh' of Struys 2000, not part of this entry.",
)

# ---------------------------------------------------------------- propofol, Eleveld
_ELEVELD_P = (
    FixedEffect("eleveld_p_v1", 6.2830780766822, "L", "V1 of the reference patient", ELEVELD_2018),
    FixedEffect("eleveld_p_v2", 25.5013145036879, "L", "V2 of the reference patient", ELEVELD_2018),
    FixedEffect("eleveld_p_v3", 272.8166615043603, "L", "V3 of the reference patient", ELEVELD_2018),
    FixedEffect("eleveld_p_cl_male", 1.7895836588902, "L/min", "CL of the reference patient (male)",
                ELEVELD_2018),
    FixedEffect("eleveld_p_q2", 1.7500983738779, "L/min", "Q2 theta (before maturation term)",
                ELEVELD_2018),
    FixedEffect("eleveld_p_q3", 1.1085424008536, "L/min", "Q3 of the reference patient", ELEVELD_2018),
    FixedEffect("eleveld_p_cl_maturation_e50", 42.2760190602615, "wk", "PMA at half CL maturation",
                ELEVELD_2018),
    FixedEffect("eleveld_p_cl_maturation_slope", 9.0548452392807, "1", "steepness of CL maturation",
                ELEVELD_2018),
    FixedEffect("eleveld_p_v2_ageing", -0.015633, "1/yr", "V2 decline with age", ELEVELD_2018),
    FixedEffect("eleveld_p_cl_opiates", -0.00285709, "1/yr", "CL decline with age with opiates",
                ELEVELD_2018),
    FixedEffect("eleveld_p_v1_weight_e50", 33.5531248778544, "kg", "weight at half-maximal V1",
                ELEVELD_2018),
    FixedEffect("eleveld_p_v3_opiates", -0.0138166, "1/yr", "V3 decline with age with opiates",
                ELEVELD_2018),
    FixedEffect("eleveld_p_q3_maturation_e50", 68.2767978846832, "wk", "PMA at half Q3 maturation",
                ELEVELD_2018),
    FixedEffect("eleveld_p_cl_female", 2.1002218877899, "L/min", "CL of the reference patient if female",
                ELEVELD_2018),
    FixedEffect("eleveld_p_q2_immature", 1.3042680471360, "1", "extra Q2 before Q3 maturation",
                ELEVELD_2018),
    FixedEffect("eleveld_p_v1_venous", 1.4189043652084, "1", "extra V1 for venous samples",
                ELEVELD_2018),
    FixedEffect("eleveld_p_q2_venous", 0.6805003109141, "1", "Q2 factor for venous samples",
                ELEVELD_2018),
    FixedEffect("eleveld_p_ke0_arterial", 0.146, "1/min", "ke0 at 70 kg, arterial model",
                ELEVELD_2018),
    FixedEffect("eleveld_p_ke0_venous", 1.24, "1/min", "ke0 at 70 kg, venous model",
                ELEVELD_2018),
)
OPIATES = Covariate("opiates", "", "opiates co-administered (Eleveld 2018 covariate); yes in "
                    "TIVA with remifentanil", choices=("yes", "no"), default="yes")
SAMPLING = Covariate("sampling", "", "blood sampling site the Eleveld PK predicts",
                     choices=("arterial", "venous"), default="arterial")


def _sigmoid(x: float, e50: float, slope: float) -> float:
    return x**slope / (x**slope + e50**slope)


def _eleveld_propofol_typical(c: Mapping, th: Mapping) -> dict[str, float]:
    age, weight, male = c["age"], c["weight"], c["sex"]
    pma_wk, pma_ref = age * 52 + 40, 35 * 52 + 40
    venous = c["sampling"] == "venous"
    opiates = c["opiates"] == "yes"

    def central(w):
        return _sigmoid(w, th["eleveld_p_v1_weight_e50"], 1)

    def opiate(x):  # exp(x * AGE), not (AGE - 35): as published
        return math.exp(x * age) if opiates else 1.0

    ffm = al_sallami_fat_free_mass(weight, c["height"], age, male)
    ffm_ref = al_sallami_fat_free_mass(70, 170, 35, _MALE)
    cl_mat = _sigmoid(pma_wk, th["eleveld_p_cl_maturation_e50"],
                      th["eleveld_p_cl_maturation_slope"])
    cl_mat_ref = _sigmoid(pma_ref, th["eleveld_p_cl_maturation_e50"],
                          th["eleveld_p_cl_maturation_slope"])
    q3_mat = _sigmoid(pma_wk, th["eleveld_p_q3_maturation_e50"], 1)
    q3_mat_ref = _sigmoid(pma_ref, th["eleveld_p_q3_maturation_e50"], 1)
    v1 = th["eleveld_p_v1"] * central(weight) / central(70)
    if venous:
        v1 *= 1 + th["eleveld_p_v1_venous"] * (1 - central(weight))
    v2 = th["eleveld_p_v2"] * weight / 70 * math.exp(th["eleveld_p_v2_ageing"] * (age - 35))
    v3 = th["eleveld_p_v3"] * ffm / ffm_ref * opiate(th["eleveld_p_v3_opiates"])
    cl = (th["eleveld_p_cl_male"] if male == _MALE else th["eleveld_p_cl_female"]) \
        * (weight / 70) ** 0.75 * cl_mat / cl_mat_ref * opiate(th["eleveld_p_cl_opiates"])
    q2 = th["eleveld_p_q2"] * (v2 / th["eleveld_p_v2"]) ** 0.75 \
        * (1 + th["eleveld_p_q2_immature"] * (1 - q3_mat))
    if venous:
        q2 *= th["eleveld_p_q2_venous"]
    q3 = th["eleveld_p_q3"] * (v3 / th["eleveld_p_v3"]) ** 0.75 * q3_mat / q3_mat_ref
    ke0 = th["eleveld_p_ke0_venous" if venous else "eleveld_p_ke0_arterial"] \
        * (weight / 70) ** -0.25
    return {"propofol_v1": v1, "propofol_v2": v2, "propofol_v3": v3, "propofol_cl1": cl,
            "propofol_cl2": q2, "propofol_cl3": q3, "propofol_ke0": ke0}


PROPOFOL_ELEVELD = LibraryEntry(
    name="propofol-eleveld",
    title="propofol, Eleveld 2018 (3 compartments + effect site; all ages, opiate covariate)",
    references=(ELEVELD_2018, AL_SALLAMI_2015),
    blocks=_three_compartment_with_effect_site("propofol", "mg", "ug/mL"),
    population=PopulationModel(
        (AGE, HEIGHT, WEIGHT, SEX, OPIATES, SAMPLING), _ELEVELD_P, _eleveld_propofol_typical,
        _omegas("propofol", {"v1": 0.610, "v2": 0.565, "v3": 0.597, "cl1": 0.265, "cl2": 0.346,
                             "cl3": 0.209, "ke0": 0.702}, "Eleveld 2018 (omega^2)")),
    notes="Thetas at full precision as in the NONMEM estimates (PAS; exp() of stanpumpR's "
          "log-scale thetas to 1e-6; they round to the paper's Table 2). Q2 theta is 1.750 (opentiva's 1.83 is the evaluated Q2 of "
          "the 35-year reference and double-counts maturation). PMA = 52 age + 40 weeks "
          "(term birth). The ke0 omega 0.702 has a single source (PAS).",
)

# ---------------------------------------------------------------- remifentanil, Minto
_MINTO = (
    FixedEffect("minto_v1", 5.1, "L", "V1 at age 40 and LBM 55 kg", MINTO_1997),
    FixedEffect("minto_v1_age", -0.0201, "L/yr", "V1 change per year over 40", MINTO_1997),
    FixedEffect("minto_v1_lbm", 0.072, "L/kg", "V1 change per kg LBM over 55", MINTO_1997),
    FixedEffect("minto_v2", 9.82, "L", "V2 at age 40 and LBM 55 kg", MINTO_1997),
    FixedEffect("minto_v2_age", -0.0811, "L/yr", "V2 change per year over 40", MINTO_1997),
    FixedEffect("minto_v2_lbm", 0.108, "L/kg", "V2 change per kg LBM over 55", MINTO_1997),
    FixedEffect("minto_v3", 5.42, "L", "V3", MINTO_1997),
    FixedEffect("minto_cl1", 2.6, "L/min", "CL1 at age 40 and LBM 55 kg", MINTO_1997),
    FixedEffect("minto_cl1_age", -0.0162, "L/min/yr", "CL1 change per year over 40", MINTO_1997),
    FixedEffect("minto_cl1_lbm", 0.0191, "L/min/kg", "CL1 change per kg LBM over 55",
                MINTO_1997),
    FixedEffect("minto_cl2", 2.05, "L/min", "CL2 at age 40", MINTO_1997),
    FixedEffect("minto_cl2_age", -0.0301, "L/min/yr", "CL2 change per year over 40", MINTO_1997),
    FixedEffect("minto_cl3", 0.076, "L/min", "CL3 at age 40", MINTO_1997),
    FixedEffect("minto_cl3_age", -0.00113, "L/min/yr", "CL3 change per year over 40",
                MINTO_1997),
    FixedEffect("minto_ke0", 0.595, "1/min", "ke0 at age 40", MINTO_1997),
    FixedEffect("minto_ke0_age", -0.007, "1/min/yr", "ke0 change per year over 40", MINTO_1997),
)


def _minto_typical(c: Mapping, th: Mapping) -> dict[str, float]:
    lbm = james_lean_body_mass(c["weight"], c["height"], c["sex"])
    da, dl = c["age"] - 40, lbm - 55
    return {
        "remifentanil_v1": th["minto_v1"] + th["minto_v1_age"] * da + th["minto_v1_lbm"] * dl,
        "remifentanil_v2": th["minto_v2"] + th["minto_v2_age"] * da + th["minto_v2_lbm"] * dl,
        "remifentanil_v3": th["minto_v3"],
        "remifentanil_cl1": th["minto_cl1"] + th["minto_cl1_age"] * da
        + th["minto_cl1_lbm"] * dl,
        "remifentanil_cl2": th["minto_cl2"] + th["minto_cl2_age"] * da,
        "remifentanil_cl3": th["minto_cl3"] + th["minto_cl3_age"] * da,
        "remifentanil_ke0": th["minto_ke0"] + th["minto_ke0_age"] * da,
    }


REMIFENTANIL_MINTO = LibraryEntry(
    name="remifentanil-minto",
    title="remifentanil, Minto 1997 (3 compartments + effect site)",
    references=(MINTO_1997, JAMES_1976),
    blocks=_three_compartment_with_effect_site("remifentanil", "ug", "ng/mL"),
    population=PopulationModel(
        (AGE, HEIGHT, WEIGHT, SEX), _MINTO, _minto_typical,
        _omegas("remifentanil", {k: omega2_from_cv(cv) for k, cv in
                                 {"v1": 0.26, "v2": 0.29, "v3": 0.66, "cl1": 0.14, "cl2": 0.36,
                                  "cl3": 0.41, "ke0": 0.68}.items()},
                "Minto 1997 CV, omega^2 = ln(1 + CV^2)")),
    notes="IIV reported as CV (single source: PAS); converted with omega^2 = ln(1 + CV^2).",
)

# ---------------------------------------------------------------- remifentanil, Eleveld
_ELEVELD_R = (
    FixedEffect("eleveld_r_v1", 5.81, "L", "V1 of the reference patient", ELEVELD_2017),
    FixedEffect("eleveld_r_v2", 8.82, "L", "V2 of the reference patient", ELEVELD_2017),
    FixedEffect("eleveld_r_v3", 5.03, "L", "V3 of the reference patient", ELEVELD_2017),
    FixedEffect("eleveld_r_cl", 2.58, "L/min", "CL of the reference patient", ELEVELD_2017),
    FixedEffect("eleveld_r_q2", 1.72, "L/min", "Q2 of the reference patient", ELEVELD_2017),
    FixedEffect("eleveld_r_q3", 0.124, "L/min", "Q3 of the reference patient", ELEVELD_2017),
    FixedEffect("eleveld_r_maturation_e50", 2.88, "kg", "weight at half CL maturation",
                ELEVELD_2017),
    FixedEffect("eleveld_r_ageing_v1_q", -0.00554, "1/yr", "ageing of V1, Q2 and Q3",
                ELEVELD_2017),
    FixedEffect("eleveld_r_ageing_v2_cl", -0.00327, "1/yr", "ageing of V2 and CL", ELEVELD_2017),
    FixedEffect("eleveld_r_ageing_v3", -0.0315, "1/yr", "ageing of V3", ELEVELD_2017),
    FixedEffect("eleveld_r_female", 0.470, "1", "extra CL, V2, Q2 of females aged 12-45",
                ELEVELD_2017),
    FixedEffect("eleveld_r_v3_weight", -0.0260, "1/kg", "V3 change with weight over 70 kg",
                ELEVELD_2017),
    FixedEffect("eleveld_r_ke0", 1.09, "1/min", "ke0 at age 35", ELEVELD_2017),
    FixedEffect("eleveld_r_ke0_ageing", -0.0289, "1/yr", "ageing of ke0", ELEVELD_2017),
)


def _eleveld_remifentanil_typical(c: Mapping, th: Mapping) -> dict[str, float]:
    age, weight = c["age"], c["weight"]
    size = al_sallami_fat_free_mass(weight, c["height"], age, c["sex"]) \
        / al_sallami_fat_free_mass(70, 170, 35, _MALE)
    e50 = th["eleveld_r_maturation_e50"]
    kmat = _sigmoid(weight, e50, 2) / _sigmoid(70, e50, 2)
    ksex = 1.0 if c["sex"] == _MALE else \
        1 + th["eleveld_r_female"] * _sigmoid(age, 12, 6) * (1 - _sigmoid(age, 45, 6))

    def ageing(x):
        return math.exp(x * (age - 35))

    v1 = th["eleveld_r_v1"] * size * ageing(th["eleveld_r_ageing_v1_q"])
    v2 = th["eleveld_r_v2"] * size * ageing(th["eleveld_r_ageing_v2_cl"]) * ksex
    v3 = th["eleveld_r_v3"] * size * ageing(th["eleveld_r_ageing_v3"]) \
        * math.exp(th["eleveld_r_v3_weight"] * (weight - 70))
    cl = th["eleveld_r_cl"] * size**0.75 * kmat * ksex * ageing(th["eleveld_r_ageing_v2_cl"])
    q2 = th["eleveld_r_q2"] * (v2 / th["eleveld_r_v2"]) ** 0.75 \
        * ageing(th["eleveld_r_ageing_v1_q"]) * ksex
    q3 = th["eleveld_r_q3"] * (v3 / th["eleveld_r_v3"]) ** 0.75 \
        * ageing(th["eleveld_r_ageing_v1_q"])
    ke0 = th["eleveld_r_ke0"] * ageing(th["eleveld_r_ke0_ageing"])
    return {"remifentanil_v1": v1, "remifentanil_v2": v2, "remifentanil_v3": v3,
            "remifentanil_cl1": cl, "remifentanil_cl2": q2, "remifentanil_cl3": q3,
            "remifentanil_ke0": ke0}


REMIFENTANIL_ELEVELD = LibraryEntry(
    name="remifentanil-eleveld",
    title="remifentanil, Eleveld 2017 (allometric, 3 compartments + effect site)",
    references=(ELEVELD_2017, AL_SALLAMI_2015),
    blocks=_three_compartment_with_effect_site("remifentanil", "ug", "ng/mL"),
    population=PopulationModel(
        (AGE, HEIGHT, WEIGHT, SEX), _ELEVELD_R, _eleveld_remifentanil_typical,
        _omegas("remifentanil", {"v1": 0.104, "v2": 0.115, "v3": 0.810, "cl1": 0.0197,
                                 "cl2": 0.0547, "cl3": 0.285, "ke0": 1.26},
                "Eleveld 2017 (omega^2; single source: PAS)")),
    notes="Follows stanpumpR's transcription of the NONMEM code: V2ref 8.82 and V2 scaled by "
          "KSEX (PAS has 8.882 and omits KSEX on V2, both slips; PyTCI's KSEX uses "
          "sigmoid(age, 45) instead of 1 - sigmoid, a slip). Ageing: V1, Q2, Q3 -0.00554; "
          "V2, CL -0.00327; V3 -0.0315.",
)

# ---------------------------------------------------------------- BIS
_BOUILLON = (
    FixedEffect("bouillon_c50p", 4.47, "ug/mL", "propofol Ce for half-maximal BIS effect alone",
                BOUILLON_2004),
    FixedEffect("bouillon_c50r", 19.3, "ng/mL", "remifentanil Ce for half-maximal effect alone",
                BOUILLON_2004),
    FixedEffect("bouillon_gamma", 1.43, "1", "steepness", BOUILLON_2004),
    FixedEffect("bouillon_beta", 0.0, "1", "interaction term (0: additive in U)", BOUILLON_2004),
    FixedEffect("bouillon_e0", 97.4, "1", "awake BIS", BOUILLON_2004),
    FixedEffect("bouillon_emax", 97.4, "1", "maximal BIS decrease", BOUILLON_2004),
)
_BOUILLON_OMEGA = {"c50p": omega2_from_cv(0.182), "c50r": omega2_from_cv(0.888),
                   "gamma": omega2_from_cv(0.304)}


def _bouillon_blocks(available: Mapping) -> list:
    return [bouillon_bis(available["propofol_ce"], available["remifentanil_ce"])]


BIS_BOUILLON = LibraryEntry(
    name="bis-bouillon",
    title="BIS, Bouillon 2004 propofol-remifentanil response surface",
    references=(BOUILLON_2004,),
    blocks=_bouillon_blocks,
    requires=("propofol_ce", "remifentanil_ce"),
    population=PopulationModel(
        (), _BOUILLON, lambda c, th: {f"bis_{k}": th[f"bouillon_{k}"]
                                      for k in ("c50p", "c50r", "gamma", "beta", "e0", "emax")},
        tuple(RandomEffect(f"bis_{k}", v, "Bouillon 2004 CV as in PAS, ln(1 + CV^2)")
              for k, v in _BOUILLON_OMEGA.items())),
    notes="Values as used by PAS and the TIVA benchmark (Aubouin-Pairault 2024): E0 = Emax = "
          "97.4, beta = 0; not re-checked against the paper's table.",
)


def _bis_propofol_blocks(available: Mapping) -> list:
    return [emax_effect("bis", available["propofol_ce"], direction="inhibitory", sigmoid=True)]


BIS_PROPOFOL = LibraryEntry(
    name="bis-propofol",
    title="BIS, single-drug sigmoid Emax of propofol (Bouillon 2004 propofol-alone values)",
    references=(BOUILLON_2004,),
    blocks=_bis_propofol_blocks,
    requires=("propofol_ce",),
    population=PopulationModel(
        (), (_BOUILLON[0], _BOUILLON[2], _BOUILLON[4], _BOUILLON[5]),
        lambda c, th: {"bis_c50": th["bouillon_c50p"], "bis_gamma": th["bouillon_gamma"],
                       "bis_e0": th["bouillon_e0"], "bis_emax": th["bouillon_emax"]},
        (RandomEffect("bis_c50", _BOUILLON_OMEGA["c50p"]),
         RandomEffect("bis_gamma", _BOUILLON_OMEGA["gamma"]))),
    notes="The DESIGN reference NMPC problem: E0 = Emax = 97.4, C50 4.47 ug/mL, gamma 1.43.",
)

ENTRIES = (PROPOFOL_SCHNIDER, PROPOFOL_MARSH, PROPOFOL_ELEVELD, REMIFENTANIL_MINTO,
           REMIFENTANIL_ELEVELD, BIS_BOUILLON, BIS_PROPOFOL)
