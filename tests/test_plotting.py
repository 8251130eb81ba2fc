"""Plots people read: units from the column names, one unit per axis, words in the legends,
the target and window, commanded over delivered, sparse levels at their sample times, the
supervisor's modes and alarms, and no label drawn over another."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mpc_dose.plotting import (closed_loop_figure, closed_loop_options, parse_column,
                               plot_closed_loop, rate_display_unit, time_axis, unit_label,
                               unit_suffix)
from mpc_dose.scenario import load_scenario
from tests.figures import text_overlaps

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


@pytest.mark.parametrize("column, kind, name, unit", [
    ("true_vancomycin_cp_mg_per_L", "true", "vancomycin_cp", "mg/L"),
    ("measured_bis_unitless", "measured", "bis", "1"),
    ("delivered_propofol_rate_mg_per_s", "delivered", "propofol_rate", "mg/s"),
    ("commanded_remifentanil_rate_ug_per_s", "commanded", "remifentanil_rate", "ug/s"),
    ("measured_fu_level_0400_mg_per_L", "measured", "fu_level_0400", "mg/L"),
    ("true_anc_1e9_per_L", "true", "anc", "1e9/L"),
    ("true_propofol_ce_ug_per_mL", "true", "propofol_ce", "ug/mL"),
])
def test_columns_are_read_into_kind_quantity_and_unit(column, kind, name, unit):
    """The unit is the longest suffix that reads as one unit (0400 is part of the name)."""
    parsed = parse_column(column)
    assert (parsed.kind, parsed.name, parsed.unit) == (kind, name, unit)


@pytest.mark.parametrize("name, stem, unit", [
    ("propofol_per_kg_mg_per_kg", "propofol_per_kg", "mg/kg"),
    ("auc24_first_mg_h_per_L", "auc24_first", "mg*h/L"),
    ("time_in_window_s", "time_in_window", "s"),
    ("induction_sleep_time_min", "induction_sleep_time", "min"),
    ("auc24_in_target_pct", "auc24_in_target", "%"),
    ("highest_daily_minimum_mg_per_L", "highest_daily_minimum", "mg/L"),
    ("iae", "iae", None),
    ("tracking_error_rms", "tracking_error_rms", None),
])
def test_metric_names_split_into_quantity_and_unit(name, stem, unit):
    assert unit_suffix(name) == (stem, unit)


def test_units_print_as_people_write_them():
    assert unit_label("ug/mL") == "µg/mL"
    assert unit_label("mg*h/L") == "mg·h/L"
    assert unit_label("1e9/L") == "10⁹/L"
    assert unit_label("1") == "dimensionless"
    assert parse_column("true_propofol_ce_ug_per_mL").label == "propofol Ce, true"


def test_time_and_rates_in_units_that_suit_the_run():
    """Minutes under 2 h, hours under 3 days, days beyond; rates per minute for short runs,
    per hour for long ones."""
    assert time_axis(np.array([0.0, 1200.0]))[1] == "time [min]"
    assert time_axis(np.array([0.0, 86400.0]))[1] == "time [h]"
    assert time_axis(np.array([0.0, 4 * 86400.0]))[1] == "time [d]"
    assert rate_display_unit("mg/s", 1200.0) == "mg/min"
    assert rate_display_unit("mg/s", 4 * 86400.0) == "mg/h"
    assert rate_display_unit("mg/kg/s", 4 * 86400.0) == "mg/kg/h"


def _tiva_frame() -> pd.DataFrame:
    """20 min of a two-drug run: BIS (dimensionless), propofol in ug/mL and mg/s,
    remifentanil in ng/mL and ug/s; FALLBACK from 300 to 420 s, an alarm at 300 s."""
    t = np.arange(0.0, 1201.0, 5.0)
    bis = 50 + 48 * np.exp(-t / 90.0)
    frame = pd.DataFrame({
        "time_s": t,
        "true_propofol_cp_ug_per_mL": 4 * (1 - np.exp(-t / 60)),
        "true_propofol_ce_ug_per_mL": 3.5 * (1 - np.exp(-t / 120)),
        "true_remifentanil_cp_ng_per_mL": 6 * (1 - np.exp(-t / 60)),
        "true_bis_unitless": bis,
        "measured_bis_unitless": bis + np.sin(t / 7.0),
        "commanded_propofol_rate_mg_per_s": np.where(t < 120, 1.0, 0.2),
        "delivered_propofol_rate_mg_per_s": np.where(t < 120, 0.8, 0.2),
        "commanded_remifentanil_rate_ug_per_s": np.where(t < 120, 2.0, 0.4),
        "delivered_remifentanil_rate_ug_per_s": np.where(t < 120, 2.0, 0.4),
        "controller_mode": np.where(t < 10, "INIT", np.where((t >= 300) & (t < 420),
                                                             "FALLBACK", "CLOSED_LOOP")),
        "alarms": np.where(t == 300, "sensor.stale", ""),
    })
    return frame


def test_a_closed_loop_figure_has_one_unit_per_axis_and_words_in_its_legends():
    fig = closed_loop_figure(_tiva_frame(), title="TIVA", output="bis", target=50,
                             window=(40, 60), soft_window=(51.75, None))
    ylabels = [ax.get_ylabel() for ax in fig.axes]
    assert any("[µg/mL]" in y for y in ylabels) and any("[ng/mL]" in y for y in ylabels)
    assert any("[mg/min]" in y for y in ylabels) and any("[µg/min]" in y for y in ylabels)
    assert not any("µg/mL" in y and "ng/mL" in y for y in ylabels)
    assert fig.axes[-1].get_xlabel().startswith("time since start [min]")
    labels = [" ".join(t.get_text().split()) for ax in fig.axes if ax.get_legend()
              for t in ax.get_legend().get_texts()]  # long labels are wrapped
    assert "BIS, true" in labels and "BIS, measured" in labels
    assert "target 50" in labels and "target window 40-60" in labels
    assert any("soft lower bound 51.75" in label for label in labels)
    assert any(label.startswith("FALLBACK") for label in labels)
    assert any(label.startswith("alarm (sensor.stale)") for label in labels)
    assert not any("_" in label for label in labels), "no raw column names"
    assert text_overlaps(fig) == []


def test_commanded_is_drawn_over_the_filled_delivered_rate():
    """The delivered rate is a filled area, the commanded one a step line on top of it; a
    pump that delivers less than commanded shows as the line above the fill."""
    fig = closed_loop_figure(_tiva_frame())
    ax = next(a for a in fig.axes if "[mg/min]" in a.get_ylabel())
    commanded = next(line for line in ax.get_lines()
                     if line.get_label() == "propofol, commanded")
    fill = next(c for c in ax.collections if c.get_label() == "propofol, delivered")
    assert commanded.get_drawstyle() == "steps-post"
    assert commanded.get_zorder() >= fill.get_zorder()
    assert ax.get_children().index(commanded) > ax.get_children().index(fill)
    assert np.nanmax(commanded.get_ydata()) == pytest.approx(60.0)     # 1 mg/s in mg/min
    top = max(p.vertices[:, 1].max() for p in fill.get_paths())
    assert top == pytest.approx(48.0)                                  # 0.8 mg/s


def test_sparse_levels_are_markers_at_their_sample_times():
    """A level drawn every 12 h (back 2 h later) appears as a marker at its sample time
    on the concentration panel, not as the value held until the next result; the daily
    AUC gets its own panel with the window; the time axis is in days."""
    t = np.arange(0.0, 4 * 86400 + 1, 600.0)
    conc = 15 + 10 * np.cos(2 * np.pi * t / 43200)
    samples = pd.DataFrame({"t_meas_s": [36000.0, 79200.0, 122400.0],
                            "t_arrival_s": [43200.0, 86400.0, 129600.0],
                            "var": "vancomycin_level", "value": [20.0, 12.0, 1.0],
                            "unit": "mg/L", "quality": ["valid", "valid", "underflow"],
                            "sensor": "lab"})
    held = pd.Series(np.nan, index=t)
    for t_arrival, value in zip(samples.t_arrival_s, samples.value):
        held[held.index >= t_arrival] = value
    frame = pd.DataFrame({"time_s": t, "true_vancomycin_cp_mg_per_L": conc,
                          "measured_vancomycin_level_mg_per_L": held.to_numpy(),
                          "commanded_vancomycin_rate_mg_per_s": np.where(t % 43200 < 3600,
                                                                         0.2778, 0.0),
                          "delivered_vancomycin_rate_mg_per_s": np.where(t % 43200 < 3600,
                                                                         0.2778, 0.0),
                          "controller_mode": "CLOSED_LOOP", "alarms": ""})
    fig = closed_loop_figure(frame, samples=samples, auc_window=(400, 600),
                             output="vancomycin_cp", start_clock_h=8.0,
                             marks=[(172800.0, "CrCL 90 -> 30 mL/min")])
    ax = fig.axes[0]
    markers = [line for line in ax.get_lines() if line.get_marker() == "o"]
    valid = next(line for line in markers if "at sample time" in line.get_label())
    np.testing.assert_allclose(valid.get_xdata(), [36000 / 86400, 79200 / 86400])
    assert any("underflow" in line.get_label() for line in markers)
    held_lines = [line for line in ax.get_lines() if len(line.get_xdata()) == len(t)
                  and np.allclose(np.nan_to_num(line.get_ydata()), np.nan_to_num(held))]
    assert held_lines == [], "the held value is not drawn"
    assert "AUC24" in fig.axes[1].get_ylabel() and "mg·h/L" in fig.axes[1].get_ylabel()
    assert fig.axes[-1].get_xlabel() == "time since start [d] (t = 0 at 08:00)"
    rates = fig.axes[-1]
    assert "[mg/h]" in rates.get_ylabel()
    assert sum(t.get_text() == "1,000 mg" for t in rates.texts) == 8   # each dose labelled
    assert any(t.get_text() == "CrCL 90 -> 30 mL/min" for t in ax.texts)
    assert text_overlaps(fig) == []


def test_plot_closed_loop_writes_a_png(tmp_path):
    path = plot_closed_loop(_tiva_frame(), tmp_path / "run.png", title="x")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(TypeError, match="unexpected keyword"):
        plot_closed_loop(_tiva_frame(), tmp_path / "bad.png", traget=50)


def test_a_scenario_gives_the_run_plot_its_target_window_and_events():
    """What `mpc-dose run` passes the plot: the scored output's target and window, a PID's
    set point when the scenario scores nothing, the NMPC's soft bound and AUC target, which
    output each sensor measures, the covariate change with its unit, the clock at t = 0."""
    tiva = closed_loop_options(load_scenario(SCENARIOS / "tiva_benchmark.toml"))
    assert (tiva["output"], tiva["target"], tiva["window"]) == ("bis", 50.0, (40.0, 60.0))
    assert tiva["soft_window"] == (51.75, None)
    assert tiva["marks"] == [(600.0, "BIS disturbance +10"), (900.0, "BIS disturbance ends")]
    pid = closed_loop_options(load_scenario(SCENARIOS / "pid_induction_13.toml"))
    assert (pid["output"], pid["target"]) == ("bis", 50.0)
    vanco = closed_loop_options(load_scenario(SCENARIOS / "vancomycin_nmpc.toml"))
    assert vanco["measured_outputs"] == {"vancomycin_level": "vancomycin_cp"}
    assert (vanco["auc_target"], vanco["auc_window"]) == (500.0, (400.0, 600.0))
    assert vanco["marks"] == [(172800.0, "CrCL changes to 30 mL/min")]
    assert vanco["start_clock_h"] == 8.0
