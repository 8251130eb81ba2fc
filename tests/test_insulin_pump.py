"""Issue 18 item 4, the insulin pump: boluses as protocol commands (1.1) and temporary basals
as leased rates, through the pump bridge (sans-I/O, a fake driver), the simulated pump and
its plant node, the controller node and the supervisor; each test states one fault or limit
and its expected outcome.

The insulin pump of these tests: U-100 (100 U/mL), a maximum basal of 5 U/h (0.05 mL/h),
a programmed basal of 0.4 U/h (0.004 mL/h, the lease-end fallback), boluses up to 10 U in
0.05 U steps at 1.5 U/min (0.9 mL/h).
"""

from __future__ import annotations

import json
import math

import pytest
import simpy

from mpc_dose.control.base import Decision
from mpc_dose.control.insulin import InsulinCurve
from mpc_dose.control.supervisor import SafetyConfig, SupervisedController
from mpc_dose.errors import ConfigError
from mpc_dose.model.library import load
from mpc_dose.node.controller_node import ControllerNode, PumpRoute
from mpc_dose.node.plant_node import PlantNode
from mpc_dose.node.pump_bridge import BridgePump, PumpBridgeNode
from mpc_dose.plant.patient import VirtualPatient
from mpc_dose.plant.pump import InfusionPump, PumpConfig, round_down
from mpc_dose.protocol.codec import Envelope, decode, decode_frame, encode, refusal
from mpc_dose.protocol.messages import (Ack, Alarm, Bolus, Fallback, PumpStatus,
                                        RemoteProtocolError, SetRate, Stop)
from mpc_dose.protocol.session import PeerBudget
from mpc_dose.serve.pump_bridge import BridgeCore
from tests.test_pump_bridge import FakeDriver

T0 = 1000.0              # bridge monotonic clock [s]
WALL0 = 1.7e9            # UTC at T0 [s]
PUMP = "insulin"
CONC = 100.0             # U/mL
BASAL_ML_H = 0.004       # 0.4 U/h programmed basal
SPEED = 0.9              # mL/h bolus speed (1.5 U/min)


def u_per_h(ml_per_h: float) -> float:
    return ml_per_h * CONC


def bolus_s(amount_u: float) -> float:
    """How long the pump takes for *amount_u* at its bolus speed [s]."""
    return amount_u / CONC / SPEED * 3600.0


class Rig:
    """A bridge with one initialised insulin pump on a fake driver."""

    def __init__(self, *, max_cmd_age_s: float = 2.0, **limits) -> None:
        config = dict(pump=PUMP, address=3, concentration=CONC, amount_unit="U",
                      max_rate_ml_per_h=0.05, max_lease_s=1800.0, max_bolus=10.0,
                      bolus_increment=0.05, bolus_ml_per_h=SPEED,
                      programmed_basal_ml_per_h=BASAL_ML_H)
        config.update(limits)
        self.driver = FakeDriver()
        self.node = PumpBridgeNode([BridgePump(**config)], self.driver,
                                   max_cmd_age_s=max_cmd_age_s)
        assert self.node.initialise(T0, self.driver.initialise) == []
        self.seq = 0

    def send(self, message, now: float = T0, *, t_sent: float | None = None) -> list:
        self.seq += 1
        wall = WALL0 + (now - T0)
        return self.node.receive(Envelope(message, "controller-1", "e1", self.seq,
                                          wall if t_sent is None else t_sent), now, wall)

    @property
    def rate(self) -> float:
        """What the pump runs now [mL/h]."""
        return self.driver.rates[3]

    def status(self, now: float) -> PumpStatus:
        return self.node.status(PUMP, now)


def bolus(cmd_id: str, amount: float = 2.0, **kw) -> Bolus:
    kw.setdefault("unit", "U")
    kw.setdefault("lease_s", 300.0)
    return Bolus(cmd_id=cmd_id, pump=PUMP, amount=amount, **kw)


def temp_basal(cmd_id: str, u_h: float, lease_s: float = 900.0,
               fallback_ml_h: float = BASAL_ML_H) -> SetRate:
    """A temporary basal: a leased set_rate that ends into the programmed basal."""
    return SetRate(cmd_id=cmd_id, pump=PUMP, rate=u_h / CONC, unit="mL/h", lease_s=lease_s,
                   fallback=Fallback(action="preset_rate", rate=fallback_ml_h),
                   dose_rate=u_h, dose_unit="U/h")


def ack(out: list) -> Ack:
    [found] = [m for m in out if isinstance(m, Ack)]
    return found


