"""An emulated New Era NE-1000 network on a pseudo-terminal, with fault knobs, so the pump
bridge is tested without hardware.

    python -m hil.newera_emulator --link /tmp/ne1000 --pumps 0,1

prints the serial device to open (and makes *--link* a symlink to it). Several pumps share
the line by address, as a daisy-chained NE network does. Each pump integrates its dispensed
volume, rejects rates above its maximum (``?OOR``), refuses a unit change while running
(``?NA``), honours safe mode (``SAF n``: stops and alarms ``A?T`` when no valid packet
arrives for n seconds) and, like the real pump, ignores the first command after power-up.

Fault knobs (attributes of :class:`NewEraEmulator`, changeable while it runs):
``silent`` (no replies), ``reply_delay_s``, ``garbage`` (junk bytes before each reply),
``wrong_address`` (replies from another address), ``corrupt_crc``, :meth:`alarm` (``S``
stall/occlusion, ``R`` power reset) and :meth:`close` (the link drops).
"""

from __future__ import annotations

import argparse
import binascii
import os
import select
import threading
import time
from dataclasses import dataclass, field

from mpc_dose.protocol.newera import (ETX, RATE_UNITS, STX, NewEraError, encode_reply,
                                      format_number)

from .pty_device import PtyDevice

__all__ = ["NewEraEmulator", "EmulatedPump"]


@dataclass
class EmulatedPump:
    address: int
    max_rate_ml_per_h: float = 1500.0
    diameter_mm: float = 26.59
    prompt: str = "S"          # S stopped, I infusing
    rate_ml_per_h: float = 0.0
    units: str = "MH"
    dispensed_ml: float = 0.0
    alarm: str | None = "R"    # power-up: the first command is ignored, then A?R is reported
    safe_s: int = 0
    last_packet: float = field(default_factory=time.monotonic)
    fresh: bool = True
    _since: float = field(default_factory=time.monotonic)

    def account(self, now: float) -> None:
        if self.prompt == "I":
            self.dispensed_ml += self.rate_ml_per_h * (now - self._since) / 3600.0
        self._since = now


