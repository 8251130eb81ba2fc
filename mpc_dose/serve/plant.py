"""``mpc-dose serve plant``: the virtual patient with its pumps and sensors as a process.

Telemetry (measurements, pump status, alarms, heartbeats) goes out on a PUB socket; commands
for the simulated pumps come in on a ROUTER socket and are answered there. Pumps driven by a
pump bridge (``external``) are followed through the bridge's own telemetry: the patient gets
what the bridge reports its pump infuses.

Simulated time (default) runs in lock-step, so a run across processes gives the same series
as :func:`~mpc_dose.trial.closed_loop.run_closed_loop`: at each control instant the plant
publishes the readings, then a ``heartbeat`` with state ``tick`` and the instant as
``t_sim``, and waits (up to *tick_timeout_s* of wall time) until every pump has its command
(``set_rate``, ``stop`` or ``get_status``) for that instant: that command closes the pump's
instant, so the controller sends a bolus of the instant before it (one arriving after the
plant moved on is applied late: the audit log notes it as ``late_command``). In real time
(*realtime_factor*) nothing waits: messages are applied when they arrive, and the
controller's own clock (the tick) keeps the period.

At start the plant waits for a controller's ``hello`` (its subscription is then live); a
controller re-sends it when it hears a new plant epoch, so a restarted plant rejoins.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

import zmq

from ..audit import AuditLog
from ..plant.clock import ACT, at
from ..protocol.codec import Envelope, refusal
from ..protocol.messages import (Bolus, GetStatus, Heartbeat, Hello, PumpStatus,
                                 RemoteProtocolError, SetRate, Stop)
from ..scenario.schema import Scenario
from ..trial.build import build_setup
from ..trial.closed_loop import LoopResult, PlantSide, control_instants, make_environment
from ..transport.zmq_link import Authenticator, CommandServer, Keys, Telemetry, TelemetryReader

__all__ = ["serve_plant", "answer_commands"]


def answer_commands(plant: PlantSide, server: CommandServer, timeout_s: float = 0.0,
                    log: AuditLog | None = None) -> list[Envelope]:
    """Take the commands waiting on *server* (after up to *timeout_s*) and answer each on
    it: ``hello`` with the plant's hello, commands for simulated pumps through the plant;
    commands for bridged pumps are only noted (the bridge answers them); a refused command
    frame gets its ``ack`` with the reason code. Returns the envelopes of the commands
    handled."""
    handled = []
    for identity, envelope in server.frames(timeout_s):
        if isinstance(envelope, RemoteProtocolError):
            if log is not None:
                log.note("refused", float(plant.env.now), code=envelope.code,
                         text=str(envelope)[:500], cmd_id=envelope.cmd_id)
            answer = refusal(envelope)
            if answer is not None:
                server.reply(identity, answer, float(plant.env.now))
            continue
        if log is not None:
            log.message("in", envelope)
        message = envelope.message
        if isinstance(message, Hello):
            server.reply(identity, Hello(role="plant"), float(plant.env.now))
        elif isinstance(message, SetRate) and message.pump in plant.external:
            plant.note_command(message)
        elif isinstance(message, (SetRate, Bolus, Stop, GetStatus)):
            for answer in plant.command(message, send=False):
                server.reply(identity, answer, float(plant.env.now))
            handled.append(envelope)
    return handled


def serve_plant(scenario: Scenario, index: int, seed: int, *, telemetry: str, commands: str,
                external: dict[str, str] | None = None, realtime_factor: float | None = None,
                audit: str | Path | None = None, keys: Keys | None = None,
                wait_s: float = 30.0, tick_timeout_s: float = 10.0) -> LoopResult:
    """Run the plant of patient *index* (0-based) with *seed* until the scenario ends."""
    from dataclasses import replace

    setup, _ = build_setup(scenario, index, seed)
    if realtime_factor is not None:
        setup = replace(setup, realtime_factor=realtime_factor)
    external = dict(external or {})
    # every exit (a time-out waiting for the controller included) stops the authenticator,
    # closes the log and the sockets: a context left to the garbage collector can end a
    # later test or caller in a hang
    with ExitStack() as cleanup:
        context = zmq.Context()
        cleanup.callback(context.destroy, linger=0)
        log = AuditLog(audit, "plant") if audit else None
        if log is not None:
            cleanup.callback(log.close)
        # the allow-list runs before any server socket exists (deny by default)
        auth = Authenticator(context, keys.clients) if keys is not None else None
        if auth is not None:
            cleanup.callback(auth.stop)
        pub = Telemetry(context, telemetry, src="plant", keys=keys)
        server = CommandServer(context, commands, src="plant", keys=keys)
        bridges = TelemetryReader(context, sorted(set(external.values())), keys=keys) \
            if external else None
        if log is not None and keys is not None:
            log.note("start", None, allowed_keys=sorted(keys.clients))

        def audit_refused_handshakes() -> None:
            for refused in auth.drain() if auth is not None else ():
                if log is not None:
                    log.note("zap_refused", None, **refused)
        env = make_environment(setup)
        period = setup.controller.period_s

        if log is not None:
            pub.on_send = server.on_send = lambda envelope: log.message("out", envelope)

        def send(message) -> None:
            pub.send(message, float(env.now))

        plant = PlantSide(setup, env, send, external=list(external))
        own = set(plant.pumps)
        answered: dict[str, float] = {}     # pump -> t_sim of its last command
        reported: dict[str, float] = {}     # external pump -> t_sim of its last status

        def serve_commands(timeout_s: float) -> None:
            audit_refused_handshakes()
            for envelope in answer_commands(plant, server, timeout_s, log):
                if realtime_factor is None and log is not None and \
                        envelope.t_sim is not None and envelope.t_sim < float(env.now):
                    # lock-step: a command of an instant the plant has already left
                    log.note("late_command", float(env.now), cmd_id=envelope.message.cmd_id,
                             type=envelope.message.type, instant=envelope.t_sim)
                # a status request for the instant answers it too: a controller that lets a
                # lease run out (unusable data) sends get_status instead of set_rate
                if isinstance(envelope.message, (SetRate, Stop, GetStatus)):
                    answered[envelope.message.pump] = envelope.t_sim if envelope.t_sim \
                        is not None else float(env.now)

        def follow_bridges(timeout_s: float) -> bool:
            got = False
            if bridges is None:
                return got
            for envelope in bridges.drain(timeout_s):
                got = True
                message = envelope.message
                if isinstance(message, PumpStatus) and message.pump in external:
                    if log is not None:
                        log.message("in", envelope)
                    plant.apply_external(message)
                    if envelope.t_sim is not None:
                        reported[message.pump] = envelope.t_sim
            return got

        # --- start: wait for the controller's hello (its SUB is then live) and the bridges
        deadline = time.monotonic() + wait_s
        hello, seen_bridge = False, bridges is None
        poller = zmq.Poller()
        poller.register(server.sock, zmq.POLLIN)
        if bridges is not None:
            poller.register(bridges.sock, zmq.POLLIN)
        while not (hello and seen_bridge):
            if time.monotonic() > deadline:
                raise TimeoutError(f"serve plant: no controller hello"
                                   f"{'' if seen_bridge else ' / bridge status'} within {wait_s} s")
            pub.send(Heartbeat(role="plant", state="waiting", period_s=0.05), 0.0)
            audit_refused_handshakes()
            for identity, envelope in server.receive(0.05):
                if isinstance(envelope.message, Hello):
                    hello = True
                    server.reply(identity, Hello(role="plant"), 0.0)
            if bridges is not None:
                if next(bridges.drain(0.0), None) is not None:
                    seen_bridge = True
        if log is not None:
            log.note("start", 0.0, patient=index + 1, seed=seed, scenario=scenario.scenario.name)

        if realtime_factor is None:
            def cycle():
                for t in control_instants(setup, period):
                    yield at(env, t, ACT)
                    send(Heartbeat(role="plant", state="tick", period_s=period))
                    wait_until = time.monotonic() + tick_timeout_s
                    while time.monotonic() < wait_until:
                        done = all(answered.get(p, -1.0) >= t for p in own) and \
                            all(reported.get(p, -1.0) >= t for p in external)
                        if done:
                            break
                        serve_commands(0.001)
                        follow_bridges(0.0)
                    # a silent controller: go on; the pumps' leases run out in simulated time
            env.process(cycle())
        else:
            def heartbeat():
                while True:
                    yield env.timeout(min(1.0, period))
                    send(Heartbeat(role="plant", state="running", period_s=min(1.0, period)))
            env.process(heartbeat())

            def idle(timeout_s: float) -> None:
                events = dict(poller.poll(int(max(timeout_s, 0.0) * 1000)))
                if server.sock in events:
                    serve_commands(0.0)
                if bridges is not None and bridges.sock in events:
                    follow_bridges(0.0)
            env.idle = idle

        columns: dict[str, list] = {}
        env.process(plant.recorder(columns))
        if realtime_factor is not None:
            env.sync()
        env.run(until=setup.duration_s + min(setup.record_step_s, 1.0) / 2)
        send(Heartbeat(role="plant", state="finished", period_s=0.0))
        time.sleep(0.05)  # let the last frames leave (LINGER is 0)
        audit_refused_handshakes()
        if log is not None:
            log.note("finish", float(env.now), dropped=pub.dropped,
                     rejected=dict(server.rejected))
        return plant.result(columns, plant.events,
                            dropped_frames=sum(server.rejected.values()))
