"""PNG plots of simulation results (matplotlib, headless), for people to read.

Library code that draws but never shows: every plotting function writes a file and returns
its path. Units come from the column names (``true_vancomycin_cp_mg_per_L``,
``delivered_propofol_rate_mg_per_s``; see :mod:`mpc_dose.units`): every axis holds one unit
and says which, legends name quantities in words ("vancomycin Cp, true"), rates are shown
per minute or per hour and the time axis in minutes, hours or days, whichever reads best.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MpcDoseError, UnitError
from .model.simulation import SimulationResult
from .units import conversion_factor, parse_unit, token_to_unit

__all__ = ["plot_simulation", "plot_closed_loop", "closed_loop_figure", "closed_loop_options",
           "Column", "parse_column", "unit_suffix", "unit_label", "quantity_label",
           "covariate_units", "covariate_value", "time_axis", "time_ticks",
           "rate_display_unit"]

#: the kinds of series in a closed-loop table, by column prefix
_KINDS = ("true", "measured", "commanded", "delivered")

#: abbreviations written as clinicians write them
_WORDS = {"cp": "Cp", "ce": "Ce", "bis": "BIS", "anc": "ANC", "map": "MAP", "auc": "AUC",
          "auc24": "AUC24", "iae": "IAE", "rms": "RMS", "lloq": "LLOQ", "cl": "CL",
          "v1": "V1", "crcl": "CrCL", "mic": "MIC"}

_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")

#: shading of the supervisor's modes (CLOSED_LOOP, the normal state, is not shaded)
_MODE_STYLE = {"INIT": ("0.55", 0.16, "INIT (before the first usable reading)"),
               "FALLBACK": ("tab:red", 0.14, "FALLBACK (safe rates)"),
               "STOPPED": ("0.2", 0.22, "STOPPED (by the operator)")}


#: colours of measured values (the drugs take the default cycle)
_MEASURED_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive")


@dataclass(frozen=True)
class Column:
    """A result column read: its *kind* (``true``, ``measured``, ``commanded``,
    ``delivered`` or ``""``), the quantity's *name* and its *unit* (``"1"``: dimensionless;
    ``None``: the name carries no unit)."""

    kind: str
    name: str
    unit: str | None

    @property
    def label(self) -> str:
        """The legend label: ``"vancomycin Cp, true"``."""
        text = quantity_label(self.name)
        return f"{text}, {self.kind}" if self.kind else text


def _unit_token(token: str, first: bool) -> tuple[str, tuple] | None:
    """(unit, dimension) of one token of a column name, None if it is no unit. A number
    (``1e9`` of ``1e9_per_L``) counts only at the start of the unit."""
    if first and re.fullmatch(r"1e-?\d+", token):
        return token, ()
    if token == "pct":
        return "%", ()
    if not re.fullmatch(r"[A-Za-zµ]+", token):
        return None
    try:
        unit = parse_unit(token)
    except UnitError:
        return None
    return token, unit.dimension


def _is_unit(tokens: list[str]) -> bool:
    """Whether *tokens* spell one unit: factors of different dimensions (``mg_h``), each
    ``per`` followed by more (``mg_per_kg_per_h``)."""
    if tokens == ["1"]:  # a dimensionless output's unit in a metric name (auc_bis_1_h)
        return True
    if not tokens or tokens[0] == "per" or tokens[-1] == "per":
        return False
    group: list[tuple] = []
    for position, token in enumerate(tokens):
        if token == "per":
            if not group:
                return False
            group = []
            continue
        read = _unit_token(token, position == 0)
        if read is None:
            return False
        dimension = read[1]
        if dimension and any(dimension == seen for seen in group):
            return False  # kg_mg: two masses multiplied is a name followed by a unit
        group.append(dimension)
    return True


def unit_suffix(name: str) -> tuple[str, str | None]:
    """Split a name that ends in a unit into the quantity and the unit:
    ``"vancomycin_cp_mg_per_L"`` -> ``("vancomycin_cp", "mg/L")``, ``"bis_unitless"`` ->
    ``("bis", "1")``, ``"settling_time_s"`` -> ``("settling_time", "s")``; ``(name, None)``
    when it ends in no unit (``"iae"``). The longest suffix that reads as one unit wins."""
    if name.endswith("_unitless"):
        return name[: -len("_unitless")], "1"
    tokens = name.split("_")
    for start in range(1, len(tokens)):
        if _is_unit(tokens[start:]):
            try:
                return "_".join(tokens[:start]), token_to_unit("_".join(tokens[start:]))
            except UnitError:
                continue
    return name, None


def parse_column(column: str) -> Column:
    """Read a result column's kind, quantity and unit (see :func:`unit_suffix`)."""
    kind = next((k for k in _KINDS if column.startswith(k + "_")), "")
    rest = column[len(kind) + 1:] if kind else column
    name, unit = unit_suffix(rest)
    return Column(kind, name, unit)


