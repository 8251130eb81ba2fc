"""Infusion pumps: quantisation, leases, limits, start-up lag, syringe, occlusion, volume
accounting, configuration errors, and the plant node that answers protocol commands."""

import math

import numpy as np
import pytest
import simpy

from mpc_dose.errors import ConfigError
from mpc_dose.model.library import load
from mpc_dose.node.plant_node import PlantNode
from mpc_dose.plant.patient import VirtualPatient
from mpc_dose.plant.pump import InfusionPump, PumpAlarm, PumpConfig, PumpSnapshot
from mpc_dose.protocol.messages import Ack, GetStatus, PumpStatus, SetRate, Stop

MODEL = "propofol-schnider+remifentanil-minto+bis-bouillon"
COVARIATES = {"age": 35, "height": 170, "weight": 70, "sex": "male"}
CONC = 10.0  # mg/mL propofol
LONG = 1e6   # a lease that never runs out in these tests


class Rig:
    """A pump on a virtual patient; records what reaches the patient and what the pump emits."""

    def __init__(self, **config):
        config.setdefault("pump", "p1")
        config.setdefault("input", "propofol")
        config.setdefault("concentration", CONC)
        self.env = simpy.Environment()
        lib = load(MODEL)
        self.patient = VirtualPatient(lib.model, lib.population.typical_parameters(COVARIATES))
        self.index = lib.model.input_index(config["input"])
        self.deliveries: list[tuple[float, float]] = [(0.0, 0.0)]  # (t, amount/s)
        original = self.patient.set_rate

        def spy(t_s, input_index, rate):
            if input_index == self.index:
                self.deliveries.append((t_s, rate))
            original(t_s, input_index, rate)

        self.patient.set_rate = spy
        self.events: list[tuple[float, object]] = []
        self.pump = InfusionPump(self.env, PumpConfig(**config), self.patient,
                                 lambda e: self.events.append((self.env.now, e)))

    def at(self, t: float, action) -> None:
        """Run *action()* at simulation time *t*."""
        def proc():
            yield self.env.timeout(t - self.env.now)
            action()
        self.env.process(proc())

    def run(self, until: float) -> None:
        self.env.run(until=until)

    def delivered_rate(self, t: float) -> float:
        """The amount/s reaching the patient just after time *t* (last change at or before t)."""
        return [r for s, r in self.deliveries if s <= t][-1]

    def changes(self) -> list[tuple[float, float]]:
        """Times at which the delivered rate changed, with the new rate."""
        out, last = [], 0.0
        for t, r in self.deliveries:
            if r != last:
                out.append((t, r))
                last = r
        return out

    def alarms(self) -> list[tuple[float, PumpAlarm]]:
        return [(t, e) for t, e in self.events if isinstance(e, PumpAlarm)]

    def delivered_volume(self, until: float) -> float:
        """Integral of the delivered amount rate up to *until*, in mL."""
        points = [(t, r) for t, r in self.deliveries if t <= until] + [(until, 0.0)]
        amount = sum(r * (t1 - t0) for (t0, r), (t1, _) in zip(points, points[1:]))
        return amount / CONC


def per_s(ml_per_h: float) -> float:
    return ml_per_h * CONC / 3600.0


# ------------------------------------------------------------------ quantisation

@pytest.mark.parametrize("resolution, asked", [(0.1, 12.34), (0.5, 7.3), (1.0, 99.6), (0.0, 3.21)])
def test_applied_rate_is_the_nearest_multiple_of_the_resolution(resolution, asked):
    """Applied = nearest multiple of resolution; the patient gets applied*conc/3600 per s."""
    rig = Rig(resolution_ml_per_h=resolution)
    result = rig.pump.set_rate(asked, LONG, cmd_id="c1")
    assert result.ok and result.code == "applied"
    applied = result.applied_ml_per_h
    if resolution:
        k = applied / resolution
        assert k == pytest.approx(round(k), abs=1e-9)
        assert abs(applied - asked) <= resolution / 2 + 1e-9
    else:
        assert applied == asked
    assert rig.pump.status().rate_ml_per_h == applied
    assert rig.patient.rates[rig.index] == pytest.approx(applied * CONC / 3600, rel=1e-12)


