"""Webhook delivery: when a job with a `webhook` ends, POST its /status body there.

Whoever makes such a job terminal publishes `WebhookDue` on stream WEBHOOKS; every
gateway replica pulls from the one durable consumer `webhooks`, so each is delivered
by one replica. RunPod's rule: the receiver answers 200, else 2 more tries 10 s apart.
The message is kept alive with `in_progress` meanwhile, and acked after the last try.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import nats.errors
import nats.js.api as api
import structlog
from nats.aio.msg import Msg
from nats.js.errors import BadRequestError, NotFoundError

from runplane_bus import Bus
from runplane_proto import subjects
from runplane_proto.codec import Codec, DecodeError
from runplane_proto.jobs import WebhookDue, is_terminal
from runplane_gateway import metrics
from runplane_gateway.jobs import Jobs
from runplane_gateway.settings import GatewaySettings

log = structlog.get_logger("runplane.gateway.webhooks")

ATTEMPTS = 3
CONCURRENCY = 64
FETCH_BATCH = 16
FETCH_TIMEOUT_S = 5.0
_due_codec: Codec[WebhookDue] = Codec(WebhookDue)


class DenyList:
    """Hosts and networks the gateway never calls (e.g. its own cluster's addresses)."""

    def __init__(self, hosts: frozenset[str], networks: tuple[str, ...]) -> None:
        self.hosts = hosts
        self.networks = [ipaddress.ip_network(n) for n in networks]

    async def refusal(self, url: str) -> str | None:
        """Why `url` must not be called, or None when it may be."""
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        if not host:
            return "no host in the URL"
        if host in self.hosts:
            return f"host {host} is denied"
        if not self.networks:
            return None
        for address in await _addresses(host):
            if any(address in net for net in self.networks):
                return f"host {host} ({address}) is in a denied network"
        return None


async def _addresses(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []  # unresolvable: the POST fails on its own
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


class WebhookSender:
    def __init__(self, bus: Bus, jobs: Jobs, settings: GatewaySettings,
                 http: httpx.AsyncClient | None = None) -> None:
        self.bus = bus
        self.jobs = jobs
        self.settings = settings
        self.deny = DenyList(settings.webhook_deny_hosts, settings.webhook_deny_networks)
        self.http = http or httpx.AsyncClient(timeout=settings.webhook_timeout_s, follow_redirects=False)
        self.ack_wait_s = max(settings.webhook_retry_delay_s * 3, 30.0)
        self._slots = asyncio.Semaphore(CONCURRENCY)
        self._task: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._ensure_consumer()
        sub = await self.bus.js.pull_subscribe_bind(durable=subjects.WEBHOOK_CONSUMER,
                                                    stream=subjects.STREAM_WEBHOOKS)
        self._task = asyncio.ensure_future(self._pull(sub))

    async def stop(self) -> None:
        """Stop pulling; deliveries in flight are dropped unacked (redelivered later)."""
        tasks = [t for t in (self._task, *self._deliveries) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.http.aclose()

    async def _ensure_consumer(self) -> None:
        try:
            await self.bus.js.consumer_info(subjects.STREAM_WEBHOOKS, subjects.WEBHOOK_CONSUMER)
            return
        except NotFoundError:
            pass
        try:
            await self.bus.js.add_consumer(subjects.STREAM_WEBHOOKS, api.ConsumerConfig(
                durable_name=subjects.WEBHOOK_CONSUMER, filter_subject=subjects.ALL_WEBHOOKS,
                ack_policy=api.AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s, max_deliver=-1,
                max_ack_pending=4 * CONCURRENCY, deliver_policy=api.DeliverPolicy.ALL,
            ))
        except BadRequestError:  # another replica created it first
            await self.bus.js.consumer_info(subjects.STREAM_WEBHOOKS, subjects.WEBHOOK_CONSUMER)

    async def _pull(self, sub: object) -> None:
        while True:
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)  # type: ignore[attr-defined]
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("webhook fetch failed", error=repr(exc))
                await asyncio.sleep(1.0)
                continue
            for msg in msgs:
                await self._slots.acquire()
                task = asyncio.ensure_future(self._deliver(msg))
                self._deliveries.add(task)
                task.add_done_callback(self._delivered)

    def _delivered(self, task: asyncio.Task[None]) -> None:
        self._deliveries.discard(task)
        self._slots.release()

    async def _deliver(self, msg: Msg) -> None:
        try:
            due = _due_codec.decode(msg.data)
        except DecodeError as exc:
            metrics.DROPPED.labels(msg.subject).inc()
            log.warning("dropped undecodable webhook message", subject=msg.subject, error=str(exc))
            await msg.term()
            return
        try:
            async with _kept_alive(msg, self.ack_wait_s / 3):
                outcome = await self._send(due)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the bus failed us: let JetStream redeliver later
            log.warning("webhook delivery interrupted", job_id=due.job_id, error=repr(exc))
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.settings.webhook_retry_delay_s)
            return
        metrics.WEBHOOKS.labels(outcome).inc()
        await msg.ack()

    async def _send(self, due: WebhookDue) -> str:
        record = await self.jobs.read(due.endpoint_id, due.job_id)
        if record is None or not record.webhook:
            log.info("webhook skipped: job gone", job_id=due.job_id, endpoint_id=due.endpoint_id)
            return "gone"
        if not is_terminal(record.status):  # retried since: its next end sends its own
            log.info("webhook skipped: job running again", job_id=due.job_id, endpoint_id=due.endpoint_id)
            return "stale"
        url = record.webhook
        refusal = await self.deny.refusal(url)
        if refusal is not None:
            log.warning("webhook refused", job_id=due.job_id, endpoint_id=due.endpoint_id, url=url,
                        reason=refusal)
            return "refused"
        body = await self.jobs.view(record)
        headers = {"content-type": "application/json"}
        for attempt in range(1, ATTEMPTS + 1):
            metrics.WEBHOOK_ATTEMPTS.inc()
            try:
                resp = await self.http.post(url, content=body, headers=headers)
                if 200 <= resp.status_code < 300:
                    log.info("webhook delivered", job_id=due.job_id, endpoint_id=due.endpoint_id,
                             attempt=attempt)
                    return "delivered"
                problem = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                problem = repr(exc)
            log.info("webhook attempt failed", job_id=due.job_id, endpoint_id=due.endpoint_id, url=url,
                     attempt=attempt, error=problem)
            if attempt < ATTEMPTS:
                await asyncio.sleep(self.settings.webhook_retry_delay_s)
        log.warning("webhook given up", job_id=due.job_id, endpoint_id=due.endpoint_id, url=url,
                    attempts=ATTEMPTS)
        return "failed"


@contextlib.asynccontextmanager
async def _kept_alive(msg: Msg, every_s: float) -> AsyncIterator[None]:
    """Tell JetStream the message is still being worked on, every `every_s`."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(every_s)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    task = asyncio.ensure_future(beat())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
