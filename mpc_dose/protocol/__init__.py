"""The sans-I/O protocol: messages, the strict codec (and, later, sessions and leases).

Standard library only: no sockets, no sleeps, no clocks. Transports move the bytes.
"""

from .codec import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Envelope, decode, encode
from .messages import (ACK_CODES, PUMP_STATES, QUALITIES, Ack, Alarm, Bolus, Fallback,
                       GetStatus, Heartbeat, Hello, LocalProtocolError, Measurement,
                       ProtocolError, PumpStatus, RemoteProtocolError, SetRate, Stop)

__all__ = ["Envelope", "encode", "decode", "PROTOCOL_VERSION", "MAX_MESSAGE_BYTES",
           "ProtocolError", "LocalProtocolError", "RemoteProtocolError", "QUALITIES",
           "PUMP_STATES", "ACK_CODES", "Measurement", "SetRate", "Bolus", "Stop", "GetStatus",
           "Ack", "PumpStatus", "Alarm", "Heartbeat", "Hello", "Fallback"]
