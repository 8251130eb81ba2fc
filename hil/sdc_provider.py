"""An IEEE 11073 SDC provider on one IPv4 adapter (loopback by default), made with the
``sdc11073`` package, so the SDC bridge is tested without a device: a BIS monitor (BIS, SQI,
MAP, glucose) and one syringe pump whose rate is a setting metric with a SetValue operation
(``hil/sdc_mdib.xml``), with fault knobs.

    python -m hil.sdc_provider                      # prints its address and EPR
    python -m hil.sdc_provider --fault questionable@20+10 --fault drop@40+5

Each ``--period`` the monitor publishes new readings (a toy response of BIS to the propofol
rate: no patient model, only something that moves) and the pump integrates its delivered
volume. The SetValue on ``op.propofol.rate`` sets the rate (0-1200 mL/h, else ``Fail`` with
``InvocationError`` ``Inv``); its ``InvocationEffectiveTimeout`` (5 s in the MDIB, the
pump's watchdog) stops the pump when no invocation renews it.

Fault knobs (attributes and methods of :class:`BenchProvider`, changeable while it runs;
``--fault NAME@START[+DURATION]`` on the command line, seconds from the start):

- ``validity`` (``invalid``/``questionable`` on the command line): the monitor's metrics
  carry this ``MetricQuality/@Validity`` (Inv, Qst, ...);
- ``frozen`` (``stale``): no new readings (the metrics' states stop changing);
- :meth:`stop` / :meth:`start` (``drop``): the provider goes away (its HTTP server and
  subscriptions end, a WS-Discovery Bye) and comes back with the same EPR and a new port;
- :meth:`forget_subscribers`: reports stop without notice while requests still work;
- ``refuse`` (``refuse``): every SetValue fails with this ``(InvocationError, text)``;
  ``Inv`` says the value is invalid, ``Oth`` anything else;
- :meth:`publish` with any value (``garbage``: out of range, a 400-digit number, and a NaN
  that the bridge's schema check refuses - the provider does not validate what it sends,
  as a faulty device would not).

sdc11073's operation handlers report every failure as ``Oth``; to answer ``Inv`` the
provider rewrites the failure it reports (see :meth:`BenchProvider._report`).
"""

from __future__ import annotations

import argparse
import http.client
import math
import random
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path

try:
    from sdc11073.location import SdcLocation
except ImportError as err:  # pragma: no cover - the optional extra is missing
    raise ImportError("hil/sdc_provider.py needs the sdc11073 package: pip install "
                      "'mpc-dose[sdc]'") from err
from sdc11073.mdib import ProviderMdib
from sdc11073.provider import SdcProvider
from sdc11073.provider.baseproduct import BaseProduct
from sdc11073.provider.operations import ExecuteResult
from sdc11073.provider.providerimpl import (RoleProviderComponents,
                                           provider_components_sync_factory)
from sdc11073.wsdiscovery import WSDiscovery
from sdc11073.xml_types.dpws_types import ThisDeviceType, ThisModelType
from sdc11073.xml_types.msg_types import InvocationError, InvocationState
from sdc11073.xml_types.pm_types import ComponentActivation, MeasurementValidity

MDIB = Path(__file__).with_name("sdc_mdib.xml")
MONITOR = ("bis", "sqi", "map", "glucose")
RATE, DELIVERED, OPERATION = "propofol.rate", "propofol.delivered", "op.propofol.rate"
MAX_RATE_ML_PER_H = 1200.0

__all__ = ["BenchProvider", "MDIB", "MONITOR", "RATE", "DELIVERED", "OPERATION"]


