"""The live monitor's parts without a browser: the ``plan`` and ``alarm_ack`` messages
(protocol 1.2), the controller node's plan, ``serve controller --publish`` across processes,
the monitor's sans-I/O state (series, deltas, link health, alarms, acknowledgements) and the
web monitor's access rules. The page itself is tested in a browser: test_web_monitor.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_dose.cli import main
from mpc_dose.control.base import Decision, Forecast
from mpc_dose.errors import ConfigError
from mpc_dose.monitor.state import MonitorState, UnknownAlarm, loops_of
from mpc_dose.node import ControllerNode, PumpRoute
from mpc_dose.protocol.codec import Envelope, decode, encode
from mpc_dose.protocol.messages import (MAX_PLAN_STAGES, Alarm, AlarmAck, Heartbeat,
                                        LocalProtocolError, Measurement, Plan, PlanInput,
                                        PumpStatus)
from mpc_dose.scenario import load_scenario
from mpc_dose.trial.build import build_setup
from mpc_dose.trial.closed_loop import PlantSide
from tests.ports import free_addresses
from tests.test_protocol import EXAMPLES

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "scenarios"


def plan_input(**changes) -> PlanInput:
    fields = dict(input="propofol", pump="propofol", unit="mg/s", rates=(1.0, 2.0), conc=10.0)
    fields.update(changes)
    return PlanInput(**fields)


def plan(**changes) -> Plan:
    fields = dict(times_s=(0.0, 5.0, 10.0), inputs=(plan_input(),), var="bis", output="bis",
                  unit="1", predicted=(70.0, 60.0), target=50.0, band_low=40.0,
                  band_high=60.0, mode="CLOSED_LOOP", status="ok")
    fields.update(changes)
    return Plan(**fields)


# ---------------------------------------------------------------- the messages


@pytest.mark.parametrize("changes, match", [
    ({"times_s": (0.0,)}, "2 or more rising times"),
    ({"times_s": (0.0, 5.0, 5.0)}, "2 or more rising times"),
    ({"times_s": (0.0, math.inf, 10.0)}, r"times_s\[1\]: expected a finite number"),
    ({"times_s": [float(k) for k in range(MAX_PLAN_STAGES + 2)]}, "at most 201"),
    ({"inputs": ()}, "expected 1-4 inputs"),
    ({"inputs": (plan_input(),) * 5}, "expected 1-4 inputs"),
    ({"inputs": (plan_input(rates=(1.0,)),)}, "1 rates for 2 stages"),
    ({"inputs": ("propofol",)}, "expected an input"),
    ({"predicted": (70.0,)}, "1 values for 2 stages"),
    ({"unit": None}, "need their unit"),
    ({"unit": "mg/dl"}, "unit: 'mg/dl' is not one of"),
    ({"band_low": 61.0}, "band_low 61.0 > band_high 60.0"),
    ({"deadline_misses": -1}, "deadline_misses: expected a whole number"),
    ({"solve_s": -0.1}, "solve_s: expected >= 0.0"),
])
def test_a_bad_plan_is_never_built(changes, match):
    """Every field is checked when a plan is built (and so when one is decoded)."""
    with pytest.raises(LocalProtocolError, match=match):
        plan(**changes)


@pytest.mark.parametrize("changes, match", [
    ({"rates": (1.0, -0.5)}, "expected rates >= 0"),
    ({"unit": "mL/h"}, "inputs.unit: 'mL/h' is not one of"),
    ({"conc": 0.0}, "inputs.conc: expected > 0"),
    ({"rates": ("1", 2.0)}, r"inputs.rates\[0\]: expected a number"),
])
def test_a_bad_plan_input_is_never_built(changes, match):
    with pytest.raises(LocalProtocolError, match=match):
        plan_input(**changes)


def test_a_plan_frame_with_extra_input_fields_decodes_and_a_broken_one_is_refused():
    """Telemetry readers ignore unknown fields, also inside a plan's inputs (a later
    revision may add some); a wrong one is refused with a reason code, never a crash."""
    doc = json.loads(encode(Envelope(plan(), "controller-1", "e", 1, 0.0, 5.0)))
    doc["body"]["inputs"][0]["later_field"] = 1
    doc["body"]["later_field"] = [1, 2]
    assert decode(json.dumps(doc).encode()).message == plan()
    doc["body"]["inputs"][0]["rates"] = [1.0, {"a": 1}]
    from mpc_dose.protocol.messages import RemoteProtocolError
    with pytest.raises(RemoteProtocolError, match="inputs.rates") as info:
        decode(json.dumps(doc).encode())
    assert info.value.code == "schema"


# ---------------------------------------------------------------- the controller node


def node_for(name: str):
    setup, _ = build_setup(load_scenario(SCENARIOS / name), 0, 0)
    return ControllerNode(setup.controller, PlantSide.routes_for(setup), safety=setup.safety,
                          lease_periods=setup.lease_periods), setup


def test_the_nmpc_node_publishes_its_horizon_and_its_prediction():
    """TIVA NMPC: the plan has one stage per period of the 30-period horizon, starting at the
    decision; its first stage is the command the node sent; the prediction has a value per
    stage; target and band are passed through; it round-trips through the codec."""
    node, setup = node_for("tiva_benchmark.toml")
    for k in range(3):
        t = 5.0 * k
        node.receive(Measurement(var="bis", value=95.0 - 5 * k, unit="1", t_meas=t), t)
        node.tick(t)
    p = node.plan(target=50.0, band=(40.0, 60.0), deadline_misses=0)
    horizon = setup.controller.mpc.config.horizon
    assert p.times_s == pytest.approx([10.0 + 5.0 * k for k in range(horizon + 1)])
    assert len(p.predicted) == horizon and all(0 <= y <= 100 for y in p.predicted)
    first = {i.input: i.rates[0] for i in p.inputs}
    assert first == pytest.approx(node.commanded)
    assert {i.input: (i.pump, i.unit, i.conc) for i in p.inputs} == {
        "propofol": ("propofol", "mg/s", 10.0), "remifentanil": ("remifentanil", "ug/s", 50.0)}
    assert (p.var, p.output, p.unit, p.target, p.band_low, p.band_high) == \
        ("bis", "bis", "1", 50.0, 40.0, 60.0)
    assert p.mode == "CLOSED_LOOP" and p.status == "ok" and p.solve_s >= 0
    assert decode(encode(Envelope(p, "controller-1", "e", 0, 0.0, 10.0))).message == p


def test_a_controller_without_a_forecast_publishes_the_stage_it_decided():
    """PID: one stage of one period from the decision, the rates it commanded, no
    prediction."""
    node, setup = node_for("hil_pid_newera.toml")
    assert node.plan() is None  # nothing decided yet
    node.receive(Measurement(var="bis", value=90.0, unit="1", t_meas=0.0), 0.0)
    node.tick(0.0)
    p = node.plan()
    assert p.times_s == (0.0, setup.controller.period_s) and p.predicted == ()
    assert {i.input: i.rates for i in p.inputs} == {k: (v,) for k, v in node.commanded.items()}


class _Forecaster:
    """A controller whose forecast is as long as asked, or fails."""

    name, period_s, inputs = "fake", 10.0, ("drug",)

    def __init__(self, stages: int | None) -> None:
        self.stages = stages

    def decide(self, t_s, readings):
        return Decision(t_s, {"drug": 0.5}, "fake")

    def forecast(self, t_s):
        if self.stages is None:
            raise RuntimeError("the model evaluation failed")
        return Forecast(t_s, 10.0, {"drug": [0.5] * self.stages}, "level", "mg/L",
                        [1.0] * self.stages)


def fake_node(stages):
    return ControllerNode(_Forecaster(stages), {"drug": PumpRoute("drug", "pump-1", 2.0, "mg")})


def test_a_long_horizon_is_cut_to_what_a_frame_carries():
    node = fake_node(5000)
    node.tick(0.0)
    p = node.plan()
    assert len(p.times_s) == MAX_PLAN_STAGES + 1 and len(p.predicted) == MAX_PLAN_STAGES
    assert p.unit == "mg/L" and p.output == "level"


def test_a_failing_forecast_never_stops_the_loop():
    """The display is not worth a dose: a forecast that raises gives the one-stage plan."""
    node = fake_node(None)
    node.tick(0.0)
    p = node.plan()
    assert p.times_s == (0.0, 10.0) and p.predicted == () and p.inputs[0].rates == (0.5,)


def test_serve_controller_publishes_plans_and_its_mode_across_processes(tmp_path):
    """`serve controller --publish`: a plan per decision at the plant's tick times (the
    PID every 2 s), with the scenario's target band, and heartbeats carrying the mode."""
    import zmq

    from mpc_dose.transport.zmq_link import TelemetryReader

    tel, cmd, pub = free_addresses(3)
    context = zmq.Context()
    try:
        reader = TelemetryReader(context, [pub])  # connects before the publisher binds
        events = reader.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        scenario = str(SCENARIOS / "hil_pid_newera.toml")
        cli = [sys.executable, "-m", "mpc_dose.cli", "serve"]
        controller = subprocess.Popen(cli + ["controller", scenario, "--telemetry", tel,
                                             "--commands", cmd, "--publish", pub])
        # PUB/SUB drops what is sent before the subscriber joins (a loaded CI machine once
        # lost the first 136 plans): the plant, whose telemetry the controller decides on,
        # starts only once this reader is connected to the controller's publisher
        assert events.poll(60_000), "the controller's publisher never accepted the reader"
        reader.sock.disable_monitor()
        plant = subprocess.Popen(cli + ["plant", scenario, "--telemetry", tel,
                                        "--commands", cmd])
        heard = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (controller.poll() is None or
                                               reader.sock.poll(0)):
            heard.extend(reader.drain(0.2))
        heard.extend(reader.drain(0.5))
        assert plant.wait(30) == 0 and controller.wait(30) == 0
    finally:
        context.destroy(linger=0)
    plans = [e for e in heard if isinstance(e.message, Plan)]
    beats = [e for e in heard if isinstance(e.message, Heartbeat)]
    # every decision's plan, at the plant's 2-s ticks (the subscription reaches the
    # publisher a moment after the handshake: at most the very first may be missed)
    times = [e.message.times_s[0] for e in plans]
    assert times == [float(t) for t in range(602 - 2 * len(times), 601, 2)]
    assert len(plans) >= 300  # 301 decisions, t = 0 to 600 s
    for envelope in plans:
        p = envelope.message
        assert envelope.src == "controller-1" and p.times_s[0] == envelope.t_sim
        assert p.times_s[1] - p.times_s[0] == 2.0 and p.deadline_misses == 0
        assert (p.target, p.band_low, p.band_high, p.unit, p.var) == (50, 40, 60, "1", "bis")
    assert {e.message.state for e in beats} == {"CLOSED_LOOP"}
    assert {e.message.role for e in beats} == {"controller"}


