"""Placement: which node runs which worker, as a pure function of a cluster snapshot.

`place(snapshot, now_ms, new_worker_id)` compares each endpoint's desired worker count
with the workers the alive nodes report (plus starts in flight) and returns commands:
`StartWorker` for missing workers, `StopWorker` for surplus idle ones. Each missing
worker goes through named stages:

* **feasible**: nodes that can take it: not draining, not in back-off; a CPU endpoint
  needs a free worker slot (`cpu_count × workers_per_cpu` per node, every worker on the
  node takes one); a GPU endpoint (`gpu_count > 0`) needs that many free GPUs of one
  type from `gpu_type_ids` (ordered preference; empty = any type), GPUs held by any
  worker or start in flight are never handed out twice;
* **score**: preferred GPU type first, then bin-packing: partly used nodes before empty
  ones, the tightest fit first (CPU workers also keep off GPU nodes when they can);
* **select**: the best score, ties broken by node id, so the same snapshot and the same
  ids always give the same plan.

Endpoints take turns, so one endpoint cannot starve the others of the last free GPU:
first every endpoint that holds nothing gets a worker, then the next worker goes to the
endpoint whose weighted share (GPUs held, or workers for CPU endpoints, over `weight`)
would be the smallest, so contended capacity is divided by weight. `gpuQuota` caps the
GPUs an endpoint's workers hold. When nothing fits, the plan says why (`Plan.unplaced`).

Flash boot: surplus workers of a flash endpoint are stopped with `park` (the node may keep
them paused in its pool). A *parked* worker is not one of its endpoint's workers and takes
no worker slot, but holds its GPUs. To add a worker to an endpoint with parked workers, the
plan first resumes one (a StartWorker naming it, with its GPUs; the most recently used, on
a node that can take it) before any cold start. When no free GPU fits anywhere, a GPU held
only by a parked worker of another endpoint may be given to a new worker (the node evicts
the parked worker first), fewest evictions first. An endpoint's parked workers are evicted
(a stop without `park`), least recently used first, beyond `workersMax` live and parked
together (a parked worker wakes by itself for a job), when the endpoint's image, command,
env or GPUs changed after they started (`launch_key`), or when it is deleted.

Pre-warm: a flash endpoint whose scale target asks for `prewarm_workers` keeps that many
live and parked together, whatever its worker count (zero included): the missing ones are
started parked (`StartWorker(park=True)`) on free capacity of nodes whose pool has room
(`can_park`), never evicting anything; a node refusing one holds the endpoint's pre-warming
back for a while (`Snapshot.prewarm_hold`), so a full pool never causes a start/stop loop.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from runplane_proto.endpoints import EndpointSpec, launch_key
from runplane_proto.gpus import gpu_matches, normalised as _norm
from runplane_proto.ids import new_worker_id
from runplane_proto.nodes import GpuInfo, NodeStatus, StartWorker, StopWorker, WorkerInfo
from runplane_proto.scaling import ScaleTarget
from runplane_scheduler.cluster import Snapshot

DEFAULT_WORKERS_PER_CPU = 4.0


class Command(msgspec.Struct, frozen=True, kw_only=True):
    """A command for one node."""

    node_id: str
    endpoint_id: str
    message: StartWorker | StopWorker


class Unplaced(msgspec.Struct, frozen=True, kw_only=True):
    """Workers an endpoint wants that no node can take now, and why."""

    endpoint_id: str
    missing: int
    reason: str


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    commands: list[Command] = []
    unplaced: list[Unplaced] = []


def desired_workers(spec: EndpointSpec, target: ScaleTarget | None) -> int:
    """The autoscaler's target if there is one, else workersMin, within [workersMin, workersMax]."""
    low = max(0, spec.workers_min)
    high = max(low, spec.workers_max)
    want = low if target is None else target.desired_workers
    return min(high, max(low, want))


# -- the ledger: what each alive node holds, updated as the plan assigns workers ------------------


