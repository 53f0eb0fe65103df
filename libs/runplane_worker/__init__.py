"""A small worker SDK speaking the RunPod worker protocol, standard library only.

    import runplane_worker

    def handler(job):
        return {"echo": job["input"]}

    runplane_worker.start({"handler": handler})

Config keys: `handler` (sync, async, generator or async generator), `return_aggregate_stream`,
`refresh_worker`, `concurrency` (threads; takes with job-take-batch when > 1; default from
env RP_WORKER_CONCURRENCY, else 1). Reads the same
environment as `runpod.serverless.start`; without RUNPOD_WEBHOOK_GET_JOB, or with
`--test_input '{"input": ...}'`, it runs the handler once and prints the result.
"""

from __future__ import annotations

import sys
from typing import Any

from runplane_worker.local import run_local, test_input_from_argv
from runplane_worker.transport import Urls
from runplane_worker.version import __version__
from runplane_worker.worker import Worker

_worker: Worker | None = None


def start(config: dict[str, Any]) -> None:
    """Serve jobs until told to stop (or run once locally); exits the process."""
    global _worker
    urls = Urls.from_env()
    test_input = test_input_from_argv(sys.argv[1:])
    if urls is None or test_input is not None:
        sys.exit(run_local(config, test_input))
    _worker = Worker(config, urls)
    _worker.run()
    sys.exit(0)


def progress_update(job: dict[str, Any], progress: Any) -> None:
    """Set the job's `output` while it runs (seen by /status until the result arrives)."""
    if _worker is not None:
        _worker.progress(job["id"], progress)


__all__ = ["__version__", "progress_update", "start"]
