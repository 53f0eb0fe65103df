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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from runplane_proto.endpoints import EndpointSpec, launch_key
from runplane_proto.gpus import gpu_matches, normalised as _norm
from runplane_proto.ids import new_worker_id
from runplane_proto.nodes import GpuInfo, NodeStatus, StartWorker, StopWorker, WorkerInfo
from runplane_proto.scaling import ScaleTarget
from runplane_scheduler.cluster import PendingStart, Snapshot
from runplane_scheduler.node_views import Live, NodeView, NodeViews, free_groups

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
    # Tells this state apart from any other of the node's (cached chooser entries carry it):
    # its view's serial until the plan changes it, then -1, -2, ...
    version: int = 0
    _free: dict[str, list[GpuInfo]] | None = None
    # GPUs of parked workers that may be evicted for another endpoint: uuid -> the worker.
    parked_gpus: dict[str, WorkerInfo] = field(default_factory=dict)
    _edits: int = 0

    def slots(self, workers_per_cpu: float) -> int:
        return max(1, math.floor(self.node.cpu_count * workers_per_cpu))

    def free_groups(self) -> dict[str, list[GpuInfo]]:
        """Free GPUs grouped by normalised name, each group in (index, uuid) order."""
        if self._free is None:
            self._free = free_groups(self.node.gpus, self.used_gpus)
        return self._free

    def touch(self) -> None:
        """The node's capacity changed: a new version (its cached options no longer hold)."""
        self._edits += 1
        self.version = -self._edits
        self._free = None

    def assign(self, gpu_uuids: tuple[str, ...] | list[str]) -> None:
        self.workers += 1
        self.used_gpus = self.used_gpus | set(gpu_uuids)  # may be shared with a NodeView: no update()
        if self.parked_gpus:
            # A parked worker holding any of them is evicted by the node: none of its GPUs is
            # handed out again before the node reports it gone.
            evicted = {self.parked_gpus[u].worker_id for u in gpu_uuids if u in self.parked_gpus}
            self.parked_gpus = {u: w for u, w in self.parked_gpus.items() if w.worker_id not in evicted}
        self.touch()

    def evictable_groups(self, endpoint_id: str) -> dict[str, list[GpuInfo]]:
        """Free GPUs and those held only by parked workers of other endpoints, grouped by
        normalised name, the free ones first in each group."""
        groups: dict[str, list[GpuInfo]] = {}
        for g in sorted(self.node.gpus, key=lambda g: (g.uuid in self.used_gpus, g.index, g.uuid)):
            holder = self.parked_gpus.get(g.uuid)
            if g.uuid not in self.used_gpus or (holder is not None and holder.endpoint_id != endpoint_id):
                groups.setdefault(_norm(g.name), []).append(g)
        return groups


def own_use(view: NodeView) -> NodeUse:
    """What the node holds by its own report (a stopping or parked worker still holds its GPUs)."""
    return NodeUse(view.node, used_gpus=view.used_gpus, workers=view.slots_taken, version=view.serial,
                   _free=view.free_groups() if view.gpus else {})


