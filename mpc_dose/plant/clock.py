"""Events at absolute simulation times with an explicit order among simultaneous events.

At one instant the plant first takes its sensor samples, then pumps and controllers act,
then the recorder writes the row; simpy orders events of equal time by priority, then by
creation, so the order is stated here rather than left to the order processes were started.
"""

from __future__ import annotations

import simpy
from simpy.events import Event

__all__ = ["SAMPLE", "ACT", "RECORD", "at"]

#: sensor samples at time t (before anyone acts at t)
SAMPLE = 0
#: controller cycles, pump events, message deliveries
ACT = 1
#: the recorder, after everything else at t
RECORD = 2


def at(env: simpy.Environment, t_s: float, priority: int = ACT) -> Event:
    """An event that fires at absolute time *t_s* [s] with *priority* (SAMPLE, ACT, RECORD)."""
    if t_s < env.now:
        raise ValueError(f"cannot schedule at {t_s} s: it is already {env.now} s")
    event = Event(env)
    event._ok = True
    event._value = None
    env.schedule(event, priority, t_s - env.now)
    return event
