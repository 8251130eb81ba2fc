"""The controller host (``serve controller --workers N``): the patients' controllers in worker
processes give the in-process loop's decisions; a decision past its solve budget is settled
with the shifted previous plan (reason logged, late answer discarded); a worker that dies
leaves its patients on the supervisor's fallback with an alarm while the others go on;
staggered control instants start the patients' first solves in phase order."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mpc_dose.control.base import Forecast
from mpc_dose.errors import ConfigError
from mpc_dose.scenario import load_scenario
from mpc_dose.serve.host import ControllerHost, read_ward
from mpc_dose.serve.plant import serve_plant
from mpc_dose.trial.build import build_setup
from mpc_dose.trial.closed_loop import run_closed_loop
from tests.ports import free_addresses

REPO = Path(__file__).resolve().parents[1]
HIL = REPO / "scenarios" / "hil_pid_newera.toml"

# A controller that plans ahead and says in its rates when it planned them: the plan made at
# t gives, k periods on, 0.1 + t/1000 + k/100000 (amount/s) of each input. It can be made
# slow at one instant, or end its worker process at one (only the first worker to get there:
# the marker file is created once).
PLANNER = '''
import os
import time

from mpc_dose.control.base import Decision, Forecast


def rate(t_plan, k):
    return 0.1 + t_plan / 1000 + k / 100000


class Planner:
    def __init__(self, inputs, period_s, slow_at_s=-1.0, sleep_s=0.0, die_at_s=-1.0,
                 marker=""):
        self.inputs, self.period_s, self.name = tuple(inputs), period_s, "planner"
        self.slow_at_s, self.sleep_s = slow_at_s, sleep_s
        self.die_at_s, self.marker = die_at_s, marker
        self.planned = None

    def decide(self, t_s, readings):
        if t_s == self.slow_at_s:
            time.sleep(self.sleep_s)
        if t_s == self.die_at_s:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
                os._exit(7)
            except FileExistsError:
                pass
        self.planned = Forecast(t_s, self.period_s,
                                {n: [rate(t_s, k) for k in range(10)] for n in self.inputs},
                                "y", "1", [])
        return Decision(t_s, {n: rate(t_s, 0) for n in self.inputs}, f"planned at {t_s:g}")
'''


def planner_scenario(tmp_path: Path, duration_s: float, period_s: float = 1.0,
                     **options) -> Path:
    """hil_pid_newera (two pumps, BIS sensor) with the planner as its controller (open loop:
    no measured variable, so only the controller decides what is sent)."""
    (tmp_path / "planner.py").write_text(PLANNER, encoding="utf-8")
    text = HIL.read_text(encoding="utf-8")
    start, end = text.index("[controller]"), text.index("[metrics]")
    opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    path = tmp_path / "planner.toml"
    path.write_text(
        text[:start].replace("duration_s = 600", f"duration_s = {duration_s:g}")
        .replace('path = "data/', f'path = "{REPO / "scenarios" / "data"}/')
        + f'[controller]\nkind = "python"\nperiod_s = {period_s:g}\nlease_periods = 3\n\n'
          '[controller.python]\ntarget = "planner.py:Planner"\n'
          'inputs = ["propofol", "remifentanil"]\n'
          f'options = {{ {opts} }}\n\n' + text[end:], encoding="utf-8")
    return path


class Plants:
    """*patients* as ``serve plant`` runs them, each in a thread of this process."""

    def __init__(self, scenario, patients, realtime_factor=None) -> None:
        addresses = free_addresses(2 * len(patients))
        self.telemetry, self.commands = addresses[::2], addresses[1::2]
        self.results = [None] * len(patients)
        self.errors: list[BaseException] = []

        def run(k, index, seed):
            try:
                self.results[k] = serve_plant(scenario, index, seed,
                                              telemetry=self.telemetry[k],
                                              commands=self.commands[k],
                                              realtime_factor=realtime_factor, wait_s=60)
            except BaseException as err:  # noqa: BLE001 - reported by the test
                self.errors.append(err)
        self.threads = [threading.Thread(target=run, args=(k, *p), daemon=True)
                        for k, p in enumerate(patients)]
        for thread in self.threads:
            thread.start()

    def pumps(self, scenario):
        return [{p.pump: c for p in scenario.pump} for c in self.commands]

    def join(self) -> list[pd.DataFrame]:
        for thread in self.threads:
            thread.join(60)
        assert not self.errors, self.errors
        return [r.to_pandas() for r in self.results]


def host_for(scenario, plants, patients, **options) -> ControllerHost:
    return ControllerHost(scenario, patients, plants.telemetry, plants.pumps(scenario),
                          plant_commands=plants.commands, **options)


def notes(audit: Path, kind: str) -> list[tuple[float, dict]]:
    db = sqlite3.connect(audit)
    try:
        return [(t, json.loads(body)) for t, body in db.execute(
            "SELECT t_sim, body FROM events WHERE kind = ? ORDER BY id", (kind,))]
    finally:
        db.close()


def test_a_plan_shifted_to_a_later_instant():
    """Forecast.shifted: the rates of the period that starts at the instant; nothing at
    the plan's own instant (the decision replacing it failed) or past its horizon."""
    plan = Forecast(10.0, 5.0, {"drug": [float(k) for k in range(4)]}, "y", "1", [])
    assert plan.shifted(10.0) is None
    assert plan.shifted(15.0) == {"drug": 1.0}
    assert plan.shifted(25.0 + 1e-9) == {"drug": 3.0}
    assert plan.shifted(30.0) is None


