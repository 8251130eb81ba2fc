"""A device behind a pseudo-terminal, for the emulators: the raw pty pair, a worker thread
running the subclass's ``_run`` until :meth:`close`, and the close that drops the line as a
pulled cable does."""

from __future__ import annotations

import os
import threading
import time
import tty

__all__ = ["PtyDevice"]


class PtyDevice:
    """:attr:`device` is the path a bridge opens; :attr:`master` the emulator's end."""

    def __init__(self, thread_name: str) -> None:
        self.master, self._slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(self._slave)
        self.device = os.ttyname(self._slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def _run(self) -> None:  # the device's loop, until self._stop is set
        raise NotImplementedError

    def start(self):
        self._thread.start()
        return self

    def serve_forever(self, link: str | None = None) -> None:
        """Run from the command line: optionally a symlink *link* to the device, its path
        printed, until Ctrl-C."""
        if link:
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(self.device, link)
        print(self.device, flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            self.close()

    def close(self) -> None:
        """Drop the line (a pulled cable): nothing more is sent or read."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        for fd in (self.master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass
