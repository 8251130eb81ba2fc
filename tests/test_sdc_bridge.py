"""The IEEE 11073 SDC bridge: the sans-I/O BICEPS mapping, the metrics node, and the bridge
against the bench provider (``hil/sdc_provider.py``, sdc11073 on loopback) end to end:
measurements and alarms decoded by the repo's TelemetryReader, leased ``set_rate`` commands
answered through SDC SetValue operations, faults injected with the provider's knobs.

One provider serves the whole module (its start and stop take seconds); each test runs its
own bridge in a thread, on free loopback ports. Waits are bounded waits for an expected
event, never timings.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_dose.audit import AuditLog
from mpc_dose.errors import ConfigError
from mpc_dose.node.sdc_bridge import SdcMetricsNode
from mpc_dose.protocol.messages import (QUALITIES, Alarm, Fallback, Measurement, PumpStatus,
                                        SetRate)
from mpc_dose.protocol.sdc import (MDC_UNIT_CODES, VALIDITY_QUALITY, MetricMapping,
                                   MetricSample, Refused, invocation_outcome, quality_of,
                                   rate_unit, to_measurement, unit_problem)
from mpc_dose.serve.sdc_bridge import SdcBridgeProcess, load_sdc_bridge_config
from mpc_dose.transport.zmq_link import CommandClient, TelemetryReader
from tests.ports import free_addresses

WALL = 1.8e9                  # a UTC arrival time [s]
BIS = MetricMapping(handle="bis", var="bis", unit="1")


def sample(value=45, validity="Vld", *, activation="On", determination_s=WALL,
           handle="bis") -> MetricSample:
    return MetricSample(handle=handle, value=value, validity=validity, activation=activation,
                        determination_s=determination_s)


def measure(s: MetricSample, mapping: MetricMapping = BIS, **kw):
    kw.setdefault("technical_range", (0.0, 100.0))
    return to_measurement(s, mapping, arrival_s=WALL, max_age_s=5.0, max_future_s=2.0, **kw)


# ============================================================== sans-I/O: BICEPS -> protocol
@pytest.mark.parametrize("validity, quality", [
    ("Vld", "valid"), ("Vldated", "valid"), ("Ong", "unavailable"), ("Qst", "questionable"),
    ("Calib", "calibrating"), ("Inv", "invalid"), ("Oflw", "overflow"), ("Uflw", "underflow"),
    ("NA", "unavailable")])
def test_every_measurement_validity_maps_to_the_protocols_quality(validity, quality):
    """BICEPS MeasurementValidity -> reading quality, one row per enumeration value."""
    result = measure(sample(validity=validity))
    assert isinstance(result, Measurement)
    assert result.quality == quality and result.value == 45 and result.t_meas == WALL


def test_the_mapping_covers_every_validity_and_only_protocol_qualities():
    """All nine BICEPS values are mapped, each to a quality the protocol has."""
    assert set(VALIDITY_QUALITY) == {"Vld", "Vldated", "Ong", "Qst", "Calib", "Inv", "Oflw",
                                     "Uflw", "NA"}
    assert set(VALIDITY_QUALITY.values()) <= set(QUALITIES)


@pytest.mark.parametrize("validity, activation, quality", [
    ("Vld", "On", "valid"), ("Vld", "StndBy", "unavailable"), ("Vld", "Off", "unavailable"),
    ("Vld", "Fail", "invalid"), ("Inv", "Off", "invalid"), ("Vld", "Bogus", "invalid"),
    (None, "On", "invalid"), ("Nonsense", "On", "invalid")])
def test_a_metric_not_measuring_or_without_a_validity_is_not_valid(validity, activation,
                                                                   quality):
    """An activation other than On makes a reading worse, never better; an absent or unknown
    validity is invalid."""
    assert quality_of(validity, activation) == quality


@pytest.mark.parametrize("value", [250, -5, 100.5])
def test_a_value_outside_the_technical_range_is_published_flagged_invalid(value):
    """The device's number, flagged invalid (the supervisor gates it), never replaced."""
    result = measure(sample(value=value))
    assert isinstance(result, Measurement) and result.quality == "invalid"
    assert result.value == value


