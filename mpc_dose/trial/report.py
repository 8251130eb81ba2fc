"""What a researcher takes away from trials: a controller comparison, a self-contained HTML
report with PNG plots, and a NONMEM-style dataset.

All read the folders :func:`~mpc_dose.trial.runner.run_trial` writes (``metrics.csv``,
``series/*.parquet``, ``samples/*.parquet``, ``patients/*.json``, ``trial.json``); a
comparison folder holds one trial folder per controller and ``comparison.csv``.

The report opens with a summary a clinician can read (the scenario, the cohort, the
controllers, the target, the headline results with units), then shows the patients over
time, every metric with its unit and meaning, and the metrics' distributions.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import textwrap
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError, MpcDoseError
from ..plotting import auc24_consensus_window

__all__ = ["load_series", "compare_table", "write_report", "nonmem_dataset",
           "html_page", "image", "MetricInfo", "describe_metric", "format_value",
           "daily_profile", "cvga_figure"]


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


# ---------------------------------------------------------------------------------------
# metric names in words

@dataclass(frozen=True)
class MetricInfo:
    """A metric as a reader sees it: *label*, *unit* (as printed; ``"dimensionless"`` for a
    pure number) and a one-line *explanation*; *group* orders the metrics table. The page
    shows ``metrics.csv``'s value times *factor* (1, or e.g. 1/60 for seconds shown in
    minutes)."""

    name: str
    label: str
    unit: str
    explanation: str
    group: str
    factor: float = 1.0

    def values(self, metrics: pd.DataFrame) -> pd.Series:
        """This metric's column of *metrics* in the unit shown."""
        return metrics[self.name] * self.factor

    @property
    def heading(self) -> str:
        """``"Time in window [s]"``; a dimensionless metric has no bracket."""
        return self.label if self.unit in ("dimensionless", "count") else \
            f"{self.label} [{self.unit}]"


#: the AUC24 window the metrics score [mg·h/L]
_AUC_LOW, _AUC_HIGH = auc24_consensus_window()

#: groups of the metrics table, in order
GROUPS = ("Target and window", "Glucose (consensus CGM metrics)",
          "Anaesthesia (TIVA benchmark)", "Exposure", "Toxicity", "Drug given",
          "Safety supervisor", "Estimation")

#: the metrics of trial/metrics.py and trial/runner.py: name -> (group, label, explanation,
#: unit when the name's suffix does not say it; "{out}" is the scored output's unit)
_KNOWN: dict[str, tuple[str, str, str, str | None]] = {
    "response_time_s": ("Target and window", "Response time",
                        "time until the measured value first covers 90 % of the way from its "
                        "start to the target", None),
    "settling_time_s": ("Target and window", "Settling time",
                        "time after which the measured value stays inside the window (blank: "
                        "it ended outside)", None),
    "overshoot_pct": ("Target and window", "Overshoot",
                      "largest excursion past the target, in % of the initial distance to "
                      "the target", None),
    "steady_state_deviation": ("Target and window", "Steady-state deviation",
                               "mean |target - measured| over the last 20 % of the run",
                               "{out}"),
    "tracking_error_rms": ("Target and window", "Tracking error (RMS)",
                           "root-mean-square of target - measured over the whole run", "{out}"),
    "time_in_window_s": ("Target and window", "Time in window",
                         "time the measured value spent inside the window", None),
    "time_below_window_s": ("Target and window", "Time below window",
                            "time the measured value spent below the window", None),
    "time_above_window_s": ("Target and window", "Time above window",
                            "time the measured value spent above the window", None),
    "readings_in_window_pct": ("Target and window", "Readings in window",
                               "share of the valid readings within the window", None),
    "readings_below_window_pct": ("Target and window", "Readings below window",
                                  "share of the valid readings below the window", None),
    "readings_above_window_pct": ("Target and window", "Readings above window",
                                  "share of the valid readings above the window", None),
    "iae": ("Target and window", "IAE",
            "integrated absolute error: area between the measured value and the target "
            "(smaller is closer)", "{out}*s"),
    "lowest": ("Target and window", "Lowest measured value",
               "the lowest valid reading of the run", "{out}"),
    "highest": ("Target and window", "Highest measured value",
                "the highest valid reading of the run", "{out}"),
    "induction_iae_bis_s": ("Anaesthesia (TIVA benchmark)", "Induction IAE",
                            "area between measured BIS and 50 over the induction (0-10 min)",
                            "BIS*s"),
    "induction_sleep_time_min": ("Anaesthesia (TIVA benchmark)", "Time to sleep",
                                 "time until BIS stays below 60 for the rest of the "
                                 "induction", None),
    "induction_settling_time_min": ("Anaesthesia (TIVA benchmark)",
                                    "Induction settling time",
                                    "time until BIS stays within 40-60 for the rest of the "
                                    "induction", None),
    "induction_low_bis_time_s": ("Anaesthesia (TIVA benchmark)", "Time with BIS < 40, induction",
                                 "time with measured BIS below 40 in the first 10 min "
                                 "(too deep)", None),
    "induction_lowest_bis": ("Anaesthesia (TIVA benchmark)", "Lowest BIS, induction",
                             "the lowest measured BIS in the first 10 min", "1"),
    "induction_propofol_mg_per_kg": ("Anaesthesia (TIVA benchmark)", "Propofol, induction",
                                     "propofol given per kg body weight in the first 10 min",
                                     None),
    "induction_remifentanil_ug_per_kg": ("Anaesthesia (TIVA benchmark)",
                                         "Remifentanil, induction",
                                         "remifentanil given per kg body weight in the first "
                                         "10 min", None),
    "maintenance_iae_bis_s": ("Anaesthesia (TIVA benchmark)", "Maintenance IAE",
                              "area between measured BIS and 50 over the maintenance "
                              "(10-20 min)", "BIS*s"),
    "maintenance_time_out_of_range_s": ("Anaesthesia (TIVA benchmark)",
                                        "Time outside 40-60, maintenance",
                                        "time with measured BIS outside 40-60 during the "
                                        "maintenance (10-20 min)", None),
    "maintenance_lowest_bis": ("Anaesthesia (TIVA benchmark)", "Lowest BIS, maintenance",
                               "the lowest measured BIS during the maintenance (10-20 min)",
                               "1"),
    "maintenance_highest_bis": ("Anaesthesia (TIVA benchmark)", "Highest BIS, maintenance",
                                "the highest measured BIS during the maintenance (10-20 min)",
                                "1"),
    "maintenance_propofol_mg_per_kg": ("Anaesthesia (TIVA benchmark)", "Propofol, maintenance",
                                       "propofol given per kg body weight in 10-20 min", None),
    "maintenance_remifentanil_ug_per_kg": ("Anaesthesia (TIVA benchmark)",
                                           "Remifentanil, maintenance",
                                           "remifentanil given per kg body weight in "
                                           "10-20 min", None),
    "auc24_first_mg_h_per_L": ("Exposure", "AUC24, first day",
                               "area under the true concentration curve over the first 24 h",
                               None),
    "auc24_last_mg_h_per_L": ("Exposure", "AUC24, last day",
                              "area under the true concentration curve over the last whole "
                              "24 h", None),
    "auc24_in_target_pct": ("Exposure", "Days with AUC24 in target",
                            f"share of whole days with AUC24 within {_AUC_LOW:g}-{_AUC_HIGH:g} "
                            "mg·h/L", None),
    "auc24_above_target_days": ("Exposure", "Days with AUC24 above target",
                                f"whole days with AUC24 above {_AUC_HIGH:g} mg·h/L", None),
    "auc24_above_600_days": ("Exposure", "Days with AUC24 above 600",
                             "whole days with AUC24 above 600 mg·h/L", None),
    "auc24_above_800_days": ("Toxicity", "Days with AUC24 above 800",
                             "whole days with AUC24 above 800 mg·h/L (kidney injury risk)",
                             None),
    "days_minimum_above_20_mg_per_L": ("Toxicity", "Days with a trough above 20 mg/L",
                                       "whole days whose lowest true concentration is above "
                                       "20 mg/L", None),
    "auc24_in_target_first_day": ("Exposure", "Days to AUC24 in target",
                                "the day of the first AUC24 within the target (1: the first "
                                "day); none if never", None),
    "auc24_days": ("Exposure", "Days scored", "whole 24-h days the AUC24 is scored on", None),
    "auc24_in_target_day1_pct": ("Exposure", "AUC24 in target on day 1",
                                 "100 if day 1's AUC24 is within the target, else 0 (the mean "
                                 "is the share of patients)", None),
    "auc24_in_target_day2_pct": ("Exposure", "AUC24 in target on day 2",
                                 "100 if day 2's AUC24 is within the target, else 0 (the mean "
                                 "is the share of patients)", None),
    "auc24_in_target_days3to7_pct": ("Exposure", "AUC24 in target on days 3-7",
                                     "share of days 3-7 with AUC24 within the target", None),
    "highest_daily_minimum_mg_per_L": ("Exposure", "Highest daily trough",
                                       "the highest of each day's lowest true concentration",
                                       None),
    "anc_nadir_1e9_per_L": ("Toxicity", "ANC nadir",
                            "the lowest true absolute neutrophil count", None),
    "anc_nadir_day": ("Toxicity", "Day of the ANC nadir",
                      "days from the start to the lowest neutrophil count", None),
    "grade4_neutropenia_days": ("Toxicity", "Grade 4 neutropenia",
                                "time with ANC below 0.5 x 10⁹/L (CTCAE v5)", None),
    "grade3plus_neutropenia_days": ("Toxicity", "Grade 3-4 neutropenia",
                                    "time with ANC below 1.0 x 10⁹/L (CTCAE v5)", None),
    "alarms": ("Safety supervisor", "Alarms",
               "alarms raised during the run (any kind)", "count"),
    "fallback_time_s": ("Safety supervisor", "Time in fallback",
                        "time the supervisor held safe rates instead of the controller's",
                        None),
    "solver_failure_time_s": ("Safety supervisor", "Time with a failed solve",
                              "time the optimiser's last solve had failed", None),
    "deadline_misses": ("Safety supervisor", "Missed deadlines",
                        "controller decisions that came too late (real-time runs)", "count"),
    "commands_refused": ("Safety supervisor", "Commands refused by the pumps",
                         "rate commands a pump refused (out of range, wrong unit, pump error)",
                         "count"),
}


