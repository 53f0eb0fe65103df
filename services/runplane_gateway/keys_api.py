"""`/v1/keys`: make, list, read and revoke API keys (admin keys only; the auth middleware
refuses the others). A key's secret is in the answer to its creation and nowhere after."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runplane_proto.ids import EndpointId, is_valid_id
from runplane_proto.keys import ApiKey
from runplane_service.clock import Clock
from runplane_gateway.errors import ApiError, json_response
from runplane_gateway.keys import KeyRing, new_key_id, new_secret, secret_hash, secret_prefix
from runplane_gateway.limits import read_body
from runplane_gateway.request_fields import decode_json
from runplane_gateway.wire import Deleted, encoder

MAX_BODY_BYTES = 256 * 1024
MAX_ENDPOINTS = 1000
# 1-256 characters, no control characters.
KeyName = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]


class AdminKeyCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="scope", tag="admin"):
    """An admin key: everything the bootstrap key may do, key management included."""

    name: KeyName


class EndpointKeyCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="scope",
                        tag="endpoint"):
    """A key for the /v2 API of `endpoints` (every endpoint when empty or absent) and reads of
    them under /v1/endpoints; never endpoint changes, nodes or key management."""

    name: KeyName
    endpoints: Annotated[list[EndpointId], msgspec.Meta(max_length=MAX_ENDPOINTS)] = []


KeyCreate = AdminKeyCreate | EndpointKeyCreate


class KeyView(msgspec.Struct, frozen=True):
    id: str
    name: str
    prefix: str
    scope: Literal["admin", "endpoint"]
    endpoints: list[str]
    createdAtMs: int


class KeyCreated(KeyView, frozen=True):
    """A new key. `key` is its secret, shown here only: keep it (only its hash is stored)."""

    key: str


_decoder = msgspec.json.Decoder(KeyCreate)


def key_view(record: ApiKey) -> KeyView:
    return KeyView(id=record.id, name=record.name, prefix=record.prefix, scope=record.scope,
                   endpoints=list(record.endpoint_ids), createdAtMs=record.created_at_ms)


def record_from(body: bytes, key_id: str, secret: str, now_ms: int) -> ApiKey:
    """The stored record of a new key from the request body (400 naming the problem)."""
    create = decode_json(body, _decoder)
    endpoints = sorted(set(create.endpoints)) if isinstance(create, EndpointKeyCreate) else []
    return ApiKey(id=key_id, name=create.name, prefix=secret_prefix(key_id),
                  secret_sha256=secret_hash(secret.encode()),
                  scope="admin" if isinstance(create, AdminKeyCreate) else "endpoint",
                  endpoint_ids=endpoints, created_at_ms=now_ms)


class KeysApi:
    def __init__(self, ring: KeyRing, clock: Clock) -> None:
        self.ring = ring
        self.clock = clock

    def routes(self) -> list[Route]:
        return [
            Route("/v1/keys", self.create_key, methods=["POST"]),
            Route("/v1/keys", self.list_keys, methods=["GET"]),
            Route("/v1/keys/{key_id}", self.get_key, methods=["GET"]),
            Route("/v1/keys/{key_id}", self.revoke_key, methods=["DELETE"]),
        ]

    async def create_key(self, request: Request) -> Response:
        body = await read_body(request, MAX_BODY_BYTES, "v1/keys")
        key_id = new_key_id()
        secret = new_secret(key_id)
        record = record_from(body, key_id, secret, self.clock.now_ms())
        await self.ring.add(record)
        view = key_view(record)
        created = KeyCreated(**msgspec.structs.asdict(view), key=secret)
        return json_response(encoder.encode(created), 201)

    async def list_keys(self, _: Request) -> Response:
        return json_response(encoder.encode([key_view(r) for r in self.ring.records()]))

    async def get_key(self, request: Request) -> Response:
        return json_response(encoder.encode(key_view(self._known(request.path_params["key_id"]))))

    async def revoke_key(self, request: Request) -> Response:
        record = self._known(request.path_params["key_id"])
        await self.ring.revoke(record.id)
        return json_response(encoder.encode(Deleted(id=record.id)))

    def _known(self, key_id: str) -> ApiKey:
        record = self.ring.get(key_id) if is_valid_id(key_id) else None
        if record is None:
            raise ApiError(404, f"API key {key_id[:128]!r} not found")
        return record