def test_the_ward_cli_with_worker_processes_reproduces_the_in_process_loop(tmp_path):
    """`serve controller --ward FILE --workers 2` for two NMPC patients (TIVA benchmark, one
    minute, lock-step) with their plants as `serve plant` processes: each plant's series is
    the in-process loop's (same decisions), to the CSV's 10 digits."""
    text = (REPO / "scenarios" / "tiva_benchmark.toml").read_text(encoding="utf-8")
    scenario = tmp_path / "tiva.toml"
    scenario.write_text(text.replace("duration_s = 1199", "duration_s = 60"),
                        encoding="utf-8")
    addresses = free_addresses(4)
    patients = [(1, 5), (2, 6)]
    ward = tmp_path / "ward.csv"
    ward.write_text("patient,seed,telemetry,commands\n" + "".join(
        f"{p},{s},{addresses[2 * k]},{addresses[2 * k + 1]}\n"
        for k, (p, s) in enumerate(patients)), encoding="utf-8")
    cli = [sys.executable, "-m", "mpc_dose.cli", "serve"]
    plants = [subprocess.Popen(cli + ["plant", str(scenario), "--patient", str(p), "--seed",
                                      str(s), "--telemetry", addresses[2 * k], "--commands",
                                      addresses[2 * k + 1], "--out",
                                      str(tmp_path / f"plant{k}.csv")])
              for k, (p, s) in enumerate(patients)]
    controller = subprocess.run(cli + ["controller", str(scenario), "--ward", str(ward),
                                       "--workers", "2", "--audit",
                                       str(tmp_path / "audit.sqlite")],
                                capture_output=True, text=True, timeout=120)
    for plant in plants:
        plant.wait(60)
    assert controller.returncode == 0, controller.stderr
    assert "2 patient(s) on 2 worker process(es)" in controller.stdout
    assert all(plant.returncode == 0 for plant in plants)
    loaded = load_scenario(scenario)
    for k, (p, s) in enumerate(patients):
        across = pd.read_csv(tmp_path / f"plant{k}.csv")
        inproc = run_closed_loop(build_setup(loaded, p - 1, s)[0]).to_pandas()
        for column in ("measured_bis_unitless", "commanded_propofol_rate_mg_per_s",
                       "delivered_remifentanil_rate_ug_per_s"):
            np.testing.assert_allclose(across[column], inproc[column], rtol=1e-9,
                                       atol=1e-12, err_msg=f"patient {p}: {column}")
        assert inproc.commanded_propofol_rate_mg_per_s.max() > 0  # the NMPC dosed


