"""The scenario file (TOML) schema, validated on load.

Unknown keys, wrong types and wrong units are errors naming the dotted path and, for a
misspelt key, the nearest valid one. Quantities carry their unit in the key
(``duration_s``, ``max_rate_ml_per_h``) or, where the unit depends on the drug, in the value
(``concentration = "10 mg/mL"``).
"""

from __future__ import annotations

import math
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, \
    model_validator

from ..errors import ConfigError, closest

__all__ = ["Scenario", "load_scenario", "parse_scenario", "read_scenario_data",
           "with_overrides", "PATH_KEYS", "MODEL_KEYS"]

#: scenario keys whose values are file paths (relative to the scenario's folder)
PATH_KEYS = ("patient.table.path", "controller.fixed.doses")
#: scenario keys whose values are model names: library entries and model files (``.toml``,
#: relative to the scenario's folder) joined by ``+``
MODEL_KEYS = ("patient.model", "controller.tci.model", "controller.nmpc.model",
              "controller.mipd.model")


#: a number in the unit the key implies (the output's, for an output value), or a string
#: with its own unit ("70 mmHg", "15 mg/L"), converted when the scenario is built
Quantity = typing.Union[float, str]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScenarioInfo(_Strict):
    #: the scenario's name (reports; the random streams' name unless cohort is given)
    name: str
    #: one line saying what the scenario shows
    description: str = ""
    #: the simulated time [s] from t = 0
    duration_s: float = Field(gt=0)
    #: the series is recorded every record_step_s [s]; the true-output metrics weigh each
    #: record by it
    record_step_s: float = Field(1.0, gt=0)
    #: the seed of the patients, noise and disturbances; the command's --seed replaces it
    seed: int = Field(0, ge=0)
    #: one-way transport delay of every message between plant and controller [s]
    latency_s: float = Field(0.0, ge=0)
    #: the clock time of day at t = 0 [h, 0-24) (e.g. 22.0 for 22:00): the patient's and the
    #: controller's models with a body clock (parameter clock_time_at_t0) both run on it
    start_clock_h: float | None = Field(None, ge=0, lt=24)
    #: the name of the random streams (default: *name*): scenarios with the same cohort,
    #: seed and patient number get the same patients, noise and disturbances (common random
    #: numbers when comparing controllers)
    cohort: str | None = None

    @property
    def streams_name(self) -> str:
        return self.cohort or self.name


class CovariateDistributionSpec(_Strict):
    """How a covariate is drawn (plant/cohort.py CovariateDistribution)."""

    #: uniform: between low and high; normal: mean and sd, clipped to [low, high];
    #: lognormal: median and sd_log, truncated to [low, high]; choice: one of values with
    #: probabilities
    kind: Literal["uniform", "normal", "lognormal", "choice"]
    #: [covariate unit] the lower end (uniform) or bound (normal, lognormal)
    low: float = -math.inf
    #: [covariate unit] the upper end (uniform) or clip (normal)
    high: float = math.inf
    #: [covariate unit] normal: the mean
    mean: float = 0.0
    #: [covariate unit] normal: the standard deviation
    sd: float = 0.0
    #: [covariate unit] lognormal: the median
    median: float = 1.0
    #: lognormal: the standard deviation of the logarithm
    sd_log: float = Field(0.0, ge=0)
    #: choice: the categories
    values: list[str] = []
    #: choice: the probability of each category, in the order of values
    probabilities: list[float] = []


class PopulationSpec(_Strict):
    #: the number of patients (numbered 1 to size), each drawn from the seed and its number
    size: int = Field(gt=0)
    #: each covariate's distribution, by the model's covariate name
    covariates: dict[str, CovariateDistributionSpec]


class TableSpec(_Strict):
    #: the cohort file; "" declares the columns only: the population is used unless a
    #: cohort file is given (``mpc-dose trial --cohort FILE``)
    path: str
    #: a covariate or model parameter (optionally with its unit in the name: height_cm) ->
    #: the table column holding it; with a layout, these add to or replace its mapping
    columns: dict[str, str] = {}
    #: a categorical covariate -> {table code: category}, e.g. {sex = {"1" = "male"}}
    codes: dict[str, dict[str, str]] = {}
    #: a table layout the patient's model reads itself (`mpc-dose models NAME` says which):
    #: "simglucose" for glucose-uva-padova reads simglucose's vpatient_params.csv, its
    #: columns mapped and converted by the model; empty: columns only
    layout: str = ""

    @model_validator(mode="after")
    def _columns_or_layout(self):
        if not self.columns and not self.layout:
            raise ValueError("give columns (covariate or parameter -> table column) or a "
                             "layout the model reads (e.g. layout = \"simglucose\")")
        return self


class PatientSpec(_Strict):
    #: a library name (`mpc-dose models` lists them) or a model file (``"models/x.toml"``,
    #: from the scenario's folder); a + b composes two
    model: str
    #: draw each patient's between-subject variability; false: the typical patient for the
    #: covariates
    random_effects: bool = False
    table: TableSpec | None = None
    population: PopulationSpec | None = None
    #: individual parameter values for every patient (declared units), applied last
    params: dict[str, float] = {}
    #: start times of later occasions: inter-occasion variability is drawn anew at each
    occasions_s: list[float] = []


class CovariateChangeSpec(_Strict):
    """From *time_s* on (or a time drawn per patient, uniform in *time_range_s*), with
    *probability* per patient, the covariates take the values of *covariates* and those of
    *scale* are multiplied by it (others unchanged): acute kidney injury, recovery. The
    draws come from each patient's own stream, the same in every scenario of a cohort."""

    #: from this time on (or give time_range_s)
    time_s: float | None = Field(None, ge=0)
    #: [s] a time drawn per patient, uniform between the two
    time_range_s: tuple[float, float] | None = None
    #: [fraction] the chance that a patient has this change
    probability: float = Field(1.0, ge=0, le=1)
    #: covariate -> its new value (a number in the covariate's unit, or a category)
    covariates: dict[str, float | str] = {}
    #: covariate -> the factor its value in force is multiplied by
    scale: dict[str, float] = {}

    @model_validator(mode="after")
    def _when_and_what(self):
        if (self.time_s is None) == (self.time_range_s is None):
            raise ValueError("give either time_s or time_range_s (a time drawn per patient)")
        if self.time_range_s is not None and not 0 <= self.time_range_s[0] <= \
                self.time_range_s[1]:
            raise ValueError(f"time_range_s: expected 0 <= start <= end, got "
                             f"{list(self.time_range_s)}")
        if not self.covariates and not self.scale:
            raise ValueError("give covariates (new values) or scale (factors)")
        for name, factor in self.scale.items():
            if not (math.isfinite(factor) and factor > 0):
                raise ValueError(f"scale.{name} = {factor!r}: expected a factor > 0")
        return self


class DisturbanceSpec(_Strict):
    #: the model output the disturbance is added to
    output: str
    #: [s] the times of the values
    times_s: list[float]
    #: [output unit] added to the output from each time
    values: list[float]
    #: steps: each value held until the next time; linear: interpolated between times
    kind: Literal["steps", "linear"] = "steps"


