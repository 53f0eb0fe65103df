"""On a real GPU host (run with ./scripts/test-gpu where one is lent): NVML inventory through
the real nvidia-ml-py binding, reported by the node agent, and a GPU endpoint placed on it with
its GPU handed to the worker."""

from __future__ import annotations

import asyncio

from runplane_bus import Bus, BusSettings
from runplane_node_agent.inventory.nvml import NvmlInventory
from runplane_testing.cluster import Cluster, python_command
from runplane_testing.waiting import wait_until


def test_nvml_inventory_reads_the_real_gpus():
    inventory = NvmlInventory()
    assert inventory.available
    snapshot = inventory.read()
    inventory.close()
    print("inventory:", snapshot)
    assert snapshot.gpus, "NVML reported no GPUs"
    for gpu in snapshot.gpus:
        assert "NVIDIA" in gpu.name and gpu.uuid.startswith("GPU-") and gpu.memory_total_mb > 1000
    assert snapshot.driver_version and snapshot.cuda_version


def test_gpu_endpoint_gets_its_gpu(tmp_path):
    with Cluster(nodes=1, env={"RP_LOG_LEVEL": "INFO"}) as cluster:
        async def reported_gpus():
            bus = await Bus.connect(BusSettings(url=cluster.nats.url))
            try:
                return [gpu async for _, node in bus.nodes.items() for gpu in node.gpus]
            finally:
                await bus.close()

        gpus = wait_until(lambda: asyncio.run(reported_gpus()), timeout_s=60, what="node reports GPUs")
        print("node status gpus:", gpus)
        assert all(g.uuid.startswith("GPU-") for g in gpus)
        with cluster.client() as http:
            ep = cluster.create_endpoint(name="gpu", command=python_command("tests/fixtures/workers/gpu_probe.py"),
                                         workersMin=1, workersMax=1, gpuCount=1, gpuTypeIds=["H100", "H200"])
            try:
                cluster.wait_workers(ep, 1, timeout_s=120)
            except TimeoutError:
                print(cluster.logs())
                raise
            result = http.post(f"/v2/{ep}/runsync?wait=120000", json={"input": {}}).json()
            print("gpu job:", result)
            assert result["status"] == "COMPLETED", result
            out = result["output"]
            assert out["cuda_visible_devices"].startswith("GPU-")
            if out.get("torch_device_count") is not None:
                assert out["torch_device_count"] == 1
                assert "H" in out["torch_device_name"]
                assert out["torch_sum"] == 1024.0 ** 3
