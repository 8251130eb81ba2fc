"""Open-loop simulation: event semantics, grids, results with units."""

import numpy as np
import pytest

from mpc_dose.errors import ConfigError, ModelError
from mpc_dose.model import Model, mammillary
from mpc_dose.model.dosing import Dose
from mpc_dose.model.simulation import simulate

ONE = Model("one", [mammillary("d", 1, clearance_unit="L/h")])
P = {"d_v1": 10.0, "d_cl1": 2.0}
K = 0.2 / 3600  # 1/s


def test_bolus_is_right_continuous():
    """At a bolus time the recorded value is just after the dose."""
    res = simulate(ONE, P, [Dose.bolus(100, "d", 50)], [0, 99.999, 100, 100.001])
    c = res.output("d_cp")
    assert c[0] == 0 and c[1] == 0
    assert c[2] == pytest.approx(5.0)
    assert c[3] == pytest.approx(5.0 * np.exp(-K * 0.001))


def test_output_grid_need_not_be_uniform():
    """Arbitrary sorted output times give the closed form, repeated times included."""
    times = np.array([0, 1, 1, 7, 100, 3600, 3601.5, 7200])
    res = simulate(ONE, P, [Dose.bolus(0, "d", 100)], times)
    assert res.output("d_cp") == pytest.approx(10 * np.exp(-K * times), rel=1e-12)


def test_infusion_rates_are_recorded():
    """The delivered rate is a column, piecewise constant, right-continuous."""
    res = simulate(ONE, P, [Dose.infusion(10, "d", 0.5, 20)], [0, 10, 20, 30, 40])
    assert list(res.input("d")) == [0, 0.5, 0.5, 0, 0]


def test_columns_carry_units():
    """Result columns name their units; the frame has one row per output time."""
    frame = simulate(ONE, P, [], [0, 1]).to_pandas()
    assert list(frame.columns) == ["time_s", "d_cp_mg_per_L", "state_d_a1_mg", "d_rate_mg_per_s"]


def test_long_linear_simulation_is_exact_at_one_second():
    """24 h at 1 s resolution of a linear model matches the closed form to 1e-9."""
    times = np.arange(0, 86401.0)
    res = simulate(ONE, P, [Dose.infusion(0, "d", 10 / 3600, 86400)], times)
    expected = 5 * (1 - np.exp(-K * times))
    assert np.max(np.abs(res.output("d_cp") - expected)) < 1e-9 * 5


def test_explicit_initial_state():
    """x0 replaces the model's own initial state."""
    res = simulate(ONE, P, [], [0, 3600], x0=np.array([30.0]))
    assert res.output("d_cp") == pytest.approx([3.0, 3.0 * np.exp(-0.2)])


@pytest.mark.parametrize("times, match", [([], "no output times"), ([5, 1], "non-decreasing"),
                                          ([-1, 0], ">= 0"), ([0, np.nan], "finite")])
def test_bad_output_times(times, match):
    """Bad output times are refused."""
    with pytest.raises(ConfigError, match=match):
        simulate(ONE, P, [], times)


def test_bad_parameters_are_named():
    """A negative volume and an unknown parameter are named with their values."""
    with pytest.raises(ModelError, match=r"parameter 'd_v1' = -1.0 L: expected > 0"):
        simulate(ONE, {"d_v1": -1.0, "d_cl1": 2.0}, [], [0])
    with pytest.raises(ModelError, match="no parameter 'd_cl'.*did you mean 'd_cl1'"):
        simulate(ONE, {"d_v1": 1.0, "d_cl": 2.0}, [], [0])
    with pytest.raises(ModelError, match="'d_cl1'.*has no value"):
        simulate(ONE, {"d_v1": 1.0}, [], [0])


def test_dose_of_unknown_input():
    """A dose of an input the model lacks is named."""
    with pytest.raises(ConfigError, match="has no input 'x'"):
        simulate(ONE, P, [Dose.bolus(0, "x", 1)], [0])


def test_repeated_simulations_with_the_same_parameters_reuse_their_exponentials(monkeypatch):
    """A dose search simulates one patient many times: the second simulation with the same
    parameter values computes no matrix exponential again (and gives the same curve); other
    values get their own."""
    import mpc_dose.model.propagate as propagate
    from mpc_dose.model.dosing import Dose
    from mpc_dose.model.library import load
    from mpc_dose.model.simulation import simulate

    calls = []
    original = propagate.expm
    monkeypatch.setattr(propagate, "expm", lambda m: calls.append(1) or original(m))
    lm = load("vancomycin-goti")
    params = lm.population.typical_parameters({"crcl": 61.5, "weight": 71.5, "dialysis": "no"})
    doses = [Dose.from_record(0.0, "vancomycin", amount=1000.0, duration_s=3600.0)]
    times = np.linspace(0.0, 86400.0, 97)
    first = simulate(lm.model, params, doses, times).output("vancomycin_cp")
    assert calls
    calls.clear()
    again = simulate(lm.model, params, doses, times).output("vancomycin_cp")
    assert calls == [] and np.array_equal(first, again)
    simulate(lm.model, {**params, "vancomycin_cl1": params["vancomycin_cl1"] * 1.1}, doses,
             times)
    assert calls