class PumpSpec(_Strict):
    #: the pump's name (messages, alarms, the series' columns)
    pump: str
    #: the model input the pump feeds
    input: str
    #: [drug amount per volume, in the value: "10 mg/mL"] the drug in the syringe
    concentration: str
    #: the pump's highest rate; the pump rejects faster commands (it does not clamp them)
    max_rate_ml_per_h: float = Field(1200.0, gt=0)
    #: the pump's rate step (commands are rounded to it); 0: any rate
    resolution_ml_per_h: float = Field(0.0, ge=0)
    #: from a start (a rate after none) to the start of the flow
    startup_lag_s: float = Field(0.0, ge=0)
    #: the volume in the syringe (the pump stops and alarms when it is empty)
    syringe_volume_ml: float = Field(math.inf, gt=0)
    #: the rate the pump keeps by itself when a command's lease runs out; 0: stop
    fallback_ml_per_h: float = Field(0.0, ge=0)
    #: an occlusion from this time on (no flow); none: never
    occlusion_at_s: float | None = None
    #: from the occlusion to the pump's alarm
    occlusion_detection_s: float = Field(30.0, ge=0)
    #: [drug amount, in the value: "10 U"] the largest bolus; set, the pump takes bolus
    #: commands (protocol 1.1) and a basal_bolus controller sends its boluses as such
    max_bolus: str | None = None
    #: [drug amount: "0.05 U"] bolus step: a bolus is rounded DOWN to it; none: any amount
    bolus_increment: str | None = None
    #: [drug amount per time: "1.5 U/min"] the bolus speed; none: 0.9 mL/h (1.5 U/min of
    #: U-100 insulin)
    bolus_speed: str | None = None
    #: [drug amount per time: "0.05 U/h"] the basal rate step (the rate's resolution; not
    #: with resolution_ml_per_h)
    basal_increment: str | None = None
    #: [drug amount per time: "3 U/h"] the highest basal rate: faster rate commands are
    #: refused (with max_rate_ml_per_h, the lower counts)
    max_basal: str | None = None
    #: [drug amount per time: "0.4 U/h"] the pump's programmed basal, which it returns to
    #: when a command's lease (a temporary basal) runs out: its fallback (not with
    #: fallback_ml_per_h)
    programmed_basal: str | None = None


class FilteredNoiseSpec(_Strict):
    #: [output unit] standard deviation of the white noise, one value per sample
    sd: float = Field(ge=0)
    #: transfer function numerator in s (highest power first, s in 1/s), discretised at the
    #: sensor period
    numerator: list[float]
    #: transfer function denominator in s (highest power first)
    denominator: list[float]


class CGMSpec(_Strict):
    """A continuous glucose monitor's error model (used with ``noise = "cgm"``): the
    Breton & Kovatchev 2008 noise and interstitial lag, calibration drift, signal loss and
    compression lows. A key left out keeps the model's default, declared once with its
    source in ``mpc_dose.plant.sensor.CGMModel`` (glucose settings in mg/dL whatever the
    output's unit; the output must be a mass or molar concentration)."""

    #: blood-to-interstitial time constant (default 300 s, Breton & Kovatchev 2008)
    interstitial_tau_s: float | None = Field(None, ge=0)
    #: longest step between blood-glucose evaluations for the interstitial lag (default 60 s)
    interstitial_step_s: float | None = Field(None, gt=0)
    #: spacing of the published AR(1) noise driver (default 900 s, Breton 2008)
    noise_step_s: float | None = Field(None, gt=0)
    #: [1] lag-1 partial autocorrelation of the driver at noise_step_s (default 0.7)
    noise_pacf: float | None = Field(None, gt=0, lt=1)
    #: [mg/dL] Johnson SU location xi of the noise (default -5.471)
    johnson_xi_mg_dl: float | None = None
    #: [mg/dL] Johnson SU scale lambda (default 15.9574; 0, with xi 0: no noise)
    johnson_lambda_mg_dl: float | None = Field(None, ge=0)
    #: [1] Johnson SU shape delta (default 1.6898)
    johnson_delta: float | None = Field(None, gt=0)
    #: [1] Johnson SU shape gamma (default -0.5444)
    johnson_gamma: float | None = None
    #: time between calibrations (default: never, a factory-calibrated sensor)
    calibration_period_s: float | None = Field(None, gt=0)
    #: [1] sd of the relative gain error drawn at each calibration (default 0)
    calibration_gain_sd: float | None = Field(None, ge=0)
    #: [mg/dL] sd of the offset drawn at each calibration (default 0)
    calibration_offset_sd_mg_dl: float | None = Field(None, ge=0)
    #: [1/day] gain change per day since calibration (default 0)
    gain_drift_per_day: float | None = None
    #: [mg/dL/day] offset change per day since calibration (default 0)
    offset_drift_mg_dl_per_day: float | None = None
    #: [1/reading] chance that a signal-loss gap starts at a reading (default 0)
    gap_probability: float | None = Field(None, ge=0, le=1)
    #: mean duration of a signal-loss gap, exponential (default 1800 s)
    gap_mean_s: float | None = Field(None, gt=0)
    #: [1/h] rate of compression lows inside compression_clock_h (default 0: none)
    compression_rate_per_h: float | None = Field(None, ge=0)
    #: [h] [start, end] clock times of day when compression lows may start (e.g. [23, 7]:
    #: over midnight), on the scenario's clock
    compression_clock_h: list[float] | None = None
    #: [1] [min, max] fraction of the signal lost at a compression low's depth (default
    #: [0.2, 0.5], illustrative)
    compression_depth: list[float] | None = None
    #: [s] [min, max] duration of a compression low (default [900, 3600], illustrative)
    compression_duration_s: list[float] | None = None
    #: time to reach a compression low's depth and to recover (default 300 s)
    compression_ramp_s: float | None = Field(None, ge=0)
    #: [mg/dL] readings are multiples of it (default 1)
    resolution_mg_dl: float | None = Field(None, ge=0)
    #: [mg/dL] lowest reportable value, below it the reading is this with quality
    #: "underflow" (default 40)
    low_mg_dl: float | None = None
    #: [mg/dL] highest reportable value, above it the reading is this with quality
    #: "overflow" (default 400)
    high_mg_dl: float | None = None

    @model_validator(mode="after")
    def _pairs(self):
        for name in ("compression_clock_h", "compression_depth", "compression_duration_s"):
            value = getattr(self, name)
            if value is not None and len(value) != 2:
                raise ValueError(f"{name}: expected two numbers [start/min, end/max], got "
                                 f"{value}")
        if self.compression_clock_h is not None and \
                any(not 0 <= h <= 24 for h in self.compression_clock_h):
            raise ValueError(f"compression_clock_h: expected clock times in [0, 24] h, got "
                             f"{self.compression_clock_h}")
        return self


