"""The runtime interface: how workers are started and stopped on this node.

Callers branch on declared capabilities, never on the runtime's type.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass, field


class Capability(enum.StrEnum):
    # Freeze a worker in place and thaw it later (SIGSTOP/SIGCONT, docker pause).
    PAUSE = "pause"
    # Hand GPUs to a worker (CUDA_VISIBLE_DEVICES / device requests).
    GPU = "gpu"


class RuntimeFailure(Exception):
    """A worker could not be started or controlled."""


class NotSupported(RuntimeFailure):
    """The runtime lacks the capability an operation needs."""


@dataclass(frozen=True)
class Launch:
    """Everything a runtime needs to start one worker."""

    worker_id: str
    endpoint_id: str
    argv: tuple[str, ...]
    env: dict[str, str]
    gpu_uuids: tuple[str, ...] = ()
    image: str | None = None
    # Identify the worker outside the agent (container labels, process env).
    labels: dict[str, str] = field(default_factory=dict)


# Called with ("stdout" | "stderr", line) for every line a worker prints.
OutputSink = Callable[[str, str], None]


class RunningWorker(abc.ABC):
    """A started worker. `wait()` returns its exit code as soon as it exits."""

    worker_id: str
    pid: int | None = None

    @abc.abstractmethod
    async def wait(self) -> int: ...

    @abc.abstractmethod
    async def stop(self, grace_s: float) -> int:
        """Ask the worker to exit, kill it after `grace_s`; returns the exit code."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Kill the worker and anything it started, now."""


class Runtime(abc.ABC):
    name: str
    capabilities: frozenset[Capability]

    @abc.abstractmethod
    async def start(self, launch: Launch, output: OutputSink) -> RunningWorker: ...

    async def pause(self, worker: RunningWorker) -> None:
        raise NotSupported(f"{self.name} runtime cannot pause workers")

    async def resume(self, worker: RunningWorker) -> None:
        raise NotSupported(f"{self.name} runtime cannot resume workers")

    async def close(self) -> None:
        """Release what the runtime holds (workers are stopped by the supervisor first)."""
