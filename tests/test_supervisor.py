"""The safety supervisor: data gating, fallback, hysteresis, backup plans, hard clamps, dose
windows and operator stop/acknowledge (DESIGN: Safety behaviours); the supervised controller
(any controller behind the supervisor); then the MPCController (propagation + MHE + NMPC)
behind the supervisor end to end against a simulated patient with injected faults (stale
data, solver failures)."""

import math

import numpy as np
import pytest

from mpc_dose.control.base import Reading
from mpc_dose.control.mhe import MHEConfig
from mpc_dose.control.mpc_controller import MPCController
from mpc_dose.control.nmpc import DosePlan, NMPCConfig
from mpc_dose.control.supervisor import SafetyConfig, SafetySupervisor, SupervisedController
from mpc_dose.errors import ConfigError
from mpc_dose.model.library import load
from mpc_dose.model.propagate import Propagator

LIMITS = dict(measured="bis", max_rates={"propofol": 0.5}, valid_range=(0.0, 100.0),
              stale_after_s=15.0, future_tolerance_s=2.0, resume_after=3,
              flatline_samples=20)


def supervisor(**overrides):
    return SafetySupervisor(SafetyConfig(**{**LIMITS, **overrides}))


def reading(value=50.0, t=0.0, quality="valid"):
    return Reading("bis", value, "1", t, quality)


def step(sup, t, r, proposed, last, *, plan_ok=True, backup=None):
    """Gate *r* at *t* and check *proposed* against *last* (one controller cycle)."""
    usable, why = sup.gate(t, r)
    return sup.check(t, {"propofol": proposed}, {"propofol": last}, usable=usable,
                     data_reason=why, plan_ok=plan_ok, plan_reason="nmpc: test",
                     backup=None if backup is None else {"propofol": backup})


def closed_loop(sup, t=0.0, rate=0.3):
    """Bring *sup* into CLOSED_LOOP with one good reading."""
    v = step(sup, t, reading(50.0, t), rate, rate)
    assert v.mode == "CLOSED_LOOP"
    return v


BAD_DATA = {
    "stale": (reading(50.0, 100.0 - 30.0), "stale"),
    "future": (reading(50.0, 100.0 + 5.0), "future"),
    "invalid": (reading(50.0, 100.0, "invalid"), "invalid"),
    "artefact": (reading(50.0, 100.0, "artefact"), "artefact"),
    "nan": (reading(math.nan, 100.0), ""),
    "inf": (reading(math.inf, 100.0), ""),
    "above range": (reading(150.0, 100.0), "outside"),
    "below range": (reading(-3.0, 100.0), "outside"),
    "missing": (None, "no bis reading"),
}


@pytest.mark.parametrize("kind", sorted(BAD_DATA))
@pytest.mark.parametrize("fallback", [0.0, 0.2, 0.45])
@pytest.mark.parametrize("proposed", [0.0, 0.3, 0.5])
def test_bad_data_never_increases_dose(kind, fallback, proposed):
    """Unusable data never raise the dose and switch to FALLBACK with an alarm."""
    r, word = BAD_DATA[kind]
    sup = supervisor(fallback_rates={"propofol": fallback})
    closed_loop(sup, 90.0)
    last = 0.3
    v = step(sup, 100.0, r, proposed, last)
    assert v.rates["propofol"] <= last
    assert v.rates["propofol"] == pytest.approx(min(fallback, last))
    assert v.mode == "FALLBACK" and sup.mode == "FALLBACK"
    assert v.alarm is not None and v.alarm.startswith("data.")
    assert "no dose increase" in v.reason and word in v.reason
    assert sup.transitions[-1][1:3] == ("CLOSED_LOOP", "FALLBACK")


