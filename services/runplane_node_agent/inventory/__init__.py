"""This node's resources: host facts and GPUs (NVML, or a static twin)."""
