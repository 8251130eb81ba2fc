"""Model files: a published (or the user's own) model declared in TOML, built from the
library's blocks, with its fixed effects, covariates, covariate relations, random effects,
inter-occasion variability and residual error each declared once.

A model file is read into a :class:`FileEntry`, a
:class:`~mpc_dose.model.library.base.LibraryEntry` like the library's own, so it composes
with them (``"models/my_pk.toml+bis-propofol"``) and is used wherever a library name is
(:func:`mpc_dose.model.library.load`). The format is documented, with a worked example, in
``scenarios/models/README.md``; in short::

    [model]          title, notes
    [references]     key = "citation"                  (fixed effects cite a key)
    [[blocks]]       type = "mammillary" | "effect_compartment" | "emax_effect" | ...
                     and the keyword arguments of that block's factory
    [[circadian]]    param, harmonics, period_h        (a Cosinor)
    [covariates]     name = {unit, range, doc [, default]}
                     name = {choices, doc [, default, indicators = {NAME = "choice"}]}
    [fixed_effects]  name = {value, unit, doc, reference}
    [derived]        name = {relation, unit, doc [, reference]}   (intermediate values)
    [parameters]     model_parameter = "relation"      (typical value, declared unit)
    [omega]          model_parameter = {cv | variance | sd [, doc]}, correlations = [...]
    [iov]            model_parameter = {cv | variance | sd [, doc]}
    [residual_error.<output>]  kind = "additive" | "proportional" | "combined" | "exponential"

Relations are parsed by :mod:`mpc_dose.model.expression` (no ``eval``). Every problem is
reported as ``FILE:LINE: [table] key: what is wrong (did you mean ...?)``.

Reading the file is the one place of the model layer that touches a file
(:func:`read_model_file`); :func:`parse_model_file` works on text.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import casadi as ca

from ..errors import ModelError, UnitError, closest
from ..units import parse_quantity, parse_unit
from .expression import FUNCTIONS, Expression, ExpressionError, parse_expression
from .library.base import LibraryEntry
from .links import effect_compartment, transit_chain
from .pd import (bouillon_bis, emax_effect, friberg_myelosuppression, indirect_response,
                 linear_effect)
from .pk import mammillary, target_mediated
from .population import (Covariate, FixedEffect, PopulationModel, RandomEffect, ResidualError,
                         omega2_from_cv)
from .spec import CLOCK_PARAM, Block, Cosinor, Output

__all__ = ["FileEntry", "BLOCK_TYPES", "parse_model_file", "read_model_file",
           "is_model_file"]

#: The blocks a file may use, by the name of their factory (its keyword arguments are the
#: block's keys; an argument of type Output takes the name of an output of an earlier block).
BLOCK_TYPES: dict[str, Callable[..., Block]] = {
    f.__name__: f for f in (mammillary, target_mediated, effect_compartment, transit_chain,
                            linear_effect, emax_effect, bouillon_bis, indirect_response,
                            friberg_myelosuppression)}

_ANNOTATIONS = {"str": "a string", "str | None": "a string", "int": "a whole number",
                "bool": "true or false", "Output": "the name of an output"}

_SECTIONS = ("model", "references", "blocks", "circadian", "covariates", "fixed_effects",
             "derived", "parameters", "omega", "iov", "residual_error")
_REQUIRED_SECTIONS = ("model", "references", "blocks", "fixed_effects", "parameters")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VARIABILITY_KEYS = ("cv", "variance", "sd")
_ERROR_KINDS = ("additive", "proportional", "combined", "exponential")


def is_model_file(name: str) -> bool:
    """True when *name* (one part of a model name) is a model file: it ends in ``.toml``."""
    return name.strip().lower().endswith(".toml")


@dataclass(frozen=True)
class FileEntry(LibraryEntry):
    """A library entry read from a model file: *path* is where it came from, *relations*
    its derived values and typical-value relations as written, ``(name, expression)`` in
    the order they are evaluated."""

    path: str = ""
    relations: tuple[tuple[str, str], ...] = ()


# ---------------------------------------------------------------- locating keys
def _key_parts(text: str) -> list[str]:
    parts = re.findall(r'"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([A-Za-z0-9_-]+)', text)
    return [a or b or c for a, b, c in parts]


_KEY = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_KEY_LINE = re.compile(rf"^({_KEY}(?:\s*\.\s*{_KEY})*)\s*=\s*(.*)$")
_INLINE_KEY = re.compile(rf"[{{,]\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*=")


class _Locator:
    """The line of each key of a TOML text (best effort: headers, ``key = value`` lines
    and the keys of one-line inline tables), to point at the line of a problem."""

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple, int] = {}
        header: tuple = ()
        arrays: dict[tuple, int] = {}
        open_string = None
        for number, line in enumerate(text.splitlines(), 1):
            if open_string is not None:
                if open_string in line:
                    open_string = None
                continue
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if s.startswith("[["):
                key = tuple(_key_parts(s[2:s.find("]]")]))
                arrays[key] = arrays.get(key, -1) + 1
                header = key + (arrays[key],)
                self.lines.setdefault(header, number)
                continue
            if s.startswith("["):
                header = tuple(_key_parts(s[1:s.find("]")]))
                self.lines.setdefault(header, number)
                continue
            match = _KEY_LINE.match(s)
            if not match:
                continue
            path = header + tuple(_key_parts(match[1]))
            self.lines.setdefault(path, number)
            value = match[2]
            for inner in _INLINE_KEY.finditer(value):
                self.lines.setdefault(path + tuple(_key_parts(inner[1])), number)
            for quote in ('"""', "'''"):
                if value.startswith(quote) and value.count(quote) == 1:
                    open_string = quote

    def line(self, path: tuple) -> int | None:
        for end in range(len(path), 0, -1):
            if path[:end] in self.lines:
                return self.lines[path[:end]]
        return None


