"""Shared fixtures: a seeded random generator and small models."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    """A seeded generator: tests never use global randomness."""
    return np.random.default_rng(20261123)


@pytest.fixture
def schnider():
    """The Schnider propofol library model."""
    from mpc_dose.model.library import load

    return load("propofol-schnider")


@pytest.fixture
def reference_patient():
    """The 35-year-old, 170 cm, 70 kg man of the TIVA reference problem."""
    return {"age": 35, "height_cm": 170, "weight_kg": 70, "sex": "male"}
