"""Declarations (parameters, states, inputs, outputs), blocks, and the compiled :class:`Model`.

A *block* is a small piece of pharmacology (a compartment model, an effect site, an Emax
curve) holding CasADi symbols and the equations between them. Blocks are composed into one
:class:`Model`, which compiles them into CasADi functions with one signature::

    f(t, x, u, p) -> dx/dt        h(t, x, u, p) -> y        x0(p) -> x(0)

Units. Every declaration carries its unit. Parameter values (``p``) and state values (``x``)
are held in their *declared* units (the literature's L/min, ug/mL, ...), so the numbers a user
reads and writes are the published ones. Equations inside blocks are written in canonical
units (:mod:`mpc_dose.units`: s, mg, L): ``Param.value`` and ``State.value`` are the symbols
already scaled to canonical units, derivatives and outputs are given in canonical units and
the model scales them back. Time ``t`` is seconds; inputs ``u`` are rates in
``amount_unit`` per second.

This module is pure: CasADi and numpy only, no files, no clocks, no randomness.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import casadi as ca
import numpy as np

from ..errors import ModelError, closest
from ..units import parse_unit

__all__ = ["Param", "State", "Input", "Output", "Block", "Model", "BufferedFunction", "param", "state", "drug_input",
           "output", "canonical_factor", "DOMAINS"]

#: Allowed values of a parameter, checked whenever values are given.
DOMAINS = {
    "positive": (lambda v: v > 0, "> 0"),
    "nonnegative": (lambda v: v >= 0, ">= 0"),
    "fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "real": (lambda v: True, "a finite number"),
}


def canonical_factor(unit: str) -> float:
    """Factor from *unit* to the canonical unit of its dimension (see :mod:`mpc_dose.units`)."""
    return parse_unit(unit).factor


def _check_name(name: str, what: str) -> str:
    if not name.replace("_", "").isalnum() or not name[0].isalpha() or name != name.lower():
        raise ModelError(f"{what} name {name!r} must be lower-case letters, digits and '_'")
    return name


@dataclass(frozen=True, eq=False)
class Param:
    """A model parameter: a value per individual, held in *unit*."""

    name: str
    unit: str
    doc: str
    domain: str = "positive"
    sym: ca.SX = field(repr=False, default=None)

    @property
    def value(self) -> ca.SX:
        """The symbol scaled to canonical units, for writing equations."""
        return self.sym * canonical_factor(self.unit)


@dataclass(frozen=True, eq=False)
class State:
    """A state variable held in *unit*; *initial* is its value at t = 0 in *unit* (an
    expression of parameters, e.g. kin/kout for a turnover response)."""

    name: str
    unit: str
    doc: str
    sym: ca.SX = field(repr=False, default=None)
    initial: ca.SX = field(repr=False, default=None)

    @property
    def value(self) -> ca.SX:
        return self.sym * canonical_factor(self.unit)


@dataclass(frozen=True, eq=False)
class Input:
    """A drug input: an infusion rate in ``amount_unit`` per second.

    A bolus of this input adds its amount (times *bioavailability*, a parameter name) to
    *bolus_state* after a delay of *lag* (a parameter name, in its own time unit).
    """

    name: str
    amount_unit: str
    doc: str
    bolus_state: str
    sym: ca.SX = field(repr=False, default=None)
    bioavailability: str | None = None
    lag: str | None = None

    @property
    def rate_unit(self) -> str:
        return f"{self.amount_unit}/s"

    @property
    def value(self) -> ca.SX:
        """The rate in canonical amount per second."""
        return self.sym * canonical_factor(self.amount_unit)


@dataclass(frozen=True, eq=False)
class Output:
    """A named output; *expr* is in canonical units, reported in *unit*."""

    name: str
    unit: str
    doc: str
    expr: ca.SX = field(repr=False, default=None)

    @property
    def value(self) -> ca.SX:
        """The output in canonical units, for feeding another block."""
        return self.expr


def param(name: str, unit: str, doc: str, domain: str = "positive") -> Param:
    """Declare a parameter with a fresh symbol."""
    if domain not in DOMAINS:
        raise ModelError(f"parameter {name!r}: domain {domain!r} is not one of {sorted(DOMAINS)}")
    parse_unit(unit)
    return Param(_check_name(name, "parameter"), unit, doc, domain, ca.SX.sym(name))


def state(name: str, unit: str, doc: str, initial: ca.SX | float = 0.0) -> State:
    """Declare a state with a fresh symbol; *initial* is in *unit*."""
    parse_unit(unit)
    return State(_check_name(name, "state"), unit, doc, ca.SX.sym(name), ca.SX(initial))


def drug_input(name: str, amount_unit: str, doc: str, bolus_state: str,
               bioavailability: str | None = None, lag: str | None = None) -> Input:
    """Declare a drug input (rate in *amount_unit*/s) with a fresh symbol."""
    parse_unit(amount_unit)
    return Input(_check_name(name, "input"), amount_unit, doc, bolus_state, ca.SX.sym(name),
                 bioavailability, lag)


def output(name: str, unit: str, doc: str, canonical_expr: ca.SX) -> Output:
    """Declare an output from an expression in canonical units."""
    parse_unit(unit)
    return Output(_check_name(name, "output"), unit, doc, canonical_expr)


@dataclass(frozen=True)
class Block:
    """One piece of pharmacology: declarations plus equations.

    ``rates[i]`` is the time derivative of ``states[i]`` in canonical units per second.
    ``inflows`` adds canonical rates to states of *other* blocks (e.g. an absorption depot
    feeding a central compartment), by state name.
    """

    name: str
    params: tuple[Param, ...] = ()
    states: tuple[State, ...] = ()
    rates: tuple[ca.SX, ...] = ()
    inputs: tuple[Input, ...] = ()
    outputs: tuple[Output, ...] = ()
    inflows: tuple[tuple[str, ca.SX], ...] = ()

    def __post_init__(self) -> None:
        if len(self.states) != len(self.rates):
            raise ModelError(f"block {self.name!r}: {len(self.states)} states but "
                             f"{len(self.rates)} rates")

    def _find(self, kind: str, items: Sequence, name: str):
        for item in items:
            if item.name == name:
                return item
        raise ModelError(f"block {self.name!r} has no {kind} {name!r}"
                         f"{closest(name, [i.name for i in items])}")

    def output(self, name: str) -> Output:
        return self._find("output", self.outputs, name)

    def state(self, name: str) -> State:
        return self._find("state", self.states, name)

    def param(self, name: str) -> Param:
        return self._find("parameter", self.params, name)


@dataclass(frozen=True)
class Cosinor:
    """Circadian modulation of one parameter:
    ``p(t) = p_mesor * (1 + sum_k A_k cos(2 pi k (clock(t) - phi_k) / period))``.

    The amplitudes ``{param}_amplitude_k`` (fraction of the mesor) and acrophases
    ``{param}_acrophase_k`` (clock time, h) become parameters of the model; ``period_h`` is a
    fixed declaration (24 h for a circadian rhythm). With every amplitude 0 the modulated
    model is exactly the constant model.
    """

    param: str
    harmonics: int = 1
    period_h: float = 24.0


CLOCK_PARAM = "clock_time_at_t0"


class BufferedFunction:
    """A CasADi function of one dense vector to one dense vector, evaluated in place through
    its buffer (no per-call conversion of arguments). Not thread-safe: one per user."""

    def __init__(self, function: ca.Function) -> None:
        self.function = function
        self._in = np.zeros(function.nnz_in(0))
        self._out = np.zeros(function.nnz_out(0))
        self._buffer, self._evaluate = function.buffer()
        self._buffer.set_arg(0, memoryview(self._in))
        self._buffer.set_res(0, memoryview(self._out))

    def __call__(self, z: np.ndarray) -> np.ndarray:
        self._in[:] = z
        self._evaluate()
        return self._out.copy()


class Model:
    """A compiled PK/PD model: named signals with units and CasADi functions.

    Attributes
    ----------
    f : casadi.Function
        ``f(t[s], x, u, p) -> dx/dt`` (state units per second).
    h : casadi.Function
        ``h(t[s], x, u, p) -> y`` (output units).
    x0 : casadi.Function
        ``x0(p) -> x(0)`` (state units).
    """

    def __init__(self, name: str, blocks: Sequence[Block], *, circadian: Sequence[Cosinor] = (),
                 doc: str = "") -> None:
        self.name = name
        self.doc = doc
        self.blocks = tuple(blocks)
        params = [p for b in blocks for p in b.params]
        states = [s for b in blocks for s in b.states]
        inputs = [i for b in blocks for i in b.inputs]
        outputs = [o for b in blocks for o in b.outputs]
        self.circadian = tuple(circadian)
        circadian_params = self._circadian_params(params)
        #: parameters that default to 0 (no modulation, clock at midnight) when not given
        self.zero_default_params = frozenset(q.name for q in circadian_params)
        params += circadian_params
        for what, items in (("parameter", params), ("state", states), ("input", inputs),
                            ("output", outputs)):
            seen: set[str] = set()
            for item in items:
                if item.name in seen:
                    raise ModelError(f"model {name!r}: {what} {item.name!r} declared twice")
                seen.add(item.name)
        self.params: tuple[Param, ...] = tuple(params)
        self.states: tuple[State, ...] = tuple(states)
        self.inputs: tuple[Input, ...] = tuple(inputs)
        self.outputs: tuple[Output, ...] = tuple(outputs)
        state_index = {s.name: i for i, s in enumerate(states)}
        for i in inputs:
            if i.bolus_state not in state_index:
                raise ModelError(f"input {i.name!r}: bolus state {i.bolus_state!r} is not a state")
            for ref in (i.bioavailability, i.lag):
                if ref is not None and ref not in self.param_names:
                    raise ModelError(f"input {i.name!r}: parameter {ref!r} is not declared")

        rates = [r for b in blocks for r in b.rates]
        for b in blocks:
            for target, flow in b.inflows:
                if target not in state_index:
                    raise ModelError(f"block {b.name!r}: inflow target {target!r} is not a state"
                                     f"{closest(target, state_index)}")
                rates[state_index[target]] = rates[state_index[target]] + flow

        t = ca.SX.sym("t")
        x = ca.vertcat(*[s.sym for s in states]) if states else ca.SX(0, 1)
        u = ca.vertcat(*[i.sym for i in inputs]) if inputs else ca.SX(0, 1)
        p = ca.vertcat(*[q.sym for q in self.params])
        dxdt = ca.vertcat(*[r / canonical_factor(s.unit) for r, s in zip(rates, states)])
        y = ca.vertcat(*[o.expr / canonical_factor(o.unit) for o in outputs])
        x_init = ca.vertcat(*[s.initial for s in states])
        dxdt, y = self._modulate(t, {q.name: q for q in self.params}, [dxdt, y])
        if ca.depends_on(x_init, ca.vertcat(x, u)):
            raise ModelError(f"model {name!r}: initial states may depend on parameters only")
        self._sym = {"t": t, "x": x, "u": u, "p": p, "dxdt": dxdt, "y": y}
        self.f = ca.Function("f", [t, x, u, p], [dxdt], ["t", "x", "u", "p"], ["dxdt"])
        self.h = ca.Function("h", [t, x, u, p], [y], ["t", "x", "u", "p"], ["y"])
        self.x0 = ca.Function("x0", [p], [x_init], ["p"], ["x0"])
        xu = ca.vertcat(x, u)
        jac_x, jac_u = ca.jacobian(dxdt, x), ca.jacobian(dxdt, u)
        #: True when dx/dt = A(t, p) x + B(t, p) u + c(t, p): exact zero-order hold applies
        #: whenever the model is also time-invariant for the parameter values at hand.
        self.is_affine = not (ca.depends_on(jac_x, xu) or ca.depends_on(jac_u, xu))
        self.is_time_varying = bool(ca.depends_on(dxdt, t))
        zeros_x, zeros_u = ca.DM.zeros(x.shape), ca.DM.zeros(u.shape)
        self.affine_terms = ca.Function(
            "affine_terms", [t, p],
            [ca.substitute(jac_x, xu, ca.vertcat(zeros_x, zeros_u)),
             ca.substitute(jac_u, xu, ca.vertcat(zeros_x, zeros_u)),
             ca.substitute(dxdt, xu, ca.vertcat(zeros_x, zeros_u))],
            ["t", "p"], ["A", "B", "c"])
        out_x, out_u = ca.jacobian(y, x), ca.jacobian(y, u)
        #: True when y = C(p) x + D(p) u + e(p): outputs are then evaluated as one product.
        self.outputs_affine = not (ca.depends_on(out_x, xu) or ca.depends_on(out_u, xu)
                                   or ca.depends_on(y, t))
        self.output_affine_terms = ca.Function(
            "output_affine_terms", [p],
            [ca.substitute(out_x, ca.vertcat(t, xu), ca.DM.zeros(1 + xu.numel())),
             ca.substitute(out_u, ca.vertcat(t, xu), ca.DM.zeros(1 + xu.numel())),
             ca.substitute(y, ca.vertcat(t, xu), ca.DM.zeros(1 + xu.numel()))],
            ["p"], ["C", "D", "e"])

    def output_function(self, p: np.ndarray) -> BufferedFunction:
        """``h`` with the parameter values *p* built in, called on one vector ``[t; x; u]``
        through CasADi's evaluation buffer (well under a microsecond instead of tens of
        microseconds of argument conversion per call): for plants that sample often."""
        z = ca.SX.sym("z", 1 + self.n_states + self.n_inputs)
        t, x, u = z[0], z[1:1 + self.n_states], z[1 + self.n_states:]
        return BufferedFunction(ca.Function("h_patient", [z], [self.h(t, x, u, ca.DM(p))]))

    def h_numpy(self):
        """``h`` replayed with numpy over many points, or None if it uses an operation the
        replayer does not know (see :mod:`mpc_dose.model.vectorize`)."""
        if "_h_numpy" not in self.__dict__:
            from .vectorize import NumpyFunction

            try:
                self._h_numpy = NumpyFunction(self.h)
            except NotImplementedError:
                self._h_numpy = None
        return self._h_numpy

    def h_mapped(self, width: int) -> ca.Function:
        """``h`` evaluated column-wise over *width* points (compiled once per width)."""
        cache = self.__dict__.setdefault("_h_mapped", {})
        if width not in cache:
            cache[width] = self.h.map(width)
        return cache[width]

    # ----------------------------------------------------------------- circadian
    def _circadian_params(self, params: list[Param]) -> list[Param]:
        names = {p.name for p in params}
        extra: list[Param] = []
        for c in self.circadian:
            if c.param not in names:
                raise ModelError(f"circadian modulation of unknown parameter {c.param!r}"
                                 f"{closest(c.param, names)}")
            if c.harmonics < 1 or not (c.period_h > 0 and math.isfinite(c.period_h)):
                raise ModelError(f"circadian modulation of {c.param!r}: harmonics must be >= 1 "
                                 f"and period_h > 0, got {c.harmonics} and {c.period_h}")
            for k in range(1, c.harmonics + 1):
                extra.append(param(f"{c.param}_amplitude_{k}", "1",
                                   f"relative amplitude of harmonic {k} of {c.param} "
                                   f"(fraction of the mesor)", "real"))
                extra.append(param(f"{c.param}_acrophase_{k}", "h",
                                   f"clock time of the peak of harmonic {k} of {c.param}", "real"))
        if self.circadian:
            extra.append(param(CLOCK_PARAM, "h",
                               "clock time (hours after midnight) at simulation time t = 0",
                               "real"))
        return extra

    def _modulate(self, t: ca.SX, by_name: dict[str, Param], exprs: list[ca.SX]) -> list[ca.SX]:
        # Initial states (e.g. a turnover baseline) keep the mesor: they are not modulated.
        if not self.circadian:
            return exprs
        clock_h = t / 3600.0 + by_name[CLOCK_PARAM].sym
        old, new = [], []
        for c in self.circadian:
            mesor = by_name[c.param].sym
            factor = 1
            for k in range(1, c.harmonics + 1):
                amp = by_name[f"{c.param}_amplitude_{k}"].sym
                phase = by_name[f"{c.param}_acrophase_{k}"].sym
                factor = factor + amp * ca.cos(2 * math.pi * k * (clock_h - phase) / c.period_h)
            old.append(mesor)
            new.append(mesor * factor)
        return [ca.substitute(e, ca.vertcat(*old), ca.vertcat(*new)) for e in exprs]

    # ----------------------------------------------------------------- names
    @property
    def state_names(self) -> list[str]:
        return [s.name for s in self.states]

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def n_states(self) -> int:
        return len(self.states)

    @property
    def n_inputs(self) -> int:
        return len(self.inputs)

    @property
    def n_outputs(self) -> int:
        return len(self.outputs)

    def _index(self, kind: str, names: list[str], name: str) -> int:
        try:
            return names.index(name)
        except ValueError:
            raise ModelError(f"model {self.name!r} has no {kind} {name!r}{closest(name, names)}; "
                             f"its {kind}s: {', '.join(names)}") from None

    def state_index(self, name: str) -> int:
        return self._index("state", self.state_names, name)

    def input_index(self, name: str) -> int:
        return self._index("input", self.input_names, name)

    def output_index(self, name: str) -> int:
        return self._index("output", self.output_names, name)

    def param_index(self, name: str) -> int:
        return self._index("parameter", self.param_names, name)

    def parameter(self, name: str) -> Param:
        return self.params[self.param_index(name)]

    # ----------------------------------------------------------------- values
    def parameter_vector(self, values: Mapping[str, float], *, defaults: Mapping[str, float]
                         | None = None) -> np.ndarray:
        """Check named parameter values (in their declared units) and order them as ``p``.

        Circadian amplitudes and acrophases and the clock default to 0 when not given.

        Raises
        ------
        ModelError
            For an unknown name, a missing value, a non-finite value or one outside the
            parameter's domain; the message names the parameter and the value.
        """
        given = dict(defaults or {})
        given.update(values)
        for name in given:
            if name not in self.param_names:
                raise ModelError(f"model {self.name!r} has no parameter {name!r}"
                                 f"{closest(name, self.param_names)}")
        vector = np.empty(len(self.params))
        for k, p in enumerate(self.params):
            if p.name not in given:
                if p.name in self.zero_default_params:
                    given[p.name] = 0.0
                else:
                    raise ModelError(f"model {self.name!r}: parameter {p.name!r} ({p.doc}, "
                                     f"{p.unit}) has no value")
            value = given[p.name]
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ModelError(f"parameter {p.name!r}: expected a number in {p.unit}, "
                                 f"got {value!r}") from None
            ok, expected = DOMAINS[p.domain]
            if not math.isfinite(value) or not ok(value):
                raise ModelError(f"parameter {p.name!r} = {value!r} {p.unit}: expected {expected}")
            vector[k] = value
        return vector

    def parameter_value(self, key: str, raw: object, *, where: str = "parameters"
                        ) -> tuple[str, float]:
        """Read one value given as ``name`` (declared unit) or ``name_<unit>`` (converted):
        returns the parameter's name and the value in its declared unit.

        Raises
        ------
        ModelError
            Naming *where*, the key and the value: unknown parameter (with the nearest one),
            unknown or mismatched unit, or not a number.
        """
        from ..units import UnitError, convert, split_unit_suffix

        try:
            name, unit = split_unit_suffix(key, self.param_names)
        except UnitError as err:
            raise ModelError(f"{where}: {key!r}: {err}") from None
        if name not in self.param_names:
            raise ModelError(f"{where}: model {self.name!r} has no parameter {key!r}"
                             f"{closest(key, self.param_names)}")
        try:
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ModelError(f"{where}: {key} = {raw!r} is not a number") from None
        if unit is not None:
            try:
                value = convert(value, unit, self.parameter(name).unit, what=f"{where} {key}")
            except UnitError as err:
                raise ModelError(str(err)) from None
        return name, value

    def initial_state(self, p: np.ndarray) -> np.ndarray:
        return np.asarray(self.x0(p), dtype=float).ravel()

    def describe(self) -> str:
        """A human-readable listing of the model's signals and parameters with units."""
        lines = [f"{self.name}: {self.doc}".rstrip(": ")]
        for title, items, unit in (("inputs", self.inputs, lambda i: i.rate_unit),
                                   ("states", self.states, lambda s: s.unit),
                                   ("outputs", self.outputs, lambda o: o.unit),
                                   ("parameters", self.params, lambda p: p.unit)):
            lines.append(f"  {title}:")
            lines += [f"    {i.name} [{unit(i)}]: {i.doc}" for i in items]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, states={self.state_names}, inputs={self.input_names}, "
                f"outputs={self.output_names})")
