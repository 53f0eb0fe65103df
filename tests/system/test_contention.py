"""Contended GPUs with every control-plane service as a process (gateway, scheduler,
autoscaler, nats-server) and simulated nodes (bench/fleet.py): weighted endpoints arriving
one after another on a full pool end up with their weighted shares, nothing is started or
stopped while the pool stays full, the endpoints are shown throttled, and new nodes are
used at once. (`./scripts/bench contention` runs the same on a larger fleet.)"""

from __future__ import annotations

import pytest

from bench import contention

pytestmark = pytest.mark.system


def test_weighted_shares_no_thrash_throttled_and_new_capacity_used_at_once():
    figures = contention.run(nodes=2, window_s=6)  # 16 GPUs: weights 1, 2, 5 -> 2, 4, 10
    assert figures["contention_pool_gpus"] == 16
    assert figures["fair_share_max_deviation"] == 0, figures
    assert figures["thrash_worker_starts_per_min"] == 0 and figures["thrash_worker_stops_per_min"] == 0, figures
    assert figures["contended_endpoints_throttled"] == 1.0
    assert figures["capacity_resume_s"] < 3, figures
