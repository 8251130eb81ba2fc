"""The New Era NE-1000/NE-500 driver over a serial line (pyserial): one command, one reply,
bounded retries, then the pump counts as unreachable.

The driver sends absolute, idempotent commands only, so a retry after a lost reply is
harmless. It never runs a heartbeat of its own: the caller feeds safe mode (:meth:`status`
polls) only while it holds a valid lease, so a dead caller stops the pump (B2).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ..protocol.newera import (ALARMS, ERRORS, Reply, ReplyParser, encode_command,
                               format_number, parse_rate)

__all__ = ["NewEraDriver", "PumpUnreachable", "PumpRefused", "PumpReading"]

try:
    from serial import SerialException
except ImportError:  # pragma: no cover - pyserial is a dependency
    SerialException = OSError
try:
    from termios import error as _LinkError  # a vanished pty/tty raises this on flush
except ImportError:  # pragma: no cover - not POSIX
    _LinkError = OSError


def _fits(command: str, reply: Reply) -> bool:
    """Whether *reply* has the shape of an answer to *command* (alarms and errors fit
    any command)."""
    if reply.alarm is not None or reply.error is not None:
        return True
    name, arg, data = command[:3].upper(), command[3:].strip(), reply.data
    if name == "RAT" and not arg:
        try:
            parse_rate(data)
            return True
        except ValueError:
            return False
    if name == "DIS":
        return data.startswith("I") and "W" in data
    if name == "VER":
        return bool(data) and not data[0].isdigit()
    if name in ("DIA", "SAF"):
        return data == "" or data.replace(".", "", 1).isdigit()
    return data == ""


# what start-up asks of the operator when a pump cannot be brought to a known stopped state
_OPERATOR = ("stop the pump on its keypad (or power-cycle it), check the cable and the "
             "pump's address, then restart the bridge")


class PumpUnreachable(RuntimeError):
    """No valid reply after the retries (cable, address, dead pump)."""


class PumpRefused(RuntimeError):
    """The pump answered with an error (``?OOR``, ``?NA``...) or an alarm; *code* says which."""

    def __init__(self, text: str, code: str, reply: Reply | None = None) -> None:
        super().__init__(text)
        self.code, self.reply = code, reply


@dataclass(frozen=True)
class PumpReading:
    """What the pump says about itself."""

    state: str              # infusing, stopped, alarm, ...
    rate_ml_per_h: float
    dispensed_ml: float
    alarm: str | None


class NewEraDriver:
    """Pumps at their addresses on one serial port.

    Parameters
    ----------
    port : str
        The serial device, or a pyserial URL (``loop://``, ``socket://host:port``).
    baudrate : int
        19200 (the pumps' default, 8N1).
    timeout_s : float
        Reply timeout per try; *retries* further tries before :class:`PumpUnreachable`.
    safe_s : int
        Safe-mode timeout (1-255 s) set on :meth:`initialise`; 0 keeps basic mode.
    """

    def __init__(self, port: str, *, baudrate: int = 19200, timeout_s: float = 0.2,
                 retries: int = 2, safe_s: int = 0) -> None:
        import serial

        if not 0 <= safe_s <= 255:
            raise ValueError(f"safe_s must be in 0-255 s, got {safe_s!r}")
        self.serial = serial.serial_for_url(port, baudrate=baudrate, timeout=0.002)
        self.timeout_s, self.retries, self.safe_s = timeout_s, retries, safe_s
        self._parser = ReplyParser()
        self._safe: dict[int, bool] = {}
        self.exchanges = 0
        self.failures = 0

    def close(self) -> None:
        self.serial.close()

    def command(self, address: int, text: str) -> Reply:
        """Send *text* to the pump at *address*; its reply (errors raise PumpRefused)."""
        reply = self._exchange(address, text)
        if reply.alarm is not None:
            raise PumpRefused(f"pump {address:02d} alarm A?{reply.alarm}: "
                              f"{ALARMS.get(reply.alarm, 'unknown')}", "alarm", reply)
        if reply.error is not None:
            raise PumpRefused(f"pump {address:02d} {reply.error}: "
                              f"{ERRORS.get(reply.error, 'error')} ({text!r})",
                              "out_of_range" if reply.error == "?OOR" else "pump_error", reply)
        return reply

    def _exchange(self, address: int, text: str) -> Reply:
        packet = encode_command(text, address, safe=self._safe.get(address, False))
        for _ in range(self.retries + 1):
            self.exchanges += 1
            try:
                self.serial.reset_input_buffer()
                self.serial.write(packet)
                deadline = time.monotonic() + self.timeout_s
                while time.monotonic() < deadline:
                    data = self.serial.read(1)  # waits at most 2 ms
                    if not data:
                        continue
                    data += self.serial.read(self.serial.in_waiting)
                    for reply in self._parser.feed(data):
                        # a late reply to an earlier command never answers this one
                        if reply.address == address and _fits(text, reply):
                            return reply
            except (OSError, SerialException, _LinkError) as err:
                raise PumpUnreachable(f"pump {address:02d}: serial link failed on "
                                      f"{text!r}: {err}") from err
            self.failures += 1
            self._parser.reset()  # drop half-received frames before the retry
        raise PumpUnreachable(f"pump {address:02d}: no valid reply to {text!r} after "
                              f"{self.retries + 1} tries")

    def initialise(self, address: int, diameter_mm: float) -> None:
        """Start-up: reach the pump in whatever framing it is in, stop it and check it is
        stopped, then diameter, units and safe mode (``SAF n``, or ``SAF0`` back to basic
        mode when *safe_s* is 0).

        The pump may still be in safe mode (running, or stopped by its watchdog with alarm
        ``A?T``) from a bridge that died without stopping it; this driver does not know
        that, so it learns the framing from the pump's replies. Raises PumpUnreachable or
        PumpRefused, with what the operator must do, when the pump cannot be brought to a
        known stopped state.
        """
        try:
            self._reach(address)
            self._stop_confirmed(address)
        except PumpUnreachable as err:
            raise PumpUnreachable(f"{err}; {_OPERATOR}") from err
        self.command(address, f"DIA{format_number(diameter_mm)}")
        self.command(address, "FUNRAT")
        self.command(address, "DIRINF")
        self.command(address, "RAT0MH")  # units set once, while stopped
        if self.safe_s:
            self.command(address, f"SAF{self.safe_s}")
            self._safe[address] = True
        elif self._safe.get(address):  # left in safe mode by someone else: back to basic
            self.command(address, "SAF0")
            self._safe[address] = False

    def _reach(self, address: int) -> Reply:
        """A harmless query until the pump answers it, following the pump's framing: the
        first command after power-up is ignored (``?IGN``), and a pump in safe mode answers
        a basic packet with ``?COM`` in safe framing (a pump in basic mode never frames)."""
        for _ in range(4):  # at worst ?COM (framing), then ?IGN (power-up), then the answer
            reply = self._exchange(address, "VER")
            self._safe[address] = reply.safe
            if reply.error not in ("?IGN", "?COM"):
                return reply
        raise PumpRefused(f"pump {address:02d} keeps answering {reply.error} at start-up; "
                          f"{_OPERATOR}", "pump_error", reply)

    def _stop_confirmed(self, address: int) -> None:
        """STP until the pump says it is stopped with no alarm (STP also acknowledges an
        alarm: power reset, safe-mode timeout); a second STP stops a paused pump."""
        for _ in range(3):
            reply = self._exchange(address, "STP")
            if reply.prompt == "S" and reply.alarm is None and reply.error is None:
                return
        state = (f"alarm A?{reply.alarm}" if reply.alarm else reply.error or
                 f"prompt {reply.prompt}")
        raise PumpRefused(f"pump {address:02d} does not confirm it is stopped ({state} after "
                          f"STP); {_OPERATOR}", "not_stopped", reply)

    def set_rate(self, address: int, rate_ml_per_h: float) -> float:
        """Infuse at *rate_ml_per_h*, rounded to the pump's 4 digits; a rate that rounds to
        0 (below 0.0005 mL/h) stops it. Returns the rate read back [mL/h] (0.0 when
        stopped). Raises ValueError, before any I/O, for a negative or non-finite rate."""
        if not (math.isfinite(rate_ml_per_h) and rate_ml_per_h >= 0):
            raise ValueError(f"rate {rate_ml_per_h!r} mL/h is not a finite number >= 0")
        text = format_number(rate_ml_per_h)  # what the pump will hold (raises above 9999)
        if float(text) == 0:  # RAT0.000 then RUN would leave the pump stopped: stop it
            self.command(address, "STP")
            return 0.0
        self.command(address, f"RAT{text}")
        reply = self.command(address, "RUN")
        if reply.prompt != "I":
            raise PumpRefused(f"pump {address:02d} did not start (prompt {reply.prompt})",
                              "pump_error", reply)
        return parse_rate(self.command(address, "RAT").data)  # the read-back

    def stop(self, address: int) -> None:
        self._exchange(address, "STP")

    def read(self, address: int) -> PumpReading:
        """Rate and dispensed volume (also feeds the safe-mode watchdog)."""
        rate_reply = self._exchange(address, "RAT")
        if rate_reply.alarm is not None:
            return PumpReading("alarm", 0.0, 0.0, rate_reply.alarm)
        rate = parse_rate(rate_reply.data)
        dis = self.command(address, "DIS").data  # I<infused>W<withdrawn>ML
        try:
            infused = float(dis[1:dis.index("W")])
        except ValueError:
            raise PumpRefused(f"pump {address:02d}: malformed DIS reply {dis!r}",
                              "pump_error") from None
        return PumpReading(rate_reply.state, rate, infused, None)