def test_a_decision_past_its_budget_sends_the_shifted_previous_plan(tmp_path):
    """Period 2 s; the planner takes 1.3 s at t = 8 s, the budget is 1 s: the host settles
    that instant with the plan made at 6 s shifted by one period (not a fresh plan), says
    why in the decision and the audit log (with the supervisor's alarm), and discards the
    late answer; the next instants are planned afresh."""
    scenario = load_scenario(planner_scenario(tmp_path, 16, 2.0, slow_at_s=8.0,
                                              sleep_s=1.3))
    audit = tmp_path / "audit.sqlite"
    plants = Plants(scenario, [(0, 1)])
    host = host_for(scenario, plants, [(0, 1)], workers=1, solve_budget_s=1.0, audit=audit)
    decisions = []
    settle = host._settle

    def recording(link, outcome):
        decisions.append(settle(link, outcome))
        return decisions[-1]
    host._settle = recording
    try:
        host.connect(30)
        host.run_simulated()
    finally:
        host.close()
    [frame] = plants.join()

    def rate(t_plan, k):
        return 0.1 + t_plan / 1000 + k / 100000
    at = {d.t_s: d for d in decisions}
    assert sorted(at) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert at[8].status == "solver_timeout" and at[8].alarm == "controller.solver_timeout"
    assert "no answer within the 1-s solve budget" in at[8].reason
    assert "shifted previous plan" in at[8].reason
    assert at[8].rates["propofol"] == pytest.approx(rate(6, 1), rel=1e-12)
    for t in (6, 10, 12, 14):
        assert at[t].status == "ok" and at[t].rates["propofol"] == \
            pytest.approx(rate(t, 0), rel=1e-12)
    commanded = frame.set_index("time_s").commanded_propofol_rate_mg_per_s
    assert commanded[8.0] == pytest.approx(rate(6, 1), rel=1e-9)
    assert commanded[10.0] == pytest.approx(rate(10, 0), rel=1e-9)
    [(t, abandoned)] = notes(audit, "solve_abandoned")
    assert t == 8 and "solve budget" in abandoned["reason"]
    assert "shifted previous plan" in abandoned["decision"]
    [(t, late)] = notes(audit, "late_answer_discarded")
    assert t == 8 and late["status"] == "ok"
    assert any(a["alarm"]["code"] == "controller.solver_timeout"
               for _, a in notes(audit, "alarm"))
    assert host.abandoned == 1 and host.late_discarded == 1


def test_a_worker_that_dies_leaves_its_patients_on_the_fallback_and_the_rest_goes_on(
        tmp_path):
    """Two patients on two workers; at t = 3 s the first worker to decide ends its process.
    Its patient's instants from then on are failed decisions (controller lost): the
    supervisor's fallback (stop) with its alarm, FALLBACK; the other patient is planned
    every instant to the end; the host finishes; the loss is in the audit log."""
    scenario = load_scenario(planner_scenario(tmp_path, 7, die_at_s=3.0,
                                              marker=str(tmp_path / "died")))
    audit = tmp_path / "audit.sqlite"
    patients = [(0, 1), (1, 2)]
    plants = Plants(scenario, patients)
    host = host_for(scenario, plants, patients, workers=2, audit=audit)
    try:
        host.connect(30)
        host.run_simulated()
    finally:
        host.close()
    frames = plants.join()
    [dead] = [w for w in host.pool.workers if w.lost]
    [lost_key] = dead.keys
    lost, kept = host.links[lost_key], host.links[1 - lost_key]
    [(_, note)] = notes(audit, "worker_lost")
    assert note["patients"] == [lost.node.src] and "exit code 7" in note["text"]
    assert lost.node.supervisor.mode == "FALLBACK"
    assert any(alarm.code == "controller.lost" for _, alarm in lost.node.raised)
    assert "controller lost" in lost.node.last_decision.reason
    lost_rates = frames[lost_key].set_index("time_s").commanded_propofol_rate_mg_per_s
    kept_rates = frames[1 - lost_key].set_index("time_s").commanded_propofol_rate_mg_per_s
    assert lost_rates[2.0] == pytest.approx(0.1 + 2 / 1000, rel=1e-9)
    assert (lost_rates[lost_rates.index >= 3] == 0).all()
    for t in range(7):
        assert kept_rates[float(t)] == pytest.approx(0.1 + t / 1000, rel=1e-9)
    assert kept.node.supervisor.mode == "CLOSED_LOOP" and not kept.node.raised


