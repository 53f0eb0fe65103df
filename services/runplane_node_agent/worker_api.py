"""The worker-facing HTTP protocol (what `runpod.serverless.start` talks to).

Paths mirror RunPod's: /v2/{endpoint}/job-take/{worker}, job-take-batch, job-stop,
job-done/{worker}/{job}, job-stream/{worker}/{job}, ping/{worker}. Every call carries
the worker's own token as a bare key in Authorization. Bodies are JSON whatever the
content type says. "No work" is always 204 after the long-poll, never 404/500.
"""

from __future__ import annotations

import asyncio
import hmac

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runplane_node_agent import metrics
from runplane_node_agent.node_metrics import dispatched
from runplane_node_agent.held import HeldJob, Poll
from runplane_node_agent.jobs import Jobs
from runplane_node_agent.supervisor import Supervisor, Worker

log = structlog.get_logger("runplane.node_agent.worker_api")

# More concurrent takes than this from one worker is a misbehaving client: 429 (back off 5 s).
_MAX_POLLS_PER_WORKER = 8
_MAX_BATCH = 256
_JSON = "application/json"
_NO_CONTENT = Response(status_code=204)


def _error(status: int, message: str) -> Response:
    metrics.WORKER_REQUESTS_REJECTED.labels(code=str(status)).inc()
    return Response(b'{"error":"' + message.encode() + b'"}', status_code=status, media_type=_JSON)


_OK = b"{}"
_ERRORS = {400: "body must be a JSON object", 404: "job is not held by this worker",
           413: "stream chunk too large"}


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
        if worker is None or not key or not hmac.compare_digest(key.encode(), worker.token.encode()):
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
        if not taken:
            return _NO_CONTENT
        if gone:  # the worker hung up while its jobs were being claimed
            await self.jobs.give_back(taken)
            return _NO_CONTENT
        for held in taken:
            dispatched(held.endpoint_id, held.record.submitted_at_ms, held.record.started_at_ms)
        if as_list:
            body = b"[" + b",".join(h.payload for h in taken) + b"]"
        else:
            body = taken[0].payload
        return Response(body, media_type=_JSON)

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
        body = await request.body()
        return _reply(await self.jobs.result(worker, request.path_params["job_id"], body))

    async def stream(self, request: Request) -> Response:
        worker = self._worker(request)
        if isinstance(worker, Response):
            return worker
        body = await request.body()
        return _reply(await self.jobs.chunk(worker, request.path_params["job_id"], body))

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


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the request body, if any, is read and dropped)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
