"""What placement derives from each node's status, kept from round to round.

A round looks at every alive node, but on a large fleet few nodes change between rounds
(a heartbeat rewrites every status each second; the workers rarely change). `NodeViews`
keeps what `place()` derives from each node and redoes a node's part only when its
workers, GPUs or shape change: the node's view (its live workers per endpoint, GPUs in
use, free GPU groups), every endpoint's live workers, the nodes holding parked workers,
and a log of the nodes whose view changed, from which the chooser's heaps per endpoint
shape are brought up to date. It only saves work: `place()` with a fresh `NodeViews`
gives the same plan (property tests check it). Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runplane_proto.gpus import normalised as _norm
from runplane_proto.nodes import GpuInfo, NodeStatus, WorkerInfo


@dataclass(frozen=True)
class Live:
    """A worker that counts towards its endpoint: reported (and not stopping) or starting."""

    worker_id: str
    node_id: str
    info: WorkerInfo | None  # None for a start in flight


def free_groups(gpus: list[GpuInfo], used: set[str] | frozenset[str]) -> dict[str, list[GpuInfo]]:
    """Free GPUs grouped by normalised name, each group in (index, uuid) order."""
    groups: dict[str, list[GpuInfo]] = {}
    for g in sorted(gpus, key=lambda g: (g.index, g.uuid)):
        if g.uuid not in used:
            groups.setdefault(_norm(g.name), []).append(g)
    return groups


class NodeView:
    """What placement derives from one node's worker list, kept while the list is unchanged."""

    __slots__ = ("by_endpoint", "gpus", "ids", "layout", "node", "parked", "parked_ids", "serial", "shape",
                 "slots_taken", "stopping_ids", "twice", "used_gpus", "workers", "_free")

    def __init__(self, node: NodeStatus, serial: int) -> None:
        self.node = node
        # Unique among all views ever made: tells the chooser's cached entries apart.
        self.serial = serial
        self.workers = node.workers
        self.gpus = node.gpus
        self.shape = (node.draining, node.cpu_count)
        # The agent's word that workers and GPU identities are unchanged (None: not reported).
        self.layout = (node.started_at_ms, node.layout_version) if node.layout_version else None
        self._free: dict[str, list[GpuInfo]] | None = None
        self.ids = frozenset(w.worker_id for w in node.workers)
        self.twice = len(self.ids) != len(node.workers)  # a worker id listed twice
        self.used_gpus = frozenset(u for w in node.workers for u in w.gpu_uuids)
        self.by_endpoint: dict[str, list[Live]] = {}
        # Parked workers: in the node's pool, not one of their endpoint's workers.
        self.parked: list[Live] = []
        for w in node.workers:
            if w.state == "parked":
                self.parked.append(Live(w.worker_id, node.node_id, w))
            elif w.state != "stopping":
                self.by_endpoint.setdefault(w.endpoint_id, []).append(Live(w.worker_id, node.node_id, w))
        self.parked_ids = frozenset(p.worker_id for p in self.parked)
        self.stopping_ids = frozenset(w.worker_id for w in node.workers if w.state == "stopping")
        # Every worker but a parked one takes a worker slot (a stopping one too).
        self.slots_taken = len(node.workers) - len(self.parked)

    def free_groups(self) -> dict[str, list[GpuInfo]]:
        if self._free is None:
            self._free = free_groups(self.gpus, self.used_gpus)
        return self._free