def _unit_text(unit: str | None) -> str:
    from ..plotting import unit_label

    if unit is None:
        return "not stated"
    if unit == "count":
        return "count"
    return unit_label(unit)


#: metric names of trial/metrics.py that say the signal they read: ``<base>_<measured|true>
#: [_<unit>]`` or ``<base>_<output>_<measured|true>[_<unit>]``
_SIGNAL_NAME = re.compile(r"(?P<base>iae|min|max|auc|steady_state_deviation|"
                          r"tracking_error_rms)_(?P<output>.+?)_(?P<signal>measured|true)"
                          r"(?:_(?P<unit>.+))?")
_SIGNAL_NAME_UNIT_LAST = re.compile(r"(?P<base>time_in_window|time_below_window|"
                                    r"time_above_window|response_time|settling_time|overshoot|"
                                    r"readings_in_window|readings_below_window|"
                                    r"readings_above_window)"
                                    r"_(?P<signal>measured|true)(?:_(?P<unit>s|pct))?"
                                    r"|(?P<valid>valid_readings)")
#: the table entry each such base is explained by
_SIGNAL_BASES = {"iae": "iae", "min": "lowest", "max": "highest", "auc": "auc",
                 "steady_state_deviation": "steady_state_deviation",
                 "tracking_error_rms": "tracking_error_rms",
                 "time_in_window": "time_in_window_s", "time_below_window": "time_below_window_s",
                 "time_above_window": "time_above_window_s", "response_time": "response_time_s",
                 "settling_time": "settling_time_s", "overshoot": "overshoot_pct",
                 "readings_in_window": "readings_in_window_pct",
                 "readings_below_window": "readings_below_window_pct",
                 "readings_above_window": "readings_above_window_pct"}


def _describe_signal_metric(name: str, signal: re.Match, output: str | None,
                            output_unit: str | None) -> MetricInfo:
    """A metric named by the signal it reads (trial/metrics.py): on the readings at their
    sample times (``measured``) or on the patient's true value (``true``)."""
    from ..plotting import quantity_label
    from ..units import token_to_unit

    base, basis = signal["base"], signal["signal"]
    true = basis == "true"
    named = signal.groupdict().get("output")
    if base in ("iae", "min", "max", "auc"):
        token = signal["unit"] or ""
        end = {"iae": "s", "auc": "h"}.get(base)
        if end:   # the integral's time unit closes the name
            token = "" if token == end else token[:-len(end) - 1] if \
                token.endswith(f"_{end}") else token
        try:
            unit = token_to_unit(token) if token else "1"
        except MpcDoseError:
            unit = output_unit or "1"
        what = quantity_label(named or output or "output")
        source = f"true {what}" if true else f"measured {what} (readings at their sample times)"
        if base == "iae":
            shown = f"{what}·s" if unit == "1" else _unit_text(f"{unit}*s")
            return MetricInfo(name, "IAE" + (" (true value)" if true else " (readings)"),
                              shown, f"integral of |{source} - target| over time",
                              "Target and window")
        if base == "auc":
            head, sep, tail = unit.partition("/")
            shown = f"{what}·h" if unit == "1" else _unit_text(f"{head}*h{sep}{tail}")
            return MetricInfo(name, f"AUC of {what}", shown,
                              f"area under the {source} curve over the whole run", "Exposure")
        word = "Peak" if base == "max" else "Lowest"
        return MetricInfo(name, f"{word} {what}" + ("" if true else " (readings)"),
                          _unit_text(unit) if unit != "1" else "dimensionless",
                          f"the {'highest' if base == 'max' else 'lowest'} {source} of the "
                          f"run", "Exposure" if true else "Target and window")
    unit = output_unit
    if base in ("steady_state_deviation", "tracking_error_rms"):
        try:   # the output's unit closes the name (none: dimensionless)
            unit = token_to_unit(signal["unit"]) if signal["unit"] else "1"
        except MpcDoseError:
            pass
    info = describe_metric(_SIGNAL_BASES[base], named or output, unit)
    if base.startswith("readings_"):
        return replace(info, name=name)
    if true:
        return MetricInfo(name, f"{info.label} (true value)", info.unit,
                          info.explanation.replace("measured", "true").replace(
                              "valid readings", "true values"), info.group, info.factor)
    return MetricInfo(name, f"{info.label} (readings)", info.unit, info.explanation,
                      info.group, info.factor)


#: the glucose set's names (trial/glucose.py): a term and the signal, or a term of the
#: output with its unit
_GLUCOSE_NAME = re.compile(r"(?P<term>tir_70_180|tbr_70|tbr_54|tar_180|tar_250|gmi|lbgi|hbgi|"
                           r"cvga_zone_[a-e])_(?P<signal>true|measured)(?:_pct)?"
                           r"|(?P<vterm>mean|sd|cv|cvga_min|cvga_max)_(?P<output>.+?)_"
                           r"(?P<vsignal>true|measured)_(?P<unit>.+)")
#: the CVGA zones in words (Magni 2008)
_CVGA_MEANING = {"a": "accurate control", "b": "benign deviations",
                 "c": "over-correction", "d": "failure to deal with a low or a high",
                 "e": "erroneous control"}


def _consensus_target(stem: str) -> str:
    from .glucose import CONSENSUS_TARGETS_PCT

    side, value = CONSENSUS_TARGETS_PCT[stem]
    return f"; consensus target {side} {value:g} % (Battelino 2019)"


