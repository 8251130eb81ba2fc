"""From a validated scenario to the objects of one run: the virtual patient, its pumps and
sensors, the controller, and the closed-loop set-up.

Every patient is built from (scenario, seed, patient index) alone; see
:func:`mpc_dose.plant.cohort.streams`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..control.base import Controller
from ..control.baselines import (CallableController, FixedRegimen, PIDController, PIDSettings,
                                 load_user_controller)
from ..control.insulin import InsulinCurve
from ..control.supervisor import SafetyConfig
from ..errors import ConfigError, ModelError
from ..model.library import LibraryModel, load
from ..model.spec import CLOCK_PARAM
from ..plant.cohort import (CovariateDistribution, VirtualPatientSpec, patient_from_population,
                            patient_from_row, streams)
from ..plant.patient import Meal, OutputDisturbance
from ..plant.pump import PumpConfig
from ..plant.sensor import (GLUCOSE_MG_DL_PER_MMOL_L, CGMModel, FilteredNoise, SensorConfig,
                            bis_noise_filter)
from ..scenario.dosing_table import read_dosing_table
from ..scenario.schema import BANK_KEYS, PIDSpec, Scenario
from ..units import GLUCOSE, UnitError, conversion_factor, convert_substance, parse_quantity
from .closed_loop import LoopSetup

__all__ = ["cohort_size", "build_patient", "build_setup", "read_cohort_table",
           "parameter_changes", "safety_config", "scenario_model", "insulin_therapy",
           "patient_therapy_settings", "INSULIN_KINDS"]

#: the controller kinds that dose insulin from a patient's pump settings
INSULIN_KINDS = ("basal_bolus", "pid_ifb", "openaps")


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

    import io

    table = scenario.patient.table
    path = _resolve(scenario, table.path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"patient.table.path: cannot read {str(path)!r} ({err})") from None
    # whole comment lines only: a '#' inside a value is data (simglucose's patient names,
    # "adult#001"), where pandas' comment="#" would cut the row there
    kept = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    return pd.read_csv(io.StringIO(kept)).to_dict("records")


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
        columns = dict(spec.table.columns)
        if spec.table.layout:
            row, columns = _read_layout(lm, spec.table.layout, row, columns,
                                        f"patient.table row {index + 1}")
        patient = patient_from_row(lm, row, columns, spec.table.codes, index, rng,
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


def _read_layout(lm: LibraryModel, layout: str, row: dict, columns: dict[str, str],
                 where: str) -> tuple[dict, dict[str, str]]:
    """*row* read through the model's table layout *layout*: the row with the layout's
    values (covariates and parameters, by name) added, and *columns* with those names
    mapped to themselves (the scenario's own columns win)."""
    layouts = {name: read for e in lm.entries for name, read in e.table_layouts.items()}
    if layout not in layouts:
        known = ", ".join(repr(k) for k in layouts) or "none"
        raise ConfigError(f"patient.table.layout = {layout!r}: model {lm.name!r} reads no "
                          f"such table layout (it reads: {known})")
    values = layouts[layout](row, where=where)
    return {**row, **values}, {**{name: name for name in values}, **columns}


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
        scenario.meals is not None or c.kind in INSULIN_KINDS or \
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


def _pump(spec, model, where: str) -> PumpConfig:
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
    if c.kind != "pid" and getattr(c, c.kind, None) is None:
        raise ConfigError(f"controller.kind = {c.kind!r} needs a [controller.{c.kind}] table")
    given = c.safety
    sensor_vars = [s.var or s.output for s in scenario.sensor]
    defaults: dict = {}
    if c.kind == "pid":
        pid = c.pid or PIDSpec()
        defaults = {"measured": pid.measured, "max_rates": dict(pid.max_rates)}
    elif c.kind in ("nmpc", "mipd", "nomogram") + INSULIN_KINDS and \
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
    if sensor is not None:  # readings from devices in other units are converted into it
        fields["measured_unit"] = unit
        fields["measured_substance"] = "glucose" if "glucose" in sensor.output else None
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
        if "max_on_board" in spec.quantities:
            _on_board_limit(scenario, model, fields, name, spec, amount_unit, where)
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


def _on_board_limit(scenario: Scenario, model, fields: dict, name: str, spec,
                    amount_unit: str, where: str) -> None:
    """``max_on_board_<unit>`` of input *name* into the SafetyConfig *fields*: the limit, the
    basal it does not count (the programmed basal of the input's pump) and the insulin
    curve of the controller's own settings (its kind's table, or the NMPC's meal_bolus)."""
    value, unit = spec.quantities["max_on_board"]
    try:
        limit = value * conversion_factor(unit, amount_unit, what=f"{where}.max_on_board")
    except UnitError as err:
        raise ConfigError(str(err)) from None
    pumps = [p for p in scenario.pump if p.input == name]
    if len(pumps) != 1 or pumps[0].programmed_basal is None:
        raise ConfigError(f"{where}.max_on_board: needs one [[pump]] of input {name!r} with "
                          f"a programmed_basal (the rate its limit does not count)")
    pump = _pump(pumps[0], model, f"pump {pumps[0].pump!r}")
    basal = pump.fallback_ml_per_h * pump.concentration / 3600.0   # the programmed basal
    c = scenario.controller
    settings = getattr(c, c.kind, None)
    if c.kind == "nmpc" and settings is not None:
        settings = settings.meal_bolus
    fields["max_on_board"] = {**fields.get("max_on_board", {}), name: limit}
    fields["on_board_basal"] = {**fields.get("on_board_basal", {}), name: basal}
    fields["on_board_curve"] = _insulin_curve(settings)


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
        params = _nmpc_prior_params(scenario, chosen, own, patient)
        if chosen.perfect_model:  # in silico: the patient's own values (an upper bound)
            params.update({k: v for k, v in patient.params.items() if k in params})
        elif chosen.scaled_to_basal:
            params = _matched_to_settings(chosen, own, params, lm, patient)
        return _nmpc_controller(scenario, chosen, c, own, params,
                                dict(patient.covariates), share, measured, changes,
                                patient=patient, patient_model=lm)
    if c.kind in ("nomogram", "mipd"):
        return _scheduled_controller(scenario, chosen, c, lm, patient, measured, changes)
    if c.kind == "basal_bolus":
        return _basal_bolus_controller(scenario, chosen, c, lm, patient, measured)
    if c.kind == "pid_ifb":
        return _pid_ifb_controller(scenario, chosen, c, lm, patient, measured)
    if c.kind == "openaps":
        return _openaps_controller(scenario, chosen, c, lm, patient, measured)
    factory = load_user_controller(chosen.target, scenario.base_dir)
    made = factory(inputs=tuple(chosen.inputs), period_s=c.period_s, **chosen.options)
    if hasattr(made, "decide"):
        return made
    return CallableController(made, chosen.inputs, period_s=c.period_s, name=chosen.target)


#: (id of the patient model, its parameters, target) -> (the model, its settings)
_TITRATED: dict[tuple, tuple[LibraryModel, object]] = {}


def _titrated(lm: LibraryModel, params: dict[str, float], target_mmol_per_L: float):
    """``patient_therapy(lm, params, target)``, titrated once per patient: the meal-bolus
    calculator, the controller model's match to the settings and each bank candidate's
    ask for the same settings of the same patient in one build (about 25 simulations
    each)."""
    from ..model.therapy import patient_therapy

    key = (id(lm), tuple(sorted(params.items())), float(target_mmol_per_L))
    hit = _TITRATED.get(key)
    if hit is None or hit[0] is not lm:  # an id reused by another model is not a hit
        if len(_TITRATED) >= 256:
            _TITRATED.clear()
        hit = _TITRATED[key] = (lm, patient_therapy(lm, params, target_mmol_per_L))
    return hit[1]


def patient_therapy_settings(lm: LibraryModel, patient: VirtualPatientSpec,
                             target: float, glucose_unit: str, where: str):
    """The patient's own pump settings (model/therapy.py) at *target* [*glucose_unit*],
    derived from its true parameters as a clinician titrates them."""
    try:
        target_mmol = convert_substance(target, glucose_unit, "mmol/L", GLUCOSE,
                                        what=f"{where}.target")
        return _titrated(lm, patient.params, target_mmol)
    except (ModelError, UnitError) as err:
        raise ConfigError(f"{where}: the patient's own settings (patient {patient.index}): "
                          f"{err}") from None


@dataclass(frozen=True)
class _InsulinTherapy:
    """A patient's pump settings as an insulin controller of *where* uses them, in the
    model's units: the insulin input's amount unit and the glucose output's unit."""

    amount_unit: str
    glucose_unit: str
    #: [glucose unit] the glucose aimed at
    target: float
    #: (clock hour, rate [amount/s]) rows
    basal_profile: tuple[tuple[float, float], ...]
    #: [g per amount]
    carb_ratio: float
    #: [glucose unit per amount]
    correction_factor: float
    #: [amount/day] the day's basal plus the insulin for DAILY_CARBS_G (model/therapy.py)
    total_daily_dose: float
    curve: object
    #: the meals' announcement variable (None: no meal input named)
    announcement_var: str | None

    def in_U_and_mg_dl(self) -> dict[str, float | tuple]:
        """The settings in U, U/h and mg/dL (the glucose controllers' own units), with
        *amount_per_U*: how much of the input's amount unit one U is."""
        amount_per_U = conversion_factor("U", self.amount_unit, what="insulin input")
        mg_dl = convert_substance(1.0, self.glucose_unit, "mg/dL", GLUCOSE,
                                  what="glucose output")
        return {"amount_per_U": amount_per_U,
                "target_mg_dl": self.target * mg_dl,
                "basal_U_per_h": tuple((h, r * 3600.0 / amount_per_U)
                                       for h, r in self.basal_profile),
                "carb_ratio_g_per_U": self.carb_ratio * amount_per_U,
                "isf_mg_dl_per_U": self.correction_factor * mg_dl * amount_per_U,
                "total_daily_dose_U": self.total_daily_dose / amount_per_U}


def _glucose_quantity(value, unit: str, where: str) -> float | None:
    """A glucose value in *unit*: a number as given, or a string with its unit, mg/dL and
    mmol/L both accepted (converted by glucose's molar mass)."""
    if value is None or not isinstance(value, str):
        return value
    try:
        return parse_quantity(value, unit, what=where)
    except UnitError:
        pass
    text = value.strip()
    number = text.split()[0] if " " in text else text.rstrip("abcdefghijklmnopqrstuvwxyz"
                                                            "ABCDEFGHIJKLMNOPQRSTUVWXYZ/")
    given_unit = text[len(number):].strip()
    try:
        return convert_substance(float(number), given_unit, unit, GLUCOSE, what=where)
    except (UnitError, ValueError) as err:
        raise ConfigError(f"{where} = {value!r}: expected a glucose value in {unit} (a "
                          f"number) or with its unit, e.g. '120 mg/dL' or '6.7 mmol/L' "
                          f"({err})") from None


def insulin_therapy(scenario: Scenario, spec, where: str, lm: LibraryModel,
                    patient: VirtualPatientSpec) -> _InsulinTherapy:
    """The pump settings of ``[controller.<insulin kind>]`` (*spec*, at *where*) for
    *patient*: each of basal, carb ratio and correction factor as given, else the
    patient's own (:func:`patient_therapy_settings`, titrated from its model at the
    target). One place for every insulin kind (basal_bolus, pid_ifb, openaps)."""
    from ..model.therapy import DAILY_CARBS_G

    model = lm.model
    amount_unit = _amount_unit(model, spec.input, f"{where}.input")
    meal_input = getattr(spec, "meal_input", None)
    if meal_input is not None:
        meal_unit = _amount_unit(model, meal_input, f"{where}.meal_input")
        try:
            conversion_factor(meal_unit, "g", what=f"{where}.meal_input")
        except UnitError as err:
            raise ConfigError(str(err)) from None
    if spec.output not in model.output_names:
        raise ConfigError(f"{where}.output: model {model.name!r} has no output "
                          f"{spec.output!r}; outputs: {', '.join(model.output_names)}")
    glucose_unit = model.outputs[model.output_index(spec.output)].unit
    target = _glucose_quantity(spec.target, glucose_unit, f"{where}.target")
    if not (isinstance(target, (int, float)) and target > 0):
        raise ConfigError(f"{where}.target = {spec.target!r}; expected a glucose > 0")
    own = None
    if not spec.basal or "carb_ratio" not in spec.quantities or spec.correction_factor is None:
        own = patient_therapy_settings(lm, patient, target, glucose_unit, where)
    rows = ([(row.clock_h, row.quantities.get("rate")) for row in spec.basal] if spec.basal
            else [(hour, (rate, "U/h")) for hour, rate in own.basal_U_per_h])
    profile = []
    for k, (hour, rate) in enumerate(rows):
        if rate is None:
            raise ConfigError(f"{where}.basal[{k}]: needs rate_<unit> (e.g. rate_U_per_h)")
        profile.append((hour, _rate(rate, amount_unit, f"{where}.basal[{k}].rate")))
    profile.sort()
    if profile[0][0] != 0.0:
        raise ConfigError(f"{where}.basal: the first row must start at clock_h = 0, got "
                          f"{profile[0][0]:g}")
    value, unit = (spec.quantities["carb_ratio"] if "carb_ratio" in spec.quantities
                   else (own.carb_ratio_g_per_U, "g/U"))
    try:   # announcements come in g; doses in the insulin input's amount unit
        carb_ratio = value * conversion_factor(unit, f"g/{amount_unit}",
                                               what=f"{where}.carb_ratio")
        correction = (_glucose_quantity(spec.correction_factor, glucose_unit,
                                        f"{where}.correction_factor")
                      if spec.correction_factor is not None else
                      convert_substance(own.correction_mmol_per_L_per_U, "mmol/L",
                                        glucose_unit, GLUCOSE, what=f"{where}.correction_factor")
                      / conversion_factor("U", amount_unit, what=f"{where}.input"))
    except UnitError as err:
        raise ConfigError(str(err)) from None
    if not (carb_ratio > 0 and correction > 0):
        raise ConfigError(f"{where}: carb_ratio ({carb_ratio!r}) and correction_factor "
                          f"({correction!r}) must be > 0")
    bounds = [h for h, _ in profile] + [24.0]
    daily_basal = sum(rate * (bounds[k + 1] - bounds[k]) * 3600.0
                      for k, (_, rate) in enumerate(profile))
    return _InsulinTherapy(amount_unit, glucose_unit, float(target), tuple(profile),
                           carb_ratio, correction, daily_basal + DAILY_CARBS_G / carb_ratio,
                           _insulin_curve(spec),
                           None if meal_input is None else f"{meal_input}_announced")


def _insulin_curve(spec) -> InsulinCurve:
    """The insulin-activity curve of an insulin kind's *spec* (``insulin_peak_min``,
    ``insulin_duration_h``; InsulinCurve's own defaults for those not given, or for no
    spec)."""
    peak = getattr(spec, "insulin_peak_min", None)
    duration = getattr(spec, "insulin_duration_h", None)
    curve = {k: v for k, v in (("peak_s", None if peak is None else peak * 60.0),
                               ("duration_s", None if duration is None else duration * 3600.0))
             if v is not None}
    return InsulinCurve(**curve)


def _glucose_var(measured: str | None, where: str, output: str) -> str:
    if measured is None:
        raise ConfigError(f"{where}: needs the glucose readings' variable "
                          f"(controller.safety.measured or a sensor of {output!r})")
    return measured


def _basal_bolus_controller(scenario: Scenario, spec, c, lm: LibraryModel,
                            patient: VirtualPatientSpec, measured: str | None) -> Controller:
    """``kind = "basal_bolus"``: rates in the insulin input's amount unit per second, the
    calculator's glucose values in the glucose output's unit; settings not given are the
    patient's own (:func:`insulin_therapy`)."""
    from ..control.basal_bolus import BasalBolusController
    from ..control.insulin import BolusCalculator

    where = "controller.basal_bolus"
    therapy = insulin_therapy(scenario, spec, where, lm, patient)
    calculator = BolusCalculator(therapy.carb_ratio, therapy.correction_factor,
                                 therapy.target)
    return BasalBolusController(input=spec.input, basal_profile=therapy.basal_profile,
                                calculator=calculator,
                                glucose_var=_glucose_var(measured, where, spec.output),
                                announcement_var=therapy.announcement_var,
                                period_s=c.period_s,
                                clock_at_t0_h=scenario.scenario.start_clock_h or 0.0,
                                curve=therapy.curve,
                                bolus_commands=_pump_takes_boluses(scenario, spec.input))


def _pump_takes_boluses(scenario: Scenario, input_name: str) -> bool:
    """Whether the pump of *input_name* takes bolus commands (it has a max_bolus)."""
    return any(p.input == input_name and p.max_bolus is not None for p in scenario.pump)


def _meal_boluses(therapy: _InsulinTherapy, own: dict, period_s: float):
    """The meal boluses of a closed loop (mg/dL and U), or None without a meal input."""
    from ..control.insulin import BolusCalculator, MealBoluses

    if therapy.announcement_var is None:
        return None
    calculator = BolusCalculator(own["carb_ratio_g_per_U"], own["isf_mg_dl_per_U"],
                                 own["target_mg_dl"])
    return MealBoluses(calculator, therapy.announcement_var, period_s, therapy.curve)


def _pid_ifb_controller(scenario: Scenario, spec, c, lm: LibraryModel,
                        patient: VirtualPatientSpec, measured: str | None) -> Controller:
    """``kind = "pid_ifb"`` (control/pid_ifb.py): the gains not given from the patient's
    total daily dose, the integral starting at its basal."""
    from ..control import pid_ifb

    where = "controller.pid_ifb"
    therapy = insulin_therapy(scenario, spec, where, lm, patient)
    own = therapy.in_U_and_mg_dl()
    max_rate = math.inf
    if "max_rate" in spec.quantities:
        max_rate = _rate(spec.quantities["max_rate"], "U", f"{where}.max_rate") * 3600.0
    kp = spec.kp_U_per_h_per_mg_dL if spec.kp_U_per_h_per_mg_dL is not None else         pid_ifb.proportional_gain(own["total_daily_dose_U"], spec.kp_tdd_divisor
                                  if spec.kp_tdd_divisor is not None
                                  else pid_ifb.KP_TDD_DIVISOR)
    optional = {name: value for name, value in (
        ("ti_min", spec.ti_min), ("td_min", spec.td_min), ("gamma", spec.insulin_feedback),
        ("ifb_time_constants_min", spec.ifb_time_constants_min)) if value is not None}
    return pid_ifb.PIDIFBController(
        input=spec.input, glucose_var=_glucose_var(measured, where, spec.output),
        kp_U_per_h_per_mg_dl=kp, basal_profile_U_per_h=own["basal_U_per_h"],
        target_mg_dl=own["target_mg_dl"], max_rate_U_per_h=max_rate, period_s=c.period_s,
        clock_at_t0_h=scenario.scenario.start_clock_h or 0.0,
        meals=_meal_boluses(therapy, own, c.period_s), amount_per_U=own["amount_per_U"],
        **optional)


def _openaps_controller(scenario: Scenario, spec, c, lm: LibraryModel,
                        patient: VirtualPatientSpec, measured: str | None) -> Controller:
    """``kind = "openaps"`` (control/openaps.py): the patient's settings, the documented
    safety settings unless given."""
    from ..control.openaps import OpenAPSController

    where = "controller.openaps"
    therapy = insulin_therapy(scenario, spec, where, lm, patient)
    own = therapy.in_U_and_mg_dl()
    optional = {}
    if "max_iob" in spec.quantities:
        value, unit = spec.quantities["max_iob"]
        try:
            optional["max_iob_U"] = value * conversion_factor(unit, "U",
                                                              what=f"{where}.max_iob")
        except UnitError as err:
            raise ConfigError(str(err)) from None
    if "max_basal" in spec.quantities:
        optional["pump_max_basal_U_per_h"] = _rate(spec.quantities["max_basal"], "U",
                                                   f"{where}.max_basal") * 3600.0
    for name in ("max_daily_safety_multiplier", "current_basal_safety_multiplier"):
        if getattr(spec, name) is not None:
            optional[name] = getattr(spec, name)
    if spec.suspend_below is not None:
        below = _glucose_quantity(spec.suspend_below, therapy.glucose_unit,
                                  f"{where}.suspend_below")
        optional["suspend_below_mg_dl"] = convert_substance(
            below, therapy.glucose_unit, "mg/dL", GLUCOSE, what=f"{where}.suspend_below")
        if not optional["suspend_below_mg_dl"] < own["target_mg_dl"]:
            raise ConfigError(f"{where}.suspend_below = {spec.suspend_below!r}: expected "
                              f"below the target ({spec.target!r})")
    return OpenAPSController(
        input=spec.input, glucose_var=_glucose_var(measured, where, spec.output),
        basal_profile_U_per_h=own["basal_U_per_h"], isf_mg_dl_per_U=own["isf_mg_dl_per_U"],
        target_mg_dl=own["target_mg_dl"], period_s=c.period_s,
        clock_at_t0_h=scenario.scenario.start_clock_h or 0.0, curve=therapy.curve,
        meals=_meal_boluses(therapy, own, c.period_s),
        carb_ratio_g_per_U=own["carb_ratio_g_per_U"], amount_per_U=own["amount_per_U"],
        **optional)


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
    if spec.reference_schedule:
        if values["reference"] is not None:
            raise ConfigError("controller.nmpc: give reference or reference_schedule, not both")
        # the constant reference is the schedule's first row; the controller follows the
        # schedule itself (_reference_schedule)
        values["reference"] = _quantity(spec.reference_schedule[0].value, tracked,
                                        "controller.nmpc.reference_schedule[0].value")
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
                 "transcription", "linearisation_passes", "max_iter", "dual_tolerance",
                 "rk4_steps", "infusion_s", "dose_clock_h", "peak_offset_s", "exposure_output", "auc_window_s",
                 "auc_window_start_s", "auc_weight", "time_above_target", "time_above_min"):
        if getattr(spec, name) is not None:
            fields[name] = getattr(spec, name)
    for name in ("auc_target", "time_above_threshold", "time_above_width"):
        if values[name] is not None:
            fields[name] = values[name]
    for name in ("soft_weights", "soft_low_weights", "auc_soft_weights", "time_above_weights"):
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


