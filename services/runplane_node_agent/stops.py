"""Stopping jobs a worker holds: the job-stop long-poll, cancels, execution timeouts, the
grace period before a worker that will not let go is recycled, and message keep-alives."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog
from nats.aio.msg import Msg

from runplane_node_agent import metrics, transitions
from runplane_node_agent.held import HeldJob, keep_alive
from runplane_node_agent.supervisor import Worker

if TYPE_CHECKING:
    from runplane_node_agent.jobs import Jobs

log = structlog.get_logger("runplane.node_agent.stops")

# A stop stays on offer; it is offered again at most this often (the runpod SDK polls the
# stop channel again at once after an answer).
_REOFFER_S = 1.0
# A ping or take saying "not holding it" only counts for jobs handed over longer ago than
# this: a ping snapshot taken just before the hand-over may arrive just after it.
HANDOVER_MARGIN_S = 1.0


class Stops:
    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.settings = jobs.settings

    async def poll(self, worker: Worker) -> list[str]:
        """job-stop long-poll: ids of this worker's jobs it should stop ([] after the hold)."""
        deadline = time.monotonic() + self.settings.take_poll_s
        while True:
            now = time.monotonic()
            due: list[HeldJob] = []
            wake_at = deadline
            for job_id in worker.jobs:
                held = self.jobs.held.get(job_id)
                if held is None or not held.stop_reason:
                    continue
                if now - held.stop_offered_at >= _REOFFER_S:
                    due.append(held)
                else:
                    wake_at = min(wake_at, held.stop_offered_at + _REOFFER_S)
            if due:
                for held in due:
                    held.stop_offered_at = now
                return [h.job_id for h in due]
            if now >= deadline or worker.stopping or self.jobs.draining:
                return []
            worker.stop_event.clear()
            try:
                await asyncio.wait_for(worker.stop_event.wait(), wake_at - now)
            except TimeoutError:
                pass

    def cancel(self, job_id: str, reason: str) -> None:
        """A CancelJob for a job we may hold: offer it on its worker's stop channel."""
        held = self.jobs.held.get(job_id)
        if held is not None:
            self.offer(held, reason or "cancelled")

    def offer(self, held: HeldJob, reason: str) -> None:
        if held.stop_reason:
            return
        held.stop_reason = reason
        held.stop_since = time.monotonic()
        held.worker.stop_event.set()
        log.info("stop offered", job_id=held.job_id, worker_id=held.worker.worker_id, reason=reason)

    def ping(self, worker: Worker, job_ids: frozenset[str]) -> None:
        """A heartbeat listing the jobs the worker holds: stopped jobs it no longer lists are let go."""
        now = time.monotonic()
        for job_id in list(worker.jobs):
            held = self.jobs.held.get(job_id)
            if (held is not None and held.stop_reason and job_id not in job_ids
                    and now - held.taken_at > HANDOVER_MARGIN_S):
                self.jobs.spawn(self.jobs.let_go(held))

    def tick(self, now: float) -> None:
        """Execution timeouts, stop grace periods and message keep-alives."""
        keepalive_s = self.settings.keepalive_s
        due: list[Msg] = []
        for held in list(self.jobs.held.values()):
            if held.stop_reason is None:
                if now >= held.deadline and held.claim.done():
                    self.offer(held, "timed out")
                    self.jobs.spawn(self._record_timeout(held))
            elif not held.recycle_asked and now - held.stop_since >= self.settings.stop_grace_s:
                held.recycle_asked = True
                self.jobs.supervisor.recycle(
                    held.worker.worker_id,
                    f"still holding job {held.job_id} {self.settings.stop_grace_s:g} s after it was "
                    f"{held.stop_reason}")
            if now - held.keepalive_at >= keepalive_s:
                held.keepalive_at = now
                due.append(held.msg)
        if due:
            self.jobs.spawn(keep_alive(due))

    async def _record_timeout(self, held: HeldJob) -> None:
        if not await self.jobs.claimed(held):
            return
        async with held.lock:
            if held.done:
                return
            now_ms = self.jobs.clock.now_ms()
            timeout_ms = held.record.policy.execution_timeout_ms or held.worker.spec.execution_timeout_ms
            record = await self.jobs.records.conclude(held.key, held.record, held.revision, lambda r: (
                transitions.finished(r, "TIMED_OUT", now_ms=now_ms, keep_output=True, chunks=held.chunks,
                                     error=transitions.execution_timeout_error(timeout_ms))))
            if record is not None:
                metrics.finished(held.endpoint_id, "TIMED_OUT").inc()
