"""Tuning sweeps: spaces are checked before anything runs, every strategy runs settings as
trials on the same patients, the Pareto front and the recommendation follow their
definitions, the recommended scenario file loads, and a killed sweep resumes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mpc_dose.errors import ConfigError
from mpc_dose.scenario import load_scenario, read_scenario_data, with_overrides
from mpc_dose.tune import load_space, pareto_mask, run_sweep
from mpc_dose.tune.report import write_tune_report
from mpc_dose.tune.space import statistic

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "scenarios" / "hil_pid_newera.toml"   # PID, 10 minutes: fast

SPACE = """
[[parameter]]
name = "kp"
keys = ["controller.pid.kp"]
values = [0.02, 0.08]

[[parameter]]
name = "max_propofol"
keys = ["controller.pid.max_rates.propofol", "controller.pid.u_max"]
low = 0.5
high = 1.5

[[objective]]
metric = "iae_bis_measured_s"
statistic = "mean"
goal = "minimise"

[[objective]]
metric = "propofol_per_kg_mg_per_kg"
statistic = "p95"
goal = "minimise"

[[limit]]
metric = "time_below_window_measured_s"
statistic = "max"
at_most = 400

[strategy]
kind = "grid"
grid_steps = 2

[training]
patients = 3
seed = 2
"""


def space_file(tmp_path: Path, text: str = SPACE, name: str = "space.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return path


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    space = space_file(tmp, SPACE + "\n[holdout]\npatients = 2\nfirst = 5\nseed = 7\n")
    return run_sweep(SCENARIO, space, tmp / "out")


def test_a_grid_sweep_runs_every_setting_on_the_same_patients(grid_sweep):
    table = grid_sweep.table
    assert list(table.setting) == [0, 1, 2, 3, 4]          # the scenario as given, then 2 x 2
    assert sorted(zip(table.kp[1:], table.max_propofol[1:])) == [
        (0.02, 0.5), (0.02, 1.5), (0.08, 0.5), (0.08, 1.5)]
    assert table.kp[0] == pytest.approx(0.013208318978132468)  # read from the schema default
    for k in range(5):
        metrics = pd.read_csv(grid_sweep.out / "settings" / f"{k:04d}" / "metrics.csv")
        assert list(metrics.patient) == [1, 2, 3]
    # a setting's statistic is that statistic of its patients' metric
    metrics = pd.read_csv(grid_sweep.out / "settings" / "0003" / "metrics.csv")
    assert table.loc[3, "p95 propofol_per_kg_mg_per_kg"] == pytest.approx(
        np.percentile(metrics.propofol_per_kg_mg_per_kg, 95))
    # the keys reached the controller: a lower rate cap gives less propofol
    assert table.loc[3, "p95 propofol_per_kg_mg_per_kg"] < \
        table.loc[4, "p95 propofol_per_kg_mg_per_kg"]


def test_the_recommendation_is_feasible_balanced_and_written_as_a_scenario(grid_sweep):
    table = grid_sweep.table
    chosen = table[table.recommended]
    assert len(chosen) == 1 and chosen.feasible.all() and chosen.pareto.all()
    assert int(chosen.setting.iloc[0]) == grid_sweep.recommended
    record = json.loads((grid_sweep.out / "settings" / f"{grid_sweep.recommended:04d}"
                         / "setting.json").read_text())
    scenario = load_scenario(grid_sweep.out / "recommended.toml")
    for key, value in record["overrides"].items():
        node = scenario
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        assert node == pytest.approx(value)
    text = (grid_sweep.out / "recommended.toml").read_text()
    assert text.startswith("# Recommended by `mpc-dose tune`")
    assert "Pareto front" in (grid_sweep.out / "recommendation.txt").read_text()


def test_the_held_out_check_reports_both_settings(grid_sweep):
    holdout = pd.read_csv(grid_sweep.out / "holdout.csv")
    assert list(holdout.setting) == ["recommended", "baseline"]
    for label in ("recommended", "baseline"):
        metrics = pd.read_csv(grid_sweep.out / "holdout" / label / "metrics.csv")
        assert list(metrics.patient) == [5, 6]
    assert "held-out patients" in grid_sweep.reasons[-1]


def test_the_report_renders(grid_sweep, tmp_path):
    """The page opens with the scenario, the cohort, what was varied and judged (in words,
    with units); no nan anywhere; the wide settings table scrolls inside its box."""
    page = write_tune_report(grid_sweep.out, tmp_path / "report.html").read_text()
    assert "Pareto front" in page and "rank corr." not in page  # in the images, not text
    assert page.count("data:image/png;base64,") == 2
    assert "recommended setting" in page
    text = re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', page)
    summary = text[text.index('<div class="summary">'):text.index("<h2>")]
    assert "hil_pid_newera" in summary and "3 training patients" in summary
    assert "BIS: target 50, acceptable window 40-60" in summary
    assert "minimise the mean of IAE (readings) [BIS·s]" in summary
    assert "highest of time below window (readings) [s] at most 400" in summary
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert text.count("<table") == text.count('<div class="scroll"><table')


def test_a_constant_statistic_has_no_rank_correlation():
    """A statistic (or parameter) that never changes has no rank correlation: the panel
    says "n/a (constant)", never nan; the panels' labels do not overlap."""
    from mpc_dose.tune.report import _sensitivity_figure, rank_correlation
    from tests.figures import text_overlaps

    assert rank_correlation([1, 2, 3, 4], [0, 0, 0, 0]) is None
    assert rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    table = pd.DataFrame({"kp": [0.02, 0.05, 0.08, 0.11], "feasible": True,
                          "mean iae": [900.0, 700.0, 650.0, 800.0],
                          "max fallback_time_s": [0.0, 0.0, 0.0, 0.0]})
    labels = {"mean iae": "mean of IAE [BIS·s]",
              "max fallback_time_s": "highest of time in fallback [s]"}
    fig = _sensitivity_figure(table, ["kp"], list(labels), labels)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["rank corr. -0.40", "rank corr. n/a (constant)"]
    assert text_overlaps(fig) == []