# ---------------------------------------------------------------------------- bridge
def test_a_bolus_is_rounded_down_to_the_increment_and_given_at_the_bolus_speed():
    """2.37 U at a 0.05 U step: 2.35 U, said in the ack, run as the basal plus the bolus
    speed until the volume is in (94 s), then the basal again; the status counts it."""
    rig = Rig()
    ack(rig.send(temp_basal("t1", 0.4)))
    out = rig.send(bolus("b1", 2.37), T0 + 1)
    a = ack(out)
    assert (a.ok, a.code, a.applied_amount, a.amount_unit) == (True, "applied", 2.35, "U")
    assert a.bolus_s == pytest.approx(bolus_s(2.35)) == pytest.approx(94.0)
    assert "rounded down" in a.text
    assert rig.rate == pytest.approx(BASAL_ML_H + SPEED)
    mid = rig.status(T0 + 1 + 47.0)
    assert (mid.bolus_delivered, mid.bolus_remaining) == (pytest.approx(1.175),
                                                          pytest.approx(1.175))
    assert rig.node.next_deadline(T0 + 2) == pytest.approx(T0 + 1 + 94.0)
    rig.node.expire(T0 + 1 + 94.0)
    assert rig.rate == pytest.approx(BASAL_ML_H)
    done = rig.status(T0 + 200)
    assert (done.bolus_delivered, done.bolus_remaining, done.amount_unit) == (
        pytest.approx(2.35), 0.0, "U")


@pytest.mark.parametrize("amount, step, expected", [
    (2.37, 0.05, 2.35), (2.35, 0.05, 2.35), (0.1, 0.05, 0.1), (0.3, 0.1, 0.3),
    (0.049, 0.05, 0.0), (1.23456, 0.0, 1.23456), (7.0, 0.025, 7.0)])
def test_round_down_never_rounds_up_and_keeps_exact_steps(amount, step, expected):
    assert round_down(amount, step) == pytest.approx(expected, abs=1e-12)
    assert round_down(amount, step) <= amount + 1e-12


def test_a_bolus_that_rounds_to_nothing_is_refused():
    """0.04 U at a 0.05 U step is refused (out_of_range), nothing reaches the pump: a zero
    bolus acknowledged as given would hide that the dose was not given."""
    rig = Rig()
    calls = rig.driver.count("set_rate")
    a = ack(rig.send(bolus("b1", 0.04)))
    assert (a.ok, a.code) == (False, "out_of_range") and "rounds down to 0" in a.text
    assert rig.driver.count("set_rate") == calls


def test_a_bolus_over_the_maximum_is_refused_with_an_alarm():
    rig = Rig()
    out = rig.send(bolus("b1", 10.01))
    a = ack(out)
    assert (a.ok, a.code) == (False, "out_of_range") and "max_bolus 10" in a.text
    assert [m.code for m in out if isinstance(m, Alarm)] == ["bridge.out_of_range"]
    assert rig.driver.count("set_rate") == 0 and rig.status(T0).bolus_delivered == 0.0


def test_a_basal_over_the_maximum_is_refused_and_the_previous_one_keeps_running():
    """6 U/h above the 5 U/h maximum basal: out_of_range; the 0.4 U/h before it runs on."""
    rig = Rig()
    ack(rig.send(temp_basal("t1", 0.4)))
    a = ack(rig.send(temp_basal("t2", 6.0), T0 + 1))
    assert (a.ok, a.code) == (False, "out_of_range")
    assert rig.rate == pytest.approx(BASAL_ML_H)


def test_a_temporary_basal_ends_into_the_programmed_basal():
    """A temp basal of 1.2 U/h for 30 min: at its lease end the bridge runs the programmed
    basal by itself, alarms pump.lease_expired and goes to FALLBACK."""
    rig = Rig()
    assert ack(rig.send(temp_basal("t1", 1.2, lease_s=1800.0))).ok
    assert u_per_h(rig.rate) == pytest.approx(1.2)
    assert rig.node.expire(T0 + 1799.0) == []
    out = rig.node.expire(T0 + 1800.0)
    assert [m.code for m in out if isinstance(m, Alarm)] == ["pump.lease_expired"]
    assert u_per_h(rig.rate) == pytest.approx(0.4)
    assert rig.node.pumps[PUMP].mode == "FALLBACK"


def test_a_temporary_basal_ending_above_the_programmed_basal_is_refused():
    """The lease end returns to the programmed basal or less: a preset fallback of 2 U/h
    (above 0.4 U/h) is out_of_range, nothing is set."""
    rig = Rig()
    a = ack(rig.send(temp_basal("t1", 2.0, fallback_ml_h=0.02)))
    assert (a.ok, a.code) == (False, "out_of_range") and "programmed basal" in a.text
    assert rig.driver.count("set_rate") == 0


