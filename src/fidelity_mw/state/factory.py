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
import sys
from collections.abc import Mapping, Sequence
from pathlib import PurePath

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


# Servers whose workers keep the command line they were started with (uvicorn spawns
# them with its argv, gunicorn and hypercorn fork), and whose worker-count flags are known
_SERVERS = ("uvicorn", "gunicorn", "hypercorn")


def server_workers(argv: Sequence[str] | None = None) -> tuple[str, int] | None:
    """The server and worker count on the command line this process was started with
    (`uvicorn --workers 4`, `gunicorn -w 4`, `python -m uvicorn ... --workers=4`), which
    its worker processes keep. None: not one of those servers, or no count given (their
    default: `WEB_CONCURRENCY`, or 1)."""
    args = list(sys.argv if argv is None else argv)
    if not args:
        return None
    path = PurePath(args[0])
    name = path.parent.name if path.name == "__main__.py" else path.name
    server = next((s for s in _SERVERS if name == s or name.startswith(s + "-")), None)
    if server is None:
        return None
    short = server != "uvicorn"  # uvicorn has no -w
    count: int | None = None
    rest = args[1:]
    for i, arg in enumerate(rest):
        value: str | None = None
        if arg == "--workers" or (short and arg == "-w"):
            value = rest[i + 1] if i + 1 < len(rest) else None
        elif arg.startswith("--workers="):
            value = arg.partition("=")[2]
        elif short and arg.startswith("-w") and arg[2:].isdigit():
            value = arg[2:]
        if value is not None and value.strip().isdigit():
            count = int(value)  # the last one given wins, as in the servers' parsers
    return None if count is None else (server, count)


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
    if _warned_workers:
        return
    # the command line first: it overrides WEB_CONCURRENCY in both servers
    given = server_workers()
    if given is not None:
        said, workers = f"{given[0]} --workers {given[1]}", given[1]
    else:
        env = web_concurrency()
        if env is None:
            return
        said, workers = f"WEB_CONCURRENCY={env}", env
    if workers <= 1:
        return
    _warned_workers = True
    logger.warning("fidelity_mw: %s: %s", said, memory_workers_warning(workers))


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
