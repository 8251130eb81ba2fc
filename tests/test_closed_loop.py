"""One closed loop: the DESIGN PID check, reproducibility, and the loop against open-loop
simulation."""

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpc_dose.cli import main
from mpc_dose.control.baselines import FixedRegimen
from mpc_dose.model.dosing import Dose
from mpc_dose.model.library import load
from mpc_dose.model.simulation import simulate
from mpc_dose.plant.patient import OutputDisturbance
from mpc_dose.plant.pump import PumpConfig
from mpc_dose.plant.realtime import DeadlineEnvironment
from mpc_dose.plant.sensor import SensorConfig
from mpc_dose.scenario import load_scenario
from mpc_dose.trial.build import build_setup
from mpc_dose.trial.closed_loop import LoopSetup, run_closed_loop

REPO = Path(__file__).resolve().parents[1]
PID_SCENARIO = REPO / "scenarios" / "pid_induction_13.toml"
EXPECTED = pd.read_csv(REPO / "tests" / "reference" / "data" / "pid_induction_13_expected.csv")


@pytest.fixture(scope="module")
def pid_scenario():
    return load_scenario(PID_SCENARIO)


@pytest.mark.parametrize("patient", range(1, 14))
def test_pid_induction_matches_independent_implementation(pid_scenario, patient):
    """The DESIGN PID on PAS patient K: first BIS < 55 within one sample, lowest BIS within
    0.1 of the independent numpy loop (tests/reference/pid_loop.py)."""
    setup, _ = build_setup(pid_scenario, patient - 1, 0)
    frame = run_closed_loop(replace(setup, duration_s=599)).to_pandas()
    bis = frame["measured_bis_unitless"].to_numpy()
    expected = EXPECTED.loc[EXPECTED["index"] == patient].iloc[0]
    first = frame["time_s"].to_numpy()[np.argmax(bis < 55)]
    assert abs(first - expected["first_bis_below_55_s"]) <= 1.0
    assert abs(bis.min() - expected["lowest_bis"]) <= 0.1
    # (measured: identical first times, lowest BIS within 3e-4)
    assert abs(bis.min() - expected["lowest_bis"]) <= 1e-3


def test_run_cli_writes_series_and_is_byte_identical(tmp_path):
    """`mpc-dose run` twice with one seed writes byte-identical files; another seed differs."""
    noisy = tmp_path / "noisy.toml"
    noisy.write_text(PID_SCENARIO.read_text().replace(
        'output = "bis"\nperiod_s = 1', 'output = "bis"\nperiod_s = 1\nnoise = "bis"')
        .replace('path = "data/', f'path = "{REPO}/scenarios/data/').replace(
            "duration_s = 600", "duration_s = 120"))
    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert main(["run", str(noisy), "--patient", "2", "--seed", str(seed), "--out",
                     str(tmp_path / name), "--no-plot"]) == 0
        outs.append((tmp_path / name / "timeseries.csv").read_bytes())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    frame = pd.read_csv(tmp_path / "a" / "timeseries.csv")
    assert {"time_s", "true_bis_unitless", "measured_bis_unitless",
            "commanded_propofol_rate_mg_per_s", "delivered_propofol_rate_mg_per_s",
            "pump_propofol_state", "alarms"} <= set(frame.columns)
    noise = frame["measured_bis_unitless"] - frame["true_bis_unitless"]
    assert 0.5 < noise.std() < 3.0