def test_a_bolus_arriving_after_its_lease_is_not_given():
    """A bolus sent 40 s ago with a 30-s lease cannot start within it: expired, nothing
    delivered (even with a generous command age)."""
    rig = Rig(max_cmd_age_s=120.0)
    out = rig.send(bolus("b1", 2.0, lease_s=30.0), t_sent=WALL0 - 40.0)
    a = ack(out)
    assert (a.ok, a.code) == (False, "expired") and "lease" in a.text
    assert rig.driver.count("set_rate") == 0
    # within its lease it is given
    assert ack(rig.send(bolus("b2", 2.0, lease_s=30.0), t_sent=WALL0 - 1.0)).ok


def test_a_duplicate_bolus_is_answered_again_and_given_once():
    """The same cmd_id again (a retry after a lost ack): the cached answer with code
    duplicate and the same amount; the pump gets one bolus."""
    rig = Rig()
    first = ack(rig.send(bolus("b1", 3.0)))
    again = ack(rig.send(bolus("b1", 3.0), T0 + 1))
    assert first.code == "applied" and again.code == "duplicate" and again.ok
    assert again.applied_amount == first.applied_amount == 3.0
    assert rig.driver.count("set_rate") == 1
    rig.node.expire(T0 + 1000.0)
    assert rig.status(T0 + 1000.0).bolus_delivered == pytest.approx(3.0)
    # even after the bolus ended: still the cached answer, still one bolus
    assert ack(rig.send(bolus("b1", 3.0), T0 + 1001)).code == "duplicate"
    assert rig.status(T0 + 1002.0).bolus_delivered == pytest.approx(3.0)


def test_a_bolus_while_another_runs_is_busy():
    rig = Rig()
    assert ack(rig.send(bolus("b1", 2.0))).ok
    a = ack(rig.send(bolus("b2", 1.0), T0 + 10))
    assert (a.ok, a.code) == (False, "busy") and "b1" in a.text
    rig.node.expire(T0 + bolus_s(2.0))
    assert ack(rig.send(bolus("b3", 1.0), T0 + bolus_s(2.0) + 1)).ok
    rig.node.expire(T0 + 1000.0)
    assert rig.status(T0 + 1000.0).bolus_delivered == pytest.approx(3.0)


def test_a_stop_cancels_a_running_bolus():
    """Stopped halfway through: the pump stops and half the bolus counts as given."""
    rig = Rig()
    ack(rig.send(temp_basal("t1", 0.4)))
    ack(rig.send(bolus("b1", 2.0)))
    ack(rig.send(Stop(cmd_id="s1", pump=PUMP), T0 + bolus_s(2.0) / 2))
    assert rig.rate == 0.0
    status = rig.status(T0 + 500)
    assert (status.bolus_delivered, status.bolus_remaining) == (pytest.approx(1.0), 0.0)
    assert rig.node.expire(T0 + 500) == []


def test_a_bolus_goes_on_over_a_lease_end_and_a_new_rate():
    """The temp basal's lease ends while the bolus runs: the programmed basal plus the bolus
    until the bolus is in; a new temp basal meanwhile keeps the bolus on top."""
    rig = Rig()
    ack(rig.send(temp_basal("t1", 1.0, lease_s=30.0)))
    ack(rig.send(bolus("b1", 2.0), T0 + 10))                 # ends at T0 + 82
    rig.node.expire(T0 + 30.0)
    assert rig.rate == pytest.approx(BASAL_ML_H + SPEED)
    a = ack(rig.send(temp_basal("t2", 2.0), T0 + 40))
    assert a.ok and u_per_h(a.applied_rate) == pytest.approx(2.0)   # the basal part
    assert rig.rate == pytest.approx(0.02 + SPEED)
    rig.node.expire(T0 + 10 + bolus_s(2.0))
    assert u_per_h(rig.rate) == pytest.approx(2.0)


def test_insulin_on_board_limits_boluses_and_decays():
    """max_on_board 5 U: a 4-U bolus is given; another 2 U soon after is refused (6 U on
    board); 5 h later (the insulin curve's action time) it is given."""
    rig = Rig(max_on_board=5.0)
    assert ack(rig.send(bolus("b1", 4.0))).ok
    rig.node.expire(rig.node.next_deadline(T0))        # the bolus's end: 160 s
    on_board = rig.node.insulin_on_board(PUMP, T0 + 600)
    assert 3.8 < on_board <= 4.0 + 1e-9
    a = ack(rig.send(bolus("b2", 2.0), T0 + 600))
    assert (a.ok, a.code) == (False, "out_of_range") and "insulin on board" in a.text
    later = T0 + InsulinCurve().duration_s + 200
    assert rig.node.insulin_on_board(PUMP, later) == pytest.approx(0.0, abs=1e-9)
    assert ack(rig.send(bolus("b3", 2.0), later)).ok


