"""PNG plots of simulation results (matplotlib, headless).

Library code that draws but never shows: every function writes a file and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .model.simulation import SimulationResult

__all__ = ["plot_simulation"]


def _time_axis(time_s: np.ndarray) -> tuple[np.ndarray, str]:
    span = float(time_s[-1] - time_s[0]) if time_s.size else 0.0
    if span > 2 * 86400:
        return time_s / 86400, "time [d]"
    if span > 3 * 3600:
        return time_s / 3600, "time [h]"
    if span > 300:
        return time_s / 60, "time [min]"
    return time_s, "time [s]"


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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
