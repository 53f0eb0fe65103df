"""`runplane`, the real console script, as a subprocess against a running cluster (gateway
HTTP only: RP_URL + RP_API_KEY)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runplane_testing.cluster import ROOT, python_command
from runplane_testing.natsserver import free_port
from runplane_testing.waiting import wait_until

pytestmark = pytest.mark.system

RUNPLANE = str(Path(sys.executable).parent / "runplane")


def cli_env(cluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RP_")}
    env.update(RP_URL=cluster.gateway_url, RP_API_KEY=cluster.api_key)
    return env


def runplane(cluster, *args: str, ok: bool = True, timeout_s: float = 90) -> subprocess.CompletedProcess:
    done = subprocess.run([RUNPLANE, *args], env=cli_env(cluster), capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT)
    if ok:
        assert done.returncode == 0, f"runplane {' '.join(args)}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def as_json(cluster, *args: str) -> object:
    return json.loads(runplane(cluster, *args, "--json").stdout)


@pytest.fixture(scope="module")
def echo(cluster, tmp_path_factory) -> str:
    spec = tmp_path_factory.mktemp("spec") / "echo.toml"
    command = " ".join(python_command("examples/echo/handler.py"))
    spec.write_text(f'name = "cli-echo"\ncommand = "{command}"\nworkersMin = 1\nidleTimeout = 30\n')
    created = as_json(cluster, "endpoint", "create", "-f", str(spec), "--workers-max", "2")
    cluster.wait_workers(created["id"], 1)
    return created["id"]


def test_endpoint_create_list_get_update_delete(cluster, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: cli-yaml\nimageName: example/worker:1\nenv:\n  A: '1'\nworkersMax: 1\n")
    created = as_json(cluster, "endpoint", "create", "-f", str(spec), "--env", "B=2", "--gpu-count", "1",
                      "--gpu-type", "H100", "--no-flashboot")
    assert created["name"] == "cli-yaml" and created["imageName"] == "example/worker:1"
    # env values are masked in answers (they may be secrets); workers get the real ones.
    assert created["env"] == {"A": "***", "B": "***"} and created["gpuTypeIds"] == ["H100"]
    assert created["flashboot"] is False and created["workersMin"] == 0
    listed = as_json(cluster, "endpoint", "list")
    assert created["id"] in [ep["id"] for ep in listed]
    table = runplane(cluster, "endpoint", "list").stdout
    assert created["id"] in table and "cli-yaml" in table
    by_name = as_json(cluster, "endpoint", "get", "cli-yaml")
    assert by_name["id"] == created["id"]
    updated = as_json(cluster, "endpoint", "update", created["id"], "--workers-max", "4", "--scaler-type",
                      "REQUEST_COUNT")
    assert updated["workersMax"] == 4 and updated["scalerType"] == "REQUEST_COUNT"
    assert updated["env"] == {"A": "***", "B": "***"}  # unchanged fields stay
    bad = runplane(cluster, "endpoint", "update", created["id"], "--workers-min", "9", ok=False)
    assert bad.returncode == 1 and "workersMin must be <= workersMax" in bad.stderr
    runplane(cluster, "endpoint", "delete", "cli-yaml")
    assert created["id"] not in [ep["id"] for ep in as_json(cluster, "endpoint", "list")]
    missing = runplane(cluster, "endpoint", "get", created["id"], ok=False)
    assert missing.returncode == 1 and "no endpoint" in missing.stderr


def test_job_run_prints_the_output(cluster, echo):
    done = runplane(cluster, "job", "run", "cli-echo", '{"text": "hi"}')
    assert json.loads(done.stdout) == {"echo": {"text": "hi"}, "upper": "HI"}
    job = as_json(cluster, "job", "run", echo, '{"text": "again"}', "--sync")
    assert job["status"] == "COMPLETED" and job["output"]["upper"] == "AGAIN"
    status = as_json(cluster, "job", "status", echo, job["id"])
    assert status["status"] == "COMPLETED" and status["output"] == job["output"]


def test_a_failed_job_exits_non_zero_with_its_error(cluster, echo):
    done = runplane(cluster, "job", "run", echo, '{"fail": "boom"}', ok=False)
    assert done.returncode == 1
    assert "FAILED" in done.stderr and "boom" in done.stderr


def test_a_long_job_shows_its_live_status_in_a_terminal(cluster, echo):
    """On a terminal, `job run` shows the job's state (and its progress updates) while it runs."""
    import pty

    master, slave = pty.openpty()
    env = dict(cli_env(cluster), COLUMNS="160", TERM="xterm")
    proc = subprocess.Popen([RUNPLANE, "job", "run", echo, '{"sleep": 3}'], env=env, stdout=subprocess.PIPE,
                            stderr=slave, text=True)
    os.close(slave)
    screen = b""
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal closed: the command has exited
                break
            if not data:
                break
            screen += data
        assert proc.wait(60) == 0
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    text = screen.decode(errors="replace")
    assert "IN_PROGRESS" in text and "sleeping_s" in text
    assert json.loads(proc.stdout.read()) == {"echo": {"sleep": 3}}