def test_insulin_on_board_counts_a_temporary_basal_above_the_programmed_one():
    """Only what runs above the programmed basal counts: 2 h at 2.4 U/h is 4 U above 0.4 U/h
    (less what has acted); a temp basal at the programmed basal adds nothing."""
    rig = Rig(max_on_board=50.0, max_lease_s=7200.0)
    ack(rig.send(temp_basal("t1", 0.4, lease_s=7200.0)))
    assert rig.node.insulin_on_board(PUMP, T0 + 7200) == pytest.approx(0.0, abs=1e-12)
    rig2 = Rig(max_on_board=50.0, max_lease_s=7200.0)
    ack(rig2.send(temp_basal("t1", 2.4, lease_s=7200.0)))
    on_board = rig2.node.insulin_on_board(PUMP, T0 + 7200)
    assert 1.0 < on_board < 4.0


def test_a_temporary_basal_beyond_the_insulin_on_board_limit_is_refused():
    rig = Rig(max_on_board=1.0)
    a = ack(rig.send(temp_basal("t1", 5.0, lease_s=1800.0)))   # 2.3 U above basal
    assert (a.ok, a.code) == (False, "out_of_range") and "max_on_board" in a.text


def test_amount_units_convert_exactly_and_a_drug_of_another_kind_is_refused():
    """1500 mU is 1.5 U (the ack answers in mU); a bolus in mg to an insulin pump is 'unit';
    a volume that disagrees with the amount is 'unit' with a high alarm."""
    rig = Rig()
    a = ack(rig.send(bolus("b1", 1500.0, unit="mU")))
    assert (a.applied_amount, a.amount_unit) == (1500.0, "mU")
    rig.node.expire(T0 + 1000)
    assert ack(rig.send(bolus("b2", 2.0, unit="mg"), T0 + 1001)).code == "unit"
    out = rig.send(bolus("b3", 2.0, volume=0.03, vol_unit="mL"), T0 + 1002)
    assert ack(out).code == "unit"
    assert [m.priority for m in out if isinstance(m, Alarm)] == ["high"]
    assert ack(rig.send(bolus("b4", 2.0, volume=0.02, vol_unit="mL"), T0 + 1003)).ok


def test_an_extended_bolus_runs_over_its_duration_and_never_faster_than_the_pump():
    rig = Rig()
    a = ack(rig.send(bolus("b1", 1.0, duration_s=1800.0)))
    assert a.bolus_s == pytest.approx(1800.0)
    assert rig.rate == pytest.approx(0.01 / 1800.0 * 3600.0)
    rig.node.expire(T0 + 1800.0)
    too_fast = ack(rig.send(bolus("b2", 5.0, duration_s=60.0), T0 + 1801))
    assert (too_fast.ok, too_fast.code) == (False, "out_of_range")


def test_a_pump_without_boluses_refuses_them():
    rig = Rig(max_bolus=0.0)
    a = ack(rig.send(bolus("b1", 1.0)))
    assert (a.ok, a.code) == (False, "out_of_range") and "no bolus" in a.text
    assert rig.status(T0).bolus_delivered is None      # not a bolus pump: no bolus fields


def test_a_stopped_pump_gives_no_bolus():
    rig = Rig()
    rig.driver.unreachable = True
    rig.node.poll(T0)
    rig.driver.unreachable = False
    a = ack(rig.send(bolus("b1", 1.0), T0 + 1))
    assert (a.ok, a.code) == (False, "pump_error")
    assert rig.driver.count("set_rate") == 0


# ---------------------------------------------------------------------------- frames
GOOD = {"cmd_id": "b1", "pump": PUMP, "amount": 2.0, "unit": "U", "lease_s": 30.0}


def frame(body: dict | str) -> bytes:
    text = body if isinstance(body, str) else json.dumps(body)
    return ('{"v":1,"type":"bolus","src":"controller-1","epoch":"e1","seq":1,'
            f'"t_sent":{WALL0},"t_sim":null,"body":{text}}}').encode()


