"""The pump bridge under injected faults: a fake driver stands in for the serial pumps, and
each test states one property of :class:`PumpBridgeNode` with its expected outcome (the
numbered cases T13-T35 and requirements B1-B11 of the research note).

Sans-I/O: times are arguments (``now`` is the bridge's monotonic clock, ``wall`` the UTC clock
the controller stamps ``t_sent`` with), so nothing here sleeps or opens a socket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from mpc_dose.errors import ConfigError
from mpc_dose.node.pump_bridge import BridgePump, PumpBridgeNode
from mpc_dose.protocol.codec import Envelope
from mpc_dose.protocol.messages import (
    Ack,
    Alarm,
    Fallback,
    GetStatus,
    Hello,
    PumpStatus,
    SetRate,
    Stop,
)

T0 = 1000.0           # bridge monotonic clock at the start of each test [s]
WALL0 = 1.7e9         # UTC wall clock at T0 [s]
ADDRESS = 1
PUMP = "propofol"
CONC = 10.0           # mg/mL


# ---------------------------------------------------------------------------- fake driver
class DriverError(RuntimeError):
    """What the real driver raises when a pump refuses (``PumpRefused``): with a code."""

    def __init__(self, text: str, code: str) -> None:
        super().__init__(text)
        self.code = code


class Unreachable(RuntimeError):
    """No reply at all (``PumpUnreachable``): carries no code."""


@dataclass(frozen=True)
class Reading:
    state: str
    rate_ml_per_h: float
    dispensed_ml: float
    alarm: str | None


class FakeDriver:
    """Pumps at addresses, with knobs for faults.

    - ``fail_code``: the next ``set_rate`` calls raise :class:`DriverError` with this code
      (``out_of_range``, ``alarm``, ``pump_error``); ``fail_count`` how many times.
    - ``readbacks``: values the next ``set_rate`` calls read back (and run at) instead of the
      commanded rate, one per call.
    - ``alarm``: ``read`` reports this alarm letter ('S' stall, 'R' power reset), as the real
      driver does: state ``alarm``, rate 0 and dispensed 0.0 (the pump gives no volume).
    - ``reported_state``: ``read`` reports this state instead of the true one.
    - ``unreachable``: every method raises :class:`Unreachable`.
    """

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}
        self.dispensed: dict[int, float] = {}
        self.calls: list[tuple] = []
        self.fail_code: str | None = None
        self.fail_count = 1
        self.readbacks: list[float] = []
        self.alarm: str | None = None
        self.reported_state: str | None = None
        self.unreachable = False
        self.init_fails = False

    def _io(self, *call) -> None:
        self.calls.append(call)
        if self.unreachable:
            raise Unreachable(f"pump {call[1]:02d}: no valid reply to {call[0]}")

    def initialise(self, address: int, diameter_mm: float) -> None:
        self._io("initialise", address, diameter_mm)
        if self.init_fails:
            raise DriverError("?NA during init", "pump_error")
        self.rates[address] = 0.0
        self.dispensed.setdefault(address, 0.0)

    def set_rate(self, address: int, ml_per_h: float) -> float:
        self._io("set_rate", address, ml_per_h)
        if self.fail_code is not None and self.fail_count > 0:
            self.fail_count -= 1
            raise DriverError(f"pump {address:02d} refused ({self.fail_code})", self.fail_code)
        running = self.readbacks.pop(0) if self.readbacks else ml_per_h
        self.rates[address] = running
        return running

    def stop(self, address: int) -> None:
        self._io("stop", address)
        self.rates[address] = 0.0

    def read(self, address: int) -> Reading:
        self._io("read", address)
        if self.alarm is not None:
            return Reading("alarm", 0.0, 0.0, self.alarm)
        rate = self.rates.get(address, 0.0)
        state = self.reported_state or ("infusing" if rate > 0 else "stopped")
        return Reading(state, rate, self.dispensed.get(address, 0.0), None)

    def count(self, method: str) -> int:
        return sum(1 for call in self.calls if call[0] == method)

    def set_rate_calls(self) -> list[float]:
        return [call[2] for call in self.calls if call[0] == "set_rate"]


# ---------------------------------------------------------------------------- helpers
def pump(**limits) -> BridgePump:
    config = {"pump": PUMP, "address": ADDRESS, "concentration": CONC, "amount_unit": "mg",
              "max_rate_ml_per_h": 100.0, "max_lease_s": 60.0}
    config.update(limits)
    return BridgePump(**config)


class Rig:
    """A bridge with one initialised pump on a fake driver, and a controller that sends."""

    def __init__(self, *, max_cmd_age_s: float = 2.0, allowed_sources=None, **limits):
        self.driver = FakeDriver()
        self.node = PumpBridgeNode([pump(**limits)], self.driver, max_cmd_age_s=max_cmd_age_s,
                                   allowed_sources=allowed_sources)
        assert self.node.initialise(T0, self.driver.initialise) == []
        self.seq = 0
        self.src, self.epoch = "controller-1", "e1"

    def send(self, message, now: float = T0, *, t_sent: float | None = None,
             seq: int | None = None, epoch: str | None = None, src: str | None = None,
             wall: float | None = None) -> list:
        """Deliver *message* at bridge time *now* (wall clock moves with it)."""
        if seq is None:
            self.seq += 1
            seq = self.seq
        wall = WALL0 + (now - T0) if wall is None else wall
        envelope = Envelope(message, src or self.src, epoch or self.epoch, seq,
                            wall if t_sent is None else t_sent, None)
        return self.node.receive(envelope, now, wall)

    @property
    def state(self):
        return self.node.pumps[PUMP]

    def status(self, now: float = T0) -> PumpStatus:
        return self.node.status(PUMP, now)


def set_rate(cmd_id: str, rate: float = 20.0, *, lease_s: float = 30.0, unit: str = "mL/h",
             fallback: Fallback | None = None, pump_name: str = PUMP, **kw) -> SetRate:
    return SetRate(cmd_id=cmd_id, pump=pump_name, rate=rate, unit=unit, lease_s=lease_s,
                   fallback=fallback or Fallback(), **kw)


def only(out: list, kind: type):
    found = [m for m in out if isinstance(m, kind)]
    assert len(found) == 1, f"expected one {kind.__name__} in {out!r}"
    return found[0]


def of(out: list, kind: type) -> list:
    return [m for m in out if isinstance(m, kind)]


def ack(out: list) -> Ack:
    return only(out, Ack)


# ---------------------------------------------------------------------------- start-up
def test_initialise_leaves_pumps_stopped_and_ready():
    rig = Rig()
    assert rig.driver.calls == [("initialise", ADDRESS, 26.59)]
    assert rig.state.mode == "READY"
    assert rig.status() == PumpStatus(pump=PUMP, state="stopped", rate=0.0, mode="READY")


def test_initialise_failure_stops_the_pump_until_acknowledged():
    driver = FakeDriver()
    driver.init_fails = True
    node = PumpBridgeNode([pump()], driver)
    out = node.initialise(T0, driver.initialise)
    alarm = only(out, Alarm)
    assert (alarm.code, alarm.priority) == ("pump.unreachable", "high")
    assert node.pumps[PUMP].mode == "STOPPED"
    answer = node.receive(Envelope(set_rate("c1"), "controller-1", "e1", 1, WALL0), T0, WALL0)
    assert ack(answer).code == "pump_error"
    assert driver.count("set_rate") == 0


def test_bridge_pump_rejects_bad_limits():
    with pytest.raises(ConfigError, match="max_rate_ml_per_h must be > 0"):
        pump(max_rate_ml_per_h=0.0)
    with pytest.raises(ConfigError, match="address must be in 0-99"):
        pump(address=100)


# ---------------------------------------------------------------------------- nominal
def test_set_rate_within_limits_is_applied_with_the_read_back_rate():
    rig = Rig()
    rig.driver.readbacks = [20.1]  # within the 1 % read-back tolerance
    out = rig.send(set_rate("c1", 20.0, lease_s=30.0))
    a = ack(out)
    assert (a.ok, a.code, a.applied_rate, a.unit, a.lease_remaining_s) == \
        (True, "applied", 20.1, "mL/h", 30.0)
    status = only(out, PumpStatus)
    assert (status.state, status.rate, status.mode, status.lease_remaining_s) == \
        ("infusing", 20.1, "COMMANDED", 30.0)
    assert rig.driver.set_rate_calls() == [20.0]
    assert of(out, Alarm) == []


def test_rate_in_another_volume_unit_is_converted_to_ml_per_h():
    rig = Rig()
    out = rig.send(set_rate("c1", 0.5, unit="mL/min"))
    assert ack(out).code == "applied"
    assert rig.driver.set_rate_calls() == [pytest.approx(30.0)]


def test_get_status_answers_with_an_ack_and_a_snapshot_without_pump_io():
    rig = Rig()
    rig.send(set_rate("c1", 20.0, lease_s=30.0))
    calls = len(rig.driver.calls)
    out = rig.send(GetStatus(cmd_id="g1", pump=PUMP), T0 + 10.0)
    a = ack(out)
    assert (a.ok, a.code) == (True, "applied")
    status = only(out, PumpStatus)
    assert (status.rate, status.mode, status.lease_remaining_s) == (20.0, "COMMANDED", 20.0)
    assert len(rig.driver.calls) == calls


def test_hello_is_answered_and_records_the_controller_epoch():
    rig = Rig()
    out = rig.send(Hello(role="controller"), epoch="e7")
    assert out == [Hello(role="pump-bridge")]
    assert rig.node.controller_epoch == {"controller-1": "e7"}


def test_mode_changes_are_logged_with_their_cause():
    rig = Rig()
    rig.send(set_rate("c1"), T0 + 1.0)
    rig.node.poll(T0 + 31.0)
    assert [(t, p, old, new) for t, p, old, new, _ in rig.node.transitions] == [
        (T0, PUMP, "INIT", "READY"), (T0 + 1.0, PUMP, "READY", "COMMANDED"),
        (T0 + 31.0, PUMP, "COMMANDED", "FALLBACK")]
    assert all(cause for *_, cause in rig.node.transitions)
    assert "c1" in rig.node.transitions[1][4]


# ---------------------------------------------------------------------------- limits (T13, T14)
# (bridge limits, the second command, what the nack text says)
LIMIT_CASES = {
    "rate above max_rate (T13)": ({}, {"rate": 150.0}, r"rate 150 .*above 100"),
    "fallback above max_rate": ({}, {"fallback": Fallback(action="preset_rate", rate=150.0)},
                                r"fallback 150\) mL/h above 100"),
    "step beyond max_step (T14)": ({"max_step_ml_per_h": 20.0}, {"rate": 45.0},
                                   r"step \+25 mL/h beyond 20"),
    "lease above max_lease": ({}, {"lease_s": 61.0}, r"lease 61 s above 60 s"),
    "hourly volume (T14)": ({"max_volume_per_h_ml": 0.3}, {"lease_s": 60.0},
                            r"volume in the last hour would exceed 0.3 mL"),
}


@pytest.mark.parametrize("limits, change, text", LIMIT_CASES.values(), ids=LIMIT_CASES)
def test_command_beyond_a_limit_is_refused_and_the_previous_lease_keeps_running(
        limits, change, text):
    rig = Rig(**limits)
    assert ack(rig.send(set_rate("c1", 20.0, lease_s=30.0), T0)).code == "applied"
    fields = {"rate": 20.0, "lease_s": 30.0} | change
    out = rig.send(set_rate("c2", **fields), T0 + 1.0)
    a = ack(out)
    assert (a.ok, a.code) == (False, "out_of_range")
    assert re.search(text, a.text), a.text
    alarm = only(out, Alarm)
    assert alarm.code == "bridge.out_of_range"
    assert of(out, PumpStatus) == []
    assert rig.driver.set_rate_calls() == [20.0]          # the driver was not called again
    assert rig.state.lease.cmd_id == "c1"                  # the previous lease is untouched
    assert rig.status(T0 + 1.0).rate == 20.0
    assert rig.status(T0 + 1.0).lease_remaining_s == pytest.approx(29.0)
    assert rig.state.mode == "COMMANDED"
    # ... and runs to its own end, then its fallback applies
    rig.node.poll(T0 + 29.9)
    assert rig.state.mode == "COMMANDED"
    rig.node.poll(T0 + 30.0)
    assert rig.state.mode == "FALLBACK"
    assert rig.driver.set_rate_calls() == [20.0, 0.0]


def test_hourly_volume_within_the_limit_is_accepted():
    rig = Rig(max_volume_per_h_ml=0.4)
    rig.send(set_rate("c1", 20.0, lease_s=30.0), T0)
    # over the last hour: 20 mL/h for 1 s, plus 20 mL/h for the next 60 s = 0.339 mL
    assert ack(rig.send(set_rate("c2", 20.0, lease_s=60.0), T0 + 1.0)).code == "applied"


def test_driver_out_of_range_refusal_is_a_nack_and_leaves_the_pump_as_it_was():
    rig = Rig()
    rig.send(set_rate("c1", 20.0), T0)
    rig.driver.fail_code = "out_of_range"
    out = rig.send(set_rate("c2", 25.0), T0 + 1.0)
    assert (ack(out).ok, ack(out).code) == (False, "out_of_range")
    assert rig.state.mode == "COMMANDED"
    assert rig.state.lease.cmd_id == "c1"
    assert rig.status().rate == 20.0


# ---------------------------------------------------------------------------- dose check (T15)
def test_dose_rate_disagreeing_with_the_volume_rate_is_refused_with_a_high_alarm():
    rig = Rig()
    # 20 mL/h of 10 mg/mL is 200 mg/h; 203 mg/h is 1.5 % off
    out = rig.send(set_rate("c1", 20.0, dose_rate=203.0, dose_unit="mg/h"))
    a = ack(out)
    assert (a.ok, a.code) == (False, "unit")
    alarm = only(out, Alarm)
    assert (alarm.code, alarm.priority) == ("bridge.dose_mismatch", "high")
    assert rig.driver.count("set_rate") == 0
    assert rig.state.mode == "READY"


@pytest.mark.parametrize("dose_rate, dose_unit", [(200.0, "mg/h"), (201.5, "mg/h"),
                                                  (200.0 / 60 * 1000, "ug/min")])
def test_dose_rate_agreeing_within_one_percent_is_accepted(dose_rate, dose_unit):
    rig = Rig()
    out = rig.send(set_rate("c1", 20.0, dose_rate=dose_rate, dose_unit=dose_unit))
    assert ack(out).code == "applied"
    assert rig.driver.set_rate_calls() == [20.0]


def test_dose_unit_of_another_kind_is_refused_as_unit():
    rig = Rig()
    out = rig.send(set_rate("c1", 20.0, dose_rate=50.0, dose_unit="mmol/min"))
    assert (ack(out).ok, ack(out).code) == (False, "unit")
    assert rig.driver.count("set_rate") == 0


# ---------------------------------------------------------------------------- ordering
def test_repeated_cmd_id_gets_the_cached_ack_and_is_applied_once():
    rig = Rig()
    first = ack(rig.send(set_rate("c1", 20.0), T0))
    again = ack(rig.send(set_rate("c1", 20.0), T0 + 0.5))  # a retry: new seq, same cmd_id
    assert (again.ok, again.code, again.applied_rate) == (True, "duplicate", first.applied_rate)
    assert rig.driver.count("set_rate") == 1


def test_repeated_cmd_id_of_a_refused_command_gets_the_same_refusal():
    rig = Rig()
    assert ack(rig.send(set_rate("c1", 500.0), T0)).code == "out_of_range"
    again = ack(rig.send(set_rate("c1", 500.0), T0 + 0.5))
    assert (again.ok, again.code) == (False, "out_of_range")
    assert rig.driver.count("set_rate") == 0


@pytest.mark.parametrize("seq", [4, 5], ids=["lower seq", "same seq"])
def test_out_of_order_command_is_stale(seq):
    rig = Rig()
    assert ack(rig.send(set_rate("c1", 20.0), seq=5)).code == "applied"
    out = rig.send(set_rate("c2", 30.0), T0 + 0.1, seq=seq)
    assert (ack(out).ok, ack(out).code) == (False, "stale")
    assert rig.driver.set_rate_calls() == [20.0]
    assert rig.node.rejected == {"stale": 1}


def test_command_from_an_older_epoch_after_a_newer_one_is_stale():
    rig = Rig()
    rig.send(set_rate("a1", 20.0), T0, epoch="e1", seq=10)
    assert ack(rig.send(set_rate("b1", 25.0), T0 + 1.0, epoch="e2", seq=1)).code == "applied"
    out = rig.send(set_rate("a2", 30.0), T0 + 1.5, epoch="e1", seq=11)  # replay (T34)
    assert ack(out).code == "stale"
    assert rig.driver.set_rate_calls() == [20.0, 25.0]


def test_seq_from_another_source_is_independent():
    rig = Rig()
    rig.send(set_rate("a1", 20.0), seq=50, src="controller-1")
    out = rig.send(set_rate("b1", 20.0), T0 + 0.1, seq=1, src="controller-2")
    assert ack(out).code == "applied"


# ---------------------------------------------------------------------------- age (T34, T35)
@pytest.mark.parametrize("offset", [-2.5, 2.5], ids=["too old", "from the future (skew)"])
def test_command_outside_the_age_bound_is_expired_with_an_alarm(offset):
    rig = Rig(max_cmd_age_s=2.0)
    out = rig.send(set_rate("c1"), T0, t_sent=WALL0 + offset, wall=WALL0)
    a = ack(out)
    assert (a.ok, a.code) == (False, "expired")
    assert only(out, Alarm).code == "bridge.command_expired"
    assert rig.driver.count("set_rate") == 0
    assert rig.state.mode == "READY"


@pytest.mark.parametrize("offset", [-1.9, 0.0, 1.9])
def test_command_within_the_age_bound_is_accepted(offset):
    rig = Rig(max_cmd_age_s=2.0)
    out = rig.send(set_rate("c1"), T0, t_sent=WALL0 + offset, wall=WALL0)
    assert ack(out).code == "applied"


# ---------------------------------------------------------------------------- leases (T16, T17)
def test_lease_end_applies_the_stop_fallback_with_an_alarm():
    rig = Rig()
    rig.send(set_rate("c1", 20.0, lease_s=30.0), T0)
    before = rig.node.poll(T0 + 29.9)
    assert of(before, Alarm) == []
    assert rig.state.mode == "COMMANDED" and rig.driver.rates[ADDRESS] == 20.0
    out = rig.node.poll(T0 + 30.0)
    alarm = only(out, Alarm)
    assert alarm.code == "pump.lease_expired"
    assert rig.driver.set_rate_calls() == [20.0, 0.0]
    assert rig.driver.rates[ADDRESS] == 0.0
    status = only(out, PumpStatus)
    assert (status.mode, status.rate, status.state, status.lease_remaining_s) == \
        ("FALLBACK", 0.0, "stopped", None)
    # once applied, later polls do not apply it again
    assert of(rig.node.poll(T0 + 40.0), Alarm) == []
    assert rig.driver.set_rate_calls() == [20.0, 0.0]


@pytest.mark.parametrize("fallback, expected", [
    (Fallback(action="preset_rate", rate=5.0), 5.0),
    (Fallback(action="preset_rate", rate=0.1, unit="mL/min"), 6.0)])
def test_lease_end_applies_the_preset_rate_fallback(fallback, expected):
    rig = Rig()
    rig.send(set_rate("c1", 20.0, lease_s=30.0, fallback=fallback), T0)
    out = rig.node.poll(T0 + 30.0)
    assert only(out, Alarm).code == "pump.lease_expired"
    assert rig.driver.rates[ADDRESS] == pytest.approx(expected)
    assert rig.state.mode == "FALLBACK"
    assert rig.status().rate == pytest.approx(expected)


def test_a_new_command_renews_the_lease():
    rig = Rig()
    rig.send(set_rate("c1", 20.0, lease_s=30.0), T0)
    rig.send(set_rate("c2", 22.0, lease_s=30.0), T0 + 20.0)
    assert of(rig.node.poll(T0 + 30.0), Alarm) == []
    assert rig.state.mode == "COMMANDED" and rig.driver.rates[ADDRESS] == 22.0
    assert rig.status(T0 + 30.0).lease_remaining_s == pytest.approx(20.0)
    assert only(rig.node.poll(T0 + 50.0), Alarm).code == "pump.lease_expired"
    assert rig.driver.rates[ADDRESS] == 0.0


def test_a_command_after_the_fallback_takes_the_pump_back():
    rig = Rig()
    rig.send(set_rate("c1", 20.0, lease_s=30.0), T0)
    rig.node.poll(T0 + 30.0)
    out = rig.send(set_rate("c2", 10.0, lease_s=30.0), T0 + 31.0)
    assert ack(out).code == "applied"
    assert rig.state.mode == "COMMANDED" and rig.driver.rates[ADDRESS] == 10.0


# ---------------------------------------------------------------------------- read-back (T23)
def test_read_back_mismatch_once_is_retried_and_applied():
    rig = Rig()
    rig.driver.readbacks = [15.0]  # first try wrong, the retry reads back 20
    out = rig.send(set_rate("c1", 20.0))
    assert (ack(out).code, ack(out).applied_rate) == ("applied", 20.0)
    assert rig.driver.set_rate_calls() == [20.0, 20.0]
    assert rig.state.mode == "COMMANDED"


def test_read_back_mismatch_twice_stops_the_pump_until_an_operator_acknowledges():
    rig = Rig()
    rig.driver.readbacks = [15.0, 15.0]
    out = rig.send(set_rate("c1", 20.0), T0)
    a = ack(out)
    assert (a.ok, a.code) == (False, "pump_error")
    alarm = only(out, Alarm)
    assert (alarm.code, alarm.priority) == ("pump.readback_mismatch", "high")
    assert rig.driver.set_rate_calls() == [20.0, 20.0]       # one retry, no more
    assert rig.driver.count("stop") == 1 and rig.driver.rates[ADDRESS] == 0.0
    assert rig.state.mode == "STOPPED"
    # STOPPED means the stop was read back (issue 14.5)
    assert (rig.status().rate, rig.status().state) == (0.0, "stopped")
    assert "stop read back" in rig.state.cause
    # refused until acknowledged (B8), without touching the pump
    later = rig.send(set_rate("c2", 20.0), T0 + 5.0)
    assert (ack(later).ok, ack(later).code) == (False, "pump_error")
    assert "acknowledge" in ack(later).text
    assert rig.driver.count("set_rate") == 2
    # polls check that a STOPPED pump stays stopped, and never restart it
    reads = rig.driver.count("read")
    rig.node.poll(T0 + 6.0)
    assert rig.driver.count("read") == reads + 1 and rig.state.mode == "STOPPED"
    assert rig.driver.count("set_rate") == 2
    # the operator acknowledges: stopped, re-read, commands accepted again
    stops, reads = rig.driver.count("stop"), rig.driver.count("read")
    status = only(rig.node.acknowledge(PUMP, T0 + 10.0), PumpStatus)
    assert (rig.driver.count("stop"), rig.driver.count("read")) == (stops + 1, reads + 1)
    assert (status.mode, status.state, status.rate) == ("READY", "stopped", 0.0)
    assert ack(rig.send(set_rate("c3", 20.0), T0 + 11.0)).code == "applied"
    assert rig.state.mode == "COMMANDED"


# ---------------------------------------------------------------------------- pump alarms (T21, T22)
@pytest.mark.parametrize("letter", ["S", "R"], ids=["stall", "power reset"])
def test_pump_alarm_during_poll_stops_the_pump_with_no_auto_resume(letter):
    rig = Rig()
    rig.send(set_rate("c1", 20.0, lease_s=30.0), T0)
    rig.driver.alarm = letter
    rig.driver.rates[ADDRESS] = 0.0  # the pump stopped itself
    out = rig.node.poll(T0 + 1.0)
    alarm = only(out, Alarm)
    assert (alarm.code, alarm.priority) == (f"pump.alarm_{letter}", "high")
    assert rig.state.mode == "STOPPED"
    assert rig.status().rate == 0.0 and rig.status().lease_remaining_s is None
    # the alarm clears at the pump: still no restart, no fallback, commands refused
    rig.driver.alarm = None
    rig.node.poll(T0 + 40.0)
    assert rig.state.mode == "STOPPED"
    assert rig.driver.set_rate_calls() == [20.0]
    assert ack(rig.send(set_rate("c2", 20.0), T0 + 41.0)).code == "pump_error"
    assert rig.driver.set_rate_calls() == [20.0]


def test_acknowledge_while_the_pump_alarm_persists_keeps_it_stopped():
    rig = Rig()
    rig.send(set_rate("c1", 20.0), T0)
    rig.driver.alarm = "S"
    rig.node.poll(T0 + 1.0)
    out = rig.node.acknowledge(PUMP, T0 + 2.0)
    assert only(out, Alarm).code == "pump.alarm_S"
    assert rig.state.mode == "STOPPED"
    rig.driver.alarm = None
    assert only(rig.node.acknowledge(PUMP, T0 + 3.0), PumpStatus).mode == "READY"


def test_pump_reporting_another_state_than_expected_is_stopped():
    rig = Rig()
    rig.send(set_rate("c1", 20.0), T0)
    rig.driver.reported_state = "stopped"  # the bridge set 20 mL/h: it expects infusing
    out = rig.node.poll(T0 + 1.0)
    alarm = only(out, Alarm)
    assert (alarm.code, alarm.priority) == ("pump.state_mismatch", "high")
    assert rig.state.mode == "STOPPED"
    assert rig.driver.count("stop") == 1


def test_an_alarm_reading_does_not_erase_the_delivered_volume():
    """Regression (was a bug): poll() stores reading.dispensed_ml before checking
    reading.alarm; an alarm reading carries no volume (the NE-1000 driver returns 0.0), so the
    reported delivered volume drops to 0."""
    rig = Rig()
    rig.send(set_rate("c1", 20.0), T0)
    rig.driver.dispensed[ADDRESS] = 0.5
    rig.node.poll(T0 + 90.0)
    assert rig.status().delivered == 0.5
    rig.driver.alarm = "S"
    rig.node.poll(T0 + 91.0)
    assert rig.status().delivered == 0.5


# ---------------------------------------------------------------------------- driver faults (T19, T24, T25)
def test_unreachable_pump_on_set_rate_is_a_pump_error_and_stops_it():
    rig = Rig()
    rig.driver.unreachable = True
    out = rig.send(set_rate("c1", 20.0))
    a = ack(out)
    assert (a.ok, a.code) == (False, "pump_error")
    alarm = only(out, Alarm)
    assert alarm.priority == "high" and alarm.code.startswith("pump.")
    assert rig.state.mode == "STOPPED"
    rig.driver.unreachable = False
    assert ack(rig.send(set_rate("c2", 20.0), T0 + 1.0)).code == "pump_error"


@pytest.mark.parametrize("code, alarm_code, state", [("alarm", "pump.alarm", "stopped"),
                                                     ("pump_error", "pump.pump_error",
                                                      "stopped")])
def test_driver_refusal_on_set_rate_is_a_pump_error_and_stops_it(code, alarm_code, state):
    rig = Rig()
    rig.driver.fail_code = code
    out = rig.send(set_rate("c1", 20.0))
    assert (ack(out).ok, ack(out).code) == (False, "pump_error")
    alarm = only(out, Alarm)
    assert (alarm.code, alarm.priority) == (alarm_code, "high")
    assert rig.state.mode == "STOPPED" and rig.status().state == state


def test_unreachable_pump_during_poll_is_stopped_with_a_high_alarm():
    rig = Rig()
    rig.send(set_rate("c1", 20.0), T0)
    rig.driver.unreachable = True
    out = rig.node.poll(T0 + 1.0)
    alarm = only(out, Alarm)
    assert (alarm.code, alarm.priority) == ("pump.unreachable", "high")
    assert rig.state.mode == "STOPPED"


def test_unreachable_pump_at_lease_end_is_stopped_with_a_high_alarm():
    rig = Rig()
    rig.send(set_rate("c1", 20.0, lease_s=30.0), T0)
    rig.driver.unreachable = True
    out = rig.node.poll(T0 + 30.0)
    assert [(a.code, a.priority) for a in of(out, Alarm)] == [("pump.unreachable", "high")]
    assert rig.state.mode == "STOPPED"


# ---------------------------------------------------------------------------- stop
def test_stop_is_accepted_even_with_a_stale_seq_and_stops_the_pump():
    rig = Rig()
    rig.send(set_rate("c1", 20.0, lease_s=30.0), T0, seq=10)
    out = rig.send(Stop(cmd_id="s1", pump=PUMP, reason="operator"), T0 + 1.0, seq=3)
    a = ack(out)
    assert (a.ok, a.code, a.applied_rate) == (True, "applied", 0.0)
    assert rig.driver.count("stop") == 1 and rig.driver.rates[ADDRESS] == 0.0
    status = only(out, PumpStatus)
    assert (status.rate, status.state, status.mode, status.lease_remaining_s) == \
        (0.0, "stopped", "READY", None)
    # the lease went with it: no fallback at its end
    assert of(rig.node.poll(T0 + 30.0), Alarm) == []
    assert rig.driver.set_rate_calls() == [20.0]


def test_stop_is_accepted_even_when_expired():
    rig = Rig()
    rig.send(set_rate("c1", 20.0), T0)
    out = rig.send(Stop(cmd_id="s1", pump=PUMP), T0 + 1.0, t_sent=WALL0 - 100.0)
    assert ack(out).code == "applied"
    assert rig.driver.rates[ADDRESS] == 0.0


def test_stop_does_not_clear_a_stopped_fault():
    rig = Rig()
    rig.driver.readbacks = [15.0, 15.0]
    rig.send(set_rate("c1", 20.0), T0)
    assert ack(rig.send(Stop(cmd_id="s1", pump=PUMP), T0 + 1.0)).code == "applied"
    assert rig.state.mode == "STOPPED"
    assert ack(rig.send(set_rate("c2", 20.0), T0 + 2.0)).code == "pump_error"


def test_stop_on_an_unreachable_pump_is_a_pump_error():
    rig = Rig()
    rig.send(set_rate("c1", 20.0), T0)
    rig.driver.unreachable = True
    out = rig.send(Stop(cmd_id="s1", pump=PUMP), T0 + 1.0)
    assert (ack(out).ok, ack(out).code) == (False, "pump_error")
    assert only(out, Alarm).code == "pump.unreachable"
    assert rig.state.mode == "STOPPED"


# ---------------------------------------------------------------------------- who and what
def test_unknown_source_is_not_authorized_and_nothing_is_applied():
    rig = Rig(allowed_sources={"controller-1"})
    out = rig.send(set_rate("x1", 20.0), src="intruder")
    assert (ack(out).ok, ack(out).code) == (False, "not_authorized")
    stop = rig.send(Stop(cmd_id="x2", pump=PUMP), src="intruder")
    assert ack(stop).code == "not_authorized"
    assert rig.driver.count("set_rate") == 0 and rig.driver.count("stop") == 0
    assert ack(rig.send(set_rate("c1", 20.0), T0 + 0.1)).code == "applied"


@pytest.mark.parametrize("message", [set_rate("c1", pump_name="remi"),
                                     Stop(cmd_id="c1", pump="remi"),
                                     GetStatus(cmd_id="c1", pump="remi")],
                         ids=["set_rate", "stop", "get_status"])
def test_unknown_pump_is_a_schema_error(message):
    rig = Rig()
    out = rig.send(message)
    assert (ack(out).ok, ack(out).code) == (False, "schema")
    assert "remi" in ack(out).text
    assert [c[0] for c in rig.driver.calls] == ["initialise"]


# ---------------------------------------------------------------------------- regressions
# Bugs these tests found in the bridge (xfail at b8d3e4a, fixed in 1c7aab5).
def test_restarted_controller_reusing_cmd_ids_is_not_answered_from_the_old_cache():
    """Regression (was a bug): the ack cache is keyed by cmd_id alone; a restarted controller
    (new epoch) numbers its cmd_ids from 1 again (ControllerNode: f'{src}-{n}') and gets the
    old epoch's acks as 'duplicate', nothing applied."""
    rig = Rig()
    rig.send(set_rate("controller-1-1", 20.0), T0, epoch="e1", seq=1)
    out = rig.send(set_rate("controller-1-1", 10.0), T0 + 40.0, epoch="e2", seq=1)
    assert ack(out).code == "applied"
    assert rig.driver.rates[ADDRESS] == 10.0


