"""coldstart: request-to-result time (/runsync, client side) on an endpoint at zero workers.

For each runtime (process, docker) and worker (`slow`: its initialisation takes 2 s, as loading
a model would; `trivial`: none), all measured in one run (examples/flash/handler.py):
* cold_ms_<runtime>_<worker>: a cold start (flashboot off: the worker is started for the job);
* snapshot_ms_docker_<worker>: a cold start from the endpoint's snapshot image (flash boot;
  the parked worker evicted first), in which the initialisation finds what it wrote on disk;
* flash_ms_<runtime>_<worker>: a flash start: the endpoint's parked (paused) worker wakes for
  the job;
* warm_ms_<runtime>_<worker>: an already-running worker (flashboot off, workersMin 1), the floor;
* flash_over_warm_<runtime>_<worker>_ms = flash - warm (target < 50) and
  flash_over_cold_<runtime>_<worker> = flash / cold (target < 0.05 for the slow worker).
Medians of `samples` requests each; every cold and flash sample starts from zero workers.
The RunPod SDK looks at its job queue every 100 ms when idle: a thawed worker always waits
one such tick, a running one half a tick on average. The same warm and flash figures with
the stdlib worker SDK (examples/fast, no such tick) show the flash path's own cost:
warm_ms_process_stdlib, flash_ms_process_stdlib, flash_over_warm_process_stdlib_ms.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import httpx

from runplane_testing.cluster import ROOT, Cluster, python_command
from runplane_testing.nodewatch import NodeWatch
from runplane_testing.waiting import wait_until

HANDLER = "examples/flash/handler.py"
STDLIB = "examples/fast/handler.py"  # runplane_worker: takes its next job as soon as it is free
WORKER_IMAGE = "runplane/test-worker:latest"
INIT_S = {"slow": "2", "trivial": "0"}
# Inside the container: what the slow worker's initialisation leaves on disk.
MARKER = "/var/cache/runplane-bench/initialised"
NODE = "bench-node"


def _say(text: str) -> None:
    print(f"[coldstart] {text}", file=sys.stderr, flush=True)


def _runsync_ms(http: httpx.Client, ep: str, payload: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    body = http.post(f"/v2/{ep}/runsync?wait=120000", json={"input": payload}).json()
    took = (time.perf_counter() - started) * 1000
    assert body["status"] == "COMPLETED", body
    return took, body["output"]


def _spec(runtime: str, kind: str, *, flash: bool, workers_min: int) -> dict[str, object]:
    spec: dict[str, object] = {"name": f"{'flash' if flash else 'plain'}-{kind}-{workers_min}",
                               "workersMin": workers_min, "workersMax": 1, "idleTimeout": 1,
                               "flashboot": flash, "env": {"INIT_S": INIT_S[kind]}}
    if runtime == "docker":
        spec.update(imageName=WORKER_IMAGE, command=["python", "-u", "-c", (ROOT / HANDLER).read_text()])
        spec["env"] = {"INIT_S": INIT_S[kind], "INIT_MARKER": MARKER}
    else:
        spec["command"] = python_command(HANDLER)
    return spec


def _at_zero(watch: NodeWatch, ep: str) -> bool:
    return not watch.workers(ep, parked=True)


def _parked(watch: NodeWatch, ep: str) -> bool:
    workers = watch.workers(ep, parked=True)
    return bool(workers) and all(w.state == "parked" for _, w in workers)


def _sample(http: httpx.Client, ep: str, samples: int, before: Callable[[], None], what: str) -> list[float]:
    took = []
    for i in range(samples):
        before()
        ms, _ = _runsync_ms(http, ep, {"sample": i})
        took.append(ms)
    _say(f"{what}: {', '.join(f'{t:.0f}' for t in took)} ms")
    return took


def _settle(watch: NodeWatch, ep: str) -> None:
    """Parked, and its poll open (as for the warm worker: a second after its last job)."""
    wait_until(lambda: _parked(watch, ep), timeout_s=120, what="parked")
    time.sleep(1.5)


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60, check=True).stdout


def _evict_parked_container(watch: NodeWatch, ep: str) -> None:
    """Remove the endpoint's parked container behind the agent's back (it reaps it), so that the
    next request is a cold start again, this time from the snapshot."""
    wait_until(lambda: _parked(watch, ep), timeout_s=60, what="parked")
    for _, worker in watch.workers(ep, parked=True):
        for cid in _docker("ps", "-q", "--filter", f"label=runplane.worker_id={worker.worker_id}").split():
            _docker("rm", "-f", cid)
    wait_until(lambda: _at_zero(watch, ep), timeout_s=60, what="the parked worker gone")


def _measure(runtime: str, samples: int) -> dict[str, float]:
    env = {"RP_LOG_LEVEL": "WARNING", "RP_STOP_GRACE_S": "2"}
    node_env = {"RP_RUNTIME": runtime, "RP_PARK_MEMORY_MB": "4096"}
    figures: dict[str, float] = {}
    with Cluster(nodes=0, env=env) as cluster, NodeWatch(cluster.nats.url) as watch, httpx.Client(
            base_url=cluster.gateway_url, headers={"Authorization": f"Bearer {cluster.api_key}"},
            timeout=180) as http:
        cluster.add_node(NODE, **node_env)
        try:
            for kind in ("slow", "trivial"):
                key = f"{runtime}_{kind}"
                warm = cluster.create_endpoint(**_spec(runtime, kind, flash=False, workers_min=1))
                cluster.wait_workers(warm, 1, timeout_s=120)
                _runsync_ms(http, warm, {"first": True})
                # The RunPod SDK polls for its next job a second after the last one (its loop sleeps
                # while its one slot is taken): give it that second, so that each request finds
                # an idle worker with its poll open, as a flash worker has.
                warm_ms = _sample(http, warm, max(5, samples * 3), lambda: time.sleep(1.5), f"{key} warm")

                cold = cluster.create_endpoint(**_spec(runtime, kind, flash=False, workers_min=0))
                cold_ms = _sample(http, cold, samples, lambda: wait_until(
                    lambda: _at_zero(watch, cold), timeout_s=120, what="at zero"), f"{key} cold")

                flash = cluster.create_endpoint(**_spec(runtime, kind, flash=True, workers_min=0))
                _, first = _runsync_ms(http, flash, {"first": True})  # cold; on Docker it saves the snapshot
                assert not first["init_skipped"], first
                flash_ms = _sample(http, flash, samples, lambda: _settle(watch, flash), f"{key} flash")

                figures.update({
                    f"cold_ms_{key}": statistics.median(cold_ms),
                    f"flash_ms_{key}": statistics.median(flash_ms),
                    f"warm_ms_{key}": statistics.median(warm_ms),
                })
                if runtime == "docker":
                    snapshots = ("images", "-q", "--filter", f"label=runplane.endpoint_id={flash}")
                    wait_until(lambda: _docker(*snapshots), timeout_s=120, what="the snapshot image")
                    snapshot_ms = _sample(http, flash, samples, lambda: _evict_parked_container(watch, flash),
                                          f"{key} snapshot")
                    _, out = _runsync_ms(http, flash, {"check": True})
                    assert out["init_skipped"], out  # started from the snapshot: initialisation skipped
                    figures[f"snapshot_ms_{key}"] = statistics.median(snapshot_ms)
                for ep in (warm, cold, flash):
                    http.delete(f"/v1/endpoints/{ep}")
            if runtime == "process":  # the same two, with the stdlib worker SDK (no loop tick)
                stdlib = {"command": python_command(STDLIB), "workersMax": 1, "idleTimeout": 1}
                warm = cluster.create_endpoint(name="stdlib-warm", workersMin=1, flashboot=False, **stdlib)
                cluster.wait_workers(warm, 1, timeout_s=120)
                _runsync_ms(http, warm, {"first": True})
                warm_ms = _sample(http, warm, max(5, samples * 3), lambda: time.sleep(0.2), "stdlib warm")
                flash = cluster.create_endpoint(name="stdlib-flash", workersMin=0, flashboot=True, **stdlib)
                _runsync_ms(http, flash, {"first": True})
                flash_ms = _sample(http, flash, samples, lambda: _settle(watch, flash), "stdlib flash")
                figures.update({"warm_ms_process_stdlib": statistics.median(warm_ms),
                                "flash_ms_process_stdlib": statistics.median(flash_ms)})
        finally:
            if runtime == "docker":
                cluster.services[NODE].stop()
                images = _docker("images", "-q", "--filter", f"label=runplane.node_id={NODE}").split()
                if images:
                    subprocess.run(["docker", "rmi", "-f", *sorted(set(images))], capture_output=True)
    return figures


def run(quick: bool = False) -> dict[str, float]:
    samples = 1 if quick else 3
    try:
        _docker("image", "inspect", WORKER_IMAGE)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"coldstart needs Docker and {WORKER_IMAGE}: run ./scripts/images ({exc})") from exc
    figures: dict[str, float] = {}
    for runtime in ("process", "docker"):
        figures.update(_measure(runtime, samples))
    out: dict[str, float] = {}
    for runtime in ("process", "docker"):
        for kind in ("slow", "trivial"):
            key = f"{runtime}_{kind}"
            for name in ("cold", "snapshot", "flash", "warm"):
                if f"{name}_ms_{key}" in figures:
                    out[f"{name}_ms_{key}"] = round(figures[f"{name}_ms_{key}"], 1)
            flash, warm = figures[f"flash_ms_{key}"], figures[f"warm_ms_{key}"]
            out[f"flash_over_warm_{key}_ms"] = round(flash - warm, 1)
            out[f"flash_over_cold_{key}"] = round(flash / figures[f"cold_ms_{key}"], 4)
    out["warm_ms_process_stdlib"] = round(figures["warm_ms_process_stdlib"], 1)
    out["flash_ms_process_stdlib"] = round(figures["flash_ms_process_stdlib"], 1)
    out["flash_over_warm_process_stdlib_ms"] = round(figures["flash_ms_process_stdlib"]
                                                     - figures["warm_ms_process_stdlib"], 1)
    return out
