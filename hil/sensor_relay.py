"""Sensor relay: a serial or line-based stream of readings -> ``measurement`` messages.

    python -m hil.sensor_relay --serial /dev/ttyUSB1 --var bis --unit 1 \\
        --telemetry tcp://127.0.0.1:5570
    some_device_reader | python -m hil.sensor_relay --stdin --var map --unit mmHg ...

Each line is ``value`` or ``value,quality`` (quality as the protocol's list: valid,
questionable, calibrating, invalid, overflow, underflow, unavailable). The reading is time-
stamped on arrival (UTC). A line that is not a finite number (or names an unknown quality)
is counted and not relayed - never a made-up value; the controller's staleness gate then
sees the gap.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from mpc_dose.protocol.messages import QUALITIES, WIRE_UNITS, LocalProtocolError, Measurement

__all__ = ["parse_line"]


def parse_line(line: str, *, var: str, unit: str, t_s: float, sensor: str = ""
               ) -> Measurement | None:
    """One reading from *line*, or None when it holds no usable number."""
    text = line.strip()
    if not text:
        return None
    value_text, _, quality = text.partition(",")
    quality = quality.strip() or "valid"
    if quality not in QUALITIES:
        return None
    try:
        value = float(value_text)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    try:
        return Measurement(var=var, value=value, unit=unit, t_meas=t_s, quality=quality,
                           sensor=sensor)
    except LocalProtocolError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description="relay sensor lines as measurements")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--serial", help="serial device or pyserial URL")
    source.add_argument("--stdin", action="store_true")
    parser.add_argument("--baudrate", type=int, default=9600)
    parser.add_argument("--var", required=True)
    parser.add_argument("--unit", required=True, choices=WIRE_UNITS["measurement"],
                        help="the readings' unit (docs/protocol.md section 3)")
    parser.add_argument("--sensor", default="relay")
    parser.add_argument("--telemetry", default="tcp://127.0.0.1:5570")
    args = parser.parse_args()

    import zmq

    from mpc_dose.transport.zmq_link import Telemetry

    context = zmq.Context()
    pub = Telemetry(context, args.telemetry, src=f"sensor-{args.var}")
    if args.serial:
        import serial

        stream = serial.serial_for_url(args.serial, baudrate=args.baudrate, timeout=1.0)
        lines = (raw.decode("ascii", "replace") for raw in iter(stream.readline, None))
    else:
        lines = iter(sys.stdin.readline, "")
    rejected = 0
    for line in lines:
        if not line:
            continue
        message = parse_line(line, var=args.var, unit=args.unit, t_s=time.time(),
                             sensor=args.sensor)
        if message is None:
            rejected += 1
            print(f"rejected line {line.strip()!r} ({rejected} so far)", file=sys.stderr)
            continue
        pub.send(message)


if __name__ == "__main__":
    main()
