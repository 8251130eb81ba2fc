"""Every trial metric on a synthetic series whose answer is worked out by hand (the TIVA set
of DESIGN, the IEC 60601-1-10 performance terms, the true-output terms, AUC24 attainment,
CTCAE neutropenia grades, drug totals), and which signal each reads in a trial: the true
output, the readings at their sample times, sparse or dense."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mpc_dose.trial.metrics import (auc_attainment, drug_totals, neutropenia_metrics,
                                    performance_metrics, readings_are_sparse, tiva_metrics,
                                    true_output_metrics)
from mpc_dose.trial.runner import PatientTask, override_pairs, run_patient

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the TIVA set

def _tiva_series():
    """1-s BIS from 0 to 1200 s and rates (see the test for the answers)."""
    t = np.arange(0.0, 1201.0)
    bis = np.full(t.size, 50.0)
    bis[0:100] = 80.0        # awake
    bis[100:120] = 55.0
    bis[120] = 62.0          # the last >= 60 before t = 250 ...
    bis[200:205] = 35.0      # 5 s below 40: the last induction samples outside [40, 60]
    bis[250] = 60.0          # ... exactly 60: not asleep (< 60), but inside [40, 60]
    bis[300] = 40.0          # exactly 40: inside [40, 60], not low BIS (< 40)
    bis[599] = 41.0          # the last induction second
    bis[600:900] = 58.0      # maintenance
    bis[900:910] = 65.0      # 10 s above 60
    bis[1100:1103] = 39.0    # 3 s below 40
    bis[1103] = 40.0
    bis[1151] = 60.0
    bis[1152:1200] = 42.0
    bis[1200] = 100.0        # after the benchmark's 20 minutes: in no phase
    propofol = np.where(t < 300, 2.0, np.where(t < 700, 1.0, 0.5))   # mg/s
    return t, bis, propofol, 2.0 * propofol                           # ug/s remifentanil


def test_tiva_set_on_a_series_worked_out_by_hand():
    """Induction 0-599 s: IAE = sum |e| - (|e_0| + |e_599|)/2 = 3216 - 19.5; asleep after the
    last BIS >= 60 (t = 250, exactly 60) -> 251 s; settled after the last sample outside
    [40, 60] (t = 204) -> 205 s; 5 s below 40 (40 itself is not); lowest 35; propofol
    300 x 2 + 300 x 1 = 900 mg over 50 kg. Maintenance 600-1199 s: IAE 2987 - 8; 10 s above
    and 3 s below [40, 60]; lowest 39, highest 65 (the 100 at 1200 s is outside);
    propofol 100 x 1 + 500 x 0.5 = 350 mg."""
    t, bis, prop, remi = _tiva_series()
    m = tiva_metrics(t, bis, prop, remi, 50.0)
    assert m == pytest.approx({
        "induction_iae_bis_s": 3196.5,
        "induction_sleep_time_min": 251 / 60,
        "induction_settling_time_min": 205 / 60,
        "induction_low_bis_time_s": 5.0,
        "induction_lowest_bis": 35.0,
        "induction_propofol_mg_per_kg": 18.0,
        "induction_remifentanil_ug_per_kg": 36.0,
        "maintenance_iae_bis_s": 2979.0,
        "maintenance_time_out_of_range_s": 13.0,
        "maintenance_lowest_bis": 39.0,
        "maintenance_highest_bis": 65.0,
        "maintenance_propofol_mg_per_kg": 7.0,
        "maintenance_remifentanil_ug_per_kg": 14.0}, abs=1e-12)


def test_tiva_sleep_and_settling_when_never_awake_or_never_settled():
    """Asleep from the start: sleep time 0; still outside [40, 60] at 599 s: no settling
    time (NaN); no maintenance samples: no maintenance terms."""
    t = np.arange(0.0, 600.0)
    bis = np.full(t.size, 45.0)
    bis[-1] = 30.0
    zero = np.zeros(t.size)
    m = tiva_metrics(t, bis, zero, zero, 70.0)
    assert m["induction_sleep_time_min"] == 0.0
    assert math.isnan(m["induction_settling_time_min"])
    assert not any(k.startswith("maintenance_") for k in m)


# ------------------------------------------------------- performance terms (readings)

#: readings of BIS every second towards 50 in [40, 60]; 40 and 60 are inside the window
T10 = np.arange(0.0, 10.0)
Y10 = np.array([90.0, 57.0, 54.0, 45.0, 38.0, 52.0, 40.0, 60.0, 61.0, 50.0])


def test_performance_terms_of_dense_readings_worked_out_by_hand():
    """Step -40: 90 % covered at the first reading <= 54 (t = 2: 54 itself; 57 is only
    82 %); last reading outside (61 at t = 8) -> settled 9 s after the first; overshoot
    12 / 40; steady state over t >= 7.2: (11 + 0) / 2; RMS sqrt(2159 / 10); each reading
    stands for 1 s, the last too: 7 s in (40 and 60 count), 1 below, 2 above; IAE
    101 - (40 + 0)/2."""
    m = performance_metrics(T10, Y10, 50.0, (40.0, 60.0), output="bis")
    assert m == pytest.approx({
        "valid_readings": 10.0,
        "response_time_measured_s": 2.0,
        "settling_time_measured_s": 9.0,
        "overshoot_measured_pct": 30.0,
        "steady_state_deviation_bis_measured": 5.5,
        "tracking_error_rms_bis_measured": math.sqrt(215.9),
        "time_in_window_measured_s": 7.0,
        "time_below_window_measured_s": 1.0,
        "time_above_window_measured_s": 2.0,
        "iae_bis_measured_s": 81.0,
        "min_bis_measured": 38.0,
        "max_bis_measured": 90.0}, abs=1e-12)


def test_performance_terms_of_a_rising_output_worked_out_by_hand():
    """MAP read every 5 s from 55 towards 70 mmHg in [65, 75]: step +15, 90 % covered at
    the first reading >= 68.5 (74 at 15 s; 68 is only 87 %); overshoot 6 / 15; the last
    reading outside is 76 at 20 s -> settled at 25 s; steady state over t >= 24 s: (1 + 0)
    / 2; RMS sqrt(382 / 7); 20 s in, 10 below, 5 above; IAE (38 - 15 / 2) x 5 mmHg.s.
    The same readings 100 s later give the same terms."""
    t = np.arange(7) * 5.0
    y = np.array([55.0, 60.0, 68.0, 74.0, 76.0, 71.0, 70.0])
    m = performance_metrics(t, y, 70.0, (65.0, 75.0), output="map", unit="mmHg")
    assert m == pytest.approx({
        "valid_readings": 7.0,
        "response_time_measured_s": 15.0,
        "settling_time_measured_s": 25.0,
        "overshoot_measured_pct": 40.0,
        "steady_state_deviation_map_measured_mmHg": 0.5,
        "tracking_error_rms_map_measured_mmHg": math.sqrt(382.0 / 7.0),
        "time_in_window_measured_s": 20.0,
        "time_below_window_measured_s": 10.0,
        "time_above_window_measured_s": 5.0,
        "iae_map_measured_mmHg_s": 152.5,
        "min_map_measured_mmHg": 55.0,
        "max_map_measured_mmHg": 76.0}, abs=1e-12)
    # response and settling times count from the first reading, not from t = 0
    later = performance_metrics(t + 100.0, y, 70.0, (65.0, 75.0), output="map", unit="mmHg")
    assert later == pytest.approx(m, abs=1e-12)


def test_readings_that_never_reach_the_target():
    """Falling from 90 towards 50 but stopping at 62: no overshoot (0, not the -12 of the
    closest reading), no response time and no settling time (NaN: the last reading is
    still outside [40, 60])."""
    m = performance_metrics(np.arange(5.0), [90.0, 80.0, 70.0, 65.0, 62.0], 50.0,
                            (40.0, 60.0), output="bis")
    assert m["overshoot_measured_pct"] == 0.0
    assert math.isnan(m["response_time_measured_s"])
    assert math.isnan(m["settling_time_measured_s"])


def test_sparse_readings_are_counted_not_weighted_by_time():
    """Sparse readings: shares of readings in / below / above the window, no time-weighted
    term and no IAE (a level held for hours is not hours in the window)."""
    t = T10 * 43200.0
    m = performance_metrics(t, Y10, 50.0, (40.0, 60.0), output="bis", sparse=True)
    assert m["readings_in_window_measured_pct"] == pytest.approx(70.0)
    assert m["readings_below_window_measured_pct"] == pytest.approx(10.0)
    assert m["readings_above_window_measured_pct"] == pytest.approx(20.0)
    assert not [k for k in m if k.startswith(("time_", "iae_"))]
    assert m["response_time_measured_s"] == 2 * 43200.0
    assert m["settling_time_measured_s"] == 9 * 43200.0


def test_readings_wait_their_turn_and_missing_ones_are_left_out():
    """Uneven readings: each counts until the next (the last for the gap before it); a NaN
    (no valid reading) is dropped, its time going to the reading before it."""
    t = np.array([0.0, 10.0, 15.0, 45.0, 50.0])
    y = np.array([30.0, 55.0, np.nan, 70.0, 50.0])
    m = performance_metrics(t, y, None, (40.0, 60.0), output="map", unit="mmHg")
    assert m["time_below_window_measured_s"] == 10.0
    assert m["time_in_window_measured_s"] == 35.0 + 5.0      # 10 -> 45 s, then the last
    assert m["time_above_window_measured_s"] == 5.0
    assert m["valid_readings"] == 4.0
    assert m["min_map_measured_mmHg"] == 30.0 and m["max_map_measured_mmHg"] == 70.0
    assert "response_time_measured_s" not in m               # no target, no response


def test_default_window_is_five_percent_of_the_target():
    """Without a window, +-5 % of the target: 100 +- 5."""
    m = performance_metrics([0.0, 1.0, 2.0], [94.0, 95.0, 105.5], 100.0, output="y")
    assert (m["time_below_window_measured_s"], m["time_in_window_measured_s"],
            m["time_above_window_measured_s"]) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("intervals, step, sparse", [
    ([1.0], 1.0, False),            # BIS every second, recorded every second
    ([1.0], 5.0, False),
    ([5.0], 1.0, True),             # a sensor period longer than the record step
    ([2.0, 2.0], 1.0, False),       # two sensors together as fast as the record
    ([43200.0], 600.0, True),       # a level every 12 h
    ([43200.0, 43200.0], 600.0, True),
])
def test_sparse_means_fewer_readings_than_records(intervals, step, sparse):
    assert readings_are_sparse(intervals, step) is sparse


# --------------------------------------------------------------------- true output terms

def test_true_output_terms_worked_out_by_hand():
    """Records every 600 s of 0, 15, 30, 25, 20 mg/L in [15, 25] around 20: AUC (7.5 + 22.5
    + 27.5 + 22.5) x 600 s = 13.33 mg.h/L; 15, 25 and the last record, 20, inside (1800 s),
    0 below and 30 above (600 s each); IAE (12.5 + 7.5 + 7.5 + 2.5) x 600 mg/L.s."""
    t = np.arange(5) * 600.0
    y = np.array([0.0, 15.0, 30.0, 25.0, 20.0])
    m = true_output_metrics(t, y, output="vancomycin_cp", unit="mg/L", target=20.0,
                            window=(15.0, 25.0))
    assert m == pytest.approx({
        "auc_vancomycin_cp_true_mg_per_L_h": 80.0 / 6.0,
        "min_vancomycin_cp_true_mg_per_L": 0.0,
        "max_vancomycin_cp_true_mg_per_L": 30.0,
        "time_in_window_true_s": 1800.0,
        "time_below_window_true_s": 600.0,
        "time_above_window_true_s": 600.0,
        "iae_vancomycin_cp_true_mg_per_L_s": 18000.0}, abs=1e-9)
    only_target = true_output_metrics(t, y, output="c", unit="mg/L", target=20.0)
    assert only_target["time_in_window_true_s"] == 600.0     # 19-21: only the 20
    bare = true_output_metrics(t, y, output="bis")
    assert set(bare) == {"auc_bis_true_h", "min_bis_true", "max_bis_true"}


# ---------------------------------------------------------------- AUC24 and neutropenia

def test_auc24_attainment_over_whole_days_worked_out_by_hand():
    """Hourly 20 mg/L to 24 h, 25 to 48 h, 30 to 72 h, then 1000 for half a day (not a whole
    day: ignored). Day 1: 480; day 2: (20 + 25)/2 + 23 x 25 = 597.5; day 3: (25 + 30)/2 +
    23 x 30 = 717.5. Two days of three in 400-600, one above; daily minima 20, 20, 25."""
    h = np.arange(0.0, 85.0)
    c = np.where(h <= 24, 20.0, np.where(h <= 48, 25.0, np.where(h <= 72, 30.0, 1000.0)))
    m = auc_attainment(h * 3600.0, c)
    assert m == pytest.approx({"auc24_first_mg_h_per_L": 480.0,
                               "auc24_last_mg_h_per_L": 717.5,
                               "auc24_in_target_pct": 200.0 / 3.0,
                               "auc24_above_target_days": 1.0,
                               "auc24_above_600_days": 1.0,
                               "auc24_above_800_days": 0.0,
                               "days_minimum_above_20_mg_per_L": 1.0,
                               "auc24_in_target_first_day": 1.0,
                               "auc24_days": 3.0,
                               "auc24_in_target_day1_pct": 100.0,
                               "auc24_in_target_day2_pct": 100.0,
                               "auc24_in_target_days3to7_pct": 0.0,
                               "highest_daily_minimum_mg_per_L": 25.0}, abs=1e-9)


@pytest.mark.parametrize("level, inside", [(20.0, True), (25.0, True), (19.5, False),
                                           (25.5, False)])
def test_auc24_window_includes_its_ends(level, inside):
    """A day at exactly 480 or 600 mg.h/L is inside [480, 600]."""
    t = np.arange(0.0, 25.0) * 3600.0
    m = auc_attainment(t, np.full(t.size, level), low=480.0, high=600.0)
    assert m["auc24_in_target_pct"] == (100.0 if inside else 0.0)


def test_neutropenia_grade_edges_worked_out_by_hand():
    """Daily ANC 5, 5, 1.0, 0.9, 0.5, 0.4, 0.45, 1.2, 3, 0.3 (x 10^9/L): grade 4 (< 0.5) on
    0.4, 0.45 and the last day (it counts for a day); grade >= 3 (< 1.0) also on 0.9 and 0.5
    (CTCAE v5: 1.0 is grade 2, 0.5 grade 3); nadir 0.3 on day 9."""
    anc = np.array([5.0, 5.0, 1.0, 0.9, 0.5, 0.4, 0.45, 1.2, 3.0, 0.3])
    m = neutropenia_metrics(np.arange(anc.size) * 86400.0, anc)
    assert m == pytest.approx({"anc_nadir_1e9_per_L": 0.3, "anc_nadir_day": 9.0,
                               "grade4_neutropenia_days": 3.0,
                               "grade3plus_neutropenia_days": 5.0})


# ------------------------------------------------------------------------ drug totals

def test_drug_totals_from_the_rate_changes():
    """2 mg/s for 10 s, nothing for 10 s, 1 mg/s to the end at 30 s (a change recorded after
    the end counts nothing): 30 mg, 0.5 mg/kg at 60 kg; an input never given: 0."""
    deliveries = pd.DataFrame([(0.0, "propofol", 2.0, "mg/s"), (10.0, "propofol", 0.0, "mg/s"),
                               (20.0, "propofol", 1.0, "mg/s"), (30.4, "propofol", 5.0, "mg/s")],
                              columns=["time_s", "input", "rate", "rate_unit"])
    units = {"propofol": "mg", "remifentanil": "ug"}
    assert drug_totals(deliveries, 30.0, units, 60.0) == pytest.approx({
        "propofol_total_mg": 30.0, "propofol_per_kg_mg_per_kg": 0.5,
        "remifentanil_total_ug": 0.0, "remifentanil_per_kg_ug_per_kg": 0.0})
    assert set(drug_totals(deliveries, 30.0, units, None)) == {"propofol_total_mg",
                                                                "remifentanil_total_ug"}


# ------------------------------------------------------------------ which signal, in a trial

def _run(scenario: str, overrides=None, patient: int = 0):
    with tempfile.TemporaryDirectory() as out:
        metrics = run_patient(PatientTask(str(REPO / "scenarios" / scenario), patient, 0, out,
                                          None, override_pairs(overrides)))
        name = f"patient_{patient + 1:04d}.parquet"
        return (metrics, pd.read_parquet(Path(out) / "series" / name),
                pd.read_parquet(Path(out) / "samples" / name))


def test_sparse_levels_are_judged_on_samples_and_the_patient_on_the_true_output():
    """Issue 16.2: vancomycin levels every 12 h, recorded every 10 min. The window terms of
    the readings are shares of the valid levels at their sample times (not a level held for
    a day; an assay error is no level); the patient's time in the window is the true
    concentration's, every record."""
    m, frame, samples = _run("vancomycin_renal_decline.toml",
                             {"metrics.target": 15, "metrics.window": [10, 20],
                              "sensor.0.error_probability": 0.3})
    levels = samples[samples.quality == "valid"]
    assert (samples.quality == "invalid").any()
    assert 0 < m["valid_readings"] == len(levels) < len(frame) / 10
    inside = ((levels.value >= 10) & (levels.value <= 20)).mean() * 100
    assert m["readings_in_window_measured_pct"] == pytest.approx(inside)
    assert m["min_vancomycin_cp_measured_mg_per_L"] == levels.value.min()
    assert "time_in_window_measured_s" not in m
    true = frame.true_vancomycin_cp_mg_per_L
    assert m["time_in_window_true_s"] == 600.0 * ((true >= 10) & (true <= 20)).sum()
    assert m["time_below_window_true_s"] == 600.0 * (true < 10).sum()
    assert (m["time_in_window_true_s"] + m["time_below_window_true_s"]
            + m["time_above_window_true_s"]) == 600.0 * len(frame)
    assert m["min_vancomycin_cp_true_mg_per_L"] == true.min() == 0.0   # before the 1st dose


def test_dense_readings_give_the_figures_of_the_recorded_series():
    """BIS every second, recorded every second: the measured terms from the samples equal
    those of the recorded last reading (what the TIVA set reads, as DESIGN defines it)."""
    m, frame, _ = _run("pid_tiva_noise.toml", patient=2)
    held = performance_metrics(frame.time_s, frame.measured_bis_unitless, 50.0, (40.0, 60.0),
                               output="bis")
    assert {k: m[k] for k in held} == pytest.approx(held, nan_ok=True)
    assert "induction_iae_bis_s" in m and "time_in_window_true_s" in m
