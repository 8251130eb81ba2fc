"""The glucose clinical set: the consensus CGM metrics (Battelino 2019) on series whose
answers are known by hand, LBGI/HBGI and GMI from their published formulas, the CVGA's zone
boundaries, mg/dL and mmol/L giving the same answers, and a trial of a toy glucose model
through the runner into the report (daily profile, CVGA, no overlapping labels)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mpc_dose.errors import ConfigError
from mpc_dose.trial.glucose import (MG_PER_DL_PER_MMOL_PER_L, cvga_point, cvga_zone,
                                    glucose_in_mg_per_dL, glucose_metrics)
from mpc_dose.trial.report import (_daily_profile_figure, cvga_figure, daily_profile,
                                   describe_metric, headline_metrics, write_report)
from mpc_dose.trial.runner import glucose_set
from tests.figures import text_overlaps


def _kovatchev(bg_mg_per_dL: float) -> float:
    """f(BG) written out from Kovatchev 1997, BG in mg/dL."""
    return 1.509 * (math.log(bg_mg_per_dL) ** 1.084 - 5.381)


# ---------------------------------------------------------------------------------------
# the consensus metrics on series known by hand

def test_a_trace_20_percent_below_70_scores_20_percent_below_and_80_in_range():
    glucose = np.r_[np.full(20, 60.0), np.full(80, 120.0)]   # readings, equal weight
    m = glucose_metrics(glucose, "mg/dL", signal="measured")
    assert m["tbr_70_measured_pct"] == pytest.approx(20.0)
    assert m["tbr_54_measured_pct"] == 0.0
    assert m["tir_70_180_measured_pct"] == pytest.approx(80.0)
    assert m["tar_180_measured_pct"] == 0.0 and m["tar_250_measured_pct"] == 0.0
    assert m["mean_glucose_measured_mg_per_dL"] == pytest.approx(0.2 * 60 + 0.8 * 120)
    # population SD of a two-level trace: |a - b| sqrt(p (1 - p))
    assert m["sd_glucose_measured_mg_per_dL"] == pytest.approx(60 * math.sqrt(0.2 * 0.8))
    assert m["cv_glucose_measured_pct"] == pytest.approx(24.0 / 108.0 * 100)


def test_every_range_counts_its_own_levels_with_the_ends_of_70_180_inside():
    # one reading each: 40 | 54 | 60 | 70 | 180 | 200 | 250 | 300
    glucose = np.array([40.0, 54.0, 60.0, 70.0, 180.0, 200.0, 250.0, 300.0])
    m = glucose_metrics(glucose, "mg/dL", signal="measured")
    per = 100.0 / glucose.size
    assert m["tbr_54_measured_pct"] == pytest.approx(1 * per)     # 40 (54 is not below)
    assert m["tbr_70_measured_pct"] == pytest.approx(3 * per)     # 40, 54, 60
    assert m["tir_70_180_measured_pct"] == pytest.approx(2 * per)  # 70 and 180 included
    assert m["tar_180_measured_pct"] == pytest.approx(3 * per)    # 200, 250, 300
    assert m["tar_250_measured_pct"] == pytest.approx(1 * per)    # 300 (250 is not above)


def test_the_true_glucose_is_weighed_by_time_and_readings_each_count_once():
    """Records 1 h apart then 3 h apart: by time, the hour spent low is 1/4 of the run; as
    readings it would be 1/2."""
    durations = np.array([3600.0, 3 * 3600.0])
    low_then_high = np.array([60.0, 120.0])
    by_time = glucose_metrics(low_then_high, "mg/dL", signal="true", weights=durations)
    by_reading = glucose_metrics(low_then_high, "mg/dL", signal="measured")
    assert by_time["tbr_70_true_pct"] == pytest.approx(25.0)
    assert by_reading["tbr_70_measured_pct"] == pytest.approx(50.0)
    set_ = glucose_set(np.array([0.0, 3600.0, 4 * 3600.0]), np.array([60.0, 120.0, 120.0]),
                       "mg/dL", None, output="glucose")
    # each record counts until the next, the last for the gap before it: 1 h of 7 h low
    assert set_["tbr_70_true_pct"] == pytest.approx(100.0 / 7.0)
    assert not any("measured" in k for k in set_), "no sensor: no CGM terms"


def test_gmi_follows_bergenstal_2018():
    for mean in (100.0, 154.0, 183.0):
        m = glucose_metrics(np.full(10, mean), "mg/dL", signal="true")
        assert m["gmi_true_pct"] == pytest.approx(3.31 + 0.02392 * mean)
    # the published anchor: a mean of 154 mg/dL is a GMI of about 7.0 %
    assert glucose_metrics([154.0], "mg/dL", signal="true")["gmi_true_pct"] == \
        pytest.approx(7.0, abs=0.02)


def test_lbgi_and_hbgi_are_kovatchevs_means_over_all_readings():
    glucose = [50.0, 80.0, 112.0, 150.0, 300.0]
    f = [_kovatchev(g) for g in glucose]
    low = sum(10 * x ** 2 for x in f if x < 0) / len(f)
    high = sum(10 * x ** 2 for x in f if x > 0) / len(f)
    m = glucose_metrics(glucose, "mg/dL", signal="measured")
    assert m["lbgi_measured"] == pytest.approx(low, rel=1e-12)
    assert m["hbgi_measured"] == pytest.approx(high, rel=1e-12)
    # by hand: ln 50 = 3.9120, 3.9120^1.084 = 4.3868, f(50) = 1.509 (4.3868 - 5.381)
    # = -1.500, risk 10 f^2 = 22.5
    assert m["lbgi_measured"] >= 22.5 / len(glucose) - 0.01
    assert 10 * _kovatchev(50.0) ** 2 == pytest.approx(22.5, abs=0.05)
    # the scale's centre: about 112.5 mg/dL carries no risk on either side
    assert glucose_metrics([112.5], "mg/dL", signal="true")["lbgi_true"] < 1e-5
    # the scale ends at 20 and 600 mg/dL, with risk 100 there (values beyond are clipped)
    assert glucose_metrics([10.0], "mg/dL", signal="true")["lbgi_true"] == \
        pytest.approx(100.0, abs=0.1)
    assert glucose_metrics([900.0], "mg/dL", signal="true")["hbgi_true"] == \
        pytest.approx(100.0, abs=0.1)


def test_missing_readings_are_left_out_and_none_gives_nan():
    m = glucose_metrics([60.0, np.nan, 120.0], "mg/dL", signal="measured")
    assert m["tbr_70_measured_pct"] == pytest.approx(50.0)
    empty = glucose_metrics([np.nan], "mg/dL", signal="measured")
    assert all(math.isnan(v) for v in empty.values())


# ---------------------------------------------------------------------------------------
# units

def test_mmol_per_L_gives_the_same_answers_as_mg_per_dL():
    rng = np.random.default_rng(5)
    mg = rng.uniform(40.0, 350.0, 500)
    a = glucose_metrics(mg, "mg/dL", signal="measured")
    b = glucose_metrics(mg / MG_PER_DL_PER_MMOL_PER_L, "mmol/L", signal="measured")
    for name, value in a.items():
        if name.startswith(("mean_", "sd_")):
            other = b[name.replace("mg_per_dL", "mmol_per_L")]
            assert other * MG_PER_DL_PER_MMOL_PER_L == pytest.approx(value, rel=1e-12)
        else:
            assert b[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    assert glucose_in_mg_per_dL(5.5, "mmol/L") == pytest.approx(99.088)
    assert glucose_in_mg_per_dL(1.0, "g/L") == pytest.approx(100.0)


def test_a_unit_that_is_not_a_glucose_concentration_is_refused():
    with pytest.raises(ConfigError, match=r"glucose \(true\): unit 'mg' is not a glucose "
                                          r"concentration; expected mg/dL or mmol/L"):
        glucose_metrics([100.0], "mg", signal="true")
    with pytest.raises(ConfigError, match="signal 'cgm'; expected 'true' or 'measured'"):
        glucose_metrics([100.0], "mg/dL", signal="cgm")


# ---------------------------------------------------------------------------------------
# the control-variability grid (Magni 2008)

@pytest.mark.parametrize(("lowest", "highest", "zone"), [
    # the column boundary at min 90 (rows: max <= 180)
    (90.5, 150.0, "A"), (89.5, 150.0, "Lower B"),
    # the column boundary at min 70
    (70.5, 150.0, "Lower B"), (69.5, 150.0, "Lower C"),
    # the row boundary at max 180 (column: min >= 90)
    (100.0, 179.5, "A"), (100.0, 180.5, "Upper B"),
    # the row boundary at max 300
    (100.0, 299.5, "Upper B"), (100.0, 300.5, "Upper C"),
    # the middle column across both row boundaries
    (80.0, 179.5, "Lower B"), (80.0, 180.5, "B"), (80.0, 299.5, "B"), (80.0, 300.5, "Upper D"),
    # the right column across both row boundaries
    (60.0, 179.5, "Lower C"), (60.0, 180.5, "Lower D"), (60.0, 299.5, "Lower D"),
    (60.0, 300.5, "E"),
    # on a boundary: the better cell
    (90.0, 180.0, "A"), (70.0, 300.0, "B"),
    # beyond the axes: clipped onto the grid's edges
    (30.0, 500.0, "E"), (130.0, 100.0, "A"),
])
def test_cvga_zones_have_the_published_boundaries(lowest, highest, zone):
    assert cvga_zone(lowest, highest) == zone


def test_cvga_points_are_clipped_to_the_grid_and_one_zone_letter_is_set():
    assert cvga_point(30.0, 500.0) == (50.0, 400.0)
    assert cvga_point(130.0, 100.0) == (110.0, 110.0)
    m = glucose_metrics([85.0, 120.0, 250.0], "mg/dL", signal="true")
    assert (m["cvga_min_glucose_true_mg_per_dL"], m["cvga_max_glucose_true_mg_per_dL"]) == \
        (85.0, 250.0)
    zones = {z: m[f"cvga_zone_{z}_true_pct"] for z in "abcde"}
    assert zones == {"a": 0.0, "b": 100.0, "c": 0.0, "d": 0.0, "e": 0.0}


# ---------------------------------------------------------------------------------------
# the report: words, figures, a trial folder

def _all_glucose_names() -> list[str]:
    names = []
    for unit in ("mg/dL", "mmol/L"):
        for signal in ("true", "measured"):
            names += list(glucose_metrics([60.0, 120.0], unit, signal=signal))
    return names


def test_every_glucose_metric_is_explained_with_a_unit():
    for name in _all_glucose_names():
        info = describe_metric(name, "glucose", "mg/dL")
        assert info.unit and info.unit != "not stated", name
        assert "no description" not in info.explanation, name
        assert "_" not in info.label, name
        assert info.group.startswith("Glucose"), name
    assert describe_metric("mean_glucose_measured_mmol_per_L").unit == "mmol/L"
    assert "(CGM)" in describe_metric("tir_70_180_measured_pct").label
    assert "(blood glucose)" in describe_metric("tir_70_180_true_pct").label
    assert "> 70 %" in describe_metric("tir_70_180_measured_pct").explanation


def test_the_summary_of_a_glucose_trial_leads_with_time_in_range():
    names = _all_glucose_names() + ["insulin_total_U", "fallback_time_s",
                                    "time_in_window_measured_s"]
    head = headline_metrics(names)
    assert head[:2] == ["tir_70_180_measured_pct", "tir_70_180_true_pct"]
    assert {"tbr_70_measured_pct", "tbr_54_measured_pct", "gmi_measured_pct"} <= set(head)


def test_the_daily_profile_pools_days_on_the_clock():
    """Two days at 100 mg/dL, except 07:00-08:00 at 200 on both days, with t = 0 at 06:00:
    the profile's 07:00-08:00 bins are 200, the others 100."""
    t = np.arange(0.0, 2 * 86400.0, 300.0)
    clock = (t / 3600.0 + 6.0) % 24.0
    glucose = np.where((clock >= 7.0) & (clock < 8.0), 200.0, 100.0)
    hours, q = daily_profile(t, glucose, 6.0)
    inside = (hours > 7.0) & (hours < 8.0)
    assert np.all(q[2, inside] == 200.0) and np.all(q[2, ~inside] == 100.0)
    assert q.shape == (5, 96)