def _describe_glucose_metric(name: str, match: re.Match) -> MetricInfo:
    """A metric of the glucose set: its meaning, on the patient's blood glucose (``true``)
    or on the CGM's readings (``measured``)."""
    from ..units import token_to_unit

    group = GROUPS[1]
    signal = match["signal"] or match["vsignal"]
    true = signal == "true"
    where = "the true blood glucose over time" if true else "the CGM's valid readings"
    tag = " (blood glucose)" if true else " (CGM)"
    term = match["term"] or match["vterm"]
    ranges = {"tir_70_180": ("Time in range 70-180 mg/dL", "within 70-180 mg/dL "
                             "(3.9-10.0 mmol/L), ends included"),
              "tbr_70": ("Time below 70 mg/dL", "below 70 mg/dL (3.9 mmol/L; includes the "
                         "time below 54)"),
              "tbr_54": ("Time below 54 mg/dL", "below 54 mg/dL (3.0 mmol/L): level 2 "
                         "hypoglycaemia"),
              "tar_180": ("Time above 180 mg/dL", "above 180 mg/dL (10.0 mmol/L; includes "
                          "the time above 250)"),
              "tar_250": ("Time above 250 mg/dL", "above 250 mg/dL (13.9 mmol/L): level 2 "
                          "hyperglycaemia")}
    if term in ranges:
        label, what = ranges[term]
        return MetricInfo(name, label + tag, "%", f"share of {where} {what}"
                          + _consensus_target(term), group)
    if term == "gmi":
        return MetricInfo(name, "Glucose management indicator" + tag, "%",
                          "HbA1c estimated from the mean glucose: 3.31 + 0.02392 x mean "
                          "[mg/dL] (Bergenstal 2018), from " + where, group)
    if term in ("lbgi", "hbgi"):
        low = term == "lbgi"
        return MetricInfo(name, ("Low" if low else "High") + " blood glucose index" + tag,
                          "dimensionless",
                          f"Kovatchev's risk of {'hypo' if low else 'hyper'}glycaemia: the "
                          f"mean of 10 f(BG)² over all values, counting only those "
                          f"{'below' if low else 'above'} 112.5 mg/dL (f "
                          f"{'<' if low else '>'} 0), from " + where, group)
    if term.startswith("cvga_zone_"):
        zone = term[-1]
        return MetricInfo(name, f"CVGA zone {zone.upper()}" + tag, "%",
                          f"100 when the patient's lowest and highest glucose fall in zone "
                          f"{zone.upper()} of the control-variability grid "
                          f"({_CVGA_MEANING[zone]}; Magni 2008), else 0: the mean is the "
                          f"share of patients", group)
    try:
        unit = token_to_unit(match["unit"])
    except MpcDoseError:
        unit = None
    if term == "cv":
        return MetricInfo(name, "Glucose coefficient of variation" + tag, "%",
                          "SD / mean of " + where
                          + "; consensus target <= 36 % (Battelino 2019)", group)
    if term in ("mean", "sd"):
        return MetricInfo(name, ("Mean glucose" if term == "mean" else
                                 "Glucose standard deviation") + tag, _unit_text(unit),
                          ("the mean of " if term == "mean" else "the standard deviation of ")
                          + where, group)
    lowest = term == "cvga_min"
    return MetricInfo(name, f"CVGA {'lowest' if lowest else 'highest'} glucose" + tag,
                      _unit_text(unit),
                      f"the {'lowest' if lowest else 'highest'} of " +
                      where +
                      (" clipped to 50-110 mg/dL (the grid's x axis)" if lowest else
                       " clipped to 110-400 mg/dL (the grid's y axis)"), group)


def describe_metric(name: str, output: str | None = None,
                    output_unit: str | None = None) -> MetricInfo:
    """The label, unit and one-line explanation of the metric *name* (a column of
    ``metrics.csv``). *output* and *output_unit* are the scored output and its unit (for the
    metrics whose name carries none: ``iae``, ``lowest`` ...). Known names are explained
    from a table; the others get a label and, from the name's suffix, a unit."""
    from ..plotting import quantity_label, unit_suffix

    if name == "valid_readings":
        return MetricInfo(name, "Valid readings", "count",
                          "readings of the scored output that were valid", GROUPS[0])
    glucose = _GLUCOSE_NAME.fullmatch(name)
    if glucose:
        return _describe_glucose_metric(name, glucose)
    signal = _SIGNAL_NAME.fullmatch(name) or _SIGNAL_NAME_UNIT_LAST.fullmatch(name)
    if signal and signal["base"] in _SIGNAL_BASES:
        return _describe_signal_metric(name, signal, output, output_unit)
    out_unit = output_unit or "1"
    what = quantity_label(output) if output else "the output"
    if name in _KNOWN:
        group, label, explanation, unit = _KNOWN[name]
        if unit is None:
            unit = unit_suffix(name)[1]
        elif "{out}" in unit:
            if out_unit == "1" and unit == "{out}*s":  # BIS x s: say what was integrated
                return MetricInfo(name, label, f"{what}·s" if output else "s",
                                  explanation.replace("measured value", f"measured {what}"),
                                  group)
            unit = unit.replace("{out}", out_unit)
        if group == "Target and window" and output:
            explanation = explanation.replace("measured value", f"measured {what}")
        if unit == "BIS*s":
            return MetricInfo(name, label, "BIS·s", explanation, group)
        return MetricInfo(name, label, _unit_text(unit), explanation, group)
    if name.startswith("auc_") and name.endswith("_h"):  # auc_<output>_<its unit>_h
        stem, unit = unit_suffix(name[len("auc_"):-len("_h")])
        if unit is not None:
            head, sep, tail = unit.partition("/")
            shown = f"{quantity_label(stem)}·h" if unit == "1" else \
                _unit_text(f"{head}*h{sep}{tail}")
            return MetricInfo(name, f"AUC of {quantity_label(stem)}", shown,
                              f"area under the true {quantity_label(stem)} curve over the "
                              f"whole run", "Exposure")
    match = re.fullmatch(r"max_(?P<rest>.+)", name)
    if match:
        stem, unit = unit_suffix(match["rest"])
        if unit is not None:
            return MetricInfo(name, f"Peak {quantity_label(stem)}", _unit_text(unit),
                              f"the highest true {quantity_label(stem)} of the run",
                              "Exposure")
    match = re.fullmatch(r"(?P<drug>.+?)_(?P<kind>total|per_kg)_(?P<unit>.+)", name)
    if match:
        drug = quantity_label(match["drug"])
        per_kg = match["kind"] == "per_kg"
        from ..units import token_to_unit

        try:
            unit = token_to_unit(match["unit"])
        except MpcDoseError:
            unit = None
        return MetricInfo(name, f"{drug[:1].upper()}{drug[1:]} given" +
                          (" per kg" if per_kg else ""), _unit_text(unit),
                          f"total {drug} delivered over the run"
                          + (" per kg body weight" if per_kg else ""), "Drug given")
    match = re.fullmatch(r"estimate_error_(?P<param>.+)_after_(?P<k>\d+)_readings", name)
    if match:
        return MetricInfo(name, f"Error of the {match['param']} estimate after "
                                f"{match['k']} reading{'s' if match['k'] != '1' else ''}",
                          "dimensionless",
                          f"|estimate / true - 1| of the controller's {match['param']} at "
                          f"its first decision with {match['k']} reading(s) (0.1 = 10 %)",
                          "Estimation")
    stem, unit = unit_suffix(name)
    return MetricInfo(name, quantity_label(stem).capitalize(), _unit_text(unit),
                      "a metric of the trial (no description known)", GROUPS[0])


def in_readable_time_unit(info: MetricInfo, span_s: float) -> MetricInfo:
    """A duration metric in seconds shown in the unit of the run's length: minutes for runs
    under a day (a 20-min anaesthetic: "19.1 min in window", not "1,143 s"), hours beyond;
    any other metric as it is."""
    if info.unit != "s" or span_s < 600.0:
        return info
    unit, seconds = ("min", 60.0) if span_s < 86400.0 else ("h", 3600.0)
    return replace(info, unit=unit, factor=info.factor / seconds)


def format_value(value: float, digits: int = 3) -> str:
    """A number for the page: *digits* significant digits (whole numbers above 1000,
    thousands grouped); ``"n/a"`` when not a number (never ``nan``)."""
    if value is None or not np.isfinite(value):
        return "n/a"
    if value == 0 or abs(value) < 1e-12:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    text = f"{value:.{digits}g}"
    return text if "e" not in text else f"{value:.{digits - 1}e}"


