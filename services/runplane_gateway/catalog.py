"""The endpoint specs, followed from KV `rp-endpoints` with one watch, so that a request
needs no KV read to find its endpoint. A miss is checked against KV once (a spec
written by another replica a moment ago)."""

from __future__ import annotations

import asyncio

import structlog

from runplane_bus import Bus
from runplane_bus.records import undecodable
from runplane_proto import subjects
from runplane_proto.codec import DecodeError
from runplane_proto.endpoints import EndpointSpec

log = structlog.get_logger("runplane.gateway.catalog")

# The watch is started afresh this often, so a watch that went quiet (say, across a
# NATS restart) cannot leave a stale spec behind for long.
RESYNC_S = 60.0


class EndpointCatalog:
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._specs: dict[str, EndpointSpec] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load every spec, then keep following changes in the background."""
        loaded = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(self._follow(loaded))
        await loaded

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def get(self, endpoint_id: str) -> EndpointSpec | None:
        spec = self._specs.get(endpoint_id)
        if spec is not None:
            return spec
        found = await self.bus.endpoints.get(subjects.endpoint_key(endpoint_id))
        if found is None:
            return None
        self._specs[endpoint_id] = found.value
        return found.value

    def remember(self, spec: EndpointSpec) -> None:
        self._specs[spec.id] = spec

    def forget(self, endpoint_id: str) -> None:
        self._specs.pop(endpoint_id, None)

    async def _follow(self, loaded: asyncio.Future[None]) -> None:
        while True:
            try:
                await asyncio.wait_for(self._watch(loaded), timeout=RESYNC_S)
            except asyncio.CancelledError:
                raise
            except asyncio.TimeoutError:
                continue
            except Exception as exc:
                log.warning("endpoint watch failed; restarting", error=repr(exc))
            await asyncio.sleep(0.5)

    async def _watch(self, loaded: asyncio.Future[None]) -> None:
        watcher = await self.bus.endpoints.kv.watch(">")
        seen: dict[str, EndpointSpec] = {}
        initial = True
        try:
            async for entry in watcher:
                if entry is not None:
                    target = seen if initial else self._specs
                    if entry.value is None or entry.operation in ("DEL", "PURGE"):
                        target.pop(entry.key, None)
                    else:
                        try:
                            target[entry.key] = self.bus.endpoints.codec.decode(entry.value)
                        except DecodeError as exc:  # garbage: keep the last good spec, if any
                            undecodable(subjects.KV_ENDPOINTS, entry.key, exc)
                if initial and (entry is None or entry.delta == 0):
                    # The initial values are in: swap them in at once.
                    initial = False
                    self._specs = seen
                    if not loaded.done():
                        loaded.set_result(None)
        finally:
            await watcher.stop()
