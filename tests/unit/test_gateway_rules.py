"""The gateway's pure parts: request parsing, retention and TTL, limits, auth, the deny list."""

from __future__ import annotations

import json

import pytest

from runplane_gateway.auth import presented_key
from runplane_gateway.errors import ApiError
from runplane_gateway.limits import RateLimiter
from runplane_gateway.retention import is_gone, timed_out, ttl_expired
from runplane_gateway.routes_v2 import parse_submission
from runplane_gateway.settings import parse_deny_list
from runplane_gateway.specs import spec_from_create, spec_with_patch
from runplane_gateway.webhooks import DenyList
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.jobs import JobPolicy, JobRecord

SPEC = EndpointSpec(id="ep", name="n", command=["x"], execution_timeout_ms=30_000)
RETENTION = dict(result_retention_s=1800, sync_result_retention_s=60)


def _record(**changes: object) -> JobRecord:
    base = dict(id="j", endpoint_id="ep", status="IN_QUEUE", submitted_at_ms=1_000,
                policy=JobPolicy(execution_timeout_ms=30_000, ttl_ms=10_000))
    base.update(changes)
    return JobRecord(**base)  # type: ignore[arg-type]


def test_submission_keeps_input_and_extras_raw() -> None:
    sub = parse_submission(b'{"input": [1,  2.0], "s3Config": {"a": "b"}, "webhookV2": "x"}', SPEC)
    assert sub.input_raw == b"[1,  2.0]"
    assert json.loads(sub.extra_json) == {"s3Config": {"a": "b"}, "webhookV2": "x"}
    assert sub.policy == JobPolicy(execution_timeout_ms=30_000, ttl_ms=86_400_000)
    assert parse_submission(b'{"input": "s"}', SPEC).extra_json is None
    sub = parse_submission(b'{"input": 0, "policy": {"executionTimeout": 5000, "ttl": 10000}, '
                           b'"webhook": "https://h/x"}', SPEC)
    assert sub.input_raw == b"0" and sub.webhook == "https://h/x"
    assert sub.policy == JobPolicy(execution_timeout_ms=5_000, ttl_ms=10_000)


@pytest.mark.parametrize("body, needle", [
    (b"", "JSON"), (b"3", "object"), (b"{}", "input"), (b'{"input": 1, "policy": {"ttl": 604800001}}', "policy.ttl"),
    (b'{"input": 1, "policy": {"lowPriority": 1}}', "policy.lowPriority"), (b'{"input": 1, "webhook": "nope"}', "webhook"),
])
def test_bad_submissions_name_the_problem(body: bytes, needle: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_submission(body, SPEC)
    assert err.value.status == 400 and needle in err.value.message


def test_endpoint_specs_from_json() -> None:
    spec = spec_from_create(b'{"name": "a", "imageName": "img", "gpuTypeIds": ["H100"], "idleTimeout": 60}', "e1", 5)
    assert (spec.id, spec.image_name, spec.gpu_type_ids, spec.idle_timeout_s) == ("e1", "img", ["H100"], 60)
    assert spec.created_at_ms == spec.updated_at_ms == 5 and spec.command == []
    patched = spec_with_patch(spec, b'{"workersMax": 0, "command": ["run"], "imageName": null}', 9)
    assert (patched.workers_max, patched.command, patched.image_name, patched.updated_at_ms) == (0, ["run"], None, 9)
    with pytest.raises(ApiError, match="command or an imageName"):
        spec_with_patch(spec, b'{"imageName": null}', 9)
    with pytest.raises(ApiError, match="unknown fields: id"):
        spec_with_patch(spec, b'{"id": "other"}', 9)


def test_retention_and_ttl() -> None:
    done = _record(status="COMPLETED", started_at_ms=2_000, completed_at_ms=3_000)
    assert not is_gone(done, 3_000 + 1_800_000, **RETENTION)
    assert is_gone(done, 3_001 + 1_800_000, **RETENTION)
    sync = _record(status="FAILED", sync=True, completed_at_ms=3_000)
    assert not is_gone(sync, 63_000, **RETENTION) and is_gone(sync, 63_001, **RETENTION)
    running = _record(status="IN_PROGRESS", started_at_ms=2_000)
    assert not is_gone(running, 10**12, **RETENTION) and not ttl_expired(running, 10**12)
    queued = _record()
    assert not ttl_expired(queued, 11_000) and ttl_expired(queued, 11_001)
    expired = timed_out(queued, 11_001)
    assert expired.status == "TIMED_OUT" and expired.completed_at_ms == 11_001 and "10000 ms" in expired.error


def test_rate_limits_per_window_and_concurrency() -> None:
    now = [0.0]
    limiter = RateLimiter(enabled=True, monotonic=lambda: now[0], limits={"run": (3, 2)})
    with limiter.hold("ep", "run"), limiter.hold("ep", "run"):
        with pytest.raises(ApiError, match="concurrent") as err:
            with limiter.hold("ep", "run"):
                pass
        assert err.value.status == 429
    with limiter.hold("ep", "run"):
        pass
    with pytest.raises(ApiError, match="in 10 s"):
        with limiter.hold("ep", "run"):
            pass
    with limiter.hold("other", "run"), limiter.hold("ep", "status"):
        pass
    now[0] = 10.0
    with limiter.hold("ep", "run"):
        pass
    off = RateLimiter(enabled=False, limits={"run": (0, 0)})
    with off.hold("ep", "run"):
        pass


def test_auth_header_forms() -> None:
    assert presented_key(b"Bearer abc") == b"abc"
    assert presented_key(b"bearer  abc ") == b"abc"
    assert presented_key(b"abc") == b"abc"


async def test_deny_list() -> None:
    hosts, networks = parse_deny_list(" metadata.internal, 169.254.0.0/16,10.1.2.3 ,, ::1")
    assert hosts == {"metadata.internal"} and networks == ("169.254.0.0/16", "10.1.2.3/32", "::1/128")
    deny = DenyList(hosts, networks)
    assert await deny.refusal("http://METADATA.internal./x")
    assert await deny.refusal("http://169.254.169.254/latest")
    assert await deny.refusal("https://10.1.2.3:8443/")
    assert await deny.refusal("http://[::1]:80/")
    assert await deny.refusal("http://127.0.0.1:9/hook") is None
    assert await DenyList(frozenset(), ()).refusal("http://10.1.2.3/") is None
