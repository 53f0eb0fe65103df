"""The autoscaler's control loop: sample → decide → publish, every interval, never dying."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import structlog
from prometheus_client import Counter, Gauge, Histogram

from runplane_autoscaler.policy import ScaleState, decide, state_of
from runplane_autoscaler.prewarm import ProfileConfig
from runplane_autoscaler.settings import AutoscalerSettings
from runplane_autoscaler.signals import sample
from runplane_bus import Bus
from runplane_bus.leases import LeaseKeeper
from runplane_bus.mirror import Mirror
from runplane_proto import subjects
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.gpus import fleet_capacity
from runplane_proto.nodes import NodeStatus
from runplane_proto.scaling import PlacementStatus, ScaleTarget
from runplane_service.control import every
from runplane_service.clock import Clock

T = TypeVar("T")
log = structlog.get_logger("runplane.autoscaler")

TICKS = Counter("rp_autoscaler_ticks_total", "Control loop iterations")
ERRORS = Counter("rp_autoscaler_errors_total", "Failed loop steps (the loop continues)", ["step"])
TICK_SECONDS = Histogram("rp_autoscaler_tick_seconds", "Time one loop iteration took",
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
WRITES = Counter("rp_autoscaler_target_writes_total", "Scale targets written to KV")
DESIRED = Gauge("rp_autoscaler_desired_workers", "Desired workers per endpoint", ["endpoint"])
# Job counts are of normal jobs; low-priority ones (which never scale up) have their own.
QUEUED = Gauge("rp_autoscaler_queued_jobs", "Jobs waiting in the endpoint's queue", ["endpoint"])
IN_PROGRESS = Gauge("rp_autoscaler_in_progress_jobs", "Jobs delivered and not yet acked", ["endpoint"])
OLDEST_AGE = Gauge("rp_autoscaler_oldest_queued_age_seconds", "Age of the oldest queued job", ["endpoint"])
LOW_QUEUED = Gauge("rp_autoscaler_low_priority_queued_jobs", "Low-priority jobs waiting", ["endpoint"])
LOW_IN_PROGRESS = Gauge("rp_autoscaler_low_priority_in_progress_jobs",
                        "Low-priority jobs delivered and not yet acked", ["endpoint"])
PER_ENDPOINT = (DESIRED, QUEUED, IN_PROGRESS, OLDEST_AGE, LOW_QUEUED, LOW_IN_PROGRESS)


class Autoscaler:
    """Holds the policy state per endpoint; `tick()` runs one sample → decide → publish round."""

    def __init__(self, bus: Bus, settings: AutoscalerSettings, clock: Clock | None = None,
                 lease: LeaseKeeper | None = None) -> None:
        self.bus = bus
        # With a lease, only the process holding it acts; the others stand by.
        self.lease = lease
        self.settings = settings
        self.clock = clock or Clock()
        self.states: dict[str, ScaleState] = {}
        self.profile_config = ProfileConfig(
            period_s=settings.profile_period_s, slot_s=settings.profile_slot_s,
            lead_s=settings.profile_lead_s)
        # The target last written per endpoint and when (ms), to write only on change.
        self.written: dict[str, tuple[ScaleTarget, int]] = {}
        self._restored = False
        self._leading = False  # as this loop last saw it (the lease is renewed between rounds too)
        self.ticks = 0  # rounds started (tests wait on it)
        self._mirrors: tuple[Mirror[NodeStatus], Mirror[EndpointSpec], Mirror[PlacementStatus]] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        log.info("autoscaler running", interval_s=self.settings.interval_s)
        # Live copies of node status and endpoint specs instead of reading them every round.
        self._mirrors = (Mirror(self.bus.nodes), Mirror(self.bus.endpoints), Mirror(self.bus.placement))
        keeper: asyncio.Task[None] | None = None
        try:
            for mirror in self._mirrors:
                await mirror.start()
            # The lease is renewed beside the loop too: a round held up by a slow request (the
            # sample's JetStream requests wait 5 s while a stream elects a leader) must not cost it.
            if self.lease is not None:
                keeper = asyncio.create_task(self.lease.keep(stop))
            await every(self.settings.interval_s, stop, self.tick, on_error=_tick_failed,
                        observe_s=TICK_SECONDS.observe)
        finally:
            if keeper is not None:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
            for mirror in self._mirrors:
                await mirror.stop()
            self._mirrors = None

    async def tick(self) -> None:
        TICKS.inc()
        self.ticks += 1
        if self.lease is not None:
            if not await self.lease.hold():
                self._leading = False
                return
            if not self._leading:  # taking over: continue from the state the last leader persisted
                self._leading = True
                self._restored = False
                self.written.clear()
        now_ms = self.clock.now_ms()
        ok, specs = await self._step("read endpoints", self._read_endpoints)
        if not ok:
            return
        if not self._restored:
            self._restored, _ = await self._step("restore state", self._restore)
        nodes = self._mirrors[0].values() if self._mirrors else None
        ok, sampled = await self._step("sample", lambda: sample(
            self.bus, specs.keys(), now_ms, ack_wait_s=self.settings.ack_wait_s,
            node_loss_timeout_ms=int(self.settings.node_loss_timeout_s * 1000), nodes=nodes))
        if not ok:
            return
        signals, errors = sampled
        for endpoint_id, exc in errors.items():
            ERRORS.labels(step="sample").inc()
            log.warning("could not sample endpoint", endpoint_id=endpoint_id, error=repr(exc))
        shapes: dict[tuple[int, tuple[str, ...]], int] = {}
        loss_ms = int(self.settings.node_loss_timeout_s * 1000)

        def alive_nodes() -> list[NodeStatus]:
            return [n for n in (nodes or ()) if now_ms - n.heartbeat_at_ms <= loss_ms]

        def capacity(spec: EndpointSpec, alive: Callable[[], list[NodeStatus]]) -> int:
            """Per shape, once a round, only for endpoints that wait for capacity."""
            if spec.gpu_count <= 0 or nodes is None:
                return -1
            key = (spec.gpu_count, tuple(spec.gpu_type_ids))
            if key not in shapes:
                shapes[key] = fleet_capacity(alive(), spec.gpu_count, spec.gpu_type_ids)
            return shapes[key]

        for endpoint_id, spec in specs.items():
            if endpoint_id not in signals:
                continue
            s = signals[endpoint_id]
            pending = self._mirrors[2].get(subjects.placement_key(endpoint_id)) if self._mirrors else None
            if pending is not None and pending.endpoint_id == endpoint_id and pending.pending_workers > 0:
                s = msgspec.structs.replace(s, pending_workers=pending.pending_workers,
                                            pending_reason=pending.reason,
                                            capacity_workers=capacity(spec, alive_nodes))
            QUEUED.labels(endpoint=endpoint_id).set(s.in_queue)
            IN_PROGRESS.labels(endpoint=endpoint_id).set(s.in_progress)
            OLDEST_AGE.labels(endpoint=endpoint_id).set(s.oldest_queued_age_ms / 1000)
            LOW_QUEUED.labels(endpoint=endpoint_id).set(s.low_in_queue)
            LOW_IN_PROGRESS.labels(endpoint=endpoint_id).set(s.low_in_progress)
            try:
                target, state = decide(spec, s, self.states.get(endpoint_id), now_ms, self.profile_config)
            except Exception:
                ERRORS.labels(step="decide").inc()
                log.exception("decide failed", endpoint_id=endpoint_id)
                continue
            self.states[endpoint_id] = state
            DESIRED.labels(endpoint=endpoint_id).set(target.desired_workers)
            if self._should_write(target, now_ms):
                await self._step("publish", lambda t=target: self._publish(t, now_ms))
        await self._step("forget endpoints", lambda: self._forget(set(specs)))

    async def _step(self, name: str, action: Callable[[], Awaitable[T]]) -> tuple[bool, Any]:
        """Run one step: (True, its result), or on failure log, count and (False, None)."""
        try:
            return True, await action()
        except Exception as exc:
            ERRORS.labels(step=name).inc()
            log.warning("autoscaler step failed", step=name, error=repr(exc))
            return False, None

    async def _read_endpoints(self) -> dict[str, EndpointSpec]:
        if self._mirrors:
            # An entry under another endpoint's key (garbled or forged) must not stand for that one.
            return {key: spec for key, spec in self._mirrors[1].items() if spec.id == key}
        return {spec.id: spec async for _, spec in self.bus.endpoints.items()}

    async def _restore(self) -> None:
        """Continue from the targets a previous autoscaler wrote."""
        async for _key, target in self.bus.scale.items():
            self.states.setdefault(target.endpoint_id, state_of(target))
            self.written.setdefault(target.endpoint_id, (target, target.decided_at_ms))

    def _should_write(self, target: ScaleTarget, now_ms: int) -> bool:
        previous = self.written.get(target.endpoint_id)
        if previous is None:
            return True
        last, written_at_ms = previous
        if (last.desired_workers, last.prewarm_workers) != (target.desired_workers, target.prewarm_workers):
            return True
        # Same counts: only refresh the persisted state (and reason) now and then.
        same = (last.reason, last.last_active_at_ms, last.last_needed_at_ms, last.last_scale_up_at_ms,
                last.profile_slot, last.slot_peak, last.load_profile) == (
            target.reason, target.last_active_at_ms, target.last_needed_at_ms, target.last_scale_up_at_ms,
            target.profile_slot, target.slot_peak, target.load_profile)
        return not same and now_ms - written_at_ms >= self.settings.persist_state_s * 1000

    async def _publish(self, target: ScaleTarget, now_ms: int) -> None:
        previous = self.written.get(target.endpoint_id)
        await self.bus.scale.put(subjects.scale_key(target.endpoint_id), target)
        WRITES.inc()
        self.written[target.endpoint_id] = (target, now_ms)
        if previous is None or previous[0].desired_workers != target.desired_workers:
            log.info("scale target", endpoint_id=target.endpoint_id, desired_workers=target.desired_workers,
                     previous=None if previous is None else previous[0].desired_workers, reason=target.reason)

    async def _forget(self, live: set[str]) -> None:
        """Drop the state and the target of endpoints that were deleted."""
        for endpoint_id in (set(self.states) | set(self.written)) - live:
            await self.bus.scale.delete(subjects.scale_key(endpoint_id))
            self.states.pop(endpoint_id, None)
            self.written.pop(endpoint_id, None)
            for gauge in PER_ENDPOINT:
                with contextlib.suppress(KeyError):
                    gauge.remove(endpoint_id)
            log.info("endpoint gone: scale target deleted", endpoint_id=endpoint_id)



def _tick_failed(_: Exception) -> None:
    ERRORS.labels(step="tick").inc()
    log.exception("autoscaler tick failed")
