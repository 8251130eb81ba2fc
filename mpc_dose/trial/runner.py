"""Closed-loop trials over a cohort: one task per patient on any executor, results written
as each patient finishes, resumable after a kill.

    result = run_trial("scenarios/tiva_benchmark.toml", "out/tiva", patients=range(100),
                       seed=0, executor=ProcessPoolExecutor(2))

Layout of *out*:

* ``trial.json``: scenario file, its SHA-256, seed, patients (a restart must match it);
* ``series/patient_0001.parquet``: the patient's time series (units in the column names);
* ``samples/patient_0001.parquet``: every sensor sample at its sample time (and arrival);
* ``deliveries/patient_0001.parquet``: every change of a delivered rate, exactly;
* ``metrics/patient_0001.json``: its metrics, written last (atomically): the patient's
  completion mark - a trial restarted after SIGKILL skips patients that have it and redoes
  the others, so it ends with the same files as an uninterrupted run;
* ``metrics.csv``: one row per patient, a column per metric (units in the names), in patient
  order; ``summary.csv``: mean, sd, median, IQR and extremes.

Any :class:`concurrent.futures.Executor` works (a process pool, a Dask cluster's
``Client.get_executor()``, or none: in this process). Each patient's randomness comes from
(scenario, seed, index) only, so the executor never changes a result.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, as_completed
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError

__all__ = ["PatientTask", "run_patient", "run_trial", "TrialResult", "override_pairs",
           "claim_folder", "glucose_set"]


@dataclass(frozen=True)
class PatientTask:
    """One patient of a trial (picklable: it crosses to worker processes)."""

    scenario_path: str
    index: int          # 0-based
    seed: int
    out: str
    cohort: str | None = None   # a cohort file replacing the scenario's patients
    #: (dotted key, value) pairs applied to the scenario file (e.g. a tuning setting)
    overrides: tuple[tuple[str, object], ...] = ()


@dataclass
class TrialResult:
    out: Path
    metrics: object       # pandas DataFrame, one row per patient
    summary: object       # pandas DataFrame, one row per metric
    ran: int              # patients run now (the others were already done)


@lru_cache(maxsize=64)
def _scenario(path: str, overrides: tuple[tuple[str, object], ...] = ()):
    from ..scenario import load_scenario

    return load_scenario(path, dict(overrides))


def _hashable(value: object) -> object:
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def override_pairs(overrides: Mapping[str, object] | None) -> tuple[tuple[str, object], ...]:
    """*overrides* as sorted (key, value) pairs (hashable: lists become tuples)."""
    return tuple(sorted((k, _hashable(v)) for k, v in (overrides or {}).items()))


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def run_patient(task: PatientTask) -> dict:
    """Run one patient and write its series and metrics; returns the metrics."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .build import build_setup, metrics_target, with_cohort
    from .closed_loop import _column as _column_name
    from .closed_loop import run_closed_loop
    from .metrics import (auc_attainment, drug_totals, neutropenia_metrics,
                          performance_metrics, readings_are_sparse, tiva_metrics,
                          true_output_metrics)

    scenario = with_cohort(_scenario(task.scenario_path, task.overrides), task.cohort)
    setup, patient = build_setup(scenario, task.index, task.seed, share_solvers=True)
    setup = replace(setup, encode_frames=False)  # same messages, without the codec
    result = run_closed_loop(setup)
    frame = result.to_pandas()
    model = setup.model
    weight = patient.covariates.get("weight")
    metrics: dict = {"patient": task.index + 1}
    spec = scenario.metrics
    target, window = metrics_target(scenario)   # in the output's unit
    if spec is not None:
        # the patient's side: the true output at every record (names with _true)
        out_spec = model.outputs[model.output_index(spec.output)]
        true = frame[_column_name("true_", spec.output, out_spec.unit)]
        metrics.update(true_output_metrics(frame.time_s, true, output=spec.output,
                                           unit=out_spec.unit, target=target,
                                           window=window))
        if spec.clinical == "auc":
            metrics.update(auc_attainment(frame.time_s, true))
        elif spec.clinical == "neutropenia":
            metrics.update(neutropenia_metrics(frame.time_s, true))
        # the controller's side: the readings at their sample times (names with
        # _measured), never the last reading held over the records
        sensors = [s for s in setup.sensors if s.output == spec.output]
        if target is not None and not sensors:
            raise ConfigError(f"metrics.target: no sensor measures {spec.output!r}")
        readings = None
        if sensors:
            samples = result.samples_frame()
            readings = samples[samples["var"].isin({s.var for s in sensors})
                               & (samples["quality"] == "valid")
                               & (samples["t_meas_s"] <= setup.duration_s)]
            readings = readings.sort_values("t_meas_s", kind="stable")
        if spec.clinical == "glucose":
            metrics.update(glucose_set(frame.time_s, true, out_spec.unit, readings,
                                       output=spec.output))
        if sensors and (target is not None or window is not None):
            sparse = readings_are_sparse(
                [86400.0 / len(s.daily_times_s) if s.daily_times_s else s.period_s
                 for s in sensors], setup.record_step_s)
            metrics.update(performance_metrics(readings.t_meas_s, readings.value,
                                               target, window, output=spec.output,
                                               unit=out_spec.unit, sparse=sparse))
        if spec.clinical == "tiva" and target is not None:
            # DESIGN: the measured BIS of every second, the last reading at each 1-s record
            column = _column_name("measured_", sensors[0].var, sensors[0].unit)
            metrics.update(tiva_metrics(frame.time_s, frame[column],
                                        frame.delivered_propofol_rate_mg_per_s,
                                        frame.delivered_remifentanil_rate_ug_per_s,
                                        float(weight), target=target))
    metrics.update(drug_totals(result.deliveries_frame(), setup.duration_s,
                               {i.name: i.amount_unit for i in model.inputs},
                               float(weight) if weight else None))
    metrics["alarms"] = sum(1 for _, kind, _ in result.events if kind == "alarm")
    step = float(frame.time_s.iloc[1] - frame.time_s.iloc[0]) if len(frame) > 1 else 1.0
    # the supervisor's mode as recorded (not parsed from the reason text)
    metrics["fallback_time_s"] = float((frame["controller_mode"] == "FALLBACK").sum() * step)
    metrics["solver_failure_time_s"] = float(
        (frame["controller_status"] == "solver_failed").sum() * step)
    metrics["deadline_misses"] = result.deadline_misses
    # commands the pumps refused (a wrong concentration unit refuses them all)
    metrics["commands_refused"] = float(sum(result.refused_commands.values()))
    metrics.update(estimate_errors(setup))
    out = Path(task.out)
    name = f"patient_{task.index + 1:04d}"
    frame.insert(0, "patient", task.index + 1)
    info = {"patient": task.index + 1, "covariates": patient.covariates,
            "params": patient.params, "eta": patient.eta, "source": patient.source,
            "inputs": {i.name: {"amount_unit": i.amount_unit, "rate_unit": i.rate_unit}
                       for i in model.inputs},
            # covariates that change during the run, from each time [s] on
            "covariate_changes": [[t, dict(values)] for t, values in
                                  setup.covariate_changes]}
    _atomic_write(out / "patients" / f"{name}.json",
                  lambda p: p.write_text(json.dumps(info, default=str), "utf-8"))
    _atomic_write(out / "series" / f"{name}.parquet",
                  lambda p: frame.to_parquet(p, index=False))
    # every sample at its sample time and every delivered rate change, exactly (the series
    # holds the last value at each record step): what a NONMEM export is made from
    _atomic_write(out / "samples" / f"{name}.parquet",
                  lambda p: result.samples_frame().to_parquet(p, index=False))
    _atomic_write(out / "deliveries" / f"{name}.parquet",
                  lambda p: result.deliveries_frame().to_parquet(p, index=False))
    _atomic_write(out / "metrics" / f"{name}.json",  # last: the completion mark
                  lambda p: p.write_text(json.dumps(metrics, allow_nan=True), "utf-8"))
    return metrics