def _where(path: tuple) -> str:
    """``("covariates", "crcl", "range")`` -> ``"[covariates.crcl] range"``,
    ``("blocks", 1, "driver")`` -> ``"[[blocks]] #2 driver"``."""
    def shown(parts):
        return " ".join(f"#{p + 1}" if isinstance(p, int) else str(p) for p in parts)

    if not path:
        return "the file"
    if len(path) > 1 and isinstance(path[1], int):
        return f"[[{path[0]}]] {shown(path[1:])}"
    if len(path) == 1:
        return f"[{path[0]}]"
    if any(isinstance(p, int) for p in path):
        return f"[{path[0]}] {shown(path[1:])}"
    return f"[{'.'.join(str(p) for p in path[:-1])}] {path[-1]}"


# ---------------------------------------------------------------- the reader
class _Reader:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.locator = _Locator(text)

    def error(self, path: tuple, message: str) -> ModelError:
        line = self.locator.line(path)
        place = f"{self.source}:{line}" if line is not None else self.source
        return ModelError(f"{place}: {_where(path)}: {message}")

    def table(self, path: tuple, value: object) -> dict:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a table, got {value!r}")
        return value

    def keys(self, path: tuple, table: Mapping, allowed: Sequence[str],
             required: Sequence[str] = ()) -> None:
        for key in table:
            if key not in allowed:
                raise self.error(path + (key,), f"unknown key{closest(key, allowed)}; "
                                                f"expected: {', '.join(allowed)}")
        for key in required:
            if key not in table:
                raise self.error(path + (key,), "missing")

    def string(self, path: tuple, value: object, *, empty: bool = False) -> str:
        if not isinstance(value, str) or (not empty and not value.strip()):
            raise self.error(path, f"expected {'a' if empty else 'a non-empty'} string, "
                                   f"got {value!r}")
        return value

    def number(self, path: tuple, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise self.error(path, f"expected a finite number, got {value!r}")
        return float(value)

    def name(self, path: tuple, name: str, what: str) -> str:
        if not _NAME.match(name):
            raise self.error(path, f"{what} name {name!r}: expected letters, digits and '_', "
                                   f"starting with a letter or '_'")
        if name in FUNCTIONS:
            raise self.error(path, f"{what} name {name!r} is a function of relations; "
                                   f"choose another name")
        return name

    def unit(self, path: tuple, value: object) -> str:
        unit = self.string(path, value)
        try:
            parse_unit(unit)
        except UnitError as err:
            raise self.error(path, str(err)) from None
        return unit

    def quantity(self, path: tuple, value: object, unit: str) -> float:
        """A number in *unit*, or a string with its own unit (``"3.4 mg/L"``)."""
        if isinstance(value, str):
            try:
                return parse_quantity(value, unit, what=_where(path))
            except UnitError as err:
                raise self.error(path, str(err).removeprefix(_where(path) + ": ")) from None
        return self.number(path, value)


# ---------------------------------------------------------------- sections
@dataclass(frozen=True)
class _BlockSpec:
    index: int
    type: str
    args: dict
    outputs: tuple[str, ...]  # keyword arguments that name an output


def _block_specs(r: _Reader, raw: object) -> list[_BlockSpec]:
    if not isinstance(raw, list) or not raw or not all(isinstance(b, dict) for b in raw):
        raise r.error(("blocks",), "expected one or more [[blocks]] tables")
    specs = []
    for k, block in enumerate(raw):
        path = ("blocks", k)
        if "type" not in block:
            raise r.error(path + ("type",), f"missing; expected one of "
                                            f"{', '.join(BLOCK_TYPES)}")
        kind = r.string(path + ("type",), block["type"])
        if kind not in BLOCK_TYPES:
            raise r.error(path + ("type",), f"unknown block type {kind!r}"
                                            f"{closest(kind, BLOCK_TYPES)}; expected one of "
                                            f"{', '.join(BLOCK_TYPES)}")
        signature = inspect.signature(BLOCK_TYPES[kind]).parameters
        allowed = ["type", *signature]
        required = [n for n, p in signature.items() if p.default is inspect.Parameter.empty]
        r.keys(path, block, allowed, required)
        args, outputs = {}, []
        for key, value in block.items():
            if key == "type":
                continue
            annotation = signature[key].annotation
            expected = _ANNOTATIONS[annotation]
            ok = {"str": isinstance(value, str), "str | None": isinstance(value, str),
                  "int": isinstance(value, int) and not isinstance(value, bool),
                  "bool": isinstance(value, bool),
                  "Output": isinstance(value, str)}[annotation]
            if not ok:
                raise r.error(path + (key,), f"expected {expected}, got {value!r}")
            if annotation == "Output":
                outputs.append(key)
            args[key] = value
        specs.append(_BlockSpec(k, kind, args, tuple(outputs)))
    return specs


def _build_blocks(r: _Reader, specs: Sequence[_BlockSpec], available: Mapping[str, Output]
                  ) -> list[Block]:
    known = dict(available)
    blocks = []
    for spec in specs:
        kwargs = dict(spec.args)
        for key in spec.outputs:
            name = kwargs[key]
            if name not in known:
                raise r.error(("blocks", spec.index, key),
                              f"no output {name!r} from an earlier block or model"
                              f"{closest(name, known)}; outputs before this block: "
                              f"{', '.join(known) or 'none'} (an output of another model "
                              f"needs that model first: 'pk.toml+this.toml')")
            kwargs[key] = known[name]
        try:
            block = BLOCK_TYPES[spec.type](**kwargs)
        except ModelError as err:
            raise r.error(("blocks", spec.index), str(err)) from None
        for out in block.outputs:
            known[out.name] = out
        blocks.append(block)
    return blocks


def _requires(r: _Reader, specs: Sequence[_BlockSpec]) -> tuple[list[Block], tuple[str, ...]]:
    """Build the blocks once on their own: outputs no earlier block gives are required from
    a model before this one in a composition (stand-ins of unit '1' take their place)."""
    known: dict[str, Output] = {}
    required: dict[str, tuple] = {}
    blocks = []
    for spec in specs:
        for key in spec.outputs:
            name = spec.args[key]
            if name not in known:
                required.setdefault(name, ("blocks", spec.index, key))
                known[name] = Output(name, "1", "output of a model composed before",
                                     ca.SX.sym(name))
        block = _build_blocks(r, [spec], known)[0]
        for out in block.outputs:
            if out.name in required:
                raise r.error(required[out.name], f"{out.name!r} is an output of a later "
                                                  f"block (#{spec.index + 1}): put that block "
                                                  f"first")
            known[out.name] = out
        blocks.append(block)
    return blocks, tuple(required)


_COSINOR_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Cosinor)}


