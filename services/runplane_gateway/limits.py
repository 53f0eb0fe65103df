"""Payload caps (413) and RunPod's per-endpoint request limits (429)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from starlette.requests import Request

from runplane_gateway.errors import ApiError

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
WINDOW_S = 10.0
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
            window = self._windows[key] = _Window(started_s=now)
        elif now - window.started_s >= WINDOW_S:
            window.started_s, window.count = now, 0
        if window.count >= per_window:
            raise ApiError(429, f"rate limit: more than {per_window} /{op} requests in 10 s for "
                                f"endpoint {endpoint_id}")
        if concurrent is not None and window.in_flight >= concurrent:
            raise ApiError(429, f"rate limit: more than {concurrent} concurrent /{op} requests for "
                                f"endpoint {endpoint_id}")
        window.count += 1
        window.in_flight += 1

    def _leave(self, endpoint_id: str, op: str) -> None:
        window = self._windows.get((endpoint_id, op))
        if window is not None and window.in_flight > 0:
            window.in_flight -= 1
