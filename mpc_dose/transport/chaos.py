"""A seeded chaos proxy for fault-injection tests: sits between command clients (DEALER) and
a command server (ROUTER) and drops, delays, duplicates, reorders or corrupts frames in
each direction, logging every action so a failure can be replayed.

    proxy = ChaosProxy(context, front="tcp://127.0.0.1:6000", back="tcp://127.0.0.1:6001",
                       policy=ChaosPolicy(drop_p=0.3), seed=1).start()
    ...
    proxy.stop()

Clients connect to *front*; the proxy connects to the server at *back*. Loopback only.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import zmq

__all__ = ["ChaosPolicy", "ChaosProxy"]


@dataclass(frozen=True)
class ChaosPolicy:
    """What happens to each frame of one direction (probabilities per frame)."""

    drop_p: float = 0.0
    dup_p: float = 0.0
    corrupt_p: float = 0.0
    delay_s: float = 0.0
    #: hold this many frames and release them in random order (0: keep order)
    reorder_window: int = 0
    #: drop everything (a partition) while True
    blackhole: bool = False


class ChaosProxy:
    """ROUTER (front, for clients) <-> DEALER per client (back, to the server)."""

    def __init__(self, context: zmq.Context, *, front: str, back: str,
                 policy: ChaosPolicy = ChaosPolicy(), reply_policy: ChaosPolicy | None = None,
                 seed: int = 0) -> None:
        self.context, self.back = context, back
        self.policy, self.reply_policy = policy, reply_policy or ChaosPolicy()
        self.rng = random.Random(seed)
        self.front = context.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.front.bind(front)
        self._backs: dict[bytes, zmq.Socket] = {}
        self._pending: list[tuple[float, str, bytes, bytes]] = []   # (due, way, id, frame)
        self._held: dict[str, list[tuple[bytes, bytes]]] = {"up": [], "down": []}
        self.log: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-proxy", daemon=True)

    def start(self) -> ChaosProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _back_for(self, identity: bytes) -> zmq.Socket:
        sock = self._backs.get(identity)
        if sock is None:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.back)
            self._backs[identity] = sock
        return sock

    def _apply(self, way: str, identity: bytes, frame: bytes) -> None:
        policy = self.policy if way == "up" else self.reply_policy
        now = time.monotonic()
        if policy.blackhole or self.rng.random() < policy.drop_p:
            self.log.append((now, way, "drop"))
            return
        if self.rng.random() < policy.corrupt_p and frame:
            k = self.rng.randrange(len(frame))
            frame = frame[:k] + bytes([frame[k] ^ (1 << self.rng.randrange(8))]) + frame[k + 1:]
            self.log.append((now, way, "corrupt"))
        copies = 2 if self.rng.random() < policy.dup_p else 1
        if copies == 2:
            self.log.append((now, way, "duplicate"))
        for _ in range(copies):
            if policy.reorder_window:
                held = self._held[way]
                held.append((identity, frame))
                if len(held) >= policy.reorder_window:
                    self.rng.shuffle(held)
                    self.log.append((now, way, "reorder"))
                    for ident, f in held:
                        self._pending.append((now + policy.delay_s, way, ident, f))
                    held.clear()
            else:
                self._pending.append((now + policy.delay_s, way, identity, frame))

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        while not self._stop.is_set():
            for sock in self._backs.values():
                poller.register(sock, zmq.POLLIN)
            events = dict(poller.poll(5))
            if self.front in events:
                while True:
                    try:
                        identity, frame = self.front.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._back_for(identity)
                    self._apply("up", identity, frame)
            for identity, sock in self._backs.items():
                if sock in events:
                    while True:
                        try:
                            frame = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._apply("down", identity, frame)
            now = time.monotonic()
            due = [p for p in self._pending if p[0] <= now]
            self._pending = [p for p in self._pending if p[0] > now]
            for _, way, identity, frame in due:
                try:
                    if way == "up":
                        self._backs[identity].send(frame, zmq.NOBLOCK)
                    else:
                        self.front.send_multipart([identity, frame], zmq.NOBLOCK)
                except zmq.ZMQError:
                    self.log.append((now, way, "lost"))
        for sock in self._backs.values():
            sock.close(0)
        self.front.close(0)