def _circadian(r: _Reader, raw: object, own_params: Sequence[str]) -> tuple[Cosinor, ...]:
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise r.error(("circadian",), "expected [[circadian]] tables")
    out = []
    for k, c in enumerate(raw):
        path = ("circadian", k)
        r.keys(path, c, ("param", "harmonics", "period_h"), ("param",))
        param = r.string(path + ("param",), c["param"])
        if param not in own_params:
            raise r.error(path + ("param",), f"{param!r} is not a parameter of this file's "
                                             f"blocks{closest(param, own_params)}")
        # the defaults are Cosinor's own, declared there
        harmonics = c.get("harmonics", _COSINOR_DEFAULTS["harmonics"])
        if isinstance(harmonics, bool) or not isinstance(harmonics, int) or harmonics < 1:
            raise r.error(path + ("harmonics",), f"expected a whole number >= 1, got "
                                                 f"{harmonics!r}")
        period = r.number(path + ("period_h",),
                          c.get("period_h", _COSINOR_DEFAULTS["period_h"]))
        if not period > 0:
            raise r.error(path + ("period_h",), f"expected a period > 0 h, got {period!r}")
        out.append(Cosinor(param, harmonics, period))
    return tuple(out)


def _covariates(r: _Reader, raw: object) -> tuple[list[Covariate], dict[str, tuple[str, tuple]]]:
    """The covariates, and the indicators of categorical ones: name -> (covariate, choices)."""
    table = r.table(("covariates",), raw)
    covariates, indicators = [], {}
    for name, spec in table.items():
        path = ("covariates", name)
        r.name(path, name, "covariate")
        spec = r.table(path, spec)
        if "choices" in spec:
            r.keys(path, spec, ("choices", "doc", "default", "indicators"), ("choices", "doc"))
            choices = spec["choices"]
            if not isinstance(choices, list) or not choices or \
                    not all(isinstance(c, str) and c.strip() for c in choices) or \
                    len(set(choices)) != len(choices):
                raise r.error(path + ("choices",), f"expected a list of distinct strings, "
                                                   f"got {choices!r}")
            upper = [c for c in choices if c != c.strip().lower()]
            if upper:
                raise r.error(path + ("choices",), f"{upper[0]!r}: choices are lower case "
                                                   f"(given values are matched ignoring case)")
            default = spec.get("default")
            if default is not None and default not in choices:
                raise r.error(path + ("default",), f"expected one of {', '.join(choices)}, "
                                                   f"got {default!r}")
            inds = r.table(path + ("indicators",), spec.get("indicators", {}))
            for ind, which in inds.items():
                ipath = path + ("indicators", ind)
                r.name(ipath, ind, "indicator")
                which = [which] if isinstance(which, str) else which
                if not isinstance(which, list) or not which or \
                        any(w not in choices for w in which):
                    raise r.error(ipath, f"expected a choice or a list of choices of {name!r} "
                                         f"({', '.join(choices)}), got {inds[ind]!r}")
                if ind in indicators:
                    raise r.error(ipath, f"indicator {ind!r} is declared twice")
                indicators[ind] = (name, tuple(which))
            covariates.append(Covariate(name, "", r.string(path + ("doc",), spec["doc"]),
                                        choices=tuple(choices), default=default))
            continue
        r.keys(path, spec, ("unit", "range", "doc", "default"), ("unit", "range", "doc"))
        unit = r.unit(path + ("unit",), spec["unit"])
        bounds = spec["range"]
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise r.error(path + ("range",), f"expected [lower, upper] in {unit}, got "
                                             f"{bounds!r}")
        lower, upper = (r.number(path + ("range",), b) for b in bounds)
        if not lower < upper:
            raise r.error(path + ("range",), f"expected lower < upper, got {bounds!r}")
        default = spec.get("default")
        if default is not None:
            default = r.number(path + ("default",), default)
            if not lower <= default <= upper:
                raise r.error(path + ("default",), f"{default!r} is outside the range "
                                                   f"[{lower:g}, {upper:g}] {unit}")
        covariates.append(Covariate(name, unit, r.string(path + ("doc",), spec["doc"]),
                                    lower, upper, default=default))
    return covariates, indicators


