"""The protocol: messages validate on construction, the codec round-trips every message and
rejects every malformed frame with a RemoteProtocolError and a reason code."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpc_dose.protocol.codec import (MAX_MESSAGE_BYTES, Envelope, decode, decode_frame, encode,
                                     refusal)
from mpc_dose.protocol.messages import (MAX_NAME_CHARS, MAX_PLAN_INPUTS, MAX_PLAN_STAGES,
                                        MAX_TEXT_CHARS, MESSAGE_TYPES, QUALITIES, WIRE_UNITS,
                                        Ack, Alarm, AlarmAck, Bolus, Fallback, GetStatus,
                                        Heartbeat, Hello, LocalProtocolError, Measurement,
                                        Plan, PlanInput, PumpStatus, RemoteProtocolError,
                                        SetRate, Stop, wire_factor)

EXAMPLES = [
    Measurement(var="bis", value=47.25, unit="1", t_meas=12.0, quality="questionable",
                sensor="bis-1"),
    Measurement(var="propofol_cp", value=3, unit="ug/mL", t_meas=0),
    SetRate(cmd_id="c-1", pump="propofol", rate=20.5, unit="mL/h", lease_s=15.0),
    SetRate(cmd_id="c-2", pump="remi", rate=0.0, unit="uL/min", lease_s=0.5,
            fallback=Fallback(action="preset_rate", rate=4.0, unit="mL/h"),
            dose_rate=205.0, dose_unit="mg/h", basis_seq=17),
    SetRate(cmd_id="c-3", pump="p", rate=1.0, unit="mL/min", lease_s=10.0,
            fallback=Fallback(action="stop")),
    Bolus(cmd_id="b-1", pump="insulin", amount=2.35, unit="U", lease_s=30.0),
    Bolus(cmd_id="b-2", pump="insulin", amount=1500.0, unit="mU", lease_s=5.0,
          duration_s=1800.0, volume=0.015, vol_unit="mL", basis_seq=4),
    Stop(cmd_id="s-1", pump="propofol", reason="operator pressed stop"),
    Stop(cmd_id="s-2", pump="remi"),
    GetStatus(cmd_id="g-1", pump="propofol"),
    Ack(cmd_id="c-1", ok=True, code="applied", applied_rate=20.5, unit="mL/h",
        lease_remaining_s=15.0, text="ok"),
    Ack(cmd_id="c-9", ok=False, code="out_of_range", text="rate 5000 mL/h outside [0, 1200]"),
    Ack(cmd_id="b-1", ok=True, code="applied", applied_amount=2.35, amount_unit="U",
        bolus_s=94.0, lease_remaining_s=0.0),
    PumpStatus(pump="propofol", state="infusing", rate=20.5, delivered=1.25,
               lease_remaining_s=3.5, mode="commanded"),
    PumpStatus(pump="remi", state="alarm", rate=0.0),
    PumpStatus(pump="insulin", state="infusing", rate=0.9045, unit="mL/h", delivered=0.3,
               bolus_delivered=12.5, bolus_remaining=1.2, amount_unit="U"),
    Alarm(code="pump.occlusion", priority="high", kind="technical", active=False,
          text="propofol: occlusion — 5 µg, ünïcödé"),
    Heartbeat(role="controller", state="CLOSED_LOOP", period_s=0.5),
    Hello(role="plant", versions=(1, 2)),
    Plan(times_s=(0.0, 5.0, 10.0), var="bis", output="bis", unit="1", predicted=(80.5, 61.0),
         target=50.0, band_low=40.0, band_high=60.0,
         inputs=(PlanInput(input="propofol", pump="propofol", unit="mg/s", rates=(2.5, 1.0),
                           conc=10.0),
                 PlanInput(input="remifentanil", pump="remi", unit="ug/s", rates=(5.0, 2.0))),
         mode="CLOSED_LOOP", status="ok", reason="nmpc sqp: ok", solve_s=0.018,
         deadline_misses=0),
    Plan(times_s=(3.0, 8.0), inputs=(PlanInput(input="insulin", pump="insulin", unit="U/h",
                                               rates=(0.8,)),)),
    AlarmAck(alarm_src="plant", alarm_epoch="e1", alarm_seq=17, code="data.stale",
             priority="high", operator="Dr Ünïcödé", text="sensor reseated"),
]

BASE_SET_RATE = {"cmd_id": "c1", "pump": "p1", "rate": 20.0, "unit": "mL/h", "lease_s": 15.0,
                 "fallback": {"action": "stop", "rate": 0.0, "unit": "mL/h"}}
BASE_MEASUREMENT = {"var": "bis", "value": 50.0, "unit": "1", "t_meas": 3.0}
BASE_STATUS = {"pump": "p1", "state": "infusing", "rate": 20.0}


def envelope(message, seq=0, t_sim=None):
    return Envelope(message, "plant", "epoch-1", seq, 12.5, t_sim)


def frame(type_="set_rate", body=None, **fields) -> bytes:
    """A frame built from a dict (so valid JSON), with envelope fields overridden or removed."""
    doc = {"v": 1, "type": type_, "src": "plant", "epoch": "e1", "seq": 3, "t_sent": 1.5,
           "t_sim": 1.5, "body": dict(BASE_SET_RATE) if body is None else body}
    if body is _DROP:
        fields["body"] = _DROP
    for key, value in fields.items():
        if value is _DROP:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc).encode()


_DROP = object()


def raw(body: str, type_: str = "set_rate", head: str = '"seq":3,"t_sent":1.5') -> bytes:
    """A frame from raw JSON text (for what json.dumps would not write)."""
    return ('{"v":1,"type":"%s","src":"plant","epoch":"e1",%s,"body":%s}'
            % (type_, head, body)).encode()


def rejects(data: bytes, code: str = "schema", match: str | None = None) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decode(data)
    assert info.value.code == code
    return info.value


# ------------------------------------------------------------------ round trips

def test_examples_cover_every_message_type():
    """The round-trip table holds every message type of the protocol."""
    assert {m.type for m in EXAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.type)
@pytest.mark.parametrize("t_sim", [None, 30.25])
def test_every_message_round_trips(message, t_sim):
    """decode(encode(envelope)) gives back the same envelope and message."""
    env = envelope(message, seq=41, t_sim=t_sim)
    data = encode(env)
    assert isinstance(data, bytes) and len(data) <= MAX_MESSAGE_BYTES
    back = decode(data)
    assert back == env
    assert type(back.message) is type(message)
    assert encode(back) == data


def test_nested_fallback_round_trips_as_a_fallback():
    """A SetRate's nested Fallback decodes to a Fallback, not a dict."""
    back = decode(encode(envelope(EXAMPLES[3]))).message
    assert isinstance(back.fallback, Fallback)
    assert back.fallback == Fallback(action="preset_rate", rate=4.0, unit="mL/h")