@pytest.mark.parametrize("last", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("fallback", [0.0, 0.2])
def test_fallback_rate_is_min_of_preset_and_last(last, fallback):
    """The data fallback rate is the preset fallback, never above the last rate."""
    sup = supervisor(fallback_rates={"propofol": fallback})
    v = step(sup, 100.0, None, 0.5, last)
    assert v.rates["propofol"] == pytest.approx(min(fallback, last))


def test_flatline_never_increases_dose():
    """A flat-lined signal (20 equal samples) is unusable: FALLBACK, alarm, no increase."""
    sup = supervisor()
    closed_loop(sup, 0.0)
    for k in range(19):
        assert sup.observe(reading(47.0, float(k)))
    assert not sup.flat
    assert not sup.observe(reading(47.0, 19.0))
    assert sup.flat
    v = step(sup, 20.0, reading(47.0, 19.0), 0.5, 0.3)
    assert v.mode == "FALLBACK" and v.rates["propofol"] <= 0.3
    assert v.alarm == "data.flatline" and "flat-lined" in v.reason
    sup.observe(reading(47.5, 21.0))  # the signal moves again
    assert not sup.flat


def test_noisy_signal_is_not_flat(rng):
    """A noisy signal never counts as flat-lined."""
    sup = supervisor()
    for k, y in enumerate(50.0 + rng.normal(0.0, 1.5, 100)):
        assert sup.observe(reading(float(y), float(k)))
    assert not sup.flat


@pytest.mark.parametrize("t_meas, ok", [(100.0, True), (85.0, True), (84.9, False),
                                         (102.0, True), (102.1, False)])
def test_gate_age_limits(t_meas, ok):
    """Readings up to 15 s old and up to 2 s ahead pass the gate, others do not."""
    usable, why = supervisor().gate(100.0, reading(50.0, t_meas))
    assert usable is ok
    assert (why == "ok") is ok


@pytest.mark.parametrize("resume_after", [1, 3, 5])
def test_resume_only_after_enough_good_readings(resume_after):
    """CLOSED_LOOP resumes on the resume_after-th good reading in a row, not before."""
    sup = supervisor(resume_after=resume_after, fallback_rates={"propofol": 0.1})
    closed_loop(sup, 0.0)
    step(sup, 10.0, None, 0.3, 0.3)
    assert sup.mode == "FALLBACK"
    last = 0.1
    for k in range(1, resume_after):
        v = step(sup, 10.0 + 10 * k, reading(50.0, 10.0 + 10 * k), 0.5, last)
        assert v.mode == "FALLBACK"
        assert v.rates["propofol"] <= last
        assert f"{k}/{resume_after} good readings" in v.reason
    t = 10.0 + 10 * resume_after
    v = step(sup, t, reading(50.0, t), 0.4, last)
    assert v.mode == "CLOSED_LOOP" and v.rates["propofol"] == pytest.approx(0.4)
    assert sup.transitions[-1] == (t, "FALLBACK", "CLOSED_LOOP", "data usable")


def test_bad_reading_resets_good_count():
    """A bad reading in the middle restarts the count of good readings."""
    sup = supervisor(resume_after=3)
    closed_loop(sup, 0.0)
    step(sup, 10.0, None, 0.3, 0.3)
    step(sup, 20.0, reading(50.0, 20.0), 0.3, 0.0)
    step(sup, 30.0, reading(50.0, 30.0), 0.3, 0.0)
    step(sup, 40.0, reading(50.0, 40.0, "invalid"), 0.3, 0.0)
    for t in (50.0, 60.0):
        assert step(sup, t, reading(50.0, t), 0.3, 0.0).mode == "FALLBACK"
    assert step(sup, 70.0, reading(50.0, 70.0), 0.3, 0.0).mode == "CLOSED_LOOP"


def test_init_goes_closed_loop_on_first_good_reading():
    """From INIT the first usable reading starts the closed loop (cause recorded)."""
    sup = supervisor()
    assert sup.mode == "INIT"
    v = step(sup, 0.0, reading(97.0, 0.0), 0.5, 0.0)
    assert v.mode == "CLOSED_LOOP" and v.rates["propofol"] == pytest.approx(0.5)
    assert sup.transitions == [(0.0, "INIT", "CLOSED_LOOP", "data usable")]


def test_solver_failure_uses_backup_plan():
    """A failed solve with a shifted previous plan applies that plan and raises an alarm."""
    sup = supervisor()
    closed_loop(sup, 0.0)
    v = step(sup, 10.0, reading(50.0, 10.0), 0.5, 0.3, plan_ok=False, backup=0.25)
    assert v.mode == "CLOSED_LOOP"
    assert v.rates["propofol"] == pytest.approx(0.25)
    assert v.alarm == "controller.solver_failed"
    assert "shifted previous plan" in v.reason and "nmpc: test" in v.reason


def test_backup_plan_is_clamped():
    """The backup plan goes through the same hard clamps as any plan."""
    sup = supervisor(max_step={"propofol": 0.05})
    closed_loop(sup, 0.0)
    v = step(sup, 10.0, reading(50.0, 10.0), 0.5, 0.3, plan_ok=False, backup=0.9)
    assert v.rates["propofol"] == pytest.approx(0.35)


@pytest.mark.parametrize("fallback, last", [(0.0, 0.3), (0.2, 0.3), (0.4, 0.3), (0.4, 0.0)])
def test_solver_failure_without_backup_falls_back(fallback, last):
    """A failed solve without a backup goes to FALLBACK, never above the last rate."""
    sup = supervisor(fallback_rates={"propofol": fallback})
    closed_loop(sup, 0.0)
    v = step(sup, 10.0, reading(50.0, 10.0), 0.5, last, plan_ok=False)
    assert v.mode == "FALLBACK" and sup.mode == "FALLBACK"
    assert v.rates["propofol"] == pytest.approx(min(fallback, last))
    assert v.alarm == "controller.solver_failed"
    assert "no previous plan" in v.reason
    t, old, new, cause = sup.transitions[-1]
    assert (t, old, new) == (10.0, "CLOSED_LOOP", "FALLBACK") and "solver failed" in cause


@pytest.mark.parametrize("proposed, last, expected", [
    (0.9, 0.45, 0.5),     # max rate
    (0.5, 0.1, 0.2),      # max step up
    (0.0, 0.4, 0.3),      # max step down
    (-0.2, 0.05, 0.0),    # never negative
    (math.nan, 0.05, 0.0),  # a non-finite proposal is no drug
    (0.25, 0.2, 0.25),    # within limits: unchanged
])
def test_clamps(proposed, last, expected):
    """Proposed rates are clamped to [0, max rate] and to last +- max step."""
    sup = supervisor(max_step={"propofol": 0.1})
    closed_loop(sup, 0.0, rate=last)
    v = step(sup, 10.0, reading(50.0, 10.0), proposed, last)
    assert v.rates["propofol"] == pytest.approx(expected)
    if math.isfinite(proposed) and expected != proposed:
        assert "clamped" in v.reason


def test_max_rate_wins_over_max_step():
    """The hard maximum rate holds even when the rate in force is above it."""
    sup = supervisor(max_step={"propofol": 0.1})
    closed_loop(sup, 0.0, rate=0.4)
    v = step(sup, 10.0, reading(50.0, 10.0), 0.4, 1.0)
    assert v.rates["propofol"] <= 0.5


def test_dose_window_stops_drug_when_reached():
    """Once a window's amount is delivered the rate is 0 until the window slides on."""
    sup = supervisor(dose_windows=(("propofol", 60.0, 3.0),))
    closed_loop(sup, 0.0, rate=0.1)
    sup.record(0.0, {"propofol": 0.1})
    rates = {}
    for t in np.arange(10.0, 130.0, 10.0):
        v = step(sup, float(t), reading(50.0, float(t)), 0.1, 0.1)
        rates[float(t)] = v.rates["propofol"]
        sup.record(float(t), v.rates)
        delivered = sum(r.get("propofol", 0.0) * dt
                        for _, dt, r in sup._window(float(t), 60.0))
        if rates[float(t)] > 0:
            assert delivered < 3.0
        else:
            assert "dose limit" in v.reason
    assert rates[10.0] == pytest.approx(0.1) and rates[20.0] == pytest.approx(0.1)
    assert rates[30.0] == 0.0  # 3 mg delivered over 0-30 s
    assert rates[90.0] > 0.0   # the window [30, 90] holds no drug any more


def test_dose_window_applies_in_fallback():
    """The dose window also limits a preset fallback rate."""
    sup = supervisor(fallback_rates={"propofol": 0.2}, dose_windows=(("propofol", 60.0, 1.0),))
    sup.record(0.0, {"propofol": 0.2})
    v = step(sup, 10.0, reading(50.0, -10.0), 0.5, 0.2)  # stale
    assert v.mode == "FALLBACK" and v.rates["propofol"] == 0.0


def test_stop_and_acknowledge():
    """stop() gives STOPPED (no drug) from any mode; only acknowledge() returns to INIT."""
    sup = supervisor()
    closed_loop(sup, 0.0)
    sup.stop(5.0, "operator pressed stop")
    assert sup.mode == "STOPPED"
    for t in (10.0, 20.0, 30.0, 40.0):
        v = step(sup, t, reading(50.0, t), 0.5, 0.3)
        assert v.mode == "STOPPED" and v.rates == {"propofol": 0.0}
    sup.acknowledge(45.0)
    assert sup.mode == "INIT"
    v = step(sup, 50.0, reading(50.0, 50.0), 0.2, 0.0)
    assert v.mode == "CLOSED_LOOP"
    assert [tr[1:3] for tr in sup.transitions] == [
        ("INIT", "CLOSED_LOOP"), ("CLOSED_LOOP", "STOPPED"), ("STOPPED", "INIT"),
        ("INIT", "CLOSED_LOOP")]
    assert sup.transitions[1] == (5.0, "CLOSED_LOOP", "STOPPED", "operator pressed stop")
    assert sup.transitions[2] == (45.0, "STOPPED", "INIT", "operator acknowledged")


@pytest.mark.parametrize("mode_setup", ["INIT", "CLOSED_LOOP", "FALLBACK"])
def test_stop_from_any_mode(mode_setup):
    """Every mode can be stopped; acknowledge() outside STOPPED changes nothing."""
    sup = supervisor()
    if mode_setup != "INIT":
        closed_loop(sup, 0.0)
    if mode_setup == "FALLBACK":
        step(sup, 10.0, None, 0.3, 0.3)
    assert sup.mode == mode_setup
    sup.acknowledge(15.0)
    assert sup.mode == mode_setup
    sup.stop(20.0, "stop")
    assert sup.mode == "STOPPED"
    assert sup.transitions[-1] == (20.0, mode_setup, "STOPPED", "stop")


def test_every_transition_has_a_cause():
    """Each transition is recorded once with time, from, to and a non-empty cause."""
    sup = supervisor(resume_after=2)
    step(sup, 0.0, reading(97.0, 0.0), 0.5, 0.0)
    step(sup, 10.0, reading(97.0, -20.0), 0.5, 0.5)
    step(sup, 20.0, reading(97.0, -20.0), 0.5, 0.0)  # still FALLBACK: no new transition
    step(sup, 30.0, reading(90.0, 30.0), 0.5, 0.0)
    step(sup, 40.0, reading(85.0, 40.0), 0.5, 0.0)
    step(sup, 50.0, reading(80.0, 50.0), 0.5, 0.5, plan_ok=False)
    sup.stop(60.0, "end of case")
    modes = [(t, a, b) for t, a, b, _ in sup.transitions]
    assert modes == [(0.0, "INIT", "CLOSED_LOOP"), (10.0, "CLOSED_LOOP", "FALLBACK"),
                     (40.0, "FALLBACK", "CLOSED_LOOP"), (50.0, "CLOSED_LOOP", "FALLBACK"),
                     (60.0, "FALLBACK", "STOPPED")]
    assert all(isinstance(c, str) and c for *_, c in sup.transitions)
    assert "stale" in sup.transitions[1][3]


def test_alarm_only_on_entering_fallback():
    """The data alarm is raised when FALLBACK is entered, not repeated every cycle."""
    sup = supervisor()
    closed_loop(sup, 0.0)
    first = step(sup, 10.0, None, 0.3, 0.3)
    again = step(sup, 20.0, None, 0.3, 0.0)
    assert first.alarm is not None and again.alarm is None
    assert again.mode == "FALLBACK"


@pytest.mark.parametrize("kind, word", [("stale", "stale"), ("future", "future"),
                                        ("above range", "range"), ("missing", "missing")])
def test_alarm_names_the_data_fault(kind, word):
    """The data alarm's kind names the fault (stale, future, range, missing)."""
    sup = supervisor()
    closed_loop(sup, 90.0)
    v = step(sup, 100.0, BAD_DATA[kind][0], 0.3, 0.3)
    assert v.alarm is not None and word in v.alarm


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_reason_names_the_value(value):
    """A non-finite reading is rejected with a reason that says so, not 'flagged valid'."""
    usable, why = supervisor().gate(100.0, reading(value, 100.0))
    assert not usable
    assert "flagged valid" not in why


@pytest.mark.parametrize("resume_after", [2, 3])
def test_rate_before_resuming_never_exceeds_the_last_rate(resume_after):
    """During the good readings before resuming, the rate is min(preset fallback, last rate):
    a preset above the last rate does not raise the dose."""
    sup = supervisor(resume_after=resume_after, fallback_rates={"propofol": 0.4})
    closed_loop(sup, 0.0)
    step(sup, 10.0, None, 0.3, 0.1)
    assert sup.mode == "FALLBACK"
    for k in range(1, resume_after):
        t = 10.0 + 10 * k
        v = step(sup, t, reading(50.0, t), 0.5, 0.1)
        assert v.mode == "FALLBACK" and "good readings before resuming" in v.reason
        assert v.rates["propofol"] == pytest.approx(0.1)


def test_init_waits_for_the_first_reading_without_an_alarm():
    """INIT with no reading yet stays INIT: no alarm, no hysteresis, rates
    min(fallback, last) (0 at start); the first good reading starts the closed loop at once."""
    sup = supervisor(fallback_rates={"propofol": 0.2})
    for t in (0.0, 10.0, 20.0):
        v = step(sup, t, None, 0.5, 0.0)
        assert v.mode == "INIT" and v.alarm is None and v.rates["propofol"] == 0.0
        assert "no bis reading yet" in v.reason
    assert sup.transitions == []
    v = step(sup, 30.0, reading(90.0, 30.0), 0.5, 0.0)
    assert v.mode == "CLOSED_LOOP" and v.rates["propofol"] == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["stale", "future", "invalid", "above range"])
