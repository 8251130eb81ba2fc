"""A tuning sweep: every setting of a space runs as a closed-loop trial on the same training
cohort (same patients, noise and disturbances: common random numbers), is judged by
statistics of its patients' metrics, and the best balanced feasible setting is checked on
held-out patients.

    result = run_sweep("scenarios/tiva_nmpc_training.toml", "scenarios/tune_tiva.toml",
                       "out/tune", executor=ProcessPoolExecutor(2))

Layout of *out*:

* ``sweep.json``: scenario and space files with their SHA-256 (a restart must match);
* ``settings/0000/``: the scenario as given (the baseline), ``settings/0001/`` ... : one
  trial folder per setting (:func:`~mpc_dose.trial.runner.run_trial`'s layout) with its
  ``setting.json`` (values and scenario overrides), written before it runs;
* ``settings.csv``: one row per setting: its values, the statistics of the objectives and
  limits, ``feasible``, ``pareto``, ``recommended``;
* ``recommendation.txt`` and ``recommended.toml`` (a ready scenario file);
* ``holdout/recommended/``, ``holdout/baseline/`` and ``holdout.csv``: the check on other
  patients.

A sweep killed at any point resumes where it stopped when run again: finished settings are
read back, a setting's finished patients are kept. Grid, random and Sobol sweeps then end
with the same results as an uninterrupted run; an Optuna sweep finishes the settings it had
asked for, then asks for new ones (the sampler learns from everything done so far).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..model.library import relocate
from ..scenario import (MODEL_KEYS, PATH_KEYS, load_scenario, read_scenario_data,
                        with_overrides)
from ..trial.runner import claim_folder, run_trial
from .space import Space, Value, check_keys, load_space, statistic

__all__ = ["run_sweep", "SweepResult", "pareto_mask", "recommend"]


@dataclass
class SweepResult:
    out: Path
    table: object                 # pandas DataFrame, one row per setting
    recommended: int              # setting id
    reasons: list[str]
    holdout: object | None        # pandas DataFrame (recommended, baseline) or None


# ---------------------------------------------------------------- judging settings


def setting_statistics(metrics, space: Space) -> dict[str, float]:
    """The statistics of the objectives and limits over one setting's patients."""
    out = {}
    for judge in [*space.objective, *space.limit]:
        if judge.metric not in metrics.columns:
            numeric = [c for c in metrics.select_dtypes("number").columns if c != "patient"]
            raise ConfigError(f"space: metric {judge.metric!r} is not a column of the trial's "
                              f"metrics.csv; columns: {', '.join(numeric)}")
        out[judge.column] = statistic(metrics[judge.metric].to_numpy(), judge.statistic)
    return out


def pareto_mask(scores: np.ndarray) -> np.ndarray:
    """Rows of *scores* (to maximise, one column per objective) that no other row
    dominates (at least as good everywhere, better somewhere)."""
    keep = np.ones(len(scores), dtype=bool)
    for i, row in enumerate(scores):
        dominated = np.all(scores >= row, axis=1) & np.any(scores > row, axis=1)
        keep[i] = not dominated.any()
    return keep


def _scores(table, space: Space) -> np.ndarray:
    """Objective statistics with the sign that makes larger better."""
    return np.column_stack([table[o.column].to_numpy(float) * (1 if o.goal == "maximise" else -1)
                            for o in space.objective])


def recommend(table, space: Space) -> tuple[int, list[str]]:
    """The recommended setting and why: among the settings that hold every limit and lie
    on the Pareto front, the one whose worst objective (each scaled to [0, 1] over the
    feasible settings, 1 the best seen) is best - the balanced choice, no objective
    sacrificed for the others."""
    feasible = table["feasible"].to_numpy(bool)
    if not feasible.any():
        worst = table["limit_excess"].idxmin()
        return int(table.loc[worst, "setting"]), [
            "no setting holds every limit; the one closest to holding them is shown "
            f"(largest excess {table.loc[worst, 'limit_excess']:.3g}): widen the space or "
            "relax the limits"]
    scores = _scores(table, space)
    ok = feasible & table["pareto"].to_numpy(bool)
    low, high = scores[feasible].min(axis=0), scores[feasible].max(axis=0)
    scaled = (scores - low) / np.where(high > low, high - low, 1.0)
    worst = np.where(ok, scaled.min(axis=1), -np.inf)
    best = int(np.argmax(worst))
    row = table.iloc[best]
    reasons = [f"holds every limit ({'; '.join(lim.text() + f' (is {row[lim.column]:.4g})' for lim in space.limit) or 'none given'})",
               f"on the Pareto front of the {int(feasible.sum())} feasible settings "
               f"({int(ok.sum())} on it)",
               "the best worst-case objective: " + ", ".join(
                   f"{o.column} = {row[o.column]:.4g} ({scaled[best, j]:.0%} of the way from "
                   f"the worst to the best feasible)" for j, o in enumerate(space.objective))]
    base = table[table.setting == 0]
    if len(base) and int(row.setting) != 0:
        b = base.iloc[0]
        reasons.append("against the scenario as given: " + ", ".join(
            f"{o.column} {b[o.column]:.4g} -> {row[o.column]:.4g}" for o in space.objective)
            + ("" if b.feasible else " (the scenario as given breaks a limit)"))
    elif int(row.setting) == 0:
        reasons.append("the scenario as given is already the balanced choice")
    return int(row.setting), reasons


