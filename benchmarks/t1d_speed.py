"""Type 1 diabetes speed and body-clock figures (issue 18.8 and its circadian criterion).

Three measurements, printed:

1. **A patient-day, side by side with simglucose** (when it is installed: the ``bench``
   extra): simglucose's own simulation (its UVA/Padova patient ``adolescent#001``, CGM,
   pump and basal-bolus controller, one day) against ours - the same job (one patient-day
   of scenarios/t1d_basal_bolus.toml: patient, CGM, pump, basal-bolus controller,
   supervisor) and the plant alone (the UVA/Padova and Cambridge models with three meals
   and a basal, ``simulate``, 5-min output).
2. **Closed-loop NMPC**: patient-days of scenarios/t1d_nmpc.toml per minute on the
   workers given (target: 100 patient-days in at most 1 minute on 2 cores).
3. **The body clock in the controller**: the NMPC with its model's EGP rhythm and with the
   rhythm switched off (``controller.nmpc.parameters``), same patients and days; time in
   range and mean glucose over the night (00-06) and the early morning (06-10).
4. **Online estimation** (``--bank``): the NMPC with one fixed model (no estimator), with
   the scenario's bank of candidate models along the insulin absorption time
   (``estimator.varied``) and with a bank of whole draws from the population, same
   patients and days; time in range, below 70 and below 54 over the whole day; with
   ``--perfect`` also with the patient's own insulin absorption time alone in its model
   (``perfect_parameters``) and with all its parameters (``perfect_model``: the upper
   bound).

Usage, from the repository root::

    python benchmarks/t1d_speed.py                      # 1-3, 20 patients x 3 days
    python benchmarks/t1d_speed.py --patients 50 --days 7 --skip-speed
    python benchmarks/t1d_speed.py --skip-speed --skip-clock --bank --days 7
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mpc_dose.scenario import load_scenario  # noqa: E402
from mpc_dose.trial.build import build_setup  # noqa: E402
from mpc_dose.trial.closed_loop import run_closed_loop  # noqa: E402

NMPC = ROOT / "scenarios" / "t1d_nmpc.toml"
BASAL_BOLUS = ROOT / "scenarios" / "t1d_basal_bolus.toml"
DAY_S = 86400.0
NO_CLOCK = {"controller.nmpc.parameters": {"cambridge_egp0_amplitude_1": 0.0}}
#: the estimation arms of --bank: the scenario's own estimator is the bank along the insulin
#: absorption time; the others replace [controller.nmpc.estimator] whole
FIXED_MODEL = {"controller.nmpc.estimator": {"kind": "none"}}
WHOLE_DRAWS = {"controller.nmpc.estimator": {"kind": "bank", "warmup_s": DAY_S}}
OWN_TMAX_I = {**FIXED_MODEL, "controller.nmpc.perfect_parameters": ["cambridge_tmax_i"]}
PERFECT = {**FIXED_MODEL, "controller.nmpc.perfect_model": True}


def simglucose_day() -> float | None:
    """Wall time [s] of one simglucose patient-day, or None when it is not installed."""
    try:
        from datetime import datetime, timedelta

        from simglucose.actuator.pump import InsulinPump
        from simglucose.controller.basal_bolus_ctrller import BBController
        from simglucose.patient.t1dpatient import T1DPatient
        from simglucose.sensor.cgm import CGMSensor
        from simglucose.simulation.env import T1DSimEnv
        from simglucose.simulation.scenario_gen import RandomScenario
        from simglucose.simulation.sim_engine import SimObj, sim
    except ImportError:
        return None
    import tempfile

    start = datetime(2026, 1, 1, 6, 0, 0)
    env = T1DSimEnv(T1DPatient.withName("adolescent#001"),
                    CGMSensor.withName("Dexcom", seed=1), InsulinPump.withName("Insulet"),
                    RandomScenario(start_time=start, seed=1))
    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        sim(SimObj(env, BBController(), timedelta(days=1), animate=False, path=folder))
        return time.perf_counter() - began


def our_day() -> float:
    """Wall time [s] of one patient-day of the basal-bolus scenario (loop included)."""
    setup, _ = build_setup(load_scenario(BASAL_BOLUS, {"scenario.duration_s": DAY_S}), 0, 0)
    began = time.perf_counter()
    run_closed_loop(setup)
    return time.perf_counter() - began


def plant_day(model_name: str) -> float:
    """Wall time [s] of the plant alone: one day of *model_name*'s nominal 70-kg patient
    with three meals and its basal, reported every 5 min (the model built beforehand)."""
    from mpc_dose.model.dosing import Dose
    from mpc_dose.model.library import load
    from mpc_dose.model.simulation import simulate
    from mpc_dose.model.therapy import at_clock

    lm = load(model_name)
    params = lm.population.typical_parameters({"weight": 70.0})
    entry = next(e for e in lm.entries if e.basal_insulin is not None)
    basal = entry.basal_insulin(at_clock(lm.entries, params, None), 6.0)
    doses = [Dose.infusion(0.0, "insulin", basal / 3600.0, DAY_S)]
    doses += [Dose.bolus(h * 3600.0, "carbohydrate", g) for h, g in ((1.5, 50), (6.5, 70),
                                                                       (13.0, 80))]
    times = np.arange(0.0, DAY_S + 1.0, 300.0)
    simulate(lm.model, params, doses, times)     # builds and caches the integrator
    began = time.perf_counter()
    simulate(lm.model, params, doses, times)
    return time.perf_counter() - began


def _run(args) -> tuple[int, np.ndarray, np.ndarray, float]:
    index, days, overrides = args
    scenario = load_scenario(NMPC, {"scenario.duration_s": days * DAY_S, **overrides})
    # as `mpc-dose trial` does: one built problem per worker serves its patients in turn
    setup, _ = build_setup(scenario, index, 0, share_solvers=True)
    began = time.perf_counter()
    frame = run_closed_loop(setup).to_pandas()
    elapsed = time.perf_counter() - began
    clock = (scenario.scenario.start_clock_h + frame.time_s.to_numpy() / 3600.0) % 24.0
    return index, clock, frame.true_glucose_mmol_per_L.to_numpy() * 18.016, elapsed


def cohort(patients: int, days: float, overrides: dict, workers: int) -> tuple[list, float]:
    began = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        rows = list(pool.map(_run, [(i, days, overrides) for i in range(patients)]))
    return rows, time.perf_counter() - began


def _paired(on: list, off: list, low_h: float, high_h: float) -> str:
    """Patient by patient (the same patients in both arms), clock off minus clock on over
    the clock hours [low_h, high_h): the mean difference of mean glucose [mg/dL] with its
    standard error, and how many patients were higher without the clock."""
    def means(rows):
        return {i: float(np.mean(g[(c >= low_h) & (c < high_h)])) for i, c, g, _ in rows}

    first, second = means(on), means(off)
    diff = np.array([second[i] - first[i] for i in sorted(first)])
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    return (f"{diff.mean():+.1f} +- {se:.1f} mg/dL (paired), higher in "
            f"{int((diff > 0).sum())} of {len(diff)} patients")


def _window(rows, low_h: float, high_h: float) -> tuple[float, float, float]:
    """Time in range 70-180 [%], below 70 [%] and mean glucose [mg/dL] over the clock
    hours [low_h, high_h), all patients pooled."""
    glucose = np.concatenate([g[(c >= low_h) & (c < high_h)] for _, c, g, _ in rows])
    return (float(np.mean((glucose >= 70) & (glucose <= 180)) * 100),
            float(np.mean(glucose < 70) * 100), float(np.mean(glucose)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--days", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--speed-patients", type=int, default=100,
                        help="patient-days of the NMPC speed run (one day each)")
    parser.add_argument("--skip-clock", action="store_true")
    parser.add_argument("--bank", action="store_true",
                        help="also the NMPC without and with the bank of candidate models")
    parser.add_argument("--perfect", action="store_true",
                        help="with --bank: also the NMPC that knows each patient's values")
    args = parser.parse_args()
    if not args.skip_speed:
        theirs = simglucose_day()
        print(f"simglucose patient-day (its sim, BB controller): "
              f"{'not installed' if theirs is None else f'{theirs:.2f} s'}")
        print(f"mpc_dose patient-day (t1d_basal_bolus loop):    {our_day():.2f} s")
        for name in ("glucose-uva-padova", "glucose-cambridge"):
            print(f"mpc_dose plant alone, {name}: {plant_day(name) * 1000:.1f} ms")
        rows, wall = cohort(args.speed_patients, 1.0, {}, args.workers)
        per_minute = len(rows) / wall * 60.0
        print(f"NMPC closed loop: {len(rows)} patient-days in {wall:.1f} s on "
              f"{args.workers} workers = {per_minute:.1f} patient-days/min "
              f"(100 patient-days: {100 / per_minute:.1f} min; target <= 1 min)")
    if not args.skip_clock:
        figures, arms = {}, {}
        windows = ((0, 6), (6, 10), (0, 24))
        for label, overrides in (("with the clock", {}), ("clock off", NO_CLOCK)):
            rows, wall = cohort(args.patients, args.days, overrides, args.workers)
            arms[label] = rows
            figures[label] = [_window(rows, *w) for w in windows]
            print(f"NMPC {label}: {args.patients} patients x {args.days:g} days, "
                  f"{wall:.0f} s")
        print("window          controller        TIR 70-180 %   <70 %   mean mg/dL")
        for k, window in enumerate(("00-06 night", "06-10 morning", "whole day")):
            for label, values in figures.items():
                tir, low, mean = values[k]
                print(f"{window:15s} {label:17s} {tir:12.1f} {low:7.2f} {mean:11.1f}")
            print(f"{window:15s} clock off - on: "
                  f"{_paired(arms['with the clock'], arms['clock off'], *windows[k])}")
    if args.bank:
        print("estimation        TIR 70-180 %   <70 %   <54 %   mean mg/dL")
        arms = [("one fixed model", FIXED_MODEL), ("bank along tmax_i", {}),
                ("bank, whole draws", WHOLE_DRAWS)]
        if args.perfect:
            arms += [("the own tmax_i", OWN_TMAX_I), ("the patient's own", PERFECT)]
        for label, overrides in arms:
            rows, wall = cohort(args.patients, args.days, overrides, args.workers)
            glucose = np.concatenate([g for _, _, g, _ in rows])
            print(f"{label:17s} {np.mean((glucose >= 70) & (glucose <= 180)) * 100:12.1f} "
                  f"{np.mean(glucose < 70) * 100:7.2f} {np.mean(glucose < 54) * 100:7.2f} "
                  f"{glucose.mean():11.1f}   ({args.patients} patients x {args.days:g} days, "
                  f"{wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
