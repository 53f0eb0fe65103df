"""What a client sent to the management API, read into typed values: a JSON body decoded into its
Struct, bounded integer query parameters. Every problem is a 400 naming it."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from starlette.requests import Request

from runplane_gateway.errors import ApiError, validation_message
from runplane_gateway.limits import read_body

T = TypeVar("T")
D = TypeVar("D", int, None)


def decode_json(body: bytes, decoder: msgspec.json.Decoder[T], *, context: str = "") -> T:
    """`body` decoded by `decoder`; else 400 naming the bad field, or the JSON error, after
    `context: ` when given."""
    lead = f"{context}: " if context else ""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ApiError(400, lead + validation_message(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"{lead}invalid JSON body: {exc}") from None


async def decoded_body(request: Request, decoder: msgspec.json.Decoder[T], *, cap_bytes: int, op: str,
                       context: str = "") -> T:
    """The request's body (413 over `cap_bytes`, named /`op`) through decode_json."""
    return decode_json(await read_body(request, cap_bytes, op), decoder, context=context)


def query_int(request: Request, name: str, *, default: D, most: int | None = None, meaning: str) -> int | D:
    """The query parameter `name` as an integer from 0 to `most`; `default` when absent or empty;
    else 400: "`name` must be `meaning`, got ..."."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0 or (most is not None and value > most):
        raise ApiError(400, f"{name} must be {meaning}, got {raw[:50]!r}")
    return value