def test_frames_are_compact_utf8_json():
    """A frame is one compact UTF-8 JSON object with the version-1 envelope."""
    message = Alarm(code="pump.occlusion", priority="high", kind="technical", text="µg")
    data = encode(envelope(message))
    doc = json.loads(data.decode("utf-8"))
    assert set(doc) == {"v", "type", "src", "epoch", "seq", "t_sent", "t_sim", "body"}
    assert doc["v"] == 1 and doc["type"] == "alarm" and doc["body"]["text"] == "µg"
    assert b", " not in data and b": " not in data


def test_decode_accepts_bytearray_and_memoryview():
    """decode takes any bytes-like frame."""
    data = encode(envelope(EXAMPLES[0]))
    assert decode(bytearray(data)) == decode(memoryview(data)) == decode(data)


def test_t_sim_may_be_missing():
    """t_sim is optional in the envelope."""
    assert decode(frame(t_sim=_DROP)).t_sim is None


# ------------------------------------------------------------------ numbers

@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_non_finite_numbers_are_rejected(text):
    """NaN, Infinity, -Infinity and overflowing literals are rejected, in body and envelope."""
    body = json.dumps(BASE_SET_RATE).replace('"rate": 20.0', f'"rate": {text}')
    assert text in body
    rejects(raw(body), match="not")
    rejects(raw(json.dumps(BASE_SET_RATE), head=f'"seq":3,"t_sent":{text}'))
    fallback = json.dumps(BASE_SET_RATE).replace('"rate": 0.0', f'"rate": {text}')
    rejects(raw(fallback))


