"""Run benchmarks, print a table of figures and ratios, write bench/results/latest.json."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from bench.host import HostShare

BENCHES = {"dispatch": "bench.dispatch", "scale": "bench.scale", "coldstart": "bench.coldstart",
           "chaos": "bench.chaos", "overload": "bench.overload", "contention": "bench.contention"}
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(prog="./scripts/bench")
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default all: {', '.join(BENCHES)})")
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke run)")
    args = parser.parse_args()
    names = args.names or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    figures: dict[str, float] = {}
    for name in names:
        started = time.monotonic()
        module = importlib.import_module(BENCHES[name])
        with HostShare() as host:
            result = module.run(quick=args.quick)
        figures.update(result)
        figures[f"{name}_host_steal_pct"] = round(host.steal_pct, 1)
        figures[f"{name}_host_other_cpu_pct"] = round(host.other_pct, 1)
        print(f"[{name}] done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
    width = max(len(k) for k in figures)
    print(f"\n{'figure'.ljust(width)}  value")
    print(f"{'-' * width}  ----------")
    for key, value in figures.items():
        print(f"{key.ljust(width)}  {value:,.3f}")
    print(f"\nwritten: {RESULTS / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
