"""Node agent pieces without I/O: record transitions, the job handed to workers, settings."""

from __future__ import annotations

import json

import msgspec
import pytest
from runplane_node_agent import transitions
from runplane_node_agent.held import error_text, job_payload
from runplane_node_agent.settings import AgentSettings, default_node_id, from_env
from runplane_node_agent.transitions import Verdict
from runplane_proto.jobs import JobPolicy, JobRecord
from runplane_service.env import SettingsError


def record(**changes) -> JobRecord:
    base = JobRecord(id="j1", endpoint_id="ep", status="IN_QUEUE", submitted_at_ms=1_000,
                     policy=JobPolicy(execution_timeout_ms=5_000, ttl_ms=10_000), input_json=b'{"a":1}')
    return msgspec.structs.replace(base, **changes)


@pytest.mark.parametrize(("changes", "now_ms", "expected"), [
    ({}, 2_000, Verdict.RUN),
    ({}, 11_001, Verdict.EXPIRED),
    ({"status": "IN_PROGRESS", "attempts": 1}, 11_001, Verdict.RUN),  # TTL applies only while queued
    ({"attempts": 2}, 2_000, Verdict.RUN),
    ({"attempts": 3}, 2_000, Verdict.EXHAUSTED),
    ({"status": "CANCELLED"}, 2_000, Verdict.SKIP),
    ({"status": "COMPLETED"}, 2_000, Verdict.SKIP),
])
def test_verdict_on_delivery(changes, now_ms, expected):
    assert transitions.verdict(record(**changes), now_ms=now_ms, max_attempts=3) is expected


def test_in_progress_counts_the_attempt():
    taken = transitions.in_progress(record(attempts=1), worker_id="w1", node_id="n1", now_ms=5)
    assert (taken.status, taken.attempts, taken.worker_id, taken.node_id, taken.started_at_ms) == \
        ("IN_PROGRESS", 2, "w1", "n1", 5)


def test_terminal_records_keep_their_state():
    for status in ("CANCELLED", "TIMED_OUT", "COMPLETED", "FAILED"):
        done = record(status=status)
        assert transitions.finished(done, "COMPLETED", now_ms=9, output_json=b"1") is None
        assert transitions.requeued(done) is None
        assert transitions.with_progress(done, output_json=b"2", output_ref=None) is None


def test_finished_and_requeued():
    running = record(status="IN_PROGRESS", attempts=2, worker_id="w", output_json=b'"progress"', chunks=0)
    done = transitions.finished(running, "FAILED", now_ms=9, error="x", chunks=3)
    assert (done.status, done.completed_at_ms, done.error, done.output_json, done.chunks) == \
        ("FAILED", 9, "x", None, 3)
    kept = transitions.finished(running, "TIMED_OUT", now_ms=9, keep_output=True)
    assert kept.output_json == b'"progress"'
    back = transitions.requeued(running)
    assert (back.status, back.attempts, back.worker_id, back.output_json) == ("IN_QUEUE", 2, None, None)
    assert transitions.requeued(running, count_attempt=False).attempts == 1
    assert transitions.with_progress(running, output_json=b"7", output_ref=None).output_json == b"7"


def test_the_job_handed_to_a_worker():
    claimed = record(attempts=1)
    assert json.loads(job_payload(claimed, b'{"a":1}')) == {"id": "j1", "input": {"a": 1}, "attempt": 1}
    assert json.loads(job_payload(record(attempts=2), None)) == {"id": "j1", "input": None, "attempt": 2}
    rich = record(attempts=1, webhook="http://h",
                  extra_json=b'{"s3Config": {"b": 1}, "id": "evil", "attempt": 9, "batchId": "b1"}')
    assert json.loads(job_payload(rich, b"[1]")) == {"id": "j1", "input": [1], "attempt": 1,
                                                      "webhook": "http://h", "s3Config": {"b": 1},
                                                      "batchId": "b1"}


def test_every_ended_attempt_is_logged():
    first = transitions.in_progress(record(), worker_id="w1", node_id="n1", now_ms=5)
    assert first.attempt_log == ()
    back = transitions.requeued(first, error="worker exited", now_ms=7)
    # A redelivery finds the record still IN_PROGRESS: that attempt was lost with its agent.
    second = transitions.in_progress(transitions.in_progress(back, worker_id="w2", node_id="n2", now_ms=8),
                                     worker_id="w3", node_id="n3", now_ms=20)
    done = transitions.finished(second, "FAILED", now_ms=30, error="boom")
    assert [(a.number, a.worker_id, a.node_id, a.started_at_ms, a.ended_at_ms, a.error)
            for a in done.attempt_log] == [
        (1, "w1", "n1", 5, 7, "worker exited"),
        (2, "w2", "n2", 8, 20, transitions.LOST_ATTEMPT_ERROR),
        (3, "w3", "n3", 20, 30, "boom"),
    ]
    undone = transitions.requeued(second, count_attempt=False)  # a take given back is no attempt
    assert undone.attempt_log == second.attempt_log
    exhausted = transitions.finished(second, "FAILED", now_ms=40, error="attempts exhausted",
                                     attempt_error=transitions.LOST_ATTEMPT_ERROR)
    assert (exhausted.error, exhausted.attempt_log[-1].error) == ("attempts exhausted",
                                                                  transitions.LOST_ATTEMPT_ERROR)


def test_error_text():
    assert error_text(msgspec.Raw(b"")) is None
    assert error_text(msgspec.Raw(b"null")) is None
    assert error_text(msgspec.Raw(b'"bad \\"x\\""')) == 'bad "x"'
    assert error_text(msgspec.Raw(b'{"code":1}')) == '{"code":1}'


def test_settings_from_env(monkeypatch):
    for name in ("RP_NODE_ID", "RP_AGENT_PORT", "RP_WORKER_PING_INTERVAL_MS", "RP_WORKER_PING_TIMEOUT_S",
                 "RP_TAKE_POLL_S", "RP_AGENT_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = from_env()
    assert settings.port == 8100 and settings.take_poll_s == 20 and settings.ack_wait_s == 30
    assert settings.worker_ping_timeout_s == 15 and settings.max_attempts == 3
    assert settings.worker_base_url(8100) == "http://127.0.0.1:8100"
    monkeypatch.setenv("RP_WORKER_PING_INTERVAL_MS", "2000")
    monkeypatch.setenv("RP_AGENT_URL", "http://agent.local:9/")
    monkeypatch.setenv("RP_NODE_ID", "gpu-box_1")
    settings = from_env()
    assert settings.worker_ping_timeout_s == 6 and settings.node_id == "gpu-box_1"
    assert settings.worker_base_url(1234) == "http://agent.local:9"
    monkeypatch.setenv("RP_TAKE_POLL_S", "90")
    with pytest.raises(SettingsError):
        from_env()
    monkeypatch.setenv("RP_TAKE_POLL_S", "5")
    monkeypatch.setenv("RP_NODE_ID", "bad.id")
    with pytest.raises(SettingsError):
        from_env()


def test_node_id_from_hostname_and_listen_address():
    assert default_node_id("gpu-01.example.com") == "gpu-01-example-com"
    assert default_node_id("...") == "node"
    assert AgentSettings(node_id="n", host="0.0.0.0").worker_base_url(81) == "http://127.0.0.1:81"
