"""Refit times of the Bayesian estimator (issue 15): vancomycin-goti, CrCL 90 mL/min, 75 kg.

    python benchmarks/estimation_speed.py [--repeats 20]

Cases, one line each (median and 90th percentile of the refit wall time, IPOPT iterations):

* ``sparse``: 1 g over 1 h every 12 h for 4 days, a trough 10 min before each dose (8
  levels), the whole record refitted (the MIPD case of the issue: target < 50 ms);
* ``closed_loop``: the same record told as it happens, each level returned 2 h late and a
  refit then (8 refits);
* ``rates_600s``: a rate change every 600 s for 4 days (576 segments, what an NMPC that moves
  every cycle delivers) with a level every 12 h; full information, then a window of 4.

Timings include building the problem for a new capacity when the record outgrows it (the
first refits of a run); the ``sparse`` case reuses one built problem.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpc_dose.control.estimation import BayesianEstimator, EstimationConfig  # noqa: E402
from mpc_dose.model.dosing import Dose  # noqa: E402
from mpc_dose.model.library import load  # noqa: E402
from mpc_dose.model.simulation import simulate  # noqa: E402

H = 3600.0
PATIENT = {"crcl": 90, "weight": 75, "dialysis": "no"}


def _line(name: str, times: list[float], iterations: list[int]) -> str:
    ms = np.array(times) * 1e3
    return (f"{name}: refits={ms.size} median_ms={np.median(ms):.1f} "
            f"p90_ms={np.percentile(ms, 90):.1f} max_ms={ms.max():.1f} "
            f"iterations_median={int(np.median(iterations))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    lm = load("vancomycin-goti")
    rng = np.random.default_rng(15)
    ind = lm.population.sample(PATIENT, rng)
    doses = [Dose.from_record(k * 12 * H, "vancomycin", amount=1000, duration_s=H)
             for k in range(8)]
    troughs = np.arange(1, 9) * 12 * H - 600
    c = simulate(lm.model, ind.params, doses, np.r_[0.0, troughs]).output("vancomycin_cp")[1:]
    levels = np.maximum(c + rng.normal(size=c.size) * (3.4 + 0.227 * c), 0.0)
    config = EstimationConfig("vancomycin_cp")

    times, its = [], []
    for _ in range(args.repeats + 1):
        est = BayesianEstimator(lm, PATIENT, config)
        for d in doses:
            est.add_dose(d)
        for t, y in zip(troughs, levels):
            est.add_reading(t, y)
        start = time.perf_counter()
        result = est.update(96 * H)
        times.append(time.perf_counter() - start)
        its.append(result.iterations)
    print(_line("sparse", times[1:], its[1:]))   # the first run builds the problem

    times, its = [], []
    for _ in range(args.repeats):
        est = BayesianEstimator(lm, PATIENT, config)
        for k, (t, y) in enumerate(zip(troughs, levels)):
            est.delivered(k * 12 * H, {"vancomycin": 1000 / H})
            est.delivered(k * 12 * H + H, {"vancomycin": 0.0})
            est.add_reading(t, y)
            start = time.perf_counter()
            result = est.update(t + 2 * H)
            times.append(time.perf_counter() - start)
            its.append(result.iterations)
    print(_line("closed_loop", times, its))

    for window in (None, 4):
        times, its = [], []
        est = BayesianEstimator(lm, PATIENT, EstimationConfig("vancomycin_cp", window=window))
        for k in range(576):
            t = k * 600.0
            est.delivered(t, {"vancomycin": float(rng.uniform(0.01, 0.035))})
            if k % 72 == 71:
                est.add_reading(t - 600, float(20 + 2 * rng.normal()))
                start = time.perf_counter()
                result = est.update(t)
                times.append(time.perf_counter() - start)
                its.append(result.iterations)
        print(_line(f"rates_600s window={window}", times, its))


if __name__ == "__main__":
    main()