@dataclass
class NodeUse:
    node: NodeStatus
    # Held by any worker (a stopping or parked one too), a start in flight or a start planned.
    used_gpus: set[str] | frozenset[str] = field(default_factory=set)
    # Workers in any state but parked, starts in flight and starts planned: each takes a worker slot.
    workers: int = 0
    # Bumped by every assignment, so cached options for this node can be told apart.
    version: int = 0
    _free: dict[str, list[GpuInfo]] | None = None
    # GPUs of parked workers that may be evicted for another endpoint: uuid -> the worker.
    parked_gpus: dict[str, WorkerInfo] = field(default_factory=dict)

    def slots(self, workers_per_cpu: float) -> int:
        return max(1, math.floor(self.node.cpu_count * workers_per_cpu))

    def free_groups(self) -> dict[str, list[GpuInfo]]:
        """Free GPUs grouped by normalised name, each group in (index, uuid) order."""
        if self._free is None:
            groups: dict[str, list[GpuInfo]] = {}
            for g in sorted(self.node.gpus, key=lambda g: (g.index, g.uuid)):
                if g.uuid not in self.used_gpus:
                    groups.setdefault(_norm(g.name), []).append(g)
            self._free = groups
        return self._free

    def assign(self, gpu_uuids: tuple[str, ...] | list[str]) -> None:
        self.workers += 1
        self.used_gpus = self.used_gpus | set(gpu_uuids)  # may be shared with a NodeView: no update()
        if self.parked_gpus:
            # A parked worker holding any of them is evicted by the node: none of its GPUs is
            # handed out again before the node reports it gone.
            evicted = {self.parked_gpus[u].worker_id for u in gpu_uuids if u in self.parked_gpus}
            self.parked_gpus = {u: w for u, w in self.parked_gpus.items() if w.worker_id not in evicted}
        self.version += 1
        self._free = None

    def evictable_groups(self, endpoint_id: str) -> dict[str, list[GpuInfo]]:
        """Free GPUs and those held only by parked workers of other endpoints, grouped by
        normalised name, the free ones first in each group."""
        groups: dict[str, list[GpuInfo]] = {}
        for g in sorted(self.node.gpus, key=lambda g: (g.uuid in self.used_gpus, g.index, g.uuid)):
            holder = self.parked_gpus.get(g.uuid)
            if g.uuid not in self.used_gpus or (holder is not None and holder.endpoint_id != endpoint_id):
                groups.setdefault(_norm(g.name), []).append(g)
        return groups


@dataclass(frozen=True)
class Live:
    """A worker that counts towards its endpoint: reported (and not stopping) or starting."""

    worker_id: str
    node_id: str
    info: WorkerInfo | None  # None for a start in flight


class NodeView:
    """What placement derives from one node's worker list, kept while the list is unchanged
    (a heartbeat rewrites a node's status every second; its workers rarely change)."""

    __slots__ = ("by_endpoint", "gpus", "ids", "layout", "parked", "shape", "used_gpus", "workers", "_free")

    def __init__(self, node: NodeStatus) -> None:
        self.workers = node.workers
        self.gpus = node.gpus
        self.shape = (node.draining, node.cpu_count)
        # The agent's word that workers and GPU identities are unchanged (None: not reported).
        self.layout = (node.started_at_ms, node.layout_version) if node.layout_version else None
        self._free: dict[str, list[GpuInfo]] | None = None
        self.ids = frozenset(w.worker_id for w in node.workers)
        self.used_gpus = frozenset(u for w in node.workers for u in w.gpu_uuids)
        self.by_endpoint: dict[str, list[Live]] = {}
        # Parked workers: in the node's pool, not one of their endpoint's workers.
        self.parked: list[Live] = []
        for w in node.workers:
            if w.state == "parked":
                self.parked.append(Live(w.worker_id, node.node_id, w))
            elif w.state != "stopping":
                self.by_endpoint.setdefault(w.endpoint_id, []).append(Live(w.worker_id, node.node_id, w))


    def free_groups(self) -> dict[str, list[GpuInfo]]:
        if self._free is None:
            self._free = NodeUse(NodeStatus(node_id="", hostname="", runtime="", gpus=self.gpus),
                                 used_gpus=self.used_gpus).free_groups()
        return self._free


class NodeViews:
    """A memo of `NodeView`s by node id. Only speeds things up: the views are recomputed
    whenever a node's worker list differs, so results do not depend on it."""

    def __init__(self) -> None:
        self._views: dict[str, NodeView] = {}
        # Bumped whenever a view is made or dropped; with the same nodes and no new view, the
        # reported workers per endpoint are those of the previous round.
        self.generation = 0
        self._reported: tuple[Any, dict[str, list[Live]], frozenset[str]] | None = None
        # Chooser heaps as first built, by shape, valid while `heaps_key` is the round's key.
        self.heaps_key: Any = None
        self.heaps: dict[tuple[int, tuple[str, ...]], list[tuple[Any, ...]]] = {}

    def of(self, node: NodeStatus) -> NodeView:
        view = self._views.get(node.node_id)
        if view is not None and view.workers is node.workers and view.gpus is node.gpus and (
                view.shape == (node.draining, node.cpu_count)):
            return view
        if view is not None and view.layout is not None and node.layout_version and (
                view.layout == (node.started_at_ms, node.layout_version)
                and view.shape == (node.draining, node.cpu_count)):
            view.workers, view.gpus = node.workers, node.gpus  # a heartbeat: same layout, no compare
            return view
        if view is None or view.workers != node.workers or view.gpus != node.gpus or (
                view.shape != (node.draining, node.cpu_count)):
            view = self._views[node.node_id] = NodeView(node)
            self.generation += 1
        else:  # the same content in a newer status: compare by identity from now on
            view.workers, view.gpus = node.workers, node.gpus
        return view

    def keep_only(self, node_ids: set[str]) -> None:
        for node_id in set(self._views) - node_ids:
            del self._views[node_id]
            self.generation += 1

    def reported(self, nodes: dict[str, NodeStatus]) -> tuple[dict[str, list[Live]], frozenset[str]] | None:
        """(live workers per endpoint, all worker ids) as of the last round, if still valid."""
        for node in nodes.values():
            self.of(node)
        if self._reported is None or self._reported[0] != (self.generation, frozenset(nodes)):
            return None
        return self._reported[1], self._reported[2]

    def remember(self, nodes: dict[str, NodeStatus], live: dict[str, list[Live]],
                 ids: frozenset[str]) -> None:
        self._reported = ((self.generation, frozenset(nodes)), live, ids)


