"""One closed loop for one patient: virtual patient, pumps and sensors (simpy processes), the
controller node, and the protocol messages between them over in-process links.

The controller and the plant exchange encoded protocol frames only (no shared objects), so
the same controller node runs unchanged across processes over ZeroMQ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import simpy

from ..control.base import Controller
from ..control.supervisor import SafetyConfig
from ..errors import ConfigError
from ..model.spec import Model
from ..node import ControllerNode, PlantNode, PumpRoute
from ..plant.clock import ACT, RECORD, at
from ..plant.patient import (Meal, OutputDisturbance, VirtualPatient, meal_process,
                             parameter_schedule)
from ..plant.pump import InfusionPump, PumpAlarm, PumpConfig
from ..plant.realtime import DeadlineEnvironment
from ..plant.sensor import SensorConfig, SensorNoise, sensor_process
from ..protocol.messages import (Ack, Alarm, Bolus, Measurement, PumpStatus, SetRate, _Message,
                                 wire_factor)
from ..transport.inproc import InprocLink
from ..units import UnitError, conversion_factor, unit_to_token

__all__ = ["LoopSetup", "LoopResult", "PlantSide", "run_closed_loop", "make_environment",
           "control_instants"]


@dataclass(frozen=True)
class LoopSetup:
    """Everything one closed-loop run needs (built by the scenario layer). The controller
    runs behind the safety supervisor with *safety* (no data gate and no limits when
    None)."""

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
    #: the safety supervisor's limits and data rules for the controller
    safety: SafetyConfig | None = None
    #: meals the patient eats (boluses of a model input no pump gives)
    meals: Sequence[Meal] = ()
    #: (time [s], new covariate values) of the patient's covariate changes, for the records
    #: (the parameter changes above are their effect)
    covariate_changes: Sequence[tuple[float, Mapping[str, object]]] = ()


@dataclass
class LoopResult:
    """Columns of the time series (name with unit -> values), the event log, every sensor
    sample as taken (:meth:`samples_frame`) and every change of a delivered rate
    (:meth:`deliveries_frame`)."""

    columns: dict[str, list]
    events: list[tuple[float, str, str]]
    deadline_misses: int = 0
    dropped_frames: int = 0
    #: (t_meas_s, t_arrival_s, var, value, unit, quality, sensor) of every reading
    samples: list[tuple] = field(default_factory=list)
    #: (time_s, input, rate, rate unit) at every change of what reached the patient
    deliveries: list[tuple] = field(default_factory=list)
    #: commands the pump side refused, by ack code (out_of_range, unit, pump_error, ...)
    refused_commands: dict[str, int] = field(default_factory=dict)
    #: the run was interrupted (Ctrl-C) before its end: the series stops there
    interrupted: bool = False

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame(self.columns)

    def samples_frame(self):
        """Every sample at its sample time, with its arrival time (a lab delay)."""
        import pandas as pd

        return pd.DataFrame(self.samples, columns=["t_meas_s", "t_arrival_s", "var", "value",
                                                   "unit", "quality", "sensor"])

    def deliveries_frame(self):
        """The delivered rate of each input from each change on (the exact dosing record)."""
        import pandas as pd

        return pd.DataFrame(self.deliveries, columns=["time_s", "input", "rate", "rate_unit"])


def _column(prefix: str, name: str, unit: str) -> str:
    return f"{prefix}{name}_{unit_to_token(unit)}" if unit != "1" else f"{prefix}{name}_unitless"


def _valid_value(reading) -> float:
    """A reading's or measurement's value when valid, NaN otherwise (or when none)."""
    return reading.value if reading is not None and reading.quality == "valid" else math.nan


class PlantSide:
    """The plant half of a loop inside simpy environment *env*: virtual patient, pumps,
    sensors, disturbances and the recorder. Messages to the controller go out through
    *send*; commands come in through :meth:`command`, which returns the answers (already
    sent as well).

    The same object runs in one process (:func:`run_closed_loop`) and as the plant process
    of a loop across processes (:mod:`mpc_dose.serve.plant`), so both give the same series.
    Pumps named in *external* are driven by another process (a pump bridge): their delivered
    rate is set with :meth:`apply_external` from that pump's status.
    """

    def __init__(self, setup: LoopSetup, env: simpy.Environment,
                 send: Callable[[_Message], None], *, external: Sequence[str] = ()) -> None:
        model = setup.model
        self.setup, self.env, self._send = setup, env, send
        self.patient = VirtualPatient(model, setup.params, setup.disturbances)
        self.events: list[tuple[float, str, str]] = []
        if setup.meals:
            unit = model.inputs[model.input_index(setup.meals[0].input)].amount_unit
            try:   # announcements go out in g, the unit patients count carbohydrate in
                grams = conversion_factor(unit, "g", what="meals.input")
            except UnitError as err:
                raise ConfigError(f"{err}: meals are announced in g") from None
            env.process(meal_process(env, self.patient, setup.meals, self.events,
                                     self._reading, grams))
        if setup.parameter_changes:
            env.process(parameter_schedule(env, self.patient, setup.parameter_changes))
            self.events += [(t, "patient", "parameters change")
                            for t, _ in setup.parameter_changes]
        self.pumps: dict[str, InfusionPump] = {}
        self.configs: dict[str, PumpConfig] = {}
        self.external = tuple(external)
        for config in setup.pumps:
            if config.input not in model.input_names:
                raise ConfigError(f"pump {config.pump!r}: model has no input {config.input!r}")
            if config.pump in self.configs:
                raise ConfigError(f"pump {config.pump!r} configured twice")
            self.configs[config.pump] = config
            if config.pump not in self.external:
                self.pumps[config.pump] = InfusionPump(env, config, self.patient,
                                                       self._pump_event)
        self.routes = self.routes_for(setup)
        unknown = set(self.external) - set(self.configs)
        if unknown:
            raise ConfigError(f"external pumps {sorted(unknown)} are not in the scenario's "
                              f"pumps {sorted(self.configs)}")
        self.node = PlantNode(self.pumps)
        #: what the plant last sent or was told, for the recorder
        self.last_measurement: dict[str, Measurement] = {}
        self.commanded: dict[str, float] = {}
        #: alarm codes for the recorder's column: the plant's own (and, in one process, the
        #: controller node's)
        self.alarms_sent: list[str] = []
        self.samples: list[tuple] = []
        # each sensor draws from its own child stream, spawned in order, so adding a sensor
        # does not change the noise of the others
        for config, rng in zip(setup.sensors, setup.noise_rng.spawn(len(setup.sensors))):
            model.output_index(config.output)
            env.process(sensor_process(env, self.patient, config, SensorNoise(config, rng),
                                       self._reading))

    @staticmethod
    def routes_for(setup: LoopSetup) -> dict[str, PumpRoute]:
        """Input -> pump route of *setup* (what a controller node needs of the plant)."""
        model = setup.model
        routes = {}
        for config in setup.pumps:
            amount_unit = model.inputs[model.input_index(config.input)].amount_unit
            routes[config.input] = PumpRoute(config.input, config.pump, config.concentration,
                                              amount_unit, config.fallback_ml_per_h,
                                              bolus=config.max_bolus > 0)
        return routes

    def _reading(self, reading) -> None:
        self.samples.append((reading.t_meas_s, float(self.env.now), reading.var,
                             reading.value, reading.unit, reading.quality, reading.sensor))
        message = self.node.measurement_message(reading)
        self.last_measurement[message.var] = message
        self._send(message)

    def _pump_event(self, event) -> None:
        if isinstance(event, PumpAlarm):
            self.events.append((self.env.now, "alarm", f"pump.{event.code}: {event.text}"))
        message = self.node.event_message(event)
        if isinstance(message, Alarm):
            self.alarms_sent.append(message.code)
        self._send(message)

    def command(self, message: _Message, *, send: bool = True) -> list[_Message]:
        """Apply one command to a simulated pump; the answers are returned (and sent through
        the telemetry link unless *send* is False: across processes they go back to the
        commanding client instead)."""
        if isinstance(message, SetRate):
            self.note_command(message)
        answers = self.node.receive(message, self.env.now)
        if isinstance(message, Bolus):  # the record says what each bolus gave
            for answer in answers:
                if isinstance(answer, Ack) and answer.ok:
                    self.events.append((float(self.env.now), "bolus",
                                        f"{message.pump}: {answer.applied_amount:.4g} "
                                        f"{answer.amount_unit} over {answer.bolus_s:.0f} s "
                                        f"(asked {message.amount:.4g})"))
        for answer in answers if send else ():
            self._send(answer)
        return answers

    def apply_external(self, status: PumpStatus) -> None:
        """Deliver what an external pump reports it infuses (its status), from now."""
        config = self.configs[status.pump]
        rate = status.rate * wire_factor(status.unit, "mL/h")
        if status.state != "infusing":
            rate = 0.0
        self.patient.set_rate(self.env.now, self.setup.model.input_index(config.input),
                              config.amount_per_s(rate))

    def note_command(self, message: SetRate) -> None:
        """Record a command's dose rate for the commanded columns (also for a command that
        went to an external pump)."""
        for route in self.routes.values():
            if route.pump == message.pump and message.dose_rate is not None:
                self.commanded[route.input] = message.dose_rate

    def recorder(self, columns: dict[str, list],
                 measured: Callable[[str], float] | None = None,
                 commanded: Callable[[], Mapping[str, float]] | None = None,
                 reason: Callable[[], str] = lambda: "",
                 status: Callable[[], str] = lambda: "",
                 mode: Callable[[], str] = lambda: ""):
        """A simpy process recording one row per record step into *columns*; *measured*,
        *commanded* and *reason* default to what the plant sent and was told."""
        setup, env, model = self.setup, self.env, self.setup.model
        out_cols = [_column("true_", o.name, o.unit) for o in model.outputs]
        # one column per reading variable (several sensors may send one: levels drawn at
        # 04:00 and 15:00 by two sensors of the same assay)
        meas_cols = list(dict.fromkeys((c.var, _column("measured_", c.var, c.unit))
                                       for c in setup.sensors))
        rate_cols = [(i.name, _column("commanded_", f"{i.name}_rate", i.rate_unit),
                      _column("delivered_", f"{i.name}_rate", i.rate_unit))
                     for i in model.inputs]
        columns["time_s"] = []
        for name in out_cols + [c for _, c in meas_cols]:
            columns[name] = []
        for _, c_name, d_name in rate_cols:
            columns[c_name], columns[d_name] = [], []
        for pump in self.pumps:
            columns[f"pump_{pump}_state"] = []
        columns["controller_reason"] = []
        columns["controller_status"] = []
        columns["controller_mode"] = []
        columns["alarms"] = []
        measured = measured or self._measured
        commanded = commanded or (lambda: self.commanded)
        seen = 0
        k = 0
        while True:
            t = k * setup.record_step_s
            if t > setup.duration_s + 1e-9:
                return
            yield at(env, t, RECORD)
            columns["time_s"].append(t)
            for name, value in zip(out_cols, self.patient.true_outputs(t)):
                columns[name].append(float(value))
            for var, name in meas_cols:
                columns[name].append(measured(var))
            rates = commanded()
            for j, (inp, c_name, d_name) in enumerate(rate_cols):
                columns[c_name].append(rates.get(inp, math.nan))
                columns[d_name].append(float(self.patient.rates[j]))
            for pump_id, pump in self.pumps.items():
                columns[f"pump_{pump_id}_state"].append(pump.state)
            columns["controller_reason"].append(reason())
            columns["controller_status"].append(status())
            columns["controller_mode"].append(mode())
            columns["alarms"].append(";".join(self.alarms_sent[seen:]))
            seen = len(self.alarms_sent)
            k += 1

    def _measured(self, var: str) -> float:
        return _valid_value(self.last_measurement.get(var))

    def result(self, columns: dict[str, list], events, **counts) -> LoopResult:
        """The run's result: the recorded columns and events, the samples as taken and the
        delivered rates at every change."""
        inputs = self.setup.model.inputs
        deliveries = [(t, inputs[k].name, rate, inputs[k].rate_unit)
                      for t, k, rate in self.patient.deliveries]
        return LoopResult(columns, sorted(events, key=lambda e: e[0]), samples=self.samples,
                          deliveries=deliveries, **counts)


def make_environment(setup: LoopSetup) -> simpy.Environment:
    """simpy's environment: as fast as possible, or against the wall clock."""
    if setup.realtime_factor is None:
        return simpy.Environment()
    return DeadlineEnvironment(factor=setup.realtime_factor,
                               tolerance_s=setup.deadline_tolerance_s)