def test_the_configured_range_takes_precedence_over_the_descriptors():
    mapping = MetricMapping(handle="bis", var="bis", unit="1", low=20, high=80)
    assert measure(sample(value=90), mapping).quality == "invalid"
    assert measure(sample(value=50), mapping).quality == "valid"


@pytest.mark.parametrize("value, code", [
    (None, "no_value"), ("NaN", "not_a_number"), (Decimal("NaN"), "not_a_number"),
    ("Infinity", "not_a_number"), (Decimal("1" + "0" * 400), "not_a_number"), ("45 %",
                                                                              "not_a_number"),
    (True, "not_a_number")])
def test_values_that_are_no_number_give_no_measurement(value, code):
    """Missing, NaN, infinite, beyond a float (a schema-valid 400-digit decimal), text."""
    result = measure(sample(value=value))
    assert isinstance(result, Refused) and result.code == code


@pytest.mark.parametrize("determination_s, code", [
    (WALL - 60, "stale"), (WALL + 60, "future"), (math.nan, "not_a_number")])
def test_a_reading_determined_too_long_ago_or_in_the_future_is_refused(determination_s, code):
    result = measure(sample(determination_s=determination_s))
    assert isinstance(result, Refused) and result.code == code


def test_a_reading_without_a_determination_time_is_stamped_on_arrival():
    result = measure(sample(determination_s=None))
    assert isinstance(result, Measurement) and result.t_meas == WALL


def test_a_re_sent_reading_is_a_repeat_not_a_new_measurement():
    """A report that repeats the last determination time must not look like a new reading
    (it would hide a flat line)."""
    result = measure(sample(), last_determination_s=WALL)
    assert isinstance(result, Refused) and result.code == "repeat"


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                       st.decimals(), st.text(max_size=50), st.binary(max_size=20)),
       validity=st.one_of(st.none(), st.sampled_from(list(VALIDITY_QUALITY)),
                          st.text(max_size=8)),
       activation=st.one_of(st.none(), st.text(max_size=8)),
       determination=st.one_of(st.none(), st.floats()))
def test_no_sample_crashes_the_mapping(value, validity, activation, determination):
    """Anything a provider might send gives a finite measurement of a known quality, or a
    refusal: never an exception, never a made-up value."""
    result = to_measurement(MetricSample("bis", value, validity, activation, determination),
                            BIS, arrival_s=WALL, max_age_s=5.0, max_future_s=2.0)
    if isinstance(result, Measurement):
        assert math.isfinite(result.value) and result.quality in QUALITIES
        assert float(Decimal(str(value))) == result.value
    else:
        assert isinstance(result, Refused)


@pytest.mark.parametrize("state, error, ok, final, code", [
    ("Fin", None, True, True, None), ("FinMod", None, True, True, None),
    ("Wait", None, False, False, None), ("Start", None, False, False, None),
    ("Fail", "Inv", False, True, "out_of_range"), ("Fail", "Oth", False, True, "pump_error"),
    ("Fail", "Unkn", False, True, "pump_error"), ("Fail", None, False, True, "pump_error"),
    ("Cnclld", None, False, True, "pump_error"), ("CnclldMan", None, False, True,
                                                  "pump_error"),
    ("Exploded", None, False, True, "pump_error")])
def test_invocation_states_become_acks(state, error, ok, final, code):
    """Fin/FinMod succeed (the read-back decides), Wait/Start are not final, a refused value
    (Fail, Inv) is out_of_range, every other end is a pump_error."""
    outcome = invocation_outcome(state, error, "the device's words")
    assert (outcome.ok, outcome.final, outcome.code) == (ok, final, code)
    assert state in outcome.text and "the device's words" in outcome.text


def test_unit_codes_are_checked_against_the_configuration():
    """Dimensionless BIS is 262656 (4 << 16 | 512); a mmHg code for it is refused, a mL/h
    setting is recognised as a volume rate."""
    assert MDC_UNIT_CODES["1"] == 262656 and MDC_UNIT_CODES["mg/dL"] == 264274
    assert unit_problem(BIS, "262656") is None
    assert "266016" in unit_problem(BIS, "266016")
    assert rate_unit("265266") == "mL/h" and rate_unit("262656") is None
    assert rate_unit("garbage") is None