def test_a_rerun_reads_everything_back(grid_sweep, tmp_path):
    before = (grid_sweep.out / "settings.csv").read_text()
    mark = grid_sweep.out / "settings" / "0002" / "metrics" / "patient_0001.json"
    stamp = mark.stat().st_mtime_ns  # a patient's completion mark: rewritten only if rerun
    manifest = json.loads((grid_sweep.out / "sweep.json").read_text())
    again = run_sweep(SCENARIO, manifest["space"], grid_sweep.out)
    assert (grid_sweep.out / "settings.csv").read_text() == before
    assert mark.stat().st_mtime_ns == stamp
    assert again.recommended == grid_sweep.recommended


@pytest.mark.parametrize("kind", ["process pool", "dask"])
def test_parallel_sweeps_give_the_in_process_table(grid_sweep, tmp_path, kind):
    """Settings run side by side on a process pool or a local Dask cluster: the same table
    as the sweep run in this process."""
    manifest = json.loads((grid_sweep.out / "sweep.json").read_text())
    if kind == "dask":
        distributed = pytest.importorskip("distributed")
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, \
                distributed.Client(cluster) as client:
            run_sweep(SCENARIO, manifest["space"], tmp_path, executor=client.get_executor())
    else:
        with ProcessPoolExecutor(2) as pool:
            run_sweep(SCENARIO, manifest["space"], tmp_path, executor=pool)
    assert (tmp_path / "settings.csv").read_text() == \
        (grid_sweep.out / "settings.csv").read_text()
    assert (tmp_path / "holdout.csv").read_text() == (grid_sweep.out / "holdout.csv").read_text()