def _judge(table, space: Space):
    """Add feasible / limit_excess / pareto columns."""
    excess = np.zeros(len(table))
    for lim in space.limit:
        excess = np.maximum(excess, [lim.excess(v) for v in table[lim.column]])
    table["limit_excess"] = excess
    table["feasible"] = excess <= 0
    scores = _scores(table, space)
    finite = np.all(np.isfinite(scores), axis=1)
    pareto = np.zeros(len(table), dtype=bool)
    candidates = np.flatnonzero(table["feasible"].to_numpy(bool) & finite)
    pareto[candidates] = pareto_mask(scores[candidates])
    table["pareto"] = pareto
    return table


# ---------------------------------------------------------------- the sweep


class _Store:
    """The settings folder: setting.json before a setting runs, its trial folder after."""

    def __init__(self, out: Path) -> None:
        self.root = out / "settings"
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, setting: int) -> Path:
        return self.root / f"{setting:04d}"

    def saved(self) -> dict[int, dict]:
        found = {}
        for path in sorted(self.root.glob("*/setting.json")):
            record = json.loads(path.read_text("utf-8"))
            found[int(record["setting"])] = record
        return found

    def done(self, setting: int) -> bool:
        return (self.folder(setting) / "metrics.csv").exists()

    def save(self, setting: int, values: Mapping[str, Value], overrides: Mapping[str, Value]
             ) -> None:
        folder = self.folder(setting)
        folder.mkdir(parents=True, exist_ok=True)
        record = {"setting": setting, "values": dict(values), "overrides": dict(overrides)}
        tmp = folder / ".setting.json.tmp"
        tmp.write_text(json.dumps(record, indent=1), "utf-8")
        tmp.replace(folder / "setting.json")


def _digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _baseline_values(space: Space, scenario_path: str) -> dict[str, Value]:
    """The scenario's own value of each parameter (its first key; the schema's default
    where the file is silent), NaN where there is none."""
    scenario = load_scenario(scenario_path)
    values = {}
    for p in space.parameter:
        node: object = scenario
        for part in p.keys[0].split("."):
            if isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.get(part, math.nan)
            else:
                node = getattr(node, part, math.nan)
        values[p.name] = node if isinstance(node, (int, float, str, bool)) else math.nan
    return values


