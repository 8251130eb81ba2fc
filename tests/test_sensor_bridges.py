"""Sensor bridges (BIS Vista serial output, Nightscout): the sans-I/O codecs, the shared node's
rules, the config's errors, and each bridge against its emulator under injected faults
(garbage, checksum errors, dropped link, stale data, signal-quality loss, HTTP errors) with
its expected outcome: readings marked or not relayed, an alarm, nothing crashes, everything
in the audit log. Sockets listen on 127.0.0.1 at free ports; waits are bounded conditions,
not timings.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from hil.bis_emulator import BisEmulator
from hil.nightscout_emulator import NightscoutEmulator
from mpc_dose.audit import AuditLog
from mpc_dose.errors import ConfigError
from mpc_dose.node.sensor_bridge import (BIS_KEYS_KEPT, DeviceReading, SensorBridgeNode,
                                         TreatmentSink, bis_reading)
from mpc_dose.protocol import bis_vista as bv
from mpc_dose.protocol import nightscout as ns
from mpc_dose.protocol.messages import Alarm, Measurement, PumpStatus
from mpc_dose.serve.sensor_bridge import SensorBridgeProcess, load_sensor_bridge_config
from mpc_dose.transport.zmq_link import Telemetry, TelemetryReader
from tests.ports import free_addresses

SECRET = "emulated-secret-1"


def events(parser: bv.BisVistaParser) -> list:
    out = []
    while (event := parser.next_event()) is not bv.NEED_DATA:
        out.append(event)
    return out


def parse(data: bytes) -> list:
    parser = bv.BisVistaParser()
    parser.receive_data(data)
    return events(parser)


# ---------------------------------------------------------------------------- BIS codec
def test_a_processed_vars_frame_round_trips_with_its_units():
    """BIS in 0.1 units, SQI and SR in 0.1 %, EMG in 0.01 dB come back as sent."""
    frame = bv.encode_processed_vars(7, bis=45.3, sqi_percent=82.5, emg_db=41.27,
                                     sr_percent=3.4, artifact=0)
    (packet,) = parse(frame)
    t = packet.trend
    assert (t.bis, t.sqi_percent, t.emg_db, t.sr_percent) == (45.3, 82.5, 41.27, 3.4)
    assert packet.message_seq == 7 and not packet.lead_off


def test_the_poll_request_is_the_documented_frame():
    """The host's request for processed variables: start bytes, link header (seq 0, 13
    bytes, data packet), routing id 4, message 0x73, one byte 0, and the byte-sum."""
    body = bytes.fromhex("00000d00010004000000730000000000010000")
    assert bv.request_processed_vars(0) == bv.SPI_ID + body + \
        (sum(body) & 0xFFFF).to_bytes(2, "little")


def test_byte_by_byte_gives_the_same_events_as_whole_frames():
    data = b"\x00\x01junk" + bv.encode_processed_vars(1, bis=40, sqi_percent=90) + \
        bv.encode_processed_vars(2, bis=41, sqi_percent=90)
    parser = bv.BisVistaParser()
    got = []
    for byte in data:
        parser.receive_data(bytes([byte]))
        got += events(parser)
    whole = parse(data)
    assert [e for e in got if isinstance(e, bv.ProcessedVars)] == \
        [e for e in whole if isinstance(e, bv.ProcessedVars)]
    assert [e.trend.bis for e in got if isinstance(e, bv.ProcessedVars)] == [40, 41]
    # junk arrives in more pieces, but it is the same bytes
    assert sum(e.n_bytes for e in got if isinstance(e, bv.FrameError)) == \
        sum(e.n_bytes for e in whole if isinstance(e, bv.FrameError)) == 6


def test_a_bad_checksum_is_refused_and_the_next_frame_still_parses():
    bad = bytearray(bv.encode_processed_vars(1, bis=40, sqi_percent=90))
    bad[-2] ^= 0xFF
    got = parse(bytes(bad) + bv.encode_processed_vars(2, bis=60, sqi_percent=90))
    assert got[0] == bv.FrameError("checksum", 1, got[0].detail)
    good = [e for e in got if isinstance(e, bv.ProcessedVars)]
    assert [e.trend.bis for e in good] == [60]
    assert {e.code for e in got if isinstance(e, bv.FrameError)} == {"checksum", "garbage"}


def test_an_impossible_length_is_refused_without_waiting_for_it():
    fake = bv.SPI_ID + (0).to_bytes(2, "little") + (60000).to_bytes(2, "little") + b"\x01\x00"
    got = parse(fake + bv.encode_processed_vars(3, bis=50, sqi_percent=90))
    assert got[0].code == "oversize"
    assert isinstance(got[-1], bv.ProcessedVars) and got[-1].trend.bis == 50


def test_no_value_codes_are_none_and_the_reading_unavailable():
    (packet,) = parse(bv.encode_processed_vars(1, bis=None, sqi_percent=None))
    assert packet.trend.bis is None and packet.trend.sqi_percent is None
    reading = bis_reading(packet, bv.QualityRules())
    bis = reading.values[0]
    assert bis[0] == "bis" and bis[3] == "unavailable" and bis[1] == packet.trend.bis_raw / 10


@pytest.mark.parametrize("knobs, quality, reasons", [
    ({}, "valid", []),
    ({"sqi_percent": 49.9}, "questionable", ["sqi_unreliable"]),
    ({"sqi_percent": 14.9}, "invalid", ["sqi_low"]),
    ({"sqi_percent": None}, "invalid", ["sqi_low"]),
    ({"artifact": 0x10}, "questionable", ["artifact"]),
    ({"emg_db": 56.0}, "questionable", ["emg_high"]),
    ({"impedance_test": (0, 3)}, "invalid", ["lead_off"]),
    ({"bis": None}, "unavailable", ["no_value"]),
    ({"impedance_test": (1, 0), "bis": None}, "invalid", ["lead_off", "no_value"]),
])
def test_bis_quality_follows_sqi_artefact_emg_and_lead_off(knobs, quality, reasons):
    """SQI < 15 % invalid, < 50 % questionable; artefact and EMG > 55 dB questionable;
    lead-off invalid; no BIS value unavailable."""
    args = {"bis": 45.0, "sqi_percent": 90.0, **knobs}
    (packet,) = parse(bv.encode_processed_vars(1, **args))
    assert bv.bis_quality(packet) == (quality, reasons)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_any_bytes_in_any_pieces_never_raise_and_stay_bounded(pieces):
    """Fuzz: whatever arrives, the parser returns known events and keeps at most one
    frame's worth of bytes."""
    parser = bv.BisVistaParser()
    for piece in pieces:
        parser.receive_data(piece)
        for event in events(parser):
            assert isinstance(event, (bv.ProcessedVars, bv.FrameError, bv.LinkReply,
                                      bv.OtherMessage))
        assert parser.buffered <= 8 + bv.MAX_DATA_BYTES + 2


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=40).filter(lambda b: 0xBA not in b),
                          st.integers(0, 1000), st.integers(0, 1000)), max_size=6))
