"""Independent reference of the DESIGN's deterministic PID induction check.

Written from the DESIGN text ("The TIVA benchmark", PID baseline paragraph)
and the published descriptions (Schiavo, Padula, Latronico, Paltenghi &
Visioli 2022; Visioli 2006, "Practical PID control", ch. 3, conditional
integration).  numpy/scipy only; the PK parameters and the Bouillon surface
come from the sibling module ``anaesthesia.py``; nothing from ``mpc_dose``.

Loop (1-s plant step, exact zero-order hold), for k = 0, 1, ..., N-1:

  1. BIS_k = Bouillon(Ce_p(k), Ce_r(k)), the noise-free BIS of the state at
     t = k s, i.e. measured *before* the input of step k acts (BIS_0 = E0).
  2. PID (DESIGN text; ts = 1 s, target 50):
        e = BIS_k - 50
        I = I + ts/Ti * e
        D = (D*Td/N + Td*(BIS_k - BIS_prev)) / (ts + Td/N)
        BIS_prev = BIS_k                      (raw BIS, always)
        u = Kp*(e + I + D)                    (unsaturated u)
        if u >= umax and u*e <= 0:  I = umax/Kp - e - D;  u = umax
        elif u <= umin and u*e <= 0: I = umin/Kp - e - D;  u = umin
     with I = D = 0 and BIS_prev = 100 at start, umax = 8.335, umin = 0.
  3. propofol_k = min(6.67, max(0, u))  mg/s
     remifentanil_k = min(16.67, max(0, 2*u))  ug/s
     (the clamps act on the drug rates, not on u; both rates come from the
     same u).
  4. Both rates held over [k, k+1); state advanced by the exact ZOH step
     x+ = Ad x + Bd r, (Ad, Bd) from expm([[A, B], [0, 0]] * 1 s).

See README.md, section "PID induction check", for why each ambiguous point
was resolved this way and for the cross-check against PAS.
"""
from __future__ import annotations

import csv
import math
import os

import numpy as np
from scipy.linalg import expm

if __package__:
    from . import anaesthesia as an
else:  # run as a script: python tests/reference/pid_loop.py
    import anaesthesia as an

# DESIGN constants ------------------------------------------------------------
KP = 0.013208318978132468
TI_S = 300.0
TD_S = 10.0
N_FILTER = 5.0
TS_S = 1.0
BIS_TARGET = 50.0
BIS_PREV_INIT = 100.0
U_MAX = 8.335            # = max(6.67, 16.67/2)
U_MIN = 0.0
RATIO_REMI = 2.0         # remifentanil ug/s per propofol mg/s
PROPOFOL_MAX_MG_PER_S = 6.67
REMIFENTANIL_MAX_UG_PER_S = 16.67

ANTIWINDUP_MODES = ("design", "same_sign", "none")


def _a_matrix_per_s(p: dict) -> np.ndarray:
    """States [A1, A2, A3, Ae] in amounts (Ae = V1*Ce); time in s."""
    v1, v2, v3 = p["v1_l"], p["v2_l"], p["v3_l"]
    k10 = p["cl1_l_per_min"] / v1
    k12 = p["cl2_l_per_min"] / v1
    k13 = p["cl3_l_per_min"] / v1
    k21 = p["cl2_l_per_min"] / v2
    k31 = p["cl3_l_per_min"] / v3
    ke0 = p["ke0_per_min"]
    a = np.array([[-(k10 + k12 + k13), k21, k31, 0.0],
                  [k12, -k21, 0.0, 0.0],
                  [k13, 0.0, -k31, 0.0],
                  [ke0, 0.0, 0.0, -ke0]])
    return a / 60.0


def zoh_step_matrices(params: dict, ts_s: float = TS_S):
    """Exact ZOH discretisation (Ad, Bd) for an infusion into A1."""
    m = np.zeros((5, 5))
    m[:4, :4] = _a_matrix_per_s(params)
    m[0, 4] = 1.0
    e = expm(m * ts_s)
    return e[:4, :4], e[:4, 4]


