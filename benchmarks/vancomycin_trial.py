"""The vancomycin trial (issue 17.4/17.5): standard practice, Bayesian MIPD and NMPC on the
same cohort; prints each arm's wall time and its clinical figures.

Each arm runs ``scenarios/vancomycin_trial_<arm>.toml`` through the trial runner (a process
pool of 2 workers, as ``mpc-dose trial`` does) into ``out/vanco_trial/<arm>`` (a run that
was interrupted resumes). Target (issue 17.5): each arm's 1000-patient, 7-day trial in at
most 5 minutes on a 2-core machine. Clinical figures, over the patients: AUC24 in 400-600
mg.h/L on day 1, day 2 and days 3-7; patient-days above 600 and above 800 mg.h/L; days
whose lowest concentration is above 20 mg/L; days to the first AUC24 in target; total dose.

Usage, from the repository root::

    python benchmarks/vancomycin_trial.py                  # 1000 patients, three arms
    python benchmarks/vancomycin_trial.py --patients 100 --arms nmpc
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mpc_dose.trial.runner import run_trial  # noqa: E402

ARMS = ("soc", "mipd", "nmpc")
TARGET_S = 300.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--out", default=str(ROOT / "out" / "vanco_trial"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rows = {}
    for arm in args.arms:
        scenario = ROOT / "scenarios" / f"vancomycin_trial_{arm}.toml"
        start = time.perf_counter()
        with ProcessPoolExecutor(args.workers) as pool:
            result = run_trial(scenario, Path(args.out) / arm,
                               patients=range(args.patients), seed=0, executor=pool)
        elapsed = time.perf_counter() - start
        metrics = result.metrics
        rows[arm] = (elapsed, metrics)
        print(f"{arm}: {args.patients} patients x 7 days in {elapsed:.0f} s "
              f"({'within' if elapsed <= TARGET_S else 'over'} the {TARGET_S:.0f}-s target)",
              flush=True)
    print()
    print(clinical_table({arm: m for arm, (_, m) in rows.items()}))
    return 0


#: (column of the per-patient metrics, how it is summed up, label)
FIGURES = [
    ("auc24_in_target_day1_pct", "mean", "AUC24 400-600 on day 1 [% of patients]"),
    ("auc24_in_target_day2_pct", "mean", "AUC24 400-600 on day 2 [% of patients]"),
    ("auc24_in_target_days3to7_pct", "mean", "AUC24 400-600 on days 3-7 [% of patient-days]"),
    ("auc24_above_600_days", "per_day", "patient-days with AUC24 > 600 [%]"),
    ("auc24_above_800_days", "per_day", "patient-days with AUC24 > 800 [%]"),
    ("days_minimum_above_20_mg_per_L", "per_day", "days with a trough > 20 mg/L [%]"),
    ("auc24_in_target_first_day", "median", "days to the first AUC24 in target [median]"),
    ("vancomycin_total_mg", "median", "total dose over 7 days [mg, median]"),
]


def clinical_table(metrics_by_arm) -> str:
    """The README's table: one row per figure, one column per arm."""
    lines = ["| | " + " | ".join(metrics_by_arm) + " |",
             "|---|" + "---:|" * len(metrics_by_arm)]
    for column, how, label in FIGURES:
        cells = []
        for frame in metrics_by_arm.values():
            if column not in frame:
                cells.append("-")
                continue
            values = frame[column]
            if how == "mean":
                cells.append(f"{values.mean():.1f}")
            elif how == "per_day":
                days = frame["auc24_days"].sum() if "auc24_days" in frame else 7 * len(frame)
                cells.append(f"{100.0 * values.sum() / days:.1f}")
            else:
                cells.append(f"{values.median():.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