def test_unauthorised_nack_does_not_block_the_authorised_command_with_the_same_id():
    """Regression (was a bug): the ack cache is keyed by cmd_id alone and checked before the
    source: an unauthorised sender's nack is cached and answers the authorised controller's
    command with the same cmd_id."""
    rig = Rig(allowed_sources={"controller-1"})
    rig.send(set_rate("controller-1-1", 20.0), T0, src="intruder")
    out = rig.send(set_rate("controller-1-1", 20.0), T0 + 0.1)
    assert ack(out).code == "applied"


def test_expired_replay_from_an_unseen_epoch_does_not_lock_out_the_live_controller():
    """Regression (was a bug): receive() classifies (src, epoch, seq) before the age check, so
    an expired replay from an epoch the bridge has not seen retires the live controller's
    epoch and all its later commands are 'stale'."""
    rig = Rig()
    assert ack(rig.send(set_rate("live-1", 20.0), T0, epoch="e2", seq=1)).code == "applied"
    replay = rig.send(set_rate("old-7", 90.0), T0 + 1.0, epoch="e0", seq=7,
                      t_sent=WALL0 - 3600.0)
    assert ack(replay).code == "expired"
    out = rig.send(set_rate("live-2", 20.0), T0 + 2.0, epoch="e2", seq=2)
    assert ack(out).code == "applied"


