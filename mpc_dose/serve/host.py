"""``mpc-dose serve controller --workers N``: one host for many patients' loops.

The host's process keeps all the ZeroMQ I/O and each patient's controller node (the protocol,
the leases and the safety supervisor: sans-I/O, as in :class:`~mpc_dose.serve.controller.
ControllerProcess`); the controllers themselves run in a pool of worker processes
(:mod:`mpc_dose.serve.pool`), each patient pinned to one worker. One event loop polls every
plant's telemetry, every command socket and every worker's pipe, so nothing waits on one
patient: a decision is asked of the worker, the other patients are served meanwhile, and the
commands go out (and their acks are awaited, with bounded retries) when it comes.

**Time budget.** Every decision is asked with a budget (``solve_budget_s``, below the
period: by default half of it in real time). A decision not back within it is abandoned:
the supervisor settles that instant as a failed decision (``solver_timeout``) with the
backup the host keeps for the patient - the last plan its controller made, shifted to the
instant (:meth:`~mpc_dose.control.base.Forecast.shifted`) - and so sends that shifted
plan or, when there is none (a controller that does not plan ahead, or a plan that no
longer covers the instant), its usual fallback, with an alarm. The reason is in the
decision's note and in the audit log (``solve_abandoned``); the late answer, when it
comes, is discarded and logged (``late_answer_discarded``). A patient is never left without
a command because its solve ran long: the budget ends before the next instant, and the
lease (several periods) covers the rest.

**A worker that dies.** Its patients' controllers are gone with it (an NMPC's estimate
cannot be rebuilt from nothing safely): from then on each of their instants is a failed
decision ``controller_lost`` without a backup, so the supervisor sends its fallback and
raises ``controller.lost``; the audit log notes ``worker_lost``; the other patients go on.

**Staggered starts.** Patients inducted at the same instant would all ask for their first
(cold, slowest) solve at once. In real time each patient's control instants keep a phase of
``stagger_s * k / n`` after the host's start (patient *k* of *n*; by default spread over one
period), so the first solves - and every later round - come spread over the period instead
of in one burst, and a patient's latency is its own solve, not the queue of everyone's. In
simulated (lock-step) time the plants set the instants; nothing is staggered.

Deadlines (real time): an instant whose commands are not all acknowledged (or given up)
before the patient's next instant is a missed deadline, as is an instant that passes while
the patient's previous decision is still out. After ``max_missed`` misses in a row the host
stops commanding that patient (B12): its leases run out into the pumps' fallbacks.
"""

from __future__ import annotations

import csv
import heapq
import itertools
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from ..control.base import Decision
from ..control.supervisor import PendingDecision
from ..errors import ConfigError
from ..protocol.codec import Envelope
from ..protocol.messages import Ack, Alarm, Hello
from ..scenario.schema import Scenario
from ..transport.zmq_link import CommandClient, Keys
from .controller import ControllerProcess, PatientLink, run_to_end
from .pool import RemoteController, Request, Worker, WorkerPool

__all__ = ["ControllerHost", "HostedLink", "Ward", "read_ward", "serve_host",
           "default_workers"]


@dataclass(frozen=True)
class Ward:
    """The patients one host serves: for each, (patient index (0-based), seed), its plant's
    telemetry and command addresses (None: no simulated plant), where each pump's commands
    go, and the further telemetry addresses it follows (sensor and pump bridges)."""

    patients: list[tuple[int, int]]
    telemetry: list[str]
    commands: list[str | None]
    pumps: list[dict[str, str]]
    sensors: list[list[str]] = field(default_factory=list)