@pytest.mark.parametrize("change, code", [
    ({"amount": -1.0}, "schema"),
    ('{"cmd_id":"b1","pump":"insulin","amount":NaN,"unit":"U","lease_s":30}', "schema"),
    ('{"cmd_id":"b1","pump":"insulin","amount":1e400,"unit":"U","lease_s":30}', "schema"),
    ({"amount": "2"}, "schema"),
    ({"amount": True}, "schema"),
    ({"amount": None}, "schema"),
    ({"unit": "mL"}, "unit"),
    ({"unit": "U/h"}, "unit"),
    ({"unit": "u"}, "unit"),
    ({"unit": "IU"}, "unit"),
    ({"lease_s": 0.0}, "schema"),
    ({"lease_s": -5.0}, "schema"),
    ({"duration_s": -1.0}, "schema"),
    ({"volume": 0.02}, "schema"),                      # without vol_unit
    ({"volume": 0.02, "vol_unit": "U"}, "unit"),
    ({"rate": 1.0}, "schema"),                         # unknown field in a command
    ("missing amount", "schema"),
    ("missing unit", "schema"),
    ("missing lease_s", "schema"),
])
def test_malformed_bolus_frames_are_refused_with_a_code_and_nothing_is_given(change, code):
    """Refused by the codec with the reason code, answered by cmd_id, never given."""
    if isinstance(change, dict):
        data = frame({**GOOD, **change})
    elif change.startswith("missing"):
        data = frame({k: v for k, v in GOOD.items() if k != change.split()[1]})
    else:
        data = frame(change)
    item = decode_frame(data)
    assert isinstance(item, RemoteProtocolError) and item.code == code, item
    answer = refusal(item)
    if isinstance(change, str) and not change.startswith("missing"):
        assert answer is None       # not JSON the codec will read: no cmd_id to answer
    else:
        assert (answer.cmd_id, answer.ok, answer.code) == ("b1", False, code)
    rig = Rig()
    core = BridgeCore(rig.node, None, PeerBudget(1e9, 1e9))
    out = core.handle(b"peer", item, T0, WALL0)
    assert [o.message for o in out] == ([answer] if answer is not None else [])
    assert rig.driver.count("set_rate") == 0 and rig.status(T0).bolus_delivered == 0.0


def test_a_huge_finite_bolus_passes_the_codec_and_is_refused_by_the_pump_side():
    rig = Rig()
    envelope = decode(frame({**GOOD, "amount": 1e308}))
    a = ack(rig.node.receive(envelope, T0, WALL0))
    assert (a.ok, a.code) == (False, "out_of_range")
    assert rig.driver.count("set_rate") == 0


def test_a_bolus_frame_round_trips_and_one_point_zero_frames_are_unchanged():
    """The bolus fields of ack and pump_status are left out when unused: a 1.0 peer's
    frames encode byte for byte as before."""
    message = Bolus(cmd_id="b1", pump=PUMP, amount=2.35, unit="U", lease_s=30.0,
                    duration_s=600.0, volume=0.0235, vol_unit="mL")
    assert decode(encode(Envelope(message, "c", "e", 1, 0.0))).message == message
    plain = json.loads(encode(Envelope(Ack(cmd_id="c", ok=True, code="applied"), "p", "e",
                                       1, 0.0)))
    assert set(plain["body"]) == {"cmd_id", "ok", "code", "applied_rate", "unit",
                                  "lease_remaining_s", "text"}
    status = json.loads(encode(Envelope(PumpStatus(pump="p", state="stopped", rate=0.0),
                                        "p", "e", 1, 0.0)))
    assert "bolus_delivered" not in status["body"]
    with pytest.raises(Exception, match="go together"):
        PumpStatus(pump="p", state="stopped", rate=0.0, bolus_delivered=1.0)


# ---------------------------------------------------------------------------- plant
class PlantRig:
    """A simulated insulin pump on a Cambridge-model patient, behind the plant node."""

    def __init__(self, **config) -> None:
        lib = load("glucose-cambridge")
        self.env = simpy.Environment()
        self.patient = VirtualPatient(lib.model, lib.population.typical_parameters(
            {"weight": 70}))
        self.index = lib.model.input_index("insulin")
        self.deliveries: list[tuple[float, float]] = [(0.0, 0.0)]
        original = self.patient.set_rate

        def spy(t_s, index, rate):
            if index == self.index:
                self.deliveries.append((t_s, rate))
            original(t_s, index, rate)
        self.patient.set_rate = spy
        settings = dict(pump=PUMP, input="insulin", concentration=CONC,
                        max_rate_ml_per_h=0.05, resolution_ml_per_h=0.0005,
                        max_bolus=10.0, bolus_increment=0.05, bolus_ml_per_h=SPEED)
        settings.update(config)
        self.pump = InfusionPump(self.env, PumpConfig(**settings), self.patient)
        self.node = PlantNode({PUMP: self.pump})

    def given(self, until: float) -> float:
        """Insulin that reached the patient from 0 to *until* [U]."""
        points = self.deliveries + [(until, 0.0)]
        return sum(r * (t1 - t0) for (t0, r), (t1, _) in zip(points, points[1:]))


