"""contention: GPUs contended by weighted endpoints on a simulated fleet, and no thrash.

Real gateway, scheduler, autoscaler and nats-server; the nodes are simulated (bench/fleet.py:
they report what they are told to run, and their workers never take a job, so queues stay).
Three GPU endpoints of weights 1, 2 and 5 each queue more jobs than the pool has GPUs, and
arrive one after another: the first fills the whole pool alone, the later ones get their
share as idle workers of the others give way. Then:

* fair_share_max_deviation: the largest gap, over the endpoints, between the share of the
  pool an endpoint holds and its weighted part w / sum(w) (the floor, 0, is the ideal
  division; each share and its ideal part are printed too); rebalance_s: from the last
  endpoint's arrival until no more workers move;
* thrash_worker_starts_per_min / thrash_worker_stops_per_min: commands to the nodes while
  the pool stays full and the queues stay long (target 0), the endpoints shown throttled;
* capacity_resume_s: more nodes join (a second simulated fleet) -> the first worker started
  on one of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from runplane_testing.cluster import ROOT, Cluster
from runplane_testing.waiting import wait_until

WEIGHTS = (1, 2, 5)
GPUS_PER_NODE = 8


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _held(events: list[dict]) -> Counter:
    held: Counter = Counter()
    for event in events:
        if event.get("kind") in ("start", "stop"):
            held[event["endpoint"]] += 1 if event["kind"] == "start" else -1
    return held


def _fleet(cluster: Cluster, nodes: int, events: Path, offset: int) -> subprocess.Popen:
    log = open(events.with_name(f"fleet-{offset}.log"), "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, "-m", "bench.fleet", "--nats", cluster.nats.url,
                             "--nodes", str(nodes), "--events", str(events), "--offset", str(offset)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _settled(events: Path, quiet_s: float, timeout_s: float) -> float:
    """Wait until no worker has moved for `quiet_s`; the time of the last move (epoch s)."""
    def quiet() -> float | None:
        moves = [e["t_ms"] for e in _events(events) if e.get("kind") in ("start", "stop")]
        last = max(moves) / 1000 if moves else 0.0
        return last if time.time() - last >= quiet_s else None
    return wait_until(quiet, timeout_s=timeout_s, interval_s=0.5, what="placement settled")


def run(quick: bool = False, *, nodes: int | None = None, window_s: float | None = None) -> dict[str, float]:
    nodes = nodes or (10 if quick else 25)
    window_s = window_s or (20 if quick else 60)
    pool = nodes * GPUS_PER_NODE
    env = {"RP_LOG_LEVEL": "WARNING", "RP_RATE_LIMITS": "0", "RP_NODE_LOSS_TIMEOUT_S": "30"}
    events = Path(tempfile.mkdtemp(prefix="rp-contention-")) / "events.jsonl"
    events.touch()
    fleets: list[subprocess.Popen] = []
    with Cluster(nodes=0, env=env) as cluster, cluster.client() as http:
        try:
            fleets.append(_fleet(cluster, nodes, events, 0))
            endpoints: dict[str, int] = {}
            arrived_at = 0.0
            for weight in WEIGHTS:  # one after another, each wanting the whole pool
                resp = http.post("/v1/endpoints", json={
                    "name": f"w{weight}", "command": ["true"], "gpuCount": 1, "weight": weight,
                    "workersMin": 0, "workersMax": pool, "scalerType": "REQUEST_COUNT", "scalerValue": 1,
                    "idleTimeout": 3600, "flashboot": False})
                assert resp.status_code == 201, resp.text
                endpoint_id = resp.json()["id"]
                endpoints[endpoint_id] = weight
                arrived_at = time.time()
                for _ in range(pool + 10):
                    assert http.post(f"/v2/{endpoint_id}/run", json={"input": {}}).status_code == 200
                wait_until(lambda: sum(_held(_events(events)).values()) >= pool
                           and _held(_events(events))[endpoint_id] > 0, timeout_s=120,
                           what=f"the pool full, endpoint of weight {weight} placed")
            last_move = _settled(events, quiet_s=5, timeout_s=300)
            rebalance_s = max(0.0, last_move - arrived_at)
            held = _held(_events(events))
            shares = {ep: held[ep] / pool for ep in endpoints}
            ideal = {ep: w / sum(WEIGHTS) for ep, w in endpoints.items()}
            deviation = max(abs(shares[ep] - ideal[ep]) for ep in endpoints)
            throttled = all(http.get(f"/v2/{ep}/health").json()["workers"].get("throttled", 0) > 0
                            for ep in endpoints)

            before = len(_events(events))
            time.sleep(window_s)
            during = [e for e in _events(events)[before:] if e.get("kind") in ("start", "stop")]
            starts = sum(1 for e in during if e["kind"] == "start")
            stops = len(during) - starts

            extra = max(1, nodes // 5)
            mark = len(_events(events))
            fleets.append(_fleet(cluster, extra, events, 100_000))
            def after_mark(kind: str) -> dict | None:
                return next((e for e in _events(events)[mark:] if e.get("kind") == kind), None)

            ready = wait_until(lambda: after_mark("ready"), timeout_s=60, what="more nodes")
            first = wait_until(lambda: after_mark("start"), timeout_s=60, what="a worker on the new nodes")
            resume_s = (first["t_ms"] - ready["t_ms"]) / 1000
        finally:
            for fleet in fleets:
                fleet.terminate()
                fleet.wait(30)
    figures: dict[str, float] = {
        "contention_pool_gpus": pool,
        "fair_share_max_deviation": round(deviation, 4),
        "rebalance_s": round(rebalance_s, 2),
        "thrash_worker_starts_per_min": round(starts * 60 / window_s, 2),
        "thrash_worker_stops_per_min": round(stops * 60 / window_s, 2),
        "contended_endpoints_throttled": 1.0 if throttled else 0.0,
        "capacity_resume_s": round(resume_s, 3),
    }
    for ep, weight in endpoints.items():
        figures[f"share_weight_{weight}"] = round(shares[ep], 4)
        figures[f"ideal_share_weight_{weight}"] = round(ideal[ep], 4)
    return figures


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