def _nmpc_prior_params(scenario: Scenario, spec, own: LibraryModel,
                       patient: VirtualPatientSpec) -> dict[str, float]:
    """The NMPC's model for *patient* before its match to the settings: typical values
    for the covariates, the scenario's clock, ``parameters`` set outright and
    ``perfect_parameters`` (the controller's model and each of a bank's ``varied``
    candidates start from it)."""
    params = _controller_params(scenario, own, patient)
    for name, value in spec.parameters.items():
        try:
            own.model.parameter(name)
        except ModelError as err:
            raise ConfigError(f"controller.nmpc.parameters.{name}: {err}") from None
        params[name] = float(value)
    params.update(_perfect_parameters(spec, own, patient))
    return params


def _matched_names(spec) -> set[str]:
    """The NMPC model's parameters its match to the patient's settings rescales."""
    return set(spec.scaled_to_basal) | set(spec.scaled_to_carb_ratio)


def _perfect_parameters(spec, own: LibraryModel,
                        patient: VirtualPatientSpec) -> dict[str, float]:
    """``perfect_parameters`` (in silico only): the virtual patient's own values of the
    named parameters of the controller's model."""
    names = list(spec.perfect_parameters)
    where = "controller.nmpc.perfect_parameters"
    if not names:
        return {}
    if spec.perfect_model:
        raise ConfigError(f"{where}: with perfect_model = true every parameter is the "
                          f"patient's already; give one of the two")
    values = {}
    for name in names:
        if name in _matched_names(spec):
            raise ConfigError(f"{where}: {name!r} is also matched to the settings "
                              f"(scaled_to_basal or scaled_to_carb_ratio); the match "
                              f"would overwrite the patient's value")
        try:
            own.model.parameter(name)
        except ModelError as err:
            raise ConfigError(f"{where}: {err}") from None
        if name not in patient.params:
            raise ConfigError(f"{where}: the virtual patient has no value of {name!r} "
                              f"(its model is not the controller's?)")
        values[name] = float(patient.params[name])
    return values