def ledger(snapshot: Snapshot, views: NodeViews | None = None) -> dict[str, NodeUse]:
    views = views or NodeViews()
    use: dict[str, NodeUse] = {}
    busy: set[str] | None = None  # parked workers being resumed or evicted
    for node_id, node in snapshot.nodes.items():
        view = views.of(node)  # a stopping or parked worker still holds its GPUs
        slots_taken = len(node.workers) - len(view.parked)
        u = use[node_id] = NodeUse(node, used_gpus=view.used_gpus, workers=slots_taken)
        u._free = view.free_groups() if node.gpus else {}
        if any(p.info.gpu_uuids for p in view.parked):  # type: ignore[union-attr]
            if busy is None:
                busy = {p.worker_id for p in [*snapshot.pending_starts, *snapshot.pending_stops]}
            u.parked_gpus = {g: p.info for p in view.parked if p.worker_id not in busy
                             for g in p.info.gpu_uuids}  # type: ignore[union-attr]
    for start in snapshot.pending_starts:
        u = use.get(start.node_id)
        if u is None:
            continue
        view = views.of(u.node)
        if start.worker_id not in view.ids:
            u.workers += 0 if start.park else 1  # a pre-warm will be parked: no slot
            u.used_gpus = u.used_gpus | set(start.gpu_uuids)
            u._free = None
        elif any(p.worker_id == start.worker_id for p in view.parked):  # a resume: a slot again
            u.workers += 1
    return use


def live_workers(snapshot: Snapshot, views: NodeViews | None = None) -> dict[str, list[Live]]:
    """Per endpoint, the workers that count: reported on alive nodes, not stopping, not parked
    and not being stopped by us, plus starts in flight (resumes of parked workers too)."""
    views = views or NodeViews()
    stopping = {p.worker_id for p in snapshot.pending_stops}
    cached = views.reported(snapshot.nodes) if not stopping else None
    if cached is not None:  # nothing reported changed since the last round
        live = {endpoint_id: list(workers) for endpoint_id, workers in cached[0].items()}
        seen = set(cached[1])
        return _with_starts(snapshot, live, seen)
    seen = set()
    live = {}
    for node_id in sorted(snapshot.nodes):
        node = snapshot.nodes[node_id]
        view = views.of(node)
        if stopping.isdisjoint(view.ids) and seen.isdisjoint(view.ids):
            for endpoint_id, workers in view.by_endpoint.items():
                live.setdefault(endpoint_id, []).extend(workers)
            seen |= view.ids.difference(p.worker_id for p in view.parked) if view.parked else view.ids
            continue
        for worker in node.workers:  # the general case, worker by worker
            if worker.state in ("stopping", "parked") or worker.worker_id in stopping \
                    or worker.worker_id in seen:
                continue
            seen.add(worker.worker_id)
            live.setdefault(worker.endpoint_id, []).append(Live(worker.worker_id, node_id, worker))
    if not stopping:
        views.remember(snapshot.nodes, {ep: list(ws) for ep, ws in live.items()}, frozenset(seen))
    return _with_starts(snapshot, live, seen)


def _with_starts(snapshot: Snapshot, live: dict[str, list[Live]], seen: set[str]) -> dict[str, list[Live]]:
    for start in snapshot.pending_starts:
        if start.node_id in snapshot.nodes and start.worker_id not in seen and not start.park:
            seen.add(start.worker_id)
            live.setdefault(start.endpoint_id, []).append(Live(start.worker_id, start.node_id, None))
    return live


def parked_workers(snapshot: Snapshot, views: NodeViews | None = None) -> dict[str, list[Live]]:
    """Per endpoint, its parked workers on alive nodes that are not being resumed or evicted,
    the most recently used first."""
    views = views or NodeViews()
    parked: dict[str, list[Live]] = {}
    for node_id in sorted(snapshot.nodes):
        for p in views.of(snapshot.nodes[node_id]).parked:
            parked.setdefault(p.info.endpoint_id, []).append(p)  # type: ignore[union-attr]
    if parked:
        busy = {p.worker_id for p in [*snapshot.pending_starts, *snapshot.pending_stops]}
        for endpoint_id, workers in list(parked.items()):
            workers = [w for w in workers if w.worker_id not in busy]
            workers.sort(key=lambda w: (-_last_used_ms(w), w.worker_id))
            parked[endpoint_id] = workers
    return parked