# ---------------------------------------------------------------- the monitor's state


def env(message, seq, t_sim=None, src="plant", epoch="e1", t_sent=1000.0):
    return Envelope(message, src, epoch, seq, t_sent, t_sim)


def bis(value, t, quality="valid"):
    return Measurement(var="bis", value=value, unit="1", t_meas=t, quality=quality)


def test_series_go_to_the_page_once_and_invalid_readings_are_gaps():
    """The first view holds every point, the next only the new ones; a reading flagged
    invalid is a gap (None) in the chart and shown with its flag, never as a value."""
    state = MonitorState()
    for k in range(3):
        state.receive("loop", "tcp://a", env(bis(90.0 - k, float(k)), k, float(k)), 10.0)
    view, cursor = state.view(None, 10.5)
    (loop,) = view["loops"]
    assert loop["measured"]["reset"] and loop["measured"]["points"] == [
        [0.0, 90.0], [1.0, 89.0], [2.0, 88.0]]
    state.receive("loop", "tcp://a", env(bis(0.0, 3.0, "invalid"), 3, 3.0), 11.0)
    view, cursor = state.view(cursor, 11.5)
    (loop,) = view["loops"]
    assert not loop["measured"]["reset"] and loop["measured"]["points"] == [[3.0, None]]
    assert loop["readings"][0]["quality"] == "invalid"
    view, _ = state.view(cursor, 12.0)
    assert view["loops"][0]["measured"]["points"] == []
    json.dumps(view, allow_nan=False)