class NodeViews:
    """`NodeView`s by node id and what is built from them, carried from round to round."""

    def __init__(self) -> None:
        self._views: dict[str, NodeView] = {}
        self._serial = 0
        # Bumped whenever a view is made or dropped.
        self.generation = 0
        # Node ids whose view was made or dropped, in order (the chooser's heaps catch up from it).
        self.changes: list[str] = []
        # Chooser heaps of every node's own option (no starts in flight, no back-off) by
        # (shape, workers per CPU), each with the position in `changes` it is current to.
        self.heaps: dict[Any, tuple[list[tuple[Any, ...]], int]] = {}
        # Reported live workers: per endpoint per node, and per endpoint in node id order
        # (rebuilt for the endpoints in `_stale`).
        self._live_by_node: dict[str, dict[str, list[Live]]] = {}
        self._live: dict[str, list[Live]] = {}
        self._stale: set[str] = set()
        # Worker id -> the nodes that report it (one, but for a worker moving or listed twice).
        self._holders: dict[str, list[str]] = {}
        self._shared = 0  # worker ids reported by more than one node
        self._twice = 0  # views listing a worker id twice
        self.parked_nodes: set[str] = set()

    def __len__(self) -> int:
        return len(self._views)

    def __getitem__(self, node_id: str) -> NodeView:
        return self._views[node_id]

    def get(self, node_id: str) -> NodeView | None:
        return self._views.get(node_id)

    def values(self) -> list[NodeView]:
        return list(self._views.values())

    def of(self, node: NodeStatus) -> NodeView:
        view = self._views.get(node.node_id)
        if view is not None and view.node is node:  # not even a heartbeat since
            return view
        if view is not None and view.workers is node.workers and view.gpus is node.gpus and (
                view.shape == (node.draining, node.cpu_count)):
            view.node = node
            return view
        if view is not None and view.layout is not None and node.layout_version and (
                view.layout == (node.started_at_ms, node.layout_version)
                and view.shape == (node.draining, node.cpu_count)):
            view.node, view.workers, view.gpus = node, node.workers, node.gpus  # a heartbeat
            return view
        if view is None or view.workers != node.workers or view.gpus != node.gpus or (
                view.shape != (node.draining, node.cpu_count)):
            self._serial += 1
            new = NodeView(node, self._serial)
            if view is not None:
                self._forget(view)
            self._views[node.node_id] = new
            self._learn(new)
            self._changed(node.node_id)
            return new
        # The same content in a newer status: compare by identity from now on.
        view.node, view.workers, view.gpus = node, node.workers, node.gpus
        return view

    def sync(self, nodes: dict[str, NodeStatus]) -> None:
        """Views of exactly these nodes (the snapshot's alive nodes)."""
        for node in nodes.values():
            self.of(node)
        if len(self._views) != len(nodes):
            self.keep_only(set(nodes))

    def keep_only(self, node_ids: set[str]) -> None:
        for node_id in set(self._views) - node_ids:
            self._forget(self._views.pop(node_id))
            self._changed(node_id)

    def _changed(self, node_id: str) -> None:
        self.generation += 1
        self.changes.append(node_id)
        if len(self.changes) > 4 * len(self._views) + 1024:  # the heaps rebuild rather than replay it
            self.changes.clear()
            self.heaps.clear()

    def _learn(self, view: NodeView) -> None:
        node_id = view.node.node_id
        for endpoint_id, workers in view.by_endpoint.items():
            self._live_by_node.setdefault(endpoint_id, {})[node_id] = workers
            self._stale.add(endpoint_id)
        for worker_id in view.ids:
            holders = self._holders.setdefault(worker_id, [])
            holders.append(node_id)
            self._shared += len(holders) == 2
        self._twice += view.twice
        if view.parked:
            self.parked_nodes.add(node_id)

    def _forget(self, view: NodeView) -> None:
        node_id = view.node.node_id
        for endpoint_id in view.by_endpoint:
            by_node = self._live_by_node[endpoint_id]
            del by_node[node_id]
            if not by_node:
                del self._live_by_node[endpoint_id]
            self._stale.add(endpoint_id)
        for worker_id in view.ids:
            holders = self._holders[worker_id]
            holders.remove(node_id)
            self._shared -= len(holders) == 1
            if not holders:
                del self._holders[worker_id]
        self._twice -= view.twice
        self.parked_nodes.discard(node_id)

    def simple(self) -> bool:
        """Every worker id is listed once, on one node: the live workers can be read from
        `live()` and `seen()` (otherwise placement goes node by node)."""
        return not self._shared and not self._twice

    def live(self) -> dict[str, list[Live]]:
        """Per endpoint, the reported workers that count (not stopping, not parked), in node id
        order; the lists are shared: copy before changing one. Only when `simple()`."""
        for endpoint_id in self._stale:
            by_node = self._live_by_node.get(endpoint_id)
            if by_node is None:
                self._live.pop(endpoint_id, None)
            else:
                self._live[endpoint_id] = [w for node_id in sorted(by_node) for w in by_node[node_id]]
        self._stale.clear()
        return dict(self._live)

    def where(self, worker_id: str) -> NodeView | None:
        """The view of the node reporting this worker (one of them, if several do)."""
        holders = self._holders.get(worker_id)
        return None if holders is None else self._views[holders[0]]
