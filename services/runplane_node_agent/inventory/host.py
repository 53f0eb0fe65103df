"""What this node has: CPUs, memory, GPUs. Static facts read once, GPU usage per call."""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from typing import Protocol

from runplane_node_agent.inventory.nvml import GpuSnapshot, NvmlInventory


class GpuInventory(Protocol):
    def read(self) -> GpuSnapshot: ...

    def close(self) -> None: ...


class StaticGpuInventory:
    """A fixed set of GPUs (a twin for tests and for nodes without NVML)."""

    def __init__(self, snapshot: GpuSnapshot | None = None) -> None:
        self.snapshot = snapshot or GpuSnapshot()

    def read(self) -> GpuSnapshot:
        return self.snapshot

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    cpu_count: int
    memory_total_mb: int


def read_host() -> HostFacts:
    return HostFacts(hostname=socket.gethostname(), cpu_count=os.cpu_count() or 1,
                     memory_total_mb=_memory_total_mb())


@dataclass(frozen=True)
class HostUsage:
    memory_available_mb: int
    disk_total_mb: int
    disk_free_mb: int


def read_usage(disk_path: str = "/") -> HostUsage:
    """What changes while the node runs: available memory and the disk's size and free space
    (0 when unknown)."""
    available_mb = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available_mb = int(line.split()[1]) // 1024
                    break
    except (OSError, ValueError):
        pass
    try:
        disk = shutil.disk_usage(disk_path)
        total_mb, free_mb = disk.total // (1024 * 1024), disk.free // (1024 * 1024)
    except OSError:
        total_mb = free_mb = 0
    return HostUsage(memory_available_mb=available_mb, disk_total_mb=total_mb, disk_free_mb=free_mb)


def _memory_total_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError, AttributeError):
        return 0


class HostInventory:
    """Host facts plus the GPUs of this node."""

    def __init__(self, gpus: GpuInventory | None = None) -> None:
        self.host = read_host()
        self.gpus: GpuInventory = gpus if gpus is not None else NvmlInventory()

    def read_gpus(self) -> GpuSnapshot:
        return self.gpus.read()

    def close(self) -> None:
        self.gpus.close()
