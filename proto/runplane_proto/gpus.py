"""What a GPU type id names, and how many workers of a shape a fleet could hold at most.

Shared by the scheduler (placement) and the autoscaler (capacity-aware scaling) so both
read `gpuTypeIds` the same way.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from runplane_proto.nodes import NodeStatus


def _tokens(name: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", name.lower())


@functools.lru_cache(maxsize=4096)
def normalised(name: str) -> str:
    """A GPU name in lower-case words, so spellings of one model group together."""
    return " ".join(_tokens(name))


@functools.lru_cache(maxsize=4096)
def gpu_matches(type_id: str, gpu_name: str) -> bool:
    """A GPU type id names a GPU when its words appear in the GPU's name, in order and
    whole (`H100` and `NVIDIA H100 80GB HBM3` match; `A10` and `NVIDIA A100` do not),
    ignoring case and punctuation."""
    wanted, name = _tokens(type_id), _tokens(gpu_name)
    return bool(wanted) and any(name[i:i + len(wanted)] == wanted for i in range(len(name) - len(wanted) + 1))


def fleet_capacity(nodes: Iterable[NodeStatus], gpu_count: int,
                   gpu_type_ids: list[str] | tuple[str, ...]) -> int:
    """The most workers needing `gpu_count` GPUs of one of `gpu_type_ids` (any type if empty)
    that these nodes could run if nothing else ran there (draining nodes excluded). A worker
    takes GPUs of one model."""
    if gpu_count <= 0:
        raise ValueError("fleet_capacity is for GPU workers")
    total = 0
    for node in nodes:
        if node.draining or not node.gpus:
            continue
        models: dict[str, int] = {}
        for gpu in node.gpus:
            if not gpu_type_ids or any(gpu_matches(t, gpu.name) for t in gpu_type_ids):
                key = normalised(gpu.name)
                models[key] = models.get(key, 0) + 1
        total += sum(n // gpu_count for n in models.values())
    return total
