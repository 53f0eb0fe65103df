"""The dashboard: static HTML, CSS and JS (no build step, nothing fetched from elsewhere)
served at `/dashboard`. The page asks for the admin API key and calls the API with it, so
the files themselves need no auth."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

STATIC = Path(__file__).with_name("static")
_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
# The page's own files only; connect-src 'self' for the API.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _file(name: str):
    body = (STATIC / name).read_bytes()
    media_type = _FILES[name]

    async def serve(_: Request) -> Response:
        return Response(body, media_type=media_type, headers=_HEADERS)

    serve.__name__ = f"dashboard_{name.replace('.', '_')}"
    return serve


async def to_dashboard(_: Request) -> Response:
    return RedirectResponse("/dashboard", status_code=307)


def routes() -> list[Route]:
    return [
        Route("/", to_dashboard, methods=["GET"]),
        Route("/dashboard", _file("index.html"), methods=["GET"]),
        Route("/dashboard/app.js", _file("app.js"), methods=["GET"]),
        Route("/dashboard/style.css", _file("style.css"), methods=["GET"]),
    ]
