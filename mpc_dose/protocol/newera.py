"""The New Era NE-1000 / NE-500 syringe-pump serial protocol (also WPI Aladdin), sans-I/O.

Basic mode: ``[aa]CMD[data]\\r`` out, ``STX aa P data ETX`` back, where ``aa`` is the pump's
2-digit address and ``P`` its prompt (``I`` infusing, ``W`` withdrawing, ``S`` stopped, ``P``
paused, ``T`` timed pause, ``U`` user wait, ``X`` purging) or ``A`` followed by an alarm
(``?R`` power reset, ``?S`` stall/occlusion, ``?T`` safe-mode timeout, ``?E`` program error,
``?O`` phase out of range). Error replies put ``?``, ``?NA``, ``?OOR``, ``?COM`` or ``?IGN``
in the data.

Safe mode (``SAF n``, n = 1-255 s) frames every packet as ``STX LEN aa CMD CRC16 ETX`` with
``LEN = len(aaCMD) + 4`` and CRC-16/XMODEM (``binascii.crc_hqx(data, 0)``) big-endian; the
pump stops and alarms ``A?T`` when no valid packet arrives for n seconds - the hardware dead
man's switch the bridge feeds only while it holds a valid lease.

Numbers carry at most 4 digits and 3 decimals (``12.34``, ``1234``, ``0.123``).

Sources: octopus ``octopus/manufacturer/wpi.py`` (framing, CRC, alarms and errors), nesp-lib
2.0.0 (SAF range, the 4-digit rule), yaqd-new-era (prompts; the first command after power-up
is ignored). Standard library only.
"""

from __future__ import annotations

import binascii
import math
import re
from dataclasses import dataclass, field

__all__ = ["STX", "ETX", "PROMPTS", "ALARMS", "ERRORS", "format_number", "encode_command",
           "Reply", "ReplyParser", "encode_reply", "parse_rate", "NewEraError"]

STX, ETX = b"\x02", b"\x03"
PROMPTS = {"I": "infusing", "W": "withdrawing", "S": "stopped", "P": "paused",
           "T": "timed pause", "U": "user wait", "X": "purging"}
ALARMS = {"R": "power reset", "S": "motor stalled (occlusion)", "T": "safe-mode timeout",
          "E": "program error", "O": "phase out of range"}
ERRORS = {"?": "not recognised", "?NA": "not applicable now", "?OOR": "out of range",
          "?COM": "bad safe-mode packet", "?IGN": "ignored"}
RATE_UNITS = {"UM": 1e-3 * 60, "MM": 60.0, "UH": 1e-3, "MH": 1.0}  # -> mL/h
MAX_FRAME = 64


class NewEraError(ValueError):
    """A number or command that cannot be written in the pump's format."""


def format_number(value: float) -> str:
    """*value* with at most 4 digits and 3 decimals, rounded (never truncated).

    Raises NewEraError for negative, non-finite or too large (>= 9999.5) values.
    """
    if not (math.isfinite(value) and 0 <= value < 9999.5):
        raise NewEraError(f"{value!r} does not fit the pump's 4-digit format")
    for decimals in (3, 2, 1, 0):
        text = f"{value:.{decimals}f}"
        if len(text.replace(".", "")) <= 4:
            return text
    raise NewEraError(f"{value!r} does not fit the pump's 4-digit format")  # not reached


def _crc(data: bytes) -> bytes:
    return binascii.crc_hqx(data, 0).to_bytes(2, "big")


def encode_command(command: str, address: int | None = None, *, safe: bool = False) -> bytes:
    """One command packet: basic (``aaCMD\\r``) or safe-mode framed."""
    if address is not None and not 0 <= address <= 99:
        raise NewEraError(f"address {address!r} outside 0-99")
    text = (f"{address:02d}" if address is not None else "") + command
    data = text.encode("ascii")
    if not safe:
        return data + b"\r"
    if len(data) + 4 > 255:
        raise NewEraError(f"command too long: {command!r}")
    return STX + bytes([len(data) + 4]) + data + _crc(data) + ETX


def encode_reply(address: int, prompt: str, data: str = "", *, safe: bool = False) -> bytes:
    """A pump's reply (the emulator's side): prompt ``A`` with data ``?T`` is an alarm."""
    body = f"{address:02d}{prompt}{data}".encode("ascii")
    if not safe:
        return STX + body + ETX
    return STX + bytes([len(body) + 4]) + body + _crc(body) + ETX


