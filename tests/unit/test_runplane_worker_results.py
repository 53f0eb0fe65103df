"""runplane_worker shapes results exactly like the RunPod SDK 1.12.0 (compared with its own code)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from runplane_worker import results
from runplane_worker.transport import Urls
from runpod.serverless.modules.rp_job import run_job, run_job_generator

FAST = Path(__file__).resolve().parents[2] / "examples" / "fast" / "handler.py"


def returning(value):
    def handler(job):
        return value() if callable(value) else value
    return handler


async def _async_handler(job):
    await asyncio.sleep(0)
    return {"async": job["input"]}


CASES = [
    returning(lambda: {"a": 1}),
    returning(lambda: {}),
    returning(lambda: {"error": "bad input"}),
    returning(lambda: {"error": "", "b": 1}),
    returning(lambda: {"error": "half", "b": 1}),
    returning(lambda: {"refresh_worker": True, "c": 1}),
    returning(lambda: {"refresh_worker": True}),
    returning(lambda: {"output": 5}),
    returning(None),
    returning(True),
    returning(0),
    returning("text"),
    returning(lambda: [1, {"x": None}]),
    _async_handler,
]


@pytest.mark.parametrize("handler", CASES)
def test_plain_handlers_match_the_runpod_sdk(handler):
    job = {"id": "j1", "input": {"k": "v"}}
    theirs = asyncio.run(run_job(handler, dict(job)))
    ours = results.run(handler, dict(job), results.AsyncRunner())
    assert ours == theirs


def test_exceptions_become_the_sdks_json_error_string(monkeypatch):
    monkeypatch.setenv("RUNPOD_POD_ID", "w1")
    monkeypatch.setenv("RUNPOD_POD_HOSTNAME", "w1-node")

    def handler(job):
        raise ValueError("no good")
    theirs = json.loads(asyncio.run(run_job(handler, {"id": "j", "input": {}}))["error"])
    ours_result = results.run(handler, {"id": "j", "input": {}}, results.AsyncRunner())
    assert set(ours_result) == {"error"}
    ours = json.loads(ours_result["error"])
    assert set(ours) == set(theirs)
    for key in ("error_type", "error_message", "hostname", "worker_id"):
        assert ours[key] == theirs[key]
    assert ours["error_type"] == "<class 'ValueError'>" and "ValueError: no good" in ours["error_traceback"]


def gen(job):
    yield 1
    yield {"a": 2}


async def agen(job):
    yield "x"
    await asyncio.sleep(0)
    yield "y"


def failing_gen(job):
    yield 1
    raise RuntimeError("mid-stream")


def error_gen(job):
    yield 1
    yield {"error": "told to stop"}
    yield 3


async def _collect(agen_):
    return [item async for item in agen_]


@pytest.mark.parametrize("handler", [gen, agen, failing_gen, error_gen])
def test_generator_chunks_match_the_runpod_sdk(handler):
    job = {"id": "j1", "input": {}}
    theirs = asyncio.run(_collect(run_job_generator(handler, job)))
    ours = list(results.stream(handler, job, results.AsyncRunner()))
    assert [c.keys() for c in ours] == [c.keys() for c in theirs]
    for mine, their in zip(ours, theirs, strict=True):
        if "error" in their:
            assert mine["error"].split(" \ntraceback:")[0] == their["error"].split(" \ntraceback:")[0]
        else:
            assert mine == their


def test_a_streamed_error_ends_the_job_like_the_sdk():
    assert results.stream_result({"output": 1}) is None
    assert results.stream_result({"output": {"error": "boom", "x": 1}}) == {"error": "boom"}
    assert results.stream_result({"error": "handler: x"}) == {"error": "handler: x"}


def test_urls_follow_the_runpod_templates():
    urls = Urls.from_env({
        "RUNPOD_WEBHOOK_GET_JOB": "http://a:1/v2/ep/job-take/$ID?gpu=cpu",
        "RUNPOD_WEBHOOK_POST_OUTPUT": "http://a:1/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=cpu",
        "RUNPOD_WEBHOOK_POST_STREAM": "http://a:1/v2/ep/job-stream/$RUNPOD_POD_ID/$ID?gpu=cpu",
        "RUNPOD_WEBHOOK_PING": "http://a:1/v2/ep/ping/$RUNPOD_POD_ID?gpu=cpu",
        "RUNPOD_POD_ID": "w1", "RUNPOD_AI_API_KEY": "k", "RUNPOD_PING_INTERVAL": "2500",
    })
    assert urls is not None and urls.ping_interval_s == 2.5
    assert urls.take(1, False) == "http://a:1/v2/ep/job-take/w1?gpu=cpu&job_in_progress=0"
    assert urls.take(4, True) == "http://a:1/v2/ep/job-take-batch/w1?gpu=cpu&batch_size=4&job_in_progress=1"
    assert urls.stop() == "http://a:1/v2/ep/job-stop/w1?gpu=cpu"
    assert urls.done("j1", True) == "http://a:1/v2/ep/job-done/w1/j1?gpu=cpu&isStream=true"
    assert urls.stream("j1") == "http://a:1/v2/ep/job-stream/w1/j1?gpu=cpu&isStream=false"
    assert urls.ping(["j1", "j2"]).startswith("http://a:1/v2/ep/ping/w1?gpu=cpu&job_id=j1%2Cj2&runpod_version=")
    assert Urls.from_env({}) is None


def test_local_test_input_runs_the_handler_once():
    ok = subprocess.run([sys.executable, str(FAST), "--test_input", '{"input": {"a": 1}}'],
                        capture_output=True, text=True, timeout=30, env={"PATH": ""})
    assert ok.returncode == 0 and json.loads(ok.stdout) == {"output": {"a": 1}}
    failing = subprocess.run([sys.executable, str(FAST), "--test_input", '{"input": {"fail": "x"}}'],
                             capture_output=True, text=True, timeout=30, env={"PATH": ""})
    assert failing.returncode == 1
    assert json.loads(json.loads(failing.stdout)["error"])["error_message"] == "x"
