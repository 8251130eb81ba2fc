"""One-off MAP estimation from sparse drug levels, and the model-informed precision dosing
(MIPD) baseline: both are uses of :class:`~mpc_dose.control.estimation.BayesianEstimator`
(the one implementation of the Bayesian update; see that module for the objective, the
integration and the conventions).

This module knows model/, not plant/ nor transports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from ..model.dosing import Dose
from ..model.library import LibraryModel
from .base import Reading
from .dose_targets import ExposureTarget, Regimen, dose_for_target
from .estimation import BayesianEstimator, EstimationConfig, EstimationResult, map_fit
from .scheduled import ScheduledInfusions

__all__ = ["MapResult", "MapEstimator", "dose_for_auc", "MIPDController"]

#: The result of a MAP fit (success, status, eta, params, objective, predictions, the
#: posterior covariance, ...).
MapResult = EstimationResult


class MapEstimator:
    """MAP estimates of one patient's random effects for a library model, from a whole
    record at once.

    Parameters
    ----------
    library_model : LibraryModel
    covariates : mapping
        The patient's covariates (the typical values follow from them).
    output : str
        The measured output.
    config : EstimationConfig, optional
        What to estimate and how (every random effect, full information, by default); its
        output must be *output*.
    """

    def __init__(self, library_model: LibraryModel, covariates: Mapping[str, object],
                 output: str, config: EstimationConfig | None = None) -> None:
        self.lm = library_model
        self.config = config if config is not None else EstimationConfig(output)
        if self.config.output != output:
            raise ConfigError(f"MapEstimator: config.output {self.config.output!r} is not "
                              f"the output {output!r}")
        self.covariates = dict(covariates)
        # checks the model, output, residual error and covariates now, not at the first fit
        probe = BayesianEstimator(library_model, covariates, self.config)
        self.eta_names = probe.eta_names
        self._idx = probe._eta_idx
        self.typical = probe.theta_at(0.0)

    def params_for(self, eta: Mapping[str, float] | np.ndarray) -> np.ndarray:
        """The parameter vector with random effects *eta* (by name, or in eta order)."""
        values = np.array([eta[n] for n in self.eta_names]) if isinstance(eta, Mapping) \
            else np.asarray(eta, float)
        p = self.typical.copy()
        p[list(self._idx)] = self.typical[list(self._idx)] * np.exp(values)
        return p

    def estimate(self, doses: Sequence[Dose],
                 observations: Sequence[tuple[float, float] | tuple[float, float, bool]],
                 **record) -> MapResult:
        """MAP of the random effects given *doses* and *observations* ``(t_s, value)`` or
        ``(t_s, value, below_lloq)``; *record*: the other keywords of
        :func:`~mpc_dose.control.estimation.map_fit` (covariate changes, occasions, now)."""
        return map_fit(self.lm, self.covariates, self.config, doses, observations, **record)


def dose_for_auc(library_model: LibraryModel, params: Mapping[str, float], *, input: str,
                 output: str, target_auc: float, infusion_s: float, window_s: float) -> float:
    """The dose of a single infusion over *infusion_s* from t = 0 (drug-naive) whose output
    AUC over [0, *window_s*] equals *target_auc* (output unit x h): the search of
    :func:`~mpc_dose.control.dose_targets.dose_for_target` on the first interval."""
    model = library_model.model
    unit = model.outputs[model.output_index(output)].unit
    regimen = Regimen(input, window_s, infusion_s, basis="first-dose")
    target = ExposureTarget("auc24", target_auc * 86400.0 / window_s, f"{unit}*h")
    found = dose_for_target(model, params, regimen, target, output=output)
    if not found.success:
        raise ConfigError(f"dose_for_auc: {found.message}")
    return found.dose_exact


class MIPDController(ScheduledInfusions):
    """Model-informed precision dosing without MPC: at each scheduled dose, the MAP estimate
    from the levels back so far (the estimator is told what the pumps delivered, each level
    at its sample time and each covariate change), then the dose whose AUC over the dosing
    interval (as one infusion) meets the target AUC scaled to the interval, planned with the
    estimated etas and the covariates in force. The first dose, from the prior alone, fills
    an empty patient: a loading dose (capped by *loading_dose_max*).

    Amounts in the input's amount unit, *target_auc_24h* in the output's unit x h; the
    schedule, caps and rounding are :class:`~mpc_dose.control.scheduled.ScheduledInfusions`'.
    The AUC is linear in the dose for a model whose dynamics are affine in the inputs
    (required: the planned dose is one superposition).
    """

    def __init__(self, library_model: LibraryModel, covariates: Mapping[str, object], *,
                 input: str, output: str, measured: str, interval_s: float, infusion_s: float,
                 target_auc_24h: float, period_s: float = 600.0, name: str = "mipd",
                 config: EstimationConfig | None = None, first_dose_s: float = 0.0,
                 rounding: Sequence[tuple[float, float]] = (), max_dose: float = math.inf,
                 loading_dose_max: float | None = None,
                 estimator: BayesianEstimator | None = None) -> None:
        super().__init__(input=input, interval_s=interval_s, infusion_s=infusion_s,
                         first_dose_s=first_dose_s, period_s=period_s, rounding=rounding,
                         max_dose=max_dose, loading_dose_max=loading_dose_max, name=name)
        if not library_model.model.is_affine:
            raise ConfigError(f"{name}: model {library_model.model.name!r} is not affine in "
                              f"its inputs; the dose for an AUC is found by superposition")
        if not (math.isfinite(target_auc_24h) and target_auc_24h > 0):
            raise ConfigError(f"{name}: target_auc_24h = {target_auc_24h!r}; expected > 0")
        self.lm = library_model
        self.output, self.measured = output, measured
        self.target_auc_24h = float(target_auc_24h)
        self.estimator = estimator if estimator is not None else BayesianEstimator(
            library_model, covariates, config if config is not None else
            EstimationConfig(output))
        self._levels = 0
        self.last_estimate: MapResult | None = None

    # ------------------------------------------------------------------ telling it
    def observe(self, reading: Reading) -> None:
        if reading.var == self.measured and reading.quality in ("valid", "underflow") and \
                math.isfinite(reading.value):
            # underflow: the value is the limit of quantification (M3)
            self.estimator.add_reading(reading.t_meas_s, reading.value,
                                       blq=reading.quality == "underflow")
            self._levels += 1

    def applied(self, t_s: float, rates: Mapping[str, float]) -> None:
        """What the pumps delivered from *t_s* on (after the supervisor, rounding, refusals,
        occlusions): the estimator's record, which both the estimate and the state the next
        dose is planned from are built on."""
        self.estimator.delivered(t_s, {self.input: float(rates.get(self.input, 0.0))})

    def covariates_from(self, t_s: float, covariates: Mapping[str, object]) -> None:
        self.estimator.covariates_from(t_s, covariates)

    # ------------------------------------------------------------------ deciding
    def dose_at(self, start_s: float) -> tuple[float, str]:
        self.last_estimate = self.estimator.update(start_s)
        target = self.target_auc_24h * self.interval_s / 86400.0
        amount = self._dose_for(start_s, target)
        state = "prior only" if not self._levels else \
            f"MAP of {self._levels} level(s){'' if self.last_estimate.success else ' (failed)'}"
        return amount, f"AUC {target:g} over the interval, {state}"

    def _dose_for(self, start: float, target: float) -> float:
        """Dose making the AUC over the next interval meet *target*, given earlier doses,
        with the planning parameters (covariates at *start*, estimated etas): the state at
        *start* as the estimator propagates it through what was delivered, then the search
        of control/dose_targets.py."""
        model = self.lm.model
        params = self.estimator.theta_at(start)
        x_start = self.estimator.state(start)   # through the delivered record
        regimen = Regimen(self.input, self.interval_s, self.infusion_s, basis="next",
                          start_s=start)
        unit = model.outputs[model.output_index(self.output)].unit
        exposure = ExposureTarget("auc24", target * 86400.0 / self.interval_s, f"{unit}*h")
        found = dose_for_target(model, params, regimen, exposure, output=self.output,
                                x_history=x_start)
        # met without a dose: none now (the search's answer, 0); out of reach: its largest
        return found.dose_exact if found.status != "met_without_dose" else 0.0
