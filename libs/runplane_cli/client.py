"""The gateway's HTTP API as the CLI uses it: `RP_URL` + `RP_API_KEY`, errors as `CliError`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


class CliError(Exception):
    """Shown as `error: <message>`; the command exits with status 1."""


def default_api_key() -> str | None:
    """RP_API_KEY, else the key `runplane up` generated into its data directory."""
    key = os.environ.get("RP_API_KEY")
    if key:
        return key
    path = Path(os.environ.get("RP_DATA_DIR", "./.runplane")) / "api-key"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class Gateway:
    def __init__(self, url: str, api_key: str | None, *, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
             timeout_s: float | None = None) -> Any:
        try:
            resp = self.http.request(method, path, json=json, params=params,
                                     timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the gateway at {self.url}: {exc}") from None
        if resp.status_code == 401:
            raise CliError("the gateway refused the API key: set RP_API_KEY (or --api-key)")
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400:
            message = body.get("error") if isinstance(body, dict) else None
            raise CliError(f"{message or resp.text.strip() or 'failed'} (HTTP {resp.status_code})")
        return body

    def get(self, path: str, **params: Any) -> Any:
        return self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Any:
        return self.call("POST", path, json=body, **kwargs)

    def endpoint_id(self, name_or_id: str) -> str:
        """An endpoint id, given its id or its (unique) name."""
        endpoints = self.get("/v1/endpoints")
        if any(ep["id"] == name_or_id for ep in endpoints):
            return name_or_id
        named = [ep["id"] for ep in endpoints if ep["name"] == name_or_id]
        if len(named) == 1:
            return named[0]
        if named:
            raise CliError(f"{len(named)} endpoints are named {name_or_id!r}: use an id ({', '.join(named)})")
        raise CliError(f"no endpoint with the id or name {name_or_id!r}")