@pytest.mark.parametrize("kwargs, match", [
    ({"unit": "mg/dl"}, "unit 'mg/dl' is not a measurement unit"),
    ({"unit": "ug/mL"}, "no IEEE 11073-10101 code.*mdc_unit_code"),
    ({"low": 10, "high": 5}, "low 10 must be below high 5"),
    ({"high": math.inf}, "high must be a finite number")])
def test_bad_metric_mappings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetricMapping(**{"handle": "x", "var": "x", "unit": "1", **kwargs})


# ============================================================== sans-I/O: the metrics node
def test_a_silent_metric_raises_a_stale_alarm_once_and_clears_it():
    """No reading for stale_s -> one high alarm, nothing published; a fresh one clears it."""
    node = SdcMetricsNode([BIS], stale_s=5.0)
    node.connected(0.0, {"bis": {"kind": "NumericMetricDescriptor", "unit_code": 262656}},
                   "p")
    assert node.check(4.9) == []
    alarms = node.check(5.0)
    assert [(a.code, a.active) for a in alarms] == [("sdc.metric_stale", True)]
    assert node.check(9.0) == []                 # once
    out = node.receive(sample(determination_s=WALL), 9.5, WALL)
    assert [(m.type, getattr(m, "active", None)) for m in out] == [("alarm", False),
                                                                    ("measurement", None)]


def test_a_descriptor_that_does_not_match_is_not_published():
    """A unit code other than the configured unit's: alarm, and no measurement from it."""
    node = SdcMetricsNode([BIS])
    out = node.connected(0.0, {"bis": {"kind": "NumericMetricDescriptor",
                                       "unit_code": 266016}}, "p")
    assert [a.code for a in out] == ["sdc.config_mismatch"]
    assert node.receive(sample(), 1.0, WALL) == []
    out = node.connected(0.0, {"bis": None}, "p")
    assert "no such metric" in out[0].text


def test_the_link_alarm_is_raised_once_and_cleared_on_reconnection():
    node = SdcMetricsNode([BIS])
    assert [a.code for a in node.disconnected(0.0, "refused")] == ["sdc.link_lost"]
    assert node.disconnected(1.0, "still refused") == []
    back = node.connected(2.0, {"bis": {"kind": "NumericMetricDescriptor",
                                        "unit_code": 262656}}, "p")
    assert [(a.code, a.active) for a in back] == [("sdc.link_lost", False)]


def test_bad_values_alarm_once_per_run_and_are_counted():
    node = SdcMetricsNode([BIS])
    node.connected(0.0, {"bis": {"kind": "NumericMetricDescriptor", "unit_code": 262656}},
                   "p")
    first = node.receive(sample(value="NaN", determination_s=WALL), 1.0, WALL)
    second = node.receive(sample(value=None, determination_s=WALL + 1), 2.0, WALL + 1)
    assert [a.code for a in first] == ["sdc.bad_value"] and second == []
    assert node.refused == {"not_a_number": 1, "no_value": 1}
    assert [n[0] for n in node.take_notes()].count("sdc_refused") == 2


# ============================================================== config
def config(**changes) -> dict:
    data = {"bridge": {"address": "http://127.0.0.1:1/x", "telemetry": "tcp://127.0.0.1:5573",
                       "commands": "tcp://127.0.0.1:5572"},
            "metric": [{"handle": "bis", "var": "bis", "unit": "1"}],
            "pump": [{"pump": "propofol", "operation": "op.propofol.rate",
                      "concentration": 10.0, "amount_unit": "mg",
                      "max_rate_ml_per_h": 1200}]}
    for key, value in changes.items():
        section, name = key.split("__")
        target = data[section] if section == "bridge" else data[section][0]
        if value is None:
            target.pop(name)
        else:
            target[name] = value
    return data