def unit_label(unit: str | None) -> str:
    """A unit as printed on an axis: ``"ug/mL"`` -> ``"µg/mL"``, ``"mg*h/L"`` ->
    ``"mg·h/L"``, ``"1e9/L"`` -> ``"10⁹/L"``, ``"1"`` -> ``"dimensionless"``."""
    if unit is None:
        return ""
    if unit.strip() in ("1", ""):
        return "dimensionless"
    text = re.sub(r"\b1e(-?\d+)", lambda m: "10" + m[1].translate(_SUPERSCRIPT), unit)
    text = re.sub(r"10\^(-?\d+)", lambda m: "10" + m[1].translate(_SUPERSCRIPT), text)
    text = re.sub(r"\^(-?\d+)", lambda m: m[1].translate(_SUPERSCRIPT), text)
    text = re.sub(r"\bug\b", "µg", text)
    return text.replace("*", "·")


def quantity_label(name: str) -> str:
    """A quantity's name in words: ``"vancomycin_cp"`` -> ``"vancomycin Cp"``."""
    return " ".join(_WORDS.get(word, word) for word in name.split("_") if word)


def time_axis(time_s: np.ndarray) -> tuple[float, str]:
    """(seconds per unit, axis label) for a run of this span: minutes under 2 h, hours
    under 3 days, days beyond."""
    time_s = np.asarray(time_s, dtype=float)
    span = float(time_s[-1] - time_s[0]) if time_s.size else 0.0
    if span >= 3 * 86400:
        return 86400.0, "time [d]"
    if span >= 2 * 3600:
        return 3600.0, "time [h]"
    return 60.0, "time [min]"


def rate_display_unit(rate_unit: str, span_s: float) -> str:
    """The unit a rate is shown in: its amount per minute for runs under 2 h, per hour
    beyond (``"mg/s"`` -> ``"mg/h"``); a per-kg rate keeps its kg."""
    per = "min" if span_s < 2 * 3600 else "h"
    head, sep, tail = rate_unit.rpartition("/")
    if not sep:
        return rate_unit
    try:
        if parse_unit(tail).dimension != (("time", 1),):
            return rate_unit
    except UnitError:
        return rate_unit
    return f"{head}/{per}"


