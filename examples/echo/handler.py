"""Echo worker: a RunPod-style handler that runs unchanged on Runplane.

    {"text": "hi"}                 -> {"echo": {"text": "hi"}, "upper": "HI"}
    {"sleep": 2}                   -> reports progress, waits 2 s, then echoes
    {"fail": "bad input"}          -> raises: the job ends FAILED with the SDK's error
    {"refresh": true}              -> asks for a fresh worker after this job
    {"stream": 3}                  -> with ECHO_MODE=stream: yields 3 chunks

Environment: ECHO_MODE=stream serves the generator handler; ECHO_AGGREGATE=false
stops sending the chunks again as the final output.

Try it locally:  python handler.py --test_input '{"input": {"text": "hi"}}'
"""

import asyncio
import os

import runpod


async def handler(job):
    data = job["input"]
    if not isinstance(data, dict):
        data = {"text": data}

    if "sleep" in data:
        runpod.serverless.progress_update(job, {"sleeping_s": data["sleep"]})
        await asyncio.sleep(float(data["sleep"]))  # async, so a cancel can stop it

    if "fail" in data:
        raise RuntimeError(data["fail"])

    result = {"echo": data}
    if isinstance(data.get("text"), str):
        result["upper"] = data["text"].upper()
    if data.get("refresh"):
        result["refresh_worker"] = True  # the SDK turns this into stopPod
    return result


async def stream_handler(job):
    data = job["input"]
    for index in range(int(data.get("stream", 3))):
        if "sleep" in data:
            await asyncio.sleep(float(data["sleep"]))
        yield {"index": index, "text": str(data.get("text", "")).upper()}


if __name__ == "__main__":
    streaming = os.environ.get("ECHO_MODE") == "stream"
    runpod.serverless.start({
        "handler": stream_handler if streaming else handler,
        "return_aggregate_stream": os.environ.get("ECHO_AGGREGATE", "true") == "true",
    })
