"""The four services logging in as their own NATS users (the servers, run with the configs of
deploy/nats: runplane_testing.natscluster): what an install runs, on free local ports."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from runplane_testing.cluster import ServiceProc
from runplane_testing.natscluster import NatsNode
from runplane_testing.natsserver import free_port, wait_port
from runplane_testing.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
MODULES = {"gateway": "runplane_gateway", "scheduler": "runplane_scheduler",
           "autoscaler": "runplane_autoscaler", "node-agent": "runplane_node_agent"}

# Short timings so failure paths finish quickly (as in tests/system).
FAST_ENV = {
    "RP_RUNSYNC_WAIT_MS": "5000",
    "RP_ACK_WAIT_S": "3",
    "RP_NODE_LOSS_TIMEOUT_S": "4",
    "RP_WORKER_PING_INTERVAL_MS": "1000",
    "RP_STOP_GRACE_S": "2",
    "RP_LEASE_TTL_S": "2",
}


def service_env(role: str, nats_urls: str, password_file: Path, **extra: str) -> dict[str, str]:
    """What a service of an install gets: the NATS addresses, its user, its password file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RP_")}
    env.update(FAST_ENV)
    env.update(RP_NATS_URL=nats_urls, RP_NATS_USER=role, RP_NATS_PASSWORD_FILE=str(password_file),
               RP_LOG_LEVEL="INFO")
    env.update(extra)
    return env


@dataclass
class AuthCluster:
    """The four services as processes against `servers`, each logged in as its own user."""

    servers: list[NatsNode]
    workdir: Path
    passwords: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    api_key: str = field(default_factory=lambda: "rp_test_" + secrets.token_hex(8))
    http_port: int = field(default_factory=free_port)
    services: dict[str, ServiceProc] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def nats_urls(self) -> str:
        return ",".join(server.url for server in self.servers)

    def password_file(self, user: str) -> Path:
        path = self.workdir / f"{user}.password"
        if not path.exists():
            path.write_text(self.passwords[user] + "\n")
            path.chmod(0o600)
        return path

    def add(self, name: str, role: str, **extra: str) -> ServiceProc:
        env = service_env(role, self.nats_urls, self.password_file(role), RP_API_KEY=self.api_key,
                          RP_HTTP_PORT=str(self.http_port), **self.env)
        env.update(extra)
        svc = ServiceProc(name, MODULES[role], env, self.workdir / f"{name}.log").start()
        self.services[name] = svc
        return svc

    def start(self, nodes: int = 1) -> AuthCluster:
        for role in ("gateway", "scheduler", "autoscaler"):
            self.add(role, role)
        for i in range(nodes):
            self.add_node(f"node{i + 1}")
        wait_port("127.0.0.1", self.http_port, timeout_s=60)
        return self

    def add_node(self, node_id: str, **extra: str) -> ServiceProc:
        return self.add(node_id, "node-agent", RP_NODE_ID=node_id, RP_AGENT_PORT=str(free_port()), **extra)

    def stop(self) -> None:
        for svc in reversed(list(self.services.values())):
            svc.stop()

    def logs(self) -> str:
        return "\n".join(f"===== {name} =====\n{svc.log_text()[-6000:]}" for name, svc in self.services.items())

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.gateway_url, headers={"Authorization": f"Bearer {self.api_key}"},
                            timeout=30)

    def create_endpoint(self, **spec: object) -> str:
        body = {"name": "test", "workersMin": 1}
        body.update(spec)
        with self.client() as http:
            resp = http.post("/v1/endpoints", json=body)
            assert resp.status_code == 201, resp.text
            return resp.json()["id"]

    def wait_job(self, endpoint_id: str, job_id: str, timeout_s: float = 60) -> dict:
        with self.client() as http:
            def finished() -> dict | None:
                body = http.get(f"/v2/{endpoint_id}/status/{job_id}").json()
                done = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")
                return body if body.get("status") in done else None

            return wait_until(finished, timeout_s=timeout_s, interval_s=0.1, what=f"job {job_id} finished")
