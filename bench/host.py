"""What the machine gave a benchmark: how much CPU the hypervisor took away (steal) and how
much went to processes that are not the benchmark's, over the benchmark's run.

Figures are ratios to floors measured in the same run, but a chain of many process hops
suffers more from a vCPU taken away than its floor of two: these two figures tell a run
on a disturbed machine from a run of slower code. Only partly: a neighbour on the same
physical core slows this VM without any steal it can see, so the floors of the same run
still say best how fast the machine was.
"""

from __future__ import annotations

import os
import time
from types import TracebackType


def _machine() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _ours() -> float:
    """CPU seconds of this process and of its children waited for: the services a benchmark
    starts and their worker processes. A Docker container's processes are the engine's
    children, so what containers burn counts as another's (coldstart's Docker part)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class HostShare:
    """`with HostShare() as host: ...`, then `host.steal_pct` and `host.other_pct`, both in
    percent of the machine's CPU over the block (all cores)."""

    steal_pct = 0.0
    other_pct = 0.0

    def __enter__(self) -> HostShare:
        self._wall = time.monotonic()
        self._busy, self._steal = _machine()
        self._ours = _ours()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        capacity = (time.monotonic() - self._wall) * (os.cpu_count() or 1)
        busy, steal = _machine()
        other = (busy - self._busy) - (_ours() - self._ours)
        self.steal_pct = 100 * (steal - self._steal) / capacity
        self.other_pct = 100 * max(0.0, other) / capacity
