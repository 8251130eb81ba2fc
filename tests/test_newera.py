"""The New Era NE-1000/NE-500 serial protocol (sans-I/O codec), its pseudo-terminal emulator
and the pyserial driver, end to end: the 4-digit number rule, basic and safe-mode framing
with CRC-16/XMODEM, reply parsing with resynchronisation, and the driver's behaviour under
the emulator's fault knobs (silence, garbage, wrong address, bad CRC, alarms, safe-mode
timeout, a dropped link)."""

from __future__ import annotations

import binascii
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hil.newera_emulator import NewEraEmulator
from mpc_dose.protocol.newera import (ETX, STX, NewEraError, Reply, ReplyParser,
                                      encode_command, encode_reply, format_number, parse_rate)
from mpc_dose.transport.serial_link import (NewEraDriver, PumpReading, PumpRefused,
                                            PumpUnreachable)

serial = pytest.importorskip("serial")

DIAMETER = 26.59  # mm, a 60 mL BD syringe
PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                    max_size=40)


def xmodem(data: bytes) -> int:
    """CRC-16/XMODEM bit by bit (poly 0x1021, init 0, no reflection), independent of
    binascii."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def original_data(reply: Reply) -> str:
    """The data field as the pump sent it (an alarm's ``?x`` is split off by the parser)."""
    return f"?{reply.alarm}{reply.data}" if reply.alarm else reply.data


# ---------------------------------------------------------------------------- format_number
@pytest.mark.parametrize(("value", "text"), [
    (12.345, "12.35"),   # 12.345 is 12.3450000000000006... in binary: rounds up
    (1234.4, "1234"),
    (1234.6, "1235"),    # truncation would give 1234
    (0.1234, "0.123"),
    (0.1239, "0.124"),   # truncation would give 0.123
    (12.5, "12.50"),
    (999.95, "1000"),    # rounding carries into a fifth digit: one decimal fewer
    (9999.4, "9999"),
    (0.0, "0.000"),
])
def test_format_number_keeps_four_digits_and_rounds(value, text):
    assert format_number(value) == text


@pytest.mark.parametrize("value", [-0.001, -1.0, math.nan, math.inf, -math.inf, 9999.5,
                                   10000.0, 1e9])
def test_format_number_rejects_what_the_pump_cannot_show(value):
    with pytest.raises(NewEraError, match="4-digit format"):
        format_number(value)


def test_format_number_error_is_a_value_error():
    with pytest.raises(ValueError, match="does not fit"):
        format_number(-5)


@settings(max_examples=400, deadline=None)
@given(st.floats(min_value=0.0, max_value=9999.4, allow_nan=False, allow_infinity=False))
def test_format_number_is_within_half_a_unit_of_its_last_digit(x):
    text = format_number(x)
    integer, _, decimals = text.partition(".")
    assert len(integer + decimals) <= 4 and len(decimals) <= 3, text
    assert integer.isdigit() and (decimals == "" or decimals.isdigit()), text
    parsed = float(text)
    assert abs(parsed - x) <= 0.5 * 10.0 ** -len(decimals) + 1e-9, (x, text)
    if x >= 1:
        assert abs(parsed - x) / x <= 5e-4, (x, text)


# ---------------------------------------------------------------------------- framing
def test_crc_is_crc16_xmodem():
    assert binascii.crc_hqx(b"123456789", 0) == 0x31C3 == xmodem(b"123456789")


def test_safe_mode_command_frame_computed_by_hand():
    body = b"00RAT12.5MH"
    crc = xmodem(body).to_bytes(2, "big")
    assert crc == binascii.crc_hqx(body, 0).to_bytes(2, "big")
    expected = b"\x02" + bytes([len(body) + 4]) + body + crc + b"\x03"
    assert expected[1] == 15
    assert encode_command("RAT12.5MH", 0, safe=True) == expected
    assert len(expected) == expected[1] + 1  # LEN counts everything after itself


def test_safe_mode_frame_without_address():
    body = b"VER"
    frame = encode_command("VER", safe=True)
    assert frame == STX + bytes([7]) + body + xmodem(body).to_bytes(2, "big") + ETX


def test_basic_mode_command_ends_with_carriage_return():
    assert encode_command("RAT12.5MH", 0) == b"00RAT12.5MH\r"
    assert encode_command("RUN", 7) == b"07RUN\r"
    assert encode_command("VER", 42) == b"42VER\r"
    assert encode_command("VER") == b"VER\r"


@pytest.mark.parametrize("address", [-1, 100, 1000])
@pytest.mark.parametrize("safe", [False, True])
def test_address_outside_0_to_99_is_rejected(address, safe):
    with pytest.raises(NewEraError, match="outside 0-99"):
        encode_command("VER", address, safe=safe)


def test_overlong_safe_command_is_rejected():
    with pytest.raises(NewEraError, match="too long"):
        encode_command("X" * 250, 0, safe=True)


# ---------------------------------------------------------------------------- parse_rate
@pytest.mark.parametrize(("data", "ml_per_h"), [
    ("12.50MH", 12.5), ("1234MH", 1234.0), ("0.123MH", 0.123), (".5MH", 0.5),
    ("100.0UH", 0.1), ("1.000MM", 60.0), ("500.0UM", 30.0), (" 12.5 MH ", 12.5),
])
def test_parse_rate_converts_to_ml_per_h(data, ml_per_h):
    assert parse_rate(data) == pytest.approx(ml_per_h, rel=1e-12)


@pytest.mark.parametrize("data", ["", "MH", "12.5", "12.5ML", "12345MH", "1.2345MH", "?OOR",
                                  "-1MH", "abcMH"])
def test_parse_rate_rejects_what_is_not_a_rate(data):
    with pytest.raises(NewEraError, match="not a rate reply"):
        parse_rate(data)


# ---------------------------------------------------------------------------- ReplyParser
@settings(max_examples=200, deadline=None)
@given(address=st.integers(0, 99), prompt=st.sampled_from("IWSPTUX"), data=PRINTABLE,
       safe=st.booleans())
def test_replies_round_trip_through_the_parser(address, prompt, data, safe):
    parser = ReplyParser()
    (reply,) = parser.feed(encode_reply(address, prompt, data, safe=safe))
    assert (reply.address, reply.prompt, original_data(reply)) == (address, prompt, data)
    assert reply.alarm is None
    assert parser.discarded == 0


def test_basic_and_safe_reply_examples():
    parser = ReplyParser()
    basic, safe = parser.feed(encode_reply(3, "I", "12.50MH")
                              + encode_reply(4, "S", "NE1000V3.928", safe=True))
    assert basic == Reply(3, "I", "12.50MH")
    assert safe == Reply(4, "S", "NE1000V3.928")
    assert basic.state == "infusing" and safe.state == "stopped"


def test_long_safe_reply_round_trips():
    data = "x" * 44  # body 47 bytes: LEN = 51 = ord("3")
    frame = encode_reply(0, "I", data, safe=True)
    assert len(frame) <= 64
    (reply,) = ReplyParser().feed(frame)
    assert (reply.address, reply.data) == (0, data)


@pytest.mark.parametrize("safe", [False, True])
def test_garbage_before_stx_is_discarded_and_counted(safe):
    parser = ReplyParser()
    garbage = b"\x00junk\xff\r\n"
    assert parser.feed(garbage) == []
    assert parser.discarded == len(garbage)
    (reply,) = parser.feed(b"more" + encode_reply(0, "I", "12.50MH", safe=safe))
    assert reply == Reply(0, "I", "12.50MH")
    assert parser.discarded == len(garbage) + 4


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=80).filter(lambda b: STX not in b), safe=st.booleans(),
       data=PRINTABLE)