def time_ticks(ax, scale: float) -> None:
    """Ticks and grid of a time axis in units of *scale* seconds (see :func:`time_axis`):
    days (6-h minor ticks), 1 to 12 h, 1 to 15 min, so that about 4 to 10 are labelled."""
    from matplotlib.ticker import MultipleLocator

    span = float(np.diff(ax.get_xlim())[0])
    # (largest span, major step, minor step) in the axis's unit
    steps = {86400.0: ((14, 1, 0.25), (70, 7, 1), (np.inf, 30, 7)),
             3600.0: ((6, 1, 0.25), (18, 2, 1), (48, 6, 1), (np.inf, 12, 3)),
             60.0: ((6, 1, 0.25), (40, 5, 1), (80, 10, 5), (np.inf, 15, 5))}
    for largest, major, minor in steps.get(scale, ()):
        if span <= largest:
            ax.xaxis.set_major_locator(MultipleLocator(major))
            ax.xaxis.set_minor_locator(MultipleLocator(minor))
            break
    ax.grid(which="major", alpha=0.35)
    ax.grid(which="minor", alpha=0.12)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel_ylabel(columns: list[Column], unit: str) -> str:
    """``"propofol concentration [µg/mL]"``: the common drug (if any) and the kind of
    quantity from the unit's dimension."""
    try:
        dimension = dict(parse_unit(unit).dimension)
    except UnitError:
        dimension = {}
    what = ""
    if dimension.get("volume") == -1 and len(dimension) == 2 and \
            dimension.keys() & {"mass", "substance"}:
        what = "concentration"
    elif dimension.get("time") == -1 and dimension.keys() & {"mass", "substance", "volume"}:
        what = "infusion rate"
    elif dimension == {"volume": -1}:
        what = "count"
    elif dimension == {"pressure": 1}:
        what = "pressure"
    names = {c.name for c in columns}
    if what == "infusion rate":
        names = {n.removesuffix("_rate") for n in names}
    words = [n.split("_") for n in names]
    common = []
    for parts in zip(*words):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if not what:
        what = quantity_label("_".join(common)) if common else \
            ", ".join(sorted(quantity_label(n) for n in names))
    elif common:
        what = f"{quantity_label(common[0])} {what}"
    shown = unit_label(unit)
    if shown and shown != "dimensionless":
        text = f"{what} [{shown}]"
    else:
        text = f"{what} (dimensionless)"
    if len(text) > 22 and text.endswith(("]", ")")):  # two lines, not one too long
        cut = max(text.rfind(" ["), text.rfind(" ("))
        text = f"{text[:cut]}\n{text[cut + 1:]}"
    return text


def _runs(values: np.ndarray) -> list[tuple[int, int, object]]:
    """[(first index, index after last, value)] of the runs of equal values."""
    out = []
    start = 0
    for k in range(1, len(values) + 1):
        if k == len(values) or values[k] != values[start]:
            out.append((start, k, values[start]))
            start = k
    return out


def _step_fill(ax, t, rate, color, label):
    """The delivered rate as a filled step area."""
    ax.fill_between(t, 0.0, rate, step="post", color=color, alpha=0.35, lw=0, label=label)


def _doses(t_s: np.ndarray, rate: np.ndarray) -> list[tuple[float, float, float]]:
    """[(start s, end s, amount)] of the blocks of positive rate (*rate* held from each time
    to the next)."""
    out = []
    positive = rate > 0
    k = 0
    while k < len(rate) - 1:
        if positive[k]:
            j = k
            while j < len(rate) - 1 and positive[j]:
                j += 1
            amount = float(np.sum(rate[k:j] * np.diff(t_s[k:j + 1])))
            if amount > 0:
                out.append((float(t_s[k]), float(t_s[j]), amount))
            k = j
        else:
            k += 1
    return out


def _amount(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit_label(unit)}" if value >= 100 else \
        f"{value:.3g} {unit_label(unit)}"


