"""Plant-only throughput in patient-hours per second (the issue's figure).

The 4-state propofol model (Schnider PK + effect site, BIS by the propofol Hill curve) for
a cohort drawn from the Schnider population statistics, infusion rates changing every 5 s,
run by the batched plant (exact zero-order hold, vectorised sensor chain) on every core.
Two sensor set-ups are measured:

* ``bis_1hz``: BIS every second with the DESIGN noise model (white sd 3 through the
  second-order filter, clipped to [0, 100]) - the TIVA benchmark's sensor;
* ``cp_60s``: plasma propofol every 60 s with 10 % proportional noise - a point-of-care
  or breath-analyser cadence.

It also times the simpy plant (one patient, events one by one) for comparison.

    python benchmarks/plant_throughput.py [--patients 2000] [--hours 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor

# one BLAS thread per worker process: OpenBLAS threads that busy-wait in every worker starve
# the other workers (measured: 5x slower with two workers)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from mpc_dose.model.library import load  # noqa: E402
from mpc_dose.plant.batch import BatchPlant  # noqa: E402
from mpc_dose.plant.sensor import SensorConfig, bis_noise_filter  # noqa: E402

MODEL = "propofol-schnider+bis-propofol"


def _cohort(n: int, seed: int) -> list[dict]:
    lm = load(MODEL)
    rng = np.random.default_rng(seed)
    return [lm.population.sample({"age": rng.uniform(18, 80), "height": rng.uniform(150, 190),
                                  "weight": rng.uniform(45, 110),
                                  "sex": "male" if rng.random() < 0.5 else "female"},
                                 rng).params for _ in range(n)]


def _work(args: tuple[int, int, float, str]) -> float:
    """Run one chunk of patients; returns its wall time [s] (setup excluded)."""
    n, seed, hours, kind = args
    lm = load(MODEL)
    params = _cohort(n, seed)
    if kind == "bis_1hz":
        step, sensor = 1.0, SensorConfig("bis", "bis", "1", 1.0, filtered=bis_noise_filter(),
                                         low=0, high=100)
    else:
        step, sensor = 60.0, SensorConfig("propofol_cp", "cp", "ug/mL", 60.0,
                                          proportional_cv=0.1)
    plant = BatchPlant(lm.model, params, step)
    steps = int(hours * 3600 / step)
    rng = np.random.default_rng(seed + 1)
    per_block = max(1, int(5 / step))
    rates = np.repeat(rng.uniform(0, 0.3, (-(-steps // per_block), n, 1)), per_block,
                      axis=0)[:steps]
    start = time.perf_counter()
    plant.run(rates, sensor, [np.random.default_rng([seed, k]) for k in range(n)])
    return time.perf_counter() - start


def batched(patients: int, hours: float, workers: int, kind: str) -> float:
    chunk = -(-patients // workers)
    jobs = [(min(chunk, patients - k * chunk), 100 + k, hours, kind) for k in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_work, [(2, j[1], 0.5, kind) for j in jobs]))  # warm the workers
        start = time.perf_counter()
        list(pool.map(_work, jobs))
        wall = time.perf_counter() - start
    return patients * hours / wall


def simpy_plant(hours: float) -> float:
    """One patient through the simpy plant with a fixed 5 s regimen and a 1 Hz BIS sensor."""
    from mpc_dose.control.baselines import FixedRegimen
    from mpc_dose.model.dosing import Dose
    from mpc_dose.plant.pump import PumpConfig
    from mpc_dose.trial.closed_loop import LoopSetup, run_closed_loop

    lm = load(MODEL)
    params = _cohort(1, 7)[0]
    duration = hours * 3600
    doses = [Dose.infusion(t, "propofol", 0.1 + 0.05 * np.sin(t / 300), 5)
             for t in np.arange(0, duration, 5.0)]
    setup = LoopSetup(lm.model, params, FixedRegimen(doses, ["propofol"], period_s=5.0),
                      [PumpConfig("p", "propofol", 10.0)],
                      [SensorConfig("bis", "bis", "1", 1.0, filtered=bis_noise_filter(),
                                    low=0, high=100)], duration, record_step_s=5.0,
                      encode_frames=False)
    start = time.perf_counter()
    run_closed_loop(setup)
    return hours / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    bis = batched(args.patients, args.hours, args.workers, "bis_1hz")
    cp = batched(args.patients, args.hours * 10, args.workers, "cp_60s")
    one = simpy_plant(0.5)
    print(f"batched plant, {args.patients} patients x {args.hours:g} h, {args.workers} "
          f"workers: BIS 1 Hz {bis:,.0f} patient-h/s; plasma 60 s {cp:,.0f} patient-h/s")
    print(f"simpy plant, one patient, BIS 1 Hz, 5 s regimen: {one:,.1f} patient-h/s")
    print(f"bis_1hz_patient_hours_per_s={bis:.0f} cp_60s_patient_hours_per_s={cp:.0f} "
          f"simpy_patient_hours_per_s={one:.1f}")


if __name__ == "__main__":
    main()