def test_a_data_fault_from_init_falls_back_with_an_alarm(kind):
    """Any data fault other than 'no reading yet' goes from INIT to FALLBACK with its alarm."""
    sup = supervisor()
    v = step(sup, 100.0, BAD_DATA[kind][0], 0.5, 0.0)
    assert v.mode == "FALLBACK" and v.alarm is not None and v.alarm.startswith("data.")
    assert sup.transitions[0][1:3] == ("INIT", "FALLBACK")


# ---------------------------------------------------------------- SupervisedController


class Recorder:
    """A controller that proposes *rate* (or raises *error*), and records what it saw."""

    def __init__(self, rate=0.3, error=None, status="ok", backup=None):
        self.name, self.period_s, self.inputs = "rec", 10.0, ("propofol",)
        self.rate, self.error, self.status, self.backup = rate, error, status, backup
        self.observed, self.seen, self.told = [], [], []

    def observe(self, r):
        self.observed.append(r)

    def decide(self, t_s, readings):
        self.seen.append(dict(readings))
        if self.error is not None:
            raise self.error
        from mpc_dose.control.base import Decision

        return Decision(t_s, {"propofol": self.rate}, "rec says so", self.status,
                        {"x": 1.0}, backup=self.backup)

    def applied(self, t_s, rates):
        self.told.append((t_s, dict(rates)))


