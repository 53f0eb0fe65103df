"""The OpenAPI 3.1 document of the gateway's HTTP API (`GET /openapi.json`), built from the
app's own routes and the wire Structs (msgspec's JSON Schema): a route without an entry
here fails the build, so the document cannot silently fall behind the routes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from starlette.routing import Route

from runplane_gateway import dead_letters, keys_api, wire


# An http(s) URL with a host, or "" for none (what /run checks).
_WEBHOOK = r"^(https?://[A-Za-z0-9._~-]+([:/?#].*)?)?$"
# An idempotency key: 1-255 characters, none of them a control character.
_IDEMPOTENCY_KEY = r"^[^\u0000-\u001f\u007f-\u009f]{1,255}$"
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=_IDEMPOTENCY_KEY)]


class SubmitBody(msgspec.Struct, frozen=True):
    """A /run or /runsync body. Other top-level keys (e.g. `s3Config`) reach the worker as they are."""

    input: dict[str, Any] | list[Any] | str | int | float | bool  # anything but null
    webhook: Annotated[str, msgspec.Meta(pattern=_WEBHOOK)] | None = None
    policy: wire.SubmitPolicy | None = None
    # Same as the Idempotency-Key header (the two must agree when both are sent).
    idempotencyKey: IdempotencyKey | None = None


@dataclass(frozen=True)
class Op:
    summary: str
    tag: str
    response: Any = None  # a Struct or list[Struct]; None: no JSON body documented
    body: Any = None
    status: int = 200
    query: tuple[tuple[str, str | dict[str, Any], str], ...] = ()  # (name, JSON type or schema, description)
    auth: bool = True
    media_type: str = "application/json"
    extra: dict[str, Any] = field(default_factory=dict)
    headers: tuple[tuple[str, dict[str, Any], str], ...] = ()  # request headers (name, schema, description)
    errors: dict[str, str] = field(default_factory=dict)  # answers beyond _ERRORS


_JOB = ("job_id",)
_IDEMPOTENT = {
    "headers": (("Idempotency-Key", {"type": "string", "minLength": 1, "maxLength": 255,
                                     "pattern": _IDEMPOTENCY_KEY},
                 "a repeat with the same key (per endpoint and API key, within RP_IDEMPOTENCY_WINDOW_S) "
                 "answers the original job (header `Idempotent-Replayed: true`), queuing none"),),
    "errors": {"409": "Concurrent submits kept changing the idempotency key's entry",
               "422": "The idempotency key was used with another body"},
}
_DEAD_FILTERS = (
    ("since", {"type": "integer", "minimum": 0}, "only dead letters that failed at or after this time (ms)"),
    ("until", {"type": "integer", "minimum": 0}, "only dead letters that failed before this time (ms)"),
    ("error", "string", "only dead letters whose errors (final or of an attempt) contain this text"),
)
_WAIT = {"type": "integer", "minimum": 1000, "maximum": 300000}
OPS: dict[tuple[str, str], Op] = {
    ("/v2/{endpoint_id}/run", "post"): Op("Queue a job", "jobs", wire.JobRef, SubmitBody, **_IDEMPOTENT),
    ("/v2/{endpoint_id}/runsync", "post"): Op(
        "Run a job and wait for its result (or its id when `wait` runs out)", "jobs", wire.JobView,
        SubmitBody, query=(("wait", _WAIT, "milliseconds to wait, 1000-300000"),), **_IDEMPOTENT),
    ("/v2/{endpoint_id}/status/{job_id}", "get"): Op("A job's status and output", "jobs", wire.JobView),
    ("/v2/{endpoint_id}/status/{job_id}", "post"): Op("A job's status and output", "jobs", wire.JobView),
    ("/v2/{endpoint_id}/status-sync/{job_id}", "get"): Op(
        "A job's status, held until it ends or `wait` runs out", "jobs", wire.JobView,
        query=(("wait", _WAIT, "milliseconds to wait, 1000-300000"),)),
    ("/v2/{endpoint_id}/status-sync/{job_id}", "post"): Op(
        "A job's status, held until it ends or `wait` runs out", "jobs", wire.JobView,
        query=(("wait", _WAIT, "milliseconds to wait, 1000-300000"),)),
    ("/v2/{endpoint_id}/stream/{job_id}", "get"): Op("Stream chunks not returned before", "jobs",
                                                     wire.StreamView),
    ("/v2/{endpoint_id}/stream/{job_id}", "post"): Op("Stream chunks not returned before", "jobs",
                                                      wire.StreamView),
    ("/v2/{endpoint_id}/cancel/{job_id}", "post"): Op("Cancel a job", "jobs", wire.JobRef),
    ("/v2/{endpoint_id}/retry/{job_id}", "post"): Op("Queue a FAILED or TIMED_OUT job again", "jobs",
                                                     wire.JobRef),
    ("/v2/{endpoint_id}/purge-queue", "post"): Op("Cancel every queued job", "jobs", wire.PurgeView),
    ("/v2/{endpoint_id}/health", "get"): Op("Job and worker counts", "jobs", wire.HealthView),
    ("/v1/endpoints", "post"): Op("Create an endpoint", "endpoints", wire.EndpointView, wire.EndpointCreate,
                                  status=201),
    ("/v1/endpoints", "get"): Op("Every endpoint", "endpoints", list[wire.EndpointView]),
    ("/v1/endpoints/{endpoint_id}", "get"): Op("One endpoint", "endpoints", wire.EndpointView),
    ("/v1/endpoints/{endpoint_id}", "patch"): Op("Change the fields given", "endpoints", wire.EndpointView,
                                                 wire.EndpointPatch),
    ("/v1/endpoints/{endpoint_id}", "delete"): Op("Delete an endpoint (its queued jobs are cancelled)",
                                                  "endpoints", wire.Deleted),
    ("/v1/endpoints/{endpoint_id}/workers", "get"): Op(
        "The endpoint's workers: state (initializing, idle, running, parked, stopping), node, GPUs",
        "fleet", list[wire.WorkerView]),
    ("/v1/endpoints/{endpoint_id}/jobs", "get"): Op(
        "Recent jobs, newest first, with status and timings", "fleet", list[wire.JobSummary],
        query=(("limit", {"type": "integer", "minimum": 0, "maximum": 1000},
                "at most this many (default 50, at most 1000)"),
               ("status", "string", "only jobs in this status"))),
    ("/v1/endpoints/{endpoint_id}/logs", "get"): Op(
        "The last lines the endpoint's workers printed (each node agent keeps a few hundred per worker)",
        "fleet", wire.LogsView,
        query=(("after", "string", "the `cursor` of an earlier answer: only newer lines"),
               ("worker", "string", "only this worker's lines"),
               ("limit", {"type": "integer", "minimum": 0, "maximum": 1000},
                "at most this many lines (default 200, at most 1000)"))),
    ("/v1/endpoints/{endpoint_id}/dead-letters", "get"): Op(
        "Jobs that ended FAILED or TIMED_OUT (newest first, without input), with every attempt's error, "
        "worker and node", "dead letters", dead_letters.DeadLetterPage,
        query=(*_DEAD_FILTERS,
               ("limit", {"type": "integer", "minimum": 0, "maximum": 1000},
                "at most this many (default 100, at most 1000)"),
               ("after", {"type": "string", "pattern": dead_letters.CURSOR_PATTERN},
                "the `next` of an earlier answer: the page after it"))),
    ("/v1/endpoints/{endpoint_id}/dead-letters", "delete"): Op(
        "Delete the dead letters the filters select (all without filters)", "dead letters",
        dead_letters.DeadLettersDeleted, query=_DEAD_FILTERS),
    ("/v1/endpoints/{endpoint_id}/dead-letters/replay", "post"): Op(
        "Replay dead letters as new jobs with the same input (on this or another endpoint): the ones "
        "named, else every one the filters select", "dead letters", dead_letters.DeadLettersReplayed,
        dead_letters.DeadLetterReplayRequest),
    ("/v1/endpoints/{endpoint_id}/dead-letters/{job_id}", "get"): Op(
        "One dead letter with its input", "dead letters", dead_letters.DeadLetterView),
    ("/v1/endpoints/{endpoint_id}/dead-letters/{job_id}", "delete"): Op(
        "Delete one dead letter", "dead letters", wire.Deleted),
    ("/v1/nodes", "get"): Op("Nodes: inventory, GPUs free or held and by whom, workers", "fleet",
                             list[wire.NodeView]),
    ("/v1/keys", "post"): Op(
        "Create an API key (admin keys only); the answer holds its secret, shown only this once", "keys",
        keys_api.KeyCreated, keys_api.KeyCreate, status=201),
    ("/v1/keys", "get"): Op("Every API key, without secrets (admin keys only)", "keys",
                            list[keys_api.KeyView]),
    ("/v1/keys/{key_id}", "get"): Op("One API key, without its secret (admin keys only)", "keys",
                                     keys_api.KeyView),
    ("/v1/keys/{key_id}", "delete"): Op("Revoke an API key: refused (401) on every replica within moments",
                                        "keys", wire.Deleted),
    ("/healthz", "get"): Op("Liveness (connected to NATS)", "service", auth=False),
    ("/metrics", "get"): Op("Prometheus metrics", "service", auth=False, media_type="text/plain"),
    ("/openapi.json", "get"): Op("This document", "service", auth=False),
    ("/", "get"): Op("Redirects to the dashboard", "dashboard", auth=False, status=307, media_type=""),
    ("/dashboard", "get"): Op("The dashboard (sign in with the API key)", "dashboard", auth=False,
                              media_type="text/html"),
    ("/dashboard/app.js", "get"): Op("The dashboard's script", "dashboard", auth=False,
                                     media_type="text/javascript"),
    ("/dashboard/style.css", "get"): Op("The dashboard's style sheet", "dashboard", auth=False,
                                        media_type="text/css"),
}

_REF = "#/components/schemas/{name}"
_ERRORS = {"400": "Bad request", "401": "Missing, unknown or revoked API key",
           "403": "The API key may not do this (another endpoint's, or an admin's task)",
           "404": "Unknown endpoint, job or API key",
           "429": "Over a rate limit", "503": "The message bus is unavailable"}


def served(routes: list[Route]) -> list[tuple[str, str]]:
    """(path, method) of every route the app serves, HEAD left out."""
    return [(route.path, method.lower()) for route in routes for method in sorted(route.methods or ())
            if method != "HEAD"]


def document(routes: list[Route]) -> dict[str, Any]:
    missing = [f"{method.upper()} {path}" for path, method in served(routes) if (path, method) not in OPS]
    if missing:
        raise RuntimeError(f"routes without an OpenAPI entry in openapi.py: {', '.join(missing)}")
    types = [op.response for op in OPS.values() if op.response is not None] + \
            [op.body for op in OPS.values() if op.body is not None] + [wire.ErrorBody]
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    schema_of = dict(zip(map(_type_key, types), schemas))
    paths: dict[str, dict[str, Any]] = {}
    for path, method in served(routes):
        op = OPS[(path, method)]
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in _path_params(path)]
        params += [{"name": name, "in": "query", "required": False,
                    "schema": kind if isinstance(kind, dict) else {"type": kind},
                    "description": text} for name, kind, text in op.query]
        params += [{"name": name, "in": "header", "required": False, "schema": schema, "description": text}
                   for name, schema, text in op.headers]
        content = ({op.media_type: {"schema": schema_of[_type_key(op.response)]}} if op.response is not None
                   else {op.media_type: {}} if op.media_type else None)
        responses: dict[str, Any] = {str(op.status): {"description": "OK" if op.status < 300 else "Redirect"}}
        if content:
            responses[str(op.status)]["content"] = content
        if op.auth:
            error = {"application/json": {"schema": {"$ref": _REF.format(name="ErrorBody")}}}
            responses.update({code: {"description": text, "content": error}
                              for code, text in {**_ERRORS, **op.errors}.items()})
        entry: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                                 "operationId": _operation_id(path, method), "responses": responses}
        if params:
            entry["parameters"] = params
        if op.body is not None:
            entry["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": schema_of[_type_key(op.body)]}}}
        if not op.auth:
            entry["security"] = []
        paths.setdefault(path, {})[method] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "Runplane gateway", "version": "1",
                 "description": "RunPod-compatible client API (/v2) and Runplane's management API (/v1)."},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"apiKey": {
                "type": "http", "scheme": "bearer",
                "description": "An API key: the bootstrap admin key RP_API_KEY or one made with "
                               "POST /v1/keys (the bare key is accepted too)"}},
        },
        "security": [{"apiKey": []}],
    }


def _type_key(tp: Any) -> str:
    return repr(tp)


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def _operation_id(path: str, method: str) -> str:
    words = [part.strip("{}").replace("-", "_").replace(".", "_") for part in path.split("/") if part]
    return "_".join([method, *(words or ["root"])])