def _median_iqr(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    if format_value(q25) == format_value(q75):
        return format_value(q50)
    return f"{format_value(q50)} [{format_value(q25)}–{format_value(q75)}]"


def _mean_sd(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    if len(values) < 2:
        return f"mean {format_value(values.mean())}"
    return f"mean {format_value(values.mean())} ± {format_value(values.std())}"


# ---------------------------------------------------------------------------------------
# what the trial was: scenario, cohort, controllers, target

def _scenario_of(folder: Path):
    """The trial's scenario (with its overrides) and its manifest; None when the scenario
    file cannot be read any more."""
    manifest_path = folder / "trial.json"
    if not manifest_path.exists():
        return None, {}
    manifest = json.loads(manifest_path.read_text("utf-8"))
    try:
        from ..scenario import load_scenario

        return load_scenario(manifest["scenario"], manifest.get("overrides") or None), manifest
    except (MpcDoseError, OSError, ValueError):
        return None, manifest


def _description(scenario, manifest: dict) -> str:
    """The scenario's description, or else the first sentence of its file's opening
    comment."""
    if scenario.scenario.description:
        return scenario.scenario.description
    try:
        lines = Path(manifest["scenario"]).read_text("utf-8").splitlines()
    except (KeyError, OSError):
        return ""
    words = []
    for line in lines:
        if not line.startswith("#") or not line.strip("# "):
            break
        words.append(line.strip("# "))
    text = " ".join(words)
    end = text.find(". ")
    text = text[:end + 1] if end > 0 else text
    return text.rstrip(".:")


def _duration(seconds: float) -> str:
    """A duration in words: minutes under 2 h, hours under 3 days, days beyond."""
    if seconds >= 3 * 86400:
        return f"{seconds / 86400:.3g} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.3g} h"
    return f"{seconds / 60:.3g} min"


def _period(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    if seconds >= 60:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _controller_text(scenario) -> str:
    """The controller in words: kind, what it measures and learns, how often it decides."""
    from ..plotting import quantity_label

    c = scenario.controller
    every = f"deciding every {_period(c.period_s)}"
    if c.kind == "nomogram" and c.nomogram is not None:
        g = c.nomogram

        def per_kg(name: str) -> str:
            value, unit = g.quantities[name]
            return f"{value:g} {unit.replace('/', ' per ')}"
        adjust = f", a steady-state trough outside {g.trough_low}-{g.trough_high} scales " \
            f"the dose to {g.trough_target}" if g.trough_target is not None else ""
        return (f"a dosing nomogram: {per_kg('loading_dose')} loading, "
                f"{per_kg('maintenance_dose')} at an interval by {g.band_covariate} band"
                f"{adjust}")
    if c.kind == "mipd" and c.mipd is not None:
        g = c.mipd
        learns = ", ".join(g.estimator.parameters) if g.estimator.parameters else \
            "every random effect"
        return (f"Bayesian MIPD: at each dose the MAP estimate of {learns}, then the dose "
                f"for AUC24 {g.auc_target} over the next {_period(g.dose_interval_s)}")
    if c.kind == "pid" and c.pid is not None:
        return f"PID on {quantity_label(c.pid.measured)} (set point {c.pid.setpoint:g}), {every}"
    if c.kind == "fixed" and c.fixed is not None:
        return f"fixed regimen ({Path(c.fixed.doses).name}), no feedback"
    if c.kind == "tci" and c.tci is not None:
        return (f"target-controlled infusion of {c.tci.input} ({c.tci.mode}-site targets of "
                f"{c.tci.target_output}), {every}")
    if c.kind == "python" and c.python is not None:
        return f"Python controller {c.python.target}, {every}"
    if c.kind == "nmpc" and c.nmpc is not None:
        n = c.nmpc
        est = n.estimator
        kind = {"ekf": "an extended Kalman filter", "mhe": "a moving-horizon estimator",
                "map": "a Bayesian MAP estimator", "none": "no estimator"}.get(est.kind or "",
                                                                             "its estimator")
        learns = f" of {', '.join(est.parameters)}" if est.parameters and \
            est.kind != "none" else ""
        return (f"nonlinear MPC of {', '.join(n.input)} on {quantity_label(n.output)} with "
                f"{kind}{learns}, "
                f"{every}, looking {_period(n.horizon * c.period_s)} ahead")
    return f"{c.kind}, {every}"


def _target_text(scenario, output_unit: str | None) -> list[str]:
    """What the trial aims at, in words (from [metrics] and the NMPC's own targets)."""
    from ..plotting import quantity_label, unit_label

    out = []
    m = scenario.metrics
    unit = f" {unit_label(output_unit)}" if output_unit and output_unit != "1" else ""
    if m is not None:
        from .build import metrics_target

        what = quantity_label(m.output)
        target, window = metrics_target(scenario)
        if target is not None or window is not None:
            parts = []
            if target is not None:
                parts.append(f"target {target:g}{unit}")
            if window is not None:
                parts.append(f"acceptable window {window[0]:g}-{window[1]:g}{unit}")
            out.append(f"{what}: {', '.join(parts)} (scored on the measured value)")
        if m.clinical == "auc":
            out.append(f"daily exposure: AUC24 within {_AUC_LOW:g}-{_AUC_HIGH:g} mg·h/L "
                       "(2020 ASHP/IDSA consensus), from the true concentration")
            out.append(PUBLISHED_AUC_ATTAINMENT)
        if m.clinical == "tiva":
            out.append("TIVA benchmark phases: induction 0-10 min, maintenance 10-20 min")
        if m.clinical == "glucose":
            from .glucose import CONSENSUS_TARGETS_PCT

            def aim(stem: str) -> str:
                side, value = CONSENSUS_TARGETS_PCT[stem]
                return f"{side} {value:g} %"
            out.append("glucose: the international consensus targets for most adults with "
                       "diabetes (Battelino 2019): time in range 70-180 mg/dL "
                       f"{aim('tir_70_180')}, below 70 {aim('tbr_70')}, below 54 "
                       f"{aim('tbr_54')}, above 180 {aim('tar_180')}, above 250 "
                       f"{aim('tar_250')}; scored on the CGM readings and on the true blood "
                       "glucose")
    n = scenario.controller.nmpc
    if n is not None:
        aims = []
        if n.reference is not None:
            aims.append(f"{quantity_label(n.output)} {n.reference:g}")
        low, high = n.soft_low, n.soft_high
        bounded = quantity_label(n.window_output or n.output)
        if low is not None and high is not None:
            aims.append(f"{bounded} within {low:g}-{high:g} (soft bounds)")
        elif low is not None:
            aims.append(f"{bounded} above {low:g} (soft lower bound)")
        elif high is not None:
            aims.append(f"{bounded} below {high:g} (soft upper bound)")
        if n.auc_target is not None:
            window = f" (soft {n.auc_soft_low:g}-{n.auc_soft_high:g})" \
                if n.auc_soft_low is not None and n.auc_soft_high is not None else ""
            hours = (n.auc_window_s or 86400) / 3600
            aims.append(f"AUC over each {hours:g} h of {n.auc_target:g}{window}")
        if aims:
            out.append("the NMPC aims at " + "; ".join(aims))
    return out


def _cohort_text(scenario, manifest: dict, folder: Path, n_patients: int) -> str:
    patients = manifest.get("patients") or []
    numbers = f" (numbers {min(patients)}-{max(patients)})" if patients else ""
    text = f"{n_patients} patient{'s' if n_patients != 1 else ''}{numbers}"
    if scenario is None:
        return text
    p = scenario.patient
    if manifest.get("cohort"):
        text += f" from the cohort file {Path(manifest['cohort']).name}"
    elif p.table is not None and p.table.path:
        text += f" from the patient table {Path(p.table.path).name}"
    elif p.population is not None:
        text += f" drawn from the population of the model {p.model}"
    else:
        text += f" of the model {p.model}"
    text += " with between-patient variability" if p.random_effects else ""
    text += f"; seed {manifest.get('seed', scenario.scenario.seed)}"
    from ..plotting import covariate_units, covariate_value, quantity_label

    units = covariate_units(p.model)
    covariates = _covariate_summary(folder, units)
    if covariates:
        text += f". {covariates}"
    for change in scenario.covariate_change:
        when = f"from {_duration(change.time_s)} on" if change.time_s is not None else \
            f"at a time between {_duration(change.time_range_s[0])} and " \
            f"{_duration(change.time_range_s[1])}"
        chance = "" if change.probability == 1 else \
            f"in {change.probability:.0%} of patients, "
        what = [f"{quantity_label(k)} {covariate_value(v, units.get(k))}"
                for k, v in change.covariates.items()]
        what += [f"{quantity_label(k)} x {f:g}" for k, f in change.scale.items()]
        text += f". {(chance + when).capitalize()}: " + ", ".join(what)
    return text


def _covariate_summary(folder: Path, units: dict[str, str]) -> str:
    """``"age 50 (19-83) y, weight 70 (48-102) kg, sex: 3 female, 3 male"``: the median and
    range of the cohort's covariates, the counts of the categorical ones."""
    values: dict[str, list] = {}
    for path in sorted((folder / "patients").glob("patient_*.json")):
        for key, value in json.loads(path.read_text("utf-8")).get("covariates", {}).items():
            values.setdefault(key, []).append(value)
    if not values:
        return ""
    from ..plotting import quantity_label, unit_label

    parts = []
    for key, seen in values.items():
        if all(isinstance(v, (int, float)) for v in seen):
            unit = units.get(key, "1")
            shown = f" {unit_label(unit)}" if unit not in ("1", "") else ""
            low, mid, high = np.min(seen), np.median(seen), np.max(seen)
            parts.append(f"{quantity_label(key)} {mid:.3g}{shown} ({low:.3g}-{high:.3g})"
                         if low != high else f"{quantity_label(key)} {mid:.3g}{shown}")
        else:
            counts = pd.Series([str(v) for v in seen]).value_counts()
            parts.append(f"{quantity_label(key)}: " + ", ".join(f"{n} {v}" for v, n in
                                                                 counts.items()))
    return "Covariates, median (range): " + "; ".join(parts)


# ---------------------------------------------------------------------------------------
# figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class _Target:
    """The scored output and what it aims at (for the figures)."""

    output: str | None = None
    unit: str | None = None
    target: float | None = None
    window: tuple[float, float] | None = None
    auc_window: tuple[float, float] | None = None


def _target_of(scenario, first: pd.DataFrame) -> _Target:
    from ..plotting import parse_column

    output = scenario.metrics.output if scenario is not None and scenario.metrics else None
    if output is None:
        measured = [parse_column(c) for c in first.columns if c.startswith("measured_")]
        trues = {parse_column(c).name for c in first.columns if c.startswith("true_")}
        output = next((m.name for m in measured if m.name in trues), None)
    unit = next((parse_column(c).unit for c in first.columns
                 if c.startswith("true_") and parse_column(c).name == output), None)
    if scenario is None or scenario.metrics is None:
        return _Target(output, unit)
    m = scenario.metrics
    auc = auc24_consensus_window() if m.clinical == "auc" else None
    n = scenario.controller.nmpc
    if n is not None and n.auc_soft_low is not None and n.auc_soft_high is not None:
        auc = (n.auc_soft_low, n.auc_soft_high)
    from .build import metrics_target

    return _Target(output, unit, *metrics_target(scenario), auc)


def _shown_series(frame: pd.DataFrame, target: _Target) -> tuple[str, str] | None:
    """(column, what) of the scored output over time: the measured value when it is read
    often (every reading shown), the true value for sparse levels."""
    from ..plotting import parse_column

    parsed = {c: parse_column(c) for c in frame.columns}
    true = next((c for c, p in parsed.items() if p.kind == "true" and p.name == target.output),
                None)
    measured = [c for c, p in parsed.items() if p.kind == "measured"]
    one = frame[frame.patient == frame.patient.iloc[0]]
    for column in measured:
        readings = one[column].dropna()
        fresh = readings.diff().ne(0).mean() if len(readings) > 1 else 0.0  # not held
        if parsed[column].unit == (parsed[true].unit if true else None) and \
                len(readings) > 0.5 * len(one) and fresh > 0.2:
            return column, "measured"
    if true is not None:
        return true, "true"
    return (measured[0], "measured") if measured else None


def _band(ax, target: _Target) -> None:
    if target.window is not None:
        ax.axhspan(*target.window, color="tab:green", alpha=0.13, lw=0, zorder=0,
                   label=f"window {target.window[0]:g}-{target.window[1]:g}")
    if target.target is not None:
        ax.axhline(target.target, color="tab:green", ls="--", lw=1.0,
                   label=f"target {target.target:g}")


def _ensemble_figure(series: dict[str, pd.DataFrame], column: str, ylabel: str,
                     target: _Target | None = None, cumulative: bool = False):
    """Median and 25-75 % / 5-95 % bands over the patients of each trial."""
    from ..plotting import time_axis, time_ticks

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.6), layout="constrained")
    scale, t_label = time_axis(next(iter(series.values())).time_s.unique())
    for label, frame in series.items():
        wide = frame.pivot(index="time_s", columns="patient", values=column)
        t = wide.index.to_numpy()
        values = wide.to_numpy(dtype=float)
        if cumulative:  # the amount given so far (rates held to the next record)
            dt = np.diff(t, append=t[-1])[:, None]
            values = np.cumsum(np.nan_to_num(values) * dt, axis=0) - \
                np.nan_to_num(values) * dt
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN times (no reading)
            q = np.nanpercentile(values, [5, 25, 50, 75, 95], axis=1)
        line, = ax.plot(t / scale, q[2], lw=1.4, label=f"{label}: median")
        ax.fill_between(t / scale, q[1], q[3], color=line.get_color(), alpha=0.3, lw=0,
                        label=f"{label}: 25-75 %")
        ax.fill_between(t / scale, q[0], q[4], color=line.get_color(), alpha=0.12, lw=0,
                        label=f"{label}: 5-95 %")
    if target is not None:
        _band(ax, target)
    ax.set_xlabel(t_label.replace("time", "time since start"))
    ax.set_ylabel(ylabel)
    ax.set_xlim(t[0] / scale, t[-1] / scale)
    time_ticks(ax, scale)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def _small_multiples_figure(frame: pd.DataFrame, column: str, what: str, target: _Target,
                            samples: pd.DataFrame | None = None, n: int = 12):
    """One small panel per patient (the first *n*); the patient's number inside the panel,
    so no title can run into its neighbour's."""
    from ..plotting import parse_column, quantity_label, time_axis, time_ticks, unit_label

    plt = _pyplot()
    patients = sorted(frame.patient.unique())[:n]
    cols = 4
    rows = -(-len(patients) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 1.9 * rows + 0.7), sharex=True,
                             sharey=True, squeeze=False, layout="constrained")
    scale, t_label = time_axis(frame.time_s.unique())
    for ax, k in zip(axes.ravel(), patients):
        one = frame[frame.patient == k]
        ax.plot(one.time_s / scale, one[column], lw=0.8, color="k" if what == "true" else
                "tab:purple")
        if samples is not None and len(samples):
            mine = samples[(samples.patient == k) & (samples.quality == "valid")]
            ax.plot(mine.t_meas_s / scale, mine.value, "o", ms=3.5, color="tab:purple",
                    mec="k", mew=0.4)
        if target.window is not None:
            ax.axhspan(*target.window, color="tab:green", alpha=0.13, lw=0, zorder=0)
        if target.target is not None:
            ax.axhline(target.target, color="tab:green", ls="--", lw=0.8)
        ax.text(0.97, 0.93, f"patient {k}", transform=ax.transAxes, ha="right", va="top",
                fontsize=8, bbox={"facecolor": "w", "edgecolor": "none", "alpha": 0.7,
                                  "pad": 1})
        ax.tick_params(labelsize=8)
        ax.set_xlim(one.time_s.min() / scale, one.time_s.max() / scale)
        time_ticks(ax, scale)
    for ax in axes.ravel()[len(patients):]:
        ax.axis("off")
    parsed = parse_column(column)
    unit = unit_label(parsed.unit)
    fig.supxlabel(t_label.replace("time", "time since start"), fontsize=9)
    fig.supylabel(f"{quantity_label(parsed.name)}, {what}"
                  + (f" [{unit}]" if unit and unit != "dimensionless" else ""), fontsize=9)
    return fig


