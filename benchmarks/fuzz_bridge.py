"""The long fuzz run of issue 14: fuzzed command frames through the codec and the bridge's
frame handler (the code `mpc-dose serve pump-bridge` runs for every frame), with a driver
that checks every call that would reach a pump.

    python benchmarks/fuzz_bridge.py [--frames 1000000] [--seeds 14 15] [--fail-every 0]
    python benchmarks/fuzz_bridge.py --insulin [--frames 300000] [--seeds 18]

Last line: ``frames=… crashes=… internal_errors=… limit_violations=… nan_to_driver=…
unasked_rates=… applied=… refused_frames=… frames_per_s=…``. The short run (100,000
frames) is tests/test_bridge_fuzz.py in `make test`; the socket run there too. With
``--insulin`` the frames include bolus commands (protocol 1.1) to an insulin pump, and the
figures say how many boluses were given and whether any passed a limit (``problems``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_bridge_fuzz import fuzz, fuzz_insulin  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1_000_000, help="per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[14])
    parser.add_argument("--fail-every", type=int, default=0,
                        help="the driver loses every n-th reply (0: never)")
    parser.add_argument("--insulin", action="store_true",
                        help="bolus frames to an insulin pump (protocol 1.1)")
    args = parser.parse_args()
    if args.insulin:
        start = time.perf_counter()
        for seed in args.seeds:
            figures = fuzz_insulin(args.frames, seed)
            figures["problems"] = len(figures["problems"])
            figures["limit_violations"] = len(figures["limit_violations"])
            figures["unasked"] = len(figures["unasked"])
            print(f"seed {seed}: {figures}")
        print(f"seconds={time.perf_counter() - start:.0f}")
        return
    total = {"frames": 0, "crashes": 0, "internal_errors": 0, "limit_violations": 0,
             "nan_to_driver": 0, "unasked_rates": 0, "applied": 0, "refused_frames": 0}
    start = time.perf_counter()
    for seed in args.seeds:
        try:
            figures = fuzz(args.frames, seed, fail_every=args.fail_every)
        except Exception as err:  # noqa: BLE001 - a crash is the figure this run reports
            print(f"seed {seed}: CRASH {err!r}")
            total["crashes"] += 1
            continue
        print(f"seed {seed}: {figures}")
        for key in ("frames", "internal_errors", "limit_violations", "nan_to_driver",
                    "applied", "refused_frames"):
            total[key] += figures[key]
        total["unasked_rates"] += len(figures["unasked"])
    seconds = time.perf_counter() - start
    print(" ".join(f"{k}={v}" for k, v in total.items())
          + f" frames_per_s={total['frames'] / seconds:.0f}")


if __name__ == "__main__":
    main()