def test_frames_between_junk_are_all_found(items):
    """Junk without a start byte never costs a frame."""
    data, expected = b"", []
    for junk, bis, sqi in items:
        data += junk + bv.encode_processed_vars(len(expected) + 1, bis=bis / 10,
                                                sqi_percent=sqi / 10)
        expected.append(bis / 10)
    assert [e.trend.bis for e in parse(data) if isinstance(e, bv.ProcessedVars)] == expected


# ---------------------------------------------------------------------------- Nightscout codec
@pytest.mark.parametrize("body, code", [
    (b"{nope", "json"), (b'{"sgv": 100}', "json"), (b"[NaN]", "json"),
    (b'[{"sgv": 1, "sgv": 2, "date": 1}]', "json"), (b"\xff\xfe", "json"),
    (b'[{"sgv": "high", "date": 1700000000000}]', "entry"),
    (b'[{"sgv": 100, "date": -5}]', "entry"), (b'["x"]', "entry"),
    (b"[" * 100000, "json"),
])
def test_bad_answers_become_faults_never_readings(body, code):
    entries, faults = ns.parse_entries(body)
    assert entries == [] and faults[0].code == code


def test_entries_come_oldest_first_and_other_types_are_skipped():
    body = json.dumps([{"type": "sgv", "sgv": 120, "date": 2000, "noise": 1},
                       {"type": "mbg", "mbg": 99, "date": 1500},
                       {"type": "sgv", "sgv": 110, "date": 1000, "direction": "Flat"}])
    entries, faults = ns.parse_entries(body.encode())
    assert [(e.sgv, e.date_ms) for e in entries] == [(110, 1000), (120, 2000)] and not faults