class BenchProvider:
    """The provider; :attr:`address` and :attr:`epr` say where it is once started.

    Parameters
    ----------
    adapter : str
        IPv4 address to serve and announce on.
    epr : str, optional
        Its endpoint reference (``urn:uuid:...``); a new one by default.
    watchdog_s : float, optional
        The pump's watchdog (the SetValue's ``InvocationEffectiveTimeout``) instead of the
        MDIB's 5 s [s]; sdc11073 checks it about once a second.
    """

    def __init__(self, *, adapter: str = "127.0.0.1", epr: str | None = None,
                 mdib_path: str | Path = MDIB, watchdog_s: float | None = None) -> None:
        self.adapter, self.mdib_path = adapter, Path(mdib_path)
        self.epr = epr or uuid.uuid4().urn
        self.watchdog_s = watchdog_s
        self.validity = "Vld"
        self.frozen = False
        #: metric reports a gone subscriber did not take (its send raised)
        self.dropped_sends = 0
        #: (InvocationError, text) to refuse SetValue with; refuse_calls: how many more
        #: calls to refuse (None: all, until refuse is cleared)
        self.refuse: tuple[str, str] | None = None
        self.refuse_calls: int | None = None
        self.set_calls: list[Decimal] = []
        self.watchdog_stops = 0
        self._pending: tuple[str, str] | None = None
        self._discovery = None
        self._provider = None
        self.mdib = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ life
    @property
    def running(self) -> bool:
        return self._provider is not None

    @property
    def address(self) -> str:
        return self._provider.get_xaddrs()[0]

    def start(self) -> BenchProvider:
        """Start (again, after :meth:`stop`: same EPR, new MDIB and port)."""
        if self._discovery is None:
            self._discovery = WSDiscovery(self.adapter)
            self._discovery.start()
        self.mdib = ProviderMdib.from_mdib_file(str(self.mdib_path))
        if self.watchdog_s is not None:
            with self.mdib.descriptor_transaction() as tr:
                entity = self.mdib.entities.by_handle(OPERATION)
                entity.descriptor.InvocationEffectiveTimeout = self.watchdog_s
                tr.write_entity(entity)
        model = ThisModelType(manufacturer="mpc_dose", manufacturer_url="https://example.org",
                              model_name="sdc bench provider", model_number="1",
                              model_url="https://example.org",
                              presentation_url="https://example.org")
        device = ThisDeviceType(friendly_name="mpc_dose SDC bench", firmware_version="1",
                                serial_number="0001")
        # validate=False: the provider sends what it is told, as a faulty device would.
        # The synchronous subscription manager: sdc11073 3.0.0's default asynchronous one
        # can deadlock when a subscription is closed while a report is being sent (its
        # housekeeping thread holds the SOAP-client pool's lock and waits for the event
        # loop, which waits for that lock), so the provider hangs in stop_all.
        self._provider = SdcProvider(self._discovery, model, device, self.mdib,
                                     epr=uuid.UUID(self.epr.removeprefix("urn:uuid:")),
                                     validate=False,
                                     components=provider_components_sync_factory(),
                                     role_provider_components=RoleProviderComponents(
                                         role_provider_class=_product_class(self)))
        self._provider.start_all(start_rtsample_loop=False)
        set_service = self._provider.hosted_services.set_service
        original = set_service.notify_operation

        def report(*args, **kwargs):
            return self._report(original, *args, **kwargs)

        set_service.notify_operation = report
        self._provider.set_location(SdcLocation(fac="LAB", poc="BENCH", bed="1"))
        self.epr = self._provider.epr_urn
        self.publish_all()
        self.publish(RATE, 0, validity="Vld")
        self.publish(DELIVERED, 0, validity="Vld")
        return self

    def stop(self) -> None:
        """The provider goes away (the dropped link): its subscriptions end."""
        provider, self._provider = self._provider, None
        if provider is not None:
            provider.stop_all()

    def forget_subscribers(self) -> None:
        """Drop every subscription without a SubscriptionEnd (a provider that lost its
        subscription table, e.g. after a restart of its software behind the same address):
        reports stop, requests still work. Uses sdc11073's subscription managers from the
        inside (there is no public call for it)."""
        for manager in self._provider._subscriptions_managers.values():
            manager._end_all_subscriptions(False)

    def close(self) -> None:
        self.stop()
        if self._discovery is not None:
            self._discovery.stop()
            self._discovery = None

    # ------------------------------------------------------------------ metrics
    def publish(self, handle: str, value, *, validity: str | None = None,
                activation: str | None = None, determination_s: float | None = None) -> None:
        """Write one metric state: *value* as given (a number, a Decimal, None, or any
        garbage), *validity* (default :attr:`validity`), *activation*, *determination_s*
        (default now; seconds since 1970 UTC)."""
        # sdc11073 stamps DeterminationTime itself unless told not to; the state is written
        # when the transaction ends, then the reports go out: a subscriber that has gone
        # (a bridge closed without unsubscribing) makes the synchronous send raise, which is
        # the subscriber's loss, not the device's - the state stands and the device goes on
        try:
            self._write(handle, value, validity, activation, determination_s)
        except (ConnectionError, OSError, http.client.HTTPException):
            self.dropped_sends += 1

    def _write(self, handle, value, validity, activation, determination_s) -> None:
        with self._lock, self.mdib.metric_state_transaction(
                set_determination_time=determination_s is None) as tr:
            state = tr.get_state(handle)
            if state.MetricValue is None:
                state.mk_metric_value()
            state.MetricValue.Value = value if value is None or isinstance(value, Decimal) \
                else Decimal(str(value))
            state.MetricValue.MetricQuality.Validity = MeasurementValidity(
                validity or self.validity)
            if determination_s is not None:
                state.MetricValue.DeterminationTime = determination_s
            if activation is not None:
                state.ActivationState = ComponentActivation(activation)

    def publish_all(self, values: dict | None = None) -> None:
        """New readings of every monitor metric (unless :attr:`frozen`)."""
        if self.frozen:
            return
        values = values or {"bis": 45, "sqi": 90, "map": 80, "glucose": 110}
        for handle, value in values.items():
            self.publish(handle, value)

    def rate(self) -> float:
        """The pump's rate as the device holds it [mL/h]."""
        value = self.mdib.entities.by_handle(RATE).state.MetricValue
        return float(value.Value) if value is not None and value.Value is not None else 0.0

    def _set_rate(self, value: Decimal) -> None:
        with self._lock, self.mdib.metric_state_transaction() as tr:
            state = tr.get_state(RATE)
            state.MetricValue.Value = value
            state.MetricValue.MetricQuality.Validity = MeasurementValidity.VALID
            state.MetricValue.DeterminationTime = time.time()

    # ------------------------------------------------------------------ operations
    def _on_set_rate(self, params):
        value = params.operation_request.argument
        self.set_calls.append(value)
        problem = self.refuse
        if problem is not None and self.refuse_calls is not None:
            self.refuse_calls -= 1
            if self.refuse_calls <= 0:
                self.refuse, self.refuse_calls = None, None
        if problem is None and not (value is not None and value.is_finite()
                                    and 0 <= value <= MAX_RATE_ML_PER_H):
            problem = ("Inv", f"rate {value} mL/h outside 0-{MAX_RATE_ML_PER_H:g}")
        if problem is not None:
            self._pending = problem
            return ExecuteResult(InvocationState.FAILED, self.mdib.mdib_version_group)
        self._set_rate(value)
        return ExecuteResult(InvocationState.FINISHED, self.mdib.mdib_version_group, RATE)

    def _on_timeout(self, operation) -> None:
        """InvocationEffectiveTimeout passed without a renewing invocation: stop."""
        if self.rate() > 0:
            self.watchdog_stops += 1
            self._set_rate(Decimal(0))

    def _report(self, original, operation, transaction_id, invocation_state,
                mdib_version_group, operation_target=None, error=None, error_message=None):
        """Send an OperationInvokedReport, with the refusal's error and text on a Fail."""
        pending = self._pending if str(getattr(invocation_state, "value", "")) == "Fail" \
            else None
        if pending is not None and error is None:
            self._pending = None
            error, error_message = InvocationError(pending[0]), pending[1]
        return original(operation, transaction_id, invocation_state, mdib_version_group,
                        operation_target, error, error_message)

    # ------------------------------------------------------------------ the demo
    def step(self, dt_s: float, rng: random.Random, state: dict) -> None:
        """One period of the demo: the pump's volume, a toy BIS response, new readings."""
        rate = self.rate()
        state["delivered"] = state.get("delivered", 0.0) + rate * dt_s / 3600.0
        self.publish(DELIVERED, round(state["delivered"], 4), validity="Vld")
        target = 97.0 - 55.0 * rate / (rate + 150.0)    # a toy: no patient model
        state["bis"] = state.get("bis", 95.0) + (target - state.get("bis", 95.0)) * \
            (1 - math.exp(-dt_s / 60.0))
        self.publish_all({"bis": round(state["bis"] + rng.gauss(0, 1.5), 1),
                          "sqi": round(min(100.0, 88 + rng.gauss(0, 2)), 0),
                          "map": round(85 - 10 * rate / (rate + 300) + rng.gauss(0, 1), 0),
                          "glucose": round(110 + rng.gauss(0, 2), 0)})


