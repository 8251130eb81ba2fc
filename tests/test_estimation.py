"""The Bayesian (MAP) estimator of any chosen parameters (issue 15): each test states the
property it checks. The reference for exact values is the independent textbook fit in
`tests/reference/map_textbook.py` (closed-form two-compartment solution, scipy.optimize)."""

from dataclasses import replace

import numpy as np
import pytest
from scipy.linalg import expm

from mpc_dose.control.estimation import BayesianEstimator, EstimationConfig, expm_taylor, map_fit
from mpc_dose.errors import ConfigError
from mpc_dose.model.dosing import Dose
from mpc_dose.model.library import load
from mpc_dose.model.population import RandomEffect, ResidualError
from mpc_dose.model.simulation import simulate
from tests.reference import map_textbook as tb

H = 3600.0
VANCO = "vancomycin-goti"
OUT = "vancomycin_cp"
CL, V1, V2 = "vancomycin_cl1", "vancomycin_v1", "vancomycin_v2"
PATIENT = {"crcl": 90, "weight": 75, "dialysis": "no"}
OMEGA = np.diag([tb.OMEGA_GOTI[n] for n in ("cl", "v1", "v2")])
# 1 g over 1 h every 12 h; levels 12 min before a dose, one 1 h after the first infusion
DOSES = [Dose.from_record(k * 12 * H, "vancomycin", amount=1000, duration_s=H) for k in range(6)]
INFUSIONS_H = [(k * 12.0, 1.0, 1000.0) for k in range(6)]
LEVELS = [(2 * H, 31.0), (11.8 * H, 9.0), (23.8 * H, 12.5), (35.8 * H, 10.0), (47.8 * H, 14.0)]


def _fit(levels, lm=None, config=None, **record):
    return map_fit(lm or load(VANCO), PATIENT, config or EstimationConfig(OUT), DOSES, levels,
                   **record)


def _reference(levels, pieces=((0.0, 90, 75),), **kwargs):
    """The textbook fit of the same record, in hours; levels ``(t_s, value[, below])``."""
    readings = [(level[0] / H, level[1], len(level) > 2 and level[2]) for level in levels]
    rec = tb.Record(list(pieces), INFUSIONS_H, readings, kwargs.pop("occasions_h", (0.0,)))
    return rec, tb.map_fit(rec, kwargs.pop("omega", OMEGA), **kwargs)


def _etas(result, names=(CL, V1, V2)):
    return [result.eta[n] for n in names]


# ------------------------------------------------------------------ integration
def test_symbolic_expm_matches_scipy_over_the_box():
    """The scaled-and-squared Taylor exponential equals scipy's expm to 1e-12 relative for the
    augmented vancomycin matrices at the box corners over segments up to the splitting
    limit, and for short segments."""
    import casadi as ca

    est = BayesianEstimator(load(VANCO), PATIENT, EstimationConfig(OUT))
    s = est._squarings
    m_sym = ca.SX.sym("m", 3, 3)
    f = ca.Function("e", [m_sym], [expm_taylor(m_sym, s)])
    model = est.model
    limit = est._segment_limit(est._pieces[0][1])
    for p in est._box_corners(est._pieces[0][1], est.config.eta_bound_sd):
        a = np.asarray(model.affine_terms(0.0, p)[0], float).reshape(2, 2)
        for dt in (1.0, 600.0, 12 * H, limit):
            aug = np.zeros((3, 3))
            aug[:2, :2], aug[0, 2] = a * dt, 0.3 * dt
            exact = expm(aug)
            assert np.max(np.abs(np.asarray(f(aug)) - exact)) <= 1e-12 * np.max(np.abs(exact))


def test_predictions_and_state_equal_the_exact_simulator():
    """At the estimate, the fit's predictions and the state now equal the exact zero-order
    hold simulator (scipy expm) run with the individual parameters."""
    result = _fit(LEVELS)
    est = BayesianEstimator(load(VANCO), PATIENT, EstimationConfig(OUT))
    for d in DOSES:
        est.add_dose(d)
    for t, y in LEVELS:
        est.add_reading(t, y)
    est.update(50 * H)
    times = np.array([0.0] + [t for t, _ in LEVELS] + [50 * H])
    sim = simulate(load(VANCO).model, result.params, DOSES, times)
    assert result.predictions == pytest.approx(sim.output(OUT)[1:-1], rel=1e-10)
    assert est.state(50 * H) == pytest.approx(sim.states[-1], rel=1e-10)


