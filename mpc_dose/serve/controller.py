"""``mpc-dose serve controller``: the controller node of one or more patients as a process.

It subscribes to each plant's telemetry, keeps the latest readings, and at each control
instant sends one leased ``set_rate`` per pump over a DEALER socket, waiting for each ack
(bounded retries; a missing ack is "unknown", never "applied"). In simulated time the plant's
``tick`` heartbeat is the instant; in real time the controller's own clock is, and the plant
heartbeats only prove liveness.

With *sensors* (``serve controller --sensor ADDRESS``, repeatable) a patient's readings may
also come from further telemetry publishers: a sensor bridge, an SDC bridge, a pump bridge's
telemetry (its pump status and alarms). They are read by a second subscriber, apart from the
plant's: their messages go to the node (ordered per sender and epoch, as every source's) and
to the audit log, but never set the patient's clock, count as the plant's restarts or keep
its link alive. A real patient has no simulated plant (``plant_commands`` None, real time):
the primary telemetry is then a device bridge's, the clock is UTC (what the bridges stamp
``t_meas`` with) and known from that bridge's first message; no ``tick`` is needed, since in
real time the instants are the controller's own.

Several patients share one process (the load case: one controller for 100 virtual patients):
each has its own node, sockets and epoch.

The node runs its controller behind the safety supervisor; its alarms and mode transitions
go to the audit log (``alarm``, ``mode``). A plant that restarts (a new epoch on its
telemetry) is greeted again: the controller re-sends ``hello`` to its command endpoint about
once a second until it answers (a restarted ``serve plant`` waits for it), takes the new
plant's clock, drops the readings of the old epoch and, when the new clock is behind the old
one (a restarted simulated plant starts at t = 0), rebuilds that patient's controller from
the scenario (the command ids go on: they never repeat within this process's epoch).

With *publish* (``serve controller --publish ADDRESS``) it is also a telemetry publisher
for monitors: after each decision a ``plan`` (protocol 1.2: the plan over the horizon, the
prediction, the target band from the scenario's ``[metrics]``, the mode, the deadline
misses so far), the supervisor's alarms and a ``heartbeat`` whose state is the mode.
Publishing never blocks and never stops the loop: a plan that cannot be encoded is
skipped and noted once in the audit log (``plan_not_published``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from ..audit import AuditLog
from ..errors import ConfigError
from ..node import ControllerNode
from ..protocol.codec import Envelope
from ..protocol.messages import Alarm, Heartbeat, Hello, ProtocolError
from ..protocol.session import LinkSession
from ..scenario.schema import Scenario
from ..trial.build import build_setup
from ..trial.closed_loop import PlantSide
from ..transport.zmq_link import (Authenticator, CommandClient, Keys, Telemetry,
                                  TelemetryReader, new_epoch)

__all__ = ["ControllerProcess", "PatientLink", "serve_controller"]


@dataclass
class PatientLink:
    """One patient's controller node with its sockets."""

    node: ControllerNode
    telemetry: TelemetryReader
    clients: dict[str, CommandClient]           # pump -> client
    plant: CommandClient | None = None          # the plant's command endpoint (hello)
    #: (patient index (0-based), seed): what a rebuilt controller is built from
    patient: tuple[int, int] = (0, 0)
    session: LinkSession = field(default_factory=LinkSession)
    finished: bool = False
    cycle_s: list[float] = field(default_factory=list)
    missed_acks: int = 0
    #: per cycle: seconds from the due instant until this patient's acks were in
    latency_s: list[float] = field(default_factory=list)
    #: the plant's clock minus ours (monotonic), from its latest t_sim; readings carry the
    #: plant's time, so decisions must too. None: no simulated clock (real sensors: UTC)
    clock_offset_s: float | None = None
    #: the latest plant time heard (t_sim) in the plant's current epoch
    last_t_sim: float | None = None
    #: whether the plant's clock is known: a message from its running clock was heard
    #: (with t_sim: that clock; without: UTC). No decision before: its time would be a guess
    clock_known: bool = False
    #: plant epochs heard before the current one (their late messages are ignored)
    retired_epochs: set[str] = field(default_factory=set)
    #: monotonic time of the last hello re-sent to a restarted plant
    hello_s: float | None = None
    #: how many of the node's mode transitions are in the audit log
    modes_logged: int = 0
    #: further telemetry (``--sensor``: sensor, SDC and pump bridges); never the clock
    sensors: TelemetryReader | None = None
    #: per further source (src): the epochs it has had; a src whose earlier epoch speaks
    #: again is two publishers under one name (noted once: the node keeps only one)
    sensor_epochs: dict[str, list[str]] = field(default_factory=dict)
    sensor_clash_noted: set[str] = field(default_factory=set)

    def now(self) -> float:
        """This patient's time: the plant's clock, or UTC for real devices."""
        if self.clock_offset_s is None:
            return time.time()
        return time.monotonic() + self.clock_offset_s


