"""Typed identifiers. A bad id fails at decode time, never deep inside a service."""

from __future__ import annotations

import re
import secrets
import uuid
from typing import Annotated

import msgspec

ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_ID_RE = re.compile(ID_PATTERN)
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"

EndpointId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
JobId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
WorkerId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
NodeId = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]

# The suffix RunPod appends to job ids names a region; ours names the install.
JOB_ID_SUFFIX = "-r1"
# Length of a gateway replica's token, which ends the ids of its /runsync jobs.
GATEWAY_TOKEN_LEN = 16


def is_valid_id(value: str) -> bool:
    """True when `value` can be used as an id: no dots, wildcards, spaces or slashes."""
    return isinstance(value, str) and _ID_RE.match(value) is not None


def check_id(value: str, kind: str) -> str:
    """Return `value` if it is a valid id, else raise ValueError naming `kind`."""
    if not is_valid_id(value):
        raise ValueError(f"invalid {kind} id {value!r}: use 1-128 of A-Z a-z 0-9 _ -")
    return value


def _short(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def new_job_id(*, sync: bool = False, gateway: str | None = None) -> str:
    """A job id shaped like RunPod's: uuid plus a suffix, `sync-` first for /runsync. A
    /runsync job waited for by a gateway replica ends with that replica's token instead of
    the suffix: the job's record writes are republished to a subject ending with the last
    GATEWAY_TOKEN_LEN characters of its id (subjects.gateway_job_records)."""
    if not sync:
        return f"{uuid.uuid4()}{JOB_ID_SUFFIX}"
    if gateway is None:
        return f"sync-{uuid.uuid4()}{JOB_ID_SUFFIX}"
    if len(gateway) != GATEWAY_TOKEN_LEN or not is_valid_id(gateway) or "-" in gateway:
        raise ValueError(f"invalid gateway token {gateway!r}")
    return f"sync-{uuid.uuid4()}-{gateway}"


def new_endpoint_id() -> str:
    return _short(14)


def new_worker_id() -> str:
    return _short(14)


def new_gateway_token() -> str:
    """A gateway replica's token: `gw` and 14 more, GATEWAY_TOKEN_LEN in all, no dash. Any
    other job id ends with a uuid's hex digits and JOB_ID_SUFFIX, so its last
    GATEWAY_TOKEN_LEN characters never start with `g`: never a token."""
    return f"gw{_short(GATEWAY_TOKEN_LEN - 2)}"
