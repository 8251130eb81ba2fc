"""Sensors: the statistics of each imperfection, their order, common random numbers and the
timing of the simpy sensor process."""

import math
from pathlib import Path

import numpy as np
import pytest
import simpy
from scipy import signal, stats

from mpc_dose.errors import ConfigError
from mpc_dose.model.library import load
from mpc_dose.plant.patient import VirtualPatient
from mpc_dose.plant.sensor import (SensorConfig, SensorNoise, bis_noise_filter,
                                   sensor_process)

N = 20_000      # samples for the white-noise statistics
Z = 5.0         # tolerances are Z standard errors

MODEL = "propofol-schnider+remifentanil-minto+bis-bouillon"
COVARIATES = {"age": 35, "height": 170, "weight": 70, "sex": "male"}


def config(**kw) -> SensorConfig:
    kw.setdefault("period_s", 1.0)
    return SensorConfig(output="bis", var="bis", unit="1", **kw)


def readings(cfg: SensorConfig, rng, n: int = N, true_value: float = 0.0) -> list:
    noise = SensorNoise(cfg, rng)
    return [noise.sample(true_value, k * cfg.period_s) for k in range(n)]


def values(cfg: SensorConfig, rng, n: int = N, true_value: float = 0.0) -> np.ndarray:
    out = readings(cfg, rng, n, true_value)
    assert all(r is not None and r[1] == "valid" for r in out)
    return np.array([r[0] for r in out])


def autocorr(x: np.ndarray, lag: int) -> float:
    x = x - x.mean()
    return float(np.dot(x[:-lag], x[lag:]) / np.dot(x, x))


def patient() -> VirtualPatient:
    lib = load(MODEL)
    return VirtualPatient(lib.model, lib.population.typical_parameters(COVARIATES))


# ------------------------------------------------------------------ white and proportional

def test_additive_noise_is_white_with_the_configured_sd(rng):
    """Additive noise has mean 0, sd additive_sd and no lag-1 autocorrelation."""
    sd = 2.5
    x = values(config(additive_sd=sd), rng, true_value=40.0) - 40.0
    assert abs(x.mean()) < Z * sd / math.sqrt(N)
    assert abs(x.std() - sd) < Z * sd / math.sqrt(2 * N)
    assert abs(autocorr(x, 1)) < Z / math.sqrt(N)


def test_proportional_noise_has_the_configured_cv(rng):
    """The relative error reading/true - 1 has sd proportional_cv and mean 0."""
    cv, true = 0.08, 50.0
    rel = values(config(proportional_cv=cv), rng, true_value=true) / true - 1
    assert abs(rel.mean()) < Z * cv / math.sqrt(N)
    assert abs(rel.std() - cv) < Z * cv / math.sqrt(2 * N)


# ------------------------------------------------------------------ AR(1)

def test_ar1_noise_is_stationary_with_exponential_autocorrelation(rng):
    """AR(1) noise has sd ar1_sd and lag-k autocorrelation exp(-k period/tau) (k = 1, 5)."""
    sd, tau, period, n = 1.7, 5.0, 1.0, 50_000
    x = values(config(ar1_sd=sd, ar1_tau_s=tau, period_s=period), rng, n=n)
    a = math.exp(-period / tau)
    # large-sample variance of the sample variance of an AR(1) process: 2 s^4 / n (1+a^2)/(1-a^2)
    se_sd = sd / math.sqrt(2 * n) * math.sqrt((1 + a**2) / (1 - a**2))
    assert abs(x.std() - sd) < Z * se_sd
    for k in (1, 5):
        # Bartlett's formula for the autocorrelation of an AR(1) process
        var_r = ((1 + a**2) * (1 - a**(2 * k)) / (1 - a**2) - 2 * k * a**(2 * k)) / n
        assert abs(autocorr(x, k) - a**k) < Z * math.sqrt(var_r)