class Ledger(Mapping[str, NodeUse]):
    """Per alive node, what it holds: its own report, starts in flight, then what the plan
    assigns. A node's `NodeUse` is made when first looked at (a round touches few of a
    large fleet's nodes); the views are those of the snapshot's nodes."""

    def __init__(self, snapshot: Snapshot, views: NodeViews) -> None:
        self.nodes = snapshot.nodes
        self.views = views
        self._use: Mapping[str, NodeUse] = {}
        self._busy: set[str] | None = None  # parked workers being resumed or evicted
        self._pending = (snapshot.pending_starts, snapshot.pending_stops)
        by_node: dict[str, list[PendingStart]] = {}
        for start in snapshot.pending_starts:
            if start.node_id in self.nodes:
                by_node.setdefault(start.node_id, []).append(start)
        for node_id, starts in by_node.items():
            view = views[node_id]
            slots, gpus = 0, []
            for start in starts:
                if start.worker_id not in view.ids:
                    slots += 0 if start.park else 1  # a pre-warm will be parked: no slot
                    gpus.extend(start.gpu_uuids)
                elif start.worker_id in view.parked_ids:  # a resume: a slot again
                    slots += 1
            if slots or gpus:
                u = self[node_id]
                u.workers += slots
                u.used_gpus = u.used_gpus | set(gpus)
                u.touch()

    def __getitem__(self, node_id: str) -> NodeUse:
        u = self._use.get(node_id)
        if u is None:
            if node_id not in self.nodes:
                raise KeyError(node_id)
            view = self.views[node_id]
            u = self._use[node_id] = own_use(view)
            if view.parked and any(p.info.gpu_uuids for p in view.parked):  # type: ignore[union-attr]
                if self._busy is None:
                    self._busy = {p.worker_id for p in [*self._pending[0], *self._pending[1]]}
                u.parked_gpus = {g: p.info for p in view.parked if p.worker_id not in self._busy
                                 for g in p.info.gpu_uuids}  # type: ignore[union-attr]
        return u

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.nodes

    def __iter__(self) -> Iterator[str]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def changed(self) -> list[NodeUse]:
        """The nodes whose state differs from their own report (starts in flight, the plan)."""
        return [u for u in self._use.values() if u.version < 0]


def ledger(snapshot: Snapshot, views: NodeViews | None = None) -> Ledger:
    if views is None:
        views = NodeViews()
    views.sync(snapshot.nodes)
    return Ledger(snapshot, views)


def live_workers(snapshot: Snapshot, views: NodeViews | None = None) -> dict[str, list[Live]]:
    """Per endpoint, the workers that count: reported on alive nodes, not stopping, not parked
    and not being stopped by us, plus starts in flight (resumes of parked workers too)."""
    if views is None:
        views = NodeViews()
    views.sync(snapshot.nodes)
    return _live_workers(snapshot, views)


def _live_workers(snapshot: Snapshot, views: NodeViews) -> dict[str, list[Live]]:
    stopping = {p.worker_id for p in snapshot.pending_stops}
    if not views.simple():
        return _live_node_by_node(snapshot, views, stopping)
    # Every worker id on one node only: the reported workers kept from round to round, less
    # those being stopped; a node listing one of those is read worker by worker, so it counts
    # as having reported what it lists that counts.
    live = views.live()
    general: set[str] = set()
    for worker_id in stopping:
        view = views.where(worker_id)
        if view is None:
            continue
        general.add(view.node.node_id)
        info = next(w for w in view.workers if w.worker_id == worker_id)
        if worker_id not in view.parked_ids and worker_id not in view.stopping_ids:
            live[info.endpoint_id] = [w for w in live[info.endpoint_id] if w.worker_id != worker_id]
            if not live[info.endpoint_id]:
                del live[info.endpoint_id]

    def seen(worker_id: str) -> bool:
        view = views.where(worker_id)
        if view is None or worker_id in view.parked_ids:
            return False
        if view.node.node_id in general:
            return worker_id not in stopping and worker_id not in view.stopping_ids
        return True

    return _with_starts(snapshot, live, seen)


def _live_node_by_node(snapshot: Snapshot, views: NodeViews, stopping: set[str]) -> dict[str, list[Live]]:
    """`_live_workers` when some worker id is listed twice (a node reporting a worker another
    still lists): node by node in id order, the first listing counts."""
    seen: set[str] = set()
    live: dict[str, list[Live]] = {}
    for node_id in sorted(snapshot.nodes):
        node = snapshot.nodes[node_id]
        view = views.of(node)
        if stopping.isdisjoint(view.ids) and seen.isdisjoint(view.ids):
            for endpoint_id, workers in view.by_endpoint.items():
                live.setdefault(endpoint_id, []).extend(workers)
            seen |= view.ids.difference(view.parked_ids) if view.parked else view.ids
            continue
        for worker in node.workers:  # the general case, worker by worker
            if worker.state in ("stopping", "parked") or worker.worker_id in stopping \
                    or worker.worker_id in seen:
                continue
            seen.add(worker.worker_id)
            live.setdefault(worker.endpoint_id, []).append(Live(worker.worker_id, node_id, worker))
    return _with_starts(snapshot, live, seen.__contains__)


