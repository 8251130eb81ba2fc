"""The UVA/Padova glucose-insulin model (Dalla Man, Rizza, Cobelli 2007) in its type 1
diabetes form (no insulin secretion; subcutaneous insulin and interstitial glucose as in the
UVA/Padova T1D simulator, Kovatchev 2009, Dalla Man 2014), and simglucose's parameter table
as a cohort of it.

Written from the papers' equations; no simulator code was copied and no third-party parameter
file is shipped. Symbols and units are the paper's (per kg of body weight, per minute)::

    glucose:   dGp/dt = EGP + Ra - Uii - E - k1 Gp + k2 Gt        G = Gp/VG   (mg/kg, mg/dL)
               dGt/dt = -Uid + k1 Gp - k2 Gt
    insulin:   dIp/dt = -(m2 + m4) Ip + m1 Il + Rai               I = Ip/VI   (pmol/kg, pmol/L)
               dIl/dt = -(m1 + m30) Il + m2 Ip
    eating:    dQeat/dt = -keat Qeat      a meal eaten at once enters Qeat (ours; see below)
    gut:       dQsto1/dt = -kgri Qsto1 + keat Qeat + meal rate   kgri = kmax   (g)
               dQsto2/dt = kgri Qsto1 - kempt(Qsto) Qsto2
               dQgut/dt  = kempt(Qsto) Qsto2 - kabs Qgut     Ra = f kabs Qgut/BW (mg/kg/min)
               kempt = kmin + (kmax - kmin)/2 (tanh(a (Qsto - b D)) - tanh(c (Qsto - d D)) + 2)
               a = 5/(2 D (1 - b)), c = 5/(2 D d), Qsto = Qsto1 + Qsto2, D the meal
    EGP:       EGP = max(0, kp1 - kp2 Gp - kp3 Id)
               dI1/dt = -ki (I1 - I)     dId/dt = -ki (Id - I1)
    use:       Uii = Fcns     Uid = max(0, Vm0 + Vmx X) Gt/(Km0 + Gt)
               dX/dt = -p2U X + p2U (I - Ib)
    kidneys:   E = ke1 max(0, Gp - ke2)
    s.c. insulin: dIsc1/dt = -(kd + ka1) Isc1 + u     dIsc2/dt = kd Isc1 - ka2 Isc2
               Rai = (ka1 Isc1 + ka2 Isc2)/BW           (Isc held in U, Rai in pmol/kg/min)
    sensor site: dGs/dt = -ksc Gs + ksc G                (mg/dL)

The meal size D of kempt is remembered by one state (ours): the paper's D is "the amount of
the last meal", which an ODE cannot hold without a state, and simglucose sets it outside its
ODE at each meal's start (the stomach content then plus the food taken). Here a meal eaten at
once (a bolus) enters Qeat, swallowed at :data:`INGESTION_PER_MIN` (food eaten at a rate
enters Qsto1 directly and counts as being eaten: E below); while food is being swallowed
D follows the carbohydrate not yet absorbed, Qeat + Qsto + Qgut (simglucose's D,
the stomach content at the meal's start plus the meal, up to what the intestine still holds
and the little absorbed meanwhile), then it is held, and it falls once the stomach is empty
(below :data:`EMPTY_FRACTION` of D)::

    dD/dt = e (rate + r (Qeat + Qsto + Qgut - D)) - r (1 - e) max(0, D - Qsto) s
    e = E/(E + q0),  E = Qeat + rate/keat                (1 while eating, 0 after)
    s = (1 - tanh(5 (Qsto - eps D)/(2 eps D)))/2       (1 when the stomach is empty)

with r = MEAL_MEMORY_PER_MIN, q0 = EATING_FLOOR_G and eps = EMPTY_FRACTION.

simglucose's cohort table
-------------------------
simglucose (MIT licence) ships ``simglucose/params/vpatient_params.csv``, 30 virtual patients
(adolescent#001-010, adult#001-010, child#001-010) of the UVA/Padova simulator's academic
version; its origin and licence are unclear, so it is not shipped here. A user who has it
loads it as the cohort of ``glucose-uva-padova`` with ``[patient.table] layout = "simglucose"``
(:func:`params_from_simglucose`). Its columns, in simglucose's units, and where they go:

=========================  ==========================  =====================================
column                     unit                        parameter (declared unit)
=========================  ==========================  =====================================
BW                         kg                          covariate weight and uva_bw (kg)
Gb                         mg/dL                       uva_basal_glucose (mmol/L, / 18.016)
Vg                         dL/kg                       uva_vg
k1, k2                     1/min                       uva_k1, uva_k2
Vi                         L/kg                        uva_vi
m1, m2, m4, m30            1/min                       uva_m1, uva_m2, uva_m4, uva_m30
kabs, kmax, kmin           1/min                       uva_kabs, uva_kmax, uva_kmin
b, d, f                    1                           uva_b, uva_d, uva_f
kp1                        mg/kg/min                   uva_kp1
kp2                        1/min                       uva_kp2
kp3                        mg/kg/min per pmol/L        uva_kp3
ki                         1/min                       uva_ki
Fsnc                       mg/kg/min                   uva_fcns
Vm0                        mg/kg/min                   uva_vm0
Vmx                        mg/kg/min per pmol/L        uva_vmx
Km0                        mg/kg                       uva_km0
p2u                        1/min                       uva_p2u
Ib                         pmol/L                      uva_ib
ke1                        1/min                       uva_ke1
ke2                        mg/kg                       uva_ke2
kd, ka1, ka2               1/min                       uva_kd, uva_ka1, uva_ka2
ksc                        1/min                       uva_ksc
=========================  ==========================  =====================================

The other columns are not read: Name, i, x0_1..x0_13 (simglucose's initial state: stomach and
gut in mg, Gp, Gt in mg/kg, Ip, Il in pmol/kg, X, I1, Id in pmol/L, Isc1, Isc2 in pmol/kg,
Gs in mg/kg), EGPb (mg/kg/min), Gpb, Gtb (mg/kg), Ipb, Ilb (pmol/kg), u2ss (basal insulin,
pmol/kg/min), isc1ss, isc2ss (pmol/kg), HEb, m5, CL, Rdb, PCRb, dosekempt (mg),
patient_history. They are the basal steady state the other columns imply (e.g. kp1 = EGPb +
kp2 Gpb + kp3 Ib, Vm0 = (EGPb - Fsnc)(Km0 + Gtb)/Gtb); here the initial state is computed from
the parameters at uva_basal_glucose, and :func:`basal_insulin_rate` at Gb gives u2ss
(u2ss BW 60/6000 U/h) back. Per-kg, per-minute parameter units are the paper's and ours
alike, so only Gb changes unit; simglucose's insulin action is in U/min
(pmol/kg/min = U/min x 6000/BW) and its meals in g/min, ours in U and g (rates per second).

This module is pure: CasADi and numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import casadi as ca

from ...errors import ConfigError, ModelError
from ...units import GLUCOSE, INSULIN, convert_substance
from ..population import FixedEffect, PopulationModel, RandomEffect, omega2_from_cv
from ..spec import Block, Cosinor, drug_input, output, param, state
from .base import WEIGHT, LibraryEntry

__all__ = ["ENTRIES", "UVA_PADOVA", "basal_insulin_rate", "steady_state", "SIMGLUCOSE_COLUMNS",
           "params_from_simglucose", "MEAL_MEMORY_PER_MIN", "INGESTION_PER_MIN",
           "EMPTY_FRACTION"]

DALLA_MAN_2007 = ("Dalla Man C, Rizza RA, Cobelli C. Meal simulation model of the glucose-"
                  "insulin system. IEEE Trans Biomed Eng 2007;54(10):1740-9. "
                  "doi:10.1109/TBME.2007.893506")
DALLA_MAN_2006 = ("Dalla Man C, Camilleri M, Cobelli C. A system model of oral glucose "
                  "absorption: validation on gold standard data. IEEE Trans Biomed Eng "
                  "2006;53(12):2472-8. doi:10.1109/TBME.2006.883792")
GIM_2007 = ("Dalla Man C, Raimondo DM, Rizza RA, Cobelli C. GIM, simulation software of meal "
            "glucose-insulin model. J Diabetes Sci Technol 2007;1(3):323-30. "
            "doi:10.1177/193229680700100303")
KOVATCHEV_2009 = ("Kovatchev BP, Breton M, Dalla Man C, Cobelli C. In silico preclinical trials: "
                  "a proof of concept in closed-loop control of type 1 diabetes. J Diabetes Sci "
                  "Technol 2009;3(1):44-55. doi:10.1177/193229680900300106")
DALLA_MAN_2014 = ("Dalla Man C, Micheletto F, Lv D, Breton M, Kovatchev B, Cobelli C. The "
                  "UVA/PADOVA type 1 diabetes simulator: new features. J Diabetes Sci Technol "
                  "2014;8(1):26-34. doi:10.1177/1932296813514502")
VISENTIN_2018 = ("Visentin R, Campos-Nanez E, Schiavon M, et al. The UVA/Padova type 1 diabetes "
                 "simulator goes from single meal to single day. J Diabetes Sci Technol "
                 "2018;12(2):273-81. doi:10.1177/1932296818757747")
HINSHAW_2013 = ("Hinshaw L, Dalla Man C, Nandy DK, et al. Diurnal pattern of insulin action in "
                "type 1 diabetes: implications for a closed-loop system. Diabetes "
                "2013;62(7):2223-9. doi:10.2337/db12-1759")
WILINSKA_2010 = ("Wilinska ME, Chassin LJ, Acerini CL, Allen JM, Dunger DB, Hovorka R. "
                 "Simulation environment to evaluate closed-loop insulin delivery systems in "
                 "type 1 diabetes. J Diabetes Sci Technol 2010;4(1):132-44. "
                 "doi:10.1177/193229681000400117")
REBRIN_1999 = ("Rebrin K, Steil GM, van Antwerp WP, Mastrototaro JJ. Subcutaneous glucose "
               "predicts plasma glucose independent of insulin: implications for continuous "
               "monitoring. Am J Physiol 1999;277(3):E561-71")

#: the model's parameters, prefixed so a composition with another glucose model cannot clash
P = "uva_"
#: [mg/dL per mmol/L] glucose: 180.16 g/mol / 10 dL/L
MG_DL_PER_MMOL_L = convert_substance(1.0, "mmol/L", "mg/dL", GLUCOSE)
#: [pmol/U] insulin (units.INSULIN: 6.00 nmol/U, the factor the UVA/Padova model uses)
PMOL_PER_U = convert_substance(1.0, "U", "pmol", INSULIN)
#: [1/min] how fast a meal given at once is swallowed into the stomach (keat; ours): about
#: the paper's impulse (a minute against the stomach's hour), and it lets D see a meal
#: arrive
INGESTION_PER_MIN = 1.0
#: [g] food still being swallowed above which D follows the stomach (the gate e, half-open
#: at this amount): a 50-g meal closes it about 8 min after it is eaten at once
EATING_FLOOR_G = 0.01
#: [1/min] how fast the remembered meal size D follows the stomach content while food is
#: swallowed, and falls once the stomach is empty (Qsto below EMPTY_FRACTION of D).
#: Ours: the paper's D is "the amount of the last meal", which an ODE cannot hold without a
#: state; simglucose resets it at each meal outside its ODE. 1/min is ten times faster than
#: the fastest gut rate (kmax 0.056/min), so D reaches a bolus meal within a few minutes
#: (kempt starts at kmax either way) and stays well inside the NMPC's RK4 stability region.
MEAL_MEMORY_PER_MIN = 1.0
#: [1] the stomach counts as empty, and D may fall, below this fraction of D: far below d
#: (0.01 in Table 1, 0.1-0.4 in simglucose's patients), so the last, fast phase of emptying
#: (kempt back at kmax below d D) runs with the meal's own D, as in the paper and simglucose
EMPTY_FRACTION = 1e-3
#: [g] added to D in kempt's denominators: before any meal D is 0 (kempt is then kmax, as in
#: simglucose with no meal); far below any meal
MEAL_FLOOR_G = 1e-3

# ---------------------------------------------------------------- fixed effects
_T1 = "Dalla Man 2007 Table 1 (normal subjects)"
_UVA = (
    FixedEffect("dallaman_vg", 1.88, "dL/kg", "glucose distribution volume", DALLA_MAN_2007),
    FixedEffect("dallaman_k1", 0.065, "1/min", "glucose transfer Gp -> Gt", DALLA_MAN_2007),
    FixedEffect("dallaman_k2", 0.079, "1/min", "glucose transfer Gt -> Gp", DALLA_MAN_2007),
    FixedEffect("dallaman_vi", 0.05, "L/kg", "insulin distribution volume", DALLA_MAN_2007),
    FixedEffect("dallaman_m1", 0.190, "1/min", "insulin transfer liver -> plasma",
                DALLA_MAN_2007),
    FixedEffect("dallaman_m2", 0.484, "1/min", "insulin transfer plasma -> liver",
                DALLA_MAN_2007),
    FixedEffect("dallaman_m4", 0.194, "1/min", "peripheral insulin degradation",
                DALLA_MAN_2007),
    FixedEffect("dallaman_heb", 0.6, "1", "basal hepatic insulin extraction; without "
                "secretion it stays basal: m30 = m1 HEb/(1 - HEb)", DALLA_MAN_2007),
    FixedEffect("dallaman_kmax", 0.0558, "1/min", "maximal gastric emptying rate (also kgri)",
                DALLA_MAN_2007),
    FixedEffect("dallaman_kmin", 0.0080, "1/min", "minimal gastric emptying rate",
                DALLA_MAN_2007),
    FixedEffect("dallaman_kabs", 0.057, "1/min", "intestinal absorption rate", DALLA_MAN_2007),
    FixedEffect("dallaman_b", 0.82, "1", "fraction of the meal in the stomach where kempt "
                "has fallen half-way to kmin", DALLA_MAN_2007),
    FixedEffect("dallaman_d", 0.010, "1", "fraction of the meal in the stomach where kempt "
                "is half-way back to kmax", DALLA_MAN_2007),
    FixedEffect("dallaman_f", 0.90, "1", "fraction of intestinal absorption that appears in "
                "plasma", DALLA_MAN_2007),
    FixedEffect("dallaman_egpb", 1.92, "mg/kg/min", "basal endogenous glucose production "
                "(with Gb and Ib it sets kp1 and Vm0, see _uva_typical)", DALLA_MAN_2007),
    FixedEffect("dallaman_gb", 91.76, "mg/dL", "basal plasma glucose of the paper's subjects",
                DALLA_MAN_2007),
    FixedEffect("dallaman_kp2", 0.0021, "1/min", "liver glucose effectiveness",
                DALLA_MAN_2007),
    FixedEffect("dallaman_kp3", 0.009, "mg*L/kg/min/pmol", "amplitude of delayed insulin "
                "action on EGP", DALLA_MAN_2007),
    FixedEffect("dallaman_ki", 0.0079, "1/min", "delay of insulin action on EGP",
                DALLA_MAN_2007),
    FixedEffect("dallaman_fcns", 1.0, "mg/kg/min", "insulin-independent glucose use (brain, "
                "erythrocytes)", DALLA_MAN_2007),
    FixedEffect("dallaman_vmx", 0.047, "mg*L/kg/min/pmol", "insulin sensitivity of glucose "
                "use (Vm = Vm0 + Vmx X)", DALLA_MAN_2007),
    FixedEffect("dallaman_km0", 225.59, "mg/kg", "Michaelis-Menten constant of use",
                DALLA_MAN_2007),
    FixedEffect("dallaman_p2u", 0.0331, "1/min", "rate of insulin action on use",
                DALLA_MAN_2007),
    FixedEffect("dallaman_ib", 25.49, "pmol/L", "basal plasma insulin (the reference of X; "
                "Vm0 holds there)", DALLA_MAN_2007),
    FixedEffect("dallaman_ke1", 0.0005, "1/min", "glomerular filtration rate",
                DALLA_MAN_2007),
    FixedEffect("dallaman_ke2", 339.0, "mg/kg", "renal threshold of glucose", DALLA_MAN_2007),
    FixedEffect("gim_kd", 0.0164, "1/min", "s.c. insulin: Isc1 -> Isc2", GIM_2007),
    FixedEffect("gim_ka1", 0.0018, "1/min", "s.c. insulin: absorption from Isc1", GIM_2007),
    FixedEffect("gim_ka2", 0.0182, "1/min", "s.c. insulin: absorption from Isc2", GIM_2007),
    FixedEffect("sensor_ksc", 0.1, "1/min", "plasma -> interstitial glucose rate (time "
                "constant 10 min)", "ours, a round value: the published lags of interstitial behind "
                "plasma glucose are several minutes to about a quarter hour (Rebrin 1999), "
                "and simglucose's 30 patients have ksc 0.050-0.152/min (mean 0.090)"),
    FixedEffect("circadian_vmx_amplitude", 0.0, "1", "relative amplitude of a 24-h cosinor of "
                "Vmx (0: no population rhythm)", HINSHAW_2013),
    FixedEffect("circadian_vmx_acrophase", 0.0, "h", "clock time of maximal Vmx (used when "
                "the amplitude is set)", "a placeholder, not a published value: with "
                "amplitude 0 it has no effect; Visentin 2018 gives patients classes of "
                "daily SI patterns, to be set per patient"),
    FixedEffect("basal_glucose", 6.0, "mmol/L", "glucose at t = 0 (the initial state is the "
                "steady state there under basal_insulin_rate)",
                "a scenario setting, not a published value (108 mg/dL, inside 70-180)"),
)


def _uva_typical(c: Mapping, th: Mapping) -> dict[str, float]:
    d = "dallaman_"
    out = {P + "bw": c["weight"]}
    for name in ("vg", "k1", "k2", "vi", "m1", "m2", "m4", "kmax", "kmin", "kabs", "b", "d",
                 "f", "kp2", "kp3", "ki", "fcns", "vmx", "km0", "p2u", "ib", "ke1", "ke2"):
        out[P + name] = th[d + name]
    out[P + "m30"] = th[d + "m1"] * th[d + "heb"] / (1.0 - th[d + "heb"])
    # kp1 and Vm0 make the paper's basal state (Gb, Ib, EGPb) a steady state, as the T1D
    # simulator derives them (simglucose's table obeys both relations): kp1 = EGPb + kp2 Gpb
    # + kp3 Ib, i.e. Table 1's kp1 (2.70) less the portal-insulin term kp4 Ipob that type 1
    # diabetes lacks; Vm0 = (EGPb - Fcns)(Km0 + Gtb)/Gtb is 2.513, Table 1 rounds to 2.50.
    gpb = th[d + "gb"] * th[d + "vg"]
    gtb = (th[d + "fcns"] - th[d + "egpb"] + th[d + "k1"] * gpb) / th[d + "k2"]
    out[P + "kp1"] = th[d + "egpb"] + th[d + "kp2"] * gpb + th[d + "kp3"] * th[d + "ib"]
    out[P + "vm0"] = (th[d + "egpb"] - th[d + "fcns"]) * (th[d + "km0"] + gtb) / gtb
    out.update({P + "kd": th["gim_kd"], P + "ka1": th["gim_ka1"], P + "ka2": th["gim_ka2"],
                P + "ksc": th["sensor_ksc"],
                P + "vmx_amplitude_1": th["circadian_vmx_amplitude"],
                P + "vmx_acrophase_1": th["circadian_vmx_acrophase"],
                P + "basal_glucose": th["basal_glucose"]})
    return out


# ---------------------------------------------------------------- between-subject variability
#: CV of each parameter's log-normal random effect: the UVA/Padova virtual population is not
#: public, so each takes the CV that Wilinska 2010 (Table 1, the Cambridge simulator's
#: population) gives for the same physiological role: name -> (CV, analogue).
UVA_CV: dict[str, tuple[float, str]] = {
    "vg": (0.23 / 1.16, "VG 0.23/1.16"),
    "vi": (0.012 / 0.12, "VI 0.012/0.12"),
    "vmx": (7.84 / 8.2, "SID (insulin sensitivity of disposal) 7.84/8.2"),
    "kp3": (306.2 / 520.0, "SIE (insulin sensitivity of EGP) 306.2/520"),
    "kp1": (0.0039 / 0.0161, "EGP0 (EGP at zero insulin) 0.0039/0.0161"),
    "m2": (0.035 / 0.14, "ke (insulin elimination) 0.035/0.14"),
    "m4": (0.035 / 0.14, "ke (insulin elimination) 0.035/0.14"),
    "kd": (0.0045 / 0.018, "1/tmaxI (s.c. absorption) 0.0045/0.018"),
    "ka1": (0.0045 / 0.018, "1/tmaxI (s.c. absorption) 0.0045/0.018"),
    "ka2": (0.0045 / 0.018, "1/tmaxI (s.c. absorption) 0.0045/0.018"),
}
#: log-scale SDs: name -> (SD of the log, analogue)
UVA_LOG_SD: dict[str, tuple[float, str]] = {
    "kabs": (0.25, "ln(tmaxG) SD 0.25 (meal absorption)"),
    "kmax": (0.25, "ln(tmaxG) SD 0.25 (meal absorption)"),
    "kmin": (0.25, "ln(tmaxG) SD 0.25 (meal absorption)"),
}


# ---------------------------------------------------------------- steady state
def _glucose_steady_state(glucose_mmol_per_L, vg, k1, k2, kp1, kp2, kp3, fcns, vm0, vmx, km0,
                          ib, ke1, ke2):
    """Plasma insulin I [pmol/L] and tissue glucose Gt [mg/kg] that hold plasma glucose
    constant at *glucose_mmol_per_L* (declared units; CasADi or float arguments), and
    whether that steady state exists.

    At steady state X = I - Ib, Id = I, and the two glucose equations give
    ``U(I) = kp1 - kp2 Gp - kp3 I - Fcns - E = Uid`` and ``Gt = (k1 Gp - U)/k2``; with
    ``Uid = (Vm0 + Vmx (I - Ib)) Gt/(Km0 + Gt)`` this is ``a I^2 + b I + c = 0`` (a < 0),
    with one positive root when c > 0: production exceeds use at zero insulin.
    """
    gp = glucose_mmol_per_L * MG_DL_PER_MMOL_L * vg
    excretion = ke1 * ca.fmax(0, gp - ke2)
    a0 = kp1 - kp2 * gp - fcns - excretion       # U(0)
    g0, g1 = (k1 * gp - a0) / k2, kp3 / k2        # Gt = g0 + g1 I
    v0 = vm0 - vmx * ib                           # Vm = v0 + Vmx I
    a = -(kp3 + vmx) * g1
    b = a0 * g1 - kp3 * (km0 + g0) - v0 * g1 - vmx * g0
    c = a0 * (km0 + g0) - v0 * g0
    insulin = (-b - ca.sqrt(ca.fmax(0, b * b - 4 * a * c))) / (2 * a)
    gt = g0 + g1 * insulin
    possible = ca.logic_and(ca.logic_and(c > 0, gt > 0),
                            ca.logic_and(kp1 - kp2 * gp - kp3 * insulin > 0,
                                         v0 + vmx * insulin > 0))
    return insulin, gt, gp, possible


def _insulin_rate(insulin_pmol_per_L, vi, m1, m2, m4, m30):
    """[pmol/kg/min] the insulin appearance that holds plasma insulin at a level:
    ``Ra_I = Ip (m2 + m4) - m1 Il`` with ``Il = m2 Ip/(m1 + m30)``."""
    ip = insulin_pmol_per_L * vi
    return ip * (m2 + m4 - m1 * m2 / (m1 + m30)), ip


_GLUCOSE_ARGS = ("vg", "k1", "k2", "kp1", "kp2", "kp3", "fcns", "vm0", "vmx", "km0", "ib",
                 "ke1", "ke2")


def steady_state(params: Mapping[str, float], glucose_mmol_per_L: float) -> dict[str, float]:
    """The basal steady state of one patient (declared units, by name) at
    *glucose_mmol_per_L*, circadian rhythm off: plasma insulin ``insulin`` [pmol/L], tissue
    glucose ``gt`` [mg/kg], plasma glucose ``gp`` [mg/kg] and the insulin rate ``rate``
    [pmol/kg/min].

    Raises
    ------
    ModelError
        When no insulin level holds that glucose (the patient's glucose production does not
        exceed its insulin-independent use there), naming the glucose.
    """
    insulin, gt, gp, possible = _glucose_steady_state(
        glucose_mmol_per_L, *(params[P + n] for n in _GLUCOSE_ARGS))
    if not bool(possible) or not float(insulin) > 0:
        raise ModelError(f"no basal insulin holds glucose at {glucose_mmol_per_L!r} mmol/L: "
                         f"the patient's glucose production (kp1 {params[P + 'kp1']!r} "
                         f"mg/kg/min) does not exceed its use there without insulin")
    rate, _ = _insulin_rate(float(insulin), *(params[P + n] for n in
                                              ("vi", "m1", "m2", "m4", "m30")))
    return {"insulin": float(insulin), "gt": float(gt), "gp": float(gp), "rate": float(rate)}


def basal_insulin_rate(params: Mapping[str, float], glucose_mmol_per_L: float, *,
                       unit: str = "U/h") -> float:
    """The constant s.c. insulin rate (in *unit*, an insulin amount per time) that holds
    *glucose_mmol_per_L* constant: at steady state the s.c. depot passes on what enters it,
    so the pump rate equals the insulin appearance (pmol/kg/min) times body weight."""
    rate = steady_state(params, glucose_mmol_per_L)["rate"]
    return convert_substance(rate * params[P + "bw"], "pmol/min", unit, INSULIN,
                             what="basal insulin rate")


def _has_basal_state(params: Mapping[str, float]) -> bool:
    """A drawn patient is plausible when some basal insulin holds its basal glucose."""
    try:
        steady_state(params, params[P + "basal_glucose"])
    except ModelError:
        return False
    return True


# ---------------------------------------------------------------- the block
def _uva_block() -> Block:
    def p(name, unit, doc, domain="positive"):
        return param(P + name, unit, doc, domain)

    bw = p("bw", "kg", "body weight")
    vg = p("vg", "dL/kg", "glucose distribution volume")
    k1 = p("k1", "1/min", "glucose transfer Gp -> Gt")
    k2 = p("k2", "1/min", "glucose transfer Gt -> Gp")
    vi = p("vi", "L/kg", "insulin distribution volume")
    m1 = p("m1", "1/min", "insulin transfer liver -> plasma")
    m2 = p("m2", "1/min", "insulin transfer plasma -> liver")
    m4 = p("m4", "1/min", "peripheral insulin degradation")
    m30 = p("m30", "1/min", "hepatic insulin degradation")
    kmax = p("kmax", "1/min", "maximal gastric emptying rate (and kgri)")
    kmin = p("kmin", "1/min", "minimal gastric emptying rate")
    kabs = p("kabs", "1/min", "intestinal absorption rate")
    b = p("b", "1", "stomach fraction of the meal where kempt is half-way down", "fraction")
    d = p("d", "1", "stomach fraction of the meal where kempt is half-way up", "fraction")
    f = p("f", "1", "fraction of absorbed carbohydrate appearing in plasma", "fraction")
    kp1 = p("kp1", "mg/kg/min", "EGP at zero glucose and insulin")
    kp2 = p("kp2", "1/min", "liver glucose effectiveness", "nonnegative")
    kp3 = p("kp3", "mg*L/kg/min/pmol", "delayed insulin action on EGP", "nonnegative")
    ki = p("ki", "1/min", "rate of the delay of insulin action on EGP")
    fcns = p("fcns", "mg/kg/min", "insulin-independent glucose use", "nonnegative")
    vm0 = p("vm0", "mg/kg/min", "insulin-dependent use at basal insulin (Vmax)")
    vmx = p("vmx", "mg*L/kg/min/pmol", "insulin sensitivity of use", "nonnegative")
    km0 = p("km0", "mg/kg", "Michaelis-Menten constant of use")
    p2u = p("p2u", "1/min", "rate of insulin action on use")
    ib = p("ib", "pmol/L", "basal insulin (reference of X)")
    ke1 = p("ke1", "1/min", "glomerular filtration rate", "nonnegative")
    ke2 = p("ke2", "mg/kg", "renal glucose threshold")
    kd = p("kd", "1/min", "s.c. insulin Isc1 -> Isc2")
    ka1 = p("ka1", "1/min", "s.c. insulin absorption from Isc1")
    ka2 = p("ka2", "1/min", "s.c. insulin absorption from Isc2")
    ksc = p("ksc", "1/min", "plasma -> interstitial glucose rate")
    basal_glucose = p("basal_glucose", "mmol/L", "glucose at t = 0 (steady state)")
    params = (bw, vg, k1, k2, vi, m1, m2, m4, m30, kmax, kmin, kabs, b, d, f, kp1, kp2, kp3,
              ki, fcns, vm0, vmx, km0, p2u, ib, ke1, ke2, kd, ka1, ka2, ksc, basal_glucose)

    # The initial state: the steady state at basal_glucose under the basal rate, in declared
    # units (per minute and per kg throughout, as the paper writes it).
    insulin_b, gt_b, gp_b, _ = _glucose_steady_state(
        basal_glucose.sym, vg.sym, k1.sym, k2.sym, kp1.sym, kp2.sym, kp3.sym, fcns.sym,
        vm0.sym, vmx.sym, km0.sym, ib.sym, ke1.sym, ke2.sym)
    rate_b, ip_b = _insulin_rate(insulin_b, vi.sym, m1.sym, m2.sym, m4.sym, m30.sym)
    isc1_b = rate_b / (kd.sym + ka1.sym)  # pmol/kg
    isc2_b = kd.sym * isc1_b / ka2.sym
    to_units = bw.sym / PMOL_PER_U       # pmol/kg -> U

    qeat = state(P + "qeat", "g", "carbohydrate being eaten (not yet in the stomach)")
    qsto1 = state(P + "qsto1", "g", "carbohydrate in the stomach, solid phase")
    qsto2 = state(P + "qsto2", "g", "carbohydrate in the stomach, liquid phase")
    qgut = state(P + "qgut", "g", "carbohydrate in the intestine")
    meal = state(P + "meal", "g", "the meal size D of gastric emptying (remembered)")
    gp = state(P + "gp", "mg/kg", "glucose mass in plasma and fast tissues", gp_b)
    gt = state(P + "gt", "mg/kg", "glucose mass in slow tissues", gt_b)
    ip = state(P + "ip", "pmol/kg", "insulin mass in plasma", ip_b)
    il = state(P + "il", "pmol/kg", "insulin mass in the liver",
               m2.sym * ip_b / (m1.sym + m30.sym))
    x = state(P + "x", "pmol/L", "remote insulin action on glucose use (I - Ib filtered)",
              insulin_b - ib.sym)
    i1 = state(P + "i1", "pmol/L", "delayed insulin signal to the liver, first stage",
               insulin_b)
    id_ = state(P + "id", "pmol/L", "delayed insulin signal to the liver", insulin_b)
    isc1 = state(P + "isc1", "U", "s.c. insulin, first compartment", isc1_b * to_units)
    isc2 = state(P + "isc2", "U", "s.c. insulin, second compartment", isc2_b * to_units)
    gs = state(P + "gs", "mg/dL", "interstitial glucose",
               basal_glucose.sym * MG_DL_PER_MMOL_L)

    insulin_in = drug_input("insulin", "U", "s.c. rapid-acting insulin (pump rate; a bolus "
                            "enters Isc1)", P + "isc1")
    carbs_in = drug_input("carbohydrate", "g", "carbohydrate eaten (a meal is a bolus in g "
                          "swallowed into the stomach; f of it appears as glucose)", P + "qeat")

    # Equations in canonical units (s, mg, L, mmol, U): .value of every symbol. Per-kg
    # amounts are per mg of body weight there; the factors cancel as they should.
    u_to_mmol = INSULIN.nmol_per_unit * 1e-6
    qsto = qsto1.value + qsto2.value
    dose = meal.value + MEAL_FLOOR_G * 1e3                       # mg
    alpha = 5.0 / (2.0 * dose * (1.0 - b.value))
    beta = 5.0 / (2.0 * dose * d.value)
    kempt = kmin.value + (kmax.value - kmin.value) / 2.0 * (
        ca.tanh(alpha * (qsto - b.value * dose)) - ca.tanh(beta * (qsto - d.value * dose))
        + 2.0)
    # D (module docstring): follows the carbohydrate not yet absorbed while food is being
    # swallowed (the stomach's content at the meal's start plus the meal, less the little
    # absorbed meanwhile, plus what the intestine still holds), is held after, and falls
    # once the stomach is empty
    # food eaten at a rate enters the stomach directly (the paper's meal rate into Qsto1)
    # and counts as being eaten as the minute's worth it is
    being_eaten = qeat.value + carbs_in.value * 60.0 / INGESTION_PER_MIN
    eating = being_eaten / (being_eaten + EATING_FLOOR_G * 1e3)
    empty = (1.0 - ca.tanh(5.0 / (2.0 * dose * EMPTY_FRACTION)
                           * (qsto - EMPTY_FRACTION * dose))) / 2.0
    memory = MEAL_MEMORY_PER_MIN / 60.0                          # 1/s
    # (a rate of eating moves D along with it, so D does not lag the meal by rate/r)
    remember = eating * (carbs_in.value + memory * (qeat.value + qsto + qgut.value
                                                    - meal.value)) \
        - memory * (1.0 - eating) * ca.fmax(0, meal.value - qsto) * empty
    swallowed = INGESTION_PER_MIN / 60.0 * qeat.value            # mg/s
    absorbed = kabs.value * qgut.value                           # mg/s, whole body
    appearance = f.value * absorbed / bw.value                   # Ra, mg/kg/s (canonical)
    insulin = ip.value / vi.value                                # I, mmol/L
    production = ca.fmax(0, kp1.value - kp2.value * gp.value - kp3.value * id_.value)
    excretion = ke1.value * ca.fmax(0, gp.value - ke2.value)
    # Vm0 + Vmx X is negative far below basal insulin in patients with Vmx Ib > Vm0 (some
    # of simglucose's): tissues do not release glucose, so use stops at 0 (ours)
    use = ca.fmax(0, vm0.value + vmx.value * x.value) * gt.value / (km0.value + gt.value)
    insulin_appearance = (ka1.value * isc1.value + ka2.value * isc2.value) * u_to_mmol \
        / bw.value
    glucose = gp.value / vg.value                                # mg/L
    rates = (
        -swallowed,
        -kmax.value * qsto1.value + swallowed + carbs_in.value,
        kmax.value * qsto1.value - kempt * qsto2.value,
        kempt * qsto2.value - absorbed,
        remember,
        production + appearance - fcns.value - excretion - k1.value * gp.value
        + k2.value * gt.value,
        -use + k1.value * gp.value - k2.value * gt.value,
        -(m2.value + m4.value) * ip.value + m1.value * il.value + insulin_appearance,
        -(m1.value + m30.value) * il.value + m2.value * ip.value,
        -p2u.value * x.value + p2u.value * (insulin - ib.value),
        -ki.value * (i1.value - insulin),
        -ki.value * (id_.value - i1.value),
        -(kd.value + ka1.value) * isc1.value + insulin_in.value,
        kd.value * isc1.value - ka2.value * isc2.value,
        ksc.value * (glucose - gs.value),
    )
    outputs = (
        output("glucose", "mmol/L", "plasma glucose",
               glucose / GLUCOSE.molar_mass_g_per_mol),
        output("interstitial_glucose", "mmol/L", "interstitial (sensor-site) glucose",
               gs.value / GLUCOSE.molar_mass_g_per_mol),
        output("plasma_insulin", "pmol/L", "plasma insulin", insulin),
        output("meal_glucose_appearance", "g/min", "rate of appearance of meal carbohydrate "
               "(as glucose) in plasma, whole body (Ra x BW)", f.value * absorbed),
    )
    states = (qeat, qsto1, qsto2, qgut, meal, gp, gt, ip, il, x, i1, id_, isc1, isc2, gs)
    return Block("uva_padova", params, states, rates, (insulin_in, carbs_in), outputs)


# ---------------------------------------------------------------- simglucose's table
#: parameter (or covariate) -> (simglucose column, its unit, our declared unit)
SIMGLUCOSE_COLUMNS: dict[str, tuple[str, str, str]] = {
    "weight": ("BW", "kg", "kg"),
    P + "bw": ("BW", "kg", "kg"),
    P + "basal_glucose": ("Gb", "mg/dL", "mmol/L"),
    **{P + name: (column, unit, unit) for name, column, unit in (
        ("vg", "Vg", "dL/kg"), ("k1", "k1", "1/min"), ("k2", "k2", "1/min"),
        ("vi", "Vi", "L/kg"), ("m1", "m1", "1/min"), ("m2", "m2", "1/min"),
        ("m4", "m4", "1/min"), ("m30", "m30", "1/min"), ("kabs", "kabs", "1/min"),
        ("kmax", "kmax", "1/min"), ("kmin", "kmin", "1/min"), ("b", "b", "1"),
        ("d", "d", "1"), ("f", "f", "1"), ("kp1", "kp1", "mg/kg/min"),
        ("kp2", "kp2", "1/min"), ("kp3", "kp3", "mg*L/kg/min/pmol"), ("ki", "ki", "1/min"),
        ("fcns", "Fsnc", "mg/kg/min"), ("vm0", "Vm0", "mg/kg/min"),
        ("vmx", "Vmx", "mg*L/kg/min/pmol"), ("km0", "Km0", "mg/kg"),
        ("p2u", "p2u", "1/min"), ("ib", "Ib", "pmol/L"), ("ke1", "ke1", "1/min"),
        ("ke2", "ke2", "mg/kg"), ("kd", "kd", "1/min"), ("ka1", "ka1", "1/min"),
        ("ka2", "ka2", "1/min"), ("ksc", "ksc", "1/min"))},
}


def params_from_simglucose(row: Mapping[str, object], *, where: str = "simglucose row"
                           ) -> dict[str, float]:
    """One row of simglucose's ``vpatient_params.csv`` as the covariate ``weight`` and the
    parameters of ``glucose-uva-padova`` in their declared units (the column table in this
    module's docstring).

    Raises
    ------
    ConfigError
        For a missing column or a value that is not a finite number, naming *where*, the
        column and the value.
    """
    out: dict[str, float] = {}
    for target, (column, unit, ours) in SIMGLUCOSE_COLUMNS.items():
        if column not in row:
            raise ConfigError(f"{where}: no column {column!r} (simglucose layout, for "
                              f"{target!r}); expected simglucose's vpatient_params.csv columns")
        raw = row[column]
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ConfigError(f"{where}: column {column!r} = {raw!r}: expected a number in "
                              f"{unit}")
        out[target] = value if unit == ours else convert_substance(
            value, unit, ours, GLUCOSE, what=f"{where} {column}")
    return out


UVA_PADOVA = LibraryEntry(
    name="glucose-uva-padova",
    title="type 1 diabetes glucose-insulin, UVA/Padova model (Dalla Man 2007 with s.c. insulin "
          "and interstitial glucose as in the UVA/Padova T1D simulator)",
    references=(DALLA_MAN_2007, DALLA_MAN_2006, GIM_2007, KOVATCHEV_2009, DALLA_MAN_2014,
                VISENTIN_2018, HINSHAW_2013, WILINSKA_2010, REBRIN_1999),
    blocks=lambda _: [_uva_block()],
    circadian=(Cosinor(P + "vmx"),),
    basal_insulin=basal_insulin_rate,
    table_layouts={"simglucose": params_from_simglucose},
    population=PopulationModel(
        (WEIGHT,), _UVA, _uva_typical,
        tuple(RandomEffect(P + name, omega2_from_cv(cv),
                           f"CV {cv:.0%}: as Wilinska 2010's {what} (the UVA/Padova "
                           f"population is not public)")
              for name, (cv, what) in UVA_CV.items())
        + tuple(RandomEffect(P + name, sd * sd, f"SD(log) {sd:.3g}: as Wilinska 2010's "
                             f"{what}") for name, (sd, what) in UVA_LOG_SD.items()),
        plausible=_has_basal_state),
    notes="Structure: Dalla Man 2007 (glucose, insulin, EGP, use, kidneys) with its gut model "
          "(Dalla Man 2006) in the type 1 form of the UVA/Padova simulator (Kovatchev 2009, "
          "Dalla Man 2014): no insulin secretion, so no portal insulin (the kp4 term goes) "
          "and hepatic extraction stays at its basal HEb (m30 = m1 HEb/(1 - HEb)); s.c. "
          "insulin Isc1/Isc2 (GIM 2007); interstitial glucose Gs with rate ksc. Not included: "
          "the S2013 rise of insulin-dependent use below basal glucose and the glucagon "
          "subsystem (Dalla Man 2014), as in simglucose. "
          "Nominal values: Dalla Man 2007 Table 1 'normal' column for every shared parameter "
          "and its basal state (Gb 91.76 mg/dL, Ib 25.49 pmol/L, EGPb 1.92 mg/kg/min), from "
          "which kp1 and Vm0 are derived as the T1D simulator derives them (kp1 = EGPb + kp2 "
          "Gpb + kp3 Ib: Table 1's 2.70 less the portal-insulin term; Vm0 2.51 vs Table 1's "
          "2.50); kd, ka1, ka2 from GIM 2007; ksc 0.1/min. "
          "The simulator's type 1 nominal values and virtual population are not public, so "
          "the nominal patient has a healthy person's insulin sensitivity: it needs about "
          "0.33 U/h at 6 mmol/L for 70 kg, less than most adults with type 1 diabetes; load "
          "simglucose's cohort ([patient.table] layout = \"simglucose\") for its 30 patients. "
          "Variability: log-normal random effects whose CVs are those Wilinska 2010 gives "
          "for the same physiological role in the Cambridge simulator's population (Vmx as "
          "SID, kp3 as SIE, kp1 as EGP0, m2 and m4 as ke, kd/ka1/ka2 as 1/tmaxI, VG, VI; "
          "kabs/kmax/kmin with tmaxG's log-SD 0.25): a documented stand-in, not the "
          "UVA/Padova population; independent draws give about 18 % of patients with no basal "
          "steady state at basal_glucose (production does not exceed use there without "
          "insulin): they are drawn again; the rest need 0.06-1.4 U/h at 6 mmol/L (5th-95th "
          "percentile, 70 kg). "
          "Meal size D in kempt: the paper's D is the last meal; a state remembers it, as "
          "simglucose sets it at each meal's start (the stomach content plus the meal): a "
          "meal enters a swallowing compartment (1/min, ours) and D follows the carbohydrate "
          "not yet absorbed while food is being swallowed, is held after and "
          "falls once the stomach is empty (ours: INGESTION_PER_MIN, MEAL_MEMORY_PER_MIN, "
          "EMPTY_FRACTION). On simglucose's 30 patients (its file and ODE run once outside "
          "the tests, not shipped) a day of basal with a 5-U bolus and meals of 50, 70 and "
          "20 g eaten at 5 g/min gives glucose within 10.3 mg/dL of simglucose's own (median "
          "over patients 3.0 mg/dL; one 50-g meal with the bolus: within 1.9 mg/dL): D "
          "counts what the intestine still holds of the previous meal, simglucose does not. Uid's Vm0 + Vmx X is floored at 0 "
          "(ours). Circadian: a 24-h cosinor on Vmx, amplitude 0 by default: Hinshaw 2013 "
          "found no population rhythm of insulin action in type 1 diabetes (individual "
          "patterns), while the S2017 simulator (Visentin 2018) gives patients classes of "
          "daily SI patterns; set uva_vmx_amplitude_1 and uva_vmx_acrophase_1 per patient; "
          "clock_time_at_t0 [h] is the clock time at t = 0.",
)

ENTRIES = (UVA_PADOVA,)
