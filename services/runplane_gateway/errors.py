"""API errors: every failure is a JSON `{"error": "..."}` with its HTTP status."""

from __future__ import annotations

import msgspec
import nats.errors
import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

log = structlog.get_logger("runplane.gateway")

_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """Raised anywhere under a route; rendered as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers  # e.g. Retry-After on a 429


def json_response(body: bytes, status: int = 200) -> Response:
    return Response(body, status_code=status, media_type="application/json")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode({"error": message}), status_code=status, media_type="application/json",
                    headers=headers)


def validation_message(exc: msgspec.ValidationError, prefix: str = "") -> str:
    """msgspec's "Expected `int` >= 1 - at `$.scalerValue`" as "scalerValue: expected `int` >= 1"."""
    text = str(exc)
    what, sep, where = text.rpartition(" - at `")
    if not sep:
        what, path = text, ""
    else:
        path = where.rstrip("`")
    path = path[2:] if path.startswith("$.") else path.lstrip("$")
    field = ".".join(p for p in (prefix, path) if p)
    what = f"{what[:1].lower()}{what[1:]}"
    return f"{field}: {what}" if field else what


async def on_api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.headers)


async def on_http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = "not found"
    elif exc.status_code == 405:
        message = "method not allowed"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, dict(exc.headers) if exc.headers else None)


async def on_bus_error(request: Request, exc: Exception) -> Response:
    log.warning("bus unavailable", path=request.url.path, error=repr(exc))
    return error_response(503, f"message bus unavailable: {type(exc).__name__}")


async def on_internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error", path=request.url.path, exc_info=exc)
    return error_response(500, "internal error")


EXCEPTION_HANDLERS = {
    ApiError: on_api_error,
    HTTPException: on_http_error,
    nats.errors.Error: on_bus_error,
    Exception: on_internal_error,
}
