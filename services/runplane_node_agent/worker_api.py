"""The worker-facing HTTP protocol (what `runpod.serverless.start` talks to).

Paths mirror RunPod's: /v2/{endpoint}/job-take/{worker}, job-take-batch, job-stop,
job-done/{worker}/{job}, job-stream/{worker}/{job}, ping/{worker}. Every call carries
the worker's own token as a bare key in Authorization. Bodies are JSON whatever the
content type says. "No work" is always 204 after the long-poll, never 404/500.
"""

from __future__ import annotations

import asyncio
import hmac

import msgspec
import structlog
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runplane_node_agent import metrics
from runplane_node_agent.node_metrics import dispatched
from runplane_node_agent.held import RESULT_DECODER, HeldJob, Poll
from runplane_node_agent.jobs import Jobs
from runplane_node_agent.supervisor import Supervisor, Worker

log = structlog.get_logger("runplane.node_agent.worker_api")

# More concurrent takes than this from one worker is a misbehaving client: 429 (back off 5 s).
_MAX_POLLS_PER_WORKER = 8
_MAX_BATCH = 256
# Body limits: a result as large as the biggest /runsync input (RunPod's 20 MB), one stream
# chunk as large as one NATS message (RunPod's 1 MB).
MAX_RESULT_BYTES = 20 * 1024 * 1024
MAX_CHUNK_BYTES = 1024 * 1024
_JSON = "application/json"
_NO_CONTENT = Response(status_code=204)
_encoder = msgspec.json.Encoder()


def _error(status: int, message: str) -> Response:
    metrics.WORKER_REQUESTS_REJECTED.labels(code=str(status)).inc()
    return Response(_encoder.encode({"error": message}), status_code=status, media_type=_JSON)


_OK = b"{}"
_ERRORS = {400: "body must be a JSON object", 404: "job is not held by this worker (unknown, finished, "
           "or another worker's)", 413: "stream chunk over the 1 MB limit"}


