"""The Nightscout and SDC sensor bridges drive a controller without a plant, every program
as a user runs it (hil/README.md, "Sensor bridges", "IEEE 11073 SDC", "A real patient:
sensors and pumps, no plant"); tests/test_sensor_loop.py does the same for the BIS Vista
bridge.

- An emulated Nightscout site (``hil/nightscout_emulator.py``, a CGM entry every second)
  -> ``serve sensor-bridge`` (kind nightscout) -> ``serve controller --no-plant`` of the
  OpenAPS T1D scenario (its period and staleness shortened in a copy). The controller
  decides on the site's glucose; the site's CGM stops (``frozen``): the bridge raises
  ``sensor.stale`` and the supervisor falls back on stale data (``data.stale``).
- An SDC provider (``hil/sdc_provider.py``, sdc11073 on loopback) -> ``serve sdc-bridge``
  -> ``serve controller --no-plant`` of the BIS PID scenario. The controller decides on the
  provider's BIS; the provider marks its metrics ``Inv``: the readings arrive ``invalid``
  and the supervisor falls back (``data.invalid``), never raising a rate there.

The pumps are a fake pump bridge in a thread (acks every command, heartbeats on its
telemetry: the patient's primary telemetry); the bridge's telemetry is a ``--sensor``.
In both, every process exits 0 and every step is in the audit log.
"""

from __future__ import annotations

import math
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from hil.nightscout_emulator import NightscoutEmulator
from tests.ports import free_addresses
from tests.test_hil_loop import cli
from tests.test_sensor_loop import _controller_rows, _wait_for

REPO = Path(__file__).resolve().parents[1]
T1D_SCENARIO = REPO / "scenarios" / "t1d_openaps.toml"      # CGM var "cgm", period 5 min
BIS_SCENARIO = REPO / "scenarios" / "hil_pid_newera.toml"   # PID on BIS, period 2 s


