"""The closed-loop glucose baselines of issue 18: the OpenAPS-kind temp-basal algorithm
(control/openaps.py, from the OpenAPS documentation) and the ePID with insulin feedback
(control/pid_ifb.py): closed-form checks, the safety caps under a stuck sensor, the insulin
feedback after a bolus, a patient-day from each shipped scenario, scenario errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mpc_dose.control.base import Reading
from mpc_dose.control.insulin import BolusCalculator, DeliveryHistory, InsulinCurve, \
    MealBoluses
from mpc_dose.control.openaps import (OpenAPSController, eventual_bg, max_safe_basal,
                                      safety_threshold)
from mpc_dose.control.pid_ifb import PIDIFBController, proportional_gain
from mpc_dose.errors import ConfigError

H = 3600.0
SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


def _cgm(value_mg_dl: float, t_s: float) -> Reading:
    return Reading("cgm", value_mg_dl, "mg/dL", t_s)


# ---------------------------------------------------------------------------- OpenAPS
def test_eventual_bg_of_the_documented_example():
    """The determine-basal documentation's example inputs: glucose 161, delta +5, IOB 0,
    activity 0, sens (ISF) 40, min_bg 115, current_basal 1.1, max_daily_basal 1.3,
    max_basal 3, max_iob 1. By hand: BGI 0, deviation 6 x 5 = 30 (30 min of it),
    naive_eventualBG 161, eventualBG 191; the IOB prediction rises by the deviation
    falling to zero over 60 min, 5 (1 - k/12) for k = 1..12, to 161 + 27.5 = 188.5 =
    minPredBG; insulinReq (188.5 - 115) / 40 = 1.84 U, capped by max_iob to 1 U: 1.1 + 1 /
    0.5 h = 3.1 U/h, capped by maxSafeBasal min(3, 3 x 1.3, 4 x 1.1) = 3 U/h."""
    assert eventual_bg(161.0, 0.0, 40.0, 5.0, 0.0) == (161.0, 30.0, 191.0)
    # with insulin acting: IOB 1.5 U, BGI -2 per 5 min: 161 - 60 + 6 (5 + 2) = 143
    assert eventual_bg(161.0, 1.5, 40.0, 5.0, -2.0) == pytest.approx((101.0, 42.0, 143.0))
    c = OpenAPSController(input="insulin", glucose_var="cgm",
                          basal_profile_U_per_h=[(0, 1.1), (12, 1.3)], isf_mg_dl_per_U=40.0,
                          target_mg_dl=115.0, max_iob_U=1.0, pump_max_basal_U_per_h=3.0,
                          amount_per_U=1.0)
    c.observe(_cgm(156.0, -300.0))
    c.observe(_cgm(161.0, 0.0))
    decision = c.decide(0.0, {"cgm": _cgm(161.0, 0.0)})
    f = c.log[-1]
    assert (f["bgi"], f["deviation"], f["naive_eventual_bg"], f["eventual_bg"]) == \
        pytest.approx((0.0, 30.0, 161.0, 191.0))
    assert f["min_pred_bg"] == pytest.approx(188.5)
    assert decision.rates["insulin"] * H == pytest.approx(3.0)
    assert "maxSafeBasal 3.00" in decision.reason and "max_iob leaves 1.00" in decision.reason


@pytest.mark.parametrize("current, highest, pump, asked, allowed", [
    (1.0, 1.5, 2.0, 3.0, 2.0), (0.4, 1.0, 2.0, 1.8, 1.6), (1.2, 1.2, 3.0, 2.4, 2.4),
    (0.7, 0.8, 2.5, 2.6, 2.4)])
def test_max_safe_basal_reproduces_the_documented_examples(current, highest, pump, asked,
                                                           allowed):
    """The preferences page's four examples (multipliers 3 and 4)."""
    assert min(asked, max_safe_basal(current, highest, pump)) == pytest.approx(allowed)


