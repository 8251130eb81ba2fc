"""Library models outside anaesthesia: vancomycin (Goti 2018), norepinephrine -> mean
arterial pressure, docetaxel with Friberg neutropenia, and 5-fluorouracil with circadian
clearance. Every number carries its source; choices between disagreeing sources are in the
entries' ``notes``.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..pd import emax_effect, friberg_myelosuppression
from ..pk import mammillary
from ..population import (Covariate, FixedEffect, PopulationModel, RandomEffect,
                          ResidualError, omega2_from_cv)
from ..spec import Cosinor
from .base import WEIGHT, LibraryEntry

__all__ = ["ENTRIES"]

GOTI_2018 = ("Goti V, Chaturvedula A, Fossler MJ, Mok S, Jacob JT. Hospitalized patients with "
             "and without hemodialysis have markedly different vancomycin pharmacokinetics: a "
             "population pharmacokinetic model-based analysis. Ther Drug Monit "
             "2018;40(2):212-21. doi:10.1097/FTD.0000000000000490")
BELOEIL_2005 = ("Beloeil H, Mazoit JX, Benhamou D, Duranteau J. Norepinephrine kinetics and "
                "dynamics in septic shock and trauma patients. Br J Anaesth 2005;95(6):782-8. "
                "doi:10.1093/bja/aei259")
OUALHA_2014 = ("Oualha M, Treluyer JM, Lesage F, et al. Population pharmacokinetics and "
               "haemodynamic effects of norepinephrine in hypotensive critically ill children. "
               "Br J Clin Pharmacol 2014;78(4):886-97. doi:10.1111/bcp.12412")
ONOUE_2016 = ("Onoue H, Yano I, Tanaka A, et al. Significant effect of age on docetaxel "
              "pharmacokinetics in Japanese female breast cancer patients by using the "
              "population modeling approach. Eur J Clin Pharmacol 2016;72(6):703-10. "
              "doi:10.1007/s00228-016-2031-3")
FRIBERG_2002 = ("Friberg LE, Henningsson A, Maas H, Nguyen L, Karlsson MO. Model of "
                "chemotherapy-induced myelosuppression with parameter consistency across drugs. "
                "J Clin Oncol 2002;20(24):4713-21. doi:10.1200/JCO.2002.02.140")
NORRIS_DTAT = ("Norris DC. DTAT: Dose Titration Algorithm Tuning, R package (Onoue.Friberg: "
               "Onoue 2016 PK with Friberg 2002 docetaxel Emax neutropenia).")
YAMADA_2025 = ("Yamada A, Yang J, Bonate PL, Heo N, Poondru S. Population pharmacokinetics of "
               "5-fluorouracil in mFOLFOX6. Cancer Chemother Pharmacol 2025;95:89. "
               "doi:10.1007/s00280-025-04808-2")
FLEMING_2015 = ("Fleming GF, Schumm P, Friberg G, Ratain MJ, Njiaju UO, Schilsky RL. Circadian "
                "variation in plasma 5-fluorouracil concentrations during a 24 hour "
                "constant-rate infusion. BMC Cancer 2015;15:69. doi:10.1186/s12885-015-1075-6")



# ---------------------------------------------------------------- vancomycin, Goti 2018
CRCL = Covariate("crcl", "mL/min", "creatinine clearance (Cockcroft-Gault, not BSA-normalised)",
                 0.0, 400.0)
DIALYSIS = Covariate("dialysis", "", "on intermittent haemodialysis", choices=("yes", "no"))
_GOTI = (
    FixedEffect("goti_cl", 4.5, "L/h", "CL at CrCL 120 mL/min, no dialysis", GOTI_2018),
    FixedEffect("goti_cl_crcl", 0.8, "1", "exponent of CrCL/120 on CL", GOTI_2018),
    FixedEffect("goti_cl_dialysis", 0.7, "1", "CL factor on dialysis", GOTI_2018),
    FixedEffect("goti_crcl_cap", 150.0, "mL/min", "CrCL above this is truncated", GOTI_2018),
    FixedEffect("goti_v1", 58.4, "L", "V1 at 70 kg, no dialysis", GOTI_2018),
    FixedEffect("goti_v1_dialysis", 0.5, "1", "V1 factor on dialysis", GOTI_2018),
    FixedEffect("goti_q", 6.5, "L/h", "inter-compartmental clearance", GOTI_2018),
    FixedEffect("goti_v2", 38.4, "L", "peripheral volume", GOTI_2018),
)


def _goti_typical(c: Mapping, th: Mapping) -> dict[str, float]:
    dialysis = 1.0 if c["dialysis"] == "yes" else 0.0
    crcl = min(c["crcl"], th["goti_crcl_cap"])
    return {
        "vancomycin_cl1": th["goti_cl"] * (crcl / 120.0) ** th["goti_cl_crcl"]
        * th["goti_cl_dialysis"] ** dialysis,
        "vancomycin_v1": th["goti_v1"] * c["weight"] / 70.0 * th["goti_v1_dialysis"] ** dialysis,
        "vancomycin_cl2": th["goti_q"],
        "vancomycin_v2": th["goti_v2"],
    }


VANCOMYCIN_GOTI = LibraryEntry(
    name="vancomycin-goti",
    title="vancomycin, Goti 2018 (2 compartments; CrCL, weight, haemodialysis)",
    references=(GOTI_2018,),
    blocks=lambda _: [mammillary("vancomycin", 2, amount_unit="mg", concentration_unit="mg/L",
                                 clearance_unit="L/h", rate_constant_unit="1/h",
                                 time_unit="h")],
    population=PopulationModel(
        (CRCL, WEIGHT, DIALYSIS), _GOTI, _goti_typical,
        (RandomEffect("vancomycin_cl1", omega2_from_cv(0.398), "CV 39.8 %"),
         RandomEffect("vancomycin_v1", omega2_from_cv(0.816), "CV 81.6 %"),
         RandomEffect("vancomycin_v2", omega2_from_cv(0.571), "CV 57.1 %")),
        residual_errors=(ResidualError("vancomycin_cp", additive=3.4, proportional=0.227,
                                       kind="sum"),)),
    notes="V2 38.4 L is not weight-scaled (posologyr and two mrgsolve implementations; "
          "nlmixr2lib scales it by WT/70). CrCL truncated at 150 mL/min (paper's methods, "
          "single source). Residual SD = 3.4 + 0.227 f as used for MAP Bayesian dosing.",
)

# ---------------------------------------------------------------- norepinephrine -> MAP
_NOREPINEPHRINE = (
    FixedEffect("ne_v", 8.84, "L", "volume of distribution (adults)", BELOEIL_2005),
    FixedEffect("ne_cl", 2.66, "L/min", "clearance at 70 kg (Oualha 6.6 L/h/kg^0.75 at 70 kg)",
                OUALHA_2014),
    FixedEffect("ne_endogenous_conc", 0.473, "ng/mL", "endogenous steady-state concentration "
                "(production q0 = 3.12 ug/h/kg^0.75 over CL)", OUALHA_2014),
    FixedEffect("ne_map0", 55.0, "mmHg", "MAP without norepinephrine of a hypotensive adult "
                "(scenario choice; Oualha's 34 mmHg is paediatric)", OUALHA_2014),
    FixedEffect("ne_dmap", 32.0, "mmHg", "maximal MAP increase (<= 3 organ failures)",
                OUALHA_2014),
    FixedEffect("ne_ec50", 4.11, "ng/mL", "concentration at half-maximal MAP increase",
                OUALHA_2014),
)


def _norepinephrine_typical(c: Mapping, th: Mapping) -> dict[str, float]:
    cl = th["ne_cl"] * (c["weight"] / 70.0) ** 0.75
    return {"norepinephrine_v1": th["ne_v"], "norepinephrine_cl1": cl,
            # ng/mL x L/min = ug/min
            "norepinephrine_kprod": th["ne_endogenous_conc"] * cl,
            "map_e0": th["ne_map0"], "map_emax": th["ne_dmap"], "map_c50": th["ne_ec50"]}


def _norepinephrine_blocks(_available: Mapping) -> list:
    pk = mammillary("norepinephrine", 1, amount_unit="ug", concentration_unit="ng/mL",
                    endogenous=True)
    pd = emax_effect("map", pk.output("norepinephrine_cp"), effect_unit="mmHg")
    return [pk, pd]


NOREPINEPHRINE_MAP = LibraryEntry(
    name="norepinephrine-map",
    title="norepinephrine -> mean arterial pressure (1 compartment with endogenous "
          "production, Emax; adult composite of Beloeil 2005 and Oualha 2014)",
    references=(BELOEIL_2005, OUALHA_2014),
    blocks=_norepinephrine_blocks,
    population=PopulationModel(
        (WEIGHT,), _NOREPINEPHRINE, _norepinephrine_typical,
        (RandomEffect("norepinephrine_cl1", 0.36, "Oualha 2014"),
         RandomEffect("map_e0", 0.0289, "Oualha 2014"),
         RandomEffect("map_emax", 0.09, "Oualha 2014")),
        residual_errors=(ResidualError("norepinephrine_cp", proportional=0.25),
                         ResidualError("map", proportional=0.14))),
    notes="A composite: V from Beloeil 2005 (adults, 8.8 L), CL, endogenous level and Emax PD "
          "from Oualha 2014 (children; CL scaled to 70 kg is 2.66 L/min, inside Beloeil's "
          "0.9-3 L/min). PAS's Emax 98.7 mmHg / C50 70.4 ng/mL / gamma 1.8 could not be "
          "traced to a source and is not used. MAP0 55 mmHg is a scenario setting.",
)

# ---------------------------------------------------------------- docetaxel + neutropenia
_DOCETAXEL = (
    FixedEffect("onoue_cl", 32.6, "L/h", "clearance", ONOUE_2016),
    FixedEffect("onoue_q", 5.34, "L/h", "inter-compartmental clearance", ONOUE_2016),
    FixedEffect("onoue_v1", 5.77, "L", "central volume", ONOUE_2016),
    FixedEffect("onoue_v2", 11.0, "L", "peripheral volume", ONOUE_2016),
)
DOCETAXEL_ONOUE = LibraryEntry(
    name="docetaxel-onoue",
    title="docetaxel, Onoue 2016 (2 compartments)",
    references=(ONOUE_2016, NORRIS_DTAT),
    blocks=lambda _: [mammillary("docetaxel", 2, amount_unit="mg", concentration_unit="mg/L",
                                 clearance_unit="L/h", rate_constant_unit="1/h",
                                 time_unit="h")],
    population=PopulationModel(
        (), _DOCETAXEL, lambda c, th: {"docetaxel_cl1": th["onoue_cl"],
                                       "docetaxel_cl2": th["onoue_q"],
                                       "docetaxel_v1": th["onoue_v1"],
                                       "docetaxel_v2": th["onoue_v2"]},
        (RandomEffect("docetaxel_cl1", 0.295**2, "SD(eta) 0.295"),
         RandomEffect("docetaxel_cl2", 0.551**2, "SD(eta) 0.551"),
         RandomEffect("docetaxel_v2", 0.598**2, "SD(eta) 0.598"))),
    notes="Japanese female breast-cancer population (as paired with Friberg PD in DTAT); "
          "not the 3-compartment Bruno 1996 model.",
)
_FRIBERG = (
    FixedEffect("friberg_circ0", 5.05, "10^9/L", "baseline neutrophil count", FRIBERG_2002),
    FixedEffect("friberg_mtt", 89.3, "h", "mean transit time", FRIBERG_2002),
    FixedEffect("friberg_gamma", 0.163, "1", "feedback exponent", FRIBERG_2002),
    FixedEffect("friberg_emax", 83.9, "1", "maximal drug effect on proliferation", FRIBERG_2002),
    FixedEffect("friberg_ec50", 5.79, "mg/L", "docetaxel concentration at half Emax "
                "(7.17 umol/L x 807.9 g/mol)", FRIBERG_2002),
)
NEUTROPENIA_FRIBERG = LibraryEntry(
    name="neutropenia-friberg-docetaxel",
    title="neutrophils, Friberg 2002 semi-mechanistic myelosuppression (docetaxel Emax)",
    references=(FRIBERG_2002, NORRIS_DTAT),
    blocks=lambda available: [friberg_myelosuppression(
        "anc", available["docetaxel_cp"], drug_effect="emax")],
    requires=("docetaxel_cp",),
    population=PopulationModel(
        (), _FRIBERG, lambda c, th: {f"anc_{k}": th[f"friberg_{k}"]
                                     for k in ("circ0", "mtt", "gamma", "emax", "ec50")},
        tuple(RandomEffect(f"anc_{k}", omega2_from_cv(cv), f"CV {cv:.0%}") for k, cv in
              {"circ0": 0.42, "mtt": 0.16, "emax": 0.33, "ec50": 0.50}.items())),
    notes="Friberg 2002 Table 4 docetaxel row as transcribed by DTAT (single source); the "
          "variabilities are read as CVs.",
)

# ---------------------------------------------------------------- 5-FU, circadian clearance
_FLUOROURACIL = (
    FixedEffect("yamada_cl", 179.0, "L/h", "clearance (24-h mesor)", YAMADA_2025),
    FixedEffect("yamada_v", 65.6, "L", "volume of distribution", YAMADA_2025),
    FixedEffect("fleming_cl_amplitude", 0.091, "1", "relative circadian amplitude of CL "
                "(concentration peak/trough 1.20 at quasi-steady state)", FLEMING_2015),
    FixedEffect("fleming_cl_acrophase", 16.5, "h", "clock time of maximal CL (concentration "
                "maximal near 06:00, minimal near 15:00)", FLEMING_2015),
)
FLUOROURACIL_CIRCADIAN = LibraryEntry(
    name="fluorouracil-circadian",
    title="5-fluorouracil, 1 compartment with cosinor clearance (chronotherapy)",
    references=(YAMADA_2025, FLEMING_2015),
    blocks=lambda _: [mammillary("fluorouracil", 1, amount_unit="mg", concentration_unit="mg/L",
                                 clearance_unit="L/h", time_unit="h")],
    circadian=(Cosinor("fluorouracil_cl1"),),
    population=PopulationModel(
        (), _FLUOROURACIL, lambda c, th: {
            "fluorouracil_cl1": th["yamada_cl"], "fluorouracil_v1": th["yamada_v"],
            "fluorouracil_cl1_amplitude_1": th["fleming_cl_amplitude"],
            "fluorouracil_cl1_acrophase_1": th["fleming_cl_acrophase"]},
        (RandomEffect("fluorouracil_cl1", omega2_from_cv(0.344), "CV 34.4 %"),
         RandomEffect("fluorouracil_v1", omega2_from_cv(0.419), "CV 41.9 %")),
        residual_errors=(ResidualError("fluorouracil_cp", proportional=0.583),)),
    notes="Amplitude 0.091 from Fleming 2015's 20 % peak-to-trough concentration ratio "
          "(C ~ R/CL at quasi-steady state, t1/2 15 min); acrophase 16:30 is the midpoint of "
          "the two readings of its 06:00 peak / 15:00 trough (+-1.5 h). Human studies disagree "
          "on the phase (Petit 1988, Harris 1990, Takimoto 1999): treat both as scenario "
          "settings. The clock time at t = 0 is the parameter clock_time_at_t0 [h].",
)

ENTRIES = (VANCOMYCIN_GOTI, NOREPINEPHRINE_MAP, DOCETAXEL_ONOUE, NEUTROPENIA_FRIBERG,
           FLUOROURACIL_CIRCADIAN)
