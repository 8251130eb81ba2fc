"""NMPC with exposure objectives on vancomycin: plan times over closed loops, and what
rounding doses to a step costs.

Vancomycin, Goti 2018 (2 compartments; Ther Drug Monit 40:212) for 20 virtual patients
(seeded draws of the population's random effects; CrCL 80 mL/min, 75 kg, no dialysis), each
planned with its own true parameters and state (state feedback: this isolates the planner).
96-h horizon, 1-h period, doses every 12 h as 1-h infusions, maintenance cap 2000 mg, loading
dose up to 3000 mg, 4-day closed loop. Two settings: ``soft``: AUC24 target 500 mg.h/L with a
soft window 400-600 mg.h/L (Rybak 2020 consensus); ``hard``: target 540 mg.h/L inside a hard
window 450-550 mg.h/L (a limit close to the optimum). Three ways with the 250-mg step:

* ``relaxed``: the optimiser's amount as is (not a dose a ward can give; the reference),
* ``nearest``: the relaxed first dose rounded to the nearest step, applied without re-solving,
* ``resolve``: the NMPC's ``dose_step``: the first dose fixed to the step below and to the
  step above, the rest re-solved, the better objective kept.

    python benchmarks/nmpc_exposure.py [--patients 20]

Printed per setting and way: plan time (median, worst; dose cycles apart), loops stopped by
an infeasible plan (the hard window can no longer be met), the daily AUC24 of the true
patient (share in the window, mean |AUC - target|) and, for ``resolve``, how often it chose
the farther neighbour. Last line: ``median_ms=... worst_ms=... dose_median_ms=...`` of
``resolve`` in ``soft``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from mpc_dose.control.nmpc import NMPCConfig, NonlinearMPC  # noqa: E402
from mpc_dose.model.library import load  # noqa: E402
from mpc_dose.model.propagate import Propagator  # noqa: E402

H = 3600.0
STEP = 250.0
COVARIATES = {"crcl": 80, "weight": 75, "dialysis": "no"}


SETTINGS = {"soft": (500.0, (400.0, 600.0), dict(auc_soft_window=(400.0, 600.0))),
            "hard": (540.0, (450.0, 550.0), dict(auc_hard_window=(450.0, 550.0)))}


def config(rounded: bool, setting: str = "soft") -> NMPCConfig:
    target, _, window = SETTINGS[setting]
    return NMPCConfig(output="vancomycin_cp", inputs=("vancomycin",), period_s=H, horizon=96,
                      output_weight=0.0, disturbance=False,
                      rate_bounds={"vancomycin": (0.0, 3000.0 / H)},
                      change_weights={"vancomycin": 0.01}, dose_interval_s=12 * H,
                      auc_window_s=24 * H, auc_target=target, **window,
                      max_dose={"vancomycin": 2000.0}, loading_dose_max={"vancomycin": 3000.0},
                      dose_step={"vancomycin": STEP} if rounded else {})


def hourly_auc(model, prop, p, x, t, rate) -> float:
    """AUC [mg.h/L] of the true concentration over one hour (trapezoid on 1-min states)."""
    grid = t + np.arange(0.0, H + 1.0, 60.0)
    states = np.vstack([x, prop.trajectory(x, t, grid[1:], [rate])])
    conc = states[:, 0] / p[model.param_index("vancomycin_v1")]
    return float(np.trapezoid(conc, grid / H))


def closed_loop(model, mpc, p, way: str) -> tuple[list[float], list[float], list[float], int]:
    plant = Propagator(model, p)
    x, u, accrued, doses = model.initial_state(p), 0.0, 0.0, 0
    times, dose_times, aucs, farther = [], [], [], 0
    for k in range(96):
        t = k * H
        if k and k % 24 == 0:
            aucs.append(accrued)
            accrued = 0.0
        plan = mpc.plan(t, x, p, {"vancomycin": u}, auc_accrued=accrued,
                        doses_given={"vancomycin": doses})
        if not plan.success:
            raise RuntimeError(f"plan failed at {t} s: {plan.reason}")
        (dose_times if k % 12 == 0 else times).append(plan.solve_time_s)
        u = plan.rates["vancomycin"]
        if way == "nearest" and k % 12 == 0:
            u = STEP * round(u * H / STEP) / H
        if plan.rounding is not None:
            r = plan.rounding
            nearest = STEP * round(r.relaxed["vancomycin"] / STEP)
            farther += r.chosen["vancomycin"] != nearest
        doses += k % 12 == 0 and u > 0
        accrued += hourly_auc(model, plant, p, x, t, u)
        x = plant.advance(x, t, t + H, [u])
    aucs.append(accrued)
    return times, dose_times, aucs, farther


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=20)
    args = parser.parse_args()
    lm = load("vancomycin-goti")
    model = lm.model
    rng = np.random.default_rng(2020)
    patients = [model.parameter_vector(lm.population.sample(COVARIATES, rng).params)
                for _ in range(args.patients)]
    summary = {}
    for setting, (target, (low, high), _) in SETTINGS.items():
        problems = {rounded: NonlinearMPC(model, config(rounded, setting))
                    for rounded in (False, True)}
        for way in ("relaxed", "nearest", "resolve"):
            mpc = problems[way == "resolve"]
            times, dose_times, aucs, farther, stopped = [], [], [], 0, 0
            for p in patients:
                mpc.reset()
                try:
                    t, d, a, f = closed_loop(model, mpc, p, way)
                except RuntimeError:
                    stopped += 1
                    continue
                times += t
                dose_times += d
                aucs += a
                farther += f
            aucs_arr = np.array(aucs)
            all_times = np.array(times + dose_times) * 1e3
            summary[setting, way] = (np.median(all_times), all_times.max(),
                                     np.median(dose_times) * 1e3)
            median, worst, dose_median = summary[setting, way]
            print(f"{setting} {way:8s} plan time median {median:.2f} ms, worst {worst:.1f} ms "
                  f"(dose cycles: median {dose_median:.2f} ms, worst "
                  f"{max(dose_times) * 1e3:.1f} ms); loops stopped by an infeasible plan "
                  f"{stopped} of {len(patients)}; daily AUC24 in {low:g}-{high:g}: "
                  f"{np.mean((aucs_arr >= low) & (aucs_arr <= high)) * 100:.1f} %, mean "
                  f"|AUC - {target:g}| {np.mean(np.abs(aucs_arr - target)):.1f} mg.h/L"
                  + (f"; farther neighbour chosen {farther} of {len(dose_times)} doses"
                     if way == "resolve" else ""))
    median, worst, dose_median = summary["soft", "resolve"]
    print(f"median_ms={median:.2f} worst_ms={worst:.1f} dose_median_ms={dose_median:.2f}")


if __name__ == "__main__":
    main()