def _distributions_figure(metrics: dict[str, pd.DataFrame], infos: list[MetricInfo]):
    """One horizontal box plot per metric, one box per trial (colours in the legend); the
    metric's label and unit above each panel, wrapped to the panel's width."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    cols = 3
    rows = -(-len(infos) // cols)
    labels = list(metrics)
    height = 0.32 * len(labels) + 1.25
    fig, axes = plt.subplots(rows, cols, figsize=(11, height * rows + 0.6), squeeze=False,
                             layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, info in zip(axes.ravel(), infos):
        data = [info.values(m).dropna().to_numpy() for m in metrics.values()]
        positions = np.arange(len(labels), 0, -1)
        parts = ax.boxplot([d if d.size else [np.nan] for d in data], positions=positions,
                           orientation="horizontal", widths=0.6, patch_artist=True,
                           showfliers=True, flierprops={"markersize": 3},
                           medianprops={"color": "k", "lw": 1.5})
        for box, color in zip(parts["boxes"], colors):
            box.set_facecolor(color)
            box.set_alpha(0.55)
        ax.set_yticks([])
        ax.set_ylim(0.4, len(labels) + 0.6)
        ax.set_title("\n".join(textwrap.wrap(info.heading, 34)), fontsize=8.5)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.tick_params(labelsize=7.5)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes.ravel()[len(infos):]:
        ax.axis("off")
    if len(labels) > 1:
        from matplotlib.patches import Patch

        fig.legend([Patch(facecolor=c, alpha=0.55) for c in colors[:len(labels)]],
                   labels, loc="outside upper center", ncols=len(labels), fontsize=9,
                   frameon=False)
    return fig


def _daily_auc_figure(series: dict[str, pd.DataFrame], column: str, window, unit: str):
    """Box plots of each whole day's AUC24 of the true concentration, per trial."""
    from ..plotting import unit_label

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.4), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = list(series)
    width = 0.8 / len(labels)
    days = 0
    for j, (label, frame) in enumerate(series.items()):
        per_day: dict[int, list[float]] = {}
        for _, one in frame.groupby("patient"):
            t = one.time_s.to_numpy(dtype=float)
            c = one[column].to_numpy(dtype=float)
            for d in range(int((t[-1] - t[0]) // 86400)):
                inside = (t >= t[0] + d * 86400) & (t <= t[0] + (d + 1) * 86400)
                per_day.setdefault(d, []).append(float(np.trapezoid(c[inside],
                                                                    t[inside] / 3600)))
        days = max(days, len(per_day))
        positions = [d + 1 + (j - (len(labels) - 1) / 2) * width for d in per_day]
        parts = ax.boxplot(list(per_day.values()), positions=positions, widths=width * 0.85,
                           patch_artist=True, flierprops={"markersize": 3},
                           medianprops={"color": "k", "lw": 1.5}, manage_ticks=False)
        for box in parts["boxes"]:
            box.set_facecolor(colors[j % len(colors)])
            box.set_alpha(0.55)
        ax.plot([], [], "s", color=colors[j % len(colors)], alpha=0.55, label=label)
    if window is not None:
        ax.axhspan(*window, color="tab:green", alpha=0.13, lw=0, zorder=0,
                   label=f"target window {window[0]:g}-{window[1]:g}")
    ax.set_xticks(range(1, days + 1), [f"day {d}" for d in range(1, days + 1)])
    head, sep, tail = unit.partition("/")
    ax.set_ylabel(f"AUC24 [{unit_label(f'{head}*h{sep}{tail}')}]")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


#: [min] the clock bins of the daily glucose profile (the AGP draws percentiles over the
#: 24-h clock; 15 min keeps a week of 5-min readings at 3 per bin, day and patient)
DAILY_PROFILE_BIN_MIN = 15.0


def daily_profile(time_s, glucose, start_clock_h: float | None,
                  bin_min: float = DAILY_PROFILE_BIN_MIN) -> tuple[np.ndarray, np.ndarray]:
    """(clock [h] at the middle of each *bin_min* bin of the 24-h clock, the 5, 25, 50, 75
    and 95th percentiles of *glucose* in each bin, shape 5 x bins), pooled over every day
    and patient in the values given; a bin without values is NaN."""
    from .glucose import clock_hours

    clock = clock_hours(time_s, start_clock_h)
    values = np.asarray(glucose, dtype=float)
    n_bins = int(round(24 * 60 / bin_min))
    which = np.minimum((clock * 60 / bin_min).astype(int), n_bins - 1)
    q = np.full((5, n_bins), np.nan)
    for k in range(n_bins):
        here = values[(which == k) & np.isfinite(values)]
        if here.size:
            q[:, k] = np.percentile(here, [5, 25, 50, 75, 95])
    return (np.arange(n_bins) + 0.5) * bin_min / 60, q


def _daily_profile_figure(series: dict[str, pd.DataFrame], column: str, unit: str,
                          start_clock_h: float | None):
    """The glucose of each trial over the 24-h clock, pooled over days and patients:
    median, 25-75 % and 5-95 % bands, the range 70-180 mg/dL shaded; one panel per trial."""
    from ..plotting import unit_label
    from .glucose import glucose_in_mg_per_dL

    plt = _pyplot()
    fig, axes = plt.subplots(len(series), 1, figsize=(11, 2.6 * len(series) + 0.6),
                             sharex=True, sharey=True, squeeze=False, layout="constrained")
    per_mg_per_dL = 1.0 / float(glucose_in_mg_per_dL(1.0, unit))
    low, high = 70.0 * per_mg_per_dL, 180.0 * per_mg_per_dL
    for ax, (label, frame) in zip(axes[:, 0], series.items()):
        hours, q = daily_profile(frame.time_s, frame[column], start_clock_h)
        ax.axhspan(low, high, color="tab:green", alpha=0.13, lw=0, zorder=0,
                   label="range 70-180 mg/dL" if unit == "mg/dL" else
                   f"range {low:.3g}-{high:.3g} {unit_label(unit)} (70-180 mg/dL)")
        ax.fill_between(hours, q[0], q[4], color="tab:blue", alpha=0.15, lw=0,
                        label="5-95 %")
        ax.fill_between(hours, q[1], q[3], color="tab:blue", alpha=0.35, lw=0,
                        label="25-75 %")
        ax.plot(hours, q[2], color="tab:blue", lw=1.6, label="median")
        ax.text(0.01, 0.95, label, transform=ax.transAxes, ha="left", va="top", fontsize=9,
                bbox={"facecolor": "w", "edgecolor": "none", "alpha": 0.8, "pad": 1})
        ax.set_ylabel(f"glucose [{unit_label(unit)}]")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      frameon=False)
    ax = axes[-1, 0]
    ax.set_xlim(0, 24)
    ax.set_xticks(range(0, 25, 3), [f"{h:02d}:00" for h in range(0, 25, 3)])
    ax.set_xlabel("clock time" + ("" if start_clock_h is not None else
                                  " (the scenario states no start time: t = 0 at 00:00)"))
    return fig


def cvga_figure(points: dict[str, tuple[np.ndarray, np.ndarray]]):
    """The control-variability grid (Magni 2008): one dot per patient at (lowest, highest)
    glucose [mg/dL], clipped to the grid, per trial (*points*: label -> (x, y)); the zones
    shaded and named, the counts per zone letter in the legend."""
    from .glucose import (CVGA_GRID, CVGA_MAX_AXIS_MG_PER_DL, CVGA_MIN_AXIS_MG_PER_DL,
                          CVGA_ZONES, cvga_zone)

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.6), layout="constrained")
    xs, ys = CVGA_MIN_AXIS_MG_PER_DL, CVGA_MAX_AXIS_MG_PER_DL
    shade = {"A": "#2ca02c", "B": "#98df8a", "C": "#ffdd57", "D": "#ff9f4a", "E": "#e8493f"}
    for row in range(3):
        for col in range(3):
            zone = CVGA_GRID[row][col]
            ax.add_patch(plt.Rectangle((xs[col + 1], ys[row]), xs[col] - xs[col + 1],
                                       ys[row + 1] - ys[row], color=shade[zone[-1]],
                                       alpha=0.35, lw=0, zorder=0))
            ax.text(xs[col] - 1.5, ys[row + 1] - 6, zone, ha="left", va="top", fontsize=9,
                    color="0.25")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    for k, (label, (x, y)) in enumerate(points.items()):
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        counts = pd.Series([cvga_zone(a, b)[-1] for a, b in zip(x[ok], y[ok])]).value_counts()
        tally = ", ".join(f"{z} {int(counts.get(z, 0))}" for z in CVGA_ZONES)
        ax.plot(x[ok], y[ok], markers[k % len(markers)], color=colors[k % len(colors)],
                mec="k", mew=0.5, ms=6, alpha=0.85, ls="none", label=f"{label} ({tally})",
                clip_on=False)   # a clipped point sits on the grid's edge: draw it whole
    ax.set_xlim(xs[0], xs[-1])   # inverted: the lowest glucose falls to the right
    ax.set_ylim(ys[0], ys[-1])
    ax.set_xticks(xs, [f">{xs[0]:g}", f"{xs[1]:g}", f"{xs[2]:g}", f"<{xs[3]:g}"])
    ax.set_yticks(ys, [f"<{ys[0]:g}", f"{ys[1]:g}", f"{ys[2]:g}", f">{ys[3]:g}"])
    ax.set_xlabel("lowest glucose [mg/dL]")
    ax.set_ylabel("highest glucose [mg/dL]")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False,
              ncols=1)
    return fig


