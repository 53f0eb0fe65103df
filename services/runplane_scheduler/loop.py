"""The scheduler's placement loop: read the cluster → `place()` → send the commands.

Thin and never dying: each step catches, logs, counts and the loop goes on. Commands
are sent in the background and remembered as pending until a node's status shows
their effect, so a slow node never holds up the others and nothing is sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog

from runplane_bus import Bus
from runplane_bus.leases import LeaseKeeper
from runplane_bus.mirror import Mirror
from runplane_proto import subjects
from runplane_proto.codec import Codec
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.ids import new_worker_id
from runplane_proto.nodes import CommandReply, NodeStatus, StartWorker
from runplane_proto.scaling import PlacementStatus, ScaleTarget
from runplane_scheduler.cluster import Pending, PendingStart, PendingStop, heartbeat, split_nodes
from runplane_scheduler.janitor import delete_at_revision
from runplane_scheduler.metrics import (COMMANDS, ERRORS, NODES_ALIVE, NODES_LOST, PENDING_STARTS,
                                        START_TIMEOUTS, TICK_SECONDS, TICKS, UNPLACED)
from runplane_scheduler.placement import Command, NodeViews, Plan, Unplaced, place
from runplane_scheduler.settings import SchedulerSettings
from runplane_service.clock import Clock
from runplane_service.control import every

T = TypeVar("T")
log = structlog.get_logger("runplane.scheduler")
REPLY = Codec(CommandReply)
# Stands for a key an earlier leader wrote, until this one decides about it.
_STALE = Unplaced(endpoint_id="", missing=-1, reason="")
_NODE_WAKE_GAP_S = 0.1


class _Throttle:
    """Sets `event` at once, or, within `gap_s` of the last time, when the gap has passed."""

    def __init__(self, event: asyncio.Event, gap_s: float) -> None:
        self.event = event
        self.gap_s = gap_s
        self._last = -gap_s
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self) -> None:
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        wait_s = self._last + self.gap_s - loop.time()
        if wait_s <= 0:
            self._fire()
        else:
            self._timer = loop.call_later(wait_s, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._last = asyncio.get_running_loop().time()
        self.event.set()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Scheduler:
    def __init__(self, bus: Bus, settings: SchedulerSettings, clock: Clock | None = None,
                 new_id: Callable[[], str] = new_worker_id, lease: LeaseKeeper | None = None) -> None:
        self.bus = bus
        # With a lease, only the process holding it acts; the others stand by.
        self.lease = lease
        self.settings = settings
        self.clock = clock or Clock()
        self.new_id = new_id
        self.pending = Pending(timeout_ms=int(settings.start_timeout_s * 1000),
                               backoff_ms=int(settings.node_backoff_s * 1000))
        self._loss_ms = int(settings.node_loss_timeout_s * 1000)
        self._sending: set[asyncio.Task[None]] = set()
        # Per endpoint, what KV `rp-placement` says now (written on change), and since when.
        self._unplaced: dict[str, Unplaced] = {}
        self._pending_since: dict[str, int] = {}
        self._placement_synced = False
        self.ticks = 0  # rounds started (tests wait on it)
        self._views = NodeViews()
        self._leading = False  # as of the last round
        self._lease_lock = asyncio.Lock()
        self._mirrors: tuple[Mirror[NodeStatus], Mirror[EndpointSpec], Mirror[ScaleTarget]] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        log.info("scheduler running", interval_s=self.settings.schedule_interval_s)
        wake = asyncio.Event()
        # Live copies of the buckets each round looks at. A changed endpoint or a new worker
        # count wakes the loop at once; heartbeats and the autoscaler's state refreshes do
        # not (the interval covers them).

        def count_changed(_: str, old: ScaleTarget | None, new: ScaleTarget | None) -> None:
            if (old and (old.desired_workers, old.prewarm_workers)) != (
                    new and (new.desired_workers, new.prewarm_workers)):
                wake.set()

        # On a large fleet some node changes its workers all the time: at most one round
        # more per _NODE_WAKE_GAP_S for them.
        node_wake = _Throttle(wake, _NODE_WAKE_GAP_S)

        def node_changed(_: str, old: NodeStatus | None, new: NodeStatus | None) -> None:
            # Workers wait for capacity: a node that joins, leaves or changes its workers
            # (not a mere heartbeat) may have freed some; decide soon.
            if self._unplaced and (old is None or new is None or not new.layout_version
                                   or old.layout_version != new.layout_version):
                node_wake()

        self._mirrors = (
            # A mere heartbeat only moves the held status's heartbeat time (no full decode).
            Mirror(self.bus.nodes, on_change=node_changed, refresh=heartbeat),
            Mirror(self.bus.endpoints, on_change=lambda *_: wake.set()),
            Mirror(self.bus.scale, on_change=count_changed),
        )
        keeper = asyncio.create_task(self._keep_lease(stop)) if self.lease is not None else None
        try:
            for mirror in self._mirrors:
                await mirror.start()
            await every(self.settings.schedule_interval_s, stop, self.tick, on_error=_tick_failed,
                        observe_s=TICK_SECONDS.observe, wake=wake)
        finally:
            node_wake.cancel()
            if keeper is not None:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
            for task in list(self._sending):
                task.cancel()
            for mirror in self._mirrors or ():
                await mirror.stop()
            self._mirrors = None

    async def tick(self) -> Plan | None:
        """One round; returns the plan it acted on (None when the cluster could not be read)."""
        TICKS.inc()
        self.ticks += 1
        if self.lease is not None:
            if not await self._hold_lease():
                self._leading = False
                return None
            if not self._leading:
                self._leading = True
                self._placement_synced = False
        now_ms = self.clock.now_ms()
        ok, world = await self._step("read", self._read)
        if not ok:
            return None
        nodes, endpoints, targets = world
        alive, lost = split_nodes(nodes, now_ms, self._loss_ms)
        NODES_ALIVE.set(len(alive))
        for node in lost:
            await self._step("forget lost node", lambda n=node.node_id: self._forget_node(n))
        for start in self.pending.reconcile(alive, now_ms):
            START_TIMEOUTS.inc()
            log.warning("node never reported a started worker; replacing it", worker_id=start.worker_id,
                        endpoint_id=start.endpoint_id, node_id=start.node_id)
        snapshot = self.pending.snapshot(now_ms, nodes=alive, endpoints=endpoints, targets=targets)
        try:
            plan = place(snapshot, now_ms, self.new_id, workers_per_cpu=self.settings.workers_per_cpu,
                         views=self._views)
        except Exception:
            ERRORS.labels(step="place").inc()
            log.exception("placement failed")
            return None
        await self._report(plan.unplaced, now_ms)
        for command in plan.commands:
            self._send(command, now_ms)
        PENDING_STARTS.set(len(self.pending.starts))
        return plan

    async def _hold_lease(self) -> bool:
        assert self.lease is not None
        async with self._lease_lock:  # one compare-and-set at a time, or we race ourselves
            return await self.lease.hold()

    async def _keep_lease(self, stop: asyncio.Event) -> None:
        """Renew the lease between rounds as well, well before a round would have to (a third
        of the TTL), so that a round placing workers seldom waits for the round trips."""
        assert self.lease is not None
        while not stop.is_set():
            await self._hold_lease()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.lease.ttl_ms / 6000)

    async def _step(self, name: str, action: Callable[[], Awaitable[T]]) -> tuple[bool, Any]:
        """Run one step: (True, its result), or on failure log, count and (False, None)."""
        try:
            return True, await action()
        except Exception as exc:
            ERRORS.labels(step=name).inc()
            log.warning("scheduler step failed", step=name, error=repr(exc))
            return False, None

    async def _read(self) -> tuple[list[NodeStatus], dict[str, EndpointSpec], dict[str, ScaleTarget]]:
        if self._mirrors is not None:
            nodes, endpoints, targets = self._mirrors
            # An entry under another endpoint's key (garbled or forged) must not stand for that one.
            return ([n for key, n in nodes.items() if n.node_id == key],
                    {key: spec for key, spec in endpoints.items() if spec.id == key},
                    {key: t for key, t in targets.items() if t.endpoint_id == key})
        async def nodes() -> list[NodeStatus]:
            return [status async for _, status in self.bus.nodes.items()]

        async def endpoints() -> dict[str, EndpointSpec]:
            return {spec.id: spec async for _, spec in self.bus.endpoints.items()}

        async def targets() -> dict[str, ScaleTarget]:
            return {t.endpoint_id: t async for _, t in self.bus.scale.items()}

        return await asyncio.gather(nodes(), endpoints(), targets())

    async def _forget_node(self, node_id: str) -> None:
        """Delete a lost node's status (unless it heartbeated meanwhile) so nobody counts its workers."""
        key = subjects.node_key(node_id)
        current = await self.bus.nodes.get(key)
        if current is None or self.clock.now_ms() - current.value.heartbeat_at_ms <= self._loss_ms:
            return
        if await delete_at_revision(self.bus.nodes.kv, key, current.revision):
            NODES_LOST.inc()
            log.warning("node lost: no heartbeat; its workers will be replaced", node_id=node_id,
                        last_heartbeat_ms_ago=self.clock.now_ms() - current.value.heartbeat_at_ms,
                        workers=[w.worker_id for w in current.value.workers])

    async def _report(self, unplaced: list[Unplaced], now_ms: int) -> None:
        """Say (once per change) why an endpoint's workers stay pending: in the log, the
        metrics and KV `rp-placement` (what /health shows); delete the key once placed."""
        now_unplaced = {u.endpoint_id: u for u in unplaced}
        if not self._placement_synced:
            # Taking over: drop what an earlier leader wrote for endpoints that are placed now.
            ok, keys = await self._step("read placement", self._placement_keys)
            if ok:
                self._unplaced = {k: _STALE for k in keys}
                self._placement_synced = True
        for endpoint_id, u in now_unplaced.items():
            UNPLACED.labels(endpoint=endpoint_id).set(u.missing)
            previous = self._unplaced.get(endpoint_id)
            if previous is not None and (previous.reason, previous.missing) == (u.reason, u.missing):
                continue
            if previous is None or previous.reason != u.reason:
                log.warning("workers stay pending: no node fits", endpoint_id=endpoint_id, missing=u.missing,
                            reason=u.reason)
            since = self._pending_since.setdefault(endpoint_id, now_ms)
            ok, _ = await self._step("write placement", lambda u=u, since=since: self.bus.placement.put(
                subjects.placement_key(u.endpoint_id), PlacementStatus(
                    endpoint_id=u.endpoint_id, pending_workers=u.missing, reason=u.reason,
                    since_ms=since, updated_at_ms=now_ms)))
            if ok:
                self._unplaced[endpoint_id] = u
        for endpoint_id in set(self._unplaced) - set(now_unplaced):
            ok, _ = await self._step("delete placement", lambda ep=endpoint_id: self.bus.placement.delete(
                subjects.placement_key(ep)))
            if not ok:
                continue
            with contextlib.suppress(KeyError):
                UNPLACED.remove(endpoint_id)
            if self._unplaced.pop(endpoint_id) is not _STALE:
                log.info("pending workers placed", endpoint_id=endpoint_id)
            self._pending_since.pop(endpoint_id, None)

    async def _placement_keys(self) -> list[str]:
        return await self.bus.placement.keys()

    def _send(self, command: Command, now_ms: int) -> None:
        message = command.message
        if isinstance(message, StartWorker):
            self.pending.start_sent(PendingStart(
                worker_id=message.worker_id, endpoint_id=message.spec.id, node_id=command.node_id,
                gpu_uuids=message.gpu_uuids, sent_at_ms=now_ms, park=message.park))
        else:
            self.pending.stop_sent(PendingStop(worker_id=message.worker_id, endpoint_id=command.endpoint_id,
                                               node_id=command.node_id, sent_at_ms=now_ms, park=message.park))
        task = asyncio.ensure_future(self._deliver(command))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _deliver(self, command: Command) -> None:
        message = command.message
        starting = isinstance(message, StartWorker)
        kind = "start" if starting else "stop"
        fields: dict[str, Any] = {"worker_id": message.worker_id, "node_id": command.node_id,
                                  "endpoint_id": command.endpoint_id}
        if isinstance(message, StartWorker):
            fields.update(gpu_uuids=message.gpu_uuids, prewarm=message.park or None)
        else:
            fields.update(reason=message.reason)
        try:
            reply = await self.bus.request(subjects.node_cmd(command.node_id), message, REPLY,
                                           timeout_s=self.settings.command_timeout_s)
        except Exception as exc:  # no responders, timeout, undecodable reply
            self.pending.failed(message.worker_id, command.node_id, f"{kind} failed: {exc!r}",
                                self.clock.now_ms(), node_fault=True)
            COMMANDS.labels(command=kind, result="error").inc()
            log.warning("node did not answer a command", command=kind, error=repr(exc), **fields)
            return
        if reply.ok:
            COMMANDS.labels(command=kind, result="ok").inc()
            log.info("worker starting" if starting else "worker stopping", **fields)
        elif isinstance(message, StartWorker) and message.park:
            # A refused pre-warm: the node has no room in its pool. Not the node's fault (other
            # workers still go there), but the endpoint's pre-warming waits a while.
            self.pending.failed(message.worker_id, command.node_id, f"pre-warm refused: {reply.error}",
                                self.clock.now_ms(), node_fault=False)
            self.pending.hold_prewarm(command.endpoint_id, f"{command.node_id}: {reply.error}",
                                      self.clock.now_ms())
            COMMANDS.labels(command="prewarm", result="refused").inc()
            log.info("node refused a pre-warm", error=reply.error, **fields)
        else:
            # A refused start is the node's problem (back off); a refused stop means the worker got busy.
            self.pending.failed(message.worker_id, command.node_id, f"{kind} refused: {reply.error}",
                                self.clock.now_ms(), node_fault=starting)
            COMMANDS.labels(command=kind, result="refused").inc()
            log.warning("node refused a command", command=kind, error=reply.error, **fields)


def _tick_failed(_: Exception) -> None:
    ERRORS.labels(step="tick").inc()
    log.exception("scheduler tick failed")
