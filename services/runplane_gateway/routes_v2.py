"""The client API, RunPod's `/v2/{endpoint_id}/...`: run, runsync, status, stream, cancel,
retry, purge-queue, health (and the JS SDK's status-sync)."""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import urlsplit

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runplane_bus import Bus
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.ids import is_valid_id, new_job_id
from runplane_proto.jobs import JobPolicy, JobRecord, is_terminal
from runplane_service.clock import Clock
from runplane_gateway import metrics
from runplane_gateway.catalog import EndpointCatalog
from runplane_gateway.chunks import ChunkReader
from runplane_gateway.errors import ApiError, json_response, validation_message
from runplane_gateway.health import pending_placement, worker_counts
from runplane_gateway.idempotency import BODY_FIELD, HEADER, Claim, Idempotency, body_digest, client_key
from runplane_gateway.jobs import MISSING_RECORD_GRACE_MS, Jobs
from runplane_gateway.keys import access_in
from runplane_gateway.limits import RateLimiter, read_body
from runplane_gateway.settings import GatewaySettings
from runplane_gateway.waiters import JobWaiter, SyncEnds, wait_for_end
from runplane_gateway.wire import (
    DEFAULT_TTL_MS, HealthView, JobRef, PurgeView, StreamView, SubmitPolicy, body_decoder, encoder,
)

WAIT_MIN_MS = 1_000
WAIT_MAX_MS = 300_000
_policy_decoder = msgspec.json.Decoder(SubmitPolicy)
_webhook_decoder = msgspec.json.Decoder(str | None)


class Submission(NamedTuple):
    input_raw: bytes
    policy: JobPolicy
    webhook: str | None
    extra_json: bytes | None
    # The `idempotencyKey` body field as sent (checked with the header by idempotency.client_key).
    idempotency_key: msgspec.Raw | None = None


def parse_submission(body: bytes, spec: EndpointSpec) -> Submission:
    """A /run or /runsync body: `input` (any JSON value, required) kept raw, `webhook`,
    `policy`, and every other top-level key (e.g. `s3Config`) kept raw for the worker."""
    try:
        fields = body_decoder.decode(body)
    except msgspec.ValidationError:
        raise ApiError(400, "the body must be a JSON object with an input") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"invalid JSON body: {exc}") from None
    raw_input = fields.pop("input", None)
    if raw_input is None:
        raise ApiError(400, "input is required: send {\"input\": ...}")
    input_raw = bytes(raw_input)
    if input_raw == b"null":
        raise ApiError(400, "input must not be null")
    idempotency_key = fields.pop(BODY_FIELD, None)
    webhook = _webhook(fields.pop("webhook", None))
    policy = _policy(fields.pop("policy", None), spec)
    extra_json = None
    if fields:
        extra_json = b"{" + b",".join(encoder.encode(k) + b":" + bytes(v) for k, v in fields.items()) + b"}"
    return Submission(input_raw, policy, webhook, extra_json, idempotency_key)


def _webhook(raw: msgspec.Raw | None) -> str | None:
    if raw is None:
        return None
    try:
        url = _webhook_decoder.decode(raw)
    except msgspec.ValidationError:
        raise ApiError(400, "webhook must be a URL string") from None
    if url is None or url == "":
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"webhook must be an http(s) URL, got {url[:200]!r}")
    return url


def _policy(raw: msgspec.Raw | None, spec: EndpointSpec) -> JobPolicy:
    given = SubmitPolicy()
    if raw is not None and bytes(raw) != b"null":
        try:
            given = _policy_decoder.decode(raw)
        except msgspec.ValidationError as exc:
            whole = _whole_numbers(bytes(raw))
            try:
                if whole is None:
                    raise exc
                given = _policy_decoder.decode(whole)
            except msgspec.ValidationError as final:
                raise ApiError(400, validation_message(final, "policy")) from None
    return JobPolicy(
        execution_timeout_ms=given.executionTimeout or spec.execution_timeout_ms,
        ttl_ms=given.ttl or DEFAULT_TTL_MS,
        low_priority=given.lowPriority,
    )