def test_fallback_read_back_mismatch_stops_the_pump_with_a_high_alarm():
    """Regression (was a bug): the lease-end fallback takes the driver's read-back as the
    applied rate without comparing it with the fallback rate (no retry, no STOPPED), so a pump
    that keeps infusing is reported as FALLBACK."""
    rig = Rig()
    rig.send(set_rate("c1", 20.0, lease_s=30.0), T0)
    rig.driver.readbacks = [20.0, 20.0]  # the stop does not take: still 20 mL/h
    out = rig.node.poll(T0 + 30.0)
    assert ("pump.readback_mismatch", "high") in [(a.code, a.priority) for a in of(out, Alarm)]
    assert rig.state.mode == "STOPPED"
    assert rig.driver.count("stop") >= 1 and rig.driver.rates[ADDRESS] == 0.0


def test_fallback_volume_counts_against_the_hourly_limit():
    """Regression (was a bug): volume_log records only commanded rates; the lease-end fallback
    (and stops and faults) are not logged, so an hour at a preset fallback rate does not count
    against max_volume_per_h_ml."""
    rig = Rig(max_volume_per_h_ml=5.0, max_rate_ml_per_h=20.0)
    fallback = Fallback(action="preset_rate", rate=4.0)
    assert ack(rig.send(set_rate("c1", 0.0, lease_s=10.0, fallback=fallback), T0)).code == \
        "applied"
    rig.node.poll(T0 + 10.0)
    assert rig.state.mode == "FALLBACK" and rig.driver.rates[ADDRESS] == 4.0
    # 4 mL/h for 1990 s is 2.2 mL: a further 3 mL/h x 60 s... fits; 20 mL/h x 600 s does not
    out = rig.send(set_rate("c2", 20.0, lease_s=600.0, fallback=fallback), T0 + 2000.0)
    assert ack(out).code == "out_of_range"