class _RateRole:
    """The role provider that handles the pump's SetValue operation."""

    def __init__(self, bench: BenchProvider) -> None:
        self.bench = bench

    def stop(self) -> None:
        pass

    def init_operations(self, sco) -> None:
        pass

    def make_operation_instance(self, descriptor, operation_cls_getter):
        if descriptor.Handle != OPERATION:
            return None
        cls = operation_cls_getter(descriptor.NODETYPE)
        return cls(descriptor.Handle, descriptor.OperationTarget,
                   operation_handler=self.bench._on_set_rate,
                   timeout_handler=self.bench._on_timeout, coded_value=descriptor.Type)

    def make_missing_operations(self, sco) -> list:
        return []

    def on_pre_commit(self, mdib, transaction) -> None:
        pass

    def on_post_commit(self, mdib, transaction) -> None:
        pass


def _product_class(bench: BenchProvider):
    """A product (sdc11073's operation handlers of one SCO) with the rate role of *bench*."""
    class Product(BaseProduct):
        def __init__(self, mdib, sco, log_prefix=None):
            super().__init__(mdib, sco, log_prefix)
            self._ordered_role_providers.append(_RateRole(bench))

    return Product


_FAULTS = ("invalid", "questionable", "stale", "drop", "refuse", "garbage")


