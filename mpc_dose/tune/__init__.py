"""Tuning controller settings over a population: a space of scenario keys, strategies (grid,
random, Sobol, Optuna), statistics of the cohort's metrics as objectives and limits, the
Pareto front, a recommended setting checked on held-out patients. Builds on trial/."""

from .space import Space, check_keys, load_space
from .sweep import SweepResult, pareto_mask, recommend, run_sweep

__all__ = ["Space", "load_space", "check_keys", "run_sweep", "SweepResult", "pareto_mask",
           "recommend"]
