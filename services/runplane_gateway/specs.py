"""Endpoint specs from the management API's JSON (RunPod's field names) and back.

`env` values may be secrets (tokens, passwords): every answer shows them as `ENV_MASK`, and
workers get the real values (they read the spec from KV). A PATCH whose `env` gives
`ENV_MASK` for a variable keeps that variable's stored value, so an answer can be edited and
sent back."""

from __future__ import annotations

import msgspec
from msgspec import UNSET

from runplane_proto.endpoints import EndpointSpec
from runplane_proto.windows import window_problem
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
    "prewarmWorkers": "prewarm_workers", "warmWindows": "warm_windows",
    "predictivePrewarm": "predictive_prewarm", "weight": "weight", "gpuQuota": "gpu_quota",
}
assert set(_SPEC_FIELDS) == ENDPOINT_FIELDS

ENV_MASK = "***"


def spec_from_create(body: bytes, endpoint_id: str, now_ms: int) -> EndpointSpec:
    create = _decode(body, _create_decoder)
    masked = sorted(name for name, value in create.env.items() if value == ENV_MASK)
    if masked:
        raise ApiError(400, f"env: {masked[0][:64]} is {ENV_MASK!r}, what answers show in place of values; "
                            "give the real value")
    spec = EndpointSpec(
        id=endpoint_id, created_at_ms=now_ms, updated_at_ms=now_ms,
        **{spec_name: getattr(create, wire_name) for wire_name, spec_name in _SPEC_FIELDS.items()},
    )
    return _checked(spec)


def spec_with_patch(spec: EndpointSpec, body: bytes, now_ms: int) -> EndpointSpec:
    patch = _decode(body, _patch_decoder)
    changes = {spec_name: value for wire_name, spec_name in _SPEC_FIELDS.items()
               if (value := getattr(patch, wire_name)) is not UNSET}
    if "env" in changes:
        changes["env"] = env_with_masks_kept(spec.env, changes["env"])
    return _checked(msgspec.structs.replace(spec, updated_at_ms=now_ms, **changes))


def env_with_masks_kept(stored: dict[str, str], given: dict[str, str]) -> dict[str, str]:
    """The new env of a PATCH: a variable given as the mask keeps its stored value."""
    env = {}
    for name, value in given.items():
        if value == ENV_MASK:
            if name not in stored:
                raise ApiError(400, f"env: {name[:64]} is {ENV_MASK!r} (keep the stored value) but has no "
                                    "stored value; give the real value")
            value = stored[name]
        env[name] = value
    return env


def view(spec: EndpointSpec) -> EndpointView:
    """What answers show: every field, `env` values masked."""
    fields = {wire_name: getattr(spec, spec_name) for wire_name, spec_name in _SPEC_FIELDS.items()}
    fields["env"] = dict.fromkeys(spec.env, ENV_MASK)
    return EndpointView(id=spec.id, createdAtMs=spec.created_at_ms, updatedAtMs=spec.updated_at_ms, **fields)


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


# What a worker's environment and argv may hold in all: far below what a process may be
# started with (execve: 128 KiB per string, ~2 MiB in all) and what one NATS message carries.
ENV_MAX_BYTES = 64 * 1024
COMMAND_MAX_BYTES = 64 * 1024
MAX_GPU_TYPES = 16
IMAGE_NAME_MAX = 512


def _checked(spec: EndpointSpec) -> EndpointSpec:
    if spec.workers_min > spec.workers_max:
        raise ApiError(400, f"workersMin must be <= workersMax (got {spec.workers_min} > {spec.workers_max})")
    if spec.prewarm_workers > spec.workers_max:
        raise ApiError(400, f"prewarmWorkers must be <= workersMax (got {spec.prewarm_workers} > "
                            f"{spec.workers_max})")
    for i, window in enumerate(spec.warm_windows):
        if (problem := window_problem(window)) is not None:
            raise ApiError(400, f"warmWindows[{i}]: {problem}")
        if window.workers > spec.workers_max:
            raise ApiError(400, f"warmWindows[{i}]: workers must be <= workersMax (got {window.workers} > "
                                f"{spec.workers_max})")
    if spec.gpu_quota and spec.gpu_quota < spec.gpu_count:
        raise ApiError(400, f"gpuQuota must be 0 (no cap) or at least gpuCount (got {spec.gpu_quota} < "
                            f"{spec.gpu_count}): no worker could ever start")
    if (spec.warm_windows or spec.predictive_prewarm) and not spec.flashboot:
        raise ApiError(400, "warmWindows and predictivePrewarm keep parked flash workers: they need "
                            "flashboot: true")
    if not spec.command and not spec.image_name:
        raise ApiError(400, "an endpoint needs a command or an imageName")
    if spec.image_name is not None and not spec.image_name.strip():
        raise ApiError(400, "imageName must not be empty")
    if any(not part for part in spec.command[:1]):
        raise ApiError(400, "command must not start with an empty string")
    _check_strings(spec)
    return spec


def _check_strings(spec: EndpointSpec) -> None:
    """What a node could not start a worker with, refused here with the field named, rather
    than accepted and failing on every node later."""
    if _control(spec.name):
        raise ApiError(400, "name: must not contain control characters")
    image = spec.image_name
    if image is not None and (len(image) > IMAGE_NAME_MAX or _control(image)
                              or any(c.isspace() for c in image)):
        raise ApiError(400, f"imageName: an image reference of at most {IMAGE_NAME_MAX} characters, "
                            "without spaces or control characters")
    if any("\x00" in part for part in spec.command):
        raise ApiError(400, "command: arguments must not contain NUL characters")
    if (size := sum(len(part.encode()) + 1 for part in spec.command)) > COMMAND_MAX_BYTES:
        raise ApiError(400, f"command: {size} bytes in all, over the {COMMAND_MAX_BYTES // 1024} KiB limit")
    for name, value in spec.env.items():
        if not name or "=" in name or "\x00" in name:
            raise ApiError(400, f"env: invalid variable name {name[:64]!r} (non-empty, no '=' or NUL)")
        if "\x00" in value:
            raise ApiError(400, f"env: the value of {name[:64]} contains a NUL character")
    if (size := sum(len(k.encode()) + len(v.encode()) + 2 for k, v in spec.env.items())) > ENV_MAX_BYTES:
        raise ApiError(400, f"env: {size} bytes in all, over the {ENV_MAX_BYTES // 1024} KiB limit")
    if len(spec.gpu_type_ids) > MAX_GPU_TYPES:
        raise ApiError(400, f"gpuTypeIds: at most {MAX_GPU_TYPES} GPU types (got {len(spec.gpu_type_ids)})")
    if any(not t.strip() or len(t) > 128 or _control(t) for t in spec.gpu_type_ids):
        raise ApiError(400, "gpuTypeIds: each a GPU name of 1-128 characters, e.g. \"H100\" or \"A100\"")


def _control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)
