"""What a researcher takes away from trials: a controller comparison, a self-contained HTML
report with PNG plots, and a NONMEM-style dataset.

All read the folders :func:`~mpc_dose.trial.runner.run_trial` writes (``metrics.csv``,
``series/*.parquet``, ``patients/*.json``); a comparison folder holds one trial folder per
controller and ``comparison.csv``.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError

__all__ = ["load_series", "compare_table", "write_report", "nonmem_dataset",
           "html_page", "image"]


def _trial_folders(results: Path) -> dict[str, Path]:
    """{label: trial folder}: *results* itself, or its sub-folders (a comparison)."""
    if (results / "metrics.csv").exists():
        return {results.name: results}
    folders = {p.name: p for p in sorted(results.iterdir()) if (p / "metrics.csv").exists()}
    if not folders:
        raise ConfigError(f"{str(results)!r} holds no trial results (no metrics.csv)")
    return folders


def load_series(trial: Path) -> pd.DataFrame:
    files = sorted((trial / "series").glob("patient_*.parquet"))
    if not files:
        raise ConfigError(f"{str(trial)!r}: no series/patient_*.parquet")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def compare_table(folders: dict[str, Path]) -> pd.DataFrame:
    """Metric x controller: mean (sd) over the same patients."""
    columns = {}
    patients = None
    for label, folder in folders.items():
        metrics = pd.read_csv(folder / "metrics.csv")
        if patients is not None and list(metrics.patient) != patients:
            raise ConfigError(f"compare: {label} ran other patients than the first trial")
        patients = list(metrics.patient)
        numeric = metrics.select_dtypes("number").drop(columns=["patient"])
        columns[f"{label} mean"] = numeric.mean()
        columns[f"{label} sd"] = numeric.std()
    return pd.DataFrame(columns)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _ensemble(series: dict[str, pd.DataFrame], column: str, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    for label, frame in series.items():
        wide = frame.pivot(index="time_s", columns="patient", values=column)
        t = wide.index.to_numpy() / 60.0
        q = np.nanpercentile(wide.to_numpy(), [5, 25, 50, 75, 95], axis=1)
        line, = ax.plot(t, q[2], label=f"{label} median")
        ax.fill_between(t, q[1], q[3], color=line.get_color(), alpha=0.3, lw=0)
        ax.fill_between(t, q[0], q[4], color=line.get_color(), alpha=0.12, lw=0)
    ax.set_xlabel("time [min]")
    ax.set_ylabel(column)
    ax.set_title(f"{title}: median, 25-75 % and 5-95 % of patients")
    ax.legend(fontsize=8)
    return _png(fig)


def _small_multiples(frame: pd.DataFrame, column: str, n: int = 12) -> str:
    import matplotlib.pyplot as plt

    patients = sorted(frame.patient.unique())[:n]
    cols = 4
    rows = -(-len(patients) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 1.9 * rows), sharex=True, sharey=True,
                             squeeze=False)
    for ax, k in zip(axes.ravel(), patients):
        one = frame[frame.patient == k]
        ax.plot(one.time_s / 60.0, one[column], lw=0.7)
        ax.set_title(f"patient {k}", fontsize=8)
    for ax in axes.ravel()[len(patients):]:
        ax.axis("off")
    fig.suptitle(column, fontsize=9)
    return _png(fig)


def _distributions(metrics: dict[str, pd.DataFrame], names: list[str]) -> str:
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.2 * rows), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        data = [m[name].dropna().to_numpy() for m in metrics.values()]
        ax.boxplot(data, tick_labels=list(metrics), showfliers=True)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    return _png(fig)


def write_report(results: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (plots embedded as PNG, readable offline) for a trial or a
    comparison folder; returns its path."""
    results = Path(results)
    folders = _trial_folders(results)
    metrics = {label: pd.read_csv(f / "metrics.csv") for label, f in folders.items()}
    series = {label: load_series(f) for label, f in folders.items()}
    first = next(iter(series.values()))
    measured = [c for c in first.columns if c.startswith("measured_")]
    delivered = [c for c in first.columns if c.startswith("delivered_")]
    parts = [f"<h1>mpc_dose trial report: {html.escape(results.name)}</h1>",
             "<p>" + ", ".join(f"{html.escape(k)}: {len(v)} patients" for k, v in
                               metrics.items()) + "</p>"]
    if len(folders) > 1:
        table = compare_table(folders)
        parts += ["<h2>Controller comparison (mean, sd over the same patients)</h2>",
                  table.to_html(float_format=lambda v: f"{v:.4g}")]
    for column in measured:
        parts += [f"<h2>{html.escape(column)}</h2>",
                  f'<img src="data:image/png;base64,{_ensemble(series, column, column)}">']
    for column in delivered:
        parts += [f"<h2>{html.escape(column)}</h2>",
                  f'<img src="data:image/png;base64,{_ensemble(series, column, column)}">']
    for label, frame in series.items():
        for column in measured[:1]:
            parts += [f"<h2>{html.escape(label)}: patients one by one</h2>",
                      f'<img src="data:image/png;base64,{_small_multiples(frame, column)}">']
    numeric = [c for c in next(iter(metrics.values())).select_dtypes("number").columns
               if c != "patient"]
    parts += ["<h2>Metric distributions</h2>",
              f'<img src="data:image/png;base64,{_distributions(metrics, numeric[:24])}">']
    for label, m in metrics.items():
        from .metrics import summarise

        parts += [f"<h2>{html.escape(label)}: summary</h2>",
                  summarise(m).to_html(float_format=lambda v: f"{v:.4g}")]
    path = Path(out) if out else results / "report.html"
    path.write_text(html_page(parts), encoding="utf-8")
    return path


