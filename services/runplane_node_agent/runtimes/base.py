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
    # Save a worker's filesystem as an image to start later workers from (docker commit).
    SNAPSHOT = "snapshot"
    # Save a running worker's memory and restore it elsewhere or later (CRIU).
    CHECKPOINT = "checkpoint"


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


@dataclass(frozen=True)
class Snapshot:
    """Names a snapshot image: one per endpoint and version of its launch spec, per node."""

    endpoint_id: str
    # A digest of what the container is made of (image, command, env): a changed spec
    # never starts from an older spec's snapshot.
    spec_digest: str
    base_image: str


# Called with ("stdout" | "stderr", line) for every line a worker prints.
OutputSink = Callable[[str, str], None]


class RunningWorker(abc.ABC):
    """A started worker. `wait()` returns its exit code as soon as it exits."""

    worker_id: str
    pid: int | None = None
    # Why it exited, beyond the exit code ("out of memory"); set by the time `wait()` returns.
    exit_detail: str = ""

    @abc.abstractmethod
    async def wait(self) -> int: ...

    @abc.abstractmethod
    async def stop(self, grace_s: float) -> int:
        """Ask the worker to exit, kill it after `grace_s`; returns the exit code."""

    @abc.abstractmethod
    def kill(self) -> None:
        """Kill the worker and anything it started, now."""


@dataclass
class Adopted:
    """A worker still running from an earlier agent on this node, found by its labels."""

    worker_id: str
    endpoint_id: str
    gpu_uuids: tuple[str, ...]
    token: str
    handle: RunningWorker


class Runtime(abc.ABC):
    name: str
    capabilities: frozenset[Capability]
    # Workers get the agent's environment (less RP_*) under the endpoint's; False for
    # images, which bring their own (PATH, HOME, ...).
    inherits_host_env: bool = True
    # The address workers reach the agent at when it is not the agent's own host (a
    # container bridge): the agent listens there too and builds the worker URLs from it.
    worker_host: str | None = None

    async def open(self) -> None:
        """Connect and detect capabilities (once, before the first worker)."""

    @abc.abstractmethod
    async def start(self, launch: Launch, output: OutputSink) -> RunningWorker: ...

    async def pause(self, worker: RunningWorker) -> None:
        raise NotSupported(f"{self.name} runtime cannot pause workers")

    async def resume(self, worker: RunningWorker) -> None:
        raise NotSupported(f"{self.name} runtime cannot resume workers")

    async def memory_mb(self, worker: RunningWorker) -> int | None:
        """Memory the worker holds now, in MB (what parking it costs); None when unknown."""
        return None

    async def snapshot(self, worker: RunningWorker, snapshot: Snapshot) -> None:
        """Save the worker's filesystem as the snapshot image `snapshot` names."""
        raise NotSupported(f"{self.name} runtime cannot snapshot workers")

    async def snapshot_endpoints(self) -> set[str]:
        """Endpoints with snapshot images on this node."""
        return set()

    async def remove_snapshots(self, endpoint_id: str) -> int:
        """Remove the endpoint's snapshot images on this node (those in use stay); how many went."""
        return 0

    async def find_snapshot(self, snapshot: Snapshot) -> str | None:
        """The image to start `snapshot`'s endpoint from on this node, None when there is none."""
        return None

    async def adopt(self, agent_url: str, output: Callable[[str, str], OutputSink]) -> list[Adopted]:
        """Workers an earlier agent on this node left running that can still reach the agent at
        `agent_url`; the rest are removed. `output(worker_id, endpoint_id)` gives their log sinks.
        Runtimes whose workers die with the agent find none."""
        return []

    async def close(self) -> None:
        """Release what the runtime holds (workers are stopped by the supervisor first)."""