class DesignPID:
    """The DESIGN's discrete PID (derivative filter, conditional integration).

    antiwindup:
      'design'    - the DESIGN text (identical to PAS's example PID): clamp
                    when u >= umax and u*e <= 0, or u <= umin and u*e <= 0.
      'same_sign' - textbook conditional integration for this sign
                    convention (e = BIS - 50, Kp > 0): clamp when saturated
                    and u*e > 0.  Only for the sensitivity study in README.
      'none'      - no anti-windup (u returned unsaturated).
    """

    def __init__(self, kp=KP, ti=TI_S, td=TD_S, n=N_FILTER, ts=TS_S,
                 umax=U_MAX, umin=U_MIN, antiwindup="design"):
        if antiwindup not in ANTIWINDUP_MODES:
            raise ValueError(f"antiwindup must be one of {ANTIWINDUP_MODES}")
        self.kp, self.ti, self.td, self.n, self.ts = kp, ti, td, n, ts
        self.umax, self.umin = umax, umin
        self.antiwindup = antiwindup
        self.i = 0.0
        self.d = 0.0
        self.bis_prev = BIS_PREV_INIT
        self.n_clamp_high = 0
        self.n_clamp_low = 0

    def _fires(self, u: float, e: float) -> bool:
        if self.antiwindup == "design":
            return u * e <= 0.0
        if self.antiwindup == "same_sign":
            return u * e > 0.0
        return False

    def step(self, bis: float) -> float:
        e = bis - BIS_TARGET
        self.i += self.ts / self.ti * e
        tf = self.td / self.n
        self.d = (self.d * tf + self.td * (bis - self.bis_prev)) / (self.ts + tf)
        self.bis_prev = bis
        u = self.kp * (e + self.i + self.d)
        if u >= self.umax and self._fires(u, e):
            self.i = self.umax / self.kp - e - self.d
            u = self.umax
            self.n_clamp_high += 1
        elif u <= self.umin and self._fires(u, e):
            self.i = self.umin / self.kp - e - self.d
            u = self.umin
            self.n_clamp_low += 1
        return u


def _patient_models(row: dict):
    age = float(row["age"])
    height = float(row["height_cm"])
    weight = float(row["weight_kg"])
    male = bool(int(float(row["gender"])))
    pp = an.schnider_propofol(age, height, weight, male)
    rp = an.minto_remifentanil(age, height, weight, male)
    pd_par = dict(c50p=float(row["C50p_ug_per_mL"]),
                  c50r=float(row["C50r_ng_per_mL"]),
                  gamma=float(row["gamma"]), beta=float(row["beta"]),
                  e0=float(row["E0"]), emax=float(row["Emax"]))
    return pp, rp, pd_par


def simulate_pid_induction(patient_row: dict, duration_s: int = 600,
                           antiwindup: str = "design") -> dict:
    """Closed-loop PID induction, noise- and disturbance-free.

    patient_row: mapping with the columns of pas_docs_13_patient_table.csv
    (age, height_cm, weight_kg, gender, C50p_ug_per_mL, C50r_ng_per_mL,
    gamma, beta, E0, Emax).

    Returns arrays of length duration_s (sample k at t = k s):
      t, bis (BIS_k, state at t = k, before input k acts),
      propofol_rate_mg_per_s, remifentanil_rate_ug_per_s (held on [k, k+1)),
      propofol_ce (ug/mL), remifentanil_ce (ng/mL) at t = k,
    plus u_pid (the PID output after anti-windup, before the drug clamps)
    and the clamp counters n_clamp_high / n_clamp_low.
    """
    n_steps = int(duration_s)
    pp, rp, pd_par = _patient_models(patient_row)
    adp, bdp = zoh_step_matrices(pp)
    adr, bdr = zoh_step_matrices(rp)
    v1p, v1r = pp["v1_l"], rp["v1_l"]
    pid = DesignPID(antiwindup=antiwindup)

    t = np.arange(n_steps, dtype=float) * TS_S
    bis = np.empty(n_steps)
    up = np.empty(n_steps)
    ur = np.empty(n_steps)
    u_pid = np.empty(n_steps)
    cep = np.empty(n_steps)
    cer = np.empty(n_steps)
    xp = np.zeros(4)
    xr = np.zeros(4)
    for k in range(n_steps):
        cep[k] = xp[3] / v1p
        cer[k] = xr[3] / v1r
        bis[k] = an.bouillon_bis(cep[k], cer[k], **pd_par)
        u = pid.step(bis[k])
        u_pid[k] = u
        up[k] = min(PROPOFOL_MAX_MG_PER_S, max(0.0, u))
        ur[k] = min(REMIFENTANIL_MAX_UG_PER_S, max(0.0, RATIO_REMI * u))
        xp = adp @ xp + bdp * up[k]
        xr = adr @ xr + bdr * ur[k]
    return {"t": t, "bis": bis, "propofol_rate_mg_per_s": up,
            "remifentanil_rate_ug_per_s": ur, "propofol_ce": cep,
            "remifentanil_ce": cer, "u_pid": u_pid,
            "n_clamp_high": pid.n_clamp_high, "n_clamp_low": pid.n_clamp_low}