def supervised(controller, **overrides):
    return SupervisedController(controller, SafetyConfig(**{**LIMITS, **overrides}))


def test_supervised_controller_is_a_controller():
    """It carries the wrapped controller's name, period and inputs and satisfies the
    Controller protocol."""
    from mpc_dose.control.base import Controller

    ctl = supervised(Recorder())
    assert isinstance(ctl, Controller)
    assert (ctl.name, ctl.period_s, ctl.inputs) == ("rec", 10.0, ("propofol",))


@pytest.mark.parametrize("value, quality, code", [
    (math.nan, "valid", "data.invalid"), (50.0, "artefact", "data.invalid"),
    (150.0, "valid", "data.out_of_range"), (-1.0, "valid", "data.out_of_range")])
def test_rejected_readings_never_reach_the_controller(value, quality, code):
    """Non-finite, non-valid or out-of-range readings of the measured variable are counted
    and never passed to the controller's observe (its estimator); others pass."""
    rec = Recorder()
    ctl = supervised(rec)
    ctl.observe(reading(value, 0.0, quality))
    ctl.observe(reading(55.0, 1.0))
    ctl.observe(Reading("spo2", 150.0, "1", 1.0, "artefact"))  # not the measured variable
    assert [r.value for r in rec.observed] == [55.0, 150.0]
    assert ctl.rejected == {code: 1}


def test_unusable_data_is_withheld_from_the_controller():
    """On unusable data the measured variable is left out of the readings the controller
    sees (a PID holds instead of integrating); other variables pass."""
    rec = Recorder()
    ctl = supervised(rec)
    other = Reading("spo2", 97.0, "1", 0.0)
    ctl.decide(0.0, {"bis": reading(50.0, 0.0), "spo2": other})
    ctl.decide(100.0, {"bis": reading(50.0, 0.0), "spo2": other})  # stale
    assert set(rec.seen[0]) == {"bis", "spo2"} and set(rec.seen[1]) == {"spo2"}


def test_pid_holds_on_stale_data():
    """Behind the supervisor the PID's integral does not grow while the data is stale (the
    last reading is from 4 s, stale after 9 s)."""
    from mpc_dose.control.baselines import PIDController, PIDSettings

    pid = PIDController(PIDSettings(period_s=1.0))
    ctl = SupervisedController(pid, SafetyConfig(measured="bis", stale_after_s=5.0))
    for t in range(5):
        ctl.decide(float(t), {"bis": reading(80.0, float(t))})
    integral = {}
    for t in range(5, 60):
        d = ctl.decide(float(t), {"bis": reading(80.0, 4.0)})
        integral[t] = pid._integral
    assert all(integral[t] == integral[9] for t in range(10, 60))
    assert d.status == "no_measurement" and d.reason.startswith("FALLBACK")


@pytest.mark.parametrize("error, words", [
    (RuntimeError("boom"), ["RuntimeError: boom"]),
    (None, ["controller 'rec': rate of 'propofol'", "expected a finite number >= 0"]),
])
def test_a_controller_error_is_a_result_not_a_crash(error, words):
    """An exception from the controller, or a rate check_rates refuses (its ConfigError
    text kept), is a failed decision: FALLBACK, no dose increase, controller.error alarm."""
    rec = Recorder(rate=0.2)
    ctl = supervised(rec, fallback_rates={"propofol": 0.4})
    ctl.decide(0.0, {"bis": reading(50.0, 0.0)})
    assert ctl.mode == "CLOSED_LOOP"
    rec.rate, rec.error = (-1.0 if error is None else 0.3), error
    d = ctl.decide(10.0, {"bis": reading(50.0, 10.0)})
    assert d.status == "controller_error" and d.alarm == "controller.error"
    assert d.reason.startswith("FALLBACK") and d.rates["propofol"] == pytest.approx(0.2)
    for word in words:
        assert word in d.reason
    assert ctl.alarms == [(10.0, "controller.error", d.reason[len("FALLBACK: "):])]


