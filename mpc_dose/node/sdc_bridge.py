"""The SDC metrics node: metric samples from an IEEE 11073 SDC provider in, ``measurement``
and ``alarm`` messages out, with the link's health.

Each sample goes through :func:`mpc_dose.protocol.sdc.to_measurement` (quality from the
metric's validity and activation, range check, determination time); what it refuses is
counted by reason and noted for the audit log, never published. A metric that gives no
fresh measurement for *stale_s* raises ``sdc.metric_stale`` (and clears it with
``active: false`` when readings come back): the bridge never re-publishes an old value, so
the controller's own staleness gate sees the gap too. The link's loss and return
(``sdc.link_lost``) and a descriptor that does not match the configuration
(``sdc.config_mismatch``: that metric is not published) are alarms as well.

The pump side of the bridge is :class:`mpc_dose.node.pump_bridge.PumpBridgeNode` with an SDC
driver: leases, idempotency, limits and fallback are the pump bridge's, unchanged.

No sockets, no threads, no clock: times are arguments (*now* monotonic, *wall* UTC [s]).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..protocol.messages import MAX_TEXT_CHARS, Alarm, _Message
from ..protocol.sdc import MetricMapping, MetricSample, Refused, to_measurement, unit_problem

__all__ = ["SdcMetricsNode"]


@dataclass
class _Stream:
    mapping: MetricMapping
    enabled: bool = False            # its descriptor was found and matches the configuration
    technical_range: tuple[float | None, float | None] = (None, None)
    last_good_s: float = 0.0         # monotonic time of the last published measurement
    last_determination_s: float | None = None
    stale_alarm: bool = False
    bad_alarm: bool = False
    refused: Counter[str] = field(default_factory=Counter)


class SdcMetricsNode:
    """Turns metric samples into measurements and watches their freshness.

    Parameters
    ----------
    metrics : sequence of MetricMapping
    stale_s : float
        A metric without a fresh measurement for this long raises ``sdc.metric_stale``; a
        sample determined longer ago than this is refused as ``stale`` [s].
    max_future_s : float
        A sample determined more than this after its arrival is refused as ``future`` [s].
    """

    def __init__(self, metrics: Iterable[MetricMapping], *, stale_s: float = 5.0,
                 max_future_s: float = 2.0) -> None:
        self.streams = {m.handle: _Stream(m) for m in metrics}
        self.stale_s, self.max_future_s = stale_s, max_future_s
        #: None before the first connection attempt, then whether the provider is connected
        self.link_up: bool | None = None
        self.published = 0
        #: (kind, fields) for the audit log, taken by :meth:`take_notes`
        self._notes: list[tuple[str, dict]] = []

    # ------------------------------------------------------------------ link
    def connected(self, now: float, descriptors: dict[str, dict | None], provider: str
                  ) -> list[_Message]:
        """The link is up (again): check each metric's descriptor, restart the freshness
        clocks. *descriptors* maps a handle to ``{"kind": node type name, "unit_code": ...,
        "technical_range": (low, high)}`` or None when the device has no such handle."""
        out: list[_Message] = []
        if self.link_up is not True:
            if self.link_up is False:  # it was alarmed: clear it
                out.append(Alarm(code="sdc.link_lost", priority="high", kind="technical",
                                 active=False, text=f"SDC provider {provider} connected"[
                                     :MAX_TEXT_CHARS]))
            self.link_up = True
            self._note("sdc_link", state="up", provider=provider)
        for handle, stream in self.streams.items():
            found = descriptors.get(handle)
            if found is None:
                problem = f"metric {handle!r}: the device has no such metric"
            elif found.get("kind") != "NumericMetricDescriptor":
                problem = (f"metric {handle!r}: the device's descriptor is a "
                           f"{found.get('kind')}, not a NumericMetricDescriptor")
            else:
                problem = unit_problem(stream.mapping, found.get("unit_code"))
            stream.enabled = problem is None
            stream.last_good_s = now        # stale only after stale_s without a reading
            stream.stale_alarm = False
            if problem is None:
                stream.technical_range = found.get("technical_range") or (None, None)
            else:
                self._note("sdc_config_mismatch", handle=handle, text=problem)
                out.append(Alarm(code="sdc.config_mismatch", priority="high",
                                 kind="technical", text=f"{problem}; not published"[
                                     :MAX_TEXT_CHARS]))
        return out

    def disconnected(self, now: float, reason: str) -> list[_Message]:
        """The link is lost (or the first connection failed): one high alarm (readings stop
        by themselves)."""
        if self.link_up is False:
            return []
        self.link_up = False
        self._note("sdc_link", state="down", reason=reason[:500])
        return [Alarm(code="sdc.link_lost", priority="high", kind="technical",
                      text=f"SDC provider lost: {reason}; no readings until it is back"[
                          :MAX_TEXT_CHARS])]

    # ------------------------------------------------------------------ samples
    def receive(self, sample: MetricSample, now: float, wall: float) -> list[_Message]:
        """One metric sample (*now* monotonic, *wall* UTC arrival [s])."""
        stream = self.streams.get(sample.handle)
        if stream is None or not stream.enabled:
            return []               # a metric we do not publish
        result = to_measurement(sample, stream.mapping, arrival_s=wall,
                                max_age_s=self.stale_s, max_future_s=self.max_future_s,
                                last_determination_s=stream.last_determination_s,
                                technical_range=stream.technical_range)
        out: list[_Message] = []
        if isinstance(result, Refused):
            stream.refused[result.code] += 1
            self._note("sdc_refused", handle=sample.handle, code=result.code,
                       text=result.text[:500])
            if result.code != "repeat" and not stream.bad_alarm:
                stream.bad_alarm = True    # one alarm per run of bad samples
                out.append(Alarm(code="sdc.bad_value", priority="medium", kind="technical",
                                 text=f"{result.text}; not published"[:MAX_TEXT_CHARS]))
            return out
        if stream.bad_alarm:
            stream.bad_alarm = False
            out.append(Alarm(code="sdc.bad_value", priority="medium", kind="technical",
                             active=False, text=f"{sample.handle}: values usable again"))
        if stream.stale_alarm:
            stream.stale_alarm = False
            out.append(Alarm(code="sdc.metric_stale", priority="high", kind="technical",
                             active=False, text=f"{sample.handle}: fresh readings again"))
        stream.last_good_s, stream.last_determination_s = now, result.t_meas
        self.published += 1
        return out + [result]

    def check(self, now: float) -> list[_Message]:
        """Alarm each published metric without a fresh measurement for ``stale_s``."""
        out: list[_Message] = []
        for handle, stream in self.streams.items():
            if not (stream.enabled and self.link_up) or stream.stale_alarm:
                continue
            if not now - stream.last_good_s < self.stale_s:
                stream.stale_alarm = True
                self._note("sdc_stale", handle=handle, silent_s=round(now - stream.last_good_s,
                                                                      3))
                out.append(Alarm(code="sdc.metric_stale", priority="high", kind="technical",
                                 text=f"{handle} ({stream.mapping.var}): no fresh reading for "
                                      f"{now - stream.last_good_s:.1f} s; none published"[
                                          :MAX_TEXT_CHARS]))
        return out

    def next_deadline(self, now: float) -> float:
        """When :meth:`check` may next raise an alarm [monotonic s]."""
        times = [s.last_good_s + self.stale_s for s in self.streams.values()
                 if s.enabled and self.link_up and not s.stale_alarm]
        return min(times, default=now + self.stale_s)

    # ------------------------------------------------------------------ audit
    @property
    def refused(self) -> Counter[str]:
        """Refused samples by reason, over every metric."""
        total: Counter[str] = Counter()
        for stream in self.streams.values():
            total.update(stream.refused)
        return total

    def _note(self, kind: str, **fields) -> None:
        self._notes.append((kind, fields))

    def take_notes(self) -> list[tuple[str, dict]]:
        notes, self._notes = self._notes, []
        return notes
