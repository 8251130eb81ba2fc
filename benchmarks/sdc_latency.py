"""Latencies of the SDC bridge on loopback (issue 19): the bench provider
(``hil/sdc_provider.py``) and ``mpc-dose serve sdc-bridge``'s process in one Python process.

    python benchmarks/sdc_latency.py [--repeats 50]

Prints, median and 95th percentile:

* ``connect``: a bridge's start until its pump is READY (subscribe, GetMdib, the pump's
  stop read back);
* ``set_rate``: a leased ``set_rate`` sent until its ``ack`` (checks, SetValue, the final
  OperationInvokedReport, the GetMdState read-back);
* ``metric``: a metric state written on the provider until its ``measurement`` arrives on
  the bridge's telemetry.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import zmq  # noqa: E402

from hil.sdc_provider import BenchProvider  # noqa: E402
from mpc_dose.protocol.messages import Fallback, Measurement, PumpStatus, SetRate  # noqa: E402
from mpc_dose.serve.sdc_bridge import SdcBridgeProcess, load_sdc_bridge_config  # noqa: E402
from mpc_dose.transport.zmq_link import CommandClient, TelemetryReader  # noqa: E402
from tests.ports import free_addresses  # noqa: E402


def _quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"median {statistics.median(ordered) * 1e3:7.1f} ms   p95 {p95 * 1e3:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    bench = BenchProvider().start()
    telemetry, commands = free_addresses(2)
    config = load_sdc_bridge_config({
        "bridge": {"address": bench.address, "telemetry": telemetry, "commands": commands,
                   "poll_s": 0.25, "stale_s": 60.0},
        "metric": [{"handle": "bis", "var": "bis", "unit": "1"}],
        "pump": [{"pump": "propofol", "operation": "op.propofol.rate", "concentration": 10.0,
                  "amount_unit": "mg", "max_rate_ml_per_h": 1200}]})
    context = zmq.Context()
    reader = TelemetryReader(context, [telemetry])
    client = CommandClient(context, commands, src="bench")
    start = time.perf_counter()
    process = SdcBridgeProcess(config)
    thread = threading.Thread(target=process.run, daemon=True)
    thread.start()

    def wait(predicate, timeout_s=10.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for envelope in reader.drain(0.01):
                if predicate(envelope.message):
                    return envelope.message
        raise RuntimeError("timed out")

    try:
        wait(lambda m: isinstance(m, PumpStatus) and m.mode == "READY")
        connect = time.perf_counter() - start
        acks, metrics = [], []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            ack = client.request(SetRate(cmd_id=f"b{i}", pump="propofol", rate=10.0 + i % 7,
                                         unit="mL/h", lease_s=30.0, fallback=Fallback()),
                                 timeout_s=5.0, retries=0)
            if ack is None or not ack.ok:
                raise RuntimeError(f"set_rate {i}: {ack}")
            acks.append(time.perf_counter() - t0)
            value = 40 + i % 20
            t0 = time.perf_counter()
            bench.publish("bis", value)
            wait(lambda m, v=value: isinstance(m, Measurement) and m.value == v)
            metrics.append(time.perf_counter() - t0)
        print(f"connect   {connect * 1e3:7.1f} ms (once)")
        print(f"set_rate  {_quantiles(acks)}   ({args.repeats} commands)")
        print(f"metric    {_quantiles(metrics)}   ({args.repeats} readings)")
    finally:
        process.stop()
        thread.join(10)
        process.close()
        context.destroy(linger=0)
        bench.close()


if __name__ == "__main__":
    main()
