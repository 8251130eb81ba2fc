"""Population (NLME) statistics of a model: fixed effects, covariates, random effects,
inter-occasion variability and residual error, each declared once.

The individual parameter ``P_i`` of a log-normally distributed parameter is
``P_i = P_typ(covariates) * exp(eta_i + kappa_io)`` with ``eta ~ N(0, Omega)`` (between
subjects) and ``kappa ~ N(0, Pi)`` (between occasions of one subject). Observations follow
``y = f + eps`` with an additive, proportional or combined residual error.

Random draws take a ``numpy.random.Generator``; nothing here touches global state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, ModelError, closest
from ..units import UnitError, convert, split_unit_suffix

__all__ = ["omega2_from_cv", "FixedEffect", "Covariate", "RandomEffect", "ResidualError", "PopulationModel",
           "Individual", "parse_covariates"]


def omega2_from_cv(cv: float) -> float:
    """Variance of eta for a log-normal parameter with coefficient of variation *cv*:
    ``ln(1 + CV^2)`` (not ``CV^2``, which holds only for small CV)."""
    return math.log1p(cv * cv)


@dataclass(frozen=True)
class FixedEffect:
    """A population parameter (theta): value, unit, meaning and its source."""

    name: str
    value: float
    unit: str
    doc: str
    reference: str = ""


@dataclass(frozen=True)
class Covariate:
    """A patient characteristic used by covariate relations.

    Continuous covariates have a *unit* and a plausible range [*lower*, *upper*] (outside it
    is an error). Categorical ones list their *choices*.
    A *default* makes the covariate optional; it is stated by ``mpc-dose models``.
    """

    name: str
    unit: str
    doc: str
    lower: float | None = None
    upper: float | None = None
    choices: tuple[str, ...] = ()
    default: float | str | None = None

    @property
    def is_categorical(self) -> bool:
        return bool(self.choices)


@dataclass(frozen=True)
class RandomEffect:
    """Log-normal variability of model parameter *param*: variance *omega2* of eta."""

    param: str
    omega2: float
    doc: str = ""

    @property
    def cv(self) -> float:
        """Coefficient of variation of the parameter, ``sqrt(exp(omega^2) - 1)``."""
        return math.sqrt(math.expm1(self.omega2))


@dataclass(frozen=True)
class ResidualError:
    """Residual error of *output*: ``sd = additive + proportional * f`` when *kind* is
    ``"sum"`` (the MIPD convention for vancomycin), ``sqrt(additive^2 + (proportional f)^2)``
    when ``"quadrature"`` (NONMEM's combined error with separate epsilons), and for
    ``"exponential"`` ``log y = log f + eps`` with *proportional* the SD of ``eps`` (NONMEM's
    log-transform-both-sides error; :meth:`sd` gives its linear-scale approximation)."""

    output: str
    additive: float = 0.0
    proportional: float = 0.0
    kind: str = "quadrature"

    def __post_init__(self) -> None:
        if self.kind not in ("sum", "quadrature", "exponential"):
            raise ModelError(f"residual error of {self.output!r}: kind {self.kind!r} is not "
                             f"'sum', 'quadrature' or 'exponential'")

    def sd(self, prediction: np.ndarray | float) -> np.ndarray:
        f = np.abs(np.asarray(prediction, dtype=float))
        if self.kind in ("sum", "exponential"):
            return self.additive + self.proportional * f
        return np.sqrt(self.additive**2 + (self.proportional * f) ** 2)


@dataclass(frozen=True)
class Individual:
    """One individual's parameter values (declared units) with the random effects drawn."""

    params: dict[str, float]
    eta: dict[str, float]
    covariates: dict[str, float | str]


def parse_covariates(given: Mapping[str, object], declared: Sequence[Covariate], *,
                     where: str = "covariates") -> dict[str, float | str]:
    """Check and convert covariates to their declared units.

    A key is either the declared name (value in the declared unit, e.g. ``age`` in yr) or the
    name with a unit suffix (``height_cm``, ``weight_lb``, ``crcl_mL_per_min``), converted.
    Categorical values are matched case-insensitively against the choices.

    Raises
    ------
    ConfigError
        Naming the covariate and value: unknown name (with the nearest declared one),
        unknown or mismatched unit, missing covariate, value outside the declared range.
    """
    by_name = {c.name: c for c in declared}
    out: dict[str, float | str] = {}
    for key, raw in given.items():
        try:
            name, unit = split_unit_suffix(key, by_name)
        except UnitError:
            raise ConfigError(f"{where}: {key!r}: unknown unit in the name of a covariate; "
                              f"declared: {', '.join(f'{c.name} [{c.unit}]' for c in declared)}"
                              ) from None
        cov = by_name.get(name)
        if cov is None:
            raise ConfigError(f"{where}: unknown covariate {key!r}{closest(key, by_name)}; "
                              f"expected: {', '.join(by_name) or 'none'}")
        if cov.name in out:
            raise ConfigError(f"{where}: covariate {cov.name!r} given twice")
        if cov.is_categorical:
            text = str(raw).strip().lower()
            if text not in cov.choices:
                raise ConfigError(f"{where}: {key} = {raw!r}: expected one of "
                                  f"{', '.join(cov.choices)}")
            out[cov.name] = text
            continue
        try:
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key} = {raw!r}: expected a number") from None
        if unit is not None:
            try:
                value = convert(value, unit, cov.unit, what=f"{where}: {key}")
            except UnitError as err:
                raise ConfigError(str(err)) from None
        if not math.isfinite(value) or (cov.lower is not None and value < cov.lower) or \
                (cov.upper is not None and value > cov.upper):
            raise ConfigError(f"{where}: {key} = {raw!r} is outside the plausible range "
                              f"[{cov.lower}, {cov.upper}] {cov.unit}")
        out[cov.name] = value
    for cov in declared:
        if cov.name not in out:
            if cov.default is None:
                raise ConfigError(f"{where}: missing covariate {cov.name!r} ({cov.doc}, "
                                  f"{cov.unit or ', '.join(cov.choices)})")
            out[cov.name] = cov.default
    return out


