"""The Tiltfile, evaluated with a real Starlark interpreter against stand-ins for Tilt's
builtins (tests/tilt/standins.py): what it declares in both modes, then every declared
command run as Tilt would run it (serve_cmd with serve_env, readiness probes, resource_deps
order) until the suite answers a job through the gateway."""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.request
from pathlib import Path

import httpx
import pytest
import starlark as sl
import yaml

from runplane_testing.natsserver import free_port
from runplane_testing.waiting import wait_until
from tests.tilt.standins import Tilt, TiltfileError

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"gateway": "runplane_gateway", "scheduler": "runplane_scheduler",
            "autoscaler": "runplane_autoscaler", "node-agent": "runplane_node_agent"}


def compose_services() -> set[str]:
    return set(yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"])


def order(resources: dict[str, dict]) -> list[str]:
    """The resources in an order that respects resource_deps (and fails on a cycle or a typo)."""
    done: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name in resources, f"resource_deps names an unknown resource {name!r}"
        assert name not in path, f"resource_deps cycle {path + (name,)}"
        for dep in resources[name]["resource_deps"]:
            visit(dep, path + (name,))
        if name not in done:
            done.append(name)

    for name in resources:
        visit(name, ())
    return done


# -- what the Tiltfile declares --------------------------------------------------------------------
def test_process_mode_declares_nats_the_four_services_and_the_example():
    tilt = Tilt(ROOT).evaluate()
    res = tilt.local_resources
    assert set(res) == {"setup", "nats", *SERVICES, "echo-endpoint"}
    assert tilt.flags["containers"]["kind"] == "bool" and not tilt.docker_composes
    order(res)  # every resource_dep exists, no cycle

    assert res["nats"]["serve_cmd"][:2] == [".venv/bin/nats-server", "-js"]
    assert res["nats"]["resource_deps"] == ["setup"] and res["nats"]["labels"] == ["infra"]
    assert res["nats"]["readiness_probe"]["http_get"]["path"] == "/healthz"
    for name, module in SERVICES.items():
        r = res[name]
        assert r["serve_cmd"] == [str(ROOT / ".venv" / "bin" / "python"), "-m", module], name
        # Restarted when its own code, libs/ or proto/ change, and only then.
        assert set(r["deps"]) == {f"services/{module}", "libs", "proto", "pyproject.toml"}, name
        assert all((ROOT / dep).exists() for dep in r["deps"]), name
        assert r["resource_deps"] == ["nats"], name
        assert r["serve_env"]["RP_NATS_URL"] == "nats://127.0.0.1:4222"
        probe = r["readiness_probe"]
        assert probe["http_get"]["path"] == "/healthz" and probe["tcp_socket"] is None, name
        assert r["labels"] in (["control-plane"], ["nodes"]), name
        assert any(link["url"].endswith("/metrics") for link in r["links"]), name
    ports = {name: res[name]["readiness_probe"]["http_get"]["port"] for name in SERVICES}
    assert len(set(ports.values())) == 4 and ports["gateway"] == 8000 and ports["node-agent"] == 8100
    assert res["scheduler"]["serve_env"]["RP_METRICS_PORT"] == str(ports["scheduler"])
    assert res["autoscaler"]["serve_env"]["RP_METRICS_PORT"] == str(ports["autoscaler"])
    links = {link["name"]: link["url"] for link in res["gateway"]["links"]}
    assert links["dashboard"] == "http://127.0.0.1:8000/dashboard"

    echo = res["echo-endpoint"]
    assert echo["cmd"][1:3] == ["scripts/dev-endpoint", "echo"] and not echo["serve_cmd"]
    assert set(echo["resource_deps"]) == {"gateway", "node-agent"} and "examples/echo" in echo["deps"]
    assert echo["labels"] == ["examples"]


def test_settings_come_from_the_environment():
    env = {"RP_HTTP_PORT": "18000", "RP_API_KEY": "k1", "RP_AGENT_PORT": "18100", "RP_DATA_DIR": "/tmp/x"}
    res = Tilt(ROOT, env=env).evaluate().local_resources
    assert res["gateway"]["serve_env"]["RP_HTTP_PORT"] == "18000"
    assert res["gateway"]["readiness_probe"]["http_get"]["port"] == 18000
    assert {res[name]["serve_env"]["RP_API_KEY"] for name in SERVICES} == {"k1"}
    assert res["node-agent"]["serve_env"]["RP_AGENT_PORT"] == "18100"
    assert res["nats"]["serve_cmd"][-2:] == ["-sd", "/tmp/x/tilt-nats"]
    assert res["echo-endpoint"]["env"]["RP_URL"] == "http://127.0.0.1:18000"


def test_container_mode_runs_the_compose_services():
    tilt = Tilt(ROOT, args=["--containers"]).evaluate()
    assert [c["config_paths"] for c in tilt.docker_composes] == [["deploy/compose.yaml"]]
    assert tilt.docker_composes[0]["env_file"] == "deploy/.env"
    assert set(tilt.dc_resources) == compose_services() == {"nats", *SERVICES}
    for name in SERVICES:
        assert tilt.dc_resources[name]["resource_deps"] == ["nats"], name
        assert tilt.dc_resources[name]["labels"], name
    # The images Tilt builds are the ones the compose file runs, from the service Dockerfile.
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]
    images = {svc["image"].split(":-", 1)[1].split(":")[0] for svc in compose.values()
              if svc.get("build")}
    assert {b["ref"] for b in tilt.docker_builds} == images == {"runplane/runplane", "runplane/node-agent"}
    for build in tilt.docker_builds:
        assert build["dockerfile"] == "deploy/docker/Dockerfile"
        assert {"proto", "libs", "services"} <= set(build["only"])
    assert {b["ref"]: b["build_args"] for b in tilt.docker_builds}["runplane/node-agent"] == {"SERVICE": "node-agent"}
    # The example runs as a container image, registered once the gateway and agent are up.
    res = tilt.local_resources
    assert set(res) == {"echo-image", "echo-endpoint"}
    assert "deploy/worker/Dockerfile" in res["echo-image"]["cmd"]
    assert set(res["echo-endpoint"]["resource_deps"]) == {"gateway", "node-agent", "echo-image"}
    assert set(order({**res, **{n: {"resource_deps": d["resource_deps"]} for n, d in tilt.dc_resources.items()}}))
    if not (ROOT / "deploy" / ".env").exists():
        assert tilt.local_commands == ["deploy/compose-env > deploy/.env"]


