"""The search space of a tuning sweep (``SPACE.toml``): what to vary, how a setting is
judged, how settings are chosen, and on which patients.

    [[parameter]]
    name = "max_propofol"                         # a label (plots, tables)
    keys = ["controller.nmpc.input.propofol.max_rate_mg_per_s"]  # scenario keys set to the value
    low = 3.0                                     # a range (log = true: log-uniform) ...
    high = 6.67
    # values = [10, 20, 40]                       # ... or a list

    [[objective]]
    metric = "induction_iae_bis_s"                # a column of the trial's metrics.csv
    statistic = "mean"                            # over the cohort: mean, median, sd, min,
    goal = "minimise"                             # max, p05 ... p95

    [[limit]]
    metric = "time_below_window_true_s"
    statistic = "max"                             # worst patient
    at_most = 60

    [strategy]
    kind = "sobol"                                # grid, random, sobol or optuna
    settings = 16

    [training]                                    # the cohort every setting runs on
    patients = 32
    seed = 0

    [holdout]                                     # the check of the recommended setting
    scenario = "tiva_benchmark.toml"              # (relative to this file; default: the
    patients = 100                                # tuned scenario, other patients)
    first = 1
    seed = 1

A key the scenario schema does not know is refused before anything runs, naming it.
"""

from __future__ import annotations

import itertools
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import ConfigError
from ..scenario import parse_scenario, read_scenario_data, with_overrides

__all__ = ["Space", "ParameterSpec", "ObjectiveSpec", "LimitSpec", "load_space",
           "check_keys", "statistic", "STATISTICS"]

#: statistics of a metric over the cohort
STATISTICS = ("mean", "median", "sd", "min", "max", "p05", "p10", "p25", "p75", "p90", "p95")

Value = float | int | str | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParameterSpec(_Strict):
    name: str
    keys: list[str] = Field(min_length=1)
    low: float | None = None
    high: float | None = None
    values: list[Value] | None = None
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _range_or_values(self) -> ParameterSpec:
        if self.values is not None:
            if self.low is not None or self.high is not None or not self.values:
                raise ValueError(f"parameter {self.name!r}: give either values (non-empty) "
                                 f"or low and high")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"parameter {self.name!r}: expected low < high, got low="
                             f"{self.low!r}, high={self.high!r}")
        elif self.log and self.low <= 0:
            raise ValueError(f"parameter {self.name!r}: log = true needs low > 0, "
                             f"got {self.low}")
        return self

    def at(self, u: float) -> Value:
        """The value at quantile *u* in [0, 1) of the range (or of the list)."""
        if self.values is not None:
            return self.values[min(int(u * len(self.values)), len(self.values) - 1)]
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        return int(round(value)) if self.integer else float(value)

    def grid(self, steps: int) -> list[Value]:
        if self.values is not None:
            return list(self.values)
        points = (np.geomspace(self.low, self.high, steps) if self.log
                  else np.linspace(self.low, self.high, steps))
        if self.integer:
            return sorted({int(round(v)) for v in points})
        return [float(v) for v in points]


class _Judge(_Strict):
    """A statistic of one metric over the cohort."""

    metric: str
    statistic: str

    @model_validator(mode="after")
    def _known_statistic(self) -> _Judge:
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic {self.statistic!r} is not one of "
                             f"{', '.join(STATISTICS)}")
        return self

    @property
    def column(self) -> str:
        return f"{self.statistic} {self.metric}"


class ObjectiveSpec(_Judge):
    statistic: str = "mean"
    goal: Literal["minimise", "maximise"]


class LimitSpec(_Judge):
    statistic: str = "max"
    at_most: float | None = None
    at_least: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> LimitSpec:
        if (self.at_most is None) == (self.at_least is None):
            raise ValueError(f"limit on {self.metric!r}: give exactly one of at_most, "
                             f"at_least")
        return self

    def excess(self, value: float) -> float:
        """How far *value* is past the limit (<= 0: the limit holds; NaN counts as past)."""
        if not math.isfinite(value):
            return math.inf
        return value - self.at_most if self.at_most is not None else self.at_least - value

    def text(self) -> str:
        return (f"{self.column} <= {self.at_most:g}" if self.at_most is not None
                else f"{self.column} >= {self.at_least:g}")


