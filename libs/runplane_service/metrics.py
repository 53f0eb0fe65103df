"""Prometheus `/metrics` and `/healthz` for services that have no HTTP app of their own."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def metrics(_: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def healthz(_: Request) -> Response:
    return JSONResponse({"status": "ok"})


METRICS_ROUTES = [Route("/metrics", metrics), Route("/healthz", healthz)]


def metrics_app() -> Starlette:
    return Starlette(routes=list(METRICS_ROUTES))


async def serve_metrics(host: str, port: int, stop: asyncio.Event) -> int:
    """Serve /metrics and /healthz until `stop`; returns the bound port (0 picks a free one)."""
    import structlog

    from runplane_service.lifecycle import bound_port, serve_http

    server = await serve_http(metrics_app(), host, port, stop)
    bound = bound_port(server)
    structlog.get_logger("runplane.metrics").info("metrics listening", url=f"http://{host}:{bound}/metrics")
    return bound