def _fixed_effects(r: _Reader, raw: object, references: Mapping[str, str]
                   ) -> list[FixedEffect]:
    out = []
    for name, spec in r.table(("fixed_effects",), raw).items():
        path = ("fixed_effects", name)
        r.name(path, name, "fixed effect")
        spec = r.table(path, spec)
        r.keys(path, spec, ("value", "unit", "doc", "reference"),
               ("value", "unit", "doc", "reference"))
        out.append(FixedEffect(name, r.number(path + ("value",), spec["value"]),
                               r.unit(path + ("unit",), spec["unit"]),
                               r.string(path + ("doc",), spec["doc"]),
                               _reference(r, path + ("reference",), spec["reference"],
                                          references)))
    return out


def _reference(r: _Reader, path: tuple, key: object, references: Mapping[str, str]) -> str:
    key = r.string(path, key)
    if key not in references:
        raise r.error(path, f"{key!r} is not a key of [references]{closest(key, references)}; "
                            f"keys: {', '.join(references) or 'none'}")
    return references[key]


def _variance(r: _Reader, path: tuple, spec: object) -> tuple[float, str]:
    spec = r.table(path, spec)
    r.keys(path, spec, (*_VARIABILITY_KEYS, "doc"))
    given = [k for k in _VARIABILITY_KEYS if k in spec]
    if len(given) != 1:
        raise r.error(path, "give exactly one of cv (coefficient of variation of the "
                            "parameter, omega^2 = ln(1 + cv^2)), variance (omega^2 of eta) or "
                            "sd (of eta)")
    key = given[0]
    value = r.number(path + (key,), spec[key])
    if not value > 0:
        raise r.error(path + (key,), f"expected a value > 0, got {value!r}")
    omega2 = {"cv": omega2_from_cv, "variance": lambda v: v, "sd": lambda v: v**2}[key](value)
    return omega2, r.string(path + ("doc",), spec.get("doc", ""), empty=True)