class StrategySpec(_Strict):
    kind: Literal["grid", "random", "sobol", "optuna"] = "sobol"
    #: settings to evaluate (random, sobol, optuna); the grid has its own count
    settings: int = Field(16, gt=0)
    #: points per range in a grid
    grid_steps: int = Field(3, ge=2)
    seed: int = Field(0, ge=0)
    #: settings evaluated at once (Optuna asks for this many before it learns from them)
    batch: int = Field(2, gt=0)


class CohortSpec(_Strict):
    patients: int = Field(32, gt=0)
    first: int = Field(1, gt=0)
    seed: int = Field(0, ge=0)
    #: another scenario file whose patients are used (its controller keys are overridden
    #: the same way), relative to the space file
    scenario: str | None = None
    #: a cohort file (the columns of the scenario's [patient.table]), relative to the space
    cohort: str | None = None


class Space(_Strict):
    parameter: list[ParameterSpec] = Field(min_length=1)
    objective: list[ObjectiveSpec] = Field(min_length=1)
    limit: list[LimitSpec] = []
    strategy: StrategySpec = StrategySpec()
    training: CohortSpec = CohortSpec()
    holdout: CohortSpec | None = None
    base_dir: str = "."

    @model_validator(mode="after")
    def _unique_names(self) -> Space:
        names = [p.name for p in self.parameter]
        if len(set(names)) != len(names):
            raise ValueError(f"parameter names must differ, got {names}")
        keys = [k for p in self.parameter for k in p.keys]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a scenario key is varied by two parameters: {keys}")
        return self

    def resolve(self, path: str | None) -> str | None:
        return None if path is None else str((Path(self.base_dir) / path).resolve())

    def overrides(self, values: Mapping[str, Value]) -> dict[str, Value]:
        """Scenario overrides of a setting {parameter name: value}."""
        return {key: values[p.name] for p in self.parameter for key in p.keys}

    def settings(self) -> list[dict[str, Value]]:
        """The settings of the grid, random or Sobol strategies, in a fixed order."""
        s = self.strategy
        if s.kind == "grid":
            grids = [p.grid(s.grid_steps) for p in self.parameter]
            return [dict(zip([p.name for p in self.parameter], combo))
                    for combo in itertools.product(*grids)]
        if s.kind == "random":
            u = np.random.default_rng(s.seed).random((s.settings, len(self.parameter)))
        elif s.kind == "sobol":
            from scipy.stats import qmc

            sampler = qmc.Sobol(len(self.parameter), scramble=True, seed=s.seed)
            u = sampler.random_base2(max(0, math.ceil(math.log2(s.settings))))[:s.settings]
        else:
            raise ConfigError("the optuna strategy proposes its settings as it learns")
        return [{p.name: p.at(float(x)) for p, x in zip(self.parameter, row)} for row in u]


def load_space(path: str | Path) -> Space:
    """Read and validate a space file.

    Raises
    ------
    ConfigError
        For a missing or malformed file, naming the field.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"space {str(path)!r}: cannot read it ({err.strerror})") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"space {str(path)!r}: not valid TOML: {err}") from None
    try:
        return Space(**data, base_dir=str(path.resolve().parent))
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(part) for part in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {msg}" + ("" if e["type"] == "value_error"
                                              else f" (got {e.get('input')!r})"))
        raise ConfigError(f"space {path.name}:\n  " + "\n  ".join(lines)) from None


def check_keys(space: Space, scenario_path: str | Path) -> None:
    """Every key of *space* is a setting of the scenario: each is applied alone (at its
    first value) and the scenario validated, so an unknown or misspelt key fails here,
    before any simulation, with the parameter and the key named."""
    data = read_scenario_data(scenario_path)
    base = str(Path(scenario_path).resolve().parent)
    for p in space.parameter:
        for key in p.keys:
            value = p.values[0] if p.values is not None else p.at(0.0)
            try:
                parse_scenario(with_overrides(data, {key: value}), base_dir=base)
            except ConfigError as err:
                raise ConfigError(f"space parameter {p.name!r}: key {key!r} is not a "
                                  f"setting of {Path(scenario_path).name}: {err}") from None


def statistic(values: np.ndarray, name: str) -> float:
    """*name* (one of :data:`STATISTICS`) of the finite *values*; NaN when none is."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan
    if name.startswith("p"):
        return float(np.percentile(values, int(name[1:])))
    return float({"mean": np.mean, "median": np.median, "min": np.min, "max": np.max,
                  "sd": lambda v: np.std(v, ddof=1) if v.size > 1 else 0.0}[name](values))
