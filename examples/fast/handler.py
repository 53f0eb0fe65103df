"""The smallest useful worker, on the stdlib-only `runplane_worker` SDK (used by benchmarks
and fast tests). By default it returns its input; the input can ask for more:

    {"sleep": s}  wait s seconds        {"fail": "msg"}  raise
    {"stream": n} (FAST_MODE=stream)    {"progress": v}  report v before finishing

RP_WORKER_CONCURRENCY=N runs N jobs at once (takes with job-take-batch).
"""

import os
import time

import runplane_worker


def handler(job):
    data = job["input"]
    if isinstance(data, dict):
        if "progress" in data:
            runplane_worker.progress_update(job, data["progress"])
        if "sleep" in data:
            time.sleep(float(data["sleep"]))
        if "fail" in data:
            raise RuntimeError(data["fail"])
    return data


def stream_handler(job):
    data = job["input"]
    for index in range(int(data.get("stream", 3))):
        yield {"index": index}


if __name__ == "__main__":
    streaming = os.environ.get("FAST_MODE") == "stream"
    runplane_worker.start({
        "handler": stream_handler if streaming else handler,
        "return_aggregate_stream": os.environ.get("FAST_AGGREGATE", "true") == "true",
    })
