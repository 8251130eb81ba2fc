"""The controller node: protocol messages in, protocol messages out, no I/O.

It keeps the latest reading of each measured variable, runs the controller once per control
period (:meth:`tick`) and turns its rates (amount/s) into leased ``set_rate`` commands in
mL/h for the pump of each input, with the dose rate alongside for the pump side's own check.
It never owns a clock: ``now`` is an argument.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..control.base import Controller, Decision, Reading, check_rates
from ..protocol.messages import (Ack, Alarm, Fallback, Measurement, PumpStatus, SetRate,
                                 _Message)

__all__ = ["PumpRoute", "ControllerNode"]


@dataclass(frozen=True)
class PumpRoute:
    """Where the rate of one model input goes: pump id, drug concentration (input amount
    unit per mL), and the input's amount unit."""

    input: str
    pump: str
    concentration: float
    amount_unit: str
    fallback_ml_per_h: float = 0.0


class ControllerNode:
    """Runs *controller* and speaks the protocol to the pumps in *routes*.

    Parameters
    ----------
    controller : Controller
    routes : mapping of input name -> PumpRoute
    lease_periods : float
        Each command's lease, in control periods (DESIGN: 2-3 periods).
    src : str
        This node's id in the messages it sends.
    """

    def __init__(self, controller: Controller, routes: Mapping[str, PumpRoute], *,
                 lease_periods: float = 3.0, src: str = "controller") -> None:
        missing = [name for name in controller.inputs if name not in routes]
        if missing:
            from ..errors import ConfigError

            raise ConfigError(f"controller {controller.name!r} sets {', '.join(missing)} but "
                              f"no pump is configured for it")
        self.controller = controller
        self.routes = dict(routes)
        self.lease_s = lease_periods * controller.period_s
        self.src = src
        self.readings: dict[str, Reading] = {}
        self.last_decision: Decision | None = None
        self.acks: dict[str, Ack] = {}
        self.pump_status: dict[str, PumpStatus] = {}
        self.alarms: list[tuple[float, Alarm]] = []
        self._commands = 0

    def receive(self, message: _Message, now: float) -> list[_Message]:
        """Take in one message from the plant side; nothing is sent back."""
        if isinstance(message, Measurement):
            previous = self.readings.get(message.var)
            # readings can arrive out of order (delays): keep the newest sample
            reading = Reading(message.var, message.value, message.unit, message.t_meas,
                              message.quality)
            if previous is None or message.t_meas >= previous.t_meas_s:
                self.readings[message.var] = reading
            observe = getattr(self.controller, "observe", None)
            if observe is not None:  # controllers that use every sample (estimators)
                observe(reading)
        elif isinstance(message, Ack):
            self.acks[message.cmd_id] = message
        elif isinstance(message, PumpStatus):
            self.pump_status[message.pump] = message
        elif isinstance(message, Alarm):
            self.alarms.append((now, message))
        return []

    def tick(self, now: float) -> list[_Message]:
        """One control cycle: decide and send one leased command per input."""
        decision = self.controller.decide(now, dict(self.readings))
        rates = check_rates(decision.rates, self.controller.inputs, self.controller.name)
        self.last_decision = Decision(now, rates, decision.reason, decision.status,
                                      decision.details)
        out: list[_Message] = []
        for name, rate in rates.items():
            route = self.routes[name]
            self._commands += 1
            out.append(SetRate(
                cmd_id=f"{self.src}-{self._commands}", pump=route.pump,
                rate=rate * 3600.0 / route.concentration, unit="mL/h", lease_s=self.lease_s,
                fallback=(Fallback(action="preset_rate", rate=route.fallback_ml_per_h)
                          if route.fallback_ml_per_h > 0 else Fallback()),
                dose_rate=rate, dose_unit=f"{route.amount_unit}/s"))
        return out

    @property
    def commanded(self) -> dict[str, float]:
        """The rates of the last decision [amount/s] (NaN before the first)."""
        if self.last_decision is None:
            return {name: math.nan for name in self.controller.inputs}
        return dict(self.last_decision.rates)