@pytest.mark.parametrize("sgv, noise, value, quality", [
    (120, 1, 120, "valid"), (5, 1, 5, "invalid"), (38, 1, 38, "invalid"),
    (39, 1, 40, "underflow"), (401, 1, 400, "overflow"), (450, None, 400, "overflow"),
    (150, 3, 150, "questionable"), (150, 4, 150, "questionable"), (150, None, 150, "valid"),
])
def test_sgv_quality_error_codes_low_high_and_noise(sgv, noise, value, quality):
    """Below 39 a CGM error code (invalid); LOW/HIGH as underflow/overflow at the limits;
    noise 3+ questionable."""
    entry = ns.Entry(float(sgv), 1_700_000_000_000, "Flat", noise)
    assert ns.entry_quality(entry)[:2] == (value, quality)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["sgv", "date", "type", "noise", "direction"]), inner, max_size=5),
    max_leaves=20).map(lambda doc: json.dumps(doc).encode()))
def test_any_answer_parses_without_raising(body):
    entries, faults = ns.parse_entries(body)
    assert all(e.sgv >= 0 and e.date_ms > 0 for e in entries)


def test_the_api_secret_header_is_the_sha1_hex_of_the_secret():
    assert ns.api_secret_digest("abc") == hashlib.sha1(b"abc").hexdigest()


# ---------------------------------------------------------------------------- the node
def reading(key, t_meas, quality="valid", conditions=()):
    return DeviceReading(key=key, t_meas=t_meas, values=(("glucose", 100.0, "mg/dL",
                                                          quality),),
                         conditions=frozenset(conditions))


def test_a_reading_is_relayed_once_however_often_it_comes():
    node = SensorBridgeNode(sensor="cgm", stale_after_s=600, link_timeout_s=60, now=0,
                            wall=1e9)
    first = node.reading(reading(("sgv", 1), 1e9 - 10), now=1, wall=1e9)
    again = node.reading(reading(("sgv", 1), 1e9 - 10), now=2, wall=1e9 + 1)
    assert [m.type for m in first] == ["measurement"] and again == []
    assert node.counts["duplicate"] == 1


def test_a_restarted_monitor_is_not_taken_for_a_repeating_one():
    """BIS message numbers restart with the monitor: only a repeat of one of the last few
    packets is a duplicate, so readings go on after a restart."""
    node = SensorBridgeNode(sensor="bis", stale_after_s=5, link_timeout_s=3, now=0, wall=0,
                            keys_kept=BIS_KEYS_KEPT)
    relayed = [bool(node.reading(reading(("bis", seq), None), now=0, wall=0))
               for seq in [*range(1, 21), 20, 19, 1, 2]]
    assert relayed == [True] * 20 + [False, False, True, True]


