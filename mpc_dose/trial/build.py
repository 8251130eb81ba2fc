"""From a validated scenario to the objects of one run: the virtual patient, its pumps and
sensors, the controller, and the closed-loop set-up.

Every patient is built from (scenario, seed, patient index) alone; see
:func:`mpc_dose.plant.cohort.streams`.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np

from ..control.base import Controller
from ..control.baselines import (CallableController, FixedRegimen, PIDController, PIDSettings,
                                 load_user_controller)
from ..control.supervisor import SafetyConfig
from ..errors import ConfigError
from ..model.library import LibraryModel, load
from ..model.spec import CLOCK_PARAM
from ..plant.cohort import (CovariateDistribution, VirtualPatientSpec, patient_from_population,
                            patient_from_row, streams)
from ..plant.patient import Meal, OutputDisturbance
from ..plant.pump import PumpConfig
from ..plant.sensor import (GLUCOSE_MG_DL_PER_MMOL_L, CGMModel, FilteredNoise, SensorConfig,
                            bis_noise_filter)
from ..scenario.dosing_table import read_dosing_table
from ..scenario.schema import PIDSpec, Scenario
from ..units import UnitError, conversion_factor, parse_quantity
from .closed_loop import LoopSetup

__all__ = ["cohort_size", "build_patient", "build_setup", "read_cohort_table",
           "parameter_changes", "safety_config", "scenario_model"]


def _resolve(scenario: Scenario, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path(scenario.base_dir) / p


def scenario_model(scenario: Scenario, name: str | None = None) -> LibraryModel:
    """The compiled model *name* of the scenario (the patient's model when None): library
    entries and model files joined by ``+``, a model file's relative path taken from the
    scenario's folder, as every other path in a scenario is."""
    return load(scenario.patient.model if name is None else name,
                base_dir=scenario.base_dir)


def read_cohort_table(scenario: Scenario) -> list[dict]:
    """The rows of the scenario's cohort table (comment lines starting with '#')."""
    import pandas as pd

    table = scenario.patient.table
    path = _resolve(scenario, table.path)
    try:
        frame = pd.read_csv(path, comment="#")
    except OSError as err:
        raise ConfigError(f"patient.table.path: cannot read {str(path)!r} ({err})") from None
    return frame.to_dict("records")


def with_cohort(scenario: Scenario, path: str | None) -> Scenario:
    """*scenario* with its patients read from the cohort file *path* (the scenario's
    ``[patient.table]`` columns and codes); unchanged when *path* is None."""
    if path is None:
        return scenario
    table = scenario.patient.table
    if table is None:
        raise ConfigError("--cohort: the scenario declares no [patient.table] columns to read "
                          "the file with")
    from pathlib import Path

    patient = scenario.patient.model_copy(update={
        "table": table.model_copy(update={"path": str(Path(path).resolve())})})
    return scenario.model_copy(update={"patient": patient})


def cohort_size(scenario: Scenario) -> int:
    """How many patients the scenario's cohort has."""
    if scenario.patient.table is not None and scenario.patient.table.path:
        return len(read_cohort_table(scenario))
    if scenario.patient.population is not None:
        return scenario.patient.population.size
    return 1


def build_patient(scenario: Scenario, index: int, seed: int) -> VirtualPatientSpec:
    """Patient *index* (0-based) of the scenario's cohort, reproducible from the seed."""
    lm = scenario_model(scenario)
    n = cohort_size(scenario)
    if not 0 <= index < n:
        raise ConfigError(f"patient {index + 1} does not exist: the cohort has {n} "
                          f"patient{'s' if n != 1 else ''} (1-{n})")
    rng = streams(scenario.scenario.streams_name, seed, index)["parameters"]
    spec = scenario.patient
    if spec.table is not None and spec.table.path:
        row = read_cohort_table(scenario)[index]
        patient = patient_from_row(lm, row, spec.table.columns, spec.table.codes, index, rng,
                                   random_effects=spec.random_effects,
                                   where=f"patient.table row {index + 1}")
    elif spec.population is not None:
        dists = {name: CovariateDistribution(name, d.kind, d.low, d.high, d.mean, d.sd,
                                             tuple(d.values), tuple(d.probabilities),
                                             d.median, d.sd_log)
                 for name, d in spec.population.covariates.items()}
        patient = patient_from_population(lm, dists, index, rng,
                                          random_effects=spec.random_effects)
    else:
        raise ConfigError("patient: give a table or a population to draw patients from")
    clock = _clock_params(scenario, lm.model)
    if clock:  # a body clock: the run starts at the scenario's clock time
        params = {**patient.params, **clock}
        patient = VirtualPatientSpec(patient.index, patient.covariates, params, patient.eta,
                                     patient.source, {**patient.overrides, **clock})
    if spec.params:
        params = dict(patient.params)
        for name, value in spec.params.items():
            lm.model.parameter(name)  # unknown names are errors naming the parameter
            params[name] = value
        patient = VirtualPatientSpec(patient.index, patient.covariates, params, patient.eta,
                                     patient.source, {**patient.overrides, **spec.params})
    return patient


def _clock_params(scenario: Scenario, model) -> dict[str, float]:
    """``{clock_time_at_t0: scenario.start_clock_h}`` for a model with a body clock, else {}.
    The patient's and the controller's models get the same clock."""
    clock = scenario.scenario.start_clock_h
    if clock is None or CLOCK_PARAM not in model.param_names:
        return {}
    return {CLOCK_PARAM: float(clock)}


def _check_clock(scenario: Scenario, models) -> None:
    """A start clock time that nothing of the scenario reads is a mistake, said at once:
    readers are models with a body clock, sensors drawing at clock times, CGMs with
    compression lows at night, doses scheduled at a clock time, meals and the glucose set
    (its daily profile)."""
    c = scenario.controller
    dosing = getattr(c, c.kind, None) if c.kind in ("nmpc", "nomogram", "mipd") else None
    readers = any(CLOCK_PARAM in m.param_names for m in models) or \
        any(s.sample_clock_h is not None for s in scenario.sensor) or \
        any(s.cgm is not None and s.cgm.compression_clock_h is not None
            for s in scenario.sensor) or \
        (dosing is not None and dosing.dose_clock_h is not None) or \
        scenario.meals is not None or c.kind == "basal_bolus" or \
        (scenario.metrics is not None and scenario.metrics.clinical == "glucose")
    if scenario.scenario.start_clock_h is not None and not readers:
        raise ConfigError(f"scenario.start_clock_h = {scenario.scenario.start_clock_h}: "
                          f"nothing of this scenario reads the clock (no model with a body "
                          f"clock ({CLOCK_PARAM}), no sensor sample_clock_h or "
                          f"cgm.compression_clock_h, no dose_clock_h, no meals, no "
                          f"metrics.clinical = 'glucose')")


def covariate_changes(scenario: Scenario, patient: VirtualPatientSpec, seed: int
                      ) -> list[tuple[float, dict[str, float | str]]]:
    """The covariate changes this patient has, in time order: ``(time [s], the changed
    covariates' new values)``. Each ``[[covariate_change]]`` draws its chance and its time
    from the patient's ``covariate_changes`` stream (two draws each, taken or not, so the
    draws of one change never shift another's); a scale multiplies the value in force
    then. The patient, the controllers and the records all take these."""
    rng = streams(scenario.scenario.streams_name, seed, patient.index)["covariate_changes"]
    drawn = []
    for k, change in enumerate(scenario.covariate_change):
        chance, position = float(rng.random()), float(rng.random())
        if chance >= change.probability:
            continue
        if change.time_range_s is not None:
            start, end = change.time_range_s
            t = start + position * (end - start)
        else:
            t = change.time_s
        drawn.append((t, k, change))
    drawn.sort(key=lambda item: (item[0], item[1]))
    in_force = dict(patient.covariates)
    out = []
    for t, k, change in drawn:
        values = dict(change.covariates)
        for name, factor in change.scale.items():
            current = values.get(name, in_force.get(name))
            if isinstance(current, bool) or not isinstance(current, (int, float)):
                raise ConfigError(f"covariate_change[{k}].scale.{name}: the patient's "
                                  f"{name} is {current!r}; a factor needs a number")
            values[name] = float(current) * factor
        in_force.update(values)
        out.append((float(t), values))
    return out


def meal_schedule(scenario: Scenario, patient: VirtualPatientSpec, seed: int) -> list[Meal]:
    """The meals this patient eats over the run, from ``[meals]``: for each day and each
    meal four draws from the patient's ``meals`` stream (taken whether it is eaten or not,
    so one meal's draws never shift another's): eaten or not, its time, its amount, the
    announced amount. Amounts in the input's amount unit."""
    spec = scenario.meals
    if spec is None:
        return []
    model = scenario_model(scenario).model
    unit = _amount_unit(model, spec.input, "meals.input")
    rng = streams(scenario.scenario.streams_name, seed, patient.index)["meals"]
    start_h = scenario.scenario.start_clock_h or 0.0
    days = int(math.ceil(scenario.scenario.duration_s / 86400.0)) + 1
    meals = []
    for day in range(days):
        for k, meal in enumerate(spec.meal):
            if "amount" not in meal.quantities:
                raise ConfigError(f"meals.meal[{k}]: needs amount_<unit> (e.g. amount_g = 60)")
            value, given_unit = meal.quantities["amount"]
            try:
                amount = value * conversion_factor(given_unit, unit,
                                                   what=f"meals.meal[{k}].amount")
            except UnitError as err:
                raise ConfigError(str(err)) from None
            eaten = rng.random()
            shift, size, counted = rng.standard_normal(3)
            shift = float(np.clip(shift, -3.0, 3.0)) * meal.time_sd_min * 60.0
            t = day * 86400.0 + ((meal.clock_h - start_h) % 24.0) * 3600.0 + shift
            if eaten >= meal.probability or not 0 <= t < scenario.scenario.duration_s:
                continue
            # log-normal with the given CV, its mean the declared amount
            sigma = math.sqrt(math.log1p(meal.amount_cv ** 2))
            eaten_amount = amount * math.exp(sigma * size - sigma ** 2 / 2)
            announced = None
            if meal.announced:
                error = math.sqrt(math.log1p(meal.count_error_cv ** 2))
                announced = eaten_amount * math.exp(error * counted - error ** 2 / 2)
            meals.append(Meal(t, spec.input, eaten_amount, announced))
    return sorted(meals, key=lambda m: m.t_s)


def parameter_changes(scenario: Scenario, patient: VirtualPatientSpec, seed: int,
                      changes: list[tuple[float, dict]] | None = None) -> list[tuple[float, dict[str, float]]]:
    """Parameter values from each covariate change and each new occasion on.

    The patient keeps its random effects (eta) and directly given values; covariates change
    as the scenario says; each occasion draws new inter-occasion effects (kappa) from the
    patient's ``occasions`` stream.
    """
    pop = scenario_model(scenario).population
    # with occasions, the first occasion's variability applies from t = 0
    changes_drawn = covariate_changes(scenario, patient, seed) if changes is None else changes
    times = sorted({t for t, _ in changes_drawn}
                   | set(scenario.patient.occasions_s)
                   | ({0.0} if scenario.patient.occasions_s else set()))
    if not times:
        return []
    if scenario.patient.occasions_s and not pop.occasion_effects:
        raise ConfigError(f"patient.occasions_s: model {scenario.patient.model!r} declares no "
                          f"inter-occasion variability")
    rng = streams(scenario.scenario.streams_name, seed, patient.index)["occasions"]
    occasion_starts = sorted(scenario.patient.occasions_s)
    kappas = [pop.sample_occasion(rng) for _ in range(len(occasion_starts) + 1)]
    covariates = dict(patient.covariates)
    changes = []
    for t in times:
        for t_change, values in changes_drawn:
            if t_change == t:
                covariates.update(values)
        occasion = sum(1 for start in occasion_starts if start <= t)
        values = pop.individual(covariates, patient.eta, kappas[occasion]).params
        values.update(patient.overrides)
        changes.append((t, values))
    return changes


def _pump(spec, lm: LibraryModel, where: str) -> PumpConfig:
    model = lm.model
    if spec.input not in model.input_names:
        raise ConfigError(f"{where}.input: model {model.name!r} has no input {spec.input!r}; "
                          f"inputs: {', '.join(model.input_names)}")
    amount_unit = model.inputs[model.input_index(spec.input)].amount_unit
    try:
        concentration = parse_quantity(spec.concentration, f"{amount_unit}/mL",
                                       what=f"{where}.concentration", require_unit=True)
    except UnitError as err:
        raise ConfigError(str(err)) from None
    def amount(key: str, per_time: bool) -> float | None:
        """*key*'s value in the input's amount unit (per s when *per_time*), or None."""
        text = getattr(spec, key)
        if text is None:
            return None
        try:
            return parse_quantity(text, f"{amount_unit}/s" if per_time else amount_unit,
                                  what=f"{where}.{key}", require_unit=True)
        except UnitError as err:
            raise ConfigError(str(err)) from None

    def ml_per_h(key: str) -> float | None:
        value = amount(key, per_time=True)
        return None if value is None else value * 3600.0 / concentration

    resolution, fallback = spec.resolution_ml_per_h, spec.fallback_ml_per_h
    basal_step, basal = ml_per_h("basal_increment"), ml_per_h("programmed_basal")
    for key, value, other, given in (("basal_increment", basal_step, "resolution_ml_per_h",
                                      resolution), ("programmed_basal", basal,
                                                    "fallback_ml_per_h", fallback)):
        if value is not None and given:
            raise ConfigError(f"{where}: {key} and {other} say the same: give one")
    max_basal = ml_per_h("max_basal")
    bolus = {}
    for key in ("max_bolus", "bolus_increment"):
        if (value := amount(key, per_time=False)) is not None:
            bolus[key] = value
    if (speed := ml_per_h("bolus_speed")) is not None:
        bolus["bolus_ml_per_h"] = speed
    if bolus and "max_bolus" not in bolus:
        raise ConfigError(f"{where}: {', '.join(sorted(bolus))} without max_bolus (a pump "
                          f"takes bolus commands when max_bolus is set)")
    return PumpConfig(spec.pump, spec.input, concentration,
                      min(spec.max_rate_ml_per_h, max_basal or math.inf),
                      resolution if basal_step is None else basal_step, spec.startup_lag_s,
                      spec.syringe_volume_ml, fallback if basal is None else basal,
                      spec.occlusion_at_s, spec.occlusion_detection_s, **bolus)


def _sensor(scenario: Scenario, spec, lm: LibraryModel, where: str) -> SensorConfig:
    model = lm.model
    if spec.output not in model.output_names:
        raise ConfigError(f"{where}.output: model {model.name!r} has no output {spec.output!r}; "
                          f"outputs: {', '.join(model.output_names)}")
    unit = model.outputs[model.output_index(spec.output)].unit
    low, high, additive_sd, lloq = (_quantity(getattr(spec, name), unit, f"{where}.{name}")
                                    for name in ("low", "high", "additive_sd", "lloq"))
    filtered = None
    if spec.noise == "bis":
        filtered = bis_noise_filter()
        low, high = max(low, 0.0), min(high, 100.0)
    if spec.filtered is not None:
        if filtered is not None:
            raise ConfigError(f"{where}: give either noise = 'bis' or a filtered noise")
        filtered = FilteredNoise(spec.filtered.sd, tuple(spec.filtered.numerator),
                                 tuple(spec.filtered.denominator))
    daily: tuple[float, ...] = ()
    if spec.sample_clock_h is not None:  # clock times -> offsets from t = 0 within each day
        start_h = scenario.scenario.start_clock_h or 0.0
        daily = tuple(sorted(((h - start_h) % 24.0) * 3600.0 for h in spec.sample_clock_h))
    period_s = spec.period_s if spec.period_s is not None else 86400.0
    cgm = _cgm_model(scenario, spec, unit, where) if spec.noise == "cgm" else None
    return SensorConfig(spec.output, spec.var or spec.output, unit, period_s, spec.delay_s,
                        spec.first_sample_s, spec.proportional_cv, additive_sd, spec.ar1_sd,
                        spec.ar1_tau_s, filtered, spec.drift_per_h, spec.outlier_probability,
                        spec.outlier_sd, low, high, spec.quantum, spec.dropout_probability,
                        spec.error_probability, spec.error_value, spec.var or spec.output,
                        daily, lloq, spec.delay_max_s, cgm)


def _mg_dl_per_unit(unit: str, where: str) -> float:
    """[mg/dL per *unit*] for a glucose concentration in *unit* (mass or molar)."""
    try:
        return conversion_factor(unit, "mg/dL", what=where)
    except UnitError:
        pass
    try:   # a molar concentration: glucose's molar mass
        return conversion_factor(unit, "mmol/L", what=where) * GLUCOSE_MG_DL_PER_MMOL_L
    except UnitError:
        raise ConfigError(f"{where}: noise = 'cgm' reads glucose, a mass or molar "
                          f"concentration (mg/dL, mmol/L); the output's unit is {unit!r}"
                          ) from None


def _cgm_model(scenario: Scenario, spec, unit: str, where: str) -> CGMModel:
    """The CGM of ``[sensor.cgm]``: only the keys given, so every other default is
    CGMModel's own (declared once there, with its source)."""
    given = {} if spec.cgm is None else spec.cgm.model_dump(exclude_none=True)
    clock = given.pop("compression_clock_h", None)
    if clock is not None:   # clock times -> offsets from t = 0 within each day
        start_h = scenario.scenario.start_clock_h or 0.0
        given["compression_window_s"] = tuple(((h - start_h) % 24.0) * 3600.0 for h in clock)
    for name in ("compression_depth", "compression_duration_s"):
        if name in given:
            given[name] = tuple(given[name])
    if given.get("compression_rate_per_h", 0) > 0 and clock is None:
        raise ConfigError(f"{where}.cgm.compression_rate_per_h: compression lows need "
                          f"compression_clock_h (the night, e.g. [23, 7])")
    try:
        return CGMModel(mg_dl_per_unit=_mg_dl_per_unit(unit, f"{where}.output"), **given)
    except ConfigError as err:
        raise ConfigError(str(err).replace("sensor.cgm.", f"{where}.cgm.")) from None


#: built NMPC problems kept for the next patient of a trial (same model and structure):
#: building one costs more than a tenth of a second, and only numbers change per patient
_SHARED_NMPC: dict[tuple, object] = {}


def _amount_unit(model, name: str, where: str) -> str:
    """The amount unit of *model*'s input *name* (an error naming *where* if none)."""
    if name not in model.input_names:
        raise ConfigError(f"{where}: model {model.name!r} has no input {name!r}; inputs: "
                          f"{', '.join(model.input_names)}")
    return model.inputs[model.input_index(name)].amount_unit


def _rate(quantity: tuple[float, str], amount_unit: str, where: str) -> float:
    """A rate given with its unit, in *amount_unit* per second."""
    value, unit = quantity
    try:
        return value * conversion_factor(unit, f"{amount_unit}/s", what=where)
    except UnitError as err:
        raise ConfigError(str(err)) from None


def _dose_windows(windows, model, where: str) -> tuple[tuple[str, float, float], ...]:
    """(input, window [s], max amount [input's amount unit]) of each dose window."""
    out = []
    for k, w in enumerate(windows):
        here = f"{where}[{k}]"
        amount_unit = _amount_unit(model, w.input, f"{here}.input")
        missing = [q for q in ("window", "max_amount") if q not in w.quantities]
        if missing:
            raise ConfigError(f"{here}: needs {' and '.join(f'{q}_<unit>' for q in missing)}")
        try:
            window_s = w.quantities["window"][0] * conversion_factor(
                w.quantities["window"][1], "s", what=f"{here}.window")
            amount = w.quantities["max_amount"][0] * conversion_factor(
                w.quantities["max_amount"][1], amount_unit, what=f"{here}.max_amount")
        except UnitError as err:
            raise ConfigError(str(err)) from None
        out.append((w.input, window_s, amount))
    return tuple(out)


def safety_config(scenario: Scenario, model) -> SafetyConfig:
    """The safety supervisor's config: ``[controller.safety]`` over the controller kind's
    defaults. Only the keys given (or defaulted here) are passed; every other default is
    :class:`~mpc_dose.control.supervisor.SafetyConfig`'s own. Rates and amounts given with
    their units are converted to each input's amount unit (per second) of *model*.

    Defaults per kind: the measured variable is ``pid.measured`` for ``pid``, the ``var`` of
    the sensor of ``nmpc.output`` for ``nmpc``, none (open loop) for ``fixed`` and ``tci``,
    ``safety.measured`` for ``python``; the maximum rates are ``pid.max_rates``, the NMPC
    inputs' ``max_rate`` or ``{tci.input: tci.max_rate}``, none otherwise.

    Raises
    ------
    ConfigError
        When no sensor sends the measured variable (a controller that waits for a name no
        sensor sends never doses), or no sensor (or several) measures the NMPC's output.
    """
    c = scenario.controller
    given = c.safety
    sensor_vars = [s.var or s.output for s in scenario.sensor]
    defaults: dict = {}
    if c.kind == "pid":
        pid = c.pid or PIDSpec()
        defaults = {"measured": pid.measured, "max_rates": dict(pid.max_rates)}
    elif c.kind in ("nmpc", "mipd", "nomogram", "basal_bolus") and \
            getattr(c, c.kind) is not None:
        defaults = {}
        if c.kind == "nmpc":
            bounds = _nmpc_fields(c.nmpc, c, model)["rate_bounds"]
            defaults["max_rates"] = {name: high for name, (_, high) in bounds.items()}
        if given.measured is None:
            output = getattr(c, c.kind).output
            found = sorted({s.var or s.output for s in scenario.sensor if s.output == output})
            if not found:
                raise ConfigError(f"controller.{c.kind}.output = {output!r}: no [[sensor]] "
                                  f"measures it; add one (output = {output!r}) or name the "
                                  f"reading in controller.safety.measured")
            if len(found) > 1:
                raise ConfigError(f"controller.{c.kind}.output = {output!r} is measured by "
                                  f"several sensors ({', '.join(found)}); name the one that "
                                  f"drives the dose in controller.safety.measured")
            defaults["measured"] = found[0]
    elif c.kind == "tci" and c.tci is not None:
        defaults = {"max_rates": {c.tci.input: c.tci.max_rate}}
    fields = dict(defaults)
    for name in type(given).model_fields:
        value = getattr(given, name)
        if value is not None and name not in ("input", "dose_windows"):
            fields[name] = value
    # values of the measured variable are in the unit of its sensor's output
    sensor = next((s for s in scenario.sensor
                   if (s.var or s.output) == fields.get("measured")), None)
    unit = model.outputs[model.output_index(sensor.output)].unit if sensor else "1"
    if given.valid_range is not None:
        fields["valid_range"] = tuple(_quantity(v, unit, "controller.safety.valid_range")
                                      for v in given.valid_range)
    if given.suspend_below is not None:
        fields["suspend_below"] = _quantity(given.suspend_below, unit,
                                            "controller.safety.suspend_below")
    if given.suspend_inputs is not None:
        for name in given.suspend_inputs:
            _amount_unit(model, name, "controller.safety.suspend_inputs")
        fields["suspend_inputs"] = tuple(given.suspend_inputs)
    for name, spec in (given.input or {}).items():
        where = f"controller.safety.input.{name}"
        amount_unit = _amount_unit(model, name, where)
        for quantity, label in (("max_rate", "max_rates"), ("max_step", "max_step"),
                                ("fallback_rate", "fallback_rates")):
            if quantity in spec.quantities:
                fields.setdefault(label, {})
                fields[label] = {**fields[label], name: _rate(
                    spec.quantities[quantity], amount_unit, f"{where}.{quantity}")}
    if given.dose_windows is not None:
        fields["dose_windows"] = _dose_windows(given.dose_windows, model,
                                               "controller.safety.dose_windows")
    measured = fields.get("measured")
    if measured is not None and measured not in sensor_vars:
        where = "controller.safety.measured" if given.measured is not None else \
            "controller.pid.measured"
        raise ConfigError(f"{where} = {measured!r}: no [[sensor]] sends it (readings: "
                          f"{', '.join(sensor_vars)}); a controller waiting for it never "
                          f"doses")
    try:
        return SafetyConfig(**fields)
    except ConfigError as err:  # its messages name "safety.<key>"
        raise ConfigError(f"controller.{err}") from None


def _check_safety_inputs(scenario: Scenario, controller: Controller) -> None:
    """Inputs named in ``[controller.safety]`` must be inputs the controller sets."""
    given = scenario.controller.safety
    named = {"input": list(given.input or ()),
             "dose_windows": [w.input for w in given.dose_windows or ()]}
    for label, names in named.items():
        for name in names:
            if name not in controller.inputs:
                raise ConfigError(f"controller.safety.{label}: {name!r} is not an input the "
                                  f"controller sets ({', '.join(controller.inputs)})")


def _controller(scenario: Scenario, lm: LibraryModel, patient: VirtualPatientSpec,
                share: bool = False, measured: str | None = None,
                changes: list[tuple[float, dict]] = ()) -> Controller:
    """The controller of *scenario* for *patient*; *changes*: the patient's covariate
    changes (:func:`covariate_changes`), which the model-based kinds are told."""
    c = scenario.controller
    chosen = getattr(c, c.kind)
    if chosen is None and c.kind != "pid":
        raise ConfigError(f"controller.kind = {c.kind!r} needs a [controller.{c.kind}] table")
    if c.kind == "pid":
        s = chosen or PIDSpec()
        for name in s.ratios:
            if name not in lm.model.input_names:
                raise ConfigError(f"controller.pid.ratios: model has no input {name!r}")
        settings = PIDSettings(s.measured, s.setpoint, s.kp, s.ti_s, s.td_s,
                               s.derivative_filter_n, c.period_s, s.u_min, s.u_max,
                               tuple(s.ratios.items()), tuple(s.max_rates.items()),
                               s.initial_measurement)
        return PIDController(settings)
    if c.kind == "fixed":
        weight = patient.covariates.get("weight")
        doses = read_dosing_table(_resolve(scenario, chosen.doses), lm.model,
                                  weight_kg=weight if isinstance(weight, float) else None)
        return FixedRegimen(doses, sorted({d.input for d in doses}) or lm.model.input_names,
                            period_s=c.period_s)
    if c.kind == "tci":
        from ..control.tci import TargetControlledInfusion

        own = scenario_model(scenario, chosen.model) if chosen.model else lm
        params = _controller_params(scenario, own, patient)
        return TargetControlledInfusion(own.model, params, chosen.input, chosen.target_output,
                                        [tuple(t) for t in chosen.targets], mode=chosen.mode,
                                        period_s=c.period_s, max_rate=chosen.max_rate)
    if c.kind == "nmpc":
        own = scenario_model(scenario, chosen.model) if chosen.model else lm
        return _nmpc_controller(scenario, chosen, c, own,
                                _controller_params(scenario, own, patient),
                                dict(patient.covariates), share, measured, changes)
    if c.kind in ("nomogram", "mipd"):
        return _scheduled_controller(scenario, chosen, c, lm, patient, measured, changes)
    if c.kind == "basal_bolus":
        return _basal_bolus_controller(scenario, chosen, c, lm, measured)
    factory = load_user_controller(chosen.target, scenario.base_dir)
    made = factory(inputs=tuple(chosen.inputs), period_s=c.period_s, **chosen.options)
    if hasattr(made, "decide"):
        return made
    return CallableController(made, chosen.inputs, period_s=c.period_s, name=chosen.target)


def _basal_bolus_controller(scenario: Scenario, spec, c, lm: LibraryModel,
                            measured: str | None) -> Controller:
    """``kind = "basal_bolus"``: rates in the insulin input's amount unit per second, the
    calculator's glucose values in the glucose output's unit."""
    from ..control.basal_bolus import BasalBolusController
    from ..control.insulin import BolusCalculator, InsulinCurve

    where, model = "controller.basal_bolus", lm.model
    amount_unit = _amount_unit(model, spec.input, f"{where}.input")
    meal_unit = _amount_unit(model, spec.meal_input, f"{where}.meal_input")
    if spec.output not in model.output_names:
        raise ConfigError(f"{where}.output: model {model.name!r} has no output "
                          f"{spec.output!r}; outputs: {', '.join(model.output_names)}")
    glucose_unit = model.outputs[model.output_index(spec.output)].unit
    profile = []
    for k, row in enumerate(spec.basal):
        if "rate" not in row.quantities:
            raise ConfigError(f"{where}.basal[{k}]: needs rate_<unit> (e.g. rate_U_per_h)")
        profile.append((row.clock_h, _rate(row.quantities["rate"], amount_unit,
                                           f"{where}.basal[{k}].rate")))
    if "carb_ratio" not in spec.quantities:
        raise ConfigError(f"{where}: needs carb_ratio_<unit> (e.g. carb_ratio_g_per_U = 10)")
    value, unit = spec.quantities["carb_ratio"]
    try:   # announcements come in g; doses in the insulin input's amount unit
        carb_ratio = value * conversion_factor(unit, f"g/{amount_unit}",
                                               what=f"{where}.carb_ratio")
        conversion_factor(meal_unit, "g", what=f"{where}.meal_input")
    except UnitError as err:
        raise ConfigError(str(err)) from None
    curve = {k: v for k, v in (("peak_s", None if spec.insulin_peak_min is None
                                else spec.insulin_peak_min * 60.0),
                               ("duration_s", None if spec.insulin_duration_h is None
                                else spec.insulin_duration_h * 3600.0)) if v is not None}
    calculator = BolusCalculator(
        carb_ratio, _quantity(spec.correction_factor, glucose_unit,
                              f"{where}.correction_factor"),
        _quantity(spec.target, glucose_unit, f"{where}.target"))
    if measured is None:
        raise ConfigError(f"{where}: needs the glucose readings' variable "
                          f"(controller.safety.measured or a sensor of {spec.output!r})")
    # the pump of the insulin input takes bolus commands when it has a max_bolus
    bolus_commands = any(p.input == spec.input and p.max_bolus is not None
                         for p in scenario.pump)
    return BasalBolusController(input=spec.input, basal_profile=profile,
                                calculator=calculator, glucose_var=measured,
                                announcement_var=f"{spec.meal_input}_announced",
                                period_s=c.period_s,
                                clock_at_t0_h=scenario.scenario.start_clock_h or 0.0,
                                curve=InsulinCurve(**curve), bolus_commands=bolus_commands)


def _scheduled_controller(scenario: Scenario, spec, c, lm: LibraryModel,
                          patient: VirtualPatientSpec, measured: str | None,
                          changes: list[tuple[float, dict]]) -> Controller:
    """``kind = "nomogram"`` or ``"mipd"``: doses on a clock (control/scheduled.py), amounts
    in the input's amount unit, levels in the measured output's unit; both are told the
    scenario's covariate changes when they happen."""
    where = f"controller.{c.kind}"
    own = scenario_model(scenario, spec.model) if getattr(spec, "model", None) else lm
    amount_unit = _amount_unit(own.model, spec.input, f"{where}.input")

    def amount(quantity, key: str) -> float:
        value, unit = quantity
        try:
            return value * conversion_factor(unit, amount_unit, what=f"{where}.{key}")
        except UnitError as err:
            raise ConfigError(str(err)) from None

    rounding = []
    for k, row in enumerate(spec.rounding):
        if "step" not in row.quantities:
            raise ConfigError(f"{where}.rounding[{k}]: needs step_<unit> (e.g. step_mg = 250)")
        below = amount(row.quantities["below"], f"rounding[{k}].below") \
            if "below" in row.quantities else math.inf
        rounding.append((below, amount(row.quantities["step"], f"rounding[{k}].step")))
    caps = {name: amount(spec.quantities[name], name)
            for name in ("max_dose", "loading_dose_max") if name in spec.quantities}
    first_dose_s = 0.0
    if spec.dose_clock_h is not None:
        start = scenario.scenario.start_clock_h or 0.0
        first_dose_s = ((spec.dose_clock_h - start) % 24.0) * 3600.0
    common = dict(input=spec.input, infusion_s=spec.infusion_s, period_s=c.period_s,
                  first_dose_s=first_dose_s, rounding=rounding, **caps)
    if measured is None:
        raise ConfigError(f"{where}: needs the variable of the levels it reads "
                          f"(controller.safety.measured or a sensor)")
    if spec.output not in own.model.output_names:
        raise ConfigError(f"{where}.output: model {own.model.name!r} has no output "
                          f"{spec.output!r}; outputs: {', '.join(own.model.output_names)}")
    level_unit = own.model.outputs[own.model.output_index(spec.output)].unit
    if c.kind == "nomogram":
        from ..control.scheduled import NomogramBand, NomogramController

        per_kg = {}
        for name in ("loading_dose", "maintenance_dose"):
            if name not in spec.quantities:
                raise ConfigError(f"{where}: needs {name}_<unit> (e.g. {name}_mg_per_kg)")
            value, unit = spec.quantities[name]
            try:
                per_kg[name] = value * conversion_factor(unit, f"{amount_unit}/kg",
                                                         what=f"{where}.{name}")
            except UnitError as err:
                raise ConfigError(str(err)) from None
        troughs = {name: _quantity(getattr(spec, name), level_unit, f"{where}.{name}")
                   for name in ("trough_target", "trough_low", "trough_high")}
        made = NomogramController(
            measured=measured, bands=[NomogramBand(b.at_least, None if b.interval_h is None
                                                   else b.interval_h * 3600.0)
                                      for b in spec.band],
            band_covariate=spec.band_covariate, weight_covariate=spec.weight_covariate,
            covariates=patient.covariates, loading_per_kg=per_kg["loading_dose"],
            maintenance_per_kg=per_kg["maintenance_dose"],
            trough_before_s=spec.trough_before_s,
            steady_state_doses=spec.steady_state_doses, **troughs, **common)
    else:
        from ..control.map_estimation import MIPDController

        if spec.estimator.kind not in (None, "map"):
            raise ConfigError(f"{where}.estimator.kind = {spec.estimator.kind!r}: MIPD uses "
                              f"the Bayesian MAP estimate (\"map\")")
        auc_unit = level_unit.replace("/", "*h/", 1) if "/" in level_unit else \
            f"{level_unit}*h"
        bayes = _bayes_estimator(scenario, spec, own, dict(patient.covariates), changes,
                                 where)
        made = MIPDController(own, patient.covariates, output=spec.output, measured=measured,
                              interval_s=spec.dose_interval_s,
                              target_auc_24h=_quantity(spec.auc_target, auc_unit,
                                                       f"{where}.auc_target"),
                              estimator=bayes, **common)
        return made       # its estimator was told the changes
    for t, covariates in changes:
        made.covariates_from(t, covariates)
    return made


def metrics_target(scenario: Scenario) -> tuple[float | None, tuple[float, float] | None]:
    """``[metrics]`` target and window in the scored output's unit (a value may carry its
    own: ``target = "70 mmHg"``); ``(None, None)`` without them."""
    m = scenario.metrics
    if m is None:
        return None, None
    model = scenario_model(scenario).model
    if m.output not in model.output_names:
        raise ConfigError(f"metrics.output: model {model.name!r} has no output {m.output!r}; "
                          f"outputs: {', '.join(model.output_names)}")
    unit = model.outputs[model.output_index(m.output)].unit
    target = _quantity(m.target, unit, "metrics.target")
    window = None if m.window is None else (
        _quantity(m.window[0], unit, "metrics.window[0]"),
        _quantity(m.window[1], unit, "metrics.window[1]"))
    if window is not None and not window[0] < window[1]:
        raise ConfigError(f"metrics.window: expected low < high, got {list(window)} {unit}")
    return target, window


def _controller_params(scenario: Scenario, own: LibraryModel,
                       patient: VirtualPatientSpec) -> dict[str, float]:
    """A controller's own model of the patient: its population's typical values for the
    patient's covariates (those it declares), on the scenario's clock."""
    params = own.population.typical_parameters(
        {k: v for k, v in patient.covariates.items()
         if k in {cov.name for cov in own.population.covariates}})
    params.update(_clock_params(scenario, own.model))
    return params


def _quantity(value, unit: str, where: str) -> float | None:
    """A scenario value in *unit*: a number as given, or a string with its own unit
    converted ("70 mmHg", "0.5 ug/mL"); None stays None."""
    if value is None or not isinstance(value, str):
        return value
    try:
        return parse_quantity(value, unit, what=where)
    except UnitError as err:
        raise ConfigError(str(err)) from None


def _nmpc_fields(spec, c, model, clock_h: float | None = None) -> dict:
    """NMPCConfig's arguments from ``[controller.nmpc]``: rates and amounts in each input's
    amount unit (per second), windows as (low, high); only what is given, so every other
    default is NMPCConfig's own."""
    fields: dict = {"output": spec.output, "inputs": tuple(spec.input), "period_s": c.period_s,
                    "horizon": spec.horizon}
    rate_bounds, max_change, change_weights, use_weights = {}, {}, {}, {}
    for name, item in spec.input.items():
        where = f"controller.nmpc.input.{name}"
        amount_unit = _amount_unit(model, name, where)
        if "max_rate" not in item.quantities:
            raise ConfigError(f"{where}: needs max_rate_<unit> (e.g. max_rate_mg_per_h)")
        rate_bounds[name] = (0.0, _rate(item.quantities["max_rate"], amount_unit,
                                        f"{where}.max_rate"))
        if "max_change" in item.quantities:
            max_change[name] = _rate(item.quantities["max_change"], amount_unit,
                                     f"{where}.max_change")
        if item.change_weight is not None:
            change_weights[name] = item.change_weight
        if item.use_weight is not None:
            use_weights[name] = item.use_weight
    fields.update(rate_bounds=rate_bounds, max_change=max_change,
                  change_weights=change_weights, use_weights=use_weights)
    for quantity in ("max_dose", "loading_dose_max", "dose_step"):
        given = {}
        for name, item in spec.input.items():
            if quantity in item.quantities:
                where = f"controller.nmpc.input.{name}.{quantity}"
                value, unit = item.quantities[quantity]
                try:
                    given[name] = value * conversion_factor(
                        unit, _amount_unit(model, name, where), what=where)
                except UnitError as err:
                    raise ConfigError(str(err)) from None
        if given:
            fields[quantity] = given
    def unit_of(name: str | None) -> str:
        return model.outputs[model.output_index(name or spec.output)].unit

    tracked, windowed = unit_of(spec.output), unit_of(spec.window_output)
    exposed = unit_of(spec.exposure_output or spec.window_output)
    auc_unit = (exposed.replace("/", "*h/", 1) if "/" in exposed
                else "h" if exposed == "1" else f"{exposed}*h")
    values = {name: _quantity(getattr(spec, name), unit, f"controller.nmpc.{name}")
              for unit, names in (
                  (tracked, ("reference",)),
                  (windowed, ("soft_low", "soft_high", "hard_low", "hard_high",
                              "terminal_low", "terminal_high")),
                  (exposed, ("trough_soft_low", "trough_soft_high", "trough_hard_low",
                             "trough_hard_high", "peak_soft_low", "peak_soft_high",
                             "peak_hard_low", "peak_hard_high", "time_above_threshold",
                             "time_above_width")),
                  (auc_unit, ("auc_target", "auc_soft_low", "auc_soft_high", "auc_hard_low",
                              "auc_hard_high")))
              for name in names}
    if values["reference"] is None:
        fields["output_weight"] = 0.0 if spec.output_weight is None else spec.output_weight
        if fields["output_weight"]:
            raise ConfigError("controller.nmpc.output_weight: tracking needs a reference")
    else:
        fields["reference"] = values["reference"]
        if spec.output_weight is not None:
            fields["output_weight"] = spec.output_weight
    for label, (low, high) in (
            ("soft_window", (values["soft_low"], values["soft_high"])),
            ("hard_window", (values["hard_low"], values["hard_high"])),
            ("terminal_window", (values["terminal_low"], values["terminal_high"])),
            ("trough_soft_window", (values["trough_soft_low"], values["trough_soft_high"])),
            ("trough_hard_window", (values["trough_hard_low"], values["trough_hard_high"])),
            ("peak_soft_window", (values["peak_soft_low"], values["peak_soft_high"])),
            ("peak_hard_window", (values["peak_hard_low"], values["peak_hard_high"])),
            ("auc_soft_window", (values["auc_soft_low"], values["auc_soft_high"])),
            ("auc_hard_window", (values["auc_hard_low"], values["auc_hard_high"]))):
        if low is not None or high is not None:
            fields[label] = (-math.inf if low is None else low,
                             math.inf if high is None else high)
    for name in ("move_block", "window_output", "soft_every", "dose_interval_s", "solver",
                 "transcription", "max_iter", "dual_tolerance", "rk4_steps", "infusion_s",
                 "dose_clock_h", "peak_offset_s", "exposure_output", "auc_window_s",
                 "auc_window_start_s", "auc_weight", "time_above_target", "time_above_min"):
        if getattr(spec, name) is not None:
            fields[name] = getattr(spec, name)
    for name in ("auc_target", "time_above_threshold", "time_above_width"):
        if values[name] is not None:
            fields[name] = values[name]
    for name in ("soft_weights", "auc_soft_weights", "time_above_weights"):
        if getattr(spec, name) is not None:
            fields[name] = tuple(getattr(spec, name))
    infusion = spec.infusion_s
    if infusion is not None and abs(infusion / c.period_s - round(infusion / c.period_s)) \
            > 1e-9:
        raise ConfigError(f"controller.nmpc.infusion_s = {infusion}: must be a whole number "
                          f"of control periods ({c.period_s} s), so that a decision ends it")
    if clock_h is not None and CLOCK_PARAM not in model.param_names:
        fields["clock_time_at_t0_h"] = clock_h
    if spec.qp_solvers is not None:
        fields["qp_solvers"] = tuple(spec.qp_solvers)
    if spec.ratio is not None:
        fields["ratio"] = tuple(spec.ratio)
    if spec.dose_windows:
        fields["dose_windows"] = _dose_windows(spec.dose_windows, model,
                                               "controller.nmpc.dose_windows")
    return fields


def _nmpc_controller(scenario: Scenario, spec, c, own: LibraryModel, params: dict[str, float],
                     patient_covariates: dict, share: bool = False,
                     measured: str | None = None,
                     changes: list[tuple[float, dict]] = ()) -> Controller:
    """NMPC + estimator on the controller's own model *own* with parameter values *params*
    (fed the readings of *measured*)."""
    import numpy as np

    from ..control.mhe import MHEConfig
    from ..control.mpc_controller import MPCController
    from ..control.nmpc import NMPCConfig

    for name in spec.scaled:
        own.model.parameter(name)
        params[name] *= spec.prior_scale
    with _scenario_names():
        nmpc = NMPCConfig(**_nmpc_fields(spec, c, own.model, scenario.scenario.start_clock_h))
    est = spec.estimator
    mhe = bayes = None
    if est.kind in ("mhe", "ekf", None) and not est.parameters:
        raise ConfigError(f"controller.nmpc.estimator.parameters: empty; name the parameters "
                          f"to estimate (with population variability in "
                          f"{own.model.name!r}: {', '.join(own.population.eta_names)}), or "
                          f"set estimator.kind = \"none\"")
    if est.kind == "map":
        bayes = _bayes_estimator(scenario, spec, own, patient_covariates, changes)
    elif est.kind != "none":
        names = own.population.eta_names
        missing = [p for p in est.parameters if p not in names]
        if missing:
            raise ConfigError(f"controller.nmpc.estimator.parameters: {missing} have no "
                              f"population variability in {own.model.name!r}; estimable: "
                              f"{', '.join(names)}")
        omega = own.population.omega
        sub = np.array([[omega[names.index(a), names.index(b)] for b in est.parameters]
                        for a in est.parameters])
        unit = own.model.outputs[own.model.output_index(spec.output)].unit
        noise_sd = _quantity(est.noise_sd, unit, "controller.nmpc.estimator.noise_sd")
        if noise_sd is None:
            residual = own.population.residual_error(spec.output)
            if residual is None or not residual.additive > 0:
                raise ConfigError(f"controller.nmpc.estimator.noise_sd: give it ({own.model.name!r} "
                                  f"declares no additive residual error on {spec.output!r})")
            noise_sd = residual.additive
        given = {k: getattr(est, k) for k in ("window", "min_samples", "disturbance",
                                              "disturbance_sd", "q_eta", "q_d", "eta_bound_sd")
                 if getattr(est, k) is not None}
        if "disturbance_sd" in given:
            given["disturbance_sd"] = _quantity(given["disturbance_sd"], unit,
                                                "controller.nmpc.estimator.disturbance_sd")
        with _scenario_names():
            mhe = MHEConfig(spec.output, tuple(est.parameters), tuple(map(tuple, sub)),
                            noise_sd=noise_sd, **given)
    shared = None
    if share:  # one patient at a time per process: the built problem serves them all
        from ..control.nmpc import NonlinearMPC, problem_structure

        # keyed on the structure: settings that differ only in weights and limits (a
        # tuning sweep) reuse the built problem with their own numbers
        key = (own.model.name, tuple(own.model.param_names), problem_structure(nmpc))
        shared = _SHARED_NMPC.get(key)
        if shared is None:
            shared = _SHARED_NMPC[key] = NonlinearMPC(own.model, nmpc)
        shared.reset(nmpc)
    kind = {} if est.kind in (None, "none", "map") else {"estimator": est.kind}
    with _scenario_names():
        return MPCController(own.model, params, nmpc, mhe, measured=measured, mpc=shared,
                             bayes=bayes, **kind)


@contextlib.contextmanager
def _scenario_names():
    """Errors of the control layer's configs name their fields as the scenario file does
    (``mhe.window`` is ``controller.nmpc.estimator.window`` there)."""
    try:
        yield
    except ConfigError as err:
        text = str(err)
        for internal, key in (("mhe.", "controller.nmpc.estimator."),
                              ("nmpc.", "controller.nmpc.")):
            if text.startswith(internal):
                raise ConfigError(key + text[len(internal):]) from None
        raise


def _bayes_estimator(scenario: Scenario, spec, own: LibraryModel, covariates: dict,
                     changes: list[tuple[float, dict]] = (), where: str = "controller.nmpc"):
    """The Bayesian MAP estimator of ``estimator.kind = "map"`` (``[<where>.estimator]``),
    told the patient's covariate changes *changes* (from their time on) and occasions."""
    from ..control.estimation import BayesianEstimator, EstimationConfig

    est = spec.estimator
    given = {k: getattr(est, k) for k in ("window", "disturbance", "disturbance_sd", "q_d",
                                          "eta_bound_sd", "lloq", "occasions", "max_iter")
             if getattr(est, k) is not None}
    if est.parameters:
        given["parameters"] = tuple(est.parameters)
    unit = own.model.outputs[own.model.output_index(spec.output)].unit
    for name in ("disturbance_sd", "lloq"):
        if name in given:
            given[name] = _quantity(given[name], unit, f"{where}.estimator.{name}")
    try:
        config = EstimationConfig(spec.output, **given)
        mine = {k: v for k, v in covariates.items()
                if k in {cov.name for cov in own.population.covariates}}
        bayes = BayesianEstimator(own, mine, config, fixed=_clock_params(scenario, own.model))
        names = {cov.name for cov in own.population.covariates}
        for t, values in changes:
            told = {k: v for k, v in values.items() if k in names}
            if told:
                bayes.covariates_from(t, told)
        for t in scenario.patient.occasions_s:
            bayes.new_occasion(t)
    except ConfigError as err:
        raise ConfigError(f"{where}.estimator: {err}") from None
    return bayes


def build_setup(scenario: Scenario, index: int, seed: int, *,
                share_solvers: bool = False) -> tuple[LoopSetup,
                                                                    VirtualPatientSpec]:
    """The closed-loop set-up of patient *index* (0-based) with *seed*."""
    lm = scenario_model(scenario)
    patient = build_patient(scenario, index, seed)
    rngs = streams(scenario.scenario.streams_name, seed, index)
    pumps = [_pump(p, lm, f"pump[{k}]") for k, p in enumerate(scenario.pump)]
    sensors = [_sensor(scenario, s, lm, f"sensor[{k}]") for k, s in enumerate(scenario.sensor)]
    disturbances = []
    for k, d in enumerate(scenario.disturbance):
        if d.output not in lm.model.output_names:
            raise ConfigError(f"disturbance[{k}].output: model has no output {d.output!r}; "
                              f"outputs: {', '.join(lm.model.output_names)}")
        disturbances.append(OutputDisturbance(d.output, tuple(d.times_s), tuple(d.values),
                                              d.kind))
    safety = safety_config(scenario, lm.model)
    changes = covariate_changes(scenario, patient, seed)   # drawn once, used everywhere
    controller = _controller(scenario, lm, patient, share_solvers, safety.measured, changes)
    _check_safety_inputs(scenario, controller)
    _check_clock(scenario, [lm.model] + [getattr(controller, "model", lm.model)])
    info = scenario.scenario
    if not math.isfinite(info.duration_s):
        raise ConfigError("scenario.duration_s must be finite")
    setup = LoopSetup(lm.model, patient.params, controller, pumps, sensors, info.duration_s,
                      info.record_step_s, disturbances, scenario.controller.lease_periods,
                      info.latency_s, rngs["noise"],
                      parameter_changes=parameter_changes(scenario, patient, seed, changes),
                      safety=safety, meals=meal_schedule(scenario, patient, seed),
                      covariate_changes=tuple(changes))
    return setup, patient
