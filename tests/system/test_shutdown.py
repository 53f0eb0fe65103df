"""Services stop promptly on SIGTERM, after having run a while (not killed after the grace)."""

from __future__ import annotations

import time

import pytest

from runplane_testing.cluster import Cluster, python_command

pytestmark = pytest.mark.system


def test_every_service_exits_cleanly_on_sigterm():
    with Cluster(nodes=1) as cluster:
        ep = cluster.create_endpoint(name="stop", workersMin=1, workersMax=1,
                                     command=python_command("examples/fast/handler.py"))
        with cluster.client() as http:
            assert http.post(f"/v2/{ep}/run", json={"input": {}, "webhook": "http://127.0.0.1:9/hook"}
                             ).status_code == 200
        time.sleep(8)  # long enough for every background fetch and poll to be in flight
        for name in ("gateway", "scheduler", "autoscaler", "node1"):
            svc = cluster.services[name]
            started = time.monotonic()
            svc.stop(grace_s=30)
            took = time.monotonic() - started
            assert svc.proc.returncode == 0, f"{name} exited with {svc.proc.returncode}"
            assert took < 6, f"{name} took {took:.1f} s to stop"
