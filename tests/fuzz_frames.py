"""A seeded frame fuzzer for the command channel, written from docs/protocol.md: frames an
adversary or a broken peer may send, and a fake pump driver that checks, call by call, what
reaches the hardware.

Used by ``tests/test_bridge_fuzz.py`` (short runs in ``make test``) and
``benchmarks/fuzz_bridge.py`` (the long run). Frames are written as JSON text token by token,
so they can hold what ``json.dumps`` never writes: ``NaN``, ``1e400``, lone surrogate escapes,
duplicate keys, integers beyond 2**64.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------- values
NUMBERS = ["0", "-0.0", "1", "-1", "0.0004", "1e-300", "20", "99.99", "100", "100.0001",
           "1e308", "-1e308", "1e400", "-1e400", "NaN", "Infinity", "-Infinity",
           str(2**53), str(2**64), str(-2**63), "1" * 400, "3.14159", "true", "false", "null",
           '"20"', "[]", "{}", "[1,2]", '{"rate":1}']
UNITS = ["mL/h", "mL/min", "uL/h", "uL/min", "mL/h/0", "uL/min/0.001", "1e400*mL/h", "0*mL/h",
         "mL/hr", "mL/h/1", "ml/h", "kg", "mg/s", "ug/s", "mg/h", "mmol/s", "1", "",
         "mL/h" * 50, "\\ud800", "m\\u0000L/h", "10^400/h", "mL^99999/h"]
STRINGS = ["", "p", "propofol", "remifentanil", "pump", "x" * 129, "x" * 70000, "\\ud800",
           "\\udfff\\ud800", "é", "\\u0000", "\\n", "propofol\\u0000", "😀" * 40,
           "controller-1", "a" * 128]
AMOUNT_UNITS = ["U", "mU", "mL", "U/h", "u", "IU", "mg", "", "U" * 50, "\\ud800", "1e400*U",
                "U/0"]
SEQS = ["0", "1", "7", str(2**53 - 1), str(2**53), str(2**64), "-1", "1.5", '"3"', "null",
        "true", str(-2**70)]


@dataclass
class FrameFuzzer:
    """Frames for the pumps *pumps*, from peers *sources*, around wall time *wall()*."""

    rng: random.Random
    pumps: tuple[str, ...] = ("propofol",)
    sources: tuple[str, ...] = ("controller-1", "controller-2", "intruder")
    seqs: dict = field(default_factory=dict)
    epochs: dict = field(default_factory=dict)
    counter: int = 0
    #: this frame's chance of damage per field (0 for a clean frame)
    damage: float = 0.0
    #: also bolus commands (protocol 1.1; for an insulin pump)
    bolus: bool = False

    def _bad(self) -> bool:
        return self.rng.random() < self.damage

    def _pick(self, options):
        return options[self.rng.randrange(len(options))]

    def _string(self) -> str:
        if not self._bad():
            return json.dumps(self._pick(list(self.pumps) + ["nope"]))
        return '"' + self._pick(STRINGS) + '"'

    def _number(self, typical: float) -> str:
        if not self._bad():
            return repr(round(self.rng.uniform(0.0, typical), 4))
        if self.rng.random() < 0.3:
            return repr(self.rng.uniform(-typical, 3 * typical))
        return self._pick(NUMBERS)

    def _unit(self) -> str:
        return '"' + (self._pick(UNITS[:4]) if not self._bad() else self._pick(UNITS)) + '"'

    def _object(self, pairs: list[tuple[str, str]]) -> str:
        """JSON object text from (key, value text) pairs, sometimes damaged."""
        pairs = list(pairs)
        if self._bad() and self.rng.random() < 0.3:
            if pairs and self.rng.random() < 0.5:
                pairs.pop(self.rng.randrange(len(pairs)))       # a key missing
            else:
                pairs.append((self._pick(["extra", "rate", "cmd_id", "\\ud800"]),
                              self._number(10)))                 # unknown or duplicate key
        return "{" + ",".join(f'"{k}":{v}' for k, v in pairs) + "}"

    def _body(self, kind: str) -> str:
        self.counter += 1
        cmd_id = f'"c{self.counter}"' if not self._bad() else self._string()
        pump = self._string()
        if kind == "set_rate":
            if self.rng.random() < 0.5:
                fallback = [("action", '"stop"')]
            else:
                fallback = [("action", '"preset_rate"'), ("rate", self._number(25.0)),
                            ("unit", self._unit())]
            if self._bad():
                fallback[0] = ("action", self._pick(['"stop"', '"preset_rate"', '"go"']))
            pairs = [("cmd_id", cmd_id), ("pump", pump), ("rate", self._number(40.0)),
                     ("unit", self._unit()), ("lease_s", self._number(12.0)),
                     ("fallback", self._object(fallback))]
            if self.rng.random() < 0.3:  # a dose rate that rarely agrees: refused as 'unit'
                pairs += [("dose_rate", self._number(0.5)),
                          ("dose_unit", '"' + self._pick(["mg/s", "mg/h", "ug/s", "kg",
                                                          "mg/s/0"]) + '"')]
            if self.rng.random() < 0.1:
                pairs.append(("basis_seq", self._pick(SEQS)))
            return self._object(pairs)
        if kind == "bolus":
            unit = self._pick(AMOUNT_UNITS[:2]) if not self._bad() else \
                self._pick(AMOUNT_UNITS)
            amount = self._number(12.0) if unit != "mU" else self._number(12000.0)
            pairs = [("cmd_id", cmd_id), ("pump", pump), ("amount", amount),
                     ("unit", f'"{unit}"'), ("lease_s", self._number(12.0))]
            if self.rng.random() < 0.3:  # an extended bolus
                pairs.append(("duration_s", self._number(900.0)))
            if self.rng.random() < 0.2:  # the volume alongside, rarely right
                pairs += [("volume", self._number(0.12)),
                          ("vol_unit", '"' + self._pick(["mL", "uL", "U"]) + '"')]
            return self._object(pairs)
        if kind == "stop":
            return self._object([("cmd_id", cmd_id), ("pump", pump),
                                 ("reason", self._string())])
        if kind == "hello":
            return self._object([("role", self._string()),
                                 ("versions", self._pick(["[1]", "[1,2]", "[]", "[true]",
                                                          f"[{2**64}]", "[1]"]))])
        if kind in ("get_status",):
            return self._object([("cmd_id", cmd_id), ("pump", pump)])
        # a telemetry message sent to the command socket
        return self._object([("var", self._string()), ("value", self._number(100)),
                             ("unit", self._unit()), ("t_meas", self._number(1e9))])

    def frame(self, wall: float) -> bytes:
        """One frame: mostly protocol-shaped, some mutated bytes, a few pure noise."""
        r = self.rng.random()
        if r < 0.03:
            return bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 200)))
        # half the frames are clean (commands a controller could send, in range or not),
        # half carry damage in about one field in five
        self.damage = 0.0 if self.rng.random() < 0.5 else 0.2
        kind = self._pick(["set_rate"] * 6 + ["stop", "get_status", "get_status", "hello"]
                          + (["measurement", "bogus"] if self.damage else [])
                          + (["bolus"] * 4 if self.bolus else []))
        src = self._pick(self.sources) if not self._bad() else self._pick(STRINGS)
        if self.rng.random() < 0.001:  # a restart: a new epoch (the old one is retired)
            self.epochs[src] = f"e{self.rng.randrange(10**9)}"
        epoch = self.epochs.setdefault(src, "e1") if not self._bad() else \
            self._pick(["", "\\ud800", "x" * 200])
        key = (src, epoch)
        if not self._bad():
            self.seqs[key] = self.seqs.get(key, 0) + 1
            seq = str(self.seqs[key])
        elif self.rng.random() < 0.5:  # a replay: an earlier number
            seq = str(max(0, self.seqs.get(key, 0) - self.rng.randrange(1, 10)))
        else:  # not a valid number (a valid but far-ahead one would lock the sender out)
            seq = self._pick(SEQS[4:])
        t_sent = repr(wall + self.rng.uniform(-0.5, 0.5)) if not self._bad() else \
            self._pick(NUMBERS)
        envelope = [("v", "1" if not self._bad() else self._pick(["2", '"1"', "true", "1"])),
                    ("type", f'"{kind}"'), ("src", f'"{src}"'), ("epoch", f'"{epoch}"'),
                    ("seq", seq), ("t_sent", t_sent), ("t_sim", "null"),
                    ("body", self._body(kind))]
        text = self._object(envelope).encode("utf-8", "surrogatepass")
        if r < 0.10:  # byte-level damage to a frame
            data = bytearray(text)
            for _ in range(self.rng.randrange(1, 4)):
                op = self.rng.random()
                at = self.rng.randrange(len(data))
                if op < 0.4:
                    data[at] ^= 1 << self.rng.randrange(8)
                elif op < 0.7:
                    del data[at:at + self.rng.randrange(1, 20)]
                else:
                    data[at:at] = bytes([self.rng.randrange(256)])
            return bytes(data)
        return text


class CheckingDriver:
    """A pump driver that enforces, on every call, what may reach the hardware: finite
    rates within [0, max_rate], rises within max_step, the hourly volume; and records every
    violation instead of raising (the bridge must not be the one to notice)."""

    def __init__(self, *, max_rate: float, max_step: float, max_volume_per_h: float,
                 clock) -> None:
        self.max_rate, self.max_step, self.max_volume = max_rate, max_step, max_volume_per_h
        self.clock = clock
        self.rate = 0.0
        self.timeline: list[tuple[float, float]] = [(clock(), 0.0)]
        self.history: list[tuple[float, float]] = []   # what left the last hour
        self.violations: list[str] = []
        self.non_finite = 0
        self.sets = 0
        self.fail_every = 0      # > 0: every n-th set raises, as a lost reply would

    def initialise(self, address, diameter_mm) -> None:
        self.rate = 0.0

    def _run(self, rate: float) -> None:
        now = self.clock()
        if not math.isfinite(rate):
            self.non_finite += 1
            self.violations.append(f"non-finite rate {rate!r}")
            return
        if not 0.0 <= rate <= self.max_rate:
            self.violations.append(f"rate {rate} outside [0, {self.max_rate}]")
        if rate - self.rate > self.max_step + 1e-9:
            self.violations.append(f"rise {self.rate} -> {rate} beyond {self.max_step}")
        self.rate = rate
        self.timeline.append((now, rate))
        volume = self.volume_last_hour(now)
        if volume > self.max_volume + 1e-6:
            self.violations.append(f"volume {volume:.4f} mL in the hour before {now:.1f}")

    def volume_last_hour(self, now: float) -> float:
        while len(self.timeline) > 1 and self.timeline[1][0] <= now - 3600.0:
            self.history.append(self.timeline.pop(0))  # out of every window from now on
        total = 0.0
        points = self.timeline + [(now, self.rate)]
        for (t0, r), (t1, _) in zip(points, points[1:]):
            start = max(t0, now - 3600.0)
            if t1 > start:
                total += r * (t1 - start) / 3600.0
        return total

    def set_rate(self, address, rate: float) -> float:
        self.sets += 1
        if self.fail_every and self.sets % self.fail_every == 0:
            raise RuntimeError("no valid reply (injected)")
        self._run(rate)
        return self.rate

    def stop(self, address) -> None:
        self._run(0.0)

    def read(self, address):
        from types import SimpleNamespace

        return SimpleNamespace(state="infusing" if self.rate > 0 else "stopped",
                               rate_ml_per_h=self.rate, dispensed_ml=0.0, alarm=None)
