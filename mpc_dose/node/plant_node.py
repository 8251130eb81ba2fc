"""The plant node: the pump side and sensor side of the protocol, no I/O.

Commands in (``set_rate``, ``bolus``, ``stop``, ``get_status``) are checked and applied to
the pumps; every command is answered with an ``ack`` (a bolus's says the amount given, after
the pump's rounding, in the command's unit). Sensor readings and pump events become
``measurement``, ``alarm`` and ``pump_status`` messages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..plant.pump import CommandResult, InfusionPump, PumpAlarm, PumpSnapshot
from ..plant.sensor import SensorReading
from ..protocol.messages import (WIRE_UNITS, Ack, Alarm, Bolus, GetStatus, LocalProtocolError,
                                 Measurement, PumpStatus, SetRate, Stop, _Message,
                                 wire_factor)

__all__ = ["PlantNode"]


class PlantNode:
    """Answers commands for *pumps* (by pump id)."""

    def __init__(self, pumps: Mapping[str, InfusionPump], *, src: str = "plant") -> None:
        self.pumps = dict(pumps)
        self.src = src

    def receive(self, message: _Message, now: float) -> list[_Message]:
        """Apply one command and answer it (other message types are ignored)."""
        if not isinstance(message, (SetRate, Bolus, Stop, GetStatus)):
            return []
        pump = self.pumps.get(message.pump)
        if pump is None:
            return [Ack(cmd_id=message.cmd_id, ok=False, code="schema",
                        text=f"no pump {message.pump!r}")]
        if isinstance(message, GetStatus):
            return [Ack(cmd_id=message.cmd_id, ok=True, code="applied"),
                    self.status_message(pump.status(), self._amount_unit(pump))]
        if isinstance(message, Stop):
            return [self._ack(message.cmd_id, pump.stop(cmd_id=message.cmd_id))]
        if isinstance(message, Bolus):
            return [self._bolus(pump, message)]
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
    def _amount_unit(pump: InfusionPump) -> str:
        model = pump.patient.model
        return model.inputs[model.input_index(pump.config.input)].amount_unit

    def _bolus(self, pump: InfusionPump, message: Bolus) -> Ack:
        """A bolus in the command's amount unit, given in the input's; the ack says what
        the pump gives, in the command's unit."""
        amount_unit = self._amount_unit(pump)
        try:
            factor = wire_factor(message.unit, amount_unit)
        except LocalProtocolError as err:
            return Ack(cmd_id=message.cmd_id, ok=False, code="unit", text=f"amount: {err}")
        amount = message.amount * factor
        if message.volume is not None:
            volume = message.volume * wire_factor(message.vol_unit, "mL")
            if not math.isclose(volume * pump.config.concentration, amount, rel_tol=0.01,
                                abs_tol=1e-9):
                return Ack(cmd_id=message.cmd_id, ok=False, code="unit",
                           text=f"volume {volume:g} mL holds "
                                f"{volume * pump.config.concentration:g} {amount_unit}, "
                                f"amount says {amount:g}")
        result = pump.bolus(amount, cmd_id=message.cmd_id, duration_s=message.duration_s)
        if not result.ok:
            return Ack(cmd_id=message.cmd_id, ok=False, code=result.code, text=result.text)
        return Ack(cmd_id=message.cmd_id, ok=True, code="applied",
                   applied_amount=result.applied_amount / factor, amount_unit=message.unit,
                   bolus_s=result.bolus_s, text=result.text)

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
    def status_message(snapshot: PumpSnapshot, amount_unit: str | None = None) -> PumpStatus:
        """A pump's status; a bolus pump's says its boluses in *amount_unit* (its input's,
        when a wire amount unit)."""
        bolus = {}
        if snapshot.bolus_delivered is not None and amount_unit in WIRE_UNITS["amount"]:
            bolus = dict(bolus_delivered=snapshot.bolus_delivered,
                         bolus_remaining=snapshot.bolus_remaining, amount_unit=amount_unit)
        return PumpStatus(pump=snapshot.pump, state=snapshot.state,
                          rate=snapshot.rate_ml_per_h, delivered=snapshot.delivered_ml,
                          lease_remaining_s=snapshot.lease_remaining_s, mode=snapshot.mode,
                          **bolus)

    def event_message(self, event: PumpAlarm | PumpSnapshot) -> _Message:
        """A pump event as a message: alarms as ``alarm``, snapshots as ``pump_status``."""
        if isinstance(event, PumpAlarm):
            return Alarm(code=f"pump.{event.code}", priority=event.priority, kind="technical",
                         text=f"{event.pump}: {event.text}")
        pump = self.pumps.get(event.pump)
        return self.status_message(event, self._amount_unit(pump) if pump else None)
