"""Units: a small, strict whitelist with conversion to canonical units.

Every quantity that crosses a boundary of mpc_dose (a model parameter declaration, a dosing
table column, a result column, later a protocol message) carries a unit string such as
``"L/min"``, ``"ug/mL"`` or ``"mg/kg/h"``. This module parses those strings into a dimension
and a factor to the canonical unit of that dimension, and refuses anything it does not know:
an unknown or mismatched unit is an error, never a guess.

Canonical base units (what model equations are written in): time ``s``, mass ``mg``, volume
``L``, length ``cm``, amount of substance ``mmol``, pressure ``mmHg``, insulin ``U``. Derived
canonical units follow (concentration ``mg/L``, clearance ``L/s``, rate ``mg/s``).

Insulin has its own dimension: the unit (U, mU, uU; IU is an alias) is a unit of biological
activity defined by a reference preparation, not an amount of any substance, so ``U`` never
converts to ``mmol`` by itself. Grams of carbohydrate are an ordinary mass (``g``). Moving
between mass, moles and insulin units needs a named substance: :func:`convert_substance` with
:data:`GLUCOSE` (mmol/L <-> mg/dL through 180.16 g/mol) or :data:`INSULIN` (U <-> pmol
through 6.00 nmol/U).

Column names spell units with ``_per_`` for ``/`` (``rate_mg_per_h``, ``conc_ug_per_mL``);
:func:`unit_to_token` and :func:`token_to_unit` translate.

This module uses the standard library only, so the sans-I/O protocol layer can share it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from collections.abc import Iterable
from functools import lru_cache

from .errors import UnitError, closest

__all__ = ["Unit", "parse_unit", "conversion_factor", "convert", "unit_to_token", "token_to_unit",
           "split_unit_suffix", "parse_quantity", "Substance", "GLUCOSE", "INSULIN",
           "convert_substance", "BASE_UNITS"]

# name -> (base dimension, factor to the canonical unit of that dimension).
# A base dimension of None means dimensionless (a pure number or a count).
BASE_UNITS: dict[str, tuple[str | None, float]] = {
    # time (canonical: s)
    "s": ("time", 1.0),
    "min": ("time", 60.0),
    "h": ("time", 3600.0),
    "d": ("time", 86400.0),
    "day": ("time", 86400.0),
    "wk": ("time", 7 * 86400.0),
    "yr": ("time", 365.25 * 86400.0),
    # mass (canonical: mg)
    "kg": ("mass", 1e6),
    "g": ("mass", 1e3),
    "mg": ("mass", 1.0),
    "ug": ("mass", 1e-3),
    "ng": ("mass", 1e-6),
    "pg": ("mass", 1e-9),
    "lb": ("mass", 453592.37),
    # volume (canonical: L)
    "L": ("volume", 1.0),
    "dL": ("volume", 0.1),
    "mL": ("volume", 1e-3),
    "uL": ("volume", 1e-6),
    # length (canonical: cm)
    "m": ("length", 100.0),
    "cm": ("length", 1.0),
    "mm": ("length", 0.1),
    "in": ("length", 2.54),
    # amount of substance (canonical: mmol)
    "mol": ("substance", 1e3),
    "mmol": ("substance", 1.0),
    "umol": ("substance", 1e-3),
    "nmol": ("substance", 1e-6),
    "pmol": ("substance", 1e-9),
    # insulin activity (canonical: U, the international unit of insulin)
    "U": ("insulin", 1.0),
    "mU": ("insulin", 1e-3),
    "uU": ("insulin", 1e-6),
    # pressure (canonical: mmHg)
    "mmHg": ("pressure", 1.0),
    "kPa": ("pressure", 7.500616827),
    # dimensionless
    "1": (None, 1.0),
    "%": (None, 0.01),
    "cells": (None, 1.0),
}

# Spellings that are unambiguous in clinical data; mapped, not guessed.
_ALIASES = {"l": "L", "ml": "mL", "dl": "dL", "ul": "uL", "µg": "ug", "mcg": "ug", "µL": "uL",
            "µU": "uU", "IU": "U", "mIU": "mU",
            "sec": "s", "hr": "h", "days": "d", "year": "yr", "years": "yr", "weeks": "wk",
            "-": "1", "": "1"}

_TOKEN_RE = re.compile(r"^(?P<base>[A-Za-zµ%]+|1)(?:\^(?P<exp>-?\d+))?$")
_NUMBER_RE = re.compile(r"^(?:10\^(?P<pow>-?\d+)|(?P<num>\d+(?:\.\d*)?(?:e-?\d+)?))$")


@dataclass(frozen=True)
class Unit:
    """A parsed unit: its dimension (base -> power) and the factor to the canonical unit.

    ``value_in_canonical = value * unit.factor``.
    """

    text: str
    dimension: tuple[tuple[str, int], ...]
    factor: float

    @property
    def is_dimensionless(self) -> bool:
        return not self.dimension

    def describe_dimension(self) -> str:
        if not self.dimension:
            return "dimensionless"
        return "*".join(f"{b}^{p}" if p != 1 else b for b, p in self.dimension)


#: bounds that keep every factor a finite, non-zero float (10^30 cells, m^4 at most)
_MAX_POWER_OF_TEN, _MAX_EXPONENT = 30, 4


def _parse_factor(token: str, text: str) -> tuple[dict[str, int], float]:
    number = _NUMBER_RE.match(token)
    if number:
        if number["pow"] is not None:
            power = int(number["pow"][:6])  # a long digit string is out of range anyway
            if abs(power) > _MAX_POWER_OF_TEN:
                raise UnitError(f"unit {text!r}: {token!r} is out of range (10^-"
                                f"{_MAX_POWER_OF_TEN} to 10^{_MAX_POWER_OF_TEN})")
            return {}, 10.0 ** power
        value = float(number["num"])
        if not (math.isfinite(value) and 10.0**-_MAX_POWER_OF_TEN <= value
                <= 10.0**_MAX_POWER_OF_TEN):
            raise UnitError(f"unit {text!r}: the factor {token!r} must be a number from 1e-"
                            f"{_MAX_POWER_OF_TEN} to 1e{_MAX_POWER_OF_TEN}")
        return {}, value
    match = _TOKEN_RE.match(token)
    if not match:
        raise UnitError(f"unit {text!r}: cannot read {token!r}; expected a unit such as mg, L, h")
    base = _ALIASES.get(match["base"], match["base"])
    if base not in BASE_UNITS:
        raise UnitError(f"unit {text!r}: unknown unit {match['base']!r}"
                        f"{closest(match['base'], BASE_UNITS)}; known: {', '.join(BASE_UNITS)}")
    exp = int(match["exp"][:6]) if match["exp"] else 1
    if not 0 < abs(exp) <= _MAX_EXPONENT:
        raise UnitError(f"unit {text!r}: exponent of {token!r} must be -{_MAX_EXPONENT} to "
                        f"{_MAX_EXPONENT}, not 0")
    dim, factor = BASE_UNITS[base]
    return ({dim: exp} if dim else {}), factor**exp


@lru_cache(maxsize=512)
def parse_unit(text: str) -> Unit:
    """Parse a unit string such as ``"mg/kg/h"``, ``"L/min"``, ``"1/min"`` or ``"10^9/L"``.

    Grammar: factors separated by ``*`` (or ``.``) with optional integer ``^`` exponents;
    every ``/`` divides by the factor group that follows it.

    Raises
    ------
    UnitError
        For an unknown base unit or unreadable text; the message names the text.
    """
    if not isinstance(text, str):
        raise UnitError(f"unit must be a string, got {text!r}")
    stripped = text.strip()
    if stripped in _ALIASES:
        stripped = _ALIASES[stripped]
    parts = stripped.split("/")
    dims: dict[str, int] = {}
    factor = 1.0
    for i, part in enumerate(parts):
        if part == "" and i > 0:
            raise UnitError(f"unit {text!r}: empty denominator")
        sign = 1 if i == 0 else -1
        for token in re.split(r"[*.·]", part) if part not in ("", "1") else ["1"]:
            if token == "":
                raise UnitError(f"unit {text!r}: empty factor")
            d, f = _parse_factor(token, text)
            for base, p in d.items():
                dims[base] = dims.get(base, 0) + sign * p
            factor *= f if sign > 0 else 1.0 / f
    if not (math.isfinite(factor) and factor > 0):
        raise UnitError(f"unit {text!r}: its factor is out of range")
    dimension = tuple(sorted((b, p) for b, p in dims.items() if p != 0))
    return Unit(text=text, dimension=dimension, factor=factor)


def conversion_factor(from_unit: str, to_unit: str, *, what: str = "value") -> float:
    """Factor that converts a value in *from_unit* into *to_unit*.

    Raises
    ------
    UnitError
        When the two units have different dimensions; the message names *what*.
    """
    a, b = parse_unit(from_unit), parse_unit(to_unit)
    if a.dimension != b.dimension:
        raise UnitError(f"{what}: unit {from_unit!r} ({a.describe_dimension()}) cannot be "
                        f"converted to {to_unit!r} ({b.describe_dimension()})")
    return a.factor / b.factor


def convert(value: float, from_unit: str, to_unit: str, *, what: str = "value") -> float:
    """Convert *value* from *from_unit* to *to_unit* (see :func:`conversion_factor`)."""
    return value * conversion_factor(from_unit, to_unit, what=what)


def unit_to_token(unit: str) -> str:
    """Spell a unit for a column or flag name: ``"ug/mL"`` -> ``"ug_per_mL"``, ``"1"`` -> ``"1"``.

    ``"1/min"`` -> ``"per_min"``; ``"mg/kg/h"`` -> ``"mg_per_kg_per_h"``; ``"%"`` -> ``"pct"``.
    """
    parse_unit(unit)  # refuse to spell what we cannot read
    text = re.sub(r"10\^(-?\d+)", r"1e\1", unit.strip()).replace("%", "pct").replace("^", "")
    if text.startswith("1/"):
        text = "per_" + text[2:]
    return text.replace("/", "_per_").replace("*", "_").replace(".", "_")


def token_to_unit(token: str) -> str:
    """Read a unit spelled by :func:`unit_to_token` back (``"mg_per_h"`` -> ``"mg/h"``).

    Raises
    ------
    UnitError
        When the result is not a known unit.
    """
    text = token
    if text.startswith("per_"):
        text = "1/" + text[4:]
    text = text.replace("_per_", "/").replace("pct", "%").replace("_", "*")
    text = re.sub(r"(?<=[A-Za-z])(?<!\de)(\d+)(?=$|[*/])", r"^\1", text)
    parse_unit(text)
    return text


def split_unit_suffix(key: str, names: Iterable[str]) -> tuple[str, str | None]:
    """Split ``"height_cm"`` into ``("height", "cm")`` given the declared *names*.

    A key equal to a declared name has no unit (``(key, None)``: the declared unit applies).
    Otherwise the longest declared name followed by ``_`` is taken and the rest read as a
    unit token (:func:`token_to_unit`). Returns ``(key, None)`` when no name matches.

    Raises
    ------
    UnitError
        When a declared name matches but the rest is not a unit.
    """
    names = list(names)
    if key in names:
        return key, None
    for name in sorted(names, key=len, reverse=True):
        if key.startswith(name + "_"):
            return name, token_to_unit(key[len(name) + 1:])
    return key, None


_QUANTITY_RE = re.compile(r"^\s*(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
                          r"(?P<unit>[A-Za-zµ%/^*.0-9]*)\s*$")


def parse_quantity(text: str, unit: str, *, what: str, require_unit: bool = False) -> float:
    """Read ``"1800"`` (already in *unit*) or ``"30min"``/``"24 h"`` and return it in *unit*.
    With *require_unit*, a bare number is refused (where no unit is implied, e.g. a drug
    concentration: ``"10"`` might mean mg/mL or mg/L).

    Raises
    ------
    UnitError
        For unreadable text, a missing unit (with *require_unit*) or a unit of another
        dimension, naming *what*.
    """
    match = _QUANTITY_RE.match(str(text))
    if not match:
        raise UnitError(f"{what}: cannot read {text!r}; expected a number, optionally with a "
                        f"unit such as {unit!r}")
    if require_unit and not match["unit"]:
        raise UnitError(f"{what} = {text!r}: give its unit, e.g. \"{match['num']} {unit}\"")
    value = float(match["num"])
    return value if not match["unit"] else convert(value, match["unit"], unit, what=what)


@dataclass(frozen=True)
class Substance:
    """What it takes to move one substance's quantities between mass, moles and (for insulin)
    activity units: its molar mass [g/mol] and, for an activity unit, nmol per U."""

    name: str
    molar_mass_g_per_mol: float
    reference: str
    nmol_per_unit: float | None = None


#: D-glucose, C6H12O6: 180.16 g/mol, so 1 mmol/L = 18.016 mg/dL (the factor 18 of clinical
#: practice rounds it).
GLUCOSE = Substance("glucose", 180.16, "molar mass of D-glucose C6H12O6 (IUPAC standard atomic "
                    "weights: 6 x 12.011 + 12 x 1.008 + 6 x 15.999 = 180.156 g/mol)")

#: Human insulin: 5808 g/mol; 1 U = 6.00 nmol (6000 pmol), the factor Volund 1993 derives for
#: human insulin from the specific activity of the international reference preparation, and the
#: one the Cambridge (Hovorka 2004) and UVA/Padova models are written in. The factor 6.945 pmol/L
#: per uU/mL also appears (assay and older literature); Knopp et al. 2019 review both and
#: recommend 6.00: we follow it, so one insulin unit has one molar amount across the package.
INSULIN = Substance("insulin", 5808.0, "Volund A. Conversion of insulin units to SI units. Am J "
                    "Clin Nutr 1993;58(5):714-5; Knopp JL, Holder-Pearson L, Chase JG. Insulin "
                    "units and conversion factors: a story of truth, boots, and faster "
                    "half-truths. J Diabetes Sci Technol 2019;13(3):597-600", nmol_per_unit=6.0)


def _as_moles(unit: Unit, substance: Substance, text: str, what: str
              ) -> tuple[tuple[tuple[str, int], ...], float]:
    """*unit*'s dimension and canonical factor with mass and insulin turned into mmol."""
    dims: dict[str, int] = {}
    factor = unit.factor
    for base, power in unit.dimension:
        if base == "mass":  # canonical mg: mg / (g/mol) = mmol
            factor /= substance.molar_mass_g_per_mol ** power
            base = "substance"
        elif base == "insulin":
            if substance.nmol_per_unit is None:
                raise UnitError(f"{what}: unit {text!r} is an insulin unit; {substance.name} "
                                f"has none")
            factor *= (substance.nmol_per_unit * 1e-6) ** power  # U -> mmol
            base = "substance"
        dims[base] = dims.get(base, 0) + power
    return tuple(sorted((b, p) for b, p in dims.items() if p != 0)), factor


def convert_substance(value: float, from_unit: str, to_unit: str, substance: Substance, *,
                      what: str = "value") -> float:
    """Convert a quantity of *substance* between units that may differ in mass, moles and
    (for insulin) U: ``convert_substance(5.5, "mmol/L", "mg/dL", GLUCOSE)`` is 99.09,
    ``convert_substance(1, "U", "pmol", INSULIN)`` is 6000.

    Raises
    ------
    UnitError
        When the units still differ in dimension once mass, moles and U are made one (e.g.
        mmol/L to mg), naming *what* and the substance.
    """
    a, b = parse_unit(from_unit), parse_unit(to_unit)
    dim_a, factor_a = _as_moles(a, substance, from_unit, what)
    dim_b, factor_b = _as_moles(b, substance, to_unit, what)
    if dim_a != dim_b:
        raise UnitError(f"{what}: unit {from_unit!r} ({a.describe_dimension()}) cannot be "
                        f"converted to {to_unit!r} ({b.describe_dimension()}), not even as "
                        f"{substance.name}")
    return value * factor_a / factor_b