class SensorSpec(_Strict):
    #: the model output the sensor reads
    output: str
    #: the name its readings carry (the controller's and the supervisor's measured); the
    #: output's name when not given
    var: str | None = None
    #: every period_s, from first_sample_s; or at the clock times of every day
    period_s: float | None = Field(None, gt=0)
    #: clock times of day [h] at which samples are drawn every day (e.g. [4, 15] for 04:00 and
    #: 15:00), on the scenario's clock (scenario.start_clock_h; 0:00 at t = 0 when not given)
    sample_clock_h: list[float] | None = None
    #: a reading arrives this long after its sample time (its time stays the sample time)
    delay_s: float = Field(0.0, ge=0)
    #: a delay drawn per reading, uniform in [delay_s, delay_max_s] (laboratory turnaround)
    delay_max_s: float | None = Field(None, ge=0)
    #: the time of the first sample (with sample_clock_h: no draw before it)
    first_sample_s: float = Field(0.0, ge=0)
    #: bis: the BIS noise model of DESIGN (filtered white noise of sd 3, readings kept in
    #: [0, 100]); cgm: a continuous glucose monitor (Breton & Kovatchev 2008 noise and
    #: interstitial lag, settings in [sensor.cgm])
    noise: Literal["none", "bis", "cgm"] = "none"
    cgm: CGMSpec | None = None
    #: [fraction] proportional noise: the output times (1 + cv e)
    proportional_cv: float = Field(0.0, ge=0)
    #: [output unit] additive white noise sd
    additive_sd: Quantity = 0.0
    #: [output unit] autocorrelated (AR(1)) noise sd
    ar1_sd: float = Field(0.0, ge=0)
    #: time constant of the AR(1) noise
    ar1_tau_s: float = Field(60.0, gt=0)
    filtered: FilteredNoiseSpec | None = None
    #: [output unit per h] drift added to the readings, linear in time from t = 0
    drift_per_h: float = 0.0
    #: [per sample] chance of an artefact
    outlier_probability: float = Field(0.0, ge=0, le=1)
    #: [output unit] sd of an artefact
    outlier_sd: float = Field(0.0, ge=0)
    #: [output unit] readings are clipped to [low, high]
    low: Quantity = -math.inf
    #: [output unit] the upper clip
    high: Quantity = math.inf
    #: [output unit] readings are rounded to a multiple of it; 0: no rounding
    quantum: float = Field(0.0, ge=0)
    #: [per sample] chance of no reading at all
    dropout_probability: float = Field(0.0, ge=0, le=1)
    #: [per sample] chance of an error code (quality "invalid", value error_value)
    error_probability: float = Field(0.0, ge=0, le=1)
    #: [output unit] the sentinel value of an error code
    error_value: float = 0.0
    #: lower limit of quantification [output unit]: below it the reading is the limit with
    #: quality "underflow" (an estimator treats it as below the LLOQ, M3)
    lloq: Quantity | None = None

    @model_validator(mode="after")
    def _when(self):
        if (self.period_s is None) == (self.sample_clock_h is None):
            raise ValueError("give either period_s or sample_clock_h (when samples are drawn)")
        if self.sample_clock_h is not None and (
                not self.sample_clock_h or any(not 0 <= h < 24 for h in self.sample_clock_h)
                or len(set(self.sample_clock_h)) != len(self.sample_clock_h)):
            raise ValueError(f"sample_clock_h: expected distinct clock times in [0, 24) h, "
                             f"got {self.sample_clock_h}")
        if self.cgm is not None and self.noise != "cgm":
            raise ValueError(f"a [sensor.cgm] table needs noise = \"cgm\" (noise is "
                             f"{self.noise!r})")
        return self


class PIDSpec(_Strict):
    #: the reading variable the PID acts on (error = measured - setpoint)
    measured: str = "bis"
    #: [measured's unit] the setpoint
    setpoint: float = 50.0
    #: [PID output per measured unit] proportional gain (DESIGN's anaesthesia PID: Schiavo
    #: et al. 2022)
    kp: float = Field(0.013208318978132468, gt=0)
    #: integral time
    ti_s: float = Field(300.0, gt=0)
    #: derivative time
    td_s: float = Field(10.0, ge=0)
    #: derivative filter: the derivative term's time constant is td_s / N
    derivative_filter_n: float = Field(5.0, gt=0)
    #: [PID output] lower clamp of the PID output (anti-windup)
    u_min: float = 0.0
    #: [PID output] upper clamp of the PID output (anti-windup)
    u_max: float = 8.335
    #: [input amount/s per PID output] each input's rate per unit of the PID output
    ratios: dict[str, float] = {"propofol": 1.0, "remifentanil": 2.0}
    #: [input amount/s] upper clamp of each input's rate
    max_rates: dict[str, float] = {"propofol": 6.67, "remifentanil": 16.67}
    #: [measured's unit] the reading assumed before the first (the derivative term's
    #: previous value)
    initial_measurement: float = 100.0


class FixedSpec(_Strict):
    #: the dosing-event table (CSV, NONMEM-like columns with units in the names: time_min,
    #: amount_mg, rate_ug_per_min; scenario/dosing_table.py), relative to the scenario's folder
    doses: str


class TCISpec(_Strict):
    #: the input the TCI sets
    input: str
    #: the model output targeted (a plasma or effect-site concentration)
    target_output: str
    #: pairs (time [s], target [the output's unit]): each target from its time on
    targets: list[tuple[float, float]]
    #: plasma: target the plasma concentration; effect: the effect site
    mode: Literal["plasma", "effect"] = "effect"
    #: [input amount/s] the highest rate the pump can deliver (e.g. 1200 mL/h of 10 mg/mL
    #: propofol: 3.33 mg/s)
    max_rate: float = Field(gt=0)
    #: the controller's model; the patient's model when not given
    model: str | None = None


class PythonSpec(_Strict):
    #: the controller factory: "module:function" or "file.py:function" (relative to the
    #: scenario's folder)
    target: str
    #: the inputs it sets
    inputs: list[str]
    #: keyword arguments passed to the factory
    options: dict[str, typing.Any] = {}


#: the dimension a quantity key's unit must have, by kind ("rate": drug amount per time)
_KINDS = {"rate": ("an amount per time, e.g. mg_per_h, ug_per_s, mmol_per_min, U_per_h",
                   ({"mass": 1, "time": -1}, {"substance": 1, "time": -1},
                    {"insulin": 1, "time": -1})),
          "amount": ("an amount, e.g. mg, g, umol, U", ({"mass": 1}, {"substance": 1},
                                                       {"insulin": 1})),
          "time": ("a time, e.g. s, min, h, d", ({"time": 1},)),
          "per_body_mass": ("an amount per kg of body weight, e.g. mg_per_kg, umol_per_kg",
                            ({}, {"substance": 1, "mass": -1})),
          "per_amount": ("grams per unit of insulin, e.g. g_per_U",
                         ({"mass": 1, "insulin": -1},))}