def _last_used_ms(worker: Live) -> int:
    assert worker.info is not None
    return worker.info.idle_since_ms or worker.info.started_at_ms


# -- stage 1: feasible ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    node_id: str
    gpu_uuids: tuple[str, ...]
    type_rank: int
    free_after: int
    # Parked workers (of other endpoints) the node evicts to free these GPUs.
    evicts: int = 0


def _pick_gpus(spec: EndpointSpec, groups: dict[str, list[GpuInfo]]) -> tuple[int, tuple[str, ...]] | None:
    """(preference rank, GPU uuids) for one worker from the node's free GPU groups, or None."""
    need = spec.gpu_count
    if spec.gpu_type_ids:
        for rank, type_id in enumerate(spec.gpu_type_ids):
            matching_groups = [gs for name, gs in groups.items() if gpu_matches(type_id, name)]
            if sum(len(gs) for gs in matching_groups) < need:
                continue
            if len(matching_groups) == 1:
                matching = matching_groups[0]
            else:  # several names match the type: take them in (index, uuid) order
                matching = sorted((g for gs in matching_groups for g in gs), key=lambda g: (g.index, g.uuid))
            return rank, tuple(g.uuid for g in matching[:need])
        return None
    # Any type, but one type per worker: the fullest group that still fits (best fit).
    fitting = sorted((len(gs), name) for name, gs in groups.items() if len(gs) >= need)
    if not fitting:
        return None
    return 0, tuple(g.uuid for g in groups[fitting[0][1]][:need])


def feasible(spec: EndpointSpec, use: NodeUse, *, workers_per_cpu: float,
             backoff_reason: str | None) -> Option | str:
    """An option for one worker of `spec` on this node, or the reason it does not fit."""
    node = use.node
    if node.draining:
        return "draining"
    if backoff_reason is not None:
        return f"backing off ({backoff_reason})"
    if spec.gpu_count <= 0:
        slots = use.slots(workers_per_cpu)
        if use.workers >= slots:
            return f"all {slots} worker slots used"
        return Option(node.node_id, (), 0, slots - use.workers - 1)
    if not node.gpus:
        return "no GPUs"
    groups = use.free_groups()
    picked = _pick_gpus(spec, groups)
    if picked is None:
        free = sum(len(gs) for gs in groups.values())
        kinds = ", ".join(sorted({g.name for gs in groups.values() for g in gs})) or "none"
        return f"{free} of {len(node.gpus)} GPUs free ({kinds})"
    rank, uuids = picked
    return Option(node.node_id, uuids, rank, sum(len(gs) for gs in groups.values()) - len(uuids))


# -- stage 2: score; stage 3: select -----------------------------------------------------------------


def score(spec: EndpointSpec, option: Option, use: NodeUse) -> tuple[int, int, int, int, str]:
    """Lower is better: GPU preference, CPU work off GPU nodes, partly used first, tightest fit."""
    keep_off_gpus = 1 if spec.gpu_count <= 0 and use.node.gpus else 0
    empty = 0 if use.workers > 0 else 1
    return (option.type_rank, keep_off_gpus, empty, option.free_after, option.node_id)


def select(spec: EndpointSpec, use: dict[str, NodeUse], *, workers_per_cpu: float,
           backoff: dict[str, str]) -> Option | str:
    """The best node for one more worker of `spec`, or why none fits."""
    if not use:
        return "no alive nodes"
    options: list[tuple[tuple[int, int, int, int, str], Option]] = []
    rejected: list[tuple[str, str]] = []
    for node_id in sorted(use):
        found = feasible(spec, use[node_id], workers_per_cpu=workers_per_cpu,
                         backoff_reason=backoff.get(node_id))
        if isinstance(found, Option):
            options.append((score(spec, found, use[node_id]), found))
        else:
            rejected.append((node_id, found))
    if not options:
        need = (f"{spec.gpu_count} free GPU(s) of {spec.gpu_type_ids or 'any type'}"
                if spec.gpu_count > 0 else "a free worker slot")
        return f"no node has {need}: " + summarise(rejected)
    return min(options, key=lambda o: o[0])[1]


def select_evicting(spec: EndpointSpec, use: dict[str, NodeUse], *, backoff: dict[str, str]) -> Option | None:
    """When no free GPUs fit: the best node for one more GPU worker of `spec` if GPUs held only
    by parked workers of other endpoints count as free. Order: GPU preference, fewest parked
    workers evicted, then as `score`; free GPUs are taken before parked ones on a node."""
    best: tuple[tuple[Any, ...], Option] | None = None
    for node_id in sorted(use):
        u = use[node_id]
        if u.node.draining or node_id in backoff or not u.parked_gpus:
            continue
        picked = _pick_gpus(spec, u.evictable_groups(spec.id))
        if picked is None:
            continue
        rank, uuids = picked
        evicts = len({u.parked_gpus[g].worker_id for g in uuids if g in u.parked_gpus})
        free_after = (sum(len(gs) for gs in u.free_groups().values())
                      - sum(1 for g in uuids if g not in u.parked_gpus))
        option = Option(node_id, uuids, rank, max(0, free_after), evicts)
        key = (rank, evicts, *score(spec, option, u)[1:])
        if best is None or key < best[0]:
            best = (key, option)
    return None if best is None else best[1]


