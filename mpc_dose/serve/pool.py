"""Patients' controllers in worker processes, for :class:`~mpc_dose.serve.host.ControllerHost`.

Each patient's controller is built in, and lives in, the one worker process it is pinned to
(patient *k* of the host: worker ``k % workers``), so the controller object (an NMPC with its
estimator, solver and warm start) never crosses processes. Only what reaches the controller
goes in - its ``observe``, ``applied`` and ``given_bolus`` calls, queued in the host and
sent with the next request to decide - and only its decision (with the plan it made, as
plain numbers: :class:`~mpc_dose.control.base.Forecast`) comes out.

Host and workers are processes of the same program on one machine: they speak pickled tuples
over :func:`multiprocessing.Pipe` (no wire protocol to version). Host -> worker:

* ``("build", key, (index, seed))``: build patient *key*'s controller from the scenario
  (again after its plant restarted); answered ``("built", key, ControllerSpec)`` or
  ``("build_failed", key, text)``;
* ``("run", key, calls, request)``: the queued calls in order, then, unless *request* is
  None, ``(rid, t_s, given, expires)``: decide at *t_s* on the readings *given*; answered
  ``("decision", key, rid, outcome, planned)`` (*outcome* the Decision or the exception
  the controller raised; *planned* its plan when it made a new one, else None) or, when the
  request reached the worker after *expires* (a ``time.monotonic`` instant: one clock for
  every process of the machine), ``("expired", key, rid)`` without deciding - the host has
  settled that instant without it. A call that raises is answered
  ``("call_failed", key, text)``.

A solve cannot be interrupted from outside: the host does not wait past the budget (it
settles the decision without the answer, and discards the answer when it comes). So that one
slow solve does not queue up every request behind it in the pipe, the host sends at most
:data:`MAX_IN_FLIGHT` requests to a worker at once and keeps the rest (a request whose budget
ran out before it was sent goes as its calls only).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from ..control.base import Decision, Forecast, Reading
from ..control.supervisor import SafetyConfig
from ..errors import ConfigError
from ..node.controller_node import PumpRoute
from ..scenario.schema import Scenario

__all__ = ["ControllerSpec", "RemoteController", "Request", "Worker", "WorkerPool",
           "MAX_IN_FLIGHT"]

#: requests to decide (and builds) sent to one worker and not yet answered, at most (the
#: rest wait in the host): one being solved and the next ready in the pipe keeps a worker
#: busy
MAX_IN_FLIGHT = 4
#: calls queued for a controller that is not asked to decide (no plant clock yet, a lost
#: link) are sent on their own beyond this many, so the queue does not grow for hours
_MAX_QUEUED_CALLS = 256
#: numerical libraries in a worker use one thread each: the pool is the parallelism (threads
#: of several workers fighting over the same cores would slow every solve)
_ONE_THREAD = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                      "MKL_NUM_THREADS")}


@dataclass(frozen=True)
class ControllerSpec:
    """What the host's controller node needs of a patient's controller built in a worker."""

    name: str
    period_s: float
    inputs: tuple[str, ...]
    routes: dict[str, PumpRoute]
    safety: SafetyConfig | None
    lease_periods: float


def _build(scenario: Scenario, index: int, seed: int):
    from ..trial.build import build_setup
    from ..trial.closed_loop import PlantSide

    setup, _ = build_setup(scenario, index, seed)
    controller = setup.controller
    return controller, ControllerSpec(controller.name, float(controller.period_s),
                                      tuple(controller.inputs), PlantSide.routes_for(setup),
                                      setup.safety, float(setup.lease_periods))


def _portable(err: Exception) -> Exception:
    """*err* as it can cross to the host (an exception that does not pickle becomes a
    RuntimeError with its type and text)."""
    try:
        pickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(err).__name__}: {err}")


def _call(controller, call: tuple) -> None:
    name, *args = call
    method = getattr(controller, name, None)
    if method is not None:
        method(*args)


def serve_worker(conn: Connection, scenario: Scenario) -> None:
    """A worker's loop: build, take calls and decide for its patients until the host
    closes the pipe (or dies: the pipe closes with it)."""
    try:
        _serve(conn, scenario)
    except (EOFError, OSError):  # the host is gone (BrokenPipeError is an OSError)
        return


def _serve(conn: Connection, scenario: Scenario) -> None:
    controllers: dict[int, object] = {}
    sent_plans: dict[int, float] = {}
    while True:
        message = conn.recv()
        kind, key = message[0], message[1]
        if kind == "build":
            index, seed = message[2]
            try:
                controllers[key], spec = _build(scenario, index, seed)
            except Exception as err:  # noqa: BLE001 - reported to the host, which stops
                controllers.pop(key, None)
                conn.send(("build_failed", key, str(err) if isinstance(err, ConfigError)
                           else f"{type(err).__name__}: {err}"))
                continue
            sent_plans.pop(key, None)
            conn.send(("built", key, spec))
            continue
        _, key, calls, request = message
        controller = controllers.get(key)
        if controller is None:
            if request is not None:
                conn.send(("decision", key, request[0],
                           RuntimeError(f"patient {key}: no controller in this worker"), None))
            continue
        try:
            for call in calls:
                _call(controller, call)
        except Exception as err:  # noqa: BLE001 - the host records it
            conn.send(("call_failed", key, f"{type(err).__name__}: {err}"))
        if request is None:
            continue
        rid, t_s, given, expires = request
        if expires is not None and time.monotonic() > expires:
            conn.send(("expired", key, rid))
            continue
        try:
            outcome = controller.decide(t_s, given)
        except Exception as err:  # noqa: BLE001 - a failed decision: the supervisor's
            outcome = _portable(err)
        planned = getattr(controller, "planned", None)
        if isinstance(planned, Forecast) and sent_plans.get(key) != planned.t_s:
            sent_plans[key] = planned.t_s
        else:
            planned = None
        conn.send(("decision", key, rid, outcome, planned))


@dataclass(eq=False)
class Request:
    """One request to decide, from the host's side."""

    rid: int
    key: int
    t_s: float
    given: dict[str, Reading]
    calls: list[tuple]
    expires: float | None
    #: settled without the answer (budget spent, worker lost): its answer is discarded
    abandoned: bool = False
    sent: bool = False
    answered: bool = False


