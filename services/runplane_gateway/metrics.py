"""The gateway's Prometheus metrics, and a plain ASGI middleware counting requests."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("rp_gateway_requests_total", "HTTP requests answered", ["route", "status"])
REQUEST_SECONDS = Histogram(
    "rp_gateway_request_seconds", "Time to answer an HTTP request", ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 120, 300),
)
JOBS_SUBMITTED = Counter("rp_gateway_jobs_submitted_total", "Jobs accepted", ["kind"])
RUNSYNC_WAITS_EXPIRED = Counter("rp_gateway_runsync_waits_expired_total",
                                "/runsync answers given before the job finished")
JOBS_ENDED = Counter("rp_gateway_jobs_ended_total", "Jobs the gateway made terminal", ["status", "reason"])
STREAM_CHUNKS = Counter("rp_gateway_stream_chunks_total", "Stream chunks returned by /stream")
WEBHOOKS = Counter("rp_gateway_webhooks_total", "Webhook deliveries by outcome", ["outcome"])
WEBHOOK_ATTEMPTS = Counter("rp_gateway_webhook_attempts_total", "Webhook POSTs made")
DROPPED = Counter("rp_gateway_dropped_messages_total", "Bus messages that failed to decode", ["subject"])


class MetricsMiddleware:
    """Counts every HTTP request by route (the handler's name) and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            endpoint = scope.get("endpoint")
            route = getattr(endpoint, "__name__", None) or ("auth" if status == 401 else "unmatched")
            REQUESTS.labels(route, str(status)).inc()
            REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)