def test_old_and_future_readings_are_not_relayed_and_a_stale_source_alarms():
    node = SensorBridgeNode(sensor="cgm", stale_after_s=600, link_timeout_s=60, now=0,
                            wall=1e9)
    assert node.reading(reading("old", 1e9 - 601), now=0, wall=1e9) == []
    future = node.reading(reading("future", 1e9 + 3600), now=0, wall=1e9)
    assert not any(isinstance(m, Measurement) for m in future)
    alarms = node.check(now=1, wall=1e9)
    assert [(a.code, a.active) for a in alarms] == [("sensor.stale", True)]
    fresh = node.reading(reading("new", 1e9 + 5), now=2, wall=1e9 + 10)
    assert ("sensor.stale", False) in [(a.code, a.active) for a in fresh
                                       if isinstance(a, Alarm)]


def test_link_loss_is_raised_once_and_cleared_by_contact():
    node = SensorBridgeNode(sensor="bis", stale_after_s=5, link_timeout_s=3, now=0, wall=0)
    assert node.check(now=2.9, wall=2.9) == []
    raised = node.check(now=3.1, wall=3.1)
    assert [a.code for a in raised] == ["sensor.link_lost"] and node.check(3.2, 3.2) == []
    (cleared,) = node.contact(now=4)
    assert cleared.code == "sensor.link_lost" and not cleared.active


def test_the_sink_turns_pump_status_into_temp_basals_and_boluses():
    """mL/h x U/mL = U/h for the lease; a bolus posted once given; a restart resets."""
    sink = TreatmentSink(pump="insulin", concentration_u_per_ml=100, device="mpc-dose://t",
                         status_every_s=60)

    def status(rate, delivered, remaining, lease=600.0):
        return PumpStatus(pump="insulin", state="infusing", rate=rate, lease_remaining_s=lease,
                          mode="COMMANDED", bolus_delivered=delivered,
                          bolus_remaining=remaining, amount_unit="U")

    sink.observe(status(0.008, 0.0, 0.0), 1e9)
    sink.observe(status(0.008, 0.5, 1.5), 1e9 + 5)      # a bolus running: not yet
    sink.observe(status(0.008, 2.0, 0.0), 1e9 + 10)     # given
    sink.observe(status(0.008, 2.0, 0.0), 1e9 + 15)     # nothing new
    sink.observe(status(0.0, 0.0, 0.0, None), 1e9 + 20)  # a restarted pump side, stopped
    sink.tick(1e9 + 20)
    kinds = [(path, body.get("eventType")) for path, body in sink.outbox]
    assert kinds == [(ns.TREATMENTS_PATH, "Temp Basal"), (ns.TREATMENTS_PATH,
                     "Correction Bolus"), (ns.TREATMENTS_PATH, "Temp Basal"),
                     (ns.DEVICESTATUS_PATH, None)]
    assert sink.outbox[0][1]["absolute"] == pytest.approx(0.8)
    assert sink.outbox[0][1]["duration"] == pytest.approx(10.0)
    assert sink.outbox[1][1]["insulin"] == pytest.approx(2.0)
    assert sink.outbox[2][1]["absolute"] == 0 and sink.outbox[2][1]["duration"] == 30


# ---------------------------------------------------------------------------- config
def bis_config(**bis):
    return {"bridge": {"kind": "bis_vista", "telemetry": "tcp://127.0.0.1:5570"},
            "bis_vista": {"serial": "/dev/null", **bis}}


def ns_config(**section):
    return {"bridge": {"kind": "nightscout", "telemetry": "tcp://127.0.0.1:5570"},
            "nightscout": {"url": "http://127.0.0.1:1337", "api_secret": SECRET, **section}}


