"""Nonlinear MPC on the DESIGN reference problem: Schnider propofol PK + effect site for a
35-year-old, 170 cm, 70 kg man, BIS by the single-drug Hill curve; propofol in [0, 0.5] mg/s,
period 10 s, horizon 30, reference BIS 50, soft BIS >= 40."""

import math

import numpy as np
import pytest

from mpc_dose.control.nmpc import DosePlan, NMPCConfig, NonlinearMPC, problem_structure
from mpc_dose.errors import ConfigError
from mpc_dose.model.library import load
from mpc_dose.model.propagate import Propagator

COVARIATES = {"age": 35, "height": 170, "weight": 70, "sex": "male"}
T = 10.0
MAX_RATE = 0.5  # mg/s
BASE = dict(output="bis", inputs=("propofol",), period_s=T, horizon=30, reference=50.0,
            output_weight=1.0, change_weights={"propofol": 1.0},
            rate_bounds={"propofol": (0.0, MAX_RATE)}, soft_window=(40.0, math.inf),
            soft_weights=(100.0, 100.0))
STEPS = 160           # closed-loop cycles of the shared reference run
DIST_ON, DIST_OFF = 80, 120  # cycles during which a known +10 output disturbance acts


@pytest.fixture(scope="module")
def ref():
    """(model, parameter vector) of the reference problem."""
    lm = load("propofol-schnider+bis-propofol")
    m = lm.model
    return m, m.parameter_vector(lm.population.typical_parameters(COVARIATES))


def config(**overrides):
    return NMPCConfig(**{**BASE, **overrides})


def bis(model, t, x, u, p):
    return float(model.h(t, x, [u], p)[model.output_index("bis")])


@pytest.fixture(scope="module")
def loop(ref):
    """One closed loop with perfect knowledge and no noise: induction, then a known +10
    output disturbance from cycle DIST_ON to DIST_OFF (measured BIS = true BIS + 10)."""
    m, p = ref
    mpc = NonlinearMPC(m, config())
    prop = Propagator(m, p)
    x, u = m.initial_state(p), 0.0
    measured, plans, rates = [], [], []
    for k in range(STEPS):
        t = k * T
        d = 10.0 if DIST_ON <= k < DIST_OFF else 0.0
        measured.append(bis(m, t, x, u, p) + d)
        plan = mpc.plan(t, x, p, {"propofol": u}, disturbance=d)
        plans.append(plan)
        u = plan.rates["propofol"]
        rates.append(u)
        x = prop.advance(x, t, t + T, [u])
    return np.array(measured), plans, np.array(rates)


# ---------------------------------------------------------------- closed loop


def test_induction_reaches_and_holds_reference(loop):
    """Perfect knowledge, no noise: BIS enters [49, 51] within 5 min and stays there."""
    measured, _, _ = loop
    induction = measured[:DIST_ON]
    inside = np.flatnonzero(np.abs(induction - 50.0) <= 1.0)
    assert inside.size and inside[0] * T <= 300.0
    assert np.all(np.abs(induction[inside[0]:] - 50.0) <= 1.0)


def test_induction_gives_drug_at_once(loop):
    """From no drug on board the first move is the maximum rate (no stall at C = 0)."""
    _, plans, _ = loop
    assert plans[0].rates["propofol"] == pytest.approx(MAX_RATE, rel=1e-6)


def test_every_applied_rate_within_bounds(loop):
    """Every applied rate and every planned rate lies in [0, 0.5] mg/s."""
    _, plans, rates = loop
    assert np.all(rates >= 0.0) and np.all(rates <= MAX_RATE + 1e-9)
    for plan in plans:
        assert np.all(plan.plan >= 0.0) and np.all(plan.plan <= MAX_RATE + 1e-9)