def test_a_failed_decision_uses_the_controllers_backup():
    """A failed decision's backup (e.g. the shifted previous plan) is applied, clamped."""
    rec = Recorder(rate=0.5, status="solver_failed", backup={"propofol": 0.9})
    ctl = supervised(rec, max_step={"propofol": 0.1})
    ctl.decide(0.0, {"bis": reading(50.0, 0.0)})
    assert ctl.mode == "CLOSED_LOOP" and ctl.rates["propofol"] == pytest.approx(0.1)
    d = ctl.decide(10.0, {"bis": reading(50.0, 10.0)})
    assert d.alarm == "controller.solver_failed" and "shifted previous plan" in d.reason
    assert d.rates["propofol"] == pytest.approx(0.2)


def test_open_loop_has_no_data_gate_but_every_clamp():
    """measured = None (fixed regimen, TCI): no reading is needed, max rate and max step
    still hold, and the controller is told the applied rates."""
    rec = Recorder(rate=5.0)
    ctl = SupervisedController(rec, SafetyConfig(max_rates={"propofol": 0.5},
                                                 max_step={"propofol": 0.2}))
    d0 = ctl.decide(0.0, {})
    d1 = ctl.decide(10.0, {})
    d2 = ctl.decide(20.0, {})
    assert [d.rates["propofol"] for d in (d0, d1, d2)] == pytest.approx([0.2, 0.4, 0.5])
    assert all(d.reason.startswith("CLOSED_LOOP: rec says so") for d in (d0, d1, d2))
    assert "clamped" in d2.reason and d2.details == {"x": 1.0, "mode": "CLOSED_LOOP"}
    assert rec.told == [(0.0, {"propofol": pytest.approx(0.2)}),
                        (10.0, {"propofol": pytest.approx(0.4)}),
                        (20.0, {"propofol": pytest.approx(0.5)})]


def test_a_controller_is_supervised_once():
    """Wrapping a supervised controller again is refused."""
    from mpc_dose.errors import ConfigError

    with pytest.raises(ConfigError, match="already supervised"):
        SupervisedController(supervised(Recorder()))


@pytest.mark.parametrize("overrides, match", [
    (dict(max_rates={"propofol": -1.0}), r"safety\.max_rates\['propofol'\]"),
    (dict(max_step={"propofol": math.nan}), r"safety\.max_step"),
    (dict(stale_after_s=0.0), r"safety\.stale_after_s"),
    (dict(valid_range=(100.0, 0.0)), r"safety\.valid_range"),
    (dict(flatline_samples=1), r"safety\.flatline_samples"),
    (dict(resume_after=0), r"safety\.resume_after"),
    (dict(dose_windows=(("propofol", 0.0, 1.0),)), r"safety\.dose_windows\[0\]"),
])
def test_safety_config_errors(overrides, match):
    """Bad supervisor limits are errors naming the field."""
    from mpc_dose.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        SafetyConfig(**{**LIMITS, **overrides})


def test_dose_record_keeps_only_what_a_window_can_count():
    """The record of applied rates does not grow without bound."""
    sup = supervisor(dose_windows=(("propofol", 60.0, 100.0),))
    for k in range(1000):
        sup.record(10.0 * k, {"propofol": 0.1})
    assert len(sup._delivered) <= 8


# ---------------------------------------------------------------- end to end: MPCController
# The controller's model is the typical reference patient; the simulated patient's c50 is 30 %
# higher. The patient is propagated exactly (Propagator) and sampled every 5 s with BIS noise
# of sd 1.5, clipped to [0, 100]; the controller decides every 10 s.

PERIOD = 10.0
SAMPLE = 5.0
COVARIATES = {"age": 35, "height": 170, "weight": 70, "sex": "male"}


@pytest.fixture(scope="module")
def reference_model():
    """(model, typical parameters of the reference patient)."""
    lm = load("propofol-schnider+bis-propofol")
    return lm.model, lm.population.typical_parameters(COVARIATES)


class Patient:
    """The simulated patient: exact propagation, noisy clipped BIS samples."""

    def __init__(self, model, params, seed, noise_sd=1.5):
        self.model = model
        self.theta = model.parameter_vector(params)
        self.prop = Propagator(model, self.theta)
        self.x = model.initial_state(self.theta)
        self.t, self.u = 0.0, 0.0
        self.rng = np.random.default_rng(seed)
        self.noise_sd = noise_sd
        self.k = model.output_index("bis")

    def bis(self):
        return float(self.model.h(self.t, self.x, [self.u], self.theta)[self.k])

    def read(self):
        y = self.bis() + self.rng.normal(0.0, self.noise_sd)
        return Reading("bis", float(np.clip(y, 0.0, 100.0)), "1", self.t)

    def advance(self, t1):
        self.x = self.prop.advance(self.x, self.t, t1, [self.u])
        self.t = t1


def controller(model, params, *, mhe=True, fallback=0.0):
    nmpc = NMPCConfig(output="bis", inputs=("propofol",), period_s=PERIOD, horizon=30,
                      reference=50.0, change_weights={"propofol": 1.0},
                      rate_bounds={"propofol": (0.0, 0.5)}, soft_window=(40.0, math.inf))
    safety = SafetyConfig(measured="bis", max_rates={"propofol": 0.5},
                          fallback_rates={"propofol": fallback}, valid_range=(0.0, 100.0),
                          stale_after_s=15.0, resume_after=3)
    est = MHEConfig(output="bis", parameters=("bis_c50", "bis_gamma"),
                    omega=((0.03, 0.0), (0.0, 0.09)), noise_sd=1.5, window=60)
    return SupervisedController(MPCController(model, params, nmpc, est if mhe else None),
                                SafetySupervisor(safety))