class ControllerProcess:
    """Controller nodes for patients of *scenario*, each talking to its plant at
    ``telemetry[k]`` and to its pumps at ``pumps[k][pump]``; ``sensors[k]``: the further
    telemetry addresses of patient *k* (module docstring); ``plant_commands[k]`` None: no
    simulated plant to greet (a real patient, or pumps all behind bridges)."""

    def __init__(self, scenario: Scenario, patients: list[tuple[int, int]],
                 telemetry: list[str], pumps: list[dict[str, str]], *,
                 plant_commands: list[str | None] | None = None,
                 sensors: list[list[str]] | None = None,
                 audit: str | Path | None = None, keys: Keys | None = None,
                 ack_timeout_s: float = 1.0, retries: int = 2,
                 publish: str | None = None) -> None:
        self.context = zmq.Context()
        # every patient's sockets (a telemetry SUB, a DEALER per command endpoint) in one
        # context: zmq's default of 1023 sockets stops a ward at a few hundred patients
        self.context.set(zmq.MAX_SOCKETS, max(1024, 4 * len(patients) + 64))
        self.log = None
        self.publisher: Telemetry | None = None
        self.auth: Authenticator | None = None
        self.links: list[PatientLink] = []
        try:
            self._open(scenario, patients, telemetry, pumps, plant_commands, sensors, audit,
                       keys, ack_timeout_s, retries)
            if publish is not None:
                self._publisher(publish, keys)
        except BaseException:
            # a bad address or scenario: nothing is left to the garbage collector, whose
            # collection of a context with open sockets hangs in zmq_ctx_term
            self.close()
            raise
        self.period_s = self.links[0].node.controller.period_s if self.links else 1.0
        self.sweeps_s: list[float] = []
        self.missed_deadlines = 0
        #: True once the process has stopped commanding (deadline misses)
        self.fallback = False

    def _open(self, scenario, patients, telemetry, pumps, plant_commands, sensors, audit,
              keys, ack_timeout_s, retries) -> None:
        """The patients' nodes, their telemetry readers and pump clients (__init__'s work,
        apart so that a failure can close what was opened)."""
        self.scenario = scenario
        self.ack_timeout_s, self.retries = ack_timeout_s, retries
        self.epoch = new_epoch()
        plant_commands = plant_commands or [None] * len(patients)
        sensors = sensors or [[] for _ in patients]
        if len(sensors) != len(patients):
            raise ConfigError(f"sensors: {len(sensors)} list(s) of further telemetry "
                              f"addresses for {len(patients)} patient(s); expected one each")
        for tel, further in zip(telemetry, sensors):
            _check_sensors(tel, further)
        self.log = AuditLog(audit, "controller") if audit else None
        parts = self._controllers(scenario, patients)
        for (index, seed), tel, routes, plant_cmd, further, part in zip(
                patients, telemetry, pumps, plant_commands, sensors, parts):
            controller, plant_routes, safety, lease_periods = part
            node = ControllerNode(controller, plant_routes, safety=safety,
                                  lease_periods=lease_periods, src=f"controller-{index + 1}")
            clients = {}
            by_address: dict[str, CommandClient] = {}
            for pump, address in routes.items():
                if address not in by_address:
                    by_address[address] = self._client(address, node.src, keys)
                clients[pump] = by_address[address]
            reader = TelemetryReader(self.context, [tel], keys=keys)
            plant = by_address.get(plant_cmd) if plant_cmd else None
            if plant_cmd and plant is None:
                plant = self._client(plant_cmd, node.src, keys)
            link = self.link_class(node, reader, clients, plant, (index, seed))
            if further:
                link.sensors = TelemetryReader(self.context, list(further), keys=keys)
            self.links.append(link)

    #: the per-patient record a subclass may extend
    link_class = PatientLink

    def _controllers(self, scenario: Scenario, patients: list[tuple[int, int]]) -> list[tuple]:
        """Each patient's (controller, pump routes, safety config, lease periods), built here
        in this process (a host with worker processes builds them there)."""
        parts = []
        for index, seed in patients:
            setup, _ = build_setup(scenario, index, seed)
            parts.append((setup.controller, PlantSide.routes_for(setup), setup.safety,
                          setup.lease_periods))
        return parts

    def _rebuilt(self, link: PatientLink):
        """A fresh controller for *link*'s patient (its plant restarted from t = 0)."""
        index, seed = link.patient
        setup, _ = build_setup(self.scenario, index, seed)
        return setup.controller

    def _publisher(self, address: str, keys: Keys | None) -> None:
        """The monitors' telemetry: a PUB (a CURVE server with *keys*: it needs the
        monitors' public keys in ``keys.clients``)."""
        if keys is not None:
            self.auth = Authenticator(self.context, keys.clients)
        src = self.links[0].node.src if len(self.links) == 1 else "controller"
        self.publisher = Telemetry(self.context, address, src=src, epoch=self.epoch,
                                   keys=keys)
        metrics = self.scenario.metrics
        self._target = self._band = None
        if metrics is not None and metrics.target is not None:
            self._target = float(metrics.target)
            low, high = metrics.window if metrics.window is not None else \
                (0.95 * self._target, 1.05 * self._target)  # the metrics' own default
            self._band = (float(low), float(high))
        self._plan_noted = False

    def _publish(self, link: PatientLink, t: float, alarms: list[Alarm]) -> None:
        """A decision's plan, alarms and heartbeat to the monitors (never blocks)."""
        pub = self.publisher
        if pub is None:
            return
        for alarm in alarms:
            pub.send(alarm, t_sim=t)
        try:
            plan = link.node.plan(target=self._target, band=self._band,
                                  deadline_misses=self.missed_deadlines)
        except ProtocolError as err:
            plan = None
            if self.log is not None and not self._plan_noted:
                self.log.note("plan_not_published", t, patient=link.node.src, error=str(err))
            self._plan_noted = True
        if plan is not None:
            pub.send(plan, t_sim=t)
        pub.send(Heartbeat(role="controller", state=link.node.controller.mode,
                           period_s=self.period_s), t_sim=t)

    def _client(self, address: str, src: str, keys: Keys | None) -> CommandClient:
        client = CommandClient(self.context, address, src=src, epoch=self.epoch, keys=keys)
        if self.log is not None:  # every frame out (retries too) recorded before it leaves
            client.on_send = lambda envelope: self.log.message("out", envelope)
        return client

    def _record(self, direction: str, envelope: Envelope) -> None:
        if self.log is not None:
            self.log.message(direction, envelope)

    def connect(self, wait_s: float = 30.0) -> None:
        """Hello to every pump endpoint once the plant's telemetry is heard (the
        subscription is then live), then a status snapshot before any command (B11)."""
        deadline = time.monotonic() + wait_s
        for link in self.links:
            link.session.fire("connect", time.monotonic(), "start")
            heard = False
            while not heard:
                if time.monotonic() > deadline:
                    raise TimeoutError("serve controller: plant telemetry not heard within "
                                       f"{wait_s} s")
                for _ in link.telemetry.drain(0.05):
                    heard = True
            endpoints = list(link.clients.values()) + ([link.plant] if link.plant else [])
            for client in {id(c): c for c in endpoints}.values():
                ack = None
                while ack is None and time.monotonic() < deadline:
                    client.send(Hello(role="controller"))
                    if client.sock.poll(200):
                        ack = next(iter(client.receive()), None)
                if ack is None:
                    raise TimeoutError("serve controller: no hello answer from a pump "
                                       "endpoint")
            link.session.fire("hello_ack", time.monotonic(), "hello answered")
            link.session.fire("snapshot", time.monotonic(), "plant heard")

    def handle_telemetry(self, link: PatientLink, timeout_s: float = 0.0) -> list[float]:
        """Take in the waiting telemetry; returns the tick instants it contained."""
        ticks = []
        for envelope in link.telemetry.drain(timeout_s):
            if envelope.epoch in link.retired_epochs:
                continue  # a late message of a plant process that is gone
            previous = link.session.peer_epoch
            before = link.session.state
            link.session.heard(time.monotonic(), envelope.epoch)
            self._log_link(link, before)
            if previous is not None and envelope.epoch != previous:
                link.retired_epochs.add(previous)
                self._plant_restarted(link, envelope)
            message = envelope.message
            waiting = isinstance(message, Heartbeat) and message.state == "waiting"
            link.clock_known = link.clock_known or not waiting
            if envelope.t_sim is not None and not waiting:
                # every envelope carries the plant's time of sending (a delayed reading
                # too: its sample time is in the reading): the latest sets the clock, so
                # the first readings are not judged by another clock (not the heartbeats
                # of a plant waiting for its hello: its clock is not running yet)
                offset = envelope.t_sim - time.monotonic()
                link.clock_offset_s = offset if link.clock_offset_s is None else \
                    max(link.clock_offset_s, offset)
            if envelope.t_sim is not None:
                link.last_t_sim = envelope.t_sim if link.last_t_sim is None else \
                    max(link.last_t_sim, envelope.t_sim)
            if isinstance(message, Heartbeat):
                if message.state == "tick" and envelope.t_sim is not None:
                    ticks.append(envelope.t_sim)
                elif message.state == "finished":
                    link.finished = True
                continue
            self._record("in", envelope)
            # a message without the plant's time (a device bridge's) is taken at the
            # patient's own clock: UTC without a plant, as the bridges' t_meas
            link.node.receive(message, envelope.t_sim if envelope.t_sim is not None
                              else link.now(), origin=(envelope.src, envelope.epoch))
        self.handle_sensors(link)
        return ticks

    def handle_sensors(self, link: PatientLink, timeout_s: float = 0.0) -> None:
        """Take in the further telemetry (``--sensor``): readings, alarms and pump status
        for the node and the audit log; heartbeats only prove the bridge alive (a silent
        bridge's readings go stale, and the supervisor's staleness rule acts)."""
        if link.sensors is None:
            return
        for envelope in link.sensors.drain(timeout_s):
            self._sensor_epoch(link, envelope)
            message = envelope.message
            if isinstance(message, Heartbeat):
                continue
            self._record("in", envelope)
            # a pump bridge's status after a command carries that command's time (ours);
            # everything else is taken at the patient's clock
            link.node.receive(message, envelope.t_sim if envelope.t_sim is not None
                              else link.now(), origin=(envelope.src, envelope.epoch))

    def _sensor_epoch(self, link: PatientLink, envelope: Envelope) -> None:
        """Note once when two live publishers share one src (the node would keep only the
        newer epoch's messages: each source needs its own ``src``)."""
        epochs = link.sensor_epochs.setdefault(envelope.src, [])
        if not epochs or epochs[-1] != envelope.epoch:
            if envelope.epoch in epochs and envelope.src not in link.sensor_clash_noted:
                link.sensor_clash_noted.add(envelope.src)
                if self.log is not None:
                    self.log.note("sensor_src_clash", None, patient=link.node.src,
                                  src=envelope.src, epochs=sorted(set(epochs)),
                                  cause="two publishers send as one src; give each bridge "
                                        "its own ([bridge] src)")
            if envelope.epoch not in epochs:
                epochs.append(envelope.epoch)
            else:
                epochs.remove(envelope.epoch)
                epochs.append(envelope.epoch)

    def _plant_restarted(self, link: PatientLink, envelope: Envelope) -> None:
        """A new plant epoch: its clock from now on; a fresh controller when that clock is
        behind the old one (a restarted simulation starts again at t = 0)."""
        old_t = link.last_t_sim
        link.clock_offset_s, link.last_t_sim, link.clock_known = None, None, False
        link.hello_s, link.finished = None, False
        if self.log is not None:
            self.log.note("plant_restart", envelope.t_sim, patient=link.node.src,
                          epoch=envelope.epoch)
        if old_t is not None and envelope.t_sim is not None and envelope.t_sim < old_t:
            link.node.restart_controller(self._rebuilt(link))
            if self.log is not None:
                self.log.note("controller_restart", envelope.t_sim, patient=link.node.src,
                              cause=f"the plant's clock went back from {old_t:g} s to "
                                    f"{envelope.t_sim:g} s (new epoch {envelope.epoch})")

    def rejoin(self, link: PatientLink) -> None:
        """While the plant link is in SNAPSHOT (a new plant epoch), say hello to the plant's
        command endpoint about once a second, never blocking; its answer makes the link
        READY (a restarted ``serve plant`` starts only after a hello)."""
        if link.plant is None or link.session.state != "SNAPSHOT":
            return
        now = time.monotonic()
        if link.hello_s is None or now - link.hello_s >= 1.0:
            link.plant.send(Hello(role="controller"))
            link.hello_s = now
        for envelope in link.plant.receive():
            if isinstance(envelope.message, Hello):
                self._hello_answered(link)
            else:
                link.plant.inbox.append(envelope)

    def _hello_answered(self, link: PatientLink) -> None:
        before = link.session.state
        link.session.fire("snapshot", time.monotonic(), "the restarted plant answered hello")
        self._log_link(link, before)

    def _log_link(self, link: PatientLink, before: str) -> None:
        state = link.session.state
        if state != before and self.log is not None:
            self.log.note("link", None, patient=link.node.src, source=before, target=state,
                          cause=link.session.transitions[-1].cause)

    def cycle(self, link: PatientLink, t: float) -> None:
        """One control instant: decide, send each command and wait for its ack; the
        supervisor's alarms and mode changes go to the audit log."""
        start = time.perf_counter()
        alarms = []
        for command in link.node.tick(t):
            if isinstance(command, Alarm):  # not a command: recorded (and published)
                alarms.append(command)
                if self.log is not None:
                    self.log.note("alarm", t, patient=link.node.src, alarm=command.body())
                continue
            client = link.clients[command.pump]
            ack = client.request(command, t_sim=t, timeout_s=self.ack_timeout_s,
                                 retries=self.retries)
            if ack is None:
                link.missed_acks += 1
                if self.log is not None:
                    self.log.note("ack_missing", t, cmd_id=command.cmd_id, pump=command.pump)
                continue
            link.node.receive(ack, t)
            if self.log is not None:
                self.log.note("ack", t, **ack.body())
        # other answers (a status snapshot after get_status) for the node; the command
        # socket's sender is not the telemetry's, so they carry no origin
        for client in {id(c): c for c in link.clients.values()}.values():
            for envelope in client.inbox:
                if isinstance(envelope.message, Hello):  # a late answer to a re-sent hello
                    self._hello_answered(link)
                else:
                    link.node.receive(envelope.message, t)
            client.inbox.clear()
        transitions = link.node.transitions
        for t_mode, source, target, cause in transitions[link.modes_logged:]:
            if self.log is not None:
                self.log.note("mode", t_mode, patient=link.node.src, source=source,
                              target=target, cause=cause)
        link.modes_logged = len(transitions)
        link.cycle_s.append(time.perf_counter() - start)
        self._publish(link, t, alarms)

    def run_simulated(self, idle_timeout_s: float = 30.0) -> None:
        """Lock-step: act on each plant tick until every plant has finished."""
        last = time.monotonic()
        poller = zmq.Poller()
        for link in self.links:
            poller.register(link.telemetry.sock, zmq.POLLIN)
            if link.sensors is not None:
                poller.register(link.sensors.sock, zmq.POLLIN)
        while not all(link.finished for link in self.links):
            for link in self.links:
                self.rejoin(link)
            if not poller.poll(100):
                if time.monotonic() - last > idle_timeout_s:
                    raise TimeoutError(f"serve controller: plants silent for "
                                       f"{idle_timeout_s} s")
                continue
            last = time.monotonic()
            for link in self.links:
                for t in self.handle_telemetry(link):
                    self.cycle(link, t)

    def commandable(self, link: PatientLink, fallback: bool) -> bool:
        """At a real-time instant: the patient's telemetry taken in, a restarted plant
        greeted, its link checked (and logged); whether it may be commanded now - not with
        the link LOST (B10), the process in *fallback* (B12) or its clock unknown."""
        self.handle_telemetry(link)
        self.rejoin(link)
        before = link.session.state
        state = link.session.check(time.monotonic())
        self._log_link(link, before)
        return not (state == "LOST" or fallback or not link.clock_known)

    def run_realtime(self, duration_s: float, *, max_missed: int = 2) -> None:
        """Own clock: a cycle every period for *duration_s* (wall seconds).

        Each sweep over the patients is timed from its due instant (:attr:`sweeps_s`); a
        sweep that ends after the next due instant is a missed deadline. After *max_missed*
        misses in a row the process stops commanding (B12): the pumps' leases run out and
        their fallbacks take over - a lease is never stretched to cover an overrun. A
        patient whose plant falls silent (3 missed heartbeats) gets no more commands until
        it is heard again (B10).
        """
        start = time.monotonic()
        k, in_a_row = 0, 0
        while not all(link.finished for link in self.links):
            due = start + k * self.period_s
            if due - start > duration_s:
                break
            while (left := due - time.monotonic()) > 0:
                for link in self.links:
                    self.handle_telemetry(link, min(left, 0.01) / len(self.links))
            for link in self.links:
                if not self.commandable(link, self.fallback):
                    continue  # no command: the pump side's lease and fallback act
                self.cycle(link, link.now())
                link.latency_s.append(time.monotonic() - due)
            self.sweeps_s.append(time.monotonic() - due)
            late = self.sweeps_s[-1] > self.period_s
            # instants that passed during an overrun are skipped (never run late in a
            # burst) and each counts as missed
            skipped = max(0, int((time.monotonic() - start) // self.period_s) - k)
            self.missed_deadlines += late + max(0, skipped - 1)
            in_a_row = in_a_row + 1 if late else 0
            if in_a_row >= max_missed and not self.fallback:
                self.fallback = True
                if self.log is not None:
                    self.log.note("mode", None, source="CLOSED_LOOP", target="FALLBACK",
                                  cause=f"{in_a_row} control deadlines missed in a row")
            k = max(k + 1, int((time.monotonic() - start) // self.period_s) + 1)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.auth is not None:
            self.auth.stop()
        self.context.destroy(linger=0)


def _check_sensors(telemetry: str, sensors: list[str]) -> None:
    """Further telemetry addresses: each once, and not the primary one (a publisher
    subscribed twice would deliver every message twice)."""
    seen = {telemetry}
    for address in sensors:
        if not isinstance(address, str) or not address:
            raise ConfigError(f"--sensor {address!r}: expected a telemetry address "
                              f"(tcp://HOST:PORT)")
        if address in seen:
            raise ConfigError(f"--sensor {address!r}: given twice (or it is the patient's "
                              f"--telemetry {telemetry!r}); each address once")
        seen.add(address)


def serve_controller(scenario: Scenario, patients: list[tuple[int, int]],
                     telemetry: list[str], pumps: list[dict[str, str]], *,
                     plant_commands: list[str | None] | None = None,
                     sensors: list[list[str]] | None = None, realtime: bool = False,
                     duration_s: float | None = None,
                     audit: str | Path | None = None, keys: Keys | None = None,
                     wait_s: float = 30.0, publish: str | None = None) -> ControllerProcess:
    return run_to_end(ControllerProcess(scenario, patients, telemetry, pumps,
                                        plant_commands=plant_commands, sensors=sensors,
                                        audit=audit, keys=keys, publish=publish),
                      wait_s, realtime, duration_s)


def run_to_end(process: ControllerProcess, wait_s: float, realtime: bool,
               duration_s: float | None) -> ControllerProcess:
    """Connect *process* (or its subclass), run it (lock-step, or real time for
    *duration_s*, the scenario's duration when None) and close it."""
    try:
        process.connect(wait_s)
        if realtime:
            process.run_realtime(duration_s if duration_s is not None
                                 else process.scenario.scenario.duration_s)
        else:
            process.run_simulated()
    finally:
        process.close()
    return process
