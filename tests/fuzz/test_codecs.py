"""Every payload type of the bus contract, decoded from arbitrary bytes and arbitrary msgpack:
the decoder either returns a message or raises the codec's DecodeError, never anything else
(which is what lets every subscriber catch exactly that, count it and drop the message)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runplane_proto import subjects as s
from runplane_proto.codec import Codec, DecodeError, encode
from runplane_proto.nodes import CommandReply

pytestmark = pytest.mark.fuzz

CODECS = [Codec(channel.payload) for channel in s.REGISTRY] + [Codec(CommandReply)]
TAGS = st.sampled_from(["start_worker", "stop_worker", "job_queued", "job_changed", "chunk_added",
                        "cancel_job", "webhook_due", "stream_chunk", "worker_logs_request", "nope"])
KEYS = st.sampled_from(["type", "job_id", "endpoint_id", "worker_id", "spec", "record", "status",
                        "policy", "submitted_at_ms", "index", "chunk_json", "workers", "node_id", "x"])
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=20) | TAGS)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(KEYS, inner, max_size=6), max_leaves=30)


def _decode_or_decode_error(data: bytes) -> None:
    for codec in CODECS:
        try:
            codec.decode(data)
        except DecodeError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data):
    _decode_or_decode_error(data)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=8) | VALUES)
def test_arbitrary_msgpack(value):
    _decode_or_decode_error(msgspec.msgpack.encode(value))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=8), st.integers(min_value=0, max_value=200))
def test_truncated_msgpack(value, cut):
    data = encode(value)
    _decode_or_decode_error(data[: min(cut, len(data) - 1)])