def run(ctl, patient, t_end, *, feed=lambda t: True, state=None):
    """Sample every 5 s (when *feed* says so), decide every 10 s, until *t_end*.
    Returns a list of (t, true BIS, decision, mode)."""
    state = {} if state is None else state
    log = []
    while patient.t < t_end - 1e-9:
        t = patient.t
        if feed(t):
            r = patient.read()
            ctl.observe(r)
            state["latest"] = r
        if abs(t / PERIOD - round(t / PERIOD)) < 1e-9:
            latest = state.get("latest")
            d = ctl.decide(t, {"bis": latest} if latest is not None else {})
            patient.u = d.rates["propofol"]
            log.append((t, patient.bis(), d, ctl.supervisor.mode))
        patient.advance(t + SAMPLE)
    return log


def mismatched_patient(reference_model, seed):
    model, params = reference_model
    return Patient(model, {**params, "bis_c50": 1.3 * params["bis_c50"]}, seed)


def test_offset_free_with_output_disturbance_estimate(reference_model):
    """c50 30 % off: with the MHE the true BIS is within 50 +- 1 over the last 3 min of 20."""
    model, params = reference_model
    ctl = controller(model, params)
    log = run(ctl, mismatched_patient(reference_model, 11), 1200.0)
    end = [b for t, b, _, _ in log if t >= 1020.0]
    assert len(end) == 18
    assert max(abs(b - 50.0) for b in end) <= 1.0
    assert log[-1][3] == "CLOSED_LOOP"
    assert all(0.0 <= d.rates["propofol"] <= 0.5 for _, _, d, _ in log)
    assert "MHE ok" in log[-1][2].reason


def test_without_estimation_mismatch_leaves_offset(reference_model):
    """Without the MHE the same mismatch leaves BIS well above 50 at the end."""
    model, params = reference_model
    ctl = controller(model, params, mhe=False)
    log = run(ctl, mismatched_patient(reference_model, 11), 1200.0)
    end = [b for t, b, _, _ in log if t >= 1020.0]
    assert np.mean(end) > 52.0


def settled(reference_model, seed, **kw):
    model, params = reference_model
    ctl = controller(model, params, **kw)
    patient = mismatched_patient(reference_model, seed)
    state = {}
    log = run(ctl, patient, 600.0, state=state)
    assert log[-1][3] == "CLOSED_LOOP"
    return ctl, patient, state, log


def test_stale_data_never_raises_dose(reference_model):
    """60 s without readings: once stale, FALLBACK, no dose increase; resume after 3 good."""
    ctl, patient, state, _ = settled(reference_model, 12, fallback=0.1)
    gap = (600.0, 660.0)
    log = run(ctl, patient, 720.0, state=state, feed=lambda t: not gap[0] <= t < gap[1])
    # the last reading is taken at 595 s (every 5 s): stale (> 15 s old) from 620 s to 650 s
    stale = [(t, d) for t, _, d, _ in log if 620.0 <= t < gap[1]]
    assert [t for t, _ in stale] == [620.0, 630.0, 640.0, 650.0]
    previous = {t: d.rates["propofol"] for t, _, d, _ in log}
    fresh_rate = previous[610.0]  # the 610 s decision still has a usable reading
    for t, d in stale:
        assert d.reason.startswith("FALLBACK")
        assert "stale" in d.reason and "no dose increase" in d.reason
        assert d.rates["propofol"] <= previous[t - PERIOD] + 1e-12
        assert d.rates["propofol"] <= fresh_rate + 1e-12
        assert d.rates["propofol"] <= 0.1 + 1e-12
    cause = [c for t, a, b, c in ctl.supervisor.transitions if b == "FALLBACK"]
    assert cause and "stale" in cause[-1]
    # readings again from 660 s: good at 660 (the 660 decision sees it), 670, 680 -> resume
    modes = {t: m for t, _, _, m in log}
    assert modes[660.0] == "FALLBACK" and modes[670.0] == "FALLBACK"
    assert modes[680.0] == "CLOSED_LOOP"
    assert all(modes[t] == "CLOSED_LOOP" for t in modes if t >= 680.0)


def failing_plan(t_s, *args, **kwargs):
    """A failed NMPC solve (as the solver chain would report it)."""
    return DosePlan(t_s, False, "Infeasible_Problem_Detected", 17, 1e-3, "ipopt",
                    {"propofol": 0.5}, np.full((30, 1), 0.5), np.full(30, 50.0), math.nan,
                    "injected failure")


def spy_plans(ctl, monkeypatch):
    plans = []
    original = ctl.controller.mpc.plan

    def spy(*args, **kwargs):
        plan = original(*args, **kwargs)
        plans.append(plan)
        return plan
    monkeypatch.setattr(ctl.controller.mpc, "plan", spy)
    return plans, spy


def test_solver_failure_uses_shifted_plan_then_recovers(reference_model, monkeypatch):
    """A few failed solves apply the shifted previous plan; good solves resume the loop."""
    ctl, patient, state, _ = settled(reference_model, 13)
    plans, spy = spy_plans(ctl, monkeypatch)
    run(ctl, patient, 610.0, state=state)
    good = plans[-1]
    assert good.success and good.t_s == 600.0
    monkeypatch.setattr(ctl.controller.mpc, "plan", failing_plan)
    log = run(ctl, patient, 640.0, state=state)
    assert [t for t, *_ in log] == [610.0, 620.0, 630.0]
    for k, (t, _, d, mode) in enumerate(log, start=1):
        assert mode == "CLOSED_LOOP" and d.status == "solver_failed"
        assert "shifted previous plan" in d.reason and "Infeasible_Problem_Detected" in d.reason
        assert d.rates["propofol"] == pytest.approx(good.plan[k, 0])
    monkeypatch.setattr(ctl.controller.mpc, "plan", spy)
    log = run(ctl, patient, 700.0, state=state)
    assert all(d.status == "ok" and m == "CLOSED_LOOP" for _, _, d, m in log)