# ---------------------------------------------------------------------------- issue 14
# Defects found by an adversarial review of the pump path; each test fails on the code before.
def test_a_preset_fallback_beyond_the_limits_is_refused_when_the_command_arrives():
    """14.4: with max_volume_per_h_ml = 1 and max_step 50, a set_rate of 0 mL/h with a 1-s
    lease and a 100 mL/h preset fallback was applied and ran at 100 mL/h after the lease.
    The fallback is checked against every limit: rate, step up from the command, volume."""
    rig = Rig(max_volume_per_h_ml=1.0, max_step_ml_per_h=50.0, max_rate_ml_per_h=200.0)
    fallback = Fallback(action="preset_rate", rate=100.0)
    out = rig.send(set_rate("c1", 0.0, lease_s=1.0, fallback=fallback), T0)
    assert (ack(out).code, only(out, Alarm).code) == ("out_of_range", "bridge.out_of_range")
    assert "fallback step +100 mL/h" in ack(out).text
    assert rig.driver.count("set_rate") == 0
    rig.node.poll(T0 + 60.0)
    assert rig.driver.rates.get(ADDRESS, 0.0) == 0.0
    # the step is not what stops it: within the step, the hourly volume does
    rig = Rig(max_volume_per_h_ml=1.0, max_rate_ml_per_h=200.0)
    out = rig.send(set_rate("c1", 0.0, lease_s=1.0, fallback=fallback), T0)
    assert "fallback 100 mL/h would exceed 1 mL in an hour" in ack(out).text
    # a stop fallback is never limited, whatever the step down
    rig = Rig(max_step_ml_per_h=10.0)
    assert ack(rig.send(set_rate("c1", 10.0), T0)).code == "applied"
    assert ack(rig.send(set_rate("c2", 20.0), T0 + 1.0)).code == "applied"
    assert ack(rig.send(set_rate("c3", 0.0), T0 + 2.0)).code == "applied"  # a fall: allowed


