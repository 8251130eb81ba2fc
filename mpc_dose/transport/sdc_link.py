"""An IEEE 11073 SDC consumer over the ``sdc11073`` package (MIT, Draegerwerk): connect to
one provider, receive its metric reports, read states and invoke SetValue operations.

:class:`SdcLink` owns the ``sdc11073`` consumer: it connects by the provider's address
(``http://host:port/path``) or finds it by its endpoint reference (EPR) with WS-Discovery on
one IPv4 adapter; metric reports arrive on ``sdc11073``'s threads and are queued as plain
:class:`~mpc_dose.protocol.sdc.MetricSample` values for the caller's loop (:meth:`samples`);
everything else is a request made from the caller's thread, bounded by ``socket_timeout_s``.
:class:`SdcPumpDriver` is the pump driver of :class:`~mpc_dose.node.pump_bridge.PumpBridgeNode`
(``set_rate``, ``stop``, ``read``, ``initialise``) on top of it: a rate is a SetValue on the
pump's rate setting, its invocation state is the answer, and the setting's state read back
with a GetMdState is the rate that runs.

What it decides is in :mod:`mpc_dose.protocol.sdc` (sans-I/O); this module only moves data.
``sdc11073`` is imported when a link is made, so importing this module needs nothing beyond
the standard library.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from decimal import Decimal

from ..protocol.messages import wire_factor
from ..protocol.sdc import (MetricSample, Outcome, finite_number, invocation_outcome,
                            rate_unit)

__all__ = ["SdcLink", "SdcLinkError", "SdcRefused", "SdcPumpDriver", "SdcPumpBinding",
           "SdcReading", "require_sdc11073"]


def require_sdc11073():
    """Import ``sdc11073`` or say how to get it."""
    try:
        import sdc11073  # noqa: F401
    except ImportError as err:  # pragma: no cover - the optional extra is missing
        raise ImportError("the SDC bridge needs the sdc11073 package: pip install "
                          "'mpc-dose[sdc]' (or pip install 'sdc11073>=2')") from err
    return sdc11073


class SdcLinkError(RuntimeError):
    """The provider cannot be reached, found or understood (no ``code``: for the pump bridge
    an unreachable pump, whose state is unknown)."""


class SdcRefused(RuntimeError):
    """The provider answered a set operation with a failure; *code* is the ack code
    (``out_of_range`` or ``pump_error``, from
    :func:`~mpc_dose.protocol.sdc.invocation_outcome`)."""

    def __init__(self, text: str, code: str) -> None:
        super().__init__(text)
        self.code = code


def _sample(handle: str, state) -> MetricSample:
    """An ``sdc11073`` numeric metric state -> plain values (nothing here may raise)."""
    value = getattr(state, "MetricValue", None)
    quality = getattr(value, "MetricQuality", None)
    validity = getattr(quality, "Validity", None)
    activation = getattr(state, "ActivationState", None)
    return MetricSample(
        handle=handle,
        value=getattr(value, "Value", None),
        validity=None if validity is None else str(getattr(validity, "value", validity)),
        activation=None if activation is None else str(getattr(activation, "value",
                                                               activation)),
        determination_s=getattr(value, "DeterminationTime", None),
        state_version=getattr(state, "StateVersion", None))


class SdcLink:
    """One SDC provider, by *address* or by *epr* (WS-Discovery on *adapter*).

    Parameters
    ----------
    address : str, optional
        The provider's transport address, ``http://host:port/path`` (what it announces as
        XAddrs; ``hil/sdc_provider.py`` prints it).
    epr : str, optional
        The provider's endpoint reference (``urn:uuid:...``), found by WS-Discovery (UDP
        multicast) on the IPv4 address *adapter*.
    handles : iterable of str
        The metrics whose reports are queued (others are ignored).
    socket_timeout_s : float
        Every request waits at most this long for the provider [s].
    discovery_timeout_s : float
        How long a search for *epr* lasts [s].
    """

    def __init__(self, *, address: str | None = None, epr: str | None = None,
                 adapter: str = "127.0.0.1", handles=(), socket_timeout_s: float = 2.0,
                 discovery_timeout_s: float = 3.0) -> None:
        if (address is None) == (epr is None):
            raise ValueError("give the provider's address or its epr, not both")
        self.address, self.adapter = address, adapter
        self.epr = None if epr is None else (epr if epr.startswith("urn:") else
                                             f"urn:uuid:{epr}")
        self.handles = set(handles)
        self.socket_timeout_s, self.discovery_timeout_s = socket_timeout_s, discovery_timeout_s
        self._samples: queue.SimpleQueue[tuple[float, float, MetricSample]] = \
            queue.SimpleQueue()
        self._consumer = None
        self._mdib = None
        self._discovery = None
        self.connected_to: str | None = None
        self.sequence_id: str | None = None
        self.callback_errors = 0

    # ------------------------------------------------------------------ connection
    @property
    def connected(self) -> bool:
        return self._consumer is not None

    def connect(self) -> dict[str, dict | None]:
        """Connect, subscribe and read the MDIB; returns the descriptors of the metric
        handles (:meth:`describe`). Raises :class:`SdcLinkError`. The link counts as
        connected only once all of it is done, so another thread may call it (the bridge
        does, to keep checking leases meanwhile)."""
        require_sdc11073()
        from sdc11073 import observableproperties
        from sdc11073.consumer.consumerimpl import SdcConsumer
        from sdc11073.definitions_sdc import SdcV1Definitions
        from sdc11073.mdib import ConsumerMdib

        from sdc11073.xml_types.actions import periodic_actions

        self.close()
        address = self.address or self._discover()
        consumer = None
        try:
            consumer = SdcConsumer(address, SdcV1Definitions, None,
                                   socket_timeout=self.socket_timeout_s)
            # episodic reports only: every change arrives once, periodic copies add nothing
            consumer.start_all(not_subscribed_actions=periodic_actions)
            mdib = ConsumerMdib(consumer)
            mdib.init_mdib()
            descriptors = {h: _describe(mdib, h) for h in self.handles}
            observableproperties.bind(mdib, metrics_by_handle=self._on_metrics)
            # what the MDIB holds now counts as reported (a reading determined too long ago
            # is refused as stale downstream)
            now, wall = time.monotonic(), time.time()
            for handle in self.handles:
                entity = mdib.entities.by_handle(handle)
                if entity is not None and entity.state is not None:
                    self._samples.put((now, wall, _sample(handle, entity.state)))
        except Exception as err:  # noqa: BLE001 - anything from the stack: not connected
            if consumer is not None:
                _close_quietly(consumer)
            raise SdcLinkError(f"cannot connect to {address}: {type(err).__name__}: "
                               f"{err}"[:500]) from None
        self.connected_to, self.sequence_id = address, getattr(mdib, "sequence_id", None)
        self._consumer, self._mdib = consumer, mdib
        return descriptors

    def _discover(self) -> str:
        """The address of the provider with our EPR, by WS-Discovery on the adapter."""
        from sdc11073.definitions_sdc import SdcV1Definitions
        from sdc11073.wsdiscovery import WSDiscovery

        try:
            if self._discovery is None:
                self._discovery = WSDiscovery(self.adapter)
                self._discovery.start()
            # forget what was seen before: a restarted provider has a new address
            self._discovery.clear_remote_services()
            deadline = time.monotonic() + self.discovery_timeout_s
            while time.monotonic() < deadline:
                # one probe, then a short wait for its matches (and any Hello)
                for service in self._discovery.search_services(
                        types=SdcV1Definitions.MedicalDeviceTypesFilter, timeout=0.3):
                    if service.epr == self.epr and service.x_addrs:
                        return service.x_addrs[0]
        except Exception as err:  # noqa: BLE001 - e.g. no such adapter, multicast refused
            raise SdcLinkError(f"WS-Discovery on {self.adapter} failed: {type(err).__name__}: "
                               f"{err}"[:500]) from None
        raise SdcLinkError(f"no SDC provider {self.epr} answered WS-Discovery on "
                           f"{self.adapter} within {self.discovery_timeout_s:g} s")

    def healthy(self) -> str | None:
        """Why the link is not healthy (its subscriptions ended), or None."""
        consumer = self._consumer
        if consumer is None:
            return "not connected"
        if not consumer.is_connected:
            return "the provider ended or refused the subscriptions"
        return None

    def close(self) -> None:
        """Drop the consumer (without waiting: its threads end in the background)."""
        consumer, mdib = self._consumer, self._mdib
        self._consumer, self._mdib, self.connected_to = None, None, None
        if mdib is not None:  # no late report of the old connection reaches the queue
            self._unbind(mdib)
        if consumer is not None:
            threading.Thread(target=_close_quietly, args=(consumer,), daemon=True,
                             name="sdc-consumer-close").start()

    def _unbind(self, mdib) -> None:
        from sdc11073 import observableproperties

        try:
            observableproperties.unbind(mdib, metrics_by_handle=self._on_metrics)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def shutdown(self) -> None:
        """Close the link and the discovery (at program end)."""
        if self._mdib is not None:
            self._unbind(self._mdib)
        consumer, self._consumer, self._mdib = self._consumer, None, None
        if consumer is not None:
            _close_quietly(consumer, unsubscribe=True)
        if self._discovery is not None:
            try:
                self._discovery.stop()
            except Exception:  # noqa: BLE001
                pass
            self._discovery = None

    # ------------------------------------------------------------------ data
    def _on_metrics(self, states_by_handle) -> None:
        """Runs on an sdc11073 thread: queue plain samples, never raise into the stack."""
        try:
            now, wall = time.monotonic(), time.time()
            for handle, state in dict(states_by_handle).items():
                if handle in self.handles:
                    self._samples.put((now, wall, _sample(handle, state)))
        except Exception:  # noqa: BLE001 - counted; the caller's staleness check sees it
            self.callback_errors += 1

    def samples(self, limit: int = 1000) -> list[tuple[float, float, MetricSample]]:
        """The queued samples, each with its arrival (monotonic s, UTC s)."""
        out = []
        while len(out) < limit:
            try:
                out.append(self._samples.get_nowait())
            except queue.Empty:
                break
        return out

    def describe(self, handle: str) -> dict | None:
        """A descriptor of the connected MDIB as plain values, or None when absent."""
        mdib = self._mdib
        return None if mdib is None else _describe(mdib, handle)

    def states(self, handles) -> dict[str, MetricSample]:
        """The current states of *handles* read from the provider (GetMdState)."""
        consumer = self._consumer
        if consumer is None:
            raise SdcLinkError("not connected")
        try:
            result = consumer.get_service_client.get_md_state(list(handles)).result
            return {s.DescriptorHandle: _sample(s.DescriptorHandle, s)
                    for s in result.MdState.State}
        except Exception as err:  # noqa: BLE001 - link or parse failure
            raise SdcLinkError(f"GetMdState failed: {type(err).__name__}: {err}"[:500]) \
                from None

    def set_value(self, operation: str, value: Decimal, timeout_s: float) -> Outcome:
        """Invoke the SetValue *operation* with *value* and wait for a final invocation
        state (at most *timeout_s*); its :class:`~mpc_dose.protocol.sdc.Outcome`."""
        consumer = self._consumer
        if consumer is None:
            raise SdcLinkError("not connected")
        try:
            future = consumer.set_service_client.set_numeric_value(operation, value)
            result = future.result(timeout=timeout_s)
        except Exception as err:  # noqa: BLE001 - no final answer: the state is unknown
            raise SdcLinkError(f"SetValue {operation} = {value}: no final answer "
                               f"({type(err).__name__}: {err})"[:500]) from None
        info = result.InvocationInfo
        message = "; ".join(str(getattr(t, "text", t)) for t in
                            (getattr(info, "InvocationErrorMessage", None) or []))
        return invocation_outcome(info.InvocationState, info.InvocationError, message)


def _describe(mdib, handle: str) -> dict | None:
    """A descriptor of *mdib* (an sdc11073 ConsumerMdib) as plain values, or None."""
    entity = mdib.entities.by_handle(handle)
    if entity is None:
        return None
    d = entity.descriptor
    unit = getattr(d, "Unit", None)
    ranges = getattr(d, "TechnicalRange", None) or []
    low = [float(r.Lower) for r in ranges if getattr(r, "Lower", None) is not None]
    high = [float(r.Upper) for r in ranges if getattr(r, "Upper", None) is not None]
    state = entity.state
    return {"kind": d.NODETYPE.localname,
            "unit_code": getattr(unit, "Code", None),
            "technical_range": (min(low) if low else None, max(high) if high else None),
            "operation_target": getattr(d, "OperationTarget", None),
            "effective_timeout_s": getattr(d, "InvocationEffectiveTimeout", None),
            "max_time_to_finish_s": getattr(d, "MaxTimeToFinish", None),
            "operating_mode": None if state is None else
            _text(getattr(state, "OperatingMode", None))}


def _text(value) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


def _close_quietly(consumer, unsubscribe: bool = False) -> None:
    """Stop an sdc11073 consumer; after a lost link, without the unsubscribe requests that
    would wait out their time-outs."""
    try:
        consumer.stop_all(unsubscribe=unsubscribe)
    except Exception:  # noqa: BLE001 - a dead provider: nothing to tell
        pass


@dataclass(frozen=True)
class SdcPumpBinding:
    """A pump as the SDC device shows it: the SetValue *operation* of its rate setting, and
    the metric *delivered* [mL] it reports (optional)."""

    operation: str
    delivered: str | None = None


@dataclass(frozen=True)
class SdcReading:
    """What the device says about a pump (the fields PumpBridgeNode reads)."""

    state: str
    rate_ml_per_h: float
    dispensed_ml: float
    alarm: str | None = None


@dataclass
class _Bound:
    binding: SdcPumpBinding
    target: str = ""                 # the rate setting's handle
    unit: str = "mL/h"               # the setting's unit (the SetValue argument's)
    timeout_s: float = 2.0           # how long to wait for a final invocation state
    watchdog_s: float | None = None  # InvocationEffectiveTimeout: the device's own lease
    last_set: float | None = None    # the rate [mL/h] last set successfully
    last_set_s: float = 0.0          # when (monotonic) - for re-invoking before the timeout


class SdcPumpDriver:
    """Pumps behind one SDC provider, by address = index into *bindings*.

    A rate is set with the pump's SetValue operation (its argument in the setting's own
    unit, converted from mL/h), the final invocation state decides (a failure raises
    :class:`SdcRefused` with the ack code), and the setting's state read back with
    GetMdState is the rate returned. A device whose operation has an
    ``InvocationEffectiveTimeout`` reverts a setting by itself when no invocation renews it:
    that is the pump's watchdog, and :meth:`read` renews a running rate after half of it
    while the bridge is healthy (as the New Era bridge feeds safe mode by polling).
    Without one, *no_device_watchdog* must say so, or :meth:`initialise` refuses the pump.
    """

    def __init__(self, link: SdcLink, bindings, *, operation_timeout_s: float = 2.0,
                 no_device_watchdog: bool = False) -> None:
        self.link = link
        self.pumps = [_Bound(b, timeout_s=operation_timeout_s) for b in bindings]
        self.operation_timeout_s = operation_timeout_s
        self.no_device_watchdog = no_device_watchdog
        #: (kind, fields) for the audit log: every invocation and its answer
        self.events: list[tuple[str, dict]] = []

    def _bound(self, address: int) -> _Bound:
        return self.pumps[address]

    def watchdog_s(self) -> float | None:
        """The shortest device watchdog of the pumps (after :meth:`initialise`)."""
        times = [p.watchdog_s for p in self.pumps if p.watchdog_s is not None]
        return min(times) if times else None

    def initialise(self, address: int, diameter_mm: float | None = None) -> None:
        """Check the pump's operation against the device and leave it stopped (read back)."""
        self._resolve(self._bound(address))
        self.stop(address)
        if self.read(address).rate_ml_per_h != 0:
            raise SdcRefused(f"{self._bound(address).binding.operation}: the device does "
                             f"not read back a stop", "pump_error")

    def _resolve(self, pump: _Bound) -> None:
        """Find the pump's rate setting, its unit and its watchdog in the device's MDIB
        (once; a pump whose start-up failed is resolved when the link is back)."""
        if pump.target:
            return
        op = pump.binding.operation
        if not self.link.connected:
            raise SdcLinkError("the SDC provider is not connected")
        found = self.link.describe(op)
        if found is None:
            raise SdcRefused(f"the device has no operation {op!r}", "pump_error")
        if found["kind"] != "SetValueOperationDescriptor":
            raise SdcRefused(f"operation {op!r} is a {found['kind']}, not a "
                             f"SetValueOperationDescriptor", "pump_error")
        target = self.link.describe(found["operation_target"] or "")
        unit = rate_unit(target.get("unit_code")) if target else None
        if unit is None:
            raise SdcRefused(f"operation {op!r} sets {found['operation_target']!r}, whose "
                             f"unit code {target and target.get('unit_code')!r} is not a "
                             f"volume rate (mL/h, mL/min, uL/h, uL/min)", "pump_error")
        if found.get("max_time_to_finish_s"):
            # the device's own bound, plus the round trip
            pump.timeout_s = float(found["max_time_to_finish_s"]) + self.link.socket_timeout_s
        timeout = found.get("effective_timeout_s")
        pump.watchdog_s = float(timeout) if timeout else None
        if pump.watchdog_s is None and not self.no_device_watchdog:
            raise SdcRefused(f"operation {op!r} has no InvocationEffectiveTimeout (the "
                             f"device would keep a rate forever if this bridge died); set "
                             f"no_device_watchdog = true to run it anyway", "pump_error")
        pump.target, pump.unit = found["operation_target"], unit

    def set_rate(self, address: int, rate_ml_per_h: float) -> float:
        """Set *rate_ml_per_h* and return the rate read back [mL/h]."""
        pump = self._bound(address)
        self._resolve(pump)
        if not (math.isfinite(rate_ml_per_h) and rate_ml_per_h >= 0):
            raise ValueError(f"rate {rate_ml_per_h!r} mL/h is not a finite number >= 0")
        value = rate_ml_per_h * wire_factor("mL/h", pump.unit)
        # fixed-point text: xsd:decimal has no exponent form
        argument = Decimal(f"{value:.6f}")
        outcome = self.link.set_value(pump.binding.operation, argument, pump.timeout_s)
        self.events.append(("sdc_set", {"operation": pump.binding.operation,
                                        "value": str(argument), "unit": pump.unit,
                                        "ok": outcome.ok, "code": outcome.code,
                                        "text": outcome.text[:500]}))
        if not outcome.ok:
            if not outcome.final:
                raise SdcLinkError(f"{pump.binding.operation}: {outcome.text}")
            raise SdcRefused(f"{pump.binding.operation}: {outcome.text}", outcome.code)
        pump.last_set, pump.last_set_s = rate_ml_per_h, time.monotonic()
        return self._read_rate(pump)

    def stop(self, address: int) -> None:
        self.set_rate(address, 0.0)

    def _read_rate(self, pump: _Bound) -> float:
        sample = self.link.states([pump.target]).get(pump.target)
        value = None if sample is None else finite_number(sample.value)
        if value is None:
            raise SdcLinkError(f"{pump.target}: no readable rate "
                               f"({None if sample is None else sample.value!r})")
        return value * wire_factor(pump.unit, "mL/h")

    def read(self, address: int) -> SdcReading:
        """The pump's rate (and delivered volume) as the device reports it; renews a running
        rate before the device's watchdog reverts it."""
        pump = self._bound(address)
        self._resolve(pump)
        handles = [pump.target] + ([pump.binding.delivered] if pump.binding.delivered else [])
        states = self.link.states(handles)
        sample = states.get(pump.target)
        rate = None if sample is None else finite_number(sample.value)
        if rate is None:
            raise SdcLinkError(f"{pump.target}: no readable rate")
        rate *= wire_factor(pump.unit, "mL/h")
        delivered = states.get(pump.binding.delivered) if pump.binding.delivered else None
        dispensed = finite_number(delivered.value) if delivered is not None else None
        if (pump.watchdog_s is not None and pump.last_set and rate > 0
                and math.isclose(rate, pump.last_set, rel_tol=0.01, abs_tol=1e-3)
                and time.monotonic() - pump.last_set_s >= pump.watchdog_s / 2):
            # renew the invocation while healthy: only a dead bridge lets it lapse
            rate = self.set_rate(address, pump.last_set)
        return SdcReading(state="infusing" if rate > 0 else "stopped", rate_ml_per_h=rate,
                          dispensed_ml=dispensed if dispensed is not None else 0.0)

    def take_events(self) -> list[tuple[str, dict]]:
        events, self.events = self.events, []
        return events

