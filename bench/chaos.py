"""chaos: the chaos campaign of tests/chaos, longer (issue 6).

The same load first without chaos (the floor, a quarter of the chaos time, at least 30 s), then
while the seeded driver SIGKILLs and restarts gateways, leaders, node agents, workers and NATS
servers. Figures: jobs submitted, completed, failed by cause, cancelled, timed out, executed
twice, lost (must be 0), p50/p99 latency (submit to COMPLETED) with and without chaos and their
ratio, kills by kind. A violation (a lost job, a wrong result, a failure without a reason, an
execution the attempt count does not show) fails the run.

    ./scripts/bench chaos                    # 5 min of chaos, seed 1
    RP_CHAOS_SEED=7 RP_CHAOS_S=600 ./scripts/bench chaos
    .venv/bin/python -m bench.chaos --seed 7 --duration 600
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from runplane_testing.chaos import CampaignSettings, figures, run_campaign, table


def campaign(seed: int, chaos_s: float, rate_per_s: float = 3.0) -> dict[str, float]:
    settings = CampaignSettings(seed=seed, chaos_s=chaos_s, floor_s=max(30.0, chaos_s / 4),
                                rate_per_s=rate_per_s, interval_s=(2.0, 4.0), drain_timeout_s=180)
    result = asyncio.run(run_campaign(settings))
    values = figures(result)
    print(f"chaos campaign, seed {seed}, {chaos_s:.0f} s, logs in {result.workdir}\n{table(values)}",
          file=sys.stderr)
    if result.report.violations:
        print(result.logs, file=sys.stderr)
        raise SystemExit(f"chaos: violations: {result.report.violations}")
    return {f"chaos: {k}": float(v) for k, v in values.items()}


def run(quick: bool = False) -> dict[str, float]:
    seed = int(os.environ.get("RP_CHAOS_SEED", "1"))
    chaos_s = float(os.environ.get("RP_CHAOS_S", "90" if quick else "300"))
    return campaign(seed, chaos_s, float(os.environ.get("RP_CHAOS_RATE", "3")))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of chaos")
    parser.add_argument("--rate", type=float, default=3.0, help="operations started per second")
    args = parser.parse_args()
    campaign(args.seed, args.duration, args.rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