@dataclass(frozen=True)
class Reply:
    """A parsed reply: *prompt* letter, *alarm* code (R/S/T/E/O) or None, *error* (``?OOR``
    ...) or None, the remaining *data*, and whether it came *safe*-framed (how the pump
    framed it tells whether it is in safe mode; it is not part of what the reply says, so
    equality ignores it)."""

    address: int
    prompt: str
    data: str
    alarm: str | None = None
    error: str | None = None
    safe: bool = field(default=False, compare=False)

    @property
    def state(self) -> str:
        return "alarm" if self.alarm else PROMPTS.get(self.prompt, "unknown")


_RATE = re.compile(r"^\s*(\d{1,4}(?:\.\d{0,3})?|\.\d{1,3})\s*(UM|MM|UH|MH)\s*$")


def parse_rate(data: str) -> float:
    """The ``RAT`` query's data (e.g. ``12.50MH``) in mL/h."""
    match = _RATE.match(data)
    if not match:
        raise NewEraError(f"not a rate reply: {data!r}")
    return float(match.group(1)) * RATE_UNITS[match.group(2)]


class ReplyParser:
    """Bytes in, replies out: resynchronises on STX, checks the CRC in safe mode, and counts
    what it had to throw away (garbage, truncated frames, bad CRC, oversize).

    A frame cut short (a lost ETX, a dropped byte) must not hide the reply after it: when
    the frame at the head is bad or still incomplete, a later STX that starts a complete,
    valid frame wins and the bytes before it are dropped.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self.discarded = 0

    def reset(self) -> None:
        """Forget a half-received frame (before a retry); the counts stay."""
        self.discarded += len(self._buffer)
        self._buffer = b""

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        out: list[Reply] = []
        while True:
            start = self._buffer.find(STX)
            if start < 0:
                self.discarded += len(self._buffer)
                self._buffer = b""
                return out
            if start:
                self.discarded += start
                self._buffer = self._buffer[start:]
            reply, used = self._one(self._buffer)
            if reply is None:
                later = self._later_frame(self._buffer)
                if later:  # the head was truncated: resync on the frame after it
                    self.discarded += later
                    self._buffer = self._buffer[later:]
                    continue
            if used == 0:
                if len(self._buffer) > MAX_FRAME:  # never a frame: drop the STX, resync
                    self.discarded += 1
                    self._buffer = self._buffer[1:]
                    continue
                return out
            self._buffer = self._buffer[used:]
            if reply is None:
                self.discarded += used
            else:
                out.append(reply)

    @classmethod
    def _later_frame(cls, buf: bytes) -> int:
        """The index of the first STX after the head that starts a complete frame which
        parses (CRC included), or 0. Splitting at any STX would be wrong: a safe frame's
        CRC bytes may be 0x02; but a complete valid frame cannot start inside a genuine
        frame that is bad or still incomplete (it would need bytes the head has not got)."""
        start = buf.find(STX, 1)
        while start > 0:
            if cls._one(buf[start:])[0] is not None:
                return start
            start = buf.find(STX, start + 1)
        return 0

    @staticmethod
    def _one(buf: bytes) -> tuple[Reply | None, int]:
        """(reply or None if bad, bytes used); (None, 0) when more bytes are needed."""
        if len(buf) < 4:
            return None, 0
        # basic: STX a a P ...; a safe frame's LEN byte may also be an ASCII digit, but
        # then its 4th byte is an address digit, never a prompt letter
        if buf[1:3].isdigit() and not buf[3:4].isdigit():
            end = buf.find(ETX)
            # basic frames are ASCII: an STX before the ETX means this one was cut short
            stx = buf.find(STX, 1, end if end >= 0 else len(buf))
            if stx > 0:
                return None, stx
            if end < 0:
                return None, 0
            return _reply(buf[1:end], safe=False), end + 1
        length = buf[1]
        if length < 7 or length + 1 > MAX_FRAME:  # never a frame: resync at once
            return None, 1
        if len(buf) < length + 1:
            return None, 0
        if buf[length:length + 1] != ETX:
            return None, 1
        body, crc = buf[2:length - 2], buf[length - 2:length]
        if _crc(body) != crc:
            return None, length + 1
        return _reply(body, safe=True), length + 1


def _reply(body: bytes, *, safe: bool) -> Reply | None:
    try:
        text = body.decode("ascii")
        address = int(text[:2])
    except (UnicodeDecodeError, ValueError):
        return None
    if len(text) < 3:
        return None
    prompt, data = text[2], text[3:]
    if prompt == "A" and data.startswith("?") and len(data) >= 2:
        return Reply(address, prompt, data[2:], alarm=data[1], safe=safe)
    error = data if data.startswith("?") else None
    return Reply(address, prompt, data, error=error, safe=safe)