def test_a_restarted_plant_clock_restarts_the_history():
    state = MonitorState(window_s=100.0)
    for k, t in enumerate((500.0, 501.0, 0.0)):  # a restarted simulated plant: t back to 0
        state.receive("loop", "tcp://a", env(bis(50.0, t), k, t), 1.0)
        if k == 1:
            _, cursor = state.view(None, 1.0)
    view, _ = state.view(cursor, 1.0)
    assert view["loops"][0]["measured"] == {"key": "loop|m|bis", "reset": True,
                                            "points": [[0.0, 50.0]]}


def test_link_health_counts_lost_messages_restarts_and_silence():
    """A seq gap is lost messages, a new epoch a restart; a sender is 'late' after 1.5 and
    'lost' after 3 of its heartbeat periods of silence (docs/protocol.md), 'ended' after
    saying it finished."""
    state = MonitorState()
    state.receive("loop", "tcp://a", env(Heartbeat(role="plant", period_s=2.0), 0), 100.0)
    state.receive("loop", "tcp://a", env(Heartbeat(role="plant", period_s=2.0), 4), 100.0)
    state.receive("loop", "tcp://a", env(Heartbeat(role="plant", period_s=2.0), 0,
                                         epoch="e2"), 100.0)
    status = {now: state.view(None, now)[0]["links"][0]["status"]
              for now in (102.0, 103.5, 106.5)}
    assert status == {102.0: "ok", 103.5: "late", 106.5: "lost"}
    (link,) = state.view(None, 102.0)[0]["links"]
    assert (link["lost"], link["restarts"], link["messages"]) == (3, 1, 3)
    state.receive("loop", "tcp://a", env(Heartbeat(role="plant", state="finished",
                                                   period_s=0.0), 1, epoch="e2"), 100.0)
    assert state.view(None, 200.0)[0]["links"][0]["status"] == "ended"


