"""What `mpc-dose mipd` writes: ``estimate.json`` (the contract other tools read),
``report.txt`` (for a person), ``prediction.csv`` and ``prediction.png`` (the levels with
their credible band).

JSON keys carry their unit in the name (``_h``, ``_s``) or beside the value (``*_unit``);
a number that is not finite is written as null, never as NaN.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..units import unit_to_token
from .mipd import MipdResult

__all__ = ["estimate_document", "report_text", "write_mipd", "plot_mipd"]

#: The version of estimate.json's layout (raise it when a key changes meaning).
ESTIMATE_FORMAT = 1


def _num(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def estimate_document(result: MipdResult) -> dict:
    """estimate.json as a dict: ``success``, ``status``, ``eta``, ``parameters`` (planning
    values by the model's parameter names, units in ``parameter_units``), uncertainty,
    fit, and with a target ``recommendation`` (``dose`` in ``dose_unit``)."""
    est, hist, s = result.estimate, result.history, result.settings
    doc: dict = {
        "format": ESTIMATE_FORMAT,
        "success": bool(est.success),
        "status": est.status,
        "message": ("converged" if est.success else
                    f"the fit failed ({est.status}): its values are not planned with"),
        "model": result.model,
        "data": hist.source,
        "layout": hist.layout,
        "output": hist.output,
        "output_unit": hist.output_unit,
        "prior_weight": s.prior_weight,
        "iterations": est.iterations,
        "objective": _num(est.objective),
        "eta": {k: _num(v) for k, v in est.eta.items()},
        "eta_sd": {k: _num(est.sd(f"eta_{k}")) for k in est.eta},
        "kappa": [{k: _num(v) for k, v in occasion.items()} for occasion in est.kappa],
        "posterior_covariance": {"names": list(est.names),
                                 "matrix": [[_num(v) for v in row] for row in
                                            np.atleast_2d(est.covariance).tolist()]},
        "parameters": {p.name: _num(p.value) for p in result.parameters},
        "parameter_units": {p.name: p.unit for p in result.parameters},
        "typical_parameters": {p.name: _num(p.typical) for p in result.parameters},
        "parameter_uncertainty": {
            p.name: {"sd_log": _num(p.sd_log), "cv": _num(p.cv), "low": _num(p.low),
                     "high": _num(p.high), "level": s.credible_level}
            for p in result.parameters if p.eta is not None},
        "covariates_at_end": {k: v for k, v in
                              hist.covariates_at(est.t_s).items()},
        "levels": [{"time_h": t / 3600.0, "observed": _num(y), "predicted": _num(f),
                    "below_lloq": bool(b)}
                   for t, y, f, b in zip(est.reading_times_s, est.readings,
                                         est.predictions, est.below_lloq)],
        "excluded_levels": [{"time_h": _num(t / 3600.0), "value": _num(v), "reason": r}
                            for t, v, r in est.excluded],
        "fit_until_h": est.t_s / 3600.0,
        "band": result.band_note,
        "notes": list(result.notes),
    }
    rec, reg = result.recommendation, result.regimen
    if rec is not None and reg is not None:
        target = s.target
        doc["recommendation"] = {
            "success": bool(rec.success),
            "status": rec.status,
            "message": rec.message,
            "dose": _num(rec.dose),
            "dose_unit": rec.dose_unit,
            "dose_exact": _num(rec.dose_exact),
            "round_step": _num(rec.round_step),
            "input": reg.input,
            "interval_h": reg.interval_s / 3600.0,
            "infusion_h": reg.infusion_s / 3600.0,
            "start_h": reg.start_s / 3600.0,
            "basis": reg.basis,
            "target": {"kind": target.kind, "value": target.value, "unit": target.unit,
                       "at_h": None if target.at_s is None else target.at_s / 3600.0,
                       "threshold": target.threshold,
                       "threshold_unit": hist.output_unit if target.threshold else None,
                       "text": target.describe()},
            "achieved": _num(rec.achieved),
            "achieved_exact": _num(rec.achieved_exact),
            "achieved_unit": target.unit,
            "evaluations": rec.evaluations,
        }
    return doc


def report_text(result: MipdResult) -> str:
    """A short report for a person: the fit, the parameters with their intervals, the
    levels, the recommendation."""
    est, hist, s = result.estimate, result.history, result.settings
    cu = hist.output_unit
    lines = [f"mpc-dose mipd: {result.model}, {Path(hist.source).name} ({hist.layout} layout)",
             "patient: " + ", ".join(f"{k} {v}" for k, v in hist.covariates.items())
             + (f"; {len(hist.covariate_changes)} covariate change(s)"
                if hist.covariate_changes else ""),
             f"record: {len(hist.doses)} dose(s), {len(hist.observations)} level(s) of "
             f"{hist.output} [{cu}]"
             + (f", {sum(b for _, _, b in hist.observations)} below the LLOQ (M3)"
                if any(b for _, _, b in hist.observations) else ""),
             ""]
    verdict = "converged" if est.success else "FAILED: not used for dosing"
    lines.append(f"fit: {verdict} (status {est.status}, {est.iterations} iterations, "
                 f"objective {est.objective:.5g}, prior weight {s.prior_weight:g})")
    level = f"{s.credible_level:.0%}"
    lines.append(f"{'parameter':<22}{'individual':>12}{'typical':>12}  {level} interval"
                 f"{'':<8}{'eta':>9}{'RSE':>8}")
    for p in result.parameters:
        if p.eta is None:
            continue
        interval = (f"{p.low:.4g} - {p.high:.4g}" if p.low is not None else "n/a")
        cv = f"{p.cv:.0%}" if p.cv is not None else "n/a"
        lines.append(f"{p.name:<22}{p.value:>12.4g}{p.typical:>12.4g}  {interval:<18}"
                     f"{p.eta:>9.4f}{cv:>8}  [{p.unit}]")
    if est.kappa and any(est.kappa):
        for o, occasion in enumerate(est.kappa):
            lines.append(f"occasion {o}: " + ", ".join(f"kappa {k} {v:.4f}"
                                                        for k, v in occasion.items()))
    lines.append("")
    lines.append(f"levels [{cu}]: time h, observed, predicted")
    for t, y, f, b in zip(est.reading_times_s, est.readings, est.predictions, est.below_lloq):
        lines.append(f"  {t / 3600:8.2f} h  {'<' if b else ' '}{y:8.3g}  {f:8.3g}"
                     + ("  (below the LLOQ)" if b else ""))
    for t, v, why in est.excluded:
        lines.append(f"  left out: {t / 3600:g} h, {v:g}: {why}")
    rec, reg = result.recommendation, result.regimen
    if rec is not None and reg is not None:
        lines.append("")
        regimen = (f"every {reg.interval_s / 3600:g} h over {reg.infusion_s / 3600:g} h"
                   if reg.infusion_s else f"every {reg.interval_s / 3600:g} h as a bolus")
        lines.append(f"target: {s.target.describe()} ({reg.basis}), {reg.input} {regimen}, "
                     f"first at {reg.start_s / 3600:g} h")
        if rec.success:
            step = f" (rounded to a step of {rec.round_step:g} {rec.dose_unit})" \
                if rec.round_step else ""
            lines.append(f"recommended dose: {rec.dose:g} {rec.dose_unit}{step}; exact "
                         f"{rec.dose_exact:.5g} {rec.dose_unit}")
            lines.append(f"predicted at the recommended dose: {rec.achieved:.4g} "
                         f"{s.target.unit} (target {s.target.value:g})")
        else:
            lines.append(f"NO DOSE RECOMMENDED ({rec.status}): {rec.message}")
    lines.append("")
    lines.append(result.band_note)
    lines += [f"note: {n}" for n in result.notes]
    lines.append("Planning uses the covariates at the end of the record and exp(eta), "
                 "without the occasions' kappas.")
    return "\n".join(lines) + "\n"


def plot_mipd(result: MipdResult, path: str | Path) -> Path:
    """The levels over time: the MAP prediction, its credible band, the observed levels
    (BLQ at the limit, open), the doses and the target; returns *path*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist, s = result.history, result.settings
    t_h = result.curve_time_s / 3600.0
    fig, ax = plt.subplots(figsize=(9, 4.4))
    if result.band_low is not None:
        ax.fill_between(t_h, result.band_low, result.band_high, color="tab:blue", alpha=0.2,
                        lw=0, label=f"{s.credible_level:.0%} credible band")
    ax.plot(t_h, result.curve, color="tab:blue", lw=1.5, label="MAP prediction")
    obs = [(t / 3600.0, y) for t, y, b in hist.observations if not b]
    blq = [(t / 3600.0, y) for t, y, b in hist.observations if b]
    if obs:
        ax.plot(*zip(*obs), "o", color="black", label="measured level")
    if blq:
        ax.plot(*zip(*blq), "v", mfc="none", color="black", label="below LLOQ (at the limit)")
    for k, dose in enumerate(list(hist.doses) + list(result.future_doses)):
        future = k >= len(hist.doses)
        ax.axvspan(dose.time_s / 3600.0, (dose.time_s + max(dose.duration_s, 60.0)) / 3600.0,
                   color="tab:green" if future else "tab:gray", alpha=0.25 if future else 0.2,
                   lw=0, label=("recommended doses" if future else "doses given")
                   if k in (0, len(hist.doses)) else None)
    target = s.target
    if target is not None and result.recommendation is not None and \
            result.recommendation.success:
        if target.kind in ("trough", "conc"):
            ax.axhline(target.value, color="tab:red", ls="--", lw=1,
                       label=f"target {target.kind} {target.value:g} {hist.output_unit}")
        elif target.kind == "time_above":
            ax.axhline(target.threshold, color="tab:red", ls="--", lw=1,
                       label=f"threshold {target.threshold:g} {hist.output_unit}")
    ax.set_xlabel("time [h]")
    ax.set_ylabel(f"{hist.output} [{hist.output_unit}]")
    ax.set_ylim(bottom=0)
    title = f"{result.model}: MIPD"
    rec = result.recommendation
    if rec is not None and rec.success:
        title += f", recommended {rec.dose:g} {rec.dose_unit} every " \
                 f"{result.regimen.interval_s / 3600:g} h"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_mipd(result: MipdResult, out: str | Path) -> list[Path]:
    """Write estimate.json, report.txt, prediction.csv and prediction.png into *out*."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "estimate.json", out / "report.txt", out / "prediction.csv",
             out / "prediction.png"]
    paths[0].write_text(json.dumps(estimate_document(result), indent=1, allow_nan=False)
                        + "\n", encoding="utf-8")
    paths[1].write_text(report_text(result), encoding="utf-8")
    token = unit_to_token(result.history.output_unit)
    columns = {"time_h": result.curve_time_s / 3600.0,
               f"{result.history.output}_{token}": result.curve}
    if result.band_low is not None:
        columns[f"band_low_{token}"] = result.band_low
        columns[f"band_high_{token}"] = result.band_high
    header = ",".join(columns)
    np.savetxt(paths[2], np.column_stack(list(columns.values())), delimiter=",",
               header=header, comments="", fmt="%.8g")
    plot_mipd(result, paths[3])
    return paths