# ------------------------------------------------------------------ against the textbook fit
def test_map_equals_the_textbook_fit_with_a_reading_below_the_lloq():
    """Etas to 1e-4 and the objective to 1e-6 of the independent fit, one reading below the
    LLOQ of 8 mg/L entering by Beal's M3 (it pulls the estimate: without it the fit
    differs)."""
    levels = LEVELS[:3] + [(35.8 * H, 8.0, True)]
    result = _fit(levels)
    _, (eta, _, objective) = _reference(levels)
    assert result.success and result.below_lloq.tolist() == [False, False, False, True]
    assert _etas(result) == pytest.approx([eta["cl"], eta["v1"], eta["v2"]], abs=1e-4)
    assert result.objective == pytest.approx(objective, abs=1e-6)
    without = _fit(LEVELS[:3])
    assert abs(without.eta[CL] - result.eta[CL]) > 0.01


def test_posterior_covariance_is_the_inverse_of_half_the_hessian():
    """The posterior covariance equals the inverse of half the textbook objective's Hessian
    (central differences) to 1e-3, and its credible interval brackets the estimate."""
    result = _fit(LEVELS)
    rec, (eta, _, _) = _reference(LEVELS)
    expected = np.linalg.inv(tb.hessian(rec, OMEGA, eta) / 2)
    assert result.covariance == pytest.approx(expected, rel=1e-3)
    low, high = result.interval(CL)
    assert low < result.params[CL] < high


def test_correlated_omega_changes_the_estimate_as_the_textbook_fit_says():
    """With correlations in Omega, the estimate equals the textbook fit with the same Omega
    (1e-4), and differs from the uncorrelated one; estimating two of the three etas takes
    the submatrix of Omega (their marginal prior)."""
    lm = load(VANCO)
    corr = {(CL, V1): 0.6, (CL, V2): -0.4}
    lm_corr = replace(lm, population=replace(lm.population, correlations=corr))
    omega = lm_corr.population.omega
    result = _fit(LEVELS[:3], lm_corr)
    _, (eta, _, _) = _reference(LEVELS[:3], omega=omega)
    assert _etas(result) == pytest.approx([eta["cl"], eta["v1"], eta["v2"]], abs=1e-4)
    assert abs(result.eta[CL] - _fit(LEVELS[:3]).eta[CL]) > 0.1
    two = _fit(LEVELS[:3], lm_corr, EstimationConfig(OUT, parameters=(CL, V1)))
    _, (eta2, _, _) = _reference(LEVELS[:3], omega=omega[:2, :2], eta_names=("cl", "v1"))
    assert _etas(two, (CL, V1)) == pytest.approx([eta2["cl"], eta2["v1"]], abs=1e-4)


def test_iov_kappa_per_occasion_and_planning_with_eta_only():
    """Inter-occasion variability on CL: one kappa per occasion estimated with the etas
    (equal to the textbook fit, 1e-4); the parameters for planning carry exp(eta) only."""
    lm = load(VANCO)
    pi_cl = 0.09
    lm_iov = replace(lm, population=replace(lm.population, occasion_effects=(
        RandomEffect(CL, pi_cl),)))
    result = _fit(LEVELS, lm_iov, occasions_s=[24 * H])
    _, (eta, kappas, _) = _reference(LEVELS, occasions_h=(0.0, 24.0), kappa_names=("cl",),
                                     pi={"cl": pi_cl})
    assert _etas(result) == pytest.approx([eta["cl"], eta["v1"], eta["v2"]], abs=1e-4)
    assert [k[CL] for k in result.kappa] == pytest.approx([k["cl"] for k in kappas], abs=1e-4)
    assert abs(result.kappa[1][CL]) > 0.01
    typical = lm.population.typical_parameters(PATIENT)[CL]
    assert result.params[CL] == pytest.approx(typical * np.exp(result.eta[CL]), rel=1e-12)