def glucose_set(time_s, true, true_unit: str, readings, *, output: str) -> dict[str, float]:
    """The ``glucose`` clinical set of a run (:mod:`~mpc_dose.trial.glucose`): on the true
    glucose at every record and on the sensor's valid *readings* (the rows of
    ``samples_frame()`` of the scored output, in their own ``unit``; None when no sensor
    reads it: then no ``measured`` terms).

    Raises
    ------
    ConfigError
        When the sensors read the output in more than one unit.
    """
    from .glucose import clinical_glucose_metrics

    if readings is None:
        return clinical_glucose_metrics(time_s, true, true_unit, [], [], None, output=output)
    units = set(readings["unit"]) if len(readings) else set()
    if len(units) > 1:
        raise ConfigError(f"metrics.clinical = 'glucose': the sensors of {output!r} report in "
                          f"{sorted(units)}; expected one unit")
    # a sensor that never gave a valid reading still scores (NaN), in the output's unit
    unit = units.pop() if units else true_unit
    return clinical_glucose_metrics(time_s, true, true_unit, readings["t_meas_s"],
                                    readings["value"], unit, output=output)


#: estimate errors are reported after this many readings
ESTIMATE_ERROR_AFTER = (1, 2, 4)


def estimate_errors(setup) -> dict[str, float]:
    """How the controller's estimate of each estimated parameter converged: its relative
    error |estimate / true - 1| at the first decision that used at least k readings, for k in
    :data:`ESTIMATE_ERROR_AFTER` (the patient's true value at that time: covariate changes
    and occasions move it); none when the controller has no such record."""
    estimates = getattr(setup.controller, "estimates", None)
    if not estimates:
        return {}
    changes = sorted(setup.parameter_changes, key=lambda c: c[0])

    def true_at(t_s: float) -> dict:
        values = dict(setup.params)
        for t, params in changes:
            if t <= t_s:
                values = dict(params)
        return values

    out = {}
    for k in ESTIMATE_ERROR_AFTER:
        first = next((e for e in estimates if e[1] >= k), None)
        for name in estimates[-1][2]:
            key = f"estimate_error_{name}_after_{k}_readings"
            if first is None:
                out[key] = float("nan")
                continue
            t, _, values = first
            out[key] = abs(values[name] / true_at(t)[name] - 1.0)
    return out


