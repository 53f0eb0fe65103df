"""Floors measured in the same run: a bare HTTP no-op, a NATS request/reply, JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import httpx
import nats

from bench.stats import percentile
from runplane_testing.natsserver import free_port, wait_port

_HTTP_APP = textwrap.dedent("""
    import sys, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route
    async def noop(request):
        await request.body()
        return Response(b'{"id":"x","status":"COMPLETED","output":null}', media_type="application/json")
    app = Starlette(routes=[Route("/noop", noop, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                http="httptools", loop="uvloop", access_log=False)
""")

_REPLIER = textwrap.dedent("""
    import asyncio, sys, nats, uvloop
    async def main():
        nc = await nats.connect(sys.argv[1])
        async def echo(msg):
            await msg.respond(msg.data)
        await nc.subscribe("bench.echo", cb=echo)
        await nc.flush()  # the server has the subscription before anyone is told to ask
        print("ready", flush=True)
        await asyncio.Event().wait()
    uvloop.run(main())
""")


@contextlib.contextmanager
def http_floor_server() -> Iterator[str]:
    """A bare Starlette no-op under uvicorn in its own process; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _HTTP_APP, str(port)])
    try:
        wait_port("127.0.0.1", port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def http_floor_call(http: httpx.Client, body: bytes) -> float:
    """One no-op POST to the floor server (ms)."""
    t0 = time.perf_counter()
    resp = http.post("/noop", content=body)
    elapsed = (time.perf_counter() - t0) * 1000
    assert resp.status_code == 200
    return elapsed


def http_floor_ms(body: bytes, samples: int, headers: dict[str, str]) -> list[float]:
    """Sequential POSTs to a bare Starlette no-op under uvicorn, with the same client as runsync."""
    with http_floor_server() as url, httpx.Client(base_url=url, headers=headers) as http:
        for _ in range(50):
            http_floor_call(http, body)
        return [http_floor_call(http, body) for _ in range(samples)]


def nats_rr_floor_ms(url: str, body: bytes, samples: int) -> list[float]:
    proc = subprocess.Popen([sys.executable, "-c", _REPLIER, url], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"

        async def measure() -> list[float]:
            nc = await nats.connect(url)
            for _ in range(50):
                await nc.request("bench.echo", body, timeout=5)
            out = []
            for _ in range(samples):
                t0 = time.perf_counter()
                await nc.request("bench.echo", body, timeout=5)
                out.append((time.perf_counter() - t0) * 1000)
            await nc.close()
            return out

        return asyncio.run(measure())
    finally:
        proc.kill()
        proc.wait()


def jetstream_floor_jobs_per_s(url: str, body: bytes, count: int) -> float:
    """Publish `count` messages to a work-queue stream (pipelined) and pull-consume + ack them."""

    async def measure() -> float:
        nc = await nats.connect(url)
        js = nc.jetstream()
        name = f"BENCHFLOOR{free_port()}"
        await js.add_stream(name=name, subjects=[f"benchfloor.{name}"], retention="workqueue")
        sub = await js.pull_subscribe(f"benchfloor.{name}", durable="floor")
        t0 = time.perf_counter()

        async def produce() -> None:
            acks = [await js.publish_async(f"benchfloor.{name}", body) for _ in range(count)]
            await asyncio.gather(*acks)

        async def consume() -> None:
            done = 0
            while done < count:
                try:
                    msgs = await sub.fetch(64, timeout=1)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    await msg.ack()
                done += len(msgs)

        await asyncio.gather(produce(), consume())
        elapsed = time.perf_counter() - t0
        await js.delete_stream(name)
        await nc.close()
        return count / elapsed

    return asyncio.run(measure())


__all__ = ["http_floor_ms", "nats_rr_floor_ms", "jetstream_floor_jobs_per_s", "percentile"]
