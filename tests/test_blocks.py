"""Properties of the model building blocks (mpc_dose.model): circadian modulation, the
propagator, saturable elimination, the absorption depot, target-mediated disposition,
turnover, myelosuppression and transit models, derivatives of the PD forms, and errors on
bad input.

References are closed forms where they exist and otherwise scipy ``solve_ivp`` at tight
tolerances, written here from the equations in the blocks' docstrings. Model time is s;
parameters are in their declared units (hour-based models declare L/h, 1/h and h); input
rates are amounts per s.
"""

from __future__ import annotations

import math
from functools import lru_cache

import casadi as ca
import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.linalg import expm
from scipy.special import gammainc

from mpc_dose.errors import ModelError
from mpc_dose.model import (Block, Cosinor, Model, bouillon_bis, effect_compartment,
                            emax_effect, friberg_myelosuppression, indirect_response, library,
                            mammillary, target_mediated, transit_chain)
from mpc_dose.model.dosing import Dose
from mpc_dose.model.propagate import Propagator
from mpc_dose.model.simulation import simulate
from mpc_dose.model.spec import state

H = 3600.0  # s per h
TWO_PI = 2 * math.pi


def pk_hours(drug: str = "d", n: int = 1, **kw):
    """A mammillary block declared in mg, L, L/h, 1/h and h."""
    return mammillary(drug, n, clearance_unit="L/h", rate_constant_unit="1/h", time_unit="h",
                      **kw)


def auc_block(cp) -> Block:
    """A quadrature state ``auc`` (mg*h/L) integrating the concentration output *cp*."""
    return Block("auc", states=(state("auc", "mg*h/L", "area under the curve"),),
                 rates=(cp.value,))


def _with_central(model: Model, drug: str, amount: float, p: np.ndarray | None = None):
    """Initial state with *amount* in the central compartment of *drug*."""
    x0 = np.zeros(model.n_states) if p is None else model.initial_state(p)
    x0[model.state_index(f"{drug}_a1")] = amount
    return x0


# ======================================================================= circadian
LINEAR = {"d_v1": 10.0, "d_cl1": 2.0}
DOSES = [Dose.bolus(0.0, "d", 100.0), Dose.infusion(3 * H, "d", 20.0 / H, 5 * H),
         Dose.bolus(30 * H, "d", 50.0)]
TIMES = np.concatenate([np.linspace(0.0, 48 * H, 97), [50 * H, 60.5 * H]])


@pytest.mark.parametrize("elimination, extra", [
    ("linear", {}), ("mixed", {"d_vmax": 3.0, "d_km": 4.0})])
def test_zero_amplitude_cosinor_is_bit_identical_to_constant_model(elimination, extra):
    """With every amplitude 0 a cosinor-modulated clearance gives exactly the constant model."""
    pk = pk_hours(elimination=elimination)
    constant = Model("constant", [pk])
    rhythmic = Model("rhythmic", [pk], circadian=[Cosinor("d_cl1", harmonics=2)])
    params = {**LINEAR, **extra}
    phases = {"d_cl1_amplitude_1": 0.0, "d_cl1_amplitude_2": 0.0, "d_cl1_acrophase_1": 3.0,
              "d_cl1_acrophase_2": 17.0, "clock_time_at_t0": 8.25}
    a = simulate(constant, params, DOSES, TIMES)
    b = simulate(rhythmic, {**params, **phases}, DOSES, TIMES)
    assert np.array_equal(a.states, b.states)
    assert np.array_equal(a.outputs, b.outputs)


def cosinor_bolus_closed_form(t_h, dose, v, cl0, amps, phases, clock_h, period_h=24.0):
    """C(t) after a bolus with CL(t) = CL0 (1 + sum_k A_k cos(k w (clock + t - phi_k)))."""
    w = TWO_PI / period_h
    integral = np.asarray(t_h, dtype=float).copy()
    for k, (a, phi) in enumerate(zip(amps, phases), start=1):
        integral += a / (k * w) * (np.sin(k * w * (clock_h + t_h - phi))
                                   - np.sin(k * w * (clock_h - phi)))
    return dose / v * np.exp(-cl0 / v * integral)


