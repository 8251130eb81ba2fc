"""The plant node: the pump side and sensor side of the protocol, no I/O.

Commands in (``set_rate``, ``stop``, ``get_status``) are checked and applied to the pumps;
every command is answered with an ``ack``. Sensor readings and pump events become
``measurement``, ``alarm`` and ``pump_status`` messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..plant.pump import CommandResult, InfusionPump, PumpAlarm, PumpSnapshot
from ..plant.sensor import SensorReading
from ..protocol.messages import (Ack, Alarm, GetStatus, LocalProtocolError, Measurement,
                                 PumpStatus, SetRate, Stop, _Message, wire_factor)

__all__ = ["PlantNode"]


class PlantNode:
    """Answers commands for *pumps* (by pump id)."""

    def __init__(self, pumps: Mapping[str, InfusionPump], *, src: str = "plant") -> None:
        self.pumps = dict(pumps)
        self.src = src

    def receive(self, message: _Message, now: float) -> list[_Message]:
        """Apply one command and answer it (other message types are ignored)."""
        if not isinstance(message, (SetRate, Stop, GetStatus)):
            return []
        pump = self.pumps.get(message.pump)
        if pump is None:
            return [Ack(cmd_id=message.cmd_id, ok=False, code="schema",
                        text=f"no pump {message.pump!r}")]
        if isinstance(message, GetStatus):
            return [Ack(cmd_id=message.cmd_id, ok=True, code="applied"),
                    self.status_message(pump.status())]
        if isinstance(message, Stop):
            return [self._ack(message.cmd_id, pump.stop(cmd_id=message.cmd_id))]
        rate = message.rate * wire_factor(message.unit, "mL/h")
        fallback = message.fallback.rate * wire_factor(message.fallback.unit, "mL/h")
        if message.dose_rate is not None:
            # the independent check: the dose rate must give the same volume rate
            amount_unit = pump.patient.model.inputs[
                pump.patient.model.input_index(pump.config.input)].amount_unit
            try:
                per_s = message.dose_rate * wire_factor(message.dose_unit, f"{amount_unit}/s")
            except LocalProtocolError as err:
                return [Ack(cmd_id=message.cmd_id, ok=False, code="unit", text=str(err))]
            expected = pump.config.ml_per_h(per_s)
            if not math.isclose(expected, rate, rel_tol=0.01, abs_tol=1e-9):
                return [Ack(cmd_id=message.cmd_id, ok=False, code="out_of_range",
                            text=f"dose rate gives {expected:g} mL/h, rate says {rate:g}")]
        result = pump.set_rate(rate, message.lease_s, cmd_id=message.cmd_id,
                               fallback_ml_per_h=fallback)
        return [self._ack(message.cmd_id, result, message.lease_s)]

    @staticmethod
    def _ack(cmd_id: str, result: CommandResult, lease_s: float | None = None) -> Ack:
        return Ack(cmd_id=cmd_id, ok=result.ok, code=result.code,
                   applied_rate=result.applied_ml_per_h,
                   unit=None if result.applied_ml_per_h is None else "mL/h",
                   lease_remaining_s=lease_s if result.ok else None, text=result.text)

    @staticmethod
    def measurement_message(reading: SensorReading) -> Measurement:
        return Measurement(var=reading.var, value=reading.value, unit=reading.unit,
                           t_meas=reading.t_meas_s, quality=reading.quality,
                           sensor=reading.sensor)

    @staticmethod
    def status_message(snapshot: PumpSnapshot) -> PumpStatus:
        return PumpStatus(pump=snapshot.pump, state=snapshot.state,
                          rate=snapshot.rate_ml_per_h, delivered=snapshot.delivered_ml,
                          lease_remaining_s=snapshot.lease_remaining_s, mode=snapshot.mode)

    def event_message(self, event: PumpAlarm | PumpSnapshot) -> _Message:
        """A pump event as a message: alarms as ``alarm``, snapshots as ``pump_status``."""
        if isinstance(event, PumpAlarm):
            return Alarm(code=f"pump.{event.code}", priority=event.priority, kind="technical",
                         text=f"{event.pump}: {event.text}")
        return self.status_message(event)
