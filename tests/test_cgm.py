"""The continuous glucose monitor: Breton & Kovatchev 2008's noise statistics, the
interstitial lag, range limits, signal loss, calibration drift, compression lows, seeding,
scenario errors, the supervisor's stale and flat-line rules, and a closed loop on a
glucose-like output.

The theoretical values are computed here from the published model, independently of the
sensor code: the Johnson SU moments by scipy.stats.johnsonsu, the autocorrelation of
``xi + lambda sinh((e - gamma)/delta)`` for a Gaussian driver ``e`` in closed form.
"""

import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import simpy
from scipy import stats

from mpc_dose.control.base import Reading
from mpc_dose.control.supervisor import SafetyConfig, SafetySupervisor
from mpc_dose.errors import ConfigError
from mpc_dose.model.library import load
from mpc_dose.plant.patient import OutputDisturbance, VirtualPatient
from mpc_dose.plant.sensor import (CGMModel, InterstitialFilter, SensorConfig, SensorNoise,
                                   sensor_process)
from mpc_dose.scenario import load_scenario
from mpc_dose.trial.build import build_setup
from mpc_dose.trial.closed_loop import run_closed_loop

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GLUCOSE_MODEL = HERE / "data" / "glucose_like.toml"

# Breton & Kovatchev 2008, written out here so the test does not read them from the code
PACF_15_MIN = 0.7
XI, LAMBDA, DELTA, GAMMA = -5.471, 15.9574, 1.6898, -0.5444
PERIOD_S = 300.0
QUIET = {"johnson_xi_mg_dl": 0.0, "johnson_lambda_mg_dl": 0.0}   # no noise


def cgm_config(**cgm) -> SensorConfig:
    return SensorConfig("glucose", "cgm", "mg/dL", PERIOD_S, cgm=CGMModel(**cgm))


def run(cfg: SensorConfig, blood, n: int, seed: int = 1, times=None) -> list:
    """Readings of *n* samples every period (or at *times*) of blood glucose *blood*
    (a number or a function of t [s])."""
    noise = SensorNoise(cfg, np.random.default_rng(seed))
    times = np.arange(n) * cfg.period_s if times is None else times
    level = blood if callable(blood) else (lambda t: blood)
    return [noise.sample(level(t), float(t)) for t in times]


def autocorr(x: np.ndarray, lag: int) -> float:
    x = x - x.mean()
    return float(np.dot(x[:-lag], x[lag:]) / np.dot(x, x))


def johnson_autocorrelation(rho: float, sd: float) -> float:
    """Correlation of ``xi + lambda sinh((e1 - gamma)/delta)`` and the same of ``e2`` for
    ``(e1, e2)`` bivariate normal, mean 0, sd *sd*, correlation *rho*:
    ``sinh u sinh v = (cosh(u + v) - cosh(u - v)) / 2`` and ``E cosh W = cosh(m) e^(s^2/2)``
    for ``W ~ N(m, s^2)``."""
    s2 = sd**2 / DELTA**2
    mean_sinh = -math.sinh(GAMMA / DELTA) * math.exp(s2 / 2)

    def cov(r: float) -> float:
        return 0.5 * (math.cosh(2 * GAMMA / DELTA) * math.exp(s2 * (1 + r))
                      - math.exp(s2 * (1 - r))) - mean_sinh**2

    return cov(rho) / cov(1.0)


# ------------------------------------------------------------------ noise statistics

