"""mpc_dose: closed-loop model-predictive drug dosing controller and simulator."""

__version__ = "0.1.0"
