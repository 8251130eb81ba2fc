"""The web monitor on a real loop, with a screenshot, and how fast the page follows telemetry.

    python benchmarks/web_monitor.py [--scenario FILE] [--out out/web_monitor.png]

1. Demo: `serve plant` and `serve controller --publish` (the TIVA NMPC + EKF by default,
   simulated lock-step, as fast as it runs) watched by `monitor --web --audit --ack`, with
   one alarm raised by this script on its own publisher (code ``demo.manual``: the scenario
   raises none) so the page shows one to acknowledge. Headless Chromium (Playwright) opens
   the page when the run is over and saves a full-page screenshot (not committed).
2. Latency: a publisher (its own loop, "probe") sends a reading with a new value every
   0.25 s; the time from each send until the page shows it (the view is pushed twice a
   second: expect up to ~0.5 s).

3. Cost to the controller: ControllerNode.plan() (the plan message, with the NMPC's
   prediction evaluated) per decision, in-process over 40 decisions of the scenario.

Printed: the run's wall time, plans heard, the latency figures, the plan's cost. Last line:
``run_s=… plans=… latency_p50_ms=… latency_max_ms=… plan_ms=… screenshot=…``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    out = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return out


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mpc_dose.cli", *args]


def wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def plan_cost_ms(scenario: str, decisions: int = 40) -> float:
    """Median time of ControllerNode.plan() after a decision [ms]."""
    from mpc_dose.node import ControllerNode
    from mpc_dose.protocol.messages import Measurement
    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.build import build_setup
    from mpc_dose.trial.closed_loop import PlantSide

    setup, _ = build_setup(load_scenario(scenario), 0, 1)
    node = ControllerNode(setup.controller, PlantSide.routes_for(setup), safety=setup.safety,
                          lease_periods=setup.lease_periods)
    period, var = setup.controller.period_s, setup.safety.measured
    times = []
    for k in range(decisions):
        t = k * period
        node.receive(Measurement(var=var, value=90.0 - k, unit="1", t_meas=t), t)
        node.tick(t)
        start = time.perf_counter()
        node.plan(target=50.0, band=(40.0, 60.0))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default=str(REPO / "scenarios" / "tiva_benchmark.toml"))
    parser.add_argument("--out", default=str(REPO / "out" / "web_monitor.png"))
    parser.add_argument("--browser", default=os.environ.get("MPC_DOSE_CHROMIUM",
                                                            "/usr/bin/chromium"))
    args = parser.parse_args()
    import zmq
    from playwright.sync_api import expect, sync_playwright

    from mpc_dose.protocol.messages import Alarm, Heartbeat, Measurement
    from mpc_dose.transport.zmq_link import Telemetry

    tel, cmd, pub, extra, ack, http, probe_port = ports(7)
    loop = lambda p: f"tcp://127.0.0.1:{p}"  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="web-monitor-"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    monitor = subprocess.Popen(cli("monitor", "--web", f"tiva={loop(tel)}",
                                   f"tiva={loop(pub)}", f"tiva={loop(extra)}",
                                   f"probe={loop(probe_port)}",
                                   "--port", str(http), "--audit", str(work / "audit.sqlite"),
                                   "--ack", loop(ack)), env=env, cwd=REPO)
    context = zmq.Context()
    procs = [monitor]
    try:
        demo = Telemetry(context, loop(extra), src="demo-script")
        probe = Telemetry(context, loop(probe_port), src="probe")
        base = f"http://127.0.0.1:{http}"
        wait_http(base + "/api/state")
        start = time.monotonic()
        plant = subprocess.Popen(cli("serve", "plant", args.scenario, "--telemetry", loop(tel),
                                     "--commands", loop(cmd)), env=env, cwd=REPO)
        controller = subprocess.Popen(cli("serve", "controller", args.scenario, "--telemetry",
                                          loop(tel), "--commands", loop(cmd), "--publish",
                                          loop(pub)), env=env, cwd=REPO)
        procs += [plant, controller]
        time.sleep(3.0)
        demo.send(Alarm(code="demo.manual", priority="medium", kind="technical",
                        text="raised by benchmarks/web_monitor.py to show acknowledgement "
                             "(the scenario raises none)"))
        demo.send(Heartbeat(role="demo", state="running", period_s=600.0))
        plant.wait(600)
        controller.wait(60)
        run_s = time.monotonic() - start
        print(f"lock-step run of {Path(args.scenario).name}: {run_s:.1f} s wall")
        for _ in range(3):  # PUB/SUB may drop the very first one
            demo.send(Alarm(code="demo.manual", priority="medium", kind="technical",
                            text="raised by benchmarks/web_monitor.py to show "
                                 "acknowledgement (the scenario raises none)"))
            time.sleep(0.2)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.browser, args=FLAGS,
                                        env={**os.environ, "HOME": str(work)})
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(base + "/")
            page.wait_for_function("() => +document.querySelector('.output-chart')"
                                   ".dataset.points > 100", timeout=30000)
            page.fill("#operator", "demo operator")
            expect(page.locator("button.ack").first).to_be_visible(timeout=10000)
            time.sleep(1.0)
            page.screenshot(path=str(out), full_page=True)
            plans = page.evaluate("async () => (await (await fetch('/api/state')).json())"
                                  ".links.find(l => l.src === 'controller-1').messages")

            # latency: a reading's value shown on the page after it was sent (its own loop)
            latencies = []
            for k in range(40):
                value = 30 + k
                sent = time.monotonic()
                probe.send(Measurement(var="probe", value=value, unit="1", t_meas=float(k)))
                page.wait_for_function(
                    "v => { const e = document.querySelector("
                    "'section.loop[data-loop=probe] [data-testid=value]');"
                    " return e && e.textContent === String(v); }",
                    arg=value, timeout=5000, polling=5)
                latencies.append(time.monotonic() - sent)
                time.sleep(0.25)
            browser.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        context.destroy(linger=0)
        shutil.rmtree(work, ignore_errors=True)
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    print(f"reading shown on the page after its send: median {p50:.0f} ms, max {latencies[-1] * 1000:.0f} ms "
          f"({len(latencies)} readings)")
    plan_ms = plan_cost_ms(args.scenario)
    print(f"ControllerNode.plan() per decision: median {plan_ms:.2f} ms")
    print(f"run_s={run_s:.1f} plans={plans} latency_p50_ms={p50:.0f} "
          f"latency_max_ms={latencies[-1] * 1000:.0f} plan_ms={plan_ms:.2f} screenshot={out}")


if __name__ == "__main__":
    main()
