"""The gateway's parts put together, and its Starlette app (explicit routes and middleware)."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runplane_bus import Bus, Conflict
from runplane_service.clock import Clock
from runplane_service.metrics import metrics as metrics_endpoint
from runplane_gateway import dashboard, openapi
from runplane_gateway.auth import AuthMiddleware
from runplane_gateway.catalog import EndpointCatalog
from runplane_gateway.chunks import ChunkReader
from runplane_gateway.errors import EXCEPTION_HANDLERS, error_response, json_response
from runplane_gateway.jobs import Jobs
from runplane_gateway.limits import RateLimiter
from runplane_gateway.metrics import MetricsMiddleware
from runplane_gateway.routes_v1 import ManagementApi
from runplane_gateway.routes_v2 import ClientApi
from runplane_gateway.settings import GatewaySettings
from runplane_gateway.webhooks import WebhookSender
from runplane_gateway.wire import encoder


@dataclass
class Gateway:
    """Everything one gateway replica runs: `app` to serve, webhooks in the background."""

    bus: Bus
    settings: GatewaySettings
    catalog: EndpointCatalog
    jobs: Jobs
    webhooks: WebhookSender | None
    app: Starlette

    @classmethod
    async def start(cls, bus: Bus, settings: GatewaySettings, *, clock: Clock | None = None,
                    webhooks: bool = True) -> Gateway:
        clock = clock or Clock()
        catalog = EndpointCatalog(bus)
        await catalog.start()
        jobs = Jobs(bus, settings, clock)
        chunks = await ChunkReader.open(bus)
        limiter = RateLimiter(enabled=settings.rate_limits)
        client = ClientApi(bus, catalog, jobs, chunks, limiter, settings, clock)
        management = ManagementApi(bus, catalog, jobs, settings, clock)
        sender = None
        if webhooks:
            sender = WebhookSender(bus, jobs, settings)
            await sender.start()
        app = build_app(bus, settings, client, management)
        return cls(bus=bus, settings=settings, catalog=catalog, jobs=jobs, webhooks=sender, app=app)

    async def stop(self) -> None:
        if self.webhooks is not None:
            await self.webhooks.stop()
        await self.catalog.stop()


def build_app(bus: Bus, settings: GatewaySettings, client: ClientApi, management: ManagementApi) -> Starlette:
    async def healthz(_: Request) -> Response:
        if not bus.nc.is_connected:
            return error_response(503, "not connected to NATS")
        return json_response(b'{"status":"ok"}')

    async def on_conflict(_: Request, exc: Exception) -> Response:
        return error_response(409, "the record kept changing under concurrent updates; try again")

    routes = [
        *client.routes(),
        *management.routes(),
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
        Middleware(AuthMiddleware, api_key=settings.api_key),
    ]
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={**EXCEPTION_HANDLERS, Conflict: on_conflict})