def test_a_running_fallback_is_stopped_at_the_hourly_volume():
    """14.4: the hourly volume is enforced while a preset fallback runs: stopped (read back)
    with a high alarm once the last hour's volume reaches the limit, at most one check late."""
    rig = Rig(max_volume_per_h_ml=2.0, max_rate_ml_per_h=20.0)
    fallback = Fallback(action="preset_rate", rate=2.0)
    rig.send(set_rate("c1", 20.0, lease_s=60.0, fallback=fallback), T0)   # 1/3 mL
    rig.node.expire(T0 + 60.0)
    assert rig.state.mode == "FALLBACK" and rig.driver.rates[ADDRESS] == 2.0
    # the remaining 5/3 mL at 2 mL/h take 3000 s: the bridge knows when to look
    assert rig.node.next_deadline(T0 + 60.0) == pytest.approx(T0 + 60.0 + 3000.0)
    assert of(rig.node.expire(T0 + 60.0 + 2999.0), Alarm) == []
    out = rig.node.expire(T0 + 60.0 + 3000.5)
    alarm = only(out, Alarm)
    assert (alarm.code, alarm.priority) == ("bridge.volume_limit", "high")
    assert rig.driver.rates[ADDRESS] == 0.0 and rig.status().rate == 0.0
    assert rig.state.mode == "FALLBACK" and "2 mL delivered in the last hour" in rig.state.cause
    # a new command is judged on the same hour
    later = rig.send(set_rate("c2", 2.0, lease_s=60.0), T0 + 3100.0)
    assert ack(later).code == "out_of_range"


