"""The serve layer's configuration, keys, audit log and sensor relay."""

from __future__ import annotations

import csv

import pytest

from hil.sensor_relay import parse_line
from mpc_dose.audit import AuditLog
from mpc_dose.cli import main
from mpc_dose.errors import ConfigError
from mpc_dose.protocol.codec import Envelope
from mpc_dose.protocol.messages import Ack, SetRate
from mpc_dose.serve.pump_bridge import load_bridge_config


def bridge(**changes):
    data = {"bridge": {"serial": "loop://", "commands": "tcp://127.0.0.1:5562",
                       "telemetry": "tcp://127.0.0.1:5563", "safe_mode_s": 3, "poll_s": 0.5},
            "pump": [{"pump": "propofol", "address": 0, "concentration": 10.0,
                      "amount_unit": "mg", "max_rate_ml_per_h": 1200}]}
    for key, value in changes.items():
        section, name = key.split("__")
        target = data[section] if section == "bridge" else data["pump"][0]
        target[name] = value
    return data


def test_a_valid_bridge_config_loads():
    config = load_bridge_config(bridge())
    assert config.bridge.safe_mode_s == 3 and config.pump[0].address == 0


@pytest.mark.parametrize("changes, match", [
    ({"bridge__safe_mode_s": 1}, "more than twice poll_s"),
    ({"bridge__safe_mode_s": 300}, "bridge.safe_mode_s"),
    ({"pump__max_lease_s": 2.0}, "max_lease_s 2.0 is shorter than safe_mode_s"),
    ({"pump__address": 100}, "pump.0.address"),
    ({"pump__max_rate_ml_per_h": -1}, "pump.0.max_rate_ml_per_h"),
    ({"pump__colour": "red"}, "pump.0.colour"),
    ({"bridge__poll_s": "fast"}, "bridge.poll_s"),
    ({"bridge__safe_mode_s": 0}, "without their hardware watchdog.*no_hardware_watchdog = "
                                 "true"),
    ({"bridge__no_hardware_watchdog": True}, "no_hardware_watchdog = true with safe_mode_s "
                                             "= 3: choose one"),
    ({"pump__amount_unit": "furlong"}, "amount_unit 'furlong' is not one of"),
])
def test_inconsistent_bridge_configs_are_refused_at_start_up(changes, match):
    """T38: start-up refuses a config that could not be safe, naming the field."""
    with pytest.raises(ConfigError, match=match):
        load_bridge_config(bridge(**changes))


def test_running_without_the_hardware_watchdog_is_an_explicit_choice():
    """14.5: safe_mode_s = 0 loads only with no_hardware_watchdog = true, and then the
    bridge knows it has no watchdog (its alarms say so)."""
    config = load_bridge_config(bridge(bridge__safe_mode_s=0,
                                       bridge__no_hardware_watchdog=True))
    assert config.watchdog_s is None
    assert load_bridge_config(bridge()).watchdog_s == 3.0


def test_duplicate_pump_addresses_are_refused():
    data = bridge()
    data["pump"].append(dict(data["pump"][0], pump="remifentanil"))
    with pytest.raises(ConfigError, match="unique"):
        load_bridge_config(data)


def test_keys_command_writes_a_private_secret_and_a_public_key(tmp_path, capsys):
    assert main(["keys", str(tmp_path), "bridge"]) == 0
    assert (tmp_path / "bridge.key").exists()
    assert (tmp_path / "bridge.key_secret").stat().st_mode & 0o077 == 0
    assert "never in a repository" in capsys.readouterr().out


