"""The reference of every scenario key, generated from the schema so it cannot drift.

Everything comes from :mod:`mpc_dose.scenario.schema` itself: the pydantic models' field
names, types, defaults and ``Field`` constraints, the ``#:`` comments above the fields and
the classes' docstrings (read from the source, which pydantic does not keep), and the unit
kinds of the tables whose quantities carry their unit in the key (``max_rate_<unit>``).
The unit of a plain key is the one its comment opens with in brackets (``#: [output unit]
...``), else the one its ending gives (``_s`` seconds, ``_ml_per_h`` mL/h, ...: the
convention of the schema), else a bracketed unit inside its comment.

    python -m mpc_dose.scenario.reference            # writes docs/scenario-keys.md
    python -m mpc_dose.scenario.reference --check    # exit 1 when the file is out of date

This module reads source files and writes one; it does not load scenarios.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import math
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from . import schema

__all__ = ["render", "write", "DEFAULT_PATH", "REGENERATE"]

#: where the reference lives in the repository
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "scenario-keys.md"
#: the command that rewrites it
REGENERATE = "python -m mpc_dose.scenario.reference"

#: fields the loader sets itself (never written in a scenario file)
_INTERNAL = {(schema.Scenario, "base_dir"), (schema._Quantities, "quantities")}

#: key endings and the unit they give, longest first (the schema keeps units in the keys)
_SUFFIX_UNITS = (("_clock_h", "h (clock time of day)"), ("_ml_per_h", "mL/h"),
                 ("_per_h", "per h"), ("_ml", "mL"), ("_s", "s"), ("_h", "h"))

_CONSTRAINTS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
_UNIONS = (typing.Union, types.UnionType)


def _internal(cls: type, name: str) -> bool:
    return any(issubclass(cls, owner) and name == field for owner, field in _INTERNAL)


# ------------------------------------------------------------------ reading the source

def _docstring(cls: type) -> str:
    """*cls*'s own docstring (not inherited), dedented."""
    doc = cls.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


def _field_comments(cls: type) -> dict[str, str]:
    """The ``#:`` comment lines right above each field of *cls*, joined into one text."""
    lines, _ = inspect.getsourcelines(cls)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    out = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        comment: list[str] = []
        k = node.lineno - 2            # the line above the field (0-based)
        while k >= 0 and lines[k].strip().startswith("#:"):
            comment.insert(0, lines[k].strip()[2:].strip())
            k -= 1
        if comment:
            out[node.target.id] = " ".join(comment)
    return out


