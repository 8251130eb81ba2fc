"""The TIVA benchmark on the 32 training patients: `scenarios/tiva_nmpc_training.toml` (NMPC +
MHE, both drugs) through the whole 20-minute protocol with noise and disturbance, mean
metrics beside the published rows of Aubouin-Pairault, Fiacchini & Dang (2024).

    python benchmarks/tiva_training.py [--patients 32] [--workers 2] [--seeds 0 1 2 3]

Each seed is one noise and disturbance realisation of the 32 patients; the table and the
last line are means over all patient-runs (one seed: the benchmark's usual single run), and
each seed's own means are printed above the last line.

Tuning without editing the scenario: environment variables override its controller
settings (TIVA_FLOOR, TIVA_SOFT, TIVA_PRIOR_SCALE, TIVA_DU, TIVA_RATIO, TIVA_HORIZON,
TIVA_MOVE_BLOCK, TIVA_SOFT_EVERY, TIVA_MAX_CHANGE, TIVA_ESTIMATOR, TIVA_QD, TIVA_QETA,
TIVA_NOISE, TIVA_WINDOW, TIVA_ETA_BOUND, TIVA_PARAMS), e.g. TIVA_ESTIMATOR=ekf for the EKF.
"""

from __future__ import annotations

import argparse
import os
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

# one BLAS thread per worker: busy-waiting OpenBLAS threads starve the other workers
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mpc_dose.scenario import parse_scenario  # noqa: E402
from mpc_dose.trial.build import build_setup  # noqa: E402
from mpc_dose.trial.closed_loop import run_closed_loop  # noqa: E402
from mpc_dose.trial.metrics import tiva_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "scenarios" / "tiva_nmpc_training.toml"


def scenario():
    """The scenario with the environment's overrides applied."""
    data = tomllib.loads(SCENARIO.read_text(encoding="utf-8"))
    nmpc = data["controller"]["nmpc"]
    est = nmpc["estimator"]
    env = os.environ.get
    if env("TIVA_FLOOR"):
        nmpc["soft_low"] = float(env("TIVA_FLOOR"))
    if env("TIVA_SOFT"):
        nmpc["soft_weights"] = [float(env("TIVA_SOFT"))] * 2
    if env("TIVA_PRIOR_SCALE"):
        nmpc["prior_scale"] = float(env("TIVA_PRIOR_SCALE"))
    if env("TIVA_DU"):
        nmpc["change_weights"] = {k: float(env("TIVA_DU")) for k in nmpc["inputs"]}
    if env("TIVA_RATIO"):
        ratio = float(env("TIVA_RATIO"))
        if ratio > 0:
            nmpc["ratio"] = [nmpc["inputs"][0], nmpc["inputs"][1], ratio]
        else:
            nmpc.pop("ratio", None)
    if env("TIVA_MAX_CHANGE"):  # propofol mg/s per period (remifentanil follows the ratio)
        nmpc["max_change"] = {nmpc["inputs"][0]: float(env("TIVA_MAX_CHANGE"))}
    if env("TIVA_MOVE_BLOCK"):
        nmpc["move_block"] = int(env("TIVA_MOVE_BLOCK"))
    if env("TIVA_SOFT_EVERY"):
        nmpc["soft_every"] = int(env("TIVA_SOFT_EVERY"))
    if env("TIVA_HORIZON"):
        nmpc["horizon"] = int(env("TIVA_HORIZON"))
    if env("TIVA_PARAMS"):  # estimated parameters, comma-separated
        est["parameters"] = env("TIVA_PARAMS").split(",")
    for key, name, cast in (("kind", "TIVA_ESTIMATOR", str), ("q_d", "TIVA_QD", float),
                            ("q_eta", "TIVA_QETA", float), ("noise_sd", "TIVA_NOISE", float),
                            ("window", "TIVA_WINDOW", int),
                            ("eta_bound_sd", "TIVA_ETA_BOUND", float)):
        if env(name):
            est[key] = cast(env(name))
    return parse_scenario(data, source=SCENARIO.name, base_dir=str(SCENARIO.parent))


def run_patient(args: tuple[int, int]) -> dict:
    k, seed = args
    sc = scenario()
    setup, patient = build_setup(sc, k, seed, share_solvers=True)
    setup = replace(setup, encode_frames=False)  # the same messages, without the codec
    start = time.perf_counter()
    frame = run_closed_loop(setup).to_pandas()
    wall = time.perf_counter() - start
    m = tiva_metrics(frame.time_s, frame.measured_bis_unitless,
                     frame.delivered_propofol_rate_mg_per_s,
                     frame.delivered_remifentanil_rate_ug_per_s,
                     float(patient.covariates["weight"]))
    m["patient"] = k + 1
    m["seed"] = seed
    m["wall_s"] = wall
    return m


PAIRS = [("induction", "IAE", "induction_iae_bis_s"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", default=None, help="CSV of per-patient metrics")
    args = parser.parse_args()
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        rows = list(pool.map(run_patient, [(k, seed) for seed in args.seeds
                                           for k in range(args.patients)]))
    elapsed = time.perf_counter() - start
    frame = pd.DataFrame(rows)
    if args.out:
        frame.to_csv(args.out, index=False)
    published = pd.read_csv(REPO / "scenarios" / "data" / "tiva_published_results.csv",
                            comment="#")
    print(f"{'metric':45s} {'PID':>8s} {'MEKF-MPC':>9s} {'MHE-MPC':>8s} | {'mpc_dose':>9s} (sd)")
    for phase, key, column in PAIRS:
        rows_ = published[(published.phase == phase) & published.metric.str.startswith(key)]
        vals = {r.controller: r["mean"] for _, r in rows_.iterrows()}
        ours = frame[column]
        print(f"{phase[:5]} {rows_.metric.iloc[0][:39]:39s} {vals.get('PID', np.nan):8.4g} "
              f"{vals.get('MEKF-MPC', np.nan):9.4g} {vals.get('MHE-MPC', np.nan):8.4g} | "
              f"{ours.mean():9.4g} ({ours.std():.3g})")
    print(f"{args.patients} patients x {len(args.seeds)} seeds in {elapsed:.1f} s on "
          f"{args.workers} workers ({frame.wall_s.mean():.2f} s per patient-run)")

    def line(f) -> str:
        return (f"induction_iae={f.induction_iae_bis_s.mean():.0f} "
                f"sleep_min={f.induction_sleep_time_min.mean():.2f} "
                f"maintenance_out_s={f.maintenance_time_out_of_range_s.mean():.1f} "
                f"induction_lowest={f.induction_lowest_bis.mean():.2f}")

    if len(args.seeds) > 1:
        for seed in args.seeds:
            print(f"seed {seed}: {line(frame[frame.seed == seed])}")
    print(line(frame))


if __name__ == "__main__":
    main()