def test_quantisation_never_exceeds_the_maximum_rate():
    """A rate accepted at the limit is never quantised to a rate above max_rate_ml_per_h."""
    rig = Rig(max_rate_ml_per_h=10.0, resolution_ml_per_h=6.0)
    result = rig.pump.set_rate(10.0, LONG, cmd_id="c1")
    assert not result.ok or result.applied_ml_per_h <= 10.0
    assert rig.pump.status().rate_ml_per_h <= 10.0


# ------------------------------------------------------------------ leases

@pytest.mark.parametrize("fallback", [0.0, 4.0])
def test_lease_expiry_applies_the_fallback_exactly_at_expiry(fallback):
    """Without a new command the fallback applies at command time + lease_s, with an alarm."""
    rig = Rig(fallback_ml_per_h=fallback)
    rig.at(3.0, lambda: rig.pump.set_rate(20.0, 15.0, cmd_id="c1"))
    rig.run(until=100.0)
    assert rig.changes() == [(3.0, per_s(20.0)), (18.0, per_s(fallback))]
    alarms = rig.alarms()
    assert [(t, a.code, a.priority) for t, a in alarms] == [(18.0, "lease_expired", "medium")]
    status = rig.pump.status()
    assert status.mode == "fallback" and status.rate_ml_per_h == fallback
    assert status.state == ("infusing" if fallback else "stopped")
    assert status.lease_remaining_s is None


def test_command_fallback_overrides_the_configured_one():
    """A command's own fallback rate is applied at lease expiry instead of the configured one."""
    rig = Rig(fallback_ml_per_h=4.0)
    rig.pump.set_rate(20.0, 10.0, cmd_id="c1", fallback_ml_per_h=2.5)
    rig.run(until=50.0)
    assert rig.changes()[-1] == (10.0, per_s(2.5))


def test_a_new_command_before_expiry_renews_the_lease():
    """A command before the lease runs out renews it: no fallback at the old expiry."""
    rig = Rig()
    rig.at(0.0, lambda: rig.pump.set_rate(20.0, 15.0, cmd_id="c1"))
    rig.at(10.0, lambda: rig.pump.set_rate(25.0, 15.0, cmd_id="c2"))
    rig.run(until=24.9)
    assert rig.alarms() == []
    assert rig.pump.status().lease_remaining_s == pytest.approx(0.1)
    rig.run(until=100.0)
    assert rig.changes() == [(0.0, per_s(20.0)), (10.0, per_s(25.0)), (25.0, 0.0)]
    assert [(t, a.code) for t, a in rig.alarms()] == [(25.0, "lease_expired")]


def test_stop_cancels_the_lease():
    """After a stop command no lease expires later."""
    rig = Rig(fallback_ml_per_h=5.0)
    rig.pump.set_rate(20.0, 15.0, cmd_id="c1")
    rig.at(5.0, lambda: rig.pump.stop(cmd_id="c2"))
    rig.run(until=100.0)
    assert rig.changes() == [(0.0, per_s(20.0)), (5.0, 0.0)]
    assert rig.alarms() == []
    assert rig.pump.status().mode == "stopped"


# ------------------------------------------------------------------ limits

@pytest.mark.parametrize("bad", [1200.5, 5000.0, -1.0, math.nan, math.inf])
def test_out_of_range_command_is_rejected_and_changes_nothing(bad):
    """A rate outside [0, max] is rejected with 'out_of_range' and an alarm; the rate holds."""
    rig = Rig(max_rate_ml_per_h=1200.0)
    rig.pump.set_rate(20.0, LONG, cmd_id="c1")
    rig.events.clear()
    result = rig.pump.set_rate(bad, LONG, cmd_id="c2")
    assert (result.ok, result.code, result.applied_ml_per_h) == (False, "out_of_range", None)
    assert [(a.code, a.pump) for _, a in rig.alarms()] == [("out_of_range", "p1")]
    assert rig.pump.status().rate_ml_per_h == 20.0
    assert rig.pump.active_cmd == "c1"
    assert rig.patient.rates[rig.index] == per_s(20.0)