def _with_starts(snapshot: Snapshot, live: dict[str, list[Live]],
                 seen: Callable[[str], bool]) -> dict[str, list[Live]]:
    added: set[str] = set()
    copied: set[str] = set()  # the lists may be shared with the memo: copied before the first append
    for start in snapshot.pending_starts:
        if start.node_id in snapshot.nodes and not start.park and start.worker_id not in added \
                and not seen(start.worker_id):
            added.add(start.worker_id)
            if start.endpoint_id not in copied:
                copied.add(start.endpoint_id)
                live[start.endpoint_id] = list(live.get(start.endpoint_id, ()))
            live[start.endpoint_id].append(Live(start.worker_id, start.node_id, None))
    return live


def parked_workers(snapshot: Snapshot, views: NodeViews | None = None) -> dict[str, list[Live]]:
    """Per endpoint, its parked workers on alive nodes that are not being resumed or evicted,
    the most recently used first."""
    if views is None:
        views = NodeViews()
    views.sync(snapshot.nodes)
    return _parked_workers(snapshot, views)


def _parked_workers(snapshot: Snapshot, views: NodeViews) -> dict[str, list[Live]]:
    parked: dict[str, list[Live]] = {}
    for node_id in sorted(views.parked_nodes):
        for p in views[node_id].parked:
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


