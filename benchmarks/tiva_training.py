"""The TIVA benchmark on the 32 training patients: NMPC + MHE (both drugs) through the whole
20-minute protocol with noise and disturbance, mean metrics beside the published rows.

    python benchmarks/tiva_training.py [--patients 32] [--workers 2]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mpc_dose.control.mhe import MHEConfig  # noqa: E402
from mpc_dose.control.mpc_controller import MPCController  # noqa: E402
from mpc_dose.control.nmpc import NMPCConfig  # noqa: E402
from mpc_dose.control.supervisor import SafetyConfig  # noqa: E402
from mpc_dose.model.library import load  # noqa: E402
from mpc_dose.plant.pump import PumpConfig  # noqa: E402
from mpc_dose.plant.patient import OutputDisturbance  # noqa: E402
from mpc_dose.plant.sensor import SensorConfig, bis_noise_filter  # noqa: E402
from mpc_dose.trial.closed_loop import LoopSetup, run_closed_loop  # noqa: E402
from mpc_dose.trial.metrics import tiva_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "propofol-eleveld+remifentanil-eleveld+bis-bouillon"
PK = ["V1", "V2", "V3", "CL1", "CL2", "CL3", "ke0"]


def controller_for(row, lm) -> MPCController:
    cov = {"age": row.age, "height": row.height_cm, "weight": row.weight_kg,
           "sex": "male" if row.gender_1male == 1 else "female", "opiates": "yes"}
    params = lm.population.typical_parameters(cov)
    scale = float(os.environ.get("TIVA_PRIOR_SCALE", "0.6"))
    params["bis_c50p"] *= scale
    params["bis_c50r"] *= scale
    omega = lm.population.omega
    names = lm.population.eta_names
    chosen = tuple(os.environ.get("TIVA_ESTIMATE", "bis_c50p,bis_c50r,bis_gamma").split(","))
    sub = np.array([[omega[names.index(a), names.index(b)] for b in chosen] for a in chosen])
    env = os.environ.get
    ratio = float(env("TIVA_RATIO", "2.0"))
    nmpc = NMPCConfig(output="bis", inputs=("propofol", "remifentanil"), period_s=5.0,
                      horizon=int(env("TIVA_HORIZON", "40")),
                      move_block=int(env("TIVA_BLOCK", "2")), reference=50.0,
                      output_weight=1.0,
                      change_weights={"propofol": float(env("TIVA_DU", "20")),
                                      "remifentanil": float(env("TIVA_DU_R", "20"))},
                      rate_bounds={"propofol": (0.0, 6.67), "remifentanil": (0.0, 16.67)},
                      max_change={"propofol": float(env("TIVA_MAXCHANGE", "inf"))},
                      ratio=("propofol", "remifentanil", ratio) if ratio > 0 else None,
                      soft_window=(float(env("TIVA_FLOOR", "51")), np.inf),
                      soft_weights=(float(env("TIVA_SOFT", "1000")),
                                    float(env("TIVA_SOFT", "1000"))))
    safety = SafetyConfig("bis", {"propofol": 6.67, "remifentanil": 16.67},
                          valid_range=(0.0, 100.0), stale_after_s=15.0)
    mhe = MHEConfig("bis", chosen, tuple(map(tuple, sub)),
                    noise_sd=float(env("TIVA_NOISE", "1.5")),
                    window=int(env("TIVA_WINDOW", "120")), disturbance=True,
                    disturbance_sd=float(env("TIVA_DSD", "3.0")),
                    disturbance_window=int(env("TIVA_DWIN", "0")))
    tau = float(env("TIVA_REF_TAU", "0"))
    e0 = params["bis_e0"]
    profile = (lambda t: 50.0 + (e0 - 50.0) * math.exp(-t / tau)) if tau > 0 else None
    return MPCController(lm.model, params, nmpc, safety, mhe, reference=profile,
                         estimator=env("TIVA_ESTIMATOR", "ekf"),
                         ekf_options={"q_d": float(env("TIVA_QD", "0.01")),
                                      "q_eta": float(env("TIVA_QETA", "1e-3")),
                                      "prior_inflation": float(env("TIVA_INFL", "1"))})


def run_patient(k: int) -> dict:
    lm = load(MODEL)
    table = pd.read_csv(REPO / "scenarios" / "data" / "tiva_training_cohort_32.csv")
    row = table.iloc[k]
    true = dict(lm.population.typical_parameters(
        {"age": row.age, "height": row.height_cm, "weight": row.weight_kg,
         "sex": "male" if row.gender_1male == 1 else "female"}))
    for drug in ("propofol", "remifentanil"):
        for col in PK:
            true[f"{drug}_{col.lower()}"] = float(row[f"{drug}_{col}"])
    true.update(bis_c50p=row.c50p_ug_per_mL, bis_c50r=row.c50r_ng_per_mL, bis_gamma=row.gamma,
                bis_beta=row.beta, bis_e0=row.E0, bis_emax=row.Emax)
    controller = controller_for(row, lm)
    setup = LoopSetup(
        lm.model, true, controller,
        [PumpConfig("propofol", "propofol", 10.0, max_rate_ml_per_h=2500),
         PumpConfig("remifentanil", "remifentanil", 50.0, max_rate_ml_per_h=1250)],
        [SensorConfig("bis", "bis", "1", 1.0, filtered=bis_noise_filter(), low=0, high=100)],
        1199.0, disturbances=[OutputDisturbance("bis", (600, 900), (10, 0))],
        noise_rng=np.random.default_rng([2024, k]), encode_frames=False)
    start = time.perf_counter()
    frame = run_closed_loop(setup).to_pandas()
    wall = time.perf_counter() - start
    m = tiva_metrics(frame.time_s, frame.measured_bis_unitless,
                     frame.delivered_propofol_rate_mg_per_s,
                     frame.delivered_remifentanil_rate_ug_per_s, float(row.weight_kg))
    m["caseid"] = int(row.caseid)
    m["wall_s"] = wall
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=None, help="CSV of per-patient metrics")
    args = parser.parse_args()
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(run_patient, range(args.patients)))
    elapsed = time.perf_counter() - start
    frame = pd.DataFrame(rows)
    if args.out:
        frame.to_csv(args.out, index=False)
    published = pd.read_csv(REPO / "scenarios" / "data" / "tiva_published_results.csv",
                            comment="#")
    pairs = [("induction", "IAE", "induction_iae_bis_s"),
             ("induction", "Sleep_Time", "induction_sleep_time_min"),
             ("induction", "Settling", "induction_settling_time_min"),
             ("induction", "Low BIS", "induction_low_bis_time_s"),
             ("induction", "Lowest BIS", "induction_lowest_bis"),
             ("induction", "propofol", "induction_propofol_mg_per_kg"),
             ("induction", "remifentanil", "induction_remifentanil_ug_per_kg"),
             ("maintenance", "IAE", "maintenance_iae_bis_s"),
             ("maintenance", "Time out", "maintenance_time_out_of_range_s"),
             ("maintenance", "Lowest BIS", "maintenance_lowest_bis"),
             ("maintenance", "Highest BIS", "maintenance_highest_bis"),
             ("maintenance", "propofol", "maintenance_propofol_mg_per_kg"),
             ("maintenance", "remifentanil", "maintenance_remifentanil_ug_per_kg")]
    print(f"{'metric':45s} {'PID':>8s} {'MEKF-MPC':>9s} {'MHE-MPC':>8s} | {'mpc_dose':>9s} (sd)")
    for phase, key, column in pairs:
        rows_ = published[(published.phase == phase) & published.metric.str.startswith(key)]
        vals = {r.controller: r["mean"] for _, r in rows_.iterrows()}
        ours = frame[column]
        print(f"{phase[:5]} {rows_.metric.iloc[0][:39]:39s} {vals.get('PID', np.nan):8.4g} "
              f"{vals.get('MEKF-MPC', np.nan):9.4g} {vals.get('MHE-MPC', np.nan):8.4g} | "
              f"{ours.mean():9.4g} ({ours.std():.3g})")
    print(f"{args.patients} patients in {elapsed:.1f} s on {args.workers} workers "
          f"({frame.wall_s.mean():.2f} s per patient)")
    print(f"induction_iae={frame.induction_iae_bis_s.mean():.0f} "
          f"sleep_min={frame.induction_sleep_time_min.mean():.2f} "
          f"maintenance_out_s={frame.maintenance_time_out_of_range_s.mean():.1f} "
          f"induction_lowest={frame.induction_lowest_bis.mean():.1f}")


if __name__ == "__main__":
    main()
