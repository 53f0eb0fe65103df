"""The Docker runtime's rules that need no engine: settings, container config, NATS addresses."""

from __future__ import annotations

import pytest

from runplane_node_agent.runtimes.base import Launch
from runplane_node_agent.runtimes.docker import DockerRuntime, node_hash
from runplane_node_agent.runtimes.netguard import _nats_addresses
from runplane_node_agent.settings import AgentSettings, check
from runplane_service.env import SettingsError


def test_runtime_settings_are_checked():
    check(AgentSettings(node_id="n", runtime="docker"))
    check(AgentSettings(node_id="n", runtime="process", port=0))
    with pytest.raises(SettingsError, match="RP_RUNTIME"):
        check(AgentSettings(node_id="n", runtime="podman"))
    with pytest.raises(SettingsError, match="fixed RP_AGENT_PORT"):
        check(AgentSettings(node_id="n", runtime="docker", port=0))
    check(AgentSettings(node_id="n", runtime="docker", port=0, url="http://agent:8100"))
    with pytest.raises(SettingsError):
        check(AgentSettings(node_id="n", worker_memory_mb=-1))


def test_worker_url_uses_the_runtime_host_unless_overridden():
    assert AgentSettings(node_id="n").worker_base_url(81, "172.18.0.1") == "http://172.18.0.1:81"
    assert AgentSettings(node_id="n", url="http://a:1/").worker_base_url(81, "172.18.0.1") == "http://a:1"


def test_container_config():
    runtime = DockerRuntime(AgentSettings(node_id="node-1", worker_memory_mb=512, worker_cpus=2))
    launch = Launch(worker_id="w1", endpoint_id="ep1", argv=("python", "h.py"), env={"A": "1"},
                    gpu_uuids=("GPU-a", "GPU-b"), image="img:1", labels={"extra": "x"})
    config = runtime._config(launch)
    host = config["HostConfig"]
    assert config["Image"] == "img:1" and config["Cmd"] == ["python", "h.py"] and config["Env"] == ["A=1"]
    assert config["Labels"] == {"extra": "x", "runplane.worker_id": "w1", "runplane.endpoint_id": "ep1",
                                "runplane.node_id": "node-1", "runplane.gpu_uuids": "GPU-a,GPU-b"}
    assert host["Memory"] == host["MemorySwap"] == 512 * 2**20 and host["NanoCpus"] == 2_000_000_000
    assert host["SecurityOpt"] == ["no-new-privileges"] and host["NetworkMode"] == "runplane-node-1"
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "DeviceIDs": ["GPU-a", "GPU-b"],
                                       "Capabilities": [["gpu"]]}]
    plain = DockerRuntime(AgentSettings(node_id="node-1"))._config(
        Launch(worker_id="w1", endpoint_id="ep1", argv=(), env={}, image="img"))
    assert "Cmd" not in plain and "Memory" not in plain["HostConfig"]
    assert "DeviceRequests" not in plain["HostConfig"]


def test_node_hash_fits_interface_and_chain_names():
    name = node_hash("x" * 128)
    assert len("rp-" + name) <= 15 and len("RP-" + name + "-N") <= 28 and name == node_hash("x" * 128)


async def test_nats_addresses_skip_loopback():
    found = await _nats_addresses(("nats://127.0.0.1:4222", "nats://10.1.2.3:4333", "10.1.2.4", "nats://:1"))
    assert found == [("10.1.2.3", 4333), ("10.1.2.4", 4222)]