def test_garbage_without_stx_never_hides_the_next_reply(garbage, safe, data):
    parser = ReplyParser()
    replies = parser.feed(garbage + encode_reply(5, "W", data, safe=safe))
    assert [(r.address, r.prompt, original_data(r)) for r in replies] == [(5, "W", data)]
    assert parser.discarded == len(garbage)


def test_bad_crc_frame_is_dropped_and_counted_and_the_next_one_parses():
    parser = ReplyParser()
    bad = bytearray(encode_reply(0, "I", "12.50MH", safe=True))
    bad[-2] ^= 0x01  # the CRC's low byte
    good = encode_reply(0, "S", "", safe=True)
    assert parser.feed(bytes(bad)) == []
    assert parser.discarded == len(bad)
    assert parser.feed(good) == [Reply(0, "S", "")]
    assert parser.discarded == len(bad)


def test_bad_crc_and_good_frame_in_one_read():
    parser = ReplyParser()
    bad = bytearray(encode_reply(1, "I", "5.000MH", safe=True))
    bad[4] ^= 0x20  # a data byte: the CRC no longer matches
    replies = parser.feed(bytes(bad) + encode_reply(1, "I", "5.000MH", safe=True))
    assert replies == [Reply(1, "I", "5.000MH")]
    assert parser.discarded == len(bad)