@pytest.mark.parametrize("changes, match", [
    ({"bridge__epr": "urn:uuid:1"}, "address .* or its epr .*exactly one"),
    ({"bridge__address": None}, "exactly one; got address=None, epr=None"),
    ({"bridge__address": "https://h:1/x"}, "bridge.address 'https://h:1/x'.*TLS"),
    ({"bridge__commands": None}, "bridge.commands: needed with"),
    ({"bridge__stale_s": 0}, "bridge.stale_s"),
    ({"bridge__src": ""}, "bridge.src"),
    ({"bridge__probe": 1}, "bridge.probe"),
    ({"metric__unit": "mg/dl"}, "metric.0.unit 'mg/dl': expected one of"),
    ({"metric__unit": "ug/mL"}, "metric.0: .*mdc_unit_code"),
    ({"metric__hadle": "bis"}, "metric.0.hadle"),
    ({"pump__max_rate_ml_per_h": -1}, "pump.0.max_rate_ml_per_h"),
    ({"pump__amount_unit": "furlong"}, "pump.0: .*amount_unit 'furlong'"),
    ({"pump__operation": None}, "pump.0.operation"),
])
def test_bad_sdc_bridge_configs_are_refused_naming_the_field(changes, match):
    with pytest.raises(ConfigError, match=match):
        load_sdc_bridge_config(config(**changes))


def test_the_sender_id_is_configurable():
    """Two SDC bridges feeding one controller each need their own sender id."""
    assert load_sdc_bridge_config(config()).bridge.src == "sdc-bridge"
    assert load_sdc_bridge_config(config(bridge__src="sdc-or-2")).bridge.src == "sdc-or-2"


def test_repeated_handles_are_refused():
    data = config()
    data["metric"].append({"handle": "bis", "var": "bis2", "unit": "1"})
    with pytest.raises(ConfigError, match=r"metric.handle: must be unique, \['bis'\]"):
        load_sdc_bridge_config(data)


def test_a_unit_without_a_known_code_loads_with_the_code_given():
    data = config(metric__unit="ug/mL")
    data["metric"][0]["mdc_unit_code"] = 123456
    assert load_sdc_bridge_config(data).mappings()[0].expected_code == 123456


# ============================================================== against a real SDC provider
WAIT_S = 8.0                  # the longest any expected event may take to show up [s]


@pytest.fixture(scope="module")
def bench():
    """One provider for the module (its pump watchdog 1 s, so its test is short)."""
    pytest.importorskip("sdc11073", reason="the SDC bridge needs the sdc11073 package "
                                           "(pip install 'mpc-dose[sdc]')")
    from hil.sdc_provider import BenchProvider

    provider = BenchProvider(watchdog_s=1.0).start()
    yield provider
    for thread in CLOSING:               # bridges still closing in the background
        thread.join(30)
    provider.close()


#: threads of bridges closing in the background (each takes about a second; the next test
#: need not wait for it)
CLOSING: list[threading.Thread] = []


@pytest.fixture(autouse=False)
def clean(bench):
    """The provider with its knobs reset and fresh readings."""
    if not bench.running:
        bench.start()
    bench.validity, bench.frozen, bench.refuse, bench.refuse_calls = "Vld", False, None, None
    bench.publish_all()
    return bench


def bench_config(bench, *, by_epr: bool = False, **bridge) -> dict:
    """A bridge config for the bench provider: its four monitor metrics and its pump."""
    telemetry, commands = free_addresses(2)
    provider = {"epr": bench.epr, "discovery_timeout_s": 1.0} if by_epr else \
        {"address": bench.address}
    return {"bridge": {**provider, "telemetry": telemetry, "commands": commands,
                       "stale_s": 1.0, "probe_s": 0.25, "reconnect_s": 0.5,
                       "poll_s": 0.25, "start_wait_s": 5.0, **bridge},
            "metric": [{"handle": "bis", "var": "bis", "unit": "1"},
                       {"handle": "sqi", "var": "sqi", "unit": "%"},
                       {"handle": "map", "var": "map", "unit": "mmHg"},
                       {"handle": "glucose", "var": "glucose", "unit": "mg/dL"}],
            "pump": [{"pump": "propofol", "operation": "op.propofol.rate",
                      "delivered": "propofol.delivered", "concentration": 10.0,
                      "amount_unit": "mg", "max_rate_ml_per_h": 1500, "max_lease_s": 60}]}


