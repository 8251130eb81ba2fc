"""Model-informed precision dosing for one patient in the clinic: a patient's history read
from a file (:mod:`.dataset`), the Bayesian estimate with its uncertainty, the predicted
levels with a credible band and the dose for an exposure target (:mod:`.mipd`), written as
JSON, text and a plot (:mod:`.report`).

It builds on model/ and control/ (the estimator, the dose search) and reads the dosing
columns as scenario/ does; nothing here knows plants, trials or transports.
"""

from .dataset import PatientHistory, measured_output, read_patient_history
from .mipd import MipdResult, MipdSettings, run_mipd

__all__ = ["PatientHistory", "read_patient_history", "measured_output", "MipdSettings",
           "MipdResult", "run_mipd"]
