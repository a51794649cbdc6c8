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

# The Redis client is an optional extra: core installs (memory state) never import it.
REDIS_EXTRA_HINT = "pip install 'fidelity-mw[redis]'"


def _require_redis_client(url: str) -> None:
    try:
        import redis  # noqa: F401
    except ImportError as exc:
        raise PolicyError.at(
            "state.url",
            # the scheme only: a URL may carry a password
            f"{url.partition('://')[0]}:// needs the Redis client, an optional extra: "
            f"{REDIS_EXTRA_HINT}",
        ) from exc


def store_from_policy(policy: Policy, rng: RandomSource, clock: Clock) -> StateStore:
    state = policy.state
    url = state.url
    if url.startswith("memory://"):
        return MemoryStore(max_keys=state.max_keys, rng=rng)
    if url.startswith(("tiered+redis://", "tiered+rediss://")):
        _require_redis_client(url)
        from .tiered import TieredStore

        return TieredStore(config=state, rng=rng, clock=clock)
    if url.startswith(("redis://", "rediss://", "unix://")):
        _require_redis_client(url)
        from .redis import RedisStore

        return RedisStore(config=state, rng=rng, clock=clock)
    raise PolicyError.at("state.url", f"{url!r}: this build has no store for that scheme")