def test_known_disturbance_rejected(loop):
    """A known +10 output disturbance is rejected: measured BIS back within [49, 51]."""
    measured, _, _ = loop
    during = measured[DIST_ON:DIST_OFF]
    assert during[0] > 55.0  # the step is seen
    assert np.all(np.abs(during[-10:] - 50.0) <= 1.0)
    after = measured[DIST_OFF:]
    assert np.all(np.abs(after[-10:] - 50.0) <= 1.0)


def test_disturbance_raises_the_dose(loop):
    """Rejecting a +10 BIS disturbance needs more propofol than before it."""
    _, _, rates = loop
    assert rates[DIST_ON:DIST_OFF].sum() > rates[DIST_ON - (DIST_OFF - DIST_ON):DIST_ON].sum()


def test_plans_report_solve_statistics(loop):
    """Every plan reports success, status, iterations, solve time and solver."""
    _, plans, _ = loop
    for plan in plans:
        assert isinstance(plan, DosePlan)
        assert plan.success is True
        assert isinstance(plan.status, str) and plan.status
        assert isinstance(plan.iterations, int) and plan.iterations >= 0
        assert plan.solve_time_s > 0.0 and math.isfinite(plan.solve_time_s)
        assert plan.solver.startswith(("sqpmethod", "ipopt"))
        assert plan.plan.shape == (30, 1) and plan.predicted_output.shape == (30,)
        assert math.isfinite(plan.objective)


def test_predicted_output_consistent_with_plant(ref):
    """The first predicted output equals the plant's BIS after the first move."""
    m, p = ref
    mpc = NonlinearMPC(m, config())
    x = m.initial_state(p)
    plan = mpc.plan(0.0, x, p, {"propofol": 0.0})
    u = plan.rates["propofol"]
    x1 = Propagator(m, p).advance(x, 0.0, T, [u])
    assert plan.predicted_output[0] == pytest.approx(bis(m, T, x1, u, p), abs=1e-6)


# ---------------------------------------------------------------- per-call numbers


@pytest.fixture(scope="module")
def settled(ref):
    """(state, rate in force) after 30 closed-loop cycles: BIS near 50, rate interior."""
    m, p = ref
    mpc = NonlinearMPC(m, config())
    prop = Propagator(m, p)
    x, u = m.initial_state(p), 0.0
    for k in range(30):
        u = mpc.plan(k * T, x, p, {"propofol": u}).rates["propofol"]
        x = prop.advance(x, k * T, (k + 1) * T, [u])
    assert 0.05 < u < 0.45
    return x, u


@pytest.mark.parametrize("kwargs, check", [
    (dict(reference=60.0), lambda base, new: new.rates["propofol"] < base.rates["propofol"]
     and new.predicted_output[-1] == pytest.approx(60.0, abs=0.5)),
    (dict(reference=np.linspace(50.0, 60.0, 30)),
     lambda base, new: new.predicted_output[-1] > base.predicted_output[-1] + 5.0),
    (dict(weights={"use_weights": {"propofol": 100.0}}),
     lambda base, new: new.rates["propofol"] < base.rates["propofol"] - 0.05),
    (dict(weights={"output_weight": 1e-4, "change_weights": {"propofol": 1e6}}),
     lambda base, new: abs(np.diff(new.plan[:, 0])).max() < abs(np.diff(base.plan[:, 0])).max()),
    (dict(limits={"rate_bounds": {"propofol": (0.0, 0.02)}}),
     lambda base, new: new.rates["propofol"] <= 0.02 + 1e-9 and np.all(new.plan <= 0.02 + 1e-9)),
    (dict(limits={"soft_window": (56.0, math.inf)}),
     lambda base, new: new.rates["propofol"] == 0.0
     and np.all(new.predicted_output[12:] >= 56.0 - 0.1)),
])
def test_per_call_numbers_change_result_without_rebuild(ref, settled, kwargs, check):
    """Reference, weights and limits passed per call change the plan; solvers are reused."""
    m, p = ref
    x, u = settled
    mpc = NonlinearMPC(m, config())
    base = mpc.plan(300.0, x, p, {"propofol": u})
    solvers = dict(mpc._solvers)
    new = mpc.plan(300.0, x, p, {"propofol": u}, **kwargs)
    assert base.success and new.success
    assert check(base, new)
    assert mpc._solvers.keys() == solvers.keys()
    assert all(mpc._solvers[k] is solvers[k] for k in solvers)
    again = mpc.plan(300.0, x, p, {"propofol": u})  # defaults return once the call is over
    assert again.rates["propofol"] == pytest.approx(base.rates["propofol"], rel=1e-4)


