"""The handler in the Docker tests' worker image (runpod.serverless.start, RunPod's SDK).

Input keys: `sleep` (s), `exit` (the process exits with this code mid-job), `allocate_mb`
(allocate and touch this much memory), `connect` (a list of [host, port]: try a TCP
connection to each, report "open" or the error), `env` (a list of variable names to return).
"""

import os
import socket
import time

import runpod


def handler(job):
    data = job["input"] if isinstance(job["input"], dict) else {"value": job["input"]}
    if "sleep" in data:
        time.sleep(data["sleep"])
    if "exit" in data:
        print(f"exiting with {data['exit']} in the middle of job {job['id']}", flush=True)
        os._exit(int(data["exit"]))
    if "allocate_mb" in data:
        chunks = []
        for _ in range(int(data["allocate_mb"])):
            chunks.append(bytearray(1024 * 1024))  # zero-filled pages: really committed
            chunks[-1][::4096] = b"x" * len(chunks[-1][::4096])
    reached = {}
    for host, port in data.get("connect", []):
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                reached[f"{host}:{port}"] = "open"
        except OSError as exc:
            reached[f"{host}:{port}"] = type(exc).__name__
    print(f"job {job['id']} done", flush=True)
    return {"echo": data, "hostname": socket.gethostname(), "uid": os.getuid(), "reached": reached,
            "env": {name: os.environ.get(name) for name in data.get("env", [])}}


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
