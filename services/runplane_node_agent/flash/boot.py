"""Flash boot on this node, for endpoints with `flashboot: true` on runtimes that can pause.

* **Pause while idle**: a worker whose take poll has waited RP_FLASH_PAUSE_S without a job
  is paused (docker pause; SIGSTOP of its whole process group) with that poll still open
  and still pulling. A job for it = the answer to the poll, then a resume: the worker thaws
  with its job already waiting. A paused worker is resumed as soon as any of its polls is
  answered (worker_api.py): when it ends
  empty (RP_TAKE_POLL_S) it gets its 204, polls again, and is paused again; so every answer
  reaches a worker whose own take timeout (90 s in the RunPod SDK) is far off. A paused
  worker cannot ping: it is never reaped as silent, and a resume restarts its ping clock.
  Stopping a paused worker resumes it first.
* **Parking**: a StopWorker with `park` for an idle worker pauses it into the node's pool
  instead of stopping it (at once, or at its next poll), within RP_PARK_MEMORY_MB, evicting
  the least recently used parked workers to make room (pool.py). A parked worker keeps its
  id and GPUs and is reported "parked": not one of its endpoint's workers. Its poll still
  pulls, so a job for its endpoint wakes it at once (it is one of the endpoint's workers
  again), as does a StartWorker naming it. A StartWorker needing its GPUs evicts it.
* **Pre-warm**: a StartWorker with `park` starts a worker parked: once initialised (its first
  poll) it is paused at once and admitted to the pool if it fits without evicting anything,
  else stopped. The size of the endpoint's workers is remembered, so a later pre-warm that
  cannot fit is refused at once instead of started and stopped again.
* **Snapshots**: the first initialised worker of an endpoint (per launch spec) on this node
  is committed to a snapshot image that later cold starts of the endpoint here start from,
  skipping what initialisation wrote to disk (runtimes with the snapshot capability).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from runplane_proto.endpoints import EndpointSpec

from runplane_node_agent import metrics
from runplane_node_agent.flash.pool import Parked, default_budget_mb, evictions
from runplane_node_agent.runtimes.base import Capability, Runtime, RuntimeFailure, Snapshot
from runplane_node_agent.settings import AgentSettings

if TYPE_CHECKING:
    from runplane_node_agent.supervisor import Worker

log = structlog.get_logger("runplane.node_agent.flash")


def spec_digest(spec: EndpointSpec) -> str:
    """What a worker's container or process is made of: a changed spec gets a new digest."""
    made_of = msgspec.json.encode([spec.image_name, spec.command, sorted(spec.env.items())])
    return hashlib.sha256(made_of).hexdigest()[:24]


