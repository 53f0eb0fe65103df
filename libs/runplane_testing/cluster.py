"""A whole Runplane on this machine for system tests and benchmarks: a real nats-server
and every service as a real process, each on free ports, killable with SIGKILL."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from runplane_testing.procs import OwnedProcess
from runplane_testing.natsserver import NatsServer, free_port, wait_port
from runplane_testing.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServiceProc(OwnedProcess):
    name: str
    module: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProc:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", self.module], env=self.env, cwd=ROOT,
                                     stdout=log, stderr=subprocess.STDOUT)
        return self


@dataclass
class Cluster:
    """`with Cluster(nodes=2) as c: c.gateway_url, c.api_key, c.create_endpoint(...)`."""

    nodes: int = 1
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rp-cluster-")))
    api_key: str = field(default_factory=lambda: "rp_test_" + secrets.token_hex(8))
    nats: NatsServer | None = None
    services: dict[str, ServiceProc] = field(default_factory=dict)
    http_port: int = 0

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def base_env(self) -> dict[str, str]:
        assert self.nats is not None
        env = dict(os.environ)
        # Console lines (what tests search with regexes) unless a test asks for JSON in `env`.
        env.setdefault("RP_LOG_FORMAT", "console")
        env.update(RP_NATS_URL=self.nats.url, RP_API_KEY=self.api_key, RP_LOG_LEVEL="INFO",
                   RP_HTTP_PORT=str(self.http_port))
        env.update(self.env)
        return env

    def start(self) -> Cluster:
        self.nats = NatsServer(log_path=str(self.workdir / "nats.log")).start()
        self.http_port = free_port()
        self.add("gateway", "runplane_gateway")
        self.add("scheduler", "runplane_scheduler")
        self.add("autoscaler", "runplane_autoscaler")
        for i in range(self.nodes):
            self.add_node(f"node{i + 1}")
        wait_port("127.0.0.1", self.http_port, timeout_s=30)
        return self

    def add(self, name: str, module: str, **extra_env: str) -> ServiceProc:
        env = self.base_env()
        env.update(extra_env)
        svc = ServiceProc(name, module, env, self.workdir / f"{name}.log").start()
        self.services[name] = svc
        return svc

    def add_node(self, node_id: str, **extra_env: str) -> ServiceProc:
        return self.add(node_id, "runplane_node_agent", RP_NODE_ID=node_id, RP_AGENT_PORT=str(free_port()),
                        **extra_env)

    def stop(self) -> None:
        for svc in reversed(list(self.services.values())):
            svc.stop()
        if self.nats:
            self.nats.stop()

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP helpers -------------------------------------------------------------------------
    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.gateway_url, headers={"Authorization": f"Bearer {self.api_key}"},
                            timeout=30, **kwargs)

    def create_endpoint(self, **spec: object) -> str:
        body = {"name": "test", "workersMin": 1}
        body.update(spec)
        with self.client() as http:
            resp = http.post("/v1/endpoints", json=body)
            assert resp.status_code == 201, resp.text
            return resp.json()["id"]

    def wait_workers(self, endpoint_id: str, idle: int, timeout_s: float = 60) -> dict:
        def ready() -> dict | None:
            with self.client() as http:
                health = http.get(f"/v2/{endpoint_id}/health").json()
            return health if health["workers"]["idle"] + health["workers"]["running"] >= idle else None

        return wait_until(ready, timeout_s=timeout_s, interval_s=0.1, what=f"{idle} workers ready")

    def logs(self) -> str:
        return "\n".join(f"===== {name} =====\n{svc.log_text()[-6000:]}"
                         for name, svc in self.services.items())


def python_command(script: str) -> list[str]:
    """argv for a worker script of this repository, run by this interpreter."""
    return [sys.executable, str(ROOT / script)]