@pytest.mark.parametrize("safe", [False, True])
def test_stray_stx_in_noise_does_not_hold_back_the_next_reply(safe):
    parser = ReplyParser()
    assert parser.feed(b"\x02junk" + encode_reply(0, "S", "", safe=safe)) == [Reply(0, "S", "")]
    assert parser.discarded == 5


@pytest.mark.parametrize("safe", [False, True])
def test_frame_split_across_feeds_parses_once_complete(safe):
    frame = encode_reply(12, "I", "NE1000V3.928", safe=safe)
    parser = ReplyParser()
    for i in range(len(frame) - 1):
        assert parser.feed(frame[i:i + 1]) == [], f"reply before byte {i + 1} of {len(frame)}"
    assert parser.feed(frame[-1:]) == [Reply(12, "I", "NE1000V3.928")]
    assert parser.feed(b"") == []
    assert parser.discarded == 0


@settings(max_examples=100, deadline=None)
@given(data=st.data(), safe=st.booleans(), text=PRINTABLE)
def test_any_split_of_two_frames_gives_both_once(data, safe, text):
    stream = encode_reply(0, "I", text, safe=safe) + encode_reply(1, "S", "", safe=safe)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    parser = ReplyParser()
    replies = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)]):
        replies += parser.feed(stream[a:b])
    assert [(r.address, original_data(r)) for r in replies] == [(0, text), (1, "")]


@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("code", ["R", "S", "T", "E", "O"])
def test_alarm_reply(safe, code):
    (reply,) = ReplyParser().feed(encode_reply(0, "A", f"?{code}", safe=safe))
    assert reply.alarm == code
    assert reply.state == "alarm"
    assert reply.error is None


@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("error", ["?", "?NA", "?OOR", "?COM", "?IGN"])
def test_error_reply(safe, error):
    (reply,) = ReplyParser().feed(encode_reply(0, "S", error, safe=safe))
    assert reply.error == error
    assert reply.alarm is None
    assert reply.state == "stopped"


def test_unknown_prompt_state():
    (reply,) = ReplyParser().feed(STX + b"00Z" + ETX)
    assert reply.state == "unknown"


def test_reply_says_whether_it_came_safe_framed():
    basic, safe = ReplyParser().feed(encode_reply(0, "S", "?COM")
                                     + encode_reply(0, "S", "?COM", safe=True))
    assert (basic.safe, safe.safe) == (False, True)
    assert basic == safe  # the framing is how it came, not what it says


def test_truncated_basic_frame_does_not_swallow_the_next_reply():
    """A basic frame cut before its ETX, then a whole reply: basic frames are ASCII and never
    hold an STX, so the second STX starts the real reply."""
    parser = ReplyParser()
    assert parser.feed(b"\x0200S" + b"\x0200I12.5MH\x03") == [Reply(0, "I", "12.5MH")]
    assert parser.discarded == 4


def test_truncated_basic_frame_is_dropped_before_the_next_reply_is_complete():
    parser = ReplyParser()
    assert parser.feed(b"\x0200S" + b"\x0200I12") == []
    assert parser.feed(b".5MH\x03") == [Reply(0, "I", "12.5MH")]
    assert parser.discarded == 4


