"""A real patient's loop, no simulated plant: the emulated BIS Vista monitor (on a pty) ->
``serve sensor-bridge`` -> ``serve controller --no-plant --sensor`` -> ``serve pump-bridge`` ->
the emulated NE-1000 pumps, every program as a user runs it (hil/README.md, "A real
patient: sensors and pumps, no plant").

Properties: the controller decides on the bridge's BIS readings (UTC-stamped: the clock of
a controller without a plant) and its commands reach the pumps; an electrode off (the
monitor's lead-off knob) turns the readings invalid, and the supervisor goes to FALLBACK
with an alarm and never raises a rate while there; every step is in the audit log and no
process crashes.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from hil.bis_emulator import BisEmulator
from hil.newera_emulator import NewEraEmulator
from mpc_dose.errors import ConfigError
from mpc_dose.scenario import load_scenario
from tests.ports import free_addresses
from tests.test_hil_loop import bridge_config, cli

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "scenarios" / "hil_pid_newera.toml"   # PID on BIS, period 2 s


class _WanderingBis:
    """Moves the emulator's BIS around 65 (an awake-ish patient: the PID doses), so the
    supervisor's flat-line rule does not take a constant emulator for a dead sensor."""

    def __init__(self, emulator: BisEmulator) -> None:
        self.emulator = emulator
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        k = 0
        while not self._stop.wait(0.2):
            k += 1
            self.emulator.bis = round(65.0 + 5.0 * math.sin(k / 4.0), 1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)


def _controller_rows(audit: Path, kind: str | None = None) -> list[dict]:
    """The controller's audit rows (of *kind*), bodies decoded; [] before the table exists."""
    if not audit.exists():
        return []
    db = sqlite3.connect(audit, timeout=10)
    try:
        query = "SELECT id, t_sim, direction, kind, src, body FROM events " \
                "WHERE process = 'controller'" + (" AND kind = ?" if kind else "") + \
                " ORDER BY id"
        rows = db.execute(query, (kind,) if kind else ()).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()
    return [dict(id=i, t_sim=t, direction=d, kind=k, src=s, body=json.loads(b))
            for i, t, d, k, s, b in rows]


def _wait_for(condition, processes, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for p in processes:
            assert p.poll() is None, f"{what}: a process ended early ({p.args[3]})"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.1)