def test_two_harmonic_cosinor_matches_closed_form():
    """A 2-harmonic cosinor clearance (with a clock offset) gives the closed-form bolus decay."""
    model = Model("cosinor2", [pk_hours()], circadian=[Cosinor("d_cl1", harmonics=2)])
    amps, phases, clock = (0.3, 0.12), (2.0, 9.5), 6.75
    params = {**LINEAR, "d_cl1_amplitude_1": amps[0], "d_cl1_amplitude_2": amps[1],
              "d_cl1_acrophase_1": phases[0], "d_cl1_acrophase_2": phases[1],
              "clock_time_at_t0": clock}
    t_h = np.array([0.5, 3.0, 6.0, 11.0, 17.5, 24.0, 31.0, 40.0])
    res = simulate(model, params, [Dose.bolus(0.0, "d", 100.0)], t_h * H)
    exact = cosinor_bolus_closed_form(t_h, 100.0, 10.0, 2.0, amps, phases, clock)
    np.testing.assert_allclose(res.output("d_cp"), exact, rtol=1e-7, atol=0)
    # and the rhythm matters: the constant model differs by far more than the tolerance
    assert not np.allclose(exact, 10.0 * np.exp(-0.2 * t_h), rtol=1e-3)


def test_clock_offset_equals_acrophase_shift():
    """Simulating with clock_time_at_t0 = h equals simulating with every acrophase shifted by -h."""
    model = Model("cosinor2", [pk_hours()], circadian=[Cosinor("d_cl1", harmonics=2)])
    base = {**LINEAR, "d_cl1_amplitude_1": 0.3, "d_cl1_amplitude_2": -0.1}
    phases, h = (2.0, 9.5), 5.5
    with_clock = simulate(model, {**base, "d_cl1_acrophase_1": phases[0],
                                  "d_cl1_acrophase_2": phases[1], "clock_time_at_t0": h},
                          DOSES, TIMES)
    shifted = simulate(model, {**base, "d_cl1_acrophase_1": phases[0] - h,
                               "d_cl1_acrophase_2": phases[1] - h, "clock_time_at_t0": 0.0},
                       DOSES, TIMES)
    np.testing.assert_allclose(with_clock.states, shifted.states, rtol=1e-9, atol=1e-12)
    unshifted = simulate(model, {**base, "d_cl1_acrophase_1": phases[0],
                                 "d_cl1_acrophase_2": phases[1], "clock_time_at_t0": 0.0},
                         DOSES, TIMES)
    assert not np.allclose(with_clock.states, unshifted.states, rtol=1e-3)


# ======================================================================= propagator
@lru_cache(maxsize=None)
def schnider():
    lm = library.load("propofol-schnider")
    params = lm.population.typical_parameters({"age": 50, "height_cm": 175, "weight_kg": 80,
                                               "sex": "female"})
    return lm.model, params


