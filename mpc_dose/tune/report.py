"""The HTML page of a tuning sweep: a summary a clinician can read (the scenario, the
cohorts, what was varied, what was judged, with units), the recommendation and its reasons,
the held-out check, the Pareto front of the objectives, the sensitivity of every judged
statistic to every varied parameter, and the table of all settings."""

from __future__ import annotations

import html
import itertools
import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from ..trial.report import (_controller_text, _description, _duration, _scenario_of,
                            _target_text, describe_metric, format_value, html_page, image)
from .space import load_space

__all__ = ["write_tune_report", "judged_label", "rank_correlation"]

#: statistics over the cohort in words
_STATISTIC = {"mean": "mean", "median": "median", "sd": "SD", "min": "lowest",
              "max": "highest", "p05": "5th percentile", "p10": "10th percentile",
              "p25": "25th percentile", "p75": "75th percentile", "p90": "90th percentile",
              "p95": "95th percentile"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def judged_label(column: str, output: str | None = None, output_unit: str | None = None,
                 *, unit: bool = True) -> str:
    """``"p05 time_in_window_s"`` -> ``"5th percentile of time in window [s]"``: a
    statistic of a metric over the cohort, in words, with the metric's unit."""
    statistic, _, metric = column.partition(" ")
    if not metric:
        return column
    info = describe_metric(metric, output, output_unit)
    text = f"{_STATISTIC.get(statistic, statistic)} of {info.label[:1].lower()}{info.label[1:]}"
    if info.label[:3].isupper():  # IAE, AUC24 ...
        text = f"{_STATISTIC.get(statistic, statistic)} of {info.label}"
    if unit and info.unit not in ("dimensionless", "count"):
        text += f" [{info.unit}]"
    return text


def rank_correlation(x, y) -> float | None:
    """Spearman's rank correlation of the finite pairs; None when either side is constant
    (or fewer than 3 pairs): there is no correlation to state."""
    x = pd.to_numeric(pd.Series(x), errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(pd.Series(y), errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return None
    return float(spearmanr(x[ok], y[ok]).statistic)


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width))


def _pareto_figure(table: pd.DataFrame, columns: list[str], labels: dict[str, str]):
    plt = _pyplot()
    pairs = list(itertools.combinations(columns, 2)) or [(columns[0], columns[0])]
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 3.6 * rows + 0.5), squeeze=False,
                             layout="constrained")
    for ax, (a, b) in zip(axes.ravel(), pairs):
        infeasible = table[~table.feasible]
        feasible = table[table.feasible & ~table.pareto]
        front = table[table.pareto].sort_values(a)
        ax.scatter(infeasible[a], infeasible[b], marker="x", color="0.6",
                   label="breaks a limit")
        ax.scatter(feasible[a], feasible[b], color="tab:blue", s=18, label="feasible")
        # a line only joins the front of two objectives; with more, a pair's view of the
        # front is a scatter
        ax.plot(front[a], front[b], "o-" if len(columns) == 2 else "o", color="tab:orange",
                label="Pareto front")
        for label, mask, marker in (("recommended", table.recommended, "*"),
                                    ("scenario as given", table.setting == 0, "s")):
            chosen = table[mask]
            ax.scatter(chosen[a], chosen[b], marker=marker, s=160, facecolor="none",
                       edgecolor="k", label=label)
        ax.set_xlabel(_wrap(labels[a], 40), fontsize=8)
        ax.set_ylabel(_wrap(labels[b], 34), fontsize=8)
        ax.tick_params(labelsize=7.5)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(pairs):]:
        ax.axis("off")
    handles, names = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside upper center", ncols=len(names), fontsize=8,
               frameon=False)
    return fig


