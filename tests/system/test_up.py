"""`./scripts/run` (runplane_service.up): everything starts, answers a job, and stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from runplane_testing.cluster import ROOT
from runplane_testing.natsserver import free_port
from runplane_testing.waiting import wait_until

pytestmark = pytest.mark.system


def _children_of(pid: int) -> set[int]:
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.add(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def test_up_serves_the_example_and_stops_cleanly(tmp_path):
    port = free_port()
    env = dict(os.environ, RP_HTTP_PORT=str(port), RP_NATS_PORT=str(free_port()),
               RP_AGENT_PORT=str(free_port()), RP_DATA_DIR=str(tmp_path / "data"))
    env.pop("RP_API_KEY", None)
    env.pop("RP_NATS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "runplane_service.up"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("API key:" in line for line in lines), timeout_s=60, what="banner")
        key = next(line for line in lines if "API key:" in line).split("API key:")[1].strip()
        assert key == (tmp_path / "data" / "api-key").read_text().strip()
        assert any(f"http://127.0.0.1:{port}" in line for line in lines)
        children = _children_of(proc.pid)
        assert len(children) == 5  # nats-server + four services
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as http:
            command = [sys.executable, str(ROOT / "examples/echo/handler.py")]
            resp = http.post("/v1/endpoints", json={"name": "echo", "command": command, "workersMin": 1})
            assert resp.status_code == 201, resp.text
            ep = resp.json()["id"]
            result = http.post(f"/v2/{ep}/runsync?wait=60000", json={"input": {"text": "hello"}}).json()
            assert result["status"] == "COMPLETED", result
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        for child in children:
            assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