def test_per_call_max_change_binds_when_declared_at_build(ref):
    """A rate-change limit declared at build can be tightened per call."""
    m, p = ref
    mpc = NonlinearMPC(m, config(max_change={"propofol": 1.0}))
    plan = mpc.plan(0.0, m.initial_state(p), p, {"propofol": 0.0},
                    limits={"max_change": {"propofol": 0.01}})
    assert plan.success
    assert plan.rates["propofol"] <= 0.01 + 1e-9
    assert np.all(np.abs(np.diff(plan.plan[:, 0])) <= 0.01 + 1e-9)


def test_per_call_max_change_never_silently_ignored(ref):
    """A max_change given per call is honoured or refused, never silently dropped."""
    m, p = ref
    mpc = NonlinearMPC(m, config())  # no max_change at build
    try:
        plan = mpc.plan(0.0, m.initial_state(p), p, {"propofol": 0.0},
                        limits={"max_change": {"propofol": 0.01}})
    except ConfigError:
        return
    assert plan.rates["propofol"] <= 0.01 + 1e-9


@pytest.mark.parametrize("limits", [
    {"soft_window": (40.0, 60.0)},
    {"hard_window": (-math.inf, 70.0)},
    {"hard_window": (30.0, math.inf)},
])
def test_window_side_infinite_at_build_cannot_be_set(ref, limits):
    """Making finite a window side that was infinite at build raises ConfigError."""
    m, p = ref
    mpc = NonlinearMPC(m, config())
    with pytest.raises(ConfigError, match=r"was not finite when the problem was built"):
        mpc.plan(0.0, m.initial_state(p), p, {"propofol": 0.0}, limits=limits)


def test_infeasible_problem_reports_failure(ref):
    """BIS <= 5 (hard) with a tiny maximum rate: success False with a reason, never silent."""
    m, p = ref
    mpc = NonlinearMPC(m, config(hard_window=(-math.inf, 5.0)))
    plan = mpc.plan(0.0, m.initial_state(p), p, {"propofol": 0.0},
                    limits={"rate_bounds": {"propofol": (0.0, 1e-4)}})
    assert plan.success is False
    assert plan.reason and plan.status
    assert "ipopt" in plan.reason  # every solver of the chain was tried
    assert math.isnan(plan.objective)


@pytest.mark.parametrize("rogue", [3 * MAX_RATE, -0.1, math.nan])
def test_a_plan_outside_its_bounds_reported_as_success_is_a_failure(ref, monkeypatch, rogue):
    """Fault injection (DESIGN: sqpmethod + qrqp returned rates far outside their bounds and
    called it a success): every solver of the chain 'succeeds' with rates outside [0, max]
    (or not finite); the plan comes back success=False with a reason naming the bounds."""
    m, p = ref
    mpc = NonlinearMPC(m, config())

    class Rogue:
        def __call__(self, *, x0, p, lbx, ubx, lbg, ubg):
            w = np.array(x0, dtype=float).copy()
            w[mpc._slices["U"]] = rogue
            return {"x": w, "f": 0.0}

        def stats(self):
            return {"success": True, "return_status": "Solve_Succeeded", "iter_count": 3}

    monkeypatch.setattr(mpc, "_solver", lambda name: Rogue())
    plan = mpc.plan(0.0, m.initial_state(p), p, {"propofol": 0.0})
    assert plan.success is False
    word = "non-finite solution" if math.isnan(rogue) else "rates outside their bounds"
    assert word in plan.reason and "ipopt" in plan.reason


