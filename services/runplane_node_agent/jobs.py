"""Jobs on this node: taking them from JetStream, recording what workers report, letting go.

A job is *held* from the moment a worker's poll is answered with it until its message
is acked or given back. Held messages are kept alive with `in_progress()` (see stops.py);
an agent that dies stops doing that and JetStream redelivers them to another agent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog
from nats.aio.msg import Msg
from msgspec.structs import replace
from nats.errors import MaxPayloadError
from runplane_bus import Bus, Conflict, Versioned
from runplane_proto import subjects as s
from runplane_proto.codec import Codec, DecodeError
from runplane_proto.jobs import ChunkAdded, JobQueued, JobRecord, StreamChunk, is_terminal
from runplane_proto.timings import JobTimings, phases, start_of
from runplane_service.clock import Clock

from runplane_node_agent import metrics, transitions
from runplane_node_agent.held import (
    OBJECT_DECODER,
    RESULT_DECODER,
    HeldJob,
    Poll,
    Release,
    error_text,
    job_payload,
    settle,
)
from runplane_node_agent.pulls import QUIET_STATUSES, EndpointPuller
from runplane_node_agent.records import RecordWriter
from runplane_node_agent.settings import AgentSettings
from runplane_node_agent.stops import HANDOVER_MARGIN_S, Stops
from runplane_node_agent.supervisor import Supervisor, Worker

log = structlog.get_logger("runplane.node_agent.jobs")

_QUEUED: Codec[JobQueued] = Codec(JobQueued)
# A queue message whose record is missing is retried this long after its submit before it
# is dropped as purged.
_MISSING_RECORD_GRACE_MS = 10_000
_MISSING_RECORD_RETRY_S = 0.5


class Jobs:
    def __init__(self, bus: Bus, settings: AgentSettings, clock: Clock, supervisor: Supervisor,
                 on_change: Callable[[], None]) -> None:
        self.bus = bus
        self.settings = settings
        self.clock = clock
        self.supervisor = supervisor
        self.on_change = on_change
        self.held: dict[str, HeldJob] = {}
        self.pullers: dict[str, EndpointPuller] = {}
        self.draining = False
        self._consumer_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._empty = asyncio.Event()
        self.records = RecordWriter(bus)
        self.stops = Stops(self)

    # -- endpoints --------------------------------------------------------------------------

    async def ensure_endpoint(self, endpoint_id: str) -> EndpointPuller:
        """Make sure the endpoint's shared consumer exists; once per endpoint, not per poll."""
        puller = self.pullers.get(endpoint_id)
        if puller is not None:
            return puller
        async with self._consumer_lock:
            if endpoint_id not in self.pullers:
                await self.bus.ensure_job_consumer(endpoint_id, ack_wait_s=self.settings.ack_wait_s)
                self.pullers[endpoint_id] = EndpointPuller(self.bus.nc, endpoint_id)
        return self.pullers[endpoint_id]

    async def forget_idle_endpoints(self) -> None:
        """Close the pull subscriptions of endpoints that have no worker on this node any more."""
        served = {w.endpoint_id for w in self.supervisor.workers.values()}
        for endpoint_id in [ep for ep in self.pullers if ep not in served]:
            await self.pullers.pop(endpoint_id).close()

    # -- take -------------------------------------------------------------------------------

    async def take(self, worker: Worker, batch: int, poll: Poll, *,
                   holds_jobs: bool | None = None) -> list[HeldJob]:
        """Long-poll for up to `batch` jobs; [] when none came within RP_TAKE_POLL_S."""
        now = time.monotonic()
        worker.last_seen = now
        self.supervisor.mark_ready(worker)
        if holds_jobs is False and worker.jobs:
            await self._holds_nothing(worker, now)
        deadline = now + self.settings.take_poll_s
        puller = self.pullers.get(worker.endpoint_id) or await self.ensure_endpoint(worker.endpoint_id)
        flash = self.supervisor.flash
        metrics.TAKE_POLLS_WAITING.inc()
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0.01:
                    return []
                if self.draining or worker.stopping:
                    await asyncio.sleep(remaining)  # hold the poll; nothing is handed out now
                    return []
                pause = flash.when_idle(worker)  # flash boot: paused while this wait lasts
                try:
                    result = await puller.pull(batch, remaining)
                finally:
                    if pause is not None:
                        pause.cancel()
                if result.msgs:
                    poll.claiming = True
                    try:
                        # A paused worker is resumed while its job is claimed.
                        paused = flash.needs_wake(worker)
                        waking = asyncio.ensure_future(_timed(flash.wake(worker))) if paused else None
                        taken = await self._claim_all(worker, result.msgs, paused)
                        resume_ms = await waking if waking is not None else 0
                    finally:
                        poll.claiming = False
                    if taken and (worker.stopping or self.draining):
                        await self.give_back(taken)
                        return []
                    if taken:
                        flash.took_jobs(worker)
                        self._handed_over(taken, resume_ms)
                        return taken
                elif result.status is not None and result.status not in QUIET_STATUSES \
                        and result.status != "timeout":
                    # 409/503: consumer deleted or JetStream unavailable; recreate, back off.
                    log.warning("pull refused", endpoint_id=worker.endpoint_id, status=result.status)
                    self.pullers.pop(worker.endpoint_id, None)
                    await asyncio.sleep(0.2)
                    puller = await self.ensure_endpoint(worker.endpoint_id)
                else:
                    return []
        finally:
            metrics.TAKE_POLLS_WAITING.dec()
            if flash.needs_wake(worker) and not worker.stopping:
                # Never answered while paused: the worker's own take timeout keeps running.
                await flash.wake(worker)

    async def _claim_all(self, worker: Worker, msgs: list[Msg], paused: bool) -> list[HeldJob]:
        if len(msgs) == 1:
            held = await self._claim(worker, msgs[0], paused)
            return [held] if held is not None else []
        results = await asyncio.gather(*(self._claim(worker, m, paused) for m in msgs))
        return [h for h in results if h is not None]

    def _handed_over(self, taken: list[HeldJob], resume_ms: int) -> None:
        """The take is answered now: the hand-over instant (and a flash start's resume) go
        into each job's timings, written with its terminal record."""
        now_ms = self.clock.now_ms()
        for held in taken:
            if held.timings is not None:
                held.timings = replace(held.timings, handed_over_at_ms=now_ms, worker_start_ms=(
                    resume_ms if held.timings.start_kind == "flash" else held.timings.worker_start_ms))

    async def _claim(self, worker: Worker, msg: Msg, paused: bool = False) -> HeldJob | None:
        ep = worker.endpoint_id
        try:
            queued = _QUEUED.decode(msg.data)
        except DecodeError as exc:
            log.warning("dropped undecodable queue message", endpoint_id=ep, error=str(exc))
            metrics.JOBS_SKIPPED.labels(endpoint=ep, reason="undecodable").inc()
            await msg.term()
            return None
        job_id = queued.job_id
        now = time.monotonic()
        already = self.held.get(job_id)
        if already is not None:  # redelivered while we hold it: the newest delivery is the one to ack
            already.msg = msg
            already.keepalive_at = now
            return None
        key = s.job_key(ep, job_id)
        now_ms = self.clock.now_ms()
        # A first delivery carrying its record goes to the worker at once; the claim write
        # reads the stored record meanwhile (a cancel in between becomes a stop).
        record = _as_sent(queued, msg, ep, now_ms=now_ms, max_attempts=self.settings.max_attempts,
                          window_ms=self.settings.as_sent_window_ms)
        revision: int | None = None
        try:
            if record is None:
                current = await self.bus.jobs.get(key)
                if current is None:
                    current = await self._await_record(key, queued)
                    if current is None:
                        if self._recent(queued):
                            await settle(msg, "nak", delay_s=_MISSING_RECORD_RETRY_S)
                        else:  # purged (or a submit that failed half-way): drop the message
                            metrics.JOBS_SKIPPED.labels(endpoint=ep, reason="missing").inc()
                            await msg.ack()
                        return None
                if is_terminal(current.value.status):
                    metrics.JOBS_SKIPPED.labels(endpoint=ep, reason="terminal").inc()
                    await msg.ack()
                    return None
                record, revision = current.value, current.revision
                now_ms = self.clock.now_ms()
            verdict = transitions.verdict(record, now_ms=now_ms, max_attempts=self.settings.max_attempts)
            if verdict is not transitions.Verdict.RUN:
                assert revision is not None  # a record as sent is only used when it is to run
                if verdict is transitions.Verdict.EXPIRED:
                    status, error = "TIMED_OUT", transitions.expired_error(record)
                else:
                    status, error = "FAILED", transitions.exhausted_error(record, self.settings.max_attempts)
                metrics.JOBS_SKIPPED.labels(endpoint=ep, reason=verdict.value).inc()
                await self.records.conclude(key, record, revision, lambda r: transitions.finished(
                    r, status, now_ms=now_ms, error=error, keep_output=True,
                    attempt_error=transitions.LOST_ATTEMPT_ERROR))
                await msg.ack()
                return None
            input_json = record.input_json
            if input_json is None and record.input_ref is not None:
                input_json = await self.bus.payloads.load(None, record.input_ref)
        except Exception as exc:  # NATS trouble: put it back, but not straight into our own next pull
            log.warning("taking a job failed", job_id=job_id, endpoint_id=ep, error=repr(exc))
            await settle(msg, "nak", delay_s=1.0)
            return None
        claimed = replace(transitions.in_progress(record, worker_id=worker.worker_id,
                                                  node_id=self.settings.node_id, now_ms=now_ms),
                          timings=start_of(submitted_at_ms=record.submitted_at_ms,
                                           spawned_at_ms=worker.started_at_ms, ready_at_ms=worker.ready_at_ms,
                                           from_snapshot=worker.from_snapshot, paused=paused))
        held = HeldJob(worker, msg, claimed, key, now)
        held.payload = job_payload(claimed, input_json)
        self._hold(held)
        # The hand-over does not wait for the claim write: everything that touches the
        # record later awaits `self.claimed(held)` first, and a lost claim becomes a stop.
        self.spawn(self._write_claim(held, revision, queued, first=_first_delivery(msg)))
        metrics.taken(ep).inc()
        return held

    def _recent(self, queued: JobQueued) -> bool:
        """Submitted within the grace period. A time far in the future (a forged or garbled
        message) is not recent, or its message would be retried for good."""
        return abs(self.clock.now_ms() - queued.submitted_at_ms) < _MISSING_RECORD_GRACE_MS

    async def _await_record(self, key: str, queued: JobQueued) -> Versioned[JobRecord] | None:
        """The gateway writes the record and queues the job at the same time, so a fresh
        message may arrive first: look again a few times, briefly."""
        if not self._recent(queued):
            return None
        for pause_s in (0.001, 0.003, 0.01, 0.03):
            await asyncio.sleep(pause_s)
            current = await self.bus.jobs.get(key)
            if current is not None:
                return current
        return None

    async def _write_claim(self, held: HeldJob, revision: int | None, queued: JobQueued, *,
                           first: bool = False) -> None:
        current = None
        # The worker already has the job: a claim given up on NATS trouble (a stream electing
        # a leader after a server died) means an execution no attempt counts, and an
        # immediate redelivery runs it again. So NATS errors are retried for a while (the
        # message is kept alive meanwhile, records.WRITE_RETRY_S), conflicts re-read the record.
        # One turn of the loop first, so the take's answer leaves before this write: the worker
        # starts on the job while its claim is written.
        await asyncio.sleep(0)
        try:
            if revision is None:  # handed over as its message carried it: the stored record now
                current = await self.bus.jobs.get(held.key)
                if current is None:
                    current = await self._await_record(held.key, queued)
                if current is not None and current.value.status == "IN_QUEUE":
                    revision = current.revision
                    held.record = self._claimed_again(held, current.value)
            if revision is not None and held.finishing:
                # The result came first (a quick handler): the claim is not written on its
                # own; the terminal write, from this revision, carries the attempt.
                held.revision = revision
                held.claim.set_result(True)
                return
            if revision is not None and first and self._defer_claim(held, revision):
                return
        except Exception as exc:
            log.warning("claim write failed", job_id=held.job_id, error=repr(exc))
            held.release = "nak"
            self._claim_lost(held, "claim failed")
            return
        await self._write_claim_now(held, revision, current)

    def _defer_claim(self, held: HeldJob, revision: int) -> bool:
        """A first attempt's claim waits until RP_CLAIM_DELAY_MS after its hand-over: a job
        that ends before is stored twice (queued, ended) instead of three times, with one
        event instead of two: the terminal write carries the attempt (`_finish` folds the
        claim in). Anything else that needs the claim (progress, a chunk, a stop, a lost
        worker) writes it at once (`claimed`). Until then the record reads IN_QUEUE and an
        agent lost meanwhile leaves the attempt uncounted, as one lost before any claim write
        lands."""
        delay_s = held.taken_at + self.settings.claim_delay_ms / 1000 - time.monotonic()
        if delay_s <= 0 or held.claim_wanted or held.stop_reason or self.draining:
            return False

        def start() -> None:
            held.deferred = None
            self.spawn(self._write_claim_now(held, revision, None))

        held.deferred = (asyncio.get_running_loop().call_later(delay_s, start), revision)
        return True

    async def claimed(self, held: HeldJob) -> bool:
        """Whether the job's claim is ours (written, or to be carried by the terminal write);
        a claim still deferred is written now."""
        held.claim_wanted = True
        if held.deferred is not None:
            timer, revision = held.deferred
            timer.cancel()
            held.deferred = None
            self.spawn(self._write_claim_now(held, revision, None))
        return await held.claim

    async def _write_claim_now(self, held: HeldJob, revision: int | None,
                               current: Versioned[JobRecord] | None) -> None:
        """The claim's compare-and-set from `revision`, re-read and retried on conflicts while
        the stored record is still queued."""
        try:
            for _ in range(5 if revision is not None else 0):
                try:
                    held.revision = await self.records.update(held.key, held.record, revision)
                except Conflict:
                    current = await self.bus.jobs.get(held.key)
                    if current is None or current.value.status != "IN_QUEUE":
                        break
                    revision = current.revision
                    held.record = self._claimed_again(held, current.value)
                    continue
                held.claim.set_result(True)
                await self.bus.job_changed(held.record)
                return
            if revision is None and current is None:
                # Handed over from its message, but no record is stored (yet, or ever: a submit
                # that failed half-way): back to the queue, where a delivery reads the record
                # first (and drops the message once the record is surely not coming).
                held.release, reason = "nak", "the job's record is not stored"
            else:
                # Cancelled (or purged) before the claim landed, or another agent claimed it.
                terminal = current is None or is_terminal(current.value.status)
                if current is not None:
                    held.record, held.revision = current.value, current.revision
                held.release = "ack" if terminal else "none"
                reason = "cancelled" if terminal else "taken by another worker"
        except Exception as exc:
            log.warning("claim write failed", job_id=held.job_id, error=repr(exc))
            held.release, reason = "nak", "claim failed"
        self._claim_lost(held, reason)

    def _claim_lost(self, held: HeldJob, reason: str) -> None:
        if not held.claim.done():
            held.claim.set_result(False)
        self.stops.offer(held, reason)

    def _claimed_again(self, held: HeldJob, stored: JobRecord) -> JobRecord:
        """The claim made again from the stored record (it changed since the hand-over)."""
        return replace(transitions.in_progress(
            stored, worker_id=held.worker.worker_id, node_id=self.settings.node_id,
            now_ms=held.record.started_at_ms or self.clock.now_ms()), timings=held.timings)

    # -- what workers report ----------------------------------------------------------------

    async def result(self, worker: Worker, job_id: str, body: bytes) -> int:
        """job-done: a progress update or the final result. Returns the HTTP status."""
        try:
            parsed = RESULT_DECODER.decode(body)
        except DecodeError:
            return 400
        held = self.held.get(job_id)
        if parsed.status == "IN_PROGRESS":
            if held is not None and held.worker is worker and len(parsed.output):
                await self._progress(held, bytes(parsed.output))
            return 200  # late progress (after the result) is ignored, not an error
        if held is None or held.worker is not worker:
            return 404
        await self._finish(held, error_text(parsed.error), bytes(parsed.output))
        if parsed.stopPod:
            self.supervisor.recycle(worker.worker_id, "stopPod after job")
        return 200

    async def result_too_large(self, worker: Worker, job_id: str, limit: str) -> None:
        """job-done with a body over the limit: the job it holds fails saying so, rather than
        staying IN_PROGRESS until the worker lets go and then running again."""
        held = self.held.get(job_id)
        if held is not None and held.worker is worker:
            await self._finish(held, f"the worker's result was over the {limit} limit of job-done", b"")

    async def _progress(self, held: HeldJob, output: bytes) -> None:
        if not await self.claimed(held):
            return
        async with held.lock:
            if held.done or held.stop_reason:
                return
            inline, ref = await self.bus.payloads.save(held.job_id, "output", output)
            record, revision, _ = await self.records.cas(held.key, held.record, held.revision, lambda r: (
                transitions.with_progress(r, output_json=inline, output_ref=ref)))
            if record is not None:
                held.record, held.revision = record, revision

    async def _finish(self, held: HeldJob, error: str | None, output: bytes) -> None:
        done_ms = self.clock.now_ms()  # job-done received: the handler's end
        held.finishing = True
        if held.deferred is not None:  # ended within the claim delay: the terminal write claims
            timer, held.revision = held.deferred
            timer.cancel()
            held.deferred = None
            held.claim.set_result(True)
        if await held.claim:
            async with held.lock:
                if held.done:
                    return
                status = "FAILED" if error is not None else "COMPLETED"
                inline, ref = (await self.bus.payloads.save(held.job_id, "output", output)
                               if output else (None, None))
                now_ms = self.clock.now_ms()
                # A failed write raises (HTTP 500): the worker retries and the job stays held.
                timings = held.timings and replace(held.timings, handler_done_at_ms=done_ms)
                record = await self.records.conclude(held.key, held.record, held.revision, lambda r: (
                    _with_timings(transitions.finished(r, status, now_ms=now_ms, output_json=inline,
                                                       output_ref=ref, error=error, chunks=held.chunks),
                                  timings)))
                held.done = True
                if record is not None:
                    metrics.job_phases(held.endpoint_id, phases(record, now_ms))
                metrics.finished(held.endpoint_id, status if record is not None else "kept").inc()
                metrics.execution(held.endpoint_id).observe(time.monotonic() - held.taken_at)
            self.supervisor.job_finished(held.worker)
        await self._release(held, held.release)

    async def chunk(self, worker: Worker, job_id: str, body: bytes) -> int:
        """job-stream: store one `{"output": v}` chunk in order and announce it."""
        held = self.held.get(job_id)
        if held is None or held.worker is not worker:
            return 404
        body = body.strip()
        try:
            OBJECT_DECODER.decode(body)
        except DecodeError:
            return 400
        if not await self.claimed(held):
            return 200
        async with held.lock:
            if held.done or held.stop_reason:
                return 200
            index = held.chunks
            try:
                # Retried on NATS errors (a chunk refused with 500 is dropped for good by RunPod's
                # SDK); the id is per attempt, as a job run again numbers its chunks from 0.
                await self.records.publish_durable(
                    s.job_chunks(job_id), StreamChunk(job_id=job_id, index=index, chunk_json=body),
                    msg_id=f"{job_id}:{held.record.attempts}:{index}", job_id=job_id)
            except MaxPayloadError:
                return 413
            held.chunks = index + 1
            await self.bus.publish(s.job_events(job_id), ChunkAdded(job_id=job_id, index=index))
        metrics.chunks(held.endpoint_id).inc()
        return 200

    async def _holds_nothing(self, worker: Worker, now: float) -> None:
        """The worker asked for work with job_in_progress=0: it holds none of our jobs."""
        for job_id in list(worker.jobs):
            held = self.held.get(job_id)
            if held is None or now - held.taken_at <= HANDOVER_MARGIN_S:
                continue
            if held.stop_reason:
                await self.let_go(held)
            elif not held.done:
                await self._requeue_or_fail(held, "worker dropped the job (asked for work holding none)")

    # -- letting go -------------------------------------------------------------------------

    async def release_worker(self, worker: Worker, why: str) -> None:
        """The worker's process is gone: its jobs go back to the queue while attempts remain."""
        for job_id in list(worker.jobs):
            held = self.held.get(job_id)
            if held is None or held.worker is not worker:
                worker.jobs.discard(job_id)
                worker.low_priority_jobs.discard(job_id)
            elif held.stop_reason:
                await self.let_go(held)
            else:
                await self._requeue_or_fail(held, why)

    async def _requeue_or_fail(self, held: HeldJob, why: str) -> None:
        if not await self.claimed(held):
            await self._release(held, held.release)
            return
        async with held.lock:
            if held.done:
                return
            held.done = True
            attempts, limit = held.record.attempts, self.settings.max_attempts
            release: Release
            try:
                if attempts < limit:
                    now_ms = self.clock.now_ms()
                    record = await self.records.conclude(held.key, held.record, held.revision, lambda r: (
                        transitions.requeued(r, error=why, now_ms=now_ms)))
                    release = "nak" if record is not None else "ack"
                    metrics.JOBS_REQUEUED.labels(endpoint=held.endpoint_id, reason="worker gone").inc()
                    log.info("job requeued", job_id=held.job_id, worker_id=held.worker.worker_id, why=why,
                             attempts=attempts)
                else:
                    now_ms = self.clock.now_ms()
                    error = f"{why}; attempt {attempts} of {limit}"
                    await self.records.conclude(held.key, held.record, held.revision, lambda r: (
                        transitions.finished(r, "FAILED", now_ms=now_ms, error=error, chunks=held.chunks)))
                    metrics.finished(held.endpoint_id, "FAILED").inc()
                    release = "ack"
            except Exception as exc:  # the record stays IN_PROGRESS; the next take counts the attempt
                log.warning("releasing a job failed", job_id=held.job_id, error=repr(exc))
                release = "nak"
        await self._release(held, release)

    async def give_back(self, taken: list[HeldJob]) -> None:
        """Jobs claimed for a poll that can no longer take them: back to the queue, the take undone."""
        for held in taken:
            if not await self.claimed(held):
                await self._release(held, held.release)
                continue
            async with held.lock:
                if held.done:
                    continue
                held.done = True
                try:
                    record = await self.records.conclude(held.key, held.record, held.revision, lambda r: (
                        transitions.requeued(r, count_attempt=False)))
                except Exception as exc:
                    log.warning("giving a job back failed", job_id=held.job_id, error=repr(exc))
                    record = held.record
            await self._release(held, "nak" if record is not None else "ack")

    async def let_go(self, held: HeldJob) -> None:
        """A stopped job the worker no longer holds: its record is final (or someone else's)."""
        await self.claimed(held)
        async with held.lock:
            if held.done:
                return
            held.done = True
        await self._release(held, held.release)

    def _hold(self, held: HeldJob) -> None:
        self.held[held.job_id] = held
        self._empty.clear()
        worker = held.worker
        worker.jobs.add(held.job_id)
        if held.record.policy.low_priority:
            worker.low_priority_jobs.add(held.job_id)
        if len(worker.jobs) == 1:
            self.on_change()

    async def _release(self, held: HeldJob, release: Release) -> None:
        held.done = True
        if self.held.get(held.job_id) is held:
            del self.held[held.job_id]
            if not self.held:
                self._empty.set()
        worker = held.worker
        worker.low_priority_jobs.discard(held.job_id)
        if held.job_id in worker.jobs:
            worker.jobs.discard(held.job_id)
            if not worker.jobs:
                worker.idle_since_ms = self.clock.now_ms()
                self.on_change()
        await settle(held.msg, release)

    # -- shutdown ---------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop taking work: waiting polls end now, later ones hold without pulling."""
        self.draining = True
        for worker in self.supervisor.workers.values():
            for poll in list(worker.polls):
                poll.interrupt()
            worker.stop_event.set()

    async def drain(self, grace_s: float) -> None:
        """Let held jobs finish within `grace_s`, then give the rest back to the queue."""
        if self.held:
            try:
                await asyncio.wait_for(self._empty.wait(), grace_s)
            except TimeoutError:
                pass
        # Unsubscribe first, so the messages given back are not redelivered to our own pulls.
        for puller in self.pullers.values():
            await puller.close()
        for held in list(self.held.values()):
            if held.stop_reason:
                await self.let_go(held)
            else:
                await self.give_back([held])

    def spawn(self, coro) -> None:
        """Run a background step owned by the job book (errors are logged and counted)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(_finished_task(self._tasks))


def _as_sent(queued: JobQueued, msg: Msg, endpoint_id: str, *, now_ms: int, max_attempts: int,
             window_ms: int) -> JobRecord | None:
    """The record a queue message carries, when the job may go to a worker on it alone: its
    first delivery, for this endpoint, submitted at most `window_ms` ago (a job that waited in
    the queue may have been cancelled meanwhile and must not start; a cancel inside the window
    meets a job already started, which is stopped, as a cancel racing any hand-over is),
    queued and never run. Anything else is decided on the stored record."""
    record = queued.record
    if record is None or record.id != queued.job_id or record.endpoint_id != endpoint_id \
            or record.status != "IN_QUEUE" or record.attempts != 0:
        return None
    # abs(): with clocks further apart than the window, every job takes the stored-record path.
    if abs(now_ms - record.submitted_at_ms) > window_ms:
        return None
    try:
        if msg.metadata.num_delivered != 1:
            return None
    except Exception:  # not a JetStream delivery
        return None
    if transitions.verdict(record, now_ms=now_ms, max_attempts=max_attempts) is not transitions.Verdict.RUN:
        return None
    return record


def _first_delivery(msg: Msg) -> bool:
    try:
        return msg.metadata.num_delivered == 1
    except Exception:  # not a JetStream delivery
        return False


def _with_timings(record: JobRecord | None, timings: JobTimings | None) -> JobRecord | None:
    return record if record is None or timings is None else replace(record, timings=timings)


async def _timed(resume) -> int:
    """How long a flash resume took (ms)."""
    started = time.perf_counter()
    await resume
    return round((time.perf_counter() - started) * 1000)


def _finished_task(tasks: set[asyncio.Task]):
    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            metrics.LOOP_ERRORS.labels(loop="jobs").inc()
            log.error("job task failed", error=repr(task.exception()))
    return done