def test_exact_zoh_equals_cvodes_and_expm_reference():
    """Exact ZOH of a linear 3-compartment + effect-site model equals CVODES and expm to 1e-8."""
    model, params = schnider()
    p = model.parameter_vector(params)
    exact = Propagator(model, p)
    assert exact.is_exact
    # The same model with a cosinor on CL1 whose amplitude (1e-300) is not zero, so CVODES is
    # used, but 1 + 1e-300 cos(.) == 1.0: numerically the very same ODE.
    rhythmic = Model("schnider cosinor", model.blocks, circadian=[Cosinor("propofol_cl1")])
    cvodes = Propagator(rhythmic, rhythmic.parameter_vector(
        {**params, "propofol_cl1_amplitude_1": 1e-300}))
    assert not cvodes.is_exact

    # independent reference: micro constants (1/s) and the augmented matrix exponential
    v1, v2, v3 = (params[f"propofol_v{i}"] for i in (1, 2, 3))
    cl1, cl2, cl3 = (params[f"propofol_cl{i}"] / 60.0 for i in (1, 2, 3))
    ke0 = params["propofol_ke0"] / 60.0
    a = np.array([[-(cl1 + cl2 + cl3) / v1, cl2 / v2, cl3 / v3, 0.0],
                  [cl2 / v1, -cl2 / v2, 0.0, 0.0],
                  [cl3 / v1, 0.0, -cl3 / v3, 0.0],
                  [ke0 / v1, 0.0, 0.0, -ke0]])  # Ce in mg/L = ug/mL, driven by A1/V1

    def reference(x, dt, rate):
        m = np.zeros((5, 5))
        m[:4, :4] = a * dt
        m[0, 4] = rate * dt
        return expm(m)[:4, :4] @ x + expm(m)[:4, 4]

    x_exact = x_cv = x_ref = np.array([120.0, 0.0, 0.0, 0.0])  # after a 120 mg bolus
    t = 0.0
    for dt, rate in ((10.0, 0.0), (590.0, 0.2), (3000.0, 0.1), (3600.0, 0.0), (0.5, 1.0),
                     (7200.0, 0.05)):
        u = np.array([rate])
        x_exact = exact.advance(x_exact, t, t + dt, u)
        x_cv = cvodes.advance(x_cv, t, t + dt, u)
        x_ref = reference(x_ref, dt, rate)
        t += dt
        np.testing.assert_allclose(x_exact, x_ref, rtol=1e-10)
        np.testing.assert_allclose(x_cv, x_exact, rtol=1e-8)


# ======================================================================= saturable elimination
MM2 = {"d_v1": 20.0, "d_v2": 40.0, "d_cl2": 5.0, "d_vmax": 60.0, "d_km": 3.0}
MM_DOSES = [Dose.bolus(0.0, "d", 400.0), Dose.infusion(2 * H, "d", 100.0 / H, 4 * H)]
MM_TIMES_H = np.array([0.25, 1.0, 2.0, 3.5, 6.0, 9.0, 15.0, 24.0, 36.0])


def two_cpt_reference(params: dict, t_h: np.ndarray) -> np.ndarray:
    """Central concentration of the 2-compartment model with linear + MM elimination, by
    Radau at rtol 1e-12 (h, mg, L), restarted at every dose boundary."""
    v1, v2, q = params["d_v1"], params["d_v2"], params["d_cl2"]
    cl, vmax, km = params.get("d_cl1", 0.0), params.get("d_vmax", 0.0), params.get("d_km", 1.0)

    def rhs(_t, a, rate):
        c = a[0] / v1
        return [rate - cl * c - vmax * c / (km + c) - q * c + q * a[1] / v2,
                q * c - q * a[1] / v2]

    def jac(_t, a, _rate):
        c = a[0] / v1
        d_mm = vmax * km / (km + c) ** 2 / v1
        return [[-cl / v1 - d_mm - q / v1, q / v2], [q / v1, -q / v2]]

    segments = [(0.0, 2.0, 0.0), (2.0, 6.0, 100.0), (6.0, t_h[-1], 0.0)]
    x = np.array([400.0, 0.0])
    out = np.empty(t_h.size)
    for lo, hi, rate in segments:
        inside = (t_h > lo) & (t_h <= hi)
        sol = solve_ivp(rhs, (lo, hi), x, method="Radau", jac=jac, args=(rate,), rtol=1e-12,
                        atol=1e-14, dense_output=True)
        out[inside] = sol.sol(t_h[inside])[0] / v1
        x = sol.y[:, -1]
    return out


@pytest.mark.parametrize("elimination, extra", [("michaelis_menten", {}),
                                                ("mixed", {"d_cl1": 1.5})])
def test_saturable_elimination_matches_solve_ivp(elimination, extra):
    """Michaelis-Menten and mixed elimination agree with a tight scipy solve_ivp reference."""
    params = {**MM2, **extra}
    model = Model(elimination, [pk_hours(n=2, elimination=elimination)])
    res = simulate(model, params, MM_DOSES, MM_TIMES_H * H)
    np.testing.assert_allclose(res.output("d_cp"), two_cpt_reference(params, MM_TIMES_H),
                               rtol=1e-7)