@pytest.mark.parametrize("length", [7, 20, 40, 63])
def test_truncated_safe_frame_does_not_swallow_the_next_reply(length):
    """A safe frame whose LEN promises more bytes than ever came, then a whole safe reply:
    the reply is not held back waiting for (or eaten by) the truncated frame."""
    parser = ReplyParser()
    good = encode_reply(0, "I", "12.50MH", safe=True)
    truncated = STX + bytes([length]) + b"00S"
    assert parser.feed(truncated + good) == [Reply(0, "I", "12.50MH")]
    assert parser.discarded == len(truncated)


def test_truncated_safe_frame_whose_length_ends_on_the_next_etx():
    """The truncated frame's LEN lands exactly on the real reply's ETX: its CRC fails, but
    the real reply inside it is still found (not dropped with it)."""
    good = encode_reply(0, "I", "12.50MH", safe=True)
    length = len(STX + b"L00S") + len(good) - 1  # LEN counts the bytes after itself
    truncated = STX + bytes([length]) + b"00S"
    assert (truncated + good)[truncated[1]:truncated[1] + 1] == ETX
    parser = ReplyParser()
    assert parser.feed(truncated + good) == [Reply(0, "I", "12.50MH")]
    assert parser.discarded == len(truncated)


def test_stx_in_a_safe_frames_crc_is_not_a_resync_point():
    """The CRC (and LEN) bytes of a safe frame may be 0x02: such a frame still parses whole,
    alone or split byte by byte."""
    data = next(f"{i:04d}" for i in range(10000)
                if STX in encode_reply(0, "I", f"{i:04d}", safe=True)[-3:-1])
    frame = encode_reply(0, "I", data, safe=True)
    assert ReplyParser().feed(frame + encode_reply(1, "S", "")) == [Reply(0, "I", data),
                                                                    Reply(1, "S", "")]
    parser, replies = ReplyParser(), []
    for i in range(len(frame)):
        replies += parser.feed(frame[i:i + 1])
    assert replies == [Reply(0, "I", data)] and parser.discarded == 0


@settings(max_examples=400, deadline=None)
@given(junk=st.binary(max_size=70).filter(lambda b: ETX not in b), safe=st.booleans(),
       address=st.integers(0, 99), prompt=st.sampled_from("IWSPTUX"), data=PRINTABLE)
def test_any_truncated_frame_never_hides_the_next_reply(junk, safe, address, prompt, data):
    """Whatever started with an STX and lost its end, the complete reply after it is
    returned."""
    parser = ReplyParser()
    replies = parser.feed(STX + junk + encode_reply(address, prompt, data, safe=safe))
    assert [(r.address, r.prompt, original_data(r)) for r in replies[-1:]] == \
        [(address, prompt, data)]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=100), max_size=8))
def test_arbitrary_bytes_never_raise(chunks):
    parser = ReplyParser()
    for chunk in chunks:
        for reply in parser.feed(chunk):
            assert isinstance(reply, Reply)
    assert 0 <= parser.discarded <= sum(map(len, chunks))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_then_a_flood_of_good_frames_recover(junk):
    """Whatever came before, the parser is back in step after at most MAX_FRAME bytes."""
    parser = ReplyParser()
    parser.feed(junk)
    good = encode_reply(9, "S", "", safe=True)
    replies = []
    for _ in range(20):
        replies += parser.feed(good)
    assert replies[-5:] == [Reply(9, "S", "")] * 5


# ---------------------------------------------------------------------------- end to end
def _closing_factory(build):
    """A fixture body: yields ``make(*args, **kwargs) -> build(...)`` and closes every
    object made when the test ends."""
    made = []

    def make(*args, **kwargs):
        made.append(build(*args, **kwargs))
        return made[-1]

    yield make
    for thing in made:
        thing.close()


@pytest.fixture
def emulators():
    yield from _closing_factory(
        lambda addresses=(0,), **kwargs: NewEraEmulator(addresses, **kwargs).start())


@pytest.fixture
def drivers():
    yield from _closing_factory(
        lambda device, **kwargs: NewEraDriver(device, **{"timeout_s": 0.1, "retries": 2,
                                                         **kwargs}))