class Bridge:
    """An SDC bridge process run in a thread, with a telemetry reader and a command client."""

    def __init__(self, bench, tmp_path: Path, *, by_epr: bool = False, **bridge) -> None:
        data = bench_config(bench, by_epr=by_epr, **bridge)
        telemetry, commands = data["bridge"]["telemetry"], data["bridge"]["commands"]
        pumps = True
        self.audit_path = tmp_path / "audit.sqlite"
        self.config = load_sdc_bridge_config(data)
        self.context = zmq.Context()
        self.reader = TelemetryReader(self.context, [telemetry])
        self.client = CommandClient(self.context, commands, src="controller-1") \
            if pumps else None
        self.seen: list = []
        self._n = 0
        # the process lives in its thread (its audit log's SQLite connection must)
        self._made, self._ran, self._close = (threading.Event() for _ in range(3))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._life, daemon=True)
        self.thread.start()
        if not self._made.wait(30) or self.error is not None:
            self.context.destroy(linger=0)   # a context left open hangs the interpreter
            raise AssertionError(f"the bridge did not start: {self.error!r}")

    def _life(self) -> None:
        try:
            self.process = SdcBridgeProcess(self.config, audit=self.audit_path)
        except BaseException as err:  # noqa: BLE001 - reported by __init__
            self.error = err
            self._made.set()
            return
        self._made.set()
        try:
            self.process.run()
        finally:
            self._ran.set()
            self._close.wait(30)
            self.process.close()

    def wait_for(self, predicate, what: str, timeout_s: float = WAIT_S):
        """The first message (from now on) for which *predicate* holds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for envelope in self.reader.drain(0.05):
                self.seen.append(envelope.message)
                if predicate(envelope.message):
                    return envelope.message
        raise AssertionError(f"no {what} within {timeout_s} s; saw "
                             f"{[m.type for m in self.seen[-20:]]}")

    def alarm(self, code: str, active: bool = True, timeout_s: float = WAIT_S) -> Alarm:
        return self.wait_for(lambda m: isinstance(m, Alarm) and m.code == code
                             and m.active == active, f"alarm {code} active={active}", timeout_s)

    def status(self, mode: str) -> PumpStatus:
        return self.wait_for(lambda m: isinstance(m, PumpStatus) and m.mode == mode,
                             f"pump_status {mode}")

    def set_rate(self, rate: float, *, lease_s: float = 10.0, fallback=None):
        self._n += 1
        return self.client.request(SetRate(
            cmd_id=f"c{self._n}", pump="propofol", rate=rate, unit="mL/h", lease_s=lease_s,
            fallback=fallback or Fallback()), timeout_s=5.0, retries=0)

    def kill(self) -> None:
        """The bridge's loop ends without its clean-up (a crash, as far as the device
        sees: nothing stops the pump)."""
        self.process.stop()
        assert self._ran.wait(10)

    def close(self) -> None:
        """Stop the bridge; it closes in its thread while the next test goes on."""
        self.process.stop()
        self._close.set()
        CLOSING.append(self.thread)
        self.context.destroy(linger=0)

    def audit(self, kind: str | None = None, *, until=None) -> list[dict]:
        """The audit log's rows of *kind*, once *until* (of their bodies) holds: the
        bridge writes its notes at the end of the turn that made them."""
        deadline = time.monotonic() + WAIT_S
        while True:
            log = AuditLog(self.audit_path, "reader")
            try:
                rows = log.rows(kind)
            finally:
                log.close()
            if until is None or until([r["body"] for r in rows]) or \
                    time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


@pytest.fixture
def bridge(clean, tmp_path):
    running = Bridge(clean, tmp_path)
    yield running
    running.close()


def test_metrics_are_published_as_measurements_with_their_units(bridge, clean):
    """Each configured metric comes out as a measurement in its unit, from the device's
    report (value and determination time), decoded by the TelemetryReader."""
    bridge.status("READY")
    values = {"bis": 47, "sqi": 91, "map": 82, "glucose": 123}
    clean.publish_all(values)
    units = {"bis": "1", "sqi": "%", "map": "mmHg", "glucose": "mg/dL"}
    for var, value in values.items():
        m = bridge.wait_for(lambda m, var=var, value=value: isinstance(m, Measurement)
                            and m.var == var and m.value == value, f"{var} = {value}")
        assert m.unit == units[var] and m.quality == "valid" and m.sensor == f"sdc/{var}"
        assert abs(m.t_meas - time.time()) < 5


def test_every_validity_reaches_the_controller_as_its_quality(bridge, clean):
    """Through the real stack: the metric's MetricQuality/@Validity -> the quality."""
    bridge.status("READY")
    for i, (validity, quality) in enumerate(VALIDITY_QUALITY.items()):
        clean.publish("bis", 30 + i, validity=validity)
        m = bridge.wait_for(lambda m, i=i: isinstance(m, Measurement) and m.var == "bis"
                            and m.value == 30 + i, f"bis {validity}")
        assert m.quality == quality, validity