def test_failure_then_recovery_uses_cold_start(ref):
    """After a failed solve the next feasible problem is solved again."""
    m, p = ref
    mpc = NonlinearMPC(m, config(hard_window=(-math.inf, 100.0)))
    x = m.initial_state(p)
    bad = mpc.plan(0.0, x, p, {"propofol": 0.0}, limits={
        "hard_window": (-math.inf, 5.0), "rate_bounds": {"propofol": (0.0, 1e-4)}})
    good = mpc.plan(0.0, x, p, {"propofol": 0.0})
    assert not bad.success and good.success
    assert good.rates["propofol"] == pytest.approx(MAX_RATE, rel=1e-6)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides, match", [
    (dict(period_s=0.0), r"nmpc\.period_s must be > 0"),
    (dict(period_s=-10.0), r"nmpc\.period_s must be > 0"),
    (dict(period_s=math.nan), r"nmpc\.period_s must be > 0"),
    (dict(period_s=math.inf), r"nmpc\.period_s must be > 0"),
    (dict(horizon=0), r"nmpc\.horizon must be a whole number >= 1"),
    (dict(horizon=2.5), r"nmpc\.horizon must be a whole number >= 1"),
    (dict(move_block=0), r"nmpc\.move_block must be in \[1, horizon\]"),
    (dict(move_block=31), r"nmpc\.move_block must be in \[1, horizon\]"),
    (dict(solver="osqp"), r"nmpc\.solver must be 'sqpmethod' or 'ipopt', got 'osqp'"),
    (dict(transcription="collocation"), r"nmpc\.transcription must be"),
    (dict(rate_bounds={"propofol": (-0.1, 0.5)}), r"nmpc\.rate_bounds\['propofol'\]"),
    (dict(rate_bounds={"propofol": (0.5, 0.1)}), r"nmpc\.rate_bounds\['propofol'\]"),
    (dict(rate_bounds={"propofol": (0.0, math.nan)}), r"nmpc\.rate_bounds\['propofol'\]"),
])
def test_config_errors(overrides, match):
    """Bad NMPC configuration values raise ConfigError naming the field."""
    with pytest.raises(ConfigError, match=match):
        config(**overrides)


def test_planning_prints_nothing(ref, capfd):
    """Building and solving a new NMPC writes nothing to standard output."""
    m, p = ref
    capfd.readouterr()
    NonlinearMPC(m, config()).plan(0.0, m.initial_state(p), p, {"propofol": 0.0})
    assert capfd.readouterr().out == ""


def test_unknown_output_or_input_rejected(ref):
    """An unknown output or input name is refused at build."""
    m, _ = ref
    with pytest.raises(ValueError, match="bsi"):
        NonlinearMPC(m, config(output="bsi"))
    with pytest.raises(ValueError, match="propfol"):
        NonlinearMPC(m, config(inputs=("propfol",)))


def test_rate_bounds_for_unknown_input_rejected(ref):
    """rate_bounds naming an input the controller does not set raise ConfigError."""
    m, _ = ref
    with pytest.raises(ConfigError, match="propfol"):
        NonlinearMPC(m, config(rate_bounds={"propfol": (0.0, 0.5)}))


# ---------------------------------------------------------------- structure options


@pytest.fixture(scope="module")
def two_drug():
    """(model, parameters) with propofol and remifentanil acting on BIS (Bouillon)."""
    lm = load("propofol-schnider+remifentanil-minto+bis-bouillon")
    m = lm.model
    return m, m.parameter_vector(lm.population.typical_parameters(COVARIATES))


@pytest.mark.parametrize("ratio, move_block", [(None, 1), (("propofol", "remifentanil", 2.0), 2),
                                               (None, 4)])