@dataclass(frozen=True)
class PopulationModel:
    """The NLME statistics of a library model.

    *typical* maps checked covariates and the fixed effects (by name) to the typical values
    of the structural parameters (declared units) - the covariate relations. Parameters it
    does not return are fixed (``fixed``).
    """

    covariates: tuple[Covariate, ...]
    thetas: tuple[FixedEffect, ...]
    typical: Callable[[Mapping[str, float | str], Mapping[str, float]], dict[str, float]]
    random_effects: tuple[RandomEffect, ...] = ()
    correlations: Mapping[tuple[str, str], float] = field(default_factory=dict)
    occasion_effects: tuple[RandomEffect, ...] = ()
    residual_errors: tuple[ResidualError, ...] = ()
    fixed: Mapping[str, float] = field(default_factory=dict)
    #: which drawn individuals are physiologically possible (their parameter values -> bool);
    #: :meth:`sample` draws again until one is, as a published virtual population keeps
    #: only plausible subjects. None: every draw is.
    plausible: Callable[[Mapping[str, float]], bool] | None = None

    def __post_init__(self) -> None:
        names = [r.param for r in self.random_effects]
        for (a, b), rho in self.correlations.items():
            if a not in names or b not in names or not -1 < rho < 1:
                raise ModelError(f"correlation ({a}, {b}) = {rho}: both must have random "
                                 f"effects and |rho| < 1")
        if self.random_effects and np.any(np.linalg.eigvalsh(self.omega) <= 0):
            raise ModelError("Omega is not positive definite")

    @property
    def theta(self) -> dict[str, float]:
        return {t.name: t.value for t in self.thetas}

    @property
    def eta_names(self) -> list[str]:
        return [r.param for r in self.random_effects]

    @property
    def omega(self) -> np.ndarray:
        """The between-subject covariance matrix Omega, ordered as :attr:`eta_names`."""
        sd = np.sqrt([r.omega2 for r in self.random_effects])
        corr = np.eye(len(sd))
        names = self.eta_names
        for (a, b), rho in self.correlations.items():
            i, j = names.index(a), names.index(b)
            corr[i, j] = corr[j, i] = rho
        return corr * np.outer(sd, sd)

    def typical_parameters(self, covariates: Mapping[str, object]) -> dict[str, float]:
        """Typical structural parameter values for checked *covariates* (declared units)."""
        cov = parse_covariates(covariates, self.covariates)
        values = dict(self.fixed)
        values.update(self.typical(cov, self.theta))
        return values

    def individual(self, covariates: Mapping[str, object], eta: Mapping[str, float]
                   | None = None, kappa: Mapping[str, float] | None = None) -> Individual:
        """Parameters of an individual with given random effects (0 when not given)."""
        cov = parse_covariates(covariates, self.covariates)
        values = dict(self.fixed)
        values.update(self.typical(cov, self.theta))
        eta = dict(eta or {})
        for name, value in {**eta, **(kappa or {})}.items():
            if name not in values:
                raise ModelError(f"random effect on unknown parameter {name!r}"
                                 f"{closest(name, values)}")
        for name in set(eta) | set(kappa or {}):
            values[name] = values[name] * math.exp(eta.get(name, 0.0)
                                                   + (kappa or {}).get(name, 0.0))
        return Individual(values, eta, cov)

    def sample(self, covariates: Mapping[str, object], rng: np.random.Generator) -> Individual:
        """Draw one individual: ``eta ~ N(0, Omega)`` for the given covariates."""
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        for _ in range(_PLAUSIBLE_TRIES):
            eta = {}
            if self.random_effects:
                draw = rng.multivariate_normal(np.zeros(len(self.random_effects)), self.omega,
                                               method="cholesky")
                eta = dict(zip(self.eta_names, draw))
            individual = self.individual(covariates, eta)
            if self.plausible is None or self.plausible(individual.params):
                return individual
        raise ModelError(f"no plausible individual in {_PLAUSIBLE_TRIES} draws for the "
                         f"covariates {dict(covariates)}")

    def sample_occasion(self, rng: np.random.Generator) -> dict[str, float]:
        """Draw one occasion's kappas (inter-occasion variability), independent per param."""
        return {r.param: float(rng.normal(0.0, math.sqrt(r.omega2)))
                for r in self.occasion_effects}

    def residual_error(self, output: str) -> ResidualError | None:
        for r in self.residual_errors:
            if r.output == output:
                return r
        return None

    def merge(self, other: PopulationModel) -> PopulationModel:
        """The population model of two composed library models (block-diagonal Omega)."""
        covs = {c.name: c for c in self.covariates}
        for c in other.covariates:
            if c.name in covs and covs[c.name] != c:
                mine = covs[c.name]
                if (mine.unit, mine.choices) != (c.unit, c.choices):
                    raise ModelError(f"covariate {c.name!r} is declared differently by the "
                                     f"composed models ({mine.unit} vs {c.unit})")
            covs.setdefault(c.name, c)
        thetas = {t.name: t for t in self.thetas}
        for t in other.thetas:
            if t.name in thetas:
                raise ModelError(f"fixed effect {t.name!r} is declared by two composed models")
            thetas[t.name] = t

        def typical(cov, theta, a=self, b=other):
            return {**a.typical(cov, theta), **b.typical(cov, theta)}

        return PopulationModel(tuple(covs.values()), tuple(thetas.values()), typical,
                               self.random_effects + other.random_effects,
                               {**self.correlations, **other.correlations},
                               self.occasion_effects + other.occasion_effects,
                               self.residual_errors + other.residual_errors,
                               {**self.fixed, **other.fixed}, _both(self.plausible,
                                                                   other.plausible))


#: draws :meth:`PopulationModel.sample` makes before it gives up on plausibility
_PLAUSIBLE_TRIES = 1000


def _both(a, b):
    """The plausibility of a composed population: both parts' checks (None: none)."""
    if a is None or b is None:
        return a or b
    return lambda params: a(params) and b(params)
