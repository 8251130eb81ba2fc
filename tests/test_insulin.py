"""Insulin on board and the bolus calculator (issue 18): the exponential insulin curve's
closed-form properties and the calculator's arithmetic."""

from __future__ import annotations

import pytest
from scipy.integrate import quad

from mpc_dose.control.insulin import BolusCalculator, InsulinCurve
from mpc_dose.errors import ConfigError

H = 3600.0


@pytest.mark.parametrize("peak_min, duration_h", [(75, 5), (55, 6), (65, 4)])
def test_the_curve_starts_whole_ends_empty_and_its_activity_is_its_slope(peak_min, duration_h):
    """IOB(0) = 1, IOB(duration) = 0, activity = -dIOB/dt, the activity integrates to 1 over
    the action and peaks at the peak time."""
    curve = InsulinCurve(peak_min * 60.0, duration_h * H)
    assert curve.remaining(0.0) == 1.0
    assert curve.remaining(curve.duration_s) == 0.0
    assert curve.remaining(curve.duration_s - 1e-6) == pytest.approx(0.0, abs=1e-9)
    for t in (600.0, 3000.0, 2 * H, 3.5 * H):
        slope = (curve.remaining(t + 1.0) - curve.remaining(t - 1.0)) / 2.0
        assert -slope == pytest.approx(curve.activity(t), rel=1e-5)
    total, _ = quad(curve.activity, 0.0, curve.duration_s, limit=200)
    assert total == pytest.approx(1.0, rel=1e-9)
    grid = [k * 10.0 for k in range(int(curve.duration_s / 10.0))]
    assert max(grid, key=curve.activity) == pytest.approx(curve.peak_s, abs=10.0)


def test_insulin_on_board_adds_the_doses_still_acting():
    curve = InsulinCurve()
    doses = [(0.0, 4.0), (2 * H, 2.0), (10 * H, 1.0)]
    expected = 4.0 * curve.remaining(3 * H) + 2.0 * curve.remaining(H)
    assert curve.on_board(doses, 3 * H) == pytest.approx(expected)
    assert curve.on_board(doses, 8 * H) == 0.0


def test_the_bolus_calculator_closed_forms():
    """CR 10 g/U, CF 40 mg/dL per U, target 110 mg/dL: 60 g at 190 mg/dL with 0.5 U on board
    is 6 + (80/40 - 0.5) = 7.5 U; below target the meal part alone (no negative correction);
    on board beyond the correction never takes from the meal part; no reading: meal only."""
    calc = BolusCalculator(carb_ratio=10.0, correction_factor=40.0, target=110.0)
    assert calc.bolus(60.0, 190.0, 0.5) == pytest.approx(7.5)
    assert calc.bolus(60.0, 80.0, 0.0) == pytest.approx(6.0)
    assert calc.bolus(60.0, 190.0, 5.0) == pytest.approx(6.0)
    assert calc.bolus(0.0, 230.0, 1.0) == pytest.approx(2.0)
    assert calc.bolus(30.0, None) == pytest.approx(3.0)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match=r"need 0 < peak \(9000.0 s\) < half the duration"):
        InsulinCurve(150 * 60.0, 5 * H)
    with pytest.raises(ConfigError, match=r"carb_ratio = 0; expected > 0"):
        BolusCalculator(carb_ratio=0, correction_factor=40.0, target=110.0)


def test_basal_bolus_follows_its_profile_and_doses_each_announced_meal():
    """Basal 0.8 U/h from 00:00, 1.2 U/h from 04:00 (dawn), 0.9 U/h from 10:00; the clock at
    t = 0 is 06:00. A 60-g meal announced at 07:00 with glucose 190 mg/dL gives 6 + 2 = 8 U
    (CR 10, CF 40, target 110, nothing on board) over the next 5-min period; a second meal an
    hour later counts the first bolus on board against its correction."""
    from mpc_dose.control.base import Reading
    from mpc_dose.control.basal_bolus import BasalBolusController

    u_per_h = 1 / 3600.0
    c = BasalBolusController(input="insulin", basal_profile=[(0, 0.8 * u_per_h),
                                                             (4, 1.2 * u_per_h),
                                                             (10, 0.9 * u_per_h)],
                             calculator=BolusCalculator(10.0, 40.0, 110.0),
                             glucose_var="cgm", announcement_var="carbs_announced",
                             period_s=300.0, clock_at_t0_h=6.0)
    assert c.decide(0.0, {}).rates["insulin"] == pytest.approx(1.2 * u_per_h)   # 06:00
    assert c.basal_at(5 * H) == pytest.approx(0.9 * u_per_h)                    # 11:00
    assert c.basal_at(19 * H) == pytest.approx(0.8 * u_per_h)                   # 01:00
    c.observe(Reading("cgm", 190.0, "mg/dL", H - 60))
    c.observe(Reading("carbs_announced", 60.0, "g", H))
    first = c.decide(H, {})
    assert first.rates["insulin"] == pytest.approx(1.2 * u_per_h + 8.0 / 300.0)
    assert c.decide(H + 300.0, {}).rates["insulin"] == pytest.approx(1.2 * u_per_h)
    c.observe(Reading("carbs_announced", 20.0, "g", 2 * H))
    c.decide(2 * H, {})
    on_board = InsulinCurve().remaining(H) * 8.0
    assert c.boluses[-1] == (2 * H, pytest.approx(2.0 + max(2.0 - on_board, 0.0)))
    with pytest.raises(ConfigError, match="basal_profile must start at 0 h"):
        BasalBolusController(input="insulin", basal_profile=[(6, 0.001)],
                             calculator=BolusCalculator(10.0, 40.0, 110.0), glucose_var="g",
                             announcement_var="a", period_s=300.0)