def test_a_rate_set_over_an_hour_ago_still_counts_until_it_changes():
    """14.4: a preset fallback that has run for more than an hour (one entry in the rate log,
    older than the hour) still counts in the last hour's volume."""
    rig = Rig(max_volume_per_h_ml=3.0, max_rate_ml_per_h=20.0)
    rig.send(set_rate("c1", 0.0, lease_s=10.0, fallback=Fallback(action="preset_rate",
                                                                   rate=2.9)), T0)
    rig.node.expire(T0 + 10.0)
    assert rig.driver.rates[ADDRESS] == 2.9
    assert of(rig.node.expire(T0 + 7200.0), Alarm) == []  # 2.9 mL in any hour: within 3
    out = rig.send(set_rate("c2", 20.0, lease_s=60.0), T0 + 7200.0)
    assert ack(out).code == "out_of_range"  # 2.9 mL + 20 mL/h x 60 s > 3 mL


@pytest.mark.parametrize("where", ["set_rate", "fallback"])
def test_a_driver_error_leaves_the_pump_stopped_and_read_back(where):
    """14.5: when the driver raises during a set or a fallback, the bridge used to mark the
    pump STOPPED without sending a stop, and never polled it again: the pump infused on
    past its lease. Now a stop is commanded and read back."""
    rig = Rig()
    if where == "fallback":
        rig.send(set_rate("c1", 20.0, lease_s=5.0, fallback=Fallback(
            action="preset_rate", rate=10.0)), T0)
    rig.driver.fail_code, rig.driver.fail_count = "pump_error", 1
    if where == "set_rate":
        rig.driver.rates[ADDRESS] = 20.0  # running from before
        out = rig.send(set_rate("c1", 30.0), T0)
    else:
        out = rig.node.expire(T0 + 5.0)
    assert only(out, Alarm).priority == "high"
    assert rig.driver.calls[-2:] == [("stop", ADDRESS), ("read", ADDRESS)]
    assert rig.driver.rates[ADDRESS] == 0.0
    assert rig.state.mode == "STOPPED" and rig.status().state == "stopped"
    assert "stop read back" in only(out, Alarm).text


