"""Read a dosing-event table (CSV) into :class:`~mpc_dose.model.dosing.Dose` records.

Columns (units in the names, ``_per_`` for ``/``; lines starting with ``#`` are comments):

==================  =========================================================================
``time_<unit>``     dose time, e.g. ``time_min``, ``time_h``, ``time_s`` (required, one)
``input``           the model input dosed (optional when the model has exactly one input)
``amount_<unit>``   bolus amount, or infusion amount (NONMEM AMT), e.g. ``amount_mg``
``rate_<unit>``     infusion rate (NONMEM RATE; 0 = bolus), e.g. ``rate_ug_per_min``
``duration_<unit>`` infusion duration (NONMEM DUR), e.g. ``duration_s``
``evid``            optional NONMEM event id: 1 dose, 0 observation record (skipped)
``addl``            optional number of additional doses, every ``ii_<unit>``
==================  =========================================================================

Per-kilogram units (``amount_mg_per_kg``, ``rate_ug_per_kg_per_min``) are multiplied by the
patient's weight, which must then be given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError, UnitError, closest
from ..model.dosing import Dose
from ..model.spec import Model
from ..units import conversion_factor, token_to_unit

__all__ = ["read_dosing_table", "doses_from_rows"]

_KNOWN = ("time", "input", "amount", "rate", "duration", "evid", "addl", "ii")
_PER_KG = re.compile(r"/kg(?=/|$)")
_EXAMPLES = ("time_min", "input", "amount_mg", "rate_mg_per_h", "duration_min", "evid", "addl",
             "ii_h")


def _column_unit(column: str, quantity: str, where: str) -> tuple[str, bool]:
    """Unit of column ``{quantity}_{token}`` and whether it is per kg of body weight."""
    token = column[len(quantity) + 1:]
    if not token:
        raise ConfigError(f"{where}: column {column!r} has no unit; write e.g. "
                          f"{quantity}_{'mg' if quantity == 'amount' else 'min'}")
    try:
        unit = token_to_unit(token)
    except UnitError as err:
        raise ConfigError(f"{where}: column {column!r}: {err}") from None
    per_kg = bool(_PER_KG.search(unit))
    return _PER_KG.sub("", unit), per_kg


def doses_from_rows(rows: Sequence[dict[str, object]], columns: Sequence[str], model: Model, *,
                    weight_kg: float | None = None, where: str = "dosing table") -> list[Dose]:
    """Turn table rows (dicts by column name) into doses for *model* (model units).

    Raises
    ------
    ConfigError
        Naming the row, column and value for an unknown column, a missing or unknown unit, a
        unit of the wrong dimension, an unknown input, or an impossible dose.
    """
    kinds: dict[str, tuple[str, str, bool]] = {}  # column -> (quantity, unit, per_kg)
    for column in columns:
        quantity = next((q for q in _KNOWN if column == q or column.startswith(q + "_")), None)
        if quantity is None or (quantity in ("input", "evid", "addl") and column != quantity):
            raise ConfigError(f"{where}: unknown column {column!r}"
                              f"{closest(column, _EXAMPLES)}"
                              f"; expected time_<unit>, input, amount_<unit>, rate_<unit>, "
                              f"duration_<unit>, evid, addl, ii_<unit>")
        if quantity in ("input", "evid", "addl"):
            kinds[column] = (quantity, "1", False)
            continue
        unit, per_kg = _column_unit(column, quantity, where)
        if any(k[0] == quantity for k in kinds.values()):
            raise ConfigError(f"{where}: more than one {quantity} column")
        kinds[column] = (quantity, unit, per_kg)
    by_quantity = {q: (c, u, k) for c, (q, u, k) in kinds.items()}
    if "time" not in by_quantity:
        raise ConfigError(f"{where}: no time column; add e.g. time_min")
    if "input" not in by_quantity and model.n_inputs != 1:
        raise ConfigError(f"{where}: no input column, and model {model.name!r} has "
                          f"{model.n_inputs} inputs ({', '.join(model.input_names)})")

    doses: list[Dose] = []
    for k, row in enumerate(rows, start=1):
        here = f"{where} row {k}"
        evid = _number(row, "evid", here, default=1.0)
        if evid == 0:
            continue
        if evid != 1:
            raise ConfigError(f"{here}: evid = {evid:g} is not supported; use 1 (dose) or 0 "
                              f"(observation record, skipped)")
        input_name = str(row["input"]).strip() if "input" in by_quantity else model.input_names[0]
        if input_name not in model.input_names:
            raise ConfigError(f"{here}: input {input_name!r} is not an input of model "
                              f"{model.name!r}{closest(input_name, model.input_names)}; "
                              f"inputs: {', '.join(model.input_names)}")
        amount_unit = model.inputs[model.input_index(input_name)].amount_unit
        expected = {"time": "s", "ii": "s", "duration": "s", "amount": amount_unit,
                    "rate": f"{amount_unit}/s"}
        values: dict[str, float | None] = {}
        for quantity in ("time", "amount", "rate", "duration", "ii"):
            if quantity not in by_quantity:
                values[quantity] = None
                continue
            column, unit, per_kg = by_quantity[quantity]
            value = _number(row, column, here, default=None)
            if value is None:
                values[quantity] = None
                continue
            try:
                factor = conversion_factor(unit, expected[quantity], what=f"{here}: {column}")
            except UnitError as err:
                raise ConfigError(f"{err} (input {input_name!r} is dosed in {amount_unit})"
                                  ) from None
            if per_kg:
                if weight_kg is None:
                    raise ConfigError(f"{here}: column {column!r} is per kg of body weight; "
                                      f"give the patient's weight")
                factor *= weight_kg
            values[quantity] = value * factor
        if values["time"] is None:
            raise ConfigError(f"{here}: time is missing")
        dose = Dose.from_record(values["time"], input_name, amount=values["amount"],
                                rate=values["rate"], duration_s=values["duration"], where=here)
        doses.append(dose)
        addl = _number(row, "addl", here, default=0.0) if "addl" in by_quantity else 0.0
        if addl:
            if addl < 0 or addl != int(addl) or not values["ii"]:
                raise ConfigError(f"{here}: addl = {addl:g} needs a whole number >= 0 and an "
                                  f"ii_<unit> column with an interval > 0")
            for j in range(1, int(addl) + 1):
                doses.append(Dose(dose.time_s + j * values["ii"], dose.input, dose.amount,
                                  dose.rate, dose.duration_s))
    return sorted(doses, key=lambda d: d.time_s)


def finite_number(raw: object, where: str, column: str) -> float:
    """A table cell as a finite number, or an error naming the row (*where*), the column and
    the value."""
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {column} = {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{where}: {column} = {raw!r} is not a finite number")
    return value


def _number(row: dict[str, object], column: str, where: str, default):
    raw = row.get(column)
    if raw is None or (isinstance(raw, str) and raw.strip() == "") or \
            (isinstance(raw, float) and math.isnan(raw)):
        return default
    return finite_number(raw, where, column)


def read_dosing_table(path: str | Path, model: Model, *, weight_kg: float | None = None
                      ) -> list[Dose]:
    """Read the dosing CSV at *path* for *model* (see the module docstring for columns).

    Raises
    ------
    ConfigError
        For a missing or unreadable file, or any bad column or row (named in the message).
    """
    import csv

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"dosing table {str(path)!r}: cannot read it ({err.strerror})") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip()
             .startswith("#")]
    if not lines:
        raise ConfigError(f"dosing table {str(path)!r} is empty")
    reader = csv.DictReader(lines)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if len(set(columns)) != len(columns) or "" in columns:
        raise ConfigError(f"dosing table {str(path)!r}: empty or repeated column names "
                          f"{columns}")
    rows = []
    for k, row in enumerate(reader, start=1):
        if None in row:
            raise ConfigError(f"dosing table {str(path)!r} row {k}: more values than columns")
        rows.append({key.strip(): value for key, value in row.items()})
    return doses_from_rows(rows, columns, model, weight_kg=weight_kg,
                           where=f"dosing table {path.name!r}")
