"""The controller node runs every controller kind behind the one safety supervisor
(DESIGN "One control cycle", step 3; "Safety behaviours"): a frozen or stale reading never
raises the dose, switches to FALLBACK with an alarm and lets the pump lease run out; hard
clamps hold for every kind; a new epoch of the plant invalidates its old readings."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpc_dose.protocol.messages import Alarm, GetStatus, Measurement, PumpStatus, SetRate
from mpc_dose.node import ControllerNode
from mpc_dose.scenario import load_scenario
from mpc_dose.trial.build import build_setup
from mpc_dose.trial.closed_loop import PlantSide

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "scenarios"


def node_for(name: str, overrides: dict | None = None, *, index: int = 0):
    """(node, setup) for patient *index* of a shipped scenario, as `mpc-dose run` builds it."""
    setup, _ = build_setup(load_scenario(SCENARIOS / name, overrides), index, 0)
    node = ControllerNode(setup.controller, PlantSide.routes_for(setup), safety=setup.safety,
                          lease_periods=setup.lease_periods)
    return node, setup


def bis(value: float, t: float, quality: str = "valid") -> Measurement:
    return Measurement(var="bis", value=value, unit="1", t_meas=t, quality=quality)


def split(messages):
    """(set_rate by pump, get_status pumps, alarms) of one tick."""
    rates = {m.pump: m for m in messages if isinstance(m, SetRate)}
    status = {m.pump for m in messages if isinstance(m, GetStatus)}
    alarms = [m for m in messages if isinstance(m, Alarm)]
    return rates, status, alarms


# ---------------------------------------------------------------- frozen and stale data


def test_pid_on_a_frozen_reading_falls_back_and_never_raises_the_dose():
    """The PID fed BIS 70 every second for 40 s (a frozen monitor: identical values): after
    flatline_samples readings the mode is FALLBACK with a data.flatline alarm, and the
    commanded propofol rate never increases from that point (unsupervised it climbed
    0 -> 179 -> 269 -> 314 -> 337 mL/h)."""
    node, setup = node_for("pid_induction_13.toml")
    samples = setup.safety.flatline_samples
    commanded, alarms, modes = [], [], []
    for t in range(40):
        node.receive(bis(70.0, float(t)), float(t))
        rates, _, raised = split(node.tick(float(t)))
        alarms += [(t, a) for a in raised]
        commanded.append(node.commanded["propofol"])
        modes.append(node.supervisor.mode)
    flat_from = samples - 1  # the tick that has seen flatline_samples equal readings
    assert modes[flat_from - 1] == "CLOSED_LOOP" and modes[flat_from] == "FALLBACK"
    assert all(mode == "FALLBACK" for mode in modes[flat_from:])
    assert [(t, a.code) for t, a in alarms] == [(flat_from, "data.flatline")]
    assert alarms[0][1].priority == "high" and alarms[0][1].kind == "technical"
    assert max(commanded[:flat_from]) > 0  # the PID did act on the reading before
    after = commanded[flat_from - 1:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    assert "flat-lined" in node.last_decision.reason
    assert node.last_decision.reason.startswith("FALLBACK")


def test_stale_data_lets_the_lease_run_out():
    """Readings stop at 9 s: at the first stale decision (25 s) the node sends one set_rate
    per pump whose fallback preset is no higher than its rate; then only get_status until
    the readings are usable again (from 40 s), then set_rate again. The pumps' own fallback
    (2000 mL/h preset on the route) never raises the dose."""
    node, setup = node_for("pid_induction_13.toml", {
        "pump.0.fallback_ml_per_h": 2000.0, "pump.1.fallback_ml_per_h": 1000.0,
        "controller.safety.input": {"propofol": {"fallback_rate_mg_per_s": 5.0},
                                    "remifentanil": {"fallback_rate_ug_per_s": 10.0}}})
    pumps = {r.pump for r in node.routes.values()}
    sent = {}
    for t in range(60):
        if t < 10 or t >= 40:
            node.receive(bis(90.0 - t, float(t)), float(t))
        sent[t] = split(node.tick(float(t)))
    stale_at = 25  # 25 - 9 > stale_after_s = 15
    for t in range(stale_at):
        assert set(sent[t][0]) == pumps and not sent[t][1]
    rates, status, alarms = sent[stale_at]
    assert set(rates) == pumps and not status
    assert [a.code for a in alarms] == ["data.stale"]
    for command in rates.values():
        assert command.fallback.rate <= command.rate + 1e-9
        assert command.rate > 0  # the supervisor held the last rate (preset above it)
    for t in range(stale_at + 1, 40):
        assert not sent[t][0], f"a set_rate renewed the lease at {t} s on stale data"
        assert sent[t][1] == pumps
    assert set(sent[40][0]) == pumps and not sent[40][1]
    # the route's preset is above the rate: the command carries the rate instead
    command = rates["propofol"]
    assert node.routes["propofol"].fallback_ml_per_h > command.rate
    assert command.fallback.action == "preset_rate"
    assert command.fallback.rate == pytest.approx(command.rate)


def test_in_force_rates_follow_the_lease_into_the_pump_fallback():
    """While the lease runs out the node records the command's rate until the lease ends,
    then the pump's fallback preset (here: stop), and the supervisor and its controller are
    told (their rate in force), so the dose windows and the NMPC see what the pump does."""
    node, setup = node_for("pid_induction_13.toml", {
        "controller.safety.input": {"propofol": {"fallback_rate_mg_per_s": 5.0},
                                    "remifentanil": {"fallback_rate_ug_per_s": 10.0}}})
    commanded = {}
    for t in range(40):
        if t < 10:
            node.receive(bis(90.0 - t, float(t)), float(t))
        node.tick(float(t))
        commanded[t] = node.commanded["propofol"]
    lease_end = 25 + setup.lease_periods * setup.controller.period_s  # 28 s
    assert commanded[25] > 0 and commanded[int(lease_end) - 1] == commanded[25]
    assert all(commanded[t] == 0.0 for t in range(int(lease_end), 40))
    assert node.controller.rates["propofol"] == 0.0
    assert "lease runs out" in node.last_decision.reason


def test_an_invalid_flag_falls_back_at_once_and_never_reaches_the_controller():
    """A reading flagged invalid switches to FALLBACK at the next decision (it is the latest
    reading, whatever its quality) and is counted, never passed to the controller."""
    node, _ = node_for("pid_induction_13.toml")
    for t in range(5):
        node.receive(bis(90.0 - t, float(t)), float(t))
        node.tick(float(t))
    assert node.supervisor.mode == "CLOSED_LOOP"
    last = node.commanded["propofol"]
    node.receive(bis(10.0, 5.0, "invalid"), 5.0)
    _, _, alarms = split(node.tick(5.0))
    assert node.supervisor.mode == "FALLBACK" and [a.code for a in alarms] == ["data.invalid"]
    assert node.commanded["propofol"] <= last
    assert node.controller.rejected == {"data.invalid": 1}


# ---------------------------------------------------------------- every kind is supervised

BANG_BANG = str(SCENARIOS / "controllers" / "bang_bang.py") + ":bang_bang"

KINDS = {
    # kind: (scenario, overrides, input whose cap is checked, cap [amount/s], closed loop)
    "pid": ("pid_induction_13.toml",
            {"controller.safety.input": {"propofol": {"max_rate_mg_per_s": 0.2},
                                         "remifentanil": {"max_rate_ug_per_s": 0.4}}},
            "propofol", 0.2, True),
    "fixed": ("fluorouracil_flat.toml",
              {"controller.safety.input": {"fluorouracil": {"max_rate_mg_per_s": 0.005}}},
              "fluorouracil", 0.005, False),
    "tci": ("tci_effect_site.toml", {"controller.safety.input": {"propofol": {"max_rate_mg_per_s": 1.0}}},
            "propofol", 1.0, False),
    "python": ("pid_induction_13.toml",
               {"controller.kind": "python",
                "controller.python": {"target": BANG_BANG,
                                      "inputs": ["propofol", "remifentanil"],
                                      "options": {"high_rate": 100.0}},
                "controller.safety.measured": "bis",
                "controller.safety.input": {"propofol": {"max_rate_mg_per_s": 2.0},
                                            "remifentanil": {"max_rate_ug_per_s": 3.0}}},
               "propofol", 2.0, True),
    "nmpc": ("tiva_nmpc_training.toml",
             {"controller.safety.input": {"propofol": {"max_rate_mg_per_s": 0.5},
                                          "remifentanil": {"max_rate_ug_per_s": 1.0}}},
             "propofol", 0.5, True),
}


def kind_node(kind: str):
    name, overrides, *_ = KINDS[kind]
    return node_for(name, overrides)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_is_clamped_to_the_safety_max_rate(kind):
    """For every controller kind built from a shipped scenario, a rate above
    the controller.safety.input max_rate is clamped before it leaves the node (and says so)."""
    node, setup = kind_node(kind)
    _, _, name, cap, closed = KINDS[kind]
    assert node.controller.controller is setup.controller
    t = 0.0
    if closed:
        node.receive(bis(97.0, 0.0), 0.0)  # awake: every closed-loop kind wants much drug
    messages = node.tick(t)
    rates, _, _ = split(messages)
    assert node.commanded[name] == pytest.approx(cap)
    assert rates[node.routes[name].pump].dose_rate == pytest.approx(cap)
    assert f"{name} clamped" in node.last_decision.reason


@pytest.mark.parametrize("kind", [k for k in sorted(KINDS) if KINDS[k][4]])
def test_every_closed_loop_kind_falls_back_on_stale_data(kind):
    """For every closed-loop kind, a reading that goes stale switches to FALLBACK with a
    data.stale alarm and never raises the dose."""
    node, setup = kind_node(kind)
    _, _, name, _, _ = KINDS[kind]
    period = setup.controller.period_s
    previous, seen_stale, last_reading = None, False, None
    for k in range(int(40 / period)):
        t = k * period
        if t < 10:
            node.receive(bis(97.0 - t, t), t)
            last_reading = t
        _, _, alarms = split(node.tick(t))
        rate = node.commanded[name]
        if t - last_reading > setup.safety.stale_after_s:
            assert node.supervisor.mode == "FALLBACK"
            assert rate <= previous + 1e-12
            if not seen_stale:
                assert [a.code for a in alarms] == ["data.stale"]
                seen_stale = True
        else:
            assert node.supervisor.mode == "CLOSED_LOOP"
        previous = rate
    assert seen_stale


# ---------------------------------------------------------------- epochs


def test_a_new_epoch_drops_the_old_readings():
    """A new epoch of a source (a restarted plant) drops what the node holds from the old
    one: a later-epoch reading with an earlier sample time is taken (its clock restarted),
    and messages of the retired epoch are ignored."""
    node, _ = node_for("pid_induction_13.toml")
    node.receive(bis(60.0, 100.0), 100.0, origin=("plant", "e1"))
    assert node.readings["bis"].t_meas_s == 100.0
    node.receive(PumpStatus(pump="propofol", state="stopped", rate=0.0), 0.0,
                 origin=("plant", "e2"))
    assert "bis" not in node.readings  # dropped at the first message of the new epoch
    node.receive(bis(95.0, 0.0), 0.0, origin=("plant", "e2"))
    assert node.readings["bis"].t_meas_s == 0.0 and node.readings["bis"].value == 95.0
    node.receive(bis(50.0, 101.0), 101.0, origin=("plant", "e1"))  # a late old frame
    assert node.readings["bis"].value == 95.0


def test_readings_of_another_source_survive_a_restart():
    """Only the restarted source's readings are dropped."""
    node, _ = node_for("pid_induction_13.toml")
    node.receive(Measurement(var="spo2", value=98.0, unit="1", t_meas=5.0), 5.0,
                 origin=("oximeter", "o1"))
    node.receive(bis(60.0, 100.0), 100.0, origin=("plant", "e1"))
    node.receive(bis(97.0, 0.0), 0.0, origin=("plant", "e2"))
    assert node.readings["spo2"].value == 98.0 and node.readings["bis"].value == 97.0


