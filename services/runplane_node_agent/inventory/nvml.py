"""GPUs through NVML (nvidia-ml-py). No driver, no library, no GPUs: an empty inventory."""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from runplane_proto.nodes import GpuInfo

log = structlog.get_logger("runplane.node_agent.nvml")


@dataclass(frozen=True)
class GpuSnapshot:
    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlInventory:
    """Reads the GPUs once per call; `available` is False when NVML could not start."""

    def __init__(self) -> None:
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # no driver / no libnvidia-ml: a CPU node
            log.info("no GPUs: NVML unavailable", reason=str(exc))

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def read(self) -> GpuSnapshot:
        nv = self._nvml
        if nv is None:
            return GpuSnapshot()
        try:
            driver = _text(nv.nvmlSystemGetDriverVersion())
            cuda_raw = nv.nvmlSystemGetCudaDriverVersion()  # e.g. 12040
            cuda = f"{cuda_raw // 1000}.{(cuda_raw % 1000) // 10}"
            gpus = []
            for index in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                memory = nv.nvmlDeviceGetMemoryInfo(handle)
                try:
                    utilization = int(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
                except Exception:  # not supported on every device (e.g. MIG)
                    utilization = 0
                gpus.append(GpuInfo(
                    index=index, uuid=_text(nv.nvmlDeviceGetUUID(handle)),
                    name=_text(nv.nvmlDeviceGetName(handle)),
                    memory_total_mb=int(memory.total // (1024 * 1024)),
                    memory_used_mb=int(memory.used // (1024 * 1024)),
                    utilization_pct=utilization,
                ))
            return GpuSnapshot(tuple(gpus), driver, cuda)
        except Exception as exc:
            log.warning("reading GPUs failed", error=str(exc))
            return GpuSnapshot()

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None
