"""One closed loop for one patient: virtual patient, pumps and sensors (simpy processes), the
controller node, and the protocol messages between them over in-process links.

The controller and the plant exchange encoded protocol frames only (no shared objects), so
the same controller node runs unchanged across processes over ZeroMQ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import simpy

from ..control.base import Controller
from ..errors import ConfigError
from ..model.spec import Model
from ..node import ControllerNode, PlantNode, PumpRoute
from ..plant.clock import ACT, RECORD, at
from ..plant.patient import OutputDisturbance, VirtualPatient, parameter_schedule
from ..plant.pump import InfusionPump, PumpAlarm, PumpConfig
from ..plant.realtime import DeadlineEnvironment
from ..plant.sensor import SensorConfig, SensorNoise, sensor_process
from ..protocol.messages import Alarm
from ..transport.inproc import InprocLink
from ..units import unit_to_token

__all__ = ["LoopSetup", "LoopResult", "run_closed_loop"]


@dataclass(frozen=True)
class LoopSetup:
    """Everything one closed-loop run needs (built by the scenario layer)."""

    model: Model
    params: Mapping[str, float]
    controller: Controller
    pumps: Sequence[PumpConfig]
    sensors: Sequence[SensorConfig]
    duration_s: float
    record_step_s: float = 1.0
    disturbances: Sequence[OutputDisturbance] = ()
    lease_periods: float = 3.0
    latency_s: float = 0.0
    noise_rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    realtime_factor: float | None = None
    deadline_tolerance_s: float = 0.05
    encode_frames: bool = True
    #: (time [s], full parameter values) from which the patient changes
    parameter_changes: Sequence[tuple[float, Mapping[str, float]]] = ()


@dataclass
class LoopResult:
    """Columns of the time series (name with unit -> values) and the event log."""

    columns: dict[str, list]
    events: list[tuple[float, str, str]]
    deadline_misses: int = 0
    dropped_frames: int = 0

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.columns)


def _column(prefix: str, name: str, unit: str) -> str:
    return f"{prefix}{name}_{unit_to_token(unit)}" if unit != "1" else f"{prefix}{name}_unitless"


def run_closed_loop(setup: LoopSetup) -> LoopResult:
    """Run one patient under *setup*; returns the recorded series and events.

    Raises
    ------
    ConfigError
        For pumps, sensors or disturbances that name unknown model signals.
    """
    model = setup.model
    if setup.realtime_factor is None:
        env = simpy.Environment()
    else:
        env = DeadlineEnvironment(factor=setup.realtime_factor,
                                  tolerance_s=setup.deadline_tolerance_s)
    patient = VirtualPatient(model, setup.params, setup.disturbances)
    events: list[tuple[float, str, str]] = []
    if setup.parameter_changes:
        env.process(parameter_schedule(env, patient, setup.parameter_changes))
        events += [(t, "patient", "parameters change") for t, _ in setup.parameter_changes]

    # --- plant side -------------------------------------------------------------------
    controller_node: ControllerNode | None = None
    to_controller = InprocLink(env, lambda m, now: controller_node.receive(m, now),
                               src="plant", latency_s=setup.latency_s,
                               encode=setup.encode_frames)
    pumps: dict[str, InfusionPump] = {}

    def pump_event(event) -> None:
        if isinstance(event, PumpAlarm):
            events.append((env.now, "alarm", f"pump.{event.code}: {event.text}"))
        to_controller.send(plant_node.event_message(event))

    routes: dict[str, PumpRoute] = {}
    for config in setup.pumps:
        if config.input not in model.input_names:
            raise ConfigError(f"pump {config.pump!r}: model has no input {config.input!r}")
        if config.pump in pumps:
            raise ConfigError(f"pump {config.pump!r} configured twice")
        pumps[config.pump] = InfusionPump(env, config, patient, pump_event)
        amount_unit = model.inputs[model.input_index(config.input)].amount_unit
        routes[config.input] = PumpRoute(config.input, config.pump, config.concentration,
                                         amount_unit, config.fallback_ml_per_h)
    plant_node = PlantNode(pumps)
    # each sensor draws from its own child stream, spawned in order, so adding a sensor does
    # not change the noise of the others
    for config, rng in zip(setup.sensors, setup.noise_rng.spawn(len(setup.sensors))):
        model.output_index(config.output)
        env.process(sensor_process(env, patient, config, SensorNoise(config, rng),
                                   lambda r: to_controller.send(
                                       plant_node.measurement_message(r))))

    # --- controller side --------------------------------------------------------------
    def reply(message, now) -> None:
        for answer in plant_node.receive(message, now):
            to_controller.send(answer)

    to_plant = InprocLink(env, reply, src="controller", latency_s=setup.latency_s,
                          encode=setup.encode_frames)
    controller_node = ControllerNode(setup.controller, routes, lease_periods=setup.lease_periods)

    def control_cycle():
        k = 0
        period = setup.controller.period_s
        while True:
            t = k * period
            if t > setup.duration_s:
                return
            yield at(env, t, ACT)
            for message in controller_node.tick(t):
                to_plant.send(message)
            k += 1

    env.process(control_cycle())

    # --- recorder ---------------------------------------------------------------------
    columns: dict[str, list] = {"time_s": []}
    out_cols = [_column("true_", o.name, o.unit) for o in model.outputs]
    meas_cols = [(c.var, _column("measured_", c.var, c.unit)) for c in setup.sensors]
    rate_cols = [(i.name, _column("commanded_", f"{i.name}_rate", i.rate_unit),
                  _column("delivered_", f"{i.name}_rate", i.rate_unit)) for i in model.inputs]
    for name in out_cols + [c for _, c in meas_cols]:
        columns[name] = []
    for _, commanded, delivered in rate_cols:
        columns[commanded], columns[delivered] = [], []
    for pump in pumps:
        columns[f"pump_{pump}_state"] = []
    columns["controller_reason"] = []
    columns["alarms"] = []
    n_alarms_seen = [0]

    def recorder():
        k = 0
        while True:
            t = k * setup.record_step_s
            if t > setup.duration_s + 1e-9:
                return
            yield at(env, t, RECORD)
            columns["time_s"].append(t)
            y = patient.true_outputs(t)
            for name, value in zip(out_cols, y):
                columns[name].append(float(value))
            for var, name in meas_cols:
                reading = controller_node.readings.get(var)
                columns[name].append(reading.value if reading is not None
                                     and reading.quality == "valid" else math.nan)
            commanded = controller_node.commanded
            for j, (inp, c_name, d_name) in enumerate(rate_cols):
                columns[c_name].append(commanded.get(inp, math.nan))
                columns[d_name].append(float(patient.rates[j]))
            for pump_id, pump in pumps.items():
                columns[f"pump_{pump_id}_state"].append(pump.state)
            decision = controller_node.last_decision
            columns["controller_reason"].append(decision.reason if decision else "")
            new = controller_node.alarms[n_alarms_seen[0]:]
            n_alarms_seen[0] = len(controller_node.alarms)
            columns["alarms"].append(";".join(a.code for _, a in new))
            k += 1

    env.process(recorder())
    if isinstance(env, DeadlineEnvironment):
        env.sync()
    env.run(until=setup.duration_s + min(setup.record_step_s, 1.0) / 2)
    for t, alarm in controller_node.alarms:
        if isinstance(alarm, Alarm) and not alarm.code.startswith("pump."):
            events.append((t, "alarm", f"{alarm.code}: {alarm.text}"))
    misses = len(env.misses) if isinstance(env, DeadlineEnvironment) else 0
    for miss in getattr(env, "misses", []):
        events.append((miss.t_s, "deadline_miss", f"{miss.lag_s:.3f} s late"))
    return LoopResult(columns, sorted(events, key=lambda e: e[0]), misses,
                      len(to_plant.dropped) + len(to_controller.dropped))
