"""scale: scaling from zero, bursts, and placement on a large simulated fleet.

Figures:
* worker_start_s: the echo worker (RunPod SDK) started by hand against a stub that
  records its first job-take poll: the worker's own start time, the floor here;
* scale_from_zero_s: /runsync on an endpoint with no workers to its result (process
  runtime, no flash boot); scale_from_zero_overhead_s = that minus worker_start_s
  (target < 1);
* burst_to_max_s: a burst of queued jobs until the endpoint runs workersMax ready
  workers (REQUEST_COUNT scaler; the stdlib worker);
* on a simulated fleet (bench/fleet.py: sim_nodes node agents in one process, real
  scheduler, autoscaler, gateway and nats-server): sim_workers placed,
  sim_fill_s (all of them placed from nothing), placement_p50_ms / placement_p99_ms
  (a scale target written to KV by the autoscaler -> the StartWorker arriving at a node;
  target < 50 at 1,000 nodes and 10,000 workers), control_plane_rss_mb (gateway +
  scheduler + autoscaler) and nats_rss_mb.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.stats import percentile
from bench.fleet import node_name
from runplane_bus import Bus, BusSettings
from runplane_proto import subjects
from runplane_proto.codec import Codec
from runplane_proto.nodes import NodeCommand, StartWorker
from runplane_testing.cluster import ROOT, Cluster, python_command
from runplane_testing.waiting import wait_until

ECHO = "examples/echo/handler.py"
WATCH_LAG_MS: list[float] = []  # how late this process's own watch saw each probe target
FAST = "examples/fast/handler.py"


# -- the worker's own start: a stub job-take server ---------------------------------------------


def worker_start_s(script: str, samples: int) -> float:
    """Median seconds from spawning the worker to its first job-take poll."""
    first_poll = threading.Event()

    class Stub(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if "/job-take/" in self.path:
                first_poll.set()
            self.send_response(204)
            self.end_headers()

        def do_POST(self) -> None:  # noqa: N802
            self.do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/v2/bench"
    env = dict(os.environ, PYTHONUNBUFFERED="1", RUNPOD_WEBHOOK_GET_JOB=f"{base}/job-take/$ID",
               RUNPOD_WEBHOOK_POST_OUTPUT=f"{base}/job-done/w/$ID", RUNPOD_WEBHOOK_PING=f"{base}/ping/w",
               RUNPOD_WEBHOOK_POST_STREAM=f"{base}/job-stream/w/$ID", RUNPOD_AI_API_KEY="k",
               RUNPOD_POD_ID="w", RUNPOD_ENDPOINT_ID="bench", RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="true")
    took = []
    try:
        for _ in range(samples):
            first_poll.clear()
            started = time.perf_counter()
            # In its own process group: the SDK forks a pinger that would outlive a kill of the worker alone.
            proc = subprocess.Popen(python_command(script), env=env, cwd=ROOT, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                assert first_poll.wait(60), "the worker never polled"
                took.append(time.perf_counter() - started)
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        server.shutdown()
    return statistics.median(took)


# -- scale from zero and bursts, real workers ------------------------------------------------------


def _workers(http: httpx.Client, endpoint_id: str) -> int:
    w = http.get(f"/v2/{endpoint_id}/health").json()["workers"]
    return w["idle"] + w["running"] + w["initializing"]


def from_zero_and_burst(samples: int) -> dict[str, float]:
    with Cluster(nodes=1, env={"RP_STOP_GRACE_S": "2"}) as cluster, cluster.client() as http:
        # flashboot off: every start here is a cold start (bench coldstart measures flash boot).
        ep = cluster.create_endpoint(name="zero", workersMin=0, workersMax=1, idleTimeout=1,
                                     flashboot=False, command=python_command(ECHO))
        took = []
        for _ in range(samples):
            wait_until(lambda: _workers(http, ep) == 0, timeout_s=60, what="scaled to zero")
            started = time.perf_counter()
            body = http.post(f"/v2/{ep}/runsync?wait=60000", json={"input": {"text": "hi"}}).json()
            took.append(time.perf_counter() - started)
            assert body["status"] == "COMPLETED", body
        burst_ep = cluster.create_endpoint(name="burst", workersMin=0, workersMax=4, idleTimeout=2,
                                           flashboot=False,
                                           scalerType="REQUEST_COUNT", scalerValue=1,
                                           command=python_command(FAST))
        bursts = []
        for _ in range(max(1, samples // 2)):
            wait_until(lambda: _workers(http, burst_ep) == 0, timeout_s=60, what="burst endpoint at zero")
            started = time.perf_counter()
            for _ in range(12):
                assert http.post(f"/v2/{burst_ep}/run", json={"input": {"sleep": 3}}).status_code == 200

            def ready() -> bool:
                w = http.get(f"/v2/{burst_ep}/health").json()["workers"]
                return w["idle"] + w["running"] >= 4

            wait_until(ready, timeout_s=60, interval_s=0.02, what="workersMax ready")
            bursts.append(time.perf_counter() - started)
            done = 12 * len(bursts)
            wait_until(lambda: http.get(f"/v2/{burst_ep}/health").json()["jobs"]["completed"] >= done,
                       timeout_s=120, what="burst done")
    start_s = worker_start_s(ECHO, samples)
    zero_s = statistics.median(took)
    return {"worker_start_s": start_s, "scale_from_zero_s": zero_s,
            "scale_from_zero_overhead_s": zero_s - start_s, "burst_to_max_s": statistics.median(bursts)}


# -- the simulated fleet ------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(f"[scale] {text}", file=sys.stderr, flush=True)


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _count_workers(nats_url: str) -> int:
    bus = await Bus.connect(BusSettings(url=nats_url, name="bench"))
    try:
        return sum([len(n.workers) async for _, n in bus.nodes.items()])
    finally:
        await bus.close()


async def _observe(nats_url: str, nodes: int, probes: set[str], decided: dict[str, int],
                   sent: dict[str, int], stop: asyncio.Event) -> None:
    """Record, per probe endpoint, when the autoscaler wrote its first target above zero (the
    server's timestamp of the KV write) and when the scheduler's StartWorker for it went out
    (seen by this lightly loaded process listening on every node's command subject, beside the
    node itself; the simulated node's own arrival time would add its busy event loop)."""
    bus = await Bus.connect(BusSettings(url=nats_url, name="bench-observer"))
    commands: Codec[NodeCommand] = Codec(NodeCommand)

    async def on_command(msg) -> None:
        command = commands.decode(msg.data)
        if isinstance(command, StartWorker) and command.spec.id in probes:
            sent.setdefault(command.spec.id, int(time.time() * 1000))

    for index in range(nodes):
        await bus.nc.subscribe(subjects.node_cmd(node_name(index)), cb=on_command)
    watcher = await bus.scale.kv.watch(">")
    try:
        while not stop.is_set():
            try:
                entry = await watcher.updates(timeout=0.5)
            except Exception:
                continue
            if entry is None or entry.value is None or entry.key not in probes or entry.key in decided:
                continue
            target = bus.scale.codec.decode(entry.value)
            if target.desired_workers >= 1:
                decided[entry.key] = int(entry.created.timestamp() * 1000)
                WATCH_LAG_MS.append(time.time() * 1000 - decided[entry.key])
    finally:
        await watcher.stop()
        await bus.close()


def simulated_fleet(nodes: int, workers: int, probes: int) -> dict[str, float]:
    env = {"RP_NODE_LOSS_TIMEOUT_S": "30", "RP_LOG_LEVEL": "WARNING"}
    events = Path(tempfile.mkdtemp(prefix="rp-fleet-")) / "starts.jsonl"
    with Cluster(nodes=0, env=env) as cluster, cluster.client() as http:
        assert cluster.nats is not None
        fleet_log = events.with_name("fleet.log")
        with open(fleet_log, "w") as out:
            fleet = subprocess.Popen([sys.executable, "-m", "bench.fleet", "--nats", cluster.nats.url,
                                      "--nodes", str(nodes), "--events", str(events)], cwd=ROOT,
                                     stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: "fleet ready" in fleet_log.read_text(), timeout_s=120, what="fleet up")
            # Background load: fixed-size endpoints of three shapes adding up to `workers`.
            shapes = [({"gpuCount": 1, "gpuTypeIds": ["NVIDIA H100 80GB HBM3"]}, 0.3),
                      ({"gpuCount": 1, "gpuTypeIds": ["NVIDIA A100-SXM4-80GB"]}, 0.2),
                      ({"gpuCount": 0}, 0.5)]
            per_endpoint = 40
            for extra, share in shapes:
                for _ in range(round(workers * share / per_endpoint)):
                    body = {"name": "bg", "workersMin": per_endpoint, "workersMax": per_endpoint,
                            "command": ["true"], **extra}
                    assert http.post("/v1/endpoints", json=body).status_code == 201
            _say(f"{nodes} simulated nodes up, background endpoints created")
            started = time.perf_counter()
            wanted = round(workers / per_endpoint) * per_endpoint
            wait_until(lambda: asyncio.run(_count_workers(cluster.nats.url)) >= wanted, timeout_s=600,
                       interval_s=1, what=f"{wanted} simulated workers placed")
            fill_s = time.perf_counter() - started
            _say(f"{wanted} workers placed in {fill_s:.1f} s")
            time.sleep(3)  # let the control plane settle after the fill
            rss = {name: _rss_mb(svc.proc.pid) for name, svc in cluster.services.items() if svc.proc}
            nats_rss = _rss_mb(cluster.nats.proc.pid)

            probe_ids = []
            for _ in range(probes):
                resp = http.post("/v1/endpoints", json={
                    "name": "probe", "workersMin": 0, "workersMax": 1, "scalerType": "REQUEST_COUNT",
                    "scalerValue": 1, "command": ["true"], "gpuCount": 1, "gpuTypeIds": ["H100"]})
                probe_ids.append(resp.json()["id"])
            time.sleep(2)
            pids = {name: svc.proc.pid for name, svc in cluster.services.items() if svc.proc}
            pids.update(nats=cluster.nats.proc.pid, fleet=fleet.pid)
            cpu_before = {name: _cpu_s(pid) for name, pid in pids.items()}
            window = time.perf_counter()
            decided: dict[str, int] = {}
            sent: dict[str, int] = {}
            stop = asyncio.Event()
            loop = asyncio.new_event_loop()
            observer = threading.Thread(target=loop.run_until_complete, args=(
                _observe(cluster.nats.url, nodes, set(probe_ids), decided, sent, stop),), daemon=True)
            observer.start()
            time.sleep(2)
            for endpoint_id in probe_ids:  # one every 100 ms: each placement is measured alone
                assert http.post(f"/v2/{endpoint_id}/run", json={"input": {}}).status_code == 200
                time.sleep(0.1)
            _say("probe jobs submitted")
            wait_until(lambda: len(decided) == len(probe_ids) and len(sent) == len(probe_ids), timeout_s=120,
                       what="probe targets and starts")
            arrived: dict[str, int] = {}

            def placed() -> bool:
                for line in events.read_text().splitlines():
                    event = json.loads(line)
                    if event.get("endpoint") in decided and event.get("kind") == "start":
                        arrived.setdefault(event["endpoint"], event["t_ms"])
                return len(arrived) == len(decided)

            wait_until(placed, timeout_s=120, interval_s=0.5, what="probe workers started")
            loop.call_soon_threadsafe(stop.set)
            observer.join(5)
            latencies = sorted(sent[ep] - decided[ep] for ep in decided)
            at_node = sorted(arrived[ep] - decided[ep] for ep in decided)
            window = time.perf_counter() - window
            cpu = {f"cpu_share_{name}": (_cpu_s(pid) - cpu_before[name]) / window
                   for name, pid in pids.items()}
        finally:
            fleet.terminate()
            fleet.wait(30)
        placed_workers = asyncio.run(_count_workers(cluster.nats.url))
    return {
        "sim_nodes": nodes, "sim_workers": placed_workers - probes, "sim_fill_s": fill_s,
        "placement_p50_ms": percentile(latencies, 50), "placement_p99_ms": percentile(latencies, 99),
        "control_plane_rss_mb": sum(rss.get(n, 0.0) for n in ("gateway", "scheduler", "autoscaler")),
        "scheduler_rss_mb": rss.get("scheduler", 0.0), "nats_rss_mb": nats_rss,
        "placement_at_node_p50_ms": percentile(at_node, 50),
        "placement_at_node_p99_ms": percentile(at_node, 99),
        "target_watch_lag_p50_ms": percentile(sorted(WATCH_LAG_MS), 50),
        "target_watch_lag_p99_ms": percentile(sorted(WATCH_LAG_MS), 99),
        **cpu,  # cores each process used while the probes ran (2 here)
    }


def run(quick: bool = False) -> dict[str, float]:
    figures = from_zero_and_burst(samples=2 if quick else 5)
    if quick:
        figures.update(simulated_fleet(nodes=100, workers=1000, probes=20))
    else:
        figures.update(simulated_fleet(nodes=1000, workers=10000, probes=100))
    return figures


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