def _glucose_section(folders: dict[str, Path], metrics: dict[str, pd.DataFrame],
                     series: dict[str, pd.DataFrame], target: "_Target",
                     start_clock_h: float | None) -> list[str]:
    """The glucose set's figures: the daily profile, the CVGA and its zone counts."""
    from ..plotting import parse_column
    from .glucose import CVGA_ZONES

    parts = []
    first = next(iter(series.values()))
    true = next((c for c in first.columns if c.startswith("true_")
                 and parse_column(c).name == target.output), None)
    if true is not None:
        unit = parse_column(true).unit or "mg/dL"
        parts += ["<h2>Daily glucose profile</h2>",
                  "<p>The patients' true blood glucose over the 24-h clock, pooled over every "
                  "day and patient: median, 25-75 % and 5-95 % in "
                  f"{DAILY_PROFILE_BIN_MIN:g}-min bins of the clock; green: the target range "
                  "70-180 mg/dL.</p>",
                  _img(_daily_profile_figure(series, true, unit, start_clock_h),
                       "daily glucose profile")]
    output = target.output
    rows = []
    points = {}
    for label, m in metrics.items():
        for signal, what in (("true", "blood glucose"), ("measured", "CGM")):
            columns = [f"cvga_zone_{z.lower()}_{signal}_pct" for z in CVGA_ZONES]
            if not all(c in m for c in columns):
                continue
            counts = [int((m[c] == 100.0).sum()) for c in columns]
            cells = "".join(f'<td class="num">{n} ({n / max(len(m), 1):.0%})</td>'
                            for n in counts)
            rows.append(f"<tr><td>{html.escape(label)}</td><td>{what}</td>{cells}</tr>")
        x, y = (f"cvga_{e}_{output}_true_mg_per_dL" for e in ("min", "max"))
        if x in m and y in m:
            points[label] = (m[x].to_numpy(), m[y].to_numpy())
    if points:
        parts += ["<h2>Control-variability grid (CVGA)</h2>",
                  "<p>One dot per patient" + (" and controller" if len(points) > 1 else "")
                  + ": the lowest (x, to the right) and highest (y) true blood glucose of "
                  "the run, clipped to the grid (Magni et al. 2008). A: accurate control; "
                  "B: benign deviations; C: over-correction; D: failure to deal with a low "
                  "or a high; E: erroneous control. The counts per zone are in the legend.</p>",
                  _img(cvga_figure(points), "control-variability grid")]
    if rows:
        head = "<tr><th>trial</th><th>from</th>" + "".join(
            f"<th>zone {z}</th>" for z in CVGA_ZONES) + "</tr>"
        parts += ["<p>Patients per CVGA zone (number and share), from the true blood glucose "
                  "and from the CGM readings:</p>",
                  f'<div class="scroll"><table class="metrics">{head}{"".join(rows)}'
                  "</table></div>"]
    return parts


