"""Exception types of mpc_dose.

Every error built on user input names the field, the value received and what was expected.
They subclass built-ins (as python-control does) so callers may catch ``ValueError``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["MpcDoseError", "ConfigError", "ModelError", "UnitError", "closest"]


class MpcDoseError(Exception):
    """Base class of every error raised on purpose by mpc_dose."""


class ConfigError(MpcDoseError, ValueError):
    """A configuration, covariate, dosing table or scenario value is missing or invalid."""


class ModelError(MpcDoseError, ValueError):
    """A model is built or used inconsistently (unknown signal, bad parameter value)."""


class UnitError(MpcDoseError, ValueError):
    """A unit is unknown, or does not match the dimension that was expected."""


def closest(name: str, candidates: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the nearest candidate, or ``""`` when none is near."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