def _draw_rates(ax, inputs: list[tuple[str, str, np.ndarray, np.ndarray | None,
                                        np.ndarray | None, np.ndarray]],
                display: str, scale: float, span_s: float, colors) -> None:
    """One rate panel: for each input (name, rate unit, delivered time [s] and rate,
    commanded rate on the frame's time or None, the frame's time [s]), the delivered rate
    filled and the commanded one as a step line on top; intermittent doses labelled with
    their amount, long continuous ones with each day's total."""
    top = 0.0
    for (name, unit, t_del, delivered, commanded, t_frame), color in zip(inputs, colors):
        factor = conversion_factor(unit, display, what=name)
        label = quantity_label(name)
        _step_fill(ax, t_del / scale, delivered * factor, color, f"{label}, delivered")
        top = max(top, float(np.nanmax(delivered * factor, initial=0.0)))
        if commanded is not None and np.isfinite(commanded).any():
            ax.step(t_frame / scale, commanded * factor, where="post", color=color,
                    lw=1.1, label=f"{label}, commanded")
            top = max(top, float(np.nanmax(commanded * factor, initial=0.0)))
        amount_unit = unit.rpartition("/")[0]
        doses = _doses(t_del, delivered)
        on = sum(b - a for a, b, _ in doses)
        if doses and len(doses) <= 24 and on < 0.5 * span_s:
            for start, end, amount in doses:
                height = float(np.max(delivered[(t_del >= start) & (t_del < end)])) * factor
                where = ((start + end) / 2 - t_frame[0]) / max(span_s, 1e-9)
                # near an edge the label runs inwards, clear of the tick labels
                x, ha = ((start, "left") if where < 0.04 else (end, "right") if where > 0.96
                         else ((start + end) / 2, "center"))
                ax.annotate(_amount(amount, amount_unit), (x / scale, height),
                            xytext=(0, 2), textcoords="offset points", ha=ha,
                            va="bottom", fontsize=7, color="k")
            top *= 1.12
        elif span_s >= 2 * 86400:
            t0 = float(t_del[0])
            for day in range(int(span_s // 86400)):
                a, b = t0 + day * 86400, t0 + (day + 1) * 86400
                grid = np.clip(np.append(t_del, t_frame[-1]), a, b)
                total = float(np.sum(delivered * np.diff(grid)))
                ax.annotate(f"day {day + 1}: {_amount(total, amount_unit)}",
                            ((a + b) / 2 / scale, 1.0), xycoords=("data", "axes fraction"),
                            ha="center", va="bottom", fontsize=7, color=color,
                            annotation_clip=False)
    ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)


def _legend(ax) -> None:
    import textwrap

    handles, labels = ax.get_legend_handles_labels()
    if handles:
        unique = dict(zip(("\n".join(textwrap.wrap(label, 34)) for label in labels),
                          handles))
        ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize=8, frameon=False, borderaxespad=0.0)


def _mode_spans(axes, t_s: np.ndarray, modes: np.ndarray, scale: float) -> list[str]:
    """Shade the supervisor's modes other than CLOSED_LOOP on every panel; returns those
    shown."""
    shown = []
    ends = np.append(t_s[1:], t_s[-1])
    for first, after, mode in _runs(modes):
        style = _MODE_STYLE.get(str(mode))
        if style is None:
            continue
        color, alpha, label = style
        for k, ax in enumerate(axes):
            ax.axvspan(t_s[first] / scale, ends[after - 1] / scale, color=color,
                       alpha=alpha, lw=0, label=label if k == 0 else None, zorder=0)
        shown.append(str(mode))
    return shown


def covariate_units(model: str) -> dict[str, str]:
    """The unit of each covariate of the library model *model* (``{"crcl": "mL/min"}``);
    empty when the model is not in the library."""
    try:
        from .model.library import load

        return {c.name: c.unit for c in load(model).population.covariates}
    except (MpcDoseError, KeyError, ValueError):
        return {}


def covariate_value(value, unit: str | None) -> str:
    """A covariate's value with its unit: ``"30 mL/min"``; a category as it is."""
    if isinstance(value, (int, float)):
        shown = f" {unit_label(unit)}" if unit and unit not in ("1", "") else ""
        return f"{value:.3g}{shown}"
    return str(value)


def auc24_consensus_window() -> tuple[float, float]:
    """The AUC24 window the trial metrics score [mg·h/L]: the defaults of
    :func:`~mpc_dose.trial.metrics.auc_attainment` (2020 consensus, 400-600), read from
    there so that they are declared once."""
    import inspect

    from .trial.metrics import auc_attainment

    parameters = inspect.signature(auc_attainment).parameters
    return float(parameters["low"].default), float(parameters["high"].default)


def _target_marks(ax, window, target) -> None:
    """The target window as a green band and the target as a dashed line (each if given)."""
    if window is not None:
        ax.axhspan(window[0], window[1], color="tab:green", alpha=0.13, lw=0,
                   label=f"target window {window[0]:g}-{window[1]:g}", zorder=0)
    if target is not None:
        ax.axhline(target, color="tab:green", ls="--", lw=1.1, label=f"target {target:g}")