def test_condensed_keeps_only_watched_states_and_matches_multiple_shooting(two_drug, ratio,
                                                                         move_block):
    """The condensed problem carries only the states BIS reads (the two effect sites), with
    each drug's gains to its own effect site only; it plans what multiple shooting over all
    eight states plans, and its predictions match the exact propagation."""
    m, p = two_drug
    cfg = dict(output="bis", inputs=("propofol", "remifentanil"), period_s=T, horizon=12,
               move_block=move_block, reference=50.0,
               change_weights={"propofol": 1.0, "remifentanil": 1.0},
               rate_bounds={"propofol": (0.0, 0.5), "remifentanil": (0.0, 1.0)},
               soft_window=(45.0, math.inf), ratio=ratio, dual_tolerance=1e-9)
    lifted = NonlinearMPC(m, NMPCConfig(**cfg))
    watched, entries = lifted._lift_layout
    assert sorted(m.state_names[i] for i in watched) == ["propofol_ce", "remifentanil_ce"]
    assert {(m.state_names[watched[i]], m.input_names[j]) for _, _, i, j in entries} == {
        ("propofol_ce", "propofol"), ("remifentanil_ce", "remifentanil")}
    shooting = NonlinearMPC(m, NMPCConfig(**cfg, transcription="multiple_shooting"))
    prop = Propagator(m, p)
    x, u = m.initial_state(p), {"propofol": 0.0, "remifentanil": 0.0}
    for k in range(8):
        a = lifted.plan(k * T, x, p, u)
        b = shooting.plan(k * T, x, p, u)
        assert a.success and b.success
        np.testing.assert_allclose(a.plan, b.plan, rtol=1e-3, atol=1e-5)
        u = a.rates
        rates = [u["propofol"], u["remifentanil"]]
        x_next = prop.advance(x, k * T, (k + 1) * T, rates)
        assert a.predicted_output[0] == pytest.approx(
            float(m.h((k + 1) * T, x_next, rates, p)[m.output_index("bis")]), abs=1e-6)
        x = x_next


def test_ratio_mode_fixes_second_rate(two_drug):
    """With ratio (propofol, remifentanil, 2) every plan has remifentanil = 2 x propofol."""
    m, p = two_drug
    cfg = NMPCConfig(output="bis", inputs=("propofol", "remifentanil"), period_s=T, horizon=30,
                     reference=50.0, change_weights={"propofol": 1.0},
                     rate_bounds={"propofol": (0.0, 0.5), "remifentanil": (0.0, 0.6)},
                     soft_window=(40.0, math.inf), ratio=("propofol", "remifentanil", 2.0))
    mpc = NonlinearMPC(m, cfg)
    prop = Propagator(m, p)
    ia, ib = m.input_index("propofol"), m.input_index("remifentanil")
    x, u = m.initial_state(p), {"propofol": 0.0, "remifentanil": 0.0}
    interior = False
    for k in range(25):
        plan = mpc.plan(k * T, x, p, u)
        assert plan.success
        np.testing.assert_allclose(plan.plan[:, ib], 2.0 * plan.plan[:, ia], atol=1e-12)
        assert plan.rates["remifentanil"] == pytest.approx(2.0 * plan.rates["propofol"])
        # remifentanil's bound (0.6) limits propofol to 0.3
        assert plan.rates["propofol"] <= 0.3 + 1e-9
        interior |= 0.0 < plan.rates["propofol"] < 0.29
        u = plan.rates
        x = prop.advance(x, k * T, (k + 1) * T, [u["propofol"], u["remifentanil"]])
    assert interior


def test_ratio_config_errors(two_drug):
    """A ratio naming one input twice, an unknown input or a negative ratio is refused."""
    m, _ = two_drug
    kw = dict(output="bis", inputs=("propofol", "remifentanil"), period_s=T, horizon=5)
    for ratio in [("propofol", "propofol", 1.0), ("propofol", "ketamine", 1.0),
                  ("propofol", "remifentanil", -1.0)]:
        with pytest.raises(ConfigError, match=r"nmpc\.ratio"):
            NonlinearMPC(m, NMPCConfig(**kw, ratio=ratio))