def test_the_glucose_figures_have_no_overlapping_labels():
    t = np.arange(0.0, 86400.0, 300.0)
    frames = {label: pd.DataFrame({"time_s": np.tile(t, 3), "patient": np.repeat([1, 2, 3],
                                   t.size), "true_glucose_mg_per_dL": 120 + 50 * np.sin(
                                   np.tile(t, 3) / 86400 * 2 * np.pi + k)})
              for k, label in enumerate(["nmpc", "pid"])}
    fig = _daily_profile_figure(frames, "true_glucose_mg_per_dL", "mg/dL", 6.0)
    assert text_overlaps(fig) == []
    points = {"nmpc": (np.array([95.0, 80.0, 50.0]), np.array([170.0, 250.0, 400.0])),
              "pid": (np.array([110.0, 60.0]), np.array([110.0, 320.0]))}
    fig = cvga_figure(points)
    assert text_overlaps(fig) == []
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["nmpc (A 1, B 1, C 0, D 0, E 1)", "pid (A 1, B 0, C 0, D 0, E 1)"]


_TOY_MODEL = """
[model]
title = "toy glucose: one compartment with a glucose infusion (test only)"
notes = "Made up for tests/test_glucose_metrics.py: not a physiological model."

[references]
test = "Invented for a test."

[[blocks]]
type = "mammillary"
drug = "glucose"
n_compartments = 1
amount_unit = "{amount}"
concentration_unit = "{concentration}"
clearance_unit = "L/h"

[fixed_effects]
CL = {{ value = 6.0, unit = "L/h", doc = "clearance", reference = "test" }}
V = {{ value = 10.0, unit = "L", doc = "volume", reference = "test" }}

[parameters]
glucose_cl1 = "CL"
glucose_v1 = "V"

[omega]
glucose_cl1 = {{ cv = 0.3 }}
"""