def test_below_the_threshold_the_temp_is_zero():
    """The documented safety threshold min_bg - 0.5 (min_bg - 40): 77.5 mg/dL at a target
    of 115. Glucose 70 -> temp 0; glucose 120 falling 8 per 5 min with 2 U on board (its
    prediction crossing the threshold) -> temp 0 too; a suspend_below of one's own
    replaces the threshold (a flat 70 then gets the low temp of its insulinReq, not the
    suspend)."""
    assert safety_threshold(115.0) == 77.5
    curve = InsulinCurve()

    def controller(**kw):
        return OpenAPSController(input="insulin", glucose_var="cgm",
                                 basal_profile_U_per_h=[(0, 1.0)], isf_mg_dl_per_U=50.0,
                                 target_mg_dl=115.0, curve=curve, **kw)

    low = controller()
    low.observe(_cgm(72.0, -300.0))
    low.observe(_cgm(70.0, 0.0))
    d = low.decide(0.0, {"cgm": _cgm(70.0, 0.0)})
    assert d.rates["insulin"] == 0.0 and "suspend" in d.reason
    falling = controller()
    falling.applied(-H, {"insulin": 3.0 / H})          # 2 U above the 1 U/h schedule
    falling.applied(0.0, {"insulin": 1.0 / H})
    falling.observe(_cgm(128.0, -300.0))
    falling.observe(_cgm(120.0, 0.0))
    d = falling.decide(0.0, {"cgm": _cgm(120.0, 0.0)})
    assert falling.log[-1]["min_guard_bg"] < 77.5 and d.rates["insulin"] == 0.0
    own = controller(suspend_below_mg_dl=65.0)
    own.observe(_cgm(70.0, -300.0))
    own.observe(_cgm(70.0, 0.0))
    d = own.decide(0.0, {"cgm": _cgm(70.0, 0.0)})
    assert "suspend" not in d.reason and "insulinReq -0.90 U" in d.reason
    with pytest.raises(ConfigError, match=r"suspend_below = 130 mg/dL; expected below"):
        controller(suspend_below_mg_dl=130.0)


def test_a_sensor_stuck_at_400_never_pushes_beyond_the_caps():
    """Fault injection: 12 h of a CGM stuck at 400 mg/dL (no supervisor), each decision
    applied as given. Every temp stays at or below maxSafeBasal, the loop's net basal
    insulin on board never exceeds max_iob, and the caps bind (the loop does go high)."""
    c = OpenAPSController(input="insulin", glucose_var="cgm",
                          basal_profile_U_per_h=[(0, 0.8), (6, 1.0), (22, 0.7)],
                          isf_mg_dl_per_U=45.0, target_mg_dl=110.0, max_iob_U=2.0,
                          amount_per_U=1.0, clock_at_t0_h=3.0)
    delivered = DeliveryHistory(c.curve)
    at_ceiling = 0
    for k in range(144):
        t = k * 300.0
        c.observe(_cgm(400.0, t))
        rate = c.decide(t, {"cgm": _cgm(400.0, t)}).rates["insulin"] * H
        ceiling = max_safe_basal(c.basal_at(t), 1.0)
        assert rate <= ceiling + 1e-9
        at_ceiling += rate == pytest.approx(ceiling)
        c.applied(t, {"insulin": rate / H})
        delivered.record(t, rate / H)
        assert delivered.on_board(t + 300.0, lambda s: c.basal_at(s) / H) <= 2.0 + 1e-9
    assert at_ceiling > 0 and max(f["basal_iob"] for f in c.log) > 1.5


# ---------------------------------------------------------------------------- PID-IFB
def test_pid_ifb_terms_by_hand():
    """KP 0.1 U/h per mg/dL, TI 450, TD 90 min, gamma 0.5, basal 1 U/h, target 120:
    readings 140 then 150 mg/dL 5 min apart: P = 3, I = 1 + 0.1/450 x 30 x 5 = 1.0333,
    D = 0.1 x 90 x 2 = 18 (slope 2 mg/dL/min), PID = 22.033; the insulin model still at
    the basal (1 U/h): u = 1.5 x 22.033 - 0.5 x 1 = 32.55 U/h. KP from a TDD of 40 U:
    40/135."""
    assert proportional_gain(40.0) == pytest.approx(40.0 / 135.0)
    c = PIDIFBController(input="insulin", glucose_var="cgm", kp_U_per_h_per_mg_dl=0.1,
                         basal_profile_U_per_h=[(0, 1.0)], amount_per_U=1.0)
    c.observe(_cgm(140.0, -300.0))
    c.observe(_cgm(150.0, 0.0))
    d = c.decide(0.0, {"cgm": _cgm(150.0, 0.0)})
    assert d.details["p"] == pytest.approx(3.0)
    assert d.details["i"] == pytest.approx(1.0 + 0.1 / 450.0 * 30.0 * 5.0)
    assert d.details["d"] == pytest.approx(18.0)
    assert d.rates["insulin"] * H == pytest.approx(1.5 * (3.0 + 1.0 + 0.1 / 450.0 * 150.0
                                                          + 18.0) - 0.5 * 1.0)


