"""The strict JSON codec of protocol version 1: envelopes <-> bytes.

``{"v": 1, "type": ..., "src": ..., "epoch": ..., "seq": ..., "t_sent": ..., "t_sim": ...,
"body": {...}}`` in one UTF-8 frame.

Decoding never lets bad input through: NaN and Infinity, duplicate keys, oversize frames,
strings that are not valid Unicode (lone surrogates such as ``"\\ud800"``), unknown versions
or types, wrong field types, sequence numbers beyond 2**53 - 1, units outside the wire list
and unknown fields in commands raise :class:`RemoteProtocolError` with a reason code
(``schema``, ``version``, ``unit``, ``too_large``) and, when the frame named one, the
refused command's id (:func:`refusal` answers it). Telemetry readers ignore unknown body
fields (forward compatibility); command readers reject them. Standard library only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .messages import (MAX_NAME_CHARS, MAX_SEQ, MAX_TEXT_CHARS, MESSAGE_TYPES, Ack,
                       LocalProtocolError, ProtocolError, RemoteProtocolError, _Message)

__all__ = ["Envelope", "encode", "decode", "decode_frame", "refusal", "PROTOCOL_VERSION",
           "MAX_MESSAGE_BYTES"]

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


def _unicode(text: str) -> None:
    """Refuse a string UTF-8 cannot hold (JSON's ``\\ud800`` escapes decode to lone
    surrogates, which no log, database or peer can store)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RemoteProtocolError("a string holds a lone surrogate (not valid Unicode)") \
            from None


def _check_strings(value) -> None:
    if isinstance(value, str):
        _unicode(value)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def _no_duplicates(pairs):
    """Object hook: duplicate keys and invalid strings are refused (nested objects were
    checked when they were built)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise RemoteProtocolError(f"duplicate key {key[:40]!r}")
        _unicode(key)
        _check_strings(value)
        out[key] = value
    return out


def _cmd_id(doc: dict) -> str | None:
    """The command id of a frame that is refused, when it has a usable one."""
    body = doc.get("body")
    cmd_id = body.get("cmd_id") if isinstance(body, dict) else None
    if isinstance(cmd_id, str) and 0 < len(cmd_id) <= MAX_NAME_CHARS:
        return cmd_id
    return None


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
    try:
        return _envelope(doc)
    except RemoteProtocolError as err:
        err.cmd_id = _cmd_id(doc)
        raise


def decode_frame(data: bytes) -> Envelope | RemoteProtocolError:
    """:func:`decode`, with a refusal returned instead of raised (for loops that answer or
    count every frame)."""
    try:
        return decode(data)
    except RemoteProtocolError as err:
        return err


def refusal(err: RemoteProtocolError) -> Ack | None:
    """The answer to a refused command frame: ``ack`` with ``ok: false``, the reason code and
    the frame's ``cmd_id`` (None when the frame named no usable one)."""
    if err.cmd_id is None:
        return None
    return Ack(cmd_id=err.cmd_id, ok=False, code=err.code,
               text=f"refused: {str(err)[:MAX_TEXT_CHARS - 9]}")


def _name(doc: dict, key: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        raise RemoteProtocolError(f"{key} must be a string of 1-{MAX_NAME_CHARS} characters")
    return value


def _envelope(doc: dict) -> Envelope:
    unknown = set(doc) - _ENVELOPE_KEYS
    missing = _ENVELOPE_KEYS - {"t_sim"} - set(doc)
    if unknown or missing:
        raise RemoteProtocolError(f"envelope: unknown {str(sorted(unknown))[:200]}, missing "
                                  f"{sorted(missing)}")
    if doc["v"] != PROTOCOL_VERSION or isinstance(doc["v"], bool):
        raise RemoteProtocolError(f"version {str(doc['v'])[:20]} is not supported (1)",
                                  code="version")
    cls = MESSAGE_TYPES.get(doc["type"]) if isinstance(doc["type"], str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {str(doc['type'])[:40]!r}")
    src, epoch = _name(doc, "src"), _name(doc, "epoch")
    seq = doc["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise RemoteProtocolError(f"seq must be a whole number in 0-{MAX_SEQ}, "
                                  f"got {str(seq)[:40]}")
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
        raise RemoteProtocolError(f"{cls.type}: unknown fields {str(sorted(extra))[:200]}")
    kwargs = {k: v for k, v in body.items() if k in known}
    if "versions" in kwargs and isinstance(kwargs["versions"], list):
        kwargs["versions"] = tuple(kwargs["versions"])
    try:
        message = cls(**kwargs)
    except (TypeError, OverflowError) as err:
        raise RemoteProtocolError(f"{cls.type}: {str(err)[:200]}") from None
    except ProtocolError as err:
        raise RemoteProtocolError(f"{cls.type}: {err}", code=err.code) from None
    return Envelope(message, src, epoch, seq, float(doc["t_sent"]),
                    None if doc.get("t_sim") is None else float(doc["t_sim"]))