def test_a_stale_provider_gives_no_reading_and_an_alarm(bridge, clean):
    """The device stops updating a metric: nothing is re-published, a high alarm is raised,
    and it clears when readings come back."""
    bridge.status("READY")
    clean.frozen = True
    alarm = bridge.alarm("sdc.metric_stale")
    assert alarm.priority == "high"
    stale_at = len(bridge.seen)
    bridge.alarm("sdc.metric_stale")            # the other metrics go stale too
    assert not [m for m in bridge.seen[stale_at:] if isinstance(m, Measurement)]
    clean.frozen = False
    clean.publish_all()
    bridge.alarm("sdc.metric_stale", active=False)
    assert bridge.audit("sdc_stale", until=bool)


def test_garbage_values_give_no_reading_and_nothing_crashes(bridge, clean):
    """Out of range -> flagged invalid; a 400-digit number, no value, an ancient
    determination time -> refused with an alarm; the bridge goes on publishing."""
    bridge.status("READY")
    clean.publish("bis", 250)
    m = bridge.wait_for(lambda m: isinstance(m, Measurement) and m.var == "bis"
                        and m.value == 250, "bis 250")
    assert m.quality == "invalid"
    clean.publish("bis", Decimal("1" + "0" * 400))
    assert "not a finite number" in bridge.alarm("sdc.bad_value").text
    clean.publish("bis", None)
    clean.publish("bis", 44, determination_s=time.time() - 3600)
    clean.publish("bis", 52)
    m = bridge.wait_for(lambda m: isinstance(m, Measurement) and m.var == "bis", "bis")
    assert (m.value, m.quality) == (52, "valid")
    codes = ('"not_a_number"', '"no_value"', '"stale"')
    refused = [row["body"] for row in bridge.audit(
        "sdc_refused", until=lambda bodies: all(any(c in b for b in bodies) for c in codes))]
    for code in codes:
        assert any(code in body for body in refused), code
    assert bridge.thread.is_alive()


def test_a_value_the_schema_refuses_costs_the_subscription_and_the_bridge_reconnects(
        bridge, clean):
    """A NaN (not an xsd:decimal) makes sdc11073 refuse the report and the provider drop the
    subscription: the bridge notices (states moved on without reports, or the read fails),
    alarms a lost link and reconnects once the device's values are sound again."""
    bridge.status("READY")
    clean.publish("bis", Decimal("NaN"))
    bridge.alarm("sdc.link_lost")
    clean.publish("bis", 48)
    bridge.alarm("sdc.link_lost", active=False)
    clean.publish("bis", 49)
    m = bridge.wait_for(lambda m: isinstance(m, Measurement) and m.var == "bis"
                        and m.value == 49, "bis after reconnecting")
    assert m.quality == "valid" and bridge.thread.is_alive()


def test_reports_that_stop_without_notice_are_a_lost_link_and_the_bridge_resubscribes(
        bridge, clean):
    """The provider forgets its subscribers (no SubscriptionEnd, requests still answered):
    the probe sees a state it read a probe ago still unreported, alarms a lost link, and the
    bridge subscribes again; readings resume."""
    bridge.status("READY")
    clean.forget_subscribers()
    clean.publish("bis", 61)
    assert "subscription lost" in bridge.alarm("sdc.link_lost").text
    bridge.alarm("sdc.link_lost", active=False)
    clean.publish("bis", 62)
    m = bridge.wait_for(lambda m: isinstance(m, Measurement) and m.var == "bis"
                        and m.value == 62, "bis after resubscribing")
    assert m.quality == "valid"