def _parse_fault(text: str) -> tuple[str, float, float]:
    name, _, when = text.partition("@")
    start, _, duration = when.partition("+")
    if name not in _FAULTS or not start:
        raise argparse.ArgumentTypeError(f"--fault {text!r}: expected NAME@START[+DURATION] "
                                         f"with NAME one of {', '.join(_FAULTS)}")
    return name, float(start), float(duration or "inf")


def main() -> None:
    parser = argparse.ArgumentParser(description="an SDC provider (BIS monitor + syringe pump)"
                                                 " with fault knobs")
    parser.add_argument("--adapter", default="127.0.0.1", help="IPv4 address to serve on")
    parser.add_argument("--epr", default=None, help="endpoint reference (urn:uuid:...)")
    parser.add_argument("--period", type=float, default=1.0, help="readings every [s]")
    parser.add_argument("--fault", action="append", type=_parse_fault, default=[],
                        metavar="NAME@START[+DURATION]",
                        help=f"{', '.join(_FAULTS)}; seconds from the start")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    bench = BenchProvider(adapter=args.adapter, epr=args.epr).start()
    print(f"address {bench.address}\nepr {bench.epr}", flush=True)
    rng, state, start = random.Random(args.seed), {}, time.monotonic()
    try:
        while True:
            time.sleep(args.period)
            t = time.monotonic() - start
            active = {name for name, t0, span in args.fault if t0 <= t < t0 + span}
            bench.validity = "Inv" if "invalid" in active else \
                "Qst" if "questionable" in active else "Vld"
            bench.frozen = "stale" in active
            bench.refuse = ("Oth", "refused by the bench's fault knob") \
                if "refuse" in active else None
            if "drop" in active and bench.running:
                bench.stop()
                print(f"{t:.0f} s: dropped", flush=True)
            elif "drop" not in active and not bench.running:
                bench.start()
                print(f"{t:.0f} s: back at {bench.address}", flush=True)
            if not bench.running:
                continue
            if "garbage" in active:
                bench.publish("bis", rng.choice([250, -5, Decimal("1" + "0" * 400)]))
            else:
                bench.step(args.period, rng, state)
    except KeyboardInterrupt:
        pass
    finally:
        bench.close()


if __name__ == "__main__":
    main()
