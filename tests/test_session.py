"""Link sessions, message ordering and leases (:mod:`mpc_dose.protocol.session`): the link
state machine is data and every listed transition is reachable, unlisted pairs change nothing,
silence loses the peer and hearing it again goes back through SNAPSHOT; the sequence tracker
never accepts the same message twice; a lease ends exactly at its end."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_dose.protocol.session import (
    LINK_TRANSITIONS,
    Lease,
    LinkSession,
    SequenceTracker,
    Transition,
)

STATES = sorted({s for s, _ in LINK_TRANSITIONS} | set(LINK_TRANSITIONS.values()))
EVENTS = sorted({e for _, e in LINK_TRANSITIONS})


def path_to(state: str) -> list[str]:
    """The events leading from DISCONNECTED to *state* (breadth first over the table)."""
    paths = {"DISCONNECTED": []}
    queue = deque(["DISCONNECTED"])
    while queue:
        here = queue.popleft()
        for (source, event), target in LINK_TRANSITIONS.items():
            if source == here and target not in paths:
                paths[target] = paths[here] + [event]
                queue.append(target)
    return paths[state]


def session_in(state: str) -> LinkSession:
    """A session driven into *state* through fire() only; its log is then cleared."""
    session = LinkSession()
    for k, event in enumerate(path_to(state)):
        session.fire(event, float(k), "set-up")
    assert session.state == state
    session.transitions.clear()
    return session


# ---------------------------------------------------------------------------- the table
def test_the_table_has_the_documented_states_and_events():
    assert STATES == ["DISCONNECTED", "HELLO", "LOST", "READY", "SNAPSHOT"]
    assert set(EVENTS) == {"connect", "hello_ack", "snapshot", "silence", "heard",
                           "new_epoch", "close"}
    assert all(source != target for (source, _), target in LINK_TRANSITIONS.items())


def test_every_state_is_reachable_from_disconnected():
    assert path_to("READY") == ["connect", "hello_ack", "snapshot"]
    for state in STATES:
        path_to(state)  # KeyError when unreachable


@pytest.mark.parametrize("pair, target", LINK_TRANSITIONS.items(),
                         ids=[f"{s}-{e}" for s, e in LINK_TRANSITIONS])
def test_every_listed_transition_is_reachable_and_logged_with_its_cause(pair, target):
    source, event = pair
    session = session_in(source)
    assert session.fire(event, 42.0, f"because {event}") == target
    assert session.state == target
    assert session.transitions == [Transition(42.0, source, target, event, f"because {event}")]


UNLISTED = [(s, e) for s in STATES for e in EVENTS + ["bogus"] if (s, e) not in LINK_TRANSITIONS]


@pytest.mark.parametrize("state, event", UNLISTED, ids=[f"{s}-{e}" for s, e in UNLISTED])
def test_unlisted_pairs_leave_the_state_and_log_nothing(state, event):
    session = session_in(state)
    assert session.fire(event, 42.0, "ignored") == state
    assert session.state == state
    assert session.transitions == []


def test_close_from_every_connected_state_disconnects():
    for state in ("HELLO", "SNAPSHOT", "READY", "LOST"):
        assert session_in(state).fire("close", 1.0) == "DISCONNECTED"


def test_can_command_only_in_ready():
    assert {s: session_in(s).can_command for s in STATES} == {
        "DISCONNECTED": False, "HELLO": False, "SNAPSHOT": False, "READY": True,
        "LOST": False}


# ---------------------------------------------------------------------------- liveness
def ready(now: float = 0.0, epoch: str = "p1", **kw) -> LinkSession:
    session = LinkSession(**kw)
    session.fire("connect", now, "start")
    session.heard(now, epoch)
    session.fire("hello_ack", now, "hello answered")
    session.fire("snapshot", now, "status received")
    assert session.state == "READY"
    return session


def test_peer_silent_for_liveness_heartbeats_is_lost():
    session = ready(10.0, heartbeat_s=0.5, liveness=3)   # lost after 1.5 s of silence
    assert session.check(11.49) == "READY"
    assert session.can_command
    assert session.check(11.51) == "LOST"
    assert not session.can_command
    last = session.transitions[-1]
    assert (last.source, last.target, last.event, last.t_s) == ("READY", "LOST", "silence",
                                                                11.51)
    assert "1.5 s" in last.cause


def test_each_message_heard_counts_as_a_heartbeat():
    session = ready(0.0, heartbeat_s=1.0, liveness=3)
    for t in (2.5, 5.0, 7.5, 10.0):
        session.heard(t, "p1")
        assert session.check(t + 2.9) == "READY"
    assert session.check(13.1) == "LOST"


def test_never_heard_peer_is_not_declared_lost_by_check():
    session = LinkSession()
    assert session.check(1e6) == "DISCONNECTED"
    assert session.transitions == []


def test_lost_peer_heard_again_goes_back_through_snapshot():
    session = ready(0.0)
    session.check(10.0)
    assert session.heard(11.0, "p1") == "SNAPSHOT"
    assert not session.can_command
    assert session.transitions[-1].event == "heard"
    assert session.transitions[-1].cause
    assert session.fire("snapshot", 11.5, "status received") == "READY"
    assert [(t.source, t.target) for t in session.transitions[-3:]] == [
        ("READY", "LOST"), ("LOST", "SNAPSHOT"), ("SNAPSHOT", "READY")]


def test_hearing_a_live_peer_changes_nothing():
    session = ready(0.0)
    before = list(session.transitions)
    assert session.heard(0.5, "p1") == "READY"
    assert session.heard(0.7) == "READY"     # a message without an epoch
    assert session.transitions == before
    assert session.last_heard_s == 0.7


@pytest.mark.parametrize("lost", [False, True], ids=["ready", "lost"])
def test_new_peer_epoch_goes_back_to_snapshot(lost):
    session = ready(0.0, epoch="p1")
    if lost:
        session.check(10.0)
    assert session.heard(11.0, "p2") == "SNAPSHOT"
    assert session.peer_epoch == "p2"
    last = session.transitions[-1]
    assert (last.event, last.target) == ("new_epoch", "SNAPSHOT")
    assert "p2" in last.cause
    # the same new epoch heard again is not another restart
    session.fire("snapshot", 12.0, "status")
    assert session.heard(12.5, "p2") == "READY"


def test_first_epoch_heard_is_recorded_without_a_transition():
    session = LinkSession()
    session.fire("connect", 0.0)
    assert session.heard(0.1, "p1") == "HELLO"
    assert session.peer_epoch == "p1"
    assert [t.event for t in session.transitions] == ["connect"]


# ---------------------------------------------------------------------------- ordering
def test_first_message_of_a_sender_is_new_and_increasing_seqs_are_new():
    tracker = SequenceTracker()
    assert [tracker.classify("a", "e1", s) for s in (5, 6, 7)] == ["new"] * 3
    assert (tracker.gaps, tracker.duplicates, tracker.stale) == (0, 0, 0)


def test_same_seq_again_is_a_duplicate():
    tracker = SequenceTracker()
    tracker.classify("a", "e1", 5)
    assert tracker.classify("a", "e1", 5) == "duplicate"
    assert tracker.duplicates == 1


def test_lower_seq_is_stale_and_does_not_move_the_high_water_mark():
    tracker = SequenceTracker()
    tracker.classify("a", "e1", 5)
    assert tracker.classify("a", "e1", 3) == "stale"
    assert tracker.stale == 1
    assert tracker.classify("a", "e1", 4) == "stale"
    assert tracker.classify("a", "e1", 6) == "new"


def test_retired_epoch_is_stale_even_with_a_higher_seq():
    tracker = SequenceTracker()
    tracker.classify("a", "e1", 100)
    assert tracker.classify("a", "e2", 0) == "new"           # the sender restarted
    assert tracker.classify("a", "e1", 101) == "stale"       # a replay of the old epoch
    assert tracker.classify("a", "e1", 1000) == "stale"
    assert tracker.stale == 2
    assert tracker.classify("a", "e2", 1) == "new"
    assert tracker.classify("a", "e3", 0) == "new"
    assert tracker.classify("a", "e2", 2) == "stale"         # every older epoch stays retired


def test_gaps_count_the_skipped_seqs():
    tracker = SequenceTracker()
    for seq in (1, 2, 5, 6, 10):
        tracker.classify("a", "e1", seq)
    assert tracker.gaps == 2 + 3
    tracker.classify("a", "e1", 7)          # stale: no gap, no change
    tracker.classify("a", "e2", 50)         # a new epoch starts anywhere: no gap
    assert tracker.gaps == 5


def test_sources_are_tracked_independently():
    tracker = SequenceTracker()
    tracker.classify("a", "e1", 10)
    assert tracker.classify("b", "e1", 1) == "new"
    assert tracker.classify("b", "e2", 1) == "new"
    assert tracker.classify("a", "e1", 11) == "new"       # b's restart did not retire a's e1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 3), st.integers(0, 6)),
                max_size=60))
def test_classify_never_accepts_the_same_message_twice(events):
    tracker = SequenceTracker()
    accepted: set[tuple[int, int, int]] = set()
    counts = {"new": 0, "duplicate": 0, "stale": 0}
    for src, epoch, seq in events:
        verdict = tracker.classify(f"s{src}", f"e{epoch}", seq)
        assert verdict in counts
        counts[verdict] += 1
        if verdict == "new":
            assert (src, epoch, seq) not in accepted
            accepted.add((src, epoch, seq))
    assert (tracker.duplicates, tracker.stale) == (counts["duplicate"], counts["stale"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40, unique=True))
def test_gaps_equal_the_seqs_skipped_between_accepted_ones(seqs):
    tracker = SequenceTracker()
    accepted = [s for s in seqs if tracker.classify("a", "e1", s) == "new"]
    assert accepted == sorted(accepted)
    assert tracker.gaps == accepted[-1] - accepted[0] - (len(accepted) - 1)


# ---------------------------------------------------------------------------- leases
def test_lease_remaining_counts_down_to_zero():
    lease = Lease("c1", start_s=100.0, lease_s=15.0)
    assert lease.end_s == 115.0
    assert lease.remaining(100.0) == 15.0
    assert lease.remaining(110.0) == 5.0
    assert lease.remaining(115.0) == 0.0
    assert lease.remaining(200.0) == 0.0


def test_lease_expires_exactly_at_its_end():
    lease = Lease("c1", start_s=100.0, lease_s=15.0)
    assert not lease.expired(100.0)
    assert not lease.expired(114.999)
    assert lease.expired(115.0)
    assert lease.expired(116.0)