def test_rate_at_the_maximum_is_accepted():
    """A rate equal to max_rate_ml_per_h is within the limit."""
    rig = Rig(max_rate_ml_per_h=600.0)
    assert rig.pump.set_rate(600.0, LONG, cmd_id="c1").ok


def test_out_of_range_fallback_is_rejected():
    """A command whose fallback exceeds the maximum is rejected without changing the rate."""
    rig = Rig(max_rate_ml_per_h=100.0)
    result = rig.pump.set_rate(20.0, LONG, cmd_id="c1", fallback_ml_per_h=150.0)
    assert (result.ok, result.code) == (False, "out_of_range")
    assert rig.pump.status().rate_ml_per_h == 0.0


# ------------------------------------------------------------------ start-up lag

def test_startup_lag_delays_delivery_from_stopped_only():
    """From stopped, delivery starts startup_lag_s late; a change while running is immediate."""
    rig = Rig(startup_lag_s=12.0)
    rig.at(5.0, lambda: rig.pump.set_rate(20.0, LONG, cmd_id="c1"))
    rig.at(30.0, lambda: rig.pump.set_rate(35.0, LONG, cmd_id="c2"))
    rig.run(until=10.0)
    assert rig.pump.status().state == "infusing"     # the pump believes it infuses
    assert rig.patient.rates[rig.index] == 0.0
    rig.run(until=100.0)
    assert rig.changes() == [(17.0, per_s(20.0)), (30.0, per_s(35.0))]


def test_startup_lag_applies_again_after_a_stop():
    """A restart after a stop waits for the start-up lag again."""
    rig = Rig(startup_lag_s=4.0)
    rig.pump.set_rate(20.0, LONG, cmd_id="c1")
    rig.at(10.0, lambda: rig.pump.stop(cmd_id="c2"))
    rig.at(20.0, lambda: rig.pump.set_rate(30.0, LONG, cmd_id="c3"))
    rig.run(until=50.0)
    assert rig.changes() == [(4.0, per_s(20.0)), (10.0, 0.0), (24.0, per_s(30.0))]


def test_renewing_during_the_startup_lag_does_not_skip_it():
    """A lease renewal while the pump is still taking up its lag does not shorten the lag."""
    rig = Rig(startup_lag_s=20.0)
    rig.pump.set_rate(20.0, 15.0, cmd_id="c1")
    rig.at(5.0, lambda: rig.pump.set_rate(20.0, 15.0, cmd_id="c2"))
    rig.at(10.0, lambda: rig.pump.set_rate(20.0, 15.0, cmd_id="c3"))
    rig.run(until=22.0)
    assert rig.changes()[0] == (20.0, per_s(20.0))


# ------------------------------------------------------------------ syringe

@pytest.mark.parametrize("volume, rate", [(10.0, 60.0), (50.0, 7.0), (2.5, 300.0)])
def test_empty_syringe_stops_the_pump_at_volume_over_rate(volume, rate):
    """Volume V at rate r empties at V/r*3600 s: high 'syringe_empty' alarm, then 'pump_error'."""
    rig = Rig(syringe_volume_ml=volume)
    rig.at(7.0, lambda: rig.pump.set_rate(rate, LONG, cmd_id="c1"))
    t_empty = 7.0 + volume / rate * 3600.0
    rig.run(until=t_empty + 100.0)
    assert rig.changes() == [(7.0, per_s(rate)), (pytest.approx(t_empty, rel=1e-12), 0.0)]
    [(t, alarm)] = rig.alarms()
    assert (alarm.code, alarm.priority) == ("syringe_empty", "high")
    assert t == pytest.approx(t_empty, rel=1e-12)
    status = rig.pump.status()
    assert status.state == "alarm" and status.rate_ml_per_h == 0.0
    assert status.delivered_ml == pytest.approx(volume, rel=1e-9)
    snapshots = [e for _, e in rig.events if isinstance(e, PumpSnapshot)]
    assert snapshots[-1].state == "alarm"
    result = rig.pump.set_rate(rate, LONG, cmd_id="c2")
    assert (result.ok, result.code) == (False, "pump_error")
    assert rig.patient.rates[rig.index] == 0.0