def test_pump_rates_are_shown_in_the_plan_unit():
    """A pump's mL/h in the plan's dose unit through the plan's concentration: 36 mL/h of
    10 mg/mL = 0.1 mg/s; a stopped pump delivers 0."""
    state = MonitorState()
    state.receive("loop", "tcp://c", env(plan(), 0, 0.0, src="controller-1"), 1.0)
    for k, s in enumerate(("infusing", "stopped")):
        state.receive("loop", "tcp://b", env(PumpStatus(pump="propofol", state=s, rate=36.0),
                                             k, float(k), src="pump-bridge"), 1.0)
    (pump,) = state.view(None, 1.0)[0]["loops"][0]["pumps"]
    assert pump["series"]["unit"] == "mg/s"
    assert [v * pump["series"]["factor"] for _, v in pump["series"]["points"]] == \
        pytest.approx([0.1, 0.0])


def test_alarms_are_one_entry_per_condition_and_acknowledged_once():
    state = MonitorState()
    high = Alarm(code="data.stale", priority="high", kind="technical", text="no BIS")
    state.receive("loop", "tcp://a", env(high, 5, 10.0), 1.0)
    state.receive("loop", "tcp://a", env(high, 6, 11.0), 1.0)
    (entry,) = state.view(None, 1.0)[0]["alarms"]
    assert entry["count"] == 2 and entry["active"] and entry["ack"] is None
    with pytest.raises(UnknownAlarm, match="no alarm 99"):
        state.ack_message(99, "nurse")
    with pytest.raises(LocalProtocolError, match="operator: expected a non-empty string"):
        state.ack_message(entry["id"], "")
    ack = state.ack_message(entry["id"], "nurse", "checked the sensor")
    assert (ack.alarm_src, ack.alarm_epoch, ack.alarm_seq, ack.code, ack.priority) == \
        ("plant", "e1", 6, "data.stale", "high")
    state.acknowledged(entry["id"], ack, 1234.0)
    with pytest.raises(UnknownAlarm, match="already acknowledged by nurse"):
        state.ack_message(entry["id"], "nurse")
    state.receive("loop", "tcp://a", env(Alarm(code="data.stale", priority="high",
                                               kind="technical", active=False), 7, 12.0), 1.0)
    (entry,) = state.view(None, 1.0)[0]["alarms"]
    assert not entry["active"] and entry["ack"]["operator"] == "nurse"