class WorkerApi:
    def __init__(self, supervisor: Supervisor, jobs: Jobs) -> None:
        self.supervisor = supervisor
        self.jobs = jobs

    def routes(self) -> list[Route]:
        prefix = "/v2/{endpoint_id}"
        return [
            Route(prefix + "/job-take/{worker_id}", self.take, methods=["GET", "POST"]),
            Route(prefix + "/job-take-batch/{worker_id}", self.take_batch, methods=["GET", "POST"]),
            Route(prefix + "/job-stop/{worker_id}", self.stop, methods=["GET", "POST"]),
            Route(prefix + "/job-done/{worker_id}/{job_id}", self.done, methods=["POST"]),
            Route(prefix + "/job-stream/{worker_id}/{job_id}", self.stream, methods=["POST"]),
            Route(prefix + "/ping/{worker_id}", self.ping, methods=["GET", "POST"]),
        ]

    def _worker(self, request: Request) -> Worker | Response:
        params = request.path_params
        worker = self.supervisor.workers.get(params["worker_id"])
        key = request.headers.get("authorization", "")
        key = key.removeprefix("Bearer ")
        if not key:
            return _error(401, "missing Authorization header (the worker's RUNPOD_AI_API_KEY)")
        if worker is None or not hmac.compare_digest(key.encode(), worker.token.encode()):
            return _error(401, "unknown worker or bad key")
        if worker.endpoint_id != params["endpoint_id"]:
            return _error(403, "worker does not belong to this endpoint")
        return worker

    async def take(self, request: Request) -> Response:
        return await self._take(request, 1)

    async def take_batch(self, request: Request) -> Response:
        try:
            batch = int(request.query_params.get("batch_size", "1"))
        except ValueError:
            return _error(400, "batch_size must be an integer")
        return await self._take(request, min(max(batch, 1), _MAX_BATCH), as_list=True)

    async def _take(self, request: Request, batch: int, as_list: bool = False) -> Response:
        worker = self._worker(request)
        if isinstance(worker, Response):
            return worker
        if len(worker.polls) >= _MAX_POLLS_PER_WORKER:
            return _error(429, "too many concurrent takes")
        in_progress = request.query_params.get("job_in_progress")
        poll = Poll()
        task = asyncio.ensure_future(self.jobs.take(
            worker, batch, poll, holds_jobs=None if in_progress is None else in_progress != "0"))
        poll.task = task
        worker.polls.add(poll)
        watcher = asyncio.ensure_future(_disconnected(request))
        watcher.add_done_callback(lambda _: poll.interrupt())
        taken: list[HeldJob] = []
        try:
            taken = await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
        except Exception as exc:  # NATS trouble: hold a moment so the SDK does not spin
            log.warning("take failed", worker_id=worker.worker_id, error=repr(exc))
            await asyncio.sleep(1)
        finally:
            worker.polls.discard(poll)
            gone = watcher.done() and not watcher.cancelled()
            watcher.cancel()
        # Flash boot: a paused worker is resumed right after its answer is sent, so that it
        # finds the answer waiting when it thaws (its own take timeout is far off: a poll
        # lasts RP_TAKE_POLL_S at most).
        flash = self.supervisor.flash
        wake = BackgroundTask(flash.wake, worker) if flash.needs_wake(worker) else None
        if gone and taken:  # the worker hung up while its jobs were being claimed
            await self.jobs.give_back(taken)
            taken = []
        if not taken:
            return _NO_CONTENT if wake is None else Response(status_code=204, background=wake)
        for held in taken:
            dispatched(held.endpoint_id, held.record.submitted_at_ms, held.record.started_at_ms)
        if as_list:
            body = b"[" + b",".join(h.payload for h in taken) + b"]"
        else:
            body = taken[0].payload
        return Response(body, media_type=_JSON, background=wake)

    async def stop(self, request: Request) -> Response:
        worker = self._worker(request)
        if isinstance(worker, Response):
            return worker
        ids = await self.jobs.stops.poll(worker)
        if not ids:
            return _NO_CONTENT
        return Response(b'{"jobsToStop":["' + '","'.join(ids).encode() + b'"]}', media_type=_JSON)

    async def done(self, request: Request) -> Response:
        worker = self._worker(request)
        if isinstance(worker, Response):
            return worker
        job_id = request.path_params["job_id"]
        body = await _read(request, MAX_RESULT_BYTES)
        if body is None:  # refused, and said so in the job: a lost result must not look like success
            await self.jobs.result_too_large(worker, job_id, "20 MB")
            return _error(413, "result over the 20 MB limit of job-done; the job is FAILED")
        status = await self.jobs.result(worker, job_id, body) if _utf8(body) else 400
        if status == 400:
            return _error(400, f"job-done {_json_problem(body)}")
        # One turn of the loop first: the NATS flusher the job's end woke writes it out before
        # this answer is, so a /runsync waiting for the job hears of it as early as possible.
        await asyncio.sleep(0)
        return _reply(status)

    async def stream(self, request: Request) -> Response:
        worker = self._worker(request)
        if isinstance(worker, Response):
            return worker
        body = await _read(request, MAX_CHUNK_BYTES)
        if body is None:
            return _reply(413)
        status = await self.jobs.chunk(worker, request.path_params["job_id"], body) if _utf8(body) else 400
        if status == 400:
            return _error(400, f"job-stream {_json_problem(body)}")
        return _reply(status)

    async def ping(self, request: Request) -> Response:
        worker = self._worker(request)
        if isinstance(worker, Response):
            return worker
        query = request.query_params
        job_ids = frozenset(j for j in query.get("job_id", "").split(",") if j)
        detail = f"check={query.get('check', '')} reason={query.get('reason', '')}"
        self.supervisor.pinged(worker, job_ids, query.get("runpod_version"), query.get("status"), detail)
        self.jobs.stops.ping(worker, job_ids)
        return Response(_OK, media_type=_JSON)


def _reply(status: int) -> Response:
    if status == 200:
        return Response(_OK, media_type=_JSON)
    return _error(status, _ERRORS.get(status, "rejected"))


async def _read(request: Request, cap_bytes: int) -> bytes | None:
    """The body, or None once it is over `cap_bytes` (by its Content-Length or its real size)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap_bytes:
        return None
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap_bytes:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _utf8(body: bytes) -> bool:
    """JSON is UTF-8; a result or chunk that is not would make the job's /status unreadable
    (inputs and outputs are spliced into answers as they are)."""
    try:
        body.decode()
    except UnicodeDecodeError:
        return False
    return True


def _json_problem(body: bytes) -> str:
    """Why a body was refused: the JSON text the SDK sends whatever its content type says."""
    if not _utf8(body):
        return "body must be a JSON object in UTF-8"
    try:
        RESULT_DECODER.decode(body)
    except msgspec.DecodeError as exc:
        return f"body must be a JSON object ({str(exc)[:200]})"
    return "body must be a JSON object"


async def on_http_error(_: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer JSON too (a worker logs the body)."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _error(404, "no such worker API path: /v2/{endpoint}/job-take|job-take-batch|job-stop/"
                           "{worker}, job-done|job-stream/{worker}/{job}, ping/{worker}")
    if exc.status_code == 405:
        return _error(405, "method not allowed")
    return _error(exc.status_code, str(exc.detail))


EXCEPTION_HANDLERS = {HTTPException: on_http_error}


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the request body, if any, is read and dropped)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
