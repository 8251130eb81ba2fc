"""How fast the sensor-bridge codecs decode (prints figures; not a test).

    python benchmarks/sensor_codecs.py

A BIS Vista sends about one 134-byte processed-variables frame a second at 57600 baud
(at most ~40 frames/s fill the line); a Nightscout answer holds up to `count` entries.
"""

from __future__ import annotations

import json
import time

from mpc_dose.protocol import bis_vista as bv
from mpc_dose.protocol import nightscout as ns


def bis_frames_per_s(n: int = 20000) -> float:
    frames = b"".join(bv.encode_processed_vars(i, bis=40 + i % 20, sqi_percent=90)
                      for i in range(n))
    parser = bv.BisVistaParser()
    start = time.perf_counter()
    for i in range(0, len(frames), 512):  # as a serial read hands them over
        parser.receive_data(frames[i:i + 512])
        while parser.next_event() is not bv.NEED_DATA:
            pass
    return n / (time.perf_counter() - start)


def garbage_bytes_per_s(n: int = 2_000_000) -> float:
    junk = bytes((i * 37) % 251 for i in range(n))  # contains start bytes now and then
    parser = bv.BisVistaParser()
    start = time.perf_counter()
    for i in range(0, len(junk), 512):
        parser.receive_data(junk[i:i + 512])
        while parser.next_event() is not bv.NEED_DATA:
            pass
    return n / (time.perf_counter() - start)


def nightscout_entries_per_s(n: int = 1000, repeats: int = 20) -> float:
    body = json.dumps([{"type": "sgv", "sgv": 100 + i % 50, "date": 1_700_000_000_000 + i,
                        "direction": "Flat", "noise": 1} for i in range(n)]).encode()
    start = time.perf_counter()
    for _ in range(repeats):
        ns.parse_entries(body)
    return n * repeats / (time.perf_counter() - start)


if __name__ == "__main__":
    print(f"BIS Vista frames decoded: {bis_frames_per_s():,.0f} /s "
          f"(the monitor sends ~1 /s; the line carries at most ~40 /s)")
    print(f"BIS garbage scanned: {garbage_bytes_per_s() / 1e6:,.1f} MB/s "
          f"(the line carries 0.0058 MB/s)")
    print(f"Nightscout entries parsed: {nightscout_entries_per_s():,.0f} /s")
