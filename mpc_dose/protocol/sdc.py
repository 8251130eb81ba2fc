"""IEEE 11073 SDC (BICEPS) metrics and set operations -> the wire protocol's terms, sans-I/O.

What an SDC provider reports is turned into plain values by the transport
(:mod:`mpc_dose.transport.sdc_link`, which uses the ``sdc11073`` package); this module decides,
without any I/O, what they mean here:

- a numeric metric's state (value, ``MetricQuality/@Validity``, ``ActivationState``,
  ``DeterminationTime``) -> a :class:`~mpc_dose.protocol.messages.Measurement`, or the reason it
  is refused (:func:`to_measurement`);
- a metric's or a rate setting's descriptor (its ``pm:Unit/@Code``) -> whether it is the unit
  the configuration says (:func:`unit_problem`, :func:`rate_unit`);
- a set operation's ``InvocationState`` and ``InvocationError`` -> the ack of the command that
  asked for it (:func:`invocation_outcome`).

Sources (public documents):

- IEEE 11073-10207-2017 (BICEPS) participant and message models, the XML schemas as shipped
  in the MIT-licensed ``sdc11073`` package (``sdc11073/xsd/BICEPS_ParticipantModel.xsd``,
  ``BICEPS_MessageModel.xsd``): ``MeasurementValidity`` (Vld, Vldated, Ong, Qst, Calib, Inv,
  Oflw, Uflw, NA, with the text quoted in :data:`VALIDITY_QUALITY`), ``ComponentActivation``
  (On, NotRdy, StndBy, Off, Shtdn, Fail), ``Timestamp`` (R5001: milliseconds since 1970-01-01
  UTC; the transport hands seconds), ``InvocationState`` (Wait, Start, Cnclld, CnclldMan, Fin,
  FinMod, Fail) and ``InvocationError`` (Unspec, Unkn, Inv, Oth).
- IEEE 11073-10101 nomenclature, dimensions partition (4): a context-free unit code is
  ``4 << 16 | code``. The codes in :data:`MDC_UNIT_CODES` are the ones seen identically in
  public sources (sdc11073's own test MDIBs: 262656 dimensionless, 266016 mmHg, 265266
  ``MDC_DIM_MILLI_L_PER_HR``, 265234 ``MDC_DIM_MILLI_L_PER_MIN``, 265235
  ``MDC_DIM_MICRO_L_PER_MIN``; the IHE PCD-01 glucose example: 264274
  ``MDC_DIM_MILLI_G_PER_DL``; open-source 11073-20601 agents: 544 %, 3843 kPa, 3872 mmHg,
  4722 mmol/L, 2112 g/dL). **Assumed** (not seen spelled out, derived from the 10101 prefix
  rule micro = +19 on the ``_X_`` base code, as mL/h is milli = +18 on 3104): ``uL/h``
  265267. Units without a code here (ug/mL, ng/mL, mg/L, ...) need the code given
  explicitly in the bridge's configuration (``mdc_unit_code``): never guessed.

Choices where BICEPS leaves it to the consumer:

- ``Ong`` ("a new measurement is just being taken and therefore measured value is not
  available") -> ``unavailable``, not ``calibrating``: the schema says the value is not
  available; ``Calib`` is the calibration. The controller's supervisor gates both alike.
- A metric whose ``ActivationState`` is not ``On`` is not measuring: ``Fail`` -> ``invalid``,
  any other -> ``unavailable`` (the worse of this and the validity wins).
- A finite value outside the metric's plausible range (the configuration's, else the
  descriptor's ``TechnicalRange``) is published flagged ``invalid`` with the device's number:
  the supervisor's rules apply, nothing is made up. A value that is missing, not a number or
  beyond a float (a 400-digit ``xsd:decimal`` is schema-valid) is refused: no measurement.
- Without ``DeterminationTime`` (optional in BICEPS) the reading is stamped on arrival.

Standard library only: no sockets, no threads, no clocks (times are arguments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from .messages import WIRE_UNITS, LocalProtocolError, Measurement

__all__ = ["VALIDITY_QUALITY", "ACTIVATION_QUALITY", "MDC_UNIT_CODES", "RATE_UNIT_CODES",
           "MetricSample", "MetricMapping", "Refused", "to_measurement", "unit_problem",
           "rate_unit", "invocation_outcome", "Outcome", "quality_of", "finite_number",
           "FINAL_OK", "NOT_FINAL"]

#: BICEPS MeasurementValidity -> the protocol's reading quality (docs/protocol.md section 3).
#: Vld "correct from the perspective of the measuring device"; Vldated "validity confirmed
#: by an external actor"; Ong "measured value is not available" (a measurement is being
#: taken); Qst "correctness can not be guaranteed"; Calib "calibration is currently going
#: on"; Inv "incorrect from the perspective of the measuring device"; Oflw / Uflw "above /
#: below all defined technical ranges"; NA "no value can be derived".
VALIDITY_QUALITY: dict[str, str] = {
    "Vld": "valid", "Vldated": "valid", "Ong": "unavailable", "Qst": "questionable",
    "Calib": "calibrating", "Inv": "invalid", "Oflw": "overflow", "Uflw": "underflow",
    "NA": "unavailable",
}

#: BICEPS ComponentActivation of a metric's state -> the quality it forces (On forces none)
ACTIVATION_QUALITY: dict[str, str | None] = {
    "On": None, "NotRdy": "unavailable", "StndBy": "unavailable", "Off": "unavailable",
    "Shtdn": "unavailable", "Fail": "invalid",
}

# how bad each quality is, to keep the worse of validity and activation
_SEVERITY = {"valid": 0, "questionable": 1, "overflow": 1, "underflow": 1, "calibrating": 2,
             "unavailable": 3, "invalid": 4}

_DIM = 4 << 16  # IEEE 11073-10101 partition 4 (dimensions)

#: wire unit (measurement or volume rate) -> IEEE 11073-10101 context-free unit code
MDC_UNIT_CODES: dict[str, int] = {
    "1": _DIM | 512,          # MDC_DIM_DIMLESS
    "%": _DIM | 544,          # MDC_DIM_PERCENT
    "mmHg": _DIM | 3872,      # MDC_DIM_MMHG
    "kPa": _DIM | 3843,       # MDC_DIM_KILO_PASCAL
    "mg/dL": _DIM | 2130,     # MDC_DIM_MILLI_G_PER_DL
    "mmol/L": _DIM | 4722,    # MDC_DIM_MILLI_MOLE_PER_L
    "mL/h": _DIM | 3122,      # MDC_DIM_MILLI_L_PER_HR
    "mL/min": _DIM | 3090,    # MDC_DIM_MILLI_L_PER_MIN
    "uL/h": _DIM | 3123,      # MDC_DIM_MICRO_L_PER_HR (assumed, see the module docstring)
    "uL/min": _DIM | 3091,    # MDC_DIM_MICRO_L_PER_MIN
}

#: volume-rate unit code -> wire unit, for a pump's rate setting
RATE_UNIT_CODES: dict[int, str] = {MDC_UNIT_CODES[u]: u for u in WIRE_UNITS["volume_rate"]}

#: invocation states that end an operation successfully / that are not final yet
FINAL_OK = ("Fin", "FinMod")
NOT_FINAL = ("Wait", "Start")


@dataclass(frozen=True)
class MetricSample:
    """One numeric metric state as the provider reported it, in plain values.

    *value* is whatever arrived (a ``Decimal``, a string, None...); *validity* and
    *activation* the BICEPS enumeration strings (or None when absent); *determination_s*
    the ``DeterminationTime`` in seconds since 1970 UTC (None when absent); *state_version*
    the state's ``StateVersion``.
    """

    handle: str
    value: object
    validity: str | None
    activation: str | None = "On"
    determination_s: float | None = None
    state_version: int | None = None


@dataclass(frozen=True)
class MetricMapping:
    """A metric *handle* published as *var* in *unit* (a measurement unit of the protocol).

    *low*/*high* bound the plausible values (None: unbounded); *mdc_unit_code* is the
    ``pm:Unit/@Code`` the descriptor must carry (default: the code of *unit* in
    :data:`MDC_UNIT_CODES`); *sensor* names the source in each measurement.
    """

    handle: str
    var: str
    unit: str
    sensor: str = "sdc"
    low: float | None = None
    high: float | None = None
    mdc_unit_code: int | None = None

    def __post_init__(self) -> None:
        where = f"metric {self.handle!r}"
        if self.unit not in WIRE_UNITS["measurement"]:
            raise ValueError(f"{where}: unit {self.unit!r} is not a measurement unit of the "
                             f"protocol ({', '.join(WIRE_UNITS['measurement'])})")
        if self.expected_code is None:
            raise ValueError(f"{where}: unit {self.unit!r} has no IEEE 11073-10101 code in "
                             f"mpc_dose's table; give mdc_unit_code (the descriptor's "
                             f"pm:Unit/@Code) explicitly")
        for name in ("low", "high"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"{where}: low {self.low!r} must be below high {self.high!r}")

    @property
    def expected_code(self) -> int | None:
        return self.mdc_unit_code if self.mdc_unit_code is not None else \
            MDC_UNIT_CODES.get(self.unit)


@dataclass(frozen=True)
class Refused:
    """Why a sample gives no measurement: *code* (``no_value``, ``not_a_number``,
    ``stale``, ``future``, ``repeat``) and a text naming the value."""

    code: str
    text: str


def quality_of(validity: str | None, activation: str | None) -> str:
    """The protocol quality of a metric state: its validity mapped, made worse by an
    activation other than ``On``. An absent or unknown validity is ``invalid`` (BICEPS
    requires one)."""
    quality = VALIDITY_QUALITY.get(validity, "invalid") if validity is not None else "invalid"
    forced = ACTIVATION_QUALITY.get(activation, "invalid") if activation is not None else None
    if forced is not None and _SEVERITY[forced] > _SEVERITY[quality]:
        return forced
    return quality


def finite_number(value: object) -> float | None:
    """*value* as a finite float, or None (missing, text, NaN, infinite, beyond a float)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(Decimal(str(value)))
    except (InvalidOperation, ValueError, OverflowError, TypeError):
        return None
    return number if math.isfinite(number) else None


def to_measurement(sample: MetricSample, mapping: MetricMapping, *, arrival_s: float,
                   max_age_s: float, max_future_s: float,
                   last_determination_s: float | None = None,
                   technical_range: tuple[float | None, float | None] = (None, None)
                   ) -> Measurement | Refused:
    """The measurement *sample* gives under *mapping*, or why it gives none.

    Parameters
    ----------
    arrival_s : float
        When it arrived [s, UTC]; the stamp when the sample has no ``DeterminationTime``.
    max_age_s, max_future_s : float
        A determination time more than this before / after the arrival is ``stale`` /
        ``future`` [s].
    last_determination_s : float, optional
        The determination time of the last measurement published for this metric: a sample
        not newer is a ``repeat`` (a re-sent report must not look like a new reading).
    technical_range : (low, high)
        The descriptor's ``TechnicalRange``, used where *mapping* sets no bound.
    """
    shown = str(sample.value)[:40]
    if sample.value is None:
        return Refused("no_value", f"{sample.handle}: no value (validity {sample.validity})")
    value = finite_number(sample.value)
    if value is None:
        return Refused("not_a_number", f"{sample.handle}: value {shown!r} is not a finite "
                                       f"number")
    t_meas = sample.determination_s if sample.determination_s is not None else arrival_s
    if not (isinstance(t_meas, (int, float)) and math.isfinite(t_meas)):
        return Refused("not_a_number", f"{sample.handle}: determination time {t_meas!r}")
    if not t_meas >= arrival_s - max_age_s:
        return Refused("stale", f"{sample.handle}: determined {arrival_s - t_meas:.1f} s "
                                f"before it arrived (more than {max_age_s:g} s)")
    if not t_meas <= arrival_s + max_future_s:
        return Refused("future", f"{sample.handle}: determined {t_meas - arrival_s:.1f} s "
                                 f"after it arrived (clocks apart by more than "
                                 f"{max_future_s:g} s)")
    if last_determination_s is not None and not t_meas > last_determination_s:
        return Refused("repeat", f"{sample.handle}: determination time {t_meas:.3f} not newer "
                                 f"than the last published")
    quality = quality_of(sample.validity, sample.activation)
    low = mapping.low if mapping.low is not None else technical_range[0]
    high = mapping.high if mapping.high is not None else technical_range[1]
    if (low is not None and not value >= low) or (high is not None and not value <= high):
        quality = "invalid"  # the device's number, flagged: the supervisor gates it
    try:
        return Measurement(var=mapping.var, value=value, unit=mapping.unit, t_meas=t_meas,
                           quality=quality, sensor=f"{mapping.sensor}/{sample.handle}"[:2000])
    except LocalProtocolError as err:  # e.g. a handle or var beyond the protocol's limits
        return Refused("not_a_number", f"{sample.handle}: {err}")


def unit_problem(mapping: MetricMapping, unit_code: object) -> str | None:
    """Why a metric descriptor whose ``pm:Unit/@Code`` is *unit_code* cannot be published
    as *mapping* says, or None."""
    expected = mapping.expected_code
    try:
        code = int(str(unit_code))
    except ValueError:
        code = None
    if code != expected:
        return (f"metric {mapping.handle!r}: the device's unit code is {unit_code!r}, the "
                f"configured unit {mapping.unit!r} is code {expected}; fix the metric's unit "
                f"(or mdc_unit_code) in the bridge's configuration")
    return None


def rate_unit(unit_code: object) -> str | None:
    """The wire volume-rate unit of a rate setting whose unit code is *unit_code*, or None
    when it is not a volume rate mpc_dose knows."""
    try:
        return RATE_UNIT_CODES.get(int(str(unit_code)))
    except ValueError:
        return None


@dataclass(frozen=True)
class Outcome:
    """What a set operation's invocation means for the command that asked for it.

    *final*: the invocation state is final (not ``Wait``/``Start``); *ok*: it succeeded
    (``Fin``, or ``FinMod``: the device chose the next best value, which the read-back
    shows); *code*: the ack code of a failure (``out_of_range`` when the device called the
    value invalid, else ``pump_error``); *text*: what the device said.
    """

    final: bool
    ok: bool
    code: str | None
    text: str


def invocation_outcome(state: object, error: object = None, message: str = "") -> Outcome:
    """The outcome of an invocation in *state* (``InvocationState``) with *error*
    (``InvocationError``) and the device's *message* (``InvocationErrorMessage``).

    A ``Fail`` with error ``Inv`` ("the value is invalid") is ``out_of_range``: the device
    refused the value and keeps what it ran (as a New Era ``?OOR``). Every other failure
    (``Fail`` of another kind, ``Cnclld``, ``CnclldMan``) and any state this module does not
    know is ``pump_error``."""
    state_text, error_text = _enum_text(state), _enum_text(error)
    said = f"SDC invocation {state_text}" + (f" ({error_text})" if error_text else "") + \
        (f": {message}" if message else "")
    if state_text in NOT_FINAL:
        return Outcome(False, False, None, said)
    if state_text in FINAL_OK:
        return Outcome(True, True, None, said)
    code = "out_of_range" if state_text == "Fail" and error_text == "Inv" else "pump_error"
    return Outcome(True, False, code, said)


def _enum_text(value: object) -> str:
    """An sdc11073 ``StringEnum`` or a plain string -> its BICEPS text ('' for None)."""
    if value is None:
        return ""
    text = getattr(value, "value", value)
    return str(text)[:40]
