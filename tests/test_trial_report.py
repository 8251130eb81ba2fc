"""Comparison on common random numbers, the HTML report (a summary a clinician can read,
every metric with its unit and meaning, figures whose labels do not overlap), and the
NONMEM export."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mpc_dose.cli import main
from mpc_dose.trial import metrics as trial_metrics
from mpc_dose.trial.report import (_distributions_figure, _ensemble_figure,
                                   _small_multiples_figure, _Target, describe_metric,
                                   format_value, load_series, nonmem_dataset, write_report)
from tests.figures import text_overlaps

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "scenarios" / "hil_pid_newera.toml"


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """The scenario's PID against a slower one (half the gain), same cohort."""
    folder = tmp_path_factory.mktemp("compare")
    text = SCENARIO.read_text(encoding="utf-8").replace(
        'path = "data/', f'path = "{REPO / "scenarios" / "data"}/')
    slow = folder / "slow.toml"
    slow.write_text(text.replace('name = "hil_pid_newera"',
                                 'name = "slow_pid"\ncohort = "hil_pid_newera"')
                    .replace("[controller.pid]\n", "[controller.pid]\nkp = 0.0066\n"),
                    encoding="utf-8")
    out = folder / "out"
    assert main(["compare", str(SCENARIO), str(slow), "--patients", "3", "--workers", "1",
                 "--quiet", "--out", str(out)]) == 0
    return out


def test_compared_controllers_see_the_same_patients_and_noise(comparison):
    a = pd.read_parquet(comparison / "hil_pid_newera" / "series" / "patient_0002.parquet")
    b = pd.read_parquet(comparison / "slow_pid" / "series" / "patient_0002.parquet")
    noise_a = (a.measured_bis_unitless - a.true_bis_unitless).to_numpy()
    noise_b = (b.measured_bis_unitless - b.true_bis_unitless).to_numpy()
    unclipped = (a.measured_bis_unitless < 100) & (b.measured_bis_unitless < 100)
    np.testing.assert_allclose(noise_a[unclipped], noise_b[unclipped], atol=1e-12)
    assert not np.allclose(a.delivered_propofol_rate_mg_per_s,
                           b.delivered_propofol_rate_mg_per_s)
    table = pd.read_csv(comparison / "comparison.csv", index_col=0)
    assert {"hil_pid_newera mean", "slow_pid mean", "slow_pid sd"} <= set(table.columns)
    assert table.loc["response_time_measured_s", "slow_pid mean"] > \
        table.loc["response_time_measured_s", "hil_pid_newera mean"]


def test_compare_refuses_scenarios_with_different_patients(tmp_path, capsys):
    other = tmp_path / "other.toml"
    other.write_text(SCENARIO.read_text(encoding="utf-8").replace(
        'name = "hil_pid_newera"', 'name = "other"').replace(
        'path = "data/', f'path = "{REPO / "scenarios" / "data"}/'), encoding="utf-8")
    assert main(["compare", str(SCENARIO), str(other), "--out", str(tmp_path / "o")]) == 2
    assert "draw different patients" in capsys.readouterr().err


