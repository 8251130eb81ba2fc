"""Baseline controllers a new controller is compared against: a fixed regimen (standard of
care), the PID of the anaesthesia literature, and a user's own Python function.

(Target-controlled infusion lives in :mod:`mpc_dose.control.tci`.)
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from ..model.dosing import Dose
from .base import Decision, Reading, check_rates

__all__ = ["FixedRegimen", "PIDSettings", "PIDController", "CallableController",
           "load_user_controller"]


class FixedRegimen:
    """Open-loop standard of care: the rates of a dosing regimen, whatever is measured.

    Boluses must be given as short infusions (a pump is commanded in rates).
    """

    def __init__(self, doses: Sequence[Dose], inputs: Sequence[str], *, period_s: float = 1.0,
                 name: str = "fixed-regimen") -> None:
        for k, dose in enumerate(doses):
            if dose.is_bolus:
                raise ConfigError(f"fixed regimen dose {k + 1}: a bolus of {dose.amount} at "
                                  f"{dose.time_s} s; give it as a short infusion (duration)")
            if dose.input not in inputs:
                raise ConfigError(f"fixed regimen dose {k + 1}: input {dose.input!r} is not "
                                  f"one of {', '.join(inputs)}")
        if not period_s > 0:
            raise ConfigError(f"fixed regimen: period_s must be > 0, got {period_s!r}")
        self.name, self.period_s, self.inputs = name, float(period_s), tuple(inputs)
        self._doses = tuple(doses)

    def rates_at(self, t_s: float) -> dict[str, float]:
        rates = dict.fromkeys(self.inputs, 0.0)
        for d in self._doses:
            if d.time_s <= t_s < d.time_s + d.duration_s:
                rates[d.input] += d.rate
        return rates

    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        return Decision(t_s, self.rates_at(t_s), "fixed regimen")


@dataclass(frozen=True)
class PIDSettings:
    """The discrete PID with derivative filter and conditional-integration anti-windup.

    Defaults are the DESIGN's anaesthesia PID (Schiavo, Padula, Latronico, Paltenghi &
    Visioli 2022, as tuned in the python-anesthesia-simulator examples): BIS to 50, propofol
    ``u`` mg/s and remifentanil ``2 u`` ug/s.
    """

    measured: str = "bis"
    setpoint: float = 50.0
    kp: float = 0.013208318978132468
    ti_s: float = 300.0
    td_s: float = 10.0
    derivative_filter_n: float = 5.0
    period_s: float = 1.0
    u_min: float = 0.0
    u_max: float = 8.335
    #: rate of each input per unit of the PID output (amount/s per unit)
    ratios: tuple[tuple[str, float], ...] = (("propofol", 1.0), ("remifentanil", 2.0))
    #: upper clamp of each input's rate [amount/s]
    max_rates: tuple[tuple[str, float], ...] = (("propofol", 6.67), ("remifentanil", 16.67))
    #: the measurement before the first one (BIS_prev of the derivative term)
    initial_measurement: float = 100.0

    def __post_init__(self) -> None:
        for name in ("kp", "ti_s", "period_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"pid.{name}: expected a number > 0, got {value!r}")
        if not self.u_max > self.u_min:
            raise ConfigError(f"pid: u_max ({self.u_max}) must exceed u_min ({self.u_min})")


class PIDController:
    """Discrete PID acting on ``error = measured - setpoint`` (a drug that lowers the
    measured value, like propofol on BIS, needs more drug when the value is high).

    Each period::

        I += ts/Ti * e
        D  = (D Td/N + Td (y - y_prev)) / (ts + Td/N)
        u  = Kp (e + I + D)
        if u >= u_max and u e <= 0:  I = u_max/Kp - e - D, u = u_max   (likewise at u_min)

    and each input gets ``clip(ratio * u, 0, max_rate)``. A missing, non-valid or non-finite
    reading keeps the previous output and says so in the reason.
    """

    def __init__(self, settings: PIDSettings = PIDSettings(), *, name: str = "pid") -> None:
        self.settings = settings
        self.name = name
        self.period_s = settings.period_s
        self.inputs = tuple(k for k, _ in settings.ratios)
        self._integral = 0.0
        self._derivative = 0.0
        self._previous = settings.initial_measurement
        self._u = 0.0

    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        s = self.settings
        reading = readings.get(s.measured)
        if reading is None or reading.quality != "valid" or not math.isfinite(reading.value):
            return Decision(t_s, self._rates(self._u), f"no valid {s.measured}: hold output",
                            status="no_measurement")
        y = reading.value
        e = y - s.setpoint
        ts = s.period_s
        self._integral += ts / s.ti_s * e
        self._derivative = (self._derivative * s.td_s / s.derivative_filter_n
                            + s.td_s * (y - self._previous)) / (ts + s.td_s
                                                                 / s.derivative_filter_n)
        self._previous = y
        u = s.kp * (e + self._integral + self._derivative)
        reason = "pid"
        # Conditional integration exactly as the DESIGN states it (and as the
        # python-anesthesia-simulator implements it): the reset fires when u and e have
        # opposite signs. Textbook conditional integration fires on equal signs; the
        # literature PID's published results use this form, so it is kept.
        if u >= s.u_max and u * e <= 0:
            self._integral = s.u_max / s.kp - e - self._derivative
            u, reason = s.u_max, "pid at upper limit (integral reset)"
        elif u <= s.u_min and u * e <= 0:
            self._integral = s.u_min / s.kp - e - self._derivative
            u, reason = s.u_min, "pid at lower limit (integral reset)"
        self._u = u
        return Decision(t_s, self._rates(u), reason, details={
            "error": e, "integral": self._integral, "derivative": self._derivative, "u": u})

    def _rates(self, u: float) -> dict[str, float]:
        caps = dict(self.settings.max_rates)
        return {name: min(max(ratio * u, 0.0), caps.get(name, math.inf))
                for name, ratio in self.settings.ratios}


class CallableController:
    """A user's controller: ``fn(t_s, readings) -> {input: rate}``, rates checked."""

    def __init__(self, fn: Callable[[float, Mapping[str, Reading]], Mapping[str, float]],
                 inputs: Sequence[str], *, period_s: float, name: str = "user") -> None:
        if not callable(fn):
            raise ConfigError(f"user controller {name!r}: {fn!r} is not callable")
        self._fn, self.inputs, self.period_s, self.name = fn, tuple(inputs), float(period_s), name

    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        rates = check_rates(self._fn(t_s, readings), self.inputs, self.name)
        return Decision(t_s, rates, f"user controller {self.name}")


def load_user_controller(target: str, base_dir: str = "."):
    """Import ``"package.module:attribute"`` or ``"path/to/file.py:attribute"`` (a path
    relative to *base_dir*): a controller factory or function.

    Raises
    ------
    ConfigError
        For a malformed target, a module or file that does not import or a missing attribute.
    """
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"controller.target = {target!r}: expected 'package.module:name' or "
                          f"'file.py:name'")
    try:
        if module_name.endswith(".py"):

            path = Path(module_name)
            path = path if path.is_absolute() else Path(base_dir) / path
            spec = importlib.util.spec_from_file_location(f"user_controller_{path.stem}", path)
            if spec is None or not path.is_file():
                raise ImportError(f"no file {str(path)!r}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"controller.target = {target!r}: cannot import {module_name!r} "
                          f"({err})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"controller.target = {target!r}: {module_name!r} has no "
                          f"{attr!r}") from None