class _FakePumpBridge:
    """A pump bridge on loopback, in a thread: acks every command as applied; its telemetry
    only heartbeats (the patient's primary telemetry: a controller without a plant stops
    commanding when it goes silent)."""

    def __init__(self) -> None:
        self.telemetry, self.commands = free_addresses(2)
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

        from mpc_dose.protocol.messages import Ack, Bolus, GetStatus, Heartbeat, Hello, SetRate
        from mpc_dose.transport.zmq_link import CommandServer, Telemetry

        context = zmq.Context()
        try:
            server = CommandServer(context, self.commands, src="pump-bridge")
            telemetry = Telemetry(context, self.telemetry, src="pump-bridge")
            self.ready.set()
            while not self._stop.is_set():
                for identity, envelope in server.receive(0.1):
                    m = envelope.message
                    if isinstance(m, Hello):
                        server.reply(identity, Hello(role="pump-bridge"))
                    elif isinstance(m, SetRate):
                        server.reply(identity, Ack(cmd_id=m.cmd_id, ok=True, code="applied",
                                                   applied_rate=m.rate, unit=m.unit,
                                                   lease_remaining_s=m.lease_s))
                    elif isinstance(m, (Bolus, GetStatus)):
                        server.reply(identity, Ack(cmd_id=m.cmd_id, ok=True, code="applied"))
                telemetry.send(Heartbeat(role="pump-bridge", state="running", period_s=0.25))
        finally:
            context.destroy(linger=0)


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """The bridges run until told (SIGTERM: a clean stop, exit 0); the controller ends on
    its --duration."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
        p.wait(30)


def _modes(audit: Path) -> list[dict]:
    return _controller_rows(audit, "mode")


def _closed_loop_commands(audit: Path) -> bool:
    """CLOSED_LOOP, and a dose the pump side applied (a rate above 0)."""
    return any(r["body"]["target"] == "CLOSED_LOOP" for r in _modes(audit)) and any(
        (r["body"].get("applied_rate") or 0) > 0 for r in _controller_rows(audit, "ack"))


def _no_rate_rises_after(sets: list[dict], to_fallback: dict) -> None:
    """In FALLBACK no rate rises: every command after it is at most the one before it."""
    before: dict[str, float] = {}
    after: dict[str, list[float]] = {}
    for r in sets:
        if r["id"] < to_fallback["id"]:
            before[r["body"]["pump"]] = r["body"]["rate"]
        else:
            after.setdefault(r["body"]["pump"], []).append(r["body"]["rate"])
    for pump, series in after.items():
        assert all(b <= a + 1e-9 for a, b in zip([before.get(pump, 0.0)] + series, series))


def _fallback(audit: Path) -> bool:
    return any(r["body"]["target"] == "FALLBACK" for r in _modes(audit))


# ------------------------------------------------------------------------------ Nightscout
def _t1d_scenario(path: Path) -> Path:
    """t1d_openaps.toml decided every 2 s (not 5 min), a CGM reading stale after 4 s (not
    20 min), so a test sees both within seconds. The emulated CGM's sine moves 0.07 mg/dL
    a second: rounded to whole mg/dL it repeats for many readings, which the flat-line rule
    (meant for 20 readings 5 min apart) would take for a frozen sensor - off here."""
    text = T1D_SCENARIO.read_text("utf-8")
    text, n = re.subn(r"(?m)^period_s = 300\n(lease_periods = 6)",
                      r"period_s = 2\n\1", text)
    assert n == 1
    text, n = re.subn(r"(?m)^stale_after_s = 1200 .*$",
                      "stale_after_s = 4\nflatline_samples = 0", text)
    assert n == 1
    path.write_text(text, "utf-8")
    return path


def test_nightscout_glucose_drives_the_controller_and_a_stale_site_means_fallback(tmp_path):
    audit = tmp_path / "audit.sqlite"
    scenario = _t1d_scenario(tmp_path / "t1d_fast.toml")
    site = NightscoutEmulator(secret="demo-secret-123", cgm_every_s=1.0).start()
    ns_tel, = free_addresses(1)
    config = tmp_path / "ns.toml"
    config.write_text(
        f'[bridge]\nkind = "nightscout"\ntelemetry = "{ns_tel}"\nheartbeat_s = 0.5\n'
        f'[nightscout]\nurl = "{site.url}"\napi_secret = "demo-secret-123"\nvar = "cgm"\n'
        f'poll_s = 0.5\nstale_after_s = 3\nlink_timeout_s = 5\n', "utf-8")
    procs: list[subprocess.Popen] = []
    try:
        with _FakePumpBridge() as pumps:
            procs.append(subprocess.Popen(cli("serve", "sensor-bridge", str(config),
                                              "--audit", str(audit), "--duration", "90")))
            controller = subprocess.Popen(cli(
                "serve", "controller", str(scenario), "--patient", "1", "--no-plant",
                "--telemetry", pumps.telemetry, "--sensor", ns_tel,
                "--pump", f"insulin={pumps.commands}", "--realtime", "1",
                "--duration", "15", "--workers", "0", "--audit", str(audit)),
                stdout=subprocess.PIPE, text=True)
            procs.append(controller)
            _wait_for(lambda: _closed_loop_commands(audit), procs, 30,
                      "closed loop on the site's glucose")
            site.frozen = True  # the CGM uploads no more entries: a stale source
            _wait_for(lambda: _fallback(audit), procs, 15, "FALLBACK on stale glucose")
            out, _ = controller.communicate(timeout=40)
    finally:
        _stop_all(procs)
        site.close()
    assert controller.returncode == 0, out
    assert re.search(r"controller: \d+ cycles, missed acks 0", out), out
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]

    rows = _controller_rows(audit)
    glucose = [r["body"] for r in rows if r["kind"] == "measurement"
               and r["direction"] == "in" and r["src"] == "nightscout-bridge"]
    # the site's CGM entries (those published after the controller subscribed), stamped by
    # their own date (UTC) and in its unit
    assert glucose and {g["var"] for g in glucose} == {"cgm"}
    assert {g["unit"] for g in glucose} == {"mg/dL"}
    assert {g["quality"] for g in glucose} == {"valid"}
    assert all(abs(g["t_meas"] - time.time()) < 300 for g in glucose)
    entries = {e["sgv"] for e in site.entries}
    assert {g["value"] for g in glucose} <= entries  # no made-up value
    sets = [r for r in rows if r["kind"] == "set_rate" and r["direction"] == "out"]
    assert sets and {r["body"]["pump"] for r in sets} == {"insulin"}
    assert any(r["body"]["rate"] > 0 for r in sets)

    modes = [r for r in rows if r["kind"] == "mode"]
    to_fallback = next(r for r in modes if r["body"]["target"] == "FALLBACK")
    assert "cgm stale" in to_fallback["body"]["cause"]
    alarms = [r for r in rows if r["kind"] == "alarm"]
    assert any(r["direction"] == "note" and r["body"]["alarm"]["code"] == "data.stale"
               for r in alarms)  # the supervisor's
    assert any(r["direction"] == "in" and r["src"] == "nightscout-bridge"
               and r["body"]["code"] == "sensor.stale" for r in alarms)  # the bridge's
    _no_rate_rises_after(sets, to_fallback)
    # no reading after the freeze: the bridge relays nothing old
    last_entry_ms = max(e["date"] for e in site.entries)
    assert all(g["t_meas"] <= last_entry_ms / 1000 + 1e-3 for g in glucose)


# ------------------------------------------------------------------------------ SDC
class _WanderingProviderBis:
    """Publishes the provider's BIS every 0.25 s, wandering around 65 (so the flat-line
    rule does not take the provider for a dead sensor), with the provider's validity."""

    def __init__(self, provider) -> None:
        self.provider = provider
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        k = 0
        while not self._stop.wait(0.25):
            k += 1
            try:
                self.provider.publish("bis", round(65.0 + 5.0 * math.sin(k / 4.0), 1))
            except Exception:  # noqa: BLE001 - the provider closing under the thread
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(2)