#: a basal 6 g/h that holds 100 mg/dL (6 L/h clearance) and three 1-h meals a day; as the
#: fixed regimen's dosing table (mg, or mmol for the mmol/L model)
_TOY_DOSES = [(0, 6000.0 * 24, 24), (1, 30000.0, 1), (6, 40000.0, 1), (12, 45000.0, 1)]

_TOY_SCENARIO = """
[scenario]
name = "toy_glucose_{tag}"
description = "a toy glucose model under a fixed regimen (test of the glucose set)"
duration_s = 172800
record_step_s = 300
start_clock_h = 6
cohort = "toy_glucose"

[patient]
model = "toy-{tag}.toml"
random_effects = true

[patient.population]
size = 3
covariates = {{}}

[[pump]]
pump = "glucose"
input = "glucose"
concentration = "{syringe}"
max_rate_ml_per_h = 1000000

[[sensor]]
output = "glucose_cp"
var = "cgm"
period_s = 300
additive_sd = {sd}

[controller]
kind = "fixed"
period_s = 300

[controller.fixed]
doses = "doses-{tag}.csv"

[metrics]
output = "glucose_cp"
clinical = "glucose"
"""


def _toy_trial(folder: Path, tag: str) -> Path:
    """The toy glucose trial in mg/dL (*tag* "mg") or mmol/L ("mmol"), 3 patients, 2 days."""
    from mpc_dose.trial.runner import run_trial

    mmol = tag == "mmol"
    per = 1 / 180.16 if mmol else 1.0   # glucose 180.16 mg/mmol
    (folder / f"toy-{tag}.toml").write_text(_TOY_MODEL.format(
        amount="mmol" if mmol else "mg", concentration="mmol/L" if mmol else "mg/dL"),
        encoding="utf-8")
    rows = [f"{h},{amount * per:.10g},{duration},1,24" for h, amount, duration in _TOY_DOSES]
    (folder / f"doses-{tag}.csv").write_text(
        f"time_h,amount_{'mmol' if mmol else 'mg'},duration_h,addl,ii_h\n" + "\n".join(rows)
        + "\n", encoding="utf-8")
    scenario = folder / f"toy_{tag}.toml"
    scenario.write_text(_TOY_SCENARIO.format(
        tag=tag, syringe="1 mmol/mL" if mmol else "100 mg/mL",
        sd=f'"{5 / MG_PER_DL_PER_MMOL_PER_L:.10g} mmol/L"' if mmol else '"5 mg/dL"'),
        encoding="utf-8")
    out = folder / f"out_{tag}"
    run_trial(scenario, out, patients=range(3), seed=1)
    return out


