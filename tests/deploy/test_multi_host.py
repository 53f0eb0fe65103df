"""Multi-host install without Kubernetes, for real: five Debian containers booted with systemd on
a Docker network of their own act as plain hosts. Three run deploy/control-plane/install.sh
(nats-server as one of a 3-node JetStream cluster, gateway, scheduler, autoscaler, all systemd
units), two run deploy/node-agent/install.sh pointed at all three NATS servers (process
runtime). Through a gateway an endpoint is made and a job runs; then the host whose scheduler
leads (from KV rp-leases) is killed like a lost machine, and through another host's gateway a
job on the old endpoint completes, a new endpoint made once the standbys hold the leases scales
from zero within seconds (scheduler and autoscaler failed over and act on a current view), and every stream and bucket still has a leader on a surviving host with 3
replicas configured; the host comes back, its NATS catches up and its gateway serves again.

The host image is the systemd image of test_node_agent_install with Runplane's Python
dependencies already in /opt/runplane/venv (a golden image; the offline venv from scratch is
tested there); each installer here installs Runplane itself from a wheel built from this
checkout and writes and starts its units."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nats
import pytest

from runplane_bus import Bus, BusSettings
from runplane_proto import subjects as s
from runplane_proto.codec import Codec
from runplane_proto.leases import Lease
from runplane_testing.waiting import wait_until
from tests.deploy.natsauth import ROOT
from tests.deploy.test_node_agent_install import copy_in, node_image, sh, wheels  # noqa: F401 (fixtures)
from tests.docker.conftest import docker

pytestmark = pytest.mark.docker

HOST_IMAGE = "runplane/systemd-host:local"
CONTROL = ("cp1", "cp2", "cp3")
WORKERS = ("w1", "w2")
UNITS = ("runplane-nats", "runplane-gateway", "runplane-scheduler", "runplane-autoscaler")
HANDLER = ("import socket, runplane_worker; runplane_worker.start({'handler': lambda job: "
           "{'echo': job['input'], 'host': socket.gethostname()}})")
COMMAND = ["/opt/runplane/venv/bin/python", "-c", HANDLER]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
SECRETS = "/root/runplane-secrets"


@pytest.fixture(scope="module")
def host_image(node_image, wheels):  # noqa: F811 (fixtures)
    """The systemd host image with Runplane's dependencies (from the offline wheels) in
    /opt/runplane/venv; rebuilt only when the wheels or the base change."""
    deps = sorted(p for p in Path(wheels).glob("*.whl") if not p.name.startswith("setuptools-"))
    base_id = docker("image", "inspect", "-f", "{{.Id}}", node_image).strip()
    dockerfile = (f"FROM {node_image}\nCOPY wheels /tmp/wheels\n"
                  "RUN python3 -m venv /opt/runplane/venv \\\n"
                  " && /opt/runplane/venv/bin/pip install -q --no-cache-dir --disable-pip-version-check --no-index"
                  " /tmp/wheels/*.whl \\\n && rm -rf /tmp/wheels\n")
    inputs = hashlib.sha256("\n".join([base_id, dockerfile, *(p.name for p in deps)]).encode()).hexdigest()[:16]
    have = docker("image", "inspect", "-f", '{{ index .Config.Labels "runplane.inputs" }}', HOST_IMAGE, check=False)
    if have.strip() != inputs:
        context = Path(ROOT / "build" / "images" / f"systemd-host-{inputs}")
        shutil.rmtree(context, ignore_errors=True)
        (context / "wheels").mkdir(parents=True)
        for wheel in deps:
            shutil.copy(wheel, context / "wheels")
        (context / "Dockerfile").write_text(dockerfile)
        started = time.monotonic()
        proc = subprocess.run(["docker", "build", "-q", "--label", f"runplane.inputs={inputs}", "-t", HOST_IMAGE,
                               str(context)], text=True, capture_output=True, timeout=600,
                              env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        shutil.rmtree(context, ignore_errors=True)
        assert proc.returncode == 0, proc.stderr
        print(f"built {HOST_IMAGE} (the dependencies' venv) in {time.monotonic() - started:.1f} s")
    return HOST_IMAGE


@pytest.fixture(scope="module")
def runplane_wheel(tmp_path_factory, wheels) -> Path:  # noqa: F811 (fixture)
    """A wheel of this checkout (built from a copy, so the checkout gets no build folders)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, src)
    for name in ("proto", "libs", "services"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = work / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--find-links",
                           wheels, "--disable-pip-version-check", "-w", str(out), str(src)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(src)
    return out


class Hosts:
    def __init__(self, prefix: str, network: str) -> None:
        self.prefix, self.network = prefix, network
        self.ip: dict[str, str] = {}

    def container(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def sh(self, host: str, script: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return sh(self.container(host), script, check=check, timeout=timeout)

    def boot(self, host: str, image: str) -> None:
        docker("run", "-d", "--name", self.container(host), "--hostname", host, "--network", self.network,
               "--tmpfs", "/run", "--tmpfs", "/run/lock", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro", image)

    def wait_booted(self, host: str) -> None:
        wait_until(lambda: self.sh(host, "systemctl is-system-running", check=False).stdout.strip()
                   in ("running", "degraded"), timeout_s=90, interval_s=0.5, what=f"systemd booted on {host}")

    def address(self, host: str) -> str:
        return docker("inspect", "-f", f"{{{{(index .NetworkSettings.Networks \"{self.network}\").IPAddress}}}}",
                      self.container(host)).strip()

    def journal(self, host: str, lines: int = 40) -> str:
        return self.sh(host, f"journalctl -u 'runplane-*' --no-pager -o cat | tail -n {lines}", check=False).stdout


@pytest.fixture
def hosts(host_image):
    prefix = f"rp-mh-{hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:6]}"
    network = prefix
    docker("network", "create", network)
    found = Hosts(prefix, network)
    try:
        for host in (*CONTROL, *WORKERS):
            found.boot(host, host_image)
        for host in (*CONTROL, *WORKERS):
            found.wait_booted(host)
            found.ip[host] = found.address(host)
        yield found
    finally:
        for host in (*CONTROL, *WORKERS):
            docker("rm", "-f", found.container(host), check=False)
        docker("network", "rm", network, check=False)


# -- what the test reads through NATS (as the operator's admin user) ------------------------------

def admin_settings(urls: str, password: str) -> BusSettings:
    return BusSettings(url=urls, user="admin", password=password, name="test-admin", replicas=3)


async def _streams(urls: str, password: str) -> dict[str, dict]:
    nc = await nats.connect(servers=urls.split(","), user="admin", password=password, connect_timeout=3,
                            max_reconnect_attempts=2)
    try:
        found = {}
        for info in await nc.jetstream(timeout=5).streams_info():
            cluster = info.cluster
            found[info.config.name] = {
                "replicas": info.config.num_replicas,
                "leader": cluster.leader if cluster else None,
                "peers": {p.name: bool(p.current and not p.offline) for p in (cluster.replicas or [])}
                if cluster else {},
            }
        return found
    finally:
        await nc.close()


async def _leases(urls: str, password: str) -> dict[str, Lease]:
    """The live leases, read directly (a Bus would first make sure of every stream: slow while
    they elect leaders, which would delay seeing a takeover)."""
    nc = await nats.connect(servers=urls.split(","), user="admin", password=password, connect_timeout=3,
                            max_reconnect_attempts=2)
    try:
        kv = await nc.jetstream(timeout=2).key_value(s.KV_LEASES)
        found = {}
        for role in ("scheduler", "autoscaler"):
            try:
                entry = await kv.get(s.lease_key(role))
            except nats.js.errors.KeyNotFoundError:
                continue
            lease = Codec(Lease).decode(entry.value or b"")
            if lease.expires_at_ms > time.time() * 1000:
                found[role] = lease
        return found
    finally:
        await nc.close()


async def _nodes(urls: str, password: str) -> set[str]:
    bus = await Bus.connect(admin_settings(urls, password))
    try:
        return {node for node in WORKERS if await bus.nodes.get(s.node_key(node))}
    finally:
        await bus.close()


def healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def create_endpoint(http: httpx.Client, base: str, name: str) -> str:
    """POST /v1/endpoints, again while it answers 503 (NATS still electing a stream leader)."""
    def created() -> str | None:
        resp = http.post(f"{base}/v1/endpoints",
                         json={"name": name, "workersMin": 0, "workersMax": 2, "command": COMMAND})
        if resp.status_code == 503:
            print(f"create {name}: {resp.status_code} {resp.text}")
            return None
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    return wait_until(created, timeout_s=30, interval_s=0.5, what=f"endpoint {name} created")


def loops_running(hosts: Hosts, host: str) -> bool:
    """The host's scheduler and autoscaler are past their start (topology made, loop running):
    standbys that can take a lease over, not processes still waiting for JetStream."""
    out = hosts.sh(host, "journalctl -u runplane-scheduler -u runplane-autoscaler --no-pager -o cat "
                         "| grep -c -E '\"event\": \"(scheduler|autoscaler) running\"'", check=False).stdout
    return out.strip().isdigit() and int(out) >= 2


def holder_host(holder: str) -> str:
    """`scheduler-cp2-1234-ab12cd` → cp2 (holders are role-hostname-pid-random)."""
    return holder.split("-")[1]


def streams_ready(urls: str, password: str, up: tuple[str, ...]) -> dict | None:
    """Every stream and bucket with 3 replicas, a leader among `up`, and `up` all current."""
    try:
        streams = asyncio.run(_streams(urls, password))
    except Exception:
        return None
    expected = {s.STREAM_JOBS, s.STREAM_CHUNKS, s.STREAM_WEBHOOKS, f"KV_{s.KV_JOBS}", f"KV_{s.KV_ENDPOINTS}",
                f"KV_{s.KV_NODES}", f"KV_{s.KV_LEASES}", f"OBJ_{s.OBJ_PAYLOADS}"}
    if not expected <= set(streams):
        return None
    for info in streams.values():
        current = {info["leader"]} | {name for name, ok in info["peers"].items() if ok}
        if info["replicas"] != 3 or info["leader"] not in up or not set(up) <= current:
            return None
    return streams


# -- the test ----------------------------------------------------------------------------------------

def test_three_control_plane_hosts_lose_one(hosts, runplane_wheel, tmp_path):
    secrets_dir = tmp_path / "secrets"
    made = subprocess.run(["bash", str(ROOT / "deploy/control-plane/install.sh"), "--make-secrets", str(secrets_dir)],
                          capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    password = {p.stem: p.read_text().strip() for p in secrets_dir.glob("*.password")}
    api_key = (secrets_dir / "api-key").read_text().strip()
    peers = ",".join(hosts.ip[h] for h in CONTROL)
    nats_urls = ",".join(f"nats://{hosts.ip[h]}:4222" for h in CONTROL)
    gateway = {h: f"http://{hosts.ip[h]}:8000" for h in CONTROL}
    auth = {"Authorization": f"Bearer {api_key}"}
    wheel = next(runplane_wheel.glob("runplane-*.whl"))

    sources = {f"/src/runplane/{name}": str(ROOT / name) for name in
               ("pyproject.toml", "constraints.txt", "deploy/control-plane", "deploy/node-agent", "deploy/lib",
                "deploy/nats")}
    files = {f"{SECRETS}/{p.name}": p.read_bytes() for p in secrets_dir.iterdir()}
    files[f"/src/wheels/{wheel.name}"] = wheel.read_bytes()
    for host in (*CONTROL, *WORKERS):
        copy_in(hosts.container(host), files, sources)

    install_cp = f"/src/runplane/deploy/control-plane/install.sh --peers {peers} --secrets {SECRETS} --wheels /src/wheels"
    install_node = (f"/src/runplane/deploy/node-agent/install.sh --nats-url {nats_urls} --runtime process "
                    f"--password-file {SECRETS}/node-agent.password --wheels /src/wheels --env RP_NATS_REPLICAS=3")

    def install(host: str) -> tuple[str, float, str]:
        started = time.monotonic()
        out = hosts.sh(host, install_cp if host in CONTROL else install_node).stdout
        return host, time.monotonic() - started, out

    failed = False
    try:
        # -- install all five hosts at once ----------------------------------------------------------
        started = time.monotonic()
        with ThreadPoolExecutor(5) as pool:
            results = list(pool.map(install, (*CONTROL, *WORKERS)))
        for host, took, out in results:
            print(f"install on {host}: {took:.1f} s")
            assert out.rstrip().endswith("installed"), out
        out = dict((h, o) for h, _, o in results)
        for host in CONTROL:
            for unit in UNITS:
                assert f"service: {unit} enabled, active" in out[host], out[host]
            env = hosts.sh(host, "cat /etc/runplane/gateway.env; stat -c '%a %U' /etc/runplane/*.env").stdout
            assert f"RP_NATS_URL=nats://{hosts.ip[host]}:4222," in env and "RP_NATS_REPLICAS=3" in env
            assert env.count("600 root") == 4, env  # nats, gateway, scheduler, autoscaler
            conf = hosts.sh(host, "cat /etc/runplane/nats/nats.conf").stdout
            assert password["route"] not in conf and f"server_name: {host}" in conf
            assert hosts.sh(host, "stat -c %U /proc/$(systemctl show -p MainPID --value runplane-nats)").stdout.strip() \
                == "runplane"

        # -- the cluster forms: 3 replicas of everything, the agents join, a job runs ---------------
        wait_until(lambda: streams_ready(nats_urls, password["admin"], CONTROL), timeout_s=90, interval_s=1,
                   what="streams and buckets with 3 current replicas")
        wait_until(lambda: asyncio.run(_nodes(nats_urls, password["admin"])) == set(WORKERS), timeout_s=60,
                   interval_s=1, what="both worker hosts in rp-nodes")
        wait_until(lambda: all(healthy(gateway[h]) for h in CONTROL), timeout_s=60, interval_s=0.5,
                   what="the three gateways answering")
        print(f"cluster up (5 installs, 3 replicas, 2 nodes, 3 gateways) {time.monotonic() - started:.1f} s after the installs began")

        with httpx.Client(headers=auth, timeout=120) as http:
            first = create_endpoint(http, gateway["cp1"], "multi-host")
            t = time.monotonic()
            body = http.post(f"{gateway['cp1']}/v2/{first}/runsync", json={"input": {"n": 1}}).json()
            assert body["status"] == "COMPLETED", body
            assert body["output"]["echo"] == {"n": 1} and body["output"]["host"] in WORKERS
            print(f"first job (scale from zero on a fresh cluster) {time.monotonic() - t:.1f} s")

            # -- lose the host whose scheduler leads ---------------------------------------------
            # Only once every standby runs: else a takeover measures a standby's own start.
            wait_until(lambda: all(loops_running(hosts, h) for h in CONTROL), timeout_s=90, interval_s=1,
                       what="every scheduler and autoscaler running")
            leases = wait_until(lambda: (lambda x: x if len(x) == 2 else None)(
                asyncio.run(_leases(nats_urls, password["admin"]))), timeout_s=30, what="both leases held")
            victim = holder_host(leases["scheduler"].holder)
            assert victim in CONTROL, leases
            print(f"leases: {({r: x.holder for r, x in leases.items()})}; killing {victim}")
            up = tuple(h for h in CONTROL if h != victim)
            up_urls = ",".join(f"nats://{hosts.ip[h]}:4222" for h in up)
            killed, killed_ms = time.monotonic(), time.time() * 1000
            docker("kill", hosts.container(victim))

            # A job on the old endpoint, through another host's gateway (accepted once the buckets
            # and streams it writes have leaders again), beside the takeover below.
            def accepted() -> dict | None:
                try:
                    resp = httpx.post(f"{gateway[up[0]]}/v2/{first}/run", json={"input": {"n": 2}}, headers=auth,
                                      timeout=10)
                except httpx.HTTPError:
                    return None
                return resp.json() | {"accepted_s": time.monotonic() - killed} if resp.status_code == 200 else None

            pool = ThreadPoolExecutor(1)
            accepting = pool.submit(wait_until, accepted, timeout_s=60, interval_s=0.2,
                                    what="a job accepted after the loss")

            # The standbys take both leases once the lost host's expire (TTL 5 s).
            def taken_over() -> dict[str, Lease] | None:
                found = asyncio.run(_leases(up_urls, password["admin"]))
                return found if len(found) == 2 and {holder_host(x.holder) for x in found.values()} <= set(up) \
                    else None

            leases = wait_until(taken_over, timeout_s=60, interval_s=0.2, what="both leases taken over")
            takeover_s = time.monotonic() - killed
            print("leases taken over " + ", ".join(f"{role} by {holder_host(x.holder)} "
                  f"{(x.acquired_at_ms - killed_ms) / 1000:.1f} s" for role, x in leases.items()) + " after the kill")

            # A new endpoint scales from zero at once: the new leaders act, on a current view.
            second = create_endpoint(http, gateway[up[1]], "after-loss")
            t = time.monotonic()
            body = http.post(f"{gateway[up[0]]}/v2/{second}/runsync", json={"input": {"n": 3}}).json()
            from_zero_s = time.monotonic() - t
            assert body["status"] == "COMPLETED" and body["output"]["echo"] == {"n": 3}, body
            print(f"new endpoint from zero after the takeover ({takeover_s:.1f} s after the kill): {from_zero_s:.1f} s "
                  f"after its creation ({time.monotonic() - killed:.1f} s after the kill)")
            # About a second on a fresh cluster. Before the leaders' KV watches had a 1 s heartbeat,
            # a watch whose ordered consumer lived on the lost server went unnoticed for 10-20 s
            # after the kill (two missed 5 s heartbeats), and the autoscaler could lose its lease
            # in a round that waited out a JetStream request's 5 s timeout.
            assert from_zero_s < 8, f"the new leaders acted {from_zero_s:.1f} s after the endpoint's creation"

            def finished(base: str, endpoint: str, job_id: str) -> dict | None:
                try:
                    body = http.get(f"{base}/v2/{endpoint}/status/{job_id}", timeout=10).json()
                except httpx.HTTPError:
                    return None
                return body if body.get("status") in TERMINAL else None

            job = accepting.result()
            pool.shutdown()
            body = wait_until(lambda: finished(gateway[up[1]], first, job["id"]), timeout_s=90, interval_s=0.2,
                              what="the job after the loss")
            assert body["status"] == "COMPLETED" and body["output"]["echo"] == {"n": 2}, body
            print(f"job after losing {victim}: accepted {job['accepted_s']:.1f} s after the kill, COMPLETED "
                  f"(seen {time.monotonic() - killed:.1f} s after the kill)")
            leases = asyncio.run(_leases(up_urls, password["admin"]))
            assert {holder_host(x.holder) for x in leases.values()} <= set(up) and len(leases) == 2, leases

            # JetStream: every stream and bucket has a leader on a surviving host, 3 replicas.
            wait_until(lambda: streams_ready(up_urls, password["admin"], up), timeout_s=30,
                       what="streams led by the surviving hosts")

            # -- the host comes back and rejoins ------------------------------------------------------
            back = time.monotonic()
            docker("start", hosts.container(victim))
            hosts.wait_booted(victim)
            wait_until(lambda: streams_ready(nats_urls, password["admin"], CONTROL), timeout_s=90, interval_s=1,
                       what=f"{victim}'s NATS current again in every stream")

            def served() -> dict | None:
                try:
                    resp = http.post(f"{gateway[victim]}/v2/{first}/runsync", json={"input": {"n": 4}}, timeout=60)
                except httpx.HTTPError:
                    return None
                return resp.json() if resp.status_code == 200 else None

            body = wait_until(served, timeout_s=90, interval_s=0.5, what=f"a job through {victim}'s gateway")
            assert body["status"] == "COMPLETED" and body["output"]["echo"] == {"n": 4}, body
            print(f"{victim} back: streams current and its gateway serving {time.monotonic() - back:.1f} s after start")
        # -- a second install with the same inputs changes nothing and restarts nothing ---------------
        pids = hosts.sh(up[0], "systemctl show -p MainPID --value " + " ".join(UNITS)).stdout
        again = hosts.sh(up[0], install_cp).stdout
        assert "venv: /opt/runplane/venv is up to date" in again and again.rstrip().endswith("nothing to change")
        assert "wrote" not in again, again
        assert hosts.sh(up[0], "systemctl show -p MainPID --value " + " ".join(UNITS)).stdout == pids
        for host in CONTROL:
            violations = hosts.sh(host, "journalctl -u runplane-nats --no-pager -o cat | grep -c Violation",
                                  check=False).stdout.strip()
            assert violations == "0", hosts.sh(host, "journalctl -u runplane-nats -o cat | grep Violation").stdout
    except BaseException:
        failed = True
        raise
    finally:
        if failed:
            for host in (*CONTROL, *WORKERS):
                print(f"===== {host} =====\n{hosts.journal(host)}", file=sys.stderr)