def test_syringe_empties_at_the_right_time_after_rate_changes():
    """The empty time follows the remaining volume when the rate changes mid-syringe."""
    rig = Rig(syringe_volume_ml=10.0)
    rig.pump.set_rate(60.0, LONG, cmd_id="c1")            # 5 mL by 300 s
    rig.at(300.0, lambda: rig.pump.set_rate(30.0, LONG, cmd_id="c2"))  # 5 mL more: 600 s
    rig.run(until=2000.0)
    [(t, alarm)] = rig.alarms()
    assert alarm.code == "syringe_empty" and t == pytest.approx(900.0, rel=1e-12)


def test_stop_does_not_clear_a_fault():
    """After a fault, a stop command leaves the pump in 'alarm' and rates stay refused."""
    rig = Rig(syringe_volume_ml=1.0)
    rig.pump.set_rate(60.0, LONG, cmd_id="c1")
    rig.run(until=120.0)
    assert rig.pump.state == "alarm"
    rig.pump.stop(cmd_id="c2")
    assert rig.pump.state == "alarm"
    assert rig.pump.set_rate(60.0, LONG, cmd_id="c3").code == "pump_error"


# ------------------------------------------------------------------ occlusion

def test_occlusion_stops_delivery_silently_then_alarms():
    """Occluded: no delivery while 'infusing'; 'occlusion' alarm after occlusion_detection_s."""
    rig = Rig(occlusion_at_s=100.0, occlusion_detection_s=45.0)
    rig.pump.set_rate(60.0, LONG, cmd_id="c1")
    rig.at(120.0, lambda: rig.pump.set_rate(90.0, LONG, cmd_id="c2"))
    rig.run(until=144.0)
    assert rig.changes() == [(0.0, per_s(60.0)), (100.0, 0.0)]
    status = rig.pump.status()
    assert status.state == "infusing" and status.rate_ml_per_h == 90.0
    assert rig.alarms() == []
    rig.run(until=300.0)
    [(t, alarm)] = rig.alarms()
    assert (t, alarm.code, alarm.priority) == (145.0, "occlusion", "high")
    status = rig.pump.status()
    assert status.state == "alarm"
    assert status.delivered_ml == pytest.approx(60.0 * 100.0 / 3600.0, rel=1e-12)
    assert rig.pump.set_rate(10.0, LONG, cmd_id="c3").code == "pump_error"


def test_occlusion_does_not_raise_a_false_syringe_empty_alarm():
    """While occluded the syringe does not empty: the first alarm is the occlusion."""
    rig = Rig(syringe_volume_ml=10.0, occlusion_at_s=500.0, occlusion_detection_s=200.0)
    rig.pump.set_rate(60.0, LONG, cmd_id="c1")              # would empty at 600 s
    rig.run(until=1000.0)
    assert [(t, a.code) for t, a in rig.alarms()][0] == (700.0, "occlusion")


# ------------------------------------------------------------------ volume accounting