def test_insulin_feedback_lowers_delivery_after_a_bolus():
    """The same PID with and without feedback (gamma 0.5 vs 0), glucose at the target and
    flat, a 4-U bolus delivered over the first 5 min: without feedback the PID gives the
    basal (1 U/h) throughout; with it, the model's plasma insulin rises and the delivery
    falls below the basal for the next hours (less insulin in total). With the basal alone
    delivered, the feedback leaves the output at the basal (steady state: Ip = u)."""
    totals = {}
    for gamma in (0.5, 0.0):
        c = PIDIFBController(input="insulin", glucose_var="cgm", kp_U_per_h_per_mg_dl=0.05,
                             basal_profile_U_per_h=[(0, 1.0)], gamma=gamma, amount_per_U=1.0)
        c.applied(0.0, {"insulin": (1.0 + 48.0) / H})           # 4 U in 5 min + basal
        given = []
        for k in range(1, 37):
            t = k * 300.0
            c.observe(_cgm(120.0, t))
            rate = c.decide(t, {"cgm": _cgm(120.0, t)}).rates["insulin"]
            c.applied(t, {"insulin": rate})
            given.append(rate * H)
        totals[gamma] = sum(given) * 300.0 / H
        if gamma == 0.0:
            assert given == pytest.approx([1.0] * 36)
        else:
            assert max(given[:24]) < 1.0 and min(given) >= 0.0
    assert totals[0.5] < totals[0.0] - 1.0
    steady = PIDIFBController(input="insulin", glucose_var="cgm", kp_U_per_h_per_mg_dl=0.05,
                              basal_profile_U_per_h=[(0, 1.0)], amount_per_U=1.0)
    for k in range(12):
        steady.observe(_cgm(120.0, k * 300.0))
        rate = steady.decide(k * 300.0, {"cgm": _cgm(120.0, k * 300.0)}).rates["insulin"]
        steady.applied(k * 300.0, {"insulin": rate})
        assert rate * H == pytest.approx(1.0)


def test_meal_boluses_are_one_logic_for_every_insulin_kind():
    """MealBoluses (control/insulin.py) doses an announcement at the next decision with
    the calculator, over one period; a closed loop's extra insulin on board offsets the
    correction only."""
    meals = MealBoluses(BolusCalculator(10.0, 40.0, 110.0), "carbs_announced", 300.0)
    assert meals.observe(Reading("carbs_announced", 60.0, "g", 10.0))
    assert not meals.observe(_cgm(190.0, 10.0))
    assert meals.give_due(300.0, 190.0, extra_on_board=0.5) is not None
    assert meals.boluses == [(300.0, pytest.approx(6.0 + 2.0 - 0.5))]
    assert meals.rate_at(400.0) == pytest.approx(7.5 / 300.0) and meals.rate_at(600.0) == 0
    assert meals.give_due(600.0, 190.0) is None


# ---------------------------------------------------------------------------- scenarios
def _day(name: str, overrides: dict | None = None):
    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.build import build_setup
    from mpc_dose.trial.closed_loop import run_closed_loop

    setup, _ = build_setup(load_scenario(SCENARIOS / name, {"scenario.duration_s": 86400,
                                                            **(overrides or {})}), 0, 0)
    return setup, run_closed_loop(setup)


def test_openaps_patient_day_end_to_end():
    """scenarios/t1d_openaps.toml, one patient-day: the patient's own settings (the same
    titration as basal_bolus), a bolus at each announced meal, every decision within
    maxSafeBasal and max_iob, glucose kept between 2 and 25 mmol/L."""
    import numpy as np

    setup, result = _day("t1d_openaps.toml")
    c = setup.controller
    assert isinstance(c, OpenAPSController)
    announced = [m for m in setup.meals if m.announced is not None]
    assert len(c.meals.boluses) == len(announced) == 3
    assert len(c.log) > 250
    for f in c.log:
        ceiling = max_safe_basal(f["scheduled_U_per_h"], c.highest_basal_U_per_h,
                                 c.pump_max_basal_U_per_h)
        assert f["temp_U_per_h"] <= ceiling + 1e-9
        if f["temp_U_per_h"] > f["scheduled_U_per_h"] + 1e-9:
            # a high temp only with room under max_iob, never more than the room
            room = c.max_iob_U - f["basal_iob"]
            assert room > 0
            assert (f["temp_U_per_h"] - f["scheduled_U_per_h"]) * 0.5 <= room + 1e-9
    glucose = result.to_pandas()["true_glucose_mmol_per_L"]
    assert np.all(np.isfinite(glucose)) and 2.0 < glucose.min() and glucose.max() < 25.0


