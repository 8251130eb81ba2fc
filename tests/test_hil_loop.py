"""The loop across OS processes over ZeroMQ: controller, plant and a pump bridge driving the
emulated NE-1000 reproduce the in-process result; a killed controller leaves the pumps in
their fallback within one lease, recorded in the audit log."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hil.newera_emulator import NewEraEmulator
from mpc_dose.scenario import load_scenario
from mpc_dose.trial.build import build_setup
from mpc_dose.trial.closed_loop import run_closed_loop
from tests.ports import free_addresses

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "scenarios" / "hil_pid_newera.toml"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mpc_dose.cli", *args]


def bridge_config(path: Path, device: str, commands: str, telemetry: str, *,
                  safe_mode_s: int = 3, poll_s: float = 0.25) -> Path:
    path.write_text(f"""
[bridge]
serial = "{device}"
commands = "{commands}"
telemetry = "{telemetry}"
safe_mode_s = {safe_mode_s}
poll_s = {poll_s}

[[pump]]
pump = "propofol"
address = 0
concentration = 10.0
amount_unit = "mg"
max_rate_ml_per_h = 1200

[[pump]]
pump = "remifentanil"
address = 1
concentration = 50.0
amount_unit = "ug"
max_rate_ml_per_h = 1200
""", encoding="utf-8")
    return path


def run_all(procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(max(1.0, deadline - time.monotonic()))


def test_two_processes_reproduce_the_in_process_loop(tmp_path):
    """Plant and controller as two OS processes (simulated, lock-step) give the in-process
    series (to the CSV's 10 digits): same noise, same commands, same delivery."""
    tel, cmd = free_addresses(2)
    out = tmp_path / "plant.csv"
    plant = subprocess.Popen(cli("serve", "plant", str(SCENARIO), "--patient", "3", "--seed",
                                 "2", "--telemetry", tel, "--commands", cmd, "--out",
                                 str(out)))
    controller = subprocess.Popen(cli("serve", "controller", str(SCENARIO), "--patient", "3",
                                      "--seed", "2", "--telemetry", tel, "--commands", cmd))
    run_all([plant, controller])
    assert plant.returncode == 0 and controller.returncode == 0
    across = pd.read_csv(out)
    setup, _ = build_setup(load_scenario(SCENARIO), 2, 2)
    inproc = run_closed_loop(setup).to_pandas()
    for column in ("true_bis_unitless", "measured_bis_unitless",
                   "delivered_propofol_rate_mg_per_s", "delivered_remifentanil_rate_ug_per_s"):
        np.testing.assert_allclose(across[column], inproc[column], rtol=1e-9, atol=1e-12,
                                   err_msg=column)


def test_two_processes_over_curve_with_allow_lists(tmp_path):
    """The hil/README.md recipe: the plant binds with its keys and an allow-list holding the
    controller's public key; the controller names the plant's public key. The loop runs as
    without keys (same series); a monitor not on the list hears nothing."""
    import zmq

    from mpc_dose.transport.zmq_link import Keys, TelemetryReader

    for name in ("plant", "controller", "monitor"):
        assert subprocess.run(cli("keys", str(tmp_path / "keys"), name)).returncode == 0
    keys = tmp_path / "keys"
    allow = tmp_path / "allow"
    allow.mkdir()
    (allow / "controller.key").write_bytes((keys / "controller.key").read_bytes())
    tel, cmd = free_addresses(2)
    out = tmp_path / "plant.csv"
    plant = subprocess.Popen(cli("serve", "plant", str(SCENARIO), "--patient", "3", "--seed",
                                 "2", "--telemetry", tel, "--commands", cmd, "--out",
                                 str(out), "--keys", str(keys / "plant.key_secret"),
                                 "--allow-keys", str(allow)),
                             stdout=subprocess.PIPE, text=True)
    context = zmq.Context()
    stranger = TelemetryReader(context, [tel], keys=Keys.load(keys / "monitor.key_secret",
                                                              keys / "plant.key"))
    controller = subprocess.Popen(cli("serve", "controller", str(SCENARIO), "--patient", "3",
                                      "--seed", "2", "--telemetry", tel, "--commands", cmd,
                                      "--keys", str(keys / "controller.key_secret"),
                                      "--server-key", str(keys / "plant.key")))
    try:
        run_all([plant, controller])
        heard = list(stranger.drain(0.2))
    finally:
        context.destroy(linger=0)
    assert plant.returncode == 0 and controller.returncode == 0
    assert "allowing 1 client key(s): controller" in plant.stdout.read()
    assert heard == []
    across = pd.read_csv(out)
    setup, _ = build_setup(load_scenario(SCENARIO), 2, 2)
    inproc = run_closed_loop(setup).to_pandas()
    np.testing.assert_allclose(across["true_bis_unitless"], inproc["true_bis_unitless"],
                               rtol=1e-9, atol=1e-12)


def test_three_processes_with_the_emulated_ne1000(tmp_path):
    """Controller, plant and pump bridge (driving two emulated NE-1000 pumps on one line)
    reproduce the in-process loop; the only difference is the pump's 4-digit rate format
    (relative rounding <= 5e-4), which keeps BIS within 0.05."""
    emulator = NewEraEmulator([0, 1], max_rate_ml_per_h=1500, power_reset=True).start()
    try:
        tel, cmd, b_cmd, b_tel = free_addresses(4)
        config = bridge_config(tmp_path / "bridge.toml", emulator.device, b_cmd, b_tel)
        audit = tmp_path / "audit.sqlite"
        bridge = subprocess.Popen(cli("serve", "pump-bridge", str(config), "--audit",
                                      str(audit), "--duration", "60"))
        out = tmp_path / "plant.csv"
        plant = subprocess.Popen(cli(
            "serve", "plant", str(SCENARIO), "--patient", "3", "--seed", "2", "--telemetry",
            tel, "--commands", cmd, "--external", f"propofol={b_tel}", "--external",
            f"remifentanil={b_tel}", "--out", str(out), "--audit", str(audit)))
        controller = subprocess.Popen(cli(
            "serve", "controller", str(SCENARIO), "--patient", "3", "--seed", "2",
            "--telemetry", tel, "--commands", cmd, "--pump", f"propofol={b_cmd}", "--pump",
            f"remifentanil={b_cmd}", "--audit", str(audit)))
        run_all([plant, controller])
        bridge.terminate()
        bridge.wait(10)
        assert plant.returncode == 0 and controller.returncode == 0
    finally:
        emulator.close()
    across = pd.read_csv(out)
    setup, _ = build_setup(load_scenario(SCENARIO), 2, 2)
    inproc = run_closed_loop(setup).to_pandas()
    assert np.abs(across.true_bis_unitless - inproc.true_bis_unitless).max() < 0.05
    rate = inproc.delivered_propofol_rate_mg_per_s.to_numpy()
    moving = rate > 1e-3
    rel = np.abs(across.delivered_propofol_rate_mg_per_s.to_numpy()[moving] / rate[moving] - 1)
    assert rel.max() < 5e-4 and (across.delivered_propofol_rate_mg_per_s > 0).sum() > 10
    db = sqlite3.connect(audit)
    kinds = dict(db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall())
    assert kinds["set_rate"] > 100 and kinds["ack"] > 100 and kinds["measurement"] > 100


def test_a_restarted_plant_rejoins_and_runs_to_its_end(tmp_path):
    """Simulated lock-step: the plant is killed mid-run (past 100 s of its clock) and started
    again with the same addresses. The controller hears the new epoch, drops the old
    epoch's readings, says hello again (the new plant waits for it), restarts the patient's
    controller on the new clock (t = 0) and keeps its command ids going: the new plant runs
    to completion and its series is the in-process loop's."""
    tel, cmd = free_addresses(2)
    first_audit, audit = tmp_path / "first.sqlite", tmp_path / "controller.sqlite"
    plant_args = ["serve", "plant", str(SCENARIO), "--patient", "3", "--seed", "2",
                  "--telemetry", tel, "--commands", cmd]
    first = subprocess.Popen(cli(*plant_args, "--audit", str(first_audit)))
    controller = subprocess.Popen(cli("serve", "controller", str(SCENARIO), "--patient", "3",
                                      "--seed", "2", "--telemetry", tel, "--commands", cmd,
                                      "--audit", str(audit)))
    procs = [first, controller]
    try:
        deadline = time.monotonic() + 30
        reached = 0.0
        while reached < 100.0:
            assert time.monotonic() < deadline, "the first plant did not get going"
            assert first.poll() is None, "the first plant ended before it was killed"
            time.sleep(0.05)
            if first_audit.exists():
                try:
                    row = sqlite3.connect(first_audit).execute(
                        "SELECT MAX(t_sim) FROM events WHERE kind = 'set_rate'").fetchone()
                except sqlite3.OperationalError:  # the table is not there yet
                    continue
                reached = row[0] or 0.0
        first.kill()
        first.wait(10)
        out = tmp_path / "plant.csv"
        second = subprocess.Popen(cli(*plant_args, "--out", str(out)))
        procs.append(second)
        second.wait(40)
        controller.wait(20)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert second.returncode == 0, "the restarted plant must run to its end"
    assert controller.returncode == 0
    db = sqlite3.connect(audit)
    kinds = [k for (k,) in db.execute("SELECT kind FROM events WHERE direction = 'note' "
                                      "AND kind IN ('plant_restart', 'controller_restart') "
                                      "ORDER BY id")]
    assert kinds == ["plant_restart", "controller_restart"]
    links = [body for (body,) in db.execute("SELECT body FROM events WHERE kind = 'link'")]
    assert any('"target": "READY"' in b and "hello" in b for b in links)
    (restart_row,) = db.execute("SELECT id FROM events WHERE kind = "
                                "'controller_restart'").fetchone()
    sent = db.execute("SELECT id, body FROM events WHERE kind = 'set_rate' AND "
                      "direction = 'out'").fetchall()
    before = {json.loads(body)["cmd_id"] for row, body in sent if row < restart_row}
    after = {json.loads(body)["cmd_id"] for row, body in sent if row > restart_row}
    assert len(before) > 50 and len(after) > 250
    assert not before & after  # the rebuilt controller's commands never reuse an id
    across = pd.read_csv(out)
    setup, _ = build_setup(load_scenario(SCENARIO), 2, 2)
    inproc = run_closed_loop(setup).to_pandas()
    for column in ("true_bis_unitless", "delivered_propofol_rate_mg_per_s"):
        np.testing.assert_allclose(across[column], inproc[column], rtol=1e-9, atol=1e-12,
                                   err_msg=column)


@pytest.mark.parametrize("victim", ["controller", "plant"])
def test_a_killed_process_leaves_the_pumps_in_fallback(tmp_path, victim):
    """SIGKILL mid-run, in real time. Controller killed (T16): no command renews the lease,
    the bridge applies the stop fallback within one lease (2 s) of the last command. Plant
    killed: the controller hears no heartbeat for 3 s, marks the link LOST and stops
    commanding, so the same fallback follows. Both recorded in the audit log."""
    emulator = NewEraEmulator([0, 1], max_rate_ml_per_h=1500).start()
    text = SCENARIO.read_text(encoding="utf-8")
    fast = tmp_path / "fast.toml"  # period 1 s, lease 2 s
    fast.write_text(text.replace("period_s = 2\nlease_periods = 3",
                                 "period_s = 1\nlease_periods = 2")
                    .replace("data/", str(REPO / "scenarios" / "data") + "/"),
                    encoding="utf-8")
    assert tomllib.loads(fast.read_text(encoding="utf-8"))["controller"]["lease_periods"] == 2
    try:
        tel, cmd, b_cmd, b_tel = free_addresses(4)
        config = bridge_config(tmp_path / "bridge.toml", emulator.device, b_cmd, b_tel)
        audit = tmp_path / "audit.sqlite"
        bridge = subprocess.Popen(cli("serve", "pump-bridge", str(config), "--audit",
                                      str(audit), "--duration", "40"))
        plant = subprocess.Popen(cli(
            "serve", "plant", str(fast), "--patient", "3", "--telemetry", tel, "--commands",
            cmd, "--external", f"propofol={b_tel}", "--external", f"remifentanil={b_tel}",
            "--realtime", "1"))
        controller = subprocess.Popen(cli(
            "serve", "controller", str(fast), "--patient", "3", "--telemetry", tel,
            "--commands", cmd, "--pump", f"propofol={b_cmd}", "--pump",
            f"remifentanil={b_cmd}", "--realtime", "1", "--audit", str(audit)))
        deadline = time.monotonic() + 60
        first = None  # the kill comes at least 3 s into infusing, at an instant it infuses
        while time.monotonic() < deadline:  # (the PID may command 0 for a while meanwhile)
            infusing = emulator.state(0).prompt == "I" and emulator.state(0).rate_ml_per_h > 0
            if infusing and first is None:
                first = time.monotonic()
            if infusing and time.monotonic() - first >= 3.0:
                break
            time.sleep(0.05)
        assert emulator.state(0).prompt == "I", "propofol should be infusing before the kill"
        (controller if victim == "controller" else plant).kill()
        killed_at = time.time()
        time.sleep(2 + 0.25 + 1.5 + (3.0 if victim == "plant" else 0.0))
        assert emulator.state(0).prompt == "S", "the pump must be stopped by the fallback"
        for p in (plant, controller):
            p.kill()
        bridge.terminate()
        bridge.wait(10)
    finally:
        emulator.close()
    db = sqlite3.connect(audit)
    rows = db.execute("SELECT t_wall, body FROM events WHERE process = 'pump-bridge' AND "
                      "kind = 'mode' AND body LIKE '%FALLBACK%' ORDER BY id").fetchall()
    assert rows, "the fallback must be recorded in the audit log"
    last_cmd = db.execute("SELECT MAX(t_wall) FROM events WHERE process = 'pump-bridge' AND "
                          "kind = 'set_rate' AND direction = 'in' AND t_wall < ?",
                          (rows[0][0],)).fetchone()[0]
    fallback_after = rows[0][0] - last_cmd
    # lease end (2 s after the last command) + at most one bridge poll (0.25 s) + scheduling
    assert 2.0 - 0.05 <= fallback_after <= 2.0 + 0.25 + 0.5, fallback_after
    if victim == "controller":
        assert last_cmd <= killed_at + 0.5  # a command in flight at the kill may land late
    else:
        lost = db.execute("SELECT body FROM events WHERE process = 'controller' AND "
                          "kind = 'link'").fetchall()
        assert any('"LOST"' in body for (body,) in lost)
        assert killed_at + 2.5 <= last_cmd + 1.0 <= killed_at + 5.0


SLOW_CONTROLLER = '''
import time


def slow(inputs, period_s, after_s=3.0, sleep_s=1.6):
    """Doses 1 mg/s, then from after_s on takes longer than its period to decide."""
    def decide(t_s, readings):
        if t_s >= after_s:
            time.sleep(sleep_s)
        return {name: 1.0 for name in inputs}
    return decide
'''


def test_missed_deadlines_stop_commanding_and_the_leases_run_out(tmp_path):
    """B12/T36 across processes, real time: a controller that starts overrunning its 1-s
    period is stopped after 2 missed deadlines in a row (FALLBACK in the audit log, no more
    commands); the plant's pumps reach their fallback when the last lease ends."""
    (tmp_path / "slow.py").write_text(SLOW_CONTROLLER, encoding="utf-8")
    text = SCENARIO.read_text(encoding="utf-8")
    start = text.index("[controller]")
    end = text.index("[metrics]")
    scenario = tmp_path / "slow.toml"
    scenario.write_text(
        text[:start].replace("duration_s = 600", "duration_s = 14")
        .replace("data/", str(REPO / "scenarios" / "data") + "/")
        + '[controller]\nkind = "python"\nperiod_s = 1\nlease_periods = 2\n\n'
          '[controller.python]\ntarget = "slow.py:slow"\n'
          'inputs = ["propofol", "remifentanil"]\n\n' + text[end:], encoding="utf-8")
    tel, cmd = free_addresses(2)
    audit = tmp_path / "audit.sqlite"
    out = tmp_path / "plant.csv"
    plant = subprocess.Popen(cli("serve", "plant", str(scenario), "--telemetry", tel,
                                 "--commands", cmd, "--realtime", "1", "--out", str(out)))
    # the controller in the host's own process (--workers 0): a host with worker processes
    # settles an overrunning decision within its solve budget instead (its own fallback,
    # tests/test_controller_host.py), so it misses no deadline here
    controller = subprocess.Popen(cli("serve", "controller", str(scenario), "--telemetry",
                                      tel, "--commands", cmd, "--realtime", "1", "--audit",
                                      str(audit), "--workers", "0"))
    try:
        plant.wait(60)
    finally:
        controller.kill()
        plant.kill()
    assert plant.returncode == 0
    db = sqlite3.connect(audit)
    # (the supervisor's own mode changes are 'mode' rows too: INIT -> CLOSED_LOOP at start)
    fallback = db.execute("SELECT t_wall, body FROM events WHERE process = 'controller' AND "
                          "kind = 'mode' AND body LIKE '%\"target\": \"FALLBACK\"%' "
                          "ORDER BY id").fetchall()
    assert fallback and "deadlines missed" in fallback[0][1]
    after = db.execute("SELECT COUNT(*) FROM events WHERE process = 'controller' AND "
                       "kind = 'set_rate' AND t_wall > ?", (fallback[0][0],)).fetchone()[0]
    assert after == 0, "no command after the switch to FALLBACK"
    frame = pd.read_csv(out, keep_default_na=False)
    expired = frame[frame.alarms.str.contains("pump.lease_expired")]
    assert not expired.empty, "the pumps' leases must run out into their fallback"
    # the last command sent before the switch still runs its lease out; then nothing
    t_expired = expired.time_s.iloc[-1]
    assert t_expired <= frame.time_s.iloc[-1] - 3
    assert (frame[frame.time_s > t_expired].delivered_propofol_rate_mg_per_s == 0).all()


def test_no_decision_before_the_plant_clock_is_known():
    """Found by benchmarks/zmq_load.py with 50 NMPC patients: a patient whose plant had not
    yet been heard was decided at the UTC time, then at the plant's clock, and the NMPC
    refused the clock going back (FALLBACK for good). Nothing is decided for a patient until
    a message from its plant's running clock arrives."""
    from mpc_dose.serve.controller import ControllerProcess

    tel, cmd = free_addresses(2)
    scenario = load_scenario(SCENARIO)
    process = ControllerProcess(scenario, [(0, 1)], [tel], [{p.pump: cmd for p in
                                                             scenario.pump}],
                                plant_commands=[cmd], ack_timeout_s=0.05, retries=0)
    try:
        process.run_realtime(2.5)
    finally:
        process.close()
    link = process.links[0]
    assert link.cycle_s == [] and link.node.last_decision is None and link.missed_acks == 0
