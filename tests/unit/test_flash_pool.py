"""The parking pool's rules: tables, then properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runplane_node_agent.flash.boot import spec_digest
from runplane_node_agent.flash.pool import Parked, default_budget_mb, evictions
from runplane_proto.endpoints import EndpointSpec


def pool(*workers: tuple[str, int, int]) -> list[Parked]:
    return [Parked(worker_id, memory_mb, last_used_ms) for worker_id, memory_mb, last_used_ms in workers]


@pytest.mark.parametrize("parked, budget, incoming, expected", [
    (pool(), 1000, 300, []),
    (pool(("a", 300, 10), ("b", 300, 20)), 1000, 300, []),  # fits as it is
    (pool(("a", 300, 10), ("b", 300, 20)), 800, 300, ["a"]),  # least recently used goes first
    (pool(("b", 300, 20), ("a", 300, 10)), 800, 300, ["a"]),  # whatever the order given
    (pool(("a", 100, 10), ("b", 500, 20), ("c", 100, 30)), 700, 300, ["a", "b"]),  # until it fits
    (pool(("a", 300, 10), ("b", 300, 10)), 800, 300, ["a"]),  # ties: by worker id
    (pool(("a", 300, 10)), 200, 300, None),  # larger than the whole budget
    (pool(("a", 300, 10)), 0, 0, None),  # parking off
    (pool(("a", 300, 10)), 300, 0, []),
])
def test_evictions(parked, budget, incoming, expected):
    assert evictions(parked, budget, incoming) == expected


def test_default_budget_is_a_quarter_of_the_node():
    assert default_budget_mb(64_000) == 16_000 and default_budget_mb(0) == 0 and default_budget_mb(2) == 1


def test_spec_digest_changes_with_what_a_worker_is_made_of():
    spec = EndpointSpec(id="e", name="e", image_name="img", command=["python", "h.py"], env={"A": "1"})
    same = EndpointSpec(id="e", name="renamed", image_name="img", command=["python", "h.py"], env={"A": "1"},
                        workers_max=9)
    assert spec_digest(spec) == spec_digest(same)
    for changed in (EndpointSpec(id="e", name="e", image_name="img2", command=["python", "h.py"], env={"A": "1"}),
                    EndpointSpec(id="e", name="e", image_name="img", command=["python"], env={"A": "1"}),
                    EndpointSpec(id="e", name="e", image_name="img", command=["python", "h.py"], env={"A": "2"})):
        assert spec_digest(changed) != spec_digest(spec)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 100)), max_size=8), st.integers(0, 4000),
       st.integers(0, 3000))
def test_after_evictions_the_pool_fits_and_only_older_ones_went(entries, budget, incoming):
    parked = [Parked(f"w{i}", mb, used) for i, (mb, used) in enumerate(entries)]
    out = evictions(parked, budget, incoming)
    if out is None:
        assert budget <= 0 or incoming > budget
        return
    kept = [p for p in parked if p.worker_id not in out]
    assert sum(p.memory_mb for p in kept) + incoming <= budget
    assert len(set(out)) == len(out)
    # Least recently used first: every evicted one is older (or tied) than every kept one...
    order = {p.worker_id: (p.last_used_ms, p.worker_id) for p in parked}
    assert all(order[e] < order[k.worker_id] for e in out for k in kept)
    # ... and no more than needed: keeping the last one evicted would not fit.
    if out:
        last = next(p for p in parked if p.worker_id == out[-1])
        assert sum(p.memory_mb for p in kept) + last.memory_mb + incoming > budget