# ------------------------------------------------------------------ duplicate keys

@pytest.mark.parametrize("data", [
    raw(json.dumps(BASE_SET_RATE), head='"seq":3,"seq":4,"t_sent":1.5'),
    raw('{"cmd_id":"c1","pump":"p1","rate":20.0,"rate":2000.0,"unit":"mL/h","lease_s":15}'),
    raw('{"cmd_id":"c1","pump":"p1","rate":20.0,"unit":"mL/h","lease_s":15,'
        '"fallback":{"action":"stop","action":"preset_rate","rate":0}}'),
    raw('{"var":"bis","value":50,"value":50,"unit":"1","t_meas":0}', type_="measurement"),
], ids=["envelope", "body", "nested", "telemetry"])
def test_duplicate_keys_are_rejected(data):
    """A key given twice, at any depth, is rejected (Python's json would keep the last)."""
    rejects(data, match="duplicate key")


# ------------------------------------------------------------------ unknown fields

@pytest.mark.parametrize("type_, body, extra", [
    ("set_rate", BASE_SET_RATE, "bolus"),
    ("stop", {"cmd_id": "c1", "pump": "p1"}, "force"),
    ("get_status", {"cmd_id": "c1", "pump": "p1"}, "verbose"),
])
def test_commands_reject_unknown_fields(type_, body, extra):
    """Commands are strict: an unknown body field is an error naming it."""
    assert decode(frame(type_, body)).message.type == type_
    rejects(frame(type_, {**body, extra: 1}), match=f"unknown fields \\['{extra}'\\]")


def test_commands_reject_unknown_fields_in_the_fallback():
    """The nested fallback of a command is strict too."""
    body = {**BASE_SET_RATE, "fallback": {"action": "stop", "rate": 0, "when": "now"}}
    rejects(frame("set_rate", body))


@pytest.mark.parametrize("type_, body", [
    ("measurement", {**BASE_MEASUREMENT, "spo2_extra": [1, 2], "firmware": "2.1"}),
    ("pump_status", {**BASE_STATUS, "battery_pct": 80}),
])
def test_telemetry_ignores_unknown_fields(type_, body):
    """Telemetry readers ignore unknown body fields (forward compatibility)."""
    message = decode(frame(type_, body)).message
    assert message.type == type_
    assert not hasattr(message, "firmware") and not hasattr(message, "battery_pct")


@pytest.mark.parametrize("extra", [{"flags": 1}, {"V": 1}])
def test_unknown_envelope_fields_are_rejected(extra):
    """The envelope is closed: unknown top-level keys are errors."""
    rejects(frame(**extra), match="unknown")


# ------------------------------------------------------------------ units

@pytest.mark.parametrize("type_, body", [
    ("set_rate", {**BASE_SET_RATE, "unit": "furlong/h"}),
    ("set_rate", {**BASE_SET_RATE, "unit": "mg/h"}),                 # not a volume rate
    ("set_rate", {**BASE_SET_RATE, "fallback": {"action": "stop", "unit": "mg"}}),
    ("set_rate", {**BASE_SET_RATE, "dose_rate": 2.0, "dose_unit": "mgg/h"}),
    ("measurement", {**BASE_MEASUREMENT, "unit": "bogus"}),
    ("pump_status", {**BASE_STATUS, "vol_unit": "mg"}),
])
def test_unknown_or_wrong_units_are_rejected(type_, body):
    """An unknown unit, or one of the wrong kind, is rejected with code 'unit'."""
    rejects(frame(type_, body), code="unit", match="unit")


@pytest.mark.parametrize("unit", [
    "mL/h/0", "uL/min/0.001", "1e400*mL/h", "0*mL/h", "mL/hr", "mL/h/1", "ml/h", " mL/h",
    "mL*h^-1", "10^400*mL/h", "mL/h^999999", "1/mL^-999/h"])