def test_noise_statistics_match_breton_kovatchev():
    """Over a long seeded run (constant blood glucose, no rounding) the error has the mean
    and sd of the Johnson SU of the stationary driver (sd 0.7/sqrt(1 - 0.7^2)) and the
    lag-1, lag-2 and lag-3 (15 min: the published step) autocorrelations of the model."""
    n = 200_000
    cfg = cgm_config(resolution_mg_dl=0.0)
    out = run(cfg, 150.0, n)
    error = np.array([r[0] for r in out]) - 150.0
    driver_sd = PACF_15_MIN / math.sqrt(1 - PACF_15_MIN**2)
    marginal = stats.johnsonsu(a=GAMMA / driver_sd, b=DELTA / driver_sd, loc=XI, scale=LAMBDA)
    # the closed form agrees with scipy's variance at lag 0 (a check of the check)
    assert johnson_autocorrelation(1.0, driver_sd) == pytest.approx(1.0)
    rho5 = PACF_15_MIN ** (PERIOD_S / 900.0)
    theory = {k: johnson_autocorrelation(rho5**k, driver_sd) for k in (1, 2, 3)}
    # standard errors of a strongly autocorrelated series: n / (integrated autocorrelation
    # time) effective samples
    n_eff = n * (1 - theory[1]) / (1 + theory[1])
    assert abs(error.mean() - marginal.mean()) < 4 * marginal.std() / math.sqrt(n_eff)
    # about 3 standard errors (0.6 % over seeds): tight enough to tell the stationary
    # driver (sd 0.98) from a standard normal one (sd 2.8 % larger)
    assert error.std() == pytest.approx(marginal.std(), rel=0.02)
    for k, expected in theory.items():
        assert autocorr(error, k) == pytest.approx(expected, abs=0.01)
    # the published 15-min statistics: lag 1 at 15 min is the driver's 0.7, a bit less
    # after the transform
    assert 0.6 < theory[3] < PACF_15_MIN
    # non-Gaussian: skewed and heavy-tailed like the fitted Johnson SU
    assert stats.skew(error) == pytest.approx(float(marginal.stats(moments="s")), abs=0.25)


def test_published_mean_error_is_reproduced_by_the_johnson_parameters():
    """With a standard normal driver the Johnson SU has the published mean error
    0.76 mg/dL (which fixes the signs of xi and gamma that a reprint lost)."""
    assert stats.johnsonsu(a=GAMMA, b=DELTA, loc=XI, scale=LAMBDA).mean() == \
        pytest.approx(0.76, abs=0.01)


def test_noise_is_exact_for_irregular_sampling():
    """Readings at irregular times keep the driver's correlation 0.7^(dt / 15 min): the
    correlation of pairs 15 min apart taken inside a jittered schedule is the model's."""
    rng = np.random.default_rng(7)
    n = 60_000
    # pairs (t, t + 900 s) separated by random gaps of 2-6 h (nearly independent pairs)
    starts = np.cumsum(rng.uniform(7200, 21600, n))
    times = np.ravel(np.column_stack([starts, starts + 900.0]))
    out = run(cgm_config(resolution_mg_dl=0.0), 150.0, len(times), times=times)
    pairs = np.array([r[0] for r in out]).reshape(-1, 2) - 150.0
    driver_sd = PACF_15_MIN / math.sqrt(1 - PACF_15_MIN**2)
    expected = johnson_autocorrelation(PACF_15_MIN, driver_sd)
    assert np.corrcoef(pairs.T)[0, 1] == pytest.approx(expected, abs=0.02)


# ------------------------------------------------------------------ interstitial lag

def test_interstitial_filter_is_exact_for_a_ramp_at_irregular_times():
    """For blood glucose linear in time the filter gives the ODE's closed form at any
    spacing of the times it is told: IG = BG - tau s + (IG0 - BG0 + tau s) e^(-t/tau)."""
    tau, slope = 300.0, 0.05     # s, mg/dL per s
    times = np.cumsum(np.random.default_rng(3).uniform(1.0, 400.0, 50))
    f = InterstitialFilter(tau)
    f.update(0.0, 100.0)
    for t in times:
        ig = f.update(float(t), 100.0 + slope * t)
        exact = 100.0 + slope * t - tau * slope + tau * slope * math.exp(-t / tau)
        assert ig == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("tau_s", [300.0, 600.0])
