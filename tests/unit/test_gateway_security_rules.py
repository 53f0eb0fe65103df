"""The gateway's pure security rules: what a key may reach, how a secret is read, env masking,
and RunPod's effective rate limit with Retry-After."""

from __future__ import annotations

import pytest

from runplane_proto.keys import ApiKey
from runplane_proto.nodes import NodeStatus, WorkerInfo
from runplane_gateway.errors import ApiError
from runplane_gateway.keys import (
    BOOTSTRAP, Access, access_of, key_id_in, new_key_id, new_secret, refusal, secret_hash,
)
from runplane_gateway.limits import RateLimiter, effective_limit, running_workers
from runplane_gateway.specs import ENV_MASK, env_with_masks_kept, spec_from_create, view

A_ONLY = Access(key_id="k1", admin=False, endpoint_ids=frozenset({"epa"}))
EVERY_ENDPOINT = Access(key_id="k2", admin=False)

ALLOWED = [
    (A_ONLY, "POST", "/v2/epa/run"),
    (A_ONLY, "GET", "/v2/epa/status/job1"),
    (A_ONLY, "POST", "/v2/epa/purge-queue"),
    (A_ONLY, "GET", "/v1/endpoints"),
    (A_ONLY, "GET", "/v1/endpoints/"),
    (A_ONLY, "GET", "/v1/endpoints/epa"),
    (A_ONLY, "HEAD", "/v1/endpoints/epa"),
    (A_ONLY, "GET", "/v1/endpoints/epa/jobs"),
    (A_ONLY, "GET", "/v1/endpoints/epa/logs"),
    (EVERY_ENDPOINT, "POST", "/v2/anything/run"),
    (EVERY_ENDPOINT, "GET", "/v1/endpoints/anything/workers"),
    (BOOTSTRAP, "POST", "/v1/keys"),
    (BOOTSTRAP, "DELETE", "/v1/endpoints/epb"),
    (access_of(ApiKey(id="k3", name="ops", prefix="rpk_k3", secret_sha256="0", scope="admin")), "GET",
     "/v1/nodes"),
]
REFUSED = [
    (A_ONLY, "POST", "/v2/epb/run", "endpoint 'epb'"),
    (A_ONLY, "GET", "/v2/epb/health", "endpoint 'epb'"),
    (A_ONLY, "GET", "/v2//health", "endpoint ''"),
    (A_ONLY, "GET", "/v2/epab/health", "endpoint 'epab'"),
    (A_ONLY, "GET", "/v1/endpoints/epb", "endpoint 'epb'"),
    (A_ONLY, "GET", "/v1/endpoints/epb/logs", "endpoint 'epb'"),
    (A_ONLY, "POST", "/v1/endpoints", "create endpoints"),
    (A_ONLY, "POST", "/v1/endpoints/", "create endpoints"),
    (A_ONLY, "PATCH", "/v1/endpoints/epa", "change or delete"),
    (A_ONLY, "DELETE", "/v1/endpoints/epa", "change or delete"),
    (A_ONLY, "GET", "/v1/keys", "manage API keys"),
    (A_ONLY, "DELETE", "/v1/keys/k1", "manage API keys"),
    (A_ONLY, "GET", "/v1/nodes", "/v1/nodes"),
    (A_ONLY, "GET", "/v1/unknown", "/v1/unknown"),
    (A_ONLY, "GET", "/v2", "/v2"),
    (EVERY_ENDPOINT, "POST", "/v1/endpoints", "create endpoints"),
    (EVERY_ENDPOINT, "POST", "/v1/keys", "manage API keys"),
]


@pytest.mark.parametrize(("access", "method", "path"), ALLOWED)
def test_what_a_key_may_reach(access, method, path) -> None:
    assert refusal(access, method, path) is None


@pytest.mark.parametrize(("access", "method", "path", "named"), REFUSED)
def test_what_a_key_may_not_reach_is_refused_with_the_reason(access, method, path, named) -> None:
    reason = refusal(access, method, path)
    assert reason is not None and named in reason, reason


def test_a_secret_names_its_key_and_only_its_hash_is_kept() -> None:
    key_id = new_key_id()
    secret = new_secret(key_id)
    assert key_id_in(secret.encode()) == key_id
    assert len(secret) - len(f"rpk_{key_id}_") >= 43  # 256 random bits
    assert secret_hash(secret.encode()) != secret_hash((secret + "x").encode())
    assert len(secret_hash(secret.encode())) == 64
    for bad in (b"", b"rpk_", b"rpk__x", b"rpk_abc", b"rpk_abc_", b"rpk_a.b_x", b"other_abc_x", b"rpk_" + b"a" * 65
                + b"_x"):
        assert key_id_in(bad) is None, bad


