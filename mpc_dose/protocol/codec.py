"""The strict JSON codec of protocol version 1: envelopes <-> bytes.

``{"v": 1, "type": ..., "src": ..., "epoch": ..., "seq": ..., "t_sent": ..., "t_sim": ...,
"body": {...}}`` in one UTF-8 frame.

Decoding never lets bad input through: NaN and Infinity, duplicate keys, oversize frames,
unknown versions or types, wrong field types, unknown units and unknown fields in commands
raise :class:`RemoteProtocolError` with a reason code (``schema``, ``version``, ``unit``,
``too_large``). Telemetry readers ignore unknown body fields (forward compatibility);
command readers reject them. Standard library only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .messages import (MESSAGE_TYPES, LocalProtocolError, ProtocolError, RemoteProtocolError,
                       _Message)

__all__ = ["Envelope", "encode", "decode", "PROTOCOL_VERSION", "MAX_MESSAGE_BYTES"]

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 65536
_ENVELOPE_KEYS = {"v", "type", "src", "epoch", "seq", "t_sent", "t_sim", "body"}


@dataclass(frozen=True)
class Envelope:
    """A message with its routing and ordering fields.

    *epoch* changes at each process start; *seq* increases per (src, epoch); *t_sent* is the
    sender's wall clock [s] (or simulation time in simulated runs), *t_sim* simulation time.
    """

    message: _Message
    src: str
    epoch: str
    seq: int
    t_sent: float
    t_sim: float | None = None


def _reject_constant(text: str):
    raise RemoteProtocolError(f"number {text} is not allowed (finite numbers only)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise RemoteProtocolError(f"number {text} is not finite")
    return value


def _fits_float(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise RemoteProtocolError(f"duplicate key {key!r}")
        out[key] = value
    return out


def encode(envelope: Envelope) -> bytes:
    """Serialise *envelope* to one frame.

    Raises
    ------
    LocalProtocolError
        When the frame would exceed :data:`MAX_MESSAGE_BYTES`.
    """
    doc = {"v": PROTOCOL_VERSION, "type": envelope.message.type, "src": envelope.src,
           "epoch": envelope.epoch, "seq": envelope.seq, "t_sent": envelope.t_sent,
           "t_sim": envelope.t_sim, "body": envelope.message.body()}
    data = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise LocalProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}",
                                 code="too_large")
    return data


def decode(data: bytes) -> Envelope:
    """Parse one frame into an :class:`Envelope` holding a validated message.

    Raises
    ------
    RemoteProtocolError
        For anything that is not a valid version-1 message; ``err.code`` is the reason.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise RemoteProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}",
                                  code="too_large")
    try:
        doc = json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant,
                         parse_float=_finite_float, object_pairs_hook=_no_duplicates)
    except RemoteProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, OverflowError, RecursionError) as err:
        # ValueError covers JSONDecodeError and Python's limit on integer literal digits
        raise RemoteProtocolError(f"not a JSON message: {str(err)[:200]}") from None
    if not isinstance(doc, dict):
        raise RemoteProtocolError("a message is a JSON object")
    unknown = set(doc) - _ENVELOPE_KEYS
    missing = _ENVELOPE_KEYS - {"t_sim"} - set(doc)
    if unknown or missing:
        raise RemoteProtocolError(f"envelope: unknown {sorted(unknown)}, missing "
                                  f"{sorted(missing)}")
    if doc["v"] != PROTOCOL_VERSION or isinstance(doc["v"], bool):
        raise RemoteProtocolError(f"version {doc['v']!r} is not supported (1)", code="version")
    cls = MESSAGE_TYPES.get(doc["type"]) if isinstance(doc["type"], str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {doc['type']!r}")
    if not isinstance(doc["src"], str) or not doc["src"] or not isinstance(doc["epoch"], str):
        raise RemoteProtocolError("src and epoch must be non-empty strings")
    if not isinstance(doc["seq"], int) or isinstance(doc["seq"], bool) or doc["seq"] < 0:
        raise RemoteProtocolError(f"seq must be a whole number >= 0, got {doc['seq']!r}")
    for key in ("t_sent", "t_sim"):
        value = doc.get(key)
        if key == "t_sim" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not _fits_float(value):
            raise RemoteProtocolError(f"{key} must be a finite number, got {str(value)[:40]}")
    body = doc["body"]
    if not isinstance(body, dict):
        raise RemoteProtocolError("body must be an object")
    known = cls.field_names()
    extra = set(body).difference(known)
    if extra and cls.is_command:
        raise RemoteProtocolError(f"{cls.type}: unknown fields {sorted(extra)}")
    kwargs = {k: v for k, v in body.items() if k in known}
    if "versions" in kwargs and isinstance(kwargs["versions"], list):
        kwargs["versions"] = tuple(kwargs["versions"])
    try:
        message = cls(**kwargs)
    except (TypeError, OverflowError) as err:
        raise RemoteProtocolError(f"{cls.type}: {str(err)[:200]}") from None
    except ProtocolError as err:
        raise RemoteProtocolError(f"{cls.type}: {err}", code=err.code) from None
    return Envelope(message, doc["src"], doc["epoch"], doc["seq"], float(doc["t_sent"]),
                    None if doc.get("t_sim") is None else float(doc["t_sim"]))
