"""PNG plots of simulation results (matplotlib, headless).

Library code that draws but never shows: every function writes a file and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .model.simulation import SimulationResult

__all__ = ["plot_simulation", "plot_closed_loop"]


def _time_axis(time_s: np.ndarray) -> tuple[np.ndarray, str]:
    span = float(time_s[-1] - time_s[0]) if time_s.size else 0.0
    if span > 2 * 86400:
        return time_s / 86400, "time [d]"
    if span > 3 * 3600:
        return time_s / 3600, "time [h]"
    if span > 300:
        return time_s / 60, "time [min]"
    return time_s, "time [s]"


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_simulation(result: SimulationResult, path: str | Path, *, title: str | None = None
                    ) -> Path:
    """Write a PNG with one panel per output unit (concentrations, effects) and one for the
    infusion rates; returns *path*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = result.model
    groups: dict[str, list[int]] = {}
    for k, out in enumerate(model.outputs):
        groups.setdefault(out.unit, []).append(k)
    n_panels = len(groups) + (1 if model.n_inputs else 0)
    fig, axes = plt.subplots(n_panels, 1, figsize=(9, 2.4 * n_panels + 0.6), sharex=True,
                             squeeze=False)
    t, t_label = _time_axis(result.time_s)
    for ax, (unit, indices) in zip(axes[:, 0], groups.items()):
        for k in indices:
            ax.plot(t, result.outputs[:, k], label=model.outputs[k].name)
        ax.set_ylabel(unit if unit != "1" else "index")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    if model.n_inputs:
        ax = axes[-1, 0]
        for k, inp in enumerate(model.inputs):
            ax.step(t, result.inputs[:, k], where="post", label=f"{inp.name} [{inp.rate_unit}]")
        ax.set_ylabel("infusion rate")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(t_label)
    fig.suptitle(title or model.name, fontsize=10)
    return _save(fig, path)


def plot_closed_loop(frame, path: str | Path, *, title: str = "") -> Path:
    """Write a PNG of one closed-loop run from its time-series table (the columns written by
    ``mpc-dose run``): measured and true monitored outputs, other outputs, and commanded and
    delivered rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    time_s = frame["time_s"].to_numpy()
    t, t_label = _time_axis(time_s)
    measured = [c for c in frame.columns if c.startswith("measured_")]
    monitored = {c[len("measured_"):] for c in measured}
    others = [c for c in frame.columns if c.startswith("true_")
              and c[len("true_"):] not in monitored]
    rates = [c for c in frame.columns if c.startswith(("commanded_", "delivered_"))]
    panels = len(measured) + (1 if others else 0) + (1 if rates else 0)
    fig, axes = plt.subplots(panels, 1, figsize=(9, 2.4 * panels + 0.6), sharex=True,
                             squeeze=False)
    k = 0
    for column in measured:
        ax = axes[k, 0]
        name = column[len("measured_"):]
        ax.plot(t, frame[column], ".", ms=2, label=f"measured {name}")
        if f"true_{name}" in frame:
            ax.plot(t, frame[f"true_{name}"], label=f"true {name}")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        k += 1
    if others:
        ax = axes[k, 0]
        for column in others:
            ax.plot(t, frame[column], label=column[len("true_"):])
        ax.legend(loc="best", fontsize=7)
        ax.grid(alpha=0.3)
        k += 1
    if rates:
        ax = axes[k, 0]
        for column in rates:
            ax.step(t, frame[column], where="post", label=column,
                    ls="-" if column.startswith("delivered_") else "--")
        ax.legend(loc="best", fontsize=7)
        ax.set_ylabel("rate")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(t_label)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
