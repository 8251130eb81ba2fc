"""Bayesian MAP estimation from sparse levels (the vancomycin case of issue 5) and MIPD."""

import pytest

from mpc_dose.control.base import Reading
from mpc_dose.control.map_estimation import MapEstimator, MIPDController, dose_for_auc
from mpc_dose.errors import ConfigError
from mpc_dose.model.dosing import Dose
from mpc_dose.model.library import load
from tests.reference import vancomycin_map as ref

H = 3600.0
PATIENT = {"crcl": 65, "weight": 70, "dialysis": "no"}
DOSES = [Dose.from_record(0, "vancomycin", amount=2000, duration_s=2 * H),
         Dose.from_record(24.2 * H, "vancomycin", amount=1400, duration_s=2 * H)]
LEVELS = [(13 * H, 12.0), (48 * H, 10.5)]


@pytest.fixture(scope="module")
def estimate():
    return MapEstimator(load("vancomycin-goti"), PATIENT, "vancomycin_cp").estimate(DOSES,
                                                                                     LEVELS)


def test_vancomycin_map_matches_independent_implementation(estimate):
    """Goti 2018, CrCL 65 mL/min, 70 kg: the MAP etas equal an independent scipy fit."""
    eta, params, objective = ref.map_estimate(65, 70, [(0, 2, 2000), (24.2, 2, 1400)],
                                              [13.0, 48.0], [12.0, 10.5])
    got = [estimate.eta[k] for k in ("vancomycin_cl1", "vancomycin_v1", "vancomycin_v2")]
    assert estimate.success
    assert got == pytest.approx(list(eta), abs=1e-5)
    assert estimate.objective == pytest.approx(objective, abs=1e-8)
    assert estimate.params["vancomycin_cl1"] == pytest.approx(params[0], rel=1e-5)
    # (measured: eta 0.10797, 0.04655, 0.06870; objective 7.27294)


def test_dose_for_auc_400_matches_independent_implementation(estimate):
    """The single 2-h dose giving AUC(0-24 h) = 400 mg.h/L agrees to 0.01 % (about 2378 mg)."""
    dose = dose_for_auc(load("vancomycin-goti"), estimate.params, input="vancomycin",
                        output="vancomycin_cp", target_auc=400, infusion_s=2 * H,
                        window_s=24 * H)
    _, params, _ = ref.map_estimate(65, 70, [(0, 2, 2000), (24.2, 2, 1400)], [13.0, 48.0],
                                    [12.0, 10.5])
    assert dose == pytest.approx(ref.dose_for_auc_24h(params), rel=1e-4)
    assert 2300 < dose < 2450


def test_no_levels_gives_the_prior():
    """Without observations the MAP estimate is the typical patient."""
    result = MapEstimator(load("vancomycin-goti"), PATIENT, "vancomycin_cp").estimate(DOSES, [])
    assert all(v == 0 for v in result.eta.values())


def test_map_needs_a_residual_error_model():
    """A model without residual error on the output cannot be fitted."""
    with pytest.raises(ConfigError, match="declares no residual error"):
        MapEstimator(load("propofol-schnider"), {"age": 40, "height": 170, "weight": 70,
                                                 "sex": "male"}, "propofol_cp")


def test_mipd_adjusts_the_next_dose_to_the_levels():
    """MIPD: a low level leads to a larger next dose than a high level."""
    lm = load("vancomycin-goti")
    doses = []
    for level in (8.0, 25.0):
        c = MIPDController(lm, PATIENT, input="vancomycin", output="vancomycin_cp",
                           measured="level", interval_s=12 * H, infusion_s=H,
                           target_auc_24h=500)
        first = c.decide(0.0, {})
        c.applied(0.0, first.rates)          # as the loop reports what the pumps did
        c.applied(H, {"vancomycin": 0.0})
        c.observe(Reading("level", level, "mg/L", 11.5 * H))
        c.applied(12 * H, c.decide(12 * H, {}).rates)
        doses.append(c.doses[-1][1])
        assert first.rates["vancomycin"] == pytest.approx(c.doses[0][1] / H)
        assert c.decide(12.5 * H, {}).rates["vancomycin"] > 0
        assert c.decide(13.5 * H, {}).rates["vancomycin"] == 0
    assert doses[0] > doses[1]
