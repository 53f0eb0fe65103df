"""Chaos under load, the short version CI runs (issue 6): a 3-node NATS JetStream cluster with
every stream and bucket replicated three times, two gateways, two schedulers, two autoscalers
and three node agents, all real processes. Load (run, runsync, streams, cancels over both
gateways) first without chaos (the floor), then while a seeded driver SIGKILLs and restarts
gateways, the leading scheduler and autoscaler, node agents, workers and one NATS server at a
time. Afterwards every accepted job is terminal with its own result or a reason, nothing is
lost, and every repeated execution shows in the job's attempt count."""

from __future__ import annotations

import asyncio

import pytest

from runplane_testing.chaos import CampaignSettings, figures, run_campaign, table

pytestmark = pytest.mark.chaos

SEED = 6


@pytest.mark.timeout(360)
def test_every_accepted_job_is_accounted_for_under_chaos():
    result = asyncio.run(run_campaign(CampaignSettings(seed=SEED, chaos_s=75, floor_s=15, rate_per_s=3.0,
                                                       interval_s=(2.0, 4.0), drain_timeout_s=90)))
    report = result.report
    print(f"\nchaos campaign, seed {SEED}, logs in {result.workdir}\n{table(figures(result))}")
    assert report.violations == [], f"{report.violations}\n{result.logs}"
    # The storm really happened, and the load really ran through it.
    kinds = {kill.kind for kill in result.kills}
    assert len(result.kills) >= 10 and len(kinds) >= 5, result.kills
    assert report.submitted >= 150 and report.completed >= 0.7 * report.submitted, figures(result)
    assert report.latency_ms.get("chaos"), "no job completed during the chaos"