@dataclass(eq=False)
class Worker:
    """One worker process as the host sees it."""

    index: int
    process: mp.process.BaseProcess
    conn: Connection
    alive: bool = True
    outbox: deque = field(default_factory=deque)
    in_flight: int = 0
    keys: list[int] = field(default_factory=list)
    #: it died (or its pipe broke) while serving: its patients' controllers are gone
    lost: bool = False
    _exit_text: str | None = None

    def fileno(self) -> int:
        return self.conn.fileno()

    def post(self, message) -> None:
        """Queue *message* (a tuple, or a :class:`Request`) and send what may go."""
        self.outbox.append(message)
        self.pump()

    def pump(self) -> None:
        """Send queued messages in order while fewer than :data:`MAX_IN_FLIGHT` messages
        that are answered (requests to decide, builds) are unanswered: the worker's answers
        then always fit in its pipe, so it never blocks writing one while the host blocks
        writing to it."""
        while self.alive and self.outbox:
            head = self.outbox[0]
            answered = head[0] == "build" if isinstance(head, tuple) else not head.abandoned
            if answered and self.in_flight >= MAX_IN_FLIGHT:
                return
            self.outbox.popleft()
            if isinstance(head, Request):
                wire = ("run", head.key, head.calls, None if head.abandoned else
                        (head.rid, head.t_s, head.given, head.expires))
                head.sent = answered
            else:
                wire = head
            self.in_flight += answered
            try:
                self.conn.send(wire)
            except (OSError, ValueError):  # the worker is gone: its pipe is closed
                self.alive = False

    def receive(self) -> list[tuple]:
        """Every answer waiting; an empty list and ``alive`` False once the worker is
        gone."""
        out = []
        try:
            while self.alive and self.conn.poll():
                out.append(self.conn.recv())
        except (EOFError, OSError):
            self.alive = False
        return out

    def exit_text(self) -> str:
        """What became of it (worked out once: its patients' every decision says it)."""
        if self._exit_text is None:
            self.process.join(0.5)
            code = self.process.exitcode
            self._exit_text = f"worker process {self.index + 1} (pid {self.process.pid}) " \
                f"is gone" + (f" (exit code {code})" if code is not None else "")
        return self._exit_text