def test_solver_failure_beyond_plan_falls_back(reference_model, monkeypatch):
    """Failures outlasting the previous plan end in FALLBACK, never above the last rate."""
    ctl, patient, state, _ = settled(reference_model, 14, fallback=0.2)
    plans, spy = spy_plans(ctl, monkeypatch)
    run(ctl, patient, 610.0, state=state)
    good = plans[-1]
    monkeypatch.setattr(ctl.controller.mpc, "plan", failing_plan)
    log = run(ctl, patient, 610.0 + 31 * PERIOD, state=state)
    shifted = [x for x in log if "shifted previous plan" in x[2].reason]
    fallback = [x for x in log if "no previous plan: fallback" in x[2].reason]
    assert len(shifted) == 29 and len(fallback) == 2  # plan steps 1..29, then none left
    assert shifted[-1][0] < fallback[0][0]
    for k, (_, _, d, _) in enumerate(shifted, start=1):
        assert d.rates["propofol"] == pytest.approx(good.plan[k, 0])
    last = shifted[-1][2].rates["propofol"]
    for _, _, d, mode in fallback:
        assert mode == "FALLBACK" and d.reason.startswith("FALLBACK")
        assert d.rates["propofol"] <= min(0.2, last) + 1e-12
        assert d.status == "solver_failed"
    cause = ctl.supervisor.transitions[-1]
    assert cause[1:3] == ("CLOSED_LOOP", "FALLBACK") and "solver failed" in cause[3]
    monkeypatch.setattr(ctl.controller.mpc, "plan", spy)
    log = run(ctl, patient, patient.t + 3 * PERIOD, state=state)
    assert log[-1][3] == "CLOSED_LOOP" and log[-1][2].status == "ok"


def test_predictive_low_suspend_holds_insulin_before_the_low_and_only_insulin():
    """Glucose falling 0.1 mmol/L per min from 8 mmol/L, a reading every 5 min, suspend below
    4.4 mmol/L predicted 30 min ahead on a 20-min trend: the insulin is held at 0 from the
    reading at 7.0 mmol/L on (predicted 4.0 < 4.4; at 7.5 the prediction 4.5 was not yet
    below), with one alarm; glucagon (another input) is untouched; a rise ends it."""
    sup = SafetySupervisor(SafetyConfig(measured="cgm", stale_after_s=600.0,
                                        suspend_below=4.4, suspend_inputs=("insulin",)))
    held, alarms = [], []
    for k in range(8):
        t = k * 300.0
        reading = Reading("cgm", 8.0 - 0.1 * t / 60.0, "mmol/L", t)
        ok, why = sup.gate(t, reading)
        sup.observe(reading)
        verdict = sup.check(t, {"insulin": 0.001, "glucagon": 0.002},
                            {"insulin": 0.001, "glucagon": 0.002}, usable=ok, data_reason=why,
                            plan_ok=True, plan_reason="plan")
        held.append(verdict.rates["insulin"] == 0.0)
        assert verdict.rates["glucagon"] == 0.002
        alarms.append(verdict.alarm)
    assert held == [False, False, True, True, True, True, True, True]
    assert alarms.count("low.suspend") == 1
    for k, value in enumerate((6.0, 6.5, 7.0, 7.5, 8.0)):      # recovering
        t = 2400.0 + k * 300.0
        reading = Reading("cgm", value, "mmol/L", t)
        sup.observe(reading)
        verdict = sup.check(t, {"insulin": 0.001, "glucagon": 0.0}, {"insulin": 0.0},
                            usable=True, data_reason="", plan_ok=True, plan_reason="plan")
    assert verdict.rates["insulin"] == 0.001 and not sup.suspended
    with pytest.raises(ConfigError, match=r"suspend_below: needs suspend_inputs"):
        SafetyConfig(measured="cgm", suspend_below=4.4)


class _Insulin(Recorder):
    """The Recorder for an insulin controller."""

    def __init__(self):
        super().__init__(rate=0.001)
        self.inputs = ("insulin",)

    def decide(self, t_s, readings):
        from mpc_dose.control.base import Decision

        self.seen.append(dict(readings))
        return Decision(t_s, {"insulin": self.rate}, "rec says so")


def test_readings_in_another_unit_are_converted_before_any_rule_and_the_controller():
    """A Nightscout site's mg/dL for limits and a model in mmol/L: the supervisor converts
    each reading (by glucose's molar mass) before its rules and the controller see it, so
    the low suspend at 4.4 mmol/L acts on 72 mg/dL (4.0 mmol/L); a reading in a unit that
    cannot be glucose is refused (data.unit) and the loop falls back."""
    config = SafetyConfig(measured="cgm", stale_after_s=600.0, suspend_below=4.4,
                          suspend_inputs=("insulin",), measured_unit="mmol/L",
                          measured_substance="glucose", valid_range=(1.0, 30.0))
    controller = _Insulin()
    ctl = SupervisedController(controller, config)
    for k, mg_dl in enumerate((140.0, 120.0, 100.0, 80.0, 72.0)):
        reading = Reading("cgm", mg_dl, "mg/dL", k * 300.0)
        ctl.observe(reading)
        decision = ctl.decide(k * 300.0, {"cgm": reading})
    seen = controller.seen[-1]["cgm"]
    assert seen.unit == "mmol/L" and seen.value == pytest.approx(72.0 / 18.016, rel=1e-3)
    assert decision.rates["insulin"] == 0.0 and "low" in decision.reason
    assert controller.observed[-1].unit == "mmol/L"
    wrong = Reading("cgm", 90.0, "mmHg", 1500.0)
    ctl.observe(wrong)
    decision = ctl.decide(1500.0, {"cgm": wrong})
    assert ctl.rejected["data.unit"] == 1 and "cgm" not in controller.seen[-1]
    assert ctl.supervisor.data_code == "data.unit" and "not convertible" in decision.reason
    with pytest.raises(ConfigError, match=r"measured_substance = 'insulin': expected"):
        SafetyConfig(measured="cgm", measured_substance="insulin")