class NewEraEmulator(PtyDevice):
    """The pumps at *addresses* behind one pseudo-terminal; :attr:`device` is its path."""

    def __init__(self, addresses=(0,), *, max_rate_ml_per_h: float = 1500.0,
                 power_reset: bool = False) -> None:
        super().__init__("ne1000-emulator")
        self.pumps = {a: EmulatedPump(a, max_rate_ml_per_h) for a in addresses}
        if not power_reset:
            for pump in self.pumps.values():
                pump.alarm = None
        self.silent = False
        self.reply_delay_s = 0.0
        self.garbage = b""
        self.wrong_address = False
        self.corrupt_crc = False
        self.log: list[str] = []
        self._lock = threading.Lock()
        self._buffer = b""

    # ------------------------------------------------------------------ control

    def alarm(self, address: int, code: str) -> None:
        """Raise alarm *code* (``S`` stall, ``R`` power reset) on a pump: it stops."""
        with self._lock:
            pump = self.pumps[address]
            pump.account(time.monotonic())
            pump.prompt, pump.alarm = "S", code
            if code == "R":
                pump.rate_ml_per_h, pump.safe_s, pump.fresh = 0.0, 0, True

    def state(self, address: int) -> EmulatedPump:
        with self._lock:
            pump = self.pumps[address]
            pump.account(time.monotonic())
            return pump

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.master], [], [], 0.02)
            except (OSError, ValueError):
                return
            self._watchdog()
            if not ready:
                continue
            try:
                data = os.read(self.master, 1024)
            except OSError:
                return
            self._buffer += data
            for packet, safe in self._packets():
                self._handle(packet, safe)

    def _watchdog(self) -> None:
        now = time.monotonic()
        with self._lock:
            for pump in self.pumps.values():
                if pump.safe_s and now - pump.last_packet > pump.safe_s and pump.alarm is None:
                    pump.account(now)
                    pump.prompt, pump.alarm = "S", "T"
                    self.log.append(f"{pump.address:02d} safe-mode timeout: stopped")

    def _packets(self):
        """Split the input into (text, safe) packets; bad safe-mode frames give ?COM."""
        while self._buffer:
            if self._buffer[:1] == STX:
                if len(self._buffer) < 2 or len(self._buffer) < self._buffer[1] + 1:
                    return
                n = self._buffer[1]
                frame, self._buffer = self._buffer[:n + 1], self._buffer[n + 1:]
                body, crc = frame[2:n - 2], frame[n - 2:n]
                if frame[-1:] != ETX or binascii.crc_hqx(body, 0).to_bytes(2, "big") != crc:
                    yield None, True
                    continue
                yield body.decode("ascii", "replace"), True
            else:
                end = self._buffer.find(b"\r")
                if end < 0:
                    return
                line, self._buffer = self._buffer[:end], self._buffer[end + 1:]
                yield line.decode("ascii", "replace"), False

    def _reply(self, address: int, prompt: str, data: str, safe: bool) -> None:
        """Write a reply (called outside the lock: a slow reply must not block state())."""
        if self.silent:
            return
        if self.reply_delay_s:
            time.sleep(self.reply_delay_s)
        if self.wrong_address:
            address = (address + 1) % 100
        frame = encode_reply(address, prompt, data, safe=safe)
        if self.corrupt_crc and safe:
            frame = frame[:-3] + bytes([frame[-3] ^ 0xFF]) + frame[-2:]
        try:
            os.write(self.master, self.garbage + frame)
        except OSError:
            pass

    def _handle(self, text: str | None, safe: bool) -> None:
        if text is None:
            self._reply(0, "S", "?COM", True)
            return
        address = int(text[:2]) if text[:2].isdigit() else 0
        command = text[2:] if text[:2].isdigit() else text
        pump = self.pumps.get(address)
        if pump is None:
            return  # nobody at that address: silence, as on a real network
        with self._lock:
            now = time.monotonic()
            pump.account(now)
            if pump.safe_s and not safe:
                self.log.append(f"{address:02d} basic packet in safe mode: {command!r}")
                prompt, data, safe_reply = pump.prompt, "?COM", True
            elif pump.fresh:  # the real pump ignores its first command after power-up
                pump.last_packet = now
                pump.fresh = False
                self.log.append(f"{address:02d} ignored first command {command!r}")
                prompt, data, safe_reply = pump.prompt, "?IGN", safe
            else:
                pump.last_packet = now
                self.log.append(f"{address:02d} {command}")
                data = self._execute(pump, command.strip(), now)
                if pump.alarm is not None:  # an alarm replaces the prompt until STP
                    prompt, data = "A", f"?{pump.alarm}"
                else:
                    prompt = pump.prompt
                safe_reply = safe or (command.startswith("SAF") and pump.safe_s > 0)
        self._reply(address, prompt, data, safe_reply)

    def _execute(self, pump: EmulatedPump, command: str, now: float) -> str:
        name, arg = command[:3].upper(), command[3:].strip()
        if name == "VER":
            return "NE1000V3.928"
        if name == "DIA":
            if pump.prompt == "I":
                return "?NA"
            if arg:
                pump.diameter_mm = float(arg)
            return format_number(pump.diameter_mm)
        if name == "SAF":
            if arg:
                value = int(arg)
                if not 0 <= value <= 255:
                    return "?OOR"
                pump.safe_s = value
            return f"{pump.safe_s}"
        if name == "RAT":
            if not arg:
                return f"{format_number(pump.rate_ml_per_h / RATE_UNITS[pump.units])}" \
                       f"{pump.units}"
            units = arg[-2:] if arg[-2:] in RATE_UNITS else pump.units
            number = arg[:-2] if arg[-2:] in RATE_UNITS else arg
            if units != pump.units and pump.prompt == "I":
                return "?NA"
            try:
                rate = float(number) * RATE_UNITS[units]
                format_number(float(number))
            except (ValueError, NewEraError):
                return "?"
            if not 0 <= rate <= pump.max_rate_ml_per_h:
                return "?OOR"
            pump.units, pump.rate_ml_per_h = units, rate
            return ""
        if name == "RUN":
            if pump.alarm is not None:
                return ""  # the alarm is reported instead
            pump.prompt = "I" if pump.rate_ml_per_h > 0 else "S"
            return ""
        if name == "STP":
            pump.prompt = "S"
            if pump.alarm is not None:  # stop acknowledges the alarm (the operator's STP)
                pump.alarm = None
            return ""
        if name == "DIS":
            return f"I{format_number(pump.dispensed_ml)}W0.000ML"
        if name in ("DIR", "FUN", "CLD", "VOL", "PHN", "ADR"):
            return ""
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description="Emulated New Era NE-1000 pumps on a pty")
    parser.add_argument("--pumps", default="0", help="addresses, e.g. 0,1")
    parser.add_argument("--link", default=None, help="symlink to create to the device")
    parser.add_argument("--max-rate", type=float, default=1500.0, help="mL/h")
    args = parser.parse_args()
    emulator = NewEraEmulator([int(a) for a in args.pumps.split(",")],
                              max_rate_ml_per_h=args.max_rate).start()
    emulator.serve_forever(args.link)


if __name__ == "__main__":
    main()