def test_a_blood_glucose_step_reaches_63_percent_after_tau(tau_s):
    """In the simpy sensor, a step of blood glucose 100 -> 200 mg/dL shows in the readings
    as 1 - e^-1 = 63.2 % of the step tau after it, and 86.5 % after 2 tau."""
    model = load(GLUCOSE_MODEL.as_posix())
    params = dict(model.population.typical_parameters({}))
    params["glucose_kin"] = 1.0     # baseline kin/kout = 100 mg/dL
    step_at = 3000.0
    patient = VirtualPatient(model.model, params,
                             [OutputDisturbance("glucose", (step_at,), (100.0,), "steps")])
    cfg = SensorConfig("glucose", "cgm", "mg/dL", PERIOD_S, cgm=CGMModel(
        interstitial_tau_s=tau_s, interstitial_step_s=1.0, resolution_mg_dl=0.0, **QUIET))
    env = simpy.Environment()
    got = {}
    env.process(sensor_process(env, patient, cfg, SensorNoise(cfg, np.random.default_rng(0)),
                               lambda r: got.__setitem__(r.t_meas_s, r.value)))
    env.run(until=step_at + 2 * tau_s + 1)
    assert got[step_at - PERIOD_S] == pytest.approx(100.0, abs=1e-9)
    for k, fraction in ((1, 1 - math.exp(-1)), (2, 1 - math.exp(-2))):
        assert (got[step_at + k * tau_s] - 100.0) / 100.0 == pytest.approx(fraction, abs=0.005)


def test_without_sub_steps_the_lag_would_be_wrong():
    """The sub-steps matter: evaluated only at the 5-min readings, a step between them is
    seen as a ramp and the 63 % point moves (the simpy sensor's default sub-step is 60 s)."""
    coarse, fine = InterstitialFilter(300.0), InterstitialFilter(300.0)
    coarse.update(0.0, 100.0)
    fine.update(0.0, 100.0)
    for t in np.arange(1.0, 601.0):
        fine.update(float(t), 100.0 if t < 1 else 200.0)
    for t in (300.0, 600.0):
        coarse.update(t, 200.0)
    assert fine.update(600.0, 200.0) - coarse.update(600.0, 200.0) > 5.0


# ------------------------------------------------------------------ range, gaps, drift

@pytest.mark.parametrize("blood, expected", [(20.0, (40.0, "underflow")),
                                             (39.0, (40.0, "underflow")),
                                             (123.4, (123.0, "valid")),
                                             (400.4, (400.0, "valid")),
                                             (650.0, (400.0, "overflow"))])
def test_range_limits_and_resolution(blood, expected):
    """Readings are whole mg/dL inside 40-400; beyond, the limit flagged underflow (LOW)
    or overflow (HIGH)."""
    out = run(cgm_config(**QUIET), blood, 3)
    assert out == [expected] * 3


def test_range_limits_in_mmol_per_l():
    """A sensor of an output in mmol/L reports in mmol/L with the limits converted."""
    cfg = SensorConfig("glucose", "cgm", "mmol/L", PERIOD_S,
                       cgm=CGMModel(mg_dl_per_unit=18.0156, **QUIET))
    assert run(cfg, 1.0, 1) == [(pytest.approx(40.0 / 18.0156), "underflow")]
    assert run(cfg, 7.0, 1)[0][0] == pytest.approx(126.0 / 18.0156)


