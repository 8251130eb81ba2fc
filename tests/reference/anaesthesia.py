"""Independent numpy/scipy reference implementation of anaesthesia PK/PD models.

Purpose: validate the CasADi models of ``mpc_dose`` against an implementation
written only from the published formulas.  This module deliberately imports
nothing from ``mpc_dose`` and nothing from CasADi.

Units used throughout
---------------------
* volumes in L, clearances in L/min, ke0 in 1/min (as published);
* amounts in mg (propofol) or ug (remifentanil), rates in amount/s;
* concentrations = amount / L, i.e. mg/L == ug/mL for propofol and
  ug/L == ng/mL for remifentanil.

Provenance of every number
--------------------------
Each typical-parameter function states, next to each constant, where the
value comes from.  "Paper" means the original publication cited in the
docstring.  Where implementations in the wild disagree, the README in this
folder (``tests/reference/README.md``) lists what was compared and why the
value below was chosen.  Independent code read to cross-check (never copied):
python-anesthesia-simulator 1.0.0 (PAS, PyPI), opentiva/opentiva
(``opentiva/propofol.py``, ``opentiva/remifentanil.py``) and the R package
``tci`` (``pkmod_eleveld_ppf``, ``pkmod_eleveld_remi``).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy.integrate import solve_ivp

__all__ = [
    "james_lean_body_mass",
    "al_sallami_fat_free_mass",
    "schnider_propofol",
    "marsh_propofol",
    "minto_remifentanil",
    "eleveld_propofol",
    "eleveld_remifentanil",
    "bouillon_bis",
    "simulate_three_compartment",
    "ELEVELD_PROPOFOL_THETA_PUBLISHED",
    "ELEVELD_PROPOFOL_THETA_NONMEM",
]

PARAM_KEYS = (
    "v1_l",
    "v2_l",
    "v3_l",
    "cl1_l_per_min",
    "cl2_l_per_min",
    "cl3_l_per_min",
    "ke0_per_min",
)


def _params(v1, v2, v3, cl1, cl2, cl3, ke0) -> dict:
    return dict(zip(PARAM_KEYS, (float(v1), float(v2), float(v3), float(cl1),
                                 float(cl2), float(cl3), float(ke0))))


def _sigmoid(x: float, e50: float, gamma: float) -> float:
    """x^gamma / (x^gamma + e50^gamma), the 'fsigmoid' of Eleveld 2017/2018."""
    return x ** gamma / (x ** gamma + e50 ** gamma)


# ---------------------------------------------------------------------------
# Covariates
# ---------------------------------------------------------------------------

def james_lean_body_mass(weight_kg: float, height_cm: float, male: bool) -> float:
    """James (1976) lean body mass in kg, as used by Schnider 1998 and Minto 1997.

    male:   1.10 * W - 128 * (W / H)^2
    female: 1.07 * W - 148 * (W / H)^2      (W in kg, H in cm)
    """
    ratio_sq = (weight_kg / height_cm) ** 2
    if male:
        return 1.1 * weight_kg - 128.0 * ratio_sq
    return 1.07 * weight_kg - 148.0 * ratio_sq


def al_sallami_fat_free_mass(weight_kg: float, height_cm: float, age_yr: float,
                             male: bool) -> float:
    """Al-Sallami (2015) fat-free mass in kg, as used by Eleveld 2017 and 2018.

    male:   (0.88 + 0.12 / (1 + (AGE/13.4)^-12.7)) * 9270 W / (6680 + 216 BMI)
    female: (1.11 - 0.11 / (1 + (AGE/7.1)^-1.1))  * 9270 W / (8780 + 244 BMI)
    with BMI = W / (H/100)^2.  (Formula as printed in the Eleveld 2018
    appendix; identical in PAS, opentiva and the R 'tci' package.)
    """
    bmi = weight_kg / (height_cm / 100.0) ** 2
    if male:
        maturation = 0.88 + (1.0 - 0.88) / (1.0 + (age_yr / 13.4) ** (-12.7))
        return maturation * 9270.0 * weight_kg / (6680.0 + 216.0 * bmi)
    maturation = 1.11 + (1.0 - 1.11) / (1.0 + (age_yr / 7.1) ** (-1.1))
    return maturation * 9270.0 * weight_kg / (8780.0 + 244.0 * bmi)


# ---------------------------------------------------------------------------
# Propofol
# ---------------------------------------------------------------------------

def schnider_propofol(age_yr: float, height_cm: float, weight_kg: float,
                      male: bool) -> dict:
    """Schnider et al. 1998 (Anesthesiology 88:1170) PK + Schnider 1999
    (Anesthesiology 90:1502) ke0.

    All numbers from the 1998 paper's final covariate model (Table 3):
      V1 = 4.27 L; V2 = 18.9 - 0.391 (AGE-53) L; V3 = 238 L
      CL1 = 1.89 + 0.0456 (WGT-77) - 0.0681 (LBM-59) + 0.0264 (HGT-177) L/min
      CL2 = 1.29 - 0.024 (AGE-53) L/min; CL3 = 0.836 L/min
    LBM: James formula (as in the paper).  ke0 = 0.456 /min (Schnider 1999).
    PAS 1.0.0 uses exactly these.  (Slips seen elsewhere and NOT followed:
    opentiva writes V2 with (AGE-52); the R 'tci' package writes CL1 with
    (LBM-77) instead of (WGT-77).)
    """
    lbm = james_lean_body_mass(weight_kg, height_cm, male)
    v1 = 4.27
    v2 = 18.9 - 0.391 * (age_yr - 53.0)
    v3 = 238.0
    cl1 = (1.89 + 0.0456 * (weight_kg - 77.0) - 0.0681 * (lbm - 59.0)
           + 0.0264 * (height_cm - 177.0))
    cl2 = 1.29 - 0.024 * (age_yr - 53.0)
    cl3 = 0.836
    ke0 = 0.456
    return _params(v1, v2, v3, cl1, cl2, cl3, ke0)


# Marsh 1991 (BJA 67:41) adult parameter set (Gepts 1987 rate constants with
# V1 raised to 0.228 L/kg), given in the paper as V1 + micro-rate constants.
MARSH_V1_L_PER_KG = 0.228
MARSH_K10 = 0.119
MARSH_K12 = 0.112
MARSH_K13 = 0.0419
MARSH_K21 = 0.055
MARSH_K31 = 0.0033


def marsh_propofol(weight_kg: float, ke0_per_min: float = 0.26) -> dict:
    """Marsh et al. 1991 (BJA 67:41) propofol PK, ke0 0.26 /min (Diprifusor).

    The paper specifies the model as V1 = 0.228 L/kg and micro-rate constants
    k10 0.119, k12 0.112, k13 0.0419, k21 0.055, k31 0.0033 /min (Gepts 1987
    constants).  Volumes/clearances are derived so that those rate constants
    are reproduced exactly: CLi = k1i V1, V2 = k12 V1 / k21 (0.4643 L/kg),
    V3 = k13 V1 / k31 (2.8949 L/kg).  opentiva uses the same rate constants.

    ke0 = 0.26 /min is the Diprifusor value (not in the 1991 paper).

    NOTE: PAS 1.0.0 (and the Absalom 2009 review table it follows) use rounded
    values V2 = 0.463 L/kg, V3 = 2.893 L/kg and k13 = 0.042, which gives
    k21 = 0.05515 and k31 = 0.003310 - i.e. slightly different rate constants.
    See README for the effect on the curves.
    """
    v1 = MARSH_V1_L_PER_KG * weight_kg
    v2 = MARSH_K12 * v1 / MARSH_K21
    v3 = MARSH_K13 * v1 / MARSH_K31
    cl1 = MARSH_K10 * v1
    cl2 = MARSH_K12 * v1
    cl3 = MARSH_K13 * v1
    return _params(v1, v2, v3, cl1, cl2, cl3, ke0_per_min)


# Eleveld 2018 propofol PK thetas, index = theta number in the paper (0 unused).
# PUBLISHED: Table 2 of Eleveld et al. 2018 (BJA 120:942), 3 significant digits
# (these are also the values in the R 'tci' package).
ELEVELD_PROPOFOL_THETA_PUBLISHED = (
    None,
    6.28,      # 1  V1ref [L]
    25.5,      # 2  V2ref [L]
    273.0,     # 3  V3ref [L]
    1.79,      # 4  CLref male [L/min]
    1.75,      # 5  Q2ref [L/min]
    1.11,      # 6  Q3ref [L/min]
    0.191,     # 7  residual error (unused here)
    42.3,      # 8  CL maturation E50 [weeks PMA]
    9.06,      # 9  CL maturation slope
    -0.0156,   # 10 smaller V2 with age
    -0.00286,  # 11 lower CL with age (opiates)
    33.6,      # 12 weight for 50% of maximal V1 [kg]
    -0.0138,   # 13 smaller V3 with age (opiates)
    68.3,      # 14 maturation of Q3 [weeks PMA]
    2.10,      # 15 CLref female [L/min]
    1.30,      # 16 higher Q2 for maturation of Q3
    1.42,      # 17 V1 venous samples (children)
    0.68,      # 18 higher Q2 venous samples
)
# NONMEM: unrounded estimates as carried by PAS 1.0.0 (pk_models.py), which
# says they are the paper's thetas; each rounds to the published value above.
# Kept so that the formula structure can be checked against PAS exactly.
ELEVELD_PROPOFOL_THETA_NONMEM = (
    None,
    6.2830780766822, 25.5013145036879, 272.8166615043603,
    1.7895836588902, 1.7500983738779, 1.1085424008536,
    0.191307, 42.2760190602615, 9.0548452392807,
    -0.015633, -0.00285709, 33.5531248778544,
    -0.0138166, 68.2767978846832, 2.1002218877899,
    1.3042680471360, 1.4189043652084, 0.6805003109141,
)
# Eleveld 2018 PD: ke0 arterial 0.146 /min, venous 1.24 /min, both scaled by
# (WGT/70)^-0.25 (paper Table 3; same in PAS, opentiva, R 'tci').
ELEVELD_PROPOFOL_KE0_ARTERIAL = 0.146
ELEVELD_PROPOFOL_KE0_VENOUS = 1.24


def eleveld_propofol(age_yr: float, height_cm: float, weight_kg: float,
                     male: bool, opiates: bool = True,
                     sampling: str = "arterial",
                     theta: Sequence | None = None) -> dict:
    """Eleveld et al. 2018 (BJA 120:942) propofol PK-PD (ke0 only from PD).

    Reference individual: 35 yr, 70 kg, 170 cm, male.  PMA = AGE*52 + 40 weeks.
      f_aging(x)   = exp(x (AGE - 35))
      f_sigmoid    = x^g / (x^g + E50^g)
      f_central(W) = f_sigmoid(W, th12, 1)
      f_CLmat      = f_sigmoid(PMA, th8, th9);  f_Q3mat = f_sigmoid(PMA, th14, 1)
      f_opiates(x) = exp(x AGE) if opiates co-administered else 1
      V1 = th1 f_central(W)/f_central(70)       [venous: * (1 + th17 (1 - f_central(W)))]
      V2 = th2 (W/70) f_aging(th10)
      V3 = th3 (FFM/FFMref) f_opiates(th13)     (FFM: Al-Sallami)
      CL = (male ? th4 : th15) (W/70)^0.75 f_CLmat/f_CLmat,ref f_opiates(th11)
      Q2 = th5 (V2/th2)^0.75 (1 + th16 (1 - f_Q3mat))   [venous: * th18]
      Q3 = th6 (V3/th3)^0.75 f_Q3mat/f_Q3mat,ref
      ke0 = 0.146 (W/70)^-0.25 arterial, 1.24 (W/70)^-0.25 venous
    V2ref = th2 and V3ref = th3 as in the paper (PAS, opentiva and R 'tci'
    agree).  ``theta`` defaults to the published (Table 2) values; pass
    ``ELEVELD_PROPOFOL_THETA_NONMEM`` for the unrounded set PAS uses.
    """
    th = ELEVELD_PROPOFOL_THETA_PUBLISHED if theta is None else theta
    if sampling not in ("arterial", "venous"):
        raise ValueError("sampling must be 'arterial' or 'venous'")
    venous = sampling == "venous"
    age_ref, wgt_ref, hgt_ref = 35.0, 70.0, 170.0
    pma_wk = age_yr * 52.0 + 40.0
    pma_ref_wk = age_ref * 52.0 + 40.0

    def f_aging(x):
        return np.exp(x * (age_yr - age_ref))

    def f_opiates(x):
        return np.exp(x * age_yr) if opiates else 1.0

    def f_central(w):
        return _sigmoid(w, th[12], 1.0)

    f_cl_mat = _sigmoid(pma_wk, th[8], th[9])
    f_cl_mat_ref = _sigmoid(pma_ref_wk, th[8], th[9])
    f_q3_mat = _sigmoid(pma_wk, th[14], 1.0)
    f_q3_mat_ref = _sigmoid(pma_ref_wk, th[14], 1.0)
    ffm = al_sallami_fat_free_mass(weight_kg, height_cm, age_yr, male)
    ffm_ref = al_sallami_fat_free_mass(wgt_ref, hgt_ref, age_ref, True)

    v1 = th[1] * f_central(weight_kg) / f_central(wgt_ref)
    if venous:
        v1 = v1 * (1.0 + th[17] * (1.0 - f_central(weight_kg)))
    v2 = th[2] * (weight_kg / wgt_ref) * f_aging(th[10])
    v3 = th[3] * (ffm / ffm_ref) * f_opiates(th[13])
    cl_ref = th[4] if male else th[15]
    cl1 = (cl_ref * (weight_kg / wgt_ref) ** 0.75 * (f_cl_mat / f_cl_mat_ref)
           * f_opiates(th[11]))
    cl2 = th[5] * (v2 / th[2]) ** 0.75 * (1.0 + th[16] * (1.0 - f_q3_mat))
    if venous:
        cl2 = cl2 * th[18]
    cl3 = th[6] * (v3 / th[3]) ** 0.75 * (f_q3_mat / f_q3_mat_ref)
    ke0_ref = ELEVELD_PROPOFOL_KE0_VENOUS if venous else ELEVELD_PROPOFOL_KE0_ARTERIAL
    ke0 = ke0_ref * (weight_kg / wgt_ref) ** (-0.25)
    return _params(v1, v2, v3, cl1, cl2, cl3, ke0)


# ---------------------------------------------------------------------------
# Remifentanil
# ---------------------------------------------------------------------------

def minto_remifentanil(age_yr: float, height_cm: float, weight_kg: float,
                       male: bool) -> dict:
    """Minto et al. 1997 (Anesthesiology 86:10) remifentanil PK-PD, complex model.

    Paper Table 3 (LBM by James):
      V1 = 5.1 - 0.0201 (AGE-40) + 0.072 (LBM-55)
      V2 = 9.82 - 0.0811 (AGE-40) + 0.108 (LBM-55);  V3 = 5.42
      CL1 = 2.6 - 0.0162 (AGE-40) + 0.0191 (LBM-55)
      CL2 = 2.05 - 0.0301 (AGE-40);  CL3 = 0.076 - 0.00113 (AGE-40)
      ke0 = 0.595 - 0.007 (AGE-40)
    PAS 1.0.0, opentiva and R 'tci' use the same numbers.
    """
    lbm = james_lean_body_mass(weight_kg, height_cm, male)
    da = age_yr - 40.0
    dl = lbm - 55.0
    v1 = 5.1 - 0.0201 * da + 0.072 * dl
    v2 = 9.82 - 0.0811 * da + 0.108 * dl
    v3 = 5.42
    cl1 = 2.6 - 0.0162 * da + 0.0191 * dl
    cl2 = 2.05 - 0.0301 * da
    cl3 = 0.076 - 0.00113 * da
    ke0 = 0.595 - 0.007 * da
    return _params(v1, v2, v3, cl1, cl2, cl3, ke0)


def eleveld_remifentanil(age_yr: float, height_cm: float, weight_kg: float,
                         male: bool) -> dict:
    """Eleveld et al. 2017 (Anesthesiology 126:1005) remifentanil PK-PD.

    Reference individual 35 yr, 70 kg, 170 cm male; reference values from the
    paper (abstract and Table 2): V1 5.81, V2 8.82, V3 5.03 L; CL 2.58,
    Q2 1.72, Q3 0.124 L/min; ke0 1.09 /min.
    Covariate thetas: th1 2.88 (KMAT weight E50, kg), th2 -0.00554,
    th3 -0.00327, th4 -0.0315, th5 0.470 (KSEX), th6 -0.0260 (V3 weight).
      SIZE    = FFM / FFMref  (Al-Sallami)
      KMAT    = f_sigmoid(W, th1, 2)
      KSEX    = 1 (male); 1 + th5 f_sigmoid(AGE, 12, 6) (1 - f_sigmoid(AGE, 45, 6)) (female)
      V1 = 5.81 SIZE exp(th2 (AGE-35))
      V2 = 8.82 SIZE exp(th3 (AGE-35)) KSEX
      V3 = 5.03 SIZE exp(th4 (AGE-35)) exp(th6 (W-70))
      CL = 2.58 SIZE^0.75 (KMAT/KMATref) KSEX exp(th3 (AGE-35))
      Q2 = 1.72 (V2/8.82)^0.75 exp(th2 (AGE-35)) KSEX
      Q3 = 0.124 (V3/5.03)^0.75 exp(th2 (AGE-35))
      ke0 = 1.09 exp(-0.0289 (AGE-35))
    The aging-theta assignment (th2 on V1/Q2/Q3, th3 on V2/CL) is the same in
    PAS, opentiva and R 'tci'.  KSEX on V2 and V2ref = 8.82 follow the paper,
    opentiva and R 'tci'.  PAS 1.0.0 differs: V2ref = 8.882 and no KSEX on V2
    (see README).
    """
    age_ref, wgt_ref, hgt_ref = 35.0, 70.0, 170.0
    th1, th2, th3, th4, th5, th6 = 2.88, -0.00554, -0.00327, -0.0315, 0.470, -0.0260
    v1_ref, v2_ref, v3_ref = 5.81, 8.82, 5.03
    cl_ref, q2_ref, q3_ref = 2.58, 1.72, 0.124

    def f_aging(x):
        return np.exp(x * (age_yr - age_ref))

    size = (al_sallami_fat_free_mass(weight_kg, height_cm, age_yr, male)
            / al_sallami_fat_free_mass(wgt_ref, hgt_ref, age_ref, True))
    kmat = _sigmoid(weight_kg, th1, 2.0)
    kmat_ref = _sigmoid(wgt_ref, th1, 2.0)
    if male:
        ksex = 1.0
    else:
        ksex = 1.0 + th5 * _sigmoid(age_yr, 12.0, 6.0) * (1.0 - _sigmoid(age_yr, 45.0, 6.0))

    v1 = v1_ref * size * f_aging(th2)
    v2 = v2_ref * size * f_aging(th3) * ksex
    v3 = v3_ref * size * f_aging(th4) * np.exp(th6 * (weight_kg - wgt_ref))
    cl1 = cl_ref * size ** 0.75 * (kmat / kmat_ref) * ksex * f_aging(th3)
    cl2 = q2_ref * (v2 / v2_ref) ** 0.75 * f_aging(th2) * ksex
    cl3 = q3_ref * (v3 / v3_ref) ** 0.75 * f_aging(th2)
    ke0 = 1.09 * f_aging(-0.0289)
    return _params(v1, v2, v3, cl1, cl2, cl3, ke0)


# ---------------------------------------------------------------------------
# Pharmacodynamics
# ---------------------------------------------------------------------------

def bouillon_bis(ce_propofol_ug_per_ml, ce_remifentanil_ng_per_ml, c50p, c50r,
                 gamma, beta, e0, emax):
    """Bouillon et al. 2004 (Anesthesiology 100:1353) response surface for BIS.

    Up = Cep/C50p, Ur = Cer/C50r, U = Up + Ur, phi = Up/U,
    U50 = 1 - beta phi + beta phi^2,
    BIS = E0 - Emax (U/U50)^gamma / (1 + (U/U50)^gamma);  BIS = E0 where U = 0.
    Vectorised over the concentrations (numpy broadcasting); returns a float
    for scalar input.
    """
    cep = np.asarray(ce_propofol_ug_per_ml, dtype=float)
    cer = np.asarray(ce_remifentanil_ng_per_ml, dtype=float)
    up = cep / c50p
    ur = cer / c50r
    u = up + ur
    positive = u > 0.0
    safe_u = np.where(positive, u, 1.0)
    phi = np.where(positive, up / safe_u, 0.0)
    u50 = 1.0 - beta * phi + beta * phi ** 2
    x = np.where(positive, (safe_u / u50) ** gamma, 0.0)
    bis = np.where(positive, e0 - emax * x / (1.0 + x), e0)
    if bis.ndim == 0:
        return float(bis)
    return bis


# ---------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------

def _system_matrix_per_s(params: dict) -> np.ndarray:
    """A for states [A1, A2, A3, Ae] (amounts; Ae = V1 * Ce), time in s."""
    v1, v2, v3 = params["v1_l"], params["v2_l"], params["v3_l"]
    cl1, cl2, cl3 = (params["cl1_l_per_min"], params["cl2_l_per_min"],
                     params["cl3_l_per_min"])
    ke0 = params["ke0_per_min"]
    k10, k12, k13 = cl1 / v1, cl2 / v1, cl3 / v1
    k21, k31 = cl2 / v2, cl3 / v3
    a = np.array([
        [-(k10 + k12 + k13), k21, k31, 0.0],
        [k12, -k21, 0.0, 0.0],
        [k13, 0.0, -k31, 0.0],
        [ke0, 0.0, 0.0, -ke0],
    ])
    return a / 60.0


def simulate_three_compartment(params: dict,
                               infusion_segments: Iterable,
                               t_out_s,
                               bolus_events: Iterable = (),
                               rtol: float = 1e-10,
                               atol_rel: float = 1e-12) -> dict:
    """Simulate the 3-compartment mammillary model with an effect site.

    States (amounts, mg or ug): central A1, fast peripheral A2, slow
    peripheral A3 and effect site Ae = V1*Ce, starting at zero at t = 0 s:
      dA1/dt = u(t) - (k10+k12+k13) A1 + k21 A2 + k31 A3
      dA2/dt = k12 A1 - k21 A2
      dA3/dt = k13 A1 - k31 A3
      dAe/dt = ke0 (A1 - Ae)          (i.e. dCe/dt = ke0 (Cp - Ce))
    with kij from ``params`` (L, L/min, 1/min) converted to 1/s.

    infusion_segments: iterable of (t_start_s, t_end_s, rate_amount_per_s);
        segments may overlap, their rates add.
    bolus_events: iterable of (t_s, amount) added instantaneously to A1;
        outputs at exactly t_s are taken after the bolus (right-continuous).
    t_out_s: output times (s, >= 0).

    Integration: scipy solve_ivp Radau with the exact constant Jacobian,
    rtol 1e-10 and atol = 1e-12 x (total amount given, at least 1), restarted
    at every segment / bolus boundary so the input discontinuities are exact.

    Returns {'t': t_out_s, 'cp': A1/V1, 'ce': Ae/V1, 'states': (n, 4) array}.
    """
    segments = [(float(a), float(b), float(r)) for a, b, r in infusion_segments]
    boluses = [(float(t), float(d)) for t, d in bolus_events]
    for a, b, _ in segments:
        if b < a or a < 0.0:
            raise ValueError(f"bad segment [{a}, {b}]")
    for t, _ in boluses:
        if t < 0.0:
            raise ValueError("bolus before t = 0")
    t_out = np.asarray(t_out_s, dtype=float)
    if t_out.ndim != 1 or t_out.size == 0:
        raise ValueError("t_out_s must be a non-empty 1-D sequence")
    if np.any(t_out < 0.0):
        raise ValueError("t_out_s must be >= 0")
    order = np.argsort(t_out, kind="stable")
    t_sorted = t_out[order]
    t_end = float(t_sorted[-1])

    a_mat = _system_matrix_per_s(params)
    v1 = params["v1_l"]
    total = sum(abs(r) * (b - a) for a, b, r in segments) + sum(abs(d) for _, d in boluses)
    atol = atol_rel * max(1.0, total)

    breaks = {0.0, t_end}
    for a, b, _ in segments:
        breaks.update(x for x in (a, b) if x <= t_end)
    breaks.update(t for t, _ in boluses if t <= t_end)
    breaks = sorted(breaks)

    def rate_on(lo: float, hi: float) -> float:
        mid = 0.5 * (lo + hi)
        return sum(r for a, b, r in segments if a <= mid < b)

    def bolus_at(t: float) -> float:
        return sum(d for tb, d in boluses if tb == t)

    out = np.empty((t_sorted.size, 4))
    x = np.zeros(4)
    n_int = len(breaks) - 1
    for i in range(n_int + 1):
        lo = breaks[i]
        x = x.copy()
        x[0] += bolus_at(lo)
        if i == n_int:  # lo == t_end: outputs exactly at t_end (after bolus)
            out[t_sorted == lo] = x
            break
        hi = breaks[i + 1]
        sel = np.nonzero((t_sorted >= lo) & (t_sorted < hi))[0]
        b_vec = np.array([rate_on(lo, hi), 0.0, 0.0, 0.0])

        def rhs(_t, y, a_mat=a_mat, b_vec=b_vec):
            return a_mat @ y + b_vec

        t_eval = np.append(t_sorted[sel], hi)
        sol = solve_ivp(rhs, (lo, hi), x, method="Radau", t_eval=t_eval,
                        rtol=rtol, atol=atol, jac=lambda _t, _y: a_mat)
        if not sol.success:
            raise RuntimeError(sol.message)
        out[sel] = sol.y[:, :-1].T
        x = sol.y[:, -1]

    result = np.empty_like(out)
    result[order] = out
    return {"t": t_out, "cp": result[:, 0] / v1, "ce": result[:, 3] / v1,
            "states": result}

