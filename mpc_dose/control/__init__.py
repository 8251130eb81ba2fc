"""Controllers: the interface, baselines (fixed regimen, PID, TCI, user), and later the NMPC,
estimators and safety supervisor. Knows model/, not plant/ nor transports."""

from .base import Controller, Decision, Reading

__all__ = ["Controller", "Decision", "Reading"]
