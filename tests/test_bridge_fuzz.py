"""Issue 14.2: no frame ends the bridge. Fuzzed frames (tests/fuzz_frames.py, written from
docs/protocol.md) go through the codec and :class:`BridgeCore` - the code the bridge process
runs for every frame it receives - with an audit log and a driver that checks every call
that would reach a pump. Nothing may raise; every answer must encode; the driver must never
see a non-finite rate, a rate above the maximum, a rise beyond the step or an hour beyond
the volume; and every rate it runs must be one a command asked for (as its rate or its
fallback) or a stop.

The long run (a million frames) is ``python benchmarks/fuzz_bridge.py``.
"""

from __future__ import annotations

import random

import pytest

from mpc_dose.audit import AuditLog
from mpc_dose.node.pump_bridge import BridgePump, PumpBridgeNode
from mpc_dose.protocol.codec import Envelope, decode, decode_frame, encode
from mpc_dose.protocol.messages import Ack, Bolus, SetRate, wire_factor
from mpc_dose.protocol.session import PeerBudget
from mpc_dose.serve.pump_bridge import BridgeCore
from tests.fuzz_frames import CheckingDriver, FrameFuzzer

WALL0 = 1.8e9
LIMITS = {"max_rate_ml_per_h": 100.0, "max_step_ml_per_h": 30.0,
          "max_volume_per_h_ml": 20.0, "max_lease_s": 10.0}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _key(rate: float) -> float:
    """A rate compared to 9 significant digits (conversions from uL/min are not exact)."""
    return float(f"{rate:.9g}")


def fuzz(frames: int, seed: int, *, fail_every: int = 0) -> dict:
    """Run *frames* fuzzed frames through codec and core; returns the figures."""
    rng = random.Random(seed)
    clock = Clock()
    driver = CheckingDriver(max_rate=LIMITS["max_rate_ml_per_h"],
                            max_step=LIMITS["max_step_ml_per_h"],
                            max_volume_per_h=LIMITS["max_volume_per_h_ml"], clock=clock)
    driver.fail_every = fail_every
    node = PumpBridgeNode([BridgePump("propofol", 0, 10.0, "mg", **LIMITS)], driver,
                          watchdog_s=5.0)
    node.initialise(0.0, driver.initialise)
    log = AuditLog(":memory:", "pump-bridge")
    core = BridgeCore(node, log, PeerBudget(rate_per_s=1e9, burst=1e9))
    fuzzer = FrameFuzzer(rng)
    peers = [b"\x00k1", b"\x00k2", b"\x00k3"]
    asked: set[float] = {0.0}          # rates a command asked for (rate or fallback) [mL/h]
    pending: dict[str, SetRate] = {}
    figures = {"frames": 0, "crashes": 0, "answers": 0, "applied": 0, "refused": 0}
    seq = 0

    def send(items) -> None:
        nonlocal seq
        for item in items:  # as the sockets would: every answer must encode
            seq += 1
            data = encode(Envelope(item.message, "pump-bridge", "b1", seq, WALL0 + clock.now,
                                   item.t_sim))
            assert decode(data).message == item.message
            figures["answers"] += 1
            message = item.message
            if isinstance(message, Ack) and message.ok and message.code == "applied" and \
                    message.cmd_id in pending:
                figures["applied"] += 1
            elif isinstance(message, Ack) and not message.ok:
                figures["refused"] += 1

    for k in range(frames):
        clock.now += rng.choice((0.001, 0.01, 0.05, 0.2, 1.0, 5.0))
        item = decode_frame(fuzzer.frame(WALL0 + clock.now))
        if isinstance(item, Envelope) and isinstance(item.message, SetRate):
            command = item.message
            pending[command.cmd_id] = command
            # what it asks the pump to run, in mL/h (the codec admits only wire units)
            asked.add(command.rate * wire_factor(command.unit, "mL/h"))
            asked.add(command.fallback.rate * wire_factor(command.fallback.unit, "mL/h"))
        try:
            send(core.handle(rng.choice(peers), item, clock.now, WALL0 + clock.now))
            send(core.expire(clock.now))
            if k % 50 == 0:
                send(core.poll(clock.now))
            if k % 200 == 0:
                core.record(clock.now)
        except Exception:  # noqa: BLE001 - counted: the figure must be 0
            figures["crashes"] += 1
            raise
        figures["frames"] += 1
    ran = {_key(r) for _, r in driver.history + driver.timeline}
    figures.update(
        limit_violations=len(driver.violations), violations=driver.violations[:5],
        nan_to_driver=driver.non_finite, internal_errors=core.counts["internal_error"],
        unasked=sorted(ran - {_key(a) for a in asked})[:5],
        sets=driver.sets, audit_rows=len(log.rows()),
        refused_frames=sum(v for k, v in core.counts.items() if k.startswith("refused.")))
    log.close()
    return figures


