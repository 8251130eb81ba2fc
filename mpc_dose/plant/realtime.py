"""Wall-clock runs for hardware in the loop: the same processes, a real-time clock, and
deadline misses detected rather than drifted through.

simpy's :class:`~simpy.rt.RealtimeEnvironment` sleeps until each event's wall-clock time.
When the program falls behind (an event is processed later than its due time by more than
*tolerance_s*), :class:`DeadlineEnvironment` records a :class:`DeadlineMiss`; with
``strict=True`` it also raises :class:`DeadlineMissed` so the caller can fail safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import simpy.core
import simpy.rt

__all__ = ["DeadlineEnvironment", "DeadlineMiss", "DeadlineMissed"]


@dataclass(frozen=True)
class DeadlineMiss:
    """An event processed *lag_s* [wall s] after its due time, at simulation time *t_s*."""

    t_s: float
    lag_s: float


class DeadlineMissed(RuntimeError):
    """Raised in strict mode when an event is processed too late."""


class DeadlineEnvironment(simpy.rt.RealtimeEnvironment):
    """A real-time environment that notices when it is late.

    Parameters
    ----------
    factor : float
        Wall seconds per simulation second (1.0 for real time).
    tolerance_s : float
        Lateness [wall s] that counts as a missed deadline.
    strict : bool
        Raise :class:`DeadlineMissed` on the first miss (after recording it).
    idle : callable, optional
        ``idle(timeout_s)`` is called instead of sleeping until the next event (e.g. a
        ZeroMQ poll that schedules the messages it receives); it may add earlier events.
    """

    def __init__(self, initial_time: float = 0.0, factor: float = 1.0, *,
                 tolerance_s: float = 0.05, strict: bool = False, idle=None) -> None:
        # simpy's own strict check is replaced by ours (it only fires past one factor)
        super().__init__(initial_time, factor, strict=False)
        self.tolerance_s = tolerance_s
        self.deadline_strict = strict
        self.misses: list[DeadlineMiss] = []
        self.idle = idle

    def step(self) -> None:
        due = self.peek()
        if due != float("inf"):
            target = self.real_start + (due - self.env_start) * self.factor
            lag = time.monotonic() - target
            if lag > self.tolerance_s:
                self.misses.append(DeadlineMiss(due, lag))
                if self.deadline_strict:
                    raise DeadlineMissed(f"event due at {due:g} s processed {lag:.3f} s late "
                                         f"(tolerance {self.tolerance_s:g} s)")
        if self.idle is None:
            super().step()
            return
        while True:  # wait by polling; a message may schedule an earlier event
            due = self.peek()
            if due == float("inf"):
                raise simpy.core.EmptySchedule
            delta = self.real_start + (due - self.env_start) * self.factor - time.monotonic()
            if delta <= 0:
                break
            self.idle(delta)
        simpy.core.Environment.step(self)
