"""Worker runtimes behind one interface."""

from __future__ import annotations

from runplane_node_agent.runtimes.base import Capability, Launch, RunningWorker, Runtime


def create(name: str) -> Runtime:
    """The runtime named by RP_RUNTIME."""
    if name == "process":
        from runplane_node_agent.runtimes.process import ProcessRuntime

        return ProcessRuntime()
    raise ValueError(f"unknown runtime {name!r} (known: process)")


__all__ = ["Capability", "Launch", "RunningWorker", "Runtime", "create"]
