"""GPUs: reported in NodeStatus, handed to one worker each through CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import sys

from node_agent_harness import REPLY, connected, running_agent, worker_environ, worker_pid
from runplane_node_agent.inventory.host import StaticGpuInventory
from runplane_node_agent.inventory.nvml import GpuSnapshot
from runplane_proto import subjects as s
from runplane_proto.endpoints import EndpointSpec
from runplane_proto.nodes import GpuInfo, StartWorker
from runplane_testing.waiting import async_wait_until

GPUS = StaticGpuInventory(GpuSnapshot(
    gpus=(GpuInfo(index=0, uuid="GPU-aaaa", name="NVIDIA H100 80GB HBM3", memory_total_mb=81559),
          GpuInfo(index=1, uuid="GPU-bbbb", name="NVIDIA H100 80GB HBM3", memory_total_mb=81559)),
    driver_version="550.54.15", cuda_version="12.4"))


async def _value(value):
    return value


async def test_gpus_are_reported_and_assigned_once(nats_server):
    async with connected(nats_server.url) as bus, running_agent(nats_server.url, gpus=GPUS) as agent:
        node = agent.settings.node_id
        status = (await bus.nodes.get(s.node_key(node))).value
        assert [g.uuid for g in status.gpus] == ["GPU-aaaa", "GPU-bbbb"]
        assert "gpu" in status.capabilities and status.cuda_version == "12.4"
        spec = EndpointSpec(id="gpuep", name="gpuep", gpu_count=1,
                            command=[sys.executable, "-c", "import time; time.sleep(600)"])

        async def start(worker_id, uuids):
            return await bus.request(s.node_cmd(node), StartWorker(worker_id=worker_id, spec=spec,
                                                                   gpu_uuids=uuids), REPLY)
        assert (await start("g1", ["GPU-bbbb"])).ok
        unknown = await start("g2", ["GPU-zzzz"])
        assert not unknown.ok and "unknown GPU" in unknown.error
        taken = await start("g3", ["GPU-bbbb"])
        assert not taken.ok and "already assigned" in taken.error
        pid = await async_wait_until(lambda: _value(worker_pid("g1")), what="worker process")
        env = worker_environ(pid)
        assert env["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb" and env["RUNPOD_GPU_COUNT"] == "1"
        assert env["RUNPOD_WEBHOOK_GET_JOB"].endswith("?gpu=NVIDIA+H100+80GB+HBM3")

        async def reported():
            workers = (await bus.nodes.get(s.node_key(node))).value.workers
            return [w.gpu_uuids for w in workers] == [["GPU-bbbb"]]
        await async_wait_until(reported, what="worker with its GPU in node status")