def read_ward(path: str | Path, scenario: Scenario, seed: int | None = None) -> Ward:
    """A ward file: CSV with a header ``patient,seed,telemetry,commands`` and optionally a
    ``pump:NAME`` column per pump behind a bridge (its command address; empty: the plant's)
    and a ``sensors`` column (further telemetry addresses, separated by spaces: sensor
    bridges, a pump bridge's telemetry). *patient* counts from 1; an empty or missing *seed*
    is *seed* (the scenario's when None). An empty *commands* is a patient without a
    simulated plant (a real one): then every pump needs its ``pump:NAME`` address.

    Raises
    ------
    ConfigError
        Naming the file, the row and the field.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
            columns = rows and list(rows[0]) or []
    except OSError as err:
        raise ConfigError(f"--ward {str(path)!r}: cannot read it ({err.strerror})") from None
    missing = [c for c in ("patient", "telemetry", "commands") if c not in columns]
    if not rows or missing:
        raise ConfigError(f"--ward {str(path)!r}: expected a CSV header with patient, "
                          f"telemetry, commands (optional: seed, pump:NAME) and one row per "
                          f"patient" + (f"; missing {', '.join(missing)}" if missing else ""))
    names = {p.pump for p in scenario.pump}
    unknown = [c for c in columns if c.startswith("pump:") and c[5:] not in names]
    extra = [c for c in columns if c not in ("patient", "seed", "telemetry", "commands",
                                             "sensors") and not c.startswith("pump:")]
    if unknown or extra:
        raise ConfigError(f"--ward {str(path)!r}: unknown column(s) {unknown + extra}; "
                          f"pumps of the scenario: {', '.join(sorted(names))}")
    default_seed = scenario.scenario.seed if seed is None else seed
    ward = Ward([], [], [], [])
    for line, row in enumerate(rows, start=2):
        where = f"--ward {str(path)!r} line {line}"

        def whole(field: str, minimum: int) -> int:
            text = (row.get(field) or "").strip()
            try:
                value = int(text)
            except ValueError:
                value = None
            if value is None or value < minimum:
                raise ConfigError(f"{where}: {field} = {text!r}: expected a whole number "
                                  f">= {minimum}")
            return value
        patient = whole("patient", 1)
        seed_k = whole("seed", 0) if (row.get("seed") or "").strip() else default_seed
        if not (row.get("telemetry") or "").strip():
            raise ConfigError(f"{where}: telemetry is empty: expected an address "
                              f"(tcp://HOST:PORT)")
        commands = (row.get("commands") or "").strip() or None
        routes = {name: commands for name in names} if commands else {}
        routes.update({c[5:]: row[c].strip() for c in columns
                       if c.startswith("pump:") and (row.get(c) or "").strip()})
        unrouted = sorted(names - set(routes))
        if unrouted:
            raise ConfigError(f"{where}: commands is empty (no simulated plant) but pump(s) "
                              f"{', '.join(unrouted)} have no pump:NAME address; expected "
                              f"the plant's commands address or each pump's bridge")
        ward.patients.append((patient - 1, seed_k))
        ward.telemetry.append(row["telemetry"].strip())
        ward.commands.append(commands)
        ward.pumps.append(routes)
        ward.sensors.append((row.get("sensors") or "").split())
    return ward


def default_workers(patients: int) -> int:
    """The CPU count (what this process may use), at most one per patient."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, patients))


@dataclass(eq=False)
class _Outstanding:
    """A command sent and not yet acknowledged."""

    command: object
    client: CommandClient
    attempts: int = 0


@dataclass(eq=False)
class _Cycle:
    """One control instant of one patient, from asking its controller to the last ack."""

    t: float                          # the patient's clock [s]
    due: float | None                 # monotonic instant it was due (real time)
    started: float                    # monotonic
    pending: PendingDecision
    request: Request | None = None
    decision: Decision | None = None
    acks: dict[str, _Outstanding] = field(default_factory=dict)


