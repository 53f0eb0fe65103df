"""A simulated fleet: many node agents in one process, speaking the real bus protocol.

    python -m bench.fleet --nats URL --nodes 1000 --events starts.jsonl

Each simulated node writes its `NodeStatus` to KV `rp-nodes` every heartbeat (spread
over the interval, like independent hosts), answers `StartWorker`/`StopWorker` on its
own `rp.node.<node>.cmd` subject with a `CommandReply`, and reports a started worker as
idle in its next status (written within `--flush-ms`). No processes are started: the
fleet exists to load the real scheduler and autoscaler the way a large cluster would.
Every start is appended to `--events` as a JSON line (node, endpoint, worker, time).
Even-numbered nodes have 8x "NVIDIA H100 80GB HBM3", odd ones 8x "NVIDIA A100-SXM4-80GB".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

from runplane_bus import Bus, BusSettings
from runplane_proto import subjects
from runplane_proto.codec import Codec, encode
from runplane_proto.nodes import CommandReply, GpuInfo, NodeCommand, NodeStatus, StartWorker, WorkerInfo

GPU_NAMES = ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB")
COMMANDS = Codec(NodeCommand)
OK = encode(CommandReply(ok=True))


def now_ms() -> int:
    return int(time.time() * 1000)


def node_name(index: int) -> str:
    return f"sim{index:05d}"


OFFSET = 0  # --offset: a second fleet's nodes get other names


class SimNode:
    def __init__(self, index: int, started_ms: int) -> None:
        self.node_id = node_name(OFFSET + index)
        name = GPU_NAMES[index % 2]
        self.gpus = [GpuInfo(index=i, uuid=f"GPU-5e3d{index:05d}-{i:04d}", name=name, memory_total_mb=81559)
                     for i in range(8)]
        self.workers: dict[str, WorkerInfo] = {}
        self.started_ms = started_ms
        self.layout_version = 1  # bumped on every change of `workers`, as a real agent does

    def status(self) -> NodeStatus:
        return NodeStatus(
            node_id=self.node_id, hostname=self.node_id, runtime="sim", capabilities=["gpu"], cpu_count=32,
            memory_total_mb=512_000, gpus=self.gpus, driver_version="560.35.03", cuda_version="12.6",
            workers=list(self.workers.values()), started_at_ms=self.started_ms, heartbeat_at_ms=now_ms(),
            layout_version=self.layout_version)


class Fleet:
    def __init__(self, bus: Bus, count: int, heartbeat_s: float, flush_ms: int, events_path: str) -> None:
        self.bus = bus
        started = now_ms()
        self.nodes = [SimNode(i, started) for i in range(count)]
        self.heartbeat_s = heartbeat_s
        self.flush_s = flush_ms / 1000
        self.dirty: set[int] = set()
        self.events = open(events_path, "a", buffering=1)  # noqa: SIM115 (closed at exit)
        self.commands = 0
        self.write_errors = 0

    async def start(self) -> None:
        for i, node in enumerate(self.nodes):
            await self.bus.nc.subscribe(subjects.node_cmd(node.node_id), cb=self._handler(i))
        await self._write(range(len(self.nodes)))

    def _handler(self, index: int):
        async def on_command(msg) -> None:
            await self._on_command(index, msg)

        return on_command

    async def _on_command(self, index: int, msg) -> None:
        node = self.nodes[index]
        self.commands += 1
        command = COMMANDS.decode(msg.data)
        t = now_ms()
        if isinstance(command, StartWorker):
            node.workers.setdefault(command.worker_id, WorkerInfo(
                worker_id=command.worker_id, endpoint_id=command.spec.id, state="idle", started_at_ms=t,
                idle_since_ms=t, gpu_uuids=command.gpu_uuids))
            self.events.write(json.dumps({"t_ms": t, "node": node.node_id, "endpoint": command.spec.id,
                                          "worker": command.worker_id, "kind": "start"}) + "\n")
        else:
            gone = node.workers.pop(command.worker_id, None)
            if gone is not None:
                self.events.write(json.dumps({"t_ms": t, "node": node.node_id, "endpoint": gone.endpoint_id,
                                              "worker": command.worker_id, "kind": "stop"}) + "\n")
        node.layout_version += 1
        self.dirty.add(index)
        await msg.respond(OK)

    async def _write(self, indexes) -> None:
        nodes = [self.nodes[i] for i in indexes]
        results = await asyncio.gather(*(
            self.bus.nodes.put(subjects.node_key(node.node_id), node.status()) for node in nodes
        ), return_exceptions=True)
        self.write_errors += sum(1 for r in results if isinstance(r, BaseException))

    async def heartbeats(self) -> None:
        """Every node once per interval, in small groups spread over it."""
        groups = 50
        size = max(1, -(-len(self.nodes) // groups))
        while True:
            for g in range(groups):
                started = time.monotonic()
                await self._write(range(g * size, min(len(self.nodes), (g + 1) * size)))
                await asyncio.sleep(max(0.0, self.heartbeat_s / groups - (time.monotonic() - started)))

    async def flushes(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            if self.dirty:
                batch, self.dirty = self.dirty, set()
                await self._write(sorted(batch))


async def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("--nats", required=True)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--heartbeat-s", type=float, default=1.0)
    parser.add_argument("--flush-ms", type=int, default=20)
    parser.add_argument("--events", required=True)
    parser.add_argument("--offset", type=int, default=0, help="number the nodes from here")
    args = parser.parse_args()
    global OFFSET
    OFFSET = args.offset
    bus = await Bus.connect(BusSettings(url=args.nats, name="sim-fleet"))
    fleet = Fleet(bus, args.nodes, args.heartbeat_s, args.flush_ms, args.events)
    await fleet.start()
    fleet.events.write(json.dumps({"t_ms": now_ms(), "kind": "ready", "nodes": args.nodes,
                                   "offset": args.offset}) + "\n")
    tasks = [asyncio.create_task(fleet.heartbeats()), asyncio.create_task(fleet.flushes())]
    print(f"fleet ready: {args.nodes} nodes", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()
    print(f"fleet done: {fleet.commands} commands, {fleet.write_errors} failed status writes", flush=True)
    await bus.close()
    return 0


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(main()))