def test_wire_units_are_a_fixed_list_not_a_grammar(unit):
    """Issue 14.3: a command's units come from a short fixed list; expressions, aliases and
    spellings the unit grammar would accept (or divide by zero on) are refused with 'unit'."""
    err = rejects(frame(body={**BASE_SET_RATE, "unit": unit}), code="unit",
                  match="is not one of mL/h, mL/min, uL/h, uL/min")
    assert err.cmd_id == "c1"
    rejects(frame(body={**BASE_SET_RATE, "fallback": {"action": "preset_rate", "rate": 1.0,
                                                      "unit": unit}}), code="unit")


def test_every_wire_unit_converts_exactly():
    """The listed alternatives convert exactly to the canonical spelling (uL/min -> mL/h)."""
    assert wire_factor("uL/min", "mL/h") == pytest.approx(0.06, rel=1e-15)
    assert wire_factor("mL/min", "mL/h") == pytest.approx(60.0, rel=1e-15)
    assert wire_factor("mg/h", "mg/s") == pytest.approx(1 / 3600, rel=1e-15)
    for units in WIRE_UNITS.values():
        for a in units:
            for b in units:
                try:
                    factor = wire_factor(a, b)
                except LocalProtocolError:  # dose rates in mass and in substance
                    continue
                assert math.isfinite(factor) and factor > 0
    with pytest.raises(LocalProtocolError, match="cannot be converted"):
        wire_factor("mL/h", "mg/s")


@pytest.mark.parametrize("data, match", [
    (raw(json.dumps({**BASE_SET_RATE, "pump": "\ud800"})), "lone surrogate"),
    (raw(json.dumps(BASE_SET_RATE), head='"seq":3,"t_sent":1.5,"x\\udfff":1'), "surrogate"),
    (b'{"v":1,"type":"set_rate","src":"\\ud800","epoch":"e1","seq":3,"t_sent":1.5,"body":'
     + json.dumps(BASE_SET_RATE).encode() + b"}", "lone surrogate"),
    (b'{"v":1,"type":"hello","src":"c","epoch":"\\udbff","seq":3,"t_sent":1.5,"body":'
     b'{"role":"c","versions":[1]}}', "lone surrogate"),
    (frame(seq=2**64), "seq must be a whole number in 0-"),
    (frame(seq=2**53), "seq must be a whole number in 0-"),
    (frame(src="s" * 129), "src must be a string of 1-128"),
    (frame(epoch=""), "epoch must be a string of 1-128"),
    (frame(body={**BASE_SET_RATE, "pump": "p" * 60000}), "pump: 60000 characters"),
])
def test_frames_that_once_crashed_the_bridge_are_refused(data, match):
    """Issue 14.2: lone surrogates (which no audit row can store), sequence numbers SQLite
    cannot hold, and names long enough to push an answer past the frame limit are refused
    at decoding with a reason code."""
    rejects(data, match=match)


def test_a_refused_command_is_answered_with_its_id_and_code():
    """Issue 14.5c: a refused set_rate (a unit of the wrong kind, a negative lease) is
    answered: ack ok=false with the reason code and the frame's cmd_id."""
    for body, code in (({**BASE_SET_RATE, "unit": "kg"}, "unit"),
                       ({**BASE_SET_RATE, "lease_s": -1}, "schema")):
        result = decode_frame(frame(body=body))
        assert isinstance(result, RemoteProtocolError)
        ack = refusal(result)
        assert ack == Ack(cmd_id="c1", ok=False, code=code, text=ack.text)
        assert ack.text.startswith("refused: ") and decode(encode(envelope(ack))).message == ack
    assert refusal(decode_frame(b"{}")) is None                       # no cmd_id to answer
    assert refusal(decode_frame(frame(body={**BASE_SET_RATE, "cmd_id": "x" * 129}))) is None
    assert isinstance(decode_frame(frame()), Envelope)


# ------------------------------------------------------------------ types and envelope

