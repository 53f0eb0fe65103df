"""`runplane up` (what ./scripts/run starts): NATS + the four services on this host.

Each service runs as its own process, exactly as in a multi-host install; this
module only starts them, restarts one that crashes, and stops them all in order.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from runplane_service.colocated import nats_server_env
from runplane_service.env import env_int, env_opt, env_str

SERVICES = ("runplane_scheduler", "runplane_autoscaler", "runplane_node_agent", "runplane_gateway")


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env)

    def stop(self, grace_s: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _api_key(data_dir: Path) -> str:
    given = env_opt("RP_API_KEY")
    if given:
        return given
    path = data_dir / "api-key"
    if path.exists():
        return path.read_text().strip()
    key = "rp_" + secrets.token_urlsafe(24)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def _wait_port(port: int, timeout_s: float) -> bool:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def main() -> None:
    data_dir = Path(env_str("RP_DATA_DIR", "./.runplane")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    http_port = env_int("RP_HTTP_PORT", 8000)
    host = env_str("RP_HTTP_HOST", "127.0.0.1")
    key = _api_key(data_dir)
    python = sys.executable
    children: list[Child] = []

    nats_url = env_opt("RP_NATS_URL")
    if nats_url is None:
        nats_port = env_int("RP_NATS_PORT", 4222)
        nats_url = f"nats://127.0.0.1:{nats_port}"
        server = str(Path(python).parent / "nats-server")
        children.append(Child("nats", [server, "-js", "-a", "127.0.0.1", "-p", str(nats_port),
                                       "-sd", str(data_dir / "nats")], nats_server_env()))

    env = dict(os.environ, RP_NATS_URL=nats_url, RP_API_KEY=key, RP_HTTP_PORT=str(http_port),
               RP_HTTP_HOST=host)
    env.setdefault("RP_NODE_ID", env_str("RP_NODE_ID", "local"))
    for module in SERVICES:
        children.append(Child(module, [python, "-m", module], env))

    stopping = False

    def request_stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    for child in children:
        child.start()
        if child.name == "nats" and not _wait_port(int(nats_url.rsplit(":", 1)[1]), 15):
            print("runplane: nats-server did not start", file=sys.stderr)
            request_stop()
    if not stopping and _wait_port(http_port, 30):
        print(
            f"\nRunplane is up.\n  gateway:  http://{host}:{http_port}\n  API key:  {key}\n"
            f"  NATS:     {nats_url}\n  data:     {data_dir}\nPress Ctrl-C to stop.\n",
            flush=True,
        )

    while not stopping:
        time.sleep(0.2)
        for child in children:
            if child.proc is not None and child.proc.poll() is not None and not stopping:
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                if len(child.restarts) > 5:
                    print(f"runplane: {child.name} keeps crashing; stopping", file=sys.stderr)
                    request_stop()
                    break
                print(f"runplane: {child.name} exited ({child.proc.returncode}); restarting",
                      file=sys.stderr)
                child.start()

    print("runplane: stopping", file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for child in reversed(children):
        child.stop(grace_s=15 if child.name != "nats" else 5)
    print("runplane: stopped", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