def run_sweep(scenario_path: str | Path, space_path: str | Path, out: str | Path, *,
              executor: Executor | None = None, progress: bool = False,
              strategy: str | None = None, settings: int | None = None) -> SweepResult:
    """Run (or resume) the sweep of *space_path* over *scenario_path* into *out*.

    *strategy* and *settings* override the space file's ``[strategy]``.

    Raises
    ------
    ConfigError
        For a bad space, a key that is not a setting of the scenario (before anything
        runs), a metric the trials do not produce, or an *out* that holds another sweep.
    """
    import pandas as pd

    scenario_path = str(Path(scenario_path).resolve())
    space = load_space(space_path)
    update = {k: v for k, v in (("kind", strategy), ("settings", settings)) if v is not None}
    if update:
        space = space.model_copy(update={"strategy": space.strategy.model_copy(update=update)})
    check_keys(space, scenario_path)
    holdout_scenario = space.resolve(space.holdout.scenario) if space.holdout else None
    if holdout_scenario:
        check_keys(space, holdout_scenario)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"scenario": scenario_path, "sha256": _digest(scenario_path),
                "space": str(Path(space_path).resolve()), "space_sha256": _digest(space_path),
                "strategy": space.strategy.model_dump()}
    claim_folder(out / "sweep.json", manifest, ("sha256", "space_sha256", "strategy"),
                 "sweep")

    store = _Store(out)
    training = space.training
    patients = range(training.first - 1, training.first - 1 + training.patients)
    cohort = space.resolve(training.cohort)
    results: dict[int, dict] = {}

    def evaluate(setting: int, values: Mapping[str, Value], overrides: Mapping[str, Value]
                 ) -> dict:
        store.save(setting, values, overrides)
        trial = run_trial(scenario_path, store.folder(setting), patients=patients,
                          seed=training.seed, executor=executor, cohort=cohort,
                          overrides=overrides)
        row = {"setting": setting, **values, **setting_statistics(trial.metrics, space)}
        results[setting] = row
        return row

    # the scenario as given first: every setting is compared with it
    evaluate(0, _baseline_values(space, scenario_path), {})
    # several settings at once when patients run in other processes (in this process the
    # built solvers are shared and must serve one patient at a time)
    parallel = space.strategy.batch if executor is not None else 1
    bar = None
    if progress:
        from tqdm import tqdm

        total = (len(space.settings()) if space.strategy.kind != "optuna"
                 else space.strategy.settings)
        bar = tqdm(total=total, unit="setting", desc="sweep")
    try:
        with ThreadPoolExecutor(parallel) as threads:
            if space.strategy.kind == "optuna":
                _optuna_sweep(space, store, evaluate, threads, parallel, bar)
            else:
                jobs = [threads.submit(evaluate, k, values, space.overrides(values))
                        for k, values in enumerate(space.settings(), start=1)]
                for job in jobs:
                    job.result()
                    if bar is not None:
                        bar.update()
    finally:
        if bar is not None:
            bar.close()

    table = _judge(pd.DataFrame([results[k] for k in sorted(results)]), space)
    chosen, reasons = recommend(table, space)
    table["recommended"] = table.setting == chosen
    table.to_csv(out / "settings.csv", index=False, float_format="%.8g")
    record = store.saved()[chosen]
    holdout = None
    if space.holdout is not None:
        holdout = _holdout(space, scenario_path, record, out, executor)
        reasons.append(_verdict(holdout, table[table.setting == chosen].iloc[0], space))
        holdout.to_csv(out / "holdout.csv", index=False, float_format="%.8g")
    write_recommended(scenario_path, record["overrides"], out / "recommended.toml", reasons)
    (out / "recommendation.txt").write_text(
        f"recommended setting {chosen}: "
        + ", ".join(f"{k} = {v}" for k, v in record["values"].items()) + "\n"
        + "".join(f"- {r}\n" for r in reasons), "utf-8")
    return SweepResult(out, table, chosen, reasons, holdout)


def _optuna_sweep(space: Space, store: _Store, evaluate: Callable[..., dict],
                  threads: ThreadPoolExecutor, parallel: int, bar) -> None:
    """Ask Optuna's TPE sampler (multi-objective, with the limits as constraints) for
    settings in batches; settings already done are told first (resume)."""
    import optuna
    from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                      IntDistribution)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {}
    for p in space.parameter:
        if p.values is not None:
            distributions[p.name] = CategoricalDistribution(p.values)
        elif p.integer:
            distributions[p.name] = IntDistribution(int(p.low), int(p.high), log=p.log)
        else:
            distributions[p.name] = FloatDistribution(p.low, p.high, log=p.log)
    # the limits are the sampler's constraints (feasible when every excess is <= 0)
    sampler = optuna.samplers.TPESampler(seed=space.strategy.seed, multivariate=True,
                                         n_startup_trials=min(8, space.strategy.settings))
    study = optuna.create_study(directions=[
        "maximize" if o.goal == "maximise" else "minimize" for o in space.objective],
        sampler=sampler)

    def judged(row: dict) -> tuple[list[float], list[float]]:
        values = [row[o.column] for o in space.objective]
        return values, [lim.excess(row[lim.column]) for lim in space.limit]

    def told(row: dict, values: Mapping[str, Value]) -> None:
        objective, excess = judged(row)
        study.add_trial(optuna.trial.create_trial(
            params=dict(values), distributions=distributions, values=objective,
            user_attrs={"setting": row["setting"]},
            constraints={lim.text(): e for lim, e in zip(space.limit, excess)} or None))
        if bar is not None:
            bar.update()

    saved = {k: r for k, r in store.saved().items() if k > 0}
    # settings asked before an interruption: finish them, then tell the sampler
    rows = list(threads.map(lambda r: evaluate(r["setting"], r["values"], r["overrides"]),
                            [saved[k] for k in sorted(saved)]))
    for row in rows:
        told(row, saved[row["setting"]]["values"])
    next_id = max(saved, default=0) + 1
    while len(study.trials) < space.strategy.settings:
        count = min(parallel, space.strategy.settings - len(study.trials))
        asked = [study.ask(distributions) for _ in range(count)]
        jobs = []
        for trial in asked:
            values = {name: trial.params[name] for name in distributions}
            jobs.append(threads.submit(evaluate, next_id, values, space.overrides(values)))
            next_id += 1
        for trial, job in zip(asked, jobs):
            row = job.result()
            objective, excess = judged(row)
            for lim, e in zip(space.limit, excess):
                trial.set_constraint(lim.text(), e)
            trial.set_user_attr("setting", row["setting"])
            if all(math.isfinite(v) for v in objective):
                study.tell(trial, objective)
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if bar is not None:
                bar.update()