def html_page(parts: list[str], title: str = "mpc_dose report") -> str:
    """A self-contained HTML page of *parts* (HTML fragments; images embedded)."""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            "</title><style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
            "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;"
            "padding:2px 6px;text-align:right}img{max-width:100%}</style></head><body>"
            + "\n".join(parts) + "</body></html>")


def image(fig) -> str:
    """*fig* as an embedded PNG ``<img>`` (the figure is closed)."""
    return f'<img src="data:image/png;base64,{_png(fig)}">'


def _covariate_codes(trial: Path) -> dict[str, dict[str, int]]:
    """Numeric codes of the categorical covariates of the trial's patient model: yes/no as
    1/0, any other choice list as 1, 2, ... in the model's declared order (NM-TRAN reads
    numbers only)."""
    from ..scenario import load_scenario
    from .build import scenario_model

    manifest = json.loads((trial / "trial.json").read_text("utf-8"))
    scenario = load_scenario(manifest["scenario"], manifest.get("overrides") or None)
    codes = {}
    for covariate in scenario_model(scenario).population.covariates:
        if covariate.choices:
            if set(covariate.choices) == {"yes", "no"}:
                codes[covariate.name] = {"no": 0, "yes": 1}
            else:
                codes[covariate.name] = {c: k for k, c in enumerate(covariate.choices, 1)}
    return codes


