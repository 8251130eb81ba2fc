"""Moving-horizon estimation of BIS output-map parameters (c50, gamma) and an output
disturbance from noisy BIS, the PK states being known (propagated from the infusion)."""

import math
from pathlib import Path

import casadi as ca
import numpy as np
import pytest

from mpc_dose.control.mhe import MHEConfig, MHEResult, OutputMapEKF, OutputMapMHE
from mpc_dose.control.mpc_controller import MPCController
from mpc_dose.control.nmpc import NMPCConfig
from mpc_dose.errors import ConfigError
from mpc_dose.model.library import load
from mpc_dose.model.propagate import Propagator

COVARIATES = {"age": 35, "height": 170, "weight": 70, "sex": "male"}
OMEGA = ((0.03, 0.0), (0.0, 0.09))
DT = 5.0  # s between BIS samples


@pytest.fixture(scope="module")
def ref():
    """(model, typical parameters, their vector) of the reference patient."""
    lm = load("propofol-schnider+bis-propofol")
    m = lm.model
    params = lm.population.typical_parameters(COVARIATES)
    return m, params, m.parameter_vector(params)


def infusion(t):
    """Induction at 0.5 mg/s for 4 min, then maintenance at 0.25 mg/s [mg/s]."""
    return 0.5 if t < 240.0 else 0.25


def samples(ref, seed, *, c50=1.0, gamma=1.0, offset=0.0, n=120, noise_sd=1.5,
            rate=infusion):
    """(true parameters, [(t, x, u, noisy BIS)]) sampled every 5 s under *rate*."""
    m, params, _ = ref
    true = {**params, "bis_c50": c50 * params["bis_c50"],
            "bis_gamma": gamma * params["bis_gamma"]}
    theta = m.parameter_vector(true)
    prop = Propagator(m, theta)
    rng = np.random.default_rng(seed)
    k = m.output_index("bis")
    x, out = m.initial_state(theta), []
    for i in range(n):
        t = i * DT
        u = np.array([rate(t)])
        y = float(m.h(t, x, u, theta)[k]) + offset + rng.normal(0.0, noise_sd)
        out.append((t, x.copy(), u, y))
        x = prop.advance(x, t, t + DT, u)
    return true, out


def mhe(ref, **overrides):
    m, _, theta = ref
    cfg = dict(output="bis", parameters=("bis_c50", "bis_gamma"), omega=OMEGA,
               noise_sd=1.5, window=120)
    return OutputMapMHE(m, theta, MHEConfig(**{**cfg, **overrides}))


