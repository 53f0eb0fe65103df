"""Flash boot with every service as a process: an idle flash endpoint scales to zero into the
node's pool of parked workers, its next job wakes the same worker; parked GPU workers hold
their GPUs (fake NVML GPUs) until a worker of another endpoint needs them."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

import httpx
import pytest

from runplane_bus import Bus, BusSettings
from runplane_testing.cluster import ROOT, Cluster, python_command
from runplane_testing.nodewatch import NodeWatch
from runplane_testing.waiting import wait_until

from .conftest import FAST_ENV

pytestmark = pytest.mark.system
FLASH = python_command("examples/flash/handler.py")
IDLE_TIMEOUT_S = 1


def _flash_endpoint(cluster, name: str, **spec: object) -> str:
    body: dict[str, object] = {"name": name, "command": FLASH, "workersMin": 0, "workersMax": 1,
                               "idleTimeout": IDLE_TIMEOUT_S, "flashboot": True}
    body.update(spec)
    return cluster.create_endpoint(**body)


def _runsync(cluster, ep: str, payload: object) -> dict:
    with cluster.client() as http:
        body = http.post(f"/v2/{ep}/runsync?wait=60000", json={"input": payload}).json()
    assert body["status"] == "COMPLETED", body
    return body


def _parked(watch: NodeWatch, ep: str) -> list:
    return [w for _, w in watch.workers(ep, parked=True) if w.state == "parked"]


def _agent_sample(cluster, name: str, **labels: str) -> float:
    """A sample of the node agent's /metrics (0 when it has none yet)."""
    port = cluster.services["node1"].env["RP_AGENT_PORT"]
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _refused_starts(cluster) -> float:
    return _agent_sample(cluster, "rp_node_agent_commands_total", command="start_worker", ok="false")


def test_an_idle_flash_endpoint_parks_its_worker_and_the_next_job_wakes_it():
    with Cluster(nodes=1, env=dict(FAST_ENV, RP_PARK_MEMORY_MB="2048")) as cluster, \
            NodeWatch(cluster.nats.url) as watch:
        ep = _flash_endpoint(cluster, "flashsys", env={"INIT_S": "1"})
        first = _runsync(cluster, ep, {"n": 1})
        worker_id, pid = first["workerId"], first["output"]["pid"]
        assert first["output"]["init_skipped"] is False and first["output"]["init_s"] >= 1

        # Back to zero workers: the worker is parked (reported, not counted), not stopped.
        [parked] = wait_until(lambda: _parked(watch, ep) or None, timeout_s=30, what="the worker parked")
        assert parked.worker_id == worker_id and watch.count(ep) == 0
        with cluster.client() as http:
            health = http.get(f"/v2/{ep}/health").json()
        assert health["workers"]["idle"] + health["workers"]["running"] == 0, health

        # The next job is run by the very same process, woken from the pool.
        second = _runsync(cluster, ep, {"n": 2})
        assert second["workerId"] == worker_id and second["output"]["pid"] == pid
        assert second["output"]["input"] == {"n": 2}
        wait_until(lambda: _parked(watch, ep) or None, timeout_s=30, what="parked again")
        assert watch.peak(ep) == 1  # never more than workersMax, parked ones included in the pool


def test_prewarmed_workers_are_kept_at_zero_and_the_first_job_wakes_one():
    with Cluster(nodes=1, env=dict(FAST_ENV, RP_PARK_MEMORY_MB="2048")) as cluster, \
            NodeWatch(cluster.nats.url) as watch:
        ep = _flash_endpoint(cluster, "prewarmsys", workersMax=2, prewarmWorkers=1, env={"INIT_S": "1"})
        # No job yet: one worker is started, initialised and parked; none is an active worker.
        [prewarmed] = wait_until(lambda: [w for w in _parked(watch, ep) if w.jobs == []] or None,
                                 timeout_s=30, what="a pre-warmed worker parked")
        wait_until(lambda: _paused_and_admitted(watch, prewarmed.worker_id), timeout_s=30,
                   what="the pre-warmed worker admitted to the pool")
        assert watch.peak(ep) == 0
        with cluster.client() as http:
            view = http.get(f"/v1/endpoints/{ep}").json()
        assert view["prewarmWorkers"] == 1

        # The first job is run by that worker, woken from the pool: no cold start.
        first = _runsync(cluster, ep, {"n": 1})
        assert first["workerId"] == prewarmed.worker_id and first["output"]["init_s"] >= 1
        # Back to zero: parked again, and no second worker was ever started.
        wait_until(lambda: _parked(watch, ep) or None, timeout_s=30, what="parked again")
        assert watch.ids_seen(ep) == {prewarmed.worker_id}