def nonmem_dataset(trial: str | Path, *, observe: str | None = None,
                   every_s: float | None = None) -> tuple[pd.DataFrame, str]:
    """The trial as a NONMEM-style dataset, and the text of its sidecar (columns, units,
    codes).

    One dosing record (EVID 1, AMT, RATE) per constant-rate segment of each input as it
    reached the patient (CMT = the input's number, 1-based), from the exact delivery record;
    one observation record (EVID 0, MDV 0, DV) per valid sample of *observe* (a measured
    variable; the first by default) at its SAMPLE time (a level reported hours later is
    still at its draw time), at most one per *every_s* seconds if given; the patient's
    covariates as columns, time-varying ones at their value at each record's time (LOCF: a
    change applies from its time on), categorical ones as numeric codes. TIME in hours, AMT
    in the input's amount unit, RATE in amount per hour, DV in the variable's unit; times
    rounded to 1e-6 h, amounts, rates, levels and covariates to 8 significant digits.
    """
    trial = Path(trial)
    sample_files = sorted((trial / "samples").glob("patient_*.parquet"))
    if not sample_files:
        raise ConfigError(f"export: {str(trial)!r} has no samples/ (a trial written by an "
                          f"older mpc-dose: run it again to export it)")
    codes = _covariate_codes(trial)
    rows = []
    units: dict[str, str] = {}
    for sample_file in sample_files:
        name = sample_file.stem
        k = int(name.split("_")[1])
        info = json.loads((trial / "patients" / f"{name}.json").read_text("utf-8"))
        inputs = list(info["inputs"])
        changes = sorted((float(t), c) for t, c in info.get("covariate_changes", []))

        def covariates_at(time_s: float) -> dict:
            values = dict(info["covariates"])
            for t_change, change in changes:
                if t_change <= time_s:
                    values.update(change)
            out = {}
            for cov, value in values.items():
                out[str(cov).upper()] = codes[cov][value] if cov in codes else value
            return out

        deliveries = pd.read_parquet(trial / "deliveries" / f"{name}.parquet")
        series_end = float(pd.read_parquet(trial / "series" / f"{name}.parquet",
                                           columns=["time_s"]).time_s.max())
        for cmt, input_name in enumerate(inputs, start=1):
            mine = deliveries[deliveries.input == input_name]
            times = mine.time_s.to_numpy()
            rates = mine.rate.to_numpy()
            ends = np.append(times[1:], series_end)
            amount_unit = info["inputs"][input_name]["amount_unit"]
            for start, end, rate in zip(times, ends, rates):
                if rate <= 0 or end <= start:
                    continue
                rows.append({"ID": k, "TIME": start / 3600.0, "AMT": rate * (end - start),
                             "RATE": rate * 3600.0, "EVID": 1, "MDV": 1, "DV": ".",
                             "CMT": cmt, **covariates_at(start)})
            units[f"AMT (CMT {cmt}: {input_name})"] = amount_unit
            units[f"RATE (CMT {cmt}: {input_name})"] = f"{amount_unit}/h"
        samples = pd.read_parquet(sample_file)
        variables = list(dict.fromkeys(samples["var"]))
        variable = observe or (variables[0] if variables else None)
        if variable is None:
            continue
        if variable not in variables:
            raise ConfigError(f"export --observe {variable!r}: no such measured variable; "
                              f"measured: {', '.join(variables)}")
        taken = samples[(samples["var"] == variable) & (samples.quality == "valid")]
        units["DV"] = str(taken.unit.iloc[0]) if len(taken) else ""
        last = -np.inf
        for time_s, value in zip(taken.t_meas_s, taken.value):
            if every_s and time_s - last < every_s - 1e-9:
                continue
            last = time_s
            rows.append({"ID": k, "TIME": time_s / 3600.0, "AMT": ".", "RATE": ".",
                         "EVID": 0, "MDV": 0, "DV": value, "CMT": len(inputs) + 1,
                         **covariates_at(time_s)})
    data = pd.DataFrame(rows)
    if data.empty:
        raise ConfigError(f"export: {str(trial)!r} has no doses or samples to export")
    data["TIME"] = data.TIME.round(6)
    for column in data.columns.drop(["ID", "TIME", "EVID", "MDV", "CMT"]):
        data[column] = [float(f"{v:.8g}") if isinstance(v, float) else v
                        for v in data[column]]
    data = data.sort_values(["ID", "TIME", "EVID"], ascending=[True, True, False],
                            kind="stable").reset_index(drop=True)
    lines = ["mpc-dose NONMEM-style dataset: columns, units and codes",
             "TIME: h since the start of the run", "EVID: 1 dose, 0 observation; MDV: 1 for "
             "doses", f"DV: {variable} [{units.get('DV', '')}] at its sample time"]
    lines += [f"{key}: {unit}" for key, unit in units.items() if key != "DV"]
    lines.append(f"CMT {len(inputs) + 1}: the observation")
    for cov, mapping in codes.items():
        lines.append(f"{cov.upper()}: " + ", ".join(f"{c} = {v}" for c, v in mapping.items()))
    return data, "\n".join(lines) + "\n"