@pytest.fixture
def rig(emulators, drivers):
    """One initialised pump at address 0 (max 1500 mL/h) and its driver."""
    emulator = emulators([0])
    driver = drivers(emulator.device)
    driver.initialise(0, DIAMETER)
    return emulator, driver


def test_initialise_after_power_up_handles_ignored_command_and_reset_alarm(emulators,
                                                                         drivers):
    emulator = emulators([0], power_reset=True)
    assert emulator.state(0).alarm == "R" and emulator.state(0).fresh
    driver = drivers(emulator.device)
    driver.initialise(0, 14.5)
    pump = emulator.state(0)
    assert pump.alarm is None and not pump.fresh
    assert pump.diameter_mm == 14.5 and pump.units == "MH" and pump.prompt == "S"
    assert any("ignored first command" in line for line in emulator.log)
    assert driver.read(0) == PumpReading("stopped", 0.0, 0.0, None)


def test_initialise_without_power_reset_alarm(emulators, drivers):
    emulator = emulators([0])
    driver = drivers(emulator.device)
    driver.initialise(0, DIAMETER)
    assert emulator.log[0].startswith("00 ignored first command")
    assert emulator.state(0).alarm is None
    assert driver.read(0).state == "stopped"


def test_set_rate_returns_the_rate_read_back(rig):
    emulator, driver = rig
    assert driver.set_rate(0, 12.5) == 12.5
    assert emulator.state(0).prompt == "I"
    assert emulator.state(0).rate_ml_per_h == 12.5
    # the pump keeps 4 digits: 123.456 -> 123.5
    assert driver.set_rate(0, 123.456) == pytest.approx(123.5)
    reading = driver.read(0)
    assert reading.state == "infusing" and reading.rate_ml_per_h == pytest.approx(123.5)
    assert driver.set_rate(0, 0) == 0.0
    assert emulator.state(0).prompt == "S"


@pytest.mark.parametrize("rate", [0.0004, 0.00049, 1e-9, 5e-324])
def test_a_rate_that_rounds_to_zero_stops_the_pump(rig, rate):
    """An optimiser's "zero" is a tiny positive number: the pump cannot run at 0.000 mL/h,
    so it is stopped (read back 0.0), never sent a RUN that cannot start."""
    emulator, driver = rig
    assert driver.set_rate(0, 12.5) == 12.5
    before = len(emulator.log)
    assert driver.set_rate(0, rate) == 0.0
    assert emulator.state(0).prompt == "S"
    assert "00 RUN" not in emulator.log[before:]
    assert driver.set_rate(0, rate) == 0.0  # already stopped: the same


def test_the_smallest_rate_the_pump_can_show_runs(rig):
    emulator, driver = rig
    assert driver.set_rate(0, 0.0006) == 0.001  # rounds up to the pump's resolution
    assert emulator.state(0).prompt == "I"


@pytest.mark.parametrize("rate", [math.nan, math.inf, -math.inf, -1.0, -0.0004])
def test_set_rate_refuses_a_rate_that_is_not_finite_and_non_negative(rig, rate):
    emulator, driver = rig
    driver.set_rate(0, 5.0)
    before = len(emulator.log)
    with pytest.raises(ValueError, match=r"rate .* mL/h"):
        driver.set_rate(0, rate)
    time.sleep(0.02)
    assert emulator.log[before:] == [], "nothing may reach the wire"
    assert emulator.state(0).rate_ml_per_h == 5.0 and emulator.state(0).prompt == "I"


def _killed_bridge(emulators, drivers, safe_s):
    """A pump left running in safe mode by a driver that vanished without stopping it (a
    SIGKILLed bridge)."""
    emulator = emulators([0])
    old = drivers(emulator.device, safe_s=safe_s)
    old.initialise(0, DIAMETER)
    assert old.set_rate(0, 30.0) == 30.0
    old.close()
    return emulator