def test_the_standins_are_as_strict_as_tilt(tmp_path):
    (tmp_path / "Tiltfile").write_text("local_resource('x', serve_cmd='true', serv_env={})\n")
    with pytest.raises(sl.StarlarkError):
        Tilt(tmp_path).evaluate()
    (tmp_path / "Tiltfile").write_text("local_resource('x', readiness_probe=probe(period_secs=1))\n")
    with pytest.raises(sl.StarlarkError, match="exactly one of exec"):
        Tilt(tmp_path).evaluate()
    (tmp_path / "Tiltfile").write_text("config.define_bool('a')\nconfig.parse()\n")
    with pytest.raises(sl.StarlarkError, match="unknown Tiltfile flag"):
        Tilt(tmp_path, args=["--b"]).evaluate()
    assert issubclass(TiltfileError, Exception)


# -- the declared commands, run ---------------------------------------------------------------------
def probe_ok(probe: dict) -> bool:
    if probe["http_get"]:
        action = probe["http_get"]
        url = f"{action['scheme'] or 'http'}://{action['host'] or '127.0.0.1'}:{action['port']}{action['path']}"
        try:
            with urllib.request.urlopen(url, timeout=probe["timeout_secs"]) as resp:
                return 200 <= resp.status < 400
        except OSError:
            return False
    action = probe["tcp_socket"]
    try:
        with socket.create_connection((action["host"] or "127.0.0.1", action["port"]), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.system
def test_every_declared_command_runs_and_the_suite_answers_a_job(tmp_path):
    env = {"RP_API_KEY": "rp_tilt_test", "RP_DATA_DIR": str(tmp_path / "data")}
    for name in ("RP_HTTP_PORT", "RP_NATS_PORT", "RP_NATS_MONITOR_PORT", "RP_AGENT_PORT",
                 "RP_SCHEDULER_METRICS_PORT", "RP_AUTOSCALER_METRICS_PORT"):
        env[name] = str(free_port())
    res = Tilt(ROOT, env=env).evaluate().local_resources
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RP_")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    outputs: dict[str, str] = {}
    try:
        for name in order(res):
            r = res[name]
            if r["cmd"]:  # an update command: runs to completion before its dependents start
                argv = ["sh", "-c", r["cmd"]] if isinstance(r["cmd"], str) else r["cmd"]
                proc = subprocess.run(argv, cwd=ROOT / r["dir"], env={**base_env, **r["env"]},
                                      capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, f"{name}: {proc.stdout}\n{proc.stderr}"
                outputs[name] = proc.stdout
            if r["serve_cmd"]:
                argv = ["sh", "-c", r["serve_cmd"]] if isinstance(r["serve_cmd"], str) else r["serve_cmd"]
                log = open(tmp_path / f"{name}.log", "wb")
                procs[name] = subprocess.Popen(argv, cwd=ROOT / r["serve_dir"], env={**base_env, **r["serve_env"]},
                                               stdout=log, stderr=subprocess.STDOUT)
                if r["readiness_probe"]:
                    wait_until(lambda: probe_ok(r["readiness_probe"]) or procs[name].poll() is not None,
                               timeout_s=60, interval_s=0.2, what=f"{name} ready")
                assert procs[name].poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]

        # The example endpoint registered by its resource answers a job through the gateway.
        line = next(x for x in outputs["echo-endpoint"].splitlines() if "created" in x)
        endpoint = line.rsplit(" ", 1)[1]
        gateway = f"http://127.0.0.1:{env['RP_HTTP_PORT']}"
        with httpx.Client(base_url=gateway, headers={"Authorization": "Bearer rp_tilt_test"}, timeout=30) as http:
            def answered() -> dict | None:
                body = http.post(f"/v2/{endpoint}/runsync", json={"input": {"text": "tilt"}}).json()
                return body if body.get("status") == "COMPLETED" else None

            body = wait_until(answered, timeout_s=90, interval_s=0.5, what="a job answered")
            assert body["output"] == {"echo": {"text": "tilt"}, "upper": "TILT"}
            assert http.get("/dashboard").status_code == 200

            # Registering again (Tilt re-runs it when examples/ change) keeps one endpoint.
            r = res["echo-endpoint"]
            again = subprocess.run(r["cmd"], cwd=ROOT, env={**base_env, **r["env"]}, capture_output=True,
                                   text=True, timeout=60)
            assert again.returncode == 0 and f"updated: {endpoint}" in again.stdout, again.stderr
            assert [e["id"] for e in http.get("/v1/endpoints").json() if e["name"] == "echo"] == [endpoint]
    except BaseException:
        for name in procs:
            print(f"===== {name} =====\n{(tmp_path / f'{name}.log').read_text(errors='replace')[-3000:]}")
        raise
    finally:
        for name in reversed(list(procs)):
            proc = procs[name]
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
