"""NMPC speed on the DESIGN reference problem, side by side with do-mpc.

Schnider propofol PK + effect site for a 35-year-old, 170 cm, 70 kg man (4 states), BIS by
the propofol Hill curve (E0 = Emax = 97.4, C50 4.47 ug/mL, gamma 1.43); propofol in
[0, 0.5] mg/s; control period 10 s; horizon 30; cost: squared BIS error to 50 plus a small
penalty on input changes; soft BIS >= 40 with an exact-penalty slack; a 200-step closed loop
(induction, then a +10 BIS output disturbance from step 100 to 149, known to both
controllers). The plant is the exact model (state feedback), so both controllers solve the
same problems and their closed loops can be compared sample by sample.

The mpc_dose figure includes the package's own Python work per step (building the
parameter vector and bounds, warm start, checks). do-mpc (installed with the `bench` extra)
is set up for the same discrete-time problem with IPOPT, its default.

    python benchmarks/nmpc_speed.py

Last line: ``median_ms=... p95_ms=... cold_ms=... dompc_median_ms=... speedup=...``.
"""

from __future__ import annotations

import os
import time
import warnings

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from mpc_dose.control.nmpc import NMPCConfig, NonlinearMPC  # noqa: E402
from mpc_dose.model.library import load  # noqa: E402
from mpc_dose.model.propagate import Propagator  # noqa: E402

STEPS, T, N = 200, 10.0, 30
W_DU, RHO = 1.0, 100.0   # input-change weight, linear slack penalty


def disturbance(k: int) -> float:
    return 10.0 if 100 <= k < 150 else 0.0


def setup():
    lm = load("propofol-schnider+bis-propofol")
    model = lm.model
    p = model.parameter_vector(lm.population.typical_parameters(
        {"age": 35, "height": 170, "weight": 70, "sex": "male"}))
    return model, p


def run_mpc_dose(model, p):
    cfg = NMPCConfig(output="bis", inputs=("propofol",), period_s=T, horizon=N, reference=50.0,
                     change_weights={"propofol": W_DU}, rate_bounds={"propofol": (0.0, 0.5)},
                     soft_window=(40.0, np.inf), soft_weights=(RHO, 0.0))
    mpc = NonlinearMPC(model, cfg)
    plant = Propagator(model, p)
    x, u = model.initial_state(p), 0.0
    times, bis, rates = [], [], []
    for k in range(STEPS):
        plan = mpc.plan(k * T, x, p, {"propofol": u}, disturbance=disturbance(k))
        times.append(plan.solve_time_s)
        u = plan.rates["propofol"]
        rates.append(u)
        x = plant.advance(x, k * T, (k + 1) * T, [u])
        bis.append(float(model.h(0, x, [u], p)[model.output_index("bis")]) + disturbance(k))
    return np.array(times), np.array(bis), np.array(rates)


def run_dompc(model, p):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import do_mpc
    import casadi as ca

    phi, gam, gc = Propagator(model, p).discrete(T)
    m = do_mpc.model.Model("discrete")
    x = m.set_variable("_x", "x", shape=(model.n_states, 1))
    u = m.set_variable("_u", "u", shape=(1, 1))
    d = m.set_variable("_tvp", "d")
    m.set_rhs("x", ca.mtimes(ca.DM(phi), x) + ca.mtimes(ca.DM(gam), u) + ca.DM(gc))
    y = model.h(0, x, u, ca.DM(p))[model.output_index("bis")] + d
    m.set_expression("bis", y)
    m.setup()
    mpc = do_mpc.controller.MPC(m)
    mpc.settings.n_horizon = N
    mpc.settings.t_step = T
    mpc.settings.store_full_solution = False
    mpc.settings.supress_ipopt_output()
    y = m.aux["bis"]  # do-mpc re-creates its symbols in setup(): use them from now on
    mpc.set_objective(lterm=0.5 * (y - 50) ** 2, mterm=0.5 * (y - 50) ** 2)
    mpc.set_rterm(u=0.5 * W_DU)
    mpc.bounds["lower", "_u", "u"] = 0.0
    mpc.bounds["upper", "_u", "u"] = 0.5
    mpc.set_nl_cons("bis_floor", -y, ub=-40.0, soft_constraint=True, penalty_term_cons=RHO)
    state = {"k": 0}
    template = mpc.get_tvp_template()

    def tvp(t_now):
        k0 = int(round(float(np.ravel(t_now)[0]) / T))
        for j in range(N + 1):
            template["_tvp", j, "d"] = disturbance(k0)  # no preview: today's value held
        return template

    mpc.set_tvp_fun(tvp)
    mpc.setup()
    plant = Propagator(model, p)
    xk, uk = model.initial_state(p), 0.0
    mpc.x0 = xk
    mpc.u0 = np.array([[0.0]])
    mpc.set_initial_guess()
    times, bis, rates = [], [], []
    for k in range(STEPS):
        state["k"] = k
        start = time.perf_counter()
        uk = float(np.ravel(mpc.make_step(xk.reshape(-1, 1)))[0])
        times.append(time.perf_counter() - start)
        rates.append(uk)
        xk = plant.advance(xk, k * T, (k + 1) * T, [uk])
        bis.append(float(model.h(0, xk, [uk], p)[model.output_index("bis")]) + disturbance(k))
    return np.array(times), np.array(bis), np.array(rates)


def main() -> None:
    model, p = setup()
    ours_t, ours_bis, _ = run_mpc_dose(model, p)
    try:
        theirs_t, theirs_bis, _ = run_dompc(model, p)
    except ImportError:
        theirs_t = theirs_bis = None
    median, p95, cold = (np.median(ours_t[1:]) * 1e3, np.percentile(ours_t[1:], 95) * 1e3,
                         ours_t[0] * 1e3)
    print(f"mpc_dose sqpmethod (Gauss-Newton, qpOASES): median {median:.3f} ms, p95 {p95:.3f} ms,"
          f" cold first step {cold:.1f} ms; BIS at step 99 {ours_bis[99]:.3f}")
    if theirs_t is None:
        print("do-mpc is not installed (pip install '.[bench]'): no comparison")
        print(f"median_ms={median:.3f} p95_ms={p95:.3f} cold_ms={cold:.1f} dompc_median_ms=nan "
              f"speedup=nan")
        return
    dm = np.median(theirs_t[1:]) * 1e3
    diff = np.max(np.abs(ours_bis - theirs_bis))
    print(f"do-mpc (IPOPT): median {dm:.3f} ms, p95 {np.percentile(theirs_t[1:], 95) * 1e3:.3f} "
          f"ms, cold {theirs_t[0] * 1e3:.1f} ms")
    print(f"closed loops differ by at most {diff:.2e} BIS over {STEPS} steps")
    print(f"median_ms={median:.3f} p95_ms={p95:.3f} cold_ms={cold:.1f} dompc_median_ms={dm:.3f} "
          f"speedup={dm / median:.1f}")


if __name__ == "__main__":
    main()
