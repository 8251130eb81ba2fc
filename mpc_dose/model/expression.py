"""Arithmetic expressions of covariate relations, parsed without ``eval``.

A model file writes each typical value as an expression (NONMEM's ``$PK`` style)::

    goti_cl * (min(crcl, goti_crcl_cap) / 120)^goti_cl_crcl * goti_cl_dialysis^DIAL

The grammar is small and closed: numbers (``120``, ``0.8``, ``1e-3``), names, ``+ - * /``,
``^`` (power, right-associative and binding tighter than a unary minus: ``-x^2`` is
``-(x^2)``, as Python's ``**``), parentheses and the functions ``exp``, ``log`` (natural),
``sqrt``, ``min`` and ``max`` (two or more arguments). Nothing else is accepted: no
attribute access, no calls of other functions, no strings, no comparisons. An expression is
parsed once into a tree and evaluated on floats with the operations Python itself applies
to ``float`` values, so a relation gives the same number, to the last bit, as the same
relation written in Python.

This module is pure: standard library only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import ModelError

__all__ = ["Expression", "parse_expression", "FUNCTIONS", "ExpressionError"]


class ExpressionError(ModelError):
    """An expression cannot be read, names something unknown, or cannot be evaluated.
    *position* is the 0-based character where the problem is (None when not one place)."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


def _power(a: float, b: float) -> float:
    result = a ** b
    if isinstance(result, complex):
        raise ExpressionError(f"{a!r}^{b!r} is not a real number")
    return result


def _checked(name: str, function: Callable[[float], float]) -> Callable[[float], float]:
    def call(x: float) -> float:
        try:
            return function(x)
        except ValueError:
            raise ExpressionError(f"{name}({x!r}) is undefined") from None
    return call


#: The functions an expression may call: name -> (function, least, most arguments).
FUNCTIONS: dict[str, tuple[Callable[..., float], int, int | None]] = {
    "exp": (math.exp, 1, 1),
    "log": (_checked("log", math.log), 1, 1),
    "sqrt": (_checked("sqrt", math.sqrt), 1, 1),
    "min": (min, 2, None),
    "max": (max, 2, None),
}

