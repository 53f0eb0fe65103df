"""deploy/node-agent/install.sh and uninstall.sh for real, in a fresh Debian container (the
debootstrap base of ./scripts/images plus systemd, booted with systemd as PID 1): the install
checks the machine (a CPU node: GPU parts are warnings), installs the agent offline from wheels
into its own venv, writes its settings and starts the unit; the agent joins a control plane on
this host (NATS with the users of deploy/nats) and reports its inventory in KV rp-nodes and runs
a job; systemd restarts it when killed; a second install changes nothing; uninstall leaves the
machine as it was."""

from __future__ import annotations

import asyncio
import hashlib
import io
import secrets
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from runplane_bus import Bus, BusSettings
from runplane_proto import subjects as s
from runplane_proto.nodes import NodeStatus
from runplane_testing.waiting import wait_until
from runplane_testing.natscluster import NATS_DIR, NatsNode, new_passwords
from tests.deploy.natsauth import ROOT, AuthCluster
from tests.docker.conftest import bridge_address, docker

pytestmark = pytest.mark.docker

BASE_IMAGE = "runplane/python-base:bookworm"
NODE_IMAGE = "runplane/systemd-node:local"
NODE_DOCKERFILE = f"""\
FROM {BASE_IMAGE}
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd systemd-sysv >/dev/null \\
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
"""
# What a booted system changes by itself; everything else must be as it was after uninstall.
VOLATILE = ("/proc", "/sys", "/run", "/tmp", "/dev", "/src", "/var/log", "/var/lib/systemd", "/var/tmp",
            "/var/cache/ldconfig")
INSTALLED = ("/opt/runplane", "/etc/runplane", "/etc/systemd/system")
HANDLER = ("import runplane_worker; "
           "runplane_worker.start({'handler': lambda job: {'echo': job['input'], 'node': 'installed'}})")


