"""API-key auth as a plain ASGI middleware: `Authorization: Bearer <key>` or the bare key.

An unknown, revoked or missing key is refused with 401; a known key asking for something
outside its scope (another endpoint, key management with an endpoint key) with 403 naming
what it may not do. The caller's `Access` is left in `request.state.access` for the routes
(the endpoint list shows an endpoint key only its endpoints)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from runplane_gateway.keys import STATE_KEY, KeyRing, refusal
from runplane_gateway.wire import ErrorBody, encoder

# Paths under these prefixes need a key; /metrics and /healthz do not.
PROTECTED_PREFIXES = ("/v1/", "/v2/")
_UNAUTHORIZED = encoder.encode(ErrorBody(
    error="missing, unknown or revoked API key in the Authorization header"))


def presented_key(header: bytes) -> bytes:
    """The key in an Authorization header value: after `Bearer `, else the whole value."""
    header = header.strip()
    if header[:7].lower() == b"bearer ":
        return header[7:].strip()
    return header


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        access = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                presented = presented_key(value)
                access = self.keys.check(presented)
                if access is None:  # a key made through another replica a moment ago?
                    access = await self.keys.check_unheard(presented)
                break
        if access is None:
            await _refuse(send, 401, _UNAUTHORIZED, [(b"www-authenticate", b"Bearer")])
            return
        problem = refusal(access, scope["method"], scope["path"])
        if problem is not None:
            await _refuse(send, 403, encoder.encode(ErrorBody(error=problem)), [])
            return
        scope = {**scope, "state": {**scope.get("state", {}), STATE_KEY: access}}
        await self.app(scope, receive, send)


async def _refuse(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers,
    ]})
    await send({"type": "http.response.body", "body": body})


def _protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIXES) or path in ("/v1", "/v2")
