"""State stores: where counters live. Memory by default; Redis and tiered by URL."""

from .base import InboundResult, LimitSpec, StateStore
from .memory import MemoryStore

__all__ = ["InboundResult", "LimitSpec", "MemoryStore", "StateStore"]