_BINARY = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "^": _power,
}

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\*\*|[-+*/^(),])
""", re.VERBOSE)


@dataclass(frozen=True)
class _Token:
    kind: str  # "number", "name", "op", "end"
    text: str
    position: int


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            char = text[position]
            hint = {"=": " (comparisons are not part of relations: use an indicator of a "
                         "categorical covariate)",
                    "'": " (strings are not part of relations)",
                    '"': " (strings are not part of relations)",
                    ".": " (no attribute access)"}.get(char, "")
            raise ExpressionError(f"unexpected character {char!r}{hint}", position)
        kind = match.lastgroup
        if kind == "op" and match.group() == "**":
            raise ExpressionError("'**' is not an operator here: write a power with '^'",
                                  position)
        if kind != "space":
            out.append(_Token(kind, match.group(), position))
        position = match.end()
    out.append(_Token("end", "", len(text)))
    return out


# Nodes: each is a tuple whose first item says what it is; evaluated by _evaluate.
#   ("num", value) | ("name", name, position) | ("neg", node)
#   | ("bin", op, left, right, position) | ("call", name, [args], position)


class _Parser:
    """Recursive descent over::

        expr  := term (('+' | '-') term)*
        term  := unary (('*' | '/') unary)*
        unary := ('-' | '+') unary | power
        power := atom ('^' unary)?
        atom  := number | name | name '(' expr (',' expr)* ')' | '(' expr ')'
    """

    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.i = 0

    @property
    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def expect(self, text: str) -> _Token:
        token = self.peek
        if token.text != text:
            found = f"{token.text!r}" if token.kind != "end" else "the end"
            raise ExpressionError(f"expected {text!r}, found {found}", token.position)
        return self.take()

    def parse(self):
        if self.peek.kind == "end":
            raise ExpressionError("the expression is empty", 0)
        node = self.expr()
        if self.peek.kind != "end":
            raise ExpressionError(f"unexpected {self.peek.text!r} (an operator is missing?)",
                                  self.peek.position)
        return node

    def expr(self):
        node = self.term()
        while self.peek.text in ("+", "-"):
            op = self.take()
            node = ("bin", op.text, node, self.term(), op.position)
        return node

    def term(self):
        node = self.unary()
        while self.peek.text in ("*", "/"):
            op = self.take()
            node = ("bin", op.text, node, self.unary(), op.position)
        return node

    def unary(self):
        if self.peek.text == "-":
            self.take()
            return ("neg", self.unary())
        if self.peek.text == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        node = self.atom()
        if self.peek.text == "^":
            op = self.take()
            node = ("bin", "^", node, self.unary(), op.position)
        return node

    def atom(self):
        token = self.take()
        if token.kind == "number":
            return ("num", float(token.text))
        if token.kind == "name":
            if self.peek.text != "(":
                return ("name", token.text, token.position)
            if token.text not in FUNCTIONS:
                raise ExpressionError(f"unknown function {token.text!r}; functions: "
                                      f"{', '.join(FUNCTIONS)}", token.position)
            self.take()
            args = [self.expr()]
            while self.peek.text == ",":
                self.take()
                args.append(self.expr())
            self.expect(")")
            _, least, most = FUNCTIONS[token.text]
            if len(args) < least or (most is not None and len(args) > most):
                wanted = f"{least}" if least == most else f"at least {least}"
                raise ExpressionError(f"{token.text}() takes {wanted} argument"
                                      f"{'s' if least != 1 else ''}, got {len(args)}",
                                      token.position)
            return ("call", token.text, args, token.position)
        if token.text == "(":
            node = self.expr()
            self.expect(")")
            return node
        found = f"{token.text!r}" if token.kind != "end" else "the end"
        raise ExpressionError(f"expected a number, a name or '(', found {found}",
                              token.position)


def _names(node, out: dict[str, int]) -> None:
    kind = node[0]
    if kind == "name":
        out.setdefault(node[1], node[2])
    elif kind == "neg":
        _names(node[1], out)
    elif kind == "bin":
        _names(node[2], out)
        _names(node[3], out)
    elif kind == "call":
        for arg in node[2]:
            _names(arg, out)


def _evaluate(node, env: Mapping[str, float]) -> float:
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "name":
        return env[node[1]]
    if kind == "neg":
        return -_evaluate(node[1], env)
    if kind == "bin":
        a, b = _evaluate(node[2], env), _evaluate(node[3], env)
        try:
            return _BINARY[node[1]](a, b)
        except ZeroDivisionError:
            raise ExpressionError(f"division by zero ({a!r} {node[1]} {b!r})",
                                  node[4]) from None
        except OverflowError:
            raise ExpressionError(f"overflow ({a!r} {node[1]} {b!r})", node[4]) from None
        except ExpressionError as err:
            raise ExpressionError(str(err), node[4]) from None
    function = FUNCTIONS[node[1]][0]
    args = [_evaluate(arg, env) for arg in node[2]]
    try:
        return function(*args)
    except OverflowError:
        raise ExpressionError(f"overflow in {node[1]}({', '.join(map(repr, args))})",
                              node[3]) from None
    except ExpressionError as err:
        raise ExpressionError(str(err), node[3]) from None


@dataclass(frozen=True, eq=False)
class Expression:
    """A parsed expression: its *text*, the *names* it uses (with the position of each's
    first use) and :meth:`__call__` evaluating it for values of those names."""

    text: str
    names: dict[str, int]
    _tree: tuple

    def __call__(self, env: Mapping[str, float]) -> float:
        """The value for the names' values in *env* (floats).

        Raises
        ------
        ExpressionError
            For a division by zero, an overflow, a power or function without a real value
            (``log`` of a negative number, a negative number to a fractional power), or a
            result that is not finite.
        """
        missing = [n for n in self.names if n not in env]
        if missing:
            raise ExpressionError(f"no value for {', '.join(missing)}", self.names[missing[0]])
        value = _evaluate(self._tree, env)
        if not math.isfinite(value):
            raise ExpressionError(f"the value is {value!r}, not a finite number")
        return float(value)


def parse_expression(text: str) -> Expression:
    """Parse *text* (see the module docstring for the grammar).

    Raises
    ------
    ExpressionError
        Naming what was expected and where (``position``: 0-based character).
    """
    if not isinstance(text, str):
        raise ExpressionError(f"expected an expression as a string, got {text!r}")
    tree = _Parser(text).parse()
    names: dict[str, int] = {}
    _names(tree, names)
    return Expression(text, names, tree)
