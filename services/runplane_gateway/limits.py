"""Payload caps (413) and RunPod's per-endpoint request limits (429)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import structlog
from starlette.requests import Request

from runplane_bus import Bus
from runplane_bus.mirror import Mirror
from runplane_proto.nodes import NodeStatus
from runplane_gateway.errors import ApiError
from runplane_gateway.fleet import is_lost

log = structlog.get_logger("runplane.gateway.limits")

MB = 1024 * 1024

# RunPod's documented base limits per endpoint: (requests per 10 s, concurrent requests).
REQUEST_LIMITS: dict[str, tuple[int, int | None]] = {
    "runsync": (2000, 400),
    "run": (1000, 200),
    "status": (2000, 400),
    "stream": (2000, 400),
    "cancel": (100, 20),
    "purge-queue": (2, None),
}
# RunPod: "effective limit = max(base, running workers x per-worker limit)", without
# publishing the per-worker numbers. Ours: a tenth of the base per running worker, so an
# endpoint's limits start growing past 10 workers. purge-queue stays at its base.
PER_WORKER_LIMITS: dict[str, tuple[int, int | None]] = {
    op: (count // 10, None if concurrent is None else concurrent // 10)
    for op, (count, concurrent) in REQUEST_LIMITS.items() if op != "purge-queue"
}
# Worker states that count as running for the limits (ready to take jobs or taking them).
RUNNING_STATES = frozenset({"idle", "running"})
WINDOW_S = 10.0
# Windows kept before ended ones are swept out.
MAX_WINDOWS = 10_000
_NO_LIMIT = contextlib.nullcontext()


def _size_text(n_bytes: int) -> str:
    return f"{n_bytes // MB} MB" if n_bytes % MB == 0 else f"{n_bytes} bytes"


async def read_body(request: Request, cap_bytes: int, op: str) -> bytes:
    """The request body, refusing (413) one over `cap_bytes` by its Content-Length or its real size."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length header {declared!r}") from None
        if declared_bytes > cap_bytes:
            raise ApiError(413, f"body of {declared_bytes} bytes is over the {_size_text(cap_bytes)} "
                                f"limit of /{op}")
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap_bytes:
            raise ApiError(413, f"body is over the {_size_text(cap_bytes)} limit of /{op}")
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def effective_limit(base: int, per_worker: int, running_workers: int) -> int:
    """RunPod's rule: the larger of the base limit and what the running workers earn."""
    return max(base, running_workers * per_worker)


def running_workers(nodes: Iterable[NodeStatus], endpoint_id: str, *, now_ms: int,
                    node_loss_timeout_s: float) -> int:
    """The endpoint's idle and running workers on live nodes."""
    live = [n for n in nodes if not is_lost(n, now_ms=now_ms, node_loss_timeout_s=node_loss_timeout_s)]
    return sum(1 for node in live for worker in node.workers
               if worker.endpoint_id == endpoint_id and worker.state in RUNNING_STATES)


class RunningWorkers:
    """Running workers per endpoint from a live copy of `rp-nodes`, started the first time
    an endpoint reaches a base limit (until then nothing is watched; while it loads, the
    base limits apply)."""

    def __init__(self, bus: Bus, *, now_ms: Callable[[], int], node_loss_timeout_s: float) -> None:
        self.bus = bus
        self.now_ms = now_ms
        self.node_loss_timeout_s = node_loss_timeout_s
        self.mirror: Mirror[NodeStatus] | None = None
        self._starting: asyncio.Task[None] | None = None

    def __call__(self, endpoint_id: str) -> int:
        if self.mirror is None:
            if self._starting is None:
                self._starting = asyncio.ensure_future(self._start())
            return 0
        return running_workers(self.mirror.values(), endpoint_id, now_ms=self.now_ms(),
                               node_loss_timeout_s=self.node_loss_timeout_s)

    async def _start(self) -> None:
        try:
            self.mirror = await Mirror(self.bus.nodes).start()
        except Exception as exc:  # try again at the next request over a base limit
            log.warning("cannot follow rp-nodes for the rate limits", error=repr(exc))
            self._starting = None

    async def stop(self) -> None:
        if self._starting is not None:
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        if self.mirror is not None:
            await self.mirror.stop()


@dataclass
class _Window:
    started_s: float
    count: int = 0
    in_flight: int = 0


@dataclass
class RateLimiter:
    """Fixed 10 s windows and a concurrency cap per (endpoint, operation), in this replica.

    Counts are per replica (an approximation of a cluster-wide limit, on purpose: no
    round trip per request)."""

    enabled: bool
    monotonic: Callable[[], float] = time.monotonic
    limits: dict[str, tuple[int, int | None]] = field(default_factory=lambda: dict(REQUEST_LIMITS))
    per_worker: dict[str, tuple[int, int | None]] = field(default_factory=lambda: dict(PER_WORKER_LIMITS))
    # An endpoint's running workers, asked only once it reaches a base limit.
    running_workers: Callable[[str], int] = lambda _: 0
    _windows: dict[tuple[str, str], _Window] = field(default_factory=dict)

    def hold(self, endpoint_id: str, op: str) -> contextlib.AbstractContextManager[None]:
        """`with limiter.hold(ep, op):` around a request; raises 429 when over a limit."""
        if not self.enabled or op not in self.limits:
            return _NO_LIMIT
        return self._held(endpoint_id, op)

    @contextlib.contextmanager
    def _held(self, endpoint_id: str, op: str) -> Iterator[None]:
        self._enter(endpoint_id, op)
        try:
            yield
        finally:
            self._leave(endpoint_id, op)

    def _enter(self, endpoint_id: str, op: str) -> None:
        per_window, concurrent = self.limits[op]
        now = self.monotonic()
        key = (endpoint_id, op)
        window = self._windows.get(key)
        if window is None:
            if len(self._windows) >= MAX_WINDOWS:
                self._sweep(now)
            window = self._windows[key] = _Window(started_s=now)
        elif now - window.started_s >= WINDOW_S:
            window.started_s, window.count = now, 0
        at_base = window.count >= per_window or (concurrent is not None and window.in_flight >= concurrent)
        if at_base and op in self.per_worker:
            workers = self.running_workers(endpoint_id)
            worker_window, worker_concurrent = self.per_worker[op]
            per_window = effective_limit(per_window, worker_window, workers)
            if concurrent is not None and worker_concurrent is not None:
                concurrent = effective_limit(concurrent, worker_concurrent, workers)
        if window.count >= per_window:
            retry_s = max(1, math.ceil(window.started_s + WINDOW_S - now))
            raise ApiError(429, f"rate limit: more than {per_window} /{op} requests in 10 s for "
                                f"endpoint {endpoint_id}; retry in {retry_s} s",
                           {"Retry-After": str(retry_s)})
        if concurrent is not None and window.in_flight >= concurrent:
            raise ApiError(429, f"rate limit: more than {concurrent} concurrent /{op} requests for "
                                f"endpoint {endpoint_id}", {"Retry-After": "1"})
        window.count += 1
        window.in_flight += 1

    def _sweep(self, now: float) -> None:
        """Forget windows that have ended with nothing in flight (ids seen once stay bounded)."""
        ended = [k for k, w in self._windows.items() if w.in_flight == 0 and now - w.started_s >= WINDOW_S]
        for key in ended:
            del self._windows[key]

    def _leave(self, endpoint_id: str, op: str) -> None:
        window = self._windows.get((endpoint_id, op))
        if window is not None and window.in_flight > 0:
            window.in_flight -= 1
