"""An emulated BIS Vista monitor's serial data output on a pseudo-terminal, with fault knobs,
so the BIS sensor bridge is tested without a monitor.

    python -m hil.bis_emulator --link /tmp/bisvista --bis 45

prints the serial device to open (and makes *--link* a symlink to it). Like the monitor (as
the format is described in ``mpc_dose/protocol/bis_vista.py``) it starts sending processed
variables (``M_PROCESSED_VARS``) every *period_s* once the host asks for them (message 0x73)
and stops on 0x74; each packet carries a new message sequence number.

Fault knobs (attributes of :class:`BisEmulator`, changeable while it runs):
``bis``, ``sqi``, ``emg_db``, ``sr`` (the values sent; None sends "no value"),
``artifact`` (the second-artefact word), ``lead_off`` (a failed impedance check on
channel 1), ``garbage`` (junk bytes before each packet), ``corrupt_checksum`` (every
packet's checksum wrong), ``silent`` (nothing sent: a dropped link), ``repeat`` (the last
packet sent again, unchanged: a stale monitor), ``ignore_requests`` (never starts sending).
:meth:`close` drops the line for good.
"""

from __future__ import annotations

import argparse
import os
import select
import time

from mpc_dose.protocol.bis_vista import (NEED_DATA, REQUEST_PROCESSED_VARS, STOP_PROCESSED_VARS,
                                         BisVistaParser, OtherMessage, encode_processed_vars)

from .pty_device import PtyDevice

__all__ = ["BisEmulator"]


class BisEmulator(PtyDevice):
    """A monitor behind one pseudo-terminal; :attr:`device` is the path to open."""

    def __init__(self, *, period_s: float = 1.0, bis: float | None = 45.0,
                 sqi: float | None = 95.0, autostart: bool = False) -> None:
        super().__init__("bis-emulator")
        self.period_s = period_s
        self.bis, self.sqi, self.emg_db, self.sr = bis, sqi, 30.0, 0.0
        self.artifact = 0
        self.lead_off = False
        self.garbage = b""
        self.corrupt_checksum = False
        self.silent = False
        self.repeat = False
        self.ignore_requests = False
        #: whether the host asked for processed variables (the monitor is sending)
        self.sending = autostart
        self.requests = 0
        self.sent = 0
        self._seq = 0
        self._last = b""
        self._parser = BisVistaParser()

    def packet(self) -> bytes:
        """The next packet as the knobs say (a new message sequence number)."""
        self._seq = (self._seq + 1) & 0xFFFF
        frame = encode_processed_vars(self._seq, bis=self.bis, sqi_percent=self.sqi,
                                      emg_db=self.emg_db, sr_percent=self.sr,
                                      artifact=self.artifact,
                                      impedance_test=(1 if self.lead_off else 0, 0))
        if self.corrupt_checksum:
            frame = frame[:-2] + bytes([frame[-2] ^ 0x5A, frame[-1]])
        return frame

    def _run(self) -> None:
        next_packet = time.monotonic()
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.master], [], [], 0.02)
                if ready:
                    self._requests(os.read(self.master, 1024))
            except (OSError, ValueError):
                return
            now = time.monotonic()
            if now < next_packet:
                continue
            next_packet = now + self.period_s
            if not self.sending or self.silent:
                continue
            if not (self.repeat and self._last):
                self._last = self.packet()
            try:
                os.write(self.master, self.garbage + self._last)
                self.sent += 1
            except OSError:
                return

    def _requests(self, data: bytes) -> None:
        """The host's requests (bad frames from the host are ignored, as a monitor would)."""
        self._parser.receive_data(data)
        while (event := self._parser.next_event()) is not NEED_DATA:
            if not isinstance(event, OtherMessage):
                continue
            self.requests += 1
            if event.message_id == REQUEST_PROCESSED_VARS and not self.ignore_requests:
                self.sending = True
            elif event.message_id == STOP_PROCESSED_VARS:
                self.sending = False


def main() -> None:
    parser = argparse.ArgumentParser(description="Emulated BIS Vista serial output on a pty")
    parser.add_argument("--link", default=None, help="symlink to create to the device")
    parser.add_argument("--bis", type=float, default=45.0)
    parser.add_argument("--sqi", type=float, default=95.0, help="[%%]")
    parser.add_argument("--period", type=float, default=1.0, help="[s] between packets")
    args = parser.parse_args()
    emulator = BisEmulator(period_s=args.period, bis=args.bis, sqi=args.sqi).start()
    emulator.serve_forever(args.link)


if __name__ == "__main__":
    main()