def test_bis_bridge_drives_the_controller_and_lead_off_means_fallback(tmp_path):
    bis_tel, pump_cmd, pump_tel = free_addresses(3)
    audit = tmp_path / "audit.sqlite"
    monitor = BisEmulator(period_s=0.5, bis=65.0, sqi=95.0).start()
    pumps = NewEraEmulator([0, 1], max_rate_ml_per_h=1500).start()
    sensor_config = tmp_path / "bis.toml"
    sensor_config.write_text(
        f'[bridge]\nkind = "bis_vista"\ntelemetry = "{bis_tel}"\nsrc = "bis-bridge"\n'
        f'heartbeat_s = 0.5\n[bis_vista]\nserial = "{monitor.device}"\n', "utf-8")
    pump_config = bridge_config(tmp_path / "bridge.toml", pumps.device, pump_cmd, pump_tel)
    procs = []
    try:
        with _WanderingBis(monitor):
            procs.append(subprocess.Popen(cli("serve", "sensor-bridge", str(sensor_config),
                                              "--audit", str(audit), "--duration", "90")))
            procs.append(subprocess.Popen(cli("serve", "pump-bridge", str(pump_config),
                                              "--audit", str(audit), "--duration", "90")))
            controller = subprocess.Popen(cli(
                "serve", "controller", str(SCENARIO), "--patient", "3", "--no-plant",
                "--telemetry", bis_tel, "--sensor", pump_tel,
                "--pump", f"propofol={pump_cmd}", "--pump", f"remifentanil={pump_cmd}",
                "--realtime", "1", "--duration", "20", "--workers", "1",
                "--audit", str(audit)), stdout=subprocess.PIPE, text=True)
            procs.append(controller)

            def closed_loop_commands() -> bool:  # a dose on valid BIS, applied by a pump
                modes = [r["body"]["target"] for r in _controller_rows(audit, "mode")]
                return "CLOSED_LOOP" in modes and any(
                    (r["body"].get("applied_rate") or 0) > 0
                    for r in _controller_rows(audit, "ack"))
            _wait_for(closed_loop_commands, procs, 40, "closed loop on the bridge's BIS")
            monitor.lead_off = True  # an electrode off: the monitor's impedance check fails

            def fallback() -> bool:
                return any(r["body"]["target"] == "FALLBACK"
                           for r in _controller_rows(audit, "mode"))
            _wait_for(fallback, procs, 15, "FALLBACK after lead-off")
            out, _ = controller.communicate(timeout=40)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.wait(20)
        monitor.close()
        pumps.close()
    assert controller.returncode == 0 and "controller host: 1 patient(s)" in out
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]

    rows = _controller_rows(audit)
    readings = [r for r in rows if r["kind"] == "measurement" and r["direction"] == "in"]
    bis = [r["body"] for r in readings if r["src"] == "bis-bridge" and r["body"]["var"] == "bis"]
    # the bridge's readings, stamped UTC, are what the controller heard
    assert len(bis) > 10 and all(abs(b["t_meas"] - time.time()) < 300 for b in bis)
    assert {b["quality"] for b in bis} == {"valid", "invalid"}
    # its commands reached the pumps: the propofol pump infused
    sets = [r for r in rows if r["kind"] == "set_rate" and r["direction"] == "out"]
    assert sets and all(abs(r["t_sim"] - time.time()) < 300 for r in sets)
    assert pumps.pumps[0].dispensed_ml > 0
    # the pump bridge's telemetry (--sensor) reached the controller too
    assert any(r["kind"] == "pump_status" and r["src"] == "pump-bridge" for r in rows)

    modes = [r for r in rows if r["kind"] == "mode"]
    to_fallback = next(r for r in modes if r["body"]["target"] == "FALLBACK")
    assert "bis flagged invalid" in to_fallback["body"]["cause"]
    alarms = [r for r in rows if r["kind"] == "alarm"]
    assert any(r["direction"] == "note" and r["body"]["alarm"]["code"] == "data.invalid"
               for r in alarms)  # the supervisor's
    assert any(r["direction"] == "in" and r["src"] == "bis-bridge"
               and r["body"]["code"] == "sensor.lead_off" for r in alarms)  # the bridge's
    # in FALLBACK no rate rises: every command after it is at most the one before it
    rates: dict[str, list[float]] = {}
    for r in sets:
        if r["id"] > to_fallback["id"]:
            rates.setdefault(r["body"]["pump"], []).append(r["body"]["rate"])
    before = {}
    for r in sets:
        if r["id"] < to_fallback["id"]:
            before[r["body"]["pump"]] = r["body"]["rate"]
    for pump, series in rates.items():
        assert all(b <= a + 1e-9 for a, b in zip([before.get(pump, 0.0)] + series, series))


@pytest.mark.parametrize("row, match", [
    ("1,,tcp://127.0.0.1:1,,tcp://127.0.0.1:3,", r"line 2: commands is empty .* "
                                                  r"remifentanil have no pump:NAME"),
])
def test_a_ward_row_without_a_plant_needs_every_pump(tmp_path, row, match):
    from mpc_dose.serve.host import read_ward

    ward = tmp_path / "ward.csv"
    ward.write_text("patient,seed,telemetry,commands,pump:propofol,sensors\n" + row + "\n")
    with pytest.raises(ConfigError, match=match):
        read_ward(ward, load_scenario(SCENARIO))


def test_a_ward_file_gives_each_patient_its_sensors_and_no_plant(tmp_path):
    from mpc_dose.serve.host import read_ward

    ward = tmp_path / "ward.csv"
    ward.write_text("patient,seed,telemetry,commands,pump:propofol,pump:remifentanil,sensors\n"
                    "1,,tcp://127.0.0.1:1,,tcp://127.0.0.1:2,tcp://127.0.0.1:2,"
                    "tcp://127.0.0.1:3 tcp://127.0.0.1:4\n"
                    "2,5,tcp://127.0.0.1:5,tcp://127.0.0.1:6,,,\n")
    read = read_ward(ward, load_scenario(SCENARIO))
    assert read.commands == [None, "tcp://127.0.0.1:6"]
    assert read.sensors == [["tcp://127.0.0.1:3", "tcp://127.0.0.1:4"], []]
    assert read.pumps[0] == {"propofol": "tcp://127.0.0.1:2",
                             "remifentanil": "tcp://127.0.0.1:2"}


