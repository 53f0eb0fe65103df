"""msgpack on the bus. One encoder; one prebuilt decoder per message type or union."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


def encode(msg: Any) -> bytes:
    return _encoder.encode(msg)


class Codec(Generic[T]):
    """A prebuilt decoder for one type (a Struct or a tagged union)."""

    def __init__(self, type_: Any) -> None:
        self.type = type_
        self._decoder = msgspec.msgpack.Decoder(type_)

    def decode(self, data: bytes) -> T:
        """Decode or raise msgspec.DecodeError / ValidationError."""
        return self._decoder.decode(data)


DecodeError = (msgspec.DecodeError, msgspec.ValidationError)