@pytest.mark.parametrize("new_safe_s", [2, 0])
def test_a_new_driver_recovers_a_pump_still_running_in_safe_mode(emulators, drivers,
                                                               new_safe_s):
    emulator = _killed_bridge(emulators, drivers, safe_s=3)
    assert (emulator.state(0).prompt, emulator.state(0).safe_s) == ("I", 3)
    driver = drivers(emulator.device, safe_s=new_safe_s)
    driver.initialise(0, DIAMETER)
    pump = emulator.state(0)
    assert (pump.prompt, pump.alarm, pump.safe_s) == ("S", None, new_safe_s)
    reading = driver.read(0)
    assert (reading.state, reading.alarm) == ("stopped", None)
    assert driver.set_rate(0, 12.5) == 12.5
    assert emulator.state(0).prompt == "I"
    if new_safe_s == 0:  # back in basic mode (SAF0): a basic packet gets a basic answer
        driver.serial.write(encode_command("RAT", 0))
        parser, replies, deadline = ReplyParser(), [], time.monotonic() + 0.5
        while not replies and time.monotonic() < deadline:
            replies = parser.feed(driver.serial.read(64))
        assert [(r.data, r.error, r.safe) for r in replies] == [("12.50MH", None, False)]


def test_a_new_driver_recovers_a_pump_its_watchdog_stopped(emulators, drivers):
    emulator = _killed_bridge(emulators, drivers, safe_s=1)
    start = time.monotonic()
    while emulator.state(0).alarm is None and time.monotonic() - start < 1.6:
        time.sleep(0.02)
    assert (emulator.state(0).prompt, emulator.state(0).alarm) == ("S", "T")
    driver = drivers(emulator.device, safe_s=2)
    driver.initialise(0, DIAMETER)
    pump = emulator.state(0)
    assert (pump.prompt, pump.alarm, pump.safe_s) == ("S", None, 2)
    assert driver.set_rate(0, 12.5) == 12.5
    assert driver.read(0).state == "infusing"


def test_initialise_says_what_to_do_when_the_pump_will_not_stop(emulators, drivers,
                                                                monkeypatch):
    """A latched alarm that STP does not clear: start-up stops there, before DIA, and the
    error tells the operator what to do."""
    emulator = emulators([0])
    emulator.alarm(0, "S")
    execute = emulator._execute

    def latched(pump, command, now):
        alarm, data = pump.alarm, execute(pump, command, now)
        pump.alarm = alarm
        return data

    monkeypatch.setattr(emulator, "_execute", latched)
    driver = drivers(emulator.device)
    with pytest.raises(PumpRefused, match="power-cycle"):
        driver.initialise(0, DIAMETER)
    assert not any("DIA" in line for line in emulator.log)


def test_initialise_says_what_to_do_when_the_pump_does_not_answer(emulators, drivers):
    emulator = emulators([0])
    emulator.silent = True
    with pytest.raises(PumpUnreachable, match="pump 00.*power-cycle"):
        drivers(emulator.device).initialise(0, DIAMETER)


def test_rate_above_the_pump_maximum_is_refused_and_changes_nothing(emulators, drivers):
    """T20: ?OOR becomes PumpRefused(code="out_of_range"); the pump keeps its rate."""
    emulator = emulators([0], max_rate_ml_per_h=100.0)
    driver = drivers(emulator.device)
    driver.initialise(0, DIAMETER)
    assert driver.set_rate(0, 40.0) == 40.0
    with pytest.raises(PumpRefused, match=r"\?OOR") as info:
        driver.set_rate(0, 150.0)
    assert info.value.code == "out_of_range"
    assert info.value.reply is not None and info.value.reply.error == "?OOR"
    pump = emulator.state(0)
    assert (pump.rate_ml_per_h, pump.prompt) == (40.0, "I")
    assert driver.read(0).rate_ml_per_h == 40.0


def test_stall_alarm_is_reported_by_read(rig):
    """T21: an occlusion stops the pump and the next read says alarm S."""
    emulator, driver = rig
    driver.set_rate(0, 50.0)
    emulator.alarm(0, "S")
    reading = driver.read(0)
    assert reading.state == "alarm" and reading.alarm == "S"
    assert emulator.state(0).prompt == "S"
    with pytest.raises(PumpRefused, match=r"alarm A\?S") as info:
        driver.set_rate(0, 50.0)
    assert info.value.code == "alarm"
    assert emulator.state(0).prompt == "S", "an alarmed pump must not restart"
    driver.stop(0)  # the operator's STP acknowledges the alarm
    assert driver.read(0).alarm is None
    assert driver.set_rate(0, 50.0) == 50.0


