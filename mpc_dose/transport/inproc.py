"""An in-process link inside one simpy environment: encoded frames, optional latency.

Frames cross as bytes, through the same codec a ZeroMQ link uses, so a node that works here
works across processes. A frame that fails to decode is counted and dropped: it never
reaches the receiving node.
"""

from __future__ import annotations

from collections.abc import Callable

import simpy

from ..protocol.codec import Envelope, decode, encode
from ..protocol.messages import ProtocolError, _Message

__all__ = ["InprocLink"]


class InprocLink:
    """One direction: ``send(message, now)`` encodes and, after *latency_s*, decodes and hands
    the message to *deliver(message, now)*.

    Parameters
    ----------
    env : simpy.Environment
    deliver : callable
        The receiving node's handler.
    src : str
        The sender's id (envelope ``src``); ``seq`` counts up from 0 in epoch *epoch*.
    latency_s : float
        Delivery delay [s]; 0 delivers at once, within the sender's event.
    encode : bool
        Carry encoded frames through the codec (default), as across processes; False hands
        over the (immutable, already validated) message objects, which the codec tests show
        to be what decoding the frame gives - for large in-silico trials.
    """

    def __init__(self, env: simpy.Environment, deliver: Callable[[_Message, float], None], *,
                 src: str, epoch: str = "e0", latency_s: float = 0.0,
                 encode: bool = True) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s!r}")
        self.env, self._deliver, self.src, self.epoch = env, deliver, src, epoch
        self.latency_s = latency_s
        self.encode = encode
        self.seq = 0
        self.sent = 0
        self.dropped: list[str] = []

    def send(self, message: _Message) -> None:
        item = encode(Envelope(message, self.src, self.epoch, self.seq, self.env.now,
                               self.env.now)) if self.encode else message
        self.seq += 1
        self.sent += 1
        if self.latency_s == 0:
            self._arrive(item)
        else:
            self.env.process(self._later(item))

    def _later(self, item):
        yield self.env.timeout(self.latency_s)
        self._arrive(item)

    def _arrive(self, item) -> None:
        if isinstance(item, bytes):
            self.receive_frame(item)
        else:
            self._deliver(item, self.env.now)

    def receive_frame(self, frame: bytes) -> None:
        """Decode one frame and deliver it; a bad frame is counted and dropped."""
        try:
            envelope = decode(frame)
        except ProtocolError as err:
            self.dropped.append(err.code)
            return
        self._deliver(envelope.message, self.env.now)
