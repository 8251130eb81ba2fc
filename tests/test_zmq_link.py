"""ZeroMQ transport under fault injection: a seeded chaos proxy between the command client
and a pump-bridge node, CURVE with a ZAP allow-list, loopback-only binding, non-blocking
telemetry. Loopback only."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import pytest
import zmq

from mpc_dose.errors import ConfigError
from mpc_dose.node.pump_bridge import BridgePump, PumpBridgeNode
from mpc_dose.protocol.messages import Heartbeat, SetRate
from mpc_dose.transport.chaos import ChaosPolicy, ChaosProxy
from mpc_dose.transport.zmq_link import (
    Authenticator,
    CommandClient,
    CommandServer,
    Keys,
    Telemetry,
    TelemetryReader,
    generate_keys,
)
from tests.ports import free_addresses


@dataclass
class Reading:
    state: str
    rate_ml_per_h: float
    dispensed_ml: float = 0.0
    alarm: str | None = None


class FakePump:
    """Records every rate it is set to."""

    def __init__(self) -> None:
        self.sets: list[float] = []
        self.rate = 0.0

    def initialise(self, address, diameter_mm):
        pass

    def set_rate(self, address, rate):
        self.sets.append(rate)
        self.rate = rate
        return rate

    def stop(self, address):
        self.rate = 0.0

    def read(self, address):
        return Reading("infusing" if self.rate > 0 else "stopped", self.rate)


class BridgeThread:
    """A pump-bridge node behind a ROUTER socket, served in a thread."""

    def __init__(self, context, address, *, keys=None, max_cmd_age_s=2.0):
        self.driver = FakePump()
        self.node = PumpBridgeNode([BridgePump("p", 0, 10.0, "mg", 1000.0)], self.driver,
                                   max_cmd_age_s=max_cmd_age_s)
        self.node.initialise(time.monotonic(), self.driver.initialise)
        self.server = CommandServer(context, address, src="bridge", keys=keys)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            for identity, envelope in self.server.receive(0.01):
                for answer in self.node.receive(envelope, time.monotonic(), time.time()):
                    if answer.type == "ack":
                        self.server.reply(identity, answer)

    def stop(self):
        self._stop.set()
        self.thread.join(2)


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def command(k: int, rate: float = 10.0) -> SetRate:
    return SetRate(cmd_id=f"c{k}", pump="p", rate=rate, unit="mL/h", lease_s=10.0)


@contextlib.contextmanager
def through_chaos(context, policy: ChaosPolicy, *, seed: int = 0, reply_policy=None,
                  **bridge_options):
    """(bridge, proxy, client): a client commanding an emulated bridge through a chaos
    proxy; both threads stopped on the way out."""
    front, back = free_addresses(2)
    bridge = BridgeThread(context, back, **bridge_options)
    proxy = ChaosProxy(context, front=front, back=back, policy=policy,
                       reply_policy=reply_policy, seed=seed).start()
    client = CommandClient(context, front, src="ctl")
    time.sleep(0.2)
    try:
        yield bridge, proxy, client
    finally:
        proxy.stop()
        bridge.stop()


def test_commands_survive_30_percent_loss_each_way_and_apply_once(context):
    """T29/T30: Lazy-Pirate retries through 30 % loss of commands and of acks; the bridge
    answers a retried cmd_id from its cache, so each decision is applied exactly once."""
    with through_chaos(context, ChaosPolicy(drop_p=0.3), reply_policy=ChaosPolicy(drop_p=0.3),
                       seed=3) as (bridge, proxy, client):
        acks = [client.request(command(k, 10.0 + k), timeout_s=0.15, retries=6)
                for k in range(30)]
    assert all(a is not None and a.ok for a in acks)
    assert client.retries_used > 0 and any(e[2] == "drop" for e in proxy.log)
    assert bridge.driver.sets == [10.0 + k for k in range(30)]  # each once, in order


def test_duplicated_commands_are_applied_once(context):
    """T27: every command duplicated by the network: applied once, the copy gets the cached
    ack ('duplicate')."""
    with through_chaos(context, ChaosPolicy(dup_p=1.0)) as (bridge, proxy, client):
        for k in range(5):
            assert client.request(command(k, 20.0 + k), timeout_s=0.5).code == "applied"
        time.sleep(0.2)
        client.inbox.extend(client.receive())
    assert bridge.driver.sets == [20.0, 21.0, 22.0, 23.0, 24.0]
    assert sum(e.message.code == "duplicate" for e in client.inbox) == 5


def test_reordered_commands_keep_the_newer_rate(context):
    """T28: an older command arriving after a newer one is rejected as stale; the pump
    holds the newer rate."""
    with through_chaos(context, ChaosPolicy(reorder_window=2), seed=3) as (bridge, proxy,
                                                                           client):
        # seed 3 swaps the pair: the newer (30 mL/h) arrives first
        client.send(command(1, 25.0))
        client.send(command(2, 30.0))
        deadline = time.monotonic() + 2
        acks = {}
        while len(acks) < 2 and time.monotonic() < deadline:
            if client.sock.poll(50):
                for e in client.receive():
                    acks[e.message.cmd_id] = e.message
    assert any(e[2] == "reorder" for e in proxy.log)
    assert acks["c2"].code == "applied" and acks["c1"].code == "stale"
    assert bridge.driver.rate == 30.0


def test_delayed_commands_expire(context):
    """T26: a command held in the network beyond max_cmd_age is refused as expired."""
    with through_chaos(context, ChaosPolicy(delay_s=0.4), max_cmd_age_s=0.2) as (
            bridge, proxy, client):
        ack = client.request(command(1), timeout_s=1.5, retries=0)
    assert ack.code == "expired" and bridge.driver.sets == []


def test_corrupted_frames_never_reach_the_pump(context):
    """Bit flips on every frame: the codec rejects them (counted); nothing is applied."""
    with through_chaos(context, ChaosPolicy(corrupt_p=1.0), seed=5) as (bridge, proxy,
                                                                        client):
        acks = [client.request(command(k, 40.0), timeout_s=0.1, retries=0) for k in range(20)]
    # a flipped bit may still be valid JSON with the same meaning (e.g. in free text):
    # whatever got through was a valid command, applied once per ack
    applied = [a for a in acks if a is not None and a.code == "applied"]
    assert len(bridge.driver.sets) == len(applied)
    assert sum(bridge.server.rejected.values()) + len(applied) + \
        sum(a is not None and not a.ok for a in acks) >= 15
    assert sum(bridge.server.rejected.values()) >= 5


def test_curve_allow_list_keeps_unknown_clients_out(context, tmp_path):
    """T33: with CURVE and a ZAP allow-list, an allowed client commands the pump and an
    unknown key delivers nothing (the handshake fails); the refusal is kept, with the key,
    for the audit log (issue 14.1)."""
    server_pub, server_secret = generate_keys(tmp_path / "server", "bridge")
    good_pub, good_secret = generate_keys(tmp_path / "allowed", "controller")
    bad_pub, bad_secret = generate_keys(tmp_path / "other", "intruder")
    keys = Keys.load(server_secret, allow=[tmp_path / "allowed"])
    assert set(keys.clients) == {"controller"}
    auth = Authenticator(context, keys.clients)
    (address,) = free_addresses(1)
    bridge = BridgeThread(context, address, keys=keys)
    try:
        good = CommandClient(context, address, src="ctl",
                             keys=Keys.load(good_secret, server_pub))
        bad = CommandClient(context, address, src="intruder",
                            keys=Keys.load(bad_secret, server_pub))
        assert bad.request(command(1, 99.0), timeout_s=0.5, retries=1) is None
        ack = good.request(command(2, 12.0), timeout_s=1.0, retries=2)
        refused = auth.drain()
    finally:
        bridge.stop()
        auth.stop()
    assert ack is not None and ack.code == "applied"
    assert bridge.driver.sets == [12.0]
    bad_key = Keys.load(bad_secret).public.decode()
    assert refused and {r["key"] for r in refused} == {bad_key}
    assert all(r["address"].startswith("127.0.0.1") for r in refused)


def test_a_curve_server_needs_an_allow_list(context, tmp_path):
    """14.1: deny by default. A CURVE server without client keys does not start; one whose
    process started no authenticator refuses every client (libzmq would let all in)."""
    server_pub, server_secret = generate_keys(tmp_path, "bridge")
    _, client_secret = generate_keys(tmp_path / "c", "controller")
    (address,) = free_addresses(1)
    with pytest.raises(ConfigError, match=r"needs the public keys of the clients.*--allow-keys"):
        CommandServer(context, address, src="bridge", keys=Keys.load(server_secret))
    with pytest.raises(ConfigError, match="holds no \\*.key file"):
        Keys.load(server_secret, allow=[tmp_path / "empty"]) if (tmp_path / "empty").mkdir() \
            is None else None
    keys = Keys.load(server_secret, allow=[tmp_path / "c"])
    bridge = BridgeThread(context, address, keys=keys)  # no Authenticator on this context
    try:
        client = CommandClient(context, address, src="ctl",
                               keys=Keys.load(client_secret, server_pub))
        assert client.request(command(1, 12.0), timeout_s=0.5, retries=1) is None
    finally:
        bridge.stop()
    assert bridge.driver.sets == []


def test_a_client_needs_the_key_of_each_server(context, tmp_path):
    """A CURVE client connecting to several servers takes each one's key by address."""
    a_pub, _ = generate_keys(tmp_path, "plant")
    b_pub, _ = generate_keys(tmp_path, "bridge")
    _, own = generate_keys(tmp_path, "controller")
    a, b = free_addresses(2)
    keys = Keys.load(own, servers={b: b_pub})
    assert keys.server_key(b) == Keys.load(own, b_pub).server_public
    with pytest.raises(ConfigError, match=f"{a}: a CURVE client needs this server's public key"):
        CommandClient(context, a, src="c", keys=keys)
    TelemetryReader(context, [b], keys=keys)
    with pytest.raises(ConfigError, match="not a CURVE key file"):
        Keys.load(own, tmp_path / "missing.key")