def _unit_keys(data: dict, quantities: dict[str, str], plain: typing.Iterable[str]) -> dict:
    """Move every ``name_<unit>`` key of *data* (a quantity declared in *quantities* with its
    kind) into ``data["quantities"][name] = (value, unit)``; the unit must be of that kind.
    A bare quantity name (no unit) and any other unknown key are errors naming the key."""
    from ..units import UnitError, parse_unit, split_unit_suffix

    out, found = {}, {}
    plain = set(plain)
    for key, value in data.items():
        if key in plain:
            out[key] = value
            continue
        name, unit = split_unit_suffix(key, quantities)
        if name not in quantities:
            valid = sorted(plain) + [f"{q}_<unit>" for q in quantities]
            raise ValueError(f"unknown key {key!r}{closest(key, list(plain) + list(quantities))}"
                             f"; valid keys here: {', '.join(valid)}")
        text, dims = _KINDS[quantities[name]]
        if unit is None:
            raise ValueError(f"{key!r} needs its unit in the key: {key}_<unit>, the unit "
                             f"{text}")
        try:
            dimension = dict(parse_unit(unit).dimension)
        except UnitError as err:
            raise ValueError(f"{key!r}: {err}") from None
        if dimension not in dims:
            raise ValueError(f"{key!r}: {unit!r} is not {text}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value < 0:
            raise ValueError(f"{key} = {value!r}: expected a finite number >= 0")
        if name in found:
            raise ValueError(f"{name} given twice ({found[name][1]} and {unit})")
        found[name] = (float(value), unit)
    out["quantities"] = found
    return out


class _Quantities(_Strict):
    """A table whose quantities carry their unit in the key (``max_rate_mg_per_h = 2000``):
    :attr:`quantities` maps each given name to (value, unit); plain keys are fields."""

    #: quantity name -> kind (see _KINDS); set by each subclass
    QUANTITIES: typing.ClassVar[dict[str, str]] = {}
    quantities: dict[str, tuple[float, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _split_units(cls, data):
        if isinstance(data, dict):
            plain = [f for f in cls.model_fields if f != "quantities"]
            return _unit_keys(data, cls.QUANTITIES, plain)
        return data


class NMPCInputSpec(_Quantities):
    """One input the NMPC sets: its bounds with units in the keys (``max_rate_mg_per_s``,
    ``max_change_mg_per_s``: the largest change between periods; with scheduled doses
    ``max_dose_mg``, ``loading_dose_max_mg`` (the first dose's cap), ``dose_step_mg`` (doses
    are multiples of it)) and weights (per squared change and per amount of the input's own
    amount unit per second)."""

    QUANTITIES = {"max_rate": "rate", "max_change": "rate", "max_dose": "amount",
                  "loading_dose_max": "amount", "dose_step": "amount"}
    #: weight of the squared change of the rate between periods (between doses' infusion
    #: rates with scheduled doses)
    change_weight: float | None = Field(None, ge=0)
    #: linear (economic) weight per amount of the input (its amount unit) per second
    use_weight: float | None = None


class SafetyInputSpec(_Quantities):
    """The supervisor's limits for one input: ``max_rate_<unit>``, ``max_step_<unit>`` (the
    largest change per decision), ``fallback_rate_<unit>`` (never above the last rate),
    ``max_on_board_<unit>`` (the most insulin on board above the pump's programmed basal,
    boluses included, by the controller's insulin curve: a rate above the basal is cut so
    that it stays within it over 30 min, control/supervisor.py)."""

    QUANTITIES = {"max_rate": "rate", "max_step": "rate", "fallback_rate": "rate",
                  "max_on_board": "amount"}


class DoseWindowSpec(_Quantities):
    """At most ``max_amount_<unit>`` of *input* over any sliding ``window_<unit>``."""

    QUANTITIES = {"window": "time", "max_amount": "amount"}
    #: the input the limit applies to
    input: str


#: the keys of [controller.nmpc.estimator] that only a bank (kind = "bank") reads: all but
#: varied are control/model_bank.py BankConfig's
BANK_KEYS = ("candidates", "seed", "varied", "lead_s", "forget_s", "warmup_s",
             "switch_margin", "cautious_within")


class EstimatorSpec(_Strict):
    """What the NMPC's estimator learns. A key not given takes the estimator's own default
    (control/mhe.py MHEConfig, control/estimation.py EstimationConfig,
    control/mpc_controller.py) - each declared there once.

    ``mhe`` and ``ekf`` estimate parameters of the output map (e.g. BIS: c50, gamma) and an
    output disturbance, the states propagated with the prior (well conditioned when only an
    effect is measured); ``map`` is the Bayesian MAP estimate of any parameters, those of
    the dynamics included (clearance, volumes: the states estimated with them), over the
    whole record or a window, with the model's residual error, readings below the LLOQ
    (M3), inter-occasion variability and the scenario's covariate changes."""

    #: mhe: moving horizon; ekf: extended Kalman filter; map: Bayesian MAP over the record;
    #: bank: the best of candidate patients drawn from the model's population (multiple-
    #: model estimation, control/model_bank.py); none: no estimation
    kind: Literal["mhe", "ekf", "map", "bank", "none"] | None = None
    #: the model parameters estimated (log-normal around the controller model's values, the
    #: model's between-subject variability as prior)
    parameters: list[str] = []
    #: measurement noise sd [output unit]; the model's additive residual error when not given
    noise_sd: Quantity | None = None
    #: MHE and MAP: readings in the moving window
    window: int | None = Field(None, ge=1)
    #: readings before anything is estimated (the prior is kept until then)
    min_samples: int | None = Field(None, ge=1)
    #: estimate an additive output disturbance (offset-free tracking)
    disturbance: bool | None = None
    #: prior standard deviation of the disturbance at the start [output unit]
    disturbance_sd: Quantity | None = None
    #: random walks per reading: variance of the disturbance's steps (q_d, [output unit
    #: squared]) and of the parameters' (q_eta, log scale)
    q_d: float | None = Field(None, ge=0)
    q_eta: float | None = Field(None, ge=0)
    #: MHE: each estimated eta stays within this many prior standard deviations (no bound
    #: when not given)
    eta_bound_sd: float | None = Field(None, gt=0)
    #: map: the limit of quantification [output unit] (readings below it: M3)
    lloq: Quantity | None = None
    #: map: estimate the inter-occasion effects of the chosen parameters
    occasions: bool | None = None
    #: map: the solver's iteration limit
    max_iter: int | None = Field(None, ge=1)
    #: bank: how many candidates (the controller's own model and draws from its
    #: population, each scaled to the patient's basal when the NMPC's model is)
    candidates: int | None = Field(None, ge=1)
    #: bank: the draws' random seed
    seed: int | None = None
    #: bank: the parameters the candidates differ in (each candidate's drawn from the
    #: population, the others the controller model's own before its match to the
    #: settings), e.g. ``["cambridge_tmax_i"]``: the insulin absorption time, which the
    #: basal and carb ratio do not identify; empty: whole draws from the population
    varied: list[str] = []
    #: bank: how far the scored open-loop predictions run [s]
    lead_s: float | None = Field(None, gt=0)
    #: bank: the scores' forgetting time constant [s]
    forget_s: float | None = Field(None, gt=0)
    #: bank: how long the controller's own model is kept first [s]
    warmup_s: float | None = Field(None, ge=0)
    #: bank: another candidate takes over when it scores better by this fraction
    switch_margin: float | None = Field(None, ge=0, lt=1)
    #: bank: of the candidates scoring within this fraction of the best, the one on which
    #: the NMPC's first input acts most (the least drug planned) is used; 0: the best
    cautious_within: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _bank_keys_with_a_bank(self):
        # a bank's key under another estimator would be silently ignored
        given = [name for name in BANK_KEYS if getattr(self, name) not in (None, [])]
        if given and self.kind != "bank":
            raise ValueError(f"{', '.join(given)}: keys of kind = \"bank\", but kind is "
                             f"{self.kind!r}")
        return self


class BasalRowSpec(_Quantities):
    """A basal rate ``rate_<unit>`` (e.g. ``rate_U_per_h = 0.8``) from ``clock_h`` on."""

    QUANTITIES = {"rate": "rate"}
    #: [h] the clock time of day the rate starts (the first row at 0)
    clock_h: float = Field(ge=0, lt=24)


class _InsulinTherapySpec(_Quantities):
    """What every insulin controller reads of a patient's pump settings; a setting not
    given is the patient's own, titrated from its model at *target* (model/therapy.py:
    hourly basal, meal-test carb ratio, 1800-rule correction factor), as in-silico trials
    give them."""

    QUANTITIES = {"carb_ratio": "per_amount"}
    #: the insulin input
    input: str
    #: the glucose output the controller reads (its sensor: controller.safety.measured)
    output: str
    #: [output unit, or a string with mg/dL or mmol/L] the glucose aimed at (and the
    #: patient's settings hold)
    target: Quantity
    #: the daily basal profile (the patient's own when not given)
    basal: list[BasalRowSpec] = []
    #: [output unit, or a string with mg/dL or mmol/L] glucose lowered by one unit of
    #: insulin (the patient's own when not given)
    correction_factor: Quantity | None = None
    #: [min] the insulin-activity curve's peak (default: control/insulin.py InsulinCurve)
    insulin_peak_min: float | None = Field(None, gt=0)
    #: [h] the duration of insulin action (default: control/insulin.py InsulinCurve)
    insulin_duration_h: float | None = Field(None, gt=0)


class BasalBolusSpec(_InsulinTherapySpec):
    """Open-loop basal-bolus therapy (control/basal_bolus.py): a daily basal profile and, at
    each announced meal, the bolus calculator's dose (``carb_ratio_g_per_U``-style keys:
    grams of carbohydrate per unit; the correction factor in the glucose output's unit per
    unit); insulin on board by the exponential activity curve. A setting not given is the
    patient's own, titrated from its model at *target* (model/therapy.py: hourly basal,
    meal-test carb ratio, 1800-rule correction factor), as in-silico trials give them."""

    #: the model input whose announcements (``<input>_announced`` readings, g) are meals
    meal_input: str


class ClockValueSpec(_Strict):
    """A value from a clock time of day on."""

    #: [h] the clock time of day it starts (on the scenario's clock)
    clock_h: float = Field(ge=0, lt=24)
    #: the value [its quantity's unit, or a string with a unit: "5.5 mmol/L"]
    value: Quantity


class NMPCSpec(_Strict):
    """The NMPC (control/nmpc.py NMPCConfig). A key not given takes NMPCConfig's default,
    declared there once."""

    #: the controller's model (the patient's model when not given); typical values for the
    #: patient's covariates, with *prior_scale* applied to the parameters in *scaled*
    model: str | None = None
    #: the tracked model output
    output: str
    #: the inputs it sets, each with its limits (units in the keys)
    input: dict[str, NMPCInputSpec]
    #: the tracked value of *output* [its unit, or a string with a unit: "70 mmHg"]; none:
    #: no tracking term. Output values below (windows, AUC, thresholds) likewise
    reference: Quantity | None = None
    #: the prediction horizon in control periods
    horizon: int = Field(40, ge=1)
    #: periods per decision (1: a decision every period)
    move_block: int | None = Field(None, ge=1)
    #: weight of the squared tracking error (1 with a reference, 0 without)
    output_weight: float | None = Field(None, ge=0)
    #: the output the soft, hard and terminal windows apply to (*output* when not given)
    window_output: str | None = None
    #: soft window soft_low, soft_high on the window output [its unit]: a violation costs
    #: soft_weights (linear, quadratic) per unit outside
    soft_low: Quantity | None = None
    soft_high: Quantity | None = None
    soft_weights: tuple[float, float] | None = None
    #: the soft window's low side's (linear, quadratic) weights when they differ from
    #: soft_weights (an asymmetric cost: a low glucose far costlier than a high one)
    soft_low_weights: tuple[float, float] | None = None
    #: the soft window is checked every soft_every-th stage and the last (a smaller problem)
    soft_every: int | None = Field(None, ge=1)
    #: hard window hard_low, hard_high on the window output [its unit]
    hard_low: Quantity | None = None
    hard_high: Quantity | None = None
    #: hard window terminal_low, terminal_high on the window output at the horizon's end
    #: [its unit]
    terminal_low: Quantity | None = None
    terminal_high: Quantity | None = None
    #: input_a, input_b, r: rate_b = r x rate_a (one decision for both)
    ratio: tuple[str, str, float] | None = None
    #: cumulative dose limits over sliding windows (delivered plus planned)
    dose_windows: list[DoseWindowSpec] = []
    #: scheduled doses: one every dose_interval_s (decided as amounts), each an infusion
    #: of infusion_s (a whole number of periods; one period when not given), the first at
    #: dose_clock_h on the scenario's clock (at t = 0 when not given)
    dose_interval_s: float | None = Field(None, gt=0)
    infusion_s: float | None = Field(None, gt=0)
    dose_clock_h: float | None = Field(None, ge=0, lt=24)
    #: the peak is sampled this long after a dose's start (the end of its infusion when not
    #: given)
    peak_offset_s: float | None = Field(None, ge=0)
    #: windows on the exposure output [its unit] just before each scheduled dose
    #: (trough_soft_low, trough_soft_high, trough_hard_low, trough_hard_high) and at its peak
    #: time (peak_soft_low, peak_soft_high, peak_hard_low, peak_hard_high); soft violations
    #: cost soft_weights
    trough_soft_low: Quantity | None = None
    trough_soft_high: Quantity | None = None
    trough_hard_low: Quantity | None = None
    trough_hard_high: Quantity | None = None
    peak_soft_low: Quantity | None = None
    peak_soft_high: Quantity | None = None
    peak_hard_low: Quantity | None = None
    peak_hard_high: Quantity | None = None
    #: exposure: the AUC of exposure_output [its unit x h] over consecutive windows of
    #: auc_window_s from auc_window_start_s (e.g. 86400: AUC24 per day), as a target
    #: auc_target (auc_weight per squared percent miss), a soft window auc_soft_low,
    #: auc_soft_high (auc_soft_weights, linear and quadratic, per percent outside) or a hard
    #: one auc_hard_low, auc_hard_high
    exposure_output: str | None = None
    auc_window_s: float | None = Field(None, gt=0)
    auc_window_start_s: float | None = Field(None, ge=0)
    auc_target: Quantity | None = None
    auc_weight: float | None = Field(None, ge=0)
    auc_soft_low: Quantity | None = None
    auc_soft_high: Quantity | None = None
    auc_soft_weights: tuple[float, float] | None = None
    auc_hard_low: Quantity | None = None
    auc_hard_high: Quantity | None = None
    #: time above time_above_threshold [output unit] (e.g. fT>MIC): the fraction of the
    #: horizon to reach, time_above_target (a shortfall costs time_above_weights, linear and
    #: quadratic), or a hard lower limit, time_above_min; time_above_width: the width of its
    #: smooth indicator
    time_above_threshold: Quantity | None = None
    time_above_width: Quantity | None = None
    time_above_target: float | None = Field(None, ge=0, le=1)
    time_above_weights: tuple[float, float] | None = None
    time_above_min: float | None = Field(None, ge=0, le=1)
    #: a reference that follows the time of day (e.g. a lower glucose target at night):
    #: rows {clock_h, value} each from its hour until the next (instead of reference)
    reference_schedule: list[ClockValueSpec] = []
    #: the model input whose announcements (``<input>_announced`` readings, g) the
    #: prediction takes in (announced meals)
    meal_input: str | None = None
    #: the hybrid closed loop: each announced meal gets the bolus calculator's bolus (the
    #: keys of [controller.basal_bolus]; the patient's own settings where not given; its
    #: basal is not used: the NMPC sets the rates), through a pump that takes boluses
    meal_bolus: BasalBolusSpec | None = None
    #: in silico only: the controller's model takes the virtual patient's own parameter
    #: values (no real controller knows them: an upper bound on what estimation can give;
    #: scaled_to_basal is then not applied)
    perfect_model: bool = False
    #: in silico only: the controller's model takes the virtual patient's own values of
    #: these parameters alone (e.g. ``["cambridge_tmax_i"]``), the others as without it
    #: (matched to the settings by scaled_to_basal and scaled_to_carb_ratio, which must
    #: not name them): how much of the gap to perfect_model estimating them would close
    perfect_parameters: list[str] = []
    #: the NMPC chooses each meal bolus among these fractions of the calculator's (e.g.
    #: [0.4, 0.55, 0.7, 0.85, 1.0]): the one whose plan, from the state with that bolus in
    #: it, costs least (a bolus the model sees driving glucose low hours later is cut);
    #: empty: the calculator's bolus as it is
    meal_bolus_fractions: list[Annotated[float, Field(gt=0, le=2)]] = []
    #: output injection: these states are multiplied by (measured / predicted) ^
    #: correction_gain at each decision (e.g. a glucose model's glucose masses), so a
    #: mismatch acts through the dynamics instead of as an offset on the output
    corrected_states: list[str] = []
    #: (0, 1]: 1 moves the prediction onto the latest reading, less filters noise
    correction_gain: float = Field(0.5, gt=0, le=1)
    #: multiplies the controller model's parameters named in scaled (a cautious prior: e.g.
    #: 0.55 on the C50s)
    prior_scale: float = Field(1.0, gt=0)
    #: the controller model's parameters that prior_scale multiplies
    scaled: list[str] = []
    #: the controller model's parameter values set outright (declared units), e.g.
    #: ``{cambridge_egp0_amplitude_1 = 0}``: a controller that ignores the body clock
    parameters: dict[str, float] = {}
    #: an insulin model individualised to the patient's own pump settings: these parameters
    #: (e.g. the insulin sensitivities) are multiplied by one factor so that the controller
    #: model's steady-state basal at basal_target equals the patient's titrated basal
    #: (model/therapy.py), as an artificial pancreas starts from the wearer's basal
    scaled_to_basal: list[str] = []
    #: with scaled_to_basal: these parameters (e.g. glucose production and insulin-
    #: independent uptake) multiplied by one factor, the basal matched again at each, so
    #: that the controller model's meal-test carbohydrate ratio equals the patient's own
    #: (model/therapy.py), as the basal matches the patient's basal
    scaled_to_carb_ratio: list[str] = []
    #: the factor scaled_to_carb_ratio searches within (the nearer end when no factor in it
    #: matches: a model far from the patient's is not pushed to extremes)
    carb_ratio_factor_range: tuple[Annotated[float, Field(gt=0)],
                                   Annotated[float, Field(gt=0)]] = (0.37, 2.7)
    #: [output unit] the glucose the basal holds (the reference when not given)
    basal_target: Quantity | None = None
    estimator: EstimatorSpec = EstimatorSpec()
    #: the optimiser (control/nmpc.py)
    solver: Literal["sqpmethod", "ipopt"] | None = None
    #: the QP solvers inside sqpmethod, tried in this order before IPOPT
    qp_solvers: list[str] | None = None
    #: condensed: states eliminated (linear time-invariant models only); multiple_shooting:
    #: states as decision variables (any model); linearised: condensed for any model, the
    #: dynamics linearised along the previous plan each cycle (a real-time iteration)
    transcription: Literal["condensed", "multiple_shooting", "linearised"] | None = None
    #: linearised: linearise and solve this many times a cycle
    linearisation_passes: int | None = Field(None, ge=1)
    #: the optimiser's iteration limit
    max_iter: int | None = Field(None, ge=1)
    #: SQP stops when the Lagrangian's gradient is below it
    dual_tolerance: float | None = Field(None, gt=0)
    #: Runge-Kutta steps per period where the model has no exact discretisation
    rk4_steps: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict):
            moved = [k for k in ("valid_range", "stale_after_s", "fallback_rates") if k in data]
            if moved:
                raise ValueError(f"{', '.join(moved)} moved to [controller.safety] (the "
                                 f"supervisor guards every controller kind)")
            per_input = [k for k in ("inputs", "max_rates", "max_change", "change_weights",
                                     "use_weights") if k in data]
            if per_input:
                raise ValueError(f"{', '.join(per_input)}: give each input a table "
                                 f"[controller.nmpc.input.NAME] with its units in the keys, "
                                 f"e.g. max_rate_mg_per_s = 6.67, change_weight = 20")
        return data

    @field_validator("input")
    @classmethod
    def _some_input(cls, value):
        if not value:
            raise ValueError("needs at least one input table [controller.nmpc.input.NAME]")
        return value

    @model_validator(mode="after")
    def _carb_ratio_with_basal(self):
        if self.scaled_to_carb_ratio and not self.scaled_to_basal:
            raise ValueError("scaled_to_carb_ratio needs scaled_to_basal (the basal is "
                             "matched again at each factor it tries)")
        low, high = self.carb_ratio_factor_range
        if not low < 1.0 < high:
            raise ValueError(f"carb_ratio_factor_range = {[low, high]}: expected "
                             f"[low, high] with low < 1 < high")
        return self


class SafetySpec(_Strict):
    """The safety supervisor every controller kind runs behind (control/supervisor.py).
    A key not given takes the kind's default (trial/build.py: measured variable and maximum
    rates from the controller's own table) or else the supervisor's own default."""

    #: the reading variable (sensor ``var``) whose readings drive the dose; none: open loop
    measured: str | None = None
    #: per input: max_rate_<unit>, max_step_<unit>, fallback_rate_<unit>
    input: dict[str, SafetyInputSpec] | None = None
    #: at most max_amount_<unit> of an input over any window_<unit>
    dose_windows: list[DoseWindowSpec] | None = None
    #: a reading older than this at a decision is stale (the supervisor falls back)
    stale_after_s: float | None = Field(None, gt=0)
    #: a reading dated more than this after the decision is from the future (rejected)
    future_tolerance_s: float | None = Field(None, ge=0)
    #: [measured's unit] [low, high]: physiologically possible
    #: readings; others are artefacts
    valid_range: tuple[Quantity, Quantity] | None = None
    #: this many equal readings in a row (within flatline_tolerance) are a frozen sensor;
    #: 0 turns the check off
    flatline_samples: int | None = Field(None, ge=0)
    flatline_tolerance: float | None = Field(None, ge=0)
    #: good readings in a row before FALLBACK gives way to CLOSED_LOOP
    resume_after: int | None = Field(None, ge=1)
    #: the controller may dose before the first reading (a loading dose before any level)
    dose_before_first_reading: bool | None = None
    #: a reading below its limit of quantification is usable (censored) data
    below_lloq_usable: bool | None = None
    #: a reading above the device's range (a CGM's HIGH) is usable (censored) data
    above_range_usable: bool | None = None
    #: [measured's unit] predictive low suspend: suspend_inputs are held at 0 while the
    #: measured value, or its trend extrapolated suspend_horizon_s ahead, is below this
    suspend_below: Quantity | None = None
    #: [s] a bolus the low suspend holds is given when it ends, if within this long of the
    #: request, else dropped; 0: dropped at once (control/supervisor.py default)
    held_bolus_s: float | None = Field(None, ge=0)
    #: how far ahead the low suspend extrapolates the trend (control/supervisor.py default)
    suspend_horizon_s: float | None = Field(None, ge=0)
    #: the readings the trend is fitted to go back this far (control/supervisor.py default)
    suspend_trend_s: float | None = Field(None, gt=0)
    #: the inputs that lower the measured value (e.g. insulin), held at 0 by the suspend
    suspend_inputs: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _per_input(cls, data):
        if isinstance(data, dict):
            moved = [k for k in ("max_rates", "max_step", "fallback_rates") if k in data]
            if moved:
                raise ValueError(f"{', '.join(moved)}: give each input a table "
                                 f"[controller.safety.input.NAME] with its units in the keys, "
                                 f"e.g. max_rate_mg_per_s = 6.67")
        return data


class RoundingSpec(_Quantities):
    """A dose below ``below_<unit>`` (any dose when not given) is rounded to the nearest
    multiple of ``step_<unit>``."""

    QUANTITIES = {"below": "amount", "step": "amount"}


class ScheduleSpec(_Quantities):
    """Intermittent infusions on a dosing clock (control/scheduled.py): one input, each dose
    over ``infusion_s``, the first at ``dose_clock_h`` on the scenario's clock (at t = 0 when
    not given); caps ``max_dose_<unit>`` and ``loading_dose_max_<unit>`` (the first dose);
    ``rounding``: rows ``{below_<unit> = 500, step_<unit> = 50}`` (a dose under *below* is
    rounded to a multiple of *step*; the last row may omit *below*)."""

    QUANTITIES = {"max_dose": "amount", "loading_dose_max": "amount"}
    #: the model input the doses go to (its pump is found by input)
    input: str
    #: the model output whose levels it reads (their sensor: controller.safety.measured)
    output: str
    #: each dose runs over this long (a whole number of control periods)
    infusion_s: float = Field(gt=0)
    #: [h] the clock time of the first dose (scenario.start_clock_h is the clock at t = 0)
    dose_clock_h: float | None = Field(None, ge=0, lt=24)
    #: rows {below_<unit>, step_<unit>}: a dose under below is rounded to a multiple of step
    rounding: list[RoundingSpec] = []


class NomogramBandSpec(_Strict):
    """A nomogram row: from ``at_least`` (the band covariate's declared unit) on, a dose every
    ``interval_h`` hours; no ``interval_h``: a loading dose only."""

    #: [band covariate unit] the row applies from this value up to the next row's
    at_least: float
    #: [h] the dosing interval of the row; none: a loading dose only (consult)
    interval_h: float | None = Field(None, gt=0)


class NomogramSpec(ScheduleSpec):
    """A printed dosing nomogram (control/scheduled.py NomogramController): a loading dose
    and a maintenance dose per kg of ``weight_covariate`` (``loading_dose_mg_per_kg``,
    ``maintenance_dose_mg_per_kg``), the interval from the band ``band_covariate`` falls in,
    and trough-guided adjustment (``trough_target``, ``trough_low``, ``trough_high``: a
    steady-state trough outside the range scales the dose to the target)."""

    QUANTITIES = {**ScheduleSpec.QUANTITIES, "loading_dose": "per_body_mass",
                  "maintenance_dose": "per_body_mass"}
    #: the covariate whose value picks the row (e.g. crcl)
    band_covariate: str
    #: the covariate the per-kg doses multiply [kg]
    weight_covariate: str = "weight"
    #: the nomogram's rows
    band: list[NomogramBandSpec]
    #: [output unit] the trough a dose adjustment aims at
    trough_target: Quantity | None = None
    #: [output unit] a steady-state trough below it is adjusted
    trough_low: Quantity | None = None
    #: [output unit] a steady-state trough above it is adjusted
    trough_high: Quantity | None = None
    #: a level drawn at most this long before a scheduled dose is its trough [s]
    trough_before_s: float = Field(7200.0, gt=0)
    #: doses of a regimen given before its trough counts as steady state
    steady_state_doses: int = Field(3, ge=1)


class MIPDSpec(ScheduleSpec):
    """Bayesian MIPD (control/map_estimation.py MIPDController): at each dose the MAP
    estimate from the levels back, then the dose for ``auc_target`` (AUC over 24 h, the
    output's unit x h) over the next ``dose_interval_s``; the estimator as
    ``[controller.nmpc.estimator]`` with kind "map"."""

    #: the controller's model (the patient's model when not given)
    model: str | None = None
    #: time from one dose to the next
    dose_interval_s: float = Field(gt=0)
    #: [output unit x h] the AUC over 24 h each dose aims at (planned over its interval)
    auc_target: Quantity
    #: the Bayesian estimator (kind "map"), keys as [controller.nmpc.estimator]
    estimator: EstimatorSpec = EstimatorSpec(kind="map")


class PIDIFBSpec(_InsulinTherapySpec):
    """The PID with insulin feedback of the Medtronic ePID line (control/pid_ifb.py, Steil
    2006 and 2011): gains from the patient's total daily dose unless given, the integral
    starting at the basal; with *meal_input*, announced meals get the bolus calculator's
    bolus (hybrid closed loop), else none (fully closed loop). ``max_rate_<unit>`` clips
    the output (default: none but the supervisor's and the pump's)."""

    QUANTITIES = {"carb_ratio": "per_amount", "max_rate": "rate"}
    #: the model input whose announcements are meals (none: no meal boluses)
    meal_input: str | None = None
    #: [U/h per mg/dL] proportional gain (default: the patient's TDD / kp_tdd_divisor)
    kp_U_per_h_per_mg_dL: float | None = Field(None, gt=0)
    #: KP = TDD [U/day] / this when kp is not given (default: control/pid_ifb.py
    #: KP_TDD_DIVISOR)
    kp_tdd_divisor: float | None = Field(None, gt=0)
    #: [min] integral time (default: control/pid_ifb.py TI_MIN)
    ti_min: float | None = Field(None, gt=0)
    #: [min] derivative time (default: control/pid_ifb.py TD_MIN)
    td_min: float | None = Field(None, ge=0)
    #: the insulin-feedback fraction gamma (0: the PID alone; default control/pid_ifb.py)
    insulin_feedback: float | None = Field(None, ge=0, lt=10)
    #: [min] the insulin model's subcutaneous and plasma time constants (default:
    #: control/pid_ifb.py)
    ifb_time_constants_min: tuple[float, float] | None = None


class OpenAPSSpec(_InsulinTherapySpec):
    """A temp-basal algorithm of the OpenAPS kind (control/openaps.py, from the OpenAPS
    documentation): eventualBG and the predictions from insulin on board, BGI and the
    deviation; 30-min temps, a low-glucose suspend, ``max_iob_<unit>`` (the loop's own
    basal insulin on board; default 3 h of the highest basal) and ``max_basal_<unit>``
    (the pump's max basal) with the documented safety multipliers; with *meal_input*,
    announced meals get the bolus calculator's bolus and count as carbs on board."""

    QUANTITIES = {"carb_ratio": "per_amount", "max_iob": "amount", "max_basal": "rate"}
    #: the model input whose announcements are meals (none: no meal boluses)
    meal_input: str | None = None
    #: a temp never above this x the highest scheduled basal (default 3, control/openaps.py)
    max_daily_safety_multiplier: float | None = Field(None, gt=0)
    #: ... nor above this x the current scheduled basal (default 4, control/openaps.py)
    current_basal_safety_multiplier: float | None = Field(None, gt=0)
    #: [output unit, or a string with mg/dL or mmol/L] temp 0 while glucose or its
    #: predicted minimum is below it (default: the documented target - 0.5 (target - 40
    #: mg/dL))
    suspend_below: Quantity | None = None


class ControllerSpec(_Strict):
    #: which controller runs; its table ([controller.pid], ...) holds its settings
    kind: Literal["pid", "fixed", "tci", "python", "nmpc", "nomogram", "mipd", "basal_bolus",
                  "pid_ifb", "openaps"]
    #: the control period: a decision every period_s
    period_s: float = Field(gt=0)
    #: each command's lease in control periods: the pump applies its fallback when no new
    #: command comes in time
    lease_periods: float = Field(3.0, gt=0)
    safety: SafetySpec = SafetySpec()
    pid: PIDSpec | None = None
    fixed: FixedSpec | None = None
    tci: TCISpec | None = None
    python: PythonSpec | None = None
    nmpc: NMPCSpec | None = None
    nomogram: NomogramSpec | None = None
    mipd: MIPDSpec | None = None
    basal_bolus: BasalBolusSpec | None = None
    pid_ifb: PIDIFBSpec | None = None
    openaps: OpenAPSSpec | None = None


class MetricsSpec(_Strict):
    """What a trial measures: the output's exposure (AUC of its true value), its measured
    value against a target and window (the performance terms; needs a sensor of it), and an
    optional clinical set of the scenario's own (``tiva``: DESIGN's TIVA metrics)."""

    #: the model output the metrics read
    output: str
    #: [output unit] the target of the performance terms (IAE, response, settling)
    target: Quantity | None = None
    #: [output unit] [low, high]; +-5 % of target when not given
    window: tuple[Quantity, Quantity] | None = None
    #: tiva: DESIGN's TIVA set (needs target 50 on BIS); auc: daily AUC24 target attainment
    #: (vancomycin, 400-600 mg.h/L); neutropenia: nadir and grade 3-4 days of output "anc";
    #: glucose: the consensus CGM metrics (Battelino 2019), LBGI/HBGI and the CVGA zone, on
    #: the true glucose and on the sensor's readings (output in mg/dL or mmol/L)
    clinical: Literal["tiva", "auc", "neutropenia", "glucose"] | None = None


class MealSpec(_Quantities):
    """One meal of every day: ``amount_<unit>`` (e.g. ``amount_g = 60`` of carbohydrate) at
    ``clock_h``, varying from day to day; a snack eaten on some days has a *probability*."""

    QUANTITIES = {"amount": "amount"}
    #: [h] the clock time of day it is eaten (on the scenario's clock)
    clock_h: float = Field(ge=0, lt=24)
    #: [min] standard deviation of the time from day to day (normal, kept within +-3 SD)
    time_sd_min: float = Field(0.0, ge=0)
    #: [fraction] coefficient of variation of the amount from day to day (log-normal)
    amount_cv: float = Field(0.0, ge=0)
    #: [fraction] the chance it is eaten on a given day
    probability: float = Field(1.0, ge=0, le=1)
    #: the patient announces it (to a bolus calculator or the controller) when eating it
    announced: bool = True
    #: [fraction] carbohydrate-counting error of the announcement: announced = eaten x
    #: exp(N(0, cv^2)) (log-normal, Brazeau et al. 2013 report errors of about 20 %)
    count_error_cv: float = Field(0.0, ge=0)


class MealsSpec(_Strict):
    """Meals as scheduled disturbances: boluses of the model *input* (the gut's carbohydrate)
    that no pump gives, drawn per patient and day from its own ``meals`` stream (the same in
    every scenario of a cohort)."""

    #: the model input the meals enter (e.g. the carbohydrate input of a glucose model)
    input: str
    #: the meals of a day
    meal: list[MealSpec]


class Scenario(_Strict):
    scenario: ScenarioInfo
    patient: PatientSpec
    pump: list[PumpSpec]
    sensor: list[SensorSpec]
    controller: ControllerSpec
    disturbance: list[DisturbanceSpec] = []
    covariate_change: list[CovariateChangeSpec] = []
    meals: MealsSpec | None = None
    metrics: MetricsSpec | None = None
    #: the folder the file was read from; relative paths in it are resolved against it
    base_dir: str = "."

    @field_validator("pump", "sensor")
    @classmethod
    def _not_empty(cls, value):
        if not value:
            raise ValueError("needs at least one entry")
        return value


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The schema class reached by following *loc* from *model* (None if not a model)."""
    current: typing.Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            info = current.model_fields.get(part)
            if info is None:
                return None
            current = info.annotation
        else:
            return None
        current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation):
    """The model class inside ``list[X]``, ``X | None`` or ``dict[str, X]``."""
    for _ in range(3):
        args = typing.get_args(annotation)
        if not args:
            break
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            return models[0]
        nested = [a for a in args if typing.get_args(a)]
        if not nested:
            break
        annotation = nested[-1]
    return annotation


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_scenario(data: dict, *, source: str = "scenario", base_dir: str = ".") -> Scenario:
    """Validate a scenario given as a dict (e.g. parsed TOML).

    Raises
    ------
    ConfigError
        One line per problem: the dotted path, what is wrong and, for an unknown key, the
        nearest valid key at that place.
    """
    try:
        return Scenario(**data, base_dir=base_dir)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = tuple(e["loc"])
            where = _path(loc)
            if e["type"] == "extra_forbidden":
                parent = _model_at(Scenario, loc[:-1])
                valid = [k for k in parent.model_fields if k != "base_dir"] if parent else []
                lines.append(f"{where}: unknown key{closest(str(loc[-1]), valid)}; valid keys "
                             f"here: {', '.join(valid)}")
            elif e["type"] == "missing":
                lines.append(f"{where}: missing")
            else:
                got = e.get("input")
                shown = "" if isinstance(got, dict) else f" (got {got!r})"
                lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')}{shown}")
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def read_scenario_data(path: str | Path) -> dict:
    """The TOML scenario at *path* as a dict (not yet validated)."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"scenario {str(path)!r}: cannot read it ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"scenario {str(path)!r}: not valid TOML: {err}") from None


def with_overrides(data: dict, overrides: typing.Mapping[str, object]) -> dict:
    """A copy of scenario *data* with each dotted key of *overrides* set to its value, e.g.
    ``{"controller.nmpc.soft_low": 52, "pump.0.max_rate_ml_per_h": 2000}`` (a number picks
    an entry of an array of tables). Keys the schema does not know are refused when the
    result is validated; a key that passes through a value that is not a table, or an
    index past the end of an array, is refused here, naming the key."""
    import copy

    out = copy.deepcopy(data)
    for key, value in overrides.items():
        parts = key.split(".")
        node: object = out
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[:depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{key}: {where!r} needs an index below {len(node)}")
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise ConfigError(f"{key}: {'.'.join(parts[:depth])!r} is a value, not a table")
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{key}: {where!r} is a value, not a table")
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {'.'.join(parts[:-1])!r} is an array; name an entry "
                              f"by its index")
        node[parts[-1]] = value
    return out


def load_scenario(path: str | Path, overrides: typing.Mapping[str, object] | None = None
                  ) -> Scenario:
    """Read and validate the TOML scenario at *path*, with *overrides* (dotted keys, see
    :func:`with_overrides`) applied first.

    Raises
    ------
    ConfigError
        For a missing file, invalid TOML (with its line) or an invalid scenario.
    """
    path = Path(path)
    data = read_scenario_data(path)
    if overrides:
        data = with_overrides(data, overrides)
    return parse_scenario(data, source=path.name, base_dir=str(path.resolve().parent))