def _random_effects(r: _Reader, section: str, raw: object, with_relation: Sequence[str]
                    ) -> tuple[list[RandomEffect], dict[tuple[str, str], float]]:
    table = r.table((section,), raw)
    effects = []
    for name, spec in table.items():
        if section == "omega" and name == "correlations":
            continue
        path = (section, name)
        if name not in with_relation:
            raise r.error(path, f"{name!r} is not a parameter with a relation in [parameters]"
                                f"{closest(name, with_relation)}")
        omega2, doc = _variance(r, path, spec)
        effects.append(RandomEffect(name, omega2, doc))
    correlations: dict[tuple[str, str], float] = {}
    if section == "omega" and "correlations" in table:
        items = table["correlations"]
        if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
            raise r.error(("omega", "correlations"), "expected a list of tables "
                          "{ between = [\"a\", \"b\"], rho = 0.3 } (or covariance instead of rho)")
        variance = {e.param: e.omega2 for e in effects}
        for k, c in enumerate(items):
            path = ("omega", "correlations", k)
            r.keys(path, c, ("between", "rho", "covariance"), ("between",))
            pair = c["between"]
            if not isinstance(pair, list) or len(pair) != 2 or pair[0] == pair[1] or \
                    any(p not in variance for p in pair):
                raise r.error(path + ("between",), f"expected two different parameters of "
                                                   f"[omega] ({', '.join(variance)}), got "
                                                   f"{pair!r}")
            if ("rho" in c) == ("covariance" in c):
                raise r.error(path, "give either rho (a correlation) or covariance (of the "
                                    "two etas)")
            if "rho" in c:
                rho = r.number(path + ("rho",), c["rho"])
            else:
                cov = r.number(path + ("covariance",), c["covariance"])
                rho = cov / math.sqrt(variance[pair[0]] * variance[pair[1]])
            if not -1 < rho < 1:
                raise r.error(path, f"the correlation is {rho:.4g}: expected between -1 and 1")
            key = (pair[0], pair[1])
            if key in correlations or key[::-1] in correlations:
                raise r.error(path, f"the correlation of {pair[0]} and {pair[1]} is given twice")
            correlations[key] = rho
    return effects, correlations