@pytest.mark.parametrize("data", [
    frame(body={**BASE_SET_RATE, "rate": "20"}),
    frame(body={**BASE_SET_RATE, "rate": True}),
    frame(body={**BASE_SET_RATE, "lease_s": None}),
    frame(body={**BASE_SET_RATE, "fallback": "stop"}),
    frame(body={**BASE_SET_RATE, "cmd_id": 7}),
    frame(body={**BASE_SET_RATE, "rate": -1.0}),
    frame("ack", {"cmd_id": "c1", "ok": "yes", "code": "applied"}),
    frame("ack", {"cmd_id": "c1", "ok": True, "code": "maybe"}),
    frame("hello", {"role": "plant", "versions": [1, "2"]}),
    frame("hello", {"role": "plant", "versions": 1}),
    frame(seq=True),
    frame(seq=-1),
    frame(seq=1.5),
    frame(seq="3"),
    frame(t_sent="now"),
    frame(t_sent=False),
    frame(t_sim="later"),
    frame(src=""),
    frame(src=5),
    frame(epoch=None),
    frame(body=[1, 2]),
    frame(type="reboot"),
    frame(type="fallback", body={"action": "stop"}),
    frame(type=None),
    frame("stop", {"cmd_id": "c1"}),                                  # missing field
], ids=lambda d: d.decode()[:60])
def test_wrong_types_and_values_are_rejected(data):
    """Wrong field types and values, unknown types and bad envelopes are 'schema' errors."""
    rejects(data, code="schema")


@pytest.mark.parametrize("version", [2, 0, "1", True, None, 1.5])
def test_unknown_versions_are_rejected(version):
    """Any protocol version but 1 is rejected with code 'version'."""
    rejects(frame(v=version), code="version", match="version")


@pytest.mark.parametrize("key", ["v", "type", "src", "epoch", "seq", "t_sent", "body"])
def test_missing_envelope_fields_are_rejected(key):
    """Every envelope field but t_sim is required."""
    rejects(frame(**{key: _DROP}), match=f"missing \\[.*'{key}'")


@pytest.mark.parametrize("data", [b"[]", b"1", b'"set_rate"', b"null", b"true", b"",
                                  b"{", b"{}{}", b"\xef\xbb\xbf{}", b"[" * 100_00])
def test_non_objects_and_broken_json_are_rejected(data):
    """Anything but one JSON object is a 'schema' error."""
    rejects(data)


@pytest.mark.parametrize("data", [
    frame().replace(b'"p1"', b'"p\xff1"'),
    frame().replace(b'"p1"', b'"p\xc3"'),
    b"\xed\xa0\x80",                                   # an encoded surrogate
    b'{"v":1,\x80}',
])
def test_invalid_utf8_is_rejected(data):
    """A frame that is not valid UTF-8 is a 'schema' error."""
    rejects(data, match="not a JSON message")


def test_oversize_frames_are_rejected_before_parsing():
    """A frame longer than MAX_MESSAGE_BYTES is rejected with code 'too_large'."""
    valid = frame()
    padded = valid[:-1] + b" " * (MAX_MESSAGE_BYTES - len(valid)) + b"}"
    assert len(padded) == MAX_MESSAGE_BYTES
    assert decode(padded).message.rate == 20.0          # exactly the limit is fine
    rejects(padded + b" ", code="too_large", match="exceeds")
    rejects(b"x" * (10 * MAX_MESSAGE_BYTES), code="too_large")


def _rising(start: float, n: int) -> list[float]:
    """*n* rising doubles one ulp apart from *start* (each spelt with 17 digits)."""
    out = [start]
    while len(out) < n:
        out.append(math.nextafter(out[-1], math.inf))
    return out


