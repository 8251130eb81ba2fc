"""Sensors: sampling, delay and a chain of measurement imperfections.

A reading of output ``y`` at sample time ``t`` goes through, in this order::

    y * (1 + cv e1)                           proportional noise
      + drift_per_h * t / 3600                drift
      + sd e2                                 additive white noise
      + AR(1) with sd, time constant tau      autocorrelated noise
      + H(s)-filtered white noise             e.g. the BIS noise model of DESIGN
      + outlier (probability p, sd)           artefacts
    clip to [low, high], quantise to a step
    dropout (no reading) / error code (quality 'invalid', sentinel value)

and is delivered ``delay_s`` after it was taken (its ``t_meas`` is the sample time).

A continuous glucose monitor (:class:`CGMModel`, ``SensorConfig.cgm``) first turns the true
blood glucose into what the sensor would report before that chain::

    BG -> IG                                  blood-to-interstitial transfer, 1st order, tau
    IG * (1 - compression attenuation)        pressure-induced lows at night
    gain(t) * . + offset(t)                   calibration error drifting since calibration
      + Johnson-SU transformed AR(1) noise    Breton & Kovatchev 2008
    signal-loss gaps (no reading)
    resolution, range limits (quality 'underflow' / 'overflow' at the limits)

(see :class:`CGMModel` for the equations, the sources and which numbers are unverified).

All draws come from the sensor's own ``numpy.random.Generator``, in blocks, one row per
sample with a column for each imperfection switched on: two runs that differ only in the
controller see the same noise (common random numbers).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simpy
from scipy import signal

from ..errors import ConfigError
from .clock import SAMPLE, at
from .patient import VirtualPatient

__all__ = ["CGMModel", "FilteredNoise", "InterstitialFilter", "SensorConfig", "SensorNoise", "SensorReading", "bis_noise_filter",
           "sensor_process"]

_BLOCK = 1024


@dataclass(frozen=True)
class FilteredNoise:
    """White noise of standard deviation *sd*, one value per sample, through the continuous
    transfer function ``numerator(s) / denominator(s)`` (coefficients in s, highest power
    first, s in 1/s) discretised by zero-order hold at the sensor period."""

    sd: float
    numerator: tuple[float, ...]
    denominator: tuple[float, ...]


def bis_noise_filter(sd: float = 3.0) -> FilteredNoise:
    """The BIS measurement noise of the TIVA benchmark (DESIGN): white noise of sd 3 every
    second through ``H(s) = (0.1 s + 1) / (s^2/w^2 + 2 xi s/w + 1)``, ``xi = 0.2``,
    ``w = 2 pi 0.03 / sqrt(1 - 2 xi^2)`` rad/s."""
    xi = 0.2
    w = 2 * math.pi * 0.03 / math.sqrt(1 - 2 * xi**2)
    return FilteredNoise(sd, (0.1, 1.0), (1 / w**2, 2 * xi / w, 1.0))


#: [mg/dL per mmol/L] glucose C6H12O6, molar mass 180.156 g/mol (IUPAC standard atomic
#: weights): 1 mmol/L = 18.0156 mg/dL
GLUCOSE_MG_DL_PER_MMOL_L = 18.0156


@dataclass(frozen=True)
class CGMModel:
    r"""A continuous glucose monitor's error model: what it reports of blood glucose.

    Every number is a setting; the defaults are the published values where there are any,
    and switched off where the literature gives no number (calibration error, signal-loss
    gaps, compression lows: the scenario sets them). Glucose quantities are in mg/dL (the
    published unit); *mg_dl_per_unit* converts the sensed output's own unit.

    **Blood-to-interstitial transfer** (Rebrin et al. 1999, as used by Breton & Kovatchev
    2008): ``dIG/dt = (BG - IG) / tau``, starting at steady state (IG = BG at the first
    sample). Integrated exactly for blood glucose linear between the times it is evaluated
    (first-order hold), whatever their spacing:

    .. math:: IG_1 = BG_1 - \tau s + (IG_0 - BG_0 + \tau s) e^{-\Delta t/\tau},
              \quad s = (BG_1 - BG_0)/\Delta t

    The simpy sensor evaluates blood glucose at least every *interstitial_step_s* between
    readings. Breton & Kovatchev fold the physiological and the sensor lag into one
    diffusion with a time lag of 5 min (``tau = 300 s``); read from the restatement of the
    model in Breton's chapter "Modeling the CGM measurement error" (Glucose Monitoring
    Devices, Elsevier 2020, ch. 12), the 2008 article's full text was not available here.

    **Noise** (Breton & Kovatchev, J Diabetes Sci Technol 2008;2(5):853-862, eq. 7 of the
    chapter): a Gaussian AR(1) driver at the 15-min spacing of their YSI reference,
    ``e_n = 0.7 (e_{n-1} + v_n)``, ``v_n ~ N(0, 1)``, mapped through the Johnson SU
    transform ``eps_n = xi + lambda sinh((e_n - gamma)/delta)`` with xi = -5.471 mg/dL,
    lambda = 15.9574 mg/dL, delta = 1.6898, gamma = -0.5444. The chapter prints lambda as
    15.96 and loses the signs of xi and gamma; 15.9574 and the negative signs are those of
    the UVA/Padova simulator's sensor table (as distributed with simglucose); the signs are
    confirmed by the published error mean 0.76 mg/dL, which they reproduce (0.760 mg/dL for
    a standard normal driver, sd 12.1 mg/dL; for the model's stationary driver, sd 0.980,
    mean 0.718 and sd 11.7 mg/dL; the published sd is 11 mg/dL).
    Between the 15-min steps the driver is the Ornstein-Uhlenbeck process that has exactly
    that AR(1) at 15 min (correlation ``0.7^(dt/15 min)``, stationary variance
    ``0.7^2 / (1 - 0.7^2) = 0.961``), so 5-min or irregular readings keep the published
    15-min statistics. (The UVA/Padova simulator instead interpolates the 15-min values
    linearly and smooths them; that is an implementation choice, not part of the model.)
    The driver starts in its stationary distribution.

    **Calibration** (the form of Facchinetti et al., IEEE TBME 2014;61(3):620: reading =
    a(t) IG + b(t) with a, b drifting with the days since calibration): at each
    calibration (every *calibration_period_s*; never when infinite: a factory-calibrated
    sensor, days counted from t = 0) a gain error ``N(0, calibration_gain_sd)`` and an
    offset ``N(0, calibration_offset_sd_mg_dl)`` are drawn; then
    ``gain = 1 + gain error + gain_drift_per_day d``,
    ``offset = offset error + offset_drift_mg_dl_per_day d`` (d in days since calibration).
    Facchinetti's fitted coefficients (Dexcom SEVEN Plus) could not be checked here, so
    none is a default: all are 0.

    **Compression lows** (pressure-induced sensor attenuation while lying on the sensor:
    Mensh et al., J Diabetes Sci Technol 2013;7(4):863; Baysal et al., J Diabetes Sci
    Technol 2014;8(6):1091): events start at a rate of *compression_rate_per_h* while the
    clock is inside *compression_window_s* (offsets within each day from t = 0, the night),
    last a duration drawn uniform in *compression_duration_s*, and attenuate the sensed
    interstitial glucose by a fraction drawn uniform in *compression_depth*, reached and
    released over *compression_ramp_s* (a fast drop and recovery, the documented shape).
    The published studies describe the phenomenon, not a rate or depth distribution usable
    here: the rate defaults to 0 (none) and the shape defaults (15-60 min, 20-50 % of the
    signal, 5-min ramps) are illustrative, not published.

    **Signal loss**: at each reading outside a gap a gap starts with probability
    *gap_probability*; it lasts an exponential time of mean *gap_mean_s* (no readings, so
    the supervisor's stale-data rule applies). No published rate is used (default 0).

    **Range and resolution**: readings are rounded to *resolution_mg_dl* and reported
    inside [*low_mg_dl*, *high_mg_dl*]; beyond, the reading is the limit with quality
    "underflow" (the device's LOW) or "overflow" (HIGH). 40-400 mg/dL is the range of the
    Dexcom G6/G7 and Medtronic Guardian sensors (their user guides); the FreeStyle Libre 2
    and 3 read up to 500 mg/dL.
    """

    #: [mg/dL per output unit] 1 for mg/dL, 18.0156 for mmol/L, 0.1 for mg/L
    mg_dl_per_unit: float = 1.0
    #: [s] blood-to-interstitial time constant (Breton & Kovatchev 2008: 5 min)
    interstitial_tau_s: float = 300.0
    #: [s] longest step between blood-glucose evaluations of the simpy sensor
    interstitial_step_s: float = 60.0
    #: [s] spacing at which the Gaussian driver is AR(1) with *noise_pacf* (Breton &
    #: Kovatchev 2008: the 15-min spacing of their YSI reference)
    noise_step_s: float = 900.0
    #: [1] the driver's lag-1 partial autocorrelation at *noise_step_s* (Breton 2008: 0.7)
    noise_pacf: float = 0.7
    #: [mg/dL] Johnson SU location xi (Breton & Kovatchev 2008)
    johnson_xi_mg_dl: float = -5.471
    #: [mg/dL] Johnson SU scale lambda (Breton & Kovatchev 2008); 0 with xi 0: no noise
    johnson_lambda_mg_dl: float = 15.9574
    #: [1] Johnson SU shape delta (Breton & Kovatchev 2008)
    johnson_delta: float = 1.6898
    #: [1] Johnson SU shape gamma (Breton & Kovatchev 2008)
    johnson_gamma: float = -0.5444
    #: [s] time between calibrations (inf: never, factory-calibrated)
    calibration_period_s: float = math.inf
    #: [1] sd of the relative gain error drawn at each calibration
    calibration_gain_sd: float = 0.0
    #: [mg/dL] sd of the offset drawn at each calibration
    calibration_offset_sd_mg_dl: float = 0.0
    #: [1/day] change of the gain per day since calibration
    gain_drift_per_day: float = 0.0
    #: [mg/dL/day] change of the offset per day since calibration
    offset_drift_mg_dl_per_day: float = 0.0
    #: [1/reading] chance that a signal-loss gap starts at a reading
    gap_probability: float = 0.0
    #: [s] mean duration of a signal-loss gap (exponential)
    gap_mean_s: float = 1800.0
    #: [1/h] rate of compression lows inside the window
    compression_rate_per_h: float = 0.0
    #: [s] (start, end) offsets within each day from t = 0 when compression lows may start;
    #: end < start wraps over midnight
    compression_window_s: tuple[float, float] = (0.0, 0.0)
    #: [1] (min, max) fraction of the signal lost at the depth of a compression low
    compression_depth: tuple[float, float] = (0.2, 0.5)
    #: [s] (min, max) duration of a compression low
    compression_duration_s: tuple[float, float] = (900.0, 3600.0)
    #: [s] time to reach the full depth, and to recover from it
    compression_ramp_s: float = 300.0
    #: [mg/dL] readings are multiples of it (0: no rounding)
    resolution_mg_dl: float = 1.0
    #: [mg/dL] lowest reportable value
    low_mg_dl: float = 40.0
    #: [mg/dL] highest reportable value
    high_mg_dl: float = 400.0

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"sensor.cgm.{field}: expected {expected}, got "
                                  f"{getattr(self, field)!r}")

        def finite(x) -> bool:
            return isinstance(x, (int, float)) and math.isfinite(x)

        need(finite(self.mg_dl_per_unit) and self.mg_dl_per_unit > 0, "mg_dl_per_unit",
             "a number > 0")
        for name in ("interstitial_tau_s", "johnson_lambda_mg_dl", "calibration_gain_sd",
                     "calibration_offset_sd_mg_dl",
                     "compression_rate_per_h", "compression_ramp_s", "resolution_mg_dl"):
            need(finite(getattr(self, name)) and getattr(self, name) >= 0, name,
                 "a finite number >= 0")
        for name in ("interstitial_step_s", "noise_step_s", "johnson_delta", "gap_mean_s"):
            need(finite(getattr(self, name)) and getattr(self, name) > 0, name,
                 "a finite number > 0")
        for name in ("johnson_xi_mg_dl", "johnson_gamma", "gain_drift_per_day",
                     "offset_drift_mg_dl_per_day"):
            need(finite(getattr(self, name)), name, "a finite number")
        need(finite(self.noise_pacf) and 0 < self.noise_pacf < 1, "noise_pacf",
             "a number in (0, 1)")
        need(self.calibration_period_s > 0 and not math.isnan(self.calibration_period_s),
             "calibration_period_s", "a number > 0 (inf: never)")
        need(0 <= self.gap_probability <= 1, "gap_probability", "a number in [0, 1]")
        window = self.compression_window_s
        need(len(window) == 2 and all(finite(w) and 0 <= w <= 86400 for w in window),
             "compression_window_s", "two offsets [s] in [0, 86400]")
        depth = self.compression_depth
        need(len(depth) == 2 and all(finite(d) for d in depth) and 0 <= depth[0] <= depth[1] <= 1,
             "compression_depth", "(min, max) fractions with 0 <= min <= max <= 1")
        duration = self.compression_duration_s
        need(len(duration) == 2 and all(finite(d) for d in duration)
             and 0 < duration[0] <= duration[1], "compression_duration_s",
             "(min, max) durations [s] with 0 < min <= max")
        need(finite(self.low_mg_dl) and finite(self.high_mg_dl) and
             self.low_mg_dl < self.high_mg_dl, "high_mg_dl",
             f"a number above low_mg_dl ({self.low_mg_dl!r})")

    @property
    def driver_time_constant_s(self) -> float:
        """[s] time constant of the Ornstein-Uhlenbeck driver that is AR(1) with
        *noise_pacf* at *noise_step_s*."""
        return -self.noise_step_s / math.log(self.noise_pacf)

    @property
    def driver_sd(self) -> float:
        """[1] stationary sd of ``e_n = pacf (e_{n-1} + v_n)``: ``pacf / sqrt(1 - pacf^2)``."""
        return self.noise_pacf / math.sqrt(1 - self.noise_pacf**2)

    def in_compression_window(self, t_s: float) -> bool:
        """Whether compression lows may start at *t_s* (the window repeats every day)."""
        start, end = self.compression_window_s
        offset = t_s % 86400.0
        return start <= offset < end if start <= end else (offset >= start or offset < end)


class InterstitialFilter:
    """``dIG/dt = (BG - IG) / tau`` integrated exactly for blood glucose linear between the
    times it is given (see :class:`CGMModel`); any spacing, no fixed step."""

    def __init__(self, tau_s: float) -> None:
        self.tau_s = tau_s
        self._last: tuple[float, float, float] | None = None   # (t, BG, IG)

    def update(self, t_s: float, blood: float) -> float:
        """Interstitial glucose at *t_s* given blood glucose *blood* there (same unit)."""
        if self._last is None or self.tau_s == 0:
            self._last = (t_s, blood, blood)     # steady state at the first evaluation
            return blood
        t0, blood0, ig0 = self._last
        dt = t_s - t0
        if dt < 0:
            raise ValueError(f"interstitial filter: time {t_s} s is before the last ({t0} s)")
        if dt == 0:
            return ig0
        slope = (blood - blood0) / dt
        decay = math.exp(-dt / self.tau_s)
        ig = blood - self.tau_s * slope + (ig0 - blood0 + self.tau_s * slope) * decay
        self._last = (t_s, blood, ig)
        return ig

    @property
    def last_time_s(self) -> float | None:
        return None if self._last is None else self._last[0]


@dataclass(frozen=True)
class SensorConfig:
    """One sensor of model output *output*, reported as variable *var* in *unit*.

    Times in s. Probabilities are per sample.
    """

    output: str
    var: str
    unit: str
    period_s: float
    delay_s: float = 0.0
    first_sample_s: float = 0.0
    proportional_cv: float = 0.0
    additive_sd: float = 0.0
    ar1_sd: float = 0.0
    ar1_tau_s: float = 60.0
    filtered: FilteredNoise | None = None
    drift_per_h: float = 0.0
    outlier_probability: float = 0.0
    outlier_sd: float = 0.0
    low: float = -math.inf
    high: float = math.inf
    quantum: float = 0.0
    dropout_probability: float = 0.0
    error_probability: float = 0.0
    error_value: float = 0.0
    name: str = ""
    #: sample at these times of every day instead of every *period_s*: offsets [s] from
    #: t = 0 within each 24 h (levels drawn at set clock times, e.g. 04:00 and 15:00)
    daily_times_s: tuple[float, ...] = ()
    #: lower limit of quantification: a reading below it is reported as the limit with
    #: quality "underflow" (a laboratory's "< LLOQ"); None: none
    lloq: float | None = None
    #: the laboratory's turnaround varies: each reading comes back after a delay drawn
    #: uniform in [delay_s, delay_max_s] (None: always delay_s)
    delay_max_s: float | None = None
    #: a continuous glucose monitor's error model applied before the chain (None: none)
    cgm: CGMModel | None = None

    def __post_init__(self) -> None:
        where = f"sensor {self.name or self.var!r}"
        if self.cgm is not None and not isinstance(self.cgm, CGMModel):
            raise ConfigError(f"{where}: cgm must be a CGMModel or None, got "
                              f"{type(self.cgm).__name__}")
        if self.delay_max_s is not None and not (math.isfinite(self.delay_max_s) and
                                                 self.delay_max_s >= self.delay_s):
            raise ConfigError(f"{where}: delay_max_s must be >= delay_s ({self.delay_s}), got "
                              f"{self.delay_max_s!r}")
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ConfigError(f"{where}: period_s must be > 0, got {self.period_s!r}")
        if any(not (0 <= t < 86400.0) for t in self.daily_times_s) or \
                list(self.daily_times_s) != sorted(set(self.daily_times_s)):
            raise ConfigError(f"{where}: daily_times_s must be distinct times in [0, 86400) "
                              f"s in order, got {self.daily_times_s!r}")
        for field in ("delay_s", "first_sample_s", "proportional_cv", "additive_sd", "ar1_sd",
                      "outlier_sd", "quantum"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{where}: {field} must be a finite number >= 0, "
                                  f"got {value!r}")
        if not math.isfinite(self.drift_per_h):
            raise ConfigError(f"{where}: drift_per_h must be a finite number, "
                              f"got {self.drift_per_h!r}")
        if not self.ar1_tau_s > 0:
            raise ConfigError(f"{where}: ar1_tau_s must be > 0, got {self.ar1_tau_s!r}")
        for field in ("outlier_probability", "dropout_probability", "error_probability"):
            value = getattr(self, field)
            if not 0 <= value <= 1:
                raise ConfigError(f"{where}: {field} must be in [0, 1], got {value!r}")
        if not self.low < self.high:
            raise ConfigError(f"{where}: low ({self.low}) must be below high ({self.high})")


@dataclass(frozen=True)
class SensorReading:
    """What a sensor reports: *value* of *var* taken at *t_meas_s*, with its quality."""

    var: str
    value: float
    unit: str
    t_meas_s: float
    quality: str
    sensor: str


@functools.lru_cache(maxsize=64)
def _discrete_filter(numerator: tuple[float, ...], denominator: tuple[float, ...],
                     period_s: float) -> tuple[np.ndarray, np.ndarray]:
    """ZOH discretisation of a continuous transfer function, as discrete (b, a).

    Continuous state space first, then ZOH, then the transfer function: discretising the
    transfer function directly is badly conditioned. Cached: cohorts share sensor models.
    """
    a, b, c, d, _ = signal.cont2discrete(signal.tf2ss(numerator, denominator), period_s,
                                         method="zoh")
    num, den = signal.ss2tf(a, b, c, d)
    return np.ravel(num), np.ravel(den)


class SensorNoise:
    """The imperfection chain of one sensor (see module docstring).

    :meth:`sample` steps it once; :meth:`sample_many` steps it over many samples at once with
    numpy and gives exactly what as many :meth:`sample` calls would (same draws, same
    filter states), so the simpy plant and the batched plant agree.
    """

    _NORMALS = ("proportional", "additive", "ar1", "filtered", "outlier", "cgm_driver",
                "cgm_gain", "cgm_offset")
    _UNIFORMS = ("outlier", "dropout", "error", "cgm_gap", "cgm_gap_length", "cgm_compression",
                 "cgm_compression_duration", "cgm_compression_depth")
    #: the per-sample draws of a CGM, kept with the sample's row (used when the sample is
    #: taken, since what they do depends on its time)
    _CGM_DRAWS = tuple(f"e_{k}" for k in _NORMALS if k.startswith("cgm")) + \
        tuple(f"u_{k}" for k in _UNIFORMS if k.startswith("cgm"))

    def __init__(self, config: SensorConfig, rng: np.random.Generator) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.config = c = config
        self._rng = rng
        # draw only what is switched on: the draws of one sample are one row of a block
        used = {"proportional": c.proportional_cv > 0, "additive": c.additive_sd > 0,
                "ar1": c.ar1_sd > 0, "filtered": c.filtered is not None,
                "outlier": c.outlier_probability > 0, "dropout": c.dropout_probability > 0,
                "error": c.error_probability > 0}
        cgm = c.cgm
        # a CGM draws its columns whatever its settings: turning one part on does not shift
        # the draws of another (common random numbers across CGM settings too)
        used.update({k: cgm is not None for k in self._NORMALS + self._UNIFORMS
                     if k.startswith("cgm")})
        self._normals = [n for n in self._NORMALS if used[n]]
        self._uniforms = [n for n in self._UNIFORMS if used[n]]
        self._buffer: dict[str, np.ndarray] = {"factor": np.empty(0), "added": np.empty(0),
                                               "emitted": np.empty(0, dtype=bool),
                                               "valid": np.empty(0, dtype=bool)}
        if cgm is not None:
            self._buffer.update({k: np.empty(0) for k in self._CGM_DRAWS})
            #: blood -> interstitial glucose, in the output's unit
            self.interstitial = InterstitialFilter(cgm.interstitial_tau_s)
            self._cgm_state: dict = {"t": None, "driver": 0.0, "calibration": None,
                                     "gain_error": 0.0, "offset_error": 0.0, "gap_end": -math.inf,
                                     "compression": None}
        self._used = 0
        self._ar1_last: float | None = None
        self._ar1_a = math.exp(-c.period_s / c.ar1_tau_s)
        self._filter = None
        if c.filtered is not None:
            self._filter = _discrete_filter(c.filtered.numerator, c.filtered.denominator,
                                            c.period_s)
            self._filter_state = np.zeros(max(len(self._filter[0]), len(self._filter[1])) - 1)

    def _draw_block(self) -> dict[str, np.ndarray]:
        """The draws of the next _BLOCK samples: normals then uniforms, by name."""
        n_norm, n_unif = len(self._normals), len(self._uniforms)
        normals = self._rng.standard_normal((_BLOCK, n_norm)) if n_norm else None
        uniforms = self._rng.random((_BLOCK, n_unif)) if n_unif else None
        out = {f"e_{k}": normals[:, j] for j, k in enumerate(self._normals)}
        out.update({f"u_{k}": uniforms[:, j] for j, k in enumerate(self._uniforms)})
        return out

    def _noise_block(self) -> dict[str, np.ndarray]:
        """The value-independent part of the next _BLOCK samples: the proportional factor,
        the sum of additive noises (white, AR(1), filtered, outliers), validity and dropout.
        Computed a block at a time, whoever consumes it: one sample or many."""
        c = self.config
        d = self._draw_block()
        n = _BLOCK
        factor = 1 + c.proportional_cv * d["e_proportional"] if "e_proportional" in d \
            else np.ones(n)
        added = c.additive_sd * d["e_additive"] if "e_additive" in d else np.zeros(n)
        if "e_ar1" in d:
            scale = math.sqrt(1 - self._ar1_a**2) * c.ar1_sd
            e = d["e_ar1"]
            ar = np.empty(n)
            start = 0
            if self._ar1_last is None:  # start the process in its stationary distribution
                ar[0], start = c.ar1_sd * e[0], 1
            previous = ar[0] if start else self._ar1_last
            ar[start:], _ = signal.lfilter([scale], [1.0, -self._ar1_a], e[start:],
                                           zi=[self._ar1_a * previous])
            self._ar1_last = float(ar[-1])
            added += ar
        if self._filter is not None:
            num, den = self._filter
            filtered, self._filter_state = signal.lfilter(
                num, den, c.filtered.sd * d["e_filtered"], zi=self._filter_state)
            added += filtered
        if "u_outlier" in d:
            added += np.where(d["u_outlier"] < c.outlier_probability,
                              c.outlier_sd * d["e_outlier"], 0.0)
        emitted = d["u_dropout"] >= c.dropout_probability if "u_dropout" in d else \
            np.ones(n, dtype=bool)
        valid = d["u_error"] >= c.error_probability if "u_error" in d else np.ones(n, dtype=bool)
        block = {"factor": factor, "added": added, "emitted": emitted, "valid": valid}
        if c.cgm is not None:
            block.update({k: d[k] for k in self._CGM_DRAWS})
        return block

    def _take(self, n: int) -> dict[str, np.ndarray]:
        while len(self._buffer["factor"]) - self._used < n:
            block = self._noise_block()
            self._buffer = {k: np.concatenate([v[self._used:], block[k]])
                            for k, v in self._buffer.items()}
            self._used = 0
        out = {k: v[self._used:self._used + n] for k, v in self._buffer.items()}
        self._used += n
        return out

    def _finish(self, value: np.ndarray) -> np.ndarray:
        c = self.config
        if c.low > -math.inf or c.high < math.inf:
            value = np.clip(value, c.low, c.high)
        if c.quantum > 0:
            value = np.round(value / c.quantum) * c.quantum
        return value

    def observe_blood(self, t_s: float, blood: float) -> None:
        """Tell a CGM the blood glucose *blood* (output unit) at *t_s* between its samples,
        so its interstitial glucose follows the trajectory, not only the sample values."""
        if self.config.cgm is None:
            raise ConfigError(f"sensor {self.config.name or self.config.var!r} is not a CGM")
        self.interstitial.update(t_s, blood)

    def _cgm_signal(self, blood: float, t_s: float, buffer: dict, k: int
                    ) -> tuple[float, bool]:
        """A CGM's reading before the generic chain (output unit) from blood glucose *blood*
        at *t_s*, and whether it is emitted (False inside a signal-loss gap). Advances the
        CGM's state: call once per sample, in time order."""
        m = self.config.cgm
        state = self._cgm_state
        scale = m.mg_dl_per_unit
        interstitial_mg = self.interstitial.update(t_s, blood) * scale
        previous_t = state["t"]
        dt = self.config.period_s if previous_t is None else t_s - previous_t
        state["t"] = t_s
        # Gaussian driver: the Ornstein-Uhlenbeck process whose 15-min samples are Breton's
        # AR(1); exact at any spacing, started in its stationary distribution
        sd = m.driver_sd
        if previous_t is None:
            driver = sd * buffer["e_cgm_driver"][k]
        else:
            a = math.exp(-dt / m.driver_time_constant_s)
            driver = a * state["driver"] + math.sqrt(1 - a * a) * sd * buffer["e_cgm_driver"][k]
        state["driver"] = driver
        noise_mg = m.johnson_xi_mg_dl + m.johnson_lambda_mg_dl * math.sinh(
            (driver - m.johnson_gamma) / m.johnson_delta)
        # calibration: new errors at each calibration, drift with the days since
        calibration = 0 if math.isinf(m.calibration_period_s) else \
            math.floor(t_s / m.calibration_period_s)
        if calibration != state["calibration"]:
            state["calibration"] = calibration
            state["gain_error"] = m.calibration_gain_sd * buffer["e_cgm_gain"][k]
            state["offset_error"] = m.calibration_offset_sd_mg_dl * buffer["e_cgm_offset"][k]
        days = (t_s - calibration * m.calibration_period_s if calibration else t_s) / 86400.0
        gain = 1.0 + state["gain_error"] + m.gain_drift_per_day * days
        offset_mg = state["offset_error"] + m.offset_drift_mg_dl_per_day * days
        # compression low: (start, duration, depth) of the event under way
        event = state["compression"]
        if event is not None and t_s >= event[0] + event[1]:
            event = state["compression"] = None
        if event is None and m.compression_rate_per_h > 0 and m.in_compression_window(t_s) \
                and buffer["u_cgm_compression"][k] < -math.expm1(-m.compression_rate_per_h *
                                                                 dt / 3600.0):
            low_d, high_d = m.compression_duration_s
            low_f, high_f = m.compression_depth
            event = state["compression"] = (
                t_s, low_d + (high_d - low_d) * buffer["u_cgm_compression_duration"][k],
                low_f + (high_f - low_f) * buffer["u_cgm_compression_depth"][k])
        attenuation = 0.0
        if event is not None:
            since, remaining = t_s - event[0], event[0] + event[1] - t_s
            ramp = m.compression_ramp_s
            shape = 1.0 if ramp == 0 else min(1.0, since / ramp, remaining / ramp)
            attenuation = event[2] * shape
        sensed_mg = gain * interstitial_mg * (1.0 - attenuation) + offset_mg + noise_mg
        # signal loss
        emitted = True
        if t_s < state["gap_end"]:
            emitted = False
        elif buffer["u_cgm_gap"][k] < m.gap_probability:
            state["gap_end"] = t_s - m.gap_mean_s * math.log1p(-buffer["u_cgm_gap_length"][k])
            emitted = False
        return sensed_mg / scale, emitted

    def _cgm_finish(self, value: float) -> tuple[float, str]:
        """Resolution and range of a CGM (output unit): the limit with quality 'underflow'
        or 'overflow' beyond it."""
        m = self.config.cgm
        mg = value * m.mg_dl_per_unit
        if m.resolution_mg_dl > 0:
            mg = round(mg / m.resolution_mg_dl) * m.resolution_mg_dl
        if mg < m.low_mg_dl:
            return m.low_mg_dl / m.mg_dl_per_unit, "underflow"
        if mg > m.high_mg_dl:
            return m.high_mg_dl / m.mg_dl_per_unit, "overflow"
        return mg / m.mg_dl_per_unit, "valid"

    def sample_many(self, true_values: np.ndarray, times_s: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Readings for consecutive samples: ``(values, valid, emitted)`` arrays.

        ``valid`` is False where an error code replaced the value (quality 'invalid');
        ``emitted`` is False for dropouts (no reading at all). A CGM is stepped sample by
        sample (its interstitial glucose then sees the blood glucose only at *times_s*).
        """
        c = self.config
        if c.cgm is not None:
            out = [self.sample(float(y), float(t)) for y, t in
                   zip(np.asarray(true_values, dtype=float), np.asarray(times_s, dtype=float))]
            emitted = np.array([r is not None for r in out], dtype=bool)
            valid = np.array([r is not None and r[1] != "invalid" for r in out], dtype=bool)
            value = np.array([math.nan if r is None else r[0] for r in out])
            return value, valid, emitted
        y = np.asarray(true_values, dtype=float)
        d = self._take(y.size)
        value = y * d["factor"] + d["added"]
        if c.drift_per_h:
            value += c.drift_per_h * np.asarray(times_s, dtype=float) / 3600.0
        value = np.where(d["valid"], self._finish(value), c.error_value)
        return value, d["valid"].copy(), d["emitted"].copy()

    def turnaround(self, low_s: float, high_s: float) -> float:
        """A laboratory delay [s] drawn uniform in [low_s, high_s] (the noise stream)."""
        return float(self._rng.uniform(low_s, high_s))

    def sample(self, true_value: float, t_s: float) -> tuple[float, str] | None:
        """The reported ``(value, quality)`` for a true value at *t_s*, or None (dropout)."""
        c = self.config
        if self._used >= len(self._buffer["factor"]):
            self._buffer, self._used = self._noise_block(), 0
        k = self._used
        self._used += 1
        buffer = self._buffer
        if c.cgm is not None:    # its state advances at every sample, reported or not
            true_value, cgm_emitted = self._cgm_signal(true_value, t_s, buffer, k)
            if not cgm_emitted:
                return None
        if not buffer["emitted"][k]:
            return None
        if not buffer["valid"][k]:
            return c.error_value, "invalid"
        value = true_value * buffer["factor"][k] + buffer["added"][k] \
            + c.drift_per_h * t_s / 3600.0
        value = min(max(value, c.low), c.high)
        if c.quantum > 0:
            value = round(value / c.quantum) * c.quantum
        if c.lloq is not None and value < c.lloq:
            return float(c.lloq), "underflow"
        if c.cgm is not None:
            value, quality = self._cgm_finish(value)
            return float(value), quality
        return float(value), "valid"


def sensor_process(env: simpy.Environment, patient: VirtualPatient, config: SensorConfig,
                   noise: SensorNoise, deliver: Callable[[SensorReading], None]):
    """simpy process: sample *patient* every period (or at the daily times) and *deliver*
    readings after the delay."""
    index = patient.model.output_index(config.output)
    k = 0
    while True:
        if config.daily_times_s:
            day, slot = divmod(k, len(config.daily_times_s))
            t = day * 86400.0 + config.daily_times_s[slot]
            if t < config.first_sample_s:   # the first draws of a course come later
                k += 1
                continue
        else:
            t = config.first_sample_s + k * config.period_s
        if config.cgm is not None and config.cgm.interstitial_tau_s > 0:
            # the interstitial glucose follows blood glucose between readings: evaluate it
            # at most interstitial_step_s apart (evenly over an irregular gap)
            last = noise.interstitial.last_time_s
            if last is not None and t - last > config.cgm.interstitial_step_s:
                n_steps = math.ceil((t - last) / config.cgm.interstitial_step_s)
                for j in range(1, n_steps):
                    t_sub = last + (t - last) * j / n_steps
                    yield at(env, t_sub, SAMPLE)
                    noise.observe_blood(t_sub, float(patient.true_outputs(t_sub)[index]))
        yield at(env, t, SAMPLE)
        true_value = float(patient.true_outputs(t)[index])
        result = noise.sample(true_value, t)
        if result is not None:
            reading = SensorReading(config.var, result[0], config.unit, t, result[1],
                                    config.name or config.var)
            delay = config.delay_s if config.delay_max_s is None else \
                noise.turnaround(config.delay_s, config.delay_max_s)
            if delay == 0:
                deliver(reading)
            else:
                env.process(_deliver_later(env, t + delay, reading, deliver))
        k += 1


def _deliver_later(env, t_s, reading, deliver):
    yield at(env, t_s, SAMPLE)
    deliver(reading)
