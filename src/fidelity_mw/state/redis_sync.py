"""A blocking Redis client for sync callers: `FidelitySyncTransport` in scripts, Celery
workers and plain threads, where no event loop runs and the asyncio client cannot be used.

Built explicitly like the asyncio one: no client-side retries, the policy's
timeouts, a bounded pool whose wait is bounded by the same timeout. It runs
the same Lua scripts (EVALSHA, EVAL once after NOSCRIPT), and classifies
failures the same way: an error reply or a full pool fails only that call
(redis-py's blocking pool already replaces a connection broken by a restart
before using it); when Redis cannot be reached, or answers as a read-only
replica (`READONLY`), that is one outage, as for the asyncio client: one log
line, `outages` counted once, `fallback_why` says why ("unreachable" or
"read_only"), and callers decide in the failure mode without asking Redis.
The first call after each pause (jittered exponential backoff, as the asyncio
store's probe) probes it instead: `ROLE` (or, where ROLE is not allowed, a
script that writes) until it answers as a writable primary, so a replica is
not taken back for one call and failed again.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from redis import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import Connection, DefaultParser, SSLConnection, parse_url
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
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .._logs import error_kind, warn
from .._types import Clock, RandomSource

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..policy import StateConfig

logger = logging.getLogger("fidelity_mw.redis")

# Probing an unreachable Redis: exponential backoff, equal jitter (both clients).
PROBE_BASE_S: Final = 0.05
PROBE_CAP_S: Final = 0.5
# An outage that starts less than this after the last one ended continues its backoff
# (a Redis that fails again right after each recovery is not probed at the fastest rate).
PROBE_RESET_S: Final = 10.0
# Why a store decides without Redis (`RedisStore.fallback_why`, decision details, the
# `fidelity.state.fallback` gauge): no answer, or an answer that refuses writes.
WHY_UNREACHABLE: Final = "unreachable"
WHY_READ_ONLY: Final = "read_only"
WHY_ERROR: Final = "error"  # (decision details only: Redis is up, one call failed)
# (decision details only) the request's deadline came before Redis answered: the request
# stopped waiting, the call went on (Redis is not marked down for it)
WHY_DEADLINE: Final = "deadline"
# The probe where ROLE is not allowed (ACL, a proxy): a write of a key of our own that
# a replica refuses (`READONLY`), as it refuses the store's scripts; DEL of a key that
# does not exist changes nothing and is not replicated.
WRITE_PROBE: Final = "return redis.call('DEL', KEYS[1])"
# What a call to Redis can raise, for both clients (this one and redis.py's asyncio one).
CALL_ERRORS: Final = (RedisError, OSError, TimeoutError)
# Error replies that still mean "the state is unreachable right now" (as opposed to a
# bad reply to one call): they switch a store to its failure mode.


class ClusterUnavailable(ResponseError):
    """`CLUSTERDOWN` or `TRYAGAIN` read by a cluster client's connection (`cluster_parser`):
    a plain error reply to redis-py's cluster client, which passes it on at once."""


UNREACHABLE: Final = (
    BusyLoadingError,
    ClusterDownError,
    ReadOnlyError,
    TryAgainError,
    ClusterUnavailable,
)
_UNREACHABLE_CODES: Final[dict[str, type[RedisError]]] = {
    "LOADING": BusyLoadingError,
    "CLUSTERDOWN": ClusterDownError,
    "READONLY": ReadOnlyError,
    "TRYAGAIN": TryAgainError,
}


def cluster_parser(base: type[Any]) -> type[Any]:
    """`base` (a redis-py reply parser) reading `CLUSTERDOWN` and `TRYAGAIN` as
    `ClusterUnavailable`. redis-py's cluster clients, both of them, act on their own
    classes for these: `TRYAGAIN` is sent again up to 16 times (the later ones 50 ms
    apart), `CLUSTERDOWN` sleeps 250 ms and reloads the topology before raising, all
    inside one call, past `timeout_ms` and past the `Retry(NoBackoff(), 0)` they are
    built with. Measured on a three-master cluster with the prefix's slot migrating:
    one admission sent 16 EVALSHAs and took 0.11-0.15 s at `timeout_ms = 50`. MOVED and
    ASK (the slot is elsewhere: a redirection, not a retry) keep redis-py's classes."""
    classes = dict(base.EXCEPTION_CLASSES)
    classes["CLUSTERDOWN"] = ClusterUnavailable
    classes["TRYAGAIN"] = ClusterUnavailable
    return type("Cluster" + base.__name__.lstrip("_"), (base,), {"EXCEPTION_CLASSES": classes})


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


class _WentDown(RedisError):
    """The link was marked down while this call waited for a connection: it is not sent."""


