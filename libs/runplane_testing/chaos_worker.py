"""The chaos campaign's worker, on RunPod's own worker SDK (`runpod.serverless.start`).

Input `{"token": t, "sleep": s, "stream": n}`. Every execution appends `<job id> <token>` to
the file named by CHAOS_EXECUTIONS (one short O_APPEND write, so lines from concurrent
workers never interleave), which is how the campaign counts jobs executed more than once.
The output names the token and the job id it was given, so a result delivered for the wrong
job is seen. CHAOS_MODE=stream serves a generator handler yielding `n` chunks.
"""

import asyncio
import os

import runpod


def _record(job) -> dict:
    data = job["input"] if isinstance(job["input"], dict) else {}
    line = f"{job['id']} {data.get('token', '-')}\n".encode()
    fd = os.open(os.environ["CHAOS_EXECUTIONS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return data


async def handler(job):
    data = _record(job)
    await asyncio.sleep(float(data.get("sleep", 0)))  # async, so a cancel can stop it
    return {"token": data.get("token"), "job": job["id"]}


async def stream_handler(job):
    data = _record(job)
    for index in range(int(data.get("stream", 3))):
        await asyncio.sleep(float(data.get("sleep", 0)))
        yield {"token": data.get("token"), "job": job["id"], "i": index}


if __name__ == "__main__":
    streaming = os.environ.get("CHAOS_MODE") == "stream"
    runpod.serverless.start({"handler": stream_handler if streaming else handler,
                             "return_aggregate_stream": True})
