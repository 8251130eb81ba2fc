"""MHE speed on captured TIVA windows: the per-update time of ``OutputMapMHE.update()``.

The readings an NMPC + MHE closed loop fed its estimator (``scenarios/tiva_nmpc_training.toml``:
3 output-map etas, a random-walk disturbance, 45 readings at 1 Hz, etas within 3.5 prior SDs;
an update every 5 s) were captured once, for training patients 0, 7, 19 and 30 (0-based; 19
is the remifentanil-sensitive one) with noise seed 0 and the joint SQP the MHE had before
its disturbance path was eliminated, into ``tests/data/mhe_tiva_streams.npz`` (956 updates
with a full solve). This replays them through the current ``OutputMapMHE`` (every ``add``
and ``update`` in the captured order) and times each update: the arrival EKF, the assembly
of the window and the solve, as the controller sees it.

    python benchmarks/mhe_speed.py [--repeat 3] [--patients 0 1 2 3]
    python benchmarks/mhe_speed.py --capture FILE --patients 0 7 19 30   # record streams

Timing is wall time (``perf_counter``) and process CPU time (``process_time``), the best of
*repeat* replays per update (other load on the machine only adds). Last line:
``median_ms=... p95_ms=...`` (wall, best of the repeats).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from mpc_dose.control.mhe import MHEConfig, OutputMapMHE  # noqa: E402
from mpc_dose.model.library import load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STREAMS = REPO / "tests" / "data" / "mhe_tiva_streams.npz"
SCENARIO = REPO / "scenarios" / "tiva_nmpc_training.toml"
MODEL = "propofol-eleveld+remifentanil-eleveld+bis-bouillon"


def capture(path: Path, patients: list[int], seed: int = 0) -> None:
    """Run the training scenario's closed loop for *patients* and store what their MHEs
    were given: per patient the prior parameter vector, every reading (t, x, u, y) in the
    order added, and the number of readings added before each update."""
    from dataclasses import replace

    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.build import build_setup
    from mpc_dose.trial.closed_loop import run_closed_loop

    sc = load_scenario(str(SCENARIO))
    log: list = []
    add, update = OutputMapMHE.add, OutputMapMHE.update

    def logged_add(self, t_s, x, u, y):
        log[-1]["readings"].append((t_s, np.asarray(x, float).copy(),
                                    np.asarray(u, float).copy(), float(y)))
        return add(self, t_s, x, u, y)

    def logged_update(self):
        entry = log[-1]
        entry["marks"].append(len(entry["readings"]))
        r = update(self)
        entry["results"].append(np.concatenate([r.eta, [r.disturbance, float(r.success)]]))
        return r

    OutputMapMHE.add, OutputMapMHE.update = logged_add, logged_update
    try:
        for k in patients:
            log.append({"readings": [], "marks": [], "results": []})
            setup, _ = build_setup(sc, k, seed, share_solvers=True)
            setup = replace(setup, encode_frames=False)
            mhe = setup.controller.mhe  # the MPCController's estimator
            config = mhe.config
            log[-1]["theta"] = mhe.theta_prior.copy()
            run_closed_loop(setup)
    finally:
        OutputMapMHE.add, OutputMapMHE.update = add, update
    arrays = {"patients": np.array(patients), "seed": np.array(seed),
              "parameters": np.array(config.parameters), "omega": np.asarray(config.omega),
              "settings": np.array([config.noise_sd, config.window, config.disturbance_sd,
                                    config.q_eta, config.q_d, config.eta_bound_sd,
                                    config.min_samples])}
    for j, entry in enumerate(log):
        t, x, u, y = zip(*entry["readings"])
        arrays[f"p{j}_theta"] = entry["theta"]
        arrays[f"p{j}_t"] = np.array(t)
        arrays[f"p{j}_x"] = np.array(x)
        arrays[f"p{j}_u"] = np.array(u)
        arrays[f"p{j}_y"] = np.array(y)
        arrays[f"p{j}_marks"] = np.array(entry["marks"])
        arrays[f"p{j}_results"] = np.array(entry["results"])
    np.savez_compressed(path, **arrays)


def streams(path: Path = STREAMS):
    """(model, config, [per patient: theta, readings, marks, captured results])."""
    data = np.load(path)
    s = data["settings"]
    config = MHEConfig(output="bis", parameters=tuple(str(p) for p in data["parameters"]),
                       omega=tuple(map(tuple, data["omega"])), noise_sd=float(s[0]),
                       window=int(s[1]), disturbance_sd=float(s[2]), q_eta=float(s[3]),
                       q_d=float(s[4]), eta_bound_sd=float(s[5]), min_samples=int(s[6]))
    out = []
    for j in range(len(data["patients"])):
        readings = list(zip(data[f"p{j}_t"], data[f"p{j}_x"], data[f"p{j}_u"],
                            data[f"p{j}_y"]))
        out.append((data[f"p{j}_theta"], readings, data[f"p{j}_marks"],
                    data[f"p{j}_results"]))
    return load(MODEL).model, config, out


def replay(model, config, theta, readings, marks):
    """Feed one patient's stream to a new MHE; (wall s, cpu s, results) per update."""
    mhe = OutputMapMHE(model, theta, config)
    wall, cpu, results = [], [], []
    start = 0
    for mark in marks:
        for reading in readings[start:mark]:
            mhe.add(*reading)
        start = mark
        c0, w0 = time.process_time(), time.perf_counter()
        r = mhe.update()
        w1, c1 = time.perf_counter(), time.process_time()
        wall.append(w1 - w0)
        cpu.append(c1 - c0)
        results.append(r)
    return np.array(wall), np.array(cpu), results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capture", type=Path, default=None)
    parser.add_argument("--patients", type=int, nargs="+", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--streams", type=Path, default=STREAMS)
    args = parser.parse_args()
    if args.capture is not None:
        capture(args.capture, args.patients if args.patients is not None else [0, 1, 2, 3])
        return
    model, config, data = streams(args.streams)
    chosen = range(len(data)) if args.patients is None else args.patients
    start = time.perf_counter()
    build = OutputMapMHE(model, data[0][0], config)  # the first build may compile
    build_s = time.perf_counter() - start
    del build
    best_wall, best_cpu, fails, solved = None, None, 0, 0
    for _ in range(args.repeat):
        walls, cpus = [], []
        fails = solved = 0
        for j in chosen:
            theta, readings, marks, _ = data[j]
            wall, cpu, results = replay(model, config, theta, readings, marks)
            active = np.array([r.samples >= config.min_samples for r in results])
            walls.append(wall[active])
            cpus.append(cpu[active])
            fails += sum(not r.success for r, a in zip(results, active) if a)
            solved += int(active.sum())
        walls, cpus = np.concatenate(walls), np.concatenate(cpus)
        best_wall = walls if best_wall is None else np.minimum(best_wall, walls)
        best_cpu = cpus if best_cpu is None else np.minimum(best_cpu, cpus)
    print(f"{solved} updates of {len(chosen)} patients (window {config.window}, "
          f"{len(config.parameters)} etas), best of {args.repeat}; first build "
          f"{build_s * 1e3:.0f} ms; failed updates {fails}")
    for name, times in (("cpu ", best_cpu), ("wall", best_wall)):
        print(f"{name}: median {np.median(times) * 1e3:.3f} ms, p95 "
              f"{np.percentile(times, 95) * 1e3:.3f} ms, mean {times.mean() * 1e3:.3f} ms, "
              f"max {times.max() * 1e3:.2f} ms")
    print(f"median_ms={np.median(best_wall) * 1e3:.3f} "
          f"p95_ms={np.percentile(best_wall, 95) * 1e3:.3f}")


if __name__ == "__main__":
    main()