def _residual_errors(r: _Reader, raw: object, outputs: Mapping[str, Output]
                     ) -> list[ResidualError]:
    out = []
    for name, spec in r.table(("residual_error",), raw).items():
        path = ("residual_error", name)
        if name not in outputs:
            raise r.error(path, f"{name!r} is not an output of this file's blocks"
                                f"{closest(name, outputs)}; outputs: {', '.join(outputs)}")
        spec = r.table(path, spec)
        kind = spec.get("kind")
        if kind not in _ERROR_KINDS:
            raise r.error(path + ("kind",), f"expected one of {', '.join(_ERROR_KINDS)}, got "
                                            f"{kind!r}")
        needs = {"additive": ("additive",), "proportional": ("proportional",),
                 "combined": ("additive", "proportional", "combine"),
                 "exponential": ("sd",)}[kind]
        r.keys(path, spec, ("kind", *needs), needs)
        values = {}
        for key in needs:
            if key == "combine":
                continue
            unit = outputs[name].unit if key == "additive" else "1"
            values[key] = r.quantity(path + (key,), spec[key], unit)
            if not values[key] > 0:
                raise r.error(path + (key,), f"expected a value > 0, got {spec[key]!r}")
        if kind == "exponential":
            out.append(ResidualError(name, proportional=values["sd"], kind="exponential"))
            continue
        combine = "quadrature"
        if kind == "combined":
            combine = spec["combine"]
            if combine not in ("sum", "quadrature"):
                raise r.error(path + ("combine",), f"expected 'sum' (sd = additive + "
                              f"proportional f) or 'quadrature' (sd = sqrt(additive^2 + "
                              f"(proportional f)^2)), got {combine!r}")
        out.append(ResidualError(name, values.get("additive", 0.0),
                                 values.get("proportional", 0.0), combine))
    return out


# ---------------------------------------------------------------- relations
@dataclass(frozen=True)
class _Relation:
    name: str
    path: tuple
    expression: Expression


