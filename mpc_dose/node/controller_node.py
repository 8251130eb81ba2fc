"""The controller node: protocol messages in, protocol messages out, no I/O.

It keeps the latest reading of each measured variable, runs the controller behind the safety
supervisor once per control period (:meth:`ControllerNode.tick`) and turns the rates
(amount/s) into leased ``set_rate`` commands in mL/h for the pump of each input, with the
dose rate alongside for the pump side's own check. It never owns a clock: ``now`` is an
argument.

Every controller kind runs behind the same supervisor here
(:class:`~mpc_dose.control.supervisor.SupervisedController`): readings are gated before the
controller sees them, and its rates are limited before they leave. The supervisor's alarms
leave :meth:`~ControllerNode.tick` as ``alarm`` messages (for the caller to record or
publish; they are not commands) and its mode transitions are kept in
:attr:`~ControllerNode.transitions`.

Unusable data never renews a lease indefinitely: at the first decision on unusable data the
node sends one command (a dose decrease takes effect at once) whose fallback preset is no
higher than its rate; while the data stays unusable it then only asks for the pump's status
(``get_status``), so that lease runs out and the pump side applies the fallback by itself
(as OpenAPS lets a temporary basal expire). A further decrease is still sent at once.

A decision's boluses (an insulin meal bolus) leave as ``bolus`` commands (protocol 1.1) to
pumps whose route takes them, with the amount in the input's amount unit, the volume
alongside for the pump side's check, and a lease of one control period to start; they go
before the instant's rate commands, since a pump's ``set_rate`` (or ``get_status``) closes its
control instant (the simulated lock-step, docs/protocol.md section 6). What the
pump gives (its ack's amount, after its rounding) is recorded in :attr:`boluses` and told to
the controller (``given_bolus``); a refused bolus is given by nobody, and the controller is
told so (``given_bolus`` of 0).

:meth:`ControllerNode.plan` says, after a decision, what the controller plans and predicts as
a ``plan`` message (protocol 1.2) for a process that publishes it to monitors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..control.base import Controller, Decision, Forecast, Reading, check_rates
from ..control.supervisor import SafetyConfig, SafetySupervisor, SupervisedController
from ..errors import ConfigError
from ..protocol.messages import (MAX_PLAN_STAGES, MAX_TEXT_CHARS, WIRE_UNITS, Ack, Alarm,
                                 Bolus, Fallback, GetStatus, Measurement, Plan, PlanInput,
                                 PumpStatus, SetRate, _Message, wire_factor)

__all__ = ["PumpRoute", "ControllerNode"]


@dataclass(frozen=True)
class _Sent:
    """What a pump runs from *t_s*: a set_rate *command* at *rate* [amount/s] (as decided,
    or as the pump's ack says it applied it) until its lease ends, or (command None) the
    rate a pump status reported, until it says or takes otherwise."""

    command: SetRate | None
    t_s: float
    rate: float


@dataclass(frozen=True)
class PumpRoute:
    """Where the rate of one model input goes: pump id, drug concentration (input amount
    unit per mL), and the input's amount unit; *bolus*: the pump takes ``bolus`` commands.
    *fallback_ml_per_h* is every command's lease-end fallback (an insulin pump's programmed
    basal: a set_rate is then a temporary basal)."""

    input: str
    pump: str
    concentration: float
    amount_unit: str
    fallback_ml_per_h: float = 0.0
    bolus: bool = False


class ControllerNode:
    """Runs *controller* behind the safety supervisor and speaks the protocol to the pumps in
    *routes*.

    Parameters
    ----------
    controller : Controller
        Any controller kind; the node wraps it in a
        :class:`~mpc_dose.control.supervisor.SupervisedController`.
    routes : mapping of input name -> PumpRoute
    safety : SafetyConfig, optional
        The supervisor's limits and data rules. Without it: no data gate and no limits
        (only the check that every rate is finite and >= 0).
    lease_periods : float
        Each command's lease, in control periods (DESIGN: 2-3 periods).
    src : str
        This node's id in the messages it sends (and the prefix of its command ids).
    """

    def __init__(self, controller: Controller, routes: Mapping[str, PumpRoute], *,
                 safety: SafetyConfig | None = None, lease_periods: float = 3.0,
                 src: str = "controller") -> None:
        self.routes = dict(routes)
        self.safety = safety if safety is not None else SafetyConfig()
        self.controller = self._supervised(controller)
        self.lease_periods = lease_periods
        self.lease_s = lease_periods * controller.period_s
        self.src = src
        self.readings: dict[str, Reading] = {}
        self.last_decision: Decision | None = None
        self.acks: dict[str, Ack] = {}
        self.pump_status: dict[str, PumpStatus] = {}
        #: alarms received from the plant side (time, message)
        self.alarms: list[tuple[float, Alarm]] = []
        #: alarms this node raised (the supervisor's), as sent out by :meth:`tick`
        self.raised: list[tuple[float, Alarm]] = []
        self._commands = 0
        self._earlier_transitions: list[tuple[float, str, str, str]] = []
        self._alarms_seen = 0
        # ordering of sources: src -> epoch in force, retired epochs, origin of each reading
        self._epochs: dict[str, str] = {}
        self._retired: dict[str, set[str]] = {}
        self._origin: dict[str, tuple[str, str] | None] = {}
        # pump -> (last set_rate sent, when); pumps whose lease is left to run out
        self._sent: dict[str, _Sent] = {}
        self._lapsing: set[str] = set()
        # what the pumps do, as they report it: cmd_id -> (input, command, what the pump ran
        # before it) of the commands not yet answered
        self._unanswered: dict[str, tuple[str, SetRate, _Sent | None]] = {}
        # bolus cmd_id -> (input, time sent) of the boluses not yet answered
        self._boluses_sent: dict[str, tuple[str, float]] = {}
        #: (time [s], input, amount [input amount unit]) of every bolus a pump gave
        self.boluses: list[tuple[float, str, float]] = []

    def _supervised(self, controller: Controller) -> SupervisedController:
        missing = [name for name in controller.inputs if name not in self.routes]
        if missing:
            raise ConfigError(f"controller {controller.name!r} sets {', '.join(missing)} but "
                              f"no pump is configured for it")
        return SupervisedController(controller, SafetySupervisor(self.safety))

    @property
    def supervisor(self) -> SafetySupervisor:
        return self.controller.supervisor

    @property
    def transitions(self) -> list[tuple[float, str, str, str]]:
        """Every mode transition of the supervisor: (time [s], from, to, cause)."""
        return self._earlier_transitions + self.controller.supervisor.transitions

    def restart_controller(self, controller: Controller) -> None:
        """Run *controller* from now on, behind a new supervisor (a restarted plant: a new
        patient clock). The command counter goes on: command ids never repeat within this
        node's epoch (a pump bridge answers a repeated id with its cached ack)."""
        supervised = self._supervised(controller)
        self._earlier_transitions = self.transitions
        self.controller = supervised
        self.lease_s = self.lease_periods * controller.period_s
        self._alarms_seen = 0
        self.last_decision = None
        self._sent.clear()
        self._lapsing.clear()
        self._unanswered.clear()
        self._boluses_sent.clear()

    # ------------------------------------------------------------------ in
    def receive(self, message: _Message, now: float, *,
                origin: tuple[str, str] | None = None) -> list[_Message]:
        """Take in one message from the plant side; nothing is sent back.

        *origin* is the envelope's (src, epoch) (None in-process). A new epoch of a source
        (a restart) drops the readings received from its earlier epoch, so the restarted
        source's readings count even when its clock starts again from 0; messages from a
        retired epoch are ignored.
        """
        if origin is not None and not self._current(*origin):
            return []
        if isinstance(message, Measurement):
            previous = self.readings.get(message.var)
            # readings can arrive out of order (delays): keep the newest sample
            reading = Reading(message.var, message.value, message.unit, message.t_meas,
                              message.quality)
            if previous is None or message.t_meas >= previous.t_meas_s:
                self.readings[message.var] = reading
                self._origin[message.var] = origin
            # the supervisor passes usable ones to controllers that use every sample
            self.controller.observe(reading)
        elif isinstance(message, Ack):
            self.acks[message.cmd_id] = message
            if message.cmd_id in self._boluses_sent:
                self._bolus_answered(message)
            else:
                self._answered(message, now)
        elif isinstance(message, PumpStatus):
            self.pump_status[message.pump] = message
            self._pump_reports(message, now)
        elif isinstance(message, Alarm):
            self.alarms.append((now, message))
        return []

    # ------------------------------------------------------------------ what was delivered
    def _answered(self, ack: Ack, now: float) -> None:
        """An ack of one of our set_rate commands: the rate the pump applied (after its own
        rounding) is what the patient gets from now; a refused command leaves the pump doing
        what it did before (a command it took, until its lease ends, then its fallback; or
        what it last reported)."""
        sent = self._unanswered.pop(ack.cmd_id, None)
        if sent is None or ack.code == "duplicate":
            return
        name, command, before = sent
        route = self.routes[name]
        current = self._sent.get(route.pump)
        if current is None or current.command is not command:
            return  # a later command or status has superseded it
        if ack.ok:
            ml_per_h = command.rate if ack.applied_rate is None else \
                ack.applied_rate * wire_factor(ack.unit, "mL/h")
            self._sent[route.pump] = replace(current, rate=ml_per_h * route.concentration
                                             / 3600.0)
        elif before is None:
            del self._sent[route.pump]
        else:
            self._sent[route.pump] = before
        self._delivering(name, now, self._in_force(route, now)
                         if route.pump in self._sent else 0.0)

    def _bolus_answered(self, ack: Ack) -> None:
        """The answer to a bolus: given (once, whatever the retries) or refused - then the
        controller is told that nothing was given (it may have counted the bolus when it
        decided it)."""
        if not ack.ok or ack.applied_amount is None:
            if ack.code != "duplicate":
                name, t_s = self._boluses_sent.pop(ack.cmd_id)
                self.controller.given_bolus(t_s, name, 0.0)
            return
        name, t_s = self._boluses_sent.pop(ack.cmd_id)
        amount = ack.applied_amount * wire_factor(ack.amount_unit,
                                                  self.routes[name].amount_unit)
        self.boluses.append((t_s, name, amount))
        self.controller.given_bolus(t_s, name, amount)

    def _pump_reports(self, status: PumpStatus, now: float) -> None:
        """A pump's status is what it does now (its rate while infusing, else nothing), and
        what it does until it says or takes otherwise."""
        ml_per_h = status.rate * wire_factor(status.unit, "mL/h") \
            if status.state == "infusing" else 0.0
        for name, route in self.routes.items():
            if route.pump == status.pump:
                rate = ml_per_h * route.concentration / 3600.0
                self._sent[route.pump] = _Sent(None, now, rate)
                self._delivering(name, now, rate)

    def _delivering(self, name: str, t_s: float, rate: float) -> None:
        """Tell the controller (through the supervisor) when a pump does other than decided:
        its propagation and the dose windows follow what was delivered."""
        supervised = self.controller
        if name in supervised.inputs and \
                abs(rate - supervised.rates.get(name, 0.0)) > 1e-12 * max(1.0, abs(rate)):
            supervised.applied(t_s, {**supervised.rates, name: rate})

    def _current(self, src: str, epoch: str) -> bool:
        """Whether (src, epoch) is in force; a new epoch retires the old one and drops what
        was received from it."""
        known = self._epochs.get(src)
        if known == epoch:
            return True
        if epoch in self._retired.get(src, ()):
            return False
        if known is not None:
            self._retired.setdefault(src, set()).add(known)
            for var in [v for v, o in self._origin.items() if o is not None and o[0] == src]:
                del self.readings[var], self._origin[var]
        self._epochs[src] = epoch
        return True

    # ------------------------------------------------------------------ out
    def tick(self, now: float) -> list[_Message]:
        """One control cycle: decide behind the supervisor and send one leased command per
        input (or, while the data is unusable, a status request that lets the lease run
        out); the supervisor's new alarms follow as ``alarm`` messages."""
        return self.issue(now, self.controller.decide(now, dict(self.readings)))

    def issue(self, now: float, decision: Decision) -> list[_Message]:
        """The messages of a supervised *decision* taken at *now* (:meth:`tick`'s second
        half: a host that asks the controller elsewhere settles the decision with
        :meth:`SupervisedController.prepare` and ``settle``, then issues it here)."""
        supervised = self.controller
        rates = check_rates(decision.rates, supervised.inputs, supervised.name)
        lapse = supervised.measured is not None and not supervised.data_usable and \
            supervised.mode == "FALLBACK"
        # a pump's boluses go before its rate command (set_rate, or get_status): that command
        # closes the pump's control instant (in lock-step across processes the plant moves on
        # once every pump has it), so a bolus sent after it would be given an instant late
        out: list[_Message] = [self._bolus(self.routes[name], amount, now)
                               for name, amount in decision.boluses.items()]
        in_force = dict(rates)
        for name, rate in rates.items():
            route = self.routes[name]
            if lapse and route.pump in self._lapsing:
                current = self._in_force(route, now)
                if rate >= current - 1e-12 * max(1.0, current):
                    # no renewal: the lease runs out into the pump's own fallback
                    out.append(GetStatus(cmd_id=self._next_id(), pump=route.pump))
                    in_force[name] = current
                    continue
            out.append(self._set_rate(route, rate, now, lapse))
        reason = decision.reason
        if in_force != rates:
            supervised.applied(now, in_force)  # the pumps do this, not the decision
        if any(isinstance(m, GetStatus) for m in out):
            reason += "; no new command: the lease runs out into the pump's fallback"
        self.last_decision = replace(decision, t_s=now, rates=in_force, reason=reason)
        for t, code, text in supervised.alarms[self._alarms_seen:]:
            priority = "high" if code.startswith("data.") or supervised.mode != \
                "CLOSED_LOOP" else "medium"
            alarm = Alarm(code=code, priority=priority, kind="technical",
                          text=f"{self.src}: {text}")
            self.raised.append((t, alarm))
            out.append(alarm)
        self._alarms_seen = len(supervised.alarms)
        return out

    def plan(self, *, target: float | None = None,
             band: tuple[float, float] | None = None,
             deadline_misses: int | None = None) -> Plan | None:
        """The last decision as a ``plan`` message (None before the first): the controller's
        own plan over its horizon when it gives one (:meth:`Controller.forecast`, cut to
        :data:`MAX_PLAN_STAGES` stages), else the one stage it decided. *target* and *band*
        (in the measured output's unit) are the monitor's reference lines.

        Raises
        ------
        LocalProtocolError
            When an input's rate unit or a value cannot travel (the caller skips the plan).
        """
        decision = self.last_decision
        if decision is None:
            return None
        supervised = self.controller
        forecast: Forecast | None = None
        method = getattr(supervised.controller, "forecast", None)
        if callable(method):
            try:
                forecast = method(decision.t_s)
            except Exception:  # noqa: BLE001 - a display must never stop the dosing loop
                forecast = None
        measured = supervised.measured or ""
        reading = self.readings.get(measured)
        unit = reading.unit if reading is not None else None
        if forecast is not None:
            stages = min(MAX_PLAN_STAGES, *(len(r) for r in forecast.rates.values()))
            times = [forecast.t_s + k * forecast.period_s for k in range(stages + 1)]
            rates = {name: [max(0.0, float(r)) for r in forecast.rates[name][:stages]]
                     for name in supervised.inputs}
            predicted = [float(v) for v in forecast.predicted[:stages]]
            if forecast.unit in WIRE_UNITS["measurement"]:
                unit = forecast.unit
            elif unit is None or len(predicted) != stages:
                predicted = []  # a model unit no wire may carry: no prediction shown
        else:
            times = [decision.t_s, decision.t_s + supervised.period_s]
            rates = {name: [decision.rates[name]] for name in supervised.inputs}
            predicted = []
        if unit is None:
            target, band, predicted = None, None, []
        solve_s = decision.details.get("solve_time_s")
        return Plan(times_s=times, var=measured,
                    output=forecast.output if forecast is not None else measured,
                    unit=unit, predicted=predicted, target=target,
                    band_low=None if band is None else band[0],
                    band_high=None if band is None else band[1],
                    inputs=[PlanInput(input=name, pump=self.routes[name].pump,
                                      unit=f"{self.routes[name].amount_unit}/s",
                                      rates=rates[name],
                                      conc=self.routes[name].concentration)
                            for name in supervised.inputs],
                    mode=supervised.mode, status=decision.status,
                    reason=decision.reason[:MAX_TEXT_CHARS],
                    solve_s=float(solve_s) if isinstance(solve_s, (int, float)) else None,
                    deadline_misses=deadline_misses)

    def _next_id(self) -> str:
        self._commands += 1
        return f"{self.src}-{self._commands}"

    def _bolus(self, route: PumpRoute, amount: float, now: float) -> Bolus:
        if not route.bolus:
            raise ConfigError(f"controller {self.controller.name!r} gave a bolus of "
                              f"{route.input!r} but pump {route.pump!r} takes no bolus "
                              f"command (give it a max_bolus)")
        command = Bolus(cmd_id=self._next_id(), pump=route.pump, amount=amount,
                        unit=route.amount_unit, lease_s=self.controller.period_s,
                        volume=amount / route.concentration, vol_unit="mL")
        self._boluses_sent[command.cmd_id] = (route.input, now)
        while len(self._boluses_sent) > 256:  # never answered (lost): forget the oldest
            self._boluses_sent.pop(next(iter(self._boluses_sent)))
        return command

    def _set_rate(self, route: PumpRoute, rate: float, now: float, lapse: bool) -> SetRate:
        ml_per_h = rate * 3600.0 / route.concentration
        fallback_ml_per_h = route.fallback_ml_per_h
        if lapse:  # the pump's own fallback must not raise the dose either
            fallback_ml_per_h = min(fallback_ml_per_h, ml_per_h)
            self._lapsing.add(route.pump)
        else:
            self._lapsing.discard(route.pump)
        command = SetRate(
            cmd_id=self._next_id(), pump=route.pump, rate=ml_per_h, unit="mL/h",
            lease_s=self.lease_s,
            fallback=(Fallback(action="preset_rate", rate=fallback_ml_per_h)
                      if fallback_ml_per_h > 0 else Fallback()),
            dose_rate=rate, dose_unit=f"{route.amount_unit}/s")
        self._unanswered[command.cmd_id] = (route.input, command, self._sent.get(route.pump))
        self._sent[route.pump] = _Sent(command, now, rate)
        while len(self._unanswered) > 256:  # never answered (lost): forget the oldest
            self._unanswered.pop(next(iter(self._unanswered)))
        return command

    def _in_force(self, route: PumpRoute, now: float) -> float:
        """The rate [amount/s] the pump runs at *now* without a new command: the last
        command's (as the pump applied it) until its lease ends, then its fallback."""
        sent = self._sent[route.pump]
        if sent.command is None or now < sent.t_s + sent.command.lease_s:
            return sent.rate
        return sent.command.fallback.rate * wire_factor(sent.command.fallback.unit, "mL/h") \
            * route.concentration / 3600.0

    @property
    def commanded(self) -> dict[str, float]:
        """The rates in force after the last decision [amount/s] (NaN before the first)."""
        if self.last_decision is None:
            return {name: math.nan for name in self.controller.inputs}
        return dict(self.last_decision.rates)
