"""Glucose-insulin models for type 1 diabetes: the Cambridge model (Hovorka et al. 2004) with
the between-subject variability of its virtual population (Wilinska et al. 2010) and a
circadian (dawn) rhythm of endogenous glucose production.

Every number carries its source; where sources disagree the entry's ``notes`` say which was
followed. Written from the published equations; no code or parameter file of a simulator
was used.

The Cambridge model (Hovorka 2004, eqs. 1-6, and Wilinska 2010 for the sensor)::

    gut:        dD1/dt = AG d(t) - D1/tmaxG          dD2/dt = (D1 - D2)/tmaxG
                UG = D2/tmaxG                         (carbohydrate as glucose, g/min)
    s.c. insulin: dS1/dt = u(t) - S1/tmaxI            dS2/dt = (S1 - S2)/tmaxI
    plasma:     dI/dt = S2/(tmaxI VI) - ke I          (mU/L)
    action:     dx1/dt = -ka1 x1 + ka1 SIT I   (transport)   dx2/dt = -ka2 x2 + ka2 SID I
                dx3/dt = -ka3 x3 + ka3 SIE I   (endogenous production)
    glucose:    dQ1/dt = -F01c - x1 Q1 + k12 Q2 - FR + UG/M + EGP0 max(0, 1 - x3)
                dQ2/dt = x1 Q1 - (k12 + x2) Q2        G = Q1/VG (mmol/L)
                F01c = F01 min(1, G/4.5)              FR = 0.003 max(0, G - 9) VG
    interstitial (CGM site): dC/dt = (G - C)/tau

with M = 180.16 g/mol converting grams of carbohydrate to mmol of glucose.

This module is pure: CasADi and numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping

import casadi as ca

from ...errors import ModelError
from ...units import GLUCOSE, convert
from ..population import (FixedEffect, PopulationModel, RandomEffect, ResidualError,
                          omega2_from_cv)
from ..spec import Block, Cosinor, drug_input, output, param, state
from .base import WEIGHT, LibraryEntry

__all__ = ["ENTRIES", "CAMBRIDGE_HOVORKA", "basal_insulin_rate", "steady_state_insulin"]

HOVORKA_2004 = ("Hovorka R, Canonico V, Chassin LJ, et al. Nonlinear model predictive control "
                "of glucose concentration in subjects with type 1 diabetes. Physiol Meas "
                "2004;25(4):905-20. doi:10.1088/0967-3334/25/4/010")
WILINSKA_2010 = ("Wilinska ME, Chassin LJ, Acerini CL, Allen JM, Dunger DB, Hovorka R. "
                 "Simulation environment to evaluate closed-loop insulin delivery systems in "
                 "type 1 diabetes. J Diabetes Sci Technol 2010;4(1):132-44. "
                 "doi:10.1177/193229681000400117")
PERRIELLO_1991 = ("Perriello G, De Feo P, Torlone E, et al. The dawn phenomenon in type 1 "
                  "(insulin-dependent) diabetes mellitus: magnitude, frequency, variability, and "
                  "dependency on glucose counterregulation and insulin sensitivity. Diabetologia "
                  "1991;34(1):21-8. doi:10.1007/BF00404020")
BOLLI_1984 = ("Bolli GB, De Feo P, De Cosmo S, et al. Demonstration of a dawn phenomenon in "
              "normal human volunteers. Diabetes 1984;33(12):1150-3")
HINSHAW_2013 = ("Hinshaw L, Dalla Man C, Nandy DK, et al. Diurnal pattern of insulin action in "
                "type 1 diabetes: implications for a closed-loop system. Diabetes "
                "2013;62(7):2223-9. doi:10.2337/db12-1759")

#: the model's parameters, prefixed so a composition with another glucose model cannot clash
P = "cambridge_"

# ---------------------------------------------------------------- fixed effects (per kg)
_CAMBRIDGE = (
    FixedEffect("hovorka_k12", 0.066, "1/min", "transfer rate from the non-accessible to the "
                "accessible glucose compartment", HOVORKA_2004),
    FixedEffect("hovorka_ka1", 0.006, "1/min", "deactivation rate of insulin action on glucose "
                "transport/distribution (x1)", HOVORKA_2004),
    FixedEffect("hovorka_ka2", 0.06, "1/min", "deactivation rate of insulin action on glucose "
                "disposal (x2)", HOVORKA_2004),
    FixedEffect("hovorka_ka3", 0.03, "1/min", "deactivation rate of insulin action on "
                "endogenous glucose production (x3)", HOVORKA_2004),
    FixedEffect("hovorka_sit", 51.2e-4, "L/mU/min", "insulin sensitivity of transport "
                "(SIT = kb1/ka1, per mU/L)", HOVORKA_2004),
    FixedEffect("hovorka_sid", 8.2e-4, "L/mU/min", "insulin sensitivity of disposal "
                "(SID = kb2/ka2, per mU/L)", HOVORKA_2004),
    FixedEffect("hovorka_sie", 520e-4, "L/mU", "insulin sensitivity of endogenous glucose "
                "production (SIE = kb3/ka3, per mU/L)", HOVORKA_2004),
    FixedEffect("hovorka_ke", 0.138, "1/min", "insulin elimination rate from plasma",
                HOVORKA_2004),
    FixedEffect("hovorka_vi_per_kg", 0.12, "L/kg", "insulin distribution volume",
                HOVORKA_2004),
    FixedEffect("hovorka_vg_per_kg", 0.16, "L/kg", "glucose distribution volume of the "
                "accessible compartment", HOVORKA_2004),
    FixedEffect("hovorka_f01_per_kg", 0.0097, "mmol/kg/min", "non-insulin-dependent glucose "
                "flux (above 4.5 mmol/L)", HOVORKA_2004),
    FixedEffect("hovorka_egp0_per_kg", 0.0161, "mmol/kg/min", "endogenous glucose production "
                "extrapolated to zero insulin", HOVORKA_2004),
    FixedEffect("hovorka_ag", 0.8, "1", "carbohydrate bioavailability", HOVORKA_2004),
    FixedEffect("hovorka_tmax_g", 40.0, "min", "time to maximal appearance of meal glucose",
                HOVORKA_2004),
    FixedEffect("hovorka_tmax_i", 55.0, "min", "time to maximal absorption of s.c. "
                "rapid-acting insulin", HOVORKA_2004),
    FixedEffect("hovorka_f01_threshold", 4.5, "mmol/L", "glucose below which F01 falls in "
                "proportion to glucose", HOVORKA_2004),
    FixedEffect("hovorka_renal_threshold", 9.0, "mmol/L", "glucose above which the kidneys "
                "excrete glucose", HOVORKA_2004),
    FixedEffect("hovorka_renal_clearance", 0.003, "1/min", "renal glucose clearance above "
                "the threshold (times VG)", HOVORKA_2004),
    FixedEffect("wilinska_interstitial_tau", 15.0, "min", "time constant from plasma to "
                "interstitial (sensor-site) glucose", WILINSKA_2010),
    FixedEffect("perriello_egp_amplitude", 0.096, "1", "relative amplitude of the 24-h cosinor "
                "of EGP0 that gives the dawn rise of insulin requirements (peak/nadir 0.135/"
                "0.102 mU/kg/min) at the nominal patient held at 5.5 mmol/L (solved with "
                "steady_state_insulin)", PERRIELLO_1991),
    FixedEffect("perriello_egp_acrophase", 6.667, "h", "clock time of maximal EGP0: the peak "
                "of overnight insulin requirements at 06:40", PERRIELLO_1991),
    FixedEffect("basal_glucose", 6.0, "mmol/L", "glucose at t = 0 (the initial state is the "
                "steady state at this glucose under basal_insulin_rate)",
                "a scenario setting, not a published value (108 mg/dL, inside 70-180)"),
)

# ---------------------------------------------------------------- between-subject variability
#: CV of each parameter in the synthetic population, from the means and SDs of its
#: distributions (Wilinska 2010, Table 1): the name -> (CV, what the paper gives).
WILINSKA_CV: dict[str, tuple[float, str]] = {
    "k12": (0.0282 / 0.0649, "k12 0.0649 +- 0.0282 /min"),
    "ka1": (0.0056 / 0.0055, "ka1 0.0055 +- 0.0056 /min"),
    "ka2": (0.0507 / 0.0683, "ka2 0.0683 +- 0.0507 /min"),
    "ka3": (0.0235 / 0.0304, "ka3 0.0304 +- 0.0235 /min"),
    "sit": (32.09 / 51.2, "SIT 51.2 +- 32.09 x 1e-4 /min per mU/L"),
    "sid": (7.84 / 8.2, "SID 8.2 +- 7.84 x 1e-4 /min per mU/L"),
    "sie": (306.2 / 520.0, "SIE 520 +- 306.2 x 1e-4 per mU/L"),
    "ke": (0.035 / 0.14, "ke 0.14 +- 0.035 /min"),
    "vi": (0.012 / 0.12, "VI 0.12 +- 0.012 L/kg"),
    "f01": (0.0022 / 0.0097, "F01 0.0097 +- 0.0022 mmol/kg/min"),
    "egp0": (0.0039 / 0.0161, "EGP0 0.0161 +- 0.0039 mmol/kg/min"),
    "tmax_i": (0.0045 / 0.018, "1/tmaxI 0.018 +- 0.0045 /min"),
}
#: parameters given on the log scale: name -> (SD of the log, what the paper gives)
WILINSKA_LOG_SD: dict[str, tuple[float, str]] = {
    "tmax_g": (0.25, "ln(tmaxG) ~ N(3.689, 0.25^2), i.e. median 40 min"),
    "vg": (0.23 / 1.16, "exp(VG) ~ N(1.16, 0.23^2), read as a CV of 0.23/1.16"),
}


def _cambridge_typical(c: Mapping, th: Mapping) -> dict[str, float]:
    weight = c["weight"]
    return {
        P + "k12": th["hovorka_k12"], P + "ka1": th["hovorka_ka1"],
        P + "ka2": th["hovorka_ka2"], P + "ka3": th["hovorka_ka3"],
        P + "sit": th["hovorka_sit"], P + "sid": th["hovorka_sid"],
        P + "sie": th["hovorka_sie"], P + "ke": th["hovorka_ke"],
        P + "vi": th["hovorka_vi_per_kg"] * weight, P + "vg": th["hovorka_vg_per_kg"] * weight,
        P + "f01": th["hovorka_f01_per_kg"] * weight,
        P + "egp0": th["hovorka_egp0_per_kg"] * weight,
        P + "ag": th["hovorka_ag"], P + "tmax_g": th["hovorka_tmax_g"],
        P + "tmax_i": th["hovorka_tmax_i"], P + "f01_threshold": th["hovorka_f01_threshold"],
        P + "renal_threshold": th["hovorka_renal_threshold"],
        P + "renal_clearance": th["hovorka_renal_clearance"],
        P + "interstitial_tau": th["wilinska_interstitial_tau"],
        P + "egp0_amplitude_1": th["perriello_egp_amplitude"],
        P + "egp0_acrophase_1": th["perriello_egp_acrophase"],
        P + "basal_glucose": th["basal_glucose"],
    }


#: what a CGM reading of plasma glucose is off by, for an estimator (not the sensor model,
#: plant/sensor.py CGMModel): the stationary SD of the Breton & Kovatchev 2008 error model
#: (11.7 mg/dL) and a proportional part for the calibration error a MARD of about 9-10 %
#: implies (Dexcom G6: Shah VN et al. Diabetes Technol Ther 2018;20(6):428-33, MARD 9.0 %)
CGM_ERROR_SD_MMOL_L = 0.65
CGM_ERROR_CV = 0.09


# ---------------------------------------------------------------- steady state
def _insulin_for_glucose(glucose, k12, sit, sid, sie, vg, f01, egp0, f01_threshold,
                         renal_threshold, renal_clearance):
    """Plasma insulin [mU/L] that holds *glucose* [mmol/L] constant (any consistent units of
    time; CasADi or float arguments).

    At steady state x1 = SIT I, x2 = SID I, x3 = SIE I and Q2 = x1 Q1/(k12 + x2), so dQ1/dt = 0
    reads ``F01c + FR + SIT SID I^2 Q1/(k12 + SID I) = EGP0 (1 - SIE I)``: times
    (k12 + SID I), a quadratic ``a I^2 + b I + c = 0`` with one positive root when
    EGP0 > F01c + FR (otherwise no insulin holds the glucose: it falls even without insulin).
    """
    q1 = glucose * vg
    uptake = f01 * ca.fmin(1, glucose / f01_threshold) + \
        renal_clearance * ca.fmax(0, glucose - renal_threshold) * vg
    a = sid * (egp0 * sie + sit * q1)
    b = (uptake - egp0) * sid + egp0 * sie * k12
    c = (uptake - egp0) * k12
    return (-b + ca.sqrt(b * b - 4 * a * c)) / (2 * a), uptake < egp0


def steady_state_insulin(params: Mapping[str, float], glucose_mmol_per_L: float) -> float:
    """Plasma insulin [mU/L] that holds *glucose_mmol_per_L* constant for one patient's
    Cambridge-model parameters (declared units, by name), circadian rhythm off.

    Raises
    ------
    ModelError
        When no insulin level holds that glucose (it is below what the patient's own glucose
        production sustains without insulin).
    """
    args = [params[P + n] for n in ("k12", "sit", "sid", "sie", "vg", "f01", "egp0",
                                    "f01_threshold", "renal_threshold", "renal_clearance")]
    insulin, possible = _insulin_for_glucose(glucose_mmol_per_L, *args)
    if not bool(possible) or not float(insulin) > 0:
        raise ModelError(f"no basal insulin holds glucose at {glucose_mmol_per_L!r} mmol/L: "
                         f"the patient's glucose production {params[P + 'egp0']!r} mmol/min "
                         f"does not exceed its insulin-independent uptake there")
    return float(insulin)


def basal_insulin_rate(params: Mapping[str, float], glucose_mmol_per_L: float, *,
                       unit: str = "U/h") -> float:
    """The constant pump rate (in *unit*, an insulin amount per time) that holds
    *glucose_mmol_per_L* constant: at steady state ``u = I VI ke`` (Hovorka 2004)."""
    insulin = steady_state_insulin(params, glucose_mmol_per_L)
    rate_mu_per_min = insulin * params[P + "vi"] * params[P + "ke"]
    return convert(rate_mu_per_min, "mU/min", unit, what="basal insulin rate")


def _has_basal_state(params: Mapping[str, float]) -> bool:
    """A drawn patient is plausible when some basal insulin holds its basal glucose at every
    hour: at the trough of its EGP rhythm too (a person with type 1 diabetes needs insulin
    around the clock)."""
    trough = params[P + "egp0"] * (1 - abs(params.get(P + "egp0_amplitude_1", 0.0)))
    try:
        steady_state_insulin({**params, P + "egp0": trough}, params[P + "basal_glucose"])
    except ModelError:
        return False
    return True


# ---------------------------------------------------------------- the block
def _cambridge_block() -> Block:
    def p(name, unit, doc, domain="positive"):
        return param(P + name, unit, doc, domain)

    k12 = p("k12", "1/min", "glucose transfer rate Q2 -> Q1")
    ka = [p(f"ka{k}", "1/min", f"deactivation rate of insulin action x{k}") for k in (1, 2, 3)]
    sit = p("sit", "L/mU/min", "insulin sensitivity of glucose transport (per mU/L)")
    sid = p("sid", "L/mU/min", "insulin sensitivity of glucose disposal (per mU/L)")
    sie = p("sie", "L/mU", "insulin sensitivity of endogenous glucose production (per mU/L)")
    ke = p("ke", "1/min", "insulin elimination rate")
    vi = p("vi", "L", "insulin distribution volume")
    vg = p("vg", "L", "glucose distribution volume (accessible compartment)")
    f01 = p("f01", "mmol/min", "non-insulin-dependent glucose flux")
    egp0 = p("egp0", "mmol/min", "endogenous glucose production at zero insulin")
    ag = p("ag", "1", "carbohydrate bioavailability", "nonnegative")
    tmax_g = p("tmax_g", "min", "time to maximal meal glucose appearance")
    tmax_i = p("tmax_i", "min", "time to maximal s.c. insulin absorption")
    f01_threshold = p("f01_threshold", "mmol/L", "glucose below which F01 falls linearly")
    renal_threshold = p("renal_threshold", "mmol/L", "renal glucose threshold")
    renal_clearance = p("renal_clearance", "1/min", "renal glucose clearance rate")
    tau = p("interstitial_tau", "min", "plasma -> interstitial glucose time constant")
    basal_glucose = p("basal_glucose", "mmol/L", "glucose at t = 0 (steady state)")
    params = (k12, *ka, sit, sid, sie, ke, vi, vg, f01, egp0, ag, tmax_g, tmax_i, f01_threshold,
              renal_threshold, renal_clearance, tau, basal_glucose)

    # The initial state: the steady state at basal_glucose under the basal rate I VI ke, in
    # declared units (per minute throughout, so no time conversion is needed here).
    g_b = basal_glucose.sym
    insulin_b, _ = _insulin_for_glucose(g_b, k12.sym, sit.sym, sid.sym, sie.sym, vg.sym,
                                        f01.sym, egp0.sym, f01_threshold.sym,
                                        renal_threshold.sym, renal_clearance.sym)
    rate_b_u_per_min = insulin_b * vi.sym * ke.sym * 1e-3  # mU/min -> U/min
    x1_b, x2_b, x3_b = sit.sym * insulin_b, sid.sym * insulin_b, sie.sym * insulin_b
    q1_b = g_b * vg.sym
    q2_b = x1_b * q1_b / (k12.sym + x2_b)
    s_b = rate_b_u_per_min * tmax_i.sym

    gut1 = state(P + "gut1", "g", "carbohydrate in the first gut compartment")
    gut2 = state(P + "gut2", "g", "carbohydrate in the second gut compartment")
    s1 = state(P + "s1", "U", "insulin in the first s.c. compartment", s_b)
    s2 = state(P + "s2", "U", "insulin in the second s.c. compartment", s_b)
    insulin = state(P + "insulin", "mU/L", "plasma insulin concentration", insulin_b)
    x1 = state(P + "x1", "1/min", "insulin action on glucose transport", x1_b)
    x2 = state(P + "x2", "1/min", "insulin action on glucose disposal", x2_b)
    x3 = state(P + "x3", "1", "insulin action on endogenous glucose production", x3_b)
    q1 = state(P + "q1", "mmol", "glucose in the accessible compartment", q1_b)
    q2 = state(P + "q2", "mmol", "glucose in the non-accessible compartment", q2_b)
    interstitial = state(P + "interstitial", "mmol/L", "interstitial glucose", g_b)

    insulin_in = drug_input("insulin", "U", "s.c. rapid-acting insulin (pump rate; a bolus "
                            "enters the first s.c. compartment)", P + "s1")
    carbs_in = drug_input("carbohydrate", "g", "carbohydrate eaten (a meal is a bolus in g; "
                          "AG of it appears as glucose)", P + "gut1", bioavailability=P + "ag")

    # Equations in canonical units (s, mg, L, mmol, U): .value of every symbol.
    glucose = q1.value / vg.value  # mmol/L
    appearance_mg_per_s = gut2.value / tmax_g.value  # carbohydrate as glucose
    appearance = appearance_mg_per_s / GLUCOSE.molar_mass_g_per_mol  # mg / (mg/mmol) = mmol
    uptake_independent = f01.value * ca.fmin(1, glucose / f01_threshold.value)
    renal = renal_clearance.value * ca.fmax(0, glucose - renal_threshold.value) * vg.value
    # EGP0 (1 - x3) turns negative above I = 1/SIE (about 19 mU/L); the liver does not take
    # glucose up in this model, so production stops at 0 instead.
    production = egp0.value * ca.fmax(0, 1 - x3.value)
    rates = (
        -gut1.value / tmax_g.value,
        (gut1.value - gut2.value) / tmax_g.value,
        -s1.value / tmax_i.value,
        (s1.value - s2.value) / tmax_i.value,
        s2.value / (tmax_i.value * vi.value) - ke.value * insulin.value,
        ka[0].value * (sit.value * insulin.value - x1.value),
        ka[1].value * (sid.value * insulin.value - x2.value),
        ka[2].value * (sie.value * insulin.value - x3.value),
        -uptake_independent - x1.value * q1.value + k12.value * q2.value - renal + appearance
        + production,
        x1.value * q1.value - (k12.value + x2.value) * q2.value,
        (glucose - interstitial.value) / tau.value,
    )
    # inputs: the carbohydrate rate (a meal spread over time) reaches the gut scaled by AG as
    # a bolus is; the insulin rate feeds S1.
    rates = (rates[0] + ag.value * carbs_in.value, rates[1],
             rates[2] + insulin_in.value, *rates[3:])
    outputs = (
        output("glucose", "mmol/L", "plasma glucose", glucose),
        output("interstitial_glucose", "mmol/L", "interstitial (sensor-site) glucose",
               interstitial.value),
        output("plasma_insulin", "mU/L", "plasma insulin", insulin.value),
        output("meal_glucose_appearance", "g/min", "rate of appearance of meal carbohydrate "
               "(as glucose) in plasma", appearance_mg_per_s),
    )
    states = (gut1, gut2, s1, s2, insulin, x1, x2, x3, q1, q2, interstitial)
    return Block("cambridge", params, states, rates, (insulin_in, carbs_in), outputs)


CAMBRIDGE_HOVORKA = LibraryEntry(
    name="glucose-cambridge",
    title="type 1 diabetes glucose-insulin, Cambridge model (Hovorka 2004; virtual population "
          "Wilinska 2010; dawn rhythm of EGP0 after Perriello 1991)",
    references=(HOVORKA_2004, WILINSKA_2010, PERRIELLO_1991, BOLLI_1984, HINSHAW_2013),
    blocks=lambda _: [_cambridge_block()],
    circadian=(Cosinor(P + "egp0"),),
    basal_insulin=basal_insulin_rate,
    population=PopulationModel(
        (WEIGHT,), _CAMBRIDGE, _cambridge_typical,
        tuple(RandomEffect(P + name, omega2_from_cv(cv), f"CV {cv:.0%}: {what} (Wilinska 2010)")
              for name, (cv, what) in WILINSKA_CV.items())
        + tuple(RandomEffect(P + name, sd * sd, f"SD(log) {sd:.3g}: {what} (Wilinska 2010)")
                for name, (sd, what) in WILINSKA_LOG_SD.items()),
        residual_errors=(ResidualError("glucose", additive=CGM_ERROR_SD_MMOL_L,
                                       proportional=CGM_ERROR_CV),),
        plausible=_has_basal_state),
    notes="Nominal values: Hovorka 2004 (Table 1). Variability: the means and SDs of Wilinska "
          "2010's population distributions turned into log-normal random effects with the "
          "same CV around the Hovorka 2004 nominal values (the package's populations are "
          "log-normal; Wilinska gives normal distributions for most, which can draw negative "
          "rates); no correlations, and AG (uniform 70-120 % in Wilinska) is kept at 0.8. "
          "Independent draws give about 6 % of patients whose EGP0 does not exceed F01 at "
          "their basal glucose (no basal insulin holds it): they are drawn again, as Wilinska "
          "kept only plausible subjects. "
          "EGP = EGP0 max(0, 1 - x3): the clip at 0 is ours. Circadian rhythm: a 24-h cosinor "
          "on EGP0 (the dawn phenomenon is hepatic glucose production: Bolli 1984) peaking at "
          "06:40 with its amplitude set so the nominal patient's steady-state insulin need "
          "varies as Perriello 1991 measured in 114 people with T1D (nadir 0.102 at 02:40, "
          "peak 0.135 mU/kg/min at 06:40); one harmonic cannot put the nadir 4 h before the "
          "peak (it falls at 18:40). Insulin sensitivity carries no population rhythm: "
          "Hinshaw 2013 found none in T1D (P = 0.34, individual patterns), while healthy "
          "people (Saad 2012) and the UVA/Padova S2017 classes (Visentin 2015/2018) show "
          "lower morning SI; set cambridge_sit/sid/sie per patient instead. Set "
          "cambridge_egp0_amplitude_1 = 0 to switch the rhythm off (e.g. in a controller's "
          "model); clock_time_at_t0 [h] is the clock time at t = 0.",
)

ENTRIES = (CAMBRIDGE_HOVORKA,)