def _sensitivity_figure(table: pd.DataFrame, parameters: list[str], judged: list[str],
                        labels: dict[str, str]):
    """One panel per (judged statistic, parameter): the settings as points, Spearman's rank
    correlation above ("n/a (constant)" when the statistic or the parameter never
    changes)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(judged), len(parameters),
                             figsize=(max(8.0, 3.3 * len(parameters)), 2.5 * len(judged) + 0.4),
                             squeeze=False, layout="constrained")
    for (i, column), (j, name) in itertools.product(enumerate(judged), enumerate(parameters)):
        ax = axes[i, j]
        x = pd.to_numeric(table[name], errors="coerce")
        y = table[column]
        ax.scatter(x, y, s=12, c=np.where(table.feasible, "tab:blue", "0.6"))
        rho = rank_correlation(x, y)
        ax.set_title("rank corr. n/a (constant)" if rho is None else f"rank corr. {rho:+.2f}",
                     fontsize=8)
        if i == len(judged) - 1:
            ax.set_xlabel(_wrap(name, 30), fontsize=8)
        if j == 0:
            ax.set_ylabel(_wrap(labels[column], 26), fontsize=7.5)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return fig


def _number(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        return format_value(float(value), 4)
    return html.escape(str(value))


def _table(frame: pd.DataFrame, headers: dict[str, str],
           missing: dict[str, str] | None = None) -> str:
    """An HTML table in a box that scrolls sideways; an empty cell reads *missing* [column]
    or "n/a"."""
    head = "".join(f"<th>{html.escape(headers.get(c, c))}</th>" for c in frame.columns)
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for column in frame.columns:
            value = row[column]
            text = (missing or {}).get(column, "n/a") \
                if isinstance(value, float) and not np.isfinite(value) else _number(value)
            cells.append(f'<td class="num">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="settings"><tr>{head}</tr>'
            + "".join(rows) + "</table></div>")


_LONG_FLOAT = re.compile(r"-?\d+\.\d{5,}")


def write_tune_report(results: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for the sweep folder *results*; returns its path."""
    results = Path(results)
    manifest = json.loads((results / "sweep.json").read_text("utf-8"))
    space = load_space(manifest["space"])
    table = pd.read_csv(results / "settings.csv")
    objectives = [o.column for o in space.objective]
    judged = objectives + [lim.column for lim in space.limit if lim.column not in objectives]
    parameters = [p.name for p in space.parameter]
    recommendation = (results / "recommendation.txt").read_text("utf-8").splitlines()
    recommendation = [_LONG_FLOAT.sub(lambda m: f"{float(m[0]):.4g}", line)
                      for line in recommendation]
    first_setting = results / "settings" / "0000"
    scenario, trial_manifest = _scenario_of(first_setting) if first_setting.exists() \
        else (None, {})
    if scenario is None:
        from ..errors import MpcDoseError
        from ..scenario import load_scenario

        try:
            scenario = load_scenario(manifest["scenario"])
        except (MpcDoseError, OSError, ValueError):
            scenario = None
    output = scenario.metrics.output if scenario is not None and scenario.metrics else None
    output_unit = None
    if output is not None:
        from ..model.library import load

        try:
            model = load(scenario.patient.model).model
            output_unit = model.outputs[model.output_index(output)].unit
        except (KeyError, ValueError, IndexError):
            output_unit = None
    labels = {c: judged_label(c, output, output_unit) for c in judged}
    for column in sorted(judged, key=len, reverse=True):  # the reasons in words
        recommendation = [line.replace(column, labels[column]) for line in recommendation]
    name = scenario.scenario.name if scenario is not None else Path(manifest["scenario"]).stem
    title = f"Tuning sweep: {name}"

    # the summary
    summary = []
    if scenario is not None:
        text = _description(scenario, {"scenario": manifest["scenario"]})
        description = f": {text}" if text else ""
        summary.append(f"<p><b>Scenario:</b> {html.escape(name + description)}. Each run "
                       f"lasts {_duration(scenario.scenario.duration_s)}.</p>")
        summary.append(f"<p><b>Controller tuned:</b> {html.escape(_controller_text(scenario))}"
                       ".</p>")
        aims = _target_text(scenario, output_unit)
        if aims:
            summary.append(f"<p><b>Target:</b> {html.escape('; '.join(aims))}.</p>")
    training = space.training
    cohort = (f"{training.patients} training patients (numbers {training.first}-"
              f"{training.first + training.patients - 1}, seed {training.seed})")
    if space.holdout is not None:
        h = space.holdout
        source = f" of {Path(h.scenario).name}" if h.scenario else ""
        cohort += (f"; the recommendation is checked on {h.patients} held-out patients"
                   f"{source} (numbers {h.first}-{h.first + h.patients - 1}, seed {h.seed})")
    summary.append(f"<p><b>Patients:</b> {html.escape(cohort)}. Every setting met the same "
                   "training patients, noise and disturbances.</p>")
    varied = []
    for p in space.parameter:
        span = (", ".join(str(v) for v in p.values) if p.values is not None
                else f"{p.low:g} to {p.high:g}" + (" (log scale)" if p.log else ""))
        varied.append(f"<li><b>{html.escape(p.name)}</b>: {html.escape(span)} "
                      f"<small>({html.escape(', '.join(p.keys))})</small></li>")
    summary.append(f"<p><b>Varied</b> ({len(table)} settings, {html.escape(space.strategy.kind)}"
                   "; setting 0 is the scenario as given):</p><ul>" + "".join(varied) + "</ul>")
    summary.append("<p><b>Objectives:</b></p><ul>" + "".join(
        f"<li>{o.goal} the {html.escape(labels[o.column])}</li>" for o in space.objective)
        + "</ul>")
    limits = [f"<li>{html.escape(labels[lim.column])} "
              + (f"at most {lim.at_most:g}" if lim.at_most is not None
                 else f"at least {lim.at_least:g}") + "</li>" for lim in space.limit]
    summary.append("<p><b>Limits</b> every acceptable setting must hold"
                   + (":</p><ul>" + "".join(limits) + "</ul>" if limits else ": none.</p>"))
    feasible = int(table.feasible.sum())
    summary.append(f"<p><b>Result:</b> {feasible} of {len(table)} settings hold every limit, "
                   f"{int(table.pareto.sum())} are on the Pareto front.</p>")

    parts = [f"<h1>{html.escape(title)}</h1>",
             '<div class="summary">' + "\n".join(summary) + "</div>",
             "<h2>Recommendation</h2>", f"<p><b>{html.escape(recommendation[0])}</b></p><ul>"
             + "".join(f"<li>{html.escape(r.removeprefix('- '))}</li>"
                       for r in recommendation[1:]) + "</ul>",
             "<p>Ready scenario file: <code>recommended.toml</code>.</p>"]
    if (results / "holdout.csv").exists():
        holdout = pd.read_csv(results / "holdout.csv")
        holdout["setting"] = holdout["setting"].replace({"baseline": "scenario as given"})
        parts += ["<h2>Held-out patients</h2>",
                  "<p>The recommended setting and the scenario as given, on patients the "
                  "sweep never saw.</p>",
                  _table(holdout, {**labels, "feasible": "holds every limit"})]
    parts += ["<h2>Pareto front</h2>",
              "<p>Each pair of objectives; a setting is on the front when no other is at least "
              "as good on every objective and better on one.</p>",
              image(_pareto_figure(table, objectives, labels)),
              "<h2>Sensitivity of each statistic to each parameter</h2>",
              "<p>One point per setting (grey: breaks a limit); Spearman's rank correlation "
              "above each panel (n/a when the statistic or the parameter is the same for "
              "every setting).</p>", image(_sensitivity_figure(table, parameters, judged,
                                                               labels)),
              "<h2>All settings</h2>",
              "<p>A parameter left empty in setting 0 is not set by the scenario (its "
              "default applies).</p>",
              _table(table, {**labels, "limit_excess": "limit excess",
                             "feasible": "holds every limit", "pareto": "on the Pareto front"},
                     missing=dict.fromkeys(parameters, "not set"))]
    explained = []
    for column in judged:
        info = describe_metric(column.partition(" ")[2], output, output_unit)
        explained.append(f"<tr><td class='name'>{html.escape(info.label)}</td>"
                         f"<td>{html.escape(info.unit)}</td>"
                         f"<td class='text'>{html.escape(info.explanation)}</td></tr>")
    parts += ["<h2>The metrics judged</h2>",
              '<div class="scroll"><table><tr><th>metric</th><th>unit</th>'
              "<th>what it measures</th></tr>" + "".join(dict.fromkeys(explained))
              + "</table></div>"]
    path = Path(out) if out else results / "report.html"
    path.write_text(html_page(parts, title), encoding="utf-8")
    return path