def _iob_supervisor(limit=3.0, basal_u_per_h=0.6):
    return SafetySupervisor(SafetyConfig(measured="cgm", stale_after_s=600.0,
                                         max_on_board={"insulin": limit},
                                         on_board_basal={"insulin": basal_u_per_h / 3600}))


def _ask(sup, t, u_per_h, last_u_per_h=0.6):
    return sup.check(t, {"insulin": u_per_h / 3600}, {"insulin": last_u_per_h / 3600},
                     usable=True, data_reason="", plan_ok=True, plan_reason="plan")


def test_max_on_board_counts_a_bolus_by_the_insulin_curve_and_cuts_rates_above_the_basal():
    """A 4-U bolus with max_on_board 3 U: while more than 3 U of it is on board nothing above
    the basal (0.6 U/h) gets through; later the rate above the basal is cut to what takes
    the insulin on board to the limit in 30 min: basal + (3 - 4 r(t)) / 1800 s, with r the
    curve's remaining fraction (its closed form); a rate at or below the basal is never
    touched; the reason says so."""
    sup = _iob_supervisor()
    curve = sup.config.on_board_curve
    sup.record(0.0, {"insulin": 0.6 / 3600})
    sup.record_bolus(0.0, "insulin", 4.0)
    verdict = _ask(sup, 300.0, 3.0)
    assert verdict.rates["insulin"] == pytest.approx(0.6 / 3600)
    assert "insulin on board 3.9" in verdict.reason and "max 3" in verdict.reason
    assert _ask(sup, 300.0, 0.2).rates["insulin"] == pytest.approx(0.2 / 3600)
    t = 3 * 3600.0
    on_board = 4.0 * curve.remaining(t)
    assert 0.5 < on_board < 3.0
    assert sup.on_board(t, "insulin") == pytest.approx(on_board, rel=1e-12)
    allowed = 0.6 / 3600 + (3.0 - on_board) / 1800.0
    assert _ask(sup, t, 20.0).rates["insulin"] == pytest.approx(allowed, rel=1e-12)
    assert _ask(sup, t, 0.7).rates["insulin"] == pytest.approx(0.7 / 3600)  # within it


def test_max_on_board_counts_what_ran_above_the_basal_within_the_curves_action():
    """Two hours at 2.6 U/h (2 U/h above a 0.6-U/h basal), then the basal: the insulin on
    board is 2 U/h times the integral of the curve's remaining fraction over the doses'
    ages, or up to 5 min of decay more (steps counted from their ends: a limit errs on the
    safe side); nothing counts after the duration of action; rates below the basal never
    count negative."""
    sup = _iob_supervisor(limit=10.0)
    curve = sup.config.on_board_curve
    sup.record(0.0, {"insulin": 2.6 / 3600})
    sup.record(7200.0, {"insulin": 0.6 / 3600})
    sup.record(9000.0, {"insulin": 0.0})      # a suspend: below the basal, not negative
    t = 10800.0
    ages = np.linspace(t - 7200.0, t, 20001)
    exact = 2.0 / 3600 * np.trapezoid([curve.remaining(a) for a in ages], ages)
    younger = 2.0 / 3600 * np.trapezoid([curve.remaining(a - 300.0) for a in ages], ages)
    got = sup.on_board(t, "insulin")
    assert exact <= got <= younger < 1.1 * exact
    sup.record(7200.0 + curve.duration_s, {"insulin": 0.6 / 3600})
    assert sup.on_board(7200.0 + curve.duration_s, "insulin") == 0.0


def test_max_on_board_settings_are_checked_with_their_names():
    with pytest.raises(ConfigError, match=r"max_on_board\['insulin'\] = -1"):
        SafetyConfig(max_on_board={"insulin": -1.0})
    with pytest.raises(ConfigError, match=r"on_board_basal\['insulin'\]: no max_on_board"):
        SafetyConfig(on_board_basal={"insulin": 0.0001})
    with pytest.raises(ConfigError, match=r"on_board_horizon_s = 0"):
        SafetyConfig(max_on_board={"insulin": 3.0}, on_board_horizon_s=0.0)


def test_a_bolus_the_pump_gave_reaches_the_limit_through_the_supervised_controller():
    """SupervisedController.given_bolus (the pump's ack) counts in the supervisor's insulin
    on board before it reaches the controller."""
    config = SafetyConfig(measured="cgm", stale_after_s=600.0, max_on_board={"insulin": 1.0},
                          on_board_basal={"insulin": 0.0})
    controller = _Insulin()
    controller.rate = 2.0 / 3600
    ctl = SupervisedController(controller, config)
    reading = Reading("cgm", 9.0, "mmol/L", 0.0)
    ctl.observe(reading)
    assert ctl.decide(0.0, {"cgm": reading}).rates["insulin"] == pytest.approx(2.0 / 3600)
    ctl.given_bolus(0.0, "insulin", 5.0)
    reading = Reading("cgm", 9.0, "mmol/L", 300.0)
    decision = ctl.decide(300.0, {"cgm": reading})
    assert decision.rates["insulin"] == 0.0 and "insulin on board" in decision.reason
