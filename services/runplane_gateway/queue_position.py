"""Where a queued job stands, from JetStream alone (no record is read, whatever the queue's length):

* **position**: how many of the endpoint's jobs not yet taken were queued before it. Both of the
  endpoint's queues (normal and low priority) are one FIFO for its consumer, so both count.
  `num_pending` of the consumer (jobs not delivered yet) less the messages of the endpoint's two
  queues stored at or after the job's submit time (itself and those behind it: one direct get per
  queue, whose `Nats-Num-Pending` header says how many follow the first). One round of three
  requests.
* **ETA**: (position + 1) / the endpoint's recent end rate: jobs that ended (`completed` and
  `failed` subjects of stream JOBENDS) in the last `RATE_WINDOW_S` seconds, over the time since the
  first of them (at least 1 s); two direct gets, kept `RATE_MAX_AGE_S` per endpoint. None while
  nothing ended in the window.
* **queue delay** (/health): the age of the oldest job not yet taken: the first message of each
  queue after the consumer's delivered sequence.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import structlog
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from runplane_bus import Bus
from runplane_proto import subjects

log = structlog.get_logger("runplane.gateway.queue_position")

RATE_WINDOW_S = 60.0
RATE_MAX_AGE_S = 1.0
_REQUEST_TIMEOUT_S = 2.0
_json = msgspec.json.Encoder()


@dataclass(frozen=True)
class Place:
    position: int
    eta_ms: int | None


@dataclass(frozen=True)
class _Count:
    """Messages of a subject from a point on, and the first one's store time (ms)."""

    messages: int = 0
    first_at_ms: int | None = None


def _rfc3339(at_ms: int) -> str:
    return datetime.fromtimestamp(at_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _stamp_ms(text: str) -> int | None:
    """`Nats-Time-Stamp` (RFC 3339, nanoseconds) → ms."""
    try:
        whole, _, rest = text.rstrip("Z").partition(".")
        at = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        return int(at.timestamp() * 1000) + int((rest + "000")[:3])
    except ValueError:
        return None


async def count_from(nc: Client, stream: str, subject: str, *, since_ms: int) -> _Count:
    """How many messages of `subject` (a wildcard may do) `stream` holds stored at or after
    `since_ms`: one direct get of the first, whose header tells how many more follow."""
    request = {"start_time": _rfc3339(since_ms), "next_by_subj": subject, "batch": 1}
    reply = await nc.request(f"$JS.API.DIRECT.GET.{stream}", _json.encode(request),
                             timeout=_REQUEST_TIMEOUT_S)
    headers = reply.headers or {}
    if headers.get("Status"):  # 404: nothing stored from there on
        return _Count()
    return _Count(1 + int(headers.get("Nats-Num-Pending", "0")),
                  _stamp_ms(headers.get("Nats-Time-Stamp", "")))


@dataclass
class _Rate:
    per_s: float | None
    read_at_s: float


class QueuePlaces:
    def __init__(self, bus: Bus, *, now_ms: Callable[[], int],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.now_ms = now_ms
        self.monotonic = monotonic
        self._rates: dict[str, _Rate] = {}  # one entry per endpoint

    async def place(self, endpoint_id: str, submitted_at_ms: int) -> Place | None:
        """A queued job's position and ETA; None when the streams cannot say (an older stream
        without direct gets, NATS trouble)."""
        nc, jobs = self.bus.nc, subjects.STREAM_JOBS
        try:
            info, normal, low, rate = await asyncio.gather(
                self.bus.js.consumer_info(jobs, subjects.job_consumer(endpoint_id)),
                count_from(nc, jobs, subjects.job_queue(endpoint_id), since_ms=submitted_at_ms),
                count_from(nc, jobs, subjects.job_queue(endpoint_id, low_priority=True),
                           since_ms=submitted_at_ms),
                self.rate_per_s(endpoint_id))
        except Exception as exc:
            log.info("no queue position", endpoint_id=endpoint_id, error=repr(exc))
            return None
        position = max(0, (info.num_pending or 0) - normal.messages - low.messages)
        eta_ms = None if rate is None else round((position + 1) / rate * 1000)
        return Place(position, eta_ms)

    async def rate_per_s(self, endpoint_id: str) -> float | None:
        """Jobs of the endpoint that ended per second lately (None: none in the window)."""
        cached = self._rates.get(endpoint_id)
        if cached is not None and self.monotonic() - cached.read_at_s < RATE_MAX_AGE_S:
            return cached.per_s
        now_ms = self.now_ms()
        since_ms = now_ms - int(RATE_WINDOW_S * 1000)
        ends = await asyncio.gather(*(
            count_from(self.bus.nc, subjects.STREAM_JOB_ENDS, subjects.job_ended(endpoint_id, outcome),
                       since_ms=since_ms) for outcome in ("completed", "failed")))
        count = sum(e.messages for e in ends)
        firsts = [e.first_at_ms for e in ends if e.first_at_ms is not None]
        per_s = None
        if count and firsts:
            per_s = count / max((now_ms - min(firsts)) / 1000, 1.0)
        self._rates[endpoint_id] = _Rate(per_s, self.monotonic())
        return per_s

    async def queue_delay_ms(self, endpoint_id: str, delivered_seq: int) -> int:
        """Age of the endpoint's oldest job not taken yet (0 when none waits)."""
        async def first_at_ms(subject: str) -> int | None:
            try:
                msg = await self.bus.js.get_msg(subjects.STREAM_JOBS, seq=delivered_seq + 1, subject=subject,
                                                next=True)
            except NotFoundError:
                return None
            return int(msg.time.timestamp() * 1000) if msg.time is not None else None

        firsts = await asyncio.gather(first_at_ms(subjects.job_queue(endpoint_id)),
                                      first_at_ms(subjects.job_queue(endpoint_id, low_priority=True)))
        known = [f for f in firsts if f is not None]
        return max(0, self.now_ms() - min(known)) if known else 0