@pytest.mark.parametrize("data, match", [
    ({**bis_config(), "bridge": {"kind": "bis", "telemetry": "tcp://127.0.0.1:1"}},
     r"bridge.kind: Input should be 'bis_vista' or 'nightscout' \(got 'bis'\)"),
    ({"bridge": {"kind": "bis_vista", "telemetry": "tcp://127.0.0.1:1"}},
     r"bridge.kind = 'bis_vista' needs a \[bis_vista\] section"),
    ({**bis_config(), "nightscout": ns_config()["nightscout"]},
     r"a \[nightscout\] section with bridge.kind = 'bis_vista'"),
    (bis_config(sqi_invalid_below=60), "sqi_questionable_below: 50.0 is below "
                                       r"sqi_invalid_below \(60.0\)"),
    (bis_config(sqi_treshold=50), r"bis_vista.sqi_treshold: Extra inputs are not permitted"),
    (bis_config(stale_after_s=0), r"bis_vista.stale_after_s: .*greater than 0 \(got 0\)"),
    (ns_config(url="http://nightscout.example.org"), "sends the API secret's digest in "
                                                     "clear; use https://"),
    (ns_config(url="ftp://x"), r"nightscout.url: 'ftp://x' is not an http\(s\)://HOST URL"),
    (ns_config(api_secret_env="NS_SECRET"), "exactly one of api_secret and api_secret_env"),
    ({**ns_config(), "nightscout": {"url": "http://127.0.0.1:1",
                                    "api_secret_env": "MPC_DOSE_SURELY_UNSET"}},
     "environment variable 'MPC_DOSE_SURELY_UNSET' is not set"),
    (ns_config(poll_s=200), r"link_timeout_s: 120.0 s must be more than poll_s \(200.0 s\)"),
    (ns_config(sink={"telemetry": [], "pump": "insulin", "concentration_u_per_ml": 100}),
     "nightscout.sink.telemetry"),
])
def test_bad_configs_are_refused_naming_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        load_sensor_bridge_config(data)


def test_a_config_file_that_is_not_toml_is_a_config_error(tmp_path):
    path = tmp_path / "bridge.toml"
    path.write_text("[bridge\nkind = ", "utf-8")
    with pytest.raises(ConfigError, match="bridge.toml.*cannot be read as TOML"):
        load_sensor_bridge_config(path)
    with pytest.raises(ConfigError, match="cannot be read as TOML"):
        load_sensor_bridge_config(tmp_path / "missing.toml")


# ---------------------------------------------------------------------------- end to end
class Bench:
    """A bridge process with a subscriber on its telemetry; :meth:`until` runs the bridge
    until a condition holds on what was received (bounded: fails past *limit_s*)."""

    def __init__(self, config: dict, audit, **kwargs) -> None:
        (address,) = free_addresses(1)
        config["bridge"]["telemetry"] = address
        self.process = SensorBridgeProcess(load_sensor_bridge_config(config), audit=audit,
                                           **kwargs)
        self.reader = TelemetryReader(self.process.context, [address])
        self.received: list = []

    def until(self, condition, limit_s: float = 10.0) -> list:
        start, mark = time.monotonic(), len(self.received)
        while time.monotonic() - start < limit_s:
            self.process.turn(0.02)
            self.received += [e.message for e in self.reader.drain()]
            if condition(self.received[mark:]):
                return self.received[mark:]
        raise AssertionError(f"condition not met; got {self.received[mark:][-10:]}")

    def close(self) -> None:
        self.process.close()


def alarm(code, active=True):
    return lambda got: any(isinstance(m, Alarm) and m.code == code and m.active == active
                           for m in got)


def measurements(n, quality=None):
    return lambda got: sum(isinstance(m, Measurement) and m.var in ("bis", "glucose") and
                           (quality is None or m.quality == quality) for m in got) >= n


@pytest.fixture
def bis_bench(tmp_path):
    emulator = BisEmulator(period_s=0.05).start()
    bench = Bench(bis_config(serial=emulator.device, stale_after_s=0.6, link_timeout_s=0.4,
                             request_every_s=0.5), tmp_path / "audit.sqlite")
    yield emulator, bench, tmp_path / "audit.sqlite"
    bench.close()
    emulator.close()