def _matched_to_settings(spec, own: LibraryModel, params: dict[str, float],
                         lm: LibraryModel, patient: VirtualPatientSpec, *,
                         near: float | None = None) -> dict[str, float]:
    """``scaled_to_basal``: the controller model's *params* with the named parameters
    multiplied by the one factor that makes its steady-state basal at ``basal_target`` (the
    reference when not given) the patient's own (its titrated basal, rhythm off); with
    ``scaled_to_carb_ratio`` too, those parameters multiplied by the one factor (within
    ``carb_ratio_factor_range``, the nearer end when none in it does) that makes the
    controller model's meal-test carbohydrate ratio the patient's, the basal matched again
    at each trial factor (model/therapy.py: the same meal test for both). *near*: the log of
    a carb-ratio factor close to the root (a bank's candidate differs from the controller's
    matched model in one parameter): secant steps from it, the bracketed search if they
    fail."""
    import math as _math

    from scipy.optimize import brentq, newton

    from ..model.therapy import TEST_MEAL_G, at_clock, meal_test_excess

    where = "controller.nmpc.scaled_to_basal"
    for key in ("scaled_to_basal", "scaled_to_carb_ratio"):
        for name in getattr(spec, key):
            try:
                own.model.parameter(name)
            except ModelError as err:
                raise ConfigError(f"controller.nmpc.{key}: {err}") from None
    mine = [e for e in own.entries if e.basal_insulin is not None]
    theirs = [e for e in lm.entries if e.basal_insulin is not None]
    if not mine or not theirs:
        raise ConfigError(f"{where}: needs insulin models (a steady-state basal) for the "
                          f"patient and the controller")
    unit = own.model.outputs[own.model.output_index(spec.output)].unit
    target_given = spec.basal_target if spec.basal_target is not None else (
        spec.reference if spec.reference is not None else
        (spec.reference_schedule[0].value if spec.reference_schedule else None))
    if target_given is None:
        raise ConfigError(f"{where}: needs controller.nmpc.basal_target (or a reference)")
    target = convert_substance(_quantity(target_given, unit, f"{where}.basal_target"), unit,
                               "mmol/L", GLUCOSE, what=f"{where}.basal_target")

    def scaled(base: dict[str, float], names, log_factor: float) -> dict[str, float]:
        return {**base, **{name: base[name] * _math.exp(log_factor) for name in names}}

    try:
        wanted = theirs[0].basal_insulin(at_clock(lm.entries, patient.params, None), target)

        def to_basal(base: dict[str, float]) -> dict[str, float]:
            def miss(log_factor: float) -> float:
                flat = at_clock(own.entries, scaled(base, spec.scaled_to_basal, log_factor),
                                None)
                return _math.log(mine[0].basal_insulin(flat, target)) - _math.log(wanted)

            return scaled(base, spec.scaled_to_basal, brentq(miss, -6.0, 6.0, xtol=1e-6))

        out = to_basal(params)
    except (ModelError, ValueError) as err:
        raise ConfigError(f"{where}: no factor gives patient {patient.index}'s basal "
                          f"({err})") from None
    if not spec.scaled_to_carb_ratio:
        return out
    where = "controller.nmpc.scaled_to_carb_ratio"
    try:
        ratio = _titrated(lm, patient.params, target).carb_ratio_g_per_U

        def at(log_factor: float) -> dict[str, float]:
            return to_basal(scaled(params, spec.scaled_to_carb_ratio, log_factor))

        seen: dict[float, float] = {}   # brentq asks again for the ends checked first

        def excess(log_factor: float) -> float:
            """> 0 while the model's meal-test bolus is above the patient's (one
            simulation a factor: model/therapy.py meal_test_excess)."""
            if log_factor not in seen:
                seen[log_factor] = meal_test_excess(
                    own.model, at_clock(own.entries, at(log_factor), None), wanted, target,
                    TEST_MEAL_G / ratio)
            return seen[log_factor]

        low, high = (_math.log(f) for f in spec.carb_ratio_factor_range)
        if near is not None and low < near < high:
            try:   # about 4 simulations instead of about 10
                root = newton(excess, near, x1=near + 0.05, tol=1e-3, maxiter=8)
            except (RuntimeError, ArithmeticError, ValueError, ModelError):
                root = None   # the steps left the factors any basal matches, or stalled
            if root is not None and low <= root <= high:
                return at(float(root))
        if excess(low) * excess(high) <= 0:
            return at(brentq(excess, low, high, xtol=1e-3))

        # no root within: it lies beyond the end where the test misses least (the excess
        # moves one way with the factor), the end whose carb ratio is the nearer to theirs
        return at(low if abs(excess(low)) < abs(excess(high)) else high)
    except (ModelError, ValueError) as err:
        raise ConfigError(f"{where}: no factor gives patient {patient.index}'s carbohydrate "
                          f"ratio ({err})") from None