# ---------------------------------------------------------------- held-out check


def _holdout(space: Space, scenario_path: str, record: dict, out: Path,
             executor: Executor | None):
    import pandas as pd

    h = space.holdout
    scenario = space.resolve(h.scenario) or scenario_path
    patients = range(h.first - 1, h.first - 1 + h.patients)
    rows = []
    for label, overrides in (("recommended", record["overrides"]), ("baseline", {})):
        trial = run_trial(scenario, out / "holdout" / label, patients=patients, seed=h.seed,
                          executor=executor, cohort=space.resolve(h.cohort),
                          overrides=overrides)
        rows.append({"setting": label, **setting_statistics(trial.metrics, space)})
    table = pd.DataFrame(rows)
    excess = np.zeros(len(table))
    for lim in space.limit:
        excess = np.maximum(excess, [lim.excess(v) for v in table[lim.column]])
    table["feasible"] = excess <= 0
    return table


def _verdict(holdout, trained, space: Space) -> str:
    """Does the recommended setting generalise: do its limits hold on new patients; and how
    its objectives there compare with training and with the scenario as given."""
    rec, base = holdout.iloc[0], holdout.iloc[1]
    changes = "; ".join(
        f"{o.column} {trained[o.column]:.4g} in training, {rec[o.column]:.4g} held out "
        f"(scenario as given: {base[o.column]:.4g})" for o in space.objective)
    broken = [lim.text() + f" (is {rec[lim.column]:.4g})" for lim in space.limit
              if lim.excess(rec[lim.column]) > 0]
    if broken:
        return (f"held-out patients: the recommended setting breaks {', '.join(broken)}: it "
                f"does NOT generalise; {changes}")
    base_note = "" if base.feasible else " (the scenario as given breaks a limit there)"
    return (f"held-out patients: the recommended setting holds every limit{base_note}, so "
            f"it generalises; {changes}")


# ---------------------------------------------------------------- the scenario file


def write_recommended(scenario_path: str, overrides: Mapping[str, Value], path: Path,
                      reasons: list[str]) -> None:
    """The scenario with the recommended overrides, as a ready TOML file at *path* (file
    paths inside rewritten relative to its folder); validated before it is written."""
    import os

    import tomli_w

    data = with_overrides(read_scenario_data(scenario_path), overrides)
    source_dir = Path(scenario_path).parent
    for key in (*PATH_KEYS, *MODEL_KEYS):
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        value = node.get(parts[-1]) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value:
            continue
        if key in MODEL_KEYS:  # only its model files are paths
            node[parts[-1]] = relocate(value, source_dir.resolve(), path.parent.resolve())
        elif not Path(value).is_absolute():
            node[parts[-1]] = os.path.relpath(source_dir / value, path.parent.resolve())
    header = [f"# Recommended by `mpc-dose tune` from {Path(scenario_path).name}, with",
              *[f"#   {k} = {v!r}" for k, v in overrides.items()], "# Why:",
              *[f"# - {r}" for r in reasons], ""]
    text = "\n".join(header) + "\n" + tomli_w.dumps(data)
    path.write_text(text, "utf-8")
    load_scenario(path)  # what we wrote must load