def test_bis_bridge_relays_the_monitor_and_survives_every_fault(bis_bench):
    """Against the emulated monitor: valid readings decode with the repo's TelemetryReader;
    then garbage, checksum errors, stale repeats, a silent link, SQI loss and lead-off each
    give their outcome (no reading or a flagged one, an alarm), and all is audited."""
    emulator, bench, audit = bis_bench
    got = bench.until(measurements(3, "valid"))
    assert emulator.requests >= 1  # it asked the monitor for processed variables
    bis = [m for m in got if isinstance(m, Measurement) and m.var == "bis"]
    assert bis[0].value == 45.0 and bis[0].unit == "1" and \
        abs(bis[0].t_meas - time.time()) < 5
    assert {m.var for m in got if isinstance(m, Measurement)} == {"bis", "bis_sqi", "bis_sr"}

    emulator.garbage, emulator.corrupt_checksum = b"\x00\xff\x13garbage", True
    got = bench.until(alarm("sensor.stale"))
    assert not any(isinstance(m, Measurement) for m in got[1:])  # none relayed meanwhile
    assert alarm("sensor.bad_data")(bench.received)
    emulator.garbage, emulator.corrupt_checksum = b"", False
    bench.until(lambda got: alarm("sensor.stale", False)(got) and measurements(1)(got))

    emulator.repeat = True
    got = bench.until(alarm("sensor.stale"))
    assert bench.process.counts["duplicate"] >= 3
    emulator.repeat = False
    bench.until(alarm("sensor.stale", False))

    emulator.silent = True
    bench.until(alarm("sensor.link_lost"))
    emulator.silent = False
    bench.until(alarm("sensor.link_lost", False))

    emulator.sqi = 30.0
    got = bench.until(lambda got: measurements(1, "questionable")(got) and
                      alarm("sensor.signal_quality")(got))
    emulator.sqi = 10.0
    bench.until(measurements(1, "invalid"))
    emulator.sqi, emulator.lead_off = 95.0, True
    bench.until(lambda got: alarm("sensor.lead_off")(got) and measurements(1, "invalid")(got))
    emulator.lead_off = False
    bench.until(lambda got: alarm("sensor.lead_off", False)(got) and
                alarm("sensor.signal_quality", False)(got) and measurements(1, "valid")(got))
    bench.close()

    log = AuditLog(audit, "test")
    faults = {json.loads(r["body"])["code"] for r in log.rows("sensor_fault")}
    assert {"checksum", "garbage"} <= faults
    alarms = {(json.loads(r["body"])["code"], json.loads(r["body"])["active"])
              for r in log.rows("alarm")}
    assert {("sensor.stale", True), ("sensor.link_lost", True), ("sensor.lead_off", True),
            ("sensor.signal_quality", True), ("sensor.bad_data", True)} <= alarms
    qualities = {json.loads(r["body"])["quality"] for r in log.rows("measurement")}
    assert {"valid", "questionable", "invalid"} <= qualities
    assert log.rows("sensor_duplicate") and log.rows("heartbeat") and log.rows("start")
    log.close()


def test_a_vanished_serial_device_is_a_fault_not_a_crash(tmp_path):
    """The pty closed under the bridge (a pulled USB adapter): counted, audited, link
    lost; the bridge keeps running and trying."""
    emulator = BisEmulator(period_s=0.05).start()
    bench = Bench(bis_config(serial=emulator.device, link_timeout_s=0.4, stale_after_s=0.6),
                  tmp_path / "a.sqlite")
    try:
        bench.until(measurements(1))
        emulator.close()
        bench.until(alarm("sensor.link_lost"))
        assert bench.process.counts["internal_error"] == 0
    finally:
        bench.close()


@pytest.fixture
def ns_site():
    site = NightscoutEmulator(secret=SECRET).start()
    yield site
    site.close()


def ns_bench(site, tmp_path, secret=SECRET, **section):
    config = ns_config(url=site.url, api_secret=secret, poll_s=0.1, timeout_s=0.3,
                       link_timeout_s=0.8, **section)
    return Bench(config, tmp_path / "audit.sqlite")


def now_ms(offset_s=0.0):
    return int((time.time() + offset_s) * 1000)


