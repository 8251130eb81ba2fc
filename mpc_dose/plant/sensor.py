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

All draws come from the sensor's own ``numpy.random.Generator``, in blocks, with the same
number of draws every sample whatever is switched on: two runs that differ only in the
controller see the same noise (common random numbers).
"""

from __future__ import annotations

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

_DRAWS_PER_SAMPLE = 8
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

    def __post_init__(self) -> None:
        where = f"sensor {self.name or self.var!r}"
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ConfigError(f"{where}: period_s must be > 0, got {self.period_s!r}")
        for field in ("delay_s", "first_sample_s", "proportional_cv", "additive_sd", "ar1_sd",
                      "outlier_sd", "quantum"):
            value = getattr(self, field)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{where}: {field} must be a finite number >= 0, "
                                  f"got {value!r}")
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


class SensorNoise:
    """The imperfection chain of one sensor, stepped once per sample (see module docstring)."""

    def __init__(self, config: SensorConfig, rng: np.random.Generator) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.config = config
        self._rng = rng
        self._draws = np.empty((0, _DRAWS_PER_SAMPLE))
        self._next = 0
        self._ar1 = None
        self._ar1_a = math.exp(-config.period_s / config.ar1_tau_s)
        self._filter = None
        if config.filtered is not None:
            f = config.filtered
            # continuous state space first, then ZOH: discretising the transfer function
            # directly leaves a numerator with a vanishing leading term (badly conditioned)
            a, b, c, d, _ = signal.cont2discrete(signal.tf2ss(f.numerator, f.denominator),
                                                 config.period_s, method="zoh")
            self._filter = (a, b.ravel(), c.ravel(), float(np.ravel(d)[0]))
            self._filter_state = np.zeros(a.shape[0])

    def _row(self) -> np.ndarray:
        if self._next >= len(self._draws):
            # uniforms in [0, 1) for the events, normals for the noises: one block at a time
            normals = self._rng.standard_normal((_BLOCK, 5))
            uniforms = self._rng.random((_BLOCK, 3))
            self._draws = np.hstack([normals, uniforms])
            self._next = 0
        row = self._draws[self._next]
        self._next += 1
        return row

    def sample(self, true_value: float, t_s: float) -> tuple[float, str] | None:
        """The reported ``(value, quality)`` for a true value at *t_s*, or None (dropout)."""
        c = self.config
        e_prop, e_add, e_ar1, e_filter, e_outlier, u_outlier, u_dropout, u_error = self._row()
        if self._ar1 is None:  # start the AR(1) process in its stationary distribution
            self._ar1 = c.ar1_sd * e_ar1
        else:
            self._ar1 = self._ar1_a * self._ar1 + math.sqrt(1 - self._ar1_a**2) * c.ar1_sd * e_ar1
        value = true_value * (1 + c.proportional_cv * e_prop) + c.drift_per_h * t_s / 3600
        value += c.additive_sd * e_add + self._ar1
        if self._filter is not None:
            a, b, cc, d = self._filter
            white = c.filtered.sd * e_filter
            value += float(cc @ self._filter_state + d * white)
            self._filter_state = a @ self._filter_state + b * white
        if u_outlier < c.outlier_probability:
            value += c.outlier_sd * e_outlier
        value = min(max(value, c.low), c.high)
        if c.quantum > 0:
            value = round(value / c.quantum) * c.quantum
        if u_dropout < c.dropout_probability:
            return None
        if u_error < c.error_probability:
            return c.error_value, "invalid"
        return value, "valid"


def sensor_process(env: simpy.Environment, patient: VirtualPatient, config: SensorConfig,
                   noise: SensorNoise, deliver: Callable[[SensorReading], None]):
    """simpy process: sample *patient* every period and *deliver* readings after the delay."""
    index = patient.model.output_index(config.output)
    k = 0
    while True:
        t = config.first_sample_s + k * config.period_s
        yield at(env, t, SAMPLE)
        true_value = float(patient.true_outputs(t)[index])
        result = noise.sample(true_value, t)
        if result is not None:
            reading = SensorReading(config.var, result[0], config.unit, t, result[1],
                                    config.name or config.var)
            if config.delay_s == 0:
                deliver(reading)
            else:
                env.process(_deliver_later(env, t + config.delay_s, reading, deliver))
        k += 1


def _deliver_later(env, t_s, reading, deliver):
    yield at(env, t_s, SAMPLE)
    deliver(reading)