def control_instants(setup: LoopSetup, period_s: float):
    """Control times 0, T, 2T, ... up to the scenario's duration."""
    k = 0
    while k * period_s <= setup.duration_s:
        yield k * period_s
        k += 1


def _run_until_ctrl_c(env, end_s: float, step_s: float) -> bool:
    """Run a real-time *env* to *end_s* in steps of *step_s*; True when Ctrl-C stopped it.

    A KeyboardInterrupt raised inside a simpy process becomes that process's failure, which
    another process may catch (simpy's ``_resume`` takes any BaseException): the run then
    went on, or ended as if complete. Here Ctrl-C only sets a flag (in the main thread),
    read between steps, so the run stops where it is and says so."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        env.run(until=end_s)
        return False
    asked = []
    previous = signal.signal(signal.SIGINT, lambda *_: asked.append(True))
    try:
        while env.now < end_s and not asked:
            env.run(until=min(end_s, env.now + step_s))
    finally:
        signal.signal(signal.SIGINT, previous)
    return bool(asked)


def run_closed_loop(setup: LoopSetup, *,
                    progress: Callable[[float, Mapping[str, list]], None] | None = None,
                    progress_step_s: float = 10.0) -> LoopResult:
    """Run one patient under *setup*; returns the recorded series and events.

    *progress*, when given, is called every *progress_step_s* of simulated time with the time
    and the columns recorded so far (a real-time run says how it goes). An interrupt
    (Ctrl-C) ends the run early: what was recorded until then is returned, with
    ``interrupted`` set.

    Raises
    ------
    ConfigError
        For pumps, sensors or disturbances that name unknown model signals.
    """
    env = make_environment(setup)
    controller_node: ControllerNode | None = None
    to_controller = InprocLink(env, lambda m, now: controller_node.receive(m, now),
                               src="plant", latency_s=setup.latency_s,
                               encode=setup.encode_frames)
    plant = PlantSide(setup, env, to_controller.send)
    to_plant = InprocLink(env, lambda m, now: plant.command(m), src="controller",
                          latency_s=setup.latency_s, encode=setup.encode_frames)
    controller_node = ControllerNode(setup.controller, plant.routes, safety=setup.safety,
                                     lease_periods=setup.lease_periods)

    def control_cycle():
        for t in control_instants(setup, setup.controller.period_s):
            yield at(env, t, ACT)
            for message in controller_node.tick(t):
                if isinstance(message, Alarm):  # the supervisor's: recorded, not a command
                    plant.alarms_sent.append(message.code)
                    continue
                to_plant.send(message)

    env.process(control_cycle())

    def measured(var: str) -> float:
        return _valid_value(controller_node.readings.get(var))

    def reason() -> str:
        decision = controller_node.last_decision
        return decision.reason if decision else ""

    def status() -> str:
        decision = controller_node.last_decision
        return decision.status if decision else ""

    columns: dict[str, list] = {}
    env.process(plant.recorder(columns, measured, lambda: controller_node.commanded, reason,
                               status, lambda: controller_node.supervisor.mode))
    if progress is not None:
        def report():
            k = 1
            while k * progress_step_s <= setup.duration_s:
                yield at(env, k * progress_step_s, RECORD)
                progress(float(env.now), columns)
                k += 1
        env.process(report())
    if isinstance(env, DeadlineEnvironment):
        env.sync()
    end_s = setup.duration_s + min(setup.record_step_s, 1.0) / 2
    interrupted = False
    try:
        if isinstance(env, DeadlineEnvironment):
            interrupted = _run_until_ctrl_c(env, end_s, min(setup.record_step_s, 1.0))
        else:
            env.run(until=end_s)
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:  # keep what was recorded: rows up to the last complete one
        rows = min(len(values) for values in columns.values())
        for values in columns.values():
            del values[rows:]
    events = list(plant.events)
    for t, alarm in controller_node.alarms:
        if isinstance(alarm, Alarm) and not alarm.code.startswith("pump."):
            events.append((t, "alarm", f"{alarm.code}: {alarm.text}"))
    for t, alarm in controller_node.raised:
        events.append((t, "alarm", f"{alarm.code}: {alarm.text}"))
    for t, source, target, cause in controller_node.transitions:
        events.append((t, "mode", f"{source} -> {target}: {cause}"))
    misses = len(env.misses) if isinstance(env, DeadlineEnvironment) else 0
    for miss in getattr(env, "misses", []):
        events.append((miss.t_s, "deadline_miss", f"{miss.lag_s:.3f} s late"))
    refused: dict[str, int] = {}
    for ack in controller_node.acks.values():
        if not ack.ok:
            refused[ack.code] = refused.get(ack.code, 0) + 1
    result = plant.result(columns, events, deadline_misses=misses,
                          dropped_frames=len(to_plant.dropped) + len(to_controller.dropped),
                          refused_commands=refused)
    result.interrupted = interrupted
    return result
