"""BIS Vista serial output (binary "SPI" frames): bytes in -> events out, and the frames an
emulator or a test needs. Sans-I/O: no serial port, no clock, no sleeps (after h11).

Wire format
-----------
Written from the public description of the BIS Vista's RS-232 data output as an open-source
reader implements it (xeonfusion/VSCaptureBISV, C#, LGPL-3: its frame layout and message
structures were *read* for the format; no code was copied), cross-checked against a second
public emulator of the same format (TPVPfaller/VSCaptureBISV). Aspect/Covidien's own serial
interface specification is not public. Link settings: 57600 baud, 8 data bits, no parity,
1 stop bit, no handshake. All integers little-endian.

Frame::

    BA AB | seq u16 | length u16 | type u16 | data[length] | checksum u16

``checksum`` is the plain 16-bit sum of every byte from ``seq`` to the end of ``data``
(the ``BA AB`` start bytes excluded). ``type``: 1 data packet, 2 ack, 3 nak. A data packet's
``data`` is ``routing_id u32 | message_id u32 | seq u16 | length u16 | message[length]``.

Messages: the host asks for processed variables with message 0x73 (one byte: 0 = without,
1 = with spectra; the monitor then sends them periodically - **assumed** about once a second,
the rate the display updates) and stops them with 0x74. The monitor answers with
``M_PROCESSED_VARS`` (0x34; 120 bytes, or 156 with the "extra" trend variables) or
``M_PROCESSED_VARS_AND_SPECTRA`` (0x35; the same followed by 244 bytes of spectra). Raw EEG
(0x32, asked for with 0x6F) is recognised and ignored.

Processed variables (offsets in the message): ``dsc_info`` (24 bytes: ids, channel count,
``quick_test_result`` u16, gain and offset), two ``impedance`` records (``value`` u16,
``test_result`` u16), filter, smoothing and the two artefact masks (u32 each), then three
trend-variable records: channel 1, channel 2 and the combined channels 1+2 (the value the
monitor displays; the one used here). A trend record: suppression ratio (i16, 0.1 %),
SEF95 (i16, 0.01 Hz), BIS debug bits (i16), BIS (i16, **0.1 units**: the public reader scales
it by 0.1 though the structure's comment says 0-100; we follow the reader, which was run
against a monitor), two alternate BIS (i16), total power (i16, 0.01 dB), EMG low (i16,
0.01 dB), SQI (i32, 0.1 %), second artefact (i32); the 36-byte "extra" record adds burst
count (i16) and five reserved i16. Any field at or below -3277 means "no value"
(``DATA_INVALID_LIMIT``).

Not public, **assumed** here and said in docs/protocol.md: an impedance ``test_result`` other
than 0 means the electrode failed its impedance check (lead-off); a ``second_artifact`` other
than 0 means an artefact was detected in the last second. The packet carries no time stamp,
so readings are time-stamped on arrival by the bridge.

Reading quality (:func:`bis_quality`): lead-off -> ``invalid``; no BIS value ->
``unavailable``; SQI below 15 % -> ``invalid`` (the monitor cannot compute BIS); SQI below
50 % -> ``questionable`` ("unreliable"); an artefact or EMG above 55 dB -> ``questionable``.
The SQI and EMG bands are the monitors' displayed ones (e.g. Mindray ePM and BeneVision
operator's manuals, BIS chapter: SQI < 15 % "unable to calculate BIS", 15-49 % "unreliable",
50-100 % "reliable"; EMG > 55 dB "unacceptable"); each threshold is configurable.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["SPI_ID", "BAUDRATE", "MAX_DATA_BYTES", "DATA_INVALID_LIMIT", "BisVistaParser",
           "NEED_DATA", "ProcessedVars", "TrendVariables", "FrameError", "LinkReply",
           "OtherMessage", "QualityRules", "bis_quality", "checksum", "encode_frame",
           "encode_data_packet", "encode_processed_vars", "request_processed_vars",
           "stop_processed_vars", "REQUEST_PROCESSED_VARS", "STOP_PROCESSED_VARS",
           "M_PROCESSED_VARS", "M_PROCESSED_VARS_AND_SPECTRA", "M_DATA_RAW_EEG"]

SPI_ID = b"\xba\xab"
#: the monitor's serial settings (8N1, no handshake)
BAUDRATE = 57600
#: the longest data part accepted (processed vars with spectra are 412 bytes, raw EEG
#: about 530): a longer length field is a corrupted or foreign frame, never waited for
MAX_DATA_BYTES = 2048
#: any field at or below this raw value means "no value"
DATA_INVALID_LIMIT = -3277

L1_DATA, L1_ACK, L1_NAK = 1, 2, 3
M_DATA_RAW_EEG = 0x32
M_PROCESSED_VARS = 0x34
M_PROCESSED_VARS_AND_SPECTRA = 0x35
REQUEST_PROCESSED_VARS = 0x73
STOP_PROCESSED_VARS = 0x74

_L1 = struct.Struct("<HHH")            # seq, length, type
_DATA = struct.Struct("<IIHH")         # routing id, message id, seq, length
_DSC = struct.Struct("<BBBBHHiiii")    # 24 bytes
_IMPEDANCE = struct.Struct("<HH")      # value, test result
_SETTINGS = struct.Struct("<IIII")     # filter, smoothing, spectral and bispectral masks
_TREND = struct.Struct("<hhhhhhhhii")  # 24 bytes
_TREND_EXTRA = struct.Struct("<hhhhhh")  # 12 more bytes in the "extra" record
_PROCESSED_BYTES = 120
_PROCESSED_EXTRA_BYTES = 156
_HEAD = len(SPI_ID) + _L1.size


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: :meth:`BisVistaParser.next_event` has nothing more until more bytes arrive
NEED_DATA = _NeedData()


@dataclass(frozen=True)
class TrendVariables:
    """One trend record, scaled; None where the monitor sent "no value"."""

    bis: float | None              # [1] 0-100
    sqi_percent: float | None      # [%]
    emg_db: float | None           # [dB] EMG power (70-110 Hz band)
    sr_percent: float | None       # [%] suppression ratio over the last 63 s
    sef95_hz: float | None         # [Hz]
    total_power_db: float | None   # [dB]
    artifact: int                  # the monitor's second-artefact word (0: none)
    bis_raw: int                   # the BIS field as sent (for an "unavailable" reading)
    sqi_raw: int
    sr_raw: int


@dataclass(frozen=True)
class ProcessedVars:
    """A processed-variables message (0x34 or 0x35)."""

    link_seq: int                  # the frame's sequence number
    message_seq: int               # the message's own sequence number (duplicates share it)
    trend: TrendVariables          # the combined channels (what the monitor displays)
    impedance_ohm: tuple[int, int]
    impedance_test: tuple[int, int]  # 0 = passed (assumed)
    quick_test: int

    @property
    def lead_off(self) -> bool:
        """An electrode failed its impedance check (assumed meaning of a non-zero result)."""
        return any(self.impedance_test)

    def fields(self) -> dict:
        """Everything decoded, for the audit log."""
        t = self.trend
        return {"link_seq": self.link_seq, "message_seq": self.message_seq, "bis": t.bis,
                "sqi_percent": t.sqi_percent, "emg_db": t.emg_db, "sr_percent": t.sr_percent,
                "sef95_hz": t.sef95_hz, "total_power_db": t.total_power_db,
                "artifact": t.artifact, "impedance_ohm": list(self.impedance_ohm),
                "impedance_test": list(self.impedance_test), "quick_test": self.quick_test}


@dataclass(frozen=True)
class FrameError:
    """Bytes that were not a good frame; *code*: ``garbage`` (bytes outside any frame),
    ``checksum``, ``oversize`` (a length beyond :data:`MAX_DATA_BYTES`), ``malformed`` (a
    good checksum around a packet too short for its own lengths), ``unknown_type``."""

    code: str
    n_bytes: int
    detail: str = ""


@dataclass(frozen=True)
class LinkReply:
    """A link-layer ack (2) or nak (3) from the monitor."""

    link_seq: int
    ok: bool


@dataclass(frozen=True)
class OtherMessage:
    """A well-formed data packet of a message this bridge does not use (e.g. raw EEG)."""

    message_id: int
    n_bytes: int


def checksum(data: bytes) -> int:
    """The frame checksum: the 16-bit sum of the bytes after the start bytes."""
    return sum(data) & 0xFFFF


def _scaled(raw: int, per_unit: int) -> float | None:
    """*raw* in 1/*per_unit* steps, or None for the "no value" codes."""
    return None if raw <= DATA_INVALID_LIMIT else raw / per_unit


def _trend(record: bytes) -> TrendVariables:
    (sr, sef95, _bits, bis, _alt, _alt2, power, emg, sqi, artifact) = _TREND.unpack_from(record)
    return TrendVariables(bis=_scaled(bis, 10), sqi_percent=_scaled(sqi, 10),
                          emg_db=_scaled(emg, 100), sr_percent=_scaled(sr, 10),
                          sef95_hz=_scaled(sef95, 100), total_power_db=_scaled(power, 100),
                          artifact=artifact, bis_raw=bis, sqi_raw=sqi, sr_raw=sr)


def _processed(link_seq: int, message_seq: int, body: bytes) -> ProcessedVars | FrameError:
    if len(body) >= _PROCESSED_EXTRA_BYTES and len(body) != _PROCESSED_BYTES + 244:
        record = _TREND.size + _TREND_EXTRA.size  # the "extra" layout (156 or 156 + 244)
    elif len(body) >= _PROCESSED_BYTES:
        record = _TREND.size
    else:
        return FrameError("malformed", len(body),
                          f"processed variables of {len(body)} bytes, expected >= 120")
    dsc = _DSC.unpack_from(body, 0)
    imp1 = _IMPEDANCE.unpack_from(body, _DSC.size)
    imp2 = _IMPEDANCE.unpack_from(body, _DSC.size + _IMPEDANCE.size)
    start = _DSC.size + 2 * _IMPEDANCE.size + _SETTINGS.size
    combined = body[start + 2 * record:start + 3 * record]
    return ProcessedVars(link_seq=link_seq, message_seq=message_seq, trend=_trend(combined),
                         impedance_ohm=(imp1[0], imp2[0]), impedance_test=(imp1[1], imp2[1]),
                         quick_test=dsc[5])


class BisVistaParser:
    """Incremental parser: :meth:`receive_data` bytes as they arrive, then call
    :meth:`next_event` until it returns :data:`NEED_DATA`.

    Strategy: find the start bytes, read the length, wait for the whole frame, check the
    checksum. A bad checksum or an impossible length gives up one byte only and searches
    again, so a good frame that follows a corrupted one is never lost to it (the rest of
    the bad frame then shows as ``garbage``). No input raises; the buffer never holds more
    than one frame's worth of bytes beyond what was fed.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_event(self):
        """The next event: :class:`ProcessedVars`, :class:`FrameError`, :class:`LinkReply`,
        :class:`OtherMessage`, or :data:`NEED_DATA`."""
        buf = self._buffer
        start = buf.find(SPI_ID)
        if start < 0:
            # keep a last 0xBA: it may be the first half of the next start
            keep = 1 if buf[-1:] == SPI_ID[:1] else 0
            junk = len(buf) - keep
            if junk <= 0:
                return NEED_DATA
            del buf[:junk]
            return FrameError("garbage", junk)
        if start > 0:
            del buf[:start]
            return FrameError("garbage", start)
        if len(buf) < _HEAD:
            return NEED_DATA
        link_seq, length, kind = _L1.unpack_from(buf, len(SPI_ID))
        if length > MAX_DATA_BYTES:
            del buf[:1]
            return FrameError("oversize", 1, f"length field {length} > {MAX_DATA_BYTES}")
        end = _HEAD + length
        if len(buf) < end + 2:
            return NEED_DATA
        (sent,) = struct.unpack_from("<H", buf, end)
        computed = checksum(buf[len(SPI_ID):end])
        if sent != computed:
            del buf[:1]
            return FrameError("checksum", 1, f"checksum {sent:#06x}, computed {computed:#06x}")
        data = bytes(buf[_HEAD:end])
        del buf[:end + 2]
        return self._packet(link_seq, kind, data)

    def _packet(self, link_seq: int, kind: int, data: bytes):
        if kind in (L1_ACK, L1_NAK):
            return LinkReply(link_seq, kind == L1_ACK)
        if kind != L1_DATA:
            return FrameError("unknown_type", len(data), f"link packet type {kind}")
        if len(data) < _DATA.size:
            return FrameError("malformed", len(data), f"data packet of {len(data)} bytes")
        _routing, message_id, message_seq, length = _DATA.unpack_from(data)
        body = data[_DATA.size:]
        if length != len(body):
            return FrameError("malformed", len(data),
                              f"message length {length}, {len(body)} bytes follow")
        if message_id in (M_PROCESSED_VARS, M_PROCESSED_VARS_AND_SPECTRA):
            return _processed(link_seq, message_seq, body)
        return OtherMessage(message_id, len(body))


# ---------------------------------------------------------------------------- quality
@dataclass(frozen=True)
class QualityRules:
    """Thresholds of :func:`bis_quality` (each declared once, here)."""

    #: [%] below it the monitor cannot compute BIS: the reading is invalid
    sqi_invalid_below: float = 15.0
    #: [%] below it BIS is unreliable: questionable
    sqi_questionable_below: float = 50.0
    #: [dB] above it EMG makes BIS unreliable: questionable (None: not checked)
    emg_questionable_above_db: float | None = 55.0
    #: whether a failed impedance check counts as lead-off
    lead_off_from_impedance: bool = True


def bis_quality(packet: ProcessedVars, rules: QualityRules = QualityRules()
                ) -> tuple[str, list[str]]:
    """The BIS reading's quality and the conditions behind it (``lead_off``, ``no_value``,
    ``sqi_low``, ``sqi_unreliable``, ``artifact``, ``emg_high``), worst first."""
    t = packet.trend
    reasons = []
    if rules.lead_off_from_impedance and packet.lead_off:
        reasons.append("lead_off")
    if t.bis is None:
        reasons.append("no_value")
    if t.sqi_percent is None or t.sqi_percent < rules.sqi_invalid_below:
        reasons.append("sqi_low")
    elif t.sqi_percent < rules.sqi_questionable_below:
        reasons.append("sqi_unreliable")
    if t.artifact:
        reasons.append("artifact")
    if rules.emg_questionable_above_db is not None and t.emg_db is not None and \
            t.emg_db > rules.emg_questionable_above_db:
        reasons.append("emg_high")
    if "lead_off" in reasons:
        return "invalid", reasons
    if "no_value" in reasons:
        return "unavailable", reasons
    if "sqi_low" in reasons:
        return "invalid", reasons
    if reasons:
        return "questionable", reasons
    return "valid", reasons


# ---------------------------------------------------------------------------- frames out
def encode_frame(link_seq: int, kind: int, data: bytes) -> bytes:
    """A whole frame around *data*."""
    body = _L1.pack(link_seq & 0xFFFF, len(data), kind) + data
    return SPI_ID + body + struct.pack("<H", checksum(body))


def encode_data_packet(link_seq: int, message_id: int, message: bytes, *,
                       message_seq: int | None = None, routing_id: int = 0) -> bytes:
    seq = link_seq if message_seq is None else message_seq
    data = _DATA.pack(routing_id, message_id, seq & 0xFFFF, len(message)) + message
    return encode_frame(link_seq, L1_DATA, data)


def request_processed_vars(link_seq: int = 0, *, spectra: bool = False) -> bytes:
    """The host's request for processed variables (the monitor then sends them)."""
    return encode_data_packet(link_seq, REQUEST_PROCESSED_VARS, bytes([int(spectra)]),
                              message_seq=0, routing_id=4)


def stop_processed_vars(link_seq: int = 0) -> bytes:
    return encode_data_packet(link_seq, STOP_PROCESSED_VARS, b"", message_seq=0, routing_id=4)


def _raw(value: float | None, per_unit: int) -> int:
    return -32768 if value is None else int(round(value * per_unit))


def encode_processed_vars(link_seq: int, *, bis: float | None, sqi_percent: float | None,
                          emg_db: float | None = 30.0, sr_percent: float | None = 0.0,
                          sef95_hz: float | None = 15.0, total_power_db: float | None = 60.0,
                          artifact: int = 0, impedance_test: tuple[int, int] = (0, 0),
                          impedance_ohm: tuple[int, int] = (2000, 2000),
                          message_seq: int | None = None) -> bytes:
    """A ``M_PROCESSED_VARS`` frame (120 bytes of message) with the same trend variables on
    all three records; None sends the "no value" code. For the emulator and tests."""
    trend = _TREND.pack(_raw(sr_percent, 10), _raw(sef95_hz, 100), 0, _raw(bis, 10),
                        _raw(bis, 10), _raw(bis, 10), _raw(total_power_db, 100),
                        _raw(emg_db, 100), _raw(sqi_percent, 10), artifact)
    message = (_DSC.pack(1, 1, 1, 1, 2, 0, 1, 20, -3234, 1)
               + _IMPEDANCE.pack(impedance_ohm[0], impedance_test[0])
               + _IMPEDANCE.pack(impedance_ohm[1], impedance_test[1])
               + _SETTINGS.pack(0, 0, 0, 0) + trend * 3)
    return encode_data_packet(link_seq, M_PROCESSED_VARS, message, message_seq=message_seq)
