"""Endpoint specs from the management API's JSON (RunPod's field names) and back."""

from __future__ import annotations

import msgspec
from msgspec import UNSET

from runplane_proto.endpoints import EndpointSpec
from runplane_gateway.errors import ApiError, validation_message
from runplane_gateway.wire import (
    ENDPOINT_FIELDS, EndpointCreate, EndpointPatch, EndpointView, body_decoder, encoder,
)

_create_decoder = msgspec.json.Decoder(EndpointCreate)
_patch_decoder = msgspec.json.Decoder(EndpointPatch)

# wire name -> EndpointSpec field
_SPEC_FIELDS = {
    "name": "name", "imageName": "image_name", "command": "command", "env": "env",
    "workersMin": "workers_min", "workersMax": "workers_max", "idleTimeout": "idle_timeout_s",
    "scalerType": "scaler_type", "scalerValue": "scaler_value", "flashboot": "flashboot",
    "gpuCount": "gpu_count", "gpuTypeIds": "gpu_type_ids", "executionTimeoutMs": "execution_timeout_ms",
}
assert set(_SPEC_FIELDS) == ENDPOINT_FIELDS


def spec_from_create(body: bytes, endpoint_id: str, now_ms: int) -> EndpointSpec:
    create = _decode(body, _create_decoder)
    spec = EndpointSpec(
        id=endpoint_id, created_at_ms=now_ms, updated_at_ms=now_ms,
        **{spec_name: getattr(create, wire_name) for wire_name, spec_name in _SPEC_FIELDS.items()},
    )
    return _checked(spec)


def spec_with_patch(spec: EndpointSpec, body: bytes, now_ms: int) -> EndpointSpec:
    patch = _decode(body, _patch_decoder)
    changes = {spec_name: value for wire_name, spec_name in _SPEC_FIELDS.items()
               if (value := getattr(patch, wire_name)) is not UNSET}
    return _checked(msgspec.structs.replace(spec, updated_at_ms=now_ms, **changes))


def view(spec: EndpointSpec) -> EndpointView:
    return EndpointView(
        id=spec.id, createdAtMs=spec.created_at_ms, updatedAtMs=spec.updated_at_ms,
        **{wire_name: getattr(spec, spec_name) for wire_name, spec_name in _SPEC_FIELDS.items()},
    )


def view_bytes(spec: EndpointSpec) -> bytes:
    return encoder.encode(view(spec))


def _decode(body: bytes, decoder: msgspec.json.Decoder) -> object:
    try:
        fields = body_decoder.decode(body)
    except msgspec.ValidationError:
        raise ApiError(400, "the body must be a JSON object") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"invalid JSON body: {exc}") from None
    unknown = sorted(set(fields) - ENDPOINT_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown fields: {', '.join(unknown)}")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(400, validation_message(exc)) from None


def _checked(spec: EndpointSpec) -> EndpointSpec:
    if spec.workers_min > spec.workers_max:
        raise ApiError(400, f"workersMin must be <= workersMax (got {spec.workers_min} > {spec.workers_max})")
    if not spec.command and not spec.image_name:
        raise ApiError(400, "an endpoint needs a command or an imageName")
    if spec.image_name is not None and not spec.image_name.strip():
        raise ApiError(400, "imageName must not be empty")
    if any(not part for part in spec.command[:1]):
        raise ApiError(400, "command must not start with an empty string")
    return spec