def test_ar1_starts_in_its_stationary_distribution(rng):
    """The first AR(1) value already has sd ar1_sd (no start-up transient)."""
    sd = 3.0
    cfg = config(ar1_sd=sd, ar1_tau_s=60.0)
    first = np.array([SensorNoise(cfg, np.random.default_rng(seed)).sample(0.0, 0.0)[0]
                      for seed in range(4000)])
    assert abs(first.std() - sd) < Z * sd / math.sqrt(2 * len(first))


# ------------------------------------------------------------------ the BIS noise filter

def _bis_filter_impulse_response(n: int = 4000) -> np.ndarray:
    f = bis_noise_filter()
    numd, dend, _ = signal.cont2discrete((f.numerator, f.denominator), 1.0, method="zoh")
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return signal.lfilter(np.ravel(numd), np.ravel(dend), impulse)


def test_bis_noise_filter_sd_and_autocorrelation_match_theory(rng):
    """Filtered BIS noise has the sd and autocorrelation of the ZOH filter driven by white sd 3."""
    h = _bis_filter_impulse_response()
    assert abs(h[-1]) < 1e-12                        # the response has died out
    energy = float(np.sum(h**2))
    sd_theory = 3.0 * math.sqrt(energy)
    assert sd_theory == pytest.approx(1.5, abs=0.1)  # DESIGN: about 1.5, not 3
    rho = np.array([np.dot(h[:len(h) - k], h[k:]) / energy for k in range(len(h))])

    n, burn_in = 120_000, 500
    x = values(config(filtered=bis_noise_filter()), rng, n=n + burn_in)[burn_in:]
    # Bartlett: var(s^2) ~ 2 s^4 / n * sum_k rho_k^2 (k from -inf to inf)
    long_run = 1 + 2 * float(np.sum(rho[1:] ** 2))
    se_sd = sd_theory / math.sqrt(2 * n) * math.sqrt(long_run)
    assert abs(x.std() - sd_theory) < Z * se_sd
    for k in (1, 5, 10):
        # Bartlett's formula, truncated where rho has died out
        m = np.arange(-len(h) + k + 1, len(h) - k)
        r = lambda j: rho[np.abs(j)]  # noqa: E731
        var_r = float(np.sum(r(m) ** 2 + r(m + k) * r(m - k) - 4 * rho[k] * r(m) * r(m - k)
                             + 2 * rho[k] ** 2 * r(m) ** 2)) / n
        assert abs(autocorr(x, k) - rho[k]) < Z * math.sqrt(var_r), k


def test_bis_noise_filter_has_the_design_coefficients():
    """bis_noise_filter is (0.1 s + 1)/(s^2/w^2 + 2 xi s/w + 1) with xi 0.2, w from 0.03 Hz."""
    f = bis_noise_filter()
    xi = 0.2
    w = 2 * math.pi * 0.03 / math.sqrt(1 - 2 * xi**2)
    assert f.sd == 3.0
    assert f.numerator == pytest.approx((0.1, 1.0))
    assert f.denominator == pytest.approx((1 / w**2, 2 * xi / w, 1.0))


# ------------------------------------------------------------------ deterministic parts

def test_drift_adds_drift_per_h_times_hours(rng):
    """Drift adds drift_per_h * t / 3600 to the true value."""
    cfg = config(drift_per_h=-6.0, period_s=60.0)
    noise = SensorNoise(cfg, rng)
    for k in range(200):
        t = 60.0 * k
        value, quality = noise.sample(50.0, t)
        assert quality == "valid"
        assert value == pytest.approx(50.0 - 6.0 * t / 3600, abs=1e-12)


def test_clipping_keeps_readings_in_low_high(rng):
    """Readings are clipped to [low, high], and both bounds are reached by large noise."""
    x = values(config(additive_sd=20.0, low=40.0, high=60.0), rng, n=5000, true_value=50.0)
    assert x.min() == 40.0 and x.max() == 60.0
    inside = x[(x > 40.0) & (x < 60.0)]
    assert len(inside) > 0.2 * len(x)


