"""Worker runtimes behind one interface."""

from __future__ import annotations

import structlog

from runplane_node_agent.runtimes.base import (
    Adopted,
    Capability,
    Launch,
    RunningWorker,
    Runtime,
    RuntimeFailure,
)
from runplane_node_agent.settings import AgentSettings

log = structlog.get_logger("runplane.node_agent.runtimes")


async def open_runtime(settings: AgentSettings) -> Runtime:
    """The runtime RP_RUNTIME names, opened (capabilities detected). `auto`: Docker when an
    engine answers, else the process runtime."""
    if settings.runtime in ("docker", "auto"):
        from runplane_node_agent.runtimes.docker import DockerRuntime

        runtime: Runtime = DockerRuntime(settings)
        try:
            await runtime.open()
            return runtime
        except RuntimeFailure as exc:
            await runtime.close()
            if settings.runtime == "docker":
                raise
            log.info("no Docker engine, using the process runtime", reason=str(exc))
    if settings.runtime in ("process", "auto"):
        from runplane_node_agent.runtimes.process import ProcessRuntime

        runtime = ProcessRuntime()
        await runtime.open()
        return runtime
    raise ValueError(f"unknown runtime {settings.runtime!r} (known: process, docker, auto)")


__all__ = ["Adopted", "Capability", "Launch", "RunningWorker", "Runtime", "RuntimeFailure", "open_runtime"]
