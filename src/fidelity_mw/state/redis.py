"""Redis state: fleet-wide limits and breakers in Lua scripts, with explicit failure modes.

One script call per inbound request, shared with the other requests of its
event-loop tick: `admit.lua` decides the route breaker gate and every rate
limit of the request atomically, on the server's clock (`TIME`), with the same
semantics as `MemoryStore.admit_now` (all-or-nothing commit; a probe slot given
back when a limit rejects); requests arriving together go as one `batch.lua`
call that decides each of them the same way (redis_batch.py). `record` is one
call too (shared the same way), and is skipped when there is nothing to record.

Keys (see docs/state.md): ``{prefix}:rl:<h>`` (GCRA TAT), ``{prefix}:br:<h>``
(breaker hash), ``{prefix}:bp:<h>`` (probe leases), ``{prefix}:bu:<h>`` (retry
budget), where ``<h>`` is blake2b-128 of the logical key: client input never
shapes a key name, and the ``{prefix}`` hash tag puts every key of a script
call in one Redis Cluster slot.

The client is built explicitly: no client-side retries (redis-py 8 retries
10 times by default), socket and connect timeouts from the policy, a bounded
blocking pool. When Redis errors or times out, `on_error` decides:

- ``local`` (default): decide on process-local state (`LocalState`); decisions say
  ``fallback`` with age = time since the last successful Redis reply;
- ``open``: admit, marked ``fallback``;
- ``closed``: raise `StateUnavailable`, which the middleware turns into a 503.

While Redis is down no request waits for it: a background task probes it under
jittered exponential backoff and switches back on the first answer that shows a
writable primary (`ROLE` says "master"; where ROLE is not allowed, a script that
writes succeeds): a read-only replica answers PING but refuses every script, so
it stays in the failure mode (`fallback_why = "read_only"`) instead of coming back
for one call and failing again. The backoff carries over into an outage that
starts soon after the last one ended.

Provenance: a decision from Redis has source ``redis`` and age = half the
measured round trip, an estimate of the time since the server read the state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import hashlib
import heapq
import itertools
import logging
import random
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, DefaultParser, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, NoScriptError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._logs import error_kind, warn
from .._types import Clock, RandomSource
from ..clock import SYSTEM_CLOCK
from ..decide.breaker import ANY_EPOCH, BROKEN, CLOSED, FAILURE, IGNORED, SUCCESS, Gate
from ..decide.fleet import FleetShare, weight_tag
from ..decide.gcra import LimitVerdict, marker
from ..errors import PolicyError, StateUnavailable
from ..policy import BreakerConfig, RetryConfig, StateConfig
from . import base as _base
from .base import LATE_ANSWER, GateAnswer, InboundResult, LimitSpec, StateStore
from .fleet import Fleet
from .local import LocalState
from .redis_batch import Coalescer
from .redis_sync import CALL_ERRORS as _CALL_ERRORS
from .redis_sync import (
    FOUND_BY_PROBE,
    PROBE_BASE_S,
    PROBE_CAP_S,
    PROBE_RESET_S,
    WHY_DEADLINE,
    WHY_ERROR,
    WHY_READ_ONLY,
    WHY_UNREACHABLE,
    SyncLink,
    cluster_parser,
    read_only_warning,
)
from .redis_sync import UNREACHABLE as _UNREACHABLE
from .redis_sync import WRITE_PROBE as _WRITE_PROBE
from .scripts import Script, load_script
from .snapshot import (
    BreakerView,
    BudgetView,
    SnapshotConfigs,
    StoreSnapshot,
    first_breakers,
    local_snapshot,
    top_limiter_keys,
)
from .timer import LoopTimer, alive, ended

logger = logging.getLogger("fidelity_mw.redis")

SOURCE_REDIS: Final = "redis"
SOURCE_FALLBACK: Final = "fallback"

_REPLY_ERRORS = (IndexError, TypeError, ValueError, AttributeError)

_OUTCOME_CODES = {SUCCESS: "s", FAILURE: "f", IGNORED: "i", BROKEN: "b"}

_KEY_CACHE_MAX = 10_000
# How many of the oldest entries a full key cache lets go at once: bounded steps, so the
# admin page (which lists the keys this instance has used from these caches) keeps the
# most recent 15/16 instead of starting over from none; in batches, because dropping a
# dict's first entry one at a time rescans the deleted ones before it.
_KEY_CACHE_EVICT = _KEY_CACHE_MAX // 16


def _evict_oldest(cache: dict[Any, Any]) -> None:
    """Drop the `_KEY_CACHE_EVICT` entries inserted first (dicts keep insertion order)."""
    for old in list(itertools.islice(cache, _KEY_CACHE_EVICT)):
        del cache[old]


# ---------------------------------------------------------------- scripts


ADMIT: Final = load_script("admit")
RECORD: Final = load_script("record")
SYNC: Final = load_script("sync")
OUTBOUND: Final = load_script("outbound")
REFUND: Final = load_script("refund")
BATCH: Final = load_script("batch")  # one tick's admits and records (redis_batch.py)
BUDGET_REFUND: Final = load_script("budget_refund")  # a retry spent, then not sent
PEEK: Final = load_script("peek")  # check without counting (`StateStore.peek`)
# what parsing a stored value we did not write can raise (`snapshot` skips that key)
_ODD_VALUE: Final = (ValueError, TypeError, IndexError, UnicodeDecodeError)


# ---------------------------------------------------------------- keys


def hashed_key(prefix: str, kind: str, key: str) -> str:
    """``{prefix}:<kind>:<32 hex>``: fixed shape whatever the client sent."""
    digest = hashlib.blake2b(
        key.encode("utf-8", "surrogateescape"), digest_size=16, person=b"fidelity_mw"
    ).hexdigest()
    return f"{{{prefix}}}:{kind}:{digest}"


def check_prefix(prefix: str) -> None:
    if "{" in prefix or "}" in prefix or not prefix.strip():
        raise PolicyError.at(
            "state.key_prefix",
            f"{prefix!r} cannot be a key prefix: it becomes the Redis Cluster hash tag "
            "`{prefix}`, so it must be non-empty and contain no braces",
        )


# ---------------------------------------------------------------- client


RedisClient = Redis | RedisCluster


def redis_url(url: str) -> tuple[str, bool]:
    """Strip `tiered+` and our own `cluster=` query flag: (redis-py URL, cluster?)."""
    if url.startswith("tiered+"):
        url = url[len("tiered+") :]
    # Only the query is rebuilt: a round trip through urlunsplit turns `unix:///path`
    # into `unix:/path`, which redis-py >= 8.2 refuses.
    base, has_query, rest = url.partition("?")
    if not has_query:
        return url, False
    query_text, has_fragment, fragment = rest.partition("#")
    cluster = False
    kept = []
    for name, value in parse_qsl(query_text, keep_blank_values=True):
        if name == "cluster":
            cluster = value.lower() in ("1", "true", "yes", "on")
        else:
            kept.append((name, value))
    query = urlencode(kept)
    return base + ("?" + query if query else "") + has_fragment + fragment, cluster


def build_client(url: str, config: StateConfig) -> RedisClient:
    """A redis-py asyncio client with no retries, policy timeouts and a bounded pool.

    `redis://`, `rediss://` and `unix://` URLs; add `?cluster=true` for Redis
    Cluster (TCP only).
    """
    plain, cluster = redis_url(url)
    timeout = config.timeout_ms / 1000.0
    connect_timeout = config.connect_timeout_ms / 1000.0
    # Retry(NoBackoff(), 0): one attempt, no hidden retries, no backoff
    # sleeps. (redis-py 8 defaults to 10 retries with exponential backoff.)
    if cluster:
        return _Cluster.from_url(
            plain,
            retry=Retry(NoBackoff(), 0),
            max_connections=config.pool_size,
            socket_timeout=timeout,
            socket_connect_timeout=connect_timeout,
        )
    kwargs: dict[str, Any] = dict(parse_url(plain))
    # A plain pool with a hard bound: RedisStore admits at most `pool_size`
    # calls at once through its own semaphore (a bounded wait, paid only when
    # all connections are busy), so the pool never has to block. This saves
    # BlockingConnectionPool's Condition + timeout on every call (~15 µs).
    pool = ConnectionPool(
        max_connections=config.pool_size,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        retry_on_error=[],
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        **kwargs,
    )
    return LaneClient(connection_pool=pool)


class _Cluster(RedisCluster):
    """redis-py's asyncio cluster client, its connections reading `CLUSTERDOWN` and
    `TRYAGAIN` as plain error replies (`cluster_parser`: no hidden retries or sleeps)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        parser = cluster_parser(DefaultParser)
        # (the nodes found later are made from this dict; the startup nodes copied it)
        self.connection_kwargs["parser_class"] = parser
        for node in self.startup_nodes:
            node.connection_kwargs["parser_class"] = parser


async def _can_read(conn: AbstractConnection) -> bool:
    """Data (or EOF: raises) waiting on an idle connection (redis-py >= 6: `can_read`)."""
    check = getattr(conn, "can_read", None) or conn.can_read_destructive
    return bool(await check())


class LaneClient(Redis):
    """A redis-py client whose script calls (`run`) go over connections of their own.

    `execute_command` costs far more CPU than the round trip itself: the pool's
    lock and its per-checkout readiness probe, the retry wrapper, observability
    hooks, all per command. The store's script calls need none of it: `RedisStore`
    already bounds them (`Slots`, at most `pool_size` at once, so the lane opens
    at most that many connections), sends each once (no retries), and its error
    handling reads only the exceptions, which are redis-py's own either way. A
    connection that failed is disconnected by redis-py (on any error or
    cancellation while sending or reading) and reconnects on its next use, as
    a pooled one would. Everything else (snapshots, PING probes) uses the pool.
    """

    def __init__(self, *, connection_pool: ConnectionPool) -> None:
        super().__init__(connection_pool=connection_pool)
        self.lane_free: list[AbstractConnection] = []  # idle lane connections
        self.lane_opened: list[AbstractConnection] = []  # every one made (closed with us)

    async def run(self, *args: Any, keep_reply: bool = False) -> Any:
        """One command on a lane connection: its reply, or redis-py's exception.
        `keep_reply`: a raw cancellation while the reply is on its way reads it all the
        same (`_late_reply`), for a caller that gives back what the script took."""
        free = self.lane_free
        if free:
            conn = free.pop()
        else:
            pool = self.connection_pool
            conn = pool.connection_class(**pool.connection_kwargs)
            self.lane_opened.append(conn)
        try:
            if conn.is_connected:
                # What the pool checks at every checkout: a connection the server
                # closed meanwhile (restart, idle `timeout`), or with bytes nobody
                # read, is replaced before the command is sent on it.
                try:
                    if await _can_read(conn):
                        raise RedisConnectionError("Connection has data")
                except (RedisConnectionError, RedisTimeoutError, OSError):
                    await conn.disconnect()
            # redis-py sends under `asyncio.wait_for`, which on Python 3.11 swallows a
            # cancellation that comes as the send completes: the call then waited for its
            # reply, up to the socket timeout, a task cancelled (a request's deadline,
            # `aclose`) going on as if it had not been, and nothing taken along counted
            # as lost. Seen here by the task's count of cancellations asked for.
            task = asyncio.current_task()
            asked = task.cancelling() if task is not None else 0
            await conn.send_packed_command(conn.pack_command(*args))
            swallowed = task is not None and task.cancelling() > asked
            if not keep_reply:
                if swallowed:
                    await conn.disconnect(nowait=True)  # (its reply is not read)
                    raise asyncio.CancelledError
                return await conn.read_response()
            try:
                if swallowed:
                    raise asyncio.CancelledError  # (its reply read as a cancelled read's)
                # (redis-py would disconnect on a cancellation too: below, every other
                # failure to read disconnects as it would have)
                return await conn.read_response(disconnect_on_error=False)
            except ResponseError:
                raise  # an error reply (NOSCRIPT, READONLY ...): read whole, a sound connection
            except asyncio.CancelledError as cancel:
                reply = await _late_reply(conn)
                if reply is not _LOST:
                    setattr(cancel, _LATE_REPLY, reply)
                raise
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
        finally:
            free.append(conn)  # (failed: redis-py disconnected it; it reconnects when used)

    async def drop_idle(self) -> None:
        """Disconnect the idle lane connections (each connects afresh when next used)."""
        for conn in list(self.lane_free):
            await conn.disconnect()

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        opened, self.lane_opened, self.lane_free = self.lane_opened, [], []
        try:
            for conn in opened:
                with contextlib.suppress(*_CALL_ERRORS, RuntimeError):
                    await conn.disconnect()
        finally:
            await super().aclose(close_connection_pool)


# A raw cancellation (`task.cancel()`: `asyncio.timeout`, `wait_for`) of a script call whose
# command went out whole: Redis runs the script whatever happens here, and what it took
# (a probe slot, a retry of a budget) is named only in its reply. The reply is read all the
# same (bounded by the socket timeout), and rides on the `CancelledError` under this name
# (the same exception: `asyncio.timeout` knows its own by type), so the caller can give back
# what the script took (`RedisStore.outbound_gate`: `LATE_ANSWER`; only its calls wait for
# their reply: any other is let go at once, a deadline's 504 not held up). An anyio scope
# cancels again at once: then, as a second raw cancel or a failed read, the reply is lost
# and the connection dropped, as before.
_LATE_REPLY: Final = "fidelity_mw_late_reply"
_LOST: Final = object()
# Set on a `CancelledError` that ended a call while it waited for a pooled connection:
# nothing was sent, so what the call took along can wait for the next one.
_UNSENT: Final = "fidelity_mw_unsent"
_T = TypeVar("_T")


async def _late_reply(conn: AbstractConnection) -> Any:
    """The reply of a command sent whole on `conn`, read after its caller was cancelled;
    `_LOST` (the connection dropped) when it cannot be read. An error reply is None: the
    script did not run, nothing to give back."""
    try:
        return await conn.read_response(disconnect_on_error=False)
    except ResponseError:
        return None
    except (Exception, asyncio.CancelledError):  # (a second cancellation included)
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await conn.disconnect(nowait=True)
        return _LOST
    except BaseException:  # KeyboardInterrupt, SystemExit: not swallowed; the reply
        # unread, the connection is dropped (the next command would read it as its own)
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await conn.disconnect(nowait=True)
        raise


