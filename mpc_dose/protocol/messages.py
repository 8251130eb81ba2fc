"""Protocol messages: frozen, keyword-only dataclasses that validate in their constructor.

An invalid message is never built (after h11's events): a non-finite number, an unknown unit,
a negative lease or an unknown quality raises :class:`LocalProtocolError` naming the field.
Don't subclass these.

Units on the wire come from a short fixed list per role (:data:`WIRE_UNITS`), not from the
unit grammar of :mod:`mpc_dose.units`: a peer cannot make a receiver divide by zero
(``"mL/h/0"``) or reach infinity (``"1e400*mL/h"``) through a unit string. Infusion rates
travel in volume per time with the dose rate alongside for an independent check, as real
pumps are commanded in volume; a bolus (revision 1.1) travels as a drug amount with its
volume alongside. Names (ids, pump, variable) and free texts have bounded
lengths, so every valid message encodes within the frame limit.

This module uses the standard library only: no sockets, no clocks, no sleeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..errors import MpcDoseError
from ..units import parse_unit

__all__ = ["ProtocolError", "LocalProtocolError", "RemoteProtocolError", "QUALITIES",
           "PUMP_STATES", "Measurement", "SetRate", "Bolus", "Stop", "GetStatus", "Ack",
           "PumpStatus",
           "Alarm", "Heartbeat", "Hello", "Fallback", "Plan", "PlanInput", "AlarmAck",
           "MESSAGE_TYPES", "ACK_CODES", "MAX_PLAN_STAGES", "MAX_PLAN_INPUTS",
           "WIRE_UNITS", "wire_factor", "MAX_NAME_CHARS", "MAX_TEXT_CHARS", "MAX_SEQ"]


class ProtocolError(MpcDoseError, ValueError):
    """A message or byte stream that breaks the protocol; *code* is the reason code."""

    def __init__(self, message: str, code: str = "schema") -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to build or send something illegal."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something illegal.

    *cmd_id* is the refused command's id when the frame carried a readable one (so the
    refusal can be answered, docs/protocol.md section 2), else None.
    """

    def __init__(self, message: str, code: str = "schema", cmd_id: str | None = None
                 ) -> None:
        super().__init__(message, code)
        self.cmd_id = cmd_id


#: Measurement validity, as IEEE 11073 BICEPS MeasurementValidity.
QUALITIES = ("valid", "questionable", "calibrating", "invalid", "overflow", "underflow",
             "unavailable")
PUMP_STATES = ("infusing", "stopped", "paused", "alarm", "disconnected", "unknown")
ACK_CODES = ("applied", "duplicate", "out_of_range", "expired", "stale", "unit", "schema",
             "version", "too_large", "not_authorized", "pump_error", "busy", "internal")

#: drug amounts on the wire (a bolus, the dose rates' numerators); U and mU are insulin units
_AMOUNTS = ("g", "mg", "ug", "ng", "mmol", "umol", "U", "mU")
#: The only unit strings a frame may carry, by role (docs/protocol.md section 3); exact
#: spellings, compared as strings. Extending a list is a protocol change: say it there.
WIRE_UNITS: dict[str, tuple[str, ...]] = {
    "volume_rate": ("mL/h", "mL/min", "uL/h", "uL/min"),
    "volume": ("mL", "uL"),
    "amount": _AMOUNTS,
    "dose_rate": tuple(f"{amount}/{time}" for amount in _AMOUNTS
                       for time in ("s", "min", "h")),
    "measurement": ("1", "%", "mg/L", "ug/mL", "ng/mL", "ug/L", "mg/dL", "mmol/L", "umol/L",
                    "mmHg", "kPa", "10^9/L", "g"),
}
#: each wire unit's dimension and factor, parsed once from the fixed list (never from a frame)
_WIRE_PARSED = {text: parse_unit(text) for texts in WIRE_UNITS.values() for text in texts}

#: longest id, name or code (src, epoch, cmd_id, pump, var, ...) and free text, in characters
MAX_NAME_CHARS = 128
MAX_TEXT_CHARS = 2000
#: sequence numbers stay exact in every JSON implementation (IEEE doubles) and in SQLite
MAX_SEQ = 2**53 - 1
#: (1.2) a ``plan`` carries at most this many stages and inputs, so the largest one (every
#: number at its longest spelling, every name and text at its limit) fits one frame; a
#: longer horizon is cut to its first MAX_PLAN_STAGES stages by the sender
MAX_PLAN_STAGES = 200
MAX_PLAN_INPUTS = 4