def test_the_report_is_one_offline_html_page(comparison, capsys):
    assert main(["report", str(comparison)]) == 0
    page = (comparison / "report.html").read_text(encoding="utf-8")
    images = re.findall(r'<img[^>]* src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 6 and all(len(i) > 1000 for i in images)
    assert "Controller comparison" in page and "slow_pid" in page
    assert not re.search(r"(src|href)=\"https?:", page), "nothing fetched from the network"


def _text(page: str) -> str:
    """The page without its embedded images."""
    return re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', page)


def test_the_report_opens_with_a_summary_a_clinician_can_read(comparison):
    """The summary names the scenarios and their description, the cohort and its size, the
    controllers, the target and window, and the headline metrics with their units."""
    page = _text(write_report(comparison, comparison / "summary.html").read_text("utf-8"))
    summary = page[page.index('<div class="summary">'):page.index("<h2>")]
    assert "hil_pid_newera" in summary and "slow_pid" in summary
    assert "DESIGN PID, PAS patients, 10 min TIVA" in summary       # its description
    assert "3 patients (numbers 1-3)" in summary and "same patients" in summary
    assert "PID on BIS (set point 50)" in summary
    assert "BIS: target 50, acceptable window 40-60" in summary
    assert "Headline results" in summary
    # a 10-min run's durations in minutes ("9.5 min in window", not "570 s")
    assert '<td class="name" title="time_in_window_measured_s">Time in window (readings)</td>' \
           '<td>min</td>' \
        in summary
    # the drug given as the amount so far: a bolus on a rate axis hides the rest of the run
    assert 'alt="propofol given so far [mg]"' in page
    assert not re.search(r"\bnan\b", page, re.IGNORECASE), "no nan anywhere"
    rows = re.findall(r'<td class="name"[^>]*>([^<]*)</td><td>([^<]*)</td>', page)
    assert len(rows) > 20
    assert all(unit and unit != "not stated" for _, unit in rows), rows
    assert page.count("<table") == page.count('<div class="scroll"><table'), \
        "every table scrolls inside its box"


def test_every_metric_of_the_trials_is_explained_with_a_unit():
    """Every metric trial/metrics.py and the runner write has a label, a unit (or
    "dimensionless", or "count") and an explanation of its own."""
    t = np.arange(0.0, 1200.0)
    bis = 50 + 40 * np.exp(-t / 60)
    days = np.arange(0.0, 3 * 86400 + 1, 600.0)
    names = list(trial_metrics.tiva_metrics(t, bis, np.ones_like(t), np.ones_like(t), 70.0))
    names += list(trial_metrics.performance_metrics(t, bis, 50.0, (40.0, 60.0), output="bis"))
    names += list(trial_metrics.performance_metrics(t, bis, 50.0, (40.0, 60.0),
                                                    output="vancomycin_cp", unit="mg/L",
                                                    sparse=True))
    names += list(trial_metrics.true_output_metrics(t, bis, output="bis", target=50.0,
                                                    window=(40.0, 60.0)))
    names += list(trial_metrics.auc_attainment(days, 20 + np.sin(days / 3600)))
    names += list(trial_metrics.neutropenia_metrics(days, 2 + np.sin(days / 86400)))
    deliveries = pd.DataFrame({"time_s": [0.0], "input": ["propofol"], "rate": [1.0]})
    names += list(trial_metrics.drug_totals(deliveries, 10.0, {"propofol": "mg"}, 70.0))
    names += ["auc_vancomycin_cp_true_mg_per_L_h", "max_vancomycin_cp_true_mg_per_L",
              "commands_refused", "alarms", "fallback_time_s",
              "solver_failure_time_s", "deadline_misses",
              "estimate_error_vancomycin_cl1_after_2_readings"]
    for name in names:
        info = describe_metric(name, "bis", "1")
        assert info.unit and info.unit != "not stated", name
        assert "no description" not in info.explanation, name
        assert "_" not in info.label or "estimate" in info.label, name
    assert describe_metric("auc_vancomycin_cp_mg_per_L_h").unit == "mg·h/L"
    assert describe_metric("iae", "bis", "1").unit == "BIS·s"
    assert describe_metric("remifentanil_per_kg_ug_per_kg").unit == "µg/kg"
    assert describe_metric("anc_nadir_1e9_per_L").unit == "10⁹/L"
    assert format_value(float("nan")) == "n/a" and format_value(12345.6) == "12,346"


def test_durations_are_shown_in_the_unit_of_the_run_length():
    from mpc_dose.trial.report import in_readable_time_unit

    info = describe_metric("time_in_window_s", "bis", "1")
    minutes = in_readable_time_unit(info, 1200.0)
    assert minutes.unit == "min"
    assert minutes.values(pd.DataFrame({"time_in_window_s": [1143.0]}))[0] == \
        pytest.approx(19.05)
    assert in_readable_time_unit(info, 4 * 86400.0).unit == "h"
    assert in_readable_time_unit(info, 300.0) == info          # a 5-min run: seconds
    iae = describe_metric("iae", "bis", "1")
    assert in_readable_time_unit(iae, 1200.0) == iae           # not a duration


def test_the_report_figures_have_no_overlapping_labels(comparison):
    """Box-plot titles, tick labels and the patients' panel labels are laid out apart."""
    folders = {p.name: p for p in sorted(comparison.iterdir()) if p.is_dir()}
    metrics = {label: pd.read_csv(f / "metrics.csv") for label, f in folders.items()}
    names = [c for c in metrics["slow_pid"].select_dtypes("number").columns
             if c != "patient"]
    infos = [describe_metric(n, "bis", "1") for n in names]
    assert text_overlaps(_distributions_figure(metrics, infos[:12])) == []
    series = {label: load_series(f) for label, f in folders.items()}
    target = _Target("bis", "1", 50.0, (40.0, 60.0))
    assert text_overlaps(_small_multiples_figure(series["slow_pid"], "measured_bis_unitless",
                                                 "measured", target)) == []
    assert text_overlaps(_ensemble_figure(series, "measured_bis_unitless", "BIS, measured",
                                          target)) == []


def test_sparse_levels_are_shown_through_the_true_value_and_their_samples():
    """Over time, the report shows a measured value only where it is read often; a level
    held for hours between samples (NaN before the first) gives way to the true value."""
    from mpc_dose.trial.report import _shown_series

    t = np.arange(0.0, 86400.0 * 2, 600.0)
    held = np.where(t < 40000, np.nan, np.where(t < 90000, 12.0, 15.0))
    frame = pd.DataFrame({"patient": 1, "time_s": t, "true_vancomycin_cp_mg_per_L": 10.0,
                          "measured_vancomycin_level_mg_per_L": held})
    target = _Target("vancomycin_cp", "mg/L")
    assert _shown_series(frame, target) == ("true_vancomycin_cp_mg_per_L", "true")
    frame["measured_vancomycin_level_mg_per_L"] = 10 + np.sin(t)
    assert _shown_series(frame, target) == ("measured_vancomycin_level_mg_per_L", "measured")


def test_nonmem_export_keeps_every_dose_and_observation(comparison, tmp_path):
    trial = comparison / "hil_pid_newera"
    data, sidecar = nonmem_dataset(trial)
    metrics = pd.read_csv(trial / "metrics.csv")
    doses = data[data.EVID == 1]
    for k in (1, 2, 3):
        total = doses[(doses.ID == k) & (doses.CMT == 1)].AMT.astype(float).sum()
        expected = metrics.loc[metrics.patient == k, "propofol_total_mg"].item()
        assert total == pytest.approx(expected, rel=1e-7)  # 8 significant digits per record
    obs = data[data.EVID == 0]
    samples = pd.read_parquet(trial / "samples" / "patient_0001.parquet")
    valid = samples[samples.quality == "valid"]
    assert (obs.ID == 1).sum() == len(valid)
    assert np.allclose(obs[obs.ID == 1].TIME.to_numpy() * 3600, valid.t_meas_s, atol=0.01)
    assert set(obs.CMT) == {3} and (obs.MDV == 0).all() and (doses.MDV == 1).all()
    assert list(data.columns[:8]) == ["ID", "TIME", "AMT", "RATE", "EVID", "MDV", "DV", "CMT"]
    assert {"AGE", "WEIGHT", "SEX"} <= set(data.columns)
    assert set(data.SEX) <= {1, 2} and "SEX: male = 1, female = 2" in sidecar
    assert (data.groupby("ID").TIME.apply(lambda t: t.is_monotonic_increasing)).all()
    out = tmp_path / "nm.csv"
    assert main(["export", str(trial), "--nonmem", str(out), "--every", "60"]) == 0
    every = pd.read_csv(out)
    seconds = every[every.EVID == 0].TIME.to_numpy() * 3600
    assert np.abs(np.diff(seconds)).min() >= 60 - 0.01  # TIME to 1e-6 h
    assert (tmp_path / "nm.txt").read_text().startswith("mpc-dose NONMEM-style dataset")


def test_nonmem_export_of_sparse_levels(tmp_path):
    """Issue 16.1: a 12-h level appears once, at its SAMPLE time (11.83 h), not at every
    record while held nor at its arrival 2 h later; categorical covariates are numbers
    (with their codes in the sidecar), a covariate that changes (CrCL 90 -> 30 at 48 h) is
    at its value at each record; no 16-digit float noise in the file."""
    from mpc_dose.trial.runner import run_trial

    out = tmp_path / "vanco"
    run_trial(REPO / "scenarios" / "vancomycin_renal_decline.toml", out, patients=[0],
              seed=1)
    csv = tmp_path / "nm.csv"
    assert main(["export", str(out), "--nonmem", str(csv)]) == 0
    data = pd.read_csv(csv)
    obs = data[data.EVID == 0]
    # drawn every 12 h from 11.83 h; the one drawn at 95.83 h comes back after the run
    assert obs.TIME.tolist() == pytest.approx([11.833333 + 12 * k for k in range(7)])
    assert set(data.DIALYSIS) == {0}
    assert set(data[data.TIME < 48].CRCL) != {30} and set(data[data.TIME >= 48].CRCL) == {30}
    doses = data[data.EVID == 1]
    assert len(doses) == 8 and doses.AMT.astype(float).tolist() == pytest.approx([1000] * 8)
    text = csv.read_text()
    assert not re.search(r"\d\.\d{9,}", text), "no float noise"
    sidecar = (tmp_path / "nm.txt").read_text()
    assert "DIALYSIS: no = 0, yes = 1" in sidecar and "TIME: h" in sidecar
    assert "AMT (CMT 1: vancomycin): mg" in sidecar and "[mg/L]" in sidecar


def test_the_vancomycin_arms_are_described_with_the_published_figures():
    """The trial's standard-practice and MIPD arms in words, and the published attainment
    the reader sets the AUC24 figures against."""
    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.report import _controller_text, _target_text

    scenarios = Path(__file__).resolve().parents[1] / "scenarios"
    soc = load_scenario(scenarios / "vancomycin_trial_soc.toml")
    assert _controller_text(soc) == (
        "a dosing nomogram: 25 mg per kg loading, 15 mg per kg at an interval by crcl band, "
        "a steady-state trough outside 15 mg/L-20 mg/L scales the dose to 17.5 mg/L")
    mipd = load_scenario(scenarios / "vancomycin_trial_mipd.toml")
    assert _controller_text(mipd).startswith("Bayesian MIPD: at each dose the MAP estimate "
                                             "of vancomycin_cl1, vancomycin_v1")
    assert any("Bayesian MIPD about 74-85 %" in line for line in _target_text(mipd, "mg/L"))