def test_env_values_are_masked_and_a_mask_keeps_the_stored_value() -> None:
    spec = spec_from_create(b'{"name":"x","command":["true"],"env":{"HF_TOKEN":"hf_1","MODE":"a"}}', "ep1", 1)
    assert spec.env == {"HF_TOKEN": "hf_1", "MODE": "a"}
    assert view(spec).env == {"HF_TOKEN": ENV_MASK, "MODE": ENV_MASK}
    assert env_with_masks_kept(spec.env, {"HF_TOKEN": ENV_MASK, "MODE": "b"}) == {"HF_TOKEN": "hf_1", "MODE": "b"}
    assert env_with_masks_kept(spec.env, {}) == {}
    with pytest.raises(ApiError, match="NEW"):
        env_with_masks_kept(spec.env, {"NEW": ENV_MASK})
    with pytest.raises(ApiError, match="TOKEN"):
        spec_from_create(b'{"name":"x","command":["true"],"env":{"TOKEN":"***"}}', "ep1", 1)


@pytest.mark.parametrize(("base", "per_worker", "workers", "limit"), [
    (100, 10, 0, 100), (100, 10, 10, 100), (100, 10, 11, 110), (1000, 100, 50, 5000), (2, 0, 100, 2),
])
def test_effective_limit_is_the_larger_of_base_and_what_workers_earn(base, per_worker, workers, limit) -> None:
    assert effective_limit(base, per_worker, workers) == limit


def test_running_workers_lift_the_limits_and_429_says_when_to_retry() -> None:
    now = [100.0]
    workers = {"ep": 0}
    limiter = RateLimiter(enabled=True, monotonic=lambda: now[0], limits={"cancel": (3, 2)},
                          per_worker={"cancel": (2, 1)}, running_workers=workers.__getitem__)
    for _ in range(3):
        with limiter.hold("ep", "cancel"):
            pass
    now[0] = 103.2
    with pytest.raises(ApiError) as err:
        with limiter.hold("ep", "cancel"):
            pass
    assert err.value.status == 429 and err.value.headers == {"Retry-After": "7"}
    assert "more than 3 /cancel" in err.value.message
    workers["ep"] = 5  # max(3, 5 x 2) = 10 per window, max(2, 5 x 1) = 5 concurrent
    for _ in range(7):
        with limiter.hold("ep", "cancel"):
            pass
    with pytest.raises(ApiError, match="more than 10 /cancel"):
        with limiter.hold("ep", "cancel"):
            pass
    now[0] = 110.0  # a new window: concurrency beyond the base, within what the workers earn
    with limiter.hold("ep", "cancel"), limiter.hold("ep", "cancel"), limiter.hold("ep", "cancel"):
        with limiter.hold("ep", "cancel"), limiter.hold("ep", "cancel"):
            with pytest.raises(ApiError) as err:
                with limiter.hold("ep", "cancel"):
                    pass
    assert "more than 5 concurrent" in err.value.message and err.value.headers == {"Retry-After": "1"}


def test_ended_windows_are_swept_so_unknown_ids_cannot_grow_memory(monkeypatch) -> None:
    import runplane_gateway.limits as limits

    monkeypatch.setattr(limits, "MAX_WINDOWS", 10)
    now = [0.0]
    limiter = RateLimiter(enabled=True, monotonic=lambda: now[0])
    for i in range(10):
        with limiter.hold(f"ep{i}", "status"):
            pass
    now[0] = 11.0
    with limiter.hold("new", "status"):
        pass
    assert len(limiter._windows) == 1


def test_running_workers_counts_ready_workers_on_live_nodes() -> None:
    def node(node_id: str, heartbeat_ms: int, *states: str) -> NodeStatus:
        return NodeStatus(node_id=node_id, hostname="h", runtime="process", heartbeat_at_ms=heartbeat_ms,
                          workers=[WorkerInfo(worker_id=f"{node_id}w{i}", endpoint_id="ep", state=state,
                                              started_at_ms=0) for i, state in enumerate(states)])

    nodes = [node("n1", 100_000, "idle", "running", "starting", "parked"), node("n2", 1, "running", "idle")]
    assert running_workers(nodes, "ep", now_ms=100_000, node_loss_timeout_s=10) == 2  # n2 is lost
    assert running_workers(nodes, "other", now_ms=100_000, node_loss_timeout_s=10) == 0
