"""Build the state store a policy asks for (`[state] url`).

- ``memory://``: process memory (the default);
- ``redis://``, ``rediss://``, ``unix://``: exact fleet-wide state in Redis
  (add ``?cluster=true`` for Redis Cluster);
- ``tiered+redis://``, ``tiered+rediss://``: local decisions on leased slices
  of the fleet's quota, reconciled with Redis every ``sync_interval_ms``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from .._types import Clock, RandomSource
from ..errors import PolicyError
from ..policy import Policy
from .base import StateStore
from .memory import MemoryStore

# The Redis client is an optional extra: core installs (memory state) never import it.
REDIS_EXTRA_HINT = "pip install 'fidelity-mw[redis]'"

logger = logging.getLogger("fidelity_mw.state")
_warned_workers = False  # the startup warning below: once per process


def web_concurrency(environ: Mapping[str, str] | None = None) -> int | None:
    """`WEB_CONCURRENCY` as a worker count: uvicorn (`--workers`) and gunicorn (`-w`) take
    it as their default number of worker processes, and platforms set it. None when it
    is unset or not a whole number."""
    text = (os.environ if environ is None else environ).get("WEB_CONCURRENCY", "").strip()
    try:
        return int(text)
    except ValueError:
        return None


def memory_workers_warning(workers: int) -> str:
    """What `memory://` state means under `workers` worker processes."""
    return (
        f"memory:// state under {workers} worker processes: each process counts alone, so "
        f"the service admits up to {workers} x each rate limit and each process trips its "
        "breakers on its own traffic; share the state with redis:// or tiered+redis:// "
        "(docs/operations.md)"
    )


def _warn_memory_workers() -> None:
    global _warned_workers
    workers = web_concurrency()
    if workers is None or workers <= 1 or _warned_workers:
        return
    _warned_workers = True
    logger.warning("fidelity_mw: WEB_CONCURRENCY=%d: %s", workers, memory_workers_warning(workers))


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
        _warn_memory_workers()
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