@pytest.mark.parametrize("args, match", [
    (["--no-plant", "--pump", "propofol=tcp://127.0.0.1:2",
      "--pump", "remifentanil=tcp://127.0.0.1:2"], "--no-plant needs --realtime 1"),
    (["--no-plant", "--realtime", "1", "--pump", "propofol=tcp://127.0.0.1:2"],
     "pump.s. remifentanil of the scenario have no --pump"),
    (["--duration", "5"], "--duration 5 with serve controller needs --realtime"),
    (["--realtime", "1", "--sensor", "tcp://127.0.0.1:5560"], "--sensor 'tcp://127.0.0.1:5560'"
                                                              ": given twice"),
])
def test_controller_options_without_a_plant_are_checked(args, match, capsys):
    from mpc_dose.cli import main

    code = main(["serve", "controller", str(SCENARIO), "--workers", "0", *args])
    assert code == 2
    assert re.search(match, capsys.readouterr().err)


class _FakeDevices:
    """On loopback, in a thread: a pump bridge (acks every command; its telemetry only
    heartbeats: the patient's primary telemetry), a BIS bridge publishing readings stamped
    UTC (valid, then invalid from *invalid_after_s*) and a second publisher that calls
    itself by the BIS bridge's name."""

    def __init__(self, invalid_after_s: float) -> None:
        self.primary, self.bis, self.twin, self.commands = free_addresses(4)
        self.invalid_from = time.time() + invalid_after_s
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import zmq

        from mpc_dose.protocol.messages import (Ack, GetStatus, Heartbeat, Hello, Measurement,
                                                SetRate)
        from mpc_dose.transport.zmq_link import CommandServer, Telemetry

        context = zmq.Context()
        try:
            server = CommandServer(context, self.commands, src="pump-bridge")
            pump_tel = Telemetry(context, self.primary, src="pump-bridge")
            bis = Telemetry(context, self.bis, src="bis-bridge")
            twin = Telemetry(context, self.twin, src="bis-bridge")
            self.ready.set()
            k = 0
            while not self._stop.is_set():
                for identity, envelope in server.receive(0.1):
                    m = envelope.message
                    if isinstance(m, Hello):
                        server.reply(identity, Hello(role="pump-bridge"))
                    elif isinstance(m, SetRate):
                        server.reply(identity, Ack(cmd_id=m.cmd_id, ok=True, code="applied",
                                                   applied_rate=m.rate, unit=m.unit,
                                                   lease_remaining_s=m.lease_s))
                    elif isinstance(m, GetStatus):
                        server.reply(identity, Ack(cmd_id=m.cmd_id, ok=True, code="applied"))
                k += 1
                now = time.time()
                pump_tel.send(Heartbeat(role="pump-bridge", state="running", period_s=0.25))
                twin.send(Heartbeat(role="sensor-bridge", state="running", period_s=0.25))
                bis.send(Measurement(var="bis", value=round(65 + 5 * math.sin(k / 4), 1),
                                     unit="1", t_meas=now, sensor="bis_vista:bis-bridge",
                                     quality="valid" if now < self.invalid_from
                                     else "invalid"))
        finally:
            context.destroy(linger=0)


def test_the_in_process_controller_decides_on_a_further_source_and_falls_back(tmp_path):
    """``--workers 0`` (ControllerProcess), no plant: the primary telemetry is a pump
    bridge's (heartbeats only), the BIS comes from a ``--sensor`` address. Its UTC readings
    drive the decisions; the further sources' epochs never count as the primary's restarts;
    invalid readings bring FALLBACK; two publishers under one src are noted."""
    from mpc_dose.serve.controller import ControllerProcess

    audit = tmp_path / "audit.sqlite"
    with _FakeDevices(invalid_after_s=6.0) as devices:
        process = ControllerProcess(
            load_scenario(SCENARIO), [(2, 2)], [devices.primary],
            [{"propofol": devices.commands, "remifentanil": devices.commands}],
            sensors=[[devices.bis, devices.twin]], audit=audit)
        try:
            process.connect(10)
            process.run_realtime(10)
        finally:
            process.close()
    link = process.links[0]
    assert link.clock_offset_s is None  # no plant: UTC
    rows = _controller_rows(audit)
    kinds = [r["kind"] for r in rows]
    assert "plant_restart" not in kinds and "controller_restart" not in kinds
    modes = [r["body"] for r in rows if r["kind"] == "mode"]
    assert [m["target"] for m in modes[:2]] == ["CLOSED_LOOP", "FALLBACK"]
    assert "bis flagged invalid" in modes[1]["cause"]
    sets = [r for r in rows if r["kind"] == "set_rate" and r["direction"] == "out"]
    assert sets and any(r["body"]["rate"] > 0 for r in sets)
    clash = [r["body"] for r in rows if r["kind"] == "sensor_src_clash"]
    assert len(clash) == 1 and clash[0]["src"] == "bis-bridge"