def test_a_wrong_secret_gets_no_reading_and_an_auth_alarm(ns_site, tmp_path):
    ns_site.add_sgv(120, date_ms=now_ms(-30))
    bench = ns_bench(ns_site, tmp_path, secret="not-the-secret")
    try:
        got = bench.until(alarm("sensor.auth_refused"))
        assert not any(isinstance(m, Measurement) for m in got)
        assert {status for _, _, status in ns_site.requests} == {401}
    finally:
        bench.close()


def test_nightscout_readings_are_deduplicated_and_stamped_with_the_cgm_time(ns_site,
                                                                             tmp_path):
    t_ms = now_ms(-60)
    ns_site.add_sgv(120, date_ms=t_ms)
    ns_site.add_sgv(39, date_ms=t_ms + 1000)
    ns_site.add_sgv(450, date_ms=t_ms + 2000)
    bench = ns_bench(ns_site, tmp_path)
    try:
        got = bench.until(measurements(3))
        glucose = [(m.value, m.quality, m.t_meas) for m in got if isinstance(m, Measurement)]
        assert glucose == [(120, "valid", t_ms / 1000), (40, "underflow", t_ms / 1000 + 1),
                           (400, "overflow", t_ms / 1000 + 2)]
        polls = len(ns_site.requests)
        bench.until(lambda _: len(ns_site.requests) >= polls + 3)
        assert sum(isinstance(m, Measurement) for m in bench.received) == 3  # never twice
        # the later polls asked only for entries newer than the newest seen
        assert f"%24gt%5D={t_ms + 2000}" in ns_site.requests[-1][1]
    finally:
        bench.close()


def test_nightscout_faults_and_a_stale_source(ns_site, tmp_path):
    """500s, garbage JSON, time-outs: counted faults, bad-data and link alarms, no
    reading; an SGV older than stale_after_s is not relayed and the source is stale; the
    bridge recovers when the site does."""
    ns_site.add_sgv(130, date_ms=now_ms(-700))  # older than the default 600 s
    bench = ns_bench(ns_site, tmp_path)
    try:
        got = bench.until(alarm("sensor.stale"))
        assert not any(isinstance(m, Measurement) for m in got)
        ns_site.fail_status = 500
        bench.until(lambda _: bench.process.counts["fault.http_500"] >= 2)
        ns_site.fail_status, ns_site.garbage = None, b'{"not": "a list"'
        bench.until(lambda _: bench.process.counts["fault.json"] >= 2)
        ns_site.garbage, ns_site.delay_s = None, 0.5
        bench.until(alarm("sensor.link_lost"))
        assert bench.process.counts["fault.timeout"] >= 1
        ns_site.delay_s = 0.0
        ns_site.add_sgv(140, date_ms=now_ms())
        got = bench.until(lambda got: measurements(1, "valid")(got) and
                          alarm("sensor.stale", False)(got) and
                          alarm("sensor.link_lost", False)(got))
        assert bench.process.counts["internal_error"] == 0
    finally:
        bench.close()
    log = AuditLog(tmp_path / "audit.sqlite", "test")
    faults = {json.loads(r["body"])["code"] for r in log.rows("sensor_fault")}
    assert {"http_500", "json", "timeout"} <= faults and log.rows("sensor_too_old")
    log.close()


