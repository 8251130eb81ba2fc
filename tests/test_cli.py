"""The command line: simulate writes CSV and PNG with units; bad input exits 2 with a reason."""

import re
from pathlib import Path

import pandas as pd
import pytest

from mpc_dose.cli import main

REPO = Path(__file__).resolve().parents[1]
COVS = "age=35,height_cm=170,weight_kg=70,sex=male"


def test_simulate_schnider_example(tmp_path, capsys):
    """The README example runs and writes the CSV with units in the column names."""
    doses = tmp_path / "doses.csv"
    doses.write_text("time_s,amount_mg,duration_s\n0,140,30\n")
    out = tmp_path / "out.csv"
    code = main(["simulate", "--model", "propofol-schnider", "--covariates", COVS,
                 "--doses", str(doses), "--duration", "1800", "--step", "10", "--out", str(out)])
    assert code == 0
    frame = pd.read_csv(out)
    assert frame.columns[:3].tolist() == ["time_s", "propofol_cp_ug_per_mL",
                                          "propofol_ce_ug_per_mL"]
    assert len(frame) == 181 and frame["time_s"].iloc[-1] == 1800
    assert frame["propofol_rate_mg_per_s"].iloc[0] == pytest.approx(140 / 30)
    assert "wrote" in capsys.readouterr().out


def test_simulate_demo_regimen_with_plot(tmp_path):
    """Both drugs and BIS from the shipped per-kg regimen, with a PNG."""
    out = tmp_path / "ts.csv"
    code = main(["simulate", "--model", "propofol-schnider+remifentanil-minto+bis-bouillon",
                 "--covariates", COVS, "--doses", str(REPO / "scenarios/doses/tiva_induction.csv"),
                 "--duration", "40min", "--step", "5", "--out", str(out), "--plot"])
    assert code == 0
    bis = pd.read_csv(out)["bis_unitless"]
    assert bis.iloc[0] == pytest.approx(97.4, abs=1e-3) and 20 < bis.min() < 50
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_params_override_with_units(tmp_path):
    """Individual values may be given with a unit suffix and are converted."""
    out = tmp_path / "o.csv"
    assert main(["simulate", "--model", "vancomycin-goti",
                 "--covariates", "crcl=80,weight=70,dialysis=no",
                 "--params", "vancomycin_cl1_L_per_min=0.05", "--duration", "1h",
                 "--out", str(out)]) == 0