def closed_loop_options(scenario, changes=None) -> dict:
    """What a scenario tells :func:`closed_loop_figure` beyond the series: which output
    each sensor measures, the scored output with its target and window (``[metrics]``), the
    NMPC's soft bounds, reference and AUC target, covariate changes and disturbances as
    marks, and the clock time at t = 0. *changes*: the patient's own covariate changes
    ``(time [s], values)`` (trial/build.py covariate_changes); the scenario's fixed-time
    ones when not given.

    Every option can be overridden:
    ``plot_closed_loop(frame, path, **{**closed_loop_options(scenario), "title": ...})``.
    """
    options: dict = {
        "measured_outputs": {s.var or s.output: s.output for s in scenario.sensor},
        "start_clock_h": scenario.scenario.start_clock_h}
    metrics, nmpc = scenario.metrics, scenario.controller.nmpc
    if metrics is not None:
        from .trial.build import metrics_target

        target, window = metrics_target(scenario)   # in the output's unit
        options.update(output=metrics.output, target=target, window=window)
        if metrics.clinical == "auc":
            options["auc_window"] = auc24_consensus_window()
    if nmpc is not None and (nmpc.window_output or nmpc.output) == options.get("output",
                                                                              nmpc.output):
        options["output"] = nmpc.window_output or nmpc.output
        if nmpc.soft_low is not None or nmpc.soft_high is not None:
            options["soft_window"] = (nmpc.soft_low, nmpc.soft_high)
        if options.get("target") is None and nmpc.reference is not None:
            options["target"] = nmpc.reference
    pid = scenario.controller.pid if scenario.controller.kind == "pid" else None
    if pid is not None:  # a PID's set point is its target (scenarios without [metrics])
        measured = options["measured_outputs"].get(pid.measured, pid.measured)
        if options.setdefault("output", measured) == measured and \
                options.get("target") is None:
            options["target"] = pid.setpoint
    if nmpc is not None and nmpc.auc_target is not None:
        options["auc_target"] = nmpc.auc_target
        if nmpc.auc_soft_low is not None and nmpc.auc_soft_high is not None:
            options["auc_window"] = (nmpc.auc_soft_low, nmpc.auc_soft_high)
        if nmpc.auc_window_s:
            options["auc_period_s"] = nmpc.auc_window_s
    units = covariate_units(scenario.patient.model)
    if changes is None:
        changes = [(c.time_s, c.covariates) for c in scenario.covariate_change
                   if c.time_s is not None and c.probability == 1 and not c.scale]
    marks = [(t_s, ", ".join(f"{quantity_label(k)} changes to "
                             f"{covariate_value(v, units.get(k))}" for k, v in values.items()))
             for t_s, values in changes]
    for d in scenario.disturbance:
        for t_s, value in zip(d.times_s, d.values):
            marks.append((t_s, f"{quantity_label(d.output)} disturbance "
                               + (f"{value:+g}" if value else "ends")))
    options["marks"] = sorted(marks)
    return options


def plot_closed_loop(frame, path: str | Path, **options) -> Path:
    """Write the PNG of :func:`closed_loop_figure` (*frame*, **options*) to *path*; returns
    *path*."""
    return _save(closed_loop_figure(frame, **options), path)