def _nmpc_controller(scenario: Scenario, spec, c, own: LibraryModel, params: dict[str, float],
                     patient_covariates: dict, share: bool = False,
                     measured: str | None = None,
                     changes: list[tuple[float, dict]] = (), *,
                     patient: VirtualPatientSpec | None = None,
                     patient_model: LibraryModel | None = None) -> Controller:
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
    if est.kind in ("mhe", "ekf", None) and not est.parameters and not est.disturbance:
        raise ConfigError(f"controller.nmpc.estimator.parameters: empty; name the parameters "
                          f"to estimate (with population variability in "
                          f"{own.model.name!r}: {', '.join(own.population.eta_names)}), "
                          f"estimate only an output disturbance (disturbance = true), or "
                          f"set estimator.kind = \"none\"")
    if est.kind == "map":
        bayes = _bayes_estimator(scenario, spec, own, patient_covariates, changes)
    elif est.kind not in ("none", "bank"):
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
    kind = {} if est.kind in (None, "none", "map", "bank") else {"estimator": est.kind}
    bank = (_model_bank(scenario, spec, c, own, params, patient, patient_model or own, nmpc)
            if est.kind == "bank" else None)
    announcements = None
    if spec.meal_input is not None:
        where = "controller.nmpc.meal_input"
        try:   # announcements come in g
            factor = conversion_factor("g", _amount_unit(own.model, spec.meal_input, where),
                                       what=where)
        except UnitError as err:
            raise ConfigError(str(err)) from None
        announcements = {f"{spec.meal_input}_announced": (spec.meal_input, factor)}
    with _scenario_names():
        return MPCController(own.model, params, nmpc, mhe, measured=measured, mpc=shared,
                             bayes=bayes, announcements=announcements,
                             meal_boluses=_nmpc_meal_boluses(scenario, spec, c,
                                                             patient_model or own, patient),
                             state_correction=(tuple(spec.corrected_states),
                                               spec.correction_gain)
                             if spec.corrected_states else None,
                             bolus_fractions=tuple(spec.meal_bolus_fractions), bank=bank,
                             reference=_reference_schedule(scenario, spec, own.model), **kind)