def test_job_cancel_and_the_recent_jobs(cluster, echo):
    job_id = runplane(cluster, "job", "run", echo, '{"sleep": 60}', "--no-wait").stdout.strip()
    wait_until(lambda: as_json(cluster, "job", "status", echo, job_id)["status"] == "IN_PROGRESS",
               timeout_s=30, what="job running")
    assert runplane(cluster, "job", "cancel", echo, job_id).stdout.split() == [job_id, "CANCELLED"]
    assert as_json(cluster, "job", "status", echo, job_id)["status"] == "CANCELLED"
    recent = as_json(cluster, "job", "list", echo, "--limit", "50")
    by_id = {job["id"]: job for job in recent}
    assert by_id[job_id]["status"] == "CANCELLED"
    completed = [job for job in recent if job["status"] == "COMPLETED"]
    for job in completed:
        assert job["executionTime"] >= 0 and job["delayTime"] >= 0 and job["nodeId"] == "node1"
    assert [j["submittedAtMs"] for j in recent] == sorted((j["submittedAtMs"] for j in recent), reverse=True)
    cancelled_only = as_json(cluster, "job", "list", echo, "--status", "CANCELLED")
    assert {job["status"] for job in cancelled_only} == {"CANCELLED"}
    table = runplane(cluster, "job", "list", echo).stdout
    assert job_id in table and "CANCELLED" in table