@pytest.mark.parametrize("args, match", [
    (["--model", "propofol-schnyder", "--covariates", COVS], "did you mean 'propofol-schnider'"),
    (["--model", "propofol-schnider", "--covariates", "age=35,height_cm=170,weight_kg=70"],
     "missing covariate 'sex'"),
    (["--model", "propofol-schnider", "--covariates", "age=35,height=170,weight=-70,sex=male"],
     "weight = '-70' is outside"),
    (["--model", "propofol-schnider", "--covariates", COVS, "--params", "propofol_v1=-4"],
     "'propofol_v1' = -4.0 L: expected > 0"),
    (["--model", "propofol-schnider", "--covariates", COVS, "--params", "propofol_vv1=4"],
     "did you mean 'propofol_v1'"),
    (["--model", "propofol-schnider", "--covariates", "age"], "expected name=value"),
    (["--model", "propofol-schnider", "--covariates", COVS, "--step", "1mg"],
     "--step: unit 'mg'"),
    (["--model", "propofol-schnider"], "needs --covariates"),
])
def test_bad_input_exits_2_with_reason(tmp_path, capsys, args, match):
    """Bad input: exit status 2, one line naming the field and value, no output file."""
    out = tmp_path / "o.csv"
    code = main(["simulate", *args, "--duration", "60", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(match, err), err
    assert not out.exists()


def test_models_lists_library_and_details(capsys):
    """``models`` lists every entry; ``models NAME`` shows units, statistics and references."""
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    for name in ("propofol-schnider", "propofol-eleveld", "remifentanil-minto", "bis-bouillon",
                 "vancomycin-goti", "norepinephrine-map", "fluorouracil-circadian"):
        assert name in listing
    assert main(["models", "vancomycin-goti"]) == 0
    detail = capsys.readouterr().out
    assert "vancomycin_cl1 [L/h]" in detail and "Goti V" in detail and "39.8%" in detail


def test_a_cohort_file_runs_every_row_by_default(tmp_path, capsys):
    """Issue 16.5: `trial --cohort FILE` runs every row of the file unless --patients says
    otherwise (it ran 10, and a 3-row cohort failed)."""
    import pandas as pd

    from mpc_dose.cli import main

    repo = Path(__file__).resolve().parents[1]
    rows = pd.read_csv(repo / "scenarios" / "data" / "tiva_training_cohort_32.csv",
                       comment="#").head(3)
    cohort = tmp_path / "three.csv"
    rows.to_csv(cohort, index=False)
    out = tmp_path / "trial"
    assert main(["trial", str(repo / "scenarios" / "tiva_benchmark_pid.toml"), "--cohort",
                 str(cohort), "--out", str(out), "--workers", "1", "--quiet",
                 "--patients", "2"]) == 0
    assert len(pd.read_csv(out / "metrics.csv")) == 2
    out = tmp_path / "all"
    assert main(["trial", str(repo / "scenarios" / "tiva_benchmark_pid.toml"), "--cohort",
                 str(cohort), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    assert len(pd.read_csv(out / "metrics.csv")) == 3
    assert "3 patients" in capsys.readouterr().out


def test_an_unreachable_dask_scheduler_is_a_message(tmp_path, capsys):
    """Issue 16.6: no traceback after 30 s, a message after 10 s saying what to start."""
    from tests.ports import free_addresses

    (address,) = free_addresses(1)
    assert main(["trial", str(REPO / "scenarios" / "pid_induction_13.toml"), "--patients", "1",
                 "--scheduler", address, "--out", str(tmp_path / "t"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--scheduler {address}: no Dask scheduler answered within 10 s" in err
    assert "dask scheduler" in err


def test_run_says_what_went_wrong(tmp_path, capsys):
    """Issue 16.7: a drug concentration a thousand times too low (10 mg/L instead of
    mg/mL) made the pump refuse every command while the run exited 0 saying nothing; the run
    summary now lists alarms, time in FALLBACK and the refused commands."""
    scenario = tmp_path / "dilute.toml"
    text = (REPO / "scenarios" / "pid_induction_13.toml").read_text(encoding="utf-8")
    scenario.write_text(text.replace('concentration = "10 mg/mL"',
                                     'concentration = "10 mg/L"', 1)
                        .replace('"data/', f'"{REPO}/scenarios/data/'), encoding="utf-8")
    assert main(["run", str(scenario), "--out", str(tmp_path / "out"), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"commands refused by the pumps: out_of_range x\d+", out), out
    assert "time in FALLBACK: 0 s" in out and "alarms:" in out
    # the trial of the same scenario: a metric per patient and a health line in the summary
    assert main(["trial", str(scenario), "--patients", "1", "--out", str(tmp_path / "t"),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "commands refused by the pumps: 1 of 1 patients" in out, out
    metrics = pd.read_csv(tmp_path / "t" / "metrics.csv")
    assert metrics["commands_refused"].iloc[0] > 0


def test_a_real_time_run_reports_progress_and_keeps_what_it_recorded(tmp_path):
    """Issue 16.8: `run --realtime 1` printed nothing for 20 minutes and left nothing when
    interrupted; it prints its progress and, on Ctrl-C, writes the run until then."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "rt"
    process = subprocess.Popen([sys.executable, "-m", "mpc_dose.cli", "run",
                                str(REPO / "scenarios" / "pid_induction_13.toml"), "--realtime",
                                "0.1", "--out", str(out), "--no-plot"],
                               stdout=subprocess.PIPE, text=True, cwd=REPO)
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(lines) < 3:  # 10 s of simulation per second
        line = process.stdout.readline()
        if line.startswith("t = "):
            lines.append(line)
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=60)
    assert process.returncode == 130, rest
    assert lines[0].startswith("t = 10 s of ") and "bis" in lines[0]
    assert "interrupted at t = " in rest
    frame = pd.read_csv(out / "timeseries.csv")
    # the third progress line said t = 30 s; its record may be the one at 29 s (the recorder
    # runs after the controller at an instant, and the signal can fall between them)
    assert 29 <= frame.time_s.iloc[-1] < 600
