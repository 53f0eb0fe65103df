"""Running a handler and shaping what it returns exactly like the RunPod SDK (1.12.0) does.

Pure of I/O except for calling the handler; the worker loop posts the shapes built here.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from runplane_worker.version import __version__

Job = dict[str, Any]
Result = dict[str, Any]


def is_generator(handler: Callable) -> bool:
    return inspect.isgeneratorfunction(handler) or inspect.isasyncgenfunction(handler)


def shape(output: Any) -> Result:
    """The job-done body for a handler's return value (RunPod's `run_job`)."""
    if isinstance(output, dict):
        error = output.pop("error", None)
        refresh = output.pop("refresh_worker", None)
        result: Result = {"output": output}
        if error:
            result["error"] = error
        if refresh:
            result["stopPod"] = True
    else:
        result = {"output": output}
    if result.get("output") == {}:
        result.pop("output")
    return result


def exception_result(exc: BaseException) -> Result:
    """A raised exception: `error` is a JSON string, as the RunPod SDK sends it."""
    info = {
        "error_type": str(type(exc)),
        "error_message": str(exc),
        "error_traceback": "".join(traceback.format_exception(exc)),
        "hostname": os.environ.get("RUNPOD_POD_HOSTNAME", "unknown"),
        "worker_id": os.environ.get("RUNPOD_POD_ID", "unknown"),
        "runpod_version": __version__,
    }
    return {"error": json.dumps(info)}


class AsyncRunner:
    """Runs the awaitables of one thread's handlers on that thread's own event loop.

    `cancel()` (from any thread) stops the one running now: its `run` raises CancelledError.
    """

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None

    def run(self, awaitable: Any) -> Any:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        self.task = self.loop.create_task(_as_coroutine(awaitable))
        try:
            return self.loop.run_until_complete(self.task)
        finally:
            self.task = None

    def cancel(self) -> None:
        loop, task = self.loop, self.task
        if loop is not None and task is not None:
            loop.call_soon_threadsafe(task.cancel)


def run(handler: Callable, job: Job, runner: AsyncRunner) -> Result:
    """Call a plain (sync or async) handler and shape its result."""
    try:
        value = handler(job)
        if inspect.isawaitable(value):
            value = runner.run(value)
        return shape(value)
    except Exception as exc:
        return exception_result(exc)


def stream(handler: Callable, job: Job, runner: AsyncRunner) -> Iterator[Result]:
    """Run a generator handler: yields `{"output": v}` per item, or one `{"error": ...}` and stops."""
    try:
        if inspect.isasyncgenfunction(handler):
            agen = handler(job)
            while True:
                try:
                    item = runner.run(agen.__anext__())
                except StopAsyncIteration:
                    break
                yield {"output": item}
        else:
            for item in handler(job):
                yield {"output": item}
    except Exception as exc:
        yield {"error": f"handler: {exc} \ntraceback: {traceback.format_exc()}"}


def stream_result(chunk: Result) -> Result | None:
    """The final body when a streamed chunk ends the job (an error), else None (send the chunk)."""
    output = chunk.get("output")
    if isinstance(output, dict) and output.get("error"):
        return {"error": str(output["error"])}
    if chunk.get("error"):
        return chunk
    return None


async def _as_coroutine(awaitable):
    return await awaitable