@pytest.fixture(scope="module")
def toy_trials(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glucose")
    return {tag: _toy_trial(folder, tag) for tag in ("mg", "mmol")}


def test_the_runner_scores_a_glucose_trial_on_both_signals(toy_trials):
    m = pd.read_csv(toy_trials["mg"] / "metrics.csv")
    for signal in ("true", "measured"):
        shares = m[[f"tbr_70_{signal}_pct", f"tir_70_180_{signal}_pct",
                    f"tar_180_{signal}_pct"]].sum(axis=1)
        np.testing.assert_allclose(shares, 100.0, atol=1e-9)
        zones = m[[f"cvga_zone_{z}_{signal}_pct" for z in "abcde"]].sum(axis=1)
        np.testing.assert_allclose(zones, 100.0)
    assert (m.tar_180_true_pct > 0).all(), "the meals push glucose above 180"
    # the model starts empty: the first records are below 54 on the true glucose
    assert (m.tbr_54_true_pct > 0).all()
    # the CGM reads the same patient (5 mg/dL noise): its time in range is near the truth
    np.testing.assert_allclose(m.tir_70_180_measured_pct, m.tir_70_180_true_pct, atol=5.0)


def test_a_trial_in_mmol_per_L_scores_like_one_in_mg_per_dL(toy_trials):
    mg = pd.read_csv(toy_trials["mg"] / "metrics.csv")
    mmol = pd.read_csv(toy_trials["mmol"] / "metrics.csv")
    for name in mg.columns:
        if re.match(r"(tir|tbr|tar|gmi|lbgi|hbgi|cv_|cvga)", name):
            np.testing.assert_allclose(mmol[name], mg[name], rtol=1e-6, atol=1e-6,
                                       err_msg=name)
    np.testing.assert_allclose(mmol.mean_glucose_cp_true_mmol_per_L
                               * MG_PER_DL_PER_MMOL_PER_L,
                               mg.mean_glucose_cp_true_mg_per_dL, rtol=1e-6)


def test_the_report_of_a_glucose_trial_shows_the_daily_profile_and_the_cvga(toy_trials):
    page = write_report(toy_trials["mg"]).read_text(encoding="utf-8")
    text = re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', page)
    assert '<img alt="daily glucose profile"' in text
    assert '<img alt="control-variability grid"' in text
    assert "Patients per CVGA zone" in text
    summary = text.split("<h2>")[0]
    assert "Time in range 70-180 mg/dL (CGM)" in summary
    assert "consensus targets" in summary and "Battelino 2019" in summary
    assert "06:00" not in summary  # the clock is on the figure, not in the words