def test_a_leased_set_rate_is_a_setvalue_answered_by_its_invocation(bridge, clean):
    """set_rate -> SetValue on the pump's rate -> Fin -> read back -> ack applied; the
    device runs the rate; every step is in the audit log."""
    bridge.status("READY")
    ack = bridge.set_rate(120.0)
    assert ack is not None and ack.ok and ack.code == "applied"
    assert ack.applied_rate == pytest.approx(120.0)
    assert clean.rate() == pytest.approx(120.0)
    bridge.status("COMMANDED")
    again = bridge.client.request(SetRate(cmd_id="c1", pump="propofol", rate=120.0,
                                          unit="mL/h", lease_s=10.0, fallback=Fallback()),
                                  timeout_s=5.0, retries=0)
    assert again.code == "duplicate"             # idempotent by cmd_id: applied once
    sets = [r["body"] for r in bridge.audit("sdc_set", until=lambda b: len(b) >= 2)]
    assert sum('"120.000000"' in b for b in sets) == 1 and '"ok": true' in sets[-1]
    assert bridge.audit("set_rate") and bridge.audit("ack")


def test_a_value_the_device_refuses_is_out_of_range_and_the_lease_runs_on(bridge, clean):
    """The device answers Fail/Inv (1300 mL/h is beyond its 1200): nack out_of_range with
    the device's words, the previous rate and lease stay."""
    bridge.status("READY")
    assert bridge.set_rate(60.0).ok
    ack = bridge.set_rate(1300.0)
    assert (ack.ok, ack.code) == (False, "out_of_range")
    assert "Fail (Inv)" in ack.text and "outside 0-1200" in ack.text
    assert clean.rate() == pytest.approx(60.0)
    assert bridge.status("COMMANDED").rate == pytest.approx(60.0)


def test_a_refused_operation_is_a_pump_error_and_the_pump_is_stopped(bridge, clean):
    """Fail of another kind: nack pump_error with the device's reason; the pump is stopped
    (read back) and takes no rate until an operator restarts the bridge."""
    bridge.status("READY")
    assert bridge.set_rate(60.0).ok
    clean.refuse, clean.refuse_calls = ("Oth", "held by the operator"), 1
    ack = bridge.set_rate(80.0)
    assert (ack.ok, ack.code) == (False, "pump_error")
    assert "held by the operator" in ack.text
    assert clean.rate() == 0.0
    assert bridge.status("STOPPED").state == "stopped"
    assert bridge.set_rate(10.0).code == "pump_error"


def test_lease_expiry_applies_the_fallback_through_sdc(bridge, clean):
    """No new command within the lease: the bridge sets the preset fallback with a SetValue
    and alarms."""
    bridge.status("READY")
    ack = bridge.set_rate(100.0, lease_s=1.0, fallback=Fallback(action="preset_rate",
                                                                  rate=5.0, unit="mL/h"))
    assert ack.ok
    bridge.alarm("pump.lease_expired")
    assert bridge.status("FALLBACK").rate == pytest.approx(5.0)
    assert clean.rate() == pytest.approx(5.0)


def test_the_devices_watchdog_stops_the_pump_of_a_dead_bridge(bridge, clean):
    """While healthy the bridge renews its invocation within InvocationEffectiveTimeout
    (1 s here); once it dies, the device reverts the rate by itself."""
    bridge.status("READY")
    assert bridge.set_rate(50.0, lease_s=30.0).ok
    stops = clean.watchdog_stops
    deadline = time.monotonic() + 2.0      # twice the watchdog: renewed meanwhile
    while time.monotonic() < deadline:
        bridge.reader.drain(0.1)
    assert clean.rate() == pytest.approx(50.0) and clean.watchdog_stops == stops
    bridge.kill()
    deadline = time.monotonic() + WAIT_S
    while clean.rate() != 0.0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert clean.rate() == 0.0 and clean.watchdog_stops == stops + 1


def test_a_poll_too_slow_for_the_devices_watchdog_is_refused(clean):
    """The bridge renews the device's watchdog from its poll: a poll that could come too
    late is a configuration error naming the field, found once the device is known."""
    process = SdcBridgeProcess(load_sdc_bridge_config(bench_config(clean, poll_s=0.5)))
    try:
        with pytest.raises(ConfigError, match=r"bridge.poll_s = 0.5: the device's watchdog "
                                              r"\(InvocationEffectiveTimeout\) is 1 s"):
            process.start()
        assert clean.rate() == 0.0                  # its pump was left stopped
    finally:
        process.close()