def test_run_cli_plot_and_patient_record(tmp_path):
    """The run writes a PNG and the patient's covariates and parameters."""
    assert main(["run", str(PID_SCENARIO), "--patient", "13", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "timeseries.png").read_bytes()[:4] == b"\x89PNG"
    record = __import__("json").loads((tmp_path / "patient.json").read_text())
    assert record["covariates"] == {"age": 38.0, "height": 169.0, "weight": 65.0,
                                    "sex": "female"}
    assert record["params"]["bis_c50p"] == 4.64


def test_unknown_patient_number(tmp_path, capsys):
    """Patient 14 of a 13-patient table is an error naming the range."""
    assert main(["run", str(PID_SCENARIO), "--patient", "14", "--out", str(tmp_path)]) == 2
    assert "the cohort has 13 patients (1-13)" in capsys.readouterr().err


def test_fixed_regimen_loop_equals_open_loop_simulation():
    """A fixed regimen through pumps and messages gives exactly the open-loop simulation."""
    lm = load("propofol-schnider")
    params = lm.population.typical_parameters({"age": 50, "height": 170, "weight": 70,
                                               "sex": "male"})
    doses = [Dose.infusion(0, "propofol", 2.0, 30), Dose.infusion(30, "propofol", 0.15, 570)]
    setup = LoopSetup(lm.model, params, FixedRegimen(doses, ["propofol"], period_s=1.0),
                      [PumpConfig("p", "propofol", 10.0, max_rate_ml_per_h=2000)],
                      [SensorConfig("propofol_cp", "cp", "ug/mL", 1.0)], 600.0)
    frame = run_closed_loop(setup).to_pandas()
    times = frame["time_s"].to_numpy()
    reference = simulate(lm.model, params, doses, times).output("propofol_ce")
    assert np.max(np.abs(frame["true_propofol_ce_ug_per_mL"] - reference)) < 1e-9
    assert frame["measured_cp_ug_per_mL"].iloc[100] == pytest.approx(
        frame["true_propofol_cp_ug_per_mL"].iloc[100])


def test_message_latency_delays_the_loop():
    """With 2 s link latency the pump starts 4 s late (reading there, command back)."""
    lm = load("propofol-schnider")
    params = lm.population.typical_parameters({"age": 50, "height": 170, "weight": 70,
                                               "sex": "male"})
    setup = LoopSetup(lm.model, params,
                      FixedRegimen([Dose.infusion(0, "propofol", 1.0, 60)], ["propofol"]),
                      [PumpConfig("p", "propofol", 10.0)],
                      [SensorConfig("propofol_cp", "cp", "ug/mL", 1.0)], 10.0, latency_s=2.0)
    frame = run_closed_loop(setup).to_pandas()
    delivered = frame["delivered_propofol_rate_mg_per_s"].to_numpy()
    assert delivered[1] == 0 and delivered[2] == 1.0


def test_realtime_run_detects_deadline_misses():
    """Against the wall clock, a controller slower than its period is reported, not hidden."""
    import time

    lm = load("propofol-schnider")
    params = lm.population.typical_parameters({"age": 50, "height": 170, "weight": 70,
                                               "sex": "male"})

    class Slow(FixedRegimen):
        def decide(self, t_s, readings):
            time.sleep(0.03)
            return super().decide(t_s, readings)

    setup = LoopSetup(lm.model, params, Slow([Dose.infusion(0, "propofol", 1.0, 60)],
                                             ["propofol"], period_s=1.0),
                      [PumpConfig("p", "propofol", 10.0)],
                      [SensorConfig("propofol_cp", "cp", "ug/mL", 1.0)], 5.0,
                      realtime_factor=0.01, deadline_tolerance_s=0.005)
    result = run_closed_loop(setup)
    assert result.deadline_misses > 0
    assert any(kind == "deadline_miss" for _, kind, _ in result.events)


def test_realtime_environment_keeps_time():
    """An idle real-time run takes about its wall time and misses nothing."""
    import time

    import simpy

    env = DeadlineEnvironment(factor=0.01, tolerance_s=0.05)

    def ticker(env):
        for _ in range(20):
            yield env.timeout(1)

    env.process(ticker(env))
    start = time.monotonic()
    env.run()
    assert time.monotonic() - start >= 0.19
    assert env.misses == []
    assert isinstance(env, simpy.rt.RealtimeEnvironment)


def test_shipped_scenarios_load():
    """Every scenario in scenarios/ validates."""
    for path in (REPO / "scenarios").glob("*.toml"):
        load_scenario(path)


def test_shipped_spaces_name_scenario_keys():
    """Every tuning space in scenarios/spaces/ loads and names only keys of the scenario it
    tunes (named in its header) and of its held-out scenario."""
    from mpc_dose.tune import check_keys, load_space

    for path in (REPO / "scenarios" / "spaces").glob("*.toml"):
        space = load_space(path)
        tuned = re.search(r"mpc-dose tune (\S+)", path.read_text()).group(1)
        check_keys(space, REPO / tuned)
        if space.holdout is not None and space.holdout.scenario:
            check_keys(space, space.resolve(space.holdout.scenario))


def test_layering_of_new_layers():
    """plant/ does not import control/ and control/ does not import plant/ or simpy."""
    control = ("import sys; import mpc_dose.control.baselines, mpc_dose.control.base; "
               "assert 'simpy' not in sys.modules and 'mpc_dose.plant' not in sys.modules")
    plant = ("import sys; import mpc_dose.plant.pump, mpc_dose.plant.sensor, "
             "mpc_dose.plant.cohort; "
             "assert not [m for m in sys.modules if m.startswith('mpc_dose.control')]")
    for code in (control, plant):
        subprocess.run([sys.executable, "-c", code], check=True)


def test_nmpc_scenario_runs_through_the_message_layer():
    """`kind = "nmpc"`: the TIVA training scenario induces patient 1 within 3 minutes."""
    scenario = load_scenario(REPO / "scenarios" / "tiva_nmpc_training.toml")
    setup, patient = build_setup(scenario, 0, 0)
    assert patient.params["propofol_v1"] != setup.controller.theta[
        setup.controller.model.param_index("propofol_v1")]  # the controller's own model
    frame = run_closed_loop(replace(setup, duration_s=180.0)).to_pandas()
    assert frame["true_bis_unitless"].iloc[-1] < 60
    assert frame["commanded_propofol_rate_mg_per_s"].max() <= 6.67 + 1e-9
    assert frame["controller_reason"].str.startswith("CLOSED_LOOP").any()
    ratio = frame["commanded_remifentanil_rate_ug_per_s"] / \
        frame["commanded_propofol_rate_mg_per_s"].where(
            frame["commanded_propofol_rate_mg_per_s"] > 1e-6)
    assert ratio.dropna().between(1.999, 2.001).all()


def test_supervisor_alarms_and_mode_changes_are_events_of_the_run():
    """The controller node's alarms and mode transitions are recorded with the run (events
    and the alarms column): a BIS monitor that only sends error codes (quality invalid)
    puts the PID in FALLBACK with a data.invalid alarm at once; nothing is infused, and the
    one command's lease runs out into the pumps' fallback (no renewal on unusable data)."""
    scenario = load_scenario(PID_SCENARIO, {"sensor.0.error_probability": 1.0})
    setup, _ = build_setup(scenario, 0, 0)
    result = run_closed_loop(replace(setup, duration_s=30.0))
    modes = [(t, text) for t, kind, text in result.events if kind == "mode"]
    alarms = [(t, text.split(":")[0]) for t, kind, text in result.events if kind == "alarm"]
    assert len(modes) == 1 and modes[0][1].startswith("INIT -> FALLBACK: bis flagged invalid")
    t_fallback = modes[0][0]
    lease_s = setup.lease_periods * setup.controller.period_s
    assert alarms == [(t_fallback, "data.invalid"),
                      (t_fallback + lease_s, "pump.lease_expired"),
                      (t_fallback + lease_s, "pump.lease_expired")]
    frame = result.to_pandas()
    assert (frame["alarms"] == "data.invalid").sum() == 1
    assert (frame["delivered_propofol_rate_mg_per_s"] == 0).all()
    assert frame["controller_reason"].iloc[-1].startswith("FALLBACK")


@given(st.sampled_from(["steps", "linear"]),
       st.lists(st.floats(0, 1000), min_size=1, max_size=5, unique=True),
       st.floats(-50, 1100))
def test_disturbance_at_one_time_equals_the_array_evaluation(kind, knots, t):
    """The plant's scalar path gives what the array path gives (0 before the first knot,
    steps or linear between knots, the last value after the last)."""
    knots = sorted(knots)
    values = [float(k % 7) - 3 for k in range(len(knots))]
    d = OutputDisturbance("bis", tuple(knots), tuple(values), kind)
    assert d.value(t) == pytest.approx(float(d.value(np.array([t]))[0]), abs=1e-12)
    assert d.value(knots[0] - 1.0) == 0.0
    assert d.value(knots[-1] + 1.0) == values[-1]