def test_a_killed_sweep_resumes_to_the_same_table(tmp_path):
    """SIGKILL once the second setting has begun: rerunning finishes it and the rest, and
    the table equals an uninterrupted sweep's."""
    space = space_file(tmp_path, SPACE.replace('kind = "grid"', 'kind = "sobol"\nsettings = 4'))
    command = [sys.executable, "-m", "mpc_dose.cli", "tune", str(SCENARIO), "--space",
               str(space), "--workers", "1", "--quiet", "--out"]
    killed = tmp_path / "killed"
    process = subprocess.Popen(command + [str(killed)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "settings" / "0002" / "setting.json").exists() and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert not (killed / "settings.csv").exists(), "the kill must land mid-sweep"
    subprocess.run(command + [str(killed)], check=True, capture_output=True)
    whole = tmp_path / "whole"
    subprocess.run(command + [str(whole)], check=True, capture_output=True)
    assert (killed / "settings.csv").read_text() == (whole / "settings.csv").read_text()


def test_an_unknown_key_fails_before_any_simulation(tmp_path):
    space = space_file(tmp_path, SPACE.replace("controller.pid.kp", "controller.pid.kpp"))
    with pytest.raises(ConfigError, match=r"'kp'.*'controller\.pid\.kpp'.*unknown key"):
        run_sweep(SCENARIO, space, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_metric_the_trial_lacks_is_named_with_the_columns(tmp_path):
    space = space_file(tmp_path, SPACE.replace('metric = "iae_bis_measured_s"',
                                               'metric = "iea_bis_measured_s"'))
    with pytest.raises(ConfigError, match=r"metric 'iea_bis_measured_s' is not a "
                                          r"column.*\biae_bis_measured_s\b"):
        run_sweep(SCENARIO, space, tmp_path / "out")


def test_another_sweep_in_the_folder_is_refused(grid_sweep, tmp_path):
    space = space_file(tmp_path, SPACE.replace("values = [0.02, 0.08]",
                                               "values = [0.02, 0.03]"))
    with pytest.raises(ConfigError, match="holds another sweep"):
        run_sweep(SCENARIO, space, grid_sweep.out)


def test_an_optuna_sweep_asks_learns_and_resumes(tmp_path):
    pytest.importorskip("optuna")
    space = space_file(tmp_path, SPACE.replace('kind = "grid"', 'kind = "optuna"\n'
                                               'settings = 3\nbatch = 1'))
    first = run_sweep(SCENARIO, space, tmp_path / "out")
    assert list(first.table.setting) == [0, 1, 2, 3]
    assert set(first.table.kp[1:]) <= {0.02, 0.08}
    assert first.table.max_propofol[1:].between(0.5, 1.5).all()
    again = run_sweep(SCENARIO, space, tmp_path / "out")   # nothing left to ask
    pd.testing.assert_frame_equal(again.table, first.table)


@pytest.mark.parametrize("text, match", [
    (SPACE.replace("low = 0.5", "low = 5.0"), r"parameter 'max_propofol': expected low < high"),
    (SPACE.replace('statistic = "mean"', 'statistic = "mode"'), r"objective\.0.*'mode'"),
    (SPACE.replace("at_most = 400", "at_most = 400\nat_least = 1"), r"exactly one of"),
    (SPACE.replace('goal = "minimise"', 'goal = "minimize"', 1), r"objective\.0\.goal"),
    (SPACE.replace("[strategy]", "[strategy]\nsetings = 3"), r"strategy\.setings"),
    (SPACE.replace('name = "max_propofol"', 'name = "kp"'), r"parameter names must differ"),
])
def test_space_errors_name_the_field(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_space(space_file(tmp_path, text))


def test_overrides_set_nested_and_indexed_keys_and_refuse_bad_paths():
    data = read_scenario_data(SCENARIO)
    changed = with_overrides(data, {"controller.pid.kp": 0.5, "pump.1.max_rate_ml_per_h": 99,
                                    "controller.pid.max_rates.propofol": 1.0})
    assert changed["controller"]["pid"]["kp"] == 0.5
    assert changed["pump"][1]["max_rate_ml_per_h"] == 99
    assert data["controller"].get("pid", {}).get("kp") != 0.5      # the input is untouched
    with pytest.raises(ConfigError, match=r"pump\.7.*index below 2"):
        with_overrides(data, {"pump.7.concentration": "1 mg/mL"})
    with pytest.raises(ConfigError, match=r"'scenario\.name' is a value"):
        with_overrides(data, {"scenario.name.first": 1})
    with pytest.raises(ConfigError, match=r"'pump' is an array"):
        with_overrides(data, {"pump.concentration": "1 mg/mL"})


@settings(max_examples=60, deadline=None)
@given(arrays(float, st.tuples(st.integers(1, 12), st.integers(1, 3)),
              elements=st.integers(-5, 5).map(float)))
def test_the_pareto_front_is_exactly_the_undominated_rows(scores):
    front = pareto_mask(scores)
    assert front.any()

    def dominates(a, b):
        return np.all(a >= b) and np.any(a > b)

    for i, row in enumerate(scores):
        dominated = any(dominates(other, row) for other in scores)
        assert front[i] == (not dominated)


def test_statistics_over_the_cohort():
    values = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    assert statistic(values, "mean") == 2.5
    assert statistic(values, "p95") == pytest.approx(np.percentile([1, 2, 3, 4], 95))
    assert statistic(values, "max") == 4.0
    assert np.isnan(statistic(np.array([np.nan]), "mean"))
