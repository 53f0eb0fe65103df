"""The chaos campaign's accounting (pure): after the storm, every accepted job id must be
terminal with its own result, and every execution must be visible in its attempt count.

- lost: an accepted job with no record, or one that never became terminal;
- wrong output: a COMPLETED record whose output names another token or job id, or anything a
  client was shown (`/runsync`, `/status`, `/stream`) that belongs to another job;
- no reason: FAILED or TIMED_OUT without an error, CANCELLED without a cancel asked for;
- unexplained executions: a job executed more times than its record's `attempts` says. One
  exception, reported apart: a job CANCELLED (as asked) before its claim was written, with one
  execution more than its attempts. The agent hands a job over before its claim lands (a first
  attempt's claim waits RP_CLAIM_DELAY_MS), and a cancel in between keeps the record as the
  cancel left it: the worker is stopped, the attempt is not counted (docs/reliability.md).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


@dataclass
class Submitted:
    job_id: str
    token: str
    kind: str  # run | runsync | stream | cancel
    endpoint_id: str
    phase: str = "chaos"
    cancel_requested: bool = False


@dataclass(frozen=True)
class Final:
    """What the record in `rp-jobs` says at the end (input and output decoded)."""

    job_id: str
    token: str | None
    status: str
    output: object
    error: str | None
    attempts: int
    submitted_at_ms: int
    completed_at_ms: int | None


@dataclass(frozen=True)
class Delivery:
    """An output a client was shown for `job_id`."""

    job_id: str
    where: str
    output: object


@dataclass
class Report:
    submitted: int = 0
    maybe_accepted: int = 0  # submits with no answer (retried elsewhere)
    found_unacknowledged: int = 0  # of those, jobs that exist although no gateway returned their id
    completed: int = 0
    failed_by_cause: Counter[str] = field(default_factory=Counter)
    timed_out: int = 0
    cancelled: int = 0
    executed_twice: int = 0  # jobs executed more than once (at-least-once, attempts > 1)
    executions: int = 0
    lost: list[str] = field(default_factory=list)
    wrong_output: list[str] = field(default_factory=list)
    no_reason: list[str] = field(default_factory=list)
    unexplained_executions: list[str] = field(default_factory=list)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)  # phase -> submit to COMPLETED
    # Submits a gateway refused (5xx) that left a record behind anyway, still not terminal:
    # not accepted, so not lost, but a queued job nobody will hear of until its TTL.
    refused_left_queued: list[str] = field(default_factory=list)
    # COMPLETED stream jobs read through /stream to the end that did not show every chunk index:
    # not a violation, since /stream hands each chunk out once and a gateway can die after
    # handing some out and before its answer reached the client.
    streams_short: list[str] = field(default_factory=list)
    # CANCELLED as asked, with one execution its attempts do not show: cancelled between the
    # hand-over and the claim write (see the module's docstring).
    cancelled_before_claim: list[str] = field(default_factory=list)

    @property
    def violations(self) -> list[str]:
        out = []
        for name in ("lost", "wrong_output", "no_reason", "unexplained_executions"):
            items = getattr(self, name)
            if items:
                out.append(f"{name}: {len(items)}: {items[:10]}")
        return out


def _names_job(output: object, token: str | None, job_id: str) -> bool:
    """The worker's output (or one stream chunk) carries its own job's token and id."""
    return isinstance(output, dict) and output.get("token") == token and output.get("job") == job_id


def _right_output(final: Final, kind: str) -> bool:
    if kind == "stream":  # the aggregated chunks
        return (isinstance(final.output, list) and bool(final.output)
                and all(_names_job(chunk, final.token, final.job_id) for chunk in final.output))
    return _names_job(final.output, final.token, final.job_id)


def account(accepted: dict[str, Submitted], maybe_tokens: set[str], records: dict[str, Final],
            executions: Counter[str], deliveries: list[Delivery],
            refused_tokens: frozenset[str] = frozenset(), streams_followed: frozenset[str] = frozenset(),
            chunks_per_stream: int = 3) -> Report:
    report = Report(submitted=len(accepted), maybe_accepted=len(maybe_tokens))
    tokens = {sub.token: sub for sub in accepted.values()}
    # Jobs accepted without the client hearing of it: accounted like the others.
    jobs = dict(accepted)
    for job_id, final in records.items():
        if job_id not in jobs and final.token in maybe_tokens:
            known = tokens.get(final.token)
            kind = known.kind if known else "run"
            jobs[job_id] = Submitted(job_id=job_id, token=final.token, kind=kind,
                                     endpoint_id=known.endpoint_id if known else "",
                                     phase=known.phase if known else "chaos",
                                     cancel_requested=bool(known and known.cancel_requested))
            report.found_unacknowledged += 1
        elif job_id not in jobs and final.token in refused_tokens and final.status not in TERMINAL:
            report.refused_left_queued.append(f"{job_id} ({final.status})")
    for job_id, sub in jobs.items():
        final = records.get(job_id)
        if final is None or final.status not in TERMINAL:
            report.lost.append(f"{job_id} ({final.status if final else 'no record'})")
            continue
        if final.token != sub.token:
            report.wrong_output.append(f"{job_id}: record holds token {final.token}, submitted {sub.token}")
        if final.status == "COMPLETED":
            report.completed += 1
            if not _right_output(final, sub.kind):
                report.wrong_output.append(f"{job_id}: output {str(final.output)[:120]}")
            if final.completed_at_ms is not None:
                report.latency_ms.setdefault(sub.phase, []).append(
                    float(final.completed_at_ms - final.submitted_at_ms))
        elif final.status == "CANCELLED":
            report.cancelled += 1
            if not sub.cancel_requested:
                report.no_reason.append(f"{job_id}: CANCELLED without a cancel")
        elif not final.error:
            report.no_reason.append(f"{job_id}: {final.status} without an error")
        elif final.status == "TIMED_OUT":
            report.timed_out += 1
        else:
            report.failed_by_cause[cause(final.error)] += 1
        ran = executions.get(job_id, 0)
        report.executions += ran
        if ran > 1:
            report.executed_twice += 1
        if ran > final.attempts:
            if final.status == "CANCELLED" and sub.cancel_requested and ran == final.attempts + 1:
                report.cancelled_before_claim.append(job_id)
            else:
                report.unexplained_executions.append(f"{job_id}: executed {ran}x, attempts {final.attempts}")
    for delivery in deliveries:
        sub = jobs.get(delivery.job_id)
        outputs = delivery.output if delivery.where != "stream" and isinstance(delivery.output, list) \
            else [delivery.output]
        if sub is None or not all(_names_job(o, sub.token, delivery.job_id) for o in outputs):
            shown = str(delivery.output)[:120]
            report.wrong_output.append(f"{delivery.job_id}: {delivery.where} showed {shown}")
    for job_id in sorted(streams_followed):
        final = records.get(job_id)
        if final is None or final.status != "COMPLETED":
            continue
        seen = {d.output.get("i") for d in deliveries
                if d.job_id == job_id and d.where == "stream" and isinstance(d.output, dict)}
        if not set(range(chunks_per_stream)) <= seen:
            report.streams_short.append(f"{job_id}: chunks {sorted(i for i in seen if isinstance(i, int))}")
    return report


def cause(error: str) -> str:
    """A short, stable name for an error: its first clause, without ids."""
    head = error.split(":")[0].split("(")[0].strip()
    return head[:60] or "unknown"