def test_restart_controller_keeps_the_command_ids_going():
    """A controller rebuilt for a restarted plant starts in INIT behind a new supervisor;
    the node's command ids go on (never repeated within its epoch) and the earlier mode
    transitions are kept."""
    node, setup = node_for("pid_induction_13.toml")
    ids = []
    for t in range(3):
        node.receive(bis(90.0, float(t)), float(t))
        ids += [m.cmd_id for m in node.tick(float(t)) if isinstance(m, SetRate)]
    before = list(node.transitions)
    rebuilt, _ = build_setup(load_scenario(SCENARIOS / "pid_induction_13.toml"), 0, 0)
    node.restart_controller(rebuilt.controller)
    assert node.supervisor.mode == "INIT" and node.controller.controller is rebuilt.controller
    node.receive(bis(97.0, 0.0), 0.0, origin=("plant", "new"))
    ids += [m.cmd_id for m in node.tick(0.0) if isinstance(m, SetRate)]
    assert len(ids) == len(set(ids)) == 8
    assert node.transitions[:len(before)] == before and len(node.transitions) == 2


# ---------------------------------------------------------------- what was delivered (15.3)
class Recorder:
    """A controller that doses 1 mg/s of propofol and 2 ug/s of remifentanil and records
    what it is told was applied."""

    name, period_s, inputs = "recorder", 1.0, ("propofol", "remifentanil")

    def __init__(self) -> None:
        self.applied_calls: list[tuple[float, dict]] = []

    def decide(self, t_s, readings):
        from mpc_dose.control.base import Decision

        return Decision(t_s, {"propofol": 1.0, "remifentanil": 2.0}, "constant")

    def applied(self, t_s, rates):
        self.applied_calls.append((t_s, dict(rates)))


