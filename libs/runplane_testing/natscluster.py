"""nats-servers as real processes on free local ports: one, or members of a JetStream cluster;
either from a config of deploy/nats (the services' users and permissions, passwords in
variables: what an install runs) or plain JetStream without users (the chaos campaign). Each
is killable and restartable on the same ports and store."""

from __future__ import annotations

import json
import secrets
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from runplane_service.colocated import nats_server_env
from runplane_testing.procs import OwnedProcess
from runplane_testing.natsserver import free_port, nats_server_binary, wait_port

ROOT = Path(__file__).resolve().parents[2]
NATS_DIR = ROOT / "deploy" / "nats"
# The NATS users of deploy/nats/accounts.conf that services log in as.
ROLES = ("gateway", "scheduler", "autoscaler", "node-agent")


def password_variable(user: str) -> str:
    """The variable deploy/nats/accounts.conf reads `user`'s password from."""
    return "RP_NATS_" + user.upper().replace("-", "_") + "_PASSWORD"


def new_passwords() -> dict[str, str]:
    # Letters and digits, a letter first: nats-server parses a variable's value as a config value.
    return {user: "rp" + secrets.token_hex(16) for user in (*ROLES, "admin")}


@dataclass
class NatsNode(OwnedProcess):
    """One nats-server with JetStream. With `config` only the addresses are given on the
    command line (they override the file) and the passwords as variables; without one it is
    plain JetStream with no users. With `cluster_port` and `routes` it is a cluster member."""

    workdir: Path
    name: str = "runplane-1"
    config: Path | None = None
    passwords: dict[str, str] = field(default_factory=dict)
    cluster_port: int = 0
    routes: tuple[str, ...] = ()
    host: str = "127.0.0.1"  # where clients connect (containers: the Docker bridge's address)
    port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self) -> NatsNode:
        store = self.workdir / f"{self.name}-store"
        store.mkdir(parents=True, exist_ok=True)
        env = nats_server_env()
        if self.config is not None:
            env.update(RP_NATS_STORE_DIR=str(store), RP_NATS_SERVER_NAME=self.name)
            env.update({password_variable(user): pw for user, pw in self.passwords.items()})
            argv = [nats_server_binary(), "-c", str(self.config)]
        else:
            argv = [nats_server_binary(), "-js", "-sd", str(store), "-n", self.name]
            if self.cluster_port:
                argv += ["--cluster_name", "runplane"]
        argv += ["-a", self.host, "-p", str(self.port), "-m", str(self.monitor_port)]
        if self.cluster_port:
            argv += ["--cluster", f"nats://127.0.0.1:{self.cluster_port}", "--routes", ",".join(self.routes)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.host, self.port, timeout_s=15)
        except TimeoutError:
            raise AssertionError(f"nats-server {self.name} did not start:\n{self.log_text()[-3000:]}") \
                from None
        return self

    def violations(self) -> list[str]:
        """Every permission or authorization violation the server logged."""
        return [line for line in self.log_text().splitlines() if "Violation" in line]

    def monitor(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=5) as resp:
            return json.loads(resp.read())

    def healthy(self) -> bool:
        """The server's own JetStream health check (meta leader known, streams current)."""
        try:
            return self.monitor("/healthz").get("status") == "ok"
        except Exception:
            return False


def nats_members(workdir: Path, size: int = 3, **node: object) -> list[NatsNode]:
    """`size` members named nats-0, nats-1, ... routed to each other, not started yet; `node`
    goes to each NatsNode (e.g. `config=NATS_DIR / "cluster.conf", passwords=...`)."""
    members = [NatsNode(workdir, name=f"nats-{i}", cluster_port=free_port(), **node)  # type: ignore[arg-type]
               for i in range(size)]
    routes = tuple(f"nats://127.0.0.1:{member.cluster_port}" for member in members)
    for member in members:
        member.routes = routes
    return members
