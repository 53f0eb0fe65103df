"""GPU placement across nodes on a machine without GPUs: each node agent loads a fake
libnvidia-ml.so.1 (built here with gcc) through the real nvidia-ml-py binding."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from runplane_bus import Bus, BusSettings
from runplane_testing.cluster import ROOT, Cluster, python_command
from runplane_testing.waiting import wait_until

from .conftest import FAST_ENV

pytestmark = pytest.mark.system
PROBE = python_command("tests/fixtures/workers/gpu_probe.py")


@pytest.fixture(scope="module")
def fake_nvml_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake-nvml")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out / "libnvidia-ml.so.1"),
                    str(ROOT / "tests/fixtures/fake_nvml/fake_nvml.c")], check=True)
    return out


def _node_gpus(cluster) -> dict[str, list]:
    async def read():
        bus = await Bus.connect(BusSettings(url=cluster.nats.url))
        try:
            return {node_id: node.gpus async for node_id, node in bus.nodes.items()}
        finally:
            await bus.close()

    return asyncio.run(read())


def test_gpu_workers_land_on_the_right_gpus_of_the_right_nodes(fake_nvml_dir):
    with Cluster(nodes=0, env=dict(FAST_ENV)) as cluster:
        lib = str(fake_nvml_dir)
        cluster.add_node("a100node", LD_LIBRARY_PATH=lib, FAKE_NVML_GPUS="4:NVIDIA A100-SXM4-80GB:81920",
                         FAKE_NVML_NODE="a100")
        cluster.add_node("h100node", LD_LIBRARY_PATH=lib, FAKE_NVML_GPUS="8:NVIDIA H100 80GB HBM3:81559",
                         FAKE_NVML_NODE="h100")
        cluster.add_node("l40snode", LD_LIBRARY_PATH=lib, FAKE_NVML_GPUS="2:NVIDIA L40S:46068",
                         FAKE_NVML_NODE="f405")
        gpus = wait_until(lambda: (lambda g: g if len(g) == 3 else None)(_node_gpus(cluster)), timeout_s=30,
                          what="the three nodes report their GPUs")
        assert [g.name for g in gpus["a100node"]] == ["NVIDIA A100-SXM4-80GB"] * 4
        assert len(gpus["h100node"]) == 8 and gpus["h100node"][0].memory_total_mb == 81559
        assert [g.name for g in gpus["l40snode"]] == ["NVIDIA L40S"] * 2

        h100 = cluster.create_endpoint(name="h100x2", command=PROBE, workersMin=2, workersMax=2, gpuCount=2,
                                       gpuTypeIds=["H100"])
        a100 = cluster.create_endpoint(name="a100x1", command=PROBE, workersMin=1, workersMax=1, gpuCount=1,
                                       gpuTypeIds=["A100", "H100"])
        # Two L40S workers of one GPU each: only one node has them, and only two.
        l40s = cluster.create_endpoint(name="l40sx1", command=PROBE, workersMin=2, workersMax=2, gpuCount=1,
                                       gpuTypeIds=["L40S"])
        cluster.wait_workers(h100, 2)
        cluster.wait_workers(a100, 1)
        cluster.wait_workers(l40s, 2)
        seen: dict[str, set[str]] = {}
        with cluster.client() as http:
            for ep in (h100, a100, l40s):
                for _ in range(6):
                    out = http.post(f"/v2/{ep}/runsync?wait=30000", json={"input": {}}).json()["output"]
                    seen.setdefault(ep, set()).add(out["cuda_visible_devices"])
        h100_sets = [s.split(",") for s in seen[h100]]
        assert all(len(s) == 2 and all("-h100-" in u for u in s) for s in h100_sets)
        assert all(len(s.split(",")) == 1 and "-a100-" in s for s in seen[a100])
        assert all(len(s.split(",")) == 1 and "-f405-" in s for s in seen[l40s])
        # never double-assigned: the workers' GPU sets are disjoint
        assigned = [u for s in h100_sets for u in s] + [s for s in seen[a100]] + [s for s in seen[l40s]]
        assert len(assigned) == len(set(assigned))
