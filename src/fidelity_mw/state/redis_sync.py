"""A blocking Redis client for sync callers: `FidelitySyncTransport` in scripts, Celery
workers and plain threads, where no event loop runs and the asyncio client cannot be used.

Built explicitly like the asyncio one: no client-side retries, the policy's
timeouts, a bounded pool whose wait is bounded by the same timeout. It runs
the same Lua scripts (EVALSHA, EVAL once after NOSCRIPT), and classifies
failures the same way: an error reply or a full pool fails only that call
(redis-py's blocking pool already replaces a connection broken by a restart
before using it); when Redis cannot be reached it is left alone for a short
pause (callers decide in the failure mode meanwhile) instead of every thread
paying a timeout per call.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING, Any, Final, Protocol

from redis import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import parse_url
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MaxConnectionsError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from .._logs import error_kind, warn
from .._types import Clock

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..policy import StateConfig

logger = logging.getLogger("fidelity_mw.redis")

_PAUSE_AFTER_ERROR_S: Final = 0.5
# What a call to Redis can raise, for both clients (this one and redis.py's asyncio one).
CALL_ERRORS: Final = (RedisError, OSError, TimeoutError)
# Error replies that still mean "the state is unreachable right now" (as opposed to a
# bad reply to one call): they switch a store to its failure mode.
UNREACHABLE: Final = (BusyLoadingError, ClusterDownError, ReadOnlyError, TryAgainError)
_UNREACHABLE_CODES: Final[dict[str, type[RedisError]]] = {
    "LOADING": BusyLoadingError,
    "CLUSTERDOWN": ClusterDownError,
    "READONLY": ReadOnlyError,
    "TRYAGAIN": TryAgainError,
}


def reply_error(text: str) -> RedisError:
    """The error a script's operation reported inside its reply (batch.lua, sync.lua:
    one failed alone, its text), as the exception redis-py raises for that error reply
    on a call of its own: `READONLY ...` from a replica is a `ReadOnlyError` (the store
    is in its failure mode), not a bad reply to one call."""
    kind = _UNREACHABLE_CODES.get(text.partition(" ")[0])
    if kind is None:
        return ResponseError(text)
    return kind(text.partition(" ")[2])


class PoolExhausted(MaxConnectionsError):
    """Every connection stayed busy for `timeout_ms`: this call fails, Redis is not down."""


class _Pool(BlockingConnectionPool):
    """redis-py reports a full pool as a plain ConnectionError, the same class as a
    refused connection; the wait for a free one is the only `pool.get` here."""

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisConnectionError as exc:
            if type(exc) is RedisConnectionError and str(exc) == "No connection available.":
                raise PoolExhausted(str(exc)) from exc
            raise


class _Script(Protocol):
    @property
    def sha(self) -> str: ...
    @property
    def source(self) -> str: ...


class _Stats(Protocol):
    round_trips: int
    script_loads: int
    errors: int
    pool_waits: int


class SyncLink:
    """One blocking client per store, shared by every thread (redis-py's pool is thread-safe)."""

    def __init__(
        self, url: str, cluster: bool, config: StateConfig, clock: Clock, stats: _Stats
    ) -> None:
        self.url = url  # without the `cluster` query parameter (`redis_url`)
        self.cluster = cluster
        self.config = config
        self._clock = clock
        self._stats = stats
        self._client: Any = None
        self._lock = threading.Lock()
        self._paused_until = 0.0
        # When Redis last answered this client (the store's clock; -inf: never): a
        # fallback decision's age counts from the latest reply of either client.
        self.last_ok = -math.inf

    def client(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                client = self._client
                if client is None:
                    client = self._client = self._build()
        return client

    def _build(self) -> Any:
        plain, cluster = self.url, self.cluster
        config = self.config
        timeout = config.timeout_ms / 1000.0
        connect_timeout = config.connect_timeout_ms / 1000.0
        if cluster:
            return RedisCluster.from_url(
                plain,
                retry=Retry(NoBackoff(), 0),
                max_connections=config.pool_size,
                socket_timeout=timeout,
                socket_connect_timeout=connect_timeout,
            )
        kwargs: dict[str, Any] = dict(parse_url(plain))  # type: ignore[no-untyped-call]
        pool = _Pool(  # type: ignore[no-untyped-call]
            max_connections=config.pool_size,
            timeout=timeout,  # a bounded wait for a free connection
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            retry_on_error=[],
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
            **kwargs,
        )
        return Redis(connection_pool=pool)

    def call(
        self, script: _Script, keys: Sequence[str], args: Sequence[Any]
    ) -> tuple[Any, float] | None:
        """Run a script: (reply, age_s), or None when Redis did not answer (or is paused)."""
        clock = self._clock
        started = clock.monotonic()
        if started < self._paused_until:
            return None
        client = self.client()
        try:
            reply = self._evalsha(client, script, keys, args)
        except CALL_ERRORS as exc:
            self._failed(exc)
            return None
        done = clock.monotonic()
        self.last_ok = done
        self._stats.round_trips += 1
        return reply, (done - started) / 2.0

    def _evalsha(
        self, client: Any, script: _Script, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        try:
            return client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            self._stats.script_loads += 1
            self._stats.round_trips += 1
            return client.execute_command("EVAL", script.source, len(keys), *keys, *args)

    def _failed(self, exc: BaseException) -> None:
        self._stats.errors += 1
        if isinstance(exc, MaxConnectionsError) or (
            isinstance(exc, ResponseError) and not isinstance(exc, UNREACHABLE)
        ):
            # Redis answered (an error reply) or every connection was busy: only
            # this call falls back; pausing would fail every thread's next calls.
            if isinstance(exc, MaxConnectionsError):
                self._stats.pool_waits += 1
            else:
                warn(logger, error_kind(exc), "fidelity_mw: redis replied with an error: %s", exc)
            return
        self._paused_until = self._clock.monotonic() + _PAUSE_AFTER_ERROR_S

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
