"""The bus: one NATS connection with JetStream, the topology, typed KV access, payloads."""

from runplane_bus.bus import Bus, BusSettings
from runplane_bus.records import Conflict, TypedKV, Versioned

__all__ = ["Bus", "BusSettings", "Conflict", "TypedKV", "Versioned"]
