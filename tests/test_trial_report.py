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
    assert table.loc["response_time_s", "slow_pid mean"] > \
        table.loc["response_time_s", "hil_pid_newera mean"]


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
    data = nonmem_dataset(trial)
    metrics = pd.read_csv(trial / "metrics.csv")
    doses = data[data.EVID == 1]
    for k in (1, 2, 3):
        total = doses[(doses.ID == k) & (doses.CMT == 1)].AMT.astype(float).sum()
        expected = metrics.loc[metrics.patient == k, "propofol_total_mg"].item()
        assert total == pytest.approx(expected, rel=1e-9)  # metrics.csv keeps 10 digits
    obs = data[data.EVID == 0]
    series = pd.read_parquet(trial / "series" / "patient_0001.parquet")
    assert (obs.ID == 1).sum() == series.measured_bis_unitless.notna().sum()
    assert set(obs.CMT) == {3} and (obs.MDV == 0).all() and (doses.MDV == 1).all()
    assert list(data.columns[:8]) == ["ID", "TIME", "AMT", "RATE", "EVID", "MDV", "DV", "CMT"]
    assert {"AGE", "WEIGHT", "SEX"} <= set(data.columns)
    assert (data.groupby("ID").TIME.apply(lambda t: t.is_monotonic_increasing)).all()
    out = tmp_path / "nm.csv"
    assert main(["export", str(trial), "--nonmem", str(out), "--every", "60"]) == 0
    every = pd.read_csv(out)
    seconds = every[every.EVID == 0].TIME.to_numpy() * 3600
    assert np.abs(seconds - 60 * np.round(seconds / 60)).max() < 1e-3  # TIME has 8 digits