def _relations(r: _Reader, derived_raw: object, parameters_raw: object,
               namespace: dict[str, str], categorical: Mapping[str, Sequence[str]],
               own_params: Mapping[str, object], circadian_params: Sequence[str],
               references: Mapping[str, str]) -> tuple[list[_Relation], list[_Relation]]:
    """Parse [derived] and [parameters] in order; *namespace* maps every name a relation may
    use so far to what it is (grows as relations are read)."""
    later: dict[str, tuple] = {}
    derived_table = r.table(("derived",), derived_raw)
    parameter_table = r.table(("parameters",), parameters_raw)
    for name in derived_table:
        later[name] = ("derived",)
    for name in parameter_table:
        later[name] = ("parameters",)

    def parse(path: tuple, text: object) -> Expression:
        text = r.string(path, text)
        try:
            expression = parse_expression(text)
        except ExpressionError as err:
            raise r.error(path, f"{err} at character {err.position + 1} of {text!r}") from None
        for used, position in expression.names.items():
            if used in namespace:
                continue
            if used in categorical:
                hint = (f"; declare e.g. indicators = {{ {used.upper()}_"
                        f"{categorical[used][0].upper()} = \"{categorical[used][0]}\" }} in "
                        f"[covariates.{used}] and use that (1 or 0)")
                raise r.error(path, f"{used!r} is a categorical covariate, not a number"
                                    f"{hint}")
            if used == path[1]:
                raise r.error(path, f"the relation of {used!r} uses {used!r} itself")
            if used in later:
                raise r.error(path, f"{used!r} is defined below, in [{later[used][0]}]: "
                                    f"relations are evaluated in order, move it up")
            raise r.error(path, f"unknown name {used!r}{closest(used, namespace)} at "
                                f"character {position + 1} of {text!r}")
        return expression

    derived = []
    for name, spec in derived_table.items():
        path = ("derived", name)
        r.name(path, name, "derived value")
        if name in own_params or name in circadian_params:
            raise r.error(path, f"{name!r} is already a parameter of the blocks: a derived "
                                f"value has a name of its own")
        if name in namespace:
            raise r.error(path, f"{name!r} is already declared ({namespace[name]}): every "
                                f"name is declared once")
        spec = r.table(path, spec)
        r.keys(path, spec, ("relation", "unit", "doc", "reference"), ("relation", "unit", "doc"))
        r.unit(path + ("unit",), spec["unit"])
        r.string(path + ("doc",), spec["doc"])
        if "reference" in spec:
            _reference(r, path + ("reference",), spec["reference"], references)
        expression = parse(path + ("relation",), spec["relation"])
        derived.append(_Relation(name, path + ("relation",), expression))
        namespace[name] = "derived value"

    parameters = []
    for name, text in parameter_table.items():
        path = ("parameters", name)
        if name == CLOCK_PARAM:
            raise r.error(path, f"{CLOCK_PARAM} is the clock time at t = 0, set by the "
                                f"scenario (start_clock_h), not a relation")
        if name not in own_params and name not in circadian_params:
            raise r.error(path, f"{name!r} is not a parameter of this file's blocks"
                                f"{closest(name, [*own_params, *circadian_params])}; "
                                f"parameters: {', '.join([*own_params, *circadian_params])}")
        if name in namespace:
            raise r.error(path, f"{name!r} is already declared ({namespace[name]}): every "
                                f"name is declared once")
        parameters.append(_Relation(name, path, parse(path, text)))
        namespace[name] = "parameter"
    missing = [p for p in own_params if p not in parameter_table]
    if missing:
        p = own_params[missing[0]]
        raise r.error(("parameters",), f"no relation for {', '.join(missing)} (e.g. "
                                       f"{p.name} [{p.unit}]: {p.doc}); every parameter of "
                                       f"the blocks needs its typical value")
    return derived, parameters


def _typical_function(r: _Reader, covariates: Sequence[Covariate],
                      indicators: Mapping[str, tuple[str, tuple]], thetas: Sequence[str],
                      derived: Sequence[_Relation], parameters: Sequence[_Relation]):
    continuous = [c.name for c in covariates if not c.is_categorical]

    def typical(c: Mapping[str, float | str], th: Mapping[str, float]) -> dict[str, float]:
        env: dict[str, float] = {name: float(c[name]) for name in continuous}
        for ind, (cov, choices) in indicators.items():
            env[ind] = 1.0 if c[cov] in choices else 0.0
        for name in thetas:
            env[name] = th[name]
        out: dict[str, float] = {}
        for relation in (*derived, *parameters):
            try:
                value = relation.expression(env)
            except ExpressionError as err:
                shown = ", ".join(f"{k} = {v!r}" for k, v in c.items())
                raise r.error(relation.path, f"cannot evaluate {relation.expression.text!r} "
                                             f"for {shown or 'no covariates'}: {err}") from None
            env[relation.name] = value
            if relation.path[0] == "parameters":
                out[relation.name] = value
        return out

    return typical