def test_the_simulated_pump_gives_a_bolus_as_a_short_infusion_at_its_speed():
    """Basal 0.4 U/h plus a 2.37-U bolus: 2.35 U at 1.5 U/min on top of the basal for 94 s;
    the ack and the status say so, in U."""
    rig = PlantRig()
    rig.node.receive(SetRate(cmd_id="t1", pump=PUMP, rate=0.004, unit="mL/h", lease_s=1e6),
                     0.0)
    [a] = rig.node.receive(bolus("b1", 2.37), 0.0)
    assert (a.ok, a.applied_amount, a.amount_unit) == (True, 2.35, "U")
    assert a.bolus_s == pytest.approx(94.0)
    rig.env.run(until=47.0)
    status = rig.node.status_message(rig.pump.status(), "U")
    assert status.bolus_remaining == pytest.approx(1.175)
    rig.env.run(until=3600.0)
    assert rig.given(3600.0) == pytest.approx(0.4 + 2.35)
    assert rig.deliveries[-1][1] == pytest.approx(0.4 / 3600.0)
    status = rig.node.status_message(rig.pump.status(), "U")
    assert (status.bolus_delivered, status.bolus_remaining) == (pytest.approx(2.35), 0.0)


def test_the_simulated_pump_refuses_what_the_bridge_refuses():
    rig = PlantRig()
    codes = [rig.node.receive(b, 0.0)[0].code for b in (
        bolus("b1", 10.5), bolus("b2", 0.04), bolus("b3", 2.0, unit="mg"))]
    assert codes == ["out_of_range", "out_of_range", "unit"]
    assert rig.node.receive(bolus("b4", 2.0), 0.0)[0].ok
    assert rig.node.receive(bolus("b5", 1.0), 1.0)[0].code == "busy"
    rate = SetRate(cmd_id="t9", pump=PUMP, rate=0.06, unit="mL/h", lease_s=60.0)
    assert rig.node.receive(rate, 2.0)[0].code == "out_of_range"      # above 5 U/h
    rig.env.run(until=3600.0)
    assert rig.given(3600.0) == pytest.approx(2.0)


def test_a_stop_cancels_the_simulated_bolus():
    rig = PlantRig()
    rig.node.receive(bolus("b1", 2.0), 0.0)
    rig.env.run(until=40.0)
    rig.node.receive(Stop(cmd_id="s1", pump=PUMP), 40.0)
    rig.env.run(until=600.0)
    assert rig.given(600.0) == pytest.approx(2.0 * 40.0 / 80.0)
    assert rig.pump.state == "stopped"


# ---------------------------------------------------------------------------- controller
class Boluser:
    """A controller that gives one bolus at t = 0 and a basal always."""

    name, period_s, inputs = "boluser", 300.0, ("insulin",)

    def __init__(self, amount: float = 2.37) -> None:
        self.amount, self.given = amount, []

    def decide(self, t_s, readings):
        return Decision(t_s, {"insulin": 0.4 / 3600.0}, "test",
                        boluses={"insulin": self.amount} if t_s == 0 else {})

    def given_bolus(self, t_s, name, amount):
        self.given.append((t_s, name, amount))


ROUTE = PumpRoute("insulin", PUMP, CONC, "U", BASAL_ML_H, bolus=True)


def test_the_controller_node_sends_a_bolus_and_learns_once_what_was_given():
    """A decision's bolus leaves as a bolus command (amount in U, the volume alongside, a
    lease of one period); the pump's answer (2.35 U after its rounding) is recorded and told
    to the controller once, also when a retry's duplicate answer comes too."""
    controller = Boluser()
    node = ControllerNode(controller, {"insulin": ROUTE})
    out = node.tick(0.0)
    [command] = [m for m in out if isinstance(m, Bolus)]
    [basal] = [m for m in out if isinstance(m, SetRate)]
    assert (command.amount, command.unit, command.lease_s) == (2.37, "U", 300.0)
    assert command.volume == pytest.approx(0.0237) and command.vol_unit == "mL"
    assert basal.fallback.rate == BASAL_ML_H          # a temp basal ending into the basal
    answer = Ack(cmd_id=command.cmd_id, ok=True, code="applied", applied_amount=2.35,
                 amount_unit="U", bolus_s=94.0)
    node.receive(answer, 1.0)
    node.receive(Ack(cmd_id=command.cmd_id, ok=True, code="duplicate", applied_amount=2.35,
                     amount_unit="U", bolus_s=94.0), 2.0)
    assert node.boluses == [(0.0, "insulin", 2.35)]
    assert controller.given == [(0.0, "insulin", 2.35)]
    assert node.last_decision.boluses == {"insulin": 2.37}
    assert not [m for m in node.tick(300.0) if isinstance(m, Bolus)]


def test_a_bolus_leaves_before_the_rate_command_that_closes_the_instant():
    """A pump's set_rate closes its control instant (the simulated lock-step: the plant moves
    on once every pump has it), so the instant's bolus for that pump goes before it; sent
    after, it was given one period late across processes."""
    node = ControllerNode(Boluser(), {"insulin": ROUTE})
    out = [m for m in node.tick(0.0) if isinstance(m, (Bolus, SetRate))]
    assert [type(m) for m in out] == [Bolus, SetRate]