def test_an_unreachable_pump_is_left_to_its_watchdog_and_stopped_when_it_answers():
    """14.5: STOPPED means a stop read back, or the pump unreachable with its watchdog in
    charge (said in the status and cause); once it answers again it is stopped and read
    back, tried at most every few seconds."""
    driver = FakeDriver()
    node = PumpBridgeNode([pump()], driver, watchdog_s=3.0)
    node.initialise(T0, driver.initialise)
    node.receive(Envelope(set_rate("c1", 20.0), "c", "e", 1, WALL0), T0, WALL0)
    driver.unreachable = True
    out = node.poll(T0 + 1.0)
    assert "its safe-mode watchdog stops it within 3 s" in only(out, Alarm).text
    assert node.status(PUMP, T0 + 1.0).state == "disconnected"
    driver.unreachable = False
    driver.rates[ADDRESS] = 20.0  # its watchdog had not fired: still running
    node.poll(T0 + 2.0)  # too soon to try again
    assert driver.rates[ADDRESS] == 20.0
    node.poll(T0 + 6.5)
    assert driver.rates[ADDRESS] == 0.0 and node.status(PUMP, T0 + 6.5).state == "stopped"
    assert node.pumps[PUMP].mode == "STOPPED"  # still needs the operator


def test_without_a_watchdog_an_unreachable_pump_says_so():
    """14.5: running without a hardware watchdog is said in the alarm."""
    rig = Rig()
    rig.send(set_rate("c1", 20.0), T0)
    rig.driver.unreachable = True
    out = rig.node.poll(T0 + 1.0)
    assert "NO hardware watchdog" in only(out, Alarm).text