def test_a_dropped_link_alarms_stops_the_pump_and_reconnects_by_discovery(clean, tmp_path):
    """The provider goes away: high link alarm, the pump STOPPED (unreachable); it comes
    back (same EPR, new port): WS-Discovery finds it, readings resume, the alarm clears,
    and the pump stays STOPPED (never resumed by itself)."""
    running = Bridge(clean, tmp_path, by_epr=True)
    try:
        running.status("READY")
        assert running.set_rate(40.0).ok
        clean.stop()
        assert "SDC provider lost" in running.alarm("sdc.link_lost").text
        assert running.status("STOPPED").state in ("disconnected", "stopped")
        clean.start()
        running.alarm("sdc.link_lost", active=False)
        # the link is up before its subscription is: publish until a report gets through
        m, deadline = None, time.monotonic() + 2 * WAIT_S
        while m is None and time.monotonic() < deadline:
            clean.publish("bis", 58)
            try:
                m = running.wait_for(lambda m: isinstance(m, Measurement) and m.var == "bis"
                                     and m.value == 58, "bis after the provider came back",
                                     timeout_s=1.0)
            except AssertionError:
                continue
        assert m is not None, "no bis after the provider came back"
        assert m.quality == "valid"
        assert running.status("STOPPED")
        downs = [r["body"] for r in running.audit(
            "sdc_link", until=lambda b: sum('"up"' in x for x in b) >= 2)]
        assert any('"down"' in b for b in downs) and sum('"up"' in b for b in downs) >= 2
    finally:
        running.close()


def test_the_cli_serves_the_sdc_bridge(clean, tmp_path):
    """``mpc-dose serve sdc-bridge CONFIG --duration`` publishes the provider's metrics and
    writes its audit log."""
    telemetry, = free_addresses(1)
    path = tmp_path / "sdc.toml"
    path.write_text(f'[bridge]\naddress = "{clean.address}"\ntelemetry = "{telemetry}"\n'
                    f'[[metric]]\nhandle = "bis"\nvar = "bis"\nunit = "1"\n')
    context = zmq.Context()
    reader = TelemetryReader(context, [telemetry])
    audit = tmp_path / "cli.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", "mpc_dose.cli", "serve", "sdc-bridge",
                             str(path), "--duration", "3", "--audit", str(audit)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        got = []
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline and proc.poll() is None:
            clean.publish("bis", 41)
            got = [e.message for e in reader.drain(0.3) if isinstance(e.message, Measurement)]
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        context.destroy(linger=0)
    assert proc.returncode == 0, err
    assert "sdc bridge: provider http://127.0.0.1" in out
    assert got and got[0].var == "bis" and got[0].value == 41
    log = AuditLog(audit, "reader")
    try:
        assert log.rows("measurement") and log.rows("sdc_connected")
    finally:
        log.close()


def test_the_cli_names_a_bad_field(tmp_path, capsys):
    from mpc_dose.cli import main

    path = tmp_path / "bad.toml"
    path.write_text('[bridge]\naddress = "http://127.0.0.1:1/x"\ntelemetry = "tcp://127.0.0.1:'
                    '1"\n[[metric]]\nhandle = "bis"\nvar = "bis"\nunit = "percent"\n')
    assert main(["serve", "sdc-bridge", str(path)]) == 2
    assert "metric.0.unit 'percent': expected one of" in capsys.readouterr().err


# ============================================================== layering
def _imports_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print(' '.join("
                          "sorted(sys.modules)))"], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_the_sdc_mapping_is_sans_io_and_the_node_knows_no_transport():
    """protocol/sdc.py needs the standard library only; the metrics node imports neither
    sdc11073 nor zmq nor a transport; the link imports sdc11073 only when it connects."""
    loaded = _imports_after("import mpc_dose.protocol.sdc")
    assert not loaded & {"sdc11073", "zmq", "socket", "numpy", "lxml"}
    loaded = _imports_after("import mpc_dose.node.sdc_bridge")
    assert not loaded & {"sdc11073", "zmq"}
    assert not any(m.startswith(("mpc_dose.transport", "mpc_dose.serve")) for m in loaded)
    loaded = _imports_after("import mpc_dose.transport.sdc_link")
    assert "sdc11073" not in loaded
    assert not any(m.startswith(("mpc_dose.node", "mpc_dose.serve")) for m in loaded)