@pytest.mark.parametrize("code", ["out_of_range", "busy", "expired"])
def test_a_refused_bolus_is_given_by_nobody_and_the_controller_is_told(code):
    """The controller may have counted the bolus when it decided it: a refusal tells it
    that nothing was given."""
    controller = Boluser(amount=50.0)
    node = ControllerNode(controller, {"insulin": ROUTE})
    [command] = [m for m in node.tick(0.0) if isinstance(m, Bolus)]
    node.receive(Ack(cmd_id=command.cmd_id, ok=False, code=code), 1.0)
    assert node.boluses == [] and controller.given == [(0.0, "insulin", 0.0)]


def test_a_bolus_for_a_pump_without_boluses_is_a_configuration_error():
    node = ControllerNode(Boluser(), {"insulin": PumpRoute("insulin", PUMP, CONC, "U")})
    with pytest.raises(ConfigError, match="takes no bolus"):
        node.tick(0.0)


def test_the_supervisor_holds_boluses_in_fallback_and_in_a_low_suspend():
    """No bolus leaves on unusable data (FALLBACK) nor into a predicted low; in CLOSED_LOOP
    it does; a bolus that is not a finite amount >= 0 is a controller error."""
    from mpc_dose.control.base import Reading

    safety = SafetyConfig(measured="cgm", stale_after_s=900.0, suspend_below=4.4,
                          suspend_inputs=("insulin",))
    ok = SupervisedController(Boluser(), safety)
    fresh = {"cgm": Reading("cgm", 8.0, "mmol/L", 0.0)}
    for t in (-600.0, -300.0):
        ok.observe(Reading("cgm", 8.0, "mmol/L", t))
    ok.observe(fresh["cgm"])
    assert ok.decide(0.0, fresh).boluses == {"insulin": 2.37}
    stale = SupervisedController(Boluser(), safety)
    held = stale.decide(0.0, {})
    assert held.boluses == {} and "not given" in held.reason
    low = SupervisedController(Boluser(), safety)
    for t, v in ((-600.0, 5.5), (-300.0, 4.9), (0.0, 4.3)):
        low.observe(Reading("cgm", v, "mmol/L", t))
    decision = low.decide(0.0, {"cgm": Reading("cgm", 4.3, "mmol/L", 0.0)})
    assert decision.boluses == {} and "low suspend" in decision.reason
    bad = SupervisedController(Boluser(amount=math.nan))
    assert bad.decide(0.0, {}).status == "controller_error"


def _low_then(values, held_bolus_s=3600.0):
    """A supervised Boluser whose CGM reads 5.5, 4.9, 4.3 mmol/L before t = 0 (a predicted
    low: the suspend holds at t = 0), then *values* at 5-min decisions; its decisions."""
    from mpc_dose.control.base import Reading

    safety = SafetyConfig(measured="cgm", stale_after_s=900.0, suspend_below=4.4,
                          suspend_inputs=("insulin",), held_bolus_s=held_bolus_s)
    boluser = Boluser()
    supervised = SupervisedController(boluser, safety)
    for t, v in ((-600.0, 5.5), (-300.0, 4.9)):
        supervised.observe(Reading("cgm", v, "mmol/L", t))
    decisions = []
    for k, v in enumerate((4.3, *values)):
        reading = Reading("cgm", v, "mmol/L", 300.0 * k)
        supervised.observe(reading)
        decisions.append(supervised.decide(300.0 * k, {"cgm": reading}))
    return decisions, boluser


def test_a_bolus_the_low_suspend_holds_is_given_when_it_ends():
    """The meal bolus asked for into a predicted low waits; the controller hears at once
    that nothing was given (0, as for a refusal); the whole bolus leaves at the first
    decision out of the suspend (glucose rising with the meal), once."""
    decisions, boluser = _low_then((4.6, 5.4, 6.5, 7.5, 8.0))
    assert boluser.given == [(0.0, "insulin", 0.0)]
    assert [d.boluses for d in decisions] == [{}, {}, {"insulin": 2.37}, {}, {}, {}]
    assert "held (low suspend)" in decisions[0].reason
    assert "low suspend" in decisions[1].reason            # still predicted low at 4.6
    assert "held bolus of insulin 2.37 given now (asked 10 min ago" in decisions[2].reason


def test_a_held_bolus_is_dropped_when_the_suspend_outlasts_its_wait():
    """held_bolus_s = 10 min: the suspend lasts 15 min, the bolus is dropped and said so;
    held_bolus_s = 0: dropped at once."""
    decisions, _ = _low_then((4.2, 4.1, 5.5, 6.5, 7.5), held_bolus_s=600.0)
    assert all(d.boluses == {} for d in decisions)
    assert any("held bolus of insulin 2.37 dropped (the low suspend outlasted 10 min)"
               in d.reason for d in decisions)
    at_once, _ = _low_then((5.5, 6.5, 7.5), held_bolus_s=0.0)
    assert all(d.boluses == {} for d in at_once)
    assert "not given" in at_once[0].reason
    with pytest.raises(ConfigError, match="held_bolus_s"):
        SafetyConfig(held_bolus_s=-1.0)


