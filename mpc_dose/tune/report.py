"""The HTML page of a tuning sweep: the recommendation and its reasons, the held-out check,
the Pareto front of the objectives, the sensitivity of every judged statistic to every
varied parameter, and the table of all settings."""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from ..trial.report import html_page, image
from .space import load_space

__all__ = ["write_tune_report"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pareto_plots(table: pd.DataFrame, columns: list[str]) -> str:
    plt = _pyplot()
    pairs = list(itertools.combinations(columns, 2)) or [(columns[0], columns[0])]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.6), squeeze=False)
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
                                    ("as given", table.setting == 0, "s")):
            chosen = table[mask]
            ax.scatter(chosen[a], chosen[b], marker=marker, s=160, facecolor="none",
                       edgecolor="k", label=label)
        ax.set_xlabel(a, fontsize=8)
        ax.set_ylabel(b, fontsize=8)
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    return image(fig)


def _sensitivity(table: pd.DataFrame, parameters: list[str], judged: list[str]) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(len(judged), len(parameters),
                             figsize=(3.0 * len(parameters), 2.4 * len(judged)), squeeze=False)
    for (i, column), (j, name) in itertools.product(enumerate(judged), enumerate(parameters)):
        ax = axes[i, j]
        x = pd.to_numeric(table[name], errors="coerce")
        y = table[column]
        ax.scatter(x, y, s=12, c=np.where(table.feasible, "tab:blue", "0.6"))
        ok = np.isfinite(x) & np.isfinite(y)
        varies = ok.sum() > 2 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0
        rho = spearmanr(x[ok], y[ok]).statistic if varies else np.nan
        ax.set_title(f"rank corr. {rho:+.2f}", fontsize=8)
        if i == len(judged) - 1:
            ax.set_xlabel(name, fontsize=8)
        if j == 0:
            ax.set_ylabel(column, fontsize=7)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return image(fig)


def write_tune_report(results: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for the sweep folder *results*; returns its path."""
    results = Path(results)
    manifest = json.loads((results / "sweep.json").read_text("utf-8"))
    space = load_space(manifest["space"])
    table = pd.read_csv(results / "settings.csv")
    objectives = [o.column for o in space.objective]
    judged = objectives + [lim.column for lim in space.limit]
    parameters = [p.name for p in space.parameter]
    recommendation = (results / "recommendation.txt").read_text("utf-8").splitlines()
    parts = [f"<h1>mpc_dose tuning sweep: {html.escape(Path(manifest['scenario']).name)}</h1>",
             f"<p>{len(table)} settings ({html.escape(space.strategy.kind)}; setting 0 is the "
             f"scenario as given), {space.training.patients} training patients each, seed "
             f"{space.training.seed}. Objectives: "
             + ", ".join(f"{html.escape(o.column)} ({o.goal})" for o in space.objective)
             + ". Limits: " + (", ".join(html.escape(lim.text()) for lim in space.limit)
                               or "none") + ".</p>",
             "<h2>Recommendation</h2>", f"<p><b>{html.escape(recommendation[0])}</b></p><ul>"
             + "".join(f"<li>{html.escape(r.removeprefix('- '))}</li>"
                       for r in recommendation[1:]) + "</ul>",
             "<p>Ready scenario file: <code>recommended.toml</code>.</p>"]
    if (results / "holdout.csv").exists():
        holdout = pd.read_csv(results / "holdout.csv")
        parts += ["<h2>Held-out patients</h2>",
                  holdout.to_html(index=False, float_format=lambda v: f"{v:.4g}")]
    parts += ["<h2>Pareto front</h2>", _pareto_plots(table, objectives),
              "<h2>Sensitivity of each statistic to each parameter</h2>",
              "<p>One point per setting (grey: breaks a limit); Spearman rank correlation "
              "above each panel.</p>", _sensitivity(table, parameters, judged),
              "<h2>All settings</h2>",
              table.to_html(index=False, float_format=lambda v: f"{v:.4g}")]
    path = Path(out) if out else results / "report.html"
    path.write_text(html_page(parts, "mpc_dose tuning sweep"), encoding="utf-8")
    return path