def test_a_stopped_pump_found_infusing_is_stopped_again_then_starved():
    """14.5: a STOPPED pump is read every poll; found infusing it is stopped again with a
    high alarm; when it does not stop, the bridge stops feeding its watchdog."""
    driver = FakeDriver()
    node = PumpBridgeNode([pump()], driver, watchdog_s=3.0)
    node.initialise(T0, driver.initialise)
    driver.readbacks = [15.0, 15.0]
    node.receive(Envelope(set_rate("c1", 20.0), "c", "e", 1, WALL0), T0, WALL0)
    assert node.pumps[PUMP].mode == "STOPPED"
    driver.rates[ADDRESS] = 7.0   # something started it
    out = node.poll(T0 + 1.0)
    assert [a.code for a in of(out, Alarm)] == ["pump.infusing_while_stopped"]
    assert driver.rates[ADDRESS] == 0.0
    driver.stop = lambda address: None  # now it ignores stops
    driver.rates[ADDRESS] = 7.0
    out = node.poll(T0 + 2.0)
    assert [a.code for a in of(out, Alarm)] == ["pump.infusing_while_stopped",
                                                "pump.stop_failed"]
    calls = len(driver.calls)
    node.poll(T0 + 3.0)
    assert len(driver.calls) == calls  # starved: its watchdog stops it


def test_a_flood_of_commands_cannot_hold_a_lease_past_its_end():
    """14.5b (node part): lease ends are applied by expire(), cheap and separate from the
    device poll, and next_deadline() says when the next one is due."""
    rig = Rig()
    rig.send(set_rate("c1", 20.0, lease_s=2.0), T0)
    assert rig.node.next_deadline(T0) == T0 + 2.0
    for k in range(100):  # a flood of status requests does not renew it
        rig.send(GetStatus(cmd_id=f"g{k}", pump=PUMP), T0 + k * 0.019)
    assert rig.node.expire(T0 + 1.99) == []
    assert only(rig.node.expire(T0 + 2.0), Alarm).code == "pump.lease_expired"
    assert rig.node.next_deadline(T0 + 2.0) == float("inf")
    assert rig.driver.rates[ADDRESS] == 0.0


@pytest.mark.parametrize("limits, rate, fallback", [
    ({}, 20.0, float("nan")), ({"max_step_ml_per_h": 5.0}, float("nan"), 0.0)])
def test_not_a_number_fails_every_limit(limits, rate, fallback):
    """14.5: a NaN that got past message validation (a defect elsewhere) fails every limit
    check instead of passing every '>' test."""
    rig = Rig(**limits)
    state = rig.state
    assert rig.node._beyond_limits(state, T0, rate, fallback, 10.0) is not None