class FlashBoot:
    def __init__(self, runtime: Runtime, settings: AgentSettings, memory_total_mb: int,
                 on_change: Callable[[], None]) -> None:
        self.runtime = runtime
        self.settings = settings
        self.on_change = on_change
        self.budget_mb = (default_budget_mb(memory_total_mb) if settings.park_memory_mb is None
                          else settings.park_memory_mb)
        self.can_pause = Capability.PAUSE in runtime.capabilities
        self.can_snapshot = settings.snapshots and Capability.SNAPSHOT in runtime.capabilities
        # Evicts a parked worker (set by the supervisor): (worker, reason).
        self.evict: Callable[[Worker, str], None] = lambda worker, reason: None
        self.workers: Callable[[], list[Worker]] = list
        self._pool_lock = asyncio.Lock()
        # Memory (MB) a parked worker of each launch spec (spec_digest) held when last measured.
        self._sizes: dict[str, int] = {}
        self._snapshots_known: set[Snapshot] = set()
        self._snapshots_committing: set[Snapshot] = set()
        self._tasks: set[asyncio.Task] = set()

    def enabled_for(self, worker: Worker) -> bool:
        return self.can_pause and worker.spec.flashboot

    # -- pause while idle ---------------------------------------------------------------------

    def idle(self, worker: Worker) -> bool:
        """Waiting for work and nothing else: ready, a poll open, no job, none being claimed."""
        return (worker.ready and worker.handle is not None and not worker.stopping and not worker.jobs
                and bool(worker.polls) and not any(p.claiming for p in worker.polls))

    def when_idle(self, worker: Worker) -> asyncio.TimerHandle | None:
        """A take poll of `worker` starts waiting: pause the worker if it is still waiting after
        RP_FLASH_PAUSE_S (at once when parked). Cancel the handle when the wait ends."""
        if not self.enabled_for(worker) or worker.paused:
            return None
        delay_s = 0.0 if worker.parked else self.settings.flash_pause_s
        if delay_s < 0:
            return None
        return asyncio.get_running_loop().call_later(delay_s, lambda: self._spawn(self.pause_if_idle(worker)))

    async def pause_if_idle(self, worker: Worker) -> None:
        async with worker.freeze_lock:
            if worker.paused or not self.idle(worker):
                return
            handle = worker.handle
            assert handle is not None
            try:
                await self.runtime.pause(handle)
            except RuntimeFailure as exc:
                log.warning("pausing an idle worker failed", worker_id=worker.worker_id, error=str(exc))
                return
            worker.paused = True
            metrics.FLASH_PAUSES.inc()

    def needs_wake(self, worker: Worker) -> bool:
        return worker.paused or worker.freeze_lock.locked()

    async def wake(self, worker: Worker) -> None:
        """Resume a paused worker (waits for a pause in progress); its ping clock restarts."""
        async with worker.freeze_lock:
            if not worker.paused:
                return
            started = time.perf_counter()
            if worker.handle is not None:
                try:
                    await self.runtime.resume(worker.handle)
                except RuntimeFailure as exc:  # gone: its exit is reaped as any other
                    log.warning("resuming a worker failed", worker_id=worker.worker_id, error=str(exc))
            worker.paused = False
            worker.last_seen = time.monotonic()
            metrics.FLASH_RESUME_SECONDS.observe(time.perf_counter() - started)

    def took_jobs(self, worker: Worker) -> None:
        """A poll of `worker` is being answered with jobs: a parked worker is the endpoint's again."""
        if worker.parked:
            worker.parked = False
            log.info("parked worker woke for a job", worker_id=worker.worker_id,
                     endpoint_id=worker.endpoint_id)
            metrics.FLASH_UNPARKS.labels(why="job").inc()
            self.on_change()

    # -- parking ------------------------------------------------------------------------------

    def parked(self) -> list[Worker]:
        return [w for w in self.workers() if w.parked and not w.stopping]

    def parked_mb(self) -> int:
        return sum(max(0, w.memory_mb) for w in self.parked())

    def budget_for_status(self) -> int:
        """The pool's budget as the node reports it: 0 where nothing can be parked."""
        return self.budget_mb if self.can_pause else 0

    def why_no_prewarm(self, spec: EndpointSpec) -> str | None:
        """Why a pre-warmed worker of `spec` cannot be taken now (None: it can)."""
        if not self.can_pause:
            return f"the {self.runtime.name} runtime cannot pause workers"
        if not spec.flashboot:
            return "not a flash endpoint"
        if self.budget_mb <= 0:
            return "parking is off on this node"
        free_mb = self.budget_mb - self.parked_mb()
        size_mb = self._sizes.get(spec_digest(spec))
        if free_mb <= 0 or (size_mb is not None and size_mb > free_mb):
            need = f"; a worker of this endpoint needs {size_mb} MB" if size_mb is not None else ""
            return f"the parking pool has {max(0, free_mb)} of {self.budget_mb} MB free{need}"
        return None

    async def admit_prewarmed(self, worker: Worker) -> str | None:
        """A pre-warmed worker finished initialising: admit it to the pool (None) if it fits
        without evicting anything, else say why (the caller stops it)."""
        async with self._pool_lock:
            if not worker.parked or worker.stopping or worker.handle is None:
                return None  # woke for a job (or is going): nothing to admit
            memory_mb = await self.runtime.memory_mb(worker.handle) or 0
            self._sizes[spec_digest(worker.spec)] = memory_mb
            held_mb = sum(max(0, w.memory_mb) for w in self.parked() if w is not worker)
            if held_mb + memory_mb > self.budget_mb:
                return (f"a pre-warmed worker needs {memory_mb} MB, the parking pool has "
                        f"{max(0, self.budget_mb - held_mb)} of {self.budget_mb} MB free")
            worker.memory_mb = memory_mb
        log.info("pre-warmed worker parked", worker_id=worker.worker_id, endpoint_id=worker.endpoint_id,
                 memory_mb=memory_mb)
        metrics.FLASH_PARKS.inc()
        self.on_change()
        return None

    async def park(self, worker: Worker) -> str | None:
        """Pause an idle worker into the pool; None when parked, else why it cannot be (the
        caller stops it instead)."""
        if not self.enabled_for(worker):
            return "not a flash worker on a runtime that can pause"
        if self.budget_mb <= 0:
            return "parking is off on this node"
        async with self._pool_lock:
            if not worker.ready or worker.stopping or worker.jobs or worker.handle is None \
                    or any(p.claiming for p in worker.polls):
                return "not idle"
            # From now on its polls pause it at once. Paused only with a poll open, so that a
            # job can always wake it: one between polls runs on to its next one.
            worker.parked = True
            await self.pause_if_idle(worker)
            if not worker.parked:  # woke for a job meanwhile: it stays the endpoint's
                return None
            memory_mb = await self.runtime.memory_mb(worker.handle) or 0
            others = [Parked(w.worker_id, w.memory_mb, w.idle_since_ms)
                      for w in self.parked() if w is not worker]
            victims = evictions(others, self.budget_mb, memory_mb)
            if victims is None:
                worker.parked = False
                return f"needs {memory_mb} MB, the pool holds at most {self.budget_mb} MB"
            worker.memory_mb = memory_mb
            self._sizes[spec_digest(worker.spec)] = memory_mb
            by_id = {w.worker_id: w for w in self.parked()}
            for victim in victims:
                metrics.FLASH_EVICTIONS.labels(why="memory").inc()
                self.evict(by_id[victim], f"parking pool full ({self.budget_mb} MB): least recently used")
        log.info("worker parked", worker_id=worker.worker_id, endpoint_id=worker.endpoint_id,
                 memory_mb=memory_mb, evicted=victims or None)
        metrics.FLASH_PARKS.inc()
        self.on_change()
        return None

    async def unpark(self, worker: Worker) -> None:
        """A StartWorker named a parked worker: it is the endpoint's again. With a poll open it
        stays paused until a job comes; without one it is resumed so that it polls."""
        worker.parked = False
        metrics.FLASH_UNPARKS.labels(why="command").inc()
        log.info("parked worker resumed", worker_id=worker.worker_id, endpoint_id=worker.endpoint_id)
        self.on_change()
        if not worker.polls:
            await self.wake(worker)

    # -- snapshots ----------------------------------------------------------------------------

    def snapshot_of(self, worker: Worker) -> Snapshot | None:
        spec = worker.spec
        if not self.can_snapshot or not spec.flashboot or not spec.image_name:
            return None
        return Snapshot(endpoint_id=spec.id, spec_digest=spec_digest(spec), base_image=spec.image_name)

    async def launch_image(self, worker: Worker) -> str | None:
        """The image for a cold start of `worker`: its endpoint's snapshot on this node if there is one."""
        worker.from_snapshot = False
        snapshot = self.snapshot_of(worker)
        if snapshot is None:
            return worker.spec.image_name
        image = await self.runtime.find_snapshot(snapshot)
        if image is None:
            self._snapshots_known.discard(snapshot)
            return worker.spec.image_name
        self._snapshots_known.add(snapshot)
        worker.from_snapshot = True
        return image

    def initialised(self, worker: Worker) -> None:
        """`worker` polled for the first time: snapshot it unless its endpoint has one here."""
        snapshot = self.snapshot_of(worker)
        if snapshot is None or worker.from_snapshot or snapshot in self._snapshots_known \
                or snapshot in self._snapshots_committing:
            return
        self._snapshots_committing.add(snapshot)
        self._spawn(self._commit(worker, snapshot))

    async def _commit(self, worker: Worker, snapshot: Snapshot) -> None:
        handle = worker.handle
        started = time.perf_counter()
        try:
            if handle is None:
                return
            await self.runtime.snapshot(handle, snapshot)
            self._snapshots_known.add(snapshot)
            log.info("snapshot saved", worker_id=worker.worker_id, endpoint_id=snapshot.endpoint_id,
                     spec_digest=snapshot.spec_digest, took_s=round(time.perf_counter() - started, 2))
            metrics.FLASH_SNAPSHOTS.labels(result="saved").inc()
        except RuntimeFailure as exc:
            log.warning("snapshot failed", worker_id=worker.worker_id, endpoint_id=snapshot.endpoint_id,
                        error=str(exc))
            metrics.FLASH_SNAPSHOTS.labels(result="failed").inc()
        finally:
            self._snapshots_committing.discard(snapshot)

    async def collect_snapshots(self, endpoint_ids: set[str]) -> None:
        """Remove the snapshot images of endpoints not in `endpoint_ids` (deleted ones)."""
        if not self.can_snapshot:
            return
        for endpoint_id in sorted(await self.runtime.snapshot_endpoints() - endpoint_ids):
            removed = await self.runtime.remove_snapshots(endpoint_id)
            self._snapshots_known = {s for s in self._snapshots_known if s.endpoint_id != endpoint_id}
            log.info("snapshots of a deleted endpoint removed", endpoint_id=endpoint_id, images=removed)
            metrics.FLASH_SNAPSHOTS.labels(result="removed").inc(removed)

    # -- tasks --------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            metrics.LOOP_ERRORS.labels(loop="flash").inc()
            log.error("flash boot task failed", error=repr(task.exception()))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