def test_fuzzed_frames_never_crash_never_pass_a_limit():
    """100,000 fuzzed frames through codec and core: 0 crashes, 0 internal errors, 0 limit
    violations, 0 non-finite rates to the driver, no rate run that no command asked for;
    and the fuzzer is not idle: thousands of commands applied, tens of thousands refused."""
    figures = fuzz(100_000, seed=14)
    print(figures)
    assert figures["frames"] == 100_000 and figures["crashes"] == 0
    assert figures["internal_errors"] == 0
    assert figures["limit_violations"] == 0, figures["violations"]
    assert figures["nan_to_driver"] == 0
    assert figures["unasked"] == []
    assert figures["applied"] > 1000 and figures["refused_frames"] > 10_000
    assert figures["sets"] > 1000


@pytest.mark.parametrize("seed", [1, 2])
def test_fuzzed_frames_with_a_failing_driver(seed):
    """The same with a driver that loses every 7th reply: every fault ends in a stop read
    back, never in a crash or a rate beyond a limit."""
    figures = fuzz(10_000, seed=seed, fail_every=7)
    assert figures["crashes"] == 0 and figures["internal_errors"] == 0
    assert figures["limit_violations"] == 0, figures["violations"]


def test_a_defect_in_handling_is_answered_and_audited_not_raised():
    """A defect of the bridge's own (here: a node that raises) refuses that frame with
    'internal', audits it, and leaves the core working."""
    clock = Clock()
    driver = CheckingDriver(max_rate=100.0, max_step=100.0, max_volume_per_h=1e9, clock=clock)
    node = PumpBridgeNode([BridgePump("propofol", 0, 10.0, "mg", 100.0)], driver)
    node.initialise(0.0, driver.initialise)
    log = AuditLog(":memory:", "pump-bridge")
    core = BridgeCore(node, log, PeerBudget(1e9, 1e9))
    command = SetRate(cmd_id="c1", pump="propofol", rate=10.0, unit="mL/h", lease_s=5.0)
    envelope = Envelope(command, "controller", "e1", 1, WALL0)
    original = node.receive
    node.receive = lambda *a: 1 / 0
    [out] = core.handle(b"peer", envelope, 0.0, WALL0)
    assert (out.message.ok, out.message.code, out.reply_to) == (False, "internal", b"peer")
    assert [r["kind"] for r in log.rows()] == ["set_rate", "internal_error"]
    node.receive = original
    [ack, _] = core.handle(b"peer", Envelope(command, "controller", "e1", 2, WALL0), 0.0,
                           WALL0)
    assert ack.message.code == "applied" and driver.rate == 10.0


def test_a_peer_over_its_budget_is_dropped_and_reported_once_a_second():
    """14.5b: a client beyond its frames-per-second budget gets nothing handled (no audit
    row per frame); the drops are reported per peer, at most once a second."""
    driver = CheckingDriver(max_rate=100.0, max_step=100.0, max_volume_per_h=1e9,
                            clock=Clock())
    node = PumpBridgeNode([BridgePump("propofol", 0, 10.0, "mg", 100.0)], driver)
    log = AuditLog(":memory:", "pump-bridge")
    core = BridgeCore(node, log, PeerBudget(rate_per_s=10.0, burst=5.0))
    frame = decode_frame(b"junk")
    for k in range(100):
        core.handle(b"flood", frame, k * 0.001, WALL0)
    assert core.counts["rate_limited"] == 95
    core.record(0.1)
    core.record(0.2)  # within the second: not again
    rows = [r for r in log.rows() if r["kind"] == "rate_limited"]
    assert len(rows) == 1 and '"dropped": 95' in rows[0]["body"]
    assert len([r for r in log.rows() if r["kind"] == "refused"]) == 5
    # another peer is not affected
    assert core.handle(b"other", frame, 0.1, WALL0) == [] and core.counts["rate_limited"] == 95


# ---------------------------------------------------------------------------- boluses
INSULIN = {"max_rate_ml_per_h": 100.0, "max_step_ml_per_h": 30.0,
           "max_volume_per_h_ml": 20.0, "max_lease_s": 10.0, "max_bolus": 10.0,
           "bolus_increment": 0.05, "bolus_ml_per_h": 0.9, "max_on_board": 8.0,
           "programmed_basal_ml_per_h": 5.0}