def test_quantisation_gives_multiples_of_quantum(rng):
    """Quantised readings are multiples of quantum and lie within quantum/2 of the noisy value."""
    q, seed = 0.25, int(rng.integers(2**32))
    x = values(config(additive_sd=3.0, quantum=q), np.random.default_rng(seed), n=5000,
               true_value=50.0)
    assert np.allclose(x / q, np.round(x / q), atol=1e-9)
    raw = values(config(additive_sd=3.0), np.random.default_rng(seed), n=5000, true_value=50.0)
    assert np.all(np.abs(x - raw) <= q / 2 + 1e-9)


def test_quantisation_is_applied_after_clipping(rng):
    """A value clipped to high=10 is then quantised to a multiple of 3 (9), not left at 10."""
    x = values(config(additive_sd=5.0, low=0.0, high=10.0, quantum=3.0), rng, n=2000,
               true_value=9.0)
    assert set(np.unique(x)) <= {0.0, 3.0, 6.0, 9.0}
    assert x.max() == 9.0


def test_dropouts_have_the_configured_frequency_and_give_no_reading(rng):
    """Dropouts happen with dropout_probability per sample and produce None."""
    p = 0.15
    out = readings(config(additive_sd=1.0, dropout_probability=p), rng)
    dropped = sum(r is None for r in out)
    assert abs(dropped - N * p) < Z * math.sqrt(N * p * (1 - p))
    assert all(r[1] == "valid" for r in out if r is not None)


def test_error_codes_are_invalid_with_the_error_value(rng):
    """Error codes give quality 'invalid' with error_value, at error_probability per sample."""
    p, sentinel = 0.1, -1.0
    out = readings(config(additive_sd=1.0, error_probability=p, error_value=sentinel), rng,
                   true_value=50.0)
    invalid = [r for r in out if r[1] == "invalid"]
    assert all(r[0] == sentinel for r in invalid)
    assert all(r[1] in ("valid", "invalid") for r in out)
    assert abs(len(invalid) - N * p) < Z * math.sqrt(N * p * (1 - p))


def test_outliers_have_the_configured_frequency(rng):
    """Outliers (sd outlier_sd) occur at outlier_probability per sample."""
    p, sd_out, threshold = 0.05, 100.0, 10.0
    x = values(config(additive_sd=1.0, outlier_probability=p, outlier_sd=sd_out), rng,
               true_value=50.0) - 50.0
    # an outlier shows when |N(0, 1 + sd_out^2)| exceeds the threshold; plain noise almost never
    p_seen = p * 2 * stats.norm.sf(threshold / math.hypot(1.0, sd_out))
    p_seen += (1 - p) * 2 * stats.norm.sf(threshold)
    seen = int(np.sum(np.abs(x) > threshold))
    assert abs(seen - N * p_seen) < Z * math.sqrt(N * p_seen * (1 - p_seen))


def test_no_noise_reports_the_true_value(rng):
    """With every imperfection off the reading is the true value, 'valid'."""
    noise = SensorNoise(config(), rng)
    assert all(noise.sample(v, float(k)) == (v, "valid")
               for k, v in enumerate(np.linspace(-5, 105, 50)))


# ------------------------------------------------------------------ common random numbers

ALL_FEATURES = dict(additive_sd=1.0, ar1_sd=1.5, ar1_tau_s=20.0, filtered=bis_noise_filter(),
                    outlier_probability=0.02, outlier_sd=15.0, dropout_probability=0.1,
                    error_probability=0.05, error_value=-1.0)


def test_noise_does_not_depend_on_the_true_values():
    """Same seed: same noise, dropouts and error codes whatever the true trajectory (CRN)."""
    n = 3000
    cfg = config(**ALL_FEATURES)
    t = np.arange(n, dtype=float)
    first = SensorNoise(cfg, np.random.default_rng(5))
    second = SensorNoise(cfg, np.random.default_rng(5))
    y1 = 90.0 - 40.0 * (1 - np.exp(-t / 300.0))
    y2 = 95.0 - 30.0 * (1 - np.exp(-t / 100.0)) + 5 * np.sin(t / 50.0)
    for k in range(n):
        a, b = first.sample(float(y1[k]), t[k]), second.sample(float(y2[k]), t[k])
        assert (a is None) == (b is None)
        if a is not None:
            assert a[1] == b[1]
            noise_a = a[0] - y1[k] if a[1] == "valid" else a[0]
            noise_b = b[0] - y2[k] if b[1] == "valid" else b[0]
            assert noise_a == pytest.approx(noise_b, abs=1e-9)


