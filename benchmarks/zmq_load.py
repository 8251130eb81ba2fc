"""Load: one controller host serving N virtual patients at once over ZeroMQ in real time.

    python benchmarks/zmq_load.py [--patients 100] [--duration 60] [--scenario FILE]
                                  [--workers N] [--stagger S] [--solve-budget S]

A second process hosts the N plants (one simpy real-time environment, a PUB and a ROUTER
socket per patient, all on loopback), every patient inducted at the same instant. The
controller host (``mpc-dose serve controller``: its I/O and the patients' controller nodes in
one process, the controllers in ``--workers`` worker processes, default the CPU count;
``--workers 0``: every controller in the one process, the host before issue 19) decides and
sends each patient's leased commands every control period and waits for their acks.
Printed: cycles, missed deadlines, decisions abandoned past their solve budget, and the
latency from each due instant until a patient's acks were in (median, p99, max). Last line:
``patients=… period_s=… cycles=… missed=… p50_ms=… p99_ms=… max_ms=…``.
Default scenario: scenarios/hil_pid_newera.toml with a 5 s control period; the NMPC:
``--scenario scenarios/tiva_benchmark.toml``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
from collections import Counter
import os
import socket
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    out = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return out


def host_plants(scenario_path: str, n: int, telemetry: list[str], commands: list[str],
                duration_s: float, ready) -> None:
    """N plants in one real-time simpy environment, polling all their command sockets."""
    from dataclasses import replace

    import zmq

    from mpc_dose.plant.realtime import DeadlineEnvironment
    from mpc_dose.protocol.messages import Heartbeat
    from mpc_dose.scenario import load_scenario
    from mpc_dose.serve.plant import answer_commands
    from mpc_dose.trial.build import build_setup
    from mpc_dose.trial.closed_loop import PlantSide
    from mpc_dose.transport.zmq_link import CommandServer, Telemetry

    scenario = load_scenario(scenario_path)
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, max(1024, 2 * n + 64))
    env = DeadlineEnvironment(factor=1.0, tolerance_s=0.5)
    plants, servers, pubs = [], [], []
    poller = zmq.Poller()
    for k in range(n):
        setup, _ = build_setup(scenario, k % 13, k)
        setup = replace(setup, duration_s=duration_s + 30)
        pub = Telemetry(context, telemetry[k], src=f"plant-{k + 1}")
        server = CommandServer(context, commands[k], src=f"plant-{k + 1}")
        # telemetry carries the plant's clock (t_sim), as `serve plant` sends it: readings
        # are dated on it, and the controller decides on it
        plant = PlantSide(setup, env, lambda m, pub=pub: pub.send(m, float(env.now)))
        plants.append(plant)
        servers.append(server)
        pubs.append(pub)
        poller.register(server.sock, zmq.POLLIN)

    index = {id(s.sock): k for k, s in enumerate(servers)}

    def idle(timeout_s: float) -> None:
        for sock, _ in poller.poll(int(timeout_s * 1000)):
            k = index[id(sock)]
            answer_commands(plants[k], servers[k])

    def heartbeats():
        while True:
            for pub in pubs:
                pub.send(Heartbeat(role="plant", state="running", period_s=1.0),
                         float(env.now))
            yield env.timeout(1.0)

    env.process(heartbeats())
    env.idle = idle
    ready.set()
    env.sync()
    env.run(until=duration_s + 30)
    context.destroy(linger=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=60.0, help="wall seconds")
    parser.add_argument("--scenario", default=str(REPO / "scenarios" / "hil_pid_newera.toml"))
    parser.add_argument("--period", type=float, default=5.0, help="control period [s]")
    parser.add_argument("--workers", type=int, default=None,
                        help="controller worker processes (default: the CPU count; 0: the "
                             "controllers in the host process)")
    parser.add_argument("--stagger", type=float, default=None,
                        help="spread of the patients' control instants [s] (default: one "
                             "period)")
    parser.add_argument("--solve-budget", type=float, default=None,
                        help="seconds a decision may take (default: half the period)")
    args = parser.parse_args()

    text = Path(args.scenario).read_text(encoding="utf-8")
    import re

    text = re.sub(r"(\[controller\]\nkind = \"\w+\"\nperiod_s = )[\d.]+",
                  lambda m: m.group(1) + repr(args.period), text)
    text = text.replace('path = "data/', f'path = "{Path(args.scenario).resolve().parent}/data/')
    tmp = Path(tempfile.mkdtemp()) / "load.toml"
    tmp.write_text(text, encoding="utf-8")

    from mpc_dose.scenario import load_scenario
    from mpc_dose.serve.controller import ControllerProcess
    from mpc_dose.serve.host import ControllerHost

    n = args.patients
    numbers = ports(2 * n)
    telemetry = [f"tcp://127.0.0.1:{p}" for p in numbers[:n]]
    commands = [f"tcp://127.0.0.1:{p}" for p in numbers[n:]]
    ready = mp.Event()
    host = mp.Process(target=host_plants, args=(str(tmp), n, telemetry, commands,
                                                args.duration, ready), daemon=True)
    host.start()
    ready.wait(300)
    scenario = load_scenario(tmp)
    start = time.perf_counter()
    routes = [{p.pump: commands[k] for p in scenario.pump} for k in range(n)]
    patients = [(k % 13, k) for k in range(n)]
    if args.workers == 0:
        process = ControllerProcess(scenario, patients, telemetry, routes,
                                    plant_commands=commands)
    else:
        process = ControllerHost(scenario, patients, telemetry, routes,
                                 plant_commands=commands, workers=args.workers,
                                 stagger_s=args.stagger, solve_budget_s=args.solve_budget)
    build_s = time.perf_counter() - start
    try:
        process.connect(wait_s=120)
        process.run_realtime(args.duration)
    finally:
        process.close()
        host.terminate()
    modes = Counter(link.node.supervisor.mode for link in process.links)
    latency = np.array([x for link in process.links for x in link.latency_s]) * 1000
    missed_acks = sum(link.missed_acks for link in process.links)
    if args.workers == 0:
        sweeps = np.array(process.sweeps_s) * 1000
        cycles = len(sweeps)
        how = (f"one process; sweep over all patients: median {np.median(sweeps):.1f} ms, "
               f"max {sweeps.max():.1f} ms")
    else:
        cycles = len(latency)
        how = (f"{process.n_workers} worker processes; decisions abandoned past the "
               f"{process.solve_budget_s or 0.5 * process.period_s:g}-s budget "
               f"{process.abandoned}, late answers discarded {process.late_discarded}")
    print(f"{n} patients, control period {process.period_s:g} s, {cycles} patient cycles "
          f"({args.duration:g} s), controllers built in {build_s:.1f} s")
    print(f"{how}; missed acks {missed_acks}; supervisor modes at the end {dict(modes)}")
    print(f"patients={n} period_s={process.period_s:g} cycles={cycles} "
          f"missed={process.missed_deadlines} p50_ms={np.median(latency):.2f} "
          f"p99_ms={np.percentile(latency, 99):.2f} max_ms={latency.max():.2f}")


if __name__ == "__main__":
    main()
