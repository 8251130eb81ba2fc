"""Trial speed: the TIVA benchmark (20 min, 5 s NMPC + EKF, 1 s plant and BIS) over N
population patients on a process pool, as `mpc-dose trial` runs it.

    python benchmarks/trial_speed.py [--patients 100] [--workers 2]

Target (issue "In-silico trials at scale"): 1000 patients in <= 300 s on 2 cores. Last line:
``patients=… workers=… wall_s=… per_patient_s=… projected_1000_s=…``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from mpc_dose.trial.runner import run_trial  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--scenario", default=str(REPO / "scenarios" / "tiva_benchmark.toml"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out, ProcessPoolExecutor(args.workers) as pool:
        start = time.perf_counter()
        result = run_trial(args.scenario, out, patients=range(args.patients), seed=0,
                           executor=pool)
        wall = time.perf_counter() - start
    m = result.metrics
    if "induction_iae_bis_s" in m:
        print(f"induction_iae={m.induction_iae_bis_s.mean():.0f} "
              f"induction_lowest={m.induction_lowest_bis.mean():.2f} "
              f"maintenance_out_s={m.maintenance_time_out_of_range_s.mean():.1f}")
    per = wall / args.patients
    print(f"patients={args.patients} workers={args.workers} wall_s={wall:.1f} "
          f"per_patient_s={per:.3f} projected_1000_s={per * 1000:.0f}")


if __name__ == "__main__":
    main()