def test_the_sink_posts_what_the_loop_delivered(ns_site, tmp_path):
    """pump_status on the telemetry the bridge follows -> a Temp Basal in U/h, a Correction
    Bolus, a devicestatus with the pump side's mode; a failing site keeps them for later."""
    (pump_address,) = free_addresses(1)
    context = zmq.Context()
    pump = Telemetry(context, pump_address, src="pump-bridge")
    ns_site.add_sgv(120, date_ms=now_ms(-10))
    bench = ns_bench(ns_site, tmp_path, sink={"telemetry": [pump_address], "pump": "insulin",
                                               "concentration_u_per_ml": 100,
                                               "status_every_s": 0.2})
    try:
        ns_site.fail_status = 500

        def publish(delivered):
            pump.send(PumpStatus(pump="insulin", state="infusing", rate=0.012,
                                 lease_remaining_s=300.0, mode="COMMANDED",
                                 bolus_delivered=delivered, bolus_remaining=0.0,
                                 amount_unit="U"))
            return True

        bench.until(lambda _: publish(0.0) and bench.process.counts["post_failed.http_500"])
        assert ns_site.treatments == []
        ns_site.fail_status = None
        bench.until(lambda _: publish(1.25) and len(ns_site.treatments) >= 2 and
                    ns_site.devicestatus)
        basal, bolus = ns_site.treatments[:2]
        assert basal["eventType"] == "Temp Basal" and basal["absolute"] == pytest.approx(1.2)
        assert basal["duration"] == pytest.approx(5.0)
        assert bolus == {**bolus, "eventType": "Correction Bolus", "insulin": 1.25}
        assert ns_site.devicestatus[0]["mpc_dose"]["mode"] == "COMMANDED"
    finally:
        bench.close()
        context.destroy(linger=0)
    log = AuditLog(tmp_path / "audit.sqlite", "test")
    posts = [json.loads(r["body"]) for r in log.rows("nightscout_post")]
    assert {p["ok"] for p in posts} == {True, False}
    log.close()


def test_the_cli_runs_a_bis_bridge_whose_measurements_decode(tmp_path):
    """`mpc-dose serve sensor-bridge CONFIG --duration --audit` as a user runs it, read by
    the repo's own TelemetryReader; a bad config exits 2 naming the field."""
    emulator = BisEmulator(period_s=0.1).start()
    (address,) = free_addresses(1)
    config = tmp_path / "bis.toml"
    config.write_text(f'[bridge]\nkind = "bis_vista"\ntelemetry = "{address}"\n'
                      f'[bis_vista]\nserial = "{emulator.device}"\n', "utf-8")
    context = zmq.Context()
    reader = TelemetryReader(context, [address])
    process = subprocess.Popen([sys.executable, "-m", "mpc_dose.cli", "serve", "sensor-bridge",
                                str(config), "--duration", "20", "--audit",
                                str(tmp_path / "audit.sqlite")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        got, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline and sum(
                isinstance(e.message, Measurement) for e in got) < 3:
            got += list(reader.drain(0.2))
        bis = [e for e in got if isinstance(e.message, Measurement) and e.message.var == "bis"]
        assert bis and bis[0].message.value == 45.0 and bis[0].src == "bis-vista-bridge"
        assert reader.rejected == {}
    finally:
        process.terminate()
        out, err = process.communicate(timeout=20)
        emulator.close()
        context.destroy(linger=0)
    assert "sensor bridge (bis_vista)" in out and process.returncode == 0, err
    config.write_text('[bridge]\nkind = "bis_vista"\ntelemetry = "tcp://127.0.0.1:1"\n'
                      '[bis_vista]\nserial = "/dev/null"\nsqi_invalid_below = 150\n', "utf-8")
    bad = subprocess.run([sys.executable, "-m", "mpc_dose.cli", "serve", "sensor-bridge",
                          str(config)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "bis_vista.sqi_invalid_below" in bad.stderr


def _imports_after(code: str) -> set[str]:
    code += "; import sys; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                              text=True).stdout.split())


def test_the_sensor_codecs_are_sans_io_and_the_node_touches_no_transport():
    """protocol/bis_vista and protocol/nightscout import no socket, serial port, HTTP client
    or zmq (a bridge in another language can mirror them); node/sensor_bridge no transport."""
    loaded = _imports_after("import mpc_dose.protocol.bis_vista, mpc_dose.protocol.nightscout")
    assert not loaded & {"zmq", "serial", "httpx", "socket", "http.client", "simpy", "numpy"}
    loaded = _imports_after("import mpc_dose.node.sensor_bridge")
    assert not loaded & {"zmq", "serial", "httpx", "http.client"}
    assert not any(m.startswith(("mpc_dose.transport", "mpc_dose.serve")) for m in loaded)
