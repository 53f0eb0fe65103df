"""The gateway's parts put together, and its Starlette app (explicit routes and middleware)."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
import structlog

from runplane_bus import Bus, Conflict
from runplane_bus.topology import ensure_job_records_republish
from runplane_proto.ids import new_gateway_token
from runplane_service.clock import Clock
from runplane_service.metrics import metrics as metrics_endpoint
from runplane_gateway import dashboard, openapi
from runplane_gateway.auth import AuthMiddleware
from runplane_gateway.catalog import EndpointCatalog
from runplane_gateway.chunks import ChunkReader
from runplane_gateway.errors import EXCEPTION_HANDLERS, error_response, json_response
from runplane_gateway.dead_letters import DeadLetterApi
from runplane_gateway.idempotency import Idempotency
from runplane_gateway.jobs import Jobs
from runplane_gateway.keys import KeyRing
from runplane_gateway.keys_api import KeysApi
from runplane_gateway.limits import RateLimiter, RunningWorkers
from runplane_gateway.metrics import MetricsMiddleware
from runplane_gateway.routes_v1 import ManagementApi
from runplane_gateway.routes_v2 import ClientApi
from runplane_gateway.settings import GatewaySettings
from runplane_gateway.webhooks import WebhookSender
from runplane_gateway.waiters import SyncEnds
from runplane_gateway.wire import encoder

log = structlog.get_logger("runplane.gateway")


@dataclass
class Gateway:
    """Everything one gateway replica runs: `app` to serve, webhooks in the background."""

    bus: Bus
    settings: GatewaySettings
    catalog: EndpointCatalog
    jobs: Jobs
    webhooks: WebhookSender | None
    app: Starlette
    keys: KeyRing
    running_workers: RunningWorkers
    sync_ends: SyncEnds | None

    @classmethod
    async def start(cls, bus: Bus, settings: GatewaySettings, *, clock: Clock | None = None,
                    webhooks: bool = True) -> Gateway:
        clock = clock or Clock()
        catalog = EndpointCatalog(bus)
        await catalog.start()
        jobs = Jobs(bus, settings, clock)
        chunks = await ChunkReader.open(bus)
        keys = await KeyRing(bus, settings.api_key).start()
        workers = RunningWorkers(bus, now_ms=clock.now_ms, node_loss_timeout_s=settings.node_loss_timeout_s)
        limiter = RateLimiter(enabled=settings.rate_limits, running_workers=workers)
        idempotency = await Idempotency(bus, settings.idempotency_window_s, clock).start()
        sync_ends: SyncEnds | None = None
        try:
            if await ensure_job_records_republish(bus.js):  # a bucket made by an older version
                log.info("KV rp-jobs now republishes record writes (for /runsync)")
            sync_ends = await SyncEnds(bus.nc, new_gateway_token()).start()
        except Exception as exc:  # not allowed to change it (per-service NATS users)
            log.error("KV rp-jobs (made by an older version) does not republish record writes and "
                      "this gateway may not add that: /runsync waits with a subscription per request; "
                      "start a gateway once as the NATS admin user to add it", error=repr(exc))
        client = ClientApi(bus, catalog, jobs, chunks, limiter, settings, clock, sync_ends=sync_ends,
                           idempotency=idempotency)
        management = ManagementApi(bus, catalog, jobs, settings, clock)
        sender = None
        if webhooks:
            sender = WebhookSender(bus, jobs, settings)
            await sender.start()
        app = build_app(bus, settings, client, management, keys)
        return cls(bus=bus, settings=settings, catalog=catalog, jobs=jobs, webhooks=sender, app=app,
                   keys=keys, running_workers=workers, sync_ends=sync_ends)

    async def stop(self) -> None:
        if self.webhooks is not None:
            await self.webhooks.stop()
        await self.catalog.stop()
        await self.keys.stop()
        await self.running_workers.stop()
        if self.sync_ends is not None:
            await self.sync_ends.stop()


def build_app(bus: Bus, settings: GatewaySettings, client: ClientApi, management: ManagementApi,
              keys: KeyRing | None = None) -> Starlette:
    keys = keys or KeyRing(bus, settings.api_key)  # not started: the bootstrap key only
    keys_api = KeysApi(keys, management.clock)
    dead_letters = DeadLetterApi(bus, management.catalog, management.jobs, management.clock)

    async def healthz(_: Request) -> Response:
        if not bus.nc.is_connected:
            return error_response(503, "not connected to NATS")
        return json_response(b'{"status":"ok"}')

    async def on_conflict(_: Request, exc: Exception) -> Response:
        return error_response(409, "the record kept changing under concurrent updates; try again")

    routes = [
        *client.routes(),
        *management.routes(),
        *keys_api.routes(),
        *dead_letters.routes(),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        *dashboard.routes(),
    ]

    async def openapi_json(_: Request) -> Response:
        return json_response(spec)

    routes.append(Route("/openapi.json", openapi_json, methods=["GET"]))
    spec = encoder.encode(openapi.document(routes))  # every route, this one included
    middleware = [
        Middleware(MetricsMiddleware),
        Middleware(AuthMiddleware, keys=keys),
    ]
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={**EXCEPTION_HANDLERS, Conflict: on_conflict})