def test_covariate_change_mid_record_is_honoured():
    """CrCL falls from 90 to 30 mL/min at 48 h: the fit equals the textbook fit with
    piecewise typical values (LOCF), differs from one not told, and plans with the new
    typical clearance."""
    levels = LEVELS + [(59.8 * H, 25.0), (71.8 * H, 30.0)]
    lm = load(VANCO)
    told = _fit(levels, covariate_changes=[(48 * H, {"crcl": 30})])
    _, (eta, _, _) = _reference(levels, pieces=((0.0, 90, 75), (48.0, 30, 75)))
    assert _etas(told) == pytest.approx([eta["cl"], eta["v1"], eta["v2"]], abs=1e-4)
    assert abs(_fit(levels).eta[CL] - told.eta[CL]) > 0.1
    typical_30 = lm.population.typical_parameters({**PATIENT, "crcl": 30})[CL]
    assert told.params[CL] == pytest.approx(typical_30 * np.exp(told.eta[CL]), rel=1e-12)


def test_exponential_residual_error_is_log_transformed():
    """An exponential residual error (log y = log f + eps) fits as the textbook
    log-transformed objective does."""
    lm = load(VANCO)
    lm_exp = replace(lm, population=replace(lm.population, residual_errors=(
        ResidualError(OUT, proportional=0.25, kind="exponential"),)))
    result = _fit(LEVELS, lm_exp)
    _, (eta, _, _) = _reference(LEVELS, error=("exponential", 0.25))
    assert _etas(result) == pytest.approx([eta["cl"], eta["v1"], eta["v2"]], abs=1e-4)


# ------------------------------------------------------------------ the closed-loop API
def _incremental(order, updates=True):
    est = BayesianEstimator(load(VANCO), PATIENT, EstimationConfig(OUT))
    for k in range(6):
        est.delivered(k * 12 * H, {"vancomycin": 1000 / H})
        est.delivered(k * 12 * H + H, {"vancomycin": 0.0})
    now = 0.0
    for i in order:
        t, y = LEVELS[i]
        now = max(now, t + 2 * H)
        est.add_reading(t, y)
        if updates:
            est.update(now)
    return est, est.update(now)


def test_late_reading_out_of_order_gives_the_same_fit():
    """Readings that come back late enter at their sample time: any arrival order (with a
    refit after each) ends at the fit of the whole record, to 1e-7."""
    _, in_order = _incremental([0, 1, 2, 3, 4])
    _, shuffled = _incremental([0, 2, 4, 1, 3])
    _, one_off = _incremental([3, 1, 0, 4, 2], updates=False)
    assert _etas(shuffled) == pytest.approx(_etas(in_order), abs=1e-7)
    assert _etas(one_off) == pytest.approx(_etas(in_order), abs=1e-7)
    assert in_order.reading_times_s.tolist() == sorted(t for t, _ in LEVELS)


def test_delivered_rates_equal_dose_records():
    """Rates told as the pumps delivered them give the fit that dose records give."""
    _, delivered = _incremental([0, 1, 2, 3, 4], updates=False)
    assert _etas(delivered) == pytest.approx(_etas(_fit(LEVELS)), abs=1e-9)


def test_update_refits_only_when_something_new_arrived():
    """Without a new reading or a change before the latest one, update returns the last
    result itself; a rate change before a reading refits."""
    est, first = _incremental([0, 1, 2])
    refits = est.refits
    est.delivered(36 * H, {"vancomycin": 0.5})          # after every reading
    assert est.update(40 * H) is first and est.refits == refits
    est.delivered(12 * H, {"vancomycin": 500 / H})      # half the rate before a reading
    assert est.update(40 * H) is not first and est.refits == refits + 1


