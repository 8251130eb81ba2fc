"""Comparison on common random numbers, the HTML report, and the NONMEM export."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mpc_dose.cli import main
from mpc_dose.trial.report import nonmem_dataset

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
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 6 and all(len(i) > 1000 for i in images)
    assert "Controller comparison" in page and "slow_pid" in page
    assert not re.search(r"(src|href)=\"https?:", page), "nothing fetched from the network"


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