@pytest.mark.parametrize("stagger_s", [0.0, 1.0])
def test_staggered_starts_spread_the_first_solves(tmp_path, stagger_s):
    """Real time, four patients inducted at once, period 1 s: with --stagger 1 their
    instants keep phases 0, 0.25, 0.5, 0.75 s after the host's start, with --stagger 0 all
    the same; decisions are asked in the order they are due, none before it. (A patient
    whose plant's clock is not heard yet skips its instant: no decision on a guessed clock.)
    """
    scenario = load_scenario(planner_scenario(tmp_path, 30))
    patients = [(k, k) for k in range(4)]
    plants = Plants(scenario, patients, realtime_factor=1.0)
    host = host_for(scenario, plants, patients, workers=2, stagger_s=stagger_s)
    asked = []
    begin = host._begin

    def recording(link, t, due, budget_s):
        asked.append((link.key, due, time.monotonic()))
        begin(link, t, due, budget_s)
    host._begin = recording
    try:
        host.connect(30)
        host.run_realtime(3.5)
    finally:
        host.close()
    phases = [stagger_s * k / 4 for k in range(4)]
    assert [link.phase_s for link in host.links] == phases
    assert {key for key, *_ in asked} == {0, 1, 2, 3}
    for key, due, when in asked:
        periods = due - host._start - phases[key]  # period 1 s: whole periods after phase
        assert periods == pytest.approx(round(periods), abs=1e-9) and when >= due
    dues = [due for _, due, _ in asked]
    assert dues == sorted(dues)
    if stagger_s:  # a round's patients are asked one after the other, in phase order
        assert len(set(dues)) == len(dues)
    assert host.missed_deadlines == 0 and host.abandoned == 0


def test_a_budget_at_or_past_the_period_is_refused(tmp_path):
    scenario = load_scenario(planner_scenario(tmp_path, 5))
    tel, cmd = free_addresses(2)
    with pytest.raises(ConfigError, match=r"--solve-budget = 1\.0: expected seconds > 0 and "
                                          r"below the control period \(1 s\)"):
        ControllerHost(scenario, [(0, 1)], [tel], [{p.pump: cmd for p in scenario.pump}],
                       workers=1, solve_budget_s=1.0)


@pytest.mark.parametrize("text, match", [
    ("patient,telemetry\n1,tcp://127.0.0.1:1\n", "missing commands"),
    ("patient,telemetry,commands\n0,tcp://127.0.0.1:1,tcp://127.0.0.1:2\n",
     "line 2: patient = '0': expected a whole number >= 1"),
    ("patient,telemetry,commands\n1,,tcp://127.0.0.1:2\n", "line 2: telemetry is empty"),
    ("patient,telemetry,commands,pump:morphine\n1,tcp://127.0.0.1:1,tcp://127.0.0.1:2,\n",
     r"unknown column\(s\) \['pump:morphine'\]; pumps of the scenario: propofol, "
     r"remifentanil"),
])
def test_a_bad_ward_file_is_refused_naming_the_line_and_field(tmp_path, text, match):
    path = tmp_path / "ward.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        read_ward(path, load_scenario(HIL))


def test_a_ward_file_with_a_bridged_pump():
    """Rows give each patient's plant addresses; a pump:NAME column sends that pump's
    commands to a bridge instead; an empty seed is the scenario's."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ward.csv"
        path.write_text("patient,seed,telemetry,commands,pump:propofol\n"
                        "3,7,tcp://127.0.0.1:11,tcp://127.0.0.1:12,tcp://127.0.0.1:13\n"
                        "4,,tcp://127.0.0.1:14,tcp://127.0.0.1:15,\n", encoding="utf-8")
        scenario = load_scenario(HIL)
        ward = read_ward(path, scenario)
    assert ward.patients == [(2, 7), (3, scenario.scenario.seed)]
    assert ward.pumps == [{"propofol": "tcp://127.0.0.1:13",
                           "remifentanil": "tcp://127.0.0.1:12"},
                          {"propofol": "tcp://127.0.0.1:15",
                           "remifentanil": "tcp://127.0.0.1:15"}]


@pytest.mark.parametrize("flags, match", [
    (["--workers", "0", "--solve-budget", "1"], "--solve-budget and --stagger need worker "
                                                "processes"),
    (["--workers", "-1"], r"--workers = -1: expected a whole number >= 1 \(0: every "
                          r"controller in the host process\)"),
    (["--ward", "missing.csv"], "--ward 'missing.csv': cannot read it"),
])
def test_the_cli_refuses_host_options_that_cannot_work(capsys, flags, match):
    from mpc_dose.cli import main

    assert main(["serve", "controller", str(HIL), *flags]) == 2
    assert re.search(match, capsys.readouterr().err)