def test_mixed_elimination_with_vanishing_vmax_is_linear():
    """Mixed elimination with Vmax -> 0 equals linear elimination."""
    linear = Model("linear", [pk_hours(n=2)])
    mixed = Model("mixed", [pk_hours(n=2, elimination="mixed")])
    params = {k: v for k, v in MM2.items() if k not in ("d_vmax", "d_km")} | {"d_cl1": 1.5}
    a = simulate(linear, params, MM_DOSES, MM_TIMES_H * H)
    b = simulate(mixed, {**params, "d_vmax": 1e-12, "d_km": 3.0}, MM_DOSES, MM_TIMES_H * H)
    np.testing.assert_allclose(b.states, a.states, rtol=1e-8)


# ======================================================================= absorption depot
ORAL = {"d_v1": 10.0, "d_cl1": 2.0, "d_ka": 1.3, "d_f": 0.7}


@lru_cache(maxsize=None)
def oral_model() -> Model:
    pk = pk_hours(absorption="first_order")
    return Model("oral", [pk, auc_block(pk.output("d_cp"))])


def test_lag_time_shifts_the_curve_exactly():
    """A lag time L shifts the whole concentration curve (boluses and infusions) by L."""
    model, lag_h = oral_model(), 0.75
    doses = [Dose.bolus(0.0, "d", 100.0), Dose.infusion(5 * H, "d", 30.0 / H, 2 * H)]
    t_h = np.linspace(0.0, 24.0, 97)
    base = simulate(model, {**ORAL, "d_tlag": 0.0}, doses, t_h * H).output("d_cp")
    lagged = simulate(model, {**ORAL, "d_tlag": lag_h}, doses,
                      np.concatenate([[0.0, 0.3 * lag_h, 0.999 * lag_h], (t_h + lag_h)]) * H)
    assert np.all(lagged.output("d_cp")[:3] == 0.0)
    np.testing.assert_allclose(lagged.output("d_cp")[3:], base, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("f", [0.3, 1.0])
@pytest.mark.parametrize("route", ["bolus", "infusion"])
def test_bioavailability_scales_auc(f, route):
    """Oral AUC(0-inf) is F D / CL, for a bolus and for a zero-order input into the depot."""
    dose = (Dose.bolus(0.0, "d", 100.0) if route == "bolus"
            else Dose.infusion(0.0, "d", 100.0 / (3 * H), 3 * H))
    res = simulate(oral_model(), {**ORAL, "d_f": f, "d_tlag": 0.4}, [dose], [250 * H])
    assert res.state("auc")[0] == pytest.approx(f * 100.0 / ORAL["d_cl1"], rel=1e-8)


def test_bateman_function():
    """An oral bolus gives C = F D ka/(V (ka - k)) (e^{-k t'} - e^{-ka t'}), t' = t - tlag."""
    lag_h, dose = 0.5, 100.0
    t_h = np.array([0.6, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 24.0])
    res = simulate(oral_model(), {**ORAL, "d_tlag": lag_h}, [Dose.bolus(0.0, "d", dose)],
                   t_h * H)
    k, ka, v, f = ORAL["d_cl1"] / ORAL["d_v1"], ORAL["d_ka"], ORAL["d_v1"], ORAL["d_f"]
    tp = t_h - lag_h
    bateman = f * dose * ka / (v * (ka - k)) * (np.exp(-k * tp) - np.exp(-ka * tp))
    np.testing.assert_allclose(res.output("d_cp"), bateman, rtol=1e-9)


# ======================================================================= target-mediated
TMDD = {"mab_v": 3.0, "mab_kel": 0.1, "mab_ksyn": 1.0, "mab_kdeg": 0.2, "mab_kint": 0.05}
KSS, KON = 1.0, 1e3  # nmol/L, L/nmol/h: binding equilibrates in ~1e-4 h


@lru_cache(maxsize=None)
def tmdd(approximation: str) -> tuple[Model, dict]:
    model = Model(f"tmdd {approximation}", [target_mediated("mab", approximation)])
    if approximation == "full":
        params = {**TMDD, "mab_kon": KON, "mab_koff": KSS * KON - TMDD["mab_kint"]}
    else:
        params = {**TMDD, "mab_kss": KSS}
    return model, params


@pytest.mark.parametrize("dose", [3.0, 30.0, 300.0])  # nmol: below, near and above target
def test_tmdd_qss_matches_full_model_with_fast_binding(dose):
    """With fast binding (same Kss) the QSS free concentration is within 1 % of the full model."""
    t_h = np.array([0.05, 0.5, 1.0, 2.0, 5.0, 10.0, 24.0, 48.0, 100.0, 200.0])
    free = [simulate(*tmdd(a), [Dose.bolus(0.0, "mab", dose)], t_h * H).output("mab_cp")
            for a in ("full", "qss")]
    np.testing.assert_allclose(free[1], free[0], rtol=1e-2)


@pytest.mark.parametrize("approximation", ["full", "qss"])
def test_tmdd_total_target_starts_at_baseline(approximation):
    """The total target starts at ksyn/kdeg and stays there without drug."""
    model, params = tmdd(approximation)
    p = model.parameter_vector(params)
    baseline = TMDD["mab_ksyn"] / TMDD["mab_kdeg"]
    res = simulate(model, params, [], [0.0, 100 * H])
    if approximation == "full":
        total = (res.state("mab_target") + res.state("mab_complex")) / TMDD["mab_v"]
    else:
        total = res.state("mab_target_total") / TMDD["mab_v"]
    x0 = model.initial_state(p)
    assert x0[1] / TMDD["mab_v"] == pytest.approx(baseline, rel=1e-14)
    np.testing.assert_allclose(total, baseline, rtol=1e-12)
    np.testing.assert_array_equal(res.output("mab_cp"), 0.0)


@pytest.mark.parametrize("approximation", ["full", "qss"])
def test_tmdd_occupancy_is_a_fraction(approximation):
    """Target occupancy stays within [0, 1] over doses from far below to far above the target."""
    t_h = np.concatenate([[0.0], np.geomspace(1e-3, 1000.0, 60)])
    for dose in (0.01, 3.0, 300.0, 3e4):
        occ = simulate(*tmdd(approximation), [Dose.bolus(0.0, "mab", dose)],
                       t_h * H).output("mab_occupancy")
        assert np.all(np.isfinite(occ))
        # 1e-12: once the drug has gone (amounts below the integrator's atol, 1e-12 nmol)
        # the occupancy is rounding noise of order -1e-15 around 0
        assert occ.min() >= -1e-12 and occ.max() <= 1.0 + 1e-12, (dose, occ.min(), occ.max())
        assert occ.max() > 1e-4 and np.isclose(occ[-1], 0.0, atol=1e-9)


# ======================================================================= indirect response
IDR = {"r_kin": 10.0, "r_kout": 0.5, "cap": 0.8, "c50": 2.0}


@lru_cache(maxsize=None)
def idr_model(kind: int) -> Model:
    pk = pk_hours()
    return Model(f"idr {kind}", [pk, indirect_response("r", pk.output("d_cp"), kind)])


def idr_params(kind: int) -> dict:
    cap, c50 = ("imax", "ic50") if kind in (1, 2) else ("emax", "ec50")
    return {**LINEAR, "r_kin": IDR["r_kin"], "r_kout": IDR["r_kout"], f"r_{cap}": IDR["cap"],
            f"r_{c50}": IDR["c50"]}


@pytest.mark.parametrize("kind", [1, 2, 3, 4])
def test_indirect_response_steady_state(kind):
    """Under constant C the turnover response settles at Rss = kin/kout * S_in / S_out."""
    c = 3.0
    model, params = idr_model(kind), idr_params(kind)
    p = model.parameter_vector(params)
    assert model.initial_state(p)[model.state_index("r")] == pytest.approx(
        IDR["r_kin"] / IDR["r_kout"], rel=1e-15)
    x0 = _with_central(model, "d", c * LINEAR["d_v1"], p)
    res = simulate(model, params, [Dose.infusion(0.0, "d", c * LINEAR["d_cl1"] / H, 200 * H)],
                   [150 * H], x0=x0)
    drug = IDR["cap"] * c / (IDR["c50"] + c)
    s = 1 - drug if kind in (1, 2) else 1 + drug
    s_in, s_out = (s, 1.0) if kind in (1, 3) else (1.0, s)
    assert res.output("r")[0] == pytest.approx(IDR["r_kin"] / IDR["r_kout"] * s_in / s_out,
                                               rel=1e-8)


# ======================================================================= Friberg
FRIBERG = {"d_v1": 20.0, "d_cl1": 2.0, "anc_circ0": 5.0, "anc_mtt": 125.0, "anc_gamma": 0.17,
           "anc_slope": 0.15}
DAYS = np.arange(31) * 24 * H


@lru_cache(maxsize=None)
def friberg_model() -> Model:
    pk = pk_hours()
    return Model("friberg", [pk, friberg_myelosuppression("anc", pk.output("d_cp"))])


def test_friberg_without_drug_stays_at_baseline():
    """Without drug every Friberg compartment stays at Circ0 for 30 days."""
    res = simulate(friberg_model(), FRIBERG, [], DAYS)
    cells = res.states[:, 1:]
    # 1e-9: the feedback uses Circ smoothed by 1e-6 Circ0 (equilibrium off by ~1e-12)
    np.testing.assert_allclose(cells, FRIBERG["anc_circ0"], rtol=1e-9)


def test_friberg_nadir_and_recovery():
    """A dose drives circulating cells to a nadir below Circ0, then they return toward Circ0."""
    res = simulate(friberg_model(), FRIBERG, [Dose.infusion(0.0, "d", 300.0 / H, H)],
                   np.arange(0, 30 * 24 + 1, 6) * H)
    anc, circ0 = res.output("anc"), FRIBERG["anc_circ0"]
    nadir = int(np.argmin(anc))
    assert anc[nadir] < 0.7 * circ0
    assert 3 * 24 <= res.time_s[nadir] / H <= 20 * 24  # typical nadir: 1-2 weeks
    assert np.all(np.diff(anc[nadir:nadir + 20]) > 0)  # recovering after the nadir
    # back near Circ0 at day 30 (after the physiological rebound overshoot, < 10 %)
    assert abs(anc[-1] - circ0) < 0.1 * circ0
    assert abs(anc[-1] - circ0) < 0.25 * abs(anc[nadir] - circ0)
    assert anc.max() < 1.2 * circ0


def test_friberg_transit_rate_is_four_over_mtt():
    """The transit rate constant is ktr = 4/MTT (dT1/dt = ktr (Prol - T1))."""
    model = friberg_model()
    p = model.parameter_vector(FRIBERG)
    x = model.initial_state(p)
    delta = 0.3
    x[model.state_index("anc_prol")] += delta
    dxdt = np.asarray(model.f(0.0, x, [0.0], p), dtype=float).ravel()
    ktr_per_h = dxdt[model.state_index("anc_transit_1")] * H / delta
    assert ktr_per_h == pytest.approx(4 / FRIBERG["anc_mtt"], rel=1e-12)


# ======================================================================= transit chain
@pytest.mark.parametrize("n", [1, 3, 7])
def test_transit_chain_step_response_is_erlang_cdf(n):
    """A transit chain's unit-step response is the Erlang(n, ktr = n/MTT) CDF."""
    pk = pk_hours()
    model = Model("transit", [pk, transit_chain("delayed", pk.output("d_cp"), n)])
    mtt = 4.0
    params = {**LINEAR, "delayed_mtt": mtt}
    x0 = np.zeros(model.n_states)
    x0[model.state_index("d_a1")] = 1.0 * LINEAR["d_v1"]  # C = 1 mg/L, held by the infusion
    t_h = np.array([0.1, 0.5, 1.0, 2.0, 4.0, 6.0, 10.0, 16.0])
    res = simulate(model, params, [Dose.infusion(0.0, "d", LINEAR["d_cl1"] / H, 100 * H)],
                   t_h * H, x0=x0)
    erlang_cdf = gammainc(n, n / mtt * t_h)
    np.testing.assert_allclose(res.output("delayed"), erlang_cdf, rtol=1e-8)


# ======================================================================= derivatives
GAMMAS = [0.5, 1.43, 3.0]


def _pd_model(form: str, gamma: float | None) -> tuple[Model, dict]:
    """A 1-compartment drug (mg/L) with an effect site driving the PD *form*."""
    pk = mammillary("propofol", 1, concentration_unit="ug/mL")
    ce = effect_compartment("propofol_ce", pk.output("propofol_cp"), ke0_name="propofol_ke0")
    driver = ce.output("propofol_ce")
    blocks = [pk, ce]
    params = {"propofol_v1": 4.0, "propofol_cl1": 1.5, "propofol_ke0": 0.456}
    if form in ("emax", "emax_sigmoid"):
        blocks.append(emax_effect("e", driver, direction="inhibitory",
                                  sigmoid=form == "emax_sigmoid"))
        params |= {"e_e0": 97.4, "e_emax": 97.4, "e_c50": 4.47}
        if gamma is not None:
            params["e_gamma"] = gamma
    elif form == "bouillon":
        remi = mammillary("remifentanil", 1, amount_unit="ug", concentration_unit="ng/mL")
        remi_ce = effect_compartment("remifentanil_ce", remi.output("remifentanil_cp"),
                                     ke0_name="remifentanil_ke0")
        blocks += [remi, remi_ce, bouillon_bis(driver, remi_ce.output("remifentanil_ce"))]
        params |= {"remifentanil_v1": 5.0, "remifentanil_cl1": 2.5, "remifentanil_ke0": 0.6,
                   "bis_c50p": 4.47, "bis_c50r": 19.3, "bis_gamma": gamma, "bis_beta": 1.0,
                   "bis_e0": 97.4, "bis_emax": 97.4}
    elif form.startswith("idr"):
        kind = int(form[-1])
        blocks.append(indirect_response("r", driver, kind))
        cap, c50 = ("imax", "ic50") if kind in (1, 2) else ("emax", "ec50")
        params |= {"r_kin": 10.0, "r_kout": 0.5, f"r_{cap}": 0.8, f"r_{c50}": 2.0}
    elif form.startswith("friberg"):
        effect = form.split("_")[1]
        blocks.append(friberg_myelosuppression("anc", driver, drug_effect=effect))
        params |= {"anc_circ0": 5.0, "anc_mtt": 125.0, "anc_gamma": gamma}
        params |= ({"anc_slope": 0.1} if effect == "linear" else {"anc_emax": 0.9,
                                                                 "anc_ec50": 3.0})
    else:  # pragma: no cover
        raise AssertionError(form)
    return Model(form, blocks), params


def _jacobian(model: Model, params: dict, x_value: np.ndarray) -> np.ndarray:
    """d[f; h]/dx at *x_value*, no input, t = 0 (CasADi, symbolic x)."""
    x = ca.SX.sym("x", model.n_states)
    p = model.parameter_vector(params)
    u = np.zeros(model.n_inputs)
    both = ca.vertcat(model.f(0.0, x, u, p), model.h(0.0, x, u, p))
    jac = ca.Function("J", [x], [ca.jacobian(both, x)])
    return np.asarray(jac(x_value), dtype=float)


PD_CASES = ([("emax", None), ("idr1", None), ("idr2", None), ("idr3", None), ("idr4", None)]
            + [(form, g) for form in ("emax_sigmoid", "bouillon", "friberg_linear",
                                      "friberg_emax") for g in GAMMAS])


@pytest.mark.parametrize("form, gamma", PD_CASES)
def test_pd_derivatives_are_finite_at_zero_and_negative_concentrations(form, gamma):
    """Every PD form has finite d[f; h]/dx at x = 0 and at slightly negative states."""
    model, params = _pd_model(form, gamma)
    for level in (0.0, -1e-9, -1e-6, -1e-3):
        x = np.full(model.n_states, level)
        if form.startswith("friberg") and level == 0.0:
            x_cells = model.initial_state(model.parameter_vector(params))
            jac = _jacobian(model, params, x_cells)  # at baseline cells, no drug
            assert np.all(np.isfinite(jac)), (form, gamma, "baseline")
        jac = _jacobian(model, params, x)
        assert np.all(np.isfinite(jac)), (form, gamma, level)


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("which", ["propofol", "remifentanil"])
def test_bouillon_derivative_finite_where_total_potency_is_minus_hill_eps(gamma, which):
    """The Bouillon surface has finite, moderate derivatives at U = Up + Ur = -HILL_EPS."""
    # Regression: with phi = Up / (U + HILL_EPS) (pd.py up to commit a480d1a) this point gave
    # a NaN Jacobian (Ce_p = -1e-5 C50p) or one of -1e15 (Ce_r = -1e-5 C50r).
    from mpc_dose.model.pd import HILL_EPS

    model, params = _pd_model("bouillon", gamma)
    x = np.zeros(model.n_states)
    c50 = params["bis_c50p"] if which == "propofol" else params["bis_c50r"]
    x[model.state_index(f"{which}_ce")] = -HILL_EPS * c50
    jac = _jacobian(model, params, x)
    assert np.all(np.isfinite(jac))
    assert np.max(np.abs(jac[-1])) < 1e6  # BIS per ug/mL or ng/mL: no near-singularity


# ======================================================================= bad input
def test_mammillary_rejects_four_compartments():
    """mammillary refuses n_compartments = 4, naming the value."""
    with pytest.raises(ModelError, match=r"n_compartments must be 1, 2 or 3, got 4"):
        mammillary("d", 4)


def test_mammillary_rejects_unknown_parameterisation():
    """mammillary refuses an unknown parameterisation, naming it."""
    with pytest.raises(ModelError, match=r"parameterisation must be .*got 'macro'"):
        mammillary("d", 2, parameterisation="macro")


def test_indirect_response_rejects_kind_5():
    """indirect_response refuses kind 5, naming the value."""
    with pytest.raises(ModelError, match=r"kind must be 1, 2, 3 or 4, got 5"):
        indirect_response("r", mammillary("d").output("d_cp"), 5)


def test_model_rejects_duplicated_parameter_name():
    """A Model whose blocks declare the same parameter name twice is refused."""
    pk = mammillary("d")
    clash = effect_compartment("d_ce", pk.output("d_cp"), ke0_name="d_v1")
    with pytest.raises(ModelError, match=r"parameter 'd_v1' declared twice"):
        Model("clash", [pk, clash])


def test_parameter_vector_rejects_negative_volume():
    """A negative volume is refused, naming the parameter and the value."""
    model = Model("m", [mammillary("d")])
    with pytest.raises(ModelError, match=r"'d_v1' = -2\.5 L: expected > 0"):
        model.parameter_vector({"d_v1": -2.5, "d_cl1": 1.0})


def test_parameter_vector_rejects_unknown_name():
    """An unknown parameter name is refused with the nearest known one."""
    model = Model("m", [mammillary("d")])
    with pytest.raises(ModelError, match=r"no parameter 'd_cl'.*did you mean 'd_cl1'"):
        model.parameter_vector({"d_v1": 2.0, "d_cl": 1.0})


def test_parameter_vector_rejects_missing_value():
    """A parameter without a value is refused, naming it."""
    model = Model("m", [mammillary("d")])
    with pytest.raises(ModelError, match=r"parameter 'd_cl1' .* has no value"):
        model.parameter_vector({"d_v1": 2.0})