def test_delivered_volume_is_the_integral_of_the_delivered_rate(rng):
    """delivered_ml equals the integral of what reached the patient, at any time."""
    rig = Rig(resolution_ml_per_h=0.1, startup_lag_s=3.0, occlusion_at_s=1500.0)
    t = 0.0
    for k in range(40):
        t += float(rng.uniform(5.0, 60.0))
        if rng.random() < 0.2:
            rig.at(t, lambda k=k: rig.pump.stop(cmd_id=f"s{k}"))
        else:
            rate = float(rng.uniform(0.0, 200.0))
            rig.at(t, lambda k=k, rate=rate: rig.pump.set_rate(rate, 40.0, cmd_id=f"c{k}"))
    checks = sorted(float(x) for x in rng.uniform(0.0, t + 200.0, 10))
    for until in checks:
        rig.run(until=until)
        assert rig.pump.status().delivered_ml == pytest.approx(rig.delivered_volume(until),
                                                               rel=1e-9, abs=1e-12)
    assert rig.pump.status().delivered_ml > 0


# ------------------------------------------------------------------ configuration errors

@pytest.mark.parametrize("kw, match", [
    ({"concentration": 0.0}, "concentration must be > 0, got 0.0"),
    ({"concentration": math.nan}, "concentration must be > 0"),
    ({"max_rate_ml_per_h": -5.0}, "max_rate_ml_per_h must be > 0, got -5.0"),
    ({"resolution_ml_per_h": -0.1}, "resolution_ml_per_h must be a finite number >= 0"),
    ({"startup_lag_s": math.inf}, "startup_lag_s must be a finite number >= 0"),
    ({"occlusion_detection_s": -1.0}, "occlusion_detection_s must be a finite number >= 0"),
    ({"syringe_volume_ml": 0.0}, "syringe_volume_ml must be > 0"),
    ({"fallback_ml_per_h": 1300.0}, "fallback_ml_per_h must be in \\[0, 1200.0\\], got 1300.0"),
    ({"fallback_ml_per_h": -1.0}, "fallback_ml_per_h must be in \\[0, 1200.0\\]"),
])
def test_invalid_pump_config_is_an_error(kw, match):
    """Invalid PumpConfig values raise ConfigError naming the pump, the field and the value."""
    kw.setdefault("concentration", CONC)
    with pytest.raises(ConfigError, match=f"pump 'p1': {match}"):
        PumpConfig(pump="p1", input="propofol", **kw)


# ------------------------------------------------------------------ the plant node

def node_rig(**config):
    rig = Rig(**config)
    return rig, PlantNode({"p1": rig.pump})


def set_rate(cmd_id="c1", pump="p1", rate=20.0, unit="mL/h", **kw):
    kw.setdefault("lease_s", 15.0)
    return SetRate(cmd_id=cmd_id, pump=pump, rate=rate, unit=unit, **kw)


@pytest.mark.parametrize("dose_rate, ok", [(200.0, True), (201.5, True), (198.5, True),
                                           (203.0, False), (196.0, False), (2000.0, False)])
def test_plant_node_checks_the_dose_rate_against_the_volume_rate(dose_rate, ok):
    """20 mL/h at 10 mg/mL is 200 mg/h: a dose rate more than 1 % off is 'out_of_range'."""
    rig, node = node_rig()
    [ack] = node.receive(set_rate(dose_rate=dose_rate, dose_unit="mg/h"), 0.0)
    assert isinstance(ack, Ack) and ack.cmd_id == "c1"
    assert (ack.ok, ack.code) == ((True, "applied") if ok else (False, "out_of_range"))
    assert rig.pump.status().rate_ml_per_h == (20.0 if ok else 0.0)


def test_plant_node_converts_units():
    """A rate in uL/min and a dose rate in ug/s are converted before the checks."""
    rig, node = node_rig()
    [ack] = node.receive(set_rate(rate=20000.0 / 60.0, unit="uL/min", dose_rate=200.0 / 3.6,
                                  dose_unit="ug/s"), 0.0)
    assert ack.ok and ack.applied_rate == pytest.approx(20.0) and ack.unit == "mL/h"
    assert ack.lease_remaining_s == 15.0
    assert rig.patient.rates[rig.index] == pytest.approx(per_s(20.0))


