"""A worker with a slow initialisation, for flash boot (RunPod SDK; stdlib otherwise, so it also
runs as `python -c "$(cat handler.py)"` in any image with the SDK).

Before `serverless.start()` it "loads a model": sleeps INIT_S seconds and holds HOLD_MB of
memory. With INIT_MARKER set, the first initialisation writes that file and later ones that
find it (a snapshot of an initialised worker) skip the sleep, as a worker would skip
downloading weights it finds on disk.

Each job returns {"input", "pid", "init_skipped", "init_s", "gpus"} (gpus: CUDA_VISIBLE_DEVICES).
"""

import os
import time

import runpod

started = time.monotonic()
marker = os.environ.get("INIT_MARKER")
init_skipped = bool(marker) and os.path.exists(marker)
if not init_skipped:
    time.sleep(float(os.environ.get("INIT_S", "0")))
    if marker:
        os.makedirs(os.path.dirname(marker) or ".", exist_ok=True)
        with open(marker, "w") as f:
            f.write("initialised\n")
held = bytearray(int(os.environ.get("HOLD_MB", "0")) * 1024 * 1024)
held[::4096] = b"x" * len(held[::4096])  # touched: really resident
init_s = round(time.monotonic() - started, 3)


def handler(job):
    return {"input": job["input"], "pid": os.getpid(), "init_skipped": init_skipped, "init_s": init_s,
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