class RemoteController:
    """A patient's controller as the host's controller node sees it: its name, period and
    inputs; the calls that reach it (``observe``, ``applied``, ``given_bolus``) are queued
    for its worker and leave with the next request to decide. The host asks it to decide
    through :meth:`WorkerPool.submit`, never through :meth:`decide`."""

    def __init__(self, spec: ControllerSpec, key: int, worker: Worker) -> None:
        self.spec, self.key, self.worker = spec, key, worker
        self.name, self.period_s, self.inputs = spec.name, spec.period_s, spec.inputs
        self.calls: list[tuple] = []
        #: the last plan its controller made (shifted, the backup of an abandoned solve)
        self.planned: Forecast | None = None

    def _queue(self, call: tuple) -> None:
        self.calls.append(call)
        if len(self.calls) >= _MAX_QUEUED_CALLS:
            self.worker.post(("run", self.key, self.take_calls(), None))

    def take_calls(self) -> list[tuple]:
        calls, self.calls = self.calls, []
        return calls

    def observe(self, reading: Reading) -> None:
        self._queue(("observe", reading))

    def applied(self, t_s: float, rates: Mapping[str, float]) -> None:
        self._queue(("applied", t_s, dict(rates)))

    def given_bolus(self, t_s: float, name: str, amount: float) -> None:
        self._queue(("given_bolus", t_s, name, amount))

    def forecast(self, t_s: float) -> Forecast | None:
        """The last plan its controller sent, from *t_s* on (for the monitors' ``plan``);
        None when it planned nothing or the plan does not cover *t_s*."""
        return None if self.planned is None else self.planned.since(t_s)

    def decide(self, t_s: float, readings: Mapping[str, Reading]) -> Decision:
        raise RuntimeError(f"controller {self.name!r} lives in worker process "
                           f"{self.worker.index + 1}: the host asks it (WorkerPool.submit)")


class WorkerPool:
    """*workers* processes, started by ``spawn`` (a fresh interpreter: nothing of the host's
    sockets or threads is inherited), each serving the patients pinned to it."""

    def __init__(self, scenario: Scenario, workers: int) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"--workers = {workers!r}: expected a whole number >= 1 (0: "
                              f"every controller in the host process)")
        context = mp.get_context("spawn")
        self.workers: list[Worker] = []
        self._rid = 0
        saved = {name: os.environ.get(name) for name in _ONE_THREAD}
        os.environ.update(_ONE_THREAD)  # inherited by the spawned interpreters only
        try:
            for k in range(workers):
                ours, theirs = context.Pipe()
                process = context.Process(target=serve_worker, args=(theirs, scenario),
                                          name=f"mpc-dose-controller-worker-{k + 1}",
                                          daemon=True)
                process.start()
                theirs.close()
                self.workers.append(Worker(k, process, ours))
        except BaseException:
            self.close()
            raise
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def worker_for(self, key: int) -> Worker:
        return self.workers[key % len(self.workers)]

    def build(self, patients: list[tuple[int, int]], timeout_s: float = 600.0
              ) -> list[RemoteController]:
        """Build every patient's controller in its worker (the workers in parallel); a
        patient whose controller cannot be built stops the start with its error."""
        for key, patient in enumerate(patients):
            worker = self.worker_for(key)
            worker.keys.append(key)
            worker.post(("build", key, patient))
        specs: dict[int, ControllerSpec] = {}
        deadline = time.monotonic() + timeout_s
        while len(specs) < len(patients):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"controller workers: {len(patients) - len(specs)} "
                                   f"controller(s) not built within {timeout_s:g} s")
            ready = wait([w.conn for w in self.workers if w.alive], left)
            for worker in self.workers:
                if worker.conn not in ready:
                    continue
                for answer in worker.receive():
                    worker.in_flight -= answer[0] in ("built", "build_failed")
                    if answer[0] == "build_failed":
                        raise ConfigError(f"patient {patients[answer[1]][0] + 1}: "
                                          f"{answer[2]}")
                    if answer[0] == "built":
                        specs[answer[1]] = answer[2]
                if not worker.alive:
                    raise RuntimeError(f"controller workers: {worker.exit_text()} while "
                                       f"building the controllers")
                worker.pump()
        return [RemoteController(specs[key], key, self.worker_for(key))
                for key in range(len(patients))]

    def rebuild(self, controller: RemoteController, patient: tuple[int, int]
                ) -> RemoteController:
        """A fresh controller for the patient of *controller* (its plant restarted): built
        in the same worker, in order after everything queued for the old one (whose queued
        calls are dropped)."""
        controller.take_calls()
        controller.worker.post(("build", controller.key, patient))
        return RemoteController(controller.spec, controller.key, controller.worker)

    def submit(self, controller: RemoteController, t_s: float, given: Mapping[str, Reading],
               expires: float | None) -> Request:
        """Ask *controller* to decide at *t_s* on *given* (after its queued calls)."""
        self._rid += 1
        request = Request(self._rid, controller.key, t_s, dict(given),
                          controller.take_calls(), expires)
        controller.worker.post(request)
        return request

    def close(self) -> None:
        """Close the pipes (a worker ends when its pipe does) and make sure they end."""
        for worker in self.workers:
            worker.alive = False
            worker.conn.close()
        for worker in self.workers:
            worker.process.join(2.0)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(2.0)