# ---------------------------------------------------------------------------------------
# the page

_HEADLINE = ("time_in_window_measured_s", "time_in_window_true_s",
             "readings_in_window_measured_pct", "induction_sleep_time_min",
             "time_below_window_measured_s",
             "maintenance_time_out_of_range_s", "auc24_in_target_day1_pct",
             "auc24_in_target_day2_pct", "auc24_in_target_days3to7_pct",
             "auc24_above_800_days", "auc24_in_target_pct", "auc24_first_mg_h_per_L",
             "auc24_last_mg_h_per_L", "highest_daily_minimum_mg_per_L", "anc_nadir_1e9_per_L",
             "grade4_neutropenia_days", "settling_time_measured_s", "overshoot_measured_pct",
             "auc_*", "max_*",
             "*_per_kg_*", "*_total_*", "fallback_time_s", "alarms")
#: exposure over the whole run says little where a target was held or daily AUCs scored
_HEADLINE_INSTEAD_OF_EXPOSURE = ("time_in_window_measured_s", "time_in_window_true_s",
                                 "readings_in_window_measured_pct", "auc24_in_target_pct")


#: what published practice attains, for the reader to set the AUC24 figures against
#: (the sources: ../shared/reference/therapy-and-device-anchors.md 1(b))
PUBLISHED_AUC_ATTAINMENT = (
    "published attainment in the first 48 h, for comparison: standard or nomogram dosing "
    "about 33-57 % (troughs or AUC in range: Wesner 2013 44 % vs 33 %; Thalakada 2012 56 %; "
    "Leroux 2019 57 %), Bayesian MIPD about 74-85 % (Neely 2018 74-82 %; Leroux 2019 85 %)")


#: the summary of a glucose trial: the consensus metrics on the CGM (as clinical trials
#: report them), time in range of the blood glucose, the insulin given
_HEADLINE_GLUCOSE = ("tir_70_180_measured_pct", "tir_70_180_true_pct", "tbr_70_measured_pct",
                     "tbr_54_measured_pct", "tar_180_measured_pct", "tar_250_measured_pct",
                     "mean_*_measured_*", "gmi_measured_pct", "cv_*_measured_pct",
                     "*_per_kg_*", "*_total_*", "fallback_time_s")


def headline_metrics(names: list[str], limit: int = 10) -> list[str]:
    """The few metrics the summary shows, in the order of :data:`_HEADLINE` (of
    :data:`_HEADLINE_GLUCOSE` for a glucose trial): how well the target was held, exposure,
    drug given, safety."""
    import fnmatch

    if "tir_70_180_true_pct" in names:
        chosen = []
        per_kg = any(fnmatch.fnmatch(n, "*_per_kg_*") for n in names)
        for pattern in _HEADLINE_GLUCOSE:
            if pattern == "*_total_*" and per_kg:
                continue
            for name in names:
                if fnmatch.fnmatch(name, pattern) and name not in chosen:
                    chosen.append(name)
        return chosen[:limit]
    chosen: list[str] = []
    per_kg = any(fnmatch.fnmatch(n, "*_per_kg_*") for n in names)
    daily = any(n in names for n in _HEADLINE_INSTEAD_OF_EXPOSURE)
    for pattern in _HEADLINE:
        if pattern == "*_total_*" and per_kg or pattern in ("auc_*", "max_*") and daily:
            continue  # per kg says more than the total; AUC24 more than the whole run's
        for name in names:
            phase = name.startswith(("induction_", "maintenance_")) and name != pattern
            if fnmatch.fnmatch(name, pattern) and not phase and name not in chosen:
                chosen.append(name)
    return chosen[:limit]


def _metric_table(metrics: dict[str, pd.DataFrame], infos: list[MetricInfo],
                  grouped: bool) -> str:
    """An HTML table: metric, unit, meaning, then median [IQR] and mean ± sd per trial."""
    labels = list(metrics)
    head = "<tr><th>metric</th><th>unit</th><th>what it measures</th>" + "".join(
        f"<th>{html.escape(label)}<br><small>median [IQR]<br>mean ± sd</small></th>"
        for label in labels) + "</tr>"
    rows = []
    group = None
    for info in infos:
        if grouped and info.group != group:
            group = info.group
            rows.append(f'<tr class="group"><th colspan="{3 + len(labels)}">'
                        f"{html.escape(group)}</th></tr>")
        cells = "".join(f'<td class="num">{html.escape(_median_iqr(info.values(m)))}<br>'
                        f'<small>{html.escape(_mean_sd(info.values(m)))}</small></td>'
                        for m in metrics.values())
        rows.append(f'<tr><td class="name" title="{html.escape(info.name)}">'
                    f"{html.escape(info.label)}</td><td>{html.escape(info.unit)}</td>"
                    f'<td class="text">{html.escape(info.explanation)}</td>{cells}</tr>')
    return f'<div class="scroll"><table class="metrics">{head}{"".join(rows)}</table></div>'


