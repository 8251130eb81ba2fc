"""The library of named, literature-referenced models.

A model name is one entry (``"propofol-schnider"``) or several joined by ``+`` and composed
in order (``"propofol-eleveld+remifentanil-eleveld+bis-bouillon"``): a PD entry takes the
concentrations of the PK entries before it. :func:`load` returns the compiled
:class:`~mpc_dose.model.library.base.LibraryModel` (model and population statistics).
"""

from __future__ import annotations

from functools import lru_cache

from ...errors import ModelError, closest
from . import anaesthesia, others
from .base import LibraryEntry, LibraryModel, compose

__all__ = ["ENTRIES", "entry", "load", "LibraryEntry", "LibraryModel"]

#: Every entry by name.
ENTRIES: dict[str, LibraryEntry] = {e.name: e for e in anaesthesia.ENTRIES + others.ENTRIES}


def entry(name: str) -> LibraryEntry:
    """The library entry called *name*.

    Raises
    ------
    ModelError
        For an unknown name, with the nearest known one.
    """
    try:
        return ENTRIES[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}{closest(name, ENTRIES)}; known models: "
                         f"{', '.join(ENTRIES)}") from None


@lru_cache(maxsize=64)
def load(name: str) -> LibraryModel:
    """Compile the library model *name* (entries joined by ``+``); cached per name."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string, got {name!r}")
    parts = [p.strip() for p in name.split("+")]
    return compose(name, [entry(p) for p in parts])
