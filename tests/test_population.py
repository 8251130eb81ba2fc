"""Population statistics: covariates, random effects, inter-occasion variability, residuals."""

import math

import numpy as np
import pytest

from mpc_dose.errors import ConfigError, ModelError
from mpc_dose.model.library import load
from mpc_dose.model.population import (Covariate, FixedEffect, PopulationModel, RandomEffect,
                                       ResidualError, parse_covariates)


def _toy(correlations=None, occasion=()):
    return PopulationModel(
        (Covariate("weight", "kg", "body weight", 1, 300),),
        (FixedEffect("tv_cl", 5.0, "L/h", "clearance at 70 kg"),
         FixedEffect("tv_v", 50.0, "L", "volume at 70 kg")),
        lambda c, th: {"cl": th["tv_cl"] * (c["weight"] / 70) ** 0.75,
                       "v": th["tv_v"] * c["weight"] / 70},
        (RandomEffect("cl", 0.09), RandomEffect("v", 0.04)),
        correlations or {}, occasion)


def test_allometric_typical_values():
    """Typical values follow the declared covariate relations."""
    pop = _toy()
    p = pop.typical_parameters({"weight": 140})
    assert p["cl"] == pytest.approx(5 * 2**0.75)
    assert p["v"] == pytest.approx(100)


def test_samples_reproduce_omega(rng):
    """Drawn etas have the declared covariance (including a correlation)."""
    pop = _toy({("cl", "v"): 0.6})
    draws = np.array([[math.log(ind.params[k] / ref) for k, ref in (("cl", 5.0), ("v", 50.0))]
                      for ind in (pop.sample({"weight": 70}, rng) for _ in range(20000))])
    cov = np.cov(draws.T)
    assert cov[0, 0] == pytest.approx(0.09, rel=0.05)
    assert cov[1, 1] == pytest.approx(0.04, rel=0.05)
    assert cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1]) == pytest.approx(0.6, abs=0.03)


def test_same_seed_same_individual():
    """An individual is reproducible from the generator's seed alone."""
    pop = load("propofol-eleveld").population
    cov = {"age": 50, "height": 170, "weight": 80, "sex": "female"}
    a = pop.sample(cov, np.random.default_rng(7))
    b = pop.sample(cov, np.random.default_rng(7))
    assert a.params == b.params and a.eta == b.eta


def test_occasion_effects_vary_between_occasions(rng):
    """Inter-occasion kappas multiply the individual value and differ by occasion."""
    pop = _toy(occasion=(RandomEffect("cl", 0.04),))
    ind = pop.individual({"weight": 70}, {"cl": 0.1})
    k1, k2 = pop.sample_occasion(rng), pop.sample_occasion(rng)
    occ1 = pop.individual({"weight": 70}, {"cl": 0.1}, k1)
    assert occ1.params["cl"] == pytest.approx(ind.params["cl"] * math.exp(k1["cl"]))
    assert k1["cl"] != k2["cl"]
    kappas = [pop.sample_occasion(rng)["cl"] for _ in range(5000)]
    assert np.var(kappas) == pytest.approx(0.04, rel=0.08)


def test_random_effect_cv():
    """The CV of a log-normal parameter is sqrt(exp(omega^2) - 1)."""
    assert RandomEffect("x", math.log(1 + 0.3**2)).cv == pytest.approx(0.3)


@pytest.mark.parametrize("kind, expected", [("sum", 3.4 + 0.227 * 20),
                                            ("quadrature", math.hypot(3.4, 0.227 * 20))])
def test_residual_error_models(kind, expected):
    """Combined residual error as a sum of SDs or in quadrature."""
    assert ResidualError("c", 3.4, 0.227, kind).sd(20.0) == pytest.approx(expected)


def test_vancomycin_residual_is_the_mipd_sum():
    """Goti 2018's residual SD is 3.4 + 0.227 f (as used for MAP dosing)."""
    err = load("vancomycin-goti").population.residual_error("vancomycin_cp")
    assert err.sd(10.0) == pytest.approx(3.4 + 2.27)


def test_non_positive_definite_omega_is_refused():
    """A correlation of 1 is refused."""
    with pytest.raises(ModelError, match=r"\|rho\| < 1"):
        _toy({("cl", "v"): 1.0})


def test_sample_needs_a_generator():
    """Randomness only from a numpy Generator passed in."""
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        _toy().sample({"weight": 70}, 42)


DECLARED = (Covariate("age", "yr", "age", 0, 120), Covariate("height", "cm", "height", 40, 250),
            Covariate("sex", "", "sex", choices=("male", "female")),
            Covariate("opiates", "", "opiates", choices=("yes", "no"), default="yes"))


def test_covariates_with_units_are_converted():
    """``height_m`` is converted to the declared cm; defaults fill optional covariates."""
    out = parse_covariates({"age": 35, "height_m": 1.7, "sex": "MALE"}, DECLARED)
    assert out == {"age": 35.0, "height": pytest.approx(170.0), "sex": "male", "opiates": "yes"}


@pytest.mark.parametrize("given, match", [
    ({"age": 35, "height": 170}, "missing covariate 'sex'"),
    ({"age": 35, "height": 170, "sex": "male", "hieght": 1}, "did you mean 'height'"),
    ({"age": 35, "height_furlong": 170, "sex": "male"}, "unknown unit"),
    ({"age": 35, "height_kg": 170, "sex": "male"}, "cannot be converted"),
    ({"age": -1, "height": 170, "sex": "male"}, "age = -1 is outside"),
    ({"age": "old", "height": 170, "sex": "male"}, "age = 'old': expected a number"),
    ({"age": 35, "height": 170, "sex": "x"}, "sex = 'x': expected one of male, female"),
    ({"age": 35, "age_yr": 35, "height": 170, "sex": "male"}, "given twice"),
])
def test_bad_covariates_are_named(given, match):
    """Bad covariates raise an error naming the covariate and the value."""
    with pytest.raises(ConfigError, match=match):
        parse_covariates(given, DECLARED)


def test_merged_population_is_block_diagonal():
    """Composing two models stacks their random effects and keeps shared covariates once."""
    pop = load("propofol-schnider+remifentanil-minto+bis-bouillon").population
    assert [c.name for c in pop.covariates] == ["age", "height", "weight", "sex"]
    omega = pop.omega
    n_p = 6
    assert np.all(omega[:n_p, n_p:] == 0)
    assert len(pop.eta_names) == len(set(pop.eta_names)) == omega.shape[0]
