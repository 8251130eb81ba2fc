"""Evaluate a CasADi SX function on many points at once with numpy.

CasADi's own evaluation of a scalar-expression (SX) function costs about a microsecond per
point from Python, even mapped; a trial evaluating BIS at every second of thousands of
patient-hours needs ten times less. :class:`NumpyFunction` replays the function's instruction
list (``Function.instruction_id`` and friends) once per call, each instruction as one numpy
operation on arrays of points, so the cost per point is a few nanoseconds per instruction.

Only the operations that PK/PD expressions use are supported; anything else raises
``NotImplementedError`` at construction, and callers fall back to CasADi.
"""

from __future__ import annotations

import casadi as ca
import numpy as np

__all__ = ["NumpyFunction"]

_UNARY = {
    ca.OP_ASSIGN: lambda a: a, ca.OP_NEG: np.negative, ca.OP_EXP: np.exp, ca.OP_LOG: np.log,
    ca.OP_SQRT: np.sqrt, ca.OP_SQ: np.square, ca.OP_TWICE: lambda a: 2 * a,
    ca.OP_SIN: np.sin, ca.OP_COS: np.cos, ca.OP_TAN: np.tan, ca.OP_FABS: np.abs,
    ca.OP_TANH: np.tanh, ca.OP_SIGN: np.sign, ca.OP_FLOOR: np.floor, ca.OP_CEIL: np.ceil,
    ca.OP_NOT: lambda a: (a == 0).astype(float), ca.OP_LOG1P: np.log1p,
    ca.OP_EXPM1: np.expm1, ca.OP_ATAN: np.arctan, ca.OP_INV: np.reciprocal,
}
_BINARY = {
    ca.OP_ADD: np.add, ca.OP_SUB: np.subtract, ca.OP_MUL: np.multiply,
    ca.OP_DIV: np.divide, ca.OP_POW: np.power, ca.OP_CONSTPOW: np.power,
    ca.OP_FMIN: np.minimum, ca.OP_FMAX: np.maximum, ca.OP_ATAN2: np.arctan2,
    ca.OP_LT: lambda a, b: (a < b).astype(float), ca.OP_LE: lambda a, b: (a <= b).astype(float),
    ca.OP_EQ: lambda a, b: (a == b).astype(float), ca.OP_NE: lambda a, b: (a != b).astype(float),
    ca.OP_AND: lambda a, b: ((a != 0) & (b != 0)).astype(float),
    ca.OP_OR: lambda a, b: ((a != 0) | (b != 0)).astype(float),
    ca.OP_IF_ELSE_ZERO: lambda c, x: np.where(c != 0, x, 0.0),
    ca.OP_HYPOT: np.hypot, ca.OP_COPYSIGN: np.copysign,
}


class NumpyFunction:
    """A dense-vector CasADi SX function evaluated column-wise on many points.

    ``f(*args)`` takes one array per function input, of shape ``(n_i, N)`` (or ``(n_i,)``
    for a value shared by all points) and returns one ``(m_j, N)`` array per output.

    Raises
    ------
    NotImplementedError
        At construction, for an operation it does not translate.
    """

    def __init__(self, function: ca.Function) -> None:
        if not function.is_a("SXFunction"):
            function = function.expand()
        self.function = function
        self._program = []
        for k in range(function.n_instructions()):
            op = function.instruction_id(k)
            ins, outs = function.instruction_input(k), function.instruction_output(k)
            if op == ca.OP_CONST:
                self._program.append(("const", outs[0], function.instruction_constant(k)))
            elif op == ca.OP_INPUT:
                self._program.append(("input", outs[0], ins))
            elif op == ca.OP_OUTPUT:
                self._program.append(("output", ins[0], outs))
            elif op in _UNARY:
                self._program.append(("unary", outs[0], (_UNARY[op], ins[0])))
            elif op in _BINARY:
                self._program.append(("binary", outs[0], (_BINARY[op], ins[0], ins[1])))
            else:
                raise NotImplementedError(f"CasADi operation {op} has no numpy translation")
        self._n_in = [function.nnz_in(i) for i in range(function.n_in())]
        self._n_out = [function.nnz_out(j) for j in range(function.n_out())]

    def __call__(self, *args: np.ndarray) -> list[np.ndarray]:
        """Evaluate on points laid out along the trailing axes of the arguments: each
        argument has shape ``(n_i, *shape_i)`` with the trailing shapes broadcastable (a
        1-D argument is one value for all points); outputs have shape ``(m_j, *shape)``."""
        if len(args) != len(self._n_in):
            raise TypeError(f"expected {len(self._n_in)} arguments, got {len(args)}")
        arrays = []
        for i, a in enumerate(args):
            a = np.asarray(a, dtype=float)
            if a.ndim == 1:
                a = a[:, None]
            if a.shape[0] != self._n_in[i]:
                raise ValueError(f"argument {i}: expected {self._n_in[i]} rows, got {a.shape}")
            arrays.append(a)
        shape = np.broadcast_shapes(*(a.shape[1:] for a in arrays))
        work: dict[int, np.ndarray | float] = {}
        outputs = [np.zeros((m, *shape)) for m in self._n_out]
        with np.errstate(all="ignore"):  # as CasADi: inf/nan propagate, they do not raise
            for kind, target, data in self._program:
                if kind == "binary":
                    fn, a, b = data
                    work[target] = fn(work[a], work[b])
                elif kind == "unary":
                    fn, a = data
                    work[target] = fn(work[a])
                elif kind == "const":
                    work[target] = data
                elif kind == "input":
                    work[target] = arrays[data[0]][data[1]]
                else:
                    outputs[data[0]][data[1]] = work[target]
        return outputs
