"""Bad bytes for the bus, and reading counters back from a service's /metrics."""

from __future__ import annotations

import random
from typing import Any

import httpx
import msgspec
from prometheus_client.parser import text_string_to_metric_families

from runplane_proto.codec import encode

# nats-server's default max_payload (1 MiB); "huge" payloads stay just under it.
MAX_PAYLOAD = 1024 * 1024


def garbage(valid: Any, *, other: Any, seed: int, huge: bool = True) -> list[tuple[str, bytes]]:
    """Malformed, truncated, oversized and wrong-type variants of the message `valid`
    (a Struct), `other` being a valid message of another type on the bus."""
    rnd = random.Random(seed)
    data = encode(valid)
    fields = msgspec.to_builtins(valid)
    first_key = next(k for k in fields if k != "type")
    wrong_field = {**fields, first_key: [1, 2, 3] if not isinstance(fields[first_key], list) else 42}
    items = [
        ("empty", b""),
        ("random bytes", rnd.randbytes(97)),
        ("msgpack int", encode(42)),
        ("msgpack string", encode("start_worker")),
        ("msgpack list", encode([fields])),
        ("msgpack nil", encode(None)),
        ("map without its tag", encode({k: v for k, v in fields.items() if k != "type"})),
        ("unknown tag", encode({**fields, "type": "no_such_message"})),
        ("another message type", encode(other)),
        ("a field of the wrong type", encode(wrong_field)),
        ("truncated", data[: max(1, len(data) // 2)]),
        ("one byte short", data[:-1]),
        ("json instead of msgpack", msgspec.json.encode(fields)),
        ("deeply nested", b"\x91" * 50_000 + b"\xc0"),
        ("lying length", b"\xdb\xff\xff\xff\xf0abc"),
    ]
    if huge:
        items.append(("huge", rnd.randbytes(MAX_PAYLOAD - 8 * 1024)))
    return items


def wrong_tag(valid: Any, tag: str) -> bytes:
    """`valid` with the tag of another member of its union."""
    return encode({**msgspec.to_builtins(valid), "type": tag})


async def metric(http: httpx.AsyncClient, url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    resp = await http.get(url)
    resp.raise_for_status()
    total = 0.0
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