@pytest.mark.parametrize("chunks", [[1] * 50 + [3000], [1000, 24, 1, 2000, 5],
                                    [2047, 1, 1, 1000]])
def test_sample_many_equals_repeated_sample(chunks):
    """sample_many over consecutive chunks gives exactly what one sample() per reading gives."""
    cfg = config(proportional_cv=0.05, drift_per_h=2.0, low=20.0, high=80.0, quantum=0.5,
                 **ALL_FEATURES)
    n = sum(chunks)
    t = np.arange(n, dtype=float)
    y = 50.0 + 20.0 * np.sin(t / 200.0)
    one = SensorNoise(cfg, np.random.default_rng(9))
    single = [one.sample(float(y[k]), t[k]) for k in range(n)]
    many = SensorNoise(cfg, np.random.default_rng(9))
    start, batched = 0, []
    for size in chunks:
        value, valid, emitted = many.sample_many(y[start:start + size], t[start:start + size])
        batched += [None if not e else (float(v), "valid" if ok else "invalid")
                    for v, ok, e in zip(value, valid, emitted)]
        start += size
    assert [r is None for r in single] == [r is None for r in batched]
    for a, b in zip(single, batched):
        if a is not None:
            assert a[1] == b[1] and a[0] == pytest.approx(b[0], abs=1e-9)


def test_same_seed_same_readings():
    """A sensor is reproducible from its seed."""
    cfg = config(**ALL_FEATURES)
    assert (readings(cfg, np.random.default_rng(3), n=2000, true_value=50.0)
            == readings(cfg, np.random.default_rng(3), n=2000, true_value=50.0))


def test_sensor_noise_requires_a_generator():
    """SensorNoise refuses anything but a numpy Generator (no global randomness)."""
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        SensorNoise(config(), 42)


# ------------------------------------------------------------------ the simpy process

@pytest.mark.parametrize("delay", [0.0, 1.5])
def test_sensor_process_timing(delay):
    """Readings are taken at first_sample_s + k period (t_meas) and delivered delay_s later."""
    env = simpy.Environment()
    plant, twin = patient(), patient()
    index = plant.model.input_index("propofol")
    plant.set_rate(0.0, index, 2.0)           # BIS falls: the value pins the sample time
    twin.set_rate(0.0, index, 2.0)
    cfg = SensorConfig(output="bis", var="bis", unit="1", period_s=5.0, delay_s=delay,
                       first_sample_s=2.5, name="bis-monitor")
    got = []
    env.process(sensor_process(env, plant, cfg, SensorNoise(cfg, np.random.default_rng(1)),
                               lambda r: got.append((env.now, r))))
    env.run(until=60.0)
    expected_times = [2.5 + 5.0 * k for k in range(12) if 2.5 + 5.0 * k + delay < 60.0]
    assert [r.t_meas_s for _, r in got] == expected_times
    assert [now for now, _ in got] == [t + delay for t in expected_times]
    bis = twin.model.output_index("bis")
    for _, r in got:
        assert (r.var, r.unit, r.quality, r.sensor) == ("bis", "1", "valid", "bis-monitor")
        assert r.value == pytest.approx(twin.true_outputs(r.t_meas_s)[bis], rel=1e-9)
    assert got[-1][1].value < got[0][1].value - 5   # the drug acts


