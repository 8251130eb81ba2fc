"""Shared solver construction for the NMPC and the estimators: Gauss-Newton SQP and IPOPT.

Both solve sums of squares (plus linear terms). Gauss-Newton SQP uses the Hessian ``J'J`` of
the residuals, without their second derivatives or the constraints' curvature, formed
numerically as an MX product of the evaluated Jacobian (forming it symbolically blows up the
expression when states are condensed); a tiny diagonal keeps the QP strictly convex.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys

import casadi as ca

__all__ = ["gauss_newton_hessian", "sqp_solver", "ipopt_solver", "quiet_native_stdout"]

_QP_OPTIONS = {"qrqp": {"print_iter": False, "print_header": False, "print_info": False},
               "qpoases": {"printLevel": "none", "sparse": False}}


@contextlib.contextmanager
def quiet_native_stdout():
    """Silence what native code writes to the process's standard output (qpOASES prints a
    copyright banner when its solver memory is created; library code must not print)."""
    # CasADi routes native output through Python's sys.stdout where it is redirected (test
    # runners, notebooks) and to file descriptor 1 otherwise: silence both.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            sys.stdout.flush()
            saved = os.dup(1)
        except (OSError, ValueError):  # no real file descriptor
            yield
            return
        try:
            os.dup2(_devnull(), 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


@functools.cache
def _devnull() -> int:
    """One descriptor of the null device, opened once (the solvers run every cycle)."""
    return os.open(os.devnull, os.O_WRONLY)


def gauss_newton_hessian(residuals: ca.SX, w: ca.SX, p: ca.SX, n_g: int, *,
                         regularisation: float = 1e-9) -> ca.Function:
    """The ``hess_lag`` function of sqpmethod for ``f = 0.5 |residuals|^2 + linear``."""
    jac = ca.Function("gn_jac_r", [w, p], [ca.jacobian(residuals, w)])
    wm, pm = ca.MX.sym("w", w.numel()), ca.MX.sym("p", p.numel())
    lam_f, lam_g = ca.MX.sym("lam_f"), ca.MX.sym("lam_g", n_g)
    J = jac(wm, pm)
    H = lam_f * (ca.mtimes(J.T, J) + regularisation * ca.MX.eye(w.numel()))
    return ca.Function("nlp_hess_l", [wm, pm, lam_f, lam_g], [H],
                       ["x", "p", "lam_f", "lam_g"], ["hess_gamma_x_x"])


def sqp_solver(name: str, nlp: dict, hessian: ca.Function | None, qp: str, max_iter: int, *,
               dual_tolerance: float = 1e-6, show_eval_warnings: bool = True,
               **options) -> ca.Function:
    """``sqpmethod`` with QP solver *qp*; silent, failures as results.

    *hessian*: a Gauss-Newton ``hess_lag`` (:func:`gauss_newton_hessian`), or None for the
    exact Hessian of the Lagrangian made convex by reflecting its negative eigenvalues
    (where the residuals' own curvature matters, Gauss-Newton converges only linearly).
    *show_eval_warnings* False: no warning when a trial point of the line search evaluates
    to NaN (the step is shortened; harmless where the problem is undefined far out).
    *options*: further sqpmethod options (e.g. ``max_iter_ls=0``: full steps).
    """
    # calc_lam_p off: the sensitivities to the parameters are never used, cost a gradient
    # evaluation per solve, and are undefined where a weight enters as sqrt(w) with w = 0
    hessian_opts = ({"hess_lag": hessian} if hessian is not None else
                    {"convexify_strategy": "eigen-reflect", "convexify_margin": 1e-6})
    opts = {"qpsol": qp, **hessian_opts, "max_iter": max_iter, "print_header": False,
            "print_iteration": False, "print_time": False, "print_status": False,
            "error_on_fail": False, "calc_lam_p": False, "tol_du": dual_tolerance,
            "show_eval_warnings": show_eval_warnings,
            "qpsol_options": {**_QP_OPTIONS.get(qp, {}), "error_on_fail": False}, **options}
    with quiet_native_stdout():
        return ca.nlpsol(name, "sqpmethod", nlp, opts)


def ipopt_solver(name: str, nlp: dict, max_iter: int = 300, *,
                 show_eval_warnings: bool = True, **extra) -> ca.Function:
    """IPOPT, silent, failures as results; *extra*: IPOPT's own options."""
    opts = {"ipopt.print_level": 0, "print_time": False, "ipopt.sb": "yes",
            "ipopt.max_iter": max_iter, "error_on_fail": False, "calc_lam_p": False,
            "show_eval_warnings": show_eval_warnings}
    opts.update({f"ipopt.{k}": v for k, v in extra.items()})
    return ca.nlpsol(name, "ipopt", nlp, opts)