def test_safe_mode_timeout_stops_the_pump(emulators, drivers):
    """B2/T18: in safe mode, no valid packet for more than safe_s stops the pump (A?T)."""
    emulator = emulators([0])
    driver = drivers(emulator.device, safe_s=1)
    driver.initialise(0, DIAMETER)
    assert emulator.state(0).safe_s == 1
    assert driver.set_rate(0, 30.0) == 30.0
    assert emulator.state(0).prompt == "I"
    start = time.monotonic()
    while emulator.state(0).alarm is None and time.monotonic() - start < 1.6:
        time.sleep(0.02)
    waited = time.monotonic() - start
    pump = emulator.state(0)
    assert (pump.prompt, pump.alarm) == ("S", "T")
    assert 0.9 <= waited <= 1.3, waited
    reading = driver.read(0)
    assert reading.state == "alarm" and reading.alarm == "T"


def test_safe_mode_polling_keeps_the_pump_running(emulators, drivers):
    emulator = emulators([0])
    driver = drivers(emulator.device, safe_s=1)
    driver.initialise(0, DIAMETER)
    driver.set_rate(0, 30.0)
    for _ in range(5):  # 1.25 s of polls every 0.25 s
        time.sleep(0.25)
        assert driver.read(0).state == "infusing"
    assert emulator.state(0).alarm is None


def test_safe_mode_refuses_basic_packets(emulators, drivers):
    """Once in safe mode the driver frames every packet (it keeps working); a basic packet
    on the same line is refused with a safe-mode ?COM and does not feed the watchdog."""
    emulator = emulators([0])
    driver = drivers(emulator.device, safe_s=5)
    driver.initialise(0, DIAMETER)
    assert driver.set_rate(0, 2.0) == 2.0
    driver.serial.write(encode_command("RAT", 0))  # basic framing, behind the driver's back
    parser, replies, deadline = ReplyParser(), [], time.monotonic() + 0.5
    while not replies and time.monotonic() < deadline:
        replies = parser.feed(driver.serial.read(64))
    assert [r.error for r in replies] == ["?COM"]
    assert any("basic packet in safe mode" in line for line in emulator.log)


def test_silent_pump_is_unreachable_after_the_retries(rig):
    """T25: no reply -> PumpUnreachable after retries+1 tries of timeout_s each."""
    emulator, driver = rig
    emulator.silent = True
    before = len(emulator.log)
    start = time.monotonic()
    with pytest.raises(PumpUnreachable, match="no valid reply to 'RAT' after 3 tries"):
        driver.read(0)
    elapsed = time.monotonic() - start
    assert 3 * 0.1 <= elapsed <= 3 * 0.1 + 0.15, elapsed
    time.sleep(0.05)
    assert emulator.log[before:] == ["00 RAT"] * 3
    emulator.silent = False
    assert driver.read(0).state == "stopped"


def test_garbage_before_each_reply_is_skipped(rig):
    """T24: junk bytes before every reply: the parser resynchronises on STX."""
    emulator, driver = rig
    emulator.garbage = b"\x00junk"
    discarded = driver._parser.discarded
    assert driver.set_rate(0, 12.5) == 12.5
    assert driver.read(0).rate_ml_per_h == 12.5
    assert driver._parser.discarded - discarded == 5 * len(b"\x00junk")  # RAT RUN RAT RAT DIS
    assert driver.failures == 0


def test_garbage_in_safe_mode_is_skipped(emulators, drivers):
    emulator = emulators([0])
    driver = drivers(emulator.device, safe_s=5)
    driver.initialise(0, DIAMETER)
    emulator.garbage = b"\x00junk"
    assert driver.set_rate(0, 7.5) == 7.5
    assert driver.failures == 0


def test_noise_with_stx_before_each_reply_is_skipped(rig):
    emulator, driver = rig
    emulator.garbage = b"\x02junk"
    assert driver.set_rate(0, 12.5) == 12.5


