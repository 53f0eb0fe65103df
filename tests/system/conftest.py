from __future__ import annotations

import pytest

from runplane_testing.cluster import Cluster

# Short timings so failure paths finish quickly; every figure is a setting a real
# install may also use.
FAST_ENV = {
    "RP_RUNSYNC_WAIT_MS": "2000",
    "RP_ACK_WAIT_S": "3",
    "RP_NODE_LOSS_TIMEOUT_S": "4",
    "RP_WORKER_PING_INTERVAL_MS": "1000",
    "RP_STOP_GRACE_S": "2",
    "RP_LEASE_TTL_S": "2",
}


@pytest.fixture(scope="module")
def cluster(request):
    nodes = getattr(request.module, "NODES", 1)
    with Cluster(nodes=nodes, env=dict(FAST_ENV)) as c:
        yield c
        if request.session.testsfailed:
            print(c.logs())


@pytest.fixture
def runpod_client(cluster):
    import runpod

    runpod.api_key = cluster.api_key
    runpod.endpoint_url_base = f"{cluster.gateway_url}/v2"
    return runpod