def test_secret_key_files_are_private_and_public_files_hold_no_secret(tmp_path):
    public, secret = generate_keys(tmp_path, "node")
    assert secret.stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError, match="holds no secret key"):
        Keys.load(public)


def test_without_keys_only_loopback_is_allowed(context):
    with pytest.raises(ConfigError, match="only loopback"):
        Telemetry(context, "tcp://0.0.0.0:5999", src="x")
    with pytest.raises(ConfigError, match="only loopback"):
        CommandClient(context, "tcp://10.1.2.3:5999", src="x")


def test_a_slow_subscriber_never_blocks_the_publisher(context):
    """T31: a burst far above the high-water mark: every send returns at once (drops are
    the subscriber's loss), and the reader keeps what arrived."""
    (address,) = free_addresses(1)
    pub = Telemetry(context, address, src="plant", hwm=10)
    reader = TelemetryReader(context, [address], hwm=10)
    time.sleep(0.2)
    start = time.perf_counter()
    for _ in range(5000):
        pub.send(Heartbeat(role="plant"))
    elapsed = time.perf_counter() - start
    time.sleep(0.1)
    received = list(reader.drain(0.1))
    assert elapsed < 2.0
    assert 0 < len(received) < 5000


def test_oversize_frames_are_refused_by_the_transport(context):
    """T12: a frame above MAXMSGSIZE never reaches the server's decoder."""
    (address,) = free_addresses(1)
    bridge = BridgeThread(context, address)
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(address)
    try:
        raw.send(b"{" + b" " * 70000 + b"}")
        time.sleep(0.3)
    finally:
        bridge.stop()
        raw.close(0)
    assert bridge.driver.sets == [] and sum(bridge.server.rejected.values()) == 0
