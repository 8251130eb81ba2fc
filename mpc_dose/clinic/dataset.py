"""One patient's history (doses, drug levels, covariates) read from a CSV, in either of two
layouts, checked against the model it is meant for.

**Dosing-table layout** (the columns of :mod:`mpc_dose.scenario.dosing_table`, units in the
names) with observation rows::

    time_h,input,amount_mg,duration_h,evid,dv_mg_per_L,crcl,weight,dialysis
    0,vancomycin,2000,2,1,,65,70,no
    13,,,,0,12.0,,,

``evid`` 1 is a dose, 0 a level (without an ``evid`` column a row with an amount or rate is a
dose, one with a ``dv`` value a level); ``dv_<unit>`` is the level in any unit convertible to
the model output's; ``blq`` (0/1) flags a level below the limit of quantification (its
``dv``, or ``--lloq`` when blank, is the limit); ``occasion`` numbers occasions (a new value
starts one); every other column is a covariate named as the model declares it, optionally
with a unit suffix (``weight_lb``). The first row (in time) gives every covariate; a later
row with another value changes it from that row's time on (LOCF).

**NONMEM layout**, as ``mpc-dose export --nonmem`` writes it: ``ID, TIME, AMT, RATE, EVID,
MDV, DV, CMT`` and covariates in capitals, with the sidecar ``<name>.txt`` beside it giving
the units (TIME, AMT and RATE of each CMT, DV) and the codes of categorical covariates. The
units are read from the sidecar, never assumed. Optional ``BLQ`` and ``OCC`` columns as
above; ``.`` is an empty value.

This module reads files (the patient's record) and knows model/; it does not print.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, UnitError, closest
from ..model.dosing import Dose
from ..model.library import LibraryModel
from ..model.population import parse_covariates
from ..scenario.dosing_table import doses_from_rows, finite_number
from ..units import conversion_factor, split_unit_suffix, token_to_unit

__all__ = ["PatientHistory", "read_patient_history", "measured_output"]

_DOSING_COLUMNS = ("time", "input", "amount", "rate", "duration", "evid", "addl", "ii")
_NONMEM_REQUIRED = ("TIME", "EVID", "AMT")
_NONMEM_KNOWN = ("ID", "TIME", "AMT", "RATE", "EVID", "MDV", "DV", "CMT", "BLQ", "OCC")


@dataclass(frozen=True)
class PatientHistory:
    """A patient's record in model units (times in s).

    Attributes
    ----------
    source : str
        The file it was read from.
    layout : str
        ``"dosing-table"`` or ``"nonmem"``.
    output, output_unit : str
        The model output the levels measure, and its unit (the levels' unit here).
    doses : tuple of Dose
    observations : tuple of (t_s, value, below_lloq)
        A level below the LLOQ carries the limit as its value.
    covariates : dict
        The covariates at the start (keys as given: declared names, maybe with a unit
        suffix).
    covariate_changes : tuple of (t_s, dict)
    occasions_s : tuple of float
        Starts of the occasions after the first.
    """

    source: str
    layout: str
    output: str
    output_unit: str
    doses: tuple[Dose, ...]
    observations: tuple[tuple[float, float, bool], ...]
    covariates: dict[str, object]
    covariate_changes: tuple[tuple[float, dict[str, object]], ...] = ()
    occasions_s: tuple[float, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def end_s(self) -> float:
        """The last event of the record [s] (end of an infusion, a level, a change)."""
        ends = [d.time_s + d.duration_s for d in self.doses] + \
            [t for t, _, _ in self.observations] + [t for t, _ in self.covariate_changes] + \
            list(self.occasions_s) + [0.0]
        return max(ends)

    def covariates_at(self, t_s: float) -> dict[str, object]:
        """The covariates in force at *t_s* [s] (LOCF)."""
        values = dict(self.covariates)
        for t, change in self.covariate_changes:
            if t <= t_s:
                values.update(change)
        return values


def measured_output(library_model: LibraryModel, output: str | None) -> str:
    """The output the levels measure: *output* (checked), or the only output with a
    residual error."""
    model, pop = library_model.model, library_model.population
    with_error = [r.output for r in pop.residual_errors if r.output in model.output_names]
    if output is not None:
        if output not in model.output_names:
            raise ConfigError(f"--output: model {model.name!r} has no output {output!r}"
                              f"{closest(output, model.output_names)}; outputs: "
                              f"{', '.join(model.output_names)}")
        return output
    if len(with_error) != 1:
        raise ConfigError(f"--output: model {model.name!r} has "
                          f"{len(with_error) or 'no'} outputs with a residual error "
                          f"({', '.join(with_error) or 'none'}); name the measured one")
    return with_error[0]


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in ("", ".")) or \
        (isinstance(value, float) and math.isnan(value))


_number = finite_number   # one reading of a numeric cell for both table layouts


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"data {str(path)!r}: cannot read it ({err.strerror})") from None
    lines = [line for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) < 2:
        raise ConfigError(f"data {str(path)!r}: no header and rows")
    reader = csv.DictReader(lines)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if len(set(columns)) != len(columns) or "" in columns:
        raise ConfigError(f"data {str(path)!r}: empty or repeated column names {columns}")
    rows = []
    for k, row in enumerate(reader, start=1):
        if None in row:
            raise ConfigError(f"data {path.name!r} row {k}: more values than columns")
        rows.append({key.strip(): (value or "").strip() for key, value in row.items()})
    return columns, rows


def read_patient_history(path: str | Path, library_model: LibraryModel, *,
                         output: str | None = None, lloq: float | None = None,
                         patient_id: str | None = None) -> PatientHistory:
    """Read one patient's record for *library_model* (the layout is told by its columns:
    ``TIME``, ``EVID`` and ``AMT`` in capitals mean NONMEM).

    Parameters
    ----------
    path : path
    library_model : LibraryModel
    output : str, optional
        The measured output (the only one with a residual error when not given).
    lloq : float, optional
        Limit of quantification (output unit) for BLQ rows without a value.
    patient_id : str, optional
        NONMEM layout: the ID to read when the file holds several.

    Raises
    ------
    ConfigError
        Naming the file, row, column and value: a column the model does not know (e.g. an
        unknown covariate), a missing column or covariate, a unit that does not convert, a
        level before any dose, a missing sidecar.
    """
    path = Path(path)
    output = measured_output(library_model, output)
    columns, rows = _read_rows(path)
    if all(c in columns for c in _NONMEM_REQUIRED):
        return _nonmem(path, columns, rows, library_model, output, lloq, patient_id)
    if patient_id is not None:
        raise ConfigError(f"--id {patient_id}: {path.name!r} is in the dosing-table layout "
                          f"(one patient); --id is for NONMEM datasets")
    return _dosing_table(path, columns, rows, library_model, output, lloq)


# ---------------------------------------------------------------------------- dosing table
def _dosing_table(path: Path, columns: list[str], rows: list[dict[str, str]],
                  lm: LibraryModel, output: str, lloq: float | None) -> PatientHistory:
    model, pop = lm.model, lm.population
    where = f"data {path.name!r}"
    output_unit = model.outputs[model.output_index(output)].unit
    covariate_names = [c.name for c in pop.covariates]
    dosing, covariate_columns = [], []
    dv_column = None
    for column in columns:
        quantity = next((q for q in _DOSING_COLUMNS
                         if column == q or column.startswith(q + "_")), None)
        if quantity is not None and column != "dv":
            dosing.append(column)
            continue
        if column == "dv" or column.startswith("dv_"):
            if dv_column is not None:
                raise ConfigError(f"{where}: two level columns, {dv_column!r} and {column!r}")
            dv_column = column
            continue
        if column in ("blq", "occasion"):
            continue
        try:
            name, _ = split_unit_suffix(column, covariate_names)
        except UnitError as err:
            raise ConfigError(f"{where}: column {column!r}: {err}") from None
        if name not in covariate_names:
            raise ConfigError(
                f"{where}: unknown column {column!r}"
                f"{closest(column, covariate_names + list(_DOSING_COLUMNS) + ['dv', 'blq'])}"
                f"; expected dosing columns (time_<unit>, input, amount_<unit>, "
                f"rate_<unit>, duration_<unit>, evid, addl, ii_<unit>), dv_<unit>, blq, "
                f"occasion, or a covariate of model {model.name!r}: "
                f"{', '.join(covariate_names) or 'none'}")
        covariate_columns.append(column)
    time_column = next((c for c in dosing if c.startswith("time_")), None)
    if time_column is None:
        raise ConfigError(f"{where}: no time column; add e.g. time_h")
    try:
        time_factor = conversion_factor(token_to_unit(time_column[5:]), "s",
                                        what=f"{where}: {time_column}")
    except UnitError as err:
        raise ConfigError(f"{where}: column {time_column!r}: {err}") from None
    dv_factor = None
    if dv_column is not None:
        if dv_column == "dv":
            raise ConfigError(f"{where}: column 'dv' has no unit; write e.g. "
                              f"dv_{output_unit.replace('/', '_per_')}")
        try:
            dv_unit = token_to_unit(dv_column[3:])
            dv_factor = conversion_factor(dv_unit, output_unit, what=f"{where}: {dv_column}")
        except UnitError as err:
            raise ConfigError(f"{err} (the levels measure {output!r}, in {output_unit})"
                              ) from None

    # each row's kind, by evid or by what it holds; rows in time order (stable)
    amount_like = [c for c in dosing if c.startswith(("amount_", "rate_"))]
    timed = []
    for k, row in enumerate(rows, start=1):
        here = f"{where} row {k}"
        if _blank(row.get(time_column)):
            raise ConfigError(f"{here}: {time_column} is missing")
        t_s = _number(row[time_column], here, time_column) * time_factor
        if "evid" in columns and not _blank(row["evid"]):
            evid = _number(row["evid"], here, "evid")
        elif any(not _blank(row.get(c)) for c in amount_like):
            evid = 1.0
        elif dv_column is not None and (not _blank(row.get(dv_column))
                                        or row.get("blq", "") in ("1",)):
            evid = 0.0
        else:
            raise ConfigError(f"{here}: neither a dose (amount or rate) nor a level "
                              f"({dv_column or 'dv_<unit>'}); give evid")
        if evid not in (0.0, 1.0):
            raise ConfigError(f"{here}: evid = {evid:g} is not supported; use 1 (dose) or 0 "
                              f"(level)")
        timed.append((t_s, k, evid, row))
    timed.sort(key=lambda item: (item[0], item[1]))

    dose_rows = [{**{c: row.get(c, "") for c in dosing}, "evid": str(int(evid))}
                 for _, _, evid, row in sorted(timed, key=lambda item: item[1])]
    dose_columns = dosing + ([] if "evid" in dosing else ["evid"])
    covariates, changes = _covariates(
        [(t, k, row) for t, k, _, row in timed], covariate_columns, lm, where)
    weight_kg = parse_covariates(covariates, pop.covariates, where=f"{where} covariates"
                                 ).get("weight")
    doses = doses_from_rows(dose_rows, dose_columns, model, weight_kg=weight_kg, where=where) \
        if any(evid == 1.0 for _, _, evid, _ in timed) else []

    observations = []
    for t_s, k, evid, row in timed:
        if evid != 0.0:
            continue
        here = f"{where} row {k}"
        if dv_column is None:
            raise ConfigError(f"{here}: a level row (evid 0) but no dv_<unit> column; add "
                              f"e.g. dv_{output_unit.replace('/', '_per_')}")
        blq = "blq" in columns and not _blank(row["blq"]) and \
            _number(row["blq"], here, "blq") != 0
        observations.append((t_s, _level(row.get(dv_column), dv_factor, blq, lloq, here,
                                         dv_column), blq))
    occasions = _occasion_starts([(t, row.get("occasion")) for t, _, _, row in timed]) \
        if "occasion" in columns else ()
    history = PatientHistory(str(path), "dosing-table", output, output_unit, tuple(doses),
                             tuple(observations), covariates, tuple(changes), occasions)
    _check_levels_after_doses(history, lm, where)
    return history


def _level(raw: object, factor: float | None, blq: bool, lloq: float | None, where: str,
           column: str) -> float:
    if _blank(raw):
        if blq and lloq is not None:
            return float(lloq)
        raise ConfigError(f"{where}: {column} is empty" + (
            "; a BLQ level needs its limit in dv or --lloq" if blq else ""))
    value = _number(raw, where, column) * (factor if factor is not None else 1.0)
    if value < 0:
        raise ConfigError(f"{where}: {column} = {raw!r}: a level must be >= 0")
    return value


def _covariates(timed: Sequence[tuple[float, int, Mapping[str, str]]], columns: list[str],
                lm: LibraryModel, where: str) -> tuple[dict, list]:
    """The covariates of the first row and every later change (LOCF)."""
    pop = lm.population
    if not timed:
        raise ConfigError(f"{where}: no rows")
    _, k0, first = timed[0]
    initial: dict[str, object] = {}
    for column in columns:
        if _blank(first.get(column)):
            raise ConfigError(f"{where} row {k0}: covariate {column!r} is empty; the first "
                              f"row (in time) gives every covariate")
        initial[column] = first[column]
    parse_covariates(initial, pop.covariates, where=f"{where} row {k0}")   # checks now
    current, changes = dict(initial), []
    for t_s, k, row in timed[1:]:
        change = {}
        for column in columns:
            raw = row.get(column)
            if _blank(raw) or _same(raw, current[column]):
                continue
            change[column] = raw
        if change:
            parse_covariates({**current, **change}, pop.covariates, where=f"{where} row {k}")
            current.update(change)
            if changes and changes[-1][0] == t_s:
                changes[-1][1].update(change)
            else:
                changes.append((t_s, change))
    return initial, changes


def _same(a: object, b: object) -> bool:
    try:
        return float(a) == float(b)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(a).strip().lower() == str(b).strip().lower()


def _occasion_starts(values: Sequence[tuple[float, object]]) -> tuple[float, ...]:
    starts, current = [], None
    for t_s, raw in values:
        if _blank(raw):
            continue
        if current is not None and not _same(raw, current) and t_s not in starts and t_s > 0:
            starts.append(t_s)
        current = raw
    return tuple(starts)


def _check_levels_after_doses(history: PatientHistory, lm: LibraryModel, where: str) -> None:
    """A level before the first dose is an error when the model predicts none there (a
    drug-naive patient has no drug: such a row is misplaced or its time is wrong)."""
    model = lm.model
    first_dose = min((d.time_s for d in history.doses), default=math.inf)
    early = [(t, v) for t, v, _ in history.observations if t <= first_dose]
    if not early:
        return
    typical = lm.population.typical_parameters(history.covariates)
    p = model.parameter_vector(typical)
    x0 = model.initial_state(p)
    baseline = float(np.asarray(model.h(0.0, x0, np.zeros(model.n_inputs), p),
                                dtype=float).ravel()[model.output_index(history.output)])
    if baseline == 0.0:
        t, v = early[0]
        raise ConfigError(
            f"{where}: a level ({v:g} {history.output_unit}) at {t / 3600:g} h, before any "
            f"dose" + (f" (the first at {first_dose / 3600:g} h)" if history.doses else
                       " (the file has none)")
            + f": model {model.name!r} predicts no drug there; give the doses before it, or "
              f"correct its time")


# ---------------------------------------------------------------------------- NONMEM
def _sidecar(path: Path) -> dict:
    info_path = path.with_suffix(".txt")
    try:
        text = info_path.read_text(encoding="utf-8")
    except OSError:
        raise ConfigError(f"data {path.name!r} (NONMEM layout): its sidecar "
                          f"{info_path.name!r} (units and codes, as `mpc-dose export "
                          f"--nonmem` writes it) cannot be read; the units of TIME, AMT, RATE "
                          f"and DV are never assumed") from None
    info: dict = {"amount": {}, "rate": {}, "codes": {}}
    for line in text.splitlines():
        if m := re.match(r"^TIME: (\S+)", line):
            info["time"] = m[1]
        elif m := re.match(r"^DV: (\S+) \[([^\]]*)\]", line):
            info["dv_name"], info["dv"] = m[1], m[2]
        elif m := re.match(r"^(AMT|RATE) \(CMT (\d+): ([^)]+)\): (\S+)", line):
            key = "amount" if m[1] == "AMT" else "rate"
            info[key][int(m[2])] = (m[3].strip(), m[4])
        elif m := re.match(r"^([A-Z][A-Z0-9_]*): ((?:[^,=]+ = -?\d+(?:, )?)+)$", line):
            info["codes"][m[1]] = {int(code): label.strip() for label, code in
                                   (item.rsplit(" = ", 1) for item in m[2].split(", "))}
    for key, what in (("time", "TIME: <unit>"), ("dv", "DV: <name> [<unit>]")):
        if not info.get(key):
            raise ConfigError(f"sidecar {info_path.name!r}: no line {what!r}")
    return info


def _nonmem(path: Path, columns: list[str], rows: list[dict[str, str]], lm: LibraryModel,
            output: str, lloq: float | None, patient_id: str | None) -> PatientHistory:
    model, pop = lm.model, lm.population
    where = f"data {path.name!r}"
    info = _sidecar(path)
    output_unit = model.outputs[model.output_index(output)].unit
    by_upper = {c.name.upper(): c for c in pop.covariates}
    covariate_columns = []
    for column in columns:
        if column in _NONMEM_KNOWN:
            continue
        if column.upper() not in by_upper:
            raise ConfigError(f"{where}: unknown column {column!r}"
                              f"{closest(column.upper(), list(by_upper) + list(_NONMEM_KNOWN))}"
                              f"; expected {', '.join(_NONMEM_KNOWN)} or a covariate of model "
                              f"{model.name!r}: {', '.join(by_upper) or 'none'}")
        covariate_columns.append(column)
    if "ID" in columns:
        ids = list(dict.fromkeys(row["ID"] for row in rows))
        if patient_id is None and len(ids) > 1:
            raise ConfigError(f"{where}: {len(ids)} patients (ID {', '.join(ids[:10])}); "
                              f"choose one with --id")
        chosen = patient_id if patient_id is not None else ids[0]
        numbered = [(k, row) for k, row in enumerate(rows, start=1)
                    if _same(row["ID"], chosen)]
        if not numbered:
            raise ConfigError(f"--id {chosen}: no rows with that ID in {path.name!r}; IDs: "
                              f"{', '.join(ids[:10])}")
    else:
        numbered = list(enumerate(rows, start=1))
    try:
        time_factor = conversion_factor(info["time"], "s", what="sidecar TIME")
        dv_factor = conversion_factor(info["dv"], output_unit, what=f"{where}: DV")
    except UnitError as err:
        raise ConfigError(f"{err} (the levels measure {output!r}, in {output_unit})") from None
    doses, observations, timed = [], [], []
    for k, row in numbered:
        here = f"{where} row {k}"
        t_s = _number(row["TIME"], here, "TIME") * time_factor
        evid = _number(row["EVID"], here, "EVID")
        timed.append((t_s, k, {by_upper[c.upper()].name: _decode(row[c], c, info, by_upper,
                                                                  here)
                               for c in covariate_columns}))
        if evid == 1:
            cmt = int(_number(row.get("CMT") or 1, here, "CMT"))
            if not 1 <= cmt <= model.n_inputs:
                raise ConfigError(f"{here}: CMT = {cmt} is not an input of model "
                                  f"{model.name!r} (1 to {model.n_inputs}: "
                                  f"{', '.join(model.input_names)})")
            inp = model.inputs[cmt - 1]
            amount_unit = info["amount"].get(cmt, (None, None))[1]
            if amount_unit is None:
                raise ConfigError(f"sidecar of {path.name!r}: no unit for AMT of CMT {cmt}")
            try:
                amount = _number(row["AMT"], here, "AMT") * conversion_factor(
                    amount_unit, inp.amount_unit, what=f"{here}: AMT")
                rate = None
                if "RATE" in columns and not _blank(row["RATE"]):
                    rate_unit = info["rate"].get(cmt, (None, f"{amount_unit}/h"))[1]
                    rate = _number(row["RATE"], here, "RATE") * conversion_factor(
                        rate_unit, f"{inp.amount_unit}/s", what=f"{here}: RATE")
            except UnitError as err:
                raise ConfigError(f"{err} (input {inp.name!r} is dosed in "
                                  f"{inp.amount_unit})") from None
            doses.append(Dose.from_record(t_s, inp.name, amount=amount, rate=rate,
                                          where=here))
        elif evid == 0:
            blq = "BLQ" in columns and not _blank(row["BLQ"]) and \
                _number(row["BLQ"], here, "BLQ") != 0
            observations.append((t_s, _level(row.get("DV"), dv_factor, blq, lloq, here, "DV"),
                                 blq))
        else:
            raise ConfigError(f"{here}: EVID = {evid:g} is not supported; use 1 (dose) or 0 "
                              f"(observation)")
    timed.sort(key=lambda item: (item[0], item[1]))
    covariates, changes = _covariates(timed, [by_upper[c.upper()].name
                                              for c in covariate_columns], lm, where)
    occasions = _occasion_starts([(t, row["OCC"]) for k, row in numbered
                                  for t in [_number(row["TIME"], where, "TIME") * time_factor]]
                                 ) if "OCC" in columns else ()
    history = PatientHistory(str(path), "nonmem", output, output_unit,
                             tuple(sorted(doses, key=lambda d: d.time_s)),
                             tuple(sorted(observations)), covariates, tuple(changes),
                             tuple(sorted(occasions)))
    _check_levels_after_doses(history, lm, where)
    return history


def _decode(raw: str, column: str, info: dict, by_upper: dict, where: str) -> object:
    """A covariate value: a categorical one from its numeric code (sidecar), named by its
    declared name; numbers in the declared unit."""
    covariate = by_upper[column.upper()]
    if _blank(raw):
        return ""
    if covariate.is_categorical:
        codes = info["codes"].get(column.upper())
        if codes is None:
            raise ConfigError(f"{where}: {column} is categorical but the sidecar gives no "
                              f"codes for it (e.g. '{column.upper()}: no = 0, yes = 1')")
        code = _number(raw, where, column)
        if code not in codes:
            raise ConfigError(f"{where}: {column} = {raw!r} is not a code of the sidecar "
                              f"({', '.join(f'{v} = {c}' for c, v in codes.items())})")
        return codes[int(code)]
    return raw