@pytest.mark.parametrize("c50, gamma", [(1.3, 1.0), (1.3, 1.2), (0.8, 0.8), (1.2, 0.75)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("disturbance", [True, False])
def test_recovers_c50_and_gamma(ref, c50, gamma, seed, disturbance):
    """With a window covering the induction, c50 and gamma come within 10 % of the truth."""
    true, data = samples(ref, seed, c50=c50, gamma=gamma)
    est = mhe(ref, disturbance=disturbance)
    for s in data:
        est.add(*s)
    r = est.update()
    assert isinstance(r, MHEResult)
    assert r.success and r.samples == 120 and r.solve_time_s > 0.0
    for name in ("bis_c50", "bis_gamma"):
        assert r.values[name] == pytest.approx(true[name], rel=0.10)
    if disturbance:
        assert abs(r.disturbance) < 1.5
    assert est.theta[ref[0].param_index("bis_c50")] == pytest.approx(r.values["bis_c50"])
    np.testing.assert_allclose(r.eta, np.log([r.values["bis_c50"] / ref[1]["bis_c50"],
                                              r.values["bis_gamma"] / ref[1]["bis_gamma"]]))


def test_estimate_improves_on_the_prior(ref):
    """The estimate of a mismatched c50 is closer to the truth than the prior was."""
    true, data = samples(ref, 3, c50=1.3)
    est = mhe(ref)
    for s in data:
        est.add(*s)
    r = est.update()
    prior_error = abs(ref[1]["bis_c50"] - true["bis_c50"])
    assert abs(r.values["bis_c50"] - true["bis_c50"]) < 0.2 * prior_error


def test_output_offset_goes_to_disturbance(ref):
    """A +8 BIS offset on a typical patient is estimated as a disturbance near 8."""
    true, data = samples(ref, 5, offset=8.0)
    est = mhe(ref)
    for s in data:
        est.add(*s)
    r = est.update()
    assert r.success
    assert r.disturbance == pytest.approx(8.0, abs=1.0)
    assert est.disturbance == r.disturbance
    for name in ("bis_c50", "bis_gamma"):
        assert r.values[name] == pytest.approx(true[name], rel=0.05)


def test_disturbance_step_shows_at_the_latest_reading(ref):
    """The disturbance is a random walk inside the window: a +10 step in the last 20
    readings is reported near 10 at the latest reading; held constant over the window
    (q_d = 0) it is averaged away."""
    _, data = samples(ref, 4, c50=1.3)
    data = [(t, x, u, y + (10.0 if i >= len(data) - 20 else 0.0))
            for i, (t, x, u, y) in enumerate(data)]
    reports = {}
    for q_d in (0.1, 0.0):
        est = mhe(ref, q_d=q_d)
        for s in data:
            est.add(*s)
        r = est.update()
        assert r.success
        reports[q_d] = r.disturbance
    assert reports[0.1] == pytest.approx(10.0, abs=2.0)
    assert reports[0.0] < 4.0


def test_mhe_is_the_kalman_filter_when_the_model_is_linear(ref):
    """Without drug the output is linear in the disturbance and blind to the parameters: the
    MHE's arrival cost (the EKF over the readings that left the window) plus its random-walk
    window give exactly the Kalman filter's estimate at every update, whatever the window."""
    m, _, theta = ref
    _, data = samples(ref, 11, rate=lambda t: 0.0, n=60, offset=6.0)
    for window in (5, 12):
        est = mhe(ref, window=window, q_d=0.2)
        kalman = OutputMapEKF(m, theta, est.config)
        for start in range(0, 60, 4):
            for s in data[start:start + 4]:
                est.add(*s)
                kalman.add(*s)
            r, k = est.update(), kalman.update()
            if r.samples >= est.config.min_samples:
                assert r.success
                assert r.disturbance == pytest.approx(k.disturbance, abs=1e-6)
                np.testing.assert_allclose(r.eta, 0.0, atol=1e-9)
        assert est.arrival.covariance[-1, -1] < 0.5 * est.config.disturbance_sd**2


def test_arrival_cost_keeps_what_left_the_window(ref):
    """A 10-reading window slid over the whole induction recovers c50 and gamma as well as
    a window holding all 120 readings: what left the window lives on in the arrival cost."""
    true, data = samples(ref, 2, c50=1.3, gamma=0.8)
    est = mhe(ref, window=10)
    for start in range(0, len(data), 5):
        for s in data[start:start + 5]:
            est.add(*s)
        r = est.update()
    assert r.success and r.samples == 10
    for name in ("bis_c50", "bis_gamma"):
        assert r.values[name] == pytest.approx(true[name], rel=0.10)
    # the arrival cost is narrower than the population prior on both parameters
    assert np.all(np.diag(est.arrival.covariance)[:2] < 0.5 * np.diag(np.asarray(OMEGA)))


def test_parameters_stay_within_their_bound(ref):
    """With eta_bound_sd the estimated etas stay within that many prior standard deviations
    (a constraint of the MHE problem), even when the data say the patient is far off."""
    _, data = samples(ref, 12, c50=2.5)
    est = mhe(ref, eta_bound_sd=1.0)
    for s in data:
        est.add(*s)
    r = est.update()
    assert r.success
    sd = np.sqrt(np.diag(np.asarray(OMEGA)))
    assert np.all(np.abs(r.eta) <= sd + 1e-6)  # IPOPT relaxes bounds by 1e-8
    assert r.eta[0] == pytest.approx(sd[0], rel=1e-6)  # the c50 estimate is at its bound


def test_no_drug_leaves_prior(ref):
    """Without drug the data carry no information on c50 or gamma: the prior is kept."""
    _, data = samples(ref, 6, c50=1.3, rate=lambda t: 0.0, n=40)
    est = mhe(ref, disturbance=False)
    for s in data:
        est.add(*s)
    r = est.update()
    assert r.success
    np.testing.assert_allclose(r.eta, 0.0, atol=1e-6)


@pytest.mark.parametrize("count", [0, 1, 4])
def test_too_few_samples(ref, count):
    """Below min_samples update() reports success False and keeps the prior."""
    _, data = samples(ref, 7, c50=1.3, n=count) if count else (None, [])
    est = mhe(ref)
    for s in data:
        est.add(*s)
    r = est.update()
    assert r.success is False and r.status == "too few samples" and r.samples == count
    assert r.values == {"bis_c50": ref[1]["bis_c50"], "bis_gamma": ref[1]["bis_gamma"]}
    assert r.disturbance == 0.0
    np.testing.assert_array_equal(est.theta, ref[2])


def test_window_keeps_latest_samples(ref):
    """Only the latest *window* samples are used."""
    _, data = samples(ref, 8, n=30)
    est = mhe(ref, window=10)
    for s in data:
        est.add(*s)
    assert est.update().samples == 10


def test_failed_update_keeps_previous_estimate(ref):
    """A failing solve (here a non-finite sample) keeps the previous estimate."""
    _, data = samples(ref, 9, c50=1.3)
    est = mhe(ref)
    for s in data:
        est.add(*s)
    good = est.update()
    assert good.success
    bad = list(data[-1])
    bad[3] = math.nan  # a non-finite sample makes the problem unsolvable
    est.add(*bad)
    r = est.update()
    assert r.success is False
    assert r.values == good.values and r.disturbance == good.disturbance


def test_only_estimated_parameters_change(ref):
    """theta differs from the prior vector only in the estimated parameters."""
    m, _, theta = ref
    _, data = samples(ref, 10, c50=1.3, gamma=0.8)
    est = mhe(ref)
    for s in data:
        est.add(*s)
    est.update()
    changed = np.flatnonzero(est.theta != theta)
    assert set(changed) <= {m.param_index("bis_c50"), m.param_index("bis_gamma")}
    assert changed.size == 2


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("omega", [
    ((0.03, 0.0), (0.0, -0.09)),   # negative variance
    ((0.03, 0.0), (0.0, 0.0)),     # singular
    ((0.03, 0.2), (0.2, 0.09)),    # symmetric but indefinite
    ((0.03,),),                    # wrong shape
    ((0.03, 0.0, 0.0), (0.0, 0.09, 0.0), (0.0, 0.0, 0.1)),
    ((math.nan, 0.0), (0.0, 0.09)),
])
def test_omega_must_be_positive_definite(omega):
    """A non positive definite (or wrongly shaped) omega raises ConfigError."""
    with pytest.raises(ConfigError, match=r"mhe\.omega: expected a symmetric positive definite 2x2"):
        MHEConfig(output="bis", parameters=("bis_c50", "bis_gamma"), omega=omega,
                  noise_sd=1.5)


@pytest.mark.parametrize("overrides", [dict(noise_sd=0.0), dict(noise_sd=-1.0),
                                       dict(noise_sd=math.nan), dict(window=0)])
def test_noise_and_window_validated(overrides):
    """noise_sd <= 0 or a window < 1 raise ConfigError."""
    cfg = dict(output="bis", parameters=("bis_c50", "bis_gamma"), omega=OMEGA, noise_sd=1.5)
    with pytest.raises(ConfigError,
                       match=r"mhe\.(noise_sd must be > 0|min_samples: need 1 <= min_samples)"):
        MHEConfig(**{**cfg, **overrides})


@pytest.mark.parametrize("overrides, field", [
    (dict(omega=((0.03, 5.0), (0.0, 0.09))), "omega"),
    (dict(window=2.5), "window"),
    (dict(disturbance_sd=0.0), "disturbance_sd"),
    (dict(q_eta=-1e-4), "q_eta"),
    (dict(q_d=math.inf), "q_d"),
    (dict(eta_bound_sd=0.0), "eta_bound_sd"),
    (dict(window=3, min_samples=5), "min_samples"),
])
def test_more_config_validated(overrides, field):
    """Other invalid MHE settings raise ConfigError naming the field."""
    cfg = dict(output="bis", parameters=("bis_c50", "bis_gamma"), omega=OMEGA, noise_sd=1.5)
    with pytest.raises(ConfigError, match=rf"mhe\.{field}"):
        MHEConfig(**{**cfg, **overrides})


def test_non_positive_prior_rejected(ref):
    """A non-positive prior value of an estimated (log-normal) parameter is refused."""
    m, _, theta = ref
    theta = theta.copy()
    theta[m.param_index("bis_c50")] = 0.0
    cfg = MHEConfig(output="bis", parameters=("bis_c50", "bis_gamma"), omega=OMEGA,
                    noise_sd=1.5)
    with pytest.raises(ConfigError, match=r"must be positive"):
        OutputMapMHE(m, theta, cfg)


def test_unknown_parameter_or_output_rejected(ref):
    """An unknown parameter or output name is refused at construction."""
    m, _, theta = ref
    with pytest.raises(ValueError, match="bis_c5"):
        OutputMapMHE(m, theta, MHEConfig(output="bis", parameters=("bis_c5", "bis_gamma"),
                                         omega=OMEGA, noise_sd=1.5))
    with pytest.raises(ValueError, match="bsi"):
        OutputMapMHE(m, theta, MHEConfig(output="bsi", parameters=("bis_c50", "bis_gamma"),
                                         omega=OMEGA, noise_sd=1.5))


def test_controller_refuses_dynamic_parameters(ref):
    """MPCController refuses to estimate a parameter of the dynamics (ke0) with the MHE."""
    m, params, _ = ref
    nmpc = NMPCConfig(output="bis", inputs=("propofol",), period_s=10.0, horizon=5,
                      rate_bounds={"propofol": (0.0, 0.5)})
    cfg = MHEConfig(output="bis", parameters=("bis_c50", "propofol_ke0"), omega=OMEGA,
                    noise_sd=1.5)
    with pytest.raises(ConfigError, match=r"'propofol_ke0' acts on the dynamics"):
        MPCController(m, params, nmpc, cfg)


def test_construction_prints_nothing(ref, capfd):
    """Building an MHE writes nothing to standard output."""
    capfd.readouterr()
    mhe(ref, window=7)
    assert capfd.readouterr().out == ""


# ---------------------------------------------------------------- extended Kalman filter


def reference_ekf(m, theta, names, omega, samples_, *, q_eta, q_d, sd_d0, noise_sd):
    """A textbook sequential EKF in numpy (central-difference Jacobian): the independent
    reference for OutputMapEKF."""
    idx = [m.param_index(n) for n in names]
    k = m.output_index("bis")
    ne = len(idx)
    z = np.zeros(ne + 1)
    P = np.zeros((ne + 1, ne + 1))
    P[:ne, :ne] = np.asarray(omega)
    P[ne, ne] = sd_d0**2
    Q = np.diag([q_eta] * ne + [q_d])

    def predict(z_, t, x, u):
        th = theta.copy()
        th[idx] = theta[idx] * np.exp(z_[:ne])
        return float(m.h(t, x, u, th)[k]) + z_[ne]

    for t, x, u, y in samples_:
        P = P + Q
        H = np.array([(predict(z + e, t, x, u) - predict(z - e, t, x, u)) / 2e-6
                      for e in np.eye(ne + 1) * 1e-6])
        gain = P @ H / (H @ P @ H + noise_sd**2)
        z = z + gain * (y - predict(z, t, x, u))
        P = P - np.outer(gain, H @ P)
    return z, P


@pytest.mark.parametrize("batches", [[1] * 12, [5] * 12, [3, 7, 1, 9, 2, 5, 4, 6, 8, 5, 5, 5]])
def test_ekf_equals_a_textbook_filter(ref, batches):
    """Readings processed in batches of any size give the sequential textbook EKF's mean
    and covariance (the covariance is carried from reading to reading, not reset)."""
    m, _, theta = ref
    true, data = samples(ref, 3, c50=1.3, gamma=0.8, n=sum(batches))
    options = dict(q_eta=1e-3, q_d=0.01)
    cfg = MHEConfig(output="bis", parameters=("bis_c50", "bis_gamma"), omega=OMEGA,
                    noise_sd=1.5, window=30, disturbance_sd=5.0, **options)
    ekf = OutputMapEKF(m, theta, cfg)
    start = 0
    for size in batches:
        for t, x, u, y in data[start:start + size]:
            ekf.add(t, x, u, y)
        assert ekf.update().success
        start += size
    z, P = reference_ekf(m, theta, ("bis_c50", "bis_gamma"), OMEGA, data, noise_sd=1.5,
                         sd_d0=5.0, **options)
    np.testing.assert_allclose(ekf._z, z, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ekf._P, P, rtol=1e-6, atol=1e-10)
    assert np.trace(P[:2, :2]) < 0.5 * np.trace(np.asarray(OMEGA))  # the data informed it


# ---------------------------------------------------------------- the fast solver


STREAMS = Path(__file__).parent / "data" / "mhe_tiva_streams.npz"


def tiva_streams():
    """(model, MHE config, per patient (theta, readings, update marks, what the MHE of the
    closed loop reported)) captured from NMPC + MHE runs of scenarios/tiva_nmpc_training.toml
    (benchmarks/mhe_speed.py --capture; the joint SQP of the MHE before its disturbance path
    was eliminated)."""
    data = np.load(STREAMS)
    s = data["settings"]
    config = MHEConfig(output="bis", parameters=tuple(str(p) for p in data["parameters"]),
                       omega=tuple(map(tuple, data["omega"])), noise_sd=float(s[0]),
                       window=int(s[1]), disturbance_sd=float(s[2]), q_eta=float(s[3]),
                       q_d=float(s[4]), eta_bound_sd=float(s[5]), min_samples=int(s[6]))
    patients = []
    for j in range(len(data["patients"])):
        readings = list(zip(data[f"p{j}_t"], data[f"p{j}_x"], data[f"p{j}_u"],
                            data[f"p{j}_y"]))
        patients.append((data[f"p{j}_theta"], readings, data[f"p{j}_marks"],
                         data[f"p{j}_results"]))
    return load("propofol-eleveld+remifentanil-eleveld+bis-bouillon").model, config, patients


def joint_map_solver(model, config):
    """The MHE's MAP problem as written in the module docstring, over the etas and the whole
    disturbance path jointly (one value per slot), solved by IPOPT to a tight tolerance: the
    independent reference for the eliminated formulation."""
    M, n, nu = config.window, model.n_states, model.n_inputs
    idx = [model.param_index(name) for name in config.parameters]
    ne = len(idx)
    k = model.output_index(config.output)
    eta, d = ca.SX.sym("eta", ne), ca.SX.sym("d", M)
    xs, us, ts, ys = (ca.SX.sym("xs", n, M), ca.SX.sym("us", nu, M), ca.SX.sym("ts", M),
                      ca.SX.sym("ys", M))
    mask, theta = ca.SX.sym("mask", M), ca.SX.sym("theta", len(model.params))
    z_bar, sqrt_info = ca.SX.sym("z_bar", ne + 1), ca.SX.sym("L", ne + 1, ne + 1)
    th = ca.SX(theta)
    for j, i in enumerate(idx):
        th[i] = theta[i] * ca.exp(eta[j])
    residuals = [ca.mtimes(sqrt_info.T, ca.vertcat(eta, d[0]) - z_bar)]
    for i in range(M):
        y = model.h(ts[i], xs[:, i], us[:, i], th)[k] + d[i]
        residuals.append(mask[i] * (ys[i] - y) / config.noise_sd)
    residuals.append((d[1:] - d[:-1]) / math.sqrt(config.q_d))
    p = ca.vertcat(ca.vec(xs), ca.vec(us), ts, ys, mask, theta, z_bar, ca.vec(sqrt_info))
    nlp = {"x": ca.vertcat(eta, d), "p": p, "f": 0.5 * ca.sumsqr(ca.vertcat(*residuals))}
    solver = ca.nlpsol("joint", "ipopt", nlp, {
        "ipopt.print_level": 0, "print_time": False, "ipopt.sb": "yes", "ipopt.tol": 1e-10,
        "ipopt.max_iter": 500})
    bound = config.eta_bound_sd * np.sqrt(np.diag(np.asarray(config.omega)))

    def solve(est, w0):
        """(etas, disturbance path) of the window and arrival cost *est* has just used."""
        rows = est._samples
        count = len(rows)
        xs_, us_ = np.zeros((n, M)), np.zeros((nu, M))
        ts_, ys_, mask_ = np.zeros(M), np.zeros(M), np.zeros(M)
        for i in range(M):
            row = rows[min(i, count - 1)]
            ts_[i], xs_[:, i], us_[:, i], ys_[i] = row[0], row[1:1 + n], row[1 + n:-1], row[-1]
            mask_[i] = float(i < count)
        P_bar = est.arrival.covariance + est.arrival.process_noise
        L = np.linalg.cholesky(np.linalg.inv(0.5 * (P_bar + P_bar.T)))
        p_ = np.concatenate([xs_.ravel(order="F"), us_.ravel(order="F"), ts_, ys_, mask_,
                             est.theta_prior, est.arrival.mean, L.ravel(order="F")])
        lbx = np.concatenate([-bound, np.full(M, -np.inf)])
        ubx = np.concatenate([bound, np.full(M, np.inf)])
        out = solver(x0=w0, p=p_, lbx=lbx, ubx=ubx)
        assert solver.stats()["success"], solver.stats()["return_status"]
        w = np.asarray(out["x"]).ravel()
        return w[:ne], w[ne:]

    return solve


@pytest.fixture(scope="module")
def tiva():
    model, config, patients = tiva_streams()
    return model, config, patients, joint_map_solver(model, config)


def replay(model, config, theta, readings, marks):
    """Feed a captured stream to a new MHE; yields (update number, MHE, result, previous
    etas and disturbance) after each update."""
    est = OutputMapMHE(model, theta, config)
    start = 0
    for u, mark in enumerate(marks):
        for reading in readings[start:mark]:
            est.add(*reading)
        start = mark
        before = (est._eta.copy(), est.disturbance)
        r = est.update()
        yield u, est, r, before


def test_equals_the_joint_map_problem_on_tiva_windows(tiva):
    """On captured TIVA windows (induction, maintenance, the +10 stimulation), the etas and
    the disturbance path of the eliminated formulation are the joint MAP problem's (IPOPT
    over etas and path from the same start) to 1e-6 and 1e-5 (found: 2e-7 and 1.3e-6 over
    every third update)."""
    model, config, patients, joint = tiva
    checked = 0
    for theta, readings, marks, _ in patients:
        for u, est, r, (eta0, d0) in replay(model, config, theta, readings, marks):
            if r.samples < config.min_samples or u % 12:
                continue
            eta, path = joint(est, np.concatenate([eta0, np.full(config.window, d0)]))
            np.testing.assert_allclose(r.eta, eta, atol=1e-6)
            np.testing.assert_allclose(est.disturbance_path, path, atol=1e-5)
            assert r.disturbance == est.disturbance_path[r.samples - 1]
            checked += 1
    assert checked == 4 * 19


def test_same_estimates_as_the_joint_sqp_in_the_closed_loop(tiva):
    """Along the captured runs (4 patients x 239 updates, each warm-started at the previous
    estimate) every update gives what the joint SQP (dual tolerance 1e-4) reported in the
    closed loop, or, where the non-convex problem has another local minimiser, a lower
    objective than the joint SQP's estimate (one update of 956)."""
    model, config, patients, _ = tiva
    objective = None
    other = 0
    for theta, readings, marks, captured in patients:
        for u, est, r, _ in replay(model, config, theta, readings, marks):
            assert r.success == bool(captured[u, -1])
            if not r.success:
                continue
            if np.abs(r.eta - captured[u, :-2]).max() < 1e-3 and \
                    abs(r.disturbance - captured[u, -2]) < 0.02:
                continue
            if objective is None:  # min over the disturbance path at given etas
                nlp = est._problem.nlp
                objective = ca.Function("f", [nlp["x"], nlp["p"]], [nlp["f"]])
            assert float(objective(r.eta, est._p)) < \
                float(objective(captured[u, :-2], est._p)) - 1e-3
            other += 1
    assert other <= 2


def test_estimators_of_one_model_share_the_built_problem(ref):
    """Estimators of the same model and structure share the built problem (a trial builds it
    once per process) and stay independent: interleaved, two patients' MHEs and EKFs give
    what each gives alone."""
    m, params, theta = ref
    other = theta.copy()
    other[m.param_index("bis_c50")] *= 1.4
    streams = [samples(ref, 20, c50=1.3)[1], samples(ref, 21, gamma=0.8)[1]]

    def run(thetas, kind, streams=streams):
        ests = [kind(m, th, mhe(ref, window=30).config) for th in thetas]
        out = [[] for _ in ests]
        for start in range(0, 120, 5):
            for j, est in enumerate(ests):
                for s in streams[j][start:start + 5]:
                    est.add(*s)
                r = est.update()
                out[j].append(np.concatenate([r.eta, [r.disturbance]]))
        return ests, np.array(out)

    for kind in (OutputMapMHE, OutputMapEKF):
        ests, together = run([theta, other], kind)
        if kind is OutputMapMHE:
            assert ests[0]._problem is ests[1]._problem
        _, first = run([theta], kind)
        _, second = run([other], kind, streams[1:])
        np.testing.assert_array_equal(together[0], first[0])
        np.testing.assert_array_equal(together[1], second[0])
        assert np.abs(together[0] - together[1]).max() > 0.01