def select(spec: EndpointSpec, use: Mapping[str, NodeUse], *, workers_per_cpu: float,
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


def select_evicting(spec: EndpointSpec, use: Mapping[str, NodeUse], *,
                    backoff: dict[str, str]) -> Option | None:
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

    One heap of (score, version, option) per endpoint shape, built on first use; an
    assignment gives the node a new version and pushes its new option into every heap built
    so far (an assignment only takes capacity, so no node becomes newly feasible), and
    entries of another version, or of a node in back-off, are dropped when they surface. The
    best entry is thus exactly `select`'s choice, at O(log nodes) per worker instead of
    O(nodes).

    With `views`, the heaps start from ones kept in the memo across rounds: every node's
    option by its own report, brought up to date with the nodes whose view changed since,
    plus the options of the nodes the round changed (starts in flight, resumes); so a round
    on a large fleet scores only the nodes that changed.
    """

    def __init__(self, use: Mapping[str, NodeUse], *, workers_per_cpu: float, backoff: dict[str, str],
                 views: NodeViews | None = None) -> None:
        self.use = use
        self.workers_per_cpu = workers_per_cpu
        self.backoff = backoff
        self.heaps: dict[tuple[int, tuple[str, ...]], tuple[EndpointSpec, list[tuple[Any, ...]]]] = {}
        self.views = views

    def _option(self, spec: EndpointSpec, node_id: str) -> Option | str:
        return feasible(spec, self.use[node_id], workers_per_cpu=self.workers_per_cpu,
                        backoff_reason=self.backoff.get(node_id))

    def _heap(self, spec: EndpointSpec) -> list[tuple[Any, ...]]:
        if self.views is None or not isinstance(self.use, Ledger):
            entries = []
            for node_id, u in self.use.items():
                found = self._option(spec, node_id)
                if isinstance(found, Option):
                    entries.append((score(spec, found, u), u.version, found))
            heapq.heapify(entries)
            return entries
        entries = list(self._own_heap(spec, self.views))  # a copy of a heap is a heap
        for u in self.use.changed():
            found = feasible(spec, u, workers_per_cpu=self.workers_per_cpu, backoff_reason=None)
            if isinstance(found, Option):
                heapq.heappush(entries, (score(spec, found, u), u.version, found))
        return entries

    def _own_heap(self, spec: EndpointSpec, views: NodeViews) -> list[tuple[Any, ...]]:
        """The memo's heap of every node's option by its own report, brought up to date."""
        key = (shape(spec), self.workers_per_cpu)
        kept = views.heaps.get(key)
        if kept is None or len(kept[0]) > 2 * len(views) + 64:  # too many outdated entries: anew
            heap, node_ids = [], [view.node.node_id for view in views.values()]
        else:
            heap, since = kept
            node_ids = list(dict.fromkeys(views.changes[since:]))
        for node_id in node_ids:
            view = views.get(node_id)
            if view is None:  # gone: its entries never match a node of the round
                continue
            u = own_use(view)
            found = feasible(spec, u, workers_per_cpu=self.workers_per_cpu, backoff_reason=None)
            if isinstance(found, Option):
                heapq.heappush(heap, (score(spec, found, u), u.version, found))
        views.heaps[key] = (heap, len(views.changes))
        return heap

    def best(self, spec: EndpointSpec) -> Option | str:
        key = shape(spec)
        if key not in self.heaps:
            self.heaps[key] = (spec, self._heap(spec))
        heap = self.heaps[key][1]
        while heap:
            _, version, option = heap[0]
            u = self.use.get(option.node_id)
            if u is not None and version == u.version and option.node_id not in self.backoff:
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


def _evict(victim: Live, endpoint_id: str, why: str, use: Mapping[str, NodeUse]) -> Command:
    """Stop a parked worker for good; its GPUs stay held until its node reports it gone."""
    u = use[victim.node_id]
    if u.parked_gpus:
        u.parked_gpus = {g: w for g, w in u.parked_gpus.items() if w.worker_id != victim.worker_id}
    return _stop(victim, endpoint_id, why, park=False)


def _resumable(spec: EndpointSpec, parked: Live, use: Mapping[str, NodeUse], *, workers_per_cpu: float,
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
    if views is None:
        views = NodeViews()
    views.sync(snapshot.nodes)
    use = Ledger(snapshot, views)
    live = _live_workers(snapshot, views)
    parked = _parked_workers(snapshot, views)
    commands: list[Command] = []
    unplaced: list[Unplaced] = []
    missing: dict[str, int] = {}
    over_quota: dict[str, int] = {}
    backoff = snapshot.backoff

    for endpoint_id in sorted(set(live) | set(snapshot.endpoints) | set(parked)):
        workers = live.get(endpoint_id, [])
        spec = snapshot.endpoints.get(endpoint_id)
        if spec is None:  # endpoint deleted: its idle and parked workers go
            surplus, why = len(workers), "endpoint deleted"
            for victim in parked.pop(endpoint_id, []):
                commands.append(_evict(victim, endpoint_id, why, use))
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
                else:
                    pool.append(p)
            # Resume parked workers (the most recently used first) before any cold start.
            for p in list(pool):
                if surplus >= 0:
                    break
                if _resumable(spec, p, use, workers_per_cpu=workers_per_cpu, backoff=backoff):
                    pool.remove(p)
                    use[p.node_id].workers += 1
                    use[p.node_id].touch()
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
    chooser = Chooser(use, workers_per_cpu=workers_per_cpu, backoff=backoff, views=views)
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
             planned: list[Command], blocked: dict[str, str], use: Mapping[str, NodeUse],
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
            room = {node_id: use[node_id] for node_id, node in snapshot.nodes.items() if can_park(node)}
            chosen = select(spec, room, workers_per_cpu=workers_per_cpu, backoff=snapshot.backoff)
            if isinstance(chosen, str):
                break
            use[chosen.node_id].assign(chosen.gpu_uuids)
            commands.append(Command(node_id=chosen.node_id, endpoint_id=endpoint_id, message=StartWorker(
                worker_id=new_id(), spec=spec, gpu_uuids=list(chosen.gpu_uuids), park=True)))
    return commands


# -- fair share over time: retiring idle workers of endpoints above their share -------------------


def _rebalance(snapshot: Snapshot, live: dict[str, list[Live]], blocked: dict[str, str],
               use: Mapping[str, NodeUse]) -> list[Command]:
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


def _freeing_worker(hungry: EndpointSpec, workers: list[Live], use: Mapping[str, NodeUse]) -> Live | None:
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
