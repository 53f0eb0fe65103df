"""The chaos accounting catches what it must: a dropped job is lost, a result of another job
(in the record or shown to a client) is wrong, a failure needs a reason, and an execution the
attempt count does not show is reported."""

from __future__ import annotations

from collections import Counter

from runplane_testing.chaos_accounting import Delivery, Final, Submitted, account, cause


def _sub(job_id: str, token: str, kind: str = "run", **kw) -> Submitted:
    return Submitted(job_id=job_id, token=token, kind=kind, endpoint_id="ep", **kw)


def _final(job_id: str, token: str, status: str = "COMPLETED", *, output=None, error=None, attempts=1) -> Final:
    if output is None and status == "COMPLETED":
        output = {"token": token, "job": job_id}
    return Final(job_id=job_id, token=token, status=status, output=output, error=error, attempts=attempts,
                 submitted_at_ms=1000, completed_at_ms=1500)


def test_a_clean_run_has_no_violations():
    accepted = {"a": _sub("a", "t1"), "b": _sub("b", "t2", "stream"), "c": _sub("c", "t3", cancel_requested=True),
                "d": _sub("d", "t4")}
    records = {"a": _final("a", "t1", attempts=2),
               "b": _final("b", "t2", output=[{"token": "t2", "job": "b", "i": i} for i in range(3)]),
               "c": _final("c", "t3", "CANCELLED"),
               "d": _final("d", "t4", "FAILED", error="attempts exhausted: the worker exited (3 of 3)", attempts=3)}
    deliveries = [Delivery("a", "status", {"token": "t1", "job": "a"}),
                  Delivery("b", "stream", {"token": "t2", "job": "b", "i": 0})]
    report = account(accepted, set(), records, Counter({"a": 2, "b": 1, "d": 3}), deliveries)
    assert report.violations == []
    assert (report.submitted, report.completed, report.cancelled, report.executed_twice) == (4, 2, 1, 2)
    assert report.failed_by_cause == {"attempts exhausted": 1}
    assert report.latency_ms == {"chaos": [500.0, 500.0]}


def test_a_dropped_job_is_lost():
    accepted = {"a": _sub("a", "t1"), "b": _sub("b", "t2"), "c": _sub("c", "t3")}
    records = {"a": _final("a", "t1"), "c": _final("c", "t3", "IN_PROGRESS")}
    report = account(accepted, set(), records, Counter({"a": 1}), [])
    assert report.lost == ["b (no record)", "c (IN_PROGRESS)"]
    assert report.violations and report.violations[0].startswith("lost: 2")


def test_a_wrong_output_is_caught_in_the_record_and_in_what_a_client_saw():
    accepted = {"a": _sub("a", "t1"), "b": _sub("b", "t2"), "s": _sub("s", "t3", "stream")}
    records = {"a": _final("a", "t1", output={"token": "t2", "job": "b"}),  # b's result stored for a
               "b": _final("b", "t2"),
               "s": _final("s", "t3", output=[{"token": "t3", "job": "s"}, {"token": "t1", "job": "a"}])}
    deliveries = [Delivery("b", "runsync", {"token": "t1", "job": "a"}),  # a's result shown for b
                  Delivery("s", "stream", {"token": "t3", "job": "s"})]
    report = account(accepted, set(), records, Counter(), deliveries)
    assert [w.split(":")[0] for w in report.wrong_output] == ["a", "s", "b"]
    assert not report.lost


def test_failures_need_a_reason_and_executions_need_attempts():
    accepted = {"a": _sub("a", "t1"), "b": _sub("b", "t2"), "c": _sub("c", "t3")}
    records = {"a": _final("a", "t1", "FAILED"), "b": _final("b", "t2", "CANCELLED"),
               "c": _final("c", "t3", attempts=1)}
    report = account(accepted, set(), records, Counter({"c": 2}), [])
    assert report.no_reason == ["a: FAILED without an error", "b: CANCELLED without a cancel"]
    assert report.unexplained_executions == ["c: executed 2x, attempts 1"]
    assert report.executed_twice == 1


def test_only_a_cancel_before_the_claim_explains_an_uncounted_execution():
    accepted = {"a": _sub("a", "t1", cancel_requested=True), "b": _sub("b", "t2", cancel_requested=True),
                "c": _sub("c", "t3")}
    records = {"a": _final("a", "t1", "CANCELLED", attempts=0), "b": _final("b", "t2", "CANCELLED", attempts=0),
               "c": _final("c", "t3", attempts=0)}
    report = account(accepted, set(), records, Counter({"a": 1, "b": 2, "c": 1}), [])
    assert report.cancelled_before_claim == ["a"]
    assert report.unexplained_executions == ["b: executed 2x, attempts 0", "c: executed 1x, attempts 0"]


def test_jobs_accepted_without_an_answer_are_accounted_too():
    # The first submit of t2 got no answer but was accepted (job x); the retry became job b.
    accepted = {"b": _sub("b", "t2")}
    records = {"b": _final("b", "t2"), "x": _final("x", "t2", "IN_QUEUE"), "y": _final("y", "other")}
    report = account(accepted, {"t2"}, records, Counter(), [])
    assert report.found_unacknowledged == 1
    assert report.lost == ["x (IN_QUEUE)"]


def test_causes_are_short_and_stable():
    assert cause("job expired in the queue: not started within its TTL of 5000 ms") == "job expired in the queue"
    assert cause("") == "unknown"


def test_a_refused_submit_that_left_a_queued_record_is_reported_apart():
    records = {"z": _final("z", "t9", "IN_QUEUE")}
    report = account({}, set(), records, Counter(), [], frozenset({"t9"}))
    assert report.refused_left_queued == ["z (IN_QUEUE)"] and not report.violations


def test_a_stream_read_to_the_end_without_every_chunk_is_reported_apart():
    accepted = {"s": _sub("s", "t1", "stream"), "u": _sub("u", "t2", "stream")}
    chunks = [{"token": "t1", "job": "s", "i": i} for i in range(3)]
    records = {"s": _final("s", "t1", output=chunks), "u": _final("u", "t2", output=[
        {"token": "t2", "job": "u", "i": i} for i in range(3)])}
    deliveries = [Delivery("s", "stream", c) for c in chunks] + [
        Delivery("u", "stream", {"token": "t2", "job": "u", "i": 0})]
    report = account(accepted, set(), records, Counter(), deliveries, frozenset(), frozenset({"s", "u"}))
    assert report.streams_short == ["u: chunks [0]"] and not report.violations