def _largest(message_type):
    """The largest message of a type: every name at its length limit, every text at its,
    multi-byte characters where text is free (4 bytes each in UTF-8, 6 escaped)."""
    name, text = "n" * MAX_NAME_CHARS, "\U0001F600" * MAX_TEXT_CHARS
    big = {"measurement": lambda: Measurement(var=name, value=-1.7e308, unit="10^9/L",
                                              t_meas=-1.7e308, quality="questionable",
                                              sensor=text),
           "set_rate": lambda: SetRate(cmd_id=name, pump=name, rate=1.7e308, unit="uL/min",
                                       lease_s=1.7e308, fallback=Fallback(
                                           action="preset_rate", rate=1.7e308, unit="uL/min"),
                                       dose_rate=1.7e308, dose_unit="umol/min",
                                       basis_seq=2**53 - 1),
           "bolus": lambda: Bolus(cmd_id=name, pump=name, amount=1.7e308, unit="umol",
                                  lease_s=1.7e308, duration_s=1.7e308, volume=1.7e308,
                                  vol_unit="uL", basis_seq=2**53 - 1),
           "stop": lambda: Stop(cmd_id=name, pump=name, reason=text),
           "get_status": lambda: GetStatus(cmd_id=name, pump=name),
           "ack": lambda: Ack(cmd_id=name, ok=False, code="not_authorized",
                              applied_rate=-1.7e308, unit="uL/min",
                              lease_remaining_s=1.7e308, text=text,
                              applied_amount=1.7e308, amount_unit="umol", bolus_s=1.7e308),
           "pump_status": lambda: PumpStatus(pump=name, state="disconnected", rate=1.7e308,
                                             unit="uL/min", delivered=1.7e308,
                                             lease_remaining_s=1.7e308, mode=text,
                                             bolus_delivered=1.7e308, bolus_remaining=1.7e308,
                                             amount_unit="umol"),
           "alarm": lambda: Alarm(code=name, priority="medium", kind="physiological",
                                  active=False, text=text),
           "heartbeat": lambda: Heartbeat(role=name, state=text, period_s=1.7e308),
           "hello": lambda: Hello(role=name, versions=(2**31 - 1,) * 16),
           # every number at the longest spelling a double has (24 characters)
           "plan": lambda: Plan(
               times_s=_rising(-1.2345678901234567e+300, MAX_PLAN_STAGES + 1),
               var=name, output=name, unit="10^9/L",
               predicted=[-2.2250738585072014e-308] * MAX_PLAN_STAGES,
               target=-2.2250738585072014e-308, band_low=-1.7976931348623157e+308,
               band_high=1.7976931348623157e+308,
               inputs=[PlanInput(input=name, pump=name, unit="umol/min",
                                 rates=[2.2250738585072014e-308] * MAX_PLAN_STAGES,
                                 conc=2.2250738585072014e-308)] * MAX_PLAN_INPUTS,
               mode=name, status=name, reason=text, solve_s=2.2250738585072014e-308,
               deadline_misses=2**53 - 1),
           "alarm_ack": lambda: AlarmAck(alarm_src=name, alarm_epoch=name,
                                         alarm_seq=2**53 - 1, code=name, priority="medium",
                                         operator=name, text=text)}
    return big[message_type]()


@pytest.mark.parametrize("message_type", sorted(MESSAGE_TYPES))
def test_every_valid_message_fits_a_frame(message_type):
    """Bounded names and texts: the largest valid message of each type encodes within
    MAX_MESSAGE_BYTES, so an answer (an ack naming the pump) can always be sent."""
    message = _largest(message_type)
    data = encode(Envelope(message, "s" * MAX_NAME_CHARS, "e" * MAX_NAME_CHARS, 2**53 - 1,
                           -1.7e308, 1.7e308))
    assert len(data) <= MAX_MESSAGE_BYTES
    assert decode(data).message == message


def test_oversize_frames_are_not_encoded():
    """encode still refuses a frame over MAX_MESSAGE_BYTES (a message built around the
    checks, as a defect elsewhere might)."""
    big = Alarm(code="x", priority="low", kind="technical")
    object.__setattr__(big, "text", "a" * MAX_MESSAGE_BYTES)
    with pytest.raises(LocalProtocolError, match="exceeds") as info:
        encode(envelope(big))
    assert info.value.code == "too_large"


def test_decode_rejects_non_bytes():
    """decode takes bytes, not text."""
    with pytest.raises(RemoteProtocolError, match="expected bytes"):
        decode(frame().decode())


# ------------------------------------------------------------------ construction

