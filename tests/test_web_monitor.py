"""`mpc-dose monitor --web` in a real browser (headless Chromium through Playwright): the page
loads behind its token, its values and charts follow the telemetry as it arrives, an alarm
shows up, and clicking "Acknowledge" writes the acknowledgement to the audit log and
publishes it as an ``alarm_ack`` message; requests without the token get 401.

The telemetry comes from this test: two PUB sockets sending the repository's own encoded
messages (a plant: measurement, pump_status, heartbeat, alarm; a controller: plan,
heartbeat), as `serve plant` and `serve controller --publish` would. The browser is Debian's
chromium (``make test`` installs it; MPC_DOSE_CHROMIUM names another); without one the test
skips and says so.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mpc_dose.protocol.messages import (Alarm, AlarmAck, Heartbeat, Measurement, Plan,
                                        PlanInput, PumpStatus)
from tests.ports import free_addresses

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                               "(pip install -e '.[test]')")

TOKEN = "test-token-0123456789abcdef"
#: the flags that work in this sandbox: no sandboxing, GPU, QUIC or background traffic
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def chromium() -> str | None:
    for candidate in (os.environ.get("MPC_DOSE_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeLoop(threading.Thread):
    """A plant and a controller publishing one TIVA-like loop: a reading every tick, a plan
    and the controller's heartbeat every 5th; :meth:`alarm` queues an alarm."""

    def __init__(self, plant: str, controller: str) -> None:
        super().__init__(daemon=True)
        import zmq

        from mpc_dose.transport.zmq_link import Telemetry

        self.context = zmq.Context()
        self.plant = Telemetry(self.context, plant, src="plant")
        self.controller = Telemetry(self.context, controller, src="controller-1")
        self.stop = threading.Event()
        self.alarms: list[Alarm] = []
        self.t = 0.0

    def bis(self, t: float) -> float:
        return 50.0 + 45.0 * math.exp(-t / 40.0) + 2.0 * math.sin(t / 3.0)

    def run(self) -> None:
        k = 0
        while not self.stop.is_set():
            t = self.t = float(k)
            self.plant.send(Measurement(var="bis", value=self.bis(t), unit="1", t_meas=t),
                            t_sim=t)
            self.plant.send(PumpStatus(pump="propofol", state="infusing",
                                       rate=120.0 * math.exp(-t / 60.0), mode="COMMANDED"),
                            t_sim=t)
            self.plant.send(Heartbeat(role="plant", state="running", period_s=1.0), t_sim=t)
            if k % 5 == 0:
                self.controller.send(Plan(
                    times_s=[t + 5.0 * j for j in range(13)], var="bis", output="bis",
                    unit="1", predicted=[self.bis(t + 5.0 * j) for j in range(1, 13)],
                    target=50.0, band_low=40.0, band_high=60.0,
                    inputs=[PlanInput(input="propofol", pump="propofol", unit="mg/s",
                                      rates=[0.3 * math.exp(-j / 6) for j in range(12)],
                                      conc=10.0)],
                    mode="CLOSED_LOOP", status="ok", reason="nmpc sqpmethod: ok",
                    solve_s=0.012, deadline_misses=0), t_sim=t)
                self.controller.send(Heartbeat(role="controller", state="CLOSED_LOOP",
                                               period_s=5.0), t_sim=t)
            while self.alarms:
                self.plant.send(self.alarms.pop(0), t_sim=t)
            k += 1
            self.stop.wait(0.1)

    def close(self) -> None:
        self.stop.set()
        self.join(2.0)
        self.context.destroy(linger=0)


def status(url: str, headers: dict | None = None, method: str = "GET", data=None) -> int:
    request = urllib.request.Request(url, headers=headers or {}, method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):  # not listening (yet)
        return 0