def summarise(rejected: list[tuple[str, str]], *, examples: int = 3, groups: int = 5) -> str:
    """Per-node rejections, grouped by reason, most common first, a few node ids each, so the
    text stays short on a fleet of thousands: `2 nodes (n1, n2): draining; ...`."""
    by_reason: dict[str, list[str]] = {}
    for node_id, reason in rejected:
        by_reason.setdefault(reason, []).append(node_id)
    ordered = sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    parts = []
    for reason, nodes in ordered[:groups]:
        named = ", ".join(nodes[:examples]) + (", …" if len(nodes) > examples else "")
        who = nodes[0] if len(nodes) == 1 else f"{len(nodes)} nodes ({named})"
        parts.append(f"{who}: {reason}")
    if len(ordered) > groups:
        parts.append(f"{sum(len(n) for _, n in ordered[groups:])} more nodes for other reasons")
    return "; ".join(parts)


def shape(spec: EndpointSpec) -> tuple[int, tuple[str, ...]]:
    """What feasibility and score depend on: endpoints of one shape rank nodes alike."""
    return (spec.gpu_count, tuple(spec.gpu_type_ids)) if spec.gpu_count > 0 else (0, ())


class Chooser:
    """`select` for many workers at once, on a large fleet.

    One heap of (score, node) per endpoint shape, built on first use; an assignment
    bumps the node's version and pushes the node's new option into every heap built so
    far (an assignment only takes capacity, so no node becomes newly feasible), and
    entries of an older version are dropped when they surface. The best entry is thus
    exactly `select`'s choice, at O(log nodes) per worker instead of O(nodes).
    """

    def __init__(self, use: dict[str, NodeUse], *, workers_per_cpu: float, backoff: dict[str, str],
                 cache: dict[tuple[int, tuple[str, ...]], list[tuple[Any, ...]]] | None = None) -> None:
        self.use = use
        self.workers_per_cpu = workers_per_cpu
        self.backoff = backoff
        self.heaps: dict[tuple[int, tuple[str, ...]], tuple[EndpointSpec, list[tuple[Any, ...]]]] = {}
        # Heaps built in an earlier round from the same ledger (the caller vouches for that).
        self.cache = cache

    def _option(self, spec: EndpointSpec, node_id: str) -> Option | str:
        return feasible(spec, self.use[node_id], workers_per_cpu=self.workers_per_cpu,
                        backoff_reason=self.backoff.get(node_id))

    def best(self, spec: EndpointSpec) -> Option | str:
        key = shape(spec)
        if key not in self.heaps:
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None:
                entries = list(cached)  # a copy of a heap is a heap
            else:
                entries = []
                for node_id, u in self.use.items():
                    found = self._option(spec, node_id)
                    if isinstance(found, Option):
                        entries.append((score(spec, found, u), u.version, found))
                heapq.heapify(entries)
                if self.cache is not None:
                    self.cache[key] = list(entries)
            self.heaps[key] = (spec, entries)
        heap = self.heaps[key][1]
        while heap:
            _, version, option = heap[0]
            if version == self.use[option.node_id].version:
                return option
            heapq.heappop(heap)
        return select(spec, self.use, workers_per_cpu=self.workers_per_cpu, backoff=self.backoff)

    def assign(self, option: Option) -> None:
        u = self.use[option.node_id]
        u.assign(option.gpu_uuids)
        for spec, heap in self.heaps.values():
            found = self._option(spec, option.node_id)
            if isinstance(found, Option):
                heapq.heappush(heap, (score(spec, found, u), u.version, found))


# -- the plan ------------------------------------------------------------------------------------------


def _stop(victim: Live, endpoint_id: str, why: str, *, park: bool) -> Command:
    return Command(node_id=victim.node_id, endpoint_id=endpoint_id,
                   message=StopWorker(worker_id=victim.worker_id, reason=why, park=park))


def _evict(victim: Live, endpoint_id: str, why: str, use: dict[str, NodeUse]) -> Command:
    """Stop a parked worker for good; its GPUs stay held until its node reports it gone."""
    u = use[victim.node_id]
    if u.parked_gpus:
        u.parked_gpus = {g: w for g, w in u.parked_gpus.items() if w.worker_id != victim.worker_id}
    return _stop(victim, endpoint_id, why, park=False)


