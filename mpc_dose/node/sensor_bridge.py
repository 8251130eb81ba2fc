"""The sensor-bridge node: device events in -> ``measurement`` and ``alarm`` messages out.

One structure for every sensor bridge: a device codec (``mpc_dose.protocol.bis_vista``,
``mpc_dose.protocol.nightscout``) turns bytes into device events, an adapter here turns each
into a :class:`DeviceReading` (values with their quality, the device's own key and time)
or a fault, and :class:`SensorBridgeNode` applies the rules every bridge shares:

- a reading is relayed at most once (deduplicated by the device's key: the BIS message's
  sequence number, the Nightscout entry's date);
- a reading older than *stale_after_s* when it arrives, or from the future, is not relayed
  (the controller's staleness rule then acts) and is counted;
- every fault (bad frame, checksum, HTTP error, garbage JSON) is counted and noted, never a
  made-up value;
- alarms, raised once and cleared (``active: false``) when the condition ends:
  ``sensor.link_lost`` (nothing from the device for *link_timeout_s*), ``sensor.stale``
  (no fresh reading for *stale_after_s*), ``sensor.lead_off``, ``sensor.signal_quality``
  (readings flagged invalid/questionable by the device's own quality), ``sensor.bad_data``
  (faults since the last good reading), ``sensor.auth_refused`` (the server refused our
  credentials).

No sockets, no clock: ``now`` is the bridge's monotonic clock [s], ``wall`` UTC [s].
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from ..protocol import bis_vista, nightscout
from ..protocol.messages import Alarm, Measurement, PumpStatus, _Message, wire_factor

__all__ = ["DeviceReading", "SensorBridgeNode", "ALARMS", "bis_reading", "nightscout_reading",
           "TreatmentSink", "BisVars", "KEYS_KEPT", "BIS_KEYS_KEPT"]

#: every alarm a sensor bridge raises: code -> (priority, what it means)
ALARMS: dict[str, tuple[str, str]] = {
    "sensor.link_lost": ("high", "nothing received from the device"),
    "sensor.stale": ("high", "no fresh reading"),
    "sensor.lead_off": ("high", "an electrode is off (failed impedance check)"),
    "sensor.signal_quality": ("medium", "readings flagged by the device's signal quality"),
    "sensor.bad_data": ("low", "bad frames or answers since the last good reading"),
    "sensor.auth_refused": ("high", "the server refused the credentials"),
}
#: how many device keys are remembered for deduplication (Nightscout: entry dates)
KEYS_KEPT = 1024
#: a reading stamped this far past the wall clock is from the future [s]
FUTURE_TOLERANCE_S = 60.0


@dataclass(frozen=True)
class DeviceReading:
    """What one device event says, in protocol terms.

    *values*: ``(var, value, unit, quality)`` per published variable; *t_meas* the device's
    sample time [UTC s] (None: stamped on arrival); *key* the device's identity of the
    sample (deduplication); *conditions* what made it less than valid (drives alarms);
    *fields* everything decoded, for the audit log.
    """

    key: object
    t_meas: float | None
    values: tuple[tuple[str, float, str, str], ...]
    conditions: frozenset[str] = frozenset()
    fields: dict = field(default_factory=dict)


class SensorBridgeNode:
    """The rules every sensor bridge shares (module docstring).

    Parameters
    ----------
    sensor : str
        The device's name in each measurement's ``sensor`` field and in alarm texts.
    stale_after_s : float
        [s] no fresh reading for this long raises ``sensor.stale``; older readings are not
        relayed.
    link_timeout_s : float
        [s] nothing from the device for this long raises ``sensor.link_lost``.
    now, wall : float
        The start: monotonic and UTC clocks [s].
    keys_kept : int
        How many recent device keys a reading is compared with. A device whose sequence
        numbers restart when it does (the BIS monitor) keeps a few, so that its new
        numbers are not taken for repeats; one keyed by time (Nightscout) keeps many.
    """

    def __init__(self, *, sensor: str, stale_after_s: float, link_timeout_s: float,
                 now: float, wall: float, keys_kept: int = KEYS_KEPT) -> None:
        self.sensor, self.keys_kept = sensor, keys_kept
        self.stale_after_s, self.link_timeout_s = stale_after_s, link_timeout_s
        self.counts: Counter[str] = Counter()
        self.notes: list[tuple[str, dict]] = []
        self._keys: OrderedDict[object, None] = OrderedDict()
        self._last_contact = now
        self._start_wall = wall
        #: the newest sample time the device gave [UTC s], relayed or too old (None: none)
        self._fresh_t: float | None = None
        self.active: dict[str, bool] = {code: False for code in ALARMS}

    # ------------------------------------------------------------------ alarms
    def _alarm(self, code: str, active: bool, text: str = "") -> list[_Message]:
        if self.active[code] == active:
            return []
        self.active[code] = active
        self.counts[f"alarm.{code}.{'raised' if active else 'cleared'}"] += 1
        priority, meaning = ALARMS[code]
        return [Alarm(code=code, priority=priority, kind="technical", active=active,
                      text=f"{self.sensor}: {text or meaning}" if active else
                      f"{self.sensor}: cleared ({meaning})")]

    def note(self, kind: str, **fields) -> None:
        self.notes.append((kind, fields))

    def take_notes(self) -> list[tuple[str, dict]]:
        notes, self.notes = self.notes, []
        return notes

    # ------------------------------------------------------------------ events
    def contact(self, now: float) -> list[_Message]:
        """The device answered or sent bytes."""
        self._last_contact = now
        return self._alarm("sensor.link_lost", False)

    def fault(self, code: str, detail: str = "", *, n_bytes: int = 0) -> list[_Message]:
        """Bad input from the device (counted and noted; no reading comes of it)."""
        self.counts[f"fault.{code}"] += 1
        self.note("sensor_fault", code=code, detail=detail[:500], n_bytes=n_bytes)
        out = self._alarm("sensor.bad_data", True, f"bad data from the device ({code})")
        if code == "unauthorized":
            out += self._alarm("sensor.auth_refused", True,
                               f"the server refused the credentials ({detail[:200]})")
        return out

    def answered(self) -> list[_Message]:
        """A request was answered (the credentials are good)."""
        return self._alarm("sensor.auth_refused", False)

    def reading(self, reading: DeviceReading, now: float, wall: float) -> list[_Message]:
        """Relay one device reading, unless seen already, too old or from the future."""
        if reading.key in self._keys:
            self.counts["duplicate"] += 1
            self.note("sensor_duplicate", key=str(reading.key)[:100])
            return []
        self._keys[reading.key] = None
        while len(self._keys) > self.keys_kept:
            self._keys.popitem(last=False)
        t_meas = wall if reading.t_meas is None else reading.t_meas
        self.note("sensor_reading", t_meas=t_meas, conditions=sorted(reading.conditions),
                  **reading.fields)
        if not math.isfinite(t_meas) or t_meas > wall + FUTURE_TOLERANCE_S:
            self.counts["future"] += 1
            return self.fault("future", f"reading stamped {t_meas - wall:.0f} s ahead")
        if wall - t_meas > self.stale_after_s:
            # the source's newest sample is this old: stale at the next check
            self._fresh_t = max(self._fresh_t or -math.inf, t_meas)
            self.counts["too_old"] += 1
            self.note("sensor_too_old", t_meas=t_meas, age_s=wall - t_meas)
            return []
        out: list[_Message] = []
        for var, value, unit, quality in reading.values:
            out.append(Measurement(var=var, value=value, unit=unit, t_meas=t_meas,
                                   quality=quality, sensor=self.sensor))
            self.counts[f"relayed.{quality}"] += 1
        self._fresh_t = max(self._fresh_t or -math.inf, t_meas)
        qualities = {q for *_, q in reading.values}
        conditions = reading.conditions
        out += self._alarm("sensor.stale", False)
        out += self._alarm("sensor.lead_off", "lead_off" in conditions,
                           "an electrode is off (failed impedance check)")
        flagged = sorted(conditions - {"lead_off"})
        degraded = bool(qualities - {"valid", "underflow", "overflow"})
        out += self._alarm("sensor.signal_quality", degraded,
                           f"readings flagged {'/'.join(sorted(qualities))} "
                           f"({', '.join(flagged) or 'device quality'})")
        if qualities <= {"valid", "underflow", "overflow"}:
            out += self._alarm("sensor.bad_data", False)
        return out

    def check(self, now: float, wall: float) -> list[_Message]:
        """Link and staleness alarms (call between events, at least once a second)."""
        out = self._alarm("sensor.link_lost", now - self._last_contact > self.link_timeout_s,
                          f"nothing from the device for {now - self._last_contact:.0f} s")
        newest = self._start_wall if self._fresh_t is None else self._fresh_t
        out += self._alarm("sensor.stale", wall - newest > self.stale_after_s,
                           f"no fresh reading for {wall - newest:.0f} s")
        return out


# ---------------------------------------------------------------------------- BIS Vista
#: the BIS monitor's message numbers restart with it: only a repeat of one of the last few
#: packets is a duplicate (a stale monitor re-sending), not an old number come round again
BIS_KEYS_KEPT = 8

@dataclass(frozen=True)
class BisVars:
    """The variables a BIS bridge publishes ("" leaves one out)."""

    bis: str = "bis"
    sqi: str = "bis_sqi"
    sr: str = "bis_sr"


def bis_reading(packet: bis_vista.ProcessedVars, rules: bis_vista.QualityRules,
                names: BisVars = BisVars()) -> DeviceReading:
    """A processed-variables packet as protocol values: BIS [1] with the quality of
    :func:`~mpc_dose.protocol.bis_vista.bis_quality`; SQI [%] (valid unless an electrode is
    off); SR [%] with BIS's quality. A field the monitor marks "no value" travels as
    ``unavailable`` with the monitor's raw code (scaled), never a made-up number."""
    t = packet.trend
    quality, reasons = bis_vista.bis_quality(packet, rules)
    lead_off = "lead_off" in reasons
    values = []
    if names.bis:
        values.append((names.bis, t.bis if t.bis is not None else t.bis_raw / 10, "1",
                       quality))
    if names.sqi:
        values.append((names.sqi, t.sqi_percent if t.sqi_percent is not None
                       else t.sqi_raw / 10, "%",
                       "invalid" if lead_off else
                       "valid" if t.sqi_percent is not None else "unavailable"))
    if names.sr:
        values.append((names.sr, t.sr_percent if t.sr_percent is not None
                       else t.sr_raw / 10, "%",
                       quality if t.sr_percent is not None or lead_off else "unavailable"))
    return DeviceReading(key=("bis", packet.message_seq), t_meas=None, values=tuple(values),
                         conditions=frozenset(reasons), fields=packet.fields())