def test_sensor_process_skips_dropped_samples():
    """A dropped sample is never delivered; the others keep their sample times."""
    env = simpy.Environment()
    cfg = SensorConfig(output="bis", var="bis", unit="1", period_s=1.0, dropout_probability=0.5)
    got = []
    env.process(sensor_process(env, patient(), cfg, SensorNoise(cfg, np.random.default_rng(2)),
                               got.append))
    env.run(until=200.5)
    times = [r.t_meas_s for r in got]
    assert 60 < len(times) < 140
    assert times == sorted(set(times)) and all(t == int(t) for t in times)


# ------------------------------------------------------------------ configuration errors

@pytest.mark.parametrize("kw, match", [
    ({"period_s": -1.0}, "period_s must be > 0"),
    ({"period_s": 0.0}, "period_s must be > 0"),
    ({"period_s": math.inf}, "period_s must be > 0"),
    ({"delay_s": -0.5}, "delay_s must be a finite number >= 0"),
    ({"additive_sd": math.nan}, "additive_sd must be a finite number >= 0"),
    ({"quantum": -0.1}, "quantum must be a finite number >= 0"),
    ({"ar1_tau_s": 0.0}, "ar1_tau_s must be > 0"),
    ({"dropout_probability": 1.5}, "dropout_probability must be in \\[0, 1\\]"),
    ({"error_probability": -0.1}, "error_probability must be in \\[0, 1\\]"),
    ({"outlier_probability": math.nan}, "outlier_probability must be in \\[0, 1\\]"),
    ({"low": 10.0, "high": 10.0}, "low \\(10.0\\) must be below high \\(10.0\\)"),
    ({"low": 100.0, "high": 0.0}, "low \\(100.0\\) must be below high"),
])
def test_invalid_sensor_config_is_an_error(kw, match):
    """Invalid SensorConfig values raise ConfigError naming the field and value."""
    kw.setdefault("period_s", 1.0)
    with pytest.raises(ConfigError, match=f"sensor 'bis': {match}"):
        SensorConfig(output="bis", var="bis", unit="1", **kw)


@pytest.mark.parametrize("drift", [math.nan, math.inf])
def test_non_finite_drift_is_an_error(drift):
    """A non-finite drift_per_h raises ConfigError naming the field."""
    with pytest.raises(ConfigError, match="drift_per_h"):
        SensorConfig(output="bis", var="bis", unit="1", period_s=1.0, drift_per_h=drift)


def test_levels_at_set_clock_times_and_two_sensors_of_one_output():
    """Issue 16.3: practice draws levels at set clock times (04:00 and 15:00), on the
    scenario's clock (the 5-FU run starts at 22:00: samples at 6 h and 17 h of each day);
    two sensors of one output used to crash the recorder (one column, two writers)."""
    from mpc_dose.scenario import load_scenario
    from mpc_dose.trial.build import build_setup
    from mpc_dose.trial.closed_loop import run_closed_loop

    scenario_dir = Path(__file__).resolve().parents[1] / "scenarios"
    sensors = [{"output": "fluorouracil_cp", "sample_clock_h": [4.0]},
               {"output": "fluorouracil_cp", "sample_clock_h": [15.0],
                "proportional_cv": 0.1}]
    scenario = load_scenario(scenario_dir / "fluorouracil_chrono.toml",
                             {"sensor": sensors, "scenario.duration_s": 2 * 86400.0})
    setup, _ = build_setup(scenario, 0, 0)
    assert [s.daily_times_s for s in setup.sensors] == [(6 * 3600.0,), (17 * 3600.0,)]
    frame = run_closed_loop(setup).to_pandas()
    column = frame["measured_fluorouracil_cp_mg_per_L"]
    changes = frame.time_s[column.ne(column.shift()) & column.notna()].tolist()
    assert changes == [6 * 3600.0, 17 * 3600.0, 30 * 3600.0, 41 * 3600.0]
    with pytest.raises(ConfigError, match="give either period_s or sample_clock_h"):
        load_scenario(scenario_dir / "fluorouracil_chrono.toml", {"sensor": [
            {"output": "fluorouracil_cp", "period_s": 3600.0, "sample_clock_h": [4.0]}]})
