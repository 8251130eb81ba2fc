"""Trials: one closed loop, cohorts of them, metrics and reports."""