def _resumable(spec: EndpointSpec, parked: Live, use: dict[str, NodeUse], *, workers_per_cpu: float,
               backoff: dict[str, str]) -> bool:
    """A parked worker can be resumed where it is: its node takes work and (CPU endpoints)
    has a worker slot; a GPU worker already holds its GPUs."""
    u = use[parked.node_id]
    if u.node.draining or parked.node_id in backoff:
        return False
    return spec.gpu_count > 0 or u.workers < u.slots(workers_per_cpu)


def _outdated(spec: EndpointSpec, info: WorkerInfo) -> bool:
    """A parked worker of another version of the endpoint (image, command, env or GPUs; a
    change of scaling fields alone keeps it). Older agents report no key: any change then."""
    if info.launch_key:
        return info.launch_key != launch_key(spec)
    return spec.updated_at_ms > info.started_at_ms


def _idle_first(workers: list[Live]) -> list[Live]:
    """Stoppable workers (idle, holding no job), longest idle first."""
    idle = [w for w in workers if w.info is not None and w.info.state == "idle" and not w.info.jobs]
    return sorted(idle, key=lambda w: (w.info.idle_since_ms or w.info.started_at_ms, w.worker_id))  # type: ignore[union-attr]


def place(snapshot: Snapshot, now_ms: int, new_id: Callable[[], str] = new_worker_id, *,
          workers_per_cpu: float = DEFAULT_WORKERS_PER_CPU, views: NodeViews | None = None) -> Plan:
    """Commands that move the cluster towards each endpoint's desired worker count.

    `new_id` names new workers (pass a counter in tests); `now_ms` is the decision's time,
    part of the signature for time-aware stages (no stage needs it yet); `views` may carry
    per-node work over from the previous round (it never changes the result)."""
    views = views or NodeViews()
    use = ledger(snapshot, views)
    live = live_workers(snapshot, views)
    parked = parked_workers(snapshot, views)
    commands: list[Command] = []
    unplaced: list[Unplaced] = []
    missing: dict[str, int] = {}
    over_quota: dict[str, int] = {}
    backoff = snapshot.backoff

    touched = False  # the ledger changed before choosing (resumes, evictions): no cached heaps
    for endpoint_id in sorted(set(live) | set(snapshot.endpoints) | set(parked)):
        workers = live.get(endpoint_id, [])
        spec = snapshot.endpoints.get(endpoint_id)
        if spec is None:  # endpoint deleted: its idle and parked workers go
            surplus, why = len(workers), "endpoint deleted"
            for victim in parked.pop(endpoint_id, []):
                commands.append(_evict(victim, endpoint_id, why, use))
                touched = True
        else:
            want = desired_workers(spec, snapshot.targets.get(endpoint_id))
            cap = quota_workers(spec)
            if cap is not None and want > cap:
                over_quota[endpoint_id] = want - cap
                want = cap
            surplus, why = len(workers) - want, f"surplus: {len(workers)} workers, {want} wanted"
            pool = []
            for p in parked.get(endpoint_id, []):
                if _outdated(spec, p.info):  # type: ignore[arg-type]
                    commands.append(_evict(p, endpoint_id, "endpoint changed since it started", use))
                    touched = True
                else:
                    pool.append(p)
            # Resume parked workers (the most recently used first) before any cold start.
            for p in list(pool):
                if surplus >= 0:
                    break
                if _resumable(spec, p, use, workers_per_cpu=workers_per_cpu, backoff=backoff):
                    pool.remove(p)
                    use[p.node_id].workers += 1
                    use[p.node_id].version += 1
                    touched = True
                    surplus += 1
                    commands.append(Command(node_id=p.node_id, endpoint_id=endpoint_id, message=StartWorker(
                        worker_id=p.worker_id, spec=spec, gpu_uuids=list(p.info.gpu_uuids))))  # type: ignore[union-attr]
            if pool:
                parked[endpoint_id] = pool
            else:
                parked.pop(endpoint_id, None)
            if surplus < 0:
                missing[endpoint_id] = -surplus
        for victim in (_idle_first(workers)[:surplus] if surplus > 0 else ()):
            commands.append(_stop(victim, endpoint_id, why, park=spec is not None and spec.flashboot))

    # Endpoints take turns so that scarce GPUs are shared rather than taken by the first one.
    blocked: dict[str, str] = {}
    cache = None
    if not touched and any(n > 0 for n in missing.values()):
        round_key = (views.generation, frozenset(snapshot.nodes), workers_per_cpu,
                     tuple(p.worker_id for p in snapshot.pending_starts),
                     tuple(p.worker_id for p in snapshot.pending_stops), tuple(sorted(backoff.items())))
        if views.heaps_key != round_key:
            views.heaps_key, views.heaps = round_key, {}
        cache = views.heaps
    chooser = Chooser(use, workers_per_cpu=workers_per_cpu, backoff=backoff, cache=cache)
    # Weighted fair share: the next worker goes to the endpoint whose share (what it holds
    # with that worker, in GPUs or workers, over its weight) would be the smallest.
    held = {ep: len(live.get(ep, ())) * _units(snapshot.endpoints[ep]) + _resumed(commands, ep, snapshot)
            for ep in missing}
    turns = [(_share(snapshot.endpoints[ep], held[ep]), ep) for ep, n in missing.items() if n > 0]
    heapq.heapify(turns)
    while turns:
        _, endpoint_id = heapq.heappop(turns)
        spec = snapshot.endpoints[endpoint_id]
        chosen = chooser.best(spec)
        if isinstance(chosen, str) and spec.gpu_count > 0:  # no free GPUs fit: parked workers' GPUs
            chosen = select_evicting(spec, use, backoff=backoff) or chosen
        if isinstance(chosen, str):
            blocked[endpoint_id] = chosen
            continue
        if chosen.evicts:  # the node evicts them: out of their endpoints' pools
            taken = set(chosen.gpu_uuids)
            for pool in parked.values():
                pool[:] = [p for p in pool if p.node_id != chosen.node_id
                           or taken.isdisjoint(p.info.gpu_uuids)]  # type: ignore[union-attr]
        chooser.assign(chosen)
        missing[endpoint_id] -= 1
        held[endpoint_id] += _units(spec)
        commands.append(Command(node_id=chosen.node_id, endpoint_id=endpoint_id, message=StartWorker(
            worker_id=new_id(), spec=spec, gpu_uuids=list(chosen.gpu_uuids))))
        if missing[endpoint_id] > 0:
            heapq.heappush(turns, (_share(spec, held[endpoint_id]), endpoint_id))
    for endpoint_id in sorted(set(blocked) | set(over_quota)):
        reasons = []
        if endpoint_id in over_quota:
            spec = snapshot.endpoints[endpoint_id]
            reasons.append(f"{over_quota[endpoint_id]} over its GPU quota ({spec.gpu_quota} GPUs)")
        if endpoint_id in blocked:
            reasons.append(blocked[endpoint_id])
        unplaced.append(Unplaced(endpoint_id=endpoint_id, reason="; ".join(reasons),
                                 missing=missing.get(endpoint_id, 0) * (endpoint_id in blocked)
                                 + over_quota.get(endpoint_id, 0)))

    commands.extend(_prewarm(snapshot, live, parked, commands, blocked, use, new_id,
                             workers_per_cpu=workers_per_cpu))
    commands.extend(_rebalance(snapshot, live, blocked, use))

    # Live and parked together stay within workersMax (a parked worker wakes by itself for a
    # job): the least recently used parked workers beyond it are evicted.
    for endpoint_id, pool in sorted(parked.items()):
        if not pool:
            continue
        spec = snapshot.endpoints[endpoint_id]
        # (A surplus worker stopped with `park` counts once: live now, in the pool later.)
        started = sum(1 for c in commands
                      if c.endpoint_id == endpoint_id and isinstance(c.message, StartWorker))
        limit = max(spec.workers_max, spec.workers_min, 0)
        over = len(live.get(endpoint_id, [])) + started + len(pool) - limit
        for victim in (pool[::-1][:over] if over > 0 else ()):
            commands.append(_evict(victim, endpoint_id, "parked beyond workersMax", use))
    return Plan(commands=commands, unplaced=unplaced)