# ---------------------------------------------------------------- health


@dataclass
class RedisStats:
    """Counters for tests, benchmarks and `fidelity-mw map`."""

    round_trips: int = 0  # script calls that reached Redis (incl. NOSCRIPT reloads)
    script_loads: int = 0  # NOSCRIPT recoveries (EVAL of the full source)
    errors: int = 0  # calls that failed
    fallbacks: int = 0  # decisions made in the failure mode
    # outcomes not recorded because Redis was down (or its reply was unreadable),
    # deferred successes lost with the call that carried them included
    dropped_records: int = 0
    pool_waits: int = 0  # calls that found every connection busy for `timeout_ms`
    reconnects: int = 0  # calls retried once on a fresh connection after a connection error
    lost_replies: int = 0  # calls sent whose connection broke before the reply: never resent
    # retry-budget request counts (`budget_request`) lost: a call carrying them cancelled
    # once sent, left unfinished by an event loop that closed, or still waiting at close
    dropped_budget_counts: int = 0
    outages: int = 0
    recoveries: list[float] = field(default_factory=list)  # seconds down, per outage
    recovered_at: list[float] = field(default_factory=list)  # clock.monotonic() of each recovery
    fleet_unknown: int = 0  # local fallback decisions that enforced the whole limit (share unknown)
    # calls a request stopped waiting for at its deadline, before `timeout_ms` (the call
    # goes on: `RedisStore._within`), and what their late replies had taken and was given
    # back (an admission's units, a retry) because the request was refused without them
    deadline_cuts: int = 0
    deadline_refunds: int = 0


