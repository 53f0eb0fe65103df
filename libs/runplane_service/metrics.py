"""Prometheus `/metrics` and `/healthz` for services that have no HTTP app of their own."""

from __future__ import annotations

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
