"""Open-loop simulation speed: 24 h at 1 s output resolution of a 4-state linear model.

The issue target is "well under a second". Prints the median of repeated runs and, for
comparison, the same simulation of a nonlinear model (Michaelis-Menten, CVODES) at 10 s.

    python benchmarks/simulate_speed.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from mpc_dose.model import Model, mammillary
from mpc_dose.model.dosing import Dose
from mpc_dose.model.library import load
from mpc_dose.model.simulation import simulate


def _median_s(fn, repeats: int = 7) -> float:
    fn()  # first call compiles and caches
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    lm = load("propofol-schnider")
    params = lm.population.typical_parameters({"age": 35, "height": 170, "weight": 70,
                                               "sex": "male"})
    doses = [Dose.infusion(0, "propofol", 2.0, 30), Dose.infusion(30, "propofol", 0.15, 86370)]
    times = np.arange(0, 86401.0)
    linear_s = _median_s(lambda: simulate(lm.model, params, doses, times))

    mm = Model("mm", [mammillary("d", 1, elimination="michaelis_menten", time_unit="h")])
    coarse = np.arange(0, 86401.0, 10.0)
    nonlinear_s = _median_s(lambda: simulate(mm, {"d_v1": 50, "d_vmax": 100, "d_km": 5},
                                             [Dose.infusion(0, "d", 50 / 3600, 86400)],
                                             coarse), repeats=3)
    print(f"linear 4-state (Schnider + effect site), 24 h at 1 s ({times.size} rows): "
          f"{linear_s * 1e3:.1f} ms")
    print(f"nonlinear 1-state (Michaelis-Menten, CVODES), 24 h at 10 s ({coarse.size} rows): "
          f"{nonlinear_s * 1e3:.1f} ms")
    print(f"linear_24h_1s_ms={linear_s * 1e3:.1f} nonlinear_24h_10s_ms={nonlinear_s * 1e3:.1f}")


if __name__ == "__main__":
    main()
