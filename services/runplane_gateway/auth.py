"""API-key auth as a plain ASGI middleware: `Authorization: Bearer <key>` or the bare key."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from runplane_gateway.wire import ErrorBody, encoder

# Paths under these prefixes need the key; /metrics and /healthz do not.
PROTECTED_PREFIXES = ("/v1/", "/v2/")
_UNAUTHORIZED = encoder.encode(ErrorBody(error="missing or invalid API key in the Authorization header"))


def presented_key(header: bytes) -> bytes:
    """The key in an Authorization header value: after `Bearer `, else the whole value."""
    header = header.strip()
    if header[:7].lower() == b"bearer ":
        return header[7:].strip()
    return header


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"authorization":
                if hmac.compare_digest(presented_key(value), self.key):
                    await self.app(scope, receive, send)
                    return
                break
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(_UNAUTHORIZED)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]})
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})


def _protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES) or path in ("/v1", "/v2")