def test_a_late_reply_never_answers_a_later_command(emulators, drivers):
    emulator = emulators([0])
    driver = drivers(emulator.device, timeout_s=0.2, retries=0)
    driver.initialise(0, DIAMETER)
    emulator.reply_delay_s = 0.3  # VER's reply lands in the middle of DIS's reply window
    with pytest.raises(PumpUnreachable, match="'VER'"):
        driver.command(0, "VER")
    try:
        reply = driver.command(0, "DIS")
    except PumpUnreachable:
        return  # refusing to guess is fine; answering with VER's reply is not
    assert reply.data.startswith("I") and "W" in reply.data, reply


def test_corrupt_crc_in_safe_mode_is_unreachable(emulators, drivers):
    """T24: every reply fails its CRC: none is believed."""
    emulator = emulators([0])
    driver = drivers(emulator.device, safe_s=5)
    driver.initialise(0, DIAMETER)
    emulator.corrupt_crc = True
    discarded = driver._parser.discarded
    with pytest.raises(PumpUnreachable, match="after 3 tries"):
        driver.set_rate(0, 10.0)
    assert driver._parser.discarded > discarded
    assert emulator.state(0).rate_ml_per_h == 10.0  # the command arrived; the replies did not


def test_wrong_address_replies_are_ignored(rig):
    """T24: a reply from another address never answers this pump's command."""
    emulator, driver = rig
    emulator.wrong_address = True
    with pytest.raises(PumpUnreachable, match="pump 00"):
        driver.read(0)


def test_nobody_at_the_address_is_unreachable(rig):
    emulator, driver = rig
    with pytest.raises(PumpUnreachable, match="pump 07: no valid reply"):
        driver.command(7, "VER")
    with pytest.raises(PumpUnreachable, match="pump 07"):
        driver.initialise(7, DIAMETER)


def test_dropped_link_raises_promptly(rig):
    """T19: after the link drops every call raises at once (it does not hang)."""
    emulator, driver = rig
    emulator.close()
    start = time.monotonic()
    with pytest.raises(Exception) as info:  # noqa: PT011 - see the next test for the type
        driver.read(0)
    assert time.monotonic() - start < 1.0
    assert not isinstance(info.value, AssertionError)


def test_dropped_link_raises_a_link_error(rig):
    """T19: the caller can tell a dropped link from a programming error."""
    emulator, driver = rig
    driver.set_rate(0, 5.0)
    emulator.close()
    with pytest.raises((PumpUnreachable, OSError, serial.SerialException)):
        driver.read(0)


def test_two_pumps_on_one_line_are_independent(emulators, drivers):
    emulator = emulators([0, 1])
    driver = drivers(emulator.device)
    driver.initialise(0, DIAMETER)
    driver.initialise(1, 14.5)
    assert (emulator.state(0).diameter_mm, emulator.state(1).diameter_mm) == (DIAMETER, 14.5)
    assert driver.set_rate(0, 20.0) == 20.0
    assert emulator.state(1).prompt == "S" and emulator.state(1).rate_ml_per_h == 0.0
    assert driver.set_rate(1, 3.5) == 3.5
    assert emulator.state(0).rate_ml_per_h == 20.0
    driver.stop(0)
    assert (emulator.state(0).prompt, emulator.state(1).prompt) == ("S", "I")
    emulator.alarm(1, "S")
    assert driver.read(0).alarm is None
    assert driver.read(1).alarm == "S"
    assert driver.set_rate(0, 8.0) == 8.0


def test_dispensed_volume_grows_while_infusing(rig):
    emulator, driver = rig
    driver.set_rate(0, 1000.0)  # 0.278 mL/s
    first = driver.read(0)
    t0 = time.monotonic()
    time.sleep(0.4)
    second = driver.read(0)
    elapsed = time.monotonic() - t0
    assert second.dispensed_ml > first.dispensed_ml
    expected = 1000.0 / 3600.0 * elapsed
    assert second.dispensed_ml - first.dispensed_ml == pytest.approx(expected, rel=0.1)
    driver.set_rate(0, 0)
    stopped = driver.read(0).dispensed_ml
    time.sleep(0.1)
    assert driver.read(0).dispensed_ml == stopped