class _Pool(BlockingConnectionPool):
    """redis-py reports a full pool as a plain ConnectionError, the same class as a
    refused connection; the wait for a free one is the only `pool.get` here."""

    link: SyncLink | None = None
    # `.on`: a script call of this thread, made while up; `.wait_s`: how long it may wait
    # for its reply when the request's deadline comes before `timeout_ms` (else 0.0), and
    # `.cut`, the connection whose socket timeout was shortened for it
    calls = threading.local()

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisConnectionError as exc:
            if type(exc) is RedisConnectionError and str(exc) == "No connection available.":
                raise PoolExhausted(str(exc)) from exc
            raise

    def ensure_connection(self, connection: Any) -> None:
        """(redis-py's `get_connection` calls it once it holds a connection, before the
        connection is (re)connected or checked: then `get_connection` gives it back.)"""
        link = self.link
        if link is not None and not link.up and getattr(self.calls, "on", False):
            # Marked down by another thread's call while this one waited for the
            # connection that call gave back: (re)connected and sent, it would wait
            # timeout_ms once more on a Redis known not to answer. It decides now, as
            # the calls after it do.
            raise _WentDown("redis was marked down while this call waited for a connection")
        wait_s = getattr(self.calls, "wait_s", 0.0)
        if wait_s:
            # The request's deadline bounds this call: a (re)connection's handshake too,
            # and every read on the socket (put back by `SyncLink.call_within`)
            self.calls.cut = (
                connection,
                connection.socket_timeout,
                connection.socket_connect_timeout,
            )
            connection.socket_timeout = wait_s
            connection.socket_connect_timeout = min(connection.socket_connect_timeout, wait_s)
            sock = getattr(connection, "_sock", None)
            if sock is not None:
                sock.settimeout(wait_s)
        super().ensure_connection(connection)


def _cluster_connection(ssl: bool) -> type[Any]:
    """The blocking cluster client's connection class, its parser `cluster_parser`'s
    (redis-py's blocking cluster client sleeps in the caller's thread: 250 ms on
    `CLUSTERDOWN`, 50 ms between later `TRYAGAIN`s)."""
    parser = cluster_parser(DefaultParser)
    base: type[Any] = SSLConnection if ssl else Connection

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", parser)
        base.__init__(self, *args, **kwargs)

    return type("Cluster" + base.__name__, (base,), {"__init__": __init__})


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
    outages: int
    recoveries: list[float]
    recovered_at: list[float]


# What the probe that ends an outage found: `ROLE` says replica. Read-only or not: a
# writable one (`replica-read-only no`) is not taken back either, its writes being lost
# when it resyncs and never seen by the processes on the primary (docs/operations.md).
FOUND_BY_PROBE: Final = "found by the probe; a writable replica is not used either"


def read_only_warning(server: str, what: str, on_error: str) -> None:
    """The (throttled) line for a replica: the same for both clients, so a process that
    uses both logs it once per interval. A write refused (`READONLY`) says a read-only
    replica; the probe's `ROLE` says a replica (`FOUND_BY_PROBE`)."""
    warn(
        logger,
        WHY_READ_ONLY,
        "fidelity_mw: redis at %s is %s (%s); on_error=%s until it is "
        "a writable primary (point state.url at an address that follows the primary)",
        server,
        "a replica (ROLE)" if what == FOUND_BY_PROBE else "a read-only replica",
        what,
        on_error,
    )


