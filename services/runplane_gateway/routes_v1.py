"""The management API: `/v1/endpoints` (create, list, get, patch, delete), and what runs:
`/v1/nodes`, an endpoint's workers, recent jobs and worker logs."""

from __future__ import annotations

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runplane_bus import Bus
from runplane_proto import subjects
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.ids import is_valid_id, new_endpoint_id
from runplane_service.clock import Clock
from runplane_gateway import fleet, specs
from runplane_gateway.catalog import EndpointCatalog
from runplane_gateway.errors import ApiError, json_response
from runplane_gateway.job_list import MAX_LIMIT as MAX_JOBS, recent_jobs
from runplane_gateway.jobs import Jobs
from runplane_gateway.keys import access_in
from runplane_gateway.limits import read_body
from runplane_gateway.request_fields import query_int
from runplane_gateway.settings import GatewaySettings
from runplane_gateway.wire import Deleted, encoder
from runplane_gateway.worker_logs import MAX_LIMIT as MAX_LOG_LINES, decode_cursor, endpoint_logs

log = structlog.get_logger("runplane.gateway.v1")

MAX_SPEC_BYTES = 1024 * 1024


class ManagementApi:
    def __init__(self, bus: Bus, catalog: EndpointCatalog, jobs: Jobs, settings: GatewaySettings,
                 clock: Clock) -> None:
        self.bus = bus
        self.catalog = catalog
        self.jobs = jobs
        self.settings = settings
        self.clock = clock

    def routes(self) -> list[Route]:
        return [
            Route("/v1/endpoints", self.create_endpoint, methods=["POST"]),
            Route("/v1/endpoints", self.list_endpoints, methods=["GET"]),
            Route("/v1/endpoints/{endpoint_id}", self.get_endpoint, methods=["GET"]),
            Route("/v1/endpoints/{endpoint_id}", self.patch_endpoint, methods=["PATCH"]),
            Route("/v1/endpoints/{endpoint_id}", self.delete_endpoint, methods=["DELETE"]),
            Route("/v1/endpoints/{endpoint_id}/workers", self.list_workers, methods=["GET"]),
            Route("/v1/endpoints/{endpoint_id}/jobs", self.list_jobs, methods=["GET"]),
            Route("/v1/endpoints/{endpoint_id}/logs", self.worker_logs, methods=["GET"]),
            Route("/v1/nodes", self.list_nodes, methods=["GET"]),
        ]

    async def create_endpoint(self, request: Request) -> Response:
        body = await read_body(request, MAX_SPEC_BYTES, "v1/endpoints")
        spec = specs.spec_from_create(body, new_endpoint_id(), self.clock.now_ms())
        # The queue's consumer first: a job accepted right after this answer must find it.
        await self.bus.ensure_job_consumer(spec.id, ack_wait_s=self.settings.ack_wait_s)
        await self.bus.endpoints.create(subjects.endpoint_key(spec.id), spec)
        self.catalog.remember(spec)
        log.info("endpoint created", endpoint_id=spec.id, name=spec.name)
        return json_response(specs.view_bytes(spec), 201)

    async def list_endpoints(self, request: Request) -> Response:
        access = access_in(request)  # an endpoint key sees only its endpoints
        found = [spec async for _, spec in self.bus.endpoints.items() if access.may_use(spec.id)]
        found.sort(key=lambda s: (s.created_at_ms, s.id))
        return json_response(encoder.encode([specs.view(s) for s in found]))

    async def get_endpoint(self, request: Request) -> Response:
        spec = await self._stored(request.path_params["endpoint_id"])
        return json_response(specs.view_bytes(spec))

    async def patch_endpoint(self, request: Request) -> Response:
        endpoint_id = request.path_params["endpoint_id"]
        body = await read_body(request, MAX_SPEC_BYTES, "v1/endpoints")
        await self._stored(endpoint_id)
        now_ms = self.clock.now_ms()
        problem: ApiError | None = None

        def change(spec: EndpointSpec) -> EndpointSpec | None:
            nonlocal problem
            try:
                return specs.spec_with_patch(spec, body, now_ms)
            except ApiError as exc:
                problem = exc
                return None

        result = await self.bus.endpoints.modify(subjects.endpoint_key(endpoint_id), change)
        if problem is not None:
            raise problem
        if result is None:
            raise _unknown(endpoint_id)
        self.catalog.remember(result.value)
        log.info("endpoint changed", endpoint_id=endpoint_id)
        return json_response(specs.view_bytes(result.value))

    async def delete_endpoint(self, request: Request) -> Response:
        endpoint_id = request.path_params["endpoint_id"]
        await self._stored(endpoint_id)
        # Queued jobs would never run: cancel them (as purge-queue does) before the queue goes.
        purged = await self.jobs.purge(endpoint_id)
        await self.bus.endpoints.delete(subjects.endpoint_key(endpoint_id))
        self.catalog.forget(endpoint_id)
        await self.bus.delete_job_consumer(endpoint_id)
        log.info("endpoint deleted", endpoint_id=endpoint_id, purged_jobs=purged)
        return json_response(encoder.encode(Deleted(id=endpoint_id)))

    async def list_nodes(self, _: Request) -> Response:
        found = await fleet.nodes(self.bus, now_ms=self.clock.now_ms(),
                                  node_loss_timeout_s=self.settings.node_loss_timeout_s)
        return json_response(encoder.encode(found))

    async def list_workers(self, request: Request) -> Response:
        spec = await self._stored(request.path_params["endpoint_id"])
        found = await fleet.workers(self.bus, spec.id, now_ms=self.clock.now_ms(),
                                    node_loss_timeout_s=self.settings.node_loss_timeout_s)
        return json_response(encoder.encode(found))

    async def list_jobs(self, request: Request) -> Response:
        spec = await self._stored(request.path_params["endpoint_id"])
        limit = _limit(request, default=50, most=MAX_JOBS)
        status = request.query_params.get("status") or None
        found = await recent_jobs(self.bus, spec.id, self.settings, now_ms=self.clock.now_ms(), limit=limit,
                                  status=status.upper() if status else None)
        return json_response(encoder.encode(found))

    async def worker_logs(self, request: Request) -> Response:
        spec = await self._stored(request.path_params["endpoint_id"])
        worker_id = request.query_params.get("worker") or None
        if worker_id is not None and not is_valid_id(worker_id):
            raise ApiError(400, f"worker: invalid worker id {worker_id!r}")
        view = await endpoint_logs(
            self.bus, spec.id, worker_id=worker_id, after=decode_cursor(request.query_params.get("after")),
            limit=_limit(request, default=200, most=MAX_LOG_LINES), now_ms=self.clock.now_ms(),
            node_loss_timeout_s=self.settings.node_loss_timeout_s,
        )
        return json_response(encoder.encode(view))

    async def _stored(self, endpoint_id: str) -> EndpointSpec:
        found = await self.bus.endpoints.get(endpoint_id) if is_valid_id(endpoint_id) else None
        if found is None:
            raise _unknown(endpoint_id)
        return found.value


def _limit(request: Request, *, default: int, most: int) -> int:
    return query_int(request, "limit", default=default, most=most, meaning=f"an integer between 0 and {most}")


def _unknown(endpoint_id: str) -> ApiError:
    return ApiError(404, f"endpoint {endpoint_id!r} not found")
