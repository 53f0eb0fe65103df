"""The fuzz tier: a whole Runplane as real processes (a real nats-server, every service on
free ports, /metrics reachable on each) fed bad input on every channel it reads."""

from __future__ import annotations

import pytest

from runplane_testing.cluster import Cluster
from runplane_testing.natsserver import NatsServer, free_port, wait_port

# Short timings so failure paths finish quickly (the same as the system tier's).
FAST_ENV = {
    "RP_RUNSYNC_WAIT_MS": "2000",
    "RP_ACK_WAIT_S": "3",
    "RP_NODE_LOSS_TIMEOUT_S": "4",
    "RP_WORKER_PING_INTERVAL_MS": "1000",
    "RP_STOP_GRACE_S": "2",
    "RP_LEASE_TTL_S": "2",
}


class FuzzCluster(Cluster):
    """A Cluster whose scheduler and autoscaler serve /metrics on known ports."""

    metrics_ports: dict[str, int]

    def start(self) -> FuzzCluster:
        self.nats = NatsServer(log_path=str(self.workdir / "nats.log")).start()
        self.http_port = free_port()
        self.metrics_ports = {"scheduler": free_port(), "autoscaler": free_port()}
        self.add("gateway", "runplane_gateway")
        self.add("scheduler", "runplane_scheduler", RP_METRICS_PORT=str(self.metrics_ports["scheduler"]))
        self.add("autoscaler", "runplane_autoscaler", RP_METRICS_PORT=str(self.metrics_ports["autoscaler"]))
        for i in range(self.nodes):
            self.add_node(f"node{i + 1}")
        wait_port("127.0.0.1", self.http_port, timeout_s=30)
        return self

    def metrics_url(self, service: str) -> str:
        """Where `service` (gateway, scheduler, autoscaler or a node id) serves /metrics."""
        if service == "gateway":
            return f"{self.gateway_url}/metrics"
        if service in self.metrics_ports:
            return f"http://127.0.0.1:{self.metrics_ports[service]}/metrics"
        return f"http://127.0.0.1:{self.services[service].env['RP_AGENT_PORT']}/metrics"

    def agent_url(self, node_id: str) -> str:
        return f"http://127.0.0.1:{self.services[node_id].env['RP_AGENT_PORT']}"

    def dead(self) -> list[str]:
        return [name for name, svc in self.services.items() if not svc.alive]


@pytest.fixture(scope="module")
def fuzz_cluster(request):
    env = dict(FAST_ENV)
    env.update(getattr(request.module, "EXTRA_ENV", {}))
    with FuzzCluster(nodes=getattr(request.module, "NODES", 1), env=env) as cluster:
        yield cluster
        if request.session.testsfailed:
            print(cluster.logs())