def test_a_prewarm_that_does_not_fit_the_pool_is_not_retried_in_a_loop():
    # A 1 MB pool: the first pre-warmed worker (some 60 MB) is stopped once its size is known;
    # later pre-warms are refused at once and the endpoint is held back, not started again.
    with Cluster(nodes=1, env=dict(FAST_ENV, RP_PARK_MEMORY_MB="1", RP_NODE_BACKOFF_S="1")) as cluster, \
            NodeWatch(cluster.nats.url) as watch:
        ep = _flash_endpoint(cluster, "prewarmfull", prewarmWorkers=1, env={"HOLD_MB": "40"})
        wait_until(lambda: watch.ids_seen(ep) or None, timeout_s=30, what="the first pre-warm started")
        wait_until(lambda: not watch.workers(ep, parked=True), timeout_s=30, what="it was stopped")
        # Each later round is a pre-warm the node refuses (once per 1 s back-off): wait for three
        # such rounds, then one more as the settle, counted on the agent's /metrics.
        refused = wait_until(lambda: (lambda n: n if n >= 3 else None)(_refused_starts(cluster)), timeout_s=30,
                             interval_s=0.2, what="three pre-warms refused")
        wait_until(lambda: _refused_starts(cluster) > refused, timeout_s=30, interval_s=0.2,
                   what="one more pre-warm refused")
        assert _agent_sample(cluster, "rp_node_agent_worker_starts_total", endpoint=ep) == 1
        assert len(watch.ids_seen(ep)) == 1, watch.ids_seen(ep)
        assert "cannot pre-warm here: the parking pool has" in cluster.logs()
        # The endpoint itself still works (a cold start).
        assert _runsync(cluster, ep, {"n": 1})["output"]["input"] == {"n": 1}


def test_a_warm_window_keeps_prewarmed_workers_while_open_and_none_while_closed():
    closed_hour = (time.gmtime().tm_hour + 12) % 24
    with Cluster(nodes=1, env=dict(FAST_ENV, RP_PARK_MEMORY_MB="2048")) as cluster, \
            NodeWatch(cluster.nats.url) as watch:
        closed = _flash_endpoint(cluster, "window-closed", warmWindows=[
            {"cron": f"0 {closed_hour} * * *", "minutes": 60, "workers": 1}])
        opened = _flash_endpoint(cluster, "window-open", warmWindows=[
            {"cron": "* * * * *", "minutes": 10, "workers": 1, "timezone": "Asia/Tokyo"}])
        [prewarmed] = wait_until(lambda: _parked(watch, opened) or None, timeout_s=30,
                                 what="a worker pre-warmed in the open window")
        target = _scale_target(cluster, opened)
        assert target.prewarm_workers == 1 and target.desired_workers == 0 and "warm window 0" in target.reason
        assert _scale_target(cluster, closed).prewarm_workers == 0
        assert watch.ids_seen(closed) == set() and watch.peak(opened) == 0
        assert _runsync(cluster, opened, {"n": 1})["workerId"] == prewarmed.worker_id


def test_predictive_prewarm_learns_a_recurring_load_and_prewarms_ahead_of_it():
    # A "day" of 8 s in slots of 2 s, pre-warmed one slot ahead. No node: jobs only queue, and
    # the demand they make is what the autoscaler learns.
    period_s = 8
    env = dict(FAST_ENV, RP_PROFILE_PERIOD_S=str(period_s), RP_PROFILE_SLOT_S="2", RP_PROFILE_LEAD_S="2")
    with Cluster(nodes=0, env=env) as cluster, cluster.client() as http:
        ep = _flash_endpoint(cluster, "predictive", predictivePrewarm=True)
        for _ in range(3):  # the load: a job queued in slot 2 (4-6 s into each period), then purged
            _at_phase(period_s, 4.2)
            assert http.post(f"/v2/{ep}/run", json={"input": {}}).status_code == 200
            _at_phase(period_s, 5.5)
            assert http.post(f"/v2/{ep}/purge-queue").status_code == 200
        _at_phase(period_s, 0.4)  # slot 0, slot 1 coming: nothing was ever wanted there
        assert _scale_target(cluster, ep).prewarm_workers == 0
        _at_phase(period_s, 2.5)  # slot 1, the load's slot coming: pre-warmed ahead of it
        target = _scale_target(cluster, ep)
        assert target.prewarm_workers == 1 and target.desired_workers == 0, target
        assert "predicted from the daily load" in target.reason


