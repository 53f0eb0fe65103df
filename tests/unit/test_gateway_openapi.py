"""GET /openapi.json lists every route the gateway serves and is a valid OpenAPI 3.1 document."""

from __future__ import annotations

from openapi_spec_validator import validate
from starlette.testclient import TestClient

from runplane_gateway.app import build_app
from runplane_gateway.openapi import OPS, document, served
from runplane_gateway.routes_v1 import ManagementApi
from runplane_gateway.routes_v2 import ClientApi
from runplane_gateway.settings import GatewaySettings

SETTINGS = GatewaySettings(api_key="k")


def app():
    # The routes need no bus until a request reaches a handler that uses it.
    client = ClientApi(None, None, None, None, None, SETTINGS, None, sync_ends=None)  # type: ignore[arg-type]
    management = ManagementApi(None, None, None, SETTINGS, None)  # type: ignore[arg-type]
    return build_app(None, SETTINGS, client, management)  # type: ignore[arg-type]


def test_the_document_lists_every_route_and_validates():
    gateway = app()
    with TestClient(gateway) as http:
        resp = http.get("/openapi.json")  # no key needed
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    spec = resp.json()
    validate(spec)  # raises on an invalid OpenAPI document
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    routes = set(served(gateway.routes))
    assert routes == documented
    for path in ("/v1/nodes", "/v1/endpoints/{endpoint_id}/workers", "/v1/endpoints/{endpoint_id}/jobs",
                 "/v1/endpoints/{endpoint_id}/logs", "/v2/{endpoint_id}/runsync", "/dashboard", "/metrics"):
        assert path in spec["paths"]
    node = spec["components"]["schemas"]["NodeView"]
    assert {"gpus", "gpusFree", "gpusUsed", "workers", "lost"} <= set(node["properties"])
    assert spec["paths"]["/v1/endpoints"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/EndpointCreate"}
    assert spec["paths"]["/healthz"]["get"]["security"] == []


def test_an_undocumented_route_fails_the_build():
    from starlette.routing import Route

    async def handler(_):
        return None

    try:
        document([Route("/v1/secret", handler, methods=["GET"])])
    except RuntimeError as exc:
        assert "GET /v1/secret" in str(exc)
    else:
        raise AssertionError("an undocumented route was accepted")
    assert ("/v1/nodes", "get") in OPS
