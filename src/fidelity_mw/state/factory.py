"""Build the state store a policy asks for (`[state] url`).

- ``memory://``: process memory (the default);
- ``redis://``, ``rediss://``, ``unix://``: exact fleet-wide state in Redis
  (add ``?cluster=true`` for Redis Cluster);
- ``tiered+redis://``, ``tiered+rediss://``: local decisions on leased slices
  of the fleet's quota, reconciled with Redis every ``sync_interval_ms``.
"""

from __future__ import annotations

from .._types import Clock, RandomSource
from ..errors import PolicyError
from ..policy import Policy
from .base import StateStore
from .memory import MemoryStore


def store_from_policy(policy: Policy, rng: RandomSource, clock: Clock) -> StateStore:
    state = policy.state
    url = state.url
    if url.startswith("memory://"):
        return MemoryStore(max_keys=state.max_keys, rng=rng)
    if url.startswith(("tiered+redis://", "tiered+rediss://")):
        from .tiered import TieredStore

        return TieredStore(config=state, rng=rng, clock=clock)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisStore

        return RedisStore(config=state, rng=rng, clock=clock)
    raise PolicyError.at("state.url", f"{url!r}: this build has no store for that scheme")
