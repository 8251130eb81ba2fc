"""Model-informed precision dosing of one patient: the MAP estimate of the individual
parameters from the history, their uncertainty, the predicted levels with a credible band,
and the dose of a regimen that meets an exposure target.

* **Estimate**: :class:`~mpc_dose.control.estimation.BayesianEstimator` over the whole
  record (covariates LOCF, occasions, levels below the LLOQ by Beal's M3, a prior weight).
* **Uncertainty**: the Laplace approximation, ``w ~ N(w_hat, C)`` with ``C`` the inverse of
  half the objective's Hessian at the optimum; a log-normal parameter ``theta * exp(eta)``
  then has the equal-tailed interval ``theta_hat * exp(+-z sd(eta))`` and the CV
  ``sqrt(exp(sd^2) - 1)``.
* **Credible band**: by sampling, not the delta method: ``w`` is drawn from ``N(w_hat, C)``
  (a ``numpy.random.Generator`` passed in), each draw simulated through the record and the
  regimen, and the band is the pointwise quantiles of the levels (parameter uncertainty
  only; a new reading scatters further by the residual error).
* **Dose**: :func:`~mpc_dose.control.dose_targets.dose_for_target` with the planning
  parameters (the covariates at the end of the record, ``exp(eta)`` without the occasions'
  kappas: a future dose is planned without the past occasions' share, as the estimator does).

It knows model/ and control/; it reads and writes no files and does not print.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..control.dose_targets import DoseForTarget, ExposureTarget, Regimen, dose_for_target
from ..control.estimation import BayesianEstimator, EstimationConfig, EstimationResult
from ..errors import ConfigError
from ..model.dosing import Dose, schedule
from ..model.library import LibraryModel
from ..model.propagate import Propagator
from ..model.simulation import evaluate_outputs
from ..model.spec import Model
from .dataset import PatientHistory

__all__ = ["MipdSettings", "MipdResult", "ParameterEstimate", "run_mipd"]

#: Points of the predicted curve (plus the readings' times).
_CURVE_POINTS = 1201


@dataclass(frozen=True)
class MipdSettings:
    """How to estimate and what to recommend.

    Attributes
    ----------
    target : ExposureTarget, optional
        No recommendation without one.
    interval_s, infusion_s : float, optional
        The regimen: a dose every *interval_s* [s], each over *infusion_s* [s] (0: a bolus);
        both needed with a target.
    round_step : float, optional
        Dose step (the input's amount unit).
    basis : str
        Where the target is judged (:data:`~mpc_dose.control.dose_targets.BASES`).
    start_s : float, optional
        The regimen's first dose [s]: one interval after the last dose of the record, or
        the end of the record if later, when not given.
    input : str, optional
        The model input dosed (the model's only one, or the history's, when not given).
    prior_weight : float
        Weight of the population prior (1 MAP, 0 maximum likelihood).
    lloq : float, optional
        Limit of quantification (output unit): levels below it are BLQ (M3).
    occasions_s : tuple of float
        Starts [s] of occasions (inter-occasion variability), besides the dataset's.
    estimate_occasions : bool
        Estimate the occasions' kappas when the model declares inter-occasion variability.
    credible_level : float
        Probability of the parameter intervals and the credible band.
    band_samples : int
        Draws of the random effects for the band.
    """

    target: ExposureTarget | None = None
    interval_s: float | None = None
    infusion_s: float | None = None
    round_step: float | None = None
    basis: str = "steady-state"
    start_s: float | None = None
    input: str | None = None
    prior_weight: float = 1.0
    lloq: float | None = None
    occasions_s: tuple[float, ...] = ()
    estimate_occasions: bool = True
    credible_level: float = 0.95
    band_samples: int = 400

    def __post_init__(self) -> None:
        if not 0 < self.credible_level < 1:
            raise ConfigError(f"--level: expected a probability in (0, 1), got "
                              f"{self.credible_level!r}")
        if isinstance(self.band_samples, bool) or not isinstance(self.band_samples, int) or \
                self.band_samples < 2:
            raise ConfigError(f"--samples: expected a whole number >= 2, got "
                              f"{self.band_samples!r}")
        if self.target is not None and (self.interval_s is None or self.infusion_s is None):
            missing = [flag for flag, v in (("--interval", self.interval_s),
                                            ("--infusion", self.infusion_s)) if v is None]
            raise ConfigError(f"--target {self.target.kind}: give the regimen's "
                              f"{' and '.join(missing)} (e.g. --interval 12h --infusion 1h)")


@dataclass(frozen=True)
class ParameterEstimate:
    """One individual parameter (declared unit): the planning value, the typical value for
    the patient's covariates, and, with a random effect, its posterior SD on the log scale
    and credible interval."""

    name: str
    unit: str
    value: float
    typical: float
    eta: float | None
    sd_log: float | None
    low: float | None
    high: float | None

    @property
    def cv(self) -> float | None:
        """The posterior CV of a log-normal parameter (relative standard error)."""
        if self.sd_log is None or not math.isfinite(self.sd_log):
            return None
        return math.sqrt(math.expm1(self.sd_log**2))


@dataclass(frozen=True)
class MipdResult:
    """Everything `mpc-dose mipd` reports.

    *curve_time_s*, *curve* (MAP) and *band_low*/*band_high* (None when the covariance is
    not positive definite) are the levels (output unit) through the record and, with a
    successful recommendation, the regimen at the rounded dose from *regimen.start_s*.
    """

    model: str
    history: PatientHistory
    settings: MipdSettings
    estimate: EstimationResult
    parameters: tuple[ParameterEstimate, ...]
    curve_time_s: np.ndarray
    curve: np.ndarray
    band_low: np.ndarray | None
    band_high: np.ndarray | None
    band_note: str
    regimen: Regimen | None = None
    recommendation: DoseForTarget | None = None
    future_doses: tuple[Dose, ...] = ()
    notes: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------- simulation
#: The eigenvector basis of a segment's augmented matrix is used (fast path) while its
#: condition number stays below this (the states are then accurate to ~1e-8 relative, ample
#: for a band drawn from a posterior whose SDs are tens of per cent).
_EIGEN_CONDITION_LIMIT = 1e8


def _eigen_segment(terms, u: np.ndarray, x: np.ndarray, taus: np.ndarray
                   ) -> np.ndarray | None:
    """States at *taus* [s] after the segment start from *x* under constant *u* for affine,
    time-invariant dynamics ``(A, B, c)``: ``exp(M tau)`` of the augmented matrix by its
    eigendecomposition, all times at once; None when the basis is ill-conditioned."""
    a, b, c = terms
    n = x.size
    aug = np.zeros((n + 1, n + 1))
    aug[:n, :n], aug[:n, n] = a, b @ u + c
    lam, vec = np.linalg.eig(aug)
    if not np.linalg.cond(vec) < _EIGEN_CONDITION_LIMIT:
        return None
    coef = np.linalg.solve(vec, np.append(x, 1.0))
    z = (np.exp(np.outer(taus, lam)) * coef) @ vec.T
    return z[:, :n].real


def _simulate_pieces(model: Model, pieces: Sequence[tuple[float, np.ndarray]],
                     doses: Sequence[Dose], times_s: np.ndarray, *, fast: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
    """States and outputs at *times_s* (sorted, >= 0) from the drug-naive state at 0 under
    *doses*, the parameters piecewise constant (``pieces``: (start [s], vector), the first
    at 0): :func:`~mpc_dose.model.simulation.simulate` with parameters that change (a
    covariate, an occasion). Lag times are those of the first piece.

    With *fast*, affine time-invariant dynamics are propagated by an eigendecomposition per
    segment instead of a matrix exponential per step length (40 times faster: the credible
    band simulates hundreds of draws); otherwise, or when that basis is ill-conditioned, by
    :class:`~mpc_dose.model.propagate.Propagator` (exact zero-order hold or CVODES)."""
    eigen = fast and model.is_affine and not model.is_time_varying
    terms: dict[int, tuple] = {}
    plan = schedule(model, pieces[0][1], doses)
    starts = [t for t, _ in pieces]
    breaks = sorted(set(plan.breaks.tolist()) | set(starts))
    states = np.empty((times_s.size, model.n_states))
    inputs = np.empty((times_s.size, model.n_inputs))
    piece_of_row = np.empty(times_s.size, dtype=int)
    propagators: dict[int, Propagator] = {}
    x = model.initial_state(pieces[0][1])
    for i, start in enumerate(breaks):
        end = breaks[i + 1] if i + 1 < len(breaks) else math.inf
        if start > times_s[-1]:
            break
        k = bisect.bisect_right(starts, start) - 1
        prop = propagators.get(k)
        if prop is None and not eigen:
            prop = propagators[k] = Propagator(model, pieces[k][1])
        elif prop is None:   # made when the eigenvector basis fails
            prop = _LazyPropagator(model, pieces[k][1])
        j = int(np.searchsorted(plan.breaks, start, side="right")) - 1
        if plan.breaks[j] == start:
            x = x + plan.jumps[j]
        u = plan.rates[j] if j >= 0 else np.zeros(model.n_inputs)
        lo, hi = np.searchsorted(times_s, [start, end], side="left")
        if eigen and k not in terms:
            n, m = model.n_states, model.n_inputs
            a, b, c = (np.asarray(v, dtype=float) for v in model.affine_terms(0.0,
                                                                              pieces[k][1]))
            terms[k] = (a.reshape(n, n), b.reshape(n, m), c.ravel())
        advance_to = [end] if math.isfinite(end) and end <= times_s[-1] else []
        fast_states = None
        if eigen and (hi > lo or advance_to):
            fast_states = _eigen_segment(terms[k], u, x, np.concatenate(
                [times_s[lo:hi], advance_to]) - start)
        if hi > lo:
            if fast_states is not None:
                states[lo:hi] = fast_states[:hi - lo]
            else:
                at_start = times_s[lo:hi] == start
                states[lo:hi][at_start] = x
                inside = slice(lo + int(at_start.sum()), hi)
                states[inside] = prop.trajectory(x, start, times_s[inside], u)
            inputs[lo:hi] = u
            piece_of_row[lo:hi] = k
        if advance_to:
            x = fast_states[-1] if fast_states is not None else prop.advance(x, start, end, u)
    outputs = np.empty((times_s.size, model.n_outputs))
    for k in np.unique(piece_of_row):
        rows = piece_of_row == k
        outputs[rows] = evaluate_outputs(model, times_s[rows], states[rows], inputs[rows],
                                         pieces[k][1])
    return states, outputs


class _LazyPropagator:
    """A Propagator built on first use (the fast path rarely needs one)."""

    def __init__(self, model: Model, p: np.ndarray) -> None:
        self._args, self._prop = (model, p), None

    def __getattr__(self, name):
        if self._prop is None:
            self._prop = Propagator(*self._args)
        return getattr(self._prop, name)


class _Pieces:
    """Parameter vectors over time for a value of the estimated quantities ``w``: the
    typical values of each covariate piece times ``exp(eta + kappa of the occasion)`` up to
    the regimen's start, the planning values (``exp(eta)``, last covariates) after it."""

    def __init__(self, lm: LibraryModel, history: PatientHistory, est: BayesianEstimator,
                 occasions: Sequence[float], plan_from_s: float) -> None:
        model, pop = lm.model, lm.population
        self.model = model
        covariates = dict(history.covariates)
        self.typical = [(0.0, model.parameter_vector(pop.typical_parameters(covariates)))]
        for t, change in history.covariate_changes:
            covariates.update(change)
            self.typical.append((t, model.parameter_vector(pop.typical_parameters(covariates))))
        self.occasions = sorted({0.0, *occasions})
        self.eta_idx = [model.param_index(n) for n in est.eta_names]
        self.eta_names = est.eta_names
        self.kappa_names = est.kappa_names
        self.plan_from_s = plan_from_s
        self.starts = sorted({t for t, _ in self.typical} | set(self.occasions)
                             | {plan_from_s})

    def build(self, values: dict[str, float]) -> list[tuple[float, np.ndarray]]:
        """*values*: estimated quantities by name (``eta_<p>``, ``kappa<o>_<p>``; absent: 0)."""
        out = []
        eta = np.array([values.get(f"eta_{n}", 0.0) for n in self.eta_names])
        for t in self.starts:
            k = bisect.bisect_right([s for s, _ in self.typical], t) - 1
            theta = self.typical[k][1].copy()
            shift = eta.copy()
            if t < self.plan_from_s:
                o = bisect.bisect_right(self.occasions, t) - 1
                for j, name in enumerate(self.eta_names):
                    shift[j] += values.get(f"kappa{o}_{name}", 0.0)
            theta[self.eta_idx] *= np.exp(shift)
            out.append((t, theta))
        return out


# ---------------------------------------------------------------------------- the run
def run_mipd(library_model: LibraryModel, history: PatientHistory, settings: MipdSettings,
             rng: np.random.Generator) -> MipdResult:
    """Estimate, predict and (with a target) recommend; see the module docstring.

    Raises
    ------
    ConfigError
        For settings that do not fit the model or the history (an unknown input, a regimen
        start before the end of the record's last infusion, ...). A failed fit or an
        unreachable target is a result (``success`` False), not an error.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    lm, model = library_model, library_model.model
    notes: list[str] = []
    config = EstimationConfig(history.output, occasions=settings.estimate_occasions,
                              lloq=settings.lloq, prior_weight=settings.prior_weight)
    est = BayesianEstimator(lm, history.covariates, config)
    for dose in history.doses:
        est.add_dose(dose)
    for t, change in history.covariate_changes:
        est.covariates_from(t, change)
    occasions = sorted({*history.occasions_s, *settings.occasions_s})
    if occasions and not est.kappa_names:
        notes.append("occasions given, but model declares no inter-occasion variability "
                     "on the estimated parameters (or it is switched off): one occasion")
    for t in occasions:
        est.new_occasion(t)
    for t, value, blq in history.observations:
        est.add_reading(t, value, blq=blq)
    estimate = est.update(history.end_s)

    # parameters and their uncertainty (Laplace)
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + settings.credible_level / 2))
    typical_now = lm.population.typical_parameters(history.covariates_at(estimate.t_s))
    parameters = []
    for q in model.params:
        if q.name not in typical_now:
            continue
        if q.name in estimate.eta:
            sd = estimate.sd(f"eta_{q.name}")
            value = estimate.params[q.name]
            low, high = (value * math.exp(-z * sd), value * math.exp(z * sd)) \
                if math.isfinite(sd) else (None, None)
            parameters.append(ParameterEstimate(q.name, q.unit, value, typical_now[q.name],
                                                estimate.eta[q.name], sd, low, high))
        else:
            parameters.append(ParameterEstimate(q.name, q.unit, estimate.params[q.name],
                                                typical_now[q.name], None, None, None, None))

    # the regimen and the dose
    regimen = recommendation = None
    future: list[Dose] = []
    last_dose_s = max((d.time_s for d in history.doses), default=None)
    if settings.target is not None:
        input_name = _dosed_input(model, history, settings.input)
        interval = float(settings.interval_s)
        start = settings.start_s
        if start is None:
            start = max(history.end_s, (last_dose_s + interval) if last_dose_s is not None
                        else 0.0)
        infusion_end = max((d.time_s + d.duration_s for d in history.doses), default=0.0)
        if start < infusion_end:
            raise ConfigError(f"--start {start / 3600:g} h: the record's last infusion runs "
                              f"until {infusion_end / 3600:g} h; start the regimen then or "
                              f"later")
        regimen = Regimen(input_name, interval, float(settings.infusion_s),
                          basis=settings.basis, start_s=start)
    pieces = _Pieces(lm, history, est, occasions,
                     regimen.start_s if regimen is not None else math.inf)
    w_hat = dict(zip(estimate.names, estimate.estimate))
    if regimen is not None:
        planning = model.parameter_vector(estimate.params)
        x_history = None
        if regimen.basis == "next":
            x_history = _simulate_pieces(model, pieces.build(w_hat), history.doses,
                                         np.array([regimen.start_s]))[0][-1]
        guess = max((d.amount for d in history.doses if d.input == regimen.input),
                    default=1.0)
        if estimate.success:
            recommendation = dose_for_target(model, planning, regimen, settings.target,
                                             output=history.output, x_history=x_history,
                                             round_step=settings.round_step,
                                             first_guess=guess)
        else:
            unit = model.inputs[model.input_index(regimen.input)].amount_unit
            recommendation = DoseForTarget(
                False, "estimate_failed", f"no dose from a failed fit ({estimate.status})",
                math.nan, math.nan, unit, math.nan, math.nan, settings.round_step, 0)
        if recommendation.success:
            n = 4 if regimen.interval_s < 86400.0 else 2
            future = [regimen.dose(recommendation.dose, regimen.start_s + k * regimen.interval_s)
                      for k in range(n)]

    # the curve and its band
    end = max(history.end_s, 1.0)
    if future:
        end = max(end, future[-1].time_s + regimen.interval_s)
    elif regimen is not None:
        end = max(end, regimen.start_s)
    end *= 1.02 if not future else 1.0
    times = np.unique(np.concatenate([np.linspace(0.0, end, _CURVE_POINTS),
                                      [t for t, _, _ in history.observations]]))
    output_k = model.output_index(history.output)
    doses = list(history.doses) + future
    curve = _simulate_pieces(model, pieces.build(w_hat), doses, times)[1][:, output_k]
    band_low = band_high = None
    cov = estimate.covariance
    if cov.size and np.all(np.isfinite(cov)):
        draws = rng.multivariate_normal(estimate.estimate, cov, size=settings.band_samples,
                                        method="cholesky")
        sims = np.array([_simulate_pieces(model, pieces.build(dict(zip(estimate.names, w))),
                                          doses, times, fast=True)[1][:, output_k]
                         for w in draws])
        tail = (1 - settings.credible_level) / 2
        band_low, band_high = np.quantile(sims, [tail, 1 - tail], axis=0)
        band_note = (f"{settings.credible_level:.0%} credible band: pointwise quantiles of "
                     f"{settings.band_samples} draws of the random effects from N(estimate, "
                     f"posterior covariance) (Laplace), parameter uncertainty only")
    else:
        band_note = "no credible band: the posterior covariance is not positive definite"
    return MipdResult(model.name, history, settings, estimate, tuple(parameters), times,
                      curve, band_low, band_high, band_note, regimen, recommendation,
                      tuple(future), tuple(notes))


def _dosed_input(model: Model, history: PatientHistory, given: str | None) -> str:
    if given is not None:
        if given not in model.input_names:
            raise ConfigError(f"--input: model {model.name!r} has no input {given!r}; "
                              f"inputs: {', '.join(model.input_names)}")
        return given
    if model.n_inputs == 1:
        return model.input_names[0]
    used = sorted({d.input for d in history.doses})
    if len(used) == 1:
        return used[0]
    raise ConfigError(f"--input: model {model.name!r} has inputs "
                      f"{', '.join(model.input_names)}; name the one to dose")