def test_a_worse_alarm_needs_a_new_acknowledgement_and_others_acks_count():
    state = MonitorState()
    for seq, priority in enumerate(("low", "high")):
        state.receive("loop", "tcp://a", env(Alarm(code="x", priority=priority,
                                                   kind="technical"), seq), 1.0)
        if seq == 0:
            state.acknowledged(1, state.ack_message(1, "a"), 1.0)
    assert state.view(None, 1.0)[0]["alarms"][0]["ack"] is None  # raised to high
    other = AlarmAck(alarm_src="plant", alarm_epoch="e1", alarm_seq=1, code="x",
                     priority="high", operator="colleague")
    state.receive("loop", "tcp://ack", env(other, 0, src="monitor"), 1.0)
    assert state.view(None, 1.0)[0]["alarms"][0]["ack"]["operator"] == "colleague"


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(EXAMPLES), st.sampled_from(["a", "b"]),
                          st.one_of(st.none(), st.floats(-1e9, 1e9)),
                          st.integers(0, 10), st.sampled_from(["e1", "e2"])), max_size=40))
def test_any_sequence_of_valid_messages_gives_a_view(messages):
    """Whatever valid messages arrive, in whatever order, the view is finite JSON."""
    state = MonitorState(window_s=60.0)
    cursor = None
    for k, (message, loop, t_sim, seq, epoch) in enumerate(messages):
        state.receive(loop, f"tcp://{loop}", env(message, seq, t_sim, epoch=epoch), float(k))
        if k % 7 == 0:
            view, cursor = state.view(cursor, float(k))
            json.dumps(view, allow_nan=False)
    json.dumps(state.view(cursor, 1e6)[0], allow_nan=False)


# ---------------------------------------------------------------- access rules


def test_loops_are_named_groups_of_addresses():
    assert loops_of(["bed3=tcp://10.0.0.3:5560", "tcp://127.0.0.1:5563"]) == [
        ("bed3", "tcp://10.0.0.3:5560"), ("loop", "tcp://127.0.0.1:5563")]


def test_the_page_beyond_loopback_needs_a_token(capsys):
    from mpc_dose.monitor.web import check_access

    with pytest.raises(ConfigError, match=r"--host '0.0.0.0' is not loopback.*--token"):
        check_access("0.0.0.0", None)
    with pytest.raises(ConfigError, match="--token: 5 characters; expected at least 16"):
        check_access("127.0.0.1", "short")
    check_access("127.0.0.1", None)
    check_access("::1", None)
    check_access("192.168.1.20", "a" * 16)
    assert main(["monitor", "--web", "--host", "0.0.0.0", "tcp://127.0.0.1:5999"]) == 2
    assert "is not loopback" in capsys.readouterr().err


def test_the_token_can_come_from_a_file(tmp_path):
    from mpc_dose.monitor.web import read_token

    (tmp_path / "token").write_text("s3cret-token-of-20c\n")
    assert read_token(f"@{tmp_path / 'token'}") == "s3cret-token-of-20c"
    with pytest.raises(ConfigError, match="cannot read the token file"):
        read_token(f"@{tmp_path / 'none'}")


def test_page_options_without_web_are_refused(capsys):
    assert main(["monitor", "tcp://127.0.0.1:5999", "--token", "x" * 20, "--audit",
                 "a.sqlite"]) == 2
    assert "--token, --audit: only with --web" in capsys.readouterr().err


def test_a_port_in_use_is_a_clear_error(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["monitor", "--web", "tcp://127.0.0.1:5999", "--port", str(port)]) == 2
    assert f"--port {port}: the web server could not start" in capsys.readouterr().err
