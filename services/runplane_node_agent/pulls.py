"""Pulling from an endpoint's shared JetStream consumer, only while a worker waits.

Each pull request gets its own inbox subscription (a *slot*): JetStream delivers job
messages under their stream subject, so the subscription is the only way to tell which
request a message answers. Slots are reused per endpoint. A message that arrives when
nobody wants it any more (the worker went away) is nak'ed at once so JetStream hands
it to another poll instead of waiting out `ack_wait`.

Single takes send one lingering request for one message (`expires` = the poll's time
left), so a request is used up by the message it brings. Batch takes first ask with
`no_wait` for up to N messages that are there now and fall back to the lingering
request for one when the queue is empty.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from runplane_proto import subjects as s

from runplane_node_agent import metrics

log = structlog.get_logger("runplane.node_agent.pulls")

_STATUS = "Status"
_HEARTBEAT = "100"
# Statuses that just mean "nothing (more) for this request".
QUIET_STATUSES = frozenset({"404", "408"})
# How long a no_wait request may take to answer before its slot is reused anyway.
_NO_WAIT_ANSWER_S = 5.0
# Extra time past `expires` before we stop waiting for the server's 408.
_EXPIRY_SLACK_S = 1.0


def consumer_next_subject(endpoint_id: str) -> str:
    """The JetStream API subject that asks the endpoint's durable consumer for messages."""
    return f"$JS.API.CONSUMER.MSG.NEXT.{s.STREAM_JOBS}.{s.job_consumer(endpoint_id)}"


@dataclass
class PullResult:
    msgs: list[Msg] = field(default_factory=list)
    # The JetStream status that ended the request ("404", "408", "409", "503"…), if any.
    status: str | None = None


class _Request:
    __slots__ = ("future", "result", "want")

    def __init__(self, want: int) -> None:
        self.want = want
        self.result = PullResult()
        self.future: asyncio.Future[PullResult] = asyncio.get_running_loop().create_future()

    def finish(self, status: str | None = None) -> None:
        if not self.future.done():
            self.result.status = status
            self.future.set_result(self.result)


class _Slot:
    def __init__(self, sub: Subscription, inbox: str) -> None:
        self.sub = sub
        self.inbox = inbox
        self.owner: _Request | None = None
        # Messages the server may still send for the last request, and until when.
        self.outstanding = 0
        self.busy_until = 0.0

    def free(self, now: float) -> bool:
        return self.owner is None and (self.outstanding <= 0 or now >= self.busy_until)


class EndpointPuller:
    """Pull requests against one endpoint's consumer `ep-<endpoint>`."""

    def __init__(self, nc: Client, endpoint_id: str) -> None:
        self.nc = nc
        self.endpoint_id = endpoint_id
        self.next_subject = consumer_next_subject(endpoint_id)
        self._slots: list[_Slot] = []
        self._closed = False

    async def pull(self, batch: int, timeout_s: float) -> PullResult:
        """Up to `batch` messages, waiting at most `timeout_s` for the first one."""
        if self._closed or timeout_s <= 0:
            return PullResult()
        if batch > 1:
            probe = await self._request(batch, None, min(timeout_s, _NO_WAIT_ANSWER_S))
            if probe.msgs or (probe.status and probe.status not in QUIET_STATUSES):
                return probe
        return await self._request(1, timeout_s, timeout_s)

    async def _request(self, batch: int, expires_s: float | None, wait_s: float) -> PullResult:
        slot = await self._slot()
        request = _Request(batch)
        slot.owner = request
        slot.outstanding = batch
        now = time.monotonic()
        if expires_s is None:
            body = {"batch": batch, "no_wait": True}
            slot.busy_until = now + _NO_WAIT_ANSWER_S
        else:
            body = {"batch": batch, "expires": max(int(expires_s * 1e9) - 100_000, 1_000_000)}
            slot.busy_until = now + expires_s + _EXPIRY_SLACK_S
        # Backstop for a request the server never answers (reconnect, leader change).
        timer = asyncio.get_running_loop().call_later(wait_s + _EXPIRY_SLACK_S, request.finish, "timeout")
        try:
            await self.nc.publish(self.next_subject, json.dumps(body).encode(), reply=slot.inbox)
            return await request.future
        except BaseException:
            # The poll went away: whatever this request already brought goes back at once.
            request.finish()
            for msg in request.result.msgs:
                asyncio.ensure_future(self._nak(msg))
            raise
        finally:
            timer.cancel()
            slot.owner = None

    async def _slot(self) -> _Slot:
        now = time.monotonic()
        for slot in self._slots:
            if slot.free(now):
                return slot
        inbox = self.nc.new_inbox()
        slot_ref: list[_Slot] = []

        async def on_msg(msg: Msg) -> None:
            await self._on_msg(slot_ref[0], msg)

        sub = await self.nc.subscribe(inbox, cb=on_msg)
        slot = _Slot(sub, inbox)
        slot_ref.append(slot)
        self._slots.append(slot)
        return slot

    async def _on_msg(self, slot: _Slot, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(_STATUS) if headers else None
        if status:
            if status == _HEARTBEAT:
                return
            slot.outstanding = 0
            if slot.owner is not None:
                slot.owner.finish(status)
            return
        slot.outstanding -= 1
        owner = slot.owner
        if owner is not None and not owner.future.done() and len(owner.result.msgs) < owner.want:
            owner.result.msgs.append(msg)
            if len(owner.result.msgs) >= owner.want:
                owner.finish()
            return
        await self._nak(msg)

    async def _nak(self, msg: Msg) -> None:
        metrics.MESSAGES_NAKED.inc()
        try:
            await msg.nak()
        except Exception as exc:
            log.warning("nak failed", endpoint_id=self.endpoint_id, error=str(exc))

    async def close(self) -> None:
        self._closed = True
        for slot in self._slots:
            try:
                await slot.sub.unsubscribe()
            except Exception:
                pass
        self._slots.clear()

