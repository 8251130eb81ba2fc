"""One reader for the bridges' TOML config files (``serve pump-bridge``, ``sensor-bridge``,
``sdc-bridge``): the file read and checked against its pydantic model, the first error
naming the file's field, the value given and what was expected."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError

__all__ = ["read_config"]

ConfigModel = TypeVar("ConfigModel", bound=BaseModel)


def read_config(path: str | Path | dict, model: type[ConfigModel], what: str) -> ConfigModel:
    """*path* (a TOML file, or its content as a dict) as a *model*; *what* names the kind
    of file in errors (``"pump-bridge config"``).

    Raises
    ------
    ConfigError
        The file cannot be read as TOML, or a field is missing, unknown or out of range.
    """
    try:
        data = path if isinstance(path, dict) else \
            tomllib.loads(Path(path).read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{what} {str(path)!r}: cannot be read as TOML ({err})") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{what} {where}: {first['msg']} (got {first.get('input')!r})") \
            from None