def quota_workers(spec: EndpointSpec) -> int | None:
    """The most workers the endpoint's GPU quota allows (None: no quota, or a CPU endpoint)."""
    if spec.gpu_quota <= 0 or spec.gpu_count <= 0:
        return None
    return spec.gpu_quota // spec.gpu_count


def _units(spec: EndpointSpec) -> int:
    """What one worker holds of what endpoints share: its GPUs, or one worker slot."""
    return spec.gpu_count if spec.gpu_count > 0 else 1


def _share(spec: EndpointSpec, held: int) -> tuple[int, float, str]:
    """The endpoint's turn: first those holding nothing (none starves, whatever the weights),
    then the smallest weighted share once it gets one more worker."""
    return (0 if held == 0 else 1), (held + _units(spec)) / max(1, spec.weight), spec.id


def _resumed(commands: list[Command], endpoint_id: str, snapshot: Snapshot) -> int:
    spec = snapshot.endpoints[endpoint_id]
    return _units(spec) * sum(1 for c in commands
                              if c.endpoint_id == endpoint_id and isinstance(c.message, StartWorker))


def can_park(node: NodeStatus) -> bool:
    """Whether the node may take a pre-warmed worker: it can pause workers and its pool has room."""
    return "pause" in node.capabilities and node.park_budget_mb > node.parked_mb and not node.draining