def _model_bank(scenario: Scenario, spec, c, own: LibraryModel, params: dict[str, float],
                patient: VirtualPatientSpec, lm: LibraryModel, nmpc):
    """``estimator.kind = "bank"``: the controller's own model (*params*) and draws from its
    population for the patient's covariates, each with the scenario's clock and the NMPC's
    ``parameters`` - with ``varied``, draws of those parameters alone in the controller's
    model before its match - and matched to the patient's settings like the own model
    (``scaled_to_basal``, ``scaled_to_carb_ratio``). Caution probes with a fifth of the
    first input's maximum rate (*nmpc*: the NMPCConfig)."""
    import numpy as np

    from ..control.model_bank import BankConfig, ModelBank

    est = spec.estimator
    where = "controller.nmpc.estimator"
    given = {k: getattr(est, k) for k in BANK_KEYS if k != "varied"
             and getattr(est, k) is not None}
    with _scenario_names():
        config = BankConfig(**given, rk4_steps=spec.rk4_steps or BankConfig.rk4_steps)
    covariates = {k: v for k, v in patient.covariates.items()
                  if k in {cov.name for cov in own.population.covariates}}
    varied = list(est.varied)
    for name in varied:
        if name not in own.population.eta_names:
            raise ConfigError(f"{where}.varied: {name!r} has no population variability in "
                              f"{own.model.name!r} (all candidates would be one); varied "
                              f"may name: {', '.join(own.population.eta_names)}")
        if name in _matched_names(spec):
            raise ConfigError(f"{where}.varied: {name!r} is also matched to the settings "
                              f"(scaled_to_basal or scaled_to_carb_ratio), which would undo "
                              f"the variation")
    # every candidate is the controller's model before its match with the drawn values of
    # the varied parameters - without varied, of every parameter with variability but
    # those the scenario sets outright (parameters, perfect_parameters)
    base = _nmpc_prior_params(scenario, spec, own, patient)
    drawn_names = varied or [name for name in own.population.eta_names
                             if name not in spec.parameters
                             and name not in spec.perfect_parameters]
    # the controller model's own carb-ratio factor: a varied candidate's lies near it
    near = (math.log(params[spec.scaled_to_carb_ratio[0]] / base[spec.scaled_to_carb_ratio[0]])
            if varied and spec.scaled_to_carb_ratio else None)
    rng = np.random.default_rng(config.seed)
    candidates = [params]
    for _ in range(config.candidates - 1):
        drawn = own.population.sample(covariates, rng).params
        drawn = {**base, **{name: drawn[name] for name in drawn_names}}
        if spec.scaled_to_basal:
            drawn = _matched_to_settings(spec, own, drawn, lm, patient, near=near)
        candidates.append(drawn)
    thetas = np.array([own.model.parameter_vector(p) for p in candidates])
    first = nmpc.inputs[0]
    probe = np.zeros(own.model.n_inputs)
    high = nmpc.rate_bounds.get(first, (0.0, math.inf))[1]
    if math.isfinite(high):
        probe[own.model.input_index(first)] = 0.2 * high
    return ModelBank(own.model, thetas, spec.output, period_s=c.period_s,
                     corrected_states=tuple(spec.corrected_states),
                     gain=spec.correction_gain, probe=probe, config=config)


