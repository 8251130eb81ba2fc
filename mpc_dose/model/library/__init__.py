"""The library of named, literature-referenced models.

A model name is one entry (``"propofol-schnider"``) or several joined by ``+`` and composed
in order (``"propofol-eleveld+remifentanil-eleveld+bis-bouillon"``): a PD entry takes the
concentrations of the PK entries before it. A part ending in ``.toml`` is a model file
(:mod:`mpc_dose.model.modelfile`, format in ``scenarios/models/README.md``) and composes like
an entry: ``"models/my_pk.toml+bis-propofol"``. :func:`load` returns the compiled
:class:`~mpc_dose.model.library.base.LibraryModel` (model and population statistics).
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from ...errors import ModelError, closest
from . import anaesthesia, diabetes, others, uva_padova
from .base import LibraryEntry, LibraryModel, compose

__all__ = ["ENTRIES", "entry", "load", "resolve", "relocate", "LibraryEntry", "LibraryModel"]

#: Every entry by name.
ENTRIES: dict[str, LibraryEntry] = {e.name: e for e in anaesthesia.ENTRIES + others.ENTRIES
                                   + diabetes.ENTRIES + uva_padova.ENTRIES}


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
                         f"{', '.join(ENTRIES)}; or a model file ending in .toml") from None


def _parts(name: object) -> list[str]:
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string, got {name!r}")
    return [p.strip() for p in name.split("+")]


def _is_file(part: str) -> bool:
    from ..modelfile import is_model_file

    return is_model_file(part)


def resolve(name: str, base_dir: str | os.PathLike | None) -> str:
    """*name* with every model file in it made an absolute path, a relative one taken from
    *base_dir* (e.g. a scenario's folder; the working directory when None). Library names
    are kept as they are; nothing is read.

    >>> resolve("models/pk.toml+bis-propofol", "/trials/a")
    '/trials/a/models/pk.toml+bis-propofol'
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    return "+".join(str((base / part).resolve()) if _is_file(part) and
                    not Path(part).is_absolute() else part for part in _parts(name))


def relocate(name: str, from_dir: str | os.PathLike, to_dir: str | os.PathLike) -> str:
    """*name* with each relative model file, taken from *from_dir*, written relative to
    *to_dir* instead (a scenario copied to another folder keeps naming the same files).
    Library names and absolute paths are kept; nothing is read.

    >>> relocate("models/pk.toml+bis-propofol", "/trials/a", "/trials/b")
    '../a/models/pk.toml+bis-propofol'
    """
    return "+".join(os.path.relpath(Path(from_dir) / part, Path(to_dir))
                    if _is_file(part) and not Path(part).is_absolute() else part
                    for part in _parts(name))


def load(name: str, *, base_dir: str | os.PathLike | None = None) -> LibraryModel:
    """Compile the model *name*: library entries and model files joined by ``+``.

    A model file's relative path is taken from *base_dir* (the working directory when
    None): a scenario passes its folder. Compiled models are cached per name; a model file
    is read again when it has changed.

    Raises
    ------
    ModelError
        For an unknown entry (with the nearest name), a missing model file, any problem in
        a model file (``file:line: [table] key: ...``), or entries that do not compose.
    """
    parts = _parts(name)
    key = []
    for part in parts:
        if not _is_file(part):
            key.append((part, None))
            continue
        path = Path(part)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        try:
            stat = path.stat()
        except OSError:
            where = f" (from {str(Path(base_dir).resolve())!r})" if base_dir is not None and \
                not Path(part).is_absolute() else ""
            raise ModelError(f"model file {part!r} does not exist{where}") from None
        key.append((part, (str(path.resolve()), stat.st_mtime_ns, stat.st_size)))
    return _load(name, tuple(key))


@lru_cache(maxsize=64)
def _load(name: str, key: tuple) -> LibraryModel:
    from ..modelfile import FileEntry, read_model_file

    entries = [entry(part) if file is None else read_model_file(file[0], source=part)
               for part, file in key]
    # A model file checks the outputs its blocks need as it builds them, naming its file,
    # line and the nearest output given before it: better than compose's general message.
    entries = [replace(e, requires=()) if isinstance(e, FileEntry) else e for e in entries]
    return compose(name, entries)
