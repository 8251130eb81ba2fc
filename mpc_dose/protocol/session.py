"""Sessions between a controller and a pump side, sans-I/O: the link state machine (its
transitions are data), message ordering per sender, and command leases.

Nothing here reads a clock: every method takes ``now`` (monotonic seconds of the caller).

- :class:`LinkSession` is one side's view of its peer: ``DISCONNECTED -> HELLO -> SNAPSHOT ->
  READY``, ``READY -> LOST`` when the peer falls silent (3 missed heartbeats), back through
  ``SNAPSHOT`` when it speaks again (a status snapshot before the first new command, after the
  zguide "Clone" pattern). A new peer epoch (a restart) also goes back to ``SNAPSHOT``.
- :class:`SequenceTracker` classifies each (src, epoch, seq): new, duplicate, stale
  (out of order or from an old epoch) and counts gaps (lost messages).
- :class:`Lease` holds a command until its end on the receiver's own clock.
- :class:`PeerBudget` limits the frames each peer may have handled per second (a token
  bucket), so one flooding sender cannot starve the others or the receiver's own duties.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = ["LINK_TRANSITIONS", "LinkSession", "SequenceTracker", "Lease", "Transition",
           "PeerBudget"]

#: (state, event) -> next state. Any pair not listed leaves the state unchanged.
LINK_TRANSITIONS: dict[tuple[str, str], str] = {
    ("DISCONNECTED", "connect"): "HELLO",
    ("HELLO", "hello_ack"): "SNAPSHOT",
    ("SNAPSHOT", "snapshot"): "READY",
    ("READY", "silence"): "LOST",
    ("SNAPSHOT", "silence"): "LOST",
    ("HELLO", "silence"): "LOST",
    ("LOST", "heard"): "SNAPSHOT",
    ("READY", "new_epoch"): "SNAPSHOT",
    ("LOST", "new_epoch"): "SNAPSHOT",
    ("HELLO", "close"): "DISCONNECTED",
    ("SNAPSHOT", "close"): "DISCONNECTED",
    ("READY", "close"): "DISCONNECTED",
    ("LOST", "close"): "DISCONNECTED",
}


@dataclass(frozen=True)
class Transition:
    t_s: float
    source: str
    target: str
    event: str
    cause: str


@dataclass
class LinkSession:
    """One side's view of a peer; commands may be sent only in ``READY``.

    Parameters
    ----------
    heartbeat_s : float
        The peer's heartbeat period [s]; any message from it counts as one.
    liveness : int
        Missed heartbeats after which the peer is ``LOST`` (zguide Paranoid Pirate: 3).
    """

    heartbeat_s: float = 1.0
    liveness: int = 3
    state: str = "DISCONNECTED"
    peer_epoch: str | None = None
    last_heard_s: float | None = None
    transitions: list[Transition] = field(default_factory=list)

    def fire(self, event: str, now: float, cause: str = "") -> str:
        """Apply *event*; returns the (possibly new) state. Every change is logged."""
        target = LINK_TRANSITIONS.get((self.state, event))
        if target is not None and target != self.state:
            self.transitions.append(Transition(now, self.state, target, event, cause))
            self.state = target
        return self.state

    def heard(self, now: float, epoch: str | None = None) -> str:
        """The peer sent something (in epoch *epoch*)."""
        self.last_heard_s = now
        if epoch is not None and self.peer_epoch is not None and epoch != self.peer_epoch:
            self.peer_epoch = epoch
            return self.fire("new_epoch", now, f"peer restarted (epoch {epoch})")
        if epoch is not None:
            self.peer_epoch = epoch
        return self.fire("heard", now, "peer heard again") if self.state == "LOST" \
            else self.state

    def check(self, now: float) -> str:
        """Declare the peer lost when silent for *liveness* heartbeats."""
        if self.last_heard_s is not None and \
                now - self.last_heard_s > self.liveness * self.heartbeat_s:
            return self.fire("silence", now, f"nothing heard for "
                                             f"{now - self.last_heard_s:.1f} s")
        return self.state

    @property
    def can_command(self) -> bool:
        return self.state == "READY"


@dataclass
class SequenceTracker:
    """Per (src, epoch) ordering: ``new``, ``duplicate`` or ``stale`` for each message.

    A sender's epoch changes when it restarts; messages of an epoch older than the one in
    force are ``stale`` (a replay or a message from before the restart). ``gaps`` counts
    the messages skipped (lost) in between accepted ones.
    """

    epochs: dict[str, str] = field(default_factory=dict)
    last_seq: dict[str, int] = field(default_factory=dict)
    retired: dict[str, set[str]] = field(default_factory=dict)
    gaps: int = 0
    duplicates: int = 0
    stale: int = 0

    def classify(self, src: str, epoch: str, seq: int) -> str:
        current = self.epochs.get(src)
        if current is None or (epoch != current and epoch not in self.retired.get(src, ())):
            if current is not None:
                self.retired.setdefault(src, set()).add(current)
            self.epochs[src], self.last_seq[src] = epoch, seq
            return "new"
        if epoch != current:
            self.stale += 1
            return "stale"
        last = self.last_seq[src]
        if seq == last:
            self.duplicates += 1
            return "duplicate"
        if seq < last:
            self.stale += 1
            return "stale"
        self.gaps += seq - last - 1
        self.last_seq[src] = seq
        return "new"


@dataclass
class Lease:
    """A command held from *start_s* for *lease_s* on the holder's monotonic clock."""

    cmd_id: str
    start_s: float
    lease_s: float

    @property
    def end_s(self) -> float:
        return self.start_s + self.lease_s

    def remaining(self, now: float) -> float:
        return max(0.0, self.end_s - now)

    def expired(self, now: float) -> bool:
        return now >= self.end_s


@dataclass
class PeerBudget:
    """A token bucket per peer: *rate_per_s* frames a second on average, *burst* at once.

    ``allow(peer, now)`` says whether one more frame from *peer* may be handled; the frames
    refused since the peer's last report are counted in :attr:`dropped`. At most
    *max_peers* buckets are kept (the least recently seen goes first), so a sender that
    keeps changing its identity cannot grow the table without bound.
    """

    rate_per_s: float
    burst: float
    max_peers: int = 4096
    _buckets: OrderedDict = field(default_factory=OrderedDict)
    dropped: dict[bytes, int] = field(default_factory=dict)

    def allow(self, peer: bytes, now: float) -> bool:
        tokens, last = self._buckets.pop(peer, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate_per_s)
        allowed = tokens >= 1.0
        self._buckets[peer] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)
        if not allowed:
            self.dropped[peer] = self.dropped.get(peer, 0) + 1
        return allowed

    def take_dropped(self) -> dict[bytes, int]:
        """The frames refused per peer since the last call."""
        out, self.dropped = self.dropped, {}
        return out