def test_sdc_bis_drives_the_controller_and_invalid_metrics_mean_fallback(tmp_path):
    pytest.importorskip("sdc11073", reason="the SDC bridge needs the sdc11073 package "
                                           "(pip install 'mpc-dose[sdc]')")
    from hil.sdc_provider import BenchProvider

    audit = tmp_path / "audit.sqlite"
    sdc_tel, = free_addresses(1)
    provider = BenchProvider().start()
    config = tmp_path / "sdc.toml"
    config.write_text(
        f'[bridge]\naddress = "{provider.address}"\ntelemetry = "{sdc_tel}"\n'
        f'stale_s = 2.0\n'
        f'[[metric]]\nhandle = "bis"\nvar = "bis"\nunit = "1"\n', "utf-8")
    procs: list[subprocess.Popen] = []
    try:
        with _WanderingProviderBis(provider), _FakePumpBridge() as pumps:
            procs.append(subprocess.Popen(cli("serve", "sdc-bridge", str(config),
                                              "--audit", str(audit), "--duration", "90"),
                                          stdout=subprocess.DEVNULL))
            controller = subprocess.Popen(cli(
                "serve", "controller", str(BIS_SCENARIO), "--patient", "3", "--no-plant",
                "--telemetry", pumps.telemetry, "--sensor", sdc_tel,
                "--pump", f"propofol={pumps.commands}",
                "--pump", f"remifentanil={pumps.commands}", "--realtime", "1",
                "--duration", "15", "--workers", "0", "--audit", str(audit)),
                stdout=subprocess.PIPE, text=True)
            procs.append(controller)
            _wait_for(lambda: _closed_loop_commands(audit), procs, 30,
                      "closed loop on the provider's BIS")
            provider.validity = "Inv"  # the device says its metrics are invalid
            _wait_for(lambda: _fallback(audit), procs, 15, "FALLBACK on invalid BIS")
            out, _ = controller.communicate(timeout=40)
    finally:
        _stop_all(procs)
        provider.close()
    assert controller.returncode == 0, out
    assert re.search(r"controller: \d+ cycles, missed acks 0", out), out
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]

    rows = _controller_rows(audit)
    bis = [r["body"] for r in rows if r["kind"] == "measurement" and r["direction"] == "in"
           and r["src"] == "sdc-bridge" and r["body"]["var"] == "bis"]
    # the provider's BIS, stamped by its DeterminationTime (UTC), valid then invalid
    assert len(bis) > 10 and all(abs(b["t_meas"] - time.time()) < 300 for b in bis)
    assert {b["quality"] for b in bis} == {"valid", "invalid"}
    first_invalid = next(i for i, b in enumerate(bis) if b["quality"] == "invalid")
    assert {b["quality"] for b in bis[first_invalid:]} == {"invalid"}
    sets = [r for r in rows if r["kind"] == "set_rate" and r["direction"] == "out"]
    assert sets and any(r["body"]["rate"] > 0 for r in sets)

    modes = [r for r in rows if r["kind"] == "mode"]
    to_fallback = next(r for r in modes if r["body"]["target"] == "FALLBACK")
    assert "bis flagged invalid" in to_fallback["body"]["cause"]
    assert not any(r["body"]["target"] == "CLOSED_LOOP" for r in modes
                   if r["id"] > to_fallback["id"])  # invalid to the end: no resuming
    assert any(r["direction"] == "note" and r["body"]["alarm"]["code"] == "data.invalid"
               for r in rows if r["kind"] == "alarm")
    _no_rate_rises_after(sets, to_fallback)