class Slots:
    """At most `size` calls in flight; a bounded wait only when all are taken.

    Cheaper than asyncio.Semaphore on the uncontended path (an int compare),
    and the wait has a deadline (the policy's timeout)."""

    __slots__ = ("free", "waiters")

    def __init__(self, size: int) -> None:
        self.free = size
        # each waiter's future: True, a slot handed over; False, Redis went down meanwhile
        self.waiters: collections.deque[asyncio.Future[bool]] = collections.deque()

    def try_acquire(self) -> bool:
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return True
        return False

    async def acquire(self, timeout_s: float) -> bool:
        """Wait for a slot at most `timeout_s`. True if one was taken."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            pass
        except BaseException:  # cancelled: a slot handed over meanwhile goes to the next
            if waiter.done() and not waiter.cancelled() and waiter.result():
                self.release()
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)
        return waiter.done() and not waiter.cancelled() and waiter.result()

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)  # hand the slot over directly
                return
        self.free += 1

    def give_up_waiters(self) -> None:
        """Redis was marked down: every call waiting for a connection decides without
        it now, as the calls after it do, not after a connection frees (to send to a
        Redis known down) or `timeout_ms` ends."""
        waiters, self.waiters = self.waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(False)


class Health:
    """Is Redis reachable? Tracks the last good contact and probes while down."""

    def __init__(self, clock: Clock) -> None:
        self.up = True
        self.last_ok = clock.monotonic()  # before any contact: since the store started
        self.down_since = 0.0
        self.probe_task: asyncio.Task[None] | None = None
        self.why = ""  # while down: WHY_UNREACHABLE or WHY_READ_ONLY
        self.attempt = 0  # probes so far: the backoff's exponent (kept across quick re-failures)
        self.up_since = float("-inf")  # monotonic time of the last recovery
        self.role_denied = False  # ROLE refused (ACL, proxy): the probe writes instead
        # monotonic time of the next probe while the probe loop waits for it, else inf
        # (what a test on a FakeClock advances to: the probe no longer moves the clock)
        self.probe_at = float("inf")


# ---------------------------------------------------------------- the store


def breaker_args(cfg: BreakerConfig) -> tuple[float | int, ...]:
    """The 10 breaker config values as `read_config` in lib.lua expects them."""
    return (
        cfg.failure_ratio,
        cfg.min_calls,
        cfg.window_s,
        cfg.open_s,
        cfg.open_jitter,
        cfg.half_open_probes,
        cfg.probe_lease_s,
        cfg.slow_call_ratio if cfg.slow_call_ratio is not None else -1,
        cfg.consecutive_failures or 0,
        cfg.open_min_s,
    )


def budget_args(cfg: RetryConfig) -> tuple[float, float, float]:
    """The retry budget config as outbound.lua expects it."""
    return (cfg.budget_window_s, cfg.budget_ratio, cfg.budget_min_per_s)


# Budget request counts wait for the next outbound call; at most this many
# budgets ride along on one call.
_MAX_PENDING_PER_CALL: Final = 8


def _local_epoch(epoch: int) -> int:
    """Fallback gates carry negative epochs, so `record` knows where they came from."""
    return -epoch - 1


_OPEN_EPOCH: Final = -(2**62)  # a gate invented by on_error = "open"
# Outcomes of probes whose gate's reply was lost, waiting for Redis (`_report_late`).
_LATE_MAX: Final = 1024
# How long `aclose` waits for Redis to take what is still queued for it (late probe
# outcomes, deferred successes, budget counts): a shutdown must not hang on it.
CLOSE_FLUSH_S: Final = 1.0
# Breakers whose deferred successes one flush sends (`_flush_deferred_now`): four
# coalesced batch.lua calls.
_DEFERRED_PER_PASS: Final = 256
# Where record.lua's arguments carry the deferred successes' count.
_CARRIED: Final = 6


class RedisStore(StateStore):
    """Exact fleet-wide state: one script call per inbound request, or per tick under load."""

    source = SOURCE_REDIS
    # Coalesce one event-loop tick's admissions and records into one script call
    # (redis_batch.py). Off: one call each (benchmarks compare the two).
    coalesce: bool = True

    def __init__(
        self,
        url: str | None = None,
        *,
        config: StateConfig | None = None,
        rng: RandomSource | None = None,
        clock: Clock | None = None,
    ) -> None:
        if config is None:
            config = StateConfig(url=url or "redis://127.0.0.1:6379/0")
        self.config = config
        self.url = url or config.url
        check_prefix(config.key_prefix)
        self.prefix = config.key_prefix
        self.on_error = config.on_error
        self._rng: RandomSource = rng or random.Random().random
        self._clock: Clock = clock or SYSTEM_CLOCK
        self.local = LocalState(max_keys=config.max_keys, rng=self._rng)
        self.health = Health(self._clock)
        self.stats = RedisStats()
        # Connections belong to one event loop. The common case is one loop
        # (uvicorn); sync routes calling through `FidelitySyncTransport` may
        # use others from worker threads: one client + slots per loop, the
        # last used one in `_bound` (a single attribute: swapped atomically).
        self._bound: tuple[asyncio.AbstractEventLoop | None, RedisClient | None, Slots] = (
            None,
            None,
            Slots(config.pool_size),
        )
        self._clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[RedisClient, Slots]
        ] = weakref.WeakKeyDictionary()
        self._bind_lock = threading.Lock()
        self._closed = False  # aclose() ran and no client was made since (`_bind`)
        self._closing = False  # aclose() runs: its timers start no background work
        self._timeout_s = config.timeout_ms / 1000.0
        self._breaker_keys: dict[str, tuple[str, str]] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._limit_args: dict[LimitSpec, tuple[float | int, ...]] = {}
        self._breaker_args: dict[BreakerConfig, tuple[float | int, ...]] = {}
        # The same values joined as a coalesced batch sends them (str() of each, by
        # ','): str(float) costs far more than a dict lookup, and these never change.
        self._breaker_text: dict[BreakerConfig, str] = {}
        self._limit_text: dict[LimitSpec, str] = {}
        # breaker key (None: none) -> what admit sends for it and its limits (`_route`)
        self._routes: dict[str | None, tuple[Any, ...]] = {}
        # budget key -> [config, requests not yet sent, monotonic time of the oldest]
        self._pending: dict[str, list[Any]] = {}
        self._pending_lock = threading.Lock()
        self._flush_task: asyncio.Task[Any] | None = None
        # due when the oldest count waiting is one sync interval old (`_pending_due`)
        self._pending_timer = LoopTimer(self._clock, self._pending_due)
        # breaker key -> [config, epoch, plain successes not yet sent]
        self._deferred: dict[str, list[Any]] = {}
        # A sync transport's threads defer and take them too: a success added to an
        # entry another thread had just taken (popped) was lost (`_defer_success`)
        self._deferred_lock = threading.Lock()
        self._deferred_task: asyncio.Task[None] | None = None
        # due one sync interval after a success is deferred with no flush under way
        # (`_deferred_due`): a timer, not a task sleeping on the store's clock, which on a
        # FakeClock moved the clock itself (and `clock.sleeps`) at every deferral
        self._deferred_timer = LoopTimer(self._clock, self._deferred_due)
        # Probe ids the gates send (`_probe_id`): the caller chooses them, so a call whose
        # reply is lost still knows the probe slot Redis may have given it.
        self._probe_ids = random.Random()
        # probe id -> (breaker key, config, outcome code, slow, monotonic time): outcomes
        # of probes whose gate's reply was lost, sent once Redis answers (`_report_late`)
        self._late: dict[int, tuple[str, BreakerConfig, str, bool, float]] = {}
        self._late_task: asyncio.Task[None] | None = None
        # What each call out now took along from the tables above, with its loop: a loop
        # that closes with the call out never ends it, nor runs its `except` or `finally`
        # (`_forget_closed_loop`). token -> (loop, plain successes, budget counts, the
        # late probe outcome (its id, its entry) or None)
        self._carrying: dict[object, tuple[asyncio.AbstractEventLoop, int, int, Any]] = {}
        self.sync_s = config.sync_interval_ms / 1000.0
        # Admissions and records of one event-loop tick share one script call.
        self.coalescer = Coalescer(self.call, BATCH, self._failed)
        self._sync_link: SyncLink | None = None  # a blocking client, for sync callers only
        # Membership for the fleet-aware fallback (state/fleet.py).
        self.fleet = Fleet(
            self.prefix,
            config.fleet_share_max_age_s,
            config.fleet_share_even_ratio,
            config.fleet_share_load_max_age_s,
        )
        self._fleet_warned = -1
        self._fleet_skipped = False  # the last announcement found every connection busy
        # Redis's eviction policy, read once after the first call that answers
        # (`_check_eviction`): None until then
        self.eviction_policy: str | None = None
        self._eviction_task: asyncio.Task[None] | None = None
        # calls a request stopped waiting for at its deadline, still running, and the
        # give-backs their late replies started (`_within`)
        self._cut: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ plumbing

    @property
    def process_id(self) -> str:
        """This store's (this process's) id: the fleet member id, also the owner of its
        breakers with `scope = "process"` (`state.base.breaker_home`)."""
        return self.fleet.id

    def key(self, kind: str, key: str) -> str:
        """The Redis key for a logical key (cached; the cache is bounded)."""
        cached = self._keys.get((kind, key))
        if cached is None:
            if len(self._keys) >= _KEY_CACHE_MAX:
                _evict_oldest(self._keys)
            cached = self._keys[(kind, key)] = hashed_key(self.prefix, kind, key)
        return cached

    def client(self) -> RedisClient:
        """The client of the running event loop (connections belong to one loop)."""
        return self._bind()[1]

    def _bind(self) -> tuple[asyncio.AbstractEventLoop, RedisClient, Slots]:
        loop = asyncio.get_running_loop()
        bound = self._bound
        if bound[0] is loop and bound[1] is not None:
            return bound  # type: ignore[return-value]
        with self._bind_lock:
            known = self._clients.get(loop)
            if known is None:
                self._reopening()
                known = self._clients[loop] = (
                    build_client(self.url, self.config),
                    Slots(self.config.pool_size),
                )
            fresh = (loop, known[0], known[1])
            self._bound = fresh
        if self._carrying:
            self._forget_closed_loop()
        return fresh

    def breaker_keys(self, breaker_key: str) -> tuple[str, str]:
        """The breaker's hash and probe-set keys (cached)."""
        pair = self._breaker_keys.get(breaker_key)
        if pair is None:
            if len(self._breaker_keys) >= _KEY_CACHE_MAX:
                _evict_oldest(self._breaker_keys)
            pair = self._breaker_keys[breaker_key] = (
                hashed_key(self.prefix, "br", breaker_key),
                hashed_key(self.prefix, "bp", breaker_key),
            )
        return pair

    def breaker_config_args(self, cfg: BreakerConfig) -> tuple[float | int, ...]:
        args = self._breaker_args.get(cfg)
        if args is None:
            args = self._breaker_args[cfg] = breaker_args(cfg)
        return args

    def breaker_config_text(self, cfg: BreakerConfig) -> str:
        text = self._breaker_text.get(cfg)
        if text is None:
            text = self._breaker_text[cfg] = ",".join(map(str, self.breaker_config_args(cfg)))
        return text

    def limit_text(self, spec: LimitSpec) -> str:
        text = self._limit_text.get(spec)
        if text is None:
            if len(self._limit_text) >= _KEY_CACHE_MAX:
                self._limit_text.clear()
            text = self._limit_text[spec] = ",".join(map(str, self.limit_args(spec)))
        return text

    def limit_args(self, spec: LimitSpec) -> tuple[float | int, ...]:
        args = self._limit_args.get(spec)
        if args is None:
            if len(self._limit_args) >= _KEY_CACHE_MAX:
                self._limit_args.clear()
            args = self._limit_args[spec] = (
                spec.interval_s,
                spec.tolerance_s,
                spec.cost,
                1 if spec.shadow else 0,
            )
        return args

    async def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA; after NOSCRIPT (SCRIPT FLUSH, restart, failover) EVAL the source once.

        EVAL both runs the script and puts it back in the server's cache, so
        the next EVALSHA finds it. No error handling here: see `call`.
        """
        return await self._evalsha(self._bind()[1], script, keys, args)

    async def _evalsha(
        self, client: RedisClient, script: Script, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        if isinstance(client, LaneClient):
            # A gate's reply names what it took (a probe slot, a retry), which a call
            # cancelled by a raw `task.cancel()` meanwhile gives back (`_late_reply`);
            # any other call is let go at once, as redis-py lets it.
            keep = script is OUTBOUND
            try:
                return await client.run(
                    "EVALSHA", script.sha, len(keys), *keys, *args, keep_reply=keep
                )
            except NoScriptError:
                self.stats.script_loads += 1
                self.stats.round_trips += 1
                return await client.run(
                    "EVAL", script.source, len(keys), *keys, *args, keep_reply=keep
                )
        run = client.execute_command
        try:
            return await run("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.stats.script_loads += 1
            self.stats.round_trips += 1
            return await run("EVAL", script.source, len(keys), *keys, *args)

    async def call(
        self, script: Script, keys: Sequence[str], args: Sequence[Any]
    ) -> tuple[Any, float] | None:
        """Run a script: (reply, age_s), or None when Redis is down or the call failed."""
        health = self.health
        if not health.up:
            self._ensure_probe()
            return None
        clock = self._clock
        started = clock.monotonic()
        bound = self._bound
        if bound[0] is not asyncio.get_running_loop() or bound[1] is None:
            bound = self._bind()
        client, slots = bound[1], bound[2]
        assert client is not None
        if not slots.try_acquire():
            try:
                acquired = await slots.acquire(self._timeout_s)
            except asyncio.CancelledError as cancel:
                setattr(cancel, _UNSENT, True)
                raise
            if not health.up:
                # Marked down while this call waited (the calls ahead of it timed
                # out): it decides now, as the calls after it do. Sent, it would wait
                # timeout_ms once more on a Redis known not to answer.
                if acquired:
                    slots.release()
                self._ensure_probe()
                return None
            if not acquired:
                # every connection stayed busy for timeout_ms: this request falls
                # back; Redis is not marked down for it
                self.stats.errors += 1
                self.stats.pool_waits += 1
                return None
        try:
            try:
                reply = await self._evalsha(client, script, keys, args)
            except _CALL_ERRORS as exc:
                if not _stale_connection(exc):
                    raise
                if _reply_lost(exc):
                    # Sent in full, then the connection broke: Redis may have run
                    # it (a batch charges every key in it), so it is never sent
                    # again. These requests fall back; the next call starts on a
                    # fresh connection, and finds out whether Redis is still there.
                    self.stats.errors += 1
                    self.stats.lost_replies += 1
                    # (once per interval: a middlebox that resets every connection
                    # loses every reply, and Redis is never marked down for it)
                    warn(
                        logger, "reply_lost", "fidelity_mw: redis reply lost (%s); not resent", exc
                    )
                    await _drop_idle_connections(client)
                    return None
                # After a restart every pooled connection to the old server fails
                # once on first use; declaring Redis down for each would flap
                # between redis and fallback. One more try, on fresh connections,
                # before the outage is real (no other retries: none in redis-py).
                # Only a call that failed before Redis could read all of it: one
                # that broke while sending or connecting.
                self.stats.reconnects += 1
                await _drop_idle_connections(client)
                reply = await self._evalsha(client, script, keys, args)
        except _CALL_ERRORS as exc:
            self._failed(exc)
            return None
        finally:
            slots.release()
        done = clock.monotonic()
        health.last_ok = done
        self.stats.round_trips += 1
        if done >= self.fleet.due:
            self.fleet.tick(done, self._fleet_run, clock.monotonic)
        if self._eviction_task is None:
            self._eviction_task = asyncio.get_running_loop().create_task(
                self._check_eviction(client)
            )
        return reply, (done - started) / 2.0

    def _wait_s(self) -> float:
        """How long the request being handled (`base.request_deadline`) may wait for Redis when its
        deadline comes before `timeout_ms` does; 0.0: the timeout's bound alone (no
        request, no deadline, a later one, or one already past: a route that does not
        enforce its deadline serves such a request, and decides it on Redis as before)."""
        deadline_at = _base.request_deadline()
        if deadline_at is None:
            return 0.0
        left = deadline_at - self._clock.monotonic()
        return left if 0.0 < left < self._timeout_s else 0.0

    async def _within(
        self,
        call: Coroutine[Any, Any, _T],
        wait_s: float,
        dropped: Callable[[asyncio.Task[_T]], None] | None = None,
    ) -> _T | asyncio.Task[_T]:
        """`call`'s answer if it comes within `wait_s`, else its task, still running: the
        request's deadline came first, and it decides without Redis now. The call is not
        cancelled (its reply may name what it took, which the caller's `late` gives back;
        and a Redis that does not answer is still marked down by its own timeout).
        A caller cancelled while it waits cancels the call, as an awaited call would be;
        with `dropped`, the call goes on instead and is handed to it (its reply is read,
        and what it took given back: an outbound gate)."""
        task = asyncio.get_running_loop().create_task(call)
        try:
            await asyncio.wait((task,), timeout=wait_s)
        except BaseException:
            if dropped is None or task.done():
                task.cancel()
            else:
                self._keep(task)
                dropped(task)
            raise
        if task.done():
            return task.result()
        self.stats.deadline_cuts += 1
        self._keep(task)
        return task

    def _keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a background task of ours until it ends (and close cancels it)."""
        self._cut.add(task)
        task.add_done_callback(self._kept_done)

    def _kept_done(self, task: asyncio.Task[Any]) -> None:
        self._cut.discard(task)
        if not task.cancelled():
            task.exception()  # (retrieved: its request decided on the fallback already)

    def _on_late(self, task: asyncio.Task[Any], then: Callable[[Any], object]) -> None:
        """Call `then` with the answer of a cut call once it ends (None when it failed
        or was cancelled: nothing to give back)."""

        def done(task: asyncio.Task[Any]) -> None:
            got = None if task.cancelled() or task.exception() is not None else task.result()
            try:
                then(got)
            except Exception:  # (a bad late reply: counted, never raised in a callback)
                self.stats.errors += 1

        task.add_done_callback(done)

    async def _check_eviction(self, client: RedisClient) -> None:
        """Warn once when Redis may evict our keys: every key of ours has a TTL, so any
        policy but `noeviction` may drop live state under memory pressure, silently (an
        evicted bucket is a full one; an evicted breaker, open for a minute, is closed).
        `noeviction` turns the same pressure into errors, which decide per `on_error`
        and are logged. A Redis that does not tell (INFO refused, a cluster) is not
        asked again."""
        if isinstance(client, RedisCluster):
            return
        try:
            info = await client.info("memory")
            policy = str(info.get("maxmemory_policy", ""))
            limit = int(info.get("maxmemory", 0) or 0)
        except Exception:  # (best effort, in the background: a proxy, an ACL, odd replies)
            return
        self.eviction_policy = policy
        if policy and policy != "noeviction" and limit > 0:
            logger.warning(
                "fidelity_mw: redis at %s has maxmemory-policy %s: under memory pressure "
                "it may evict live limit buckets (then full again) and breakers (an open "
                "one closes), silently; noeviction makes it errors, decided per on_error "
                "(docs/operations.md, Redis memory)",
                _server_of(self.url),
                policy,
            )

    async def _fleet_run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One fleet announcement: skipped when every connection is busy (the next one then
        waits its turn for a connection), and kept out of `round_trips` and `errors` (a
        failure just leaves the count older). A timeout marks Redis down, as a request's
        call does: the calls waiting for its connection (all of them with `pool_size = 1`)
        would otherwise take it and wait `timeout_ms` again on the same silent Redis, or
        wait out their own `timeout_ms` as for a busy pool."""
        bound = self._bind()
        slots = bound[2]
        if not self.health.up:
            raise StateUnavailable("redis is down: no fleet announcement")
        if not slots.try_acquire():
            if not self._fleet_skipped:
                self._fleet_skipped = True
                raise StateUnavailable("no connection free for the fleet announcement")
            # Skipped once already: a pool that stays busy (requests always waiting) would
            # skip every one, the process's fleet size would go stale and the others would
            # drop it, so that in an outage it enforced the whole limit while they split it.
            acquired = await slots.acquire(self._timeout_s)
            if acquired and not self.health.up:
                slots.release()
                acquired = False
            if not acquired:
                raise StateUnavailable("no connection free for the fleet announcement")
        self._fleet_skipped = False
        client = bound[1]
        run = client.run if isinstance(client, LaneClient) else client.execute_command
        try:
            try:
                return await run("EVALSHA", script.sha, len(keys), *keys, *args)
            except NoScriptError:
                return await run("EVAL", script.source, len(keys), *keys, *args)
        except (TimeoutError, RedisTimeoutError) as exc:
            # (a broken connection is not enough: a pooled one after a restart breaks
            # once, and the requests' calls retry it on a fresh one before they tell)
            self._down(exc)
            raise
        finally:
            slots.release()

    def _bad_reply(self, exc: Exception) -> None:
        self.stats.errors += 1
        warn(
            logger,
            type(exc).__name__,
            "fidelity_mw: unexpected reply from redis (%s: %s)",
            type(exc).__name__,
            exc,
        )

    def _failed(self, exc: BaseException) -> None:
        self.stats.errors += 1
        if isinstance(exc, MaxConnectionsError) or (
            isinstance(exc, ResponseError) and not isinstance(exc, _UNREACHABLE)
        ):
            # A bad reply to this call (a script error, OOM...): fall back for
            # this request, but Redis itself answered.
            warn(logger, error_kind(exc), "fidelity_mw: redis replied with an error: %s", exc)
            return
        self._down(exc)

    def _down(self, exc: BaseException) -> None:
        """Redis did not answer (`exc`): marked down, until a probe finds it back."""
        health = self.health
        if health.up:
            now = self._clock.monotonic()
            health.up = False
            health.down_since = now
            bound = self._bound
            if bound[0] is asyncio.get_running_loop():
                bound[2].give_up_waiters()  # (this loop's: the others' futures are not ours)
            if now - health.up_since >= PROBE_RESET_S:
                health.attempt = 0  # up long enough: the backoff starts over
            self.stats.outages += 1
            if isinstance(exc, ReadOnlyError):
                health.why = WHY_READ_ONLY
                self._read_only_warning(str(exc))
            else:
                health.why = WHY_UNREACHABLE
                logger.warning(
                    "fidelity_mw: redis unreachable (%s: %s); on_error=%s until it answers",
                    type(exc).__name__,
                    exc,
                    self.on_error,
                )
        self._ensure_probe()

    def _read_only_warning(self, what: str) -> None:
        read_only_warning(_server_of(self.url), what, self.on_error)

    @property
    def fallback_why(self) -> str | None:
        """None while Redis answers; else why the store decides without it:
        "unreachable" (no answer, or an answer that says it cannot serve now) or
        "read_only" (a replica: it answers, and refuses every write). Either client's
        (a process that calls Redis only through the blocking one, `FidelitySyncTransport`
        in worker threads, has its outages too)."""
        health = self.health
        if not health.up:
            return health.why or WHY_UNREACHABLE
        link = self._sync_link
        return None if link is None else link.fallback_why

    def _ensure_probe(self) -> None:
        health = self.health
        if not alive(health.probe_task):
            health.probe_task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        """Ask Redis, with jittered exponential backoff, until it answers as a writable
        primary (`_writable`)."""
        health = self.health
        while not health.up:
            delay = min(PROBE_CAP_S, PROBE_BASE_S * 2.0 ** min(health.attempt, 16))
            health.attempt += 1
            await self._probe_wait(delay * (0.5 + 0.5 * self._rng()))
            try:
                # Pooled connections predate the outage: probe (and come back) on
                # fresh ones, so the first requests after recovery find no stale one.
                client = self.client()
                await _drop_idle_connections(client)
                writable = await self._writable(client)
            except _CALL_ERRORS:
                continue
            if not writable:
                if health.why != WHY_READ_ONLY:  # (down for another reason before)
                    health.why = WHY_READ_ONLY
                    self._read_only_warning(FOUND_BY_PROBE)
                continue
            now = self._clock.monotonic()
            health.up = True
            health.up_since = now
            health.why = ""
            health.last_ok = now
            self.stats.recoveries.append(now - health.down_since)
            self.stats.recovered_at.append(now)
            del self.stats.recoveries[:-100], self.stats.recovered_at[:-100]
            logger.warning(
                "fidelity_mw: redis reachable again after %.3f s", now - health.down_since
            )
            self._send_late_soon()

    async def _probe_wait(self, delay: float) -> None:
        """The wait before the next probe: on the clock's timer when it has one (a
        `FakeClock` fires it only when the test advances time), else its `sleep`. A probe
        that slept on a FakeClock moved the clock itself: an unreachable Redis ran the
        test's clock hundreds of seconds ahead (windows refilled, breakers' open times
        and deadlines passed by themselves) where its docs say time moves only with
        `advance()`."""
        health = self.health
        health.probe_at = self._clock.monotonic() + delay
        try:
            if getattr(self._clock, "call_later", None) is None:
                await self._clock.sleep(delay)
                return
            due: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def fire() -> None:
                if not due.done():
                    due.set_result(None)

            timer = LoopTimer(self._clock, fire)
            timer.arm(delay)
            try:
                await due
            finally:
                timer.cancel()  # (the store closed, or its loop went, while it waited)
        finally:
            health.probe_at = float("inf")

    async def _writable(self, client: RedisClient) -> bool:
        """Does Redis answer as a primary that takes writes? False for a replica (it
        answers PING and refuses every script); raises what a failed call raises.
        `ROLE` first (where it is not allowed, the write alone says it), then a script
        that writes a key of ours: a primary whose writes are paused (`CLIENT PAUSE
        WRITE`, which `FAILOVER` and a manual failover do) answers ROLE at once and holds
        every script, so ROLE alone brought the store back for one call that timed out,
        again and again while the pause lasted."""
        health = self.health
        if not health.role_denied and not isinstance(client, RedisCluster):
            try:
                role = await client.execute_command("ROLE")  # type: ignore[no-untyped-call]
            except ResponseError as exc:
                if isinstance(exc, _UNREACHABLE):
                    raise
                health.role_denied = True  # NOPERM, or a proxy without ROLE
            else:
                if _text(role[0]) != "master":
                    return False
        try:
            await client.execute_command("EVAL", _WRITE_PROBE, 1, f"{{{self.prefix}}}:probe")
        except ReadOnlyError:
            return False
        return True

    def fallback_age(self) -> float:
        """Time since Redis last answered, through either client (a process that calls it
        only through the blocking one, `FidelitySyncTransport` in worker threads, too)."""
        last = self.health.last_ok
        link = self._sync_link
        if link is not None and link.last_ok > last:
            last = link.last_ok
        return max(0.0, self._clock.monotonic() - last)

    @property
    def up(self) -> bool:
        return self.health.up

    # ------------------------------------------------------------ inbound

    async def admit(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
    ) -> InboundResult:
        route = self._routes.get(breaker_key)
        if route is None or not (
            (route[0] is breaker or route[0] == breaker)
            and (route[1] is limits or route[1] == tuple(limits))
        ):
            route = self._route(breaker_key, breaker, limits)
        has_breaker, breaker_keys, breaker_values, limit_values, breaker_text, limit_text = route[
            2:
        ]
        n = len(limits)
        if len(limit_keys) != n:
            raise ValueError(f"{len(limit_keys)} limit keys for {n} limits")
        if n:  # this instance's load, for its share of the limits in an outage
            self.fleet.demand += 1
        u = self._rng()
        keys = list(breaker_keys)
        key_cache = self._keys
        for key in limit_keys:
            hashed = key_cache.get(("rl", key))
            keys.append(hashed if hashed is not None else self.key("rl", key))
        d_epoch = d_count = pid = 0
        if has_breaker:
            pid = self._probe_id()
            if self._deferred and breaker_key is not None:
                lock = self._deferred_lock
                lock.acquire()  # (not `with`: half the cost, on every admit)
                try:
                    entry = self._deferred.pop(breaker_key, None)
                finally:
                    lock.release()
                if entry is not None:
                    d_epoch, d_count = entry[1], entry[2]
        sent = self.health.up  # (else nothing is sent: no probe can have been taken)
        if self.coalesce:
            # The text a batch sends (batch.lua): the same values as the arguments
            # below, joined by ','; an admission alone sends it split again.
            if has_breaker:
                text = f"1,{u!r},{n},{breaker_text},{d_epoch},{d_count},{pid}{limit_text}"
            else:
                text = f"0,{u!r},{n}{limit_text}"
            call = self.coalescer.call(ADMIT, keys, None, text)
        else:
            args: list[Any] = (
                ["1", u, n, *breaker_values, d_epoch, d_count, pid, *limit_values]
                if has_breaker
                else ["0", u, n, *limit_values]
            )
            call = self.call(ADMIT, keys, args)
        # (Redis known down: the call answers at once, unbounded)
        wait_s = self._wait_s() if sent else 0.0
        if not wait_s:
            got = await call
        else:
            bounded = await self._within(call, wait_s)
            if isinstance(bounded, asyncio.Task):  # the request's deadline came first
                return self._admit_cut(
                    bounded, breaker_key, breaker, limit_keys, limits, now, pid, d_count
                )
            got = bounded
        if got is not None:
            reply, age = got
            try:
                return parse_admit(reply, has_breaker, len(limits), SOURCE_REDIS, age)
            except _REPLY_ERRORS as exc:  # not our script's reply (a proxy, a foreign script?)
                self._bad_reply(exc)
        self.stats.dropped_records += d_count  # the successes it carried
        return self._admit_lost(breaker_key, breaker, limit_keys, limits, now, pid if sent else 0)

    def _admit_lost(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
        pid: int,
        why: str | None = None,
    ) -> InboundResult:
        """The fallback decision of an admission without Redis's answer; `pid`, the probe
        id it sent (0: none, or not sent)."""
        if not pid or breaker_key is None or breaker is None:
            return self.fallback_admit(breaker_key, breaker, limit_keys, limits, now, why)
        # Sent, and its answer lost (a timeout, a dropped connection): Redis may have run
        # it all the same, and made this call the breaker's probe under `pid`. Nobody
        # else can report that probe: this call's outcome goes there too (`_report_late`).
        try:
            result = self.fallback_admit(breaker_key, breaker, limit_keys, limits, now, why)
        except StateUnavailable:
            self._report_late(breaker_key, breaker, pid, IGNORED, False)  # refused: no call
            raise
        gate = result.gate
        if gate is None or not result.admitted or gate.verdict == "reject":
            self._report_late(breaker_key, breaker, pid, IGNORED, False)
            return result
        return result._replace(gate=gate._replace(sent_probe_id=pid))

    def _admit_cut(
        self,
        cut: asyncio.Task[tuple[Any, float] | None],
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
        pid: int,
        carried: int,
    ) -> InboundResult:
        """An admission whose request's deadline came before Redis answered: decided per
        `on_error` now (`why` "deadline"); the call goes on. If Redis admitted it after
        all, the units it charged there stay charged when the request went ahead on the
        fallback's answer (it ran: the fleet's count holds it, as it holds a timed-out
        call's), and are given back when the request was refused without them."""
        used = False
        try:
            result = self._admit_lost(
                breaker_key, breaker, limit_keys, limits, now, pid, WHY_DEADLINE
            )
            gate = result.gate
            used = result.admitted and (gate is None or gate.verdict != "reject")
            return result
        finally:  # (failing closed: raised, and refused)
            late = functools.partial(
                self._admitted_late,
                list(limit_keys),
                tuple(limits),
                breaker_key is not None and breaker is not None,
                carried,
                used,
                now,
            )
            self._on_late(cut, late)

    def _admitted_late(
        self,
        limit_keys: list[str],
        limits: tuple[LimitSpec, ...],
        has_breaker: bool,
        carried: int,
        used: bool,
        now: float,
        got: tuple[Any, float] | None,
    ) -> None:
        """The late answer of a cut admission (`_admit_cut`). A probe it may have taken
        is reported under its id already (`_admit_lost`)."""
        if got is None:
            self.stats.dropped_records += carried  # the successes it carried
            return
        if used:
            return
        result = parse_admit(got[0], has_breaker, len(limits), SOURCE_REDIS, got[1])
        if not result.admitted:
            return
        verdicts = result.limits
        charged = [j for j, verdict in enumerate(verdicts) if verdict.allowed]
        if not charged:
            return
        # (no retry credit for a request never served; a limit that admitted from credit
        # gets back the credit it spent, as the middleware's refunds give it)
        specs = [
            limits[j]
            if verdicts[j].credit or not limits[j].credit_s
            else LimitSpec(*(getattr(limits[j], f) for f in LimitSpec._fields[:5]))
            for j in charged
        ]
        self.stats.deadline_refunds += 1
        refund = self.refund(
            [limit_keys[j] for j in charged],
            specs,
            SOURCE_REDIS,
            now,
            [verdicts[j].tat for j in charged],
        )
        self._keep(asyncio.get_running_loop().create_task(refund))

    def _probe_id(self) -> int:
        """A probe id for a gate to send: random, so that the fleet's ids do not meet."""
        return self._probe_ids.getrandbits(52) + 1

    def _route(
        self, breaker_key: str | None, breaker: BreakerConfig | None, limits: Sequence[LimitSpec]
    ) -> tuple[Any, ...]:
        """What `admit` sends for this breaker and these limits whatever the request:
        (breaker, limits, has breaker, breaker keys, breaker config values, limit values,
        breaker config text, limit text). Cached by breaker key, one entry each (a
        route plan passes the same objects every time: an identity check; other
        limits with the same key replace the entry)."""
        has_breaker = breaker_key is not None and breaker is not None
        breaker_keys: tuple[str, ...] = ()
        breaker_values: tuple[float | int, ...] = ()
        breaker_text = ""
        if breaker_key is not None and breaker is not None:
            breaker_keys = self.breaker_keys(breaker_key)
            breaker_values = self.breaker_config_args(breaker)
            breaker_text = self.breaker_config_text(breaker)
        limit_values: list[float | int] = []
        limit_text = ""
        for spec in limits:
            limit_values += self.limit_args(spec)
            limit_text += "," + self.limit_text(spec)
        route = (
            breaker,
            limits if isinstance(limits, tuple) else tuple(limits),
            has_breaker,
            breaker_keys,
            breaker_values,
            tuple(limit_values),
            breaker_text,
            limit_text,
        )
        if len(self._routes) >= _KEY_CACHE_MAX:
            self._routes.clear()
        self._routes[breaker_key] = route
        return route

    async def refund(
        self,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        source: str,
        now: float,
        admitted_tats: Sequence[float] | None = None,
        *,
        fleet: FleetShare | None = None,
    ) -> None:
        if source == SOURCE_FALLBACK:  # the units came from the local fallback store
            # ... on the bucket of the share that admission used: the share may have gone
            # stale (or a fresh fleet size arrived) while the request ran
            share = fleet
            if share is None:  # (a caller that did not say: the share as it is now)
                share = self.fleet.share(self._clock.monotonic()) if self.fleet.enabled else None
            limit_keys, limits = self.fleet.for_share(limit_keys, limits, share)
            self.local.refund_now(limit_keys, limits, now, admitted_tats)
            return
        keys = [self.key("rl", key) for key in limit_keys]
        args: list[Any] = []
        for j, spec in enumerate(limits):
            # -1: admission TAT unknown (server TATs are never negative)
            admitted = admitted_tats[j] if admitted_tats is not None else -1
            args += (spec.interval_s, spec.cost, repr(admitted), spec.tolerance_s, spec.credit_s)
        await self.call(REFUND, keys, args)  # None (Redis down): the refund is dropped

    async def peek(
        self, limit_keys: Sequence[str], limits: Sequence[LimitSpec], now: float
    ) -> InboundResult:
        """Check without counting (`StateStore.peek`): peek.lua, which writes nothing;
        without Redis, as `on_error` says (the local state's answer under `local`)."""
        keys = [self.key("rl", key) for key in limit_keys]
        args: list[Any] = []
        for spec in limits:
            args += (spec.interval_s, spec.tolerance_s, spec.cost)
        got = await self.call(PEEK, keys, args)
        if got is None:
            return self.fallback_peek(limit_keys, limits, now)
        reply, age = got
        try:
            verdicts = tuple(
                LimitVerdict(
                    reply[i] in _ONE or reply[i] in _TWO,
                    0.0,
                    int(reply[i + 1]),
                    float(reply[i + 2]),
                    float(reply[i + 3]),
                    reply[i] in _TWO,
                )
                for i in range(1, 1 + 4 * len(limits), 4)
            )
        except _REPLY_ERRORS as exc:
            self._bad_reply(exc)
            return self.fallback_peek(limit_keys, limits, now)
        admitted = all(v.allowed or s.shadow for v, s in zip(verdicts, limits, strict=True))
        return InboundResult(None, verdicts, admitted, SOURCE_REDIS, age)

    def fallback_peek(
        self, limit_keys: Sequence[str], limits: Sequence[LimitSpec], now: float
    ) -> InboundResult:
        """`peek` without Redis, as `fallback_admit` decides (charging nothing)."""
        age = self.fallback_age()
        if self.on_error == "closed":
            raise _closed(self._why())
        if self.on_error == "open":
            verdicts = tuple(LimitVerdict(True, 0.0, 0, 0.0, 0.0) for _ in limits)
            return InboundResult(None, verdicts, True, SOURCE_FALLBACK, age)
        share = self._fleet_share() if limits and self.fleet.enabled else None
        shared_keys, limits = self.fleet.for_share(limit_keys, limits, share)
        if shared_keys is not limit_keys:  # as `fallback_admit` would see it
            self.fleet.carry(self.local.limits, limit_keys, shared_keys, limits, now)
        result = self.local.peek_now(shared_keys, limits, now)
        return InboundResult(None, result.limits, result.admitted, SOURCE_FALLBACK, age, share)

    def fallback_admit(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
        why: str | None = None,
    ) -> InboundResult:
        """Decide without Redis, per `on_error`; `why` when the caller knows it better
        than the store's health does (a request's deadline)."""
        self.stats.fallbacks += 1
        age = self.fallback_age()
        mode = self.on_error
        if why is None:
            why = self._why()
        if mode == "closed":
            raise _closed(why)
        if mode == "open":
            gate = (
                Gate("allow", CLOSED, _OPEN_EPOCH, 0.0)
                if breaker_key is not None and breaker is not None
                else None
            )
            verdicts = tuple(LimitVerdict(True, 0.0, 0, 0.0, 0.0) for _ in limits)
            return InboundResult(gate, verdicts, True, SOURCE_FALLBACK, age, None, why)
        share = self._fleet_share() if limits and self.fleet.enabled else None
        shared_keys, limits = self.fleet.for_share(limit_keys, limits, share)
        if shared_keys is not limit_keys:  # a share: units spent under another one carry
            self.fleet.carry(self.local.limits, limit_keys, shared_keys, limits, now)
        result = self.local.admit_now(breaker_key, breaker, shared_keys, limits, now)
        local_gate = result.gate
        if local_gate is not None:
            local_gate = local_gate._replace(epoch=_local_epoch(local_gate.epoch))
        return InboundResult(
            local_gate, result.limits, result.admitted, SOURCE_FALLBACK, age, share, why
        )

    def _why(self, sync: bool = False) -> str:
        """Why a decision now is taken without Redis (see `fallback_why`), or "error":
        Redis is up and this call failed (an error reply, a full pool, a bad reply).
        `sync`: a call through the blocking client (`SyncLink`), whose health is its own."""
        if sync:
            link = self._sync_link
            return (link.fallback_why if link is not None else None) or WHY_ERROR
        health = self.health
        return WHY_ERROR if health.up else (health.why or WHY_UNREACHABLE)

    def _fleet_share(self) -> FleetShare:
        """This instance's share for a local decision; an unknown one is counted, and
        logged once per outage."""
        share = self.fleet.share(self._clock.monotonic())
        if share.size is None:
            self.stats.fleet_unknown += 1
            if self._fleet_warned != self.stats.outages:
                self._fleet_warned = self.stats.outages
                logger.warning(
                    "fidelity_mw: fleet size %s: each process enforces the whole of each "
                    "limit until redis answers",
                    "never read from redis"
                    if share.age_s is None
                    else f"read {share.age_s:.0f} s ago (> {self.fleet.max_age_s:g} s)",
                )
        return share

    async def record(
        self,
        breaker_key: str,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        slow: bool,
        now: float,
    ) -> str:
        planned = self._record_call(breaker_key, breaker, gate, outcome, slow, now)
        if isinstance(planned, str):
            return planned
        call = self.coalescer.call if self.coalesce else self.call
        carried = planned[1][_CARRIED]
        # (Redis known down: the call answers at once, unbounded)
        wait_s = self._wait_s() if self.health.up else 0.0
        try:
            if not wait_s:
                got = await call(RECORD, *planned)
            else:
                bounded = await self._within(call(RECORD, *planned), wait_s)
                if isinstance(bounded, asyncio.Task):
                    # The request's deadline came first: the outcome still goes to Redis
                    # (the call runs on), the request does not wait for it.
                    self._on_late(
                        bounded, functools.partial(self._record_answer, gate=gate, carried=carried)
                    )
                    return gate.state
                got = bounded
        except asyncio.CancelledError:
            # Its caller cancelled (a coalesced record is not sent once its caller is gone,
            # a reply is not read): counted as a reply lost is, with the deferred successes
            # it took along.
            self.stats.dropped_records += 1 + carried
            raise
        return self._record_answer(got, gate, carried)

    def record_sync(
        self,
        breaker_key: str,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        slow: bool,
        now: float,
    ) -> str:
        """`record` for sync callers in any thread, over a blocking client (`SyncLink`)."""
        planned = self._record_call(breaker_key, breaker, gate, outcome, slow, now)
        if self._late:
            self._send_late_sync()
        if isinstance(planned, str):
            return planned
        link = self.sync_link()
        got = link.call_within(RECORD, *planned, self._wait_s() if link.up else 0.0)
        if got is False:  # the request's deadline came first: the outcome may be lost
            self.stats.deadline_cuts += 1
            got = None
        return self._record_answer(got, gate, planned[1][_CARRIED])

    def record_now(
        self,
        breaker_key: str,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        slow: bool,
        now: float,
    ) -> str | None:
        """`record` of an outcome that needs no round trip, without the coroutine (the
        middleware's fast path calls it per request, as it does MemoryStore's): a plain
        success (deferred: it rides on a later call), an ignored outcome, an outcome of a
        fallback gate. None, having changed nothing, for one Redis must see (a failure, a
        slow call, a probe's outcome): await `record`."""
        if gate.sent_probe_id:
            self._report_late(breaker_key, breaker, gate.sent_probe_id, outcome, slow)
        if gate.epoch < 0:
            # The gate came from the failure mode: record where it was decided.
            if gate.epoch == _OPEN_EPOCH or self.on_error != "local":
                return gate.state
            local = gate._replace(epoch=_local_epoch(gate.epoch))
            return self.local.record_now(breaker_key, breaker, local, outcome, slow, now)
        if not gate.probe_id:
            if outcome == IGNORED:
                return gate.state  # nothing would change: save the round trip
            if outcome == SUCCESS and not slow:
                self._defer_success(breaker_key, breaker, gate.epoch)
                return gate.state
        return None

    def _record_call(
        self,
        breaker_key: str,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        slow: bool,
        now: float,
    ) -> str | tuple[tuple[str, str], tuple[Any, ...]]:
        """The answer without a round trip (a str), or the script call to make."""
        done = self.record_now(breaker_key, breaker, gate, outcome, slow, now)
        if done is not None:
            return done
        args = (
            self._rng(),
            gate.epoch,
            gate.probe_id,
            _OUTCOME_CODES.get(outcome, "i"),
            1 if slow else 0,
            *self._take_deferred(breaker_key),
            *self.breaker_config_args(breaker),
        )
        keys = (self.key("br", breaker_key), self.key("bp", breaker_key))
        return keys, args

    def _record_answer(self, got: tuple[Any, float] | None, gate: Gate, carried: int) -> str:
        """`carried`: the deferred successes the call took along (lost with it)."""
        if got is None:
            self.stats.dropped_records += 1 + carried
            return gate.state
        try:
            return _text(got[0][0])
        except _REPLY_ERRORS as exc:
            self._bad_reply(exc)
            self.stats.dropped_records += 1 + carried
            return gate.state

    # A gate whose reply was lost (the call timed out, its connection dropped after
    # sending it) may have been made a probe in Redis: a slot held by nobody, which
    # refused the route `half_open` fleet-wide for `probe_lease_s`. Its id was chosen
    # here (`_probe_id`), so the call's outcome is reported under it once Redis answers
    # (`ANY_EPOCH`: the probe's own): if Redis made it the probe, that outcome is the
    # probe's; if not, the record finds no such slot and changes nothing.

    def _report_late(
        self, breaker_key: str, breaker: BreakerConfig, probe_id: int, outcome: str, slow: bool
    ) -> None:
        late = self._late
        if probe_id not in late and len(late) >= _LATE_MAX:
            with contextlib.suppress(StopIteration, KeyError):  # the oldest: its lease ends first
                del late[next(iter(late))]
            self.stats.dropped_records += 1
        code = _OUTCOME_CODES.get(outcome, "i")
        late[probe_id] = (breaker_key, breaker, code, slow, self._clock.monotonic())
        self._send_late_soon()

    def _send_late_soon(self) -> None:
        """Send the late probe outcomes in the background, if Redis answers now (else
        when it answers again: `_probe`)."""
        if not self._late or not self.health.up:
            return
        if alive(self._late_task):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a sync caller: `record_sync` sends them
            return
        self._late_task = loop.create_task(self._send_late())

    def _late_call(
        self,
    ) -> tuple[int, tuple[Any, ...], tuple[str, str], tuple[Any, ...]] | None:
        """The next late probe outcome (its id, its entry, its record call), if any still
        can matter."""
        while True:
            try:
                probe_id, entry = self._late.popitem()
            except KeyError:
                return None
            breaker_key, breaker, code, slow, at = entry
            if self._clock.monotonic() - at < breaker.probe_lease_s:  # (else: no slot left)
                args = (
                    self._rng(),
                    ANY_EPOCH,
                    probe_id,
                    code,
                    1 if slow else 0,
                    0,
                    0,
                    *self.breaker_config_args(breaker),
                )
                return probe_id, entry, self.breaker_keys(breaker_key), args

    def _late_failed(self, probe_id: int, entry: tuple[Any, ...], down: bool) -> None:
        """A late probe outcome not sent: kept for when Redis answers again (`down`),
        else (Redis refused it) dropped."""
        if down and len(self._late) < _LATE_MAX:
            self._late.setdefault(probe_id, entry)
        else:
            self.stats.dropped_records += 1

    async def _send_late(self) -> None:
        try:
            while self.health.up:
                planned = self._late_call()
                if planned is None:
                    return
                probe_id, entry, keys, args = planned
                token = object()
                self._carrying[token] = (asyncio.get_running_loop(), 0, 0, (probe_id, entry))
                try:
                    got = await self.call(RECORD, keys, args)
                except asyncio.CancelledError:
                    # (the close cancels this task): kept for the close's last flush, which
                    # sends or counts it. Taken out and cancelled, it was gone uncounted, its
                    # probe slot held fleet-wide until its lease ended. Sent twice, the
                    # second finds no such slot and changes nothing.
                    self._late_failed(probe_id, entry, True)
                    raise
                finally:
                    self._carrying.pop(token, None)
                if got is None:
                    self._late_failed(probe_id, entry, not self.health.up)
        except Exception:  # a background task: nobody else would see it
            logger.exception("fidelity_mw: could not send late probe outcomes")

    def _send_late_sync(self) -> None:
        """`_send_late` for sync callers, over the blocking client, at most a few."""
        link = self.sync_link()
        for _ in range(8):
            if not link.up:
                return
            planned = self._late_call()
            if planned is None:
                return
            probe_id, entry, keys, args = planned
            if link.call(RECORD, keys, args) is None:
                self._late_failed(probe_id, entry, not link.up)

    # Plain successes (not a probe, not slow) cannot open or close a breaker:
    # they only add to the window's call count. Instead of one call each, they
    # ride on this instance's next call about the same breaker (its next
    # admit or failure), or are flushed after one sync interval. A failure
    # carries them along, so the window never sees this instance's failures
    # without its earlier successes.

    def _defer_success(self, breaker_key: str, breaker: BreakerConfig, epoch: int) -> None:
        deferred, lock = self._deferred, self._deferred_lock
        lock.acquire()  # (not `with`: half the cost, on every plain success)
        try:
            entry = deferred.get(breaker_key)
            if entry is None or epoch > entry[1]:
                deferred[breaker_key] = [breaker, epoch, 1]
            elif epoch == entry[1]:
                entry[2] += 1
        finally:
            lock.release()
        # (a success from an older epoch would be ignored by Redis: drop it)
        if not alive(self._deferred_task):
            try:
                self._deferred_timer.arm(self.sync_s)  # (armed already: that one stands)
            except RuntimeError:  # a sync caller: they ride on its next call about this breaker
                return

    def _deferred_due(self) -> None:
        """The deferred successes' timer: a sync interval since the first of them."""
        if not self._deferred or self._closing:
            return  # they rode on calls about their breakers meanwhile (or aclose sends them)
        if not alive(self._deferred_task):
            self._deferred_task = asyncio.get_running_loop().create_task(self._flush_deferred())

    def _carried(self, breaker_key: str | None) -> int:
        """How many deferred successes the next call about this breaker takes along."""
        entry = self._deferred.get(breaker_key) if breaker_key is not None else None
        return int(entry[2]) if entry is not None else 0

    def _take_deferred(self, breaker_key: str) -> tuple[int, int]:
        lock = self._deferred_lock
        lock.acquire()
        try:
            entry = self._deferred.pop(breaker_key, None)
        finally:
            lock.release()
        return (entry[1], entry[2]) if entry is not None else (0, 0)

    async def _flush_deferred(self) -> None:
        try:
            # Until fewer than a pass's worth are left: one pass an interval drained 64
            # breakers, one round trip each, and a service calling more new upstream
            # hosts than that per interval (URLs clients supply) grew the table for good.
            await self._flush_deferred_now()
            while len(self._deferred) > _DEFERRED_PER_PASS and self.health.up:
                await self._flush_deferred_now()
        except Exception:  # a background task: nobody else would see it
            logger.exception("fidelity_mw: could not flush deferred breaker outcomes")
        if self._deferred and not self._closed:
            self._deferred_timer.arm(self.sync_s)

    async def _flush_deferred_now(self) -> None:
        """Send the deferred successes of up to `_DEFERRED_PER_PASS` breakers, at once (the
        coalescer makes them one batch.lua call per `MAX_BATCH`)."""
        sends = []
        counts = []
        call = self.coalescer.call if self.coalesce else self.call
        for breaker_key in list(self._deferred)[:_DEFERRED_PER_PASS]:
            entry = self._deferred.get(breaker_key)
            if entry is None:
                continue
            epoch, count = self._take_deferred(breaker_key)
            if not count:
                continue  # (taken by a call in another thread meanwhile)
            args = (self._rng(), epoch, 0, "i", 0, epoch, count)
            keys = (self.key("br", breaker_key), self.key("bp", breaker_key))
            sends.append(call(RECORD, keys, (*args, *self.breaker_config_args(entry[0]))))
            counts.append(count)
        if not sends:
            return
        token = object()
        self._carrying[token] = (asyncio.get_running_loop(), sum(counts), 0, None)
        try:
            replies = await asyncio.gather(*sends)
        except asyncio.CancelledError:  # (aclose's bounded wait): counted as replies lost are
            self.stats.dropped_records += sum(counts)
            raise
        finally:
            self._carrying.pop(token, None)
        for got, count in zip(replies, counts, strict=True):
            if got is None:
                self.stats.dropped_records += count

    async def breaker_gate(
        self, breaker_key: str, breaker: BreakerConfig, now: float
    ) -> tuple[Gate, str, float]:
        """Gate an outbound attempt (one call; pending budget counts ride along)."""
        gate, _allowed, source, age = await self.outbound_gate(
            breaker_key, breaker, None, None, False, now
        )
        assert gate is not None
        return gate, source, age

    # ------------------------------------------------------------ outbound

    async def outbound_gate(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        budget_key: str | None,
        cfg: RetryConfig | None,
        retry: bool,
        now: float,
    ) -> tuple[Gate | None, bool, str, float]:
        """One call before an outbound attempt: host breaker gate + retry budget.

        First attempt (`retry=False`): counts one request on the budget and
        gates the breaker. Retry (`retry=True`): spends one retry if the
        budget allows it *and* the breaker admits; a denied retry takes no
        gate (no probe slot), a breaker rejection spends no retry. Returns
        (gate or None, budget allowed, source, age_s). Pending counts from
        `budget_request` ride along.
        """
        carried = self._carried(breaker_key)
        keys, args, taken = self._outbound_call(breaker_key, breaker, budget_key, cfg, retry)
        if not keys:
            return None, True, SOURCE_REDIS, 0.0
        sent = self.health.up
        # Budget counts of earlier requests riding along (`budget_request`): this call is
        # all that holds them now (its own request's count aside).
        counts = -1 if budget_key is not None and cfg is not None and not retry else 0
        for _key, _cfg, count in taken:
            counts += count
        token = None
        if counts:
            token = object()
            self._carrying[token] = (asyncio.get_running_loop(), carried, counts, None)
        # (Redis known down: the call answers at once, unbounded)
        wait_s = self._wait_s() if sent else 0.0
        try:
            if not wait_s:
                got = await self.call(OUTBOUND, keys, args)
            else:
                # A caller cancelled while it waits leaves the call running: its late
                # reply gives back what it took (`_gate_late`), as `LATE_ANSWER` does.
                give_back = functools.partial(
                    self._gate_late, breaker_key, breaker, budget_key, cfg, retry, taken, now
                )
                bounded = await self._within(
                    self.call(OUTBOUND, keys, args),
                    wait_s,
                    functools.partial(self._gate_dropped, give_back),
                )
                if isinstance(bounded, asyncio.Task):  # the request's deadline came first
                    used = False
                    try:
                        answer = self._lost_probe(
                            self._outbound_fallback(
                                breaker_key,
                                breaker,
                                budget_key,
                                cfg,
                                retry,
                                taken,
                                now,
                                WHY_DEADLINE,
                            ),
                            breaker_key,
                            breaker,
                            args,
                        )
                        gate = answer[0]
                        used = answer[1] and (gate is None or gate.verdict != "reject")
                        return answer
                    finally:  # (failing closed: raised, and refused)
                        self._on_late(bounded, functools.partial(give_back, carried, used))
                got = bounded
        except asyncio.CancelledError as cancel:
            # A raw cancellation while the reply was on its way, read all the same: what
            # the script took rides on the cancellation, for the caller to give back.
            reply = getattr(cancel, _LATE_REPLY, None)
            if reply is not None:
                late = self._outbound_answer(
                    (reply, 0.0), breaker_key, breaker, budget_key, cfg, retry, taken, now
                )
                setattr(cancel, LATE_ANSWER, late)
            else:  # the reply lost (or never sent): so are the deferred successes it took
                self.stats.dropped_records += carried
                if sent and breaker_key is not None and breaker is not None:
                    # and a probe slot it may have taken is given back once Redis answers
                    self._report_late(breaker_key, breaker, _sent_probe(args), IGNORED, False)
                if counts:
                    # Never sent (it waited for a connection): they wait for the next
                    # call again. Sent, Redis may have counted them: never resent, counted
                    # as lost (a cancelled budget flush lost them without a word).
                    if getattr(cancel, _UNSENT, False):
                        self._pending_again(taken, budget_key, retry)
                    else:
                        self._budget_counts_lost(counts, "a call carrying them was cancelled")
            raise
        finally:
            if token is not None:
                self._carrying.pop(token, None)
        answer = self._outbound_answer(
            got, breaker_key, breaker, budget_key, cfg, retry, taken, now, carried, False
        )
        if got is None and sent:
            return self._lost_probe(answer, breaker_key, breaker, args)
        return answer

    def _gate_dropped(self, late: Callable[..., None], task: asyncio.Task[Any]) -> None:
        """A bounded outbound gate whose caller was cancelled while it waited: the call
        goes on, and a retry it spent is given back when its reply comes (the probe
        slot it may have taken, and the successes it carried, `outbound_gate`'s
        cancellation handler reports and counts, as for a call whose reply was lost)."""
        self._on_late(task, functools.partial(late, 0, False))

    def _gate_late(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        budget_key: str | None,
        cfg: RetryConfig | None,
        retry: bool,
        taken: Sequence[tuple[str, RetryConfig, int]],
        now: float,
        carried: int,
        used: bool,
        got: tuple[Any, float] | None,
    ) -> None:
        """The late answer of an outbound gate its caller stopped waiting for. A probe it
        may have taken is reported under its id already (`_lost_probe`, `_gate_dropped`).
        A retry it spent stays spent when the attempt went ahead on the fallback's answer
        (`used`: it was sent), and is given back when it did not."""
        if got is None:
            self.stats.dropped_records += carried  # deferred successes it took along
            return
        if used or not retry or budget_key is None or cfg is None:
            return
        answer = self._outbound_answer(
            got, breaker_key, breaker, budget_key, cfg, retry, taken, now
        )
        gate = answer[0]
        if (
            answer[2] != SOURCE_REDIS
            or not answer[1]
            or (gate is not None and gate.verdict == "reject")
        ):
            return  # (nothing spent: a denied retry, a breaker's refusal, a bad reply)
        self.stats.deadline_refunds += 1
        refund = self.budget_refund(
            budget_key, cfg, SOURCE_REDIS, 0.0, now, getattr(answer, "spent_at", None)
        )
        self._keep(asyncio.get_running_loop().create_task(refund))

    def _lost_probe(
        self,
        answer: tuple[Gate | None, bool, str, float],
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        args: Sequence[Any],
    ) -> tuple[Gate | None, bool, str, float]:
        """The fallback answer of an outbound gate sent whose reply was lost: Redis may
        have made it the breaker's probe under the id it sent (see `_report_late`)."""
        if breaker_key is None or breaker is None:
            return answer
        pid = _sent_probe(args)
        gate = answer[0]
        if gate is None or not answer[1] or gate.verdict == "reject":
            self._report_late(breaker_key, breaker, pid, IGNORED, False)  # no call made
            return answer
        values = (gate._replace(sent_probe_id=pid), *answer[1:])
        if isinstance(answer, GateAnswer):
            return GateAnswer(values, answer.why, answer.spent_at)
        return values

    def _pending_again(
        self,
        taken: Sequence[tuple[str, RetryConfig, int]],
        budget_key: str | None,
        retry: bool,
    ) -> None:
        """Budget counts a call took along and never sent, waiting again (as counts made
        now: the next call or the timer sends them, or the close)."""
        now = self._clock.monotonic()
        with self._pending_lock:
            for key, key_cfg, count in taken:
                if key == budget_key and not retry:
                    count -= 1  # (the cancelled call's own request: it made no attempt)
                if count <= 0:
                    continue
                entry = self._pending.get(key)
                if entry is None:
                    self._pending[key] = [key_cfg, count, now]
                else:
                    entry[1] += count
        if not self._closing:
            self._pending_timer.arm(self.sync_s)

    def _budget_counts_lost(self, counts: int, why: str) -> None:
        """Retry-budget request counts gone: counted, and said (at most once per 10 s; a
        closing store says it once, in the close's line)."""
        self.stats.dropped_budget_counts += counts
        if not self._closing:
            warn(
                logger,
                "budget_counts_lost",
                "fidelity_mw: %d retry-budget request count(s) lost: %s (the fleet's "
                "budget allows that many fewer retries' worth)",
                counts,
                why,
            )

    def _forget_closed_loop(self) -> None:
        """Count what calls of an event loop that closed without ending them (a worker's
        loop, `run_until_complete` then `close()`) had taken along: they never end, nor run
        their `except` or `finally`, so it was gone without a count. A late probe outcome
        waits again (sent twice, the second changes nothing); plain successes and budget
        counts may have reached Redis: counted as lost, never resent."""
        outcomes = counts = 0
        for token, (loop, successes, budget, late) in list(self._carrying.items()):
            if not loop.is_closed() or self._carrying.pop(token, None) is None:
                continue
            outcomes += successes
            counts += budget
            if late is not None:
                self._late_failed(late[0], late[1], True)
        if outcomes:
            self.stats.dropped_records += outcomes
            logger.warning(
                "fidelity_mw: %d breaker outcome(s) lost: a Redis store call carrying them "
                "was left unfinished by an event loop that closed",
                outcomes,
            )
        if counts:
            self._budget_counts_lost(
                counts,
                "a Redis store call carrying them was left unfinished by an event loop that closed",
            )

    def outbound_gate_sync(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        budget_key: str | None,
        cfg: RetryConfig | None,
        retry: bool,
        now: float,
    ) -> tuple[Gate | None, bool, str, float]:
        """`outbound_gate` for sync callers in any thread, over a blocking client
        (`SyncLink`): the same script, the same single round trip."""
        carried = self._carried(breaker_key)
        keys, args, taken = self._outbound_call(breaker_key, breaker, budget_key, cfg, retry)
        if not keys:
            return None, True, SOURCE_REDIS, 0.0
        link = self.sync_link()
        sent = link.up
        got = link.call_within(OUTBOUND, keys, args, self._wait_s() if sent else 0.0)
        if got is False:
            # The request's deadline came first: decided per `on_error` now. Its reply
            # unread, a retry it spent stays spent (counted as taken: the budget's
            # window bounds it), deferred successes it carried are lost; a probe slot
            # it may have taken is reported under its id (`_lost_probe`).
            self.stats.deadline_cuts += 1
            self.stats.dropped_records += carried
            answer = self._outbound_fallback(
                breaker_key, breaker, budget_key, cfg, retry, taken, now, WHY_DEADLINE
            )
            return self._lost_probe(answer, breaker_key, breaker, args)
        answer = self._outbound_answer(
            got, breaker_key, breaker, budget_key, cfg, retry, taken, now, carried, True
        )
        if got is None and sent:
            return self._lost_probe(answer, breaker_key, breaker, args)
        return answer

    def _reopening(self) -> None:
        """A client is made (under `_bind_lock`). Used again after `aclose` (an app whose
        lifespan runs twice, as two `with TestClient(app)` blocks do), the store reopens
        as a new one would start; said, in case the close was meant to be the end (an
        engine shared with an app that closed it)."""
        if self._closed:
            self._closed = False
            logger.info(
                "fidelity_mw: the Redis store (%s) is used again after aclose(): "
                "opening a new client",
                _server_of(self.url),
            )

    def sync_link(self) -> SyncLink:
        link = self._sync_link
        if link is None:
            with self._bind_lock:
                link = self._sync_link
                if link is None:
                    self._reopening()
                    plain, cluster = redis_url(self.url)
                    link = self._sync_link = SyncLink(
                        plain,
                        cluster,
                        self.config,
                        self._clock,
                        self.stats,
                        rng=self._rng,
                        server=_server_of(self.url),
                    )
        return link

    def _outbound_call(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        budget_key: str | None,
        cfg: RetryConfig | None,
        retry: bool,
    ) -> tuple[list[str], list[Any], list[tuple[str, RetryConfig, int]]]:
        has_breaker = breaker_key is not None and breaker is not None
        keys: list[str] = []
        args: list[Any] = ["1" if has_breaker else "0", self._rng(), 0]
        if breaker_key is not None and breaker is not None:
            keys.append(self.key("br", breaker_key))
            keys.append(self.key("bp", breaker_key))
            args.extend(self.breaker_config_args(breaker))
            args.extend(self._take_deferred(breaker_key))
            args.append(self._probe_id())  # (at _PROBE_ARG: `_sent_probe`)
        taken: list[tuple[str, RetryConfig, int]] = []
        budget = budget_key is not None and cfg is not None
        pending: list[Any] | None = None
        others: list[tuple[str, list[Any]]] = []
        if self._pending:  # (tiered mode's counts: an exact store counts in the call)
            # Taken under the lock: a sync transport's threads call here too, and one that
            # listed a key another thread then took raised KeyError (a store error: the
            # call failed closed, or went out ungated) with the counts it had taken lost;
            # a count added to an entry just taken was lost too (`budget_request`).
            with self._pending_lock:
                if budget_key is not None and budget:
                    pending = self._pending.pop(budget_key, None)
                for other in list(self._pending)[: _MAX_PENDING_PER_CALL - budget]:
                    others.append((other, self._pending.pop(other)))
        if budget_key is not None and cfg is not None:
            add = (pending[1] if pending is not None else 0) + (0 if retry else 1)
            taken.append((budget_key, cfg, add))
            keys.append(self.key("bu", budget_key))
            args.extend((*budget_args(cfg), add, 1 if retry else 0))
        for other, (other_cfg, count, _since) in others:
            taken.append((other, other_cfg, count))
            keys.append(self.key("bu", other))
            args.extend((*budget_args(other_cfg), count, 0))
        args[2] = len(taken)
        return keys, args, taken

    def _outbound_answer(
        self,
        got: tuple[Any, float] | None,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        budget_key: str | None,
        cfg: RetryConfig | None,
        retry: bool,
        taken: Sequence[tuple[str, RetryConfig, int]],
        now: float,
        carried: int = 0,
        sync: bool = False,
    ) -> tuple[Gate | None, bool, str, float]:
        if got is None:
            self.stats.dropped_records += carried  # deferred successes it took along
            return self._outbound_fallback(
                breaker_key, breaker, budget_key, cfg, retry, taken, now, self._why(sync)
            )
        reply, age = got
        try:
            allowed = True if budget_key is None or cfg is None else reply[6] == 1
            gate = None
            if breaker_key is not None and breaker is not None and allowed:
                # (a denied retry asked no breaker)
                gate = Gate(
                    _text(reply[1]), _text(reply[2]), int(reply[3]), float(reply[4]), int(reply[5])
                )
        except _REPLY_ERRORS as exc:
            self._bad_reply(exc)
            self.stats.dropped_records += carried
            return self._outbound_fallback(
                breaker_key, breaker, budget_key, cfg, retry, (), now, WHY_ERROR
            )
        if retry and allowed and (gate is None or gate.verdict != "reject"):
            # A retry spent: when, on the server's clock (the script's `now`), so a refund
            # finds its bucket exactly (an age measured here is off by the round trips).
            try:
                spent_at = float(reply[0])
            except _REPLY_ERRORS:
                spent_at = None
            return GateAnswer((gate, allowed, SOURCE_REDIS, age), None, spent_at)
        return gate, allowed, SOURCE_REDIS, age

    def _outbound_fallback(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        budget_key: str | None,
        cfg: RetryConfig | None,
        retry: bool,
        taken: Sequence[tuple[str, RetryConfig, int]],
        now: float,
        why: str = WHY_UNREACHABLE,
    ) -> tuple[Gate | None, bool, str, float]:
        """Decide without Redis, per `on_error`. The answer says `why` (`GateAnswer`):
        the outbound decisions taken on it carry it, as the inbound ones do."""
        self.stats.fallbacks += 1
        age = self.fallback_age()
        mode = self.on_error
        has_breaker = breaker_key is not None and breaker is not None
        if mode == "closed":
            raise _closed(why)
        if mode == "open":
            gate = Gate("allow", CLOSED, _OPEN_EPOCH, 0.0) if has_breaker else None
            return GateAnswer((gate, True, SOURCE_FALLBACK, age), why)
        local = self.local
        # the counts that could not be sent still count, locally
        for key, key_cfg, count in taken:
            add = count - (1 if key == budget_key and not retry else 0)
            for _ in range(add):
                local.budget_request_now(key, key_cfg, now)
        gate, allowed = local.outbound_gate_now(breaker_key, breaker, budget_key, cfg, retry, now)
        if gate is not None:
            gate = gate._replace(epoch=_local_epoch(gate.epoch))
        return GateAnswer((gate, allowed, SOURCE_FALLBACK, age), why)

    async def budget_request(self, budget_key: str, cfg: RetryConfig, now: float) -> None:
        """Count a top-level request: no round trip, it rides on the next outbound call.

        Counts waiting longer than one sync interval are sent in the background.
        """
        if not self.health.up:
            if self.on_error == "local":
                self.local.budget_request_now(budget_key, cfg, now)
            return
        pending = self._pending
        with self._pending_lock:  # (a sync transport's thread may take them: `_outbound_call`)
            entry = pending.get(budget_key)
            if entry is None:
                pending[budget_key] = entry = [cfg, 1, self._clock.monotonic()]
                # The oldest count waiting (the first entry: a key sent is popped) says
                # when to flush: a key counted once (a new upstream host per call, URLs
                # clients supply) never came again to say it, and the table grew for good.
                entry = pending[next(iter(pending))]
                new = True
            else:
                entry[0] = cfg
                entry[1] += 1
                new = False
        if new or self._pending_timer.elsewhere():
            # And if no call comes at all (the process goes quiet), the timer sends it:
            # the fleet's budget counted this process's last requests only when its
            # next one came, hours later, or never. (Armed on a loop that closed since,
            # with counts of its own waiting: re-armed here, else it waited for a new key.)
            self._pending_timer.arm(entry[2] + self.sync_s - self._clock.monotonic())
        if self._clock.monotonic() - entry[2] >= self.sync_s and not alive(self._flush_task):
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_pending(now))

    def _oldest_pending(self) -> list[Any] | None:
        """The oldest count waiting (None: none), read under the lock: another thread's
        call taking one between the iterator's making and its read raised RuntimeError
        (the dict changed size during iteration)."""
        with self._pending_lock:
            return next(iter(self._pending.values()), None)

    def _pending_due(self) -> None:
        """The pending timer: the oldest count waiting is (about) a sync interval old."""
        if not self._pending or self._closing:
            return  # they rode on outbound calls meanwhile (or aclose sends them)
        if not alive(self._flush_task):
            self._flush_task = asyncio.get_running_loop().create_task(
                self._flush_pending(self._clock.monotonic())
            )
        # (a flush running re-arms the timer when it ends, for what it leaves)

    async def _flush_pending(self, now: float) -> None:
        """Send the budget request counts waiting (a background task): every key waiting
        when it starts, `_MAX_PENDING_PER_CALL` a call, then again while the oldest
        count left is a sync interval old; the timer is armed for what is left."""
        try:
            while True:
                for _ in range(-(-len(self._pending) // _MAX_PENDING_PER_CALL)):
                    if not self._pending or not self.health.up:
                        break
                    await self.outbound_gate(None, None, None, None, False, now)
                # Counts made while this flush waited for Redis found it running and
                # started none; with no request after them (the last ones before a
                # quiet spell), nothing else would send them, however old.
                oldest = self._oldest_pending()
                now = self._clock.monotonic()
                if oldest is None or now - oldest[2] < self.sync_s or not self.health.up:
                    break
        except Exception:  # closed mode raises; nobody else would see it
            logger.debug("fidelity_mw: budget counts not sent", exc_info=True)
        oldest = self._oldest_pending()
        if oldest is not None and not self._closed:
            # Younger counts (made while this flush ran), or all of them with Redis
            # down or failing: looked at again when the oldest is a sync interval old,
            # or an interval from now if it is already (a timer, and no round trip
            # while Redis is down).
            delay = oldest[2] + self.sync_s - self._clock.monotonic()
            self._pending_timer.arm(delay if delay > 0.0 else self.sync_s)

    async def budget_try_retry(
        self, budget_key: str, cfg: RetryConfig, now: float
    ) -> tuple[bool, str, float]:
        _gate, allowed, source, age = await self.outbound_gate(
            None, None, budget_key, cfg, True, now
        )
        return allowed, source, age

    async def budget_refund(
        self,
        budget_key: str,
        cfg: RetryConfig,
        source: str,
        age_s: float,
        now: float,
        spent_at: float | None = None,
    ) -> None:
        """Give back a retry spent and then not sent (`StateStore.budget_refund`): one
        `budget_refund.lua` call, or the fallback's counts when it was spent there."""
        planned = self._budget_refund_call(budget_key, cfg, source, age_s, now, spent_at)
        if planned is not None:
            await self.call(BUDGET_REFUND, *planned)  # None (Redis down): dropped

    def budget_refund_sync(
        self,
        budget_key: str,
        cfg: RetryConfig,
        source: str,
        age_s: float,
        now: float,
        spent_at: float | None = None,
    ) -> None:
        """`budget_refund` for sync callers in any thread, over the blocking client."""
        planned = self._budget_refund_call(budget_key, cfg, source, age_s, now, spent_at)
        if planned is not None:
            self.sync_link().call(BUDGET_REFUND, *planned)

    def _budget_refund_call(
        self,
        budget_key: str,
        cfg: RetryConfig,
        source: str,
        age_s: float,
        now: float,
        spent_at: float | None = None,
    ) -> tuple[list[str], list[Any]] | None:
        if source == SOURCE_FALLBACK:
            if self.on_error == "local":  # (`open` spent nothing anywhere)
                self.local.budget_refund_now(budget_key, cfg, age_s, now)
            return None
        args = [cfg.budget_window_s, repr(max(0.0, age_s))]
        if spent_at is not None:  # the server's time of the spend: its bucket, exactly
            args.append(repr(spent_at))
        return [self.key("bu", budget_key)], args

    # ------------------------------------------------------------ lifecycle

    async def aclose_loop(self) -> None:
        """Close only the running loop's client (a worker thread's loop that is ending)."""
        loop = asyncio.get_running_loop()
        with self._bind_lock:
            mine = self._clients.pop(loop, None)
            if self._bound[0] is loop:
                self._bound = (None, None, Slots(self.config.pool_size))
        if mine is not None:
            await _close_client(mine[0])

    def _unsent(self) -> tuple[int, int, int]:
        """What this process holds for Redis and has not sent: late probe outcomes,
        deferred plain successes, retry-budget request counts."""
        now = self._clock.monotonic()
        # (a late outcome whose probe lease has ended has no slot left to free)
        late = sum(1 for e in self._late.values() if now - e[4] < e[1].probe_lease_s)
        with self._deferred_lock:
            deferred = sum(int(entry[2]) for entry in self._deferred.values())
        with self._pending_lock:
            pending = sum(int(entry[1]) for entry in self._pending.values())
        return late, deferred, pending

    async def _send_unsent(self) -> None:
        await self._send_late()
        while self._deferred and self.health.up:
            await self._flush_deferred_now()
        while self._pending and self.health.up:
            await self.outbound_gate(None, None, None, None, False, self._clock.monotonic())

    async def _flush_at_close(self, since: tuple[int, int] | None = None) -> None:
        """Send what is queued for Redis before the connections close, for at most
        `CLOSE_FLUSH_S`, if Redis answers; say what is left. A process that exits (a
        deploy's shutdown) otherwise lost them without a word: a late probe outcome's
        slot then held fleet-wide until its lease ended. `since`: the counters of lost
        outcomes and budget counts when the close began, so what the tasks it cancelled
        lost is said too."""
        stats = self.stats
        dropped, dropped_counts = (
            since if since is not None else (stats.dropped_records, stats.dropped_budget_counts)
        )
        if not any(self._unsent()) and (stats.dropped_records, stats.dropped_budget_counts) == (
            dropped,
            dropped_counts,
        ):
            return
        if self.health.up:
            try:
                await asyncio.wait_for(self._send_unsent(), CLOSE_FLUSH_S)
            except (TimeoutError, StateUnavailable):  # (closed mode's fallback raises)
                pass
            except Exception:  # closing must go on
                logger.debug("fidelity_mw: queued outcomes not sent at close", exc_info=True)
        late, deferred, pending = self._unsent()
        # what the flush dropped itself (a call Redis refused, or one its bounded wait
        # cancelled once sent) is counted there too
        lost_late_or_deferred = late + deferred + (stats.dropped_records - dropped)
        stats.dropped_records += late + deferred
        stats.dropped_budget_counts += pending
        pending = stats.dropped_budget_counts - dropped_counts
        if not (lost_late_or_deferred or pending):
            return
        self._late.clear()
        self._deferred.clear()
        self._pending.clear()
        why = (
            "Redis is unreachable"
            if not self.health.up
            else f"Redis refused them or did not take them within {CLOSE_FLUSH_S:g} s"
        )
        logger.warning(
            "fidelity_mw: closing the Redis store with %d breaker outcome(s) (probe "
            "outcomes reported late, plain successes) and %d retry-budget request "
            "count(s) not sent: %s",
            lost_late_or_deferred,
            pending,
            why,
        )

    async def _fleet_leave(self) -> None:
        """Out of the fleet at once: the others count a silent member for the hold (it may
        be deciding alone on its share), which a process that closed is not. Skipped when
        Redis is down, or this loop never reached it; failing, it counts until the hold."""
        fleet = self.fleet
        known = self._clients.get(asyncio.get_running_loop())
        if known is None or not fleet.enabled or fleet.ok_at is None or not self.health.up:
            return
        try:
            async with known[0].pipeline(transaction=False) as pipe:
                pipe.zrem(fleet.key, fleet.id)
                pipe.hdel(fleet.load_key, fleet.id)
                await pipe.execute()
        except Exception as exc:  # (best effort, at close)
            logger.debug("fidelity_mw: leaving the fleet failed (%s)", type(exc).__name__)

    async def aclose(self) -> None:
        # The timers first, and none firing to effect, before the first await: one that
        # fired during the flush or a cancelled task's ending started a flush task after
        # the tasks to cancel were read, which nothing cancelled or waited for (it ran on
        # with the client being closed, or made a new one after the close).
        # (`_flush_at_close` sends or drops what they wait for.)
        self._closing = True
        self._pending_timer.cancel()
        self._deferred_timer.cancel()
        try:
            await self._close_all()
        finally:
            self._closing = False

    async def _close_all(self) -> None:
        if self._carrying:
            self._forget_closed_loop()
        await self._flush_at_close()
        since = (self.stats.dropped_records, self.stats.dropped_budget_counts)
        link, self._sync_link = self._sync_link, None
        if link is not None:
            link.close()
        # (its batches out or queued go while Redis answers: requests that ended just
        # before the close recorded their outcomes there)
        await self.coalescer.aclose(CLOSE_FLUSH_S if self.health.up else 0.0)
        here = asyncio.get_running_loop()
        for cut in [cut for cut in self._cut if cut.get_loop() is here]:
            # (calls requests stopped waiting for, and their give-backs: as the
            # coalescer's batches, cut short by the close)
            if alive(cut):
                cut.cancel()
                await ended(cut)
        for task in (
            self.health.probe_task,
            self._flush_task,
            self._deferred_task,
            self._late_task,
            self.fleet.task,
            self._eviction_task,
        ):
            # (a task of a closed loop cannot be cancelled, nor awaited: it never runs)
            if alive(task):
                task.cancel()
                await ended(task)
        # What requests queued meanwhile (their timers start nothing now), on this client,
        # and what the tasks just cancelled lost
        await self._flush_at_close(since)
        await self._fleet_leave()
        self._pending_timer.cancel()
        self._deferred_timer.cancel()
        # Close this loop's client; clients of other loops can only be closed
        # from their loops, so they are dropped (their sockets close with them).
        loop = asyncio.get_running_loop()
        with self._bind_lock:
            mine = self._clients.pop(loop, None)
            self._clients.clear()
            self._bound = (None, None, Slots(self.config.pool_size))
            self._closed = True
        if mine is not None:
            await _close_client(mine[0])

    # ------------------------------------------------------------ read-only view

    async def snapshot(
        self, now: float, *, top: int = 20, configs: SnapshotConfigs | None = None
    ) -> StoreSnapshot:
        """The fleet's state for the keys this instance has used (Redis names keys by
        hash, so it cannot list anyone else's); the local fallback while Redis is down."""
        configs = configs or SnapshotConfigs()
        stats = self.stats
        detail: dict[str, Any] = {
            "server": _server_of(self.url),
            "up": self.health.up,
            "fallback_why": self.fallback_why,
            "on_error": self.on_error,
            "round_trips": stats.round_trips,
            "errors": stats.errors,
            "fallbacks": stats.fallbacks,
            "outages": stats.outages,
        }
        fleet = self.fleet
        if fleet.enabled:
            share = fleet.share(self._clock.monotonic())
            detail["fleet_size"] = fleet.size
            detail["fleet_size_age_s"] = None if share.age_s is None else round(share.age_s, 3)
            detail["fleet_share"] = (
                "unknown"
                if share.size is None
                else f"1/{share.size}"
                if share.weight is None
                else weight_tag(share.weight)
            )
            if fleet.weighted:
                detail["fleet_load_fraction"] = (
                    None if fleet.fraction is None else round(fleet.fraction, 4)
                )
        breaker_keys = sorted(set(self._breaker_keys) | {k for (c, k) in self._keys if c == "br"})
        budget_keys = sorted({k for (c, k) in self._keys if c == "bu"} | set(self._pending))
        limit_keys = [k for (c, k) in list(self._keys) if c == "rl"][-_SNAPSHOT_MAX_KEYS:]
        note = "keys this instance has used; Redis stores them by hash only"
        if not self.health.up:
            what = _CLOSED_WHAT.get(self.fallback_why or "", "redis is unreachable")
            return self._fallback_snapshot(now, top, detail, what, configs)
        started = self._clock.monotonic()
        # Read in chunks of pipelined commands, each chunk's replies parsed before the
        # next is sent: at 10,000 breakers one pipeline of 30,000 commands kept the event
        # loop for 100 ms packing them and parsing the replies (redis-py's work per
        # command), every request on the service waiting. Between chunks the loop runs.
        commands: list[tuple[Any, ...]] = [("TIME",)]
        commands += [
            ("HMGET", self.breaker_keys(key)[0], "st", "ep", "ou", "oa", "co", "be", "w")
            for key in breaker_keys
        ]
        commands += [("HMGET", self.key("bu", key), "be", "ix", "rq", "rt") for key in budget_keys]
        commands += [("GET", self.key("rl", key)) for key in limit_keys]
        first_budget = 1 + len(breaker_keys)
        first_limit = first_budget + len(budget_keys)
        server = 0.0
        fields: list[Any] = []  # each breaker's hash fields, parsed only for those listed
        budgets: list[BudgetView] = []
        tats: dict[str, float] = {}
        odd = 0  # keys whose reply was an error (a value of another type): left out
        try:
            async for at, replies in self._chunked(commands):
                for j, reply in enumerate(replies, at):
                    if j == 0:
                        if isinstance(reply, Exception):
                            raise reply
                        server = float(reply[0]) + float(reply[1]) / 1e6
                    elif isinstance(reply, Exception):
                        # one key holding another app's value (WRONGTYPE) must not turn
                        # the whole page into the local view: that key is left out
                        odd += 1
                        if j < first_budget:
                            fields.append(None)  # (the breakers' indexes stay aligned)
                    elif j < first_budget:
                        fields.append(reply)
                    elif j < first_limit:
                        if reply[0] is not None:
                            try:
                                key = budget_keys[j - first_budget]
                                budgets.append(_redis_budget_view(key, reply, server, configs, 0.0))
                            except _ODD_VALUE:
                                continue  # a page about the state must not fail on one odd value
                    elif reply is not None:
                        # "tat" or "tat refunded" (lib.lua); anything else is not ours to show
                        try:
                            tats[limit_keys[j - first_limit]] = float(_text(reply).split(" ", 1)[0])
                        except _ODD_VALUE:
                            continue
            # expired or never written (no `st` yet is a closed breaker): not listed
            held = [
                j for j, f in enumerate(fields) if f is not None and any(v is not None for v in f)
            ]
            keys = [breaker_keys[j] for j in held]
            chosen: Sequence[int] = range(len(held))
            if configs.top_breakers is not None and len(held) > configs.top_breakers:
                states = [_state_of(fields[j][0]) for j in held]
                chosen = first_breakers(keys, states, configs.top_breakers)
            probes: list[Any] = []
            probing = [("ZCARD", self.breaker_keys(keys[i])[1]) for i in chosen]
            async for _, replies in self._chunked(probing):
                probes += replies
        except (*_CALL_ERRORS, *_REPLY_ERRORS) as exc:
            return self._fallback_snapshot(now, top, detail, f"redis read failed: {exc}", configs)
        age = (self._clock.monotonic() - started) / 2.0
        breakers = []
        skipped = 0  # listed, then left out: not breakers of ours the page can count
        for i, count in zip(chosen, probes, strict=True):
            if isinstance(count, Exception):
                odd += 1
                skipped += 1
                continue
            try:
                breakers.append(
                    _redis_breaker_view(keys[i], fields[held[i]], count, server, configs, age)
                )
            except _ODD_VALUE:
                # a page about the state must not fail on one odd value
                odd += 1
                skipped += 1
        budget_count = len(budgets)
        if configs.top_budgets is not None and budget_count > configs.top_budgets:
            budgets = heapq.nsmallest(configs.top_budgets, budgets, key=_busiest_budget)
        return StoreSnapshot(
            kind="redis",
            source=SOURCE_REDIS,
            age_s=age,
            breakers=tuple(breakers),
            limiter_keys=top_limiter_keys(tats, server, top, SOURCE_REDIS, age),
            limiter_key_count=len(tats),
            budgets=tuple(dataclasses.replace(b, age_s=age) for b in budgets),
            detail=detail,
            notes=(note,)
            if not odd
            else (note, f"{odd} keys held values that are not ours (an error reply): left out"),
            breaker_count=len(held) - skipped,
            budget_count=budget_count,
        )

    async def _chunked(
        self, commands: Sequence[tuple[Any, ...]]
    ) -> AsyncIterator[tuple[int, list[Any]]]:
        """The replies to `commands`, pipelined `_SNAPSHOT_CHUNK` at a time: (the index of
        the chunk's first command, its replies)."""
        client = self.client()
        for at in range(0, len(commands), _SNAPSHOT_CHUNK):
            pipe = client.pipeline(transaction=False)
            for command in commands[at : at + _SNAPSHOT_CHUNK]:
                pipe.execute_command(*command)
            async with asyncio.timeout(self._timeout_s * 4):
                # each reply as it comes, an error reply too (the caller leaves that key out)
                replies = list(await pipe.execute(raise_on_error=False))
            yield at, replies

    def _fallback_snapshot(
        self,
        now: float,
        top: int,
        detail: dict[str, Any],
        why: str,
        configs: SnapshotConfigs | None = None,
    ) -> StoreSnapshot:
        local = local_snapshot(self.local, "redis", now, top, configs)
        age = self.fallback_age()
        return StoreSnapshot(
            kind="redis",
            source=SOURCE_FALLBACK,
            age_s=age,
            breakers=tuple(
                dataclasses.replace(b, source=SOURCE_FALLBACK, age_s=age) for b in local.breakers
            ),
            limiter_keys=tuple(
                dataclasses.replace(k, source=SOURCE_FALLBACK, age_s=age)
                for k in local.limiter_keys
            ),
            limiter_key_count=local.limiter_key_count,
            budgets=tuple(
                dataclasses.replace(b, source=SOURCE_FALLBACK, age_s=age) for b in local.budgets
            ),
            breaker_count=local.breaker_count,
            budget_count=local.budget_count,
            detail=detail,
            notes=(
                f"{why}: showing this instance's local fallback state (on_error={self.on_error})",
            ),
        )


_CLOSED_WHAT: Final = {
    WHY_READ_ONLY: "redis is a read-only replica",
    WHY_DEADLINE: "redis did not answer before the request's deadline",
    WHY_ERROR: "redis failed this call",
}


# Where outbound.lua's arguments carry the probe id (after has_breaker, u, n_budgets,
# 10 config values and the deferred successes' epoch and count).
_PROBE_ARG: Final = 15


def _sent_probe(args: Sequence[Any]) -> int:
    return int(args[_PROBE_ARG])


def _closed(why: str) -> StateUnavailable:
    """The refusal of a store that fails closed, saying why (as the decision details do)."""
    what = _CLOSED_WHAT.get(why, "redis is unreachable")
    return StateUnavailable(f"{what} and state.on_error is 'closed'", why=why)


def _server_of(url: str) -> str:
    """host:port (or the socket path) of a state URL, without credentials."""
    parts = urlsplit(redis_url(url)[0])
    return f"{parts.hostname or parts.path}:{parts.port or ''}".rstrip(":")


def _stale_connection(exc: BaseException) -> bool:
    """A broken connection (reset, closed, refused), as opposed to a slow server
    (timeout) or an error reply: the kind a fresh connection may not have."""
    if isinstance(exc, TimeoutError | RedisTimeoutError | ResponseError):
        return False
    return isinstance(exc, RedisConnectionError | OSError)


# redis-py's reply reader: a failure raised through it came after the whole command
# was written (a failed write raises from the writer, before any of this).
_READ_REPLY: Final = AbstractConnection.read_response.__code__


def _reply_lost(exc: BaseException) -> bool:
    """The call was sent in full and failed while its reply was awaited."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is _READ_REPLY:
            return True
        tb = tb.tb_next
    return False


async def _drop_idle_connections(client: RedisClient) -> None:
    """Disconnect the pool's idle connections; the next call connects afresh.

    redis-py's `ConnectionPool.disconnect` gathers the disconnects with
    `return_exceptions=True`, and can return normally when the task awaiting it is
    cancelled: the cancellation is raised here again (else the probe, cancelled by
    `aclose`, went on probing and `aclose` waited for it forever)."""
    if isinstance(client, Redis):
        with contextlib.suppress(*_CALL_ERRORS, RuntimeError):
            await client.connection_pool.disconnect(inuse_connections=False)
        if isinstance(client, LaneClient):
            with contextlib.suppress(*_CALL_ERRORS, RuntimeError):
                await client.drop_idle()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError


async def _close_client(client: RedisClient) -> None:
    with contextlib.suppress(*_CALL_ERRORS, RuntimeError):
        if isinstance(client, Redis):
            await client.aclose(close_connection_pool=True)
        else:
            await client.aclose()


# ---------------------------------------------------------------- replies


_WORDS: Final = {
    w.encode(): w for w in ("allow", "probe", "reject", "closed", "open", "half_open", "")
}


def _text(value: Any) -> str:
    word = _WORDS.get(value) if isinstance(value, bytes) else None
    if word is not None:
        return word
    return value.decode() if isinstance(value, bytes) else str(value)


# A Lua 1 as a script's reply element (int), or as a batch's reply text carries it.
_ONE: Final = (1, "1")
# A limit's "allowed" of 2: admitted from retry credit (lib.lua admit_at).
_TWO: Final = (2, "2")


def parse_admit(
    reply: Sequence[Any], has_breaker: bool, n_limits: int, source: str, age: float
) -> InboundResult:
    """Turn admit.lua's flat reply into an InboundResult."""
    gate: Gate | None = None
    if has_breaker:
        verdict, state = reply[1], reply[2]
        gate = Gate(
            verdict if type(verdict) is str else _text(verdict),  # a batch's reply is text
            state if type(state) is str else _text(state),
            int(reply[3]),
            float(reply[4]),
            int(reply[5]),
        )
        if gate.verdict == "reject":
            return InboundResult(gate, (), False, source, age)
    # The TAT each limit now holds, on the server's clock (server now + reset):
    # what a refund needs to give back only units still outstanding. An admission
    # from retry credit left the TAT alone: it reports a full bucket's marker
    # (server now, `decide.gcra.credit_verdict`).
    server_now = float(reply[0])
    if n_limits == 1:  # the common case, without the generator
        reset = float(reply[9])
        credit = reply[7] in _TWO
        verdicts: tuple[LimitVerdict, ...] = (
            LimitVerdict(
                credit or reply[7] in _ONE,
                server_now if credit else server_now + reset,
                int(reply[8]),
                reset,
                float(reply[10]),
                credit,
            ),
        )
    else:
        verdicts = tuple(
            LimitVerdict(
                reply[i] in _ONE or reply[i] in _TWO,
                server_now if reply[i] in _TWO else server_now + float(reply[i + 2]),
                int(reply[i + 1]),
                float(reply[i + 2]),
                float(reply[i + 3]),
                reply[i] in _TWO,
            )
            for i in range(7, 7 + 4 * n_limits, 4)
        )
    if len(reply) > 7 + 4 * n_limits:  # keys that had refunds: see lib.lua admit_at
        verdicts = _marked(verdicts, reply[7 + 4 * n_limits :])
    return InboundResult(gate, verdicts, reply[6] in _ONE, source, age)


def _marked(
    verdicts: tuple[LimitVerdict, ...], refunded: Sequence[Any]
) -> tuple[LimitVerdict, ...]:
    """Each admission's marker (`decide.gcra.marker`): its TAT plus the key's refunded seconds."""
    return tuple(
        v._replace(tat=marker(v.tat, float(r))) if v.allowed else v
        for v, r in zip(verdicts, refunded, strict=True)
    )


# ---------------------------------------------------------------- snapshot views

_SNAPSHOT_MAX_KEYS: Final = 5_000
# commands per pipeline of a snapshot: redis-py packs and parses 10-15 µs of Python per
# command on the event loop, so a chunk keeps the loop 2-3 ms
_SNAPSHOT_CHUNK: Final = 200


def _busiest_budget(view: BudgetView) -> tuple[int, int]:
    return -view.retries, -view.requests


def _state_of(value: Any) -> str:
    """A breaker hash's `st` as the scripts read it (none yet: closed), never raising."""
    if value is None:
        return CLOSED
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


_BUCKETS: Final = 10


def _redis_breaker_view(
    key: str,
    fields: Sequence[Any],
    probes: Any,
    server: float,
    configs: SnapshotConfigs,
    age: float,
) -> BreakerView:
    """A breaker hash (see lib.lua) aged to the server's `TIME`, as br_rotate would."""
    state = _text(fields[0]) if fields[0] is not None else "closed"  # as br_load reads it
    epoch = int(fields[1] or 0)
    open_until = float(fields[2] or 0.0)
    opened_at = float(fields[3] or 0.0)
    consecutive = int(fields[4] or 0)
    bucket_end = float(fields[5] or 0.0)
    window = [int(n) for n in _text(fields[6]).split(",")] if fields[6] else []
    if len(window) != 3 * _BUCKETS:
        window = [0] * (3 * _BUCKETS)
    cfg = configs.breaker(key)
    if cfg is not None and bucket_end and server >= bucket_end:
        steps = int((server - bucket_end) / (cfg.window_s / _BUCKETS)) + 1
        window = [0] * (3 * _BUCKETS) if steps >= _BUCKETS else window[3 * steps :]
    calls, failures, slow = (sum(window[j::3]) for j in range(3))
    since = server - opened_at if state == "open" else None
    retry_after = max(0.0, open_until - server) if state == "open" else 0.0
    return BreakerView(
        key,
        state,
        epoch,
        since,
        calls,
        failures,
        slow,
        consecutive,
        int(probes or 0),
        retry_after,
        SOURCE_REDIS,
        age,
    )


def _redis_budget_view(
    key: str, fields: Sequence[Any], server: float, configs: SnapshotConfigs, age: float
) -> BudgetView:
    """A budget hash (see outbound.lua) aged to the server's `TIME`, as bu_rotate would."""
    bucket_end = float(fields[0] or 0.0)
    index = int(fields[1] or 0)
    requests = [int(n) for n in _text(fields[2]).split(",")] if fields[2] else []
    retries = [int(n) for n in _text(fields[3]).split(",")] if fields[3] else []
    if len(requests) != _BUCKETS or len(retries) != _BUCKETS:
        requests, retries = [0] * _BUCKETS, [0] * _BUCKETS
    cfg = configs.retry(key)
    if cfg is not None and bucket_end and server >= bucket_end:
        steps = int((server - bucket_end) / (cfg.budget_window_s / _BUCKETS)) + 1
        for _ in range(min(steps, _BUCKETS)):
            index = (index + 1) % _BUCKETS
            requests[index] = retries[index] = 0
    return BudgetView(key, sum(requests), sum(retries), SOURCE_REDIS, age)
