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

__all__ = ["FilteredNoise", "SensorConfig", "SensorNoise", "SensorReading", "bis_noise_filter",
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

    def __post_init__(self) -> None:
        where = f"sensor {self.name or self.var!r}"
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

    _NORMALS = ("proportional", "additive", "ar1", "filtered", "outlier")
    _UNIFORMS = ("outlier", "dropout", "error")

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
        self._normals = [n for n in self._NORMALS if used[n]]
        self._uniforms = [n for n in self._UNIFORMS if used[n]]
        self._buffer: dict[str, np.ndarray] = {"factor": np.empty(0), "added": np.empty(0),
                                               "emitted": np.empty(0, dtype=bool),
                                               "valid": np.empty(0, dtype=bool)}
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
        return {"factor": factor, "added": added, "emitted": emitted, "valid": valid}

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

    def sample_many(self, true_values: np.ndarray, times_s: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Readings for consecutive samples: ``(values, valid, emitted)`` arrays.

        ``valid`` is False where an error code replaced the value (quality 'invalid');
        ``emitted`` is False for dropouts (no reading at all).
        """
        c = self.config
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