def test_basal_bolus_from_a_scenario_doses_each_announced_meal_through_the_pump():
    """kind = "basal_bolus" on the Cambridge model (scenarios/t1d_basal_bolus.toml, one day):
    every announced meal reaches the controller as a reading in g and gets the calculator's
    bolus, sent as a bolus command; the pump delivers basal plus the bolus it acknowledged
    (rounded down to 0.05 U) in U (U-100 insulin, mL/h on the wire); the unannounced snack
    gets none."""
    from pathlib import Path

    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.build import build_setup
    from mpc_dose.trial.closed_loop import run_closed_loop

    path = Path(__file__).resolve().parents[1] / "scenarios" / "t1d_basal_bolus.toml"
    # the mechanics without the low suspend (test_the_low_suspend_takes_insulin_away...)
    setup, _ = build_setup(load_scenario(path, {"scenario.duration_s": 86400,
                                                "controller.safety.suspend_below": None}), 0, 0)
    result = run_closed_loop(setup)
    controller = setup.controller
    announced = [m for m in setup.meals if m.announced is not None]
    assert len(announced) == 3 and len(setup.meals) in (3, 4)
    # each bolus at the first decision after its announcement, one per announced meal
    assert len(controller.boluses) == 3
    for (t, amount), meal in zip(controller.boluses, announced):
        assert 0 <= t - meal.t_s < 300.0
        # the meal part at least at the patient's own carbohydrate ratio, rounded down to
        # the pump's 0.05 U bolus step
        assert amount >= meal.announced / controller.calculator.carb_ratio - 0.05
        assert amount / 0.05 == pytest.approx(round(amount / 0.05))
    given = sum(rate * (t1 - t0) for (t0, _, rate, _), (t1, _, _, _) in
                zip(result.deliveries, result.deliveries[1:] + [(86400.0, "", 0.0, "")]))
    # what it asked for while in charge (in FALLBACK, e.g. a CGM stuck on LOW, the
    # supervisor withholds insulin and the pump's lease runs out)
    frame = result.to_pandas()
    in_charge = frame.time_s[frame.controller_mode == "CLOSED_LOOP"]
    basal = sum(controller.basal_at(t) * 300.0 for t in in_charge if t < 86400)
    assert given == pytest.approx(basal + sum(a for _, a in controller.boluses), rel=0.02)


def test_the_low_suspend_takes_insulin_away_before_lows():
    """The same patient and day with and without the supervisor's predictive low suspend:
    with it, less time below 3.9 mmol/L (70 mg/dL), the insulin held while the prediction
    is low (alarm low.suspend), never more insulin in total."""
    from pathlib import Path

    import numpy as np

    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.build import build_setup
    from mpc_dose.trial.closed_loop import run_closed_loop

    path = Path(__file__).resolve().parents[1] / "scenarios" / "t1d_basal_bolus.toml"
    below, insulin, alarms = [], [], []
    for suspend in ("4.4 mmol/L", None):
        overrides = {"scenario.duration_s": 86400}
        if suspend is None:
            overrides["controller.safety.suspend_below"] = None
        setup, _ = build_setup(load_scenario(path, overrides), 0, 0)
        result = run_closed_loop(setup)
        frame = result.to_pandas()
        below.append(float(np.mean(frame["true_glucose_mmol_per_L"] < 3.9)))
        insulin.append(sum(rate * (t1 - t0) for (t0, _, rate, _), (t1, _, _, _) in
                           zip(result.deliveries,
                               result.deliveries[1:] + [(86400.0, "", 0.0, "")])))
        alarms.append(sum("low.suspend" in text for _, kind, text in result.events))
    assert below[0] < below[1] and insulin[0] < insulin[1]
    assert alarms[0] >= 1 and alarms[1] == 0