# ---------------------------------------------------------------------------- scenario
def test_scenario_keys_make_an_insulin_pump():
    """[[pump]] max_bolus, bolus_increment, bolus_speed, basal_increment, max_basal and
    programmed_basal, in drug units, become the pump's settings in mL/h and U; keys that say
    the same twice, or bolus settings without max_bolus, are refused naming the field."""
    from pathlib import Path

    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.build import build_setup

    path = Path(__file__).resolve().parents[1] / "scenarios" / "t1d_basal_bolus.toml"
    setup, _ = build_setup(load_scenario(path, {"scenario.duration_s": 3600}), 0, 0)
    [pump] = setup.pumps
    assert (pump.max_bolus, pump.bolus_increment) == (15.0, 0.05)
    assert pump.bolus_ml_per_h == pytest.approx(0.9)
    assert pump.resolution_ml_per_h == pytest.approx(0.0005)
    assert pump.max_rate_ml_per_h == pytest.approx(0.05)
    assert pump.fallback_ml_per_h == pytest.approx(0.004)
    assert setup.controller.meals.bolus_commands
    for overrides, match in (({"pump.0.resolution_ml_per_h": 0.001}, "basal_increment"),
                             ({"pump.0.max_bolus": None}, "without max_bolus"),
                             ({"pump.0.max_bolus": "15 mL"}, "max_bolus")):
        with pytest.raises(ConfigError, match=match):
            build_setup(load_scenario(path, overrides), 0, 0)


def test_a_trial_day_gives_each_meal_bolus_through_the_protocol():
    """scenarios/t1d_basal_bolus.toml for one day, in process with encoded frames: each
    announced meal's bolus leaves as a bolus command, the simulated pump gives it at 1.5
    U/min on top of the basal (in the delivered record) and says so (events, acks)."""
    from pathlib import Path

    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.build import build_setup
    from mpc_dose.trial.closed_loop import run_closed_loop

    path = Path(__file__).resolve().parents[1] / "scenarios" / "t1d_basal_bolus.toml"
    setup, _ = build_setup(load_scenario(path, {"scenario.duration_s": 86400,
                                                "controller.safety.suspend_below": None}), 0, 0)
    result = run_closed_loop(setup)
    events = [text for _, kind, text in result.events if kind == "bolus"]
    assert len(events) == 3 and all(text.startswith("insulin: ") for text in events)
    speed = 1.5 / 60.0                                     # U/s
    fast = [rate for _, name, rate, unit in result.deliveries
            if name == "insulin" and rate > speed]
    assert len(fast) == 3 and all(rate < speed + 1.0 / 3600.0 for rate in fast)
    assert [a for _, a in setup.controller.boluses] == [
        pytest.approx(float(text.split()[1])) for text in events]


def test_boluses_cross_processes_as_in_process(tmp_path):
    """Plant and controller as two OS processes over ZeroMQ (lock-step), 12 h of
    scenarios/t1d_basal_bolus.toml: the bolus commands cross the sockets and the delivered
    insulin and the glucose equal the in-process run's."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    import pandas as pd

    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.build import build_setup
    from mpc_dose.trial.closed_loop import run_closed_loop
    from tests.ports import free_addresses

    source = Path(__file__).resolve().parents[1] / "scenarios" / "t1d_basal_bolus.toml"
    scenario = tmp_path / "t1d.toml"
    scenario.write_text(source.read_text("utf-8").replace("duration_s = 259200",
                                                          "duration_s = 43200"), "utf-8")
    tel, cmd = free_addresses(2)
    out = tmp_path / "plant.csv"
    common = ["--patient", "1", "--seed", "0", "--telemetry", tel, "--commands", cmd]
    procs = [subprocess.Popen([sys.executable, "-m", "mpc_dose.cli", "serve", role,
                               str(scenario), *common, *extra])
             for role, extra in (("plant", ["--out", str(out)]), ("controller", []))]
    for p in procs:
        assert p.wait(120) == 0
    across = pd.read_csv(out)
    setup, _ = build_setup(load_scenario(scenario), 0, 0)
    result = run_closed_loop(setup)
    assert [kind for _, kind, _ in result.events].count("bolus") >= 1
    inproc = result.to_pandas()
    for column in ("delivered_insulin_rate_U_per_s", "true_glucose_mmol_per_L"):
        np.testing.assert_allclose(across[column], inproc[column], rtol=1e-9, atol=1e-12,
                                   err_msg=column)