@pytest.mark.parametrize("build, match", [
    (lambda: Measurement(var="bis", value=math.nan, unit="1", t_meas=0.0),
     "value: expected a finite number"),
    (lambda: Measurement(var="bis", value=50.0, unit="1", t_meas=math.inf),
     "t_meas: expected a finite number"),
    (lambda: Measurement(var="bis", value=50.0, unit="1", t_meas=0.0, quality="good"),
     "quality: 'good' is not one of"),
    (lambda: Measurement(var="", value=50.0, unit="1", t_meas=0.0),
     "var: expected a non-empty string"),
    (lambda: Measurement(var="bis", value="50", unit="1", t_meas=0.0),
     "value: expected a number"),
    (lambda: SetRate(cmd_id="c", pump="p", rate=-0.1, unit="mL/h", lease_s=1.0),
     "rate: expected >= 0.0"),
    (lambda: SetRate(cmd_id="c", pump="p", rate=1.0, unit="mL/h", lease_s=0.0),
     "lease_s: expected > 0"),
    (lambda: SetRate(cmd_id="c", pump="p", rate=1.0, unit="mL/h", lease_s=-5.0),
     "lease_s: expected > 0"),
    (lambda: SetRate(cmd_id="c", pump="p", rate=1.0, unit="mL/h", lease_s=math.nan),
     "lease_s: expected a finite number"),
    (lambda: SetRate(cmd_id="c", pump="p", rate=1.0, unit="mg/h", lease_s=1.0),
     "unit: 'mg/h' is not one of mL/h, mL/min, uL/h, uL/min"),
    (lambda: SetRate(cmd_id="c", pump="p", rate=1.0, unit="mL/h", lease_s=1.0, dose_rate=2.0),
     "dose_rate and dose_unit go together"),
    (lambda: SetRate(cmd_id="c", pump="p", rate=1.0, unit="mL/h", lease_s=1.0,
                     fallback=Fallback(action="preset_rate", rate=-1.0)),
     "fallback.rate: expected >= 0.0"),
    (lambda: Fallback(action="stop", rate=2.0), "fallback.rate: a 'stop' fallback has rate 0"),
    (lambda: Fallback(action="pause"), "fallback.action: 'pause' is not one of stop"),
    (lambda: Fallback(action="preset_rate", rate=math.inf), "fallback.rate: expected a finite"),
    (lambda: Ack(cmd_id="c", ok=1, code="applied"), "ok: expected true or false"),
    (lambda: Ack(cmd_id="c", ok=True, code="applied", applied_rate=math.nan, unit="mL/h"),
     "applied_rate: expected a finite number"),
    (lambda: PumpStatus(pump="p", state="running", rate=1.0), "state: 'running' is not one of"),
    (lambda: PumpStatus(pump="p", state="stopped", rate=0.0, delivered=-1.0),
     "delivered: expected >= 0.0"),
    (lambda: Alarm(code="x", priority="urgent", kind="technical"),
     "priority: 'urgent' is not one of"),
    (lambda: Heartbeat(role="c", period_s=math.nan), "period_s: expected a finite number"),
    (lambda: Hello(role="c", versions=()), "versions: expected 1-16 whole numbers"),
    (lambda: Hello(role="c", versions=(1, True)), "versions: expected a whole number"),
    (lambda: Alarm(code="x", priority="low", kind="technical", text="a" * 2001),
     "text: 2001 characters, at most 2000"),
    (lambda: GetStatus(cmd_id="c", pump="p" * 129), "pump: 129 characters, at most 128"),
    (lambda: SetRate(cmd_id="c", pump="p", rate=1.0, unit="mL/h", lease_s=1.0,
                     basis_seq=2**53), "basis_seq: expected a whole number in 0-"),
])
def test_invalid_messages_cannot_be_built(build, match):
    """Constructing an invalid message raises LocalProtocolError naming the field."""
    with pytest.raises(LocalProtocolError, match=match):
        build()


@pytest.mark.parametrize("unit", ["furlong", "mg//L"])
def test_unknown_units_cannot_be_built(unit):
    """An unknown unit is a LocalProtocolError with code 'unit'."""
    with pytest.raises(LocalProtocolError, match="unit: ") as info:
        Measurement(var="bis", value=1.0, unit=unit, t_meas=0.0)
    assert info.value.code == "unit"


@pytest.mark.parametrize("quality", QUALITIES)
def test_every_quality_is_accepted(quality):
    """Every quality of QUALITIES builds a measurement."""
    assert Measurement(var="bis", value=1.0, unit="1", t_meas=0.0, quality=quality).quality \
        == quality


def test_messages_are_frozen():
    """Messages cannot be changed after validation."""
    message = EXAMPLES[2]
    with pytest.raises(AttributeError):
        message.rate = 5000.0


# ------------------------------------------------------------------ known gaps (package bugs)

def test_huge_integer_literal_is_a_remote_protocol_error():
    """A 5000-digit integer is rejected with RemoteProtocolError, not ValueError."""
    rejects(b"1" * 5000)


