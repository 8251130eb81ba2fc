"""Nightscout REST API v1 as a CGM source and a treatment sink: response bytes in -> entries
and faults out, and the request bodies to post. Sans-I/O: no HTTP, no clock (the HTTP client
is :class:`mpc_dose.transport.sensor_links.NightscoutClient`).

Written from the Nightscout server's public API description (cgm-remote-monitor's
``lib/server/swagger.yaml``, API v1, version 14.2; AGPL-3, read, nothing copied) and its
error-code plugin (``lib/plugins/errorcodes.js``: SGV values below 39 are Dexcom error
codes, e.g. 1 ``?SN`` sensor not active, 5 ``?NC`` not calibrated, 10 ``???``, 12 ``?RF``).

- ``GET /api/v1/entries/sgv.json?count=N&find[date][$gt]=MS`` -> a JSON array of entries,
  newest first: ``type`` ("sgv"), ``sgv`` [mg/dL], ``date`` [ms since the Unix epoch, UTC],
  ``dateString``, ``direction`` (trend arrow), ``noise`` (1 clean, 2 light, 3 medium,
  4 heavy: xDrip's scale, also uploaded by other uploaders).
- ``POST /api/v1/treatments`` -> a list of treatments: ``eventType`` ("Temp Basal":
  ``absolute`` [U/h], ``rate``, ``duration`` [min]; "Correction Bolus": ``insulin`` [U]),
  ``created_at`` (ISO 8601 UTC), ``enteredBy``.
- ``POST /api/v1/devicestatus`` -> ``device``, ``created_at``, ``pump``
  (``clock``, ``status`` {``status``, ``bolusing``, ``suspended``}) and our own
  ``mpc_dose`` object (the pump side's mode and rate).
- Authentication: header ``api-secret`` = the SHA-1 hex digest of the site's API_SECRET
  (the server reads ``req.header('api-secret')``).

Reading quality (:func:`entry_quality`): an SGV below 39 is an error code -> ``invalid``
(not a glucose); 39 (the CGM's "LOW") up to the low limit (40 mg/dL) -> ``underflow`` with
the limit as value; above the high limit (400 mg/dL, "HIGH") -> ``overflow`` with the limit
as value (as the simulated CGM of :mod:`mpc_dose.plant.sensor` reports them); ``noise`` of 3
(medium) or more -> ``questionable``. Limits and the noise level are configurable.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone

from .codec import _finite_float, _no_duplicates, _reject_constant

__all__ = ["Entry", "EntryFault", "parse_entries", "QualityRules", "entry_quality",
           "api_secret_digest", "ENTRIES_PATH", "TREATMENTS_PATH", "DEVICESTATUS_PATH",
           "temp_basal", "correction_bolus", "device_status", "iso_utc",
           "ERROR_CODES_BELOW"]

ENTRIES_PATH = "/api/v1/entries/sgv.json"
TREATMENTS_PATH = "/api/v1/treatments"
DEVICESTATUS_PATH = "/api/v1/devicestatus"
#: SGV values below this are the CGM's error codes, not glucose (errorcodes plugin)
ERROR_CODES_BELOW = 39
#: the longest answer read [bytes]: a larger one is refused, never parsed
MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One SGV entry, checked: *sgv* [mg/dL], *date_ms* [ms UTC]."""

    sgv: float
    date_ms: int
    direction: str
    noise: int | None

    @property
    def t_s(self) -> float:
        """The CGM's own sample time [UTC s]."""
        return self.date_ms / 1000.0

    def fields(self) -> dict:
        return {"sgv": self.sgv, "date_ms": self.date_ms, "direction": self.direction,
                "noise": self.noise}


@dataclass(frozen=True)
class EntryFault:
    """An answer, or one entry of it, that could not be used; *code*: ``json`` (not a JSON
    array), ``too_large``, ``entry`` (an element without a usable ``sgv`` or ``date``)."""

    code: str
    detail: str


def _strict_json(body: bytes):
    return json.loads(body.decode("utf-8"), parse_constant=_reject_constant,
                      parse_float=_finite_float, object_pairs_hook=_no_duplicates)


def parse_entries(body: bytes) -> tuple[list[Entry], list[EntryFault]]:
    """The SGV entries of an answer of ``GET entries``, oldest first, and what was refused.

    Non-finite numbers, duplicate keys and invalid Unicode refuse the whole answer (as the
    wire codec does); an element that is not an SGV entry with a finite ``sgv`` and a whole,
    positive ``date`` is refused alone. Nothing raises.
    """
    if len(body) > MAX_BODY_BYTES:
        return [], [EntryFault("too_large", f"{len(body)} bytes")]
    try:
        doc = _strict_json(body)
    except (ValueError, RecursionError, UnicodeDecodeError) as err:
        return [], [EntryFault("json", str(err)[:200])]
    if not isinstance(doc, list):
        return [], [EntryFault("json", f"expected a JSON array, got {type(doc).__name__}")]
    entries, faults = [], []
    for item in doc:
        entry = _entry(item)
        if isinstance(entry, EntryFault):
            faults.append(entry)
        elif entry is not None:
            entries.append(entry)
    entries.sort(key=lambda e: e.date_ms)
    return entries, faults


