"""What the monitor knows of each loop: protocol envelopes in, a JSON-ready view out.

No sockets, clocks or web stack (after h11's sans-I/O split): the caller passes each envelope
with the loop it belongs to, the address it came from and the receiving instant, and asks
for a view with a cursor; the view holds only the points a browser has not had yet.

A **loop** is a named group of telemetry addresses (``NAME=ADDRESS`` on the command line;
unnamed addresses form the loop ``loop``): its plant or sensors (``measurement``), pumps
(``pump_status``), controller (``plan``, protocol 1.2) and everybody's ``alarm`` and
``heartbeat``. Every message arrives already validated by the codec, so every number here
is finite; a reading flagged other than ``valid`` or ``questionable`` is shown with its flag
and left out of the chart (a gap), never drawn as a value.

Times: readings are placed at their sample time ``t_meas``, plans at their stages' times,
both on the loop's clock (simulated seconds in a simulated run, else UTC). A message
without ``t_sim`` (a pump bridge's status in a simulated run) is placed at its ``t_sent``
moved by the loop's latest ``t_sim - t_sent``. Ages (link health, last reading) are counted
on the receiver's monotonic clock, so clocks of other machines never enter them.

Link health follows docs/protocol.md: any message counts as a heartbeat; a sender silent
for more than 3 of its heartbeat periods (1 s until it has sent a heartbeat) is ``lost``,
for more than 1.5 ``late``; one whose last heartbeat said ``finished`` has ``ended``. Gaps
in a sender's ``seq`` within one ``epoch`` are counted as lost messages; a new epoch is a
restart.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..protocol.codec import Envelope
from ..protocol.messages import (Alarm, AlarmAck, Heartbeat, Measurement, Plan, PumpStatus,
                                 wire_factor)

__all__ = ["MonitorState", "AlarmEntry", "UnknownAlarm", "loops_of", "DEFAULT_WINDOW_S",
           "DEFAULT_LOOP"]

#: [s] history kept and shown per series (on the loop's clock)
DEFAULT_WINDOW_S = 1800.0
#: points kept per series, whatever the window (a 1-Hz sensor for 2 h)
MAX_POINTS = 7200
#: alarms kept (the oldest inactive ones go first)
MAX_ALARMS = 200
#: the loop of telemetry addresses given without a name
DEFAULT_LOOP = "loop"
#: readings drawn in the chart; others are shown with their flag only
_DRAWN = ("valid", "questionable")


class UnknownAlarm(LookupError):
    """An acknowledgement names an alarm the monitor does not hold (or holds acknowledged)."""


class _Series:
    """A bounded (time, value) history; *total* counts every point ever added and *gen*
    changes when the history restarts (the loop's clock went back: a restarted plant)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.points: deque[tuple[float, float | None]] = deque(maxlen=MAX_POINTS)
        self.total = 0
        self.gen = 0

    def add(self, t: float, value: float | None) -> None:
        points = self.points
        if points and t < points[-1][0] - self.window_s:
            points.clear()
            self.gen += 1
        points.append((t, value))
        self.total += 1
        while points[0][0] < t - self.window_s:
            points.popleft()

    def since(self, seen: tuple[int, int] | None) -> dict:
        """The points after *seen* (gen, total), or all when the generation differs."""
        if seen is None or seen[0] != self.gen:
            new, reset = len(self.points), True
        else:
            new, reset = min(self.total - seen[1], len(self.points)), False
        points = list(self.points)[len(self.points) - new:] if new > 0 else []
        return {"reset": reset, "points": [[t, v] for t, v in points]}


@dataclass
class AlarmEntry:
    """One alarm condition (loop, sender, code) as the latest frame raising it says."""

    id: int
    loop: str
    src: str
    epoch: str
    seq: int
    code: str
    priority: str
    kind: str
    text: str
    active: bool
    t: float
    count: int = 1
    received: float = 0.0
    #: (operator, wall time [s], note) once acknowledged
    ack: tuple[str, float, str] | None = None

    def view(self, now: float) -> dict:
        return {"id": self.id, "loop": self.loop, "src": self.src, "code": self.code,
                "priority": self.priority, "kind": self.kind, "text": self.text,
                "active": self.active, "t": self.t, "count": self.count,
                "age_s": max(0.0, now - self.received),
                "ack": None if self.ack is None else
                {"operator": self.ack[0], "t_wall": self.ack[1], "note": self.ack[2]}}


@dataclass
class _Link:
    """What one sender at one address said last, and when."""

    loop: str
    address: str
    src: str
    epoch: str = ""
    seq: int = -1
    messages: int = 0
    lost: int = 0
    restarts: int = 0
    received: float = 0.0
    role: str = ""
    state: str = ""
    period_s: float | None = None


@dataclass
class _Pump:
    status: PumpStatus
    received: float
    delivered: _Series


@dataclass
class _Loop:
    name: str
    window_s: float
    #: loop clock minus the senders' wall clock [s], from the latest envelope with t_sim
    offset_s: float | None = None
    t_last: float | None = None
    readings: dict[str, tuple[Measurement, float, str]] = field(default_factory=dict)
    measured: dict[str, _Series] = field(default_factory=dict)
    pumps: dict[str, _Pump] = field(default_factory=dict)
    plan: tuple[Plan, str, float] | None = None
    #: the controller's heartbeat state (its mode) when it publishes no plan
    heartbeat_mode: str = ""

    def series(self, var: str) -> _Series:
        if var not in self.measured:
            self.measured[var] = _Series(self.window_s)
        return self.measured[var]


class MonitorState:
    """Every loop's latest values and histories, the alarms and the links.

    Parameters
    ----------
    window_s : float
        History kept per series [s of the loop's clock].
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.window_s = window_s
        self.loops: dict[str, _Loop] = {}
        self.alarms: list[AlarmEntry] = []
        self.links: dict[tuple[str, str], _Link] = {}
        #: frames refused by the codec, per address (the reader counts them)
        self.rejected: dict[str, int] = {}
        self._alarm_ids = 0

    def loop(self, name: str) -> _Loop:
        if name not in self.loops:
            self.loops[name] = _Loop(name, self.window_s)
        return self.loops[name]

    # ------------------------------------------------------------------ in
    def receive(self, loop_name: str, address: str, envelope: Envelope,
                received: float) -> None:
        """Take in one envelope of loop *loop_name* from *address*, received at monotonic
        time *received* [s]."""
        loop = self.loop(loop_name)
        self._link(loop_name, address, envelope, received)
        if envelope.t_sim is not None:
            loop.offset_s = envelope.t_sim - envelope.t_sent
        t = self._time(loop, envelope)
        m = envelope.message
        if isinstance(m, Measurement):
            loop.readings[m.var] = (m, received, envelope.src)
            # a reading flagged unusable is a gap in the chart (None), never a value
            loop.series(m.var).add(m.t_meas, m.value if m.quality in _DRAWN else None)
            self._clock(loop, m.t_meas)
        elif isinstance(m, PumpStatus):
            pump = loop.pumps.get(m.pump)
            if pump is None:
                pump = loop.pumps[m.pump] = _Pump(m, received, _Series(self.window_s))
            pump.status, pump.received = m, received
            running = m.rate * wire_factor(m.unit, "mL/h") if m.state == "infusing" else 0.0
            pump.delivered.add(t, running)
            self._clock(loop, t)
        elif isinstance(m, Plan):
            loop.plan = (m, envelope.src, received)
            self._clock(loop, m.times_s[0])
        elif isinstance(m, Alarm):
            self._alarm(loop_name, envelope, m, t, received)
        elif isinstance(m, AlarmAck):
            self._acknowledged_elsewhere(m, envelope.t_sent)
        elif isinstance(m, Heartbeat) and m.role == "controller" and m.state not in \
                ("", "tick"):
            loop.heartbeat_mode = m.state

    def _time(self, loop: _Loop, envelope: Envelope) -> float:
        if envelope.t_sim is not None:
            return envelope.t_sim
        return envelope.t_sent + (loop.offset_s or 0.0)

    @staticmethod
    def _clock(loop: _Loop, t: float) -> None:
        loop.t_last = t if loop.t_last is None else max(loop.t_last, t)

    def _link(self, loop_name: str, address: str, envelope: Envelope, received: float) -> None:
        key = (address, envelope.src)
        link = self.links.get(key)
        if link is None:
            link = self.links[key] = _Link(loop_name, address, envelope.src)
        if link.epoch and envelope.epoch != link.epoch:
            link.restarts += 1
            link.seq = -1
        elif link.seq >= 0 and envelope.seq > link.seq + 1:
            link.lost += envelope.seq - link.seq - 1
        link.epoch = envelope.epoch
        link.seq = max(link.seq, envelope.seq)
        link.messages += 1
        link.received = received
        m = envelope.message
        if isinstance(m, Heartbeat):
            link.role, link.state, link.period_s = m.role, m.state, m.period_s

    def _alarm(self, loop_name: str, envelope: Envelope, m: Alarm, t: float,
               received: float) -> None:
        for entry in reversed(self.alarms):
            if (entry.loop, entry.src, entry.code) == (loop_name, envelope.src, m.code) \
                    and entry.active:
                # the same condition again (or its end): one entry, its latest frame
                entry.epoch, entry.seq, entry.t, entry.received = \
                    envelope.epoch, envelope.seq, t, received
                entry.text, entry.active, entry.kind = m.text, m.active, m.kind
                if m.active:
                    entry.count += 1
                    if _RANK[m.priority] > _RANK[entry.priority]:
                        entry.priority, entry.ack = m.priority, None  # worse: new signal
                return
        if not m.active:
            return  # the end of a condition the monitor never saw start
        self._alarm_ids += 1
        self.alarms.append(AlarmEntry(self._alarm_ids, loop_name, envelope.src,
                                      envelope.epoch, envelope.seq, m.code, m.priority,
                                      m.kind, m.text, True, t, received=received))
        if len(self.alarms) > MAX_ALARMS:
            done = next((a for a in self.alarms if not a.active), self.alarms[0])
            self.alarms.remove(done)

    def _acknowledged_elsewhere(self, ack: AlarmAck, t_wall: float) -> None:
        """Another monitor's acknowledgement (its ``--ack`` address given as telemetry)
        acknowledges the condition (sender and code) here too."""
        for entry in self.alarms:
            if (entry.src, entry.code) == (ack.alarm_src, ack.code) and entry.ack is None:
                entry.ack = (ack.operator, t_wall, ack.text)

    # ------------------------------------------------------------------ acknowledge
    def ack_message(self, alarm_id: int, operator: str, note: str = "") -> AlarmAck:
        """The ``alarm_ack`` for alarm *alarm_id* by *operator* (not yet recorded: the
        caller logs and sends it, then calls :meth:`acknowledged`).

        Raises
        ------
        UnknownAlarm
            For an id the monitor does not hold, or one already acknowledged.
        LocalProtocolError
            For an operator name or note that cannot travel (empty, too long).
        """
        entry = self._entry(alarm_id)
        if entry.ack is not None:
            raise UnknownAlarm(f"alarm {alarm_id} ({entry.code}) was already acknowledged "
                               f"by {entry.ack[0]}")
        return AlarmAck(alarm_src=entry.src, alarm_epoch=entry.epoch, alarm_seq=entry.seq,
                        code=entry.code, priority=entry.priority, operator=operator,
                        text=note)

    def acknowledged(self, alarm_id: int, ack: AlarmAck, t_wall: float) -> None:
        self._entry(alarm_id).ack = (ack.operator, t_wall, ack.text)

    def _entry(self, alarm_id: int) -> AlarmEntry:
        for entry in self.alarms:
            if entry.id == alarm_id:
                return entry
        raise UnknownAlarm(f"no alarm {alarm_id!r} (it may have been dropped: the monitor "
                           f"keeps the latest {MAX_ALARMS})")

    # ------------------------------------------------------------------ out
    def view(self, cursor: Mapping[str, tuple[int, int]] | None, now: float
             ) -> tuple[dict, dict[str, tuple[int, int]]]:
        """Everything a page shows, with only the series points after *cursor* (None: all),
        and the cursor to pass next time. *now* is the monotonic time [s]."""
        cursor = dict(cursor or {})
        loops = [self._loop_view(loop, cursor, now) for loop in self.loops.values()]
        links = []
        for link in self.links.values():
            age = max(0.0, now - link.received)
            period = link.period_s or 1.0
            status = "ended" if link.state == "finished" else "lost" if age > 3 * period \
                else "late" if age > 1.5 * period else "ok"
            links.append({"loop": link.loop, "address": link.address, "src": link.src,
                          "role": link.role, "state": link.state, "age_s": age,
                          "period_s": link.period_s, "status": status,
                          "messages": link.messages, "lost": link.lost,
                          "restarts": link.restarts, "epoch": link.epoch})
        alarms = [a.view(now) for a in sorted(self.alarms, key=_alarm_order)]
        return ({"loops": loops, "alarms": alarms, "links": links,
                 "rejected": dict(self.rejected)}, cursor)

    def _loop_view(self, loop: _Loop, cursor: dict, now: float) -> dict:
        plan_view, conversions = None, {}
        var = next(iter(loop.readings), "")
        if loop.plan is not None:
            plan, src, received = loop.plan
            var = plan.var or var
            plan_view = {"src": src, "age_s": max(0.0, now - received),
                         "times_s": list(plan.times_s), "predicted": list(plan.predicted),
                         "output": plan.output, "unit": plan.unit, "target": plan.target,
                         "band_low": plan.band_low, "band_high": plan.band_high,
                         "mode": plan.mode, "status": plan.status, "reason": plan.reason,
                         "solve_s": plan.solve_s, "deadline_misses": plan.deadline_misses,
                         "inputs": [{"input": i.input, "pump": i.pump, "unit": i.unit,
                                     "rates": list(i.rates)} for i in plan.inputs]}
            for item in plan.inputs:
                if item.conc is not None:
                    amount = item.unit.split("/")[0]
                    # mL/h x amount/mL = amount/h, then into the plan's unit
                    conversions[item.pump] = (item.input, item.unit, item.conc * wire_factor(
                        f"{amount}/h", item.unit))
        readings = []
        for name, (m, received, src) in loop.readings.items():
            readings.append({"var": name, "value": m.value, "unit": m.unit,
                             "quality": m.quality, "t": m.t_meas, "src": src,
                             "age_s": max(0.0, now - received)})
        measured = None
        if var in loop.measured:
            key = f"{loop.name}|m|{var}"
            series = loop.measured[var]
            measured = {"key": key, **series.since(cursor.get(key))}
            cursor[key] = (series.gen, series.total)
        pumps = []
        for name, pump in loop.pumps.items():
            s = pump.status
            key = f"{loop.name}|p|{name}"
            input_name, unit, factor = conversions.get(name, (name, "mL/h", 1.0))
            pumps.append({"pump": name, "input": input_name, "state": s.state,
                          "rate": s.rate, "rate_unit": s.unit, "mode": s.mode,
                          "lease_remaining_s": s.lease_remaining_s,
                          "delivered": s.delivered, "vol_unit": s.vol_unit,
                          "age_s": max(0.0, now - pump.received),
                          "series": {"key": key, "unit": unit, "factor": factor,
                                     **pump.delivered.since(cursor.get(key))}})
            cursor[key] = (pump.delivered.gen, pump.delivered.total)
        mode = loop.plan[0].mode if loop.plan is not None and loop.plan[0].mode else \
            loop.heartbeat_mode
        return {"name": loop.name, "var": var, "mode": mode, "t_last": loop.t_last,
                "window_s": loop.window_s, "readings": readings, "measured": measured,
                "plan": plan_view, "pumps": pumps}


_RANK = {"low": 0, "medium": 1, "high": 2}


def _alarm_order(entry: AlarmEntry) -> tuple:
    """Unacknowledged active alarms first, by priority, then the newest."""
    return (not entry.active, entry.ack is not None, -_RANK[entry.priority], -entry.id)


def loops_of(items: Iterable[str]) -> list[tuple[str, str]]:
    """``NAME=ADDRESS`` or ``ADDRESS`` items -> (loop, address) pairs (unnamed: the loop
    :data:`DEFAULT_LOOP`)."""
    out = []
    for item in items:
        name, sep, address = item.partition("=")
        if sep and "://" not in name and name:
            out.append((name, address))
        else:
            out.append((DEFAULT_LOOP, item))
    return out