def wire_factor(from_unit: str, to_unit: str) -> float:
    """Factor from one wire unit to another of the same dimension (both from
    :data:`WIRE_UNITS`; messages have checked theirs when they were built)."""
    a, b = _WIRE_PARSED.get(from_unit), _WIRE_PARSED.get(to_unit)
    if a is None or b is None or a.dimension != b.dimension:
        raise LocalProtocolError(f"unit {from_unit!r} cannot be converted to {to_unit!r}",
                                 code="unit")
    return a.factor / b.factor


def _finite(name: str, value: object, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LocalProtocolError(f"{name}: expected a number, got {_show(value)}")
    try:
        value = float(value)
    except OverflowError:
        raise LocalProtocolError(f"{name}: expected a finite number, got a "
                                 f"{len(str(value))}-digit integer") from None
    if not math.isfinite(value):
        raise LocalProtocolError(f"{name}: expected a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise LocalProtocolError(f"{name}: expected >= {minimum}, got {value!r}")
    return value


def _show(value: object) -> str:
    """A value for an error message, cut short (a frame may hold 64 KiB)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(name: str, value: object, choices: tuple[str, ...] | None = None) -> str:
    """A non-empty name of at most :data:`MAX_NAME_CHARS` characters."""
    if not isinstance(value, str) or not value:
        raise LocalProtocolError(f"{name}: expected a non-empty string, got {_show(value)}")
    if len(value) > MAX_NAME_CHARS:
        raise LocalProtocolError(f"{name}: {len(value)} characters, at most {MAX_NAME_CHARS}")
    if choices is not None and value not in choices:
        raise LocalProtocolError(f"{name}: {_show(value)} is not one of {', '.join(choices)}")
    return value


def _whole(name: str, value: object, *, maximum: int = MAX_SEQ) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise LocalProtocolError(f"{name}: expected a whole number in 0-{maximum}, "
                                 f"got {_show(value)}")
    return value


def _optional_finite(name: str, value: object, *, minimum: float | None = None
                     ) -> float | None:
    return None if value is None else _finite(name, value, minimum=minimum)


def _string(name: str, value: object) -> str:
    """Free text (empty allowed) of at most :data:`MAX_TEXT_CHARS` characters."""
    if not isinstance(value, str):
        raise LocalProtocolError(f"{name}: expected a string, got {_show(value)}")
    if len(value) > MAX_TEXT_CHARS:
        raise LocalProtocolError(f"{name}: {len(value)} characters, at most {MAX_TEXT_CHARS}")
    return value


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise LocalProtocolError(f"{name}: expected true or false, got {_show(value)}")
    return value


def _unit(name: str, value: object, role: str) -> str:
    """One of the wire units of *role* (:data:`WIRE_UNITS`), spelt exactly."""
    allowed = WIRE_UNITS[role]
    if not isinstance(value, str) or value not in allowed:
        raise LocalProtocolError(f"{name}: {_show(value)} is not one of {', '.join(allowed)}",
                                 code="unit")
    return value


class _Message:
    """Shared behaviour: a type name and a plain-dict body for the codec."""

    type: str = ""
    #: commands are strict: a receiver rejects unknown fields in them
    is_command: bool = False
    #: optional fields added in a minor revision: left out of the frame when None, so a
    #: message that does not use them encodes as before
    added_optional: tuple[str, ...] = ()

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        names = cls.__dict__.get("_field_names")
        if names is None:  # computed once per class: dataclasses.fields() is slow
            names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
            cls._field_names = names
        return names

    def body(self) -> dict:
        out = {}
        for name in self.field_names():
            value = getattr(self, name)
            if value is None and name in self.added_optional:
                continue
            out[name] = value.body() if isinstance(value, _Message) else value
        return out


@dataclass(frozen=True, kw_only=True)
class Measurement(_Message):
    """One sensor reading of variable *var* taken at *t_meas* [s]."""

    type = "measurement"
    var: str
    value: float
    unit: str
    t_meas: float
    quality: str = "valid"
    sensor: str = ""

    def __post_init__(self) -> None:
        _text("var", self.var)
        object.__setattr__(self, "value", _finite("value", self.value))
        _unit("unit", self.unit, "measurement")
        object.__setattr__(self, "t_meas", _finite("t_meas", self.t_meas))
        _text("quality", self.quality, QUALITIES)
        _string("sensor", self.sensor)


@dataclass(frozen=True, kw_only=True)
class Fallback(_Message):
    """What a pump does by itself when a lease runs out: ``stop`` or ``preset_rate``."""

    type = "fallback"
    action: str = "stop"
    rate: float = 0.0
    unit: str = "mL/h"

    def __post_init__(self) -> None:
        _text("fallback.action", self.action, ("stop", "preset_rate"))
        object.__setattr__(self, "rate", _finite("fallback.rate", self.rate, minimum=0.0))
        _unit("fallback.unit", self.unit, "volume_rate")
        if self.action == "stop" and self.rate != 0:
            raise LocalProtocolError("fallback.rate: a 'stop' fallback has rate 0")


@dataclass(frozen=True, kw_only=True)
class SetRate(_Message):
    """Command: infuse *rate* [*unit*, volume per time] on *pump* for at most *lease_s*.

    ``dose_rate``/``dose_unit`` and ``conc``/``conc_unit`` (drug per mL) repeat the command in
    drug units so the pump side can check the volume rate independently.
    """

    type = "set_rate"
    is_command = True
    cmd_id: str
    pump: str
    rate: float
    unit: str
    lease_s: float
    fallback: Fallback = field(default_factory=Fallback)
    dose_rate: float | None = None
    dose_unit: str | None = None
    basis_seq: int | None = None

    def __post_init__(self) -> None:
        _text("cmd_id", self.cmd_id)
        _text("pump", self.pump)
        object.__setattr__(self, "rate", _finite("rate", self.rate, minimum=0.0))
        _unit("unit", self.unit, "volume_rate")
        lease = _finite("lease_s", self.lease_s)
        if lease <= 0:
            raise LocalProtocolError(f"lease_s: expected > 0, got {self.lease_s!r}")
        object.__setattr__(self, "lease_s", lease)
        if isinstance(self.fallback, dict):
            object.__setattr__(self, "fallback", Fallback(**self.fallback))
        if not isinstance(self.fallback, Fallback):
            raise LocalProtocolError(f"fallback: expected a fallback, got {_show(self.fallback)}")
        if (self.dose_rate is None) != (self.dose_unit is None):
            raise LocalProtocolError("dose_rate and dose_unit go together")
        if self.dose_rate is not None:
            object.__setattr__(self, "dose_rate", _finite("dose_rate", self.dose_rate,
                                                          minimum=0.0))
            _unit("dose_unit", self.dose_unit, "dose_rate")
        if self.basis_seq is not None:
            _whole("basis_seq", self.basis_seq)


@dataclass(frozen=True, kw_only=True)
class Bolus(_Message):
    """Command (protocol 1.1): give *amount* [*unit*, a drug amount] on *pump* once.

    The bolus must start within *lease_s* of its receipt (a pump side that cannot start it
    by then does not give it: it is refused, never queued). Once started it runs to its end
    at the pump's bolus speed, or over *duration_s* when > 0 (an extended bolus), on top of
    the rate in force; a ``stop`` cancels it. ``volume``/``vol_unit`` optionally repeat it
    in volume for the pump side's own check against the drug concentration.
    """

    type = "bolus"
    is_command = True
    cmd_id: str
    pump: str
    amount: float
    unit: str
    lease_s: float
    duration_s: float = 0.0
    volume: float | None = None
    vol_unit: str | None = None
    basis_seq: int | None = None

    def __post_init__(self) -> None:
        _text("cmd_id", self.cmd_id)
        _text("pump", self.pump)
        object.__setattr__(self, "amount", _finite("amount", self.amount, minimum=0.0))
        _unit("unit", self.unit, "amount")
        lease = _finite("lease_s", self.lease_s)
        if lease <= 0:
            raise LocalProtocolError(f"lease_s: expected > 0, got {self.lease_s!r}")
        object.__setattr__(self, "lease_s", lease)
        object.__setattr__(self, "duration_s", _finite("duration_s", self.duration_s,
                                                       minimum=0.0))
        if (self.volume is None) != (self.vol_unit is None):
            raise LocalProtocolError("volume and vol_unit go together")
        if self.volume is not None:
            object.__setattr__(self, "volume", _finite("volume", self.volume, minimum=0.0))
            _unit("vol_unit", self.vol_unit, "volume")
        if self.basis_seq is not None:
            _whole("basis_seq", self.basis_seq)


@dataclass(frozen=True, kw_only=True)
class Stop(_Message):
    """Command: stop *pump* now (always accepted)."""

    type = "stop"
    is_command = True
    cmd_id: str
    pump: str
    reason: str = ""

    def __post_init__(self) -> None:
        _text("cmd_id", self.cmd_id)
        _text("pump", self.pump)
        _string("reason", self.reason)


@dataclass(frozen=True, kw_only=True)
class GetStatus(_Message):
    """Command: ask for a status snapshot of *pump*."""

    type = "get_status"
    is_command = True
    cmd_id: str
    pump: str

    def __post_init__(self) -> None:
        _text("cmd_id", self.cmd_id)
        _text("pump", self.pump)


@dataclass(frozen=True, kw_only=True)
class Ack(_Message):
    """Answer to a command: *ok* with a reason *code*; what was applied."""

    type = "ack"
    added_optional = ("applied_amount", "amount_unit", "bolus_s")
    cmd_id: str
    ok: bool
    code: str
    applied_rate: float | None = None
    unit: str | None = None
    lease_remaining_s: float | None = None
    text: str = ""
    #: a bolus's answer (1.1): the amount the pump gives (after rounding down to its
    #: increment) in *amount_unit*, and how long it takes [s]
    applied_amount: float | None = None
    amount_unit: str | None = None
    bolus_s: float | None = None

    def __post_init__(self) -> None:
        _text("cmd_id", self.cmd_id)
        if not isinstance(self.ok, bool):
            raise LocalProtocolError(f"ok: expected true or false, got {_show(self.ok)}")
        _text("code", self.code, ACK_CODES)
        if (self.applied_rate is None) != (self.unit is None):
            raise LocalProtocolError("applied_rate and unit go together")
        if self.applied_rate is not None:
            object.__setattr__(self, "applied_rate", _finite("applied_rate", self.applied_rate))
            _unit("unit", self.unit, "volume_rate")
        if (self.applied_amount is None) != (self.amount_unit is None):
            raise LocalProtocolError("applied_amount and amount_unit go together")
        if self.applied_amount is not None:
            object.__setattr__(self, "applied_amount", _finite(
                "applied_amount", self.applied_amount, minimum=0.0))
            _unit("amount_unit", self.amount_unit, "amount")
        object.__setattr__(self, "bolus_s", _optional_finite("bolus_s", self.bolus_s,
                                                             minimum=0.0))
        object.__setattr__(self, "lease_remaining_s", _optional_finite(
            "lease_remaining_s", self.lease_remaining_s, minimum=0.0))
        _string("text", self.text)


@dataclass(frozen=True, kw_only=True)
class PumpStatus(_Message):
    """Telemetry: a pump's state, rate and delivered volume."""

    type = "pump_status"
    added_optional = ("bolus_delivered", "bolus_remaining", "amount_unit")
    pump: str
    state: str
    rate: float
    unit: str = "mL/h"
    delivered: float = 0.0
    vol_unit: str = "mL"
    lease_remaining_s: float | None = None
    mode: str = ""
    #: (1.1) boluses: the amount given so far (every bolus, in *amount_unit*) and what is
    #: left of the one running (0 when none)
    bolus_delivered: float | None = None
    bolus_remaining: float | None = None
    amount_unit: str | None = None

    def __post_init__(self) -> None:
        _text("pump", self.pump)
        _text("state", self.state, PUMP_STATES)
        given = (self.bolus_delivered, self.bolus_remaining, self.amount_unit)
        if any(v is None for v in given) and any(v is not None for v in given):
            raise LocalProtocolError("bolus_delivered, bolus_remaining and amount_unit go "
                                     "together")
        if self.amount_unit is not None:
            for name in ("bolus_delivered", "bolus_remaining"):
                object.__setattr__(self, name, _finite(name, getattr(self, name),
                                                       minimum=0.0))
            _unit("amount_unit", self.amount_unit, "amount")
        object.__setattr__(self, "rate", _finite("rate", self.rate, minimum=0.0))
        _unit("unit", self.unit, "volume_rate")
        object.__setattr__(self, "delivered", _finite("delivered", self.delivered, minimum=0.0))
        _unit("vol_unit", self.vol_unit, "volume")
        object.__setattr__(self, "lease_remaining_s", _optional_finite(
            "lease_remaining_s", self.lease_remaining_s, minimum=0.0))
        _string("mode", self.mode)


@dataclass(frozen=True, kw_only=True)
class Alarm(_Message):
    """An alarm with priority and kind (IEC 60601-1-8 / BICEPS terms)."""

    type = "alarm"
    code: str
    priority: str
    kind: str
    active: bool = True
    text: str = ""

    def __post_init__(self) -> None:
        _text("code", self.code)
        _text("priority", self.priority, ("high", "medium", "low"))
        _text("kind", self.kind, ("technical", "physiological"))
        _flag("active", self.active)
        _string("text", self.text)


@dataclass(frozen=True, kw_only=True)
class Heartbeat(_Message):
    """Liveness: the sender's role and state."""

    type = "heartbeat"
    role: str
    state: str = ""
    period_s: float = 1.0

    def __post_init__(self) -> None:
        _text("role", self.role)
        _string("state", self.state)
        object.__setattr__(self, "period_s", _finite("period_s", self.period_s, minimum=0.0))


@dataclass(frozen=True, kw_only=True)
class Hello(_Message):
    """First exchange: role and supported protocol versions."""

    type = "hello"
    role: str
    versions: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        _text("role", self.role)
        if not isinstance(self.versions, (tuple, list)) or not 1 <= len(self.versions) <= 16:
            raise LocalProtocolError(f"versions: expected 1-16 whole numbers, "
                                     f"got {_show(self.versions)}")
        versions = tuple(_whole("versions", v, maximum=2**31 - 1) for v in self.versions)
        object.__setattr__(self, "versions", versions)


def _short(name: str, value: object) -> str:
    """A name that may be empty (at most :data:`MAX_NAME_CHARS` characters)."""
    if not isinstance(value, str):
        raise LocalProtocolError(f"{name}: expected a string, got {_show(value)}")
    if len(value) > MAX_NAME_CHARS:
        raise LocalProtocolError(f"{name}: {len(value)} characters, at most {MAX_NAME_CHARS}")
    return value


def _numbers(name: str, value: object, most: int) -> tuple[float, ...]:
    """A list of at most *most* finite numbers, as a tuple."""
    if not isinstance(value, (list, tuple)):
        raise LocalProtocolError(f"{name}: expected a list of numbers, got {_show(value)}")
    if len(value) > most:
        raise LocalProtocolError(f"{name}: {len(value)} numbers, at most {most}")
    return tuple(_finite(f"{name}[{k}]", v) for k, v in enumerate(value))


@dataclass(frozen=True, kw_only=True)
class PlanInput(_Message):
    """(1.2) One input of a ``plan``: the planned *rates* [*unit*, a dose rate] of model
    input *input*, given by *pump*, one per stage of the plan; *conc* is the drug in that
    pump [the rate unit's amount per mL] (a monitor turns the pump's mL/h into the same
    unit with it), None when unknown."""

    type = "plan_input"
    input: str
    pump: str
    unit: str
    rates: tuple[float, ...]
    conc: float | None = None

    def __post_init__(self) -> None:
        _text("inputs.input", self.input)
        _text("inputs.pump", self.pump)
        _unit("inputs.unit", self.unit, "dose_rate")
        rates = _numbers("inputs.rates", self.rates, MAX_PLAN_STAGES)
        if any(r < 0 for r in rates):
            raise LocalProtocolError(f"inputs.rates: expected rates >= 0, got {min(rates)!r}")
        object.__setattr__(self, "rates", rates)
        if self.conc is not None:
            conc = _finite("inputs.conc", self.conc)
            if not conc > 0:
                raise LocalProtocolError(f"inputs.conc: expected > 0, got {self.conc!r}")
            object.__setattr__(self, "conc", conc)


@dataclass(frozen=True, kw_only=True)
class Plan(_Message):
    """(1.2) Telemetry from a controller, once per decision: what it plans and predicts.

    Stage k runs from ``times_s[k]`` to ``times_s[k + 1]`` [s, the readings' clock]; each
    input's ``rates[k]`` holds over it and ``predicted[k]`` is the output *output* predicted
    at its end (empty for a controller that predicts nothing, e.g. a PID: its plan is the one
    stage it decided). *var* is the measured variable the prediction is compared with;
    *target* and the band [*band_low*, *band_high*] are in *unit*, as is *predicted*. *mode*
    is the supervisor's (``CLOSED_LOOP``, ``FALLBACK``, ...), *status* the decision's
    (``ok``, ``solver_failed``, ...), *solve_s* how long the decision took [s],
    *deadline_misses* the controller process's missed control deadlines so far.
    """

    type = "plan"
    times_s: tuple[float, ...]
    inputs: tuple[PlanInput, ...]
    var: str = ""
    output: str = ""
    unit: str | None = None
    predicted: tuple[float, ...] = ()
    target: float | None = None
    band_low: float | None = None
    band_high: float | None = None
    mode: str = ""
    status: str = ""
    reason: str = ""
    solve_s: float | None = None
    deadline_misses: int | None = None

    def __post_init__(self) -> None:
        times = _numbers("times_s", self.times_s, MAX_PLAN_STAGES + 1)
        if len(times) < 2 or any(b <= a for a, b in zip(times, times[1:])):
            raise LocalProtocolError("times_s: expected 2 or more rising times (the stages' "
                                     "bounds)")
        object.__setattr__(self, "times_s", times)
        stages = len(times) - 1
        inputs = self.inputs
        if not isinstance(inputs, (list, tuple)) or not 1 <= len(inputs) <= MAX_PLAN_INPUTS:
            raise LocalProtocolError(f"inputs: expected 1-{MAX_PLAN_INPUTS} inputs, "
                                     f"got {_show(inputs)}")
        built = []
        for item in inputs:
            if isinstance(item, dict):  # from a frame: unknown fields ignored (telemetry)
                known = PlanInput.field_names()
                item = PlanInput(**{k: v for k, v in item.items() if k in known})
            if not isinstance(item, PlanInput):
                raise LocalProtocolError(f"inputs: expected an input, got {_show(item)}")
            if len(item.rates) != stages:
                raise LocalProtocolError(f"inputs.rates of {item.input!r}: {len(item.rates)} "
                                         f"rates for {stages} stages")
            built.append(item)
        object.__setattr__(self, "inputs", tuple(built))
        _short("var", self.var)
        _short("output", self.output)
        predicted = _numbers("predicted", self.predicted, MAX_PLAN_STAGES)
        if len(predicted) not in (0, stages):
            raise LocalProtocolError(f"predicted: {len(predicted)} values for {stages} stages "
                                     f"(expected one per stage, or none)")
        object.__setattr__(self, "predicted", predicted)
        for name in ("target", "band_low", "band_high"):
            object.__setattr__(self, name, _optional_finite(name, getattr(self, name)))
        if self.unit is not None:
            _unit("unit", self.unit, "measurement")
        elif predicted or any(getattr(self, n) is not None
                              for n in ("target", "band_low", "band_high")):
            raise LocalProtocolError("unit: predicted, target and band need their unit")
        if self.band_low is not None and self.band_high is not None and \
                not self.band_low <= self.band_high:
            raise LocalProtocolError(f"band_low {self.band_low!r} > band_high "
                                     f"{self.band_high!r}")
        _short("mode", self.mode)
        _short("status", self.status)
        _string("reason", self.reason)
        object.__setattr__(self, "solve_s", _optional_finite("solve_s", self.solve_s,
                                                             minimum=0.0))
        if self.deadline_misses is not None:
            _whole("deadline_misses", self.deadline_misses)

    def body(self) -> dict:
        out = super().body()
        out["inputs"] = [item.body() for item in self.inputs]
        return out


@dataclass(frozen=True, kw_only=True)
class AlarmAck(_Message):
    """(1.2) Telemetry: *operator* acknowledged the alarm frame (*alarm_src*, *alarm_epoch*,
    *alarm_seq*) with *code* and *priority* (IEC 60601-1-8: acknowledging silences the
    alarm's signal and says someone has seen it; the condition and its alarm stay until it
    ends - it resets nothing and no receiver changes a dose for it)."""

    type = "alarm_ack"
    alarm_src: str
    alarm_epoch: str
    alarm_seq: int
    code: str
    priority: str
    operator: str
    text: str = ""

    def __post_init__(self) -> None:
        _text("alarm_src", self.alarm_src)
        _text("alarm_epoch", self.alarm_epoch)
        _whole("alarm_seq", self.alarm_seq)
        _text("code", self.code)
        _text("priority", self.priority, ("high", "medium", "low"))
        _text("operator", self.operator)
        _string("text", self.text)


MESSAGE_TYPES: dict[str, type[_Message]] = {
    cls.type: cls for cls in (Measurement, SetRate, Bolus, Stop, GetStatus, Ack, PumpStatus,
                              Alarm, Heartbeat, Hello, Plan, AlarmAck)}