@pytest.mark.parametrize("p, mean_s", [(0.01, 1800.0), (0.002, 7200.0)])
def test_signal_loss_gaps_have_the_configured_missing_fraction(p, mean_s):
    """Gaps start with probability p at a reading and last an exponential time: the
    missing fraction is E[N] / (E[N] + (1 - p)/p) with E[N] = 1/(1 - e^(-T/mean)) readings
    lost per gap."""
    n = 200_000
    out = run(cgm_config(gap_probability=p, gap_mean_s=mean_s), 150.0, n)
    missing = np.array([r is None for r in out])
    lost_per_gap = 1.0 / (1.0 - math.exp(-PERIOD_S / mean_s))
    expected = lost_per_gap / (lost_per_gap + (1 - p) / p)
    n_gaps = int(np.sum(missing[1:] & ~missing[:-1]) + missing[0])
    assert missing.mean() == pytest.approx(expected, rel=5 / math.sqrt(n_gaps))
    assert n_gaps == pytest.approx(n * (1 - expected) * p, rel=5 / math.sqrt(n * p))


def test_gaps_do_not_change_the_other_readings():
    """Common random numbers: turning signal loss on removes readings and changes no
    other reading."""
    base = run(cgm_config(), 150.0, 5000)
    gappy = run(cgm_config(gap_probability=0.02), 150.0, 5000)
    assert any(r is None for r in gappy)
    assert all(g == b for g, b in zip(gappy, base) if g is not None)