def fuzz_insulin(frames: int, seed: int) -> dict:
    """Fuzzed frames with bolus commands (protocol 1.1) to an insulin pump (100 U/mL): the
    driver's limits as for rates (a bolus runs on top of the maximum basal at its speed), and
    for every bolus given: at most max_bolus, a whole number of 0.05-U steps, a cmd_id given
    once (a repeated cmd_id of the same sender and epoch, while the bridge keeps its answer),
    the insulin on board within max_on_board when it starts; the pump never gives more
    than the acknowledged boluses; every rate the driver runs was asked for (as a rate or a
    fallback), alone or with a running bolus on top."""
    rng = random.Random(seed)
    clock = Clock()
    driver = CheckingDriver(max_rate=INSULIN["max_rate_ml_per_h"] + INSULIN["bolus_ml_per_h"],
                            max_step=INSULIN["max_step_ml_per_h"],
                            max_volume_per_h=INSULIN["max_volume_per_h_ml"], clock=clock)
    node = PumpBridgeNode([BridgePump("insulin", 0, 100.0, "U", **INSULIN)], driver,
                          watchdog_s=5.0)
    node.initialise(0.0, driver.initialise)
    core = BridgeCore(node, None, PeerBudget(rate_per_s=1e9, burst=1e9))
    fuzzer = FrameFuzzer(rng, pumps=("insulin",), bolus=True)
    asked: set[float] = {0.0}
    bolus_rates: set[float] = set()
    cached_before = False       # the frame's (src, epoch, cmd_id) had an answer already
    figures = {"frames": 0, "boluses": 0, "bolus_refused": 0, "given_U": 0.0,
               "problems": []}

    def send(items) -> None:
        for item in items:
            message = item.message
            assert decode(encode(Envelope(message, "b", "b1", 1, WALL0))).message == message
            if not isinstance(message, Ack) or message.cmd_id not in pending:
                continue
            if not message.ok:
                figures["bolus_refused"] += 1
                continue
            if message.code != "applied" or message.applied_amount is None:
                continue   # a rate's ack (a damaged cmd_id may repeat a bolus's)
            running = node.pumps["insulin"].bolus
            amount = message.applied_amount * wire_factor(message.amount_unit, "U")
            steps = amount / 0.05
            on_board = node.insulin_on_board("insulin", clock.now)
            if cached_before or not 0 < amount <= 10.0 + 1e-9 or \
                    abs(steps - round(steps)) > 1e-6 or \
                    not on_board + amount <= INSULIN["max_on_board"] + 1e-6 or \
                    running is None or running.cmd_id != message.cmd_id:
                figures["problems"].append((message.cmd_id, amount, on_board))
            bolus_rates.add(running.ml_per_h)
            figures["boluses"] += 1
            figures["given_U"] += amount

    pending: set[str] = set()
    for k in range(frames):
        clock.now += rng.choice((0.001, 0.01, 0.05, 0.2, 1.0, 5.0, 60.0))
        item = decode_frame(fuzzer.frame(WALL0 + clock.now))
        cached_before = False
        if isinstance(item, Envelope) and isinstance(item.message, Bolus):
            pending.add(item.message.cmd_id)
            cached_before = (item.src, item.epoch, item.message.cmd_id) in node._acks
        if isinstance(item, Envelope) and isinstance(item.message, SetRate):
            command = item.message
            asked.add(command.rate * wire_factor(command.unit, "mL/h"))
            asked.add(command.fallback.rate * wire_factor(command.fallback.unit, "mL/h"))
        send(core.handle(rng.choice([b"\x00k1", b"\x00k2"]), item, clock.now,
                         WALL0 + clock.now))
        cached_before = False
        send(core.expire(clock.now))
        if k % 50 == 0:
            send(core.poll(clock.now))
        figures["frames"] += 1
    status = node.status("insulin", clock.now)
    def near(rate: float) -> float:  # rates compared to 1e-9 mL/h (sums are not exact)
        return round(rate, 9) + 0.0

    keys = {near(a) for a in asked}
    ran = {r for _, r in driver.history + driver.timeline}
    figures.update(
        delivered_U=status.bolus_delivered + status.bolus_remaining,
        limit_violations=driver.violations[:5], internal_errors=core.counts["internal_error"],
        unasked=sorted(r for r in ran if near(r) not in keys and
                       not any(near(r - b) in keys for b in bolus_rates))[:5])
    return figures


def test_fuzzed_bolus_frames_never_give_a_bolus_beyond_the_limits():
    figures = fuzz_insulin(30_000, seed=18)
    print({k: v for k, v in figures.items() if k != "problems"})
    assert figures["internal_errors"] == 0
    assert figures["limit_violations"] == [] and figures["problems"] == []
    assert figures["unasked"] == []
    assert figures["delivered_U"] <= figures["given_U"] + 1e-9
    assert figures["boluses"] > 50 and figures["bolus_refused"] > 1000