def _time_after_which_stays(t: np.ndarray, ok: np.ndarray) -> float:
    """Earliest sample time from which ``ok`` holds up to the last sample.

    0 if it always holds; NaN if it fails at the last sample (never settles
    within the window).  Returned in seconds.
    """
    bad = np.nonzero(~ok)[0]
    if bad.size == 0:
        return float(t[0])
    j = bad[-1]
    if j == len(t) - 1:
        return math.nan
    return float(t[j + 1])


def induction_metrics(t, bis) -> dict:
    """Induction metrics on the samples given (here k = 0..599, dt = 1 s).

    first_bis_below_55_s : first sample time t_k with BIS_k < 55 (NaN if none)
    lowest_bis           : min BIS_k
    iae                  : trapezoid integral of |BIS - 50| dt (BIS.s)
    sleep_time_min       : time after which BIS stays < 60, in min
    settling_time_min    : time after which BIS stays in [40, 60], in min
    low_bis_time_s       : seconds with BIS < 40 (count of samples x dt)
    """
    t = np.asarray(t, dtype=float)
    bis = np.asarray(bis, dtype=float)
    below55 = np.nonzero(bis < 55.0)[0]
    dt = float(t[1] - t[0]) if t.size > 1 else 1.0
    return {
        "first_bis_below_55_s": float(t[below55[0]]) if below55.size else math.nan,
        "lowest_bis": float(np.min(bis)),
        "iae": float(np.trapezoid(np.abs(bis - BIS_TARGET), t)
                     if hasattr(np, "trapezoid")
                     else np.trapz(np.abs(bis - BIS_TARGET), t)),
        "sleep_time_min": _time_after_which_stays(t, bis < 60.0) / 60.0,
        "settling_time_min": _time_after_which_stays(
            t, (bis >= 40.0) & (bis <= 60.0)) / 60.0,
        "low_bis_time_s": float(np.count_nonzero(bis < 40.0)) * dt,
    }


METRIC_COLUMNS = ("first_bis_below_55_s", "lowest_bis", "iae", "sleep_time_min",
                  "settling_time_min", "low_bis_time_s")

_HERE = os.path.dirname(os.path.abspath(__file__))
PATIENT_TABLE = os.path.normpath(os.path.join(
    _HERE, "..", "..", "scenarios", "data", "pas_docs_13_patient_table.csv"))
EXPECTED_CSV = os.path.join(_HERE, "data", "pid_induction_13_expected.csv")


def load_patient_table(path: str = PATIENT_TABLE) -> list[dict]:
    """Rows of the 13-patient table (skips the leading '#' comment line)."""
    with open(path, newline="") as fh:
        lines = [ln for ln in fh if not ln.startswith("#")]
    return list(csv.DictReader(lines))


def run_all(antiwindup: str = "design", duration_s: int = 600) -> list[dict]:
    out = []
    for row in load_patient_table():
        sim = simulate_pid_induction(row, duration_s, antiwindup=antiwindup)
        m = induction_metrics(sim["t"], sim["bis"])
        m["index"] = int(row["index"])
        m["max_u_pid"] = float(np.max(sim["u_pid"]))
        m["n_clamp_high"] = sim["n_clamp_high"]
        m["n_clamp_low"] = sim["n_clamp_low"]
        out.append(m)
    return out


if __name__ == "__main__":
    rows = run_all("design")
    with open(EXPECTED_CSV, "w", newline="") as fh:
        fh.write("index," + ",".join(METRIC_COLUMNS) + "\n")
        for m in rows:
            fh.write(str(m["index"]) + ","
                     + ",".join(repr(float(m[c])) for c in METRIC_COLUMNS) + "\n")
    for m in rows:
        print(m["index"], *(f"{m[c]:.6g}" for c in METRIC_COLUMNS),
              f"max_u={m['max_u_pid']:.4f}", m["n_clamp_high"], m["n_clamp_low"])
    print("wrote", EXPECTED_CSV)