def recording_node():
    _, setup = node_for("pid_induction_13.toml")
    controller = Recorder()
    node = ControllerNode(controller, PlantSide.routes_for(setup),
                          lease_periods=setup.lease_periods)
    return node, controller, PlantSide.routes_for(setup)


def test_acks_and_pump_status_tell_the_controller_what_was_delivered():
    """Issue 15.3: what the pumps did returns to the controller. The applied rate of an ack
    (the pump's rounding) is in force from the ack; a refused command leaves the pump at
    what it ran before; a pump status (an occlusion alarm, a fallback) is what it does from
    then; the controller's applied() hears each (on the code before, only the decision)."""
    from mpc_dose.protocol.messages import Ack

    node, controller, routes = recording_node()
    conc = routes["propofol"].concentration
    rates, _, _ = split(node.tick(0.0))
    first = rates[routes["propofol"].pump]
    assert controller.applied_calls[-1] == (0.0, {"propofol": 1.0, "remifentanil": 2.0})
    # the pump rounds to 0.1 mL/h: the patient gets that
    node.receive(Ack(cmd_id=first.cmd_id, ok=True, code="applied", applied_rate=360.1,
                     unit="mL/h"), 0.0)
    assert controller.applied_calls[-1][1]["propofol"] == pytest.approx(360.1 * conc / 3600)
    # the next command is refused: the pump runs on at what it took before
    rates, _, _ = split(node.tick(1.0))
    second = rates[routes["propofol"].pump]
    node.receive(Ack(cmd_id=second.cmd_id, ok=False, code="out_of_range"), 1.0)
    assert controller.applied_calls[-1][0] == 1.0
    assert controller.applied_calls[-1][1]["propofol"] == pytest.approx(360.1 * conc / 3600)
    # the pump reports an occlusion alarm at 1.5 s: nothing delivered from then
    node.receive(PumpStatus(pump=routes["propofol"].pump, state="alarm", rate=0.0), 1.5)
    assert controller.applied_calls[-1] == (1.5, {"propofol": 0.0,
                                                  "remifentanil": pytest.approx(2.0)})
    # a status in another volume unit is converted (uL/min)
    node.receive(PumpStatus(pump=routes["remifentanil"].pump, state="infusing",
                            rate=100.0, unit="uL/min"), 1.6)
    remi = routes["remifentanil"]
    assert controller.applied_calls[-1][1]["remifentanil"] == \
        pytest.approx(6.0 * remi.concentration / 3600)