def _entry(item) -> Entry | EntryFault | None:
    if not isinstance(item, dict):
        return EntryFault("entry", f"not an object: {str(item)[:60]}")
    if item.get("type", "sgv") != "sgv":
        return None  # mbg, cal: not CGM readings
    sgv, date = item.get("sgv"), item.get("date")
    if isinstance(sgv, bool) or not isinstance(sgv, (int, float)) or \
            not math.isfinite(float(sgv)) or sgv < 0:
        return EntryFault("entry", f"sgv {str(sgv)[:40]!r} is not a finite number >= 0")
    if isinstance(date, float) and date.is_integer():
        date = int(date)
    if isinstance(date, bool) or not isinstance(date, int) or not 0 < date < 2**53:
        return EntryFault("entry", f"date {str(date)[:40]!r} is not a whole number of ms")
    direction = item.get("direction", "")
    noise = item.get("noise")
    if isinstance(noise, float) and noise.is_integer():
        noise = int(noise)
    if isinstance(noise, bool) or not isinstance(noise, int):
        noise = None
    return Entry(float(sgv), date, direction[:40] if isinstance(direction, str) else "",
                 noise)


@dataclass(frozen=True)
class QualityRules:
    """Thresholds of :func:`entry_quality` (each declared once, here)."""

    #: [mg/dL] the CGM's lowest reportable value ("LOW" below it)
    low_mg_dl: float = 40.0
    #: [mg/dL] the CGM's highest reportable value ("HIGH" above it)
    high_mg_dl: float = 400.0
    #: noise level from which a reading is questionable (None: not checked)
    noise_questionable_from: int | None = 3


def entry_quality(entry: Entry, rules: QualityRules = QualityRules()
                  ) -> tuple[float, str, list[str]]:
    """(value [mg/dL], quality, conditions) of an entry."""
    if entry.sgv < ERROR_CODES_BELOW:
        return entry.sgv, "invalid", [f"cgm_error_{int(entry.sgv)}"]
    if entry.sgv < rules.low_mg_dl:
        return rules.low_mg_dl, "underflow", ["below_range"]
    if entry.sgv > rules.high_mg_dl:
        return rules.high_mg_dl, "overflow", ["above_range"]
    if rules.noise_questionable_from is not None and entry.noise is not None and \
            entry.noise >= rules.noise_questionable_from:
        return entry.sgv, "questionable", ["noisy"]
    return entry.sgv, "valid", []


# ---------------------------------------------------------------------------- requests
def api_secret_digest(secret: str) -> str:
    """The ``api-secret`` header value: SHA-1 hex of the site's API_SECRET."""
    return hashlib.sha1(secret.encode("utf-8")).hexdigest()


def iso_utc(t_s: float) -> str:
    """ISO 8601 UTC with milliseconds, as Nightscout writes ``created_at``."""
    return datetime.fromtimestamp(t_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + \
        f"{int(round((t_s % 1) * 1000)) % 1000:03d}Z"


def temp_basal(t_s: float, rate_u_per_h: float, duration_min: float, *,
               entered_by: str) -> dict:
    """A "Temp Basal" treatment starting at *t_s* [UTC s]."""
    return {"eventType": "Temp Basal", "created_at": iso_utc(t_s),
            "absolute": round(rate_u_per_h, 4), "rate": round(rate_u_per_h, 4),
            "duration": round(duration_min, 2), "enteredBy": entered_by}


def correction_bolus(t_s: float, insulin_u: float, *, entered_by: str) -> dict:
    """A "Correction Bolus" treatment of *insulin_u* [U] given by *t_s*."""
    return {"eventType": "Correction Bolus", "created_at": iso_utc(t_s),
            "insulin": round(insulin_u, 4), "enteredBy": entered_by}


def device_status(t_s: float, *, device: str, pump: str, state: str, mode: str,
                  rate_u_per_h: float, bolusing: bool) -> dict:
    """A devicestatus record of the pump side as the loop last reported it."""
    return {"device": device, "created_at": iso_utc(t_s),
            "pump": {"clock": iso_utc(t_s),
                     "status": {"status": state, "bolusing": bolusing,
                                "suspended": state in ("stopped", "paused")}},
            "mpc_dose": {"pump": pump, "mode": mode, "state": state,
                         "rate_u_per_h": round(rate_u_per_h, 4)}}
