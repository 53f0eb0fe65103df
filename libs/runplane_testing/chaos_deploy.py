"""The chaos campaign's deployment on this machine: three nats-servers clustered with
JetStream (every stream and bucket with three replicas), two gateways on their own ports,
two schedulers, two autoscalers and three node agents, each a real process with its log in
one directory, each killable with SIGKILL and restartable on the same ports and store."""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from runplane_bus import Bus, BusSettings
from runplane_proto import subjects
from runplane_testing.cluster import ServiceProc
from runplane_testing.natscluster import NatsNode, nats_members
from runplane_testing.natsserver import free_port, wait_port
from runplane_testing.waiting import async_wait_until

# Short failure timings (as tests/system uses), long result retention (the accounting reads
# every record at the end) and no rate limits (the load is ours, not a tenant's).
CHAOS_ENV = {
    "RP_NATS_REPLICAS": "3",
    "RP_RATE_LIMITS": "0",
    "RP_RUNSYNC_WAIT_MS": "5000",
    "RP_ACK_WAIT_S": "3",
    "RP_NODE_LOSS_TIMEOUT_S": "4",
    "RP_WORKER_PING_INTERVAL_MS": "1000",
    "RP_STOP_GRACE_S": "2",
    "RP_LEASE_TTL_S": "2",
    "RP_RESULT_RETENTION_S": "86400",
    "RP_SYNC_RESULT_RETENTION_S": "86400",
    "RP_LOG_FORMAT": "console",
    "RP_LOG_LEVEL": "INFO",
}


@dataclass
class Deployment:
    """`async with Deployment(workdir) as d:` everything started; `d.services[name]`, `d.nats`."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rp-chaos-")))
    gateways: int = 2
    schedulers: int = 2
    autoscalers: int = 2
    nodes: int = 3
    env: dict[str, str] = field(default_factory=dict)
    api_key: str = field(default_factory=lambda: "rp_chaos_" + secrets.token_hex(8))
    nats: list[NatsNode] = field(default_factory=list)
    services: dict[str, ServiceProc] = field(default_factory=dict)
    gateway_ports: dict[str, int] = field(default_factory=dict)
    bus: Bus | None = None

    @property
    def nats_urls(self) -> str:
        return ",".join(node.url for node in self.nats)

    @property
    def gateway_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.gateway_ports.values()]

    async def start(self) -> Deployment:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nats = nats_members(self.workdir)
        for node in self.nats:
            await asyncio.to_thread(node.start)
        await self.wait_nats_healthy(timeout_s=60)
        self.bus = await Bus.connect(BusSettings(url=self.nats_urls, name="chaos-harness", replicas=3))
        for i in range(self.gateways):
            name = f"gateway-{i + 1}"
            self.gateway_ports[name] = free_port()
            self._add(name, "runplane_gateway", RP_HTTP_PORT=str(self.gateway_ports[name]))
        for i in range(self.schedulers):
            self._add(f"scheduler-{i + 1}", "runplane_scheduler")
        for i in range(self.autoscalers):
            self._add(f"autoscaler-{i + 1}", "runplane_autoscaler")
        for i in range(self.nodes):
            self._add(f"node{i + 1}", "runplane_node_agent", RP_NODE_ID=f"node{i + 1}",
                      RP_AGENT_PORT=str(free_port()))
        for port in self.gateway_ports.values():
            await asyncio.to_thread(wait_port, "127.0.0.1", port, 60)
        return self

    def _add(self, name: str, module: str, **extra: str) -> ServiceProc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RP_")}
        env.update(CHAOS_ENV)
        env.update(RP_NATS_URL=self.nats_urls, RP_API_KEY=self.api_key)
        env.update(self.env)
        env.update(extra)
        svc = ServiceProc(name, module, env, self.workdir / f"{name}.log").start()
        self.services[name] = svc
        return svc

    async def wait_nats_healthy(self, timeout_s: float = 60) -> None:
        async def healthy() -> bool:
            return all(await asyncio.gather(*(asyncio.to_thread(n.healthy) for n in self.nats)))

        await async_wait_until(healthy, timeout_s=timeout_s, interval_s=0.25, what="a healthy NATS cluster")

    async def stop(self) -> None:
        if self.bus is not None:
            try:
                await self.bus.close()
            except Exception:
                pass
        for svc in reversed(list(self.services.values())):
            await asyncio.to_thread(svc.stop)
        for node in self.nats:
            await asyncio.to_thread(node.stop)

    async def __aenter__(self) -> Deployment:
        try:
            return await self.start()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- finding victims ----------------------------------------------------------------------

    async def leader(self, role: str) -> str | None:
        """The service name holding the `role` lease in KV `rp-leases` (holder ends `-<pid>-<rand>`)."""
        assert self.bus is not None
        got = await self.bus.leases.get(subjects.lease_key(role))
        if got is None:
            return None
        try:
            pid = int(got.value.holder.split("-")[-2])
        except (ValueError, IndexError):
            return None
        return next((name for name, svc in self.services.items() if svc.alive and svc.proc.pid == pid), None)

    def worker_pids(self, node: str) -> list[int]:
        """Live worker processes (the handler, not its group leader) under a node agent."""
        svc = self.services[node]
        if not svc.alive:
            return []
        children: dict[int, list[int]] = {}
        commands: dict[int, bytes] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] == "Z":
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    commands[int(entry)] = f.read()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
        # agent -> group leader (group_leader.py) -> the worker; the SDK's own helpers are below it.
        leaders = children.get(svc.proc.pid, [])
        found = [pid for leader in leaders for pid in children.get(leader, [])
                 if b"chaos_worker.py" in commands.get(pid, b"")]
        return sorted(found)

    def logs(self, tail_chars: int = 4000) -> str:
        parts = [f"===== {name} =====\n{svc.log_text()[-tail_chars:]}" for name, svc in self.services.items()]
        for node in self.nats:
            text = node.log_path.read_text(errors="replace") if node.log_path.exists() else ""
            parts.append(f"===== {node.name} =====\n{text[-tail_chars:]}")
        return "\n".join(parts)
