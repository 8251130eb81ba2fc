"""Virtual cohorts: patients from covariate distributions with a model's population
statistics, or from a table of demographics or individual parameters.

Every patient is reproducible from (scenario name, seed, patient index): :func:`streams`
derives independent generators for the patient's parameters, its sensor noise and its
disturbances from those three alone, so two controllers compared on one cohort meet the same
patients, the same noise and the same disturbances (common random numbers), and patient 7
is the same whether 10 or 1000 are run.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, ModelError, closest
from ..model.library import LibraryModel
from ..units import UnitError, split_unit_suffix

__all__ = ["VirtualPatientSpec", "streams", "patient_from_row", "patient_from_population",
           "CovariateDistribution"]

# appended streams leave the earlier ones as they were (SeedSequence children by position)
_STREAMS = ("parameters", "noise", "disturbances", "occasions", "covariate_changes",
            "meals")


def streams(scenario: str, seed: int, index: int) -> dict[str, np.random.Generator]:
    """Independent generators for one patient: ``parameters``, ``noise``, ``disturbances``,
    ``occasions``, ``covariate_changes``, ``meals`` (spawned from a SeedSequence keyed by scenario name, seed and index)."""
    if not isinstance(seed, int) or seed < 0 or not isinstance(index, int) or index < 0:
        raise ConfigError(f"seed and patient index must be whole numbers >= 0, got {seed!r} "
                          f"and {index!r}")
    key = zlib.crc32(scenario.encode("utf-8"))
    root = np.random.SeedSequence(entropy=seed, spawn_key=(key, index))
    return {name: np.random.Generator(np.random.PCG64(child))
            for name, child in zip(_STREAMS, root.spawn(len(_STREAMS)))}


@dataclass(frozen=True)
class VirtualPatientSpec:
    """One virtual patient: covariates, true parameter values (declared units), the random
    effects drawn, and where it came from."""

    index: int
    covariates: dict[str, float | str]
    params: dict[str, float]
    eta: dict[str, float]
    source: str
    #: parameter values given directly (table columns, scenario), kept when covariates change
    overrides: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CovariateDistribution:
    """How one covariate is drawn: ``uniform`` (low, high), ``normal`` (mean, sd, clipped to
    [low, high]), ``lognormal`` (median, sd_log: the SD of its logarithm; truncated to [low,
    high] by drawing again, so no value piles up at a bound) or ``choice`` (values with
    probabilities)."""

    name: str
    kind: str
    low: float = -math.inf
    high: float = math.inf
    mean: float = 0.0
    sd: float = 0.0
    values: tuple[str, ...] = ()
    probabilities: tuple[float, ...] = ()
    median: float = 1.0
    sd_log: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("uniform", "normal", "lognormal", "choice"):
            raise ConfigError(f"covariate {self.name!r}: kind must be uniform, normal, "
                              f"lognormal or choice, got {self.kind!r}")
        if self.kind == "lognormal" and not (self.median > 0 and self.sd_log >= 0 and
                                             self.low < self.high and self.low <= self.median
                                             <= self.high):
            raise ConfigError(f"covariate {self.name!r}: lognormal needs median > 0 within "
                              f"[low, high] and sd_log >= 0, got median {self.median}, "
                              f"sd_log {self.sd_log}, [{self.low}, {self.high}]")
        if self.kind == "uniform" and not (math.isfinite(self.low) and math.isfinite(self.high)
                                           and self.low < self.high):
            raise ConfigError(f"covariate {self.name!r}: uniform needs finite low < high")
        if self.kind == "normal" and not self.sd >= 0:
            raise ConfigError(f"covariate {self.name!r}: normal needs sd >= 0")
        if self.kind == "choice":
            p = self.probabilities or (1 / len(self.values),) * len(self.values)
            if not self.values or len(p) != len(self.values) or \
                    not math.isclose(sum(p), 1.0, rel_tol=1e-9):
                raise ConfigError(f"covariate {self.name!r}: choice needs values and "
                                  f"probabilities summing to 1")

    def draw(self, rng: np.random.Generator) -> float | str:
        if self.kind == "uniform":
            return float(rng.uniform(self.low, self.high))
        if self.kind == "normal":
            return float(np.clip(rng.normal(self.mean, self.sd), self.low, self.high))
        if self.kind == "lognormal":
            for _ in range(1000):
                value = float(self.median * math.exp(rng.normal(0.0, self.sd_log)))
                if self.low <= value <= self.high:
                    return value
            return float(np.clip(value, self.low, self.high))
        p = self.probabilities or None
        return str(self.values[int(rng.choice(len(self.values), p=p))])


def patient_from_population(library_model: LibraryModel,
                            distributions: Mapping[str, CovariateDistribution], index: int,
                            rng: np.random.Generator, *, random_effects: bool = True
                            ) -> VirtualPatientSpec:
    """Draw covariates, then (if *random_effects*) random effects, for patient *index*."""
    covariates = {name: d.draw(rng) for name, d in distributions.items()}
    pop = library_model.population
    individual = pop.sample(covariates, rng) if random_effects else pop.individual(covariates)
    return VirtualPatientSpec(index, individual.covariates, individual.params, individual.eta,
                              "population")


def patient_from_row(library_model: LibraryModel, row: Mapping[str, object],
                     columns: Mapping[str, str], codes: Mapping[str, Mapping[str, str]],
                     index: int, rng: np.random.Generator, *, random_effects: bool = False,
                     where: str = "cohort table") -> VirtualPatientSpec:
    """A patient from one table row.

    *columns* maps a covariate or model parameter (optionally with a unit suffix:
    ``height_cm``, ``propofol_cl1_L_per_h``) to the table column holding it; *codes* maps a
    categorical covariate's table codes to its choices (``{"sex": {"1": "male"}}``).
    Parameters given by the table are taken as they are; the others come from the
    population model (typical values, or sampled when *random_effects*).

    Raises
    ------
    ConfigError
        Naming the row and column for a missing column, a non-number or an unknown target.
    """
    pop = library_model.population
    model = library_model.model
    cov_names = [c.name for c in pop.covariates]
    covariates: dict[str, object] = {}
    overrides: dict[str, float] = {}
    for target, column in columns.items():
        if column not in row:
            raise ConfigError(f"{where}: no column {column!r} (for {target!r})"
                              f"{closest(column, [str(k) for k in row])}")
        raw = row[column]
        try:
            name = split_unit_suffix(target, cov_names)[0]
        except UnitError as err:
            raise ConfigError(f"{where}: {target!r}: {err}") from None
        if name in cov_names:
            if name in codes:
                text = str(raw).strip()
                if text.endswith(".0"):
                    text = text[:-2]
                if text not in codes[name]:
                    raise ConfigError(f"{where}: column {column!r} = {raw!r} has no code in "
                                      f"codes.{name} ({', '.join(codes[name])})")
                raw = codes[name][text]
            covariates[target] = raw
            continue
        try:
            name, value = model.parameter_value(target, raw, where=f"{where} {column}")
        except ModelError as err:
            raise ConfigError(f"{where}: {target!r} is neither a covariate "
                              f"({', '.join(cov_names)}) nor a model parameter"
                              f"{closest(target, cov_names + model.param_names)}: {err}"
                              ) from None
        overrides[name] = value
    individual = pop.sample(covariates, rng) if random_effects else pop.individual(covariates)
    params = dict(individual.params)
    params.update(overrides)
    eta = {k: v for k, v in individual.eta.items() if k not in overrides}
    return VirtualPatientSpec(index, individual.covariates, params, eta, where, overrides)