def _at_phase(period_s: float, phase_s: float) -> None:
    time.sleep((phase_s - time.time() % period_s) % period_s)


def _scale_target(cluster, endpoint_id: str):
    async def read():
        bus = await Bus.connect(BusSettings(url=cluster.nats.url, name="test"))
        try:
            entry = await bus.scale.get(endpoint_id)
            return entry.value if entry is not None else None
        finally:
            await bus.close()

    return asyncio.run(read())


def _paused_and_admitted(watch: NodeWatch, worker_id: str) -> bool:
    return any(status.parked_mb > 0 and any(w.worker_id == worker_id for w in status.workers)
               for status in watch.nodes().values())


def test_parked_gpu_workers_hold_their_gpu_until_another_endpoint_needs_it(tmp_path):
    lib = tmp_path / "fake-nvml"
    lib.mkdir()
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib / "libnvidia-ml.so.1"),
                    str(ROOT / "tests/fixtures/fake_nvml/fake_nvml.c")], check=True)
    with Cluster(nodes=0, env=dict(FAST_ENV)) as cluster, NodeWatch(cluster.nats.url) as watch:
        cluster.add_node("gpunode", LD_LIBRARY_PATH=str(lib), FAKE_NVML_GPUS="1:NVIDIA H100 80GB HBM3:81559",
                         FAKE_NVML_NODE="flash", RP_PARK_MEMORY_MB="4096")
        shared = _SharedGpuCheck(watch)
        with shared:
            a = _flash_endpoint(cluster, "gpu-a", gpuCount=1, gpuTypeIds=["H100"])
            b = _flash_endpoint(cluster, "gpu-b", gpuCount=1, gpuTypeIds=["H100"])
            first_a = _runsync(cluster, a, {"who": "a"})
            [gpu] = first_a["output"]["gpus"].split(",")
            [parked_a] = wait_until(lambda: _parked(watch, a) or None, timeout_s=30, what="A parked")
            assert parked_a.gpu_uuids == [gpu]  # a parked worker still holds its GPU

            # B needs the node's only GPU: A's parked worker is evicted for it.
            first_b = _runsync(cluster, b, {"who": "b"})
            assert first_b["output"]["gpus"] == gpu
            wait_until(lambda: not watch.workers(a, parked=True) or None, timeout_s=30, what="A evicted")
            wait_until(lambda: _parked(watch, b) or None, timeout_s=30, what="B parked")

            # And back: A gets it again (a fresh worker), B's parked worker evicted.
            again_a = _runsync(cluster, a, {"who": "a again"})
            assert again_a["output"]["gpus"] == gpu and again_a["workerId"] != first_a["workerId"]
            # B's next job resumes nothing (evicted) and waits for the GPU that A's worker holds
            # until A scales back to zero and parks: then B evicts it again.
            assert _runsync(cluster, b, {"who": "b again"})["output"]["gpus"] == gpu
        assert shared.samples > 10 and not shared.violations, shared.violations


class _SharedGpuCheck:
    """Samples every node's status while the test runs: a GPU is never held by two workers."""

    def __init__(self, watch: NodeWatch) -> None:
        self.watch = watch
        self.samples = 0
        self.violations: list[object] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _SharedGpuCheck:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for status in self.watch.nodes().values():
                holders: dict[str, str] = {}
                for worker in status.workers:
                    for uuid in worker.gpu_uuids:
                        if uuid in holders:
                            self.violations.append((uuid, holders[uuid], worker.worker_id))
                        holders[uuid] = worker.worker_id
            self.samples += 1