def test_the_nmpc_propagates_what_was_delivered_not_what_it_decided():
    """Issue 15.3, in a closed loop: an occlusion stops propofol at 20 s of an induction
    (the pump alarms at 30 s); from the alarm on the NMPC's model receives no propofol and
    the propofol in its central compartment falls, while it keeps deciding drug (the code
    before propagated its own decisions: the drug it believed given kept rising)."""
    from mpc_dose.trial.closed_loop import run_closed_loop

    scenario = load_scenario(SCENARIOS / "tiva_nmpc_training.toml", {
        "pump.0.occlusion_at_s": 20.0, "pump.0.occlusion_detection_s": 10.0,
        "scenario.duration_s": 120.0})
    setup, _ = build_setup(scenario, 0, 0)
    result = run_closed_loop(setup)
    frame = result.to_pandas()
    assert (30.0, "alarm", "pump.occlusion: occlusion detected: infusion stopped") in \
        result.events
    mpc = setup.controller
    model = mpc.model
    propofol = model.input_index("propofol")
    assert mpc._rates_vector_at(29.0)[propofol] > 0
    assert all(mpc._rates_vector_at(t)[propofol] == 0.0 for t in (30.0, 60.0, 119.0))
    after = frame[frame.time_s.between(35, 119)]
    assert (after.commanded_propofol_rate_mg_per_s > 0).all()  # it keeps asking
    assert (after.delivered_propofol_rate_mg_per_s == 0).all()
    central = model.state_index("propofol_a1")
    amounts = [mpc._state_at(t)[0][central] for t in (35.0, 60.0, 90.0, 119.0)]
    assert amounts[0] > amounts[1] > amounts[2] > amounts[3]