def _nmpc_meal_boluses(scenario: Scenario, spec, c, own: LibraryModel,
                       patient: VirtualPatientSpec | None):
    """``[controller.nmpc.meal_bolus]``: the patient's bolus calculator (model units), or
    None."""
    if spec.meal_bolus is None:
        if spec.meal_bolus_fractions:
            raise ConfigError("controller.nmpc.meal_bolus_fractions: fractions of the meal "
                              "bolus need [controller.nmpc.meal_bolus]")
        return None
    from ..control.insulin import BolusCalculator, MealBoluses

    where = "controller.nmpc.meal_bolus"
    if patient is None:
        raise ConfigError(f"{where}: needs the patient (its own settings)")
    if spec.meal_bolus.input not in spec.input:
        raise ConfigError(f"{where}.input = {spec.meal_bolus.input!r}: not an input the NMPC "
                          f"sets ({', '.join(spec.input)})")
    if not _pump_takes_boluses(scenario, spec.meal_bolus.input):
        raise ConfigError(f"{where}: the pump of {spec.meal_bolus.input!r} must take bolus "
                          f"commands (give it a max_bolus)")
    therapy = insulin_therapy(scenario, spec.meal_bolus, where, own, patient)
    pump = next(_pump(p, own.model, f"pump[{k}]") for k, p in enumerate(scenario.pump)
                if p.input == spec.meal_bolus.input and p.max_bolus is not None)
    return MealBoluses(BolusCalculator(therapy.carb_ratio, therapy.correction_factor,
                                       therapy.target), therapy.announcement_var,
                       c.period_s, therapy.curve, bolus_commands=True,
                       max_bolus=pump.max_bolus)


def _reference_schedule(scenario: Scenario, spec, model):
    """``reference_schedule``: the reference as a function of model time [s] (None when not
    given), values in the tracked output's unit, on the scenario's clock."""
    if not spec.reference_schedule:
        return None
    unit = model.outputs[model.output_index(spec.output)].unit
    rows = sorted((row.clock_h, _quantity(row.value, unit,
                                          f"controller.nmpc.reference_schedule[{k}].value"))
                  for k, row in enumerate(spec.reference_schedule))
    if rows[0][0] != 0.0:
        raise ConfigError(f"controller.nmpc.reference_schedule: the first row must start at "
                          f"clock_h = 0, got {rows[0][0]!r}")
    from ..model.therapy import profile_rate

    start_h = scenario.scenario.start_clock_h or 0.0
    return lambda t_s: profile_rate(rows, start_h + t_s / 3600.0)


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
    pumps = [_pump(p, lm.model, f"pump[{k}]") for k, p in enumerate(scenario.pump)]
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
