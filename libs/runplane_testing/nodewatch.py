"""Follow what the node agents report (KV `rp-nodes`) from a synchronous system test.

A background thread keeps a live mirror of the bucket (a real watch) and, on every
change, records each endpoint's worker count, so a test can assert a bound that held at
every reported moment (`peak`), not only at the moments it happened to look. Parked workers
(flash boot: paused in a node's pool) are not their endpoint's workers and are not counted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable

from runplane_bus import Bus, BusSettings
from runplane_bus.mirror import Mirror
from runplane_proto.nodes import NodeStatus, WorkerInfo


class NodeWatch:
    """`with NodeWatch(nats_url) as watch: watch.count(ep), watch.peak(ep), watch.history(ep)`."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self._lock = threading.Lock()
        self._peaks: dict[str, int] = {}
        self._ids: dict[str, set[str]] = {}
        self._history: dict[str, list[tuple[float, int]]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="node-watch", daemon=True)
        self._bus: Bus | None = None
        self._mirror: Mirror[NodeStatus] | None = None

    def __enter__(self) -> NodeWatch:
        self._thread.start()
        try:
            self._call(self._open())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._call(self._close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(60)

    async def _open(self) -> None:
        self._bus = await Bus.connect(BusSettings(url=self.nats_url, name="node-watch"))
        self._mirror = Mirror(self._bus.nodes, resync_s=2.0, on_change=self._changed)
        await self._mirror.start()
        self._changed("")

    async def _close(self) -> None:
        if self._mirror is not None:
            await self._mirror.stop()
        if self._bus is not None:
            await self._bus.close()

    def _changed(self, _key: str, *_values: object) -> None:
        """Runs on the watch thread after every applied change: record every endpoint's count."""
        assert self._mirror is not None
        counts: dict[str, int] = {}
        ids: dict[str, set[str]] = {}
        for status in self._mirror.values():
            for worker in status.workers:
                ids.setdefault(worker.endpoint_id, set()).add(worker.worker_id)
                if worker.state != "parked":
                    counts[worker.endpoint_id] = counts.get(worker.endpoint_id, 0) + 1
        now = time.monotonic()
        with self._lock:
            for endpoint_id, seen in ids.items():
                self._ids.setdefault(endpoint_id, set()).update(seen)
            for endpoint_id in set(counts) | set(self._history):
                n = counts.get(endpoint_id, 0)
                self._peaks[endpoint_id] = max(self._peaks.get(endpoint_id, 0), n)
                history = self._history.setdefault(endpoint_id, [])
                if not history or history[-1][1] != n:
                    history.append((now, n))

    # -- reading ------------------------------------------------------------------------------

    def nodes(self) -> dict[str, NodeStatus]:
        """The status each node reported last (read on the watch thread, so never torn)."""
        return self._call(self._snapshot())

    async def _snapshot(self) -> dict[str, NodeStatus]:
        assert self._mirror is not None
        return dict(self._mirror.items())

    def workers(self, endpoint_id: str, *, on: Iterable[str] | None = None,
                parked: bool = False) -> list[tuple[str, WorkerInfo]]:
        """(node id, worker) for every worker of the endpoint, optionally only on nodes `on`;
        its parked workers too with `parked`."""
        keep = None if on is None else set(on)
        return [(node_id, w) for node_id, status in self.nodes().items() if keep is None or node_id in keep
                for w in status.workers if w.endpoint_id == endpoint_id and (parked or w.state != "parked")]

    def count(self, endpoint_id: str) -> int:
        return len(self.workers(endpoint_id))

    def peak(self, endpoint_id: str) -> int:
        """The most workers the endpoint had at any reported moment (every state but parked counted)."""
        with self._lock:
            return self._peaks.get(endpoint_id, 0)

    def ids_seen(self, endpoint_id: str) -> set[str]:
        """Every worker id the endpoint had at any reported moment, parked ones included."""
        with self._lock:
            return set(self._ids.get(endpoint_id, ()))

    def history(self, endpoint_id: str) -> list[tuple[float, int]]:
        """(time.monotonic(), worker count) at each change of the endpoint's count."""
        with self._lock:
            return list(self._history.get(endpoint_id, []))