def test_pid_ifb_patient_day_end_to_end():
    """scenarios/t1d_pid_ifb.toml, one patient-day: KP from the patient's own total daily
    dose (TDD / 135), the integral starting at its basal, a bolus at each announced meal,
    the delivery what the controller asked while in charge."""
    setup, result = _day("t1d_pid_ifb.toml")
    c = setup.controller
    assert isinstance(c, PIDIFBController)
    assert c.kp > 0 and c.gamma == 0.5 and c.target == pytest.approx(120.0)
    assert len(c.meals.boluses) == 3
    frame = result.to_pandas()
    assert frame["controller_reason"].str.contains("SG ").sum() > 250
    assert math.isfinite(frame["true_glucose_mmol_per_L"].iloc[-1])


@pytest.mark.parametrize("name, overrides, match", [
    ("t1d_openaps.toml", {"controller.openaps": None},
     r"controller.kind = 'openaps' needs a \[controller.openaps\] table"),
    ("t1d_openaps.toml", {"controller.openaps.max_iob_U": -1.0},
     r"controller.openaps.*max_iob_U = -1.0: expected a finite number >= 0"),
    ("t1d_openaps.toml", {"controller.openaps.suspend_below": "140 mg/dL"},
     r"controller.openaps.suspend_below = '140 mg/dL': expected below the target"),
    ("t1d_openaps.toml", {"controller.openaps.meal_input": "snacks"},
     r"controller.openaps.meal_input: model .* has no input 'snacks'"),
    ("t1d_openaps.toml", {"controller.openaps.max_daily_safety_multiplier": 0},
     r"controller.openaps.max_daily_safety_multiplier.*greater than 0"),
    ("t1d_pid_ifb.toml", {"controller.pid_ifb.target": "120 furlongs"},
     r"controller.pid_ifb.target = '120 furlongs'"),
    ("t1d_pid_ifb.toml", {"controller.pid_ifb.kp_U_per_h_per_mg_dL": 0},
     r"controller.pid_ifb.kp_U_per_h_per_mg_dL.*greater than 0"),
    ("t1d_pid_ifb.toml", {"controller.pid_ifb.ifb_time_constants_min": [50.0, -1.0]},
     r"ifb_time_constants_min = \(50.0, -1.0\); expected two numbers > 0"),
    ("t1d_pid_ifb.toml", {"controller.pid_ifb.output": "glucos"},
     r"controller.pid_ifb.output = 'glucos': no \[\[sensor\]\] measures it"),
])
def test_scenario_errors_name_the_field(name, overrides, match):
    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.build import build_setup

    with pytest.raises(ConfigError, match=match):
        build_setup(load_scenario(SCENARIOS / name, overrides), 0, 0)


def test_a_meal_bolus_above_the_pumps_maximum_is_cut_to_it():
    """The pump would refuse a bolus above its max_bolus whole; the calculator cuts it to
    the maximum (as a pump's own calculator does) and says so."""
    from mpc_dose.control.base import Reading
    from mpc_dose.control.insulin import BolusCalculator, MealBoluses

    meals = MealBoluses(BolusCalculator(5.0, 50.0, 110.0), "carbohydrate_announced", 300.0,
                        bolus_commands=True, max_bolus=15.0)
    meals.observe(Reading("carbohydrate_announced", 100.0, "g", 0.0))
    note = meals.give_due(0.0, 110.0)
    assert meals.take_command() == 15.0
    assert "cut from 20 to the pump's max bolus" in note
    with pytest.raises(ConfigError, match=r"max_bolus = 0.0; expected > 0"):
        MealBoluses(BolusCalculator(5.0, 50.0, 110.0), "x", 300.0, max_bolus=0.0)