def closed_loop_figure(frame, *, title: str = "", samples=None, deliveries=None,
                       measured_outputs: Mapping[str, str] | None = None,
                       output: str | None = None, target: float | None = None,
                       window: tuple[float, float] | None = None,
                       soft_window: tuple[float | None, float | None] | None = None,
                       auc_target: float | None = None,
                       auc_window: tuple[float, float] | None = None,
                       auc_period_s: float = 86400.0,
                       marks: Sequence[tuple[float, str]] = (),
                       start_clock_h: float | None = None):
    """The figure of one closed-loop run, one panel per unit: each measured output with its
    true value (target, window and the controller's soft bounds on the scored one), the AUC
    of each period when an exposure target is given, the other outputs, and the rates
    (delivered filled, commanded as a step line on top); the supervisor's modes shaded,
    alarms and marked events as vertical lines on every panel.

    Parameters
    ----------
    frame : pandas.DataFrame
        The run's time series (``timeseries.csv`` of ``mpc-dose run``).
    title : str
        The figure's title.
    samples : pandas.DataFrame, optional
        Every reading (``samples.csv``: ``t_meas_s``, ``var``, ``value``, ``quality``):
        sparse levels are drawn as markers at their sample times, not as the held value.
    deliveries : pandas.DataFrame, optional
        Every delivered rate change (``deliveries.csv``: ``time_s``, ``input``, ``rate``
        [the rate unit of the series]): the delivered rate and dose amounts exactly.
    measured_outputs : mapping, optional
        Measured variable -> the model output it measures (the scenario's sensors); by
        default a variable goes with the output of its name, or else the only output in its
        unit.
    output : str, optional
        The output *target*, *window* and *soft_window* apply to (default: the first
        measured one).
    target : float, optional
        The target of *output* [its unit], drawn as a dashed line.
    window : (float, float), optional
        The acceptable range of *output* [its unit], drawn as a band.
    soft_window : (float or None, float or None), optional
        The controller's soft bounds on *output* [its unit] (NMPC ``soft_low``,
        ``soft_high``), drawn as dotted lines.
    auc_target, auc_window : optional
        The exposure target and range of *output* over each *auc_period_s* [its unit x h]:
        adds a panel of the AUC of each whole period (from the true value).
    auc_period_s : float
        The AUC period [s] (86400: AUC24).
    marks : sequence of (float, str)
        Events to mark on every panel [s, text] (e.g. a covariate change).
    start_clock_h : float, optional
        The clock time at t = 0 [h], stated under the time axis.
    """
    plt = _pyplot()
    time_s = frame["time_s"].to_numpy(dtype=float)
    span_s = float(time_s[-1] - time_s[0]) if time_s.size > 1 else 0.0
    scale, t_label = time_axis(time_s)
    parsed = {c: parse_column(c) for c in frame.columns}
    true = {p.name: c for c, p in parsed.items() if p.kind == "true"}
    measured = {p.name: c for c, p in parsed.items() if p.kind == "measured"}
    rates = [p.name.removesuffix("_rate") for c, p in parsed.items() if p.kind == "delivered"]

    # which output each measured variable measures
    links: dict[str, list[str]] = {}
    alone: list[str] = []
    for var, column in measured.items():
        out = (measured_outputs or {}).get(var)
        if out is None and var in true:
            out = var
        if out is None:
            same_unit = [n for n, c in true.items() if parsed[c].unit == parsed[column].unit]
            out = same_unit[0] if len(same_unit) == 1 else None
        if out in true:
            links.setdefault(out, []).append(var)
        else:
            alone.append(var)
    if output is None:
        output = next(iter(links), None)
    monitored = list(links)
    if output in monitored:  # the output with a target goes first
        monitored.insert(0, monitored.pop(monitored.index(output)))
    elif output in true and (target is not None or window is not None):
        monitored.insert(0, output)
    others: dict[str, list[str]] = {}
    for name, column in true.items():
        if name not in monitored:
            others.setdefault(parsed[column].unit or "", []).append(column)
    rate_groups: dict[str, list[str]] = {}
    for name in rates:
        column = next(c for c, p in parsed.items()
                      if p.kind == "delivered" and p.name == f"{name}_rate")
        unit = parsed[column].unit or ""
        rate_groups.setdefault(rate_display_unit(unit, span_s), []).append(name)
    show_auc = (auc_target is not None or auc_window is not None) and output in true \
        and span_s >= auc_period_s

    n_panels = len(monitored) + len(alone) + int(show_auc) + len(others) + len(rate_groups)
    heights = [3.0] * (len(monitored) + len(alone)) + [2.0] * int(show_auc) \
        + [2.2] * len(others) + [2.0] * len(rate_groups)
    fig, axes = plt.subplots(n_panels, 1, figsize=(11, sum(heights) + 1.0), sharex=True,
                             squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": heights})
    axes = list(axes[:, 0])
    t = time_s / scale
    panels = iter(axes)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # one colour per drug on every panel (its concentrations and its rate)
    drugs = list(dict.fromkeys([n.split("_")[0] for n in rates]
                               + [n.split("_")[0] for n in true if n not in monitored]))
    drug_color = {d: palette[k % len(palette)] for k, d in enumerate(drugs)}

    def draw_measured(ax, var: str, color) -> None:
        column = measured[var]
        mine = None
        if samples is not None and len(samples):
            mine = samples[samples["var"] == var]
        values = frame[column].to_numpy(dtype=float)
        n_valid = int(np.isfinite(values).sum())
        # read every few seconds: a line; levels hours apart: markers at their sample times
        if mine is None:
            dense = n_valid > 0.5 * len(values)
        else:
            dense = len(mine) > 1 and \
                float(np.median(np.diff(mine["t_meas_s"].to_numpy(dtype=float)))) < 300.0
        label = f"{quantity_label(var)}, measured"
        if dense:
            ax.plot(t, values, color=color, lw=0.6, alpha=0.55, label=label)
        elif mine is not None:
            valid = mine[mine["quality"] == "valid"]
            ax.plot(valid["t_meas_s"].to_numpy(dtype=float) / scale, valid["value"],
                    "o", color=color, ms=6, mec="k", mew=0.6,
                    label=f"{label} (at sample time)")
            other = mine[(mine["quality"] != "valid")
                         & np.isfinite(mine["value"].to_numpy(dtype=float))]
            for quality, rows in other.groupby("quality"):
                ax.plot(rows["t_meas_s"].to_numpy(dtype=float) / scale, rows["value"], "o",
                        mfc="none", mec=color, ms=6, label=f"{label}: {quality}")
        else:
            ax.step(t, values, where="post", color=color, lw=0.9, ls="--",
                    label=f"{label} (last result, held)")

    # measured outputs, with their true value, target, window and soft bounds
    for name in monitored:
        ax = next(panels)
        column = true[name]
        unit = parsed[column].unit
        ax.plot(t, frame[column], color="k", lw=1.3, label=f"{quantity_label(name)}, true")
        for k, var in enumerate(links.get(name, [])):
            draw_measured(ax, var, _MEASURED_COLORS[k % len(_MEASURED_COLORS)])
        if name == output:
            _target_marks(ax, window, target)
            for k, bound in enumerate(soft_window or ()):
                if bound is not None:
                    ax.axhline(bound, color="tab:purple", ls=":", lw=1.2,
                               label=f"controller's soft {'lower' if k == 0 else 'upper'} "
                                     f"bound {bound:g}")
        ax.set_ylabel(_panel_ylabel([parsed[column]], unit or "1"))
    for var in alone:
        ax = next(panels)
        draw_measured(ax, var, _MEASURED_COLORS[0])
        ax.set_ylabel(_panel_ylabel([parsed[measured[var]]], parsed[measured[var]].unit
                                    or "1"))

    if show_auc:
        ax = next(panels)
        values = frame[true[output]].to_numpy(dtype=float)
        unit = parsed[true[output]].unit or "1"
        centres, aucs = [], []
        for k in range(int(span_s // auc_period_s)):
            a, b = time_s[0] + k * auc_period_s, time_s[0] + (k + 1) * auc_period_s
            inside = (time_s >= a) & (time_s <= b)
            aucs.append(float(np.trapezoid(values[inside], time_s[inside] / 3600.0)))
            centres.append((a + b) / 2)
        hours = auc_period_s / 3600.0
        name = f"AUC{hours:g}" if hours == round(hours) else "AUC"
        inside_window = [auc_window is None or auc_window[0] <= v <= auc_window[1]
                         for v in aucs]
        ax.bar(np.array(centres) / scale, aucs, width=0.8 * auc_period_s / scale,
               color=["tab:blue" if ok else "tab:orange" for ok in inside_window],
               alpha=0.75)
        # legend entries (zero-height bars): in the window, outside it
        ax.bar(centres[0] / scale, 0.0, color="tab:blue", alpha=0.75,
               label=f"{name} of the true {quantity_label(output)}")
        if not all(inside_window):
            ax.bar(centres[0] / scale, 0.0, color="tab:orange", alpha=0.75,
                   label=f"{name} outside the window")
        for c, v in zip(centres, aucs):  # each value inside the foot of its bar
            ax.annotate(f"{v:.0f}", (c / scale, 0.0), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8, color="w", fontweight="bold")
        _target_marks(ax, auc_window, auc_target)
        ax.set_ylim(0, max(aucs + [auc_window[1] if auc_window else 0.0,
                                   auc_target or 0.0]) * 1.2)
        head, sep, tail = unit.partition("/")
        unit_text = unit_label(f"{head}*h{sep}{tail}")
        ax.set_ylabel(f"{name} [{unit_text}]" if unit != "1"
                      else f"{name} [{quantity_label(output)}·h]")

    for unit, columns in others.items():
        ax = next(panels)
        seen: dict[str, int] = {}
        for column in columns:
            drug = parsed[column].name.split("_")[0]
            k = seen[drug] = seen.get(drug, -1) + 1
            ax.plot(t, frame[column], color=drug_color[drug], ls=("-", "--", ":", "-.")[k % 4],
                    label=quantity_label(parsed[column].name))
        ax.set_ylabel(_panel_ylabel([parsed[c] for c in columns], unit or "1"))

    for display, names in rate_groups.items():
        ax = next(panels)
        inputs = []
        for name in names:
            d_col = next(c for c, p in parsed.items()
                         if p.kind == "delivered" and p.name == f"{name}_rate")
            c_col = next((c for c, p in parsed.items()
                          if p.kind == "commanded" and p.name == f"{name}_rate"), None)
            unit = parsed[d_col].unit or ""
            t_del, delivered = time_s, frame[d_col].to_numpy(dtype=float)
            if deliveries is not None and len(deliveries):
                mine = deliveries[deliveries["input"] == name]
                if len(mine):
                    t_del = np.append(mine["time_s"].to_numpy(dtype=float), time_s[-1])
                    delivered = np.append(mine["rate"].to_numpy(dtype=float),
                                          mine["rate"].iloc[-1])
            commanded = frame[c_col].to_numpy(dtype=float) if c_col else None
            inputs.append((name, unit, t_del, delivered, commanded, time_s))
        _draw_rates(ax, inputs, display, scale, span_s,
                    [drug_color[n.split("_")[0]] for n in names])
        ax.set_ylabel(_panel_ylabel([Column("", f"{n}_rate", display) for n in names],
                                    display))

    # the supervisor's modes, alarms and marked events on every panel
    if "controller_mode" in frame:
        _mode_spans(axes, time_s, frame["controller_mode"].astype(str).to_numpy(), scale)
    if "alarms" in frame:
        codes = frame["alarms"].fillna("").astype(str).to_numpy()
        times = time_s[codes != ""]
        if times.size:
            shown = sorted({c for text in codes[codes != ""] for c in text.split(";")})
            for ax in axes:
                for x in times:
                    ax.axvline(x / scale, color="tab:red", lw=0.8, alpha=0.6, zorder=1)
            axes[0].plot(times / scale, np.ones_like(times), "v", color="tab:red", ms=8,
                         transform=axes[0].get_xaxis_transform(), clip_on=False,
                         label=f"alarm ({', '.join(shown)})"[:80])
    for t_mark, text in marks:
        for ax in axes:
            ax.axvline(t_mark / scale, color="0.25", ls="-.", lw=0.9, zorder=1)
        axes[0].annotate(text, (t_mark / scale, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, -3), textcoords="offset points", ha="left", va="top",
                         fontsize=8, color="0.25")
    for ax in axes:
        ax.set_xlim(t[0], t[-1])
        time_ticks(ax, scale)
        _legend(ax)
    clock = f" (t = 0 at {int(start_clock_h):02d}:{round(start_clock_h % 1 * 60):02d})" \
        if start_clock_h is not None else ""
    axes[-1].set_xlabel(t_label.replace("time", "time since start") + clock)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_simulation(result: SimulationResult, path: str | Path, *, title: str | None = None
                    ) -> Path:
    """Write a PNG of an open-loop simulation: one panel per output unit (concentrations,
    effects), and one per rate unit with each input's rate filled; returns *path*."""
    import pandas as pd

    frame = pd.DataFrame({"time_s": result.time_s})
    model = result.model
    from .units import unit_to_token

    def token(unit: str) -> str:
        return "unitless" if unit == "1" else unit_to_token(unit)

    for k, out in enumerate(model.outputs):
        frame[f"true_{out.name}_{token(out.unit)}"] = result.outputs[:, k]
    for k, inp in enumerate(model.inputs):
        frame[f"delivered_{inp.name}_rate_{token(inp.rate_unit)}"] = result.inputs[:, k]
    return plot_closed_loop(frame, path, title=title or model.name)