def _prewarm(snapshot: Snapshot, live: dict[str, list[Live]], parked: dict[str, list[Live]],
             planned: list[Command], blocked: dict[str, str], use: dict[str, NodeUse],
             new_id: Callable[[], str], *, workers_per_cpu: float) -> list[Command]:
    """Pre-warm starts: a flash endpoint keeps `prewarm_workers` live and parked together (the
    autoscaler's number); the missing ones start parked on nodes with room in their pool,
    only on free capacity (never evicting a parked worker). Endpoints whose own workers find
    no node, or whose pre-warming a node just refused, wait."""
    commands: list[Command] = []
    in_flight: dict[str, int] = {}
    for start in snapshot.pending_starts:
        if start.park and start.node_id in snapshot.nodes:
            in_flight[start.endpoint_id] = in_flight.get(start.endpoint_id, 0) + 1
    for endpoint_id, target in sorted(snapshot.targets.items()):
        spec = snapshot.endpoints.get(endpoint_id)
        if spec is None or not spec.flashboot or target.prewarm_workers <= 0 or endpoint_id in blocked \
                or endpoint_id in snapshot.prewarm_hold:
            continue
        want = min(target.prewarm_workers, max(spec.workers_max, spec.workers_min, 0))
        started = sum(1 for c in planned
                      if c.endpoint_id == endpoint_id and isinstance(c.message, StartWorker))
        have = (len(live.get(endpoint_id, [])) + started + len(parked.get(endpoint_id, []))
                + in_flight.get(endpoint_id, 0))
        for _ in range(want - have):
            room = {node_id: u for node_id, u in use.items() if can_park(u.node)}
            chosen = select(spec, room, workers_per_cpu=workers_per_cpu, backoff=snapshot.backoff)
            if isinstance(chosen, str):
                break
            use[chosen.node_id].assign(chosen.gpu_uuids)
            commands.append(Command(node_id=chosen.node_id, endpoint_id=endpoint_id, message=StartWorker(
                worker_id=new_id(), spec=spec, gpu_uuids=list(chosen.gpu_uuids), park=True)))
    return commands


# -- fair share over time: retiring idle workers of endpoints above their share -------------------


def _rebalance(snapshot: Snapshot, live: dict[str, list[Live]], blocked: dict[str, str],
               use: dict[str, NodeUse]) -> list[Command]:
    """GPUs that came to endpoints before others asked (placing never preempts) are divided
    by weight over time. For a GPU endpoint that finds no capacity, one idle worker is
    stopped of the endpoint whose weighted share would still be at least the hungry one's
    after the move ((held - 1 worker) / weight >= (hungry's held + 1 worker) / its weight; an
    endpoint holding nothing always qualifies, a donor keeps one worker), on a node where
    that frees GPUs the hungry endpoint can use; the next round gives them to it (it has the
    smaller share). The condition cannot hold the other way round after the move, so nothing
    ping-pongs; idle workers only and one stop per donor in flight, so no job is interrupted."""
    specs = {ep: spec for ep, spec in snapshot.endpoints.items() if spec.gpu_count > 0}
    hungry = [ep for ep in blocked if ep in specs]
    if not hungry:
        return []
    unit = {ep: spec.gpu_count for ep, spec in specs.items()}
    weight = {ep: max(1, spec.weight) for ep, spec in specs.items()}
    held = {ep: len(live.get(ep, ())) * unit[ep] for ep in specs}
    stopping = {p.endpoint_id for p in snapshot.pending_stops}
    commands: list[Command] = []
    for ep in sorted(hungry, key=lambda e: (held[e] > 0, held[e] / weight[e], e)):
        after = (held[ep] + unit[ep]) / weight[ep]

        def gives(d: str) -> bool:
            if d == ep or d in stopping or held[d] < 2 * unit[d]:
                return False
            return held[ep] == 0 or (held[d] - unit[d]) / weight[d] >= after

        donors = sorted((d for d in specs if gives(d)),
                        key=lambda d: (-(held[d] - unit[d]) / weight[d], d))
        for donor in donors:
            victim = _freeing_worker(specs[ep], live.get(donor, []), use)
            if victim is None:
                continue
            commands.append(Command(node_id=victim.node_id, endpoint_id=donor, message=StopWorker(
                worker_id=victim.worker_id, only_if_idle=True,
                reason=f"fair share: {donor} holds {held[donor]} GPUs (weight {weight[donor]}), "
                       f"{ep} waits with {held[ep]} (weight {weight[ep]})")))
            stopping.add(donor)
            held[donor] -= unit[donor]
            break
    return commands


def _freeing_worker(hungry: EndpointSpec, workers: list[Live], use: dict[str, NodeUse]) -> Live | None:
    """An idle worker whose GPUs, with the free ones on its node, would fit one worker of
    `hungry` (the longest idle first)."""
    for worker in _idle_first(workers):
        u = use.get(worker.node_id)
        if u is None or u.node.draining:
            continue
        freed = set(worker.info.gpu_uuids)  # type: ignore[union-attr]
        usable = [g for g in u.node.gpus if g.uuid in freed or g.uuid not in u.used_gpus]
        groups: dict[str, list[GpuInfo]] = {}
        for g in sorted(usable, key=lambda g: (g.index, g.uuid)):
            groups.setdefault(_norm(g.name), []).append(g)
        if freed and _pick_gpus(hungry, groups) is not None:
            return worker
    return None
