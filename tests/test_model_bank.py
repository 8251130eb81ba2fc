"""The bank of candidate models (control/model_bank.py): it finds the candidate the readings
come from, moves every candidate through the same events, and refuses bad settings."""

from __future__ import annotations

import numpy as np
import pytest

from mpc_dose.control.model_bank import BankConfig, ModelBank
from mpc_dose.errors import ConfigError
from mpc_dose.model.dosing import Dose, schedule
from mpc_dose.model.library import load

PERIOD = 300.0
H = 3600.0


@pytest.fixture(scope="module")
def cambridge():
    lm = load("glucose-cambridge")
    rng = np.random.default_rng(7)
    m = lm.model
    draws = [lm.population.typical_parameters({"weight": 74})]
    draws += [lm.population.sample({"weight": 74}, rng).params for _ in range(5)]
    return m, np.array([m.parameter_vector(p) for p in draws])


def _run(bank, truth, m, hours, meal_at_h=2.0, noise=None):
    """Readings of candidate *truth*'s glucose (its own bank row moved alone), an insulin
    rate that steps every hour and a 50-g meal; returns the bank after *hours*."""
    alone = ModelBank(m, bank.thetas[[truth]], "glucose", period_s=PERIOD,
                      config=BankConfig(rk4_steps=bank.config.rk4_steps))
    gut = m.state_index("cambridge_gut1")
    rng = np.random.default_rng(0)
    u_prev = np.zeros(m.n_inputs)
    for k in range(int(hours * H / PERIOD) + 1):
        t = k * PERIOD
        u = np.zeros(m.n_inputs)
        u[m.input_index("insulin")] = (0.5 + (k // 12) % 3) / 3600.0  # 0.5-2.5 U/h
        events = [] if k == 0 else [(t - PERIOD / 2, u.copy(), None)]
        if abs(t - meal_at_h * H) < 1e-9:
            jump = np.zeros(m.n_states)
            jump[gut] = 50.0
            events.append((t, None, jump))
        x_true, _, _ = alone.update(t, u_prev, events, None)
        y = float(m.h(t, x_true, np.zeros(m.n_inputs), bank.thetas[truth])[
            m.output_index("glucose")])
        if noise:
            y *= float(np.exp(noise * rng.standard_normal()))
        bank.update(t, u_prev, events, y)
        u_prev = u
    return bank


@pytest.mark.parametrize("truth", [1, 3, 4])
def test_the_bank_finds_the_candidate_the_readings_come_from(cambridge, truth):
    """Noise-free readings of one candidate (the same RK4 steps): its open-loop predictions
    have no error, every other candidate's have, and after the warm-up it is the one in
    use (the prior, candidate 0, until then)."""
    m, thetas = cambridge

    def bank():
        return ModelBank(m, thetas, "glucose", period_s=PERIOD,
                         config=BankConfig(warmup_s=4 * H, lead_s=H))

    assert _run(bank(), truth, m, 3.9).current == 0
    bank = _run(bank(), truth, m, 8.0)
    assert bank.current == truth
    assert bank.scores[truth] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.delete(bank.scores, truth) > 1e-4)
    assert bank.switches == [(4 * H, 0, truth)]


def test_noisy_readings_still_pick_the_source(cambridge):
    """With 5 % multiplicative noise on every reading the source still scores best."""
    m, thetas = cambridge
    bank = _run(ModelBank(m, thetas, "glucose", period_s=PERIOD,
                          config=BankConfig(warmup_s=6 * H)), 2, m, 12.0, noise=0.05)
    assert bank.current == 2


def test_a_jump_moves_every_candidate_alike(cambridge):
    """An announced meal or a bolus adds the same state jump to every candidate."""
    m, thetas = cambridge
    bank = ModelBank(m, thetas, "glucose", period_s=PERIOD)
    before = bank.x.copy()
    jump = schedule(m, thetas[0], [Dose.bolus(0.0, "insulin", 2.0)]).jumps[0]
    bank.update(0.0, np.zeros(m.n_inputs), [(0.0, None, jump)], None)
    np.testing.assert_allclose(bank.x - before, np.tile(jump.reshape(-1, 1),
                                                        (1, len(thetas))))


@pytest.mark.parametrize("field, value, match", [
    ("lead_s", 0.0, r"bank\.lead_s must be > 0 \[s\], got 0\.0"),
    ("forget_s", float("inf"), r"bank\.forget_s must be > 0"),
    ("warmup_s", -1.0, r"bank\.warmup_s must be >= 0"),
    ("switch_margin", 1.0, r"bank\.switch_margin must be in \[0, 1\)"),
    ("candidates", 0, r"bank\.candidates must be a whole number >= 1"),
    ("rk4_steps", 1.5, r"bank\.rk4_steps must be a whole number >= 1")])
def test_bank_config_errors(field, value, match):
    with pytest.raises(ConfigError, match=match):
        BankConfig(**{field: value})


def test_bank_candidates_must_match_the_model(cambridge):
    m, thetas = cambridge
    with pytest.raises(ConfigError, match=r"candidate rows of \d+ parameter values"):
        ModelBank(m, thetas[:, :-1], "glucose", period_s=PERIOD)
    bad = thetas.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ConfigError, match="non-finite"):
        ModelBank(m, bad, "glucose", period_s=PERIOD)


def test_caution_picks_the_candidate_the_probe_moves_most(cambridge):
    """With every candidate near the best (cautious_within huge), the one in use after the
    warm-up is the one whose glucose an extra 1 U/h of insulin lowers most over lead_s -
    checked against CVODES propagation of each candidate from the bank's states."""
    from mpc_dose.model.propagate import Propagator

    m, thetas = cambridge
    probe = np.zeros(m.n_inputs)
    probe[m.input_index("insulin")] = 1.0 / 3600.0
    bank = ModelBank(m, thetas, "glucose", period_s=PERIOD, probe=probe,
                     config=BankConfig(warmup_s=4 * H, cautious_within=1e9))
    bank = _run(bank, 1, m, 4.0)
    u = np.zeros(m.n_inputs)
    u[m.input_index("insulin")] = (0.5 + (48 // 12) % 3) / 3600.0  # the rate in force
    k = m.output_index("glucose")
    effects = []
    for c, theta in enumerate(thetas):
        prop = Propagator(m, theta)
        x = bank.x[:, c]
        t0, t1 = 4 * H, 5 * H
        low = prop.advance(x, t0, t1, u + probe)
        high = prop.advance(x, t0, t1, u)
        effects.append(float(m.h(t1, high, u, theta)[k] - m.h(t1, low, u, theta)[k]))
    assert bank.current == int(np.argmax(effects))
    assert len(set(np.round(effects, 3))) == len(thetas)  # a real choice


def test_caution_needs_a_probe(cambridge):
    m, thetas = cambridge
    with pytest.raises(ConfigError, match="cautious_within needs a probe"):
        ModelBank(m, thetas, "glucose", period_s=PERIOD,
                  config=BankConfig(cautious_within=0.5))