def test_integer_beyond_float_range_in_a_body_is_rejected():
    """A 400-digit integer in a numeric body field is a RemoteProtocolError."""
    rejects(frame(body={**BASE_SET_RATE, "rate": 10**400}))


@pytest.mark.parametrize("key", ["t_sent", "t_sim"])
def test_integer_beyond_float_range_in_the_envelope_is_rejected(key):
    """A 400-digit integer timestamp is a RemoteProtocolError."""
    rejects(frame(**{key: 10**400}))


@pytest.mark.parametrize("build", [
    lambda: Ack(cmd_id="c", ok=True, code="applied", lease_remaining_s=math.nan),
    lambda: Ack(cmd_id="c", ok=True, code="applied", lease_remaining_s="soon"),
    lambda: PumpStatus(pump="p", state="stopped", rate=0.0, lease_remaining_s=math.inf),
    lambda: SetRate(cmd_id="c", pump="p", rate=1.0, unit="mL/h", lease_s=1.0, basis_seq="x"),
    lambda: SetRate(cmd_id="c", pump="p", rate=1.0, unit="mL/h", lease_s=1.0, basis_seq=-3),
    lambda: Measurement(var="bis", value=1.0, unit="1", t_meas=0.0, sensor=["a"]),
    lambda: Alarm(code="x", priority="low", kind="technical", active="no"),
    lambda: Stop(cmd_id="c", pump="p", reason=42),
    lambda: PumpStatus(pump="p", state="stopped", rate=0.0, mode={"a": 1}),
], ids=["ack-lease-nan", "ack-lease-str", "status-lease-inf", "basis-seq-str",
        "basis-seq-negative", "sensor-list", "alarm-active-str", "stop-reason-int",
        "status-mode-dict"])
def test_unvalidated_fields_are_rejected(build):
    """Every message field is type-checked on construction."""
    with pytest.raises(LocalProtocolError):
        build()


# ------------------------------------------------------------------ fuzzing

VALID_FRAMES = [encode(envelope(m, seq=i, t_sim=float(i))) for i, m in enumerate(EXAMPLES)]


def decode_or_reject(data: bytes) -> None:
    try:
        result = decode(data)
    except RemoteProtocolError as err:
        assert err.code in ("schema", "version", "unit", "too_large")
    else:
        assert isinstance(result, Envelope)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash_decode(data):
    """decode of arbitrary bytes returns an Envelope or raises RemoteProtocolError."""
    decode_or_reject(data)


@st.composite
def mutated_frames(draw):
    data = bytearray(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.sampled_from(b'{}[]",:0-9.eE+ntfa\\\x00\xff'))
        elif op == "delete" and data:
            del data[i]
        elif op == "insert":
            data[i:i] = draw(st.sampled_from([b",", b'"x":1,', b"[", b"}", b"0" * 30, b"\\u",
                                              b"1e999", b"-", b" ", b'"', b"\xc3"]))
        elif op == "truncate":
            del data[i:]
    return bytes(data)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(mutated_frames())
def test_mutated_frames_never_crash_decode(data):
    """decode of corrupted valid frames returns an Envelope or raises RemoteProtocolError."""
    decode_or_reject(data)


# integers stay within float range (beyond it decode rejects them: tested above)
json_scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**63)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars,
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
FIELDS = sorted({name for cls in MESSAGE_TYPES.values() for name in cls.field_names()}
                | {"action", "extra"})


@st.composite
def structured_frames(draw):
    type_ = draw(st.sampled_from(sorted(MESSAGE_TYPES)))
    body = draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8))
    doc = {"v": 1, "type": type_, "src": "plant", "epoch": "e", "seq": 1, "t_sent": 0.0,
           "body": body}
    if draw(st.booleans()):  # sometimes corrupt an envelope field too
        doc[draw(st.sampled_from(sorted(doc)))] = draw(json_values)
    return json.dumps(doc).encode()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(structured_frames())
def test_well_formed_json_with_arbitrary_fields_never_crashes_decode(data):
    """decode of JSON frames with arbitrary field values gives an Envelope or a remote error."""
    decode_or_reject(data)