@pytest.mark.parametrize("disturbance", [0.0, -2.0, 1.0])
def test_multiple_shooting_matches_condensed(ref, settled, disturbance):
    """Multiple shooting and condensed transcriptions give the same first move."""
    m, p = ref
    x, u = settled
    a = NonlinearMPC(m, config()).plan(300.0, x, p, {"propofol": u}, disturbance=disturbance)
    b = NonlinearMPC(m, config(transcription="multiple_shooting")).plan(
        300.0, x, p, {"propofol": u}, disturbance=disturbance)
    assert a.success and b.success
    assert b.rates["propofol"] == pytest.approx(a.rates["propofol"], rel=1e-3, abs=1e-6)
    assert b.objective == pytest.approx(a.objective, rel=1e-3, abs=1e-6)


def test_move_blocking_holds_rates(ref):
    """With move_block 5 the plan is constant over each block of 5 periods."""
    m, p = ref
    plan = NonlinearMPC(m, config(move_block=5)).plan(0.0, m.initial_state(p), p,
                                                      {"propofol": 0.0})
    assert plan.success
    blocks = plan.plan[:, 0].reshape(6, 5)
    np.testing.assert_allclose(blocks, blocks[:, :1].repeat(5, axis=1), atol=0)


def test_dose_window_limits_planned_amount(ref):
    """A dose window (2 mg per 100 s) caps the amount planned in its first 100 s."""
    m, p = ref
    x = m.initial_state(p)
    free = NonlinearMPC(m, config()).plan(0.0, x, p, {"propofol": 0.0})
    assert free.plan[:10, 0].sum() * T > 10.0  # unconstrained induction gives far more
    mpc = NonlinearMPC(m, config(dose_windows=(("propofol", 100.0, 2.0),)))
    plan = mpc.plan(0.0, x, p, {"propofol": 0.0})
    assert plan.success
    assert plan.plan[:10, 0].sum() * T <= 2.0 + 1e-6
    used = mpc.plan(0.0, x, p, {"propofol": 0.0}, delivered_in_window={"propofol": 1.5})
    assert used.success
    assert used.plan[:10, 0].sum() * T <= 0.5 + 1e-6
    full = mpc.plan(0.0, x, p, {"propofol": 0.0}, delivered_in_window={"propofol": 5.0})
    assert full.success
    assert full.plan[:10, 0].sum() * T <= 1e-6


def test_intermittent_dosing_decides_only_at_scheduled_doses():
    """Vancomycin every 12 h (1-h infusions): rates only in dose periods, troughs in window."""
    from mpc_dose.model.library import load as load_model
    from mpc_dose.model.propagate import Propagator as Prop

    lm = load_model("vancomycin-goti")
    model = lm.model
    p = model.parameter_vector(lm.population.typical_parameters(
        {"crcl": 80, "weight": 75, "dialysis": "no"}))
    cfg = NMPCConfig(output="vancomycin_cp", inputs=("vancomycin",), period_s=3600.0,
                     horizon=48, reference=15.0, rate_bounds={"vancomycin": (0.0, 2000 / 3600)},
                     soft_window=(10.0, 20.0), disturbance=False, dose_interval_s=12 * 3600.0)
    mpc = NonlinearMPC(model, cfg)
    plant = Prop(model, p)
    x, u, given, conc = model.initial_state(p), 0.0, [], []
    for k in range(96):
        t = k * 3600.0
        plan = mpc.plan(t, x, p, {"vancomycin": u})
        assert plan.success, plan.reason
        u = plan.rates["vancomycin"]
        given.append(u)
        if k % 12:
            assert u == pytest.approx(0.0, abs=1e-9)
        x = plant.advance(x, t, t + 3600.0, [u])
        conc.append(float(model.h(0, x, [u], p)[0]))
    troughs = [conc[k] for k in range(11, 96, 12)][2:]
    assert all(9.0 < c < 21.0 for c in troughs), troughs
    assert sum(1 for g in given if g > 0) >= 6