def test_theta_and_state_follow_the_estimate():
    """theta is the typical vector now with exp(eta); state(now) is the state under the
    estimate through the delivered record, asked for cycle after cycle (each from the
    last) and after reports about the past, each taking its place in time."""
    est, result = _incremental([0, 1, 2, 3, 4])
    theta = est.theta
    assert theta[est.model.param_index(CL)] == pytest.approx(result.params[CL], rel=1e-12)
    times = np.array([0.0, 50 * H, 55 * H, 60.5 * H, 70 * H])
    sim = simulate(est.model, result.params, DOSES, times)
    for t, x in zip(times[1:], sim.states[1:]):
        assert est.state(t) == pytest.approx(x, rel=1e-9)
    est.delivered(65 * H, {"vancomycin": 0.2})     # the pump ran longer than planned
    late = simulate(est.model, result.params, DOSES + [Dose.infusion(65 * H, "vancomycin",
                                                                     0.2, 5 * H)], times)
    assert est.state(70 * H) == pytest.approx(late.states[-1], rel=1e-9)
    est.delivered(62 * H, {"vancomycin": 0.1})     # reported later, it ran before that too
    later = simulate(est.model, result.params, DOSES + [
        Dose.infusion(62 * H, "vancomycin", 0.1, 3 * H),
        Dose.infusion(65 * H, "vancomycin", 0.2, 5 * H)], times)
    assert est.state(70 * H) == pytest.approx(later.states[-1], rel=1e-9)


def test_lloq_setting_treats_low_readings_by_m3():
    """With lloq set, a reading below it is the M3 term at the limit, as if flagged."""
    low = LEVELS[:3] + [(35.8 * H, 2.0)]
    auto = _fit(low, config=EstimationConfig(OUT, lloq=8.0))
    flagged = _fit(LEVELS[:3] + [(35.8 * H, 8.0, True)])
    assert auto.below_lloq[-1] and _etas(auto) == pytest.approx(_etas(flagged), abs=1e-9)


# ------------------------------------------------------------------ failures are results
def test_unusable_reading_is_excluded_and_reported():
    """A reading of NaN is left out and listed with its reason; the fit goes on."""
    result = _fit(LEVELS[:3] + [(30 * H, float("nan"))])
    assert result.success and len(result.readings) == 3
    assert result.excluded and result.excluded[0][2] == "not a finite number"


def test_failed_fit_is_reported_not_raised():
    """A fit that cannot start (a proportional error at a zero prediction: a reading before
    any dose) or runs out of iterations returns success False with the solver's status; the
    estimator keeps planning with its last successful estimate."""
    lm = load(VANCO)
    prop = replace(lm, population=replace(lm.population, residual_errors=(
        ResidualError(OUT, proportional=0.2),)))
    est = BayesianEstimator(prop, PATIENT, EstimationConfig(OUT))
    for d in DOSES:
        est.add_dose(d)
    est.add_reading(*LEVELS[1])
    good = est.update(12 * H)
    theta = est.theta.copy()
    est.add_reading(0.0, 3.0)
    bad = est.update(13 * H)
    assert good.success and not bad.success and bad.status
    assert est.theta == pytest.approx(theta)
    short = _fit(LEVELS, config=EstimationConfig(OUT, max_iter=1))
    assert not short.success and short.status == "Maximum_Iterations_Exceeded"


def test_bad_configuration_names_the_field():
    """Unknown outputs, parameters, inputs and covariates are errors naming them."""
    lm = load(VANCO)
    with pytest.raises(ConfigError, match="no output 'vancomycin_c'"):
        BayesianEstimator(lm, PATIENT, EstimationConfig("vancomycin_c"))
    with pytest.raises(ConfigError, match="'vancomycin_cl2' has no random effect"):
        BayesianEstimator(lm, PATIENT, EstimationConfig(OUT, parameters=("vancomycin_cl2",)))
    est = BayesianEstimator(lm, PATIENT, EstimationConfig(OUT))
    with pytest.raises(ConfigError, match="no input 'vanco'"):
        est.delivered(0.0, {"vanco": 1.0})
    with pytest.raises(ConfigError, match="crcl"):
        est.covariates_from(10.0, {"crcl": -5})
    with pytest.raises(ConfigError, match="window"):
        EstimationConfig(OUT, window=0)


