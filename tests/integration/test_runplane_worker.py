"""The stdlib `runplane_worker` SDK (examples/fast) against a real agent: same job shapes as
the RunPod SDK, batch takes with concurrency, stops, progress."""

from __future__ import annotations

import json

import pytest
import pytest_asyncio
from node_agent_harness import (
    fast_spec,
    output_of,
    record_of,
    start_worker,
    submit,
    wait_record,
    wait_worker_state,
)
from runplane_testing.waiting import async_wait_until
from test_node_agent_worker_api import cancel_like_the_gateway, consumer_settled, read_chunks

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fast(bus, agent):
    return "fast", await start_worker(bus, agent.settings.node_id, fast_spec("fast"))


async def test_completes_and_fails_like_the_runpod_sdk(bus, fast):
    ep, worker_id = fast
    done = await wait_record(bus, ep, await submit(bus, ep, {"text": "hi", "n": [1, 2]}))
    assert done.status == "COMPLETED" and output_of(done) == {"text": "hi", "n": [1, 2]}
    assert done.worker_id == worker_id and done.attempts == 1
    scalar = await wait_record(bus, ep, await submit(bus, ep, "just a string"))
    assert output_of(scalar) == "just a string"
    failed = await wait_record(bus, ep, await submit(bus, ep, {"fail": "nope"}))
    assert failed.status == "FAILED"
    error = json.loads(failed.error)
    assert set(error) == {"error_type", "error_message", "error_traceback", "hostname", "worker_id",
                          "runpod_version"}
    assert error["error_type"] == "<class 'RuntimeError'>" and error["error_message"] == "nope"
    assert error["worker_id"] == worker_id and error["hostname"].startswith(worker_id)


async def test_progress_update_then_result(bus, fast):
    ep, _ = fast
    job_id = await submit(bus, ep, {"progress": {"step": 1}, "sleep": 1.5})
    record = await wait_record(bus, ep, job_id, "IN_PROGRESS", where=lambda r: r.output_json is not None)
    assert output_of(record) == {"step": 1}
    final = await wait_record(bus, ep, job_id)
    assert final.status == "COMPLETED" and output_of(final) == {"progress": {"step": 1}, "sleep": 1.5}


@pytest.mark.parametrize("aggregate", [True, False])
async def test_generator_streams_chunks(bus, agent, aggregate):
    ep = f"faststream{'agg' if aggregate else 'noagg'}"
    await start_worker(bus, agent.settings.node_id,
                       fast_spec(ep, FAST_MODE="stream", FAST_AGGREGATE=str(aggregate).lower()))
    job_id = await submit(bus, ep, {"stream": 4})
    record = await wait_record(bus, ep, job_id)
    chunks = [{"index": i} for i in range(4)]
    assert record.status == "COMPLETED" and record.chunks == 4
    assert output_of(record) == (chunks if aggregate else [])
    stored = await read_chunks(bus, job_id, 4)
    assert [json.loads(c.chunk_json) for c in stored] == [{"output": c} for c in chunks]


async def test_concurrent_worker_takes_batches(bus, agent):
    ep = "fastbatch"
    await start_worker(bus, agent.settings.node_id, fast_spec(ep, RP_WORKER_CONCURRENCY="4"))
    ids = [await submit(bus, ep, {"i": i, "sleep": 0.05}) for i in range(40)]
    for i, job_id in enumerate(ids):
        record = await wait_record(bus, ep, job_id)
        assert record.status == "COMPLETED" and output_of(record) == {"i": i, "sleep": 0.05}
        assert record.attempts == 1
    assert await consumer_settled(bus, ep)


async def test_stop_skips_the_result_of_a_cancelled_job(bus, agent):
    ep = "faststop"
    worker_id = await start_worker(bus, agent.settings.node_id, fast_spec(ep))
    job_id = await submit(bus, ep, {"sleep": 1.5})
    await wait_record(bus, ep, job_id, "IN_PROGRESS")
    await cancel_like_the_gateway(bus, ep, job_id)
    # A sync handler runs on; the worker reports nothing and lets go when it returns.
    await async_wait_until(lambda: consumer_settled(bus, ep), timeout_s=15, what="message acked")
    await wait_worker_state(bus, agent.settings.node_id, worker_id, "idle")
    record = await record_of(bus, ep, job_id)
    assert record.status == "CANCELLED" and record.output_json is None