def _manifest(scenario_path: str, seed: int, patients: list[int], cohort: str | None,
              overrides: tuple[tuple[str, object], ...]) -> dict:
    digest = hashlib.sha256(Path(scenario_path).read_bytes())
    if cohort is not None:
        digest.update(Path(cohort).read_bytes())
    digest.update(json.dumps(overrides).encode())
    return {"scenario": str(Path(scenario_path).resolve()), "cohort": cohort,
            "overrides": dict(overrides), "sha256": digest.hexdigest(), "seed": seed,
            "patients": [k + 1 for k in patients]}


def claim_folder(manifest_path: Path, manifest: dict, keys: Iterable[str], what: str
                 ) -> None:
    """Write *manifest* into a new results folder, or check that the folder's own manifest
    agrees on *keys* (a rerun resumes; another run's folder is refused, results never
    mixed)."""
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text("utf-8"))
        for key in keys:
            if existing.get(key) != manifest[key]:
                raise ConfigError(f"--out {str(manifest_path.parent)!r} holds another {what} "
                                  f"({key} {existing.get(key)!r}, now {manifest[key]!r}); use "
                                  f"a new folder")
    else:
        _atomic_write(manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=1),
                                                            "utf-8"))


def run_trial(scenario_path: str | Path, out: str | Path, *, patients: Iterable[int],
              seed: int, executor: Executor | None = None, progress: bool = False,
              cohort: str | Path | None = None,
              overrides: Mapping[str, object] | None = None) -> TrialResult:
    """Run (or resume) a trial of *patients* (0-based indices) with *seed* into *out*;
    *overrides* (dotted scenario keys) change the scenario file's values.

    Raises
    ------
    ConfigError
        When *out* holds a different trial (another scenario file content, seed or
        patient list): results are never mixed.
    """
    import pandas as pd

    from .metrics import summarise

    from .build import cohort_size, with_cohort

    scenario_path = str(Path(scenario_path).resolve())
    cohort = None if cohort is None else str(Path(cohort).resolve())
    # fail fast on a bad scenario or cohort, before any worker starts
    pairs = override_pairs(overrides)
    size = cohort_size(with_cohort(_scenario(scenario_path, pairs), cohort))
    patients = sorted(set(int(k) for k in patients))
    if patients and not 0 <= patients[0] <= patients[-1] < size:
        raise ConfigError(f"patients {patients[0] + 1}-{patients[-1] + 1}: the cohort has "
                          f"{size} patient{'s' if size != 1 else ''} (1-{size})")
    out = Path(out)
    (out / "series").mkdir(parents=True, exist_ok=True)
    (out / "metrics").mkdir(parents=True, exist_ok=True)
    (out / "patients").mkdir(parents=True, exist_ok=True)
    claim_folder(out / "trial.json", _manifest(scenario_path, seed, patients, cohort, pairs),
                 ("sha256", "seed", "patients"), "trial")
    done = {k for k in patients if (out / "metrics" / f"patient_{k + 1:04d}.json").exists()}
    todo = [PatientTask(scenario_path, k, seed, str(out), cohort, pairs) for k in patients
            if k not in done]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(patients), initial=len(done), unit="patient", desc="trial")
    try:
        if executor is None:
            for task in todo:
                run_patient(task)
                if bar is not None:
                    bar.update()
        else:
            futures = [executor.submit(run_patient, task) for task in todo]
            for future in as_completed(futures):
                future.result()  # a failed patient stops the trial with its error
                if bar is not None:
                    bar.update()
    finally:
        if bar is not None:
            bar.close()
    rows = [json.loads((out / "metrics" / f"patient_{k + 1:04d}.json").read_text("utf-8"))
            for k in patients]
    metrics = pd.DataFrame(rows)
    summary = summarise(metrics)
    _atomic_write(out / "metrics.csv", lambda p: metrics.to_csv(p, index=False,
                                                                float_format="%.10g"))
    _atomic_write(out / "summary.csv", lambda p: summary.to_csv(p, float_format="%.6g"))
    return TrialResult(out, metrics, summary, len(todo))