# ------------------------------------------------------------------ recovery in a cohort
@pytest.fixture(scope="module")
def cohort():
    """50 seeded patients (CrCL 90, 75 kg), 1 g over 1 h every 12 h; levels 10 min before
    each dose (and, in a second design, a peak 1 h after the first infusion), noise from the
    model's residual error, each returned from the laboratory 2 h after it was drawn."""
    lm = load(VANCO)
    rng = np.random.default_rng(20261123)
    troughs = [(k + 1) * 12 * H - 600 for k in range(4)]
    out = {"truth": [], "trough": [], "peak": [], "ci": []}
    for _ in range(50):
        ind = lm.population.sample(PATIENT, rng)
        out["truth"].append([ind.eta[CL], ind.eta[V1]])
        for design, times in (("trough", troughs), ("peak", [2 * H])):
            c = simulate(lm.model, ind.params, DOSES, np.array([0.0] + times)).output(OUT)[1:]
            y = np.maximum(c + rng.normal(size=c.size) * (3.4 + 0.227 * c), 0.0)
            est = BayesianEstimator(lm, PATIENT, EstimationConfig(OUT))
            fits = []
            for t, value in zip(times, y):
                for k in range(int(t // (12 * H)) + 1):   # the doses given so far
                    est.delivered(k * 12 * H, {"vancomycin": 1000 / H})
                    est.delivered(k * 12 * H + H, {"vancomycin": 0.0})
                est.add_reading(t, value)
                result = est.update(t + 2 * H)
                assert result.success, result.status
                fits.append([result.eta[CL], result.eta[V1]])
            out[design].append(fits)
            if design == "trough":
                out["ci"].append([result.sd(f"eta_{CL}"), result.sd(f"eta_{V1}")])
    return {k: np.array(v) for k, v in out.items()}


def _rmse(cohort, design, levels):
    return np.sqrt(np.mean((cohort[design][:, levels - 1] - cohort["truth"]) ** 2, axis=0))


def test_clearance_error_shrinks_as_delayed_troughs_accumulate(cohort):
    """The RMSE of eta_CL falls after 1, 2 and 4 troughs (measured 0.39, 0.37, 0.30 against
    the prior's 0.38: one trough after the first dose mixes CL with the volumes), and after
    4 the estimate is within 25 % of the true CL in at least half the patients (measured
    60 %)."""
    prior = np.sqrt(np.mean(cohort["truth"][:, 0] ** 2))
    rmse = [_rmse(cohort, "trough", n)[0] for n in (1, 2, 4)]
    assert rmse[0] > rmse[1] > rmse[2]
    assert rmse[2] < 0.85 * prior
    error = np.abs(cohort["trough"][:, 3, 0] - cohort["truth"][:, 0])
    assert np.mean(error < np.log(1.25)) >= 0.5


def test_a_peak_informs_v1(cohort):
    """Troughs say little about V1 (RMSE of eta_V1 0.87 after 4, the prior's 0.83); one peak
    1 h after the first infusion cuts it below 80 % of the prior's (measured 0.59)."""
    prior = np.sqrt(np.mean(cohort["truth"][:, 1] ** 2))
    assert _rmse(cohort, "peak", 1)[1] < 0.8 * prior


def test_credible_intervals_cover_the_truth(cohort):
    """The 95 % intervals from the posterior curvature after 4 troughs cover the true eta of
    CL and of V1 in at least 85 % of the 50 patients (measured 92 % and 94 %: a correct
    Bayesian update, the model and the prior being the simulation's)."""
    error = np.abs(cohort["trough"][:, 3] - cohort["truth"])
    coverage = np.mean(error < 1.96 * cohort["ci"], axis=0)
    assert np.all(coverage >= 0.85)


# ------------------------------------------------------------------ other models, options
def test_time_varying_and_nonlinear_models_integrate_accurately():
    """5-FU with circadian clearance (affine, time-varying: exact steps with the matrices at
    each 15-min segment's midpoint) and Michaelis-Menten elimination (nonlinear: RK4) predict
    within 1e-3 and 1e-4 of the CVODES simulator at the estimate, and both fits succeed."""
    from mpc_dose.model.library import LibraryModel
    from mpc_dose.model.pk import mammillary
    from mpc_dose.model.population import FixedEffect, PopulationModel
    from mpc_dose.model.spec import Model

    mm = Model("mm", [mammillary("drug", 1, elimination="michaelis_menten",
                                 clearance_unit="L/h", time_unit="h")])
    mm_pop = PopulationModel((), (FixedEffect("v", 50.0, "L", "volume"),
                                  FixedEffect("vmax", 100.0, "mg/h", "maximal rate"),
                                  FixedEffect("km", 10.0, "mg/L", "half-saturation")),
                             lambda c, th: {"drug_v1": th["v"], "drug_vmax": th["vmax"],
                                            "drug_km": th["km"]},
                             (RandomEffect("drug_vmax", 0.09), RandomEffect("drug_v1", 0.04)),
                             residual_errors=(ResidualError("drug_cp", 0.5, 0.1),))
    cases = [(load("fluorouracil-circadian"), "fluorouracil_cp", {"clock_time_at_t0": 8.0},
              [Dose.from_record(0, "fluorouracil", amount=2400, duration_s=46 * H)], 1e-3),
             (LibraryModel("mm", (), mm, mm_pop), "drug_cp", {},
              [Dose.from_record(k * 12 * H, "drug", amount=1000, duration_s=H)
               for k in range(4)], 1e-4)]
    times = np.array([2.0, 11.0, 23.0, 35.0, 40.0]) * H
    for lm, out, fixed, doses, tolerance in cases:
        typical = {q.name: v for q, v in zip(lm.model.params, BayesianEstimator(
            lm, {}, EstimationConfig(out), fixed=fixed).theta)}
        levels = 1.2 * simulate(lm.model, typical, doses, np.r_[0.0, times]).output(out)[1:]
        result = map_fit(lm, {}, EstimationConfig(out), doses, list(zip(times, levels)),
                         fixed=fixed)
        sim = simulate(lm.model, result.params, doses, np.r_[0.0, times]).output(out)[1:]
        assert result.success
        assert result.predictions == pytest.approx(sim, rel=tolerance)


def test_disturbance_takes_an_assay_bias_off_the_parameters():
    """With an assay bias of +4 mg/L on every level and a small residual error, the fit
    without a disturbance pins CL wrong with confidence; with one, the disturbance takes the
    bias (within 2 SDs of 4) and CL comes within 1 SD of the truth."""
    lm = load(VANCO)
    lm = replace(lm, population=replace(lm.population, residual_errors=(
        ResidualError(OUT, 0.5, 0.05, "sum"),)))
    truth = {CL: 0.3, V1: -0.2, V2: 0.1}
    params = lm.population.individual(PATIENT, truth).params
    times = np.sort(np.r_[np.arange(6) * 12 * H + 2 * H, np.arange(1, 7) * 12 * H - 600])
    levels = simulate(lm.model, params, DOSES, np.r_[0.0, times]).output(OUT)[1:] + 4.0
    plain = _fit(list(zip(times, levels)), lm)
    biased = _fit(list(zip(times, levels)), lm,
                  EstimationConfig(OUT, disturbance=True, disturbance_sd=5.0))
    assert abs(plain.eta[CL] - truth[CL]) > 3 * plain.sd(f"eta_{CL}")
    assert abs(biased.disturbance - 4.0) < 2 * biased.sd("d")
    assert abs(biased.eta[CL] - truth[CL]) < biased.sd(f"eta_{CL}")


def test_window_keeps_the_fit_short_and_close_to_full_information():
    """A level every 4 h for 4 days with a window of 6: each fit holds at most 6 readings
    and starts later and later, the etas stay within a quarter of a posterior SD of the
    full-information fit, and a late level sampled before the window still counts."""
    lm = load(VANCO)
    rng = np.random.default_rng(7)
    params = lm.population.individual(PATIENT, {CL: 0.3, V1: -0.4, V2: 0.2}).params
    times = np.arange(1, 25) * 4 * H - 300
    doses = [Dose.from_record(k * 12 * H, "vancomycin", amount=1000, duration_s=H)
             for k in range(9)]
    c = simulate(lm.model, params, doses, np.r_[0.0, times]).output(OUT)[1:]
    levels = c * (1 + 0.1 * rng.normal(size=times.size))
    est = BayesianEstimator(lm, PATIENT, EstimationConfig(OUT, window=6))
    for dose in doses:
        est.add_dose(dose)
    late = 7                                   # this level comes back at the very end
    for k, (t, y) in enumerate(zip(times, levels)):
        if k != late:
            est.add_reading(t, y)
            result = est.update(t + 600)
            assert result.success and len(result.readings) <= 6
    assert est._start_s > times[-7]
    full = map_fit(lm, PATIENT, EstimationConfig(OUT), doses,
                   [(t, y) for k, (t, y) in enumerate(zip(times, levels)) if k != late])
    for name in (CL, V1, V2):
        assert abs(result.eta[name] - full.eta[name]) < 0.25 * full.sd(f"eta_{name}")
    est.add_reading(times[late], levels[late])
    with_late = est.update(times[-1] + H)
    assert with_late is not result and times[late] not in with_late.reading_times_s
    assert with_late.objective > result.objective


def test_oral_boluses_with_absorption_estimated_match_the_simulator():
    """Oral boluses (bioavailability 0.8, lag 0.5 h) into a first-order absorption depot,
    with the absorption rate among the estimated parameters: the predictions at the estimate
    equal the exact simulator's."""
    from mpc_dose.model.library import LibraryModel
    from mpc_dose.model.pk import mammillary
    from mpc_dose.model.population import FixedEffect, PopulationModel
    from mpc_dose.model.spec import Model

    oral = Model("oral", [mammillary("drug", 1, absorption="first_order", clearance_unit="L/h",
                                     rate_constant_unit="1/h", time_unit="h")])
    pop = PopulationModel((), (FixedEffect("cl", 5.0, "L/h", "clearance"),
                               FixedEffect("v", 40.0, "L", "volume"),
                               FixedEffect("ka", 1.2, "1/h", "absorption rate"),
                               FixedEffect("f", 0.8, "1", "bioavailability"),
                               FixedEffect("tlag", 0.5, "h", "lag time")),
                          lambda c, th: {"drug_cl1": th["cl"], "drug_v1": th["v"],
                                         "drug_ka": th["ka"], "drug_f": th["f"],
                                         "drug_tlag": th["tlag"]},
                          (RandomEffect("drug_cl1", 0.09), RandomEffect("drug_v1", 0.04),
                           RandomEffect("drug_ka", 0.25)),
                          residual_errors=(ResidualError("drug_cp", 0.1, 0.1),))
    lm = LibraryModel("oral", (), oral, pop)
    doses = [Dose.bolus(k * 12 * H, "drug", 500.0) for k in range(3)]
    true = lm.population.individual({}, {"drug_cl1": 0.2, "drug_ka": -0.5}).params
    times = np.array([1.0, 3.0, 12.5, 14.0, 30.0]) * H
    levels = simulate(oral, true, doses, np.r_[0.0, times]).output("drug_cp")[1:]
    result = map_fit(lm, {}, EstimationConfig("drug_cp"), doses, list(zip(times, levels)))
    sim = simulate(oral, result.params, doses, np.r_[0.0, times]).output("drug_cp")[1:]
    assert result.success and result.eta["drug_ka"] < -0.2
    assert result.predictions == pytest.approx(sim, rel=1e-9)


def test_a_level_drawn_at_a_bolus_sees_the_state_before_it():
    """A trough drawn at the time of an intravenous bolus is the level before the bolus."""
    bolus = Dose.bolus(30 * H, "vancomycin", 500.0)
    with_bolus = map_fit(load(VANCO), PATIENT, EstimationConfig(OUT), DOSES + [bolus],
                         LEVELS[:2] + [(30 * H, 8.0)])
    before = simulate(load(VANCO).model, with_bolus.params, DOSES, np.array([0.0, 30 * H]))
    assert with_bolus.predictions[-1] == pytest.approx(before.output(OUT)[-1], rel=1e-9)