def _img(fig, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{_png(fig)}">'


def write_report(results: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (plots embedded as PNG, readable offline) for a trial or a
    comparison folder; returns its path.

    The page opens with a summary (scenario, cohort, controllers, target, headline metrics
    with units), then the scored output and the drug given over time (median and
    percentile bands), the first patients one by one, every metric with its unit and
    meaning, and the metrics' distributions.
    """
    from ..plotting import parse_column, quantity_label, unit_label

    results = Path(results)
    folders = _trial_folders(results)
    metrics = {label: pd.read_csv(f / "metrics.csv") for label, f in folders.items()}
    series = {label: load_series(f) for label, f in folders.items()}
    scenarios = {label: _scenario_of(f) for label, f in folders.items()}
    comparison = len(folders) > 1
    first_label = next(iter(folders))
    scenario, manifest = scenarios[first_label]
    if not comparison and scenario is not None:  # a trial is named by its scenario
        label = scenario.scenario.name
        folders, metrics, series, scenarios = ({label: d[first_label]} for d in
                                               (folders, metrics, series, scenarios))
        first_label = label
    first = series[first_label]
    target = _target_of(scenario, first)

    names = [c for c in metrics[first_label].select_dtypes("number").columns
             if c != "patient" and all(c in m for m in metrics.values())]
    span_s = float(first.time_s.max() - first.time_s.min())
    infos = [in_readable_time_unit(describe_metric(n, target.output, target.unit), span_s)
             for n in names]
    order = {g: k for k, g in enumerate(GROUPS)}
    infos_grouped = sorted(infos, key=lambda i: order.get(i.group, len(GROUPS)))
    headline = [i for n in headline_metrics(names) for i in infos if i.name == n]

    # the summary
    title = ("Controller comparison: " + " vs ".join(folders) if comparison
             else f"Trial report: {first_label}")
    described = []
    for label, (sc, sc_manifest) in scenarios.items():
        text = _description(sc, sc_manifest) if sc is not None else \
            "its scenario file could not be read; described from the results only"
        described.append(f"<b>{html.escape(label)}</b>" + (f": {html.escape(text)}" if text
                                                           else ""))
    duration = f" Each run lasts {_duration(scenario.scenario.duration_s)}." \
        if scenario is not None else ""
    summary = [f"<p><b>Scenario{'s' if comparison else ''}:</b> {'; '.join(described)}."
               f"{duration}</p>"]
    n_patients = len(metrics[first_label])
    cohort = _cohort_text(scenario, manifest, folders[first_label], n_patients)
    summary.append(f"<p><b>Patients:</b> {html.escape(cohort)}."
                   + (" Every controller met the same patients, measurement noise and "
                      "disturbances (common random numbers)." if comparison else "") + "</p>")
    controllers = [f"<li><b>{html.escape(label)}</b>: {html.escape(_controller_text(sc))}"
                   "</li>" for label, (sc, _) in scenarios.items() if sc is not None]
    if controllers:
        summary.append("<p><b>Controller" + ("s" if comparison else "") + ":</b></p><ul>"
                       + "".join(controllers) + "</ul>")
    aims = []
    for label, (sc, _) in scenarios.items():
        for line in (_target_text(sc, target.unit) if sc is not None else []):
            if line.startswith("the NMPC") and comparison:
                line = f"{label}: {line}"
            if line not in aims:
                aims.append(line)
    summary.append("<p><b>Target:</b> " + (html.escape("; ".join(aims)) + "." if aims else
                   "the scenario states none; the report shows exposure and the drug "
                   "given.") + "</p>")
    summary.append("<p><b>Headline results</b> (median [interquartile range] and mean ± sd "
                   "over the patients):</p>" + _metric_table(metrics, headline, False))

    parts = [f"<h1>{html.escape(title)}</h1>",
             '<div class="summary">' + "\n".join(summary) + "</div>"]

    # over time
    shown = _shown_series(first, target)
    if shown is not None:
        column, what = shown
        parsed = parse_column(column)
        unit = unit_label(parsed.unit)
        ylabel = f"{quantity_label(parsed.name)}, {what}" + (
            f" [{unit}]" if unit and unit != "dimensionless" else "")
        heading = quantity_label(parsed.name)
        parts += [f"<h2>{html.escape(heading[:1].upper() + heading[1:])} over time</h2>",
                  f"<p>The {what} value of every patient: median, 25-75 % and 5-95 % of the "
                  "patients at each time" + (", with the target and window" if
                                             target.window or target.target else "")
                  + ".</p>",
                  _img(_ensemble_figure(series, column, ylabel, target), ylabel)]
    if target.auc_window is not None and target.output is not None:
        true = next((c for c in first.columns if c.startswith("true_")
                     and parse_column(c).name == target.output), None)
        if true is not None and first.time_s.max() >= 86400:
            parts += ["<h2>Daily exposure (AUC24)</h2>",
                      "<p>The AUC of the true concentration over each whole day, by day; "
                      "green: the target window.</p>",
                      _img(_daily_auc_figure(series, true, target.auc_window,
                                             target.unit or "1"), "AUC24 by day")]
    if "tir_70_180_true_pct" in names:
        clock = scenario.scenario.start_clock_h if scenario is not None else None
        parts += _glucose_section(folders, metrics, series, target, clock)
    for column in [c for c in first.columns if c.startswith("delivered_")]:
        parsed = parse_column(column)
        drug = quantity_label(parsed.name.removesuffix("_rate"))
        # the amount given so far, not the rate: a bolus or a pulsed rate would hide the
        # rest of the run on a rate axis, and the ensemble median of pulses means nothing
        amount = (parsed.unit or "").rpartition("/")[0]
        ylabel = f"{drug} given so far [{unit_label(amount)}]"
        fig = _ensemble_figure(series, column, ylabel, cumulative=True)
        text = (f"The cumulative amount of {drug} delivered to each patient (the totals are "
                "in the table below).")
        parts += [f"<h2>{html.escape(drug.capitalize())} given</h2>",
                  f"<p>{html.escape(text)}</p>", _img(fig, ylabel)]
    if shown is not None:
        for label, frame in series.items():
            samples = None
            if shown[1] == "true":
                files = sorted((folders[label] / "samples").glob("patient_*.parquet"))
                if files:
                    samples = pd.concat([pd.read_parquet(f).assign(
                        patient=int(f.stem.split("_")[1])) for f in files], ignore_index=True)
            n_shown = min(12, frame.patient.nunique())
            parts += [f"<h2>{html.escape(label)}: the first {n_shown} patients one by one"
                      "</h2>",
                      "<p>" + ("Line: the true value; dots: the levels measured, at their "
                               "sample times." if samples is not None else
                               f"The {shown[1]} value.") + "</p>",
                      _img(_small_multiples_figure(frame, shown[0], shown[1], target,
                                                   samples), f"{label}: patients")]

    # every metric
    parts += ["<h2>All metrics</h2>",
              "<p>Per patient, summarised over the cohort. Hover over a metric for its column "
              "name in <code>metrics.csv</code>; n/a: not defined for any patient (e.g. a "
              "settling time when the output ends outside the window).</p>",
              _metric_table(metrics, infos_grouped, True)]
    varying = [i for i in infos_grouped
               if any(m[i.name].dropna().nunique() > 1 for m in metrics.values())]
    constant = [i for i in infos_grouped if i not in varying]
    if varying:
        parts += ["<h2>Metric distributions</h2>",
                  "<p>One box per " + ("controller" if comparison else "trial") +
                  ": median, quartiles, whiskers to 1.5 IQR, points beyond.</p>",
                  _img(_distributions_figure(metrics, varying[:30]), "metric distributions")]
    if constant:
        same = []
        for info in constant:
            values = [format_value(info.values(m).dropna().iloc[0])
                      if m[info.name].notna().any()
                      else "n/a" for m in metrics.values()]
            unit = f" {info.unit}" if info.unit not in ("dimensionless", "count") else ""
            same.append(f"{info.label}: {' / '.join(values)}{unit}")
        parts.append("<p>The same for every patient" + (" (per controller)" if comparison
                                                         else "") + ", so not drawn: "
                     + html.escape("; ".join(same)) + ".</p>")
    path = Path(out) if out else results / "report.html"
    path.write_text(html_page(parts, title), encoding="utf-8")
    return path


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:auto;
padding:0 16px 40px;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-top:.8em}h2{font-size:1.25em;margin-top:1.6em;
border-bottom:1px solid #ddd;padding-bottom:2px}
.summary{background:#f5f8fb;border:1px solid #d5e0ea;border-radius:6px;padding:4px 16px 10px}
.summary p{margin:.5em 0}.summary ul{margin:.2em 0 .5em}
.scroll{overflow-x:auto;max-width:100%;border:1px solid #e3e3e3;border-radius:4px;
margin:.5em 0}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 7px;vertical-align:top}
th{background:#f3f3f3;text-align:left}
td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
td.name{white-space:nowrap;font-weight:600}
td.text{min-width:16em;color:#444}
tr.group th{background:#e8eef4}
img{max-width:100%;height:auto}
small{font-weight:normal;color:#555}
"""


def html_page(parts: list[str], title: str = "mpc_dose report") -> str:
    """A self-contained HTML page of *parts* (HTML fragments; images embedded)."""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body>" + "\n".join(parts)
            + "</body></html>")


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