def test_stream_prints_chunks_as_they_come(cluster, tmp_path):
    spec = tmp_path / "stream.json"
    spec.write_text(json.dumps({"name": "cli-stream", "command": python_command("examples/echo/handler.py"),
                                "env": {"ECHO_MODE": "stream"}, "workersMin": 1}))
    ep = as_json(cluster, "endpoint", "create", "-f", str(spec))["id"]
    cluster.wait_workers(ep, 1)
    proc = subprocess.Popen([RUNPLANE, "--json", "job", "run", ep, '{"stream": 3, "sleep": 2, "text": "x"}',
                             "--stream"], env=cli_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        first = json.loads(proc.stdout.readline())
        assert first == {"index": 0, "text": "X"}
        # The first chunk is printed while the job still runs: chunks come as they are made.
        with cluster.client() as http:
            jobs = http.get(f"/v1/endpoints/{ep}/jobs").json()
        assert [job["status"] for job in jobs] == ["IN_PROGRESS"]
        rest = [json.loads(line) for line in proc.stdout.read().splitlines()]
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rest == [{"index": 1, "text": "X"}, {"index": 2, "text": "X"}]
    runplane(cluster, "endpoint", "delete", ep)


def test_nodes_and_workers(cluster, echo):
    nodes = as_json(cluster, "nodes")
    node = next(n for n in nodes if n["id"] == "node1")
    assert node["lost"] is False and node["runtime"] == "process" and node["cpuCount"] >= 1
    assert node["gpus"] == [] and node["gpusFree"] == 0
    assert any(w["endpointId"] == echo for w in node["workers"])
    table = runplane(cluster, "nodes").stdout
    assert "node1" in table and "process" in table
    workers = as_json(cluster, "workers", "cli-echo")
    assert workers and all(w["endpointId"] == echo and w["nodeId"] == "node1" for w in workers)
    assert {w["state"] for w in workers} <= {"initializing", "idle", "running", "parked", "stopping"}
    assert workers[0]["id"] in runplane(cluster, "workers", echo).stdout


def test_logs_show_and_follow_what_workers_print(cluster):
    ep = as_json(cluster, "endpoint", "create", "--name", "cli-chatty", "--command",
                 " ".join(python_command("tests/fixtures/workers/chatty.py")), "--workers-min", "1")["id"]
    cluster.wait_workers(ep, 1)
    runplane(cluster, "job", "run", ep, '{"say": "first-words"}')
    lines = [json.loads(line) for line in runplane(cluster, "logs", ep, "--json").stdout.splitlines()]
    said = [line for line in lines if line["line"] == "chatty says first-words"]
    assert said and said[0]["stream"] == "stdout" and said[0]["nodeId"] == "node1"
    assert any(line["line"] == "chatty warns first-words" and line["stream"] == "stderr" for line in lines)
    assert "chatty says first-words" in runplane(cluster, "logs", "cli-chatty").stdout

    follow = subprocess.Popen([RUNPLANE, "logs", ep, "--follow", "--json", "--tail", "0", "--interval", "0.2"],
                              env=cli_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[dict] = []
    reader = threading.Thread(target=lambda: seen.extend(json.loads(x) for x in iter(follow.stdout.readline, "")),
                              daemon=True)
    reader.start()
    try:
        # A line printed before the follower's first look counts as history (--tail 0), so on a
        # slow machine the first job may come too early: say it again until it is followed.
        for _ in range(5):
            runplane(cluster, "job", "run", ep, '{"say": "later-words"}')
            try:
                wait_until(lambda: any(line["line"] == "chatty says later-words" for line in seen), timeout_s=6,
                           what="followed log line")
                break
            except TimeoutError:
                continue
        assert any(line["line"] == "chatty says later-words" for line in seen), seen
        assert not any(line["line"] == "chatty says first-words" for line in seen)  # --tail 0: only new lines
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(10)
    runplane(cluster, "endpoint", "delete", ep)


def test_a_wrong_key_or_gateway_is_a_clear_error(cluster):
    env = dict(cli_env(cluster), RP_API_KEY="wrong")
    done = subprocess.run([RUNPLANE, "nodes"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "refused the API key" in done.stderr
    done = subprocess.run([RUNPLANE, "--url", f"http://127.0.0.1:{free_port()}", "nodes"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "cannot reach the gateway" in done.stderr


def test_up_starts_everything_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RP_")}
    env.update(RP_HTTP_PORT=str(port), RP_NATS_PORT=str(free_port()), RP_AGENT_PORT=str(free_port()),
               RP_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.Popen([RUNPLANE, "up"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        wait_until(lambda: any("API key:" in line for line in lines), timeout_s=60, what="banner")
        key = (tmp_path / "data" / "api-key").read_text().strip()
        # The CLI finds the key `up` wrote (RP_DATA_DIR) without RP_API_KEY.
        env_cli = dict(env, RP_URL=f"http://127.0.0.1:{port}")
        nodes = wait_until(lambda: json.loads(subprocess.run(
            [RUNPLANE, "--json", "nodes"], env=env_cli, capture_output=True, text=True, timeout=30).stdout),
            timeout_s=30, what="the local node")
        assert [n["id"] for n in nodes] == ["local"] and key
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