# ---------------------------------------------------------------------------- Nightscout
def nightscout_reading(entry: nightscout.Entry, rules: nightscout.QualityRules,
                       var: str = "glucose") -> DeviceReading:
    """An SGV entry as a glucose reading [mg/dL] at the CGM's own time."""
    value, quality, conditions = nightscout.entry_quality(entry, rules)
    return DeviceReading(key=("sgv", entry.date_ms), t_meas=entry.t_s,
                         values=((var, value, "mg/dL", quality),),
                         conditions=frozenset(conditions), fields=entry.fields())


class TreatmentSink:
    """What the loop delivered, from ``pump_status`` telemetry, as Nightscout records.

    A change of the insulin pump's rate becomes a "Temp Basal" (U/h, for the command's
    lease, or *unleased_min* without one; re-posted while it runs past that); a bolus, once
    given (``bolus_remaining`` back to 0), a "Correction Bolus" of what ``bolus_delivered``
    grew by; every *status_every_s* a devicestatus. Posts wait in :attr:`outbox` (bounded:
    the oldest is dropped and counted) until the process sends them.

    Parameters
    ----------
    pump : str
        The insulin pump's name in ``pump_status``.
    concentration_u_per_ml : float
        [U/mL] to turn the pump's volume rate into U/h.
    """

    OUTBOX_MAX = 200

    def __init__(self, *, pump: str, concentration_u_per_ml: float, device: str,
                 status_every_s: float = 60.0, unleased_min: float = 30.0) -> None:
        self.pump, self.concentration = pump, concentration_u_per_ml
        self.device, self.status_every_s, self.unleased_min = device, status_every_s, \
            unleased_min
        self.outbox: list[tuple[str, dict]] = []
        self.counts: Counter[str] = Counter()
        self._basal: tuple[float, float] | None = None  # (U/h, end of the posted duration)
        self._bolus_base: float | None = None           # bolus_delivered already posted [U]
        self._last: PumpStatus | None = None
        self._next_status = -math.inf

    def _post(self, path: str, body: dict) -> None:
        self.outbox.append((path, body))
        if len(self.outbox) > self.OUTBOX_MAX:
            self.outbox.pop(0)
            self.counts["outbox_dropped"] += 1

    def observe(self, status: PumpStatus, wall: float) -> None:
        if status.pump != self.pump:
            return
        self._last = status
        rate = status.rate * wire_factor(status.unit, "mL/h") * self.concentration
        lease_min = status.lease_remaining_s / 60.0 if status.lease_remaining_s else None
        if self._basal is None or abs(self._basal[0] - rate) > 1e-6 or \
                wall >= self._basal[1]:
            duration = lease_min if lease_min else self.unleased_min
            self._post(nightscout.TREATMENTS_PATH,
                       nightscout.temp_basal(wall, rate, duration, entered_by=self.device))
            self._basal = (rate, wall + duration * 60.0)
        if status.amount_unit in ("U", "mU") and status.bolus_delivered is not None:
            given = status.bolus_delivered * wire_factor(status.amount_unit, "U")
            if self._bolus_base is None or given < self._bolus_base:
                self._bolus_base = given  # first sight, or a restarted pump side
            elif status.bolus_remaining == 0 and given > self._bolus_base + 1e-9:
                self._post(nightscout.TREATMENTS_PATH, nightscout.correction_bolus(
                    wall, given - self._bolus_base, entered_by=self.device))
                self._bolus_base = given

    def tick(self, wall: float) -> None:
        if self._last is None or wall < self._next_status:
            return
        s = self._last
        rate = s.rate * wire_factor(s.unit, "mL/h") * self.concentration
        self._post(nightscout.DEVICESTATUS_PATH, nightscout.device_status(
            wall, device=self.device, pump=s.pump, state=s.state, mode=s.mode,
            rate_u_per_h=rate, bolusing=bool(s.bolus_remaining)))
        self._next_status = wall + self.status_every_s