@dataclass(eq=False)
class HostedLink(PatientLink):
    """A patient's link in the host: its node and sockets, and where its cycle is."""

    key: int = 0
    #: seconds after the host's start of this patient's first instant (real time)
    phase_s: float = 0.0
    #: monotonic instant of the next control instant (real time)
    due: float = math.inf
    #: its number (real time: instant k is due at start + phase + k * period)
    due_k: int = 0
    cycle: _Cycle | None = None
    #: lock-step ticks heard and not yet acted on
    ticks: deque = field(default_factory=deque)
    #: answers on the command sockets that came while the controller was deciding
    held: list = field(default_factory=list)
    misses_in_row: int = 0
    #: the host stopped commanding this patient (missed deadlines in a row)
    fallback: bool = False
    #: the time of the last instant acted on (answers outside a cycle are taken at it)
    last_t: float | None = None
    abandoned: int = 0
    late_discarded: int = 0


class ControllerHost(ControllerProcess):
    """:class:`ControllerProcess` with the controllers in *workers* worker processes, a
    time budget per decision and staggered control instants (module docstring).

    Parameters
    ----------
    workers : int, optional
        Worker processes (default: the CPU count, at most one per patient).
    solve_budget_s : float, optional
        Seconds a decision may take before it is abandoned; below every patient's period.
        Default: half the period in real time (:meth:`run_realtime`), none in lock-step
        (:meth:`run_simulated`: the plant waits, and the run reproduces the in-process one).
    stagger_s : float, optional
        Spread of the patients' control instants in real time [s], from 0 (all at once) to
        the period (the default: evenly over one period).
    """

    link_class = HostedLink
    #: deadlines missed in a row before the host stops commanding a patient (B12)
    max_missed = 2

    def __init__(self, scenario: Scenario, patients: list[tuple[int, int]],
                 telemetry: list[str], pumps: list[dict[str, str]], *,
                 workers: int | None = None, solve_budget_s: float | None = None,
                 stagger_s: float | None = None, **kwargs) -> None:
        self.pool: WorkerPool | None = None
        self.n_workers = default_workers(len(patients)) if workers is None else workers
        self.solve_budget_s = solve_budget_s
        self.stagger_s = stagger_s
        super().__init__(scenario, patients, telemetry, pumps, **kwargs)
        for key, link in enumerate(self.links):
            link.key = key
        #: every instant that missed its deadline (real time), all patients
        self.missed_deadlines = 0
        self._timers: list[tuple] = []
        self._seq = itertools.count()
        self._requests: dict[int, tuple[HostedLink, Request]] = {}
        self._by_socket: dict[zmq.Socket, tuple[str, object]] = {}
        self.poller = zmq.Poller()

    # ------------------------------------------------------------------ set-up
    def _controllers(self, scenario, patients):
        self.pool = WorkerPool(scenario, self.n_workers)
        controllers = self.pool.build(patients)
        self._check_options({c.period_s for c in controllers})
        return [(c, c.spec.routes, c.spec.safety, c.spec.lease_periods) for c in controllers]

    def _rebuilt(self, link: HostedLink):
        return self.pool.rebuild(self._remote(link), link.patient)

    def _check_options(self, periods: set[float]) -> None:
        budget = self.solve_budget_s
        if budget is not None and not (isinstance(budget, (int, float)) and
                                       0 < budget < min(periods)):
            raise ConfigError(f"--solve-budget = {budget!r}: expected seconds > 0 and below "
                              f"the control period ({min(periods):g} s): a decision must "
                              f"be settled before the next instant")
        stagger = self.stagger_s
        if stagger is not None and not (isinstance(stagger, (int, float)) and
                                        0 <= stagger <= min(periods)):
            raise ConfigError(f"--stagger = {stagger!r}: expected seconds from 0 to the "
                              f"control period ({min(periods):g} s)")

    @staticmethod
    def _remote(link: HostedLink) -> RemoteController:
        return link.node.controller.controller

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        super().close()

    # ------------------------------------------------------------------ counters
    @property
    def abandoned(self) -> int:
        """Decisions settled without their controller's answer (budget spent)."""
        return sum(link.abandoned for link in self.links)

    @property
    def late_discarded(self) -> int:
        """Answers that came after their decision was settled without them."""
        return sum(link.late_discarded for link in self.links)

    # ------------------------------------------------------------------ timers
    def _at(self, when: float, kind: str, link: HostedLink, token) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), kind, link, token))

    def _note(self, kind: str, t: float | None, **fields) -> None:
        if self.log is not None:
            self.log.note(kind, t, **fields)

    # ------------------------------------------------------------------ the loop
    def _register(self) -> None:
        for link in self.links:
            for reader in self._readers(link):
                self._by_socket[reader.sock] = ("telemetry", link)
                self.poller.register(reader.sock, zmq.POLLIN)
            endpoints = list(link.clients.values()) + ([link.plant] if link.plant else [])
            for client in {id(c): c for c in endpoints}.values():
                if client.sock not in self._by_socket:
                    self._by_socket[client.sock] = ("commands", (link, client))
                    self.poller.register(client.sock, zmq.POLLIN)
        for worker in self.pool.workers:
            self._by_socket[worker.fileno()] = ("worker", worker)
            self.poller.register(worker.fileno(), zmq.POLLIN)

    def _hold(self, link: HostedLink, hold: bool) -> None:
        """Leave *link*'s telemetry unread while its cycle runs (its node then sees no
        message between asking the controller and issuing the decision, as in-process)."""
        for reader in self._readers(link):
            if hold:
                self.poller.unregister(reader.sock)
            else:
                self.poller.register(reader.sock, zmq.POLLIN)

    @staticmethod
    def _readers(link: HostedLink) -> list:
        """The patient's telemetry subscribers: its plant's, and the further sources'."""
        return [link.telemetry] + ([link.sensors] if link.sensors is not None else [])

    def _loop(self, until, budget_s: float | None, realtime: bool,
              idle_timeout_s: float = 30.0) -> None:
        self._register()
        last_heard, last_rejoin = time.monotonic(), 0.0
        while not until():
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, kind, link, token = heapq.heappop(self._timers)
                getattr(self, f"_on_{kind}")(link, token, budget_s)
            if now - last_rejoin >= 0.1:
                last_rejoin = now
                for link in self.links:
                    if link.cycle is None:
                        self.rejoin(link)
            wait_s = 0.1 if not self._timers else \
                min(0.1, max(0.0, self._timers[0][0] - time.monotonic()))
            events = self.poller.poll(int(math.ceil(wait_s * 1000)))
            if events:
                last_heard = time.monotonic()
            elif not realtime and time.monotonic() - last_heard > idle_timeout_s:
                raise TimeoutError(f"serve controller: plants silent for {idle_timeout_s} s")
            for sock, _ in events:
                what, target = self._by_socket[sock]
                if what == "telemetry":
                    if target.cycle is None:
                        ticks = self.handle_telemetry(target)
                        if not realtime:
                            target.ticks.extend(ticks)
                elif what == "commands":
                    self._answers(*target)
                else:
                    self._worker_answers(target)
            if not realtime:
                for link in self.links:
                    if link.cycle is None and link.ticks:
                        self._begin(link, link.ticks.popleft(), None, budget_s)

    def run_simulated(self, idle_timeout_s: float = 30.0) -> None:
        """Lock-step: act on each plant tick until every plant has finished (the
        patients' decisions in parallel in the workers)."""
        budget = self.solve_budget_s
        self._loop(lambda: all(link.finished and link.cycle is None and not link.ticks
                               for link in self.links), budget, False, idle_timeout_s)

    def run_realtime(self, duration_s: float, *, max_missed: int = 2) -> None:
        """Own clock: each patient's instants every period from its phase, for
        *duration_s* wall seconds (module docstring)."""
        self.max_missed = max_missed
        budget = self.solve_budget_s
        if budget is None:  # half a period: settled well before the next instant
            budget = 0.5 * min(link.node.controller.period_s for link in self.links)
        n = len(self.links)
        start = time.monotonic()
        self._start, self._end = start, start + duration_s
        for link in self.links:
            period = link.node.controller.period_s
            spread = period if self.stagger_s is None else self.stagger_s
            link.phase_s = spread * link.key / n if n else 0.0
            link.due, link.due_k = start + link.phase_s, 0
            self._at(link.due, "due", link, 0)
        self._loop(lambda: time.monotonic() > self._end and
                   all(link.cycle is None for link in self.links)
                   or all(link.finished for link in self.links), budget, True)

    # ------------------------------------------------------------------ one instant
    def _on_due(self, link: HostedLink, k: int, budget_s: float | None) -> None:
        if k != link.due_k:
            return
        period = link.node.controller.period_s
        now = time.monotonic()
        # the next instant, past any that went by while the host could not act
        k_next = max(k + 1, int((now - self._start - link.phase_s) // period) + 1)
        skipped = k_next - k - 1
        link.due_k = k_next
        link.due = self._start + link.phase_s + k_next * period
        if link.due <= self._end:
            self._at(link.due, "due", link, k_next)
        if skipped:
            self._missed(link, skipped, f"{skipped} instant(s) passed while the host was late")
        if link.cycle is not None:
            if link.cycle.decision is None:  # its decision is still out: this one passes
                self._missed(link, 1, "the previous decision was still out")
                return
            self._finish(link)  # acks still outstanding: counted missed in _finish
        if link.finished:
            return
        if not self.commandable(link, link.fallback):
            return  # no command: the pump side's lease and fallback act
        due = self._start + link.phase_s + k * period
        self._begin(link, link.now(), due, budget_s)

    def _begin(self, link: HostedLink, t: float, due: float | None,
               budget_s: float | None) -> None:
        """Ask the patient's controller to decide at *t* (its clock)."""
        supervised = link.node.controller
        pending = supervised.prepare(t, dict(link.node.readings))
        link.cycle = cycle = _Cycle(t, due, time.monotonic(), pending)
        self._hold(link, True)
        remote = self._remote(link)
        if not remote.worker.alive:
            self._settle(link, self._lost(link, t))
            return
        expires = None if budget_s is None else cycle.started + budget_s
        cycle.request = self.pool.submit(remote, t, pending.given, expires)
        self._requests[cycle.request.rid] = (link, cycle.request)
        if expires is not None:
            self._at(expires, "budget", link, cycle.request.rid)
        if not remote.worker.alive:  # it died since the last poll: its pipe is closed
            self._worker_lost(remote.worker)

    def _lost(self, link: HostedLink, t: float) -> Decision:
        worker = self._remote(link).worker
        return Decision(t, dict.fromkeys(self._remote(link).inputs, 0.0),
                        f"{worker.exit_text()}, and the patient's controller with it",
                        status="controller_lost")

    def _on_budget(self, link: HostedLink, rid: int, budget_s: float | None) -> None:
        cycle = link.cycle
        if cycle is None or cycle.request is None or cycle.request.rid != rid or \
                cycle.decision is not None:
            return
        self._abandon(link, cycle, f"no answer within the {budget_s:g}-s solve budget")

    def _abandon(self, link: HostedLink, cycle: _Cycle, why: str) -> None:
        """Settle *cycle* without its controller's answer: the shifted previous plan it
        made, or (none) the supervisor's fallback."""
        request = cycle.request
        request.abandoned = True
        link.abandoned += 1
        remote = self._remote(link)
        planned = remote.planned
        backup = planned.shifted(cycle.t) if planned is not None else None
        decision = self._settle(link, Decision(cycle.t, dict.fromkeys(remote.inputs, 0.0),
                                               why, status="solver_timeout", backup=backup))
        self._note("solve_abandoned", cycle.t, patient=link.node.src, worker=
                   remote.worker.index + 1, reason=why, decision=decision.reason,
                   rates=decision.rates)

    def _worker_answers(self, worker: Worker) -> None:
        for answer in worker.receive():
            kind, key = answer[0], answer[1]
            if kind in ("decision", "expired"):
                worker.in_flight -= 1
                entry = self._requests.pop(answer[2], None)
                if entry is None:
                    continue
                link, request = entry
                request.answered = True
                cycle = link.cycle
                current = cycle is not None and cycle.request is request and \
                    cycle.decision is None
                if kind == "expired":
                    if current:
                        self._abandon(link, cycle, "it reached its worker after its solve "
                                                   "budget")
                elif current:
                    if answer[4] is not None:
                        self._remote(link).planned = answer[4]
                    self._settle(link, answer[3])
                else:
                    link.late_discarded += 1
                    outcome = answer[3]
                    self._note("late_answer_discarded", request.t_s, patient=link.node.src,
                               worker=worker.index + 1, late_by_s=round(
                                   time.monotonic() - request.expires, 3)
                               if request.expires is not None else None,
                               status=getattr(outcome, "status", type(outcome).__name__))
            elif kind == "call_failed":
                link = self.links[key]
                self._note("controller_error", link.last_t, patient=link.node.src,
                           text=answer[2])
            elif kind == "built":
                worker.in_flight -= 1
            elif kind == "build_failed":
                worker.in_flight -= 1
                link = self.links[key]
                self._note("controller_error", link.last_t, patient=link.node.src,
                           text=f"rebuilding the controller failed: {answer[2]}")
        worker.pump()
        if not worker.alive:
            self._worker_lost(worker)

    def _worker_lost(self, worker: Worker) -> None:
        """Its patients' decisions now fail as ``controller_lost`` (the supervisor's
        fallback and alarm); noted once."""
        if worker.fileno() not in self._by_socket:
            return
        self.poller.unregister(worker.fileno())
        del self._by_socket[worker.fileno()]
        worker.lost = True
        self._note("worker_lost", None, worker=worker.index + 1, text=worker.exit_text(),
                   patients=[self.links[k].node.src for k in worker.keys])
        for key in worker.keys:
            link = self.links[key]
            cycle = link.cycle
            if cycle is not None and cycle.decision is None and cycle.request is not None:
                cycle.request.abandoned = True
                self._requests.pop(cycle.request.rid, None)
                self._settle(link, self._lost(link, cycle.t))

    def _settle(self, link: HostedLink, outcome) -> Decision:
        """The supervisor settles the decision; its commands go out."""
        cycle = link.cycle
        decision = link.node.controller.settle(cycle.pending, outcome)
        cycle.decision = decision
        link.last_t = cycle.t
        alarms = []
        for message in link.node.issue(cycle.t, decision):
            if isinstance(message, Alarm):  # not a command: recorded (and published)
                self._note("alarm", cycle.t, patient=link.node.src, alarm=message.body())
                alarms.append(message)
                continue
            client = link.clients[message.pump]
            client.send(message, cycle.t)
            cycle.acks[message.cmd_id] = _Outstanding(message, client)
            self._at(time.monotonic() + self.ack_timeout_s, "ack", link,
                     (message.cmd_id, 0))
        self._publish(link, cycle.t, alarms)
        held, link.held = link.held, []
        for client, envelope in held:
            self._answer(link, client, envelope)
        if not cycle.acks and link.cycle is cycle:
            self._finish(link)
        return decision

    def _on_ack(self, link: HostedLink, token, budget_s) -> None:
        cmd_id, attempt = token
        cycle = link.cycle
        sent = cycle.acks.get(cmd_id) if cycle is not None else None
        if sent is None or sent.attempts != attempt:
            return
        if attempt < self.retries:
            sent.attempts += 1
            sent.client.retries_used += 1
            sent.client.send(sent.command, cycle.t)
            self._at(time.monotonic() + self.ack_timeout_s, "ack", link,
                     (cmd_id, sent.attempts))
            return
        del cycle.acks[cmd_id]
        link.missed_acks += 1
        self._note("ack_missing", cycle.t, cmd_id=cmd_id, pump=sent.command.pump)
        if not cycle.acks:
            self._finish(link)

    def _answers(self, link: HostedLink, client: CommandClient) -> None:
        for envelope in client.receive():
            cycle = link.cycle
            if cycle is not None and cycle.decision is None:
                link.held.append((client, envelope))  # after the decision is issued
            else:
                self._answer(link, client, envelope)

    def _answer(self, link: HostedLink, client: CommandClient, envelope: Envelope) -> None:
        message = envelope.message
        cycle = link.cycle
        if isinstance(message, Hello):  # the plant's answer to a (re-sent) hello
            if link.session.state == "SNAPSHOT":
                self._hello_answered(link)
            return
        if isinstance(message, Ack) and cycle is not None and message.cmd_id in cycle.acks:
            del cycle.acks[message.cmd_id]
            link.node.receive(message, cycle.t)
            self._note("ack", cycle.t, **message.body())
            if not cycle.acks:
                self._finish(link)
            return
        # a status snapshot, a late ack: for the node, at the last instant acted on
        link.node.receive(message, link.last_t if link.last_t is not None else link.now())

    def rejoin(self, link: PatientLink) -> None:
        # the plant's answer to the hello arrives through the poll loop (_answer), not here
        if link.plant is None or link.session.state != "SNAPSHOT":
            return
        now = time.monotonic()
        if link.hello_s is None or now - link.hello_s >= 1.0:
            link.plant.send(Hello(role="controller"))
            link.hello_s = now

    def _finish(self, link: HostedLink) -> None:
        """The cycle is over: its acks are in (or given up)."""
        cycle, link.cycle = link.cycle, None
        self._hold(link, False)
        now = time.monotonic()
        link.cycle_s.append(now - cycle.started)
        transitions = link.node.transitions
        for t_mode, source, target, cause in transitions[link.modes_logged:]:
            self._note("mode", t_mode, patient=link.node.src, source=source, target=target,
                       cause=cause)
        link.modes_logged = len(transitions)
        if cycle.due is None:
            return
        link.latency_s.append(now - cycle.due)
        if now > cycle.due + link.node.controller.period_s:
            self._missed(link, 1, f"instant at {cycle.t:g} s done "
                                  f"{now - cycle.due:.2f} s after it was due")
        else:
            link.misses_in_row = 0

    def _missed(self, link: HostedLink, count: int, why: str) -> None:
        self.missed_deadlines += count
        link.misses_in_row += count
        self._note("deadline_missed", link.last_t, patient=link.node.src, count=count,
                   cause=why)
        if link.misses_in_row >= self.max_missed and not link.fallback:
            link.fallback = True
            self._note("mode", link.last_t, patient=link.node.src, source="CLOSED_LOOP",
                       target="FALLBACK", cause=f"{link.misses_in_row} control deadlines "
                                                f"missed in a row")


def serve_host(scenario: Scenario, patients: list[tuple[int, int]], telemetry: list[str],
               pumps: list[dict[str, str]], *,
               plant_commands: list[str | None] | None = None,
               sensors: list[list[str]] | None = None, realtime: bool = False, duration_s: float | None = None,
               audit: str | Path | None = None, keys: Keys | None = None,
               wait_s: float = 30.0, workers: int | None = None,
               solve_budget_s: float | None = None,
               stagger_s: float | None = None, publish: str | None = None) -> ControllerHost:
    """Connect, run (lock-step, or real time for *duration_s*) and close a host; with
    *publish*, every decision's plan, alarms and a heartbeat go to monitors there."""
    return run_to_end(ControllerHost(scenario, patients, telemetry, pumps,
                                     plant_commands=plant_commands, sensors=sensors,
                                     audit=audit, keys=keys, workers=workers,
                                     solve_budget_s=solve_budget_s, stagger_s=stagger_s,
                                     publish=publish), wait_s, realtime, duration_s)
