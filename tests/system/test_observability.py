"""Every service answers /metrics and /healthz; the Grafana dashboard asks only for metrics the
services expose; logs are JSON lines with the job/endpoint/node/worker fields; the gateway
publishes a valid OpenAPI document."""

from __future__ import annotations

import json
import re
import subprocess

import httpx
import pytest
from openapi_spec_validator import validate

from runplane_testing.cluster import ROOT, Cluster, python_command
from runplane_testing.waiting import wait_until

from .conftest import FAST_ENV

pytestmark = pytest.mark.system

DASHBOARD = ROOT / "deploy/grafana/runplane.json"
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",),
             "untyped": ("",)}


def metrics_urls(cluster) -> dict[str, str]:
    agent_port = cluster.services["node1"].env["RP_AGENT_PORT"]
    urls = {"gateway": cluster.gateway_url, "node1": f"http://127.0.0.1:{agent_port}"}
    for name in ("scheduler", "autoscaler"):
        found = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", cluster.services[name].log_text())
        assert found, f"{name} logged no metrics URL"
        urls[name] = f"http://127.0.0.1:{found.group(1)}"
    return urls


def exposed_names(text: str) -> set[str]:
    """Every sample name a scrape can have: from `# TYPE` lines (also for labelled metrics with
    no sample yet) and from the samples themselves."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)  # a counter's TYPE line names it with `_total` already
            names.update(name + suffix for suffix in _SUFFIXES.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) > 20
    return {name for expr in exprs for name in re.findall(r"\brp_[a-z0-9_]+", expr)}


@pytest.fixture(scope="module")
def cluster():
    # Logs as a deployment writes them when not on a terminal: JSON lines.
    with Cluster(nodes=1, env=dict(FAST_ENV, RP_LOG_FORMAT="json")) as c:
        yield c


@pytest.fixture(scope="module")
def echo(cluster) -> str:
    ep = cluster.create_endpoint(name="obs-echo", command=python_command("examples/echo/handler.py"))
    cluster.wait_workers(ep, 1)
    with cluster.client() as http:
        for text in ("one", "two"):
            assert http.post(f"/v2/{ep}/runsync", json={"input": {"text": text}}).json()["status"] == "COMPLETED"
    return ep


def test_every_service_serves_metrics_and_healthz(cluster, echo):
    scraped = {}
    for name, url in metrics_urls(cluster).items():
        assert httpx.get(f"{url}/healthz", timeout=10).json()["status"] == "ok", name
        resp = httpx.get(f"{url}/metrics", timeout=10)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain"), name
        scraped[name] = resp.text
    node = scraped["node1"]
    # The list: queue depth and delay (autoscaler), jobs by status, dispatch latency,
    # workers by state, GPU utilisation and memory per node, flash start times, decode errors.
    assert re.search(rf'rp_node_agent_job_dispatch_seconds_count{{endpoint="{echo}"}} [2-9]', node)
    assert re.search(rf'rp_node_agent_endpoint_workers{{endpoint="{echo}",node="node1",state="idle"}} 1', node)
    assert re.search(rf'rp_node_agent_jobs_finished_total{{endpoint="{echo}",status="COMPLETED"}} 2', node)
    assert re.search(r'rp_node_agent_worker_start_seconds_count{kind="cold"} [1-9]', node)
    for family in ("rp_node_agent_gpu_utilization_percent", "rp_node_agent_gpu_memory_used_bytes",
                   "rp_node_agent_flash_resume_seconds", "rp_bus_dropped_messages_total"):
        assert f"# TYPE {family.removesuffix('_total')}" in node, family
    autoscaler = metrics_urls(cluster)["autoscaler"]
    wait_until(lambda: re.search(rf'rp_autoscaler_queued_jobs{{endpoint="{echo}"}} 0',
                                 httpx.get(f"{autoscaler}/metrics", timeout=10).text),
               timeout_s=10, what="the endpoint's queue depth")
    assert "rp_autoscaler_oldest_queued_age_seconds" in scraped["autoscaler"]
    assert "rp_scheduler_nodes_alive 1.0" in scraped["scheduler"]
    assert 'rp_gateway_jobs_submitted_total{kind="runsync"}' in scraped["gateway"]


def test_the_grafana_dashboard_only_uses_exposed_metrics(cluster, echo):
    exposed = set()
    for url in metrics_urls(cluster).values():
        exposed |= exposed_names(httpx.get(f"{url}/metrics", timeout=10).text)
    wanted = dashboard_metric_names()
    assert wanted - exposed == set()
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "runplane" and dashboard["templating"]["list"][0]["type"] == "datasource"


def test_logs_are_json_lines_with_ids(cluster, echo):
    def parsed(name: str) -> list[dict]:
        lines = [line for line in cluster.services[name].log_text().splitlines() if line.startswith("{")]
        return [json.loads(line) for line in lines]

    gateway = parsed("gateway")
    assert gateway and all(entry["service"] == "gateway" and "timestamp" in entry for entry in gateway)
    assert any(entry.get("endpoint_id") == echo for entry in gateway)  # "endpoint created"
    node = parsed("node1")
    assert node and all(entry.get("node_id") == "node1" for entry in node)
    worker_lines = [e for e in node if e.get("worker_id") and e.get("endpoint_id") == echo]
    assert worker_lines
    assert any((e.get("job_id") or "").startswith("sync-") for e in worker_lines)  # the SDK's lines of a job


def test_the_gateway_publishes_a_valid_openapi_document(cluster):
    spec = httpx.get(f"{cluster.gateway_url}/openapi.json", timeout=10).json()
    validate(spec)
    assert {"/v1/nodes", "/v1/endpoints/{endpoint_id}/logs", "/v2/{endpoint_id}/run"} <= set(spec["paths"])


def test_gpus_per_node_in_the_api_and_the_metrics(cluster, tmp_path):
    """A node with two (fake NVML) GPUs, one held by a worker: /v1/nodes and the agent's
    metrics show each GPU, its memory and utilisation, and who holds it."""
    lib = tmp_path / "libnvidia-ml.so.1"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib),
                    str(ROOT / "tests/fixtures/fake_nvml/fake_nvml.c")], check=True)
    agent = cluster.add_node("gpunode", LD_LIBRARY_PATH=str(tmp_path),
                             FAKE_NVML_GPUS="2:NVIDIA L40S:46068", FAKE_NVML_NODE="obs")
    ep = cluster.create_endpoint(name="obs-gpu", command=python_command("examples/echo/handler.py"),
                                 gpuCount=1, gpuTypeIds=["L40S"])
    cluster.wait_workers(ep, 1)
    with cluster.client() as http:
        node = next(n for n in http.get("/v1/nodes").json() if n["id"] == "gpunode")
        workers = http.get(f"/v1/endpoints/{ep}/workers").json()
    assert [g["name"] for g in node["gpus"]] == ["NVIDIA L40S", "NVIDIA L40S"]
    assert node["gpusUsed"] == 1 and node["gpusFree"] == 1
    held = next(g for g in node["gpus"] if g["workerId"])
    assert held["endpointId"] == ep and held["memoryTotalMb"] == 46068
    assert [(w["nodeId"], w["gpuUuids"], w["gpuNames"]) for w in workers] == [
        ("gpunode", [held["uuid"]], ["NVIDIA L40S"])]
    text = httpx.get(f"http://127.0.0.1:{agent.env['RP_AGENT_PORT']}/metrics", timeout=10).text
    total = re.findall(r'rp_node_agent_gpu_memory_total_bytes\{gpu="(\d)",name="NVIDIA L40S",node="gpunode",'
                       r'uuid="[^"]+"\} (\S+)', text)
    assert [gpu for gpu, _ in sorted(total)] == ["0", "1"]
    assert all(float(value) == 46068 * 1024 * 1024 for _, value in total)
    assert len(re.findall(r'rp_node_agent_gpu_utilization_percent\{[^}]*node="gpunode"', text)) == 2
    assigned = re.findall(r'rp_node_agent_gpu_assigned\{endpoint="([^"]*)",gpu="\d"[^}]*\} (\S+)', text)
    assert sorted(assigned) == sorted([(ep, "1.0"), ("", "0.0")])
