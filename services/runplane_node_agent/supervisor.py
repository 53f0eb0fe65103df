"""Workers on this node: start, stop, recycle, notice exits and silence, report state.

A *recycle* replaces a worker's process with a fresh one under the same worker id
(stopPod, a job it would not let go, an unhealthy or silent worker). A worker that
exits on its own, or is stopped by a command, is removed; the scheduler replaces it.
Flash boot (flash/boot.py) pauses idle workers and parks those a StopWorker lets it keep.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlencode

import structlog
from runplane_proto.endpoints import EndpointSpec, launch_key
from runplane_proto.nodes import CommandReply, StartWorker, StopWorker, WorkerInfo, WorkerState
from runplane_service.clock import Clock

from runplane_node_agent import metrics, node_metrics
from runplane_node_agent.flash.boot import FlashBoot, spec_digest
from runplane_node_agent.runtimes.base import (
    Adopted,
    Launch,
    OutputSink,
    RunningWorker,
    Runtime,
    RuntimeFailure,
)
from runplane_node_agent.settings import AgentSettings

log = structlog.get_logger("runplane.node_agent.supervisor")

# Recycles of a worker that never finished a job in between wait longer each time.
_MAX_RESTART_DELAY_S = 30.0


class Worker:
    """One worker slot on this node and what the agent knows about its process."""

    def __init__(self, cmd: StartWorker, now_ms: int) -> None:
        self.worker_id: str = cmd.worker_id
        self.endpoint_id: str = cmd.spec.id
        self.spec: EndpointSpec = cmd.spec
        self.launch_key = launch_key(cmd.spec)
        self.gpu_uuids: tuple[str, ...] = tuple(cmd.gpu_uuids)
        self.token = ""
        self.generation = 0
        self.handle: RunningWorker | None = None
        self.ready = False  # asked for work at least once
        self.stopping = False
        self.removing = False  # stop for good (command, shutdown) rather than recycle
        self.stop_reason = ""
        self.jobs: set[str] = set()
        # Those of `jobs` submitted as low priority (reported so the autoscaler counts them apart).
        self.low_priority_jobs: set[str] = set()
        self.started_at_ms = now_ms
        self.idle_since_ms = now_ms
        self.ready_at_ms = 0  # when its process first asked for work (0: not yet)
        self.last_seen = time.monotonic()
        self.pinged = False
        self.ping_job_ids: frozenset[str] = frozenset()
        self.runpod_version: str | None = None
        self.jobs_done = 0
        self.recycles_without_work = 0
        # Set when a stop is due for one of its jobs, or the worker is being stopped.
        self.stop_event = asyncio.Event()
        # Take polls in flight: interrupted when the worker stops.
        self.polls: set = set()
        # Flash boot: frozen now (pause and resume hold the lock); in the node's pool.
        self.paused = False
        self.parked = False
        self.freeze_lock = asyncio.Lock()
        self.memory_mb = 0  # measured when parked
        self.from_snapshot = False  # started from its endpoint's snapshot image
        self.evicting = False  # a parked worker being stopped: its GPUs free up when it is gone
        self.gone = asyncio.Event()  # removed from the node

    @property
    def state(self) -> WorkerState:
        if self.stopping:
            return "stopping"
        if self.parked:
            return "parked"
        if not self.ready:
            return "starting"
        return "running" if self.jobs else "idle"

    def info(self) -> WorkerInfo:
        return WorkerInfo(worker_id=self.worker_id, endpoint_id=self.endpoint_id, state=self.state,
                          started_at_ms=self.started_at_ms, idle_since_ms=self.idle_since_ms,
                          jobs=sorted(self.jobs), gpu_uuids=list(self.gpu_uuids),
                          low_priority_jobs=sorted(self.low_priority_jobs & self.jobs),
                          launch_key=self.launch_key)


# Called after a worker's process ended, with why; releases the jobs it held.
ReleaseJobs = Callable[[Worker, str], Awaitable[None]]
# Also given every line a worker prints: (worker_id, endpoint_id, stream, line, job_id).
WorkerOutput = Callable[[str, str, str, str, "str | None"], None]


class Supervisor:
    def __init__(self, runtime: Runtime, settings: AgentSettings, clock: Clock,
                 on_change: Callable[[], None], gpu_names: Callable[[tuple[str, ...]], list[str] | None],
                 base_env: Mapping[str, str] | None = None, flash: FlashBoot | None = None) -> None:
        self.runtime = runtime
        self.flash = flash or FlashBoot(runtime, settings, 0, on_change)
        self.flash.evict = lambda worker, reason: self._evict(worker, reason)
        self.flash.workers = lambda: list(self.workers.values())
        self.settings = settings
        self.clock = clock
        self.on_change = on_change
        self.gpu_names = gpu_names
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.workers: dict[str, Worker] = {}
        self.base_url = ""  # set once the HTTP server is bound
        self.release_jobs: ReleaseJobs | None = None
        self.worker_output: WorkerOutput | None = None
        self.closing = False
        self._tasks: set[asyncio.Task] = set()

    # -- commands ---------------------------------------------------------------------------

    async def start_worker(self, cmd: StartWorker) -> CommandReply:
        known = self.workers.get(cmd.worker_id)
        if known is not None:  # idempotent by worker id; a parked worker is resumed
            if known.parked and not known.stopping:
                await self._unpark(known, cmd)
            return CommandReply(ok=True)
        if self.closing:
            return CommandReply(ok=False, error="node is draining")
        if cmd.park and (why_not := self.flash.why_no_prewarm(cmd.spec)) is not None:
            return CommandReply(ok=False, error=f"cannot pre-warm here: {why_not}")
        if cmd.gpu_uuids:
            names = self.gpu_names(tuple(cmd.gpu_uuids))
            if names is None:
                return CommandReply(ok=False, error=f"unknown GPU in {cmd.gpu_uuids}")
            wanted = set(cmd.gpu_uuids)
            holders = [w for w in self.workers.values() if wanted & set(w.gpu_uuids)]
            busy = sorted({u for w in holders if not (w.parked or w.evicting) for u in w.gpu_uuids} & wanted)
            if busy:
                return CommandReply(ok=False, error=f"GPU already assigned: {busy}")
            if holders:  # parked workers (or ones being evicted) hold them: evict, wait until gone
                for holder in holders:
                    self._evict(holder, f"its GPUs go to worker {cmd.worker_id}", kill=True, why="gpu")
                try:
                    await asyncio.wait_for(asyncio.gather(*(h.gone.wait() for h in holders)),
                                           self.settings.stop_grace_s + 2)
                except TimeoutError:
                    return CommandReply(ok=False, error="parked workers with these GPUs did not exit in time")
        worker = Worker(cmd, self.clock.now_ms())
        worker.parked = cmd.park  # a pre-warm: parked from the start, paused at its first poll
        self.workers[worker.worker_id] = worker
        try:
            await self._spawn(worker)
        except RuntimeFailure as exc:
            self.workers.pop(worker.worker_id, None)
            self.on_change()
            return CommandReply(ok=False, error=str(exc))
        return CommandReply(ok=True)

    async def stop_worker(self, cmd: StopWorker) -> CommandReply:
        worker = self.workers.get(cmd.worker_id)
        if worker is None:
            return CommandReply(ok=True)
        if worker.parked and not worker.stopping:
            if not cmd.park:
                self._evict(worker, cmd.reason or "evicted by command", why="command")
            return CommandReply(ok=True)
        if cmd.only_if_idle and worker.jobs:
            return CommandReply(ok=False, error="worker is busy")
        if cmd.park and not worker.stopping:
            why_not = await self.flash.park(worker)
            if why_not is None:
                return CommandReply(ok=True)
            log.info("not parking worker; stopping it", worker_id=worker.worker_id,
                     endpoint_id=worker.endpoint_id, why=why_not)
            if cmd.only_if_idle and worker.jobs:
                return CommandReply(ok=False, error="worker is busy")
        self._stop(worker, cmd.reason or "stopped by command", remove=True)
        return CommandReply(ok=True)

    async def _unpark(self, worker: Worker, cmd: StartWorker) -> None:
        changed = spec_digest(cmd.spec) != spec_digest(worker.spec)
        worker.spec = cmd.spec
        worker.launch_key = launch_key(cmd.spec)
        await self.flash.unpark(worker)
        if changed:  # the endpoint changed while it was parked: a fresh process of the new spec
            self.recycle(worker.worker_id, "its endpoint changed while it was parked")

    def _evict(self, worker: Worker, reason: str, *, kill: bool = False, why: str = "memory") -> None:
        """Stop a parked worker for good."""
        if worker.evicting:
            return
        worker.evicting = True
        if why != "memory":
            metrics.FLASH_EVICTIONS.labels(why=why).inc()
        log.info("evicting parked worker", worker_id=worker.worker_id, endpoint_id=worker.endpoint_id,
                 reason=reason)
        self._stop(worker, reason, remove=True, kill=kill)

    def recycle(self, worker_id: str, reason: str) -> None:
        """Replace the worker's process with a fresh one (same worker id)."""
        worker = self.workers.get(worker_id)
        if worker is not None and not worker.stopping:
            log.info("recycling worker", worker_id=worker_id, endpoint_id=worker.endpoint_id, reason=reason)
            self._stop(worker, reason, remove=False)

    async def stop_all(self) -> None:
        """Stop every worker (agent shutdown) and wait for them to exit."""
        self.closing = True
        for worker in list(self.workers.values()):
            self._stop(worker, "node agent stopping", remove=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.settings.stop_grace_s + 1)
        await self.flash.close()

    async def adopt(self, spec_of: Callable[[str], Awaitable[EndpointSpec | None]]) -> None:
        """Take over the workers an earlier agent on this node left running (containers outlive
        the agent); those of deleted endpoints are stopped. Before any command is taken."""
        found: list[Adopted] = await self.runtime.adopt(self.base_url, self._sink)
        for adopted in found:
            spec = await spec_of(adopted.endpoint_id)
            if spec is None:
                log.info("stopping a worker of a deleted endpoint", worker_id=adopted.worker_id,
                         endpoint_id=adopted.endpoint_id)
                self._spawn_task(adopted.handle.stop(self.settings.stop_grace_s))
                continue
            cmd = StartWorker(worker_id=adopted.worker_id, spec=spec, gpu_uuids=list(adopted.gpu_uuids))
            worker = Worker(cmd, self.clock.now_ms())
            worker.token = adopted.token
            worker.generation = 1
            worker.handle = adopted.handle
            self.workers[worker.worker_id] = worker
            self._spawn_task(self._watch(worker, worker.generation, adopted.handle))
        if found:
            self.on_change()

    # -- liveness ---------------------------------------------------------------------------

    def mark_ready(self, worker: Worker) -> None:
        if not worker.ready:
            worker.ready = True
            worker.ready_at_ms = self.clock.now_ms()
            startup_ms = worker.ready_at_ms - worker.started_at_ms
            log.info("worker ready", worker_id=worker.worker_id, endpoint_id=worker.endpoint_id,
                     startup_ms=startup_ms, from_snapshot=worker.from_snapshot or None)
            node_metrics.worker_ready(startup_ms, from_snapshot=worker.from_snapshot)
            self.on_change()
            self.flash.initialised(worker)
            if worker.parked:
                self._spawn_task(self._admit(worker))

    async def _admit(self, worker: Worker) -> None:
        why_not = await self.flash.admit_prewarmed(worker)
        if why_not is not None:
            log.info("pre-warmed worker does not fit the parking pool; stopping it",
                     worker_id=worker.worker_id, endpoint_id=worker.endpoint_id, why=why_not)
            self._evict(worker, why_not, why="prewarm")

    def pinged(self, worker: Worker, job_ids: frozenset[str], version: str | None, status: str | None,
               detail: str) -> None:
        worker.last_seen = time.monotonic()
        worker.pinged = True
        worker.ping_job_ids = job_ids
        worker.runpod_version = version
        if status == "unhealthy":
            self.recycle(worker.worker_id, f"unhealthy: {detail}")

    def tick(self, now: float) -> None:
        """Recycle workers whose pings stopped (only after they pinged once: model loading
        before `serverless.start()` may take long). A paused worker cannot ping: its clock
        restarts when it is resumed."""
        timeout_s = self.settings.worker_ping_timeout_s
        for worker in list(self.workers.values()):
            frozen = worker.paused or worker.freeze_lock.locked()
            if worker.pinged and not worker.stopping and not frozen and now - worker.last_seen > timeout_s:
                self.recycle(worker.worker_id, f"no ping for {timeout_s:g} s")

    def job_finished(self, worker: Worker) -> None:
        worker.jobs_done += 1
        worker.recycles_without_work = 0

    # -- processes --------------------------------------------------------------------------

    def _stop(self, worker: Worker, reason: str, *, remove: bool, kill: bool = False) -> None:
        worker.removing = worker.removing or remove
        if worker.stopping:
            return
        worker.stopping = True
        worker.stop_reason = reason
        worker.stop_event.set()
        for poll in list(worker.polls):
            poll.interrupt()
        self.on_change()
        handle = worker.handle
        if handle is not None:
            self._spawn_task(self._halt(worker, handle, kill))
        elif remove:
            self._forget(worker)

    async def _halt(self, worker: Worker, handle: RunningWorker, kill: bool) -> None:
        """Stop (or kill) a worker's process; a paused one is resumed first so that it can
        take the signal (a frozen process or container would not)."""
        if worker.paused or worker.freeze_lock.locked():
            await self.flash.wake(worker)
        if kill:
            handle.kill()
            await handle.wait()
        else:
            await handle.stop(self.settings.stop_grace_s)

    async def _spawn(self, worker: Worker) -> None:
        worker.generation += 1
        worker.token = secrets.token_urlsafe(24)
        worker.ready = False
        worker.stopping = False
        worker.stop_reason = ""
        worker.pinged = False
        worker.paused = False
        worker.stop_event = asyncio.Event()
        worker.started_at_ms = worker.idle_since_ms = self.clock.now_ms()
        worker.last_seen = time.monotonic()
        image = await self.flash.launch_image(worker)
        launch = Launch(
            worker_id=worker.worker_id, endpoint_id=worker.endpoint_id, argv=tuple(worker.spec.command),
            env=self.worker_env(worker), gpu_uuids=worker.gpu_uuids, image=image,
            labels={"runplane.worker_id": worker.worker_id, "runplane.endpoint_id": worker.endpoint_id},
        )
        handle = await self.runtime.start(launch, self._sink(worker.worker_id, worker.endpoint_id))
        wid, ep = worker.worker_id, worker.endpoint_id
        worker.handle = handle
        metrics.WORKER_STARTS.labels(endpoint=ep).inc()
        log.info("worker started", worker_id=wid, endpoint_id=ep, pid=handle.pid,
                 generation=worker.generation, image=image if worker.from_snapshot else None)
        self._spawn_task(self._watch(worker, worker.generation, handle))
        self.on_change()

    async def _watch(self, worker: Worker, generation: int, handle: RunningWorker) -> None:
        code = await handle.wait()
        if self.workers.get(worker.worker_id) is not worker or worker.generation != generation:
            return
        why = worker.stop_reason or "exited"
        detail = f" ({handle.exit_detail})" if handle.exit_detail else ""
        log.info("worker exited", worker_id=worker.worker_id, endpoint_id=worker.endpoint_id,
                 code=code, why=why, detail=handle.exit_detail or None)
        metrics.WORKER_EXITS.labels(endpoint=worker.endpoint_id,
                                    why="recycle" if worker.stopping and not worker.removing
                                    else "stop" if worker.stopping else "exit").inc()
        worker.handle = None
        if self.release_jobs is not None and worker.jobs:
            await self.release_jobs(worker, f"worker {why} (exit code {code}){detail}" if worker.stopping
                                    else f"worker exited with code {code}{detail}")
        if worker.stopping and not worker.removing and not self.closing:
            await self._restart(worker)
        else:
            self._forget(worker)

    async def _restart(self, worker: Worker) -> None:
        worker.recycles_without_work += 1
        delay_s = min(_MAX_RESTART_DELAY_S, 2.0 ** (worker.recycles_without_work - 2)) \
            if worker.recycles_without_work > 1 else 0.0
        worker.ready = False  # report "starting" while we wait
        worker.stopping = False
        self.on_change()
        if delay_s:
            await asyncio.sleep(delay_s)
        if self.closing or self.workers.get(worker.worker_id) is not worker or worker.removing:
            self._forget(worker)
            return
        try:
            await self._spawn(worker)
        except RuntimeFailure as exc:
            log.warning("worker restart failed", worker_id=worker.worker_id, error=str(exc))
            self._forget(worker)

    def _forget(self, worker: Worker) -> None:
        worker.gone.set()
        if self.workers.get(worker.worker_id) is worker:
            del self.workers[worker.worker_id]
            self.on_change()

    def _sink(self, worker_id: str, endpoint_id: str) -> OutputSink:
        return _output_sink(worker_id, endpoint_id, self.worker_output)

    def _spawn_task(self, coro: Awaitable) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- environment ------------------------------------------------------------------------

    def worker_env(self, worker: Worker) -> dict[str, str]:
        """The agent's environment without RP_* settings, the endpoint's env, then the RunPod
        worker variables (which win)."""
        env = {k: v for k, v in self.base_env.items() if not k.startswith("RP_")}
        env.update({k: v for k, v in worker.spec.env.items() if not k.startswith("RP_NATS_")})
        env.setdefault("PYTHONUNBUFFERED", "1")
        names = self.gpu_names(worker.gpu_uuids) or []
        query = urlencode({"gpu": ",".join(names) if names else "cpu"})
        base = f"{self.base_url}/v2/{worker.endpoint_id}"
        env.update({
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?{query}",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?{query}",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?{query}",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?{query}",
            "RUNPOD_AI_API_KEY": worker.token,
            "RUNPOD_POD_ID": worker.worker_id,
            "RUNPOD_ENDPOINT_ID": worker.endpoint_id,
            "RUNPOD_PING_INTERVAL": str(self.settings.worker_ping_interval_ms),
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_POD_HOSTNAME": f"{worker.worker_id}-{self.settings.node_id}",
            "RUNPOD_GPU_COUNT": str(len(worker.gpu_uuids)),
            "CUDA_VISIBLE_DEVICES": ",".join(worker.gpu_uuids),
        })
        return env


def _output_sink(worker_id: str, endpoint_id: str, tee: WorkerOutput | None = None) -> OutputSink:
    """Worker output into the agent's log. The RunPod SDK prints JSON lines
    (`{"requestId", "message", "level"}`) once RUNPOD_ENDPOINT_ID is set: keep their fields."""
    worker_log = log.bind(worker_id=worker_id, endpoint_id=endpoint_id)

    def output(stream: str, line: str) -> None:
        if line.startswith("{") and line.endswith("}"):
            try:
                fields = json.loads(line)
            except ValueError:
                fields = None
            if isinstance(fields, dict) and "message" in fields:
                level = str(fields.get("level", "INFO")).upper()
                emit = worker_log.error if level == "ERROR" else worker_log.warning \
                    if level.startswith("WARN") else worker_log.debug if level == "DEBUG" else worker_log.info
                emit(str(fields["message"]), stream=stream, job_id=fields.get("requestId"))
                if tee is not None:
                    tee(worker_id, endpoint_id, stream, str(fields["message"]), fields.get("requestId"))
                return
        worker_log.info(line, stream=stream)
        if tee is not None:
            tee(worker_id, endpoint_id, stream, line, None)

    return output
