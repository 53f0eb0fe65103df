"""Jobs from the command line: submit, watch the status live until it ends, stream chunks."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from runplane_cli import render
from runplane_cli.client import CliError, Gateway

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
# /stream ends for the RunPod SDK on these (and an empty stream); CANCELLED too here.
_POLL_MIN_S = 0.2
_POLL_MAX_S = 1.0


def percent(output: Any) -> float | None:
    """A progress update's percentage, when it says one (`{"progress": 0.4}`, `{"percent": 40}`)."""
    if isinstance(output, dict):
        for key in ("percent", "progress", "pct"):
            value = output.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value) * (100 if key == "progress" and value <= 1 else 1)
    return None


def _pause(waited_s: float) -> None:
    time.sleep(min(_POLL_MAX_S, _POLL_MIN_S + waited_s / 10))


def watch(gw: Gateway, endpoint_id: str, job_id: str, *, timeout_s: float | None) -> dict:
    """Poll /status until the job ends, showing its state (and progress updates) on stderr."""
    started = time.monotonic()
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                        console=render.err, transient=True)
    with progress:
        task = progress.add_task(f"{job_id} IN_QUEUE", total=None)
        while True:
            job = gw.get(f"/v2/{endpoint_id}/status/{job_id}")
            status = job["status"]
            if status in TERMINAL:
                return job
            detail = ""
            if status == "IN_PROGRESS" and "output" in job:
                detail = " " + json.dumps(job["output"])[:60]
            pct = percent(job.get("output")) if status == "IN_PROGRESS" else None
            progress.update(task, description=f"{job_id} {status}{detail}",
                            total=100 if pct is not None else None, completed=pct or 0)
            waited = time.monotonic() - started
            if timeout_s is not None and waited > timeout_s:
                raise CliError(f"job {job_id} is still {status} after {timeout_s:g} s")
            _pause(waited)


def print_result(job: dict, *, as_json: bool) -> int:
    """The job's output on stdout (its error on stderr); 0 only for COMPLETED."""
    if as_json:
        render.print_json(job)
    elif "output" in job:
        output = job["output"]
        print(output if isinstance(output, str) else json.dumps(output, indent=2))
    if job["status"] != "COMPLETED":
        reason = f": {job['error']}" if job.get("error") else ""
        render.err.print(f"[red]job {job['id']} {job['status']}{reason}[/]")
        return 1
    return 0


def stream(gw: Gateway, endpoint_id: str, job_id: str, *, as_json: bool, timeout_s: float | None) -> int:
    """Print each chunk as it comes (strings as they are, anything else as a JSON line) until
    the job has ended and every chunk was read."""
    started = time.monotonic()
    wrote_text = False
    while True:
        got = gw.get(f"/v2/{endpoint_id}/stream/{job_id}")
        for chunk in got.get("stream", []):
            output = chunk.get("output") if isinstance(chunk, dict) else chunk
            if as_json:
                print(json.dumps(output), flush=True)
            elif isinstance(output, str):
                sys.stdout.write(output)
                sys.stdout.flush()
                wrote_text = not output.endswith("\n")
            else:
                if wrote_text:
                    print()
                    wrote_text = False
                print(json.dumps(output), flush=True)
        if got["status"] in TERMINAL and not got.get("stream"):
            break
        if not got.get("stream"):
            waited = time.monotonic() - started
            if timeout_s is not None and waited > timeout_s:
                raise CliError(f"job {job_id} is still {got['status']} after {timeout_s:g} s")
            _pause(waited)
    if wrote_text:
        print()
    job = gw.get(f"/v2/{endpoint_id}/status/{job_id}")
    if job["status"] != "COMPLETED":
        reason = f": {job['error']}" if job.get("error") else ""
        render.err.print(f"[red]job {job_id} {job['status']}{reason}[/]")
        return 1
    return 0