@pytest.fixture(scope="module")
def wheels():
    proc = subprocess.run([str(ROOT / "scripts" / "service-images"), "--wheels"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(Path(proc.stdout.strip().splitlines()[-1]).resolve())  # the folder, not its link


@pytest.fixture(scope="module")
def node_image():
    """A fresh Debian (the Docker tests' debootstrap base) with systemd: built here, no registry."""
    try:
        base_id = docker("image", "inspect", "-f", "{{.Id}}", BASE_IMAGE).strip()
    except AssertionError:
        pytest.fail(f"{BASE_IMAGE} is missing: run ./scripts/images")
    inputs = hashlib.sha256((base_id + NODE_DOCKERFILE).encode()).hexdigest()[:16]
    have = docker("image", "inspect", "-f", '{{ index .Config.Labels "runplane.inputs" }}', NODE_IMAGE, check=False)
    if have.strip() != inputs:
        proc = subprocess.run(["docker", "build", "-q", "--label", f"runplane.inputs={inputs}", "-t", NODE_IMAGE, "-"],
                              input=NODE_DOCKERFILE, text=True, capture_output=True, timeout=600,
                              env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        assert proc.returncode == 0, proc.stderr
    return NODE_IMAGE


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory, request):
    """NATS (users of deploy/nats) on the Docker bridge's address, with the gateway, scheduler and
    autoscaler on this host; no node agent."""
    bridge = bridge_address()
    workdir = tmp_path_factory.mktemp("install")
    passwords = new_passwords()
    server = NatsNode(workdir, config=NATS_DIR / "single.conf", passwords=passwords, host=bridge).start()
    cluster = AuthCluster([server], workdir, passwords)
    try:
        cluster.start(nodes=0)
        yield cluster, server
    finally:
        if request.session.testsfailed:
            print(cluster.logs())
        cluster.stop()
        server.stop()


def sh(container: str, script: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", "exec", container, "bash", "-c", script], capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{script}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc


def copy_in(container: str, files: dict[str, bytes], dirs: dict[str, str]) -> None:
    """Put files (path → content) and host folders (container path → host path) into the container."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
        for path, host in dirs.items():
            tar.add(host, arcname=path.lstrip("/"), filter=lambda t: None if "__pycache__" in t.name else t)
    subprocess.run(["docker", "cp", "-", f"{container}:/"], input=buf.getvalue(), check=True, timeout=120)


def snapshot(container: str, roots: tuple[str, ...] = ("/",), with_content: bool = False) -> dict[str, str]:
    """Every path under `roots` (minus the volatile ones), with its sha256 and mtime if asked."""
    prune = " -o ".join(f"-path {p}" for p in VOLATILE)
    detail = r"-printf '%p\t%y\t%T@\n'" if with_content else r"-printf '%p\t%y\n'"
    out = sh(container, f"find {' '.join(roots)} -xdev \\( {prune} \\) -prune -o {detail} 2>/dev/null").stdout
    found = {}
    for line in out.splitlines():
        path, rest = line.split("\t", 1)
        found[path] = rest
    if with_content:
        sums = sh(container, f"find {' '.join(roots)} -xdev -type f -exec sha256sum {{}} +").stdout
        for line in sums.splitlines():
            digest, path = line.split(maxsplit=1)
            found[path] += "\t" + digest
    return found


async def _node(url: str, password: str, node_id: str) -> NodeStatus | None:
    bus = await Bus.connect(BusSettings(url=url, user="admin", password=password, name="test-admin"))
    try:
        entry = await bus.nodes.get(s.node_key(node_id))
        return entry.value if entry else None
    finally:
        await bus.close()


def node_status(server: NatsNode, cluster: AuthCluster, node_id: str) -> NodeStatus | None:
    return asyncio.run(_node(server.url, cluster.passwords["admin"], node_id))


def unit(container: str, prop: str) -> str:
    return sh(container, f"systemctl show -p {prop} --value runplane-node-agent").stdout.strip()


def test_install_join_rerun_and_uninstall(node_image, wheels, control_plane, tmp_path):
    cluster, server = control_plane
    node_id = f"inst-{secrets.token_hex(3)}"
    container = f"rp-install-{secrets.token_hex(3)}"
    docker("run", "-d", "--name", container, "--hostname", node_id, "--tmpfs", "/run", "--tmpfs", "/run/lock",
           "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro", node_image)
    try:
        wait_until(lambda: sh(container, "systemctl is-system-running", check=False).stdout.strip()
                   in ("running", "degraded"), timeout_s=60, interval_s=0.5, what="systemd booted")
        before = snapshot(container)
        sources = {f"/src/runplane/{name}": str(ROOT / name) for name in
                   ("pyproject.toml", "constraints.txt", "proto", "libs", "services", "deploy/node-agent",
                    "deploy/lib")}
        copy_in(container, {"/src/nats-password": cluster.passwords["node-agent"].encode() + b"\n"},
                {**sources, "/src/wheels": wheels})
        install = ("/src/runplane/deploy/node-agent/install.sh --nats-url " + server.url
                   + f" --password-file /src/nats-password --node-id {node_id} --wheels /src/wheels")

        # -- install: the checks say what this CPU node lacks, and go on ---------------------------
        started = time.monotonic()
        out = sh(container, install).stdout
        print(out, f"install took {time.monotonic() - started:.1f} s")
        assert "ok       systemd" in out and "ok       Python 3.11" in out
        assert "warning  no Docker Engine answers: workers run as processes" in out
        assert "warning  NVIDIA driver: NVML (libnvidia-ml.so.1) not found" in out
        assert "warning  NVIDIA container toolkit not found" in out
        assert "service: runplane-node-agent enabled, active" in out and out.rstrip().endswith("installed")
        env = sh(container, "cat /etc/runplane/node-agent.env").stdout
        assert f"RP_NATS_URL={server.url}" in env and "RP_RUNTIME=process" in env
        assert "RP_NATS_PASSWORD_FILE=/etc/runplane/nats-password" in env
        modes = sh(container, "stat -c '%a %U' /etc/runplane/node-agent.env /etc/runplane/nats-password").stdout
        assert modes.split("\n")[:2] == ["600 root", "600 root"]

        # -- the agent joins: inventory in rp-nodes, and it runs a job ------------------------------
        status = wait_until(lambda: node_status(server, cluster, node_id), timeout_s=60, interval_s=0.5,
                            what="the installed agent in rp-nodes")
        assert status.hostname == node_id and status.runtime == "process"
        assert status.cpu_count >= 1 and status.memory_total_mb > 0 and status.gpus == []
        endpoint = cluster.create_endpoint(name="installed", workersMin=1,
                                           command=["/opt/runplane/venv/bin/python", "-c", HANDLER])
        with cluster.client() as http:
            job = http.post(f"/v2/{endpoint}/run", json={"input": {"x": 1}}).json()
        assert cluster.wait_job(endpoint, job["id"], timeout_s=90)["output"] == {"echo": {"x": 1}, "node": "installed"}

        # -- systemd restarts a killed agent ----------------------------------------------------------
        pid, restarts = unit(container, "MainPID"), int(unit(container, "NRestarts"))
        sh(container, f"kill -9 {pid}")
        wait_until(lambda: int(unit(container, "NRestarts")) == restarts + 1 and unit(container, "MainPID") not in
                   ("0", pid) and unit(container, "ActiveState") == "active", timeout_s=30, what="restarted")
        beat = status.heartbeat_at_ms
        wait_until(lambda: (node_status(server, cluster, node_id) or status).heartbeat_at_ms > beat + 2000,
                   timeout_s=60, interval_s=0.5, what="heartbeats from the restarted agent")

        # -- a second install is a no-op ------------------------------------------------------------
        installed = snapshot(container, INSTALLED, with_content=True)
        pid = unit(container, "MainPID")
        again = sh(container, install).stdout
        assert "venv: /opt/runplane/venv is up to date" in again and again.rstrip().endswith("nothing to change")
        assert "wrote" not in again
        assert snapshot(container, INSTALLED, with_content=True) == installed
        assert unit(container, "MainPID") == pid

        # -- uninstall: nothing left behind -----------------------------------------------------------
        out = sh(container, "/src/runplane/deploy/node-agent/uninstall.sh").stdout
        assert "stopped and disabled runplane-node-agent" in out
        assert sh(container, "systemctl cat runplane-node-agent", check=False).returncode != 0
        # (the bracket keeps this command's own command line from matching)
        agents = sh(container, "grep -l 'runplane-node-agen[t]' /proc/[0-9]*/cmdline", check=False).stdout
        assert agents.split() == [], agents
        after = snapshot(container)
        assert sorted(set(after) - set(before)) == [] and sorted(set(before) - set(after)) == []
        assert sh(container, "/src/runplane/deploy/node-agent/uninstall.sh").returncode == 0  # again: fine
        wait_until(lambda: node_status(server, cluster, node_id) is None, timeout_s=30,
                   what="the node gone from rp-nodes after a clean stop")
    except BaseException:
        print(sh(container, "journalctl -u runplane-node-agent --no-pager | tail -40", check=False).stdout,
              file=sys.stderr)
        raise
    finally:
        docker("rm", "-f", container, check=False)
