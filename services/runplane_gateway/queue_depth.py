"""How many jobs an endpoint has waiting, from its JetStream consumer rather than its records:
/health's `inQueue` and `inProgress`, and the queue cap that /run and /runsync enforce.

One consumer-info request answers for any number of jobs. The cap reads a copy at most
`max_age_s` old (one request per endpoint per interval however many submits arrive, shared by
concurrent callers) plus the jobs this replica queued since; replicas do not see each other's
submits until their next refresh, so together they may overshoot the cap by what they accept
within one interval. It can also run a few jobs ahead: a submit whose answer is read just
after a refresh is counted again on top of a copy that already has it, so near the cap a
submit can get its 429 (Retry-After: 1) by up to the number in flight early.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from nats.js.errors import NotFoundError

from runplane_bus import Bus
from runplane_proto import subjects
from runplane_gateway.errors import ApiError

log = structlog.get_logger("runplane.gateway.queue_depth")

# How old a cached queue count may be for the cap check.
CAP_COUNT_MAX_AGE_S = 0.5


@dataclass(frozen=True)
class QueueCounts:
    """The endpoint's consumer: messages not delivered yet (queued) and delivered but not
    acked (taken: running, or about to be redelivered)."""

    queued: int = 0
    taken: int = 0
    # The stream sequence of the last message delivered: the queued ones come after it.
    delivered_seq: int = 0


def over_cap(queued: int, cap: int) -> bool:
    """Whether one more job would pass the cap (0: no cap)."""
    return cap > 0 and queued >= cap


def cap_error(endpoint_id: str, queued: int, cap: int) -> ApiError:
    return ApiError(
        429, f"endpoint {endpoint_id}'s queue is full: {queued} jobs queued, the cap is {cap} queued jobs "
             f"per endpoint (RP_QUEUE_CAP); retry later, or purge the queue",
        headers={"Retry-After": "1"})


@dataclass
class _Cached:
    queued: int
    read_at_s: float


class QueueDepths:
    def __init__(self, bus: Bus, *, max_age_s: float = CAP_COUNT_MAX_AGE_S,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.max_age_s = max_age_s
        self.monotonic = monotonic
        self._cached: dict[str, _Cached] = {}  # one entry per endpoint, never per job
        self._reading: dict[str, asyncio.Future[int]] = {}

    async def read(self, endpoint_id: str) -> QueueCounts:
        """The consumer's counts now (one request); also refreshes the cap's copy."""
        try:
            info = await self.bus.js.consumer_info(subjects.STREAM_JOBS, subjects.job_consumer(endpoint_id))
        except NotFoundError:  # no queue yet (or the endpoint is being deleted)
            counts = QueueCounts()
        else:
            counts = QueueCounts(queued=info.num_pending or 0, taken=info.num_ack_pending or 0,
                                 delivered_seq=info.delivered.stream_seq if info.delivered else 0)
        self._cached[endpoint_id] = _Cached(counts.queued, self.monotonic())
        return counts

    async def queued(self, endpoint_id: str) -> int:
        """Queued jobs, from a copy at most `max_age_s` old plus what this replica added since."""
        cached = self._cached.get(endpoint_id)
        if cached is not None and self.monotonic() - cached.read_at_s < self.max_age_s:
            return cached.queued
        reading = self._reading.get(endpoint_id)
        if reading is None:  # one request at a time per endpoint; the others wait for it
            reading = asyncio.ensure_future(self._refresh(endpoint_id))
            self._reading[endpoint_id] = reading
        return await asyncio.shield(reading)

    async def check(self, endpoint_id: str, cap: int) -> None:
        """Raise 429 when the endpoint's queue is at the cap."""
        if cap <= 0:
            return
        try:
            queued = await self.queued(endpoint_id)
        except Exception as exc:  # NATS trouble: the submit itself will say so if it persists
            log.warning("could not read the queue for its cap", endpoint_id=endpoint_id, error=repr(exc))
            return
        if over_cap(queued, cap):
            raise cap_error(endpoint_id, queued, cap)

    def added(self, endpoint_id: str, n: int = 1) -> None:
        """This replica just queued `n` jobs: count them until the next refresh."""
        cached = self._cached.get(endpoint_id)
        if cached is not None:
            cached.queued += n

    def cleared(self, endpoint_id: str) -> None:
        """The endpoint's queue was purged or deleted: read it again next time."""
        self._cached.pop(endpoint_id, None)

    async def _refresh(self, endpoint_id: str) -> int:
        try:
            return (await self.read(endpoint_id)).queued
        finally:
            self._reading.pop(endpoint_id, None)
