"""A job in a worker's hands, and the bytes that go over the wire for it."""

from __future__ import annotations

import asyncio
from typing import Literal

import msgspec
import structlog
from nats.aio.msg import Msg
from runplane_proto.codec import DecodeError
from runplane_proto.jobs import JobRecord

from runplane_node_agent.supervisor import Worker

log = structlog.get_logger("runplane.node_agent.held")

# What happens to a job's queue message when we let go of the job.
Release = Literal["ack", "nak", "none"]


class ResultBody(msgspec.Struct):
    """What a worker POSTs to job-done (JSON, whatever the content type says)."""

    output: msgspec.Raw = msgspec.Raw()
    error: msgspec.Raw = msgspec.Raw()
    status: str | None = None
    stopPod: bool = False


RESULT_DECODER = msgspec.json.Decoder(ResultBody)
OBJECT_DECODER = msgspec.json.Decoder(dict[str, msgspec.Raw])
_JSON = msgspec.json.Encoder()


def error_text(raw: msgspec.Raw) -> str | None:
    """The job's `error`: a JSON string as-is, anything else as its JSON text; None if absent."""
    data = bytes(raw)
    if not data or data == b"null":
        return None
    if data[:1] == b'"':
        return msgspec.json.decode(data, type=str)
    return data.decode()


def job_payload(record: JobRecord, input_json: bytes | None) -> bytes:
    """The object a worker's take is answered with: id, input, `attempt` (1 on the first run,
    more after a worker or node failure: a handler may dedupe side effects by it), then the
    submit's extra keys. `record` is the claimed record (its attempt counted)."""
    raw_input = input_json if input_json is not None else b"null"
    attempt = str(record.attempts).encode()
    if record.extra_json is None and record.webhook is None:
        # Ids match [A-Za-z0-9_-]+, so they need no JSON escaping.
        return b'{"id":"' + record.id.encode() + b'","input":' + raw_input + b',"attempt":' + attempt + b"}"
    body: dict[str, object] = {"id": record.id, "input": msgspec.Raw(raw_input), "attempt": record.attempts}
    if record.webhook:
        body["webhook"] = record.webhook
    if record.extra_json:
        try:
            extra = OBJECT_DECODER.decode(record.extra_json)
        except DecodeError:
            extra = {}
        for key, value in extra.items():
            if key not in ("id", "input", "attempt"):
                body[key] = value
    return _JSON.encode(body)


class HeldJob:
    """A job handed to a worker: its message, our view of its record, its stop state."""

    __slots__ = (
        "chunks",
        "claim",
        "claim_wanted",
        "deadline",
        "deferred",
        "done",
        "endpoint_id",
        "finishing",
        "job_id",
        "keepalive_at",
        "key",
        "lock",
        "msg",
        "payload",
        "record",
        "recycle_asked",
        "release",
        "revision",
        "stop_offered_at",
        "stop_reason",
        "stop_since",
        "taken_at",
        "timings",
        "worker",
    )

    def __init__(self, worker: Worker, msg: Msg, record: JobRecord, key: str, now: float) -> None:
        self.job_id = record.id
        self.endpoint_id = record.endpoint_id
        self.key = key
        self.worker = worker
        self.msg = msg
        self.record = record  # our latest view; valid once `claim` resolved True
        self.revision = 0
        self.claim: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.payload = b""
        self.taken_at = now
        # The worker's result is in: a claim not yet written goes into the terminal write.
        self.finishing = False
        # A first attempt's claim write waiting out RP_CLAIM_DELAY_MS (Jobs._defer_claim):
        # the timer that starts it, and the revision it will compare against.
        self.deferred: tuple[asyncio.TimerHandle, int] | None = None
        # Something awaits the claim (Jobs.claimed): it is not deferred any more.
        self.claim_wanted = False
        # Where this attempt's time went so far (runplane_proto.timings); goes out with the
        # claim write and, completed, with the terminal write.
        self.timings = record.timings
        # The job's own limit, else the endpoint's; none at all when both are 0.
        timeout_ms = record.policy.execution_timeout_ms or worker.spec.execution_timeout_ms
        self.deadline = now + timeout_ms / 1000 if timeout_ms > 0 else float("inf")
        self.keepalive_at = now
        self.stop_reason: str | None = None
        self.stop_since = 0.0
        self.stop_offered_at = 0.0
        self.recycle_asked = False
        self.chunks = 0
        self.lock = asyncio.Lock()
        self.done = False
        # What happens to the message when we let go of a job whose record is not ours to move.
        self.release: Release = "ack"


class Poll:
    """A worker's take in flight; interrupted (its task cancelled) unless it is claiming."""

    __slots__ = ("claiming", "task")

    def __init__(self, task: asyncio.Task | None = None) -> None:
        self.task = task
        self.claiming = False

    def interrupt(self) -> None:
        if self.task is not None and not self.claiming:
            self.task.cancel()




async def settle(msg: Msg, release: Release, *, delay_s: float | None = None) -> None:
    try:
        if release == "ack":
            await msg.ack()
        elif release == "nak":
            await msg.nak(delay=delay_s)
    except Exception as exc:  # already acked, or the connection is gone: JetStream redelivers
        log.debug("settling a queue message failed", error=repr(exc))


async def keep_alive(msgs: list[Msg]) -> None:
    """Tell JetStream we are still working on these (resets their ack_wait)."""
    for msg in msgs:
        try:
            await msg.in_progress()
        except Exception as exc:
            log.debug("in_progress failed", error=repr(exc))