def role_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SyncLink:
    """One blocking client per store, shared by every thread (redis-py's pool is thread-safe)."""

    def __init__(
        self,
        url: str,
        cluster: bool,
        config: StateConfig,
        clock: Clock,
        stats: _Stats,
        *,
        rng: RandomSource | None = None,
        server: str = "",
    ) -> None:
        self.url = url  # without the `cluster` query parameter (`redis_url`)
        self.cluster = cluster
        self.config = config
        self._clock = clock
        self._stats = stats
        self._rng: RandomSource = rng or random.Random().random
        self._server = server or url
        self._client: Any = None
        self._lock = threading.Lock()
        # The health of this client, as `Health` is the asyncio client's: down from the
        # first unreachable (or read-only) answer until a probe finds a writable primary.
        self._state = threading.Lock()
        self._probing = threading.Lock()  # one thread probes; the others fall back
        self.up = True
        self.why = ""  # while down: WHY_UNREACHABLE or WHY_READ_ONLY
        self.down_since = 0.0
        self.up_since = -math.inf
        self.attempt = 0  # probes so far this outage: the backoff's exponent
        self.role_denied = False  # ROLE refused (ACL, proxy): the probe writes instead
        self._paused_until = 0.0
        # When Redis last answered this client (the store's clock; -inf: never): a
        # fallback decision's age counts from the latest reply of either client.
        self.last_ok = -math.inf

    @property
    def fallback_why(self) -> str | None:
        """None while this client reaches Redis; else why not (as `RedisStore.fallback_why`)."""
        return None if self.up else (self.why or WHY_UNREACHABLE)

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
                connection_class=_cluster_connection(plain.startswith("rediss:")),
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
        pool.link = self
        return Redis(connection_pool=pool)

    def call(
        self, script: _Script, keys: Sequence[str], args: Sequence[Any]
    ) -> tuple[Any, float] | None:
        """Run a script: (reply, age_s), or None when Redis did not answer (or is down:
        then the first call after each pause probes it, and goes on if it is back)."""
        got = self.call_within(script, keys, args, 0.0)
        return None if got is False else got

    def call_within(
        self, script: _Script, keys: Sequence[str], args: Sequence[Any], wait_s: float
    ) -> tuple[Any, float] | Literal[False] | None:
        """`call`, its reply waited for at most `wait_s` (0.0: `timeout_ms`): False when
        the request's deadline came first. A blocking call cannot go on without its
        caller: its connection is dropped with the reply unread (Redis may have run
        it), and Redis is not marked down for it."""
        clock = self._clock
        if not self.up and not self._probe():
            return None
        started = clock.monotonic()
        client = self.client()
        calls = _Pool.calls
        calls.on = True
        calls.wait_s = wait_s
        try:
            reply = self._evalsha(client, script, keys, args)
        except _WentDown:
            return None
        except CALL_ERRORS as exc:
            if isinstance(exc, RedisTimeoutError) and getattr(calls, "cut", None) is not None:
                return False  # (redis-py dropped the connection: no reply left on it)
            self._failed(exc)
            return None
        finally:
            calls.on = False
            calls.wait_s = 0.0
            cut = getattr(calls, "cut", None)
            if cut is not None:
                calls.cut = None
                conn, timeout, connect_timeout = cut
                conn.socket_timeout = timeout
                conn.socket_connect_timeout = connect_timeout
                sock = getattr(conn, "_sock", None)
                if sock is not None:
                    sock.settimeout(timeout)
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
        with self._state:
            if not self.up:
                return  # (another thread's call found it first: one outage)
            now = self._clock.monotonic()
            self.up = False
            self.down_since = now
            if now - self.up_since >= PROBE_RESET_S:
                self.attempt = 0  # up long enough: the backoff starts over
            self._stats.outages += 1
            self.why = WHY_READ_ONLY if isinstance(exc, ReadOnlyError) else WHY_UNREACHABLE
            self._pause(now)
        if self.why == WHY_READ_ONLY:
            read_only_warning(self._server, str(exc), self.config.on_error)
        else:
            logger.warning(
                "fidelity_mw: redis unreachable from the blocking client (%s: %s); "
                "on_error=%s until it answers",
                type(exc).__name__,
                exc,
                self.config.on_error,
            )

    def _pause(self, now: float) -> None:
        delay = min(PROBE_CAP_S, PROBE_BASE_S * 2.0 ** min(self.attempt, 16))
        self.attempt += 1
        self._paused_until = now + delay * (0.5 + 0.5 * self._rng())

    def _probe(self) -> bool:
        """Down: True when this call may go to Redis (a probe found a writable primary);
        False while paused, while another thread probes, or when the probe fails."""
        if self._clock.monotonic() < self._paused_until or not self._probing.acquire(
            blocking=False
        ):
            return False
        try:
            if self.up:  # (another thread's probe brought it back meanwhile)
                return True
            try:
                writable = self._writable(self.client())
            except CALL_ERRORS:
                writable = None
            now = self._clock.monotonic()
            if not writable:
                if writable is False and self.why != WHY_READ_ONLY:
                    self.why = WHY_READ_ONLY  # (down for another reason before)
                    read_only_warning(self._server, FOUND_BY_PROBE, self.config.on_error)
                with self._state:
                    self._pause(now)
                return False
            with self._state:
                self.up = True
                self.up_since = now
                self.why = ""
                self.last_ok = now
                stats = self._stats
                stats.recoveries.append(now - self.down_since)
                stats.recovered_at.append(now)
                del stats.recoveries[:-100], stats.recovered_at[:-100]
            logger.warning(
                "fidelity_mw: redis reachable again from the blocking client after %.3f s",
                now - self.down_since,
            )
            return True
        finally:
            self._probing.release()

    def _writable(self, client: Any) -> bool:
        """Does Redis answer as a primary that takes writes (`RedisStore._writable`: ROLE,
        then a write, which a primary whose writes are paused holds)?"""
        if not self.role_denied and not self.cluster:
            try:
                role = client.execute_command("ROLE")
            except ResponseError as exc:
                if isinstance(exc, UNREACHABLE):
                    raise
                self.role_denied = True  # NOPERM, or a proxy without ROLE
            else:
                if role_text(role[0]) != "master":
                    return False
        prefix = self.config.key_prefix
        try:
            client.execute_command("EVAL", WRITE_PROBE, 1, f"{{{prefix}}}:probe")
        except ReadOnlyError:
            return False
        return True

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