def test_calibration_drift_follows_the_days_since_calibration():
    """Without noise, reading = (1 + gain error + gain drift d) BG + offset error + offset
    drift d, d days since the last calibration (every 2 days here); the errors are drawn
    anew at each calibration."""
    cfg = cgm_config(calibration_period_s=2 * 86400.0, calibration_gain_sd=0.05,
                     calibration_offset_sd_mg_dl=3.0, gain_drift_per_day=0.02,
                     offset_drift_mg_dl_per_day=-4.0, resolution_mg_dl=0.0, **QUIET)
    n = 6 * 288   # 6 days
    out = np.array([r[0] for r in run(cfg, 100.0, n)])
    t = np.arange(n) * PERIOD_S
    days = (t % (2 * 86400.0)) / 86400.0
    # inside one calibration the reading is linear in d with slope 0.02 * 100 - 4 mg/dL/day
    for c in range(3):
        inside = (t // (2 * 86400.0)) == c
        slope, intercept = np.polyfit(days[inside], out[inside], 1)
        assert slope == pytest.approx(0.02 * 100 - 4.0, abs=1e-9)
        assert intercept != pytest.approx(100.0, abs=1e-6)   # a calibration error
    intercepts = [out[k * 576] for k in range(3)]
    assert len(set(intercepts)) == 3                           # new errors each time


def test_calibration_errors_have_the_configured_sd():
    """Over many calibrations the gain and offset errors have the configured sds (read
    from readings at two blood glucose levels at each calibration instant)."""
    n_cal = 4000
    cfg = cgm_config(calibration_period_s=PERIOD_S, calibration_gain_sd=0.05,
                     calibration_offset_sd_mg_dl=3.0, resolution_mg_dl=0.0,
                     interstitial_tau_s=0.0, **QUIET)
    at_100 = np.array([r[0] for r in run(cfg, 100.0, n_cal, seed=5)])
    at_200 = np.array([r[0] for r in run(cfg, 200.0, n_cal, seed=5)])
    gain = (at_200 - at_100) / 100.0 - 1.0
    offset = at_100 - 100.0 * (1 + gain)
    assert gain.std() == pytest.approx(0.05, rel=5 / math.sqrt(2 * n_cal))
    assert offset.std() == pytest.approx(3.0, rel=5 / math.sqrt(2 * n_cal))


# ------------------------------------------------------------------ compression lows

def test_no_compression_lows_unless_configured():
    """Rate 0 (the default): without noise every reading is the blood glucose."""
    out = run(cgm_config(compression_window_s=(0.0, 86400.0), **QUIET), 150.0, 10 * 288)
    assert {r for r in out} == {(150.0, "valid")}


def test_compression_lows_only_at_night_at_the_configured_rate_and_depth():
    """Compression lows start only inside the night window (23:00-07:00 from t = 0 at
    00:00), at the configured rate per night hour, and never take away more than the
    deepest configured fraction."""
    rate, days = 0.1, 300
    cfg = cgm_config(compression_rate_per_h=rate, compression_window_s=(23 * 3600.0, 7 * 3600.0),
                     compression_depth=(0.2, 0.5), compression_duration_s=(900.0, 3600.0),
                     resolution_mg_dl=0.0, **QUIET)
    n = days * 288
    out = np.array([r[0] for r in run(cfg, 150.0, n)])
    t = np.arange(n) * PERIOD_S
    low = out < 150.0 - 1e-9
    clock_h = (t % 86400.0) / 3600.0
    # an event lasts at most 1 h after starting before 07:00: nothing after 08:00 or
    # before 23:00
    assert not np.any(low & (clock_h >= 8.0) & (clock_h < 23.0))
    assert out.min() >= 150.0 * (1 - 0.5) - 1e-9
    assert out.min() < 150.0 * (1 - 0.2)       # full depth reached
    starts = int(np.sum(low[1:] & ~low[:-1]))
    # events start only when none is under way; at most 1 h of each 8-h night is covered
    expected = rate * 8 * days
    assert expected * 0.8 < starts < expected * 1.05 + 5 * math.sqrt(expected)


# ------------------------------------------------------------------ seeds

def test_same_seed_same_readings_other_seed_other_readings():
    """A CGM's readings are reproducible from its generator, and differ for another."""
    cfg = cgm_config(gap_probability=0.01, compression_rate_per_h=0.5,
                     compression_window_s=(0.0, 86400.0), calibration_gain_sd=0.05)
    assert run(cfg, 150.0, 3000, seed=4) == run(cfg, 150.0, 3000, seed=4)
    assert run(cfg, 150.0, 3000, seed=4) != run(cfg, 150.0, 3000, seed=5)


def test_sample_many_equals_repeated_sample():
    """The batched path of a CGM gives the readings of repeated samples."""
    cfg = cgm_config(gap_probability=0.01)
    blood = 150.0 + 30.0 * np.sin(np.arange(2000) / 50.0)
    values, valid, emitted = SensorNoise(cfg, np.random.default_rng(2)).sample_many(
        blood, np.arange(2000) * PERIOD_S)
    single = run(cfg, lambda t: blood[int(round(t / PERIOD_S))], 2000, seed=2)
    assert list(emitted) == [r is not None for r in single]
    assert [v for v, e in zip(values, emitted) if e] == [r[0] for r in single if r is not None]


# ------------------------------------------------------------------ supervisor rules

def measurement(value: float, t: float, quality: str = "valid") -> Reading:
    return Reading("cgm", value, "mg/dL", t, quality)


def test_a_cgm_stuck_on_one_value_trips_the_flatline_rule():
    """A CGM that reports the same whole mg/dL again and again (no noise: a frozen sensor)
    trips the flat-line rule; the modelled noisy CGM at the same constant glucose does not."""
    config = SafetyConfig(measured="cgm", stale_after_s=600.0, flatline_samples=6)
    frozen, noisy = SafetySupervisor(config), SafetySupervisor(config)
    stuck = run(cgm_config(**QUIET), 120.0, 12)
    moving = run(cgm_config(), 120.0, 12)
    for k, (a, b) in enumerate(zip(stuck, moving)):
        frozen.observe(measurement(a[0], k * PERIOD_S))
        noisy.observe(measurement(b[0], k * PERIOD_S))
    assert frozen.flat and not noisy.flat


def test_cgm_gaps_trip_the_stale_data_rule_in_a_closed_loop():
    """In a closed loop, a CGM signal-loss gap longer than stale_after_s puts the
    controller in FALLBACK with a data.stale alarm, and it never raises the dose then."""
    scenario = load_scenario(_scenario_file(), {"sensor.0.cgm.gap_probability": 0.05,
                                                "sensor.0.cgm.gap_mean_s": 3600.0})
    setup, _ = build_setup(scenario, 0, 0)
    result = run_closed_loop(setup)
    alarms = [text.split(":")[0] for _, kind, text in result.events if kind == "alarm"]
    assert "data.stale" in alarms
    frame = result.to_pandas()
    fallback = frame["controller_mode"] == "FALLBACK"
    assert fallback.any()
    rate = frame["commanded_hormonex_rate_mg_per_s"]
    assert (rate[fallback].to_numpy() <= rate.shift(1)[fallback].fillna(0).to_numpy() + 1e-15).all()


# ------------------------------------------------------------------ scenario files

SCENARIO = """
[scenario]
name = "cgm_glucose_like"
description = "PID on a made-up glucose-like model read by a CGM (test)"
duration_s = 86400
record_step_s = 300
start_clock_h = 20.0

[patient]
model = "{model}"

[patient.population]
size = 1
covariates = {{}}

[[pump]]
pump = "hormonex"
input = "hormonex"
concentration = "1 mg/mL"
max_rate_ml_per_h = 100

[[sensor]]
output = "glucose"
var = "cgm"
period_s = 300
noise = "cgm"

[sensor.cgm]
compression_rate_per_h = 0.2
compression_clock_h = [23, 7]
{extra}

[controller]
kind = "pid"
period_s = 300

[controller.pid]
measured = "cgm"
setpoint = 120
kp = 1e-5
ti_s = 1800
td_s = 0
u_min = 0
u_max = 0.01
ratios = {{ hormonex = 1.0 }}
max_rates = {{ hormonex = 0.01 }}
initial_measurement = 200

[controller.safety]
stale_after_s = 600
"""

def _scenario_file(extra: str = "", tmp: Path | None = None) -> Path:
    import tempfile

    folder = tmp or Path(tempfile.mkdtemp(prefix="cgm_"))
    path = folder / "cgm.toml"
    path.write_text(SCENARIO.format(model=GLUCOSE_MODEL.as_posix(), extra=extra))
    return path


def test_closed_loop_on_a_glucose_like_output(tmp_path):
    """End to end from a scenario file: a PID doses an insulin-like drug on CGM readings of
    a glucose-like output (a made-up model; no glucose model in the library yet). Readings
    are whole mg/dL every 5 min in 40-400, they differ from the true glucose by the
    modelled noise, the loop brings the glucose from 200 mg/dL into 70-180 and keeps it
    there, and the first night shows compression lows only between 23:00 and 08:00."""
    scenario = load_scenario(_scenario_file(tmp=tmp_path))
    setup, _ = build_setup(scenario, 0, 3)
    assert setup.sensors[0].cgm == CGMModel(compression_rate_per_h=0.2,
                                            compression_window_s=(3 * 3600.0, 11 * 3600.0))
    result = run_closed_loop(setup)
    frame = result.to_pandas()
    samples = result.samples_frame()
    assert len(samples) == 289 and np.allclose(np.diff(samples["t_meas_s"]), 300.0)
    assert (samples["value"] == samples["value"].round()).all()
    assert samples["value"].between(40, 400).all()
    true = frame["true_glucose_mg_per_dL"]
    assert true.iloc[0] == pytest.approx(200.0)
    settled = frame["time_s"] >= 4 * 3600
    assert true[settled].between(70, 180).all()
    assert abs(true[settled].mean() - 120.0) < 15.0
    error = frame["measured_cgm_mg_per_dL"] - true
    assert 3.0 < error.std() < 30.0
    assert frame["controller_mode"].iloc[-1] == "CLOSED_LOOP"


def test_closed_loop_is_reproducible_from_the_seed(tmp_path):
    """The same scenario, patient and seed give the same CGM readings; another seed others."""
    scenario = load_scenario(_scenario_file(tmp=tmp_path))

    def readings(seed):
        setup, _ = build_setup(scenario, 0, seed)
        return list(run_closed_loop(replace(setup, duration_s=7200.0)).samples_frame()["value"])

    assert readings(1) == readings(1)
    assert readings(1) != readings(2)


@pytest.mark.parametrize("extra, overrides, match", [
    ("noise_pacf = 1.0", {}, r"noise_pacf"),
    ("bogus_key = 1", {}, r"bogus_key"),
    ("compression_depth = [0.5, 0.2]", {}, r"sensor\[0\]\.cgm\.compression_depth: expected "
                                           r"\(min, max\) fractions"),
    ("", {"sensor.0.cgm.compression_clock_h": [23, 25]},
     r"compression_clock_h: expected clock times"),
    ("compression_duration_s = [900]", {}, r"compression_duration_s: expected two numbers"),
    ("", {"sensor.0.noise": "none"}, r"needs noise = \"cgm\""),
    ("", {"sensor.0.output": "hormonex_cp", "sensor.0.cgm.low_mg_dl": 100.0,
          "sensor.0.cgm.high_mg_dl": 50.0}, r"sensor\[0\]\.cgm\.high_mg_dl: expected a "
                                             r"number above low_mg_dl"),
])
def test_scenario_errors_name_the_cgm_key(tmp_path, extra, overrides, match):
    """A wrong [sensor.cgm] key or value is an error naming it."""
    with pytest.raises((ConfigError, ValueError), match=match):
        scenario = load_scenario(_scenario_file(extra, tmp_path), overrides)
        build_setup(scenario, 0, 0)


def test_compression_lows_need_a_night_window(tmp_path):
    """A compression rate without compression_clock_h is an error (there is no night)."""
    path = _scenario_file(tmp=tmp_path)
    path.write_text(path.read_text().replace("compression_clock_h = [23, 7]\n", "")
                    .replace("start_clock_h = 20.0\n", ""))
    with pytest.raises(ConfigError, match=r"sensor\[0\]\.cgm\.compression_rate_per_h: "
                                          r"compression lows need compression_clock_h"):
        build_setup(load_scenario(path), 0, 0)


def test_a_cgm_on_an_output_that_is_not_a_concentration_is_an_error(tmp_path):
    """noise = "cgm" on an output that is not a mass or molar concentration (BIS, unit 1)
    fails, naming the sensor's output."""
    path = _scenario_file(tmp=tmp_path)
    text = path.read_text().replace(f'model = "{GLUCOSE_MODEL.as_posix()}"',
                                    'model = "propofol-schnider+bis-propofol"')
    text = text.replace('output = "glucose"', 'output = "bis"').replace("hormonex", "propofol")
    text = text.replace("covariates = {}", (
        'covariates = { age = { kind = "uniform", low = 30, high = 40 }, height = { kind = '
        '"uniform", low = 160, high = 180 }, weight = { kind = "uniform", low = 60, high = 80 }'
        ', sex = { kind = "choice", values = ["male"], probabilities = [1.0] } }'))
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"sensor\[0\]\.output: noise = 'cgm' reads glucose"):
        build_setup(load_scenario(path), 0, 0)


def test_schema_comments_state_the_cgm_model_defaults():
    """The scenario reference's "(default X" for each [sensor.cgm] key is CGMModel's own
    default (declared once there; the comment only repeats it for the reader)."""
    source = (REPO / "mpc_dose" / "scenario" / "schema.py").read_text()
    block = source.split("class CGMSpec")[1].split("class SensorSpec")[0]
    found = 0
    for comment, name in re.findall(r"((?:    #:.*\n)+)    (\w+):", block):
        said = re.search(r"\(default (-?[\d.]+)", comment)
        if said is None:
            continue
        found += 1
        default = getattr(CGMModel(), name)
        value = default[0] if isinstance(default, tuple) else default
        assert float(said.group(1)) == pytest.approx(value), name
    assert found >= 15