def _whole_numbers(raw: bytes) -> bytes | None:
    """The object with whole numbers written as floats (`60000.0`, an integer to JSON and to
    JSON Schema) made integers; None when there are none."""
    try:
        fields = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    if not isinstance(fields, dict):
        return None
    floats = {k: int(v) for k, v in fields.items() if isinstance(v, float) and v.is_integer()}
    return msgspec.json.encode({**fields, **floats}) if floats else None


def _wait_ms(request: Request, default_ms: int) -> int:
    raw = request.query_params.get("wait")
    if raw is None or raw == "":
        return default_ms
    try:
        wait_ms = int(raw)
    except ValueError:
        wait_ms = -1
    if not WAIT_MIN_MS <= wait_ms <= WAIT_MAX_MS:
        raise ApiError(400, f"wait must be milliseconds between {WAIT_MIN_MS} and {WAIT_MAX_MS}, "
                            f"got {raw!r}")
    return wait_ms


class ClientApi:
    def __init__(self, bus: Bus, catalog: EndpointCatalog, jobs: Jobs, chunks: ChunkReader,
                 limiter: RateLimiter, settings: GatewaySettings, clock: Clock, *,
                 sync_ends: SyncEnds | None, idempotency: Idempotency | None = None) -> None:
        self.bus = bus
        self.catalog = catalog
        self.jobs = jobs
        self.chunks = chunks
        self.limiter = limiter
        self.settings = settings
        self.clock = clock
        self.idempotency = idempotency
        self.sync_ends = sync_ends

    def routes(self) -> list[Route]:
        read = ["GET", "POST"]
        return [
            Route("/v2/{endpoint_id}/run", self.run, methods=["POST"]),
            Route("/v2/{endpoint_id}/runsync", self.runsync, methods=["POST"]),
            Route("/v2/{endpoint_id}/status/{job_id}", self.status, methods=read),
            Route("/v2/{endpoint_id}/status-sync/{job_id}", self.status_sync, methods=read),
            Route("/v2/{endpoint_id}/stream/{job_id}", self.stream, methods=read),
            Route("/v2/{endpoint_id}/cancel/{job_id}", self.cancel, methods=["POST"]),
            Route("/v2/{endpoint_id}/retry/{job_id}", self.retry, methods=["POST"]),
            Route("/v2/{endpoint_id}/purge-queue", self.purge_queue, methods=["POST"]),
            Route("/v2/{endpoint_id}/health", self.health, methods=["GET"]),
        ]

    async def run(self, request: Request) -> Response:
        spec = await self._endpoint(request)
        with self.limiter.hold(spec.id, "run"):
            body = await read_body(request, self.settings.max_body_run_bytes, "run")
            sub = parse_submission(body, spec)
            job_id = new_job_id()
            claim = await self._claim(request, spec, body, sub, job_id, sync=False)
            if claim is not None and not claim.ours:
                return await self._repeat_run(spec.id, claim)
            record = await self._submit(spec, job_id, sub, sync=False, claim=claim)
        return json_response(encoder.encode(JobRef(id=record.id, status=record.status)))

    async def runsync(self, request: Request) -> Response:
        spec = await self._endpoint(request)
        wait_ms = _wait_ms(request, self.settings.runsync_wait_ms)
        with self.limiter.hold(spec.id, "runsync"):
            body = await read_body(request, self.settings.max_body_runsync_bytes, "runsync")
            sub = parse_submission(body, spec)
            job_id = new_job_id(sync=True, gateway=self.sync_ends and self.sync_ends.token)
            claim = await self._claim(request, spec, body, sub, job_id, sync=True)
            if claim is not None and not claim.ours:
                return await self._repeat_runsync(spec.id, claim, wait_ms)
            done = await self._submit_and_wait(spec, job_id, sub, claim, wait_ms)
            if done is not None:
                return json_response(await self.jobs.view(done))
            metrics.RUNSYNC_WAITS_EXPIRED.inc()
            return await self._latest(spec.id, job_id, None)

    async def status(self, request: Request) -> Response:
        endpoint_id, job_id = request.path_params["endpoint_id"], request.path_params["job_id"]
        with self.limiter.hold(endpoint_id, "status"):
            record = await self._job(endpoint_id, job_id)
            return json_response(await self.jobs.view(record))

    async def status_sync(self, request: Request) -> Response:
        """The JS SDK's long-poll: /status, held until the job is terminal or `wait` runs out."""
        endpoint_id, job_id = request.path_params["endpoint_id"], request.path_params["job_id"]
        wait_ms = _wait_ms(request, self.settings.runsync_wait_ms)
        with self.limiter.hold(endpoint_id, "status"):
            if not is_valid_id(job_id):
                raise _unknown_job(job_id)
            async with JobWaiter(self.bus.nc, job_id) as waiter:
                record = await self._job(endpoint_id, job_id)
                if not is_terminal(record.status):
                    done = await waiter.wait(wait_ms / 1000)
                    record = done if done is not None else await self._job(endpoint_id, job_id)
            return json_response(await self.jobs.view(record))

    async def stream(self, request: Request) -> Response:
        endpoint_id, job_id = request.path_params["endpoint_id"], request.path_params["job_id"]
        with self.limiter.hold(endpoint_id, "stream"):
            # The record first: once it is terminal, every chunk is already stored.
            record = await self._job(endpoint_id, job_id)
            chunks = await self.chunks.drain(job_id)
            view = StreamView(id=record.id, status=record.status, stream=chunks)
            return json_response(encoder.encode(view))

    async def cancel(self, request: Request) -> Response:
        endpoint_id, job_id = request.path_params["endpoint_id"], request.path_params["job_id"]
        with self.limiter.hold(endpoint_id, "cancel"):
            record = await self.jobs.cancel(endpoint_id, job_id)
            if record is None:
                raise _unknown_job(job_id)
            return json_response(encoder.encode(JobRef(id=record.id, status=record.status)))

    async def retry(self, request: Request) -> Response:
        spec = await self._endpoint(request)
        job_id = request.path_params["job_id"]
        record = await self.jobs.retry(spec, job_id)
        if record is None:
            raise _unknown_job(job_id)
        return json_response(encoder.encode(JobRef(id=record.id, status=record.status)))

    async def purge_queue(self, request: Request) -> Response:
        spec = await self._endpoint(request)
        with self.limiter.hold(spec.id, "purge-queue"):
            removed = await self.jobs.purge(spec.id)
        return json_response(encoder.encode(PurgeView(removed=removed)))

    async def health(self, request: Request) -> Response:
        spec = await self._endpoint(request)
        jobs = await self.jobs.count(spec.id)
        workers = await worker_counts(self.bus, spec.id, now_ms=self.clock.now_ms(),
                                      node_loss_timeout_s=self.settings.node_loss_timeout_s)
        placement = await pending_placement(self.bus, spec.id)
        if placement is not None:
            workers.throttled = placement.pendingWorkers
        return json_response(encoder.encode(HealthView(jobs=jobs, workers=workers, placement=placement)))

    # -- idempotent submits --------------------------------------------------------------------

    async def _claim(self, request: Request, spec: EndpointSpec, body: bytes, sub: Submission,
                     job_id: str, *, sync: bool) -> Claim | None:
        """With an idempotency key: the key's entry (ours, or the first submit's); else None."""
        key = client_key(request.headers.get(HEADER), sub.idempotency_key)
        if key is None or self.idempotency is None:
            return None
        scope = access_in(request).key_id or "bootstrap"
        return await self.idempotency.claim(spec.id, scope, key, digest=body_digest(body), job_id=job_id,
                                            sync=sync)

    async def _submit(self, spec: EndpointSpec, job_id: str, sub: Submission, *, sync: bool,
                      claim: Claim | None) -> JobRecord:
        """Queue the job: 429 when the queue is full (checked after the idempotency key, so a
        repeat, which queues nothing, is answered even then); a key's entry is let go when
        nothing was queued, so a repeat may try again."""
        try:
            await self.jobs.check_queue_cap(spec.id)
            return await self.jobs.submit(spec, job_id, input_raw=sub.input_raw, sync=sync, policy=sub.policy,
                                          webhook=sub.webhook, extra_json=sub.extra_json)
        except BaseException:
            if claim is not None and self.idempotency is not None:
                await self.idempotency.release(claim)
            raise

    async def _submit_and_wait(self, spec: EndpointSpec, job_id: str, sub: Submission, claim: Claim | None,
                               wait_ms: int) -> JobRecord | None:
        """Queue a /runsync job and wait for its end: the terminal record, or None."""
        if self.sync_ends is None:  # an rp-jobs without the republish: a subscription of its own
            async with JobWaiter(self.bus.nc, job_id) as waiter:
                await self._submit(spec, job_id, sub, sync=True, claim=claim)
                return await waiter.wait(wait_ms / 1000)
        ending = self.sync_ends.expect(job_id)
        try:
            await self._submit(spec, job_id, sub, sync=True, claim=claim)
            return await wait_for_end(ending, wait_ms / 1000)
        finally:
            self.sync_ends.forget(job_id)

    async def _repeat_run(self, endpoint_id: str, claim: Claim) -> Response:
        """/run again with a key already used: the original job's `{id, status}`."""
        record = await self.jobs.read(endpoint_id, claim.entry.job_id)
        status = record.status if record is not None else self._status_without_record(claim)
        return _replayed(json_response(encoder.encode(JobRef(id=claim.entry.job_id, status=status))))

    async def _repeat_runsync(self, endpoint_id: str, claim: Claim, wait_ms: int) -> Response:
        """/runsync again with a key already used: wait for the original job like the first did."""
        job_id = claim.entry.job_id
        async with JobWaiter(self.bus.nc, job_id) as waiter:
            record = await self.jobs.read(endpoint_id, job_id)
            if record is None:
                status = self._status_without_record(claim)
                return _replayed(json_response(encoder.encode(JobRef(id=job_id, status=status))))
            if not is_terminal(record.status):
                done = await waiter.wait(wait_ms / 1000)
                if done is None:
                    return _replayed(await self._latest(endpoint_id, job_id, waiter.latest))
                record = done
        return _replayed(json_response(await self.jobs.view(record)))

    def _status_without_record(self, claim: Claim) -> str:
        """The original job's record is not there: still being written by the first submit (just
        made), or deleted after its result retention (EXPIRED: the key still stands for it)."""
        young = self.clock.now_ms() - claim.entry.created_at_ms < MISSING_RECORD_GRACE_MS
        return "IN_QUEUE" if young else "EXPIRED"

    # -- internals ----------------------------------------------------------------------------

    async def _endpoint(self, request: Request) -> EndpointSpec:
        endpoint_id = request.path_params["endpoint_id"]
        spec = await self.catalog.get(endpoint_id) if is_valid_id(endpoint_id) else None
        if spec is None:
            raise ApiError(404, f"endpoint {endpoint_id!r} not found")
        return spec

    async def _job(self, endpoint_id: str, job_id: str) -> JobRecord:
        record = await self.jobs.read(endpoint_id, job_id)
        if record is None:
            raise _unknown_job(job_id)
        return record

    async def _latest(self, endpoint_id: str, job_id: str, seen: JobRecord | None) -> Response:
        """/runsync after its wait ran out: the job object if it just finished, else `{id, status}`."""
        record = await self.jobs.read(endpoint_id, job_id) or seen
        if record is not None and is_terminal(record.status):
            return json_response(await self.jobs.view(record))
        status = record.status if record is not None else "IN_QUEUE"
        return json_response(encoder.encode(JobRef(id=job_id, status=status)))


def _replayed(response: Response) -> Response:
    """Mark an answer given for a repeated idempotency key (as Stripe does)."""
    response.headers["Idempotent-Replayed"] = "true"
    return response


def _unknown_job(job_id: str) -> ApiError:
    return ApiError(404, f"job {job_id!r} not found")
