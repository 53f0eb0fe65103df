"""The parking pool's rules, pure: which parked workers make room for one more.

A node keeps idle workers of flash endpoints paused ("parked") up to a memory budget.
Parking one more evicts the least recently used parked workers until it fits; a worker
larger than the whole budget is not parked at all (it is stopped instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Parked:
    worker_id: str
    memory_mb: int
    # When the worker last finished a job (or started, if it never ran one).
    last_used_ms: int


def default_budget_mb(memory_total_mb: int) -> int:
    """A quarter of the node's memory (at least 1 MB on a node that reports its memory)."""
    return max(1, memory_total_mb // 4) if memory_total_mb > 0 else 0


def evictions(parked: Sequence[Parked], budget_mb: int, incoming_mb: int) -> list[str] | None:
    """Ids of the parked workers to evict, least recently used first, so that `incoming_mb`
    more fits in `budget_mb`; None when it cannot fit even in an empty pool."""
    incoming_mb = max(0, incoming_mb)
    if budget_mb <= 0 or incoming_mb > budget_mb:
        return None
    held_mb = sum(max(0, p.memory_mb) for p in parked)
    out: list[str] = []
    for p in sorted(parked, key=lambda p: (p.last_used_ms, p.worker_id)):
        if held_mb + incoming_mb <= budget_mb:
            break
        out.append(p.worker_id)
        held_mb -= max(0, p.memory_mb)
    return out