def test_audit_rows_survive_and_export_to_csv(tmp_path):
    """Rows are committed as written: a second connection (another process) sees them
    before the writer closes; the export writes every row."""
    path = tmp_path / "audit.sqlite"
    log = AuditLog(path, "pump-bridge")
    command = SetRate(cmd_id="c1", pump="p", rate=5.0, unit="mL/h", lease_s=6.0)
    log.message("in", Envelope(command, "ctl", "e1", 7, 1.0, 12.0))
    log.message("out", Envelope(Ack(cmd_id="c1", ok=True, code="applied"), "br", "e2", 0,
                                1.1, 12.0))
    log.note("mode", 12.0, pump="p", source="READY", target="COMMANDED", cause="c1")
    reader = AuditLog(path, "reader")  # before the writer closes
    assert [r["kind"] for r in reader.rows()] == ["set_rate", "ack", "mode"]
    log.close()
    out = tmp_path / "audit.csv"
    assert main(["log", "export", str(path), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 and rows[0]["seq"] == "7" and '"cmd_id": "c1"' in rows[0]["body"]


def test_log_export_of_a_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["log", "export", str(tmp_path / "none.sqlite"), "--out",
                 str(tmp_path / "x.csv")]) == 2
    assert "no audit log at" in capsys.readouterr().err


@pytest.mark.parametrize("line, value, quality", [
    ("45.2\n", 45.2, "valid"), (" 40 , questionable", 40.0, "questionable"),
    ("nan", None, None), ("inf", None, None), ("1e400", None, None), ("", None, None),
    ("abc", None, None), ("42,broken", None, None)])
def test_sensor_relay_lines(line, value, quality):
    """Only finite numbers with a known quality become measurements (T5 at the relay)."""
    message = parse_line(line, var="bis", unit="1", t_s=3.0)
    if value is None:
        assert message is None
    else:
        assert message.value == value and message.quality == quality and message.t_meas == 3.0


def test_monitor_prints_values_modes_and_alarms(capsys):
    """`mpc-dose monitor` shows live measurements, pump modes and alarms from telemetry."""
    import threading
    import time

    import zmq

    from mpc_dose.protocol.messages import Alarm, Heartbeat, Measurement, PumpStatus
    from mpc_dose.transport.zmq_link import Telemetry

    from tests.ports import free_addresses

    (address,) = free_addresses(1)
    context = zmq.Context()
    pub = Telemetry(context, address, src="plant")
    stop = threading.Event()

    def publish():
        while not stop.is_set():
            pub.send(Measurement(var="bis", value=48.5, unit="1", t_meas=3.0), t_sim=3.0)
            pub.send(PumpStatus(pump="propofol", state="infusing", rate=120.0,
                                mode="COMMANDED"))
            pub.send(Alarm(code="pump.lease_expired", priority="medium", kind="technical",
                           text="no command"))
            pub.send(Heartbeat(role="plant", state="waiting"))
            time.sleep(0.05)

    thread = threading.Thread(target=publish)
    thread.start()
    try:
        assert main(["monitor", address, "--duration", "1.0"]) == 0
    finally:
        stop.set()
        thread.join()
        context.destroy(linger=0)
    out = capsys.readouterr().out
    assert "plant: bis = 48.5 [valid]" in out  # dimensionless: no "1" as a unit
    assert out.count("plant waiting") == 1  # a heartbeat is shown when its state changes
    assert "pump propofol infusing 120 mL/h mode COMMANDED" in out
    assert "ALARM medium pump.lease_expired" in out


def test_curve_flags_are_checked_before_anything_binds(tmp_path, capsys):
    """14.1: a server with --keys needs --allow-keys (deny by default); a client (the
    controller, the monitor) binds nothing and takes no allow-list; an allow-list without
    own keys is an error; a folder without keys is an error naming it."""
    assert main(["keys", str(tmp_path), "plant"]) == 0
    secret = str(tmp_path / "plant.key_secret")
    scenario = "scenarios/hil_pid_newera.toml"
    cases = [
        (["serve", "plant", scenario, "--keys", secret], "--keys without --allow-keys"),
        (["serve", "controller", scenario, "--keys", secret, "--allow-keys", str(tmp_path)],
         "binds no socket"),
        (["serve", "plant", scenario, "--allow-keys", str(tmp_path)], "need --keys"),
        (["serve", "plant", scenario, "--keys", secret, "--allow-keys",
          str(tmp_path / "nowhere")], "no such file or folder"),
        (["monitor", "tcp://127.0.0.1:5999", "--keys", secret], "needs this server's public key"),
    ]
    for argv, match in cases:
        assert main(argv) == 2, argv
        assert match in capsys.readouterr().err, argv


def test_errors_say_what_to_do_instead_of_a_traceback(tmp_path, capsys):
    """Issue 16.6: a monitor address without tcp://, a plant nobody connects to (a wrong
    CURVE key looks the same), an NMPC with an empty estimator list, an MHE setting named
    as in the scenario (not its internal config name)."""
    from tests.ports import free_addresses

    assert main(["monitor", "127.0.0.1:5999", "--duration", "0.1"]) == 2
    assert "expected tcp://HOST:PORT" in capsys.readouterr().err
    tel, cmd = free_addresses(2)
    assert main(["serve", "plant", "scenarios/hil_pid_newera.toml", "--telemetry", tel,
                 "--commands", cmd, "--wait", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "no controller hello within 0.5 s" in err and "a wrong key looks exactly like" in err
    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.build import build_setup

    with pytest.raises(ConfigError, match=r"controller\.nmpc\.estimator\.parameters: empty"):
        build_setup(load_scenario("scenarios/tiva_nmpc_training.toml",
                                  {"controller.nmpc.estimator.parameters": []}), 0, 0)
    with pytest.raises(ConfigError, match=r"^controller\.nmpc\.estimator\.min_samples: need"):
        build_setup(load_scenario("scenarios/tiva_nmpc_training.toml",
                                  {"controller.nmpc.estimator.min_samples": 50}), 0, 0)