# ---------------------------------------------------------------- the file
def parse_model_file(text: str, *, source: str, name: str) -> FileEntry:
    """Read a model file's *text* into a :class:`FileEntry` called *name*; *source* names
    the file in messages.

    Raises
    ------
    ModelError
        ``source:line: [table] key: what is wrong``: invalid TOML (tomllib's line and
        column), an unknown or missing key (with the nearest valid one), a value of the
        wrong type or out of range, an unknown unit, an unknown name in a relation (with
        the nearest known one), a parameter without a relation, Omega not positive definite.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        line = re.search(r"at line (\d+)", str(err))
        place = f"{source}:{line[1]}" if line else source
        raise ModelError(f"{place}: not valid TOML: {err}") from None
    r = _Reader(text, source)
    r.keys((), data, _SECTIONS, _REQUIRED_SECTIONS)

    model = r.table(("model",), data["model"])
    r.keys(("model",), model, ("title", "notes"), ("title",))
    title = r.string(("model", "title"), model["title"])
    notes = r.string(("model", "notes"), model.get("notes", ""), empty=True)
    references = {}
    for key, value in r.table(("references",), data["references"]).items():
        references[key] = r.string(("references", key), value)

    specs = _block_specs(r, data["blocks"])
    blocks, requires = _requires(r, specs)
    own_params = {p.name: p for b in blocks for p in b.params}
    outputs = {o.name: o for b in blocks for o in b.outputs}
    circadian = _circadian(r, data.get("circadian", []), list(own_params))
    circadian_params = [f"{c.param}_{what}_{k}" for c in circadian
                        for k in range(1, c.harmonics + 1) for what in ("amplitude", "acrophase")]

    covariates, indicators = _covariates(r, data.get("covariates", {}))
    thetas = _fixed_effects(r, data["fixed_effects"], references)
    namespace: dict[str, str] = {}
    for kind, names in (("covariate", [c.name for c in covariates if not c.is_categorical]),
                        ("categorical covariate", [c.name for c in covariates
                                                   if c.is_categorical]),
                        ("indicator", list(indicators)),
                        ("fixed effect", [t.name for t in thetas])):
        section = {"fixed effect": "fixed_effects"}.get(kind, "covariates")
        for n in names:
            if n in namespace or n in own_params or n in circadian_params:
                what = namespace.get(n, "parameter of the blocks")
                raise r.error((section, n), f"{n!r} is already declared ({what}): every "
                                            f"name is declared once")
            namespace[n] = kind
    categorical = {c.name: c.choices for c in covariates if c.is_categorical}
    for n in categorical:
        del namespace[n]
    derived, parameters = _relations(r, data.get("derived", {}), data["parameters"],
                                     namespace, categorical, own_params, circadian_params,
                                     references)
    with_relation = [p.name for p in parameters]
    omega, correlations = _random_effects(r, "omega", data.get("omega", {}), with_relation)
    iov, _ = _random_effects(r, "iov", data.get("iov", {}), with_relation)
    residual = _residual_errors(r, data.get("residual_error", {}), outputs)

    typical = _typical_function(r, covariates, indicators, [t.name for t in thetas],
                                derived, parameters)
    try:
        population = PopulationModel(tuple(covariates), tuple(thetas), typical, tuple(omega),
                                     correlations, tuple(iov), tuple(residual))
    except ModelError as err:
        raise r.error(("omega",), str(err)) from None

    def build(available: Mapping[str, Output]) -> list[Block]:
        return _build_blocks(r, specs, available)

    return FileEntry(name=name, title=title, references=tuple(references.values()),
                     blocks=build, population=population, requires=requires,
                     circadian=circadian, notes=notes, path=source,
                     relations=tuple((rel.name, rel.expression.text)
                                     for rel in (*derived, *parameters)))


def read_model_file(path: str | Path, *, source: str | None = None) -> FileEntry:
    """Read the model file at *path* (see :func:`parse_model_file`); *source* names it in
    messages (*path* when not given). The entry is named after the file (its stem).

    Raises
    ------
    ModelError
        For a file that cannot be read, or any problem in it.
    """
    path = Path(path)
    source = source or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ModelError(f"model file {source!r}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ModelError(f"model file {source!r}: not UTF-8 text") from None
    return parse_model_file(text, source=source, name=path.stem)