def test_dose_interval_must_be_whole_periods():
    """A dose interval that is not a whole number of periods is refused."""
    with pytest.raises(ConfigError, match="whole number of periods"):
        NMPCConfig(output="bis", inputs=("propofol",), period_s=3600.0, horizon=4,
                   dose_interval_s=5000.0)


def test_window_on_another_output_caps_the_concentration():
    """A therapeutic window on the plasma concentration caps it while BIS is tracked."""
    lm = load("propofol-schnider+bis-propofol")
    model = lm.model
    p = model.parameter_vector(lm.population.typical_parameters(
        {"age": 35, "height": 170, "weight": 70, "sex": "male"}))
    base = dict(output="bis", inputs=("propofol",), period_s=10.0, horizon=30, reference=50.0,
                rate_bounds={"propofol": (0.0, 0.5)}, change_weights={"propofol": 1.0})
    free = NonlinearMPC(model, NMPCConfig(**base)).plan(0.0, model.initial_state(p), p,
                                                       {"propofol": 0.0})
    capped = NonlinearMPC(model, NMPCConfig(**base, window_output="propofol_cp",
                                            hard_window=(-math.inf, 4.0))).plan(
        0.0, model.initial_state(p), p, {"propofol": 0.0})
    assert capped.success and free.success
    cp_free = _peak_cp(model, p, free.plan)
    cp_capped = _peak_cp(model, p, capped.plan)
    assert cp_free > 4.5 and cp_capped <= 4.0 + 1e-6


def _peak_cp(model, p, plan):
    plant = Propagator(model, p)
    x, peak = model.initial_state(p), 0.0
    for k, rates in enumerate(plan):
        x = plant.advance(x, 10.0 * k, 10.0 * (k + 1), rates)
        peak = max(peak, float(model.h(0, x, rates, p)[model.output_index("propofol_cp")]))
    return peak


def test_terminal_constraint_holds_at_the_end_of_the_horizon():
    """A terminal window pins the predicted output at the horizon's end."""
    lm = load("propofol-schnider+bis-propofol")
    model = lm.model
    p = model.parameter_vector(lm.population.typical_parameters(
        {"age": 35, "height": 170, "weight": 70, "sex": "male"}))
    cfg = NMPCConfig(output="bis", inputs=("propofol",), period_s=10.0, horizon=30,
                     reference=50.0, rate_bounds={"propofol": (0.0, 0.5)},
                     change_weights={"propofol": 1.0}, terminal_window=(59.0, 61.0))
    plan = NonlinearMPC(model, cfg).plan(0.0, model.initial_state(p), p, {"propofol": 0.0})
    assert plan.success
    assert 59.0 - 1e-6 <= plan.predicted_output[-1] <= 61.0 + 1e-6


def test_a_built_problem_takes_new_weights_and_limits_without_rebuilding(ref, settled):
    """reset(config) with other weights, bounds and window (same structure) plans exactly
    what a problem built for that config plans; a structural change is refused."""
    m, p = ref
    x, u = settled
    other = config(change_weights={"propofol": 50.0}, soft_window=(48.0, math.inf),
                   rate_bounds={"propofol": (0.0, 0.3)}, reference=55.0)
    shared = NonlinearMPC(m, config())
    shared.plan(300.0, x, p, {"propofol": u})  # leaves a warm start behind
    shared.reset(other)
    fresh = NonlinearMPC(m, other)
    a = shared.plan(300.0, x, p, {"propofol": u})
    b = fresh.plan(300.0, x, p, {"propofol": u})
    assert a.success and b.success
    np.testing.assert_allclose(a.plan, b.plan, rtol=1e-9, atol=1e-12)
    assert problem_structure(other) == problem_structure(config())
    for changed in (config(horizon=20), config(hard_window=(40.0, math.inf)),
                    config(max_change={"propofol": 0.1})):
        assert problem_structure(changed) != problem_structure(config())
        with pytest.raises(ConfigError, match="structure"):
            shared.reset(changed)

