"""Load: one controller process serving N virtual patients at once over ZeroMQ in real time.

    python benchmarks/zmq_load.py [--patients 100] [--duration 60] [--scenario FILE]

A second process hosts the N plants (one simpy real-time environment, a PUB and a ROUTER
socket per patient, all on loopback). The controller process runs one controller node per
patient and, every control period, decides and sends each patient's leased commands and
waits for their acks. Printed: cycles, missed deadlines (a sweep over all patients that
ends after the next due instant), and the latency from each due instant until a patient's
acks were in (median, p99, max). Last line:
``patients=… period_s=… cycles=… missed=… p50_ms=… p99_ms=… max_ms=…``.
Default scenario: scenarios/hil_pid_newera.toml with a 5 s control period.
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
    process = ControllerProcess(scenario, [(k % 13, k) for k in range(n)], telemetry,
                                [{p.pump: commands[k] for p in scenario.pump}
                                 for k in range(n)], plant_commands=commands)
    build_s = time.perf_counter() - start
    try:
        process.connect(wait_s=120)
        process.run_realtime(args.duration)
    finally:
        process.close()
        host.terminate()
    modes = Counter(link.node.supervisor.mode for link in process.links)
    latency = np.array([x for link in process.links for x in link.latency_s]) * 1000
    sweeps = np.array(process.sweeps_s) * 1000
    missed_acks = sum(link.missed_acks for link in process.links)
    print(f"{n} patients, control period {process.period_s:g} s, {len(sweeps)} cycles "
          f"({args.duration:g} s), controllers built in {build_s:.1f} s")
    print(f"sweep over all patients: median {np.median(sweeps):.1f} ms, max "
          f"{sweeps.max():.1f} ms; missed acks {missed_acks}; supervisor modes at the end "
          f"{dict(modes)}")
    print(f"patients={n} period_s={process.period_s:g} cycles={len(sweeps)} "
          f"missed={process.missed_deadlines} p50_ms={np.median(latency):.2f} "
          f"p99_ms={np.percentile(latency, 99):.2f} max_ms={latency.max():.2f}")


if __name__ == "__main__":
    main()