def test_plant_node_rejects_a_dose_unit_of_the_wrong_kind():
    """A dose rate of another kind of amount (substance for a drug in mass) gets 'unit'."""
    rig, node = node_rig()
    [ack] = node.receive(set_rate(dose_rate=200.0, dose_unit="mmol/s"), 0.0)
    assert (ack.ok, ack.code) == (False, "unit")
    assert rig.pump.status().rate_ml_per_h == 0.0


def test_plant_node_out_of_range_rate_is_rejected():
    """A rate above the pump's maximum is answered 'out_of_range' and not applied."""
    rig, node = node_rig(max_rate_ml_per_h=100.0)
    [ack] = node.receive(set_rate(rate=150.0), 0.0)
    assert (ack.ok, ack.code, ack.applied_rate) == (False, "out_of_range", None)
    assert rig.pump.status().rate_ml_per_h == 0.0


@pytest.mark.parametrize("message", [set_rate(pump="nope"), Stop(cmd_id="c1", pump="nope"),
                                     GetStatus(cmd_id="c1", pump="nope")])
def test_plant_node_unknown_pump(message):
    """A command for an unknown pump is answered ok=False and names the pump."""
    _, node = node_rig()
    [ack] = node.receive(message, 0.0)
    assert isinstance(ack, Ack) and not ack.ok and ack.cmd_id == "c1"
    assert "nope" in ack.text


def test_plant_node_get_status_returns_ack_and_status():
    """GetStatus is answered with an ack and a PumpStatus of the pump's current state."""
    rig, node = node_rig()
    node.receive(set_rate(rate=36.0, lease_s=30.0), 0.0)
    rig.run(until=10.0)
    ack, status = node.receive(GetStatus(cmd_id="g1", pump="p1"), rig.env.now)
    assert isinstance(ack, Ack) and (ack.cmd_id, ack.ok, ack.code) == ("g1", True, "applied")
    assert isinstance(status, PumpStatus)
    assert (status.pump, status.state, status.rate, status.mode) == ("p1", "infusing", 36.0,
                                                                      "commanded")
    assert status.delivered == pytest.approx(0.1)
    assert status.lease_remaining_s == pytest.approx(20.0)


def test_plant_node_stop_and_other_messages():
    """Stop is applied and acked; messages that are not commands get no answer."""
    rig, node = node_rig()
    node.receive(set_rate(), 0.0)
    [ack] = node.receive(Stop(cmd_id="s1", pump="p1"), 0.0)
    assert (ack.ok, ack.code, ack.applied_rate) == (True, "applied", 0.0)
    assert rig.pump.status().state == "stopped"
    assert node.receive(ack, 0.0) == []


def test_plant_node_event_messages():
    """Pump alarms become technical 'alarm' messages and snapshots 'pump_status' messages."""
    rig, node = node_rig(syringe_volume_ml=1.0)
    rig.pump.set_rate(60.0, LONG, cmd_id="c1")
    rig.run(until=100.0)
    messages = [node.event_message(e) for _, e in rig.events]
    alarms = [m for m in messages if m.type == "alarm"]
    assert [(a.code, a.priority, a.kind) for a in alarms] == [
        ("pump.syringe_empty", "high", "technical")]
    assert messages[-1].type == "pump_status" and messages[-1].state == "alarm"
    assert np.isclose(messages[-1].delivered, 1.0)


def test_operator_reset_clears_a_fault():
    """Only an operator reset (here after a fresh syringe) returns a faulted pump to service."""
    rig = Rig(syringe_volume_ml=1.0)
    rig.pump.set_rate(60.0, LONG, cmd_id="c1")
    rig.run(until=120.0)
    assert rig.pump.state == "alarm"
    rig.pump.reset()
    assert rig.pump.state == "stopped" and rig.pump.status().delivered_ml == 0.0
    assert rig.pump.set_rate(30.0, LONG, cmd_id="c2").ok