@pytest.fixture
def monitor(tmp_path):
    """The monitor as a user starts it (a process), with its telemetry, ack and audit."""
    plant, controller, ack = free_addresses(3)
    port = free_port()
    audit = tmp_path / "audit.sqlite"
    loop = FakeLoop(plant, controller)
    loop.start()
    process = subprocess.Popen(
        [sys.executable, "-m", "mpc_dose.cli", "monitor", "--web", plant, controller,
         "--port", str(port), "--token", TOKEN, "--ack", ack, "--audit", str(audit),
         "--duration", "120"], cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while status(f"{base}/api/state", {"Authorization": f"Bearer {TOKEN}"}) != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            loop.close()
            pytest.fail(f"the web monitor did not start: {process.stdout.read()}")
        time.sleep(0.2)
    try:
        yield base, loop, ack, audit
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        loop.close()


def test_every_request_needs_the_token(monitor):
    """No token or a wrong one: 401 on the page, its files, the event stream and the
    acknowledgement; the right one as a header passes."""
    base, *_ = monitor
    wrong = {"Authorization": "Bearer not-the-token-0123456789"}
    for path in ("/", "/static/app.js", "/events", "/api/state"):
        assert status(base + path) == 401
        assert status(base + path, wrong) == 401
        assert status(f"{base}{path}?token=wrong-token-0123456789") == 401
    assert status(base + "/api/ack", method="POST", data=b'{"id": 1, "operator": "x"}',
                  headers={"Content-Type": "application/json"}) == 401
    assert status(base + "/static/app.js", {"Authorization": f"Bearer {TOKEN}"}) == 200


def test_the_page_follows_the_loop_and_acknowledges_an_alarm(monitor, tmp_path):
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no Chromium found (/usr/bin/chromium, MPC_DOSE_CHROMIUM): `make test` "
                    "installs Debian's chromium")
    import zmq

    from mpc_dose.transport.zmq_link import TelemetryReader

    base, loop, ack_address, audit = monitor
    context = zmq.Context()
    acks = TelemetryReader(context, [ack_address])
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=browser_path, args=CHROMIUM_FLAGS,
                env={**os.environ, "HOME": str(tmp_path)})  # a fresh profile
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(f"{base}/?token={TOKEN}")  # the token moves into a cookie
            assert page.url == f"{base}/"
            panel = page.locator('section.loop[data-loop="loop"]')
            value = panel.locator('[data-testid="value"]')
            sync_api.expect(value).not_to_have_text("–", timeout=15000)
            first = value.inner_text()
            # the value changes as readings arrive
            page.wait_for_function(
                "first => document.querySelector('section.loop [data-testid=value]')"
                ".textContent !== first", arg=first, timeout=15000)
            # charts have points: readings, the plan's prediction and rates
            page.wait_for_function(
                "() => { const c = document.querySelector('section.loop .output-chart');"
                " return +c.dataset.points >= 5 && +c.dataset.planPoints === 12; }",
                timeout=15000)
            page.wait_for_function(
                "() => { const c = document.querySelector('section.loop .rate-chart');"
                " return +c.dataset.points >= 5 && +c.dataset.planPoints === 12; }",
                timeout=15000)
            assert panel.locator('[data-testid="mode"]').inner_text() == "CLOSED_LOOP"
            assert "deadline misses 0" in panel.locator(".facts").inner_text()
            links = page.locator("#link-rows tr")
            sync_api.expect(links).to_have_count(2, timeout=10000)
            sync_api.expect(page.locator('#link-rows tr[data-src="plant"] .badge')) \
                .to_have_text("ok")

            loop.alarms.append(Alarm(code="data.stale", priority="high", kind="technical",
                                     text="bis: no reading for 12 s"))
            row = page.locator('tr.alarm[data-code="data.stale"]')
            sync_api.expect(row).to_have_count(1, timeout=15000)
            assert "bis: no reading for 12 s" in row.inner_text()
            page.fill("#operator", "test-operator")
            row.locator("button.ack").click()
            sync_api.expect(row.locator(".state")).to_contain_text(
                "acknowledged by test-operator", timeout=10000)
            assert not errors, errors
            browser.close()
        # the acknowledgement went out on the ack socket ...
        deadline, sent = time.monotonic() + 10, []
        while not sent and time.monotonic() < deadline:
            sent = [e.message for e in acks.drain(0.2) if isinstance(e.message, AlarmAck)]
        assert len(sent) == 1
        assert (sent[0].code, sent[0].alarm_src, sent[0].priority, sent[0].operator) == \
            ("data.stale", "plant", "high", "test-operator")
    finally:
        context.destroy(linger=0)
    # ... and into the audit log, before it left
    db = sqlite3.connect(audit)
    rows = db.execute("SELECT process, direction, src, body FROM events WHERE kind = "
                      "'alarm_ack'").fetchall()
    assert len(rows) == 1 and rows[0][:3] == ("monitor", "out", "monitor")
    assert '"operator": "test-operator"' in rows[0][3] and '"code": "data.stale"' in rows[0][3]
