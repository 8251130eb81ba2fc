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
from ..model.simulation import simulate
from .base import Decision, Reading
from .dose_targets import ExposureTarget, Regimen, dose_for_target
from .estimation import BayesianEstimator, EstimationConfig, EstimationResult, map_fit

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


class MIPDController:
    """Model-informed precision dosing without MPC: at each scheduled dose, the MAP estimate
    from the levels received so far (the estimator is told each dose given and each level at
    its sample time), then the dose whose AUC over the dosing interval (as a single infusion)
    meets the target AUC scaled to the interval, planned with the estimated etas.

    A :class:`~mpc_dose.control.base.Controller`: it returns the infusion rate in force
    (dose / infusion time during an infusion, else 0).
    """

    def __init__(self, library_model: LibraryModel, covariates: Mapping[str, object], *,
                 input: str, output: str, measured: str, interval_s: float, infusion_s: float,
                 target_auc_24h: float, period_s: float = 600.0, name: str = "mipd",
                 config: EstimationConfig | None = None) -> None:
        if not (0 < infusion_s <= interval_s):
            raise ConfigError(f"mipd: need 0 < infusion_s <= interval_s, got {infusion_s} and "
                              f"{interval_s}")
        self.lm, self.name, self.period_s = library_model, name, period_s
        self.inputs = (input,)
        self.input, self.output, self.measured = input, output, measured
        self.interval_s, self.infusion_s = interval_s, infusion_s
        self.target = target_auc_24h * interval_s / 86400.0
        self.estimator = BayesianEstimator(
            library_model, covariates, config if config is not None else
            EstimationConfig(output))
        self._doses: list[Dose] = []
        self._levels = 0
        self.last_estimate: MapResult | None = None

    def observe(self, reading: Reading) -> None:
        if reading.var == self.measured and reading.quality == "valid" and \
                math.isfinite(reading.value):
            self.estimator.add_reading(reading.t_meas_s, reading.value)
            self._levels += 1

    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        k = int(math.floor(t_s / self.interval_s + 1e-9))
        start = k * self.interval_s
        if not any(abs(d.time_s - start) < 1e-6 for d in self._doses):
            estimate = self.estimator.update(t_s)
            self.last_estimate = estimate
            dose = Dose.from_record(start, self.input, amount=self._dose(start),
                                    duration_s=self.infusion_s)
            self._doses.append(dose)
            self.estimator.add_dose(dose)
        current = next(d for d in self._doses if abs(d.time_s - start) < 1e-6)
        on = start <= t_s < start + self.infusion_s
        reason = (f"MIPD: dose {current.amount:.0f} over {self.infusion_s / 3600:g} h at "
                  f"{start / 3600:g} h from {self._levels} level(s)")
        return Decision(t_s, {self.input: current.rate if on else 0.0}, reason)

    def _dose(self, start: float) -> float:
        """Dose making the AUC over the next interval meet the target, given earlier doses,
        with the planning parameters (typical values now, estimated etas)."""
        model = self.lm.model
        params = self.estimator.theta_at(start)
        x_start = simulate(model, params, self._doses, [0.0, start]).states[-1] \
            if start > 0 else model.initial_state(params)
        regimen = Regimen(self.input, self.interval_s, self.infusion_s, basis="next",
                          start_s=start)
        target = ExposureTarget("auc24", self.target * 86400.0 / self.interval_s,
                                f"{model.outputs[model.output_index(self.output)].unit}*h")
        found = dose_for_target(model, params, regimen, target, output=self.output,
                                x_history=x_start)
        # met without a dose: none now (the search's answer, 0); out of reach: its largest
        return found.dose_exact if found.status != "met_without_dose" else 0.0