def _comments(cls: type) -> dict[str, str]:
    """``#:`` comments of *cls* and of the schema classes it derives from."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if base.__module__ == schema.__name__:
            out.update(_field_comments(base))
    return out


# ---------------------------------------------------------------------- describing types

def _strip_none(annotation) -> tuple[object, bool]:
    """(*annotation* without ``None``, whether ``None`` was allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in _UNIONS:
        rest = [a for a in args if a is not type(None)]
        if len(rest) < len(args):
            return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return annotation, False


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _type(annotation) -> str:
    """How a TOML writer spells a value of *annotation*."""
    annotation, _ = _strip_none(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is typing.Any:
        return "any"
    if origin is Literal:
        return " or ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if _is_model(annotation):
        return "table"
    if origin is list:
        return "array of tables" if _is_model(args[0]) else f"array of {_type(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type(a) for a in args) + "]"
    if origin is dict:
        return "tables by name" if _is_model(args[1]) else f"table of {_type(args[1])}"
    if _is_quantity(annotation):
        return "number or string with a unit"
    if origin in _UNIONS:
        return " or ".join(_type(a) for a in args)
    return {str: "string", float: "number", int: "integer", bool: "boolean"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _is_quantity(annotation) -> bool:
    """Whether *annotation* is the schema's ``Quantity`` (a number in the key's unit, or a
    string with its own unit). It is spelt ``typing.Union[float, str]``; a covariate value,
    a number or a category, is spelt ``float | str`` and is not a quantity."""
    quantity = getattr(schema, "Quantity", None)
    return quantity is not None and typing.get_origin(annotation) is typing.Union and \
        typing.get_args(annotation) == typing.get_args(quantity)


def _value(value) -> str:
    """*value* as TOML would spell it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, BaseModel):
        return "its keys' defaults"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return repr(value)


def _default(info) -> str:
    if info.default is PydanticUndefined:
        return "required" if info.default_factory is None else _value(info.default_factory())
    return _value(info.default)


def _constraints(info) -> str:
    parts = []
    for item in info.metadata:
        for attr, sign in _CONSTRAINTS:
            bound = getattr(item, attr, None)
            if bound is not None:
                parts.append(f"{sign} {_value(bound)}")
    return ", ".join(parts)


def _unit(key: str) -> str:
    """The unit the key's ending gives ("" when it gives none)."""
    for ending, unit in _SUFFIX_UNITS:
        if key.endswith(ending):
            return unit
    return ""


_BRACKET = re.compile(r"\[([^\[\]]*\bunit\b[^\[\]]*)\]")
_LEADING = re.compile(r"^\[([^\[\]]*)\]\s*")


def _unit_in(comment: str) -> str:
    """The first bracketed text of *comment* naming a unit ("[output unit]", "[its unit x
    h]"): the unit of a value whose unit the key cannot carry (it is the output's)."""
    found = _BRACKET.search(comment)
    return found.group(1) if found else ""


def _leading_unit(comment: str) -> tuple[str, str]:
    """(unit, rest) of a comment that opens with its unit in brackets ("[input amount/s] the
    highest rate"); ("", *comment*) otherwise."""
    found = _LEADING.match(comment)
    return (found.group(1), comment[found.end():]) if found else ("", comment)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------------------ walking

def _tables(cls: type[BaseModel], header: str, out: list) -> None:
    """(header, class) for *cls* and every table under it, depth first in field order."""
    out.append((header, cls))
    for name, info in cls.model_fields.items():
        if _internal(cls, name):
            continue
        annotation, _ = _strip_none(info.annotation)
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        inner = f"{header.strip('[]')}.{name}" if header else name
        if _is_model(annotation):
            _tables(annotation, f"[{inner}]", out)
        elif origin is list and _is_model(args[0]):
            _tables(args[0], f"[[{inner}]]", out)
        elif origin is dict and _is_model(args[1]):
            _tables(args[1], f"[{inner}.NAME]", out)


def _meaning(name: str, comments: dict[str, str]) -> str:
    """The field's own comment, else a pointer to the field whose comment names it (one
    comment above a group of fields: ``dose_interval_s`` explains ``infusion_s``). Only
    key-like names (with an underscore) are looked up: ``output`` or ``seed`` in a comment
    are words."""
    if name in comments:
        return comments[name]
    if "_" not in name:
        return ""
    pattern = re.compile(rf"(?<![\w.]){re.escape(name)}(?!\w)")
    named = [other for other, text in comments.items() if pattern.search(text)]
    return f"see `{named[0]}`" if named else ""


def _rows(cls: type[BaseModel]) -> list[str]:
    comments = _comments(cls)
    rows = []
    for name, info in cls.model_fields.items():
        if _internal(cls, name):
            continue
        annotation, _ = _strip_none(info.annotation)
        kind = _type(info.annotation)
        if _is_model(annotation) or (typing.get_origin(annotation) in (list, dict) and any(
                _is_model(a) for a in typing.get_args(annotation))):
            continue  # a table of its own, below
        meaning = _meaning(name, comments)
        unit, meaning = _leading_unit(meaning)   # the comment's own unit wins over the key's
        unit = unit or _unit(name)
        if not unit and "number" in kind:
            # its own comment's unit; a quantity named in a group comment takes the group's
            own = comments.get(name, "")
            unit = _unit_in(own) if own or not _is_quantity(annotation) else \
                _unit_in(comments[meaning[len("see `"):-1]]) if meaning else ""
        rows.append(f"| `{name}` | {_cell(kind)} | {_cell(unit)} | {_cell(_default(info))} "
                    f"| {_cell(_constraints(info))} | {_cell(meaning)} |")
    quantities = getattr(cls, "QUANTITIES", None)
    for name, kind in (quantities or {}).items():
        text = schema._KINDS[kind][0]
        rows.append(f"| `{name}_<unit>` | number | in the key: {_cell(text)} | none "
                    f"| >= 0, finite | see the lead |")
    return rows


def _subtables(cls: type[BaseModel], header: str) -> list[str]:
    """Tables nested in *cls*, for its section's lead."""
    names = []
    for name, info in cls.model_fields.items():
        annotation, _ = _strip_none(info.annotation)
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        inner = f"{header.strip('[]')}.{name}"
        if _is_model(annotation):
            names.append(f"`[{inner}]`")
        elif origin is list and _is_model(args[0]):
            names.append(f"`[[{inner}]]`")
        elif origin is dict and _is_model(args[1]):
            names.append(f"`[{inner}.NAME]`")
    return names


def render() -> str:
    """The whole reference (Markdown) as generated from the schema now."""
    tables: list = []
    _tables(schema.Scenario, "", tables)
    lines = ["# Scenario keys", "",
             f"Generated from `mpc_dose/scenario/schema.py` by `{REGENERATE}`; do not edit "
             f"by hand (`tests/test_scenario_keys.py` fails when this file differs from what "
             f"the generator writes).", "",
             inspect.cleandoc(schema.__doc__ or ""), "",
             "Columns: the key; its TOML type (`number or string with a unit`: a number "
             "in the unit shown, or a string such as `\"70 mmHg\"`, converted to it); its "
             "unit: the one the schema's comment opens with in brackets (`[output unit]`: "
             "the unit of the model output the table names), else the key's ending (`_s` "
             "seconds, `_h` hours, `_clock_h` a clock time of day in hours, `_ml_per_h` mL/h, "
             "`_ml` mL, `_per_h` per hour), else a bracketed unit in the comment; a quantity "
             "`name_<unit>` takes the unit in the key, of the kind shown; its default "
             "(`required`: must be given; `none`: not set, the behaviour the meaning or the "
             "table's lead describes); the allowed range; its meaning, from the `#:` comment "
             "above the field in the schema (`see X`: the comment above field X names it). "
             "A quantity key without its unit, or with a unit of another kind, is an error.",
             ""]
    for header, cls in tables:
        if not header:
            continue
        lines += [f"## `{header}`", ""]
        doc = _docstring(cls)
        if doc:
            lines += [doc, ""]
        nested = _subtables(cls, header)
        if nested:
            lines += ["Tables inside: " + ", ".join(nested) + ".", ""]
        rows = _rows(cls)
        if rows:
            lines += ["| key | type | unit | default | allowed | meaning |",
                      "|---|---|---|---|---|---|", *rows, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write(path: Path = DEFAULT_PATH) -> Path:
    """Write the reference to *path*; returns it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpc_dose.scenario.reference",
                                     description="Write the scenario key reference.")
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH, help="the Markdown file")
    parser.add_argument("--check", action="store_true",
                        help="only compare: exit 1 when the file differs from the schema")
    args = parser.parse_args(argv)
    if args.check:
        current = args.out.read_text("utf-8") if args.out.exists() else ""
        if current != render():
            print(f"{args.out} is out of date: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    print(write(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
