"""Transports: the only code that moves bytes between nodes (in-process now; ZeroMQ and
serial later). They carry encoded frames and make no decisions."""

from .inproc import InprocLink

__all__ = ["InprocLink"]
