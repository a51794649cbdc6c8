"""Tiered state: local decisions on leased slices of the fleet's quota, reconciled with Redis.

`tiered+redis://...` trades exactness for round trips. Each instance:

- **Limits.** Leases a *slice* of each hot key's quota from the global GCRA
  bucket in Redis (the slice's units are taken from the bucket when leased)
  and admits locally while the slice lasts. A request that finds its slice
  empty waits for one lease round trip. A saturated key (a lease emptied the
  bucket) caches the refusal instead of asking Redis on every request, and
  leases ahead: units that conform only later, each spent no earlier than it
  conforms. Every sync the instance tops up slices that run low and gives
  back what it holds beyond its current need, and all of an idle key's units.
- **Breakers.** Gates on a cached copy of each route breaker, refreshed on
  every sync and never used when older than one sync interval (then the
  request refreshes it first). Outcomes are counted locally and applied to
  the shared window at the next sync, in order (at most `MAX_SYNC_RUNS` runs
  of them a sync; the rest with a sync made at once). Half-open probes are leased from Redis
  exactly (the request goes through `RedisStore.admit`), so the fleet still
  sends at most `half_open_probes` probes.

Sync cadence: one script call (`sync.lua`) per instance at most every ~0.8 x
`sync_interval_ms` while there is traffic, plus lease calls for empty
slices. Decisions made on the cache say ``cache`` with age = time since that
state was last synced; a request that waited for Redis says ``redis``.

Accuracy (see docs/state.md): units are taken from the global bucket before
they are admitted, so over any run that starts from a fresh bucket the fleet
admits at most what one exact GCRA would (rate x t + burst). Over an
arbitrary window the bound loosens by the units held in slices when the
window starts: at most N x max_slice (N instances, max_slice = burst / 4, or
the burst for a saturated key, or the largest cost a lease was taken for).
Costs vary per request: a lease takes at least what the waiting request lacks
beyond the units its slice holds, so within one instance slice and bucket
together serve it as one bucket would.
The price is under-admission: units in one instance's slice are not
available to the others until given back (at most one sync interval later).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .._types import Clock, RandomSource
from ..decide.breaker import BROKEN, CLOSED, FAILURE, HALF_OPEN, IGNORED, OPEN, Gate
from ..decide.fleet import FleetShare
from ..decide.gcra import LimitVerdict
from ..policy import BreakerConfig, RetryConfig, StateConfig
from .base import GateAnswer, InboundResult, LimitSpec, StateStore
from .local import new_result
from .redis import CLOSE_FLUSH_S, SOURCE_REDIS, SYNC, RedisStore
from .redis_sync import WHY_DEADLINE, reply_error
from .snapshot import (
    BreakerView,
    LimiterKeyView,
    SnapshotConfigs,
    StoreSnapshot,
    first_breakers,
)
from .timer import LoopTimer, alive, ended

SOURCE_CACHE: Final = "cache"

logger = logging.getLogger("fidelity_mw.tiered")

# How long a failure streak a sync completes must stand before it opens a breaker, in
# sync intervals (decide.breaker.streak_stands).
STREAK_WAIT_SYNCS: Final = 2.0

# How many keys one sync call carries at most (the rest wait for the next).
MAX_SYNC_KEYS: Final = 256
# A cached breaker nobody used for this many sync intervals is dropped.
IDLE_INTERVALS: Final = 10
# How many runs of breaker outcomes one sync call carries at most, all its breakers
# together: sync.lua replays them one run at a time (some 0.5 us of Redis each: 4096
# runs ~2 ms; the argument is a few bytes a run). Outcomes that alternate make one run
# each: 20,000 of them between two syncs were a 40 kB argument and ~10 ms of Redis
# blocked for everyone. The rest wait, in order, for the next sync, which comes at once.
MAX_SYNC_RUNS: Final = 4096
# A slice's ready_at while every unit it holds conforms already (a roomy key).
_ALL_CONFORM: Final = -math.inf


def _stale(future: asyncio.Future[Any] | None) -> bool:
    """A lease or sync of an event loop closed before it ended: it never will."""
    return future is not None and not future.done() and future.get_loop().is_closed()


class Slice:
    """Units of one limit key leased from Redis and not yet spent."""

    __slots__ = (
        "blocked_until",
        "burst_units",
        "cost",
        "demand",
        "failed",
        "free_at",
        "need",
        "pending",
        "rate",
        "ready_at",
        "remaining",
        "retry_at",
        "saturated",
        "spec",
        "synced_at",
        "tokens",
        "used_at",
        "window_start",
    )

    def __init__(self, spec: LimitSpec, now: float) -> None:
        self.spec = spec
        # the bucket's size in units (read per request: computed once)
        self.burst_units = max(1, int(spec.tolerance_s / spec.interval_s + 1e-6))
        self.tokens = 0  # units this instance may still admit
        # When the next of them conforms (local clock): unit j at ready_at + j x
        # interval. Units leased ahead (a saturated key) conform only later.
        self.ready_at = -math.inf
        self.remaining = 0  # units left in the global bucket at the last sync
        self.synced_at = now
        self.blocked_until = 0.0  # bucket known empty until then
        self.retry_at = 0.0
        # When the bucket's next unit beyond those leased conforms (local clock), as of
        # the last sync: a refusal's retry-after is counted from it.
        self.free_at = 0.0
        # Costs vary per request (`cost=fn`): the cost of the latest request that asked
        # for a lease (sizes the leases and top-ups), and the largest cost of the requests
        # waiting for the next lease (0: none). A lease is all-or-nothing below what such
        # a request lacks beyond the units held (the spec's cost would be one request's).
        self.cost = spec.cost
        self.need = 0
        # The fleet asks for more than the bucket refills: leases are spaced out
        # and may be as large as the burst.
        self.saturated = False
        # Demand is measured over windows of one sync interval, independent of
        # when leases happen (a lease must not restart the measurement: frequent
        # leases would then see a fraction of an interval's demand).
        self.demand = 0  # units asked for since `window_start`
        self.window_start = now
        self.rate = 0.0  # units/s over the last full window
        self.used_at = now  # the last time a request asked for units
        self.pending: asyncio.Future[Any] | None = None
        # The last sync failed this key alone (its Redis key holds a value that is
        # not ours): a request leases for it once, then is decided exactly.
        self.failed = False

    def roll(self, now: float, window_s: float) -> None:
        """Close the demand window once it spans an interval: its rate becomes `rate`."""
        elapsed = now - self.window_start
        if elapsed >= window_s:
            self.rate = self.demand / elapsed
            self.demand = 0
            self.window_start = now

    def demand_rate(self, window_s: float) -> float:
        """Units/s: the last full window's rate, or the open window's demand as if it
        were a whole interval's, whichever is higher (a burst counts at once)."""
        return max(self.rate, self.demand / window_s)

    def usable(self, now: float) -> int:
        """How many of the held units conform at `now`."""
        ready = self.ready_at
        if ready > now:
            return 0
        conforming = (now - ready) / self.spec.interval_s + 1e-6
        return self.tokens if conforming >= self.tokens else int(conforming) + 1

    def spend(self, units: int) -> None:
        self.tokens -= units
        self.ready_at += units * self.spec.interval_s

    def put_back(self, units: int) -> None:
        """Units spent and not used after all: they conform now, ahead of the rest."""
        self.tokens += units
        self.ready_at -= units * self.spec.interval_s

    def add(self, units: int, ready_at: float) -> None:
        """Units leased now, the first conforming at `ready_at`. Held ones keep their
        place; the new ones follow them, never earlier than they conform: the merged
        schedule never lets unit k be spent before k units conform."""
        if units <= 0:
            return
        if self.tokens <= 0:
            self.ready_at = ready_at
        else:
            self.ready_at = max(self.ready_at, ready_at - self.tokens * self.spec.interval_s)
        self.tokens += units

    def max_slice(self, cost: int) -> int:
        """The most units a slice holds for requests of `cost`: at least that cost."""
        if self.saturated:
            # Demand exceeds supply: each lease takes what refilled since the
            # last one (at most the burst), so a slice of burst / 4 would make
            # a lease per burst / 4 units.
            return max(cost, self.burst_units)
        return max(cost, self.burst_units // 4)


class CachedBreaker:
    """The last synced state of one shared breaker, plus outcomes not yet sent."""

    __slots__ = (
        "calls",
        "closed_gate",
        "config",
        "counted_at",
        "epoch",
        "failures",
        "open_until",
        "run_kind",
        "run_n",
        "runs",
        "slow",
        "state",
        "synced_at",
        "used_at",
    )

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.state = CLOSED
        self.epoch = -1  # unknown until the first sync
        # The gate of a closed breaker at `epoch`, made once per epoch, not per request.
        self.closed_gate = Gate("allow", CLOSED, -1, 0.0)
        self.open_until = 0.0
        self.synced_at = -math.inf
        self.used_at = 0.0
        self.counted_at = -math.inf  # when the latest outcome not yet sent was counted
        self.reset_counts()

    def learn_epoch(self, epoch: int) -> None:
        """The breaker's epoch as Redis reports it; a new one gets its closed gate here,
        not on the request path, and drops the outcomes of the one that ended."""
        if epoch != self.epoch:
            if self.calls:
                # Outcomes not yet sent (left for a later sync, or counted meanwhile) were
                # admitted in the epoch that ended: not counted, as the model does not
                # count them (sent later, under the new epoch, they would be).
                self.reset_counts()
            self.epoch = epoch
            self.closed_gate = Gate("allow", CLOSED, epoch, 0.0)

    def reset_counts(self) -> None:
        self.calls = self.failures = self.slow = 0
        # The outcomes in order, as runs of one kind ("f" failure, "s" success; upper
        # case: slow; "b" a success whose body then broke, which turns a success into a
        # failure: counted here as one more outcome and failure, to be sent): sync.lua
        # replays them as the model records them one by one (the
        # ratios are checked after every outcome, so F,F,S,S,S opens at the second F
        # where the sum, 2 of 5, would not). Finished runs, then the open one.
        self.runs: list[str] = []
        self.run_kind = ""
        self.run_n = 0

    def count(self, outcome: str, slow: bool) -> None:
        self.calls += 1
        if outcome == FAILURE:
            self.failures += 1
            kind = "F" if slow else "f"
        elif outcome == BROKEN:
            self.failures += 1
            kind = "b"
            slow = False
        else:
            kind = "S" if slow else "s"
        if slow:
            self.slow += 1
        if kind == self.run_kind:
            self.run_n += 1
        else:
            if self.run_n:
                self.runs.append(f"{self.run_kind}{self.run_n}")
            self.run_kind = kind
            self.run_n = 1

    def outcomes(self) -> str:
        """The outcomes not yet sent, as sync.lua reads them: runs like "s40f2s7"."""
        last = f"{self.run_kind}{self.run_n}" if self.run_n else ""
        return "".join(self.runs) + last if self.runs else last

    def take(self, most: int) -> tuple[str, int, int]:
        """Up to `most` runs of the outcomes not yet sent, the oldest first, as sync.lua
        reads them: (text, calls, runs). The rest stay, in order, for the next sync."""
        runs = self.runs
        if len(runs) < most:  # all of them, the open run too
            text, calls = self.outcomes(), self.calls
            n = len(runs) + (1 if self.run_n else 0)
            self.reset_counts()
            return text, calls, n
        sent = runs[:most]
        del runs[:most]
        calls = failures = slow = 0
        for run in sent:
            n = int(run[1:])
            calls += n
            if run[0] in "fFb":
                failures += n
            if run[0] in "FS":
                slow += n
        self.calls -= calls
        self.failures -= failures
        self.slow -= slow
        return "".join(sent), calls, len(sent)


class _LeaseBatch:
    """The lease call one event-loop tick's requests share: breakers to refresh, keys to
    lease for (dicts as ordered sets), and the future that says it is done (its result:
    the age estimate, or -1.0 if Redis failed)."""

    __slots__ = ("breakers", "done", "keys", "now")

    def __init__(self, done: asyncio.Future[float]) -> None:
        self.done = done
        self.now = -math.inf
        self.breakers: dict[str, None] = {}
        self.keys: dict[str, None] = {}


@dataclass
class TieredStats:
    requests: int = 0
    local: int = 0  # decided on the cache alone
    waited: int = 0  # waited for a lease/refresh round trip
    delegated: int = 0  # half-open: decided exactly by RedisStore
    syncs: int = 0  # background sync calls
    leases: int = 0  # synchronous lease/refresh calls
    # leased units a sync was giving back whose call failed, was cancelled (a close's
    # bounded wait) or was left unfinished by a loop that closed: not known given back
    # (their buckets refill on their own)
    units_not_returned: int = 0


class TieredStore(StateStore):
    """Local-first decisions on leased quota; Redis stays the fleet's source of truth."""

    source = SOURCE_CACHE

    def __init__(
        self,
        url: str | None = None,
        *,
        config: StateConfig | None = None,
        rng: RandomSource | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.exact = RedisStore(url, config=config, rng=rng, clock=clock)
        self.config = self.exact.config
        self._clock = self.exact._clock
        self._rng = self.exact._rng
        self.sync_s = self.config.sync_interval_ms / 1000.0
        self.slices: dict[str, Slice] = {}
        self.max_slices = self.config.max_keys
        self.breakers: dict[str, CachedBreaker] = {}
        self.stats = TieredStats()
        # the fleet's load share counts this store's requests (most never reach `exact`)
        self.exact.fleet.demand_of = lambda: self.stats.requests
        self._sync_task: asyncio.Task[None] | None = None
        self._last_sync = -math.inf
        # A sync a sync interval after the last one while this process holds something
        # for Redis (`_quiet_due`): syncs start on requests, so the outcomes counted
        # after the last one waited for the next request, however long it took.
        self._quiet_timer = LoopTimer(self._clock, self._quiet_due)
        self._closing = False  # aclose() runs: the quiet timer starts no sync
        # a breaker holds more outcome runs than one sync carries: sync again at once
        self._backlog = False
        self._lease_batch: _LeaseBatch | None = None
        self._lease_tasks: set[asyncio.Task[None]] = set()
        # The breaker outcomes and leased units given back each sync call out now
        # carries, with its loop: a loop that closes with one out never finishes it
        # (`_forget_closed_loop` counts them).
        self._carrying: dict[object, tuple[asyncio.AbstractEventLoop, int, int]] = {}

    @property
    def process_id(self) -> str:
        """The exact store's: the owner of this process's `scope = "process"` breakers."""
        return self.exact.process_id

    @property
    def round_trips(self) -> int:
        return self.exact.stats.round_trips

    def fallback_age(self) -> float:
        """Time since Redis last answered (`RedisStore.fallback_age`): the age of a
        decision taken without it (`state_age_s`)."""
        return self.exact.fallback_age()

    @property
    def fallback_why(self) -> str | None:
        """Why Redis is not used now (`RedisStore.fallback_why`), None while it is."""
        return self.exact.fallback_why

    # ------------------------------------------------------------ inbound

    def admit_now(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
    ) -> InboundResult | None:
        """`admit` on this instance's cache alone, without an await: the common case.

        Decides when the cached breaker is fresh and closed (or open: a cached
        refusal) and every slice holds the units or is known empty (a saturated
        key's cached refusal). Otherwise it changes nothing and returns None: the
        request needs Redis (a lease, a breaker refresh, a half-open probe, the
        failure mode) and the caller awaits `admit`, which counts its demand then.
        """
        if not self.exact.health.up:
            return None
        cb: CachedBreaker | None = None
        if breaker_key is not None and breaker is not None:
            cb = self.breakers.get(breaker_key)
            if (
                cb is None
                or (cb.config is not breaker and cb.config != breaker)
                or now - cb.synced_at > self.sync_s
                or (cb.state != CLOSED and now >= cb.open_until)  # a probe may be due
            ):
                return None
        slices = self.slices
        sl: Slice | None = None
        if len(limit_keys) == 1:  # the common case, without the loops
            spec = limits[0]
            sl = slices.get(limit_keys[0])
            if (
                sl is None
                or (sl.spec is not spec and not _same_bucket(sl.spec, spec))
                or (sl.tokens < spec.cost and sl.blocked_until <= now)
            ):
                return None
        else:
            for key, spec in zip(limit_keys, limits, strict=True):
                held = slices.get(key)
                if (
                    held is None
                    or (held.spec is not spec and not _same_bucket(held.spec, spec))
                    or (held.tokens < spec.cost and held.blocked_until <= now)
                ):
                    return None
        # --- decided here: count the request and its demand (as `admit` does)
        stats = self.stats
        stats.requests += 1
        sync_s = self.sync_s
        if sl is not None:
            if now - sl.window_start >= sync_s:
                sl.roll(now, sync_s)
            sl.demand += spec.cost
            sl.used_at = now
        else:
            for key, spec in zip(limit_keys, limits, strict=True):
                held = slices[key]
                if now - held.window_start >= sync_s:
                    held.roll(now, sync_s)
                held.demand += spec.cost
                held.used_at = now
        gate: Gate | None = None
        age = 0.0
        if cb is not None:
            cb.used_at = now
            if cb.state != CLOSED:  # open, and fresh: the cached refusal
                gate = Gate("reject", cb.state, cb.epoch, cb.open_until - now)
                self._maybe_sync(now)
                return self._result(gate, (), False, 0.0, now - cb.synced_at)
            gate = cb.closed_gate
            age = now - cb.synced_at
        # One roomy limit: `_decide` inline. A roomy key's units all conform at once
        # (ready_at stays -inf), so usable = tokens before and after the spend.
        if sl is None or sl.ready_at != _ALL_CONFORM or sl.tokens < spec.cost:
            return self._decide(gate, limit_keys, limits, now, 0.0, age)
        sl.tokens = tokens = sl.tokens - spec.cost
        burst = sl.burst_units
        remaining = sl.remaining + tokens
        if remaining > burst:
            remaining = burst
        reset = (burst - remaining) * spec.interval_s
        verdict = LimitVerdict(True, 0.0, remaining, reset, 0.0)
        synced = now - sl.synced_at
        if synced > age:
            age = synced
        stats.local += 1
        if now - self._last_sync >= 0.8 * sync_s:
            self._maybe_sync(now)
        return new_result(gate, (verdict,), True, SOURCE_CACHE, age if age > 0.0 else 0.0)

    async def admit(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
    ) -> InboundResult:
        result = self.admit_now(breaker_key, breaker, limit_keys, limits, now)
        if result is not None:
            return result
        exact = self.exact
        self.stats.requests += 1
        if not exact.health.up:
            return await exact.admit(breaker_key, breaker, limit_keys, limits, now)
        sync_s = self.sync_s
        cb: CachedBreaker | None = None
        refresh: str | None = None
        if breaker_key is not None and breaker is not None:
            cb = self.breakers.get(breaker_key)
            if cb is None or (cb.config is not breaker and cb.config != breaker):
                cb = self.breakers[breaker_key] = CachedBreaker(breaker)
            cb.used_at = now
            if now - cb.synced_at > sync_s:
                refresh = breaker_key
        slices = self.slices
        if len(slices) + len(limit_keys) > self.max_slices and any(
            key not in slices for key in limit_keys
        ):
            # The slice table is full: decide this request exactly rather than
            # grow it (idle slices leave at the next syncs and make room).
            self.stats.delegated += 1
            return await exact.admit(breaker_key, breaker, limit_keys, limits, now)
        for key, spec in zip(limit_keys, limits, strict=True):
            held = slices.get(key)
            if held is not None and held.spec is not spec and not _same_bucket(held.spec, spec):
                # The key's slice holds units of another bucket (a limit of another rate
                # or burst on the same key: two `fidelity.limit(name=)` at two rates, two
                # apps on one store): decided exactly, the slice left to its own spec
                # (spent or given back as usual; once idle it leaves room). Replaced, it
                # dropped the units it held, never given back, and a lease out for it
                # landed in the new one: two such limits taking turns stranded a lease's
                # rest on every request (23 units taken for 12 admitted).
                self.stats.delegated += 1
                return await exact.admit(breaker_key, breaker, limit_keys, limits, now)
        wanted: list[tuple[str, int]] = []
        for key, spec in zip(limit_keys, limits, strict=True):
            sl = slices.get(key)
            if sl is None:
                sl = slices[key] = Slice(spec, now)
            # One bucket, requests of several costs (a cost per request, or a limit name
            # shared by routes with a cost each): leases are sized for this one's.
            sl.cost = spec.cost
            # count the demand (inline: this loop is the per-request cost of tiered mode)
            if now - sl.window_start >= sync_s:
                sl.roll(now, sync_s)
            sl.demand += spec.cost
            sl.used_at = now
            if sl.tokens < spec.cost and sl.blocked_until <= now:
                wanted.append((key, spec.cost))
        waited = 0.0
        if refresh is not None or wanted:
            wait_s = exact._wait_s()
            if not wait_s:
                waited = await self._fetch(refresh, wanted, now)
            else:
                bounded = await exact._within(self._fetch(refresh, wanted, now), wait_s)
                if isinstance(bounded, asyncio.Task):
                    # The request's deadline came first: decided per `on_error` now. The
                    # lease goes on and lands in the slices, for the requests after it
                    # (nothing of it was this request's: nothing to give back).
                    return exact.fallback_admit(
                        breaker_key, breaker, limit_keys, limits, now, WHY_DEADLINE
                    )
                waited = bounded
            if waited < 0.0:  # Redis failed: the exact store is now in its failure mode
                return exact.fallback_admit(breaker_key, breaker, limit_keys, limits, now)
            self.stats.waited += 1
            now = self._clock.monotonic()
            if any(key not in slices for key in limit_keys):
                # A sync while this request awaited (another request's, or the quiet
                # timer's) took a slice for idle (its last use is this request's start,
                # a round trip ago) and gave its units back: decided exactly, where they
                # went. Read as before, a KeyError: a 500.
                self.stats.delegated += 1
                return await exact.admit(breaker_key, breaker, limit_keys, limits, now)
        # --- the breaker, on the cache
        gate: Gate | None = None
        age = 0.0
        if cb is not None:
            if refresh is not None and now - cb.synced_at > sync_s:
                # Its refresh failed alone (its Redis key holds a value that is not
                # ours): decided exactly, as in exact mode (where it falls back).
                self.stats.delegated += 1
                return await exact.admit(breaker_key, breaker, limit_keys, limits, now)
            if cb.state == CLOSED:
                gate = cb.closed_gate
            elif now < cb.open_until:
                gate = Gate("reject", cb.state, cb.epoch, cb.open_until - now)
                self._maybe_sync(now)
                return self._result(gate, (), False, waited, now - cb.synced_at)
            else:
                # A probe may be due: lease it exactly, with the limits, in Redis.
                self.stats.delegated += 1
                result = await exact.admit(breaker_key, breaker, limit_keys, limits, now)
                if result.source == SOURCE_REDIS and result.gate is not None:
                    self._note_gate(cb, result.gate, self._clock.monotonic())
                return result
            age = now - cb.synced_at
        # A slice still short after the lease (concurrent requests on a cold or dry
        # key share one lease) while the fleet's bucket is not known to be empty:
        # decide this request exactly rather than refuse what the bucket can serve.
        for key, spec in zip(limit_keys, limits, strict=True):
            sl = slices[key]
            if not spec.shadow and sl.tokens < spec.cost and sl.blocked_until <= now:
                self.stats.delegated += 1
                result = await exact.admit(breaker_key, breaker, limit_keys, limits, now)
                if result.source == SOURCE_REDIS and result.gate is not None and cb is not None:
                    self._note_gate(cb, result.gate, self._clock.monotonic())
                return result
        fetched = refresh is not None or bool(wanted)
        return self._decide(gate, limit_keys, limits, now, waited, age, local=not fetched)

    def _decide(
        self,
        gate: Gate | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
        waited: float,
        age: float,
        *,
        local: bool = True,
    ) -> InboundResult:
        """The limits, on the slices (the breaker admitted): all-or-nothing. `local`:
        decided without awaiting Redis (counted in `stats.local`; a request that awaited
        a lease is counted in `stats.waited`, also when another's lease served it)."""
        slices = self.slices
        admitted = True
        ok: list[bool] = []
        for key, spec in zip(limit_keys, limits, strict=True):
            sl = slices[key]
            allowed = sl.usable(now) >= spec.cost
            ok.append(allowed)
            if not allowed and not spec.shadow:
                admitted = False
        verdicts: list[LimitVerdict] = []
        for key, spec, allowed in zip(limit_keys, limits, ok, strict=True):
            sl = slices[key]
            if allowed and admitted:
                sl.spend(spec.cost)
            remaining = min(sl.burst_units, sl.remaining + sl.usable(now))
            reset = (sl.burst_units - remaining) * spec.interval_s
            if allowed:
                verdicts.append(LimitVerdict(True, 0.0, remaining, reset, 0.0))
            else:
                # When this request's cost conforms: the units held first, then the
                # bucket's from `free_at` on (a cached refusal is lifted by the periodic
                # sync's lease once the bucket can serve it, not only after
                # `blocked_until`). Counted for this request's cost, not another's.
                wait = sl.free_at + (spec.cost - sl.tokens - 1) * spec.interval_s - now
                if sl.tokens > 0:  # leased ahead: held, not yet conforming
                    wait = max(wait, sl.ready_at + (spec.cost - 1) * spec.interval_s - now)
                verdicts.append(
                    LimitVerdict(False, 0.0, remaining, reset, max(wait, spec.interval_s))
                )
            age = max(age, now - sl.synced_at)
        if local:
            self.stats.local += 1
        self._maybe_sync(now)
        return self._result(gate, tuple(verdicts), admitted, waited, age)

    async def peek(
        self, limit_keys: Sequence[str], limits: Sequence[LimitSpec], now: float
    ) -> InboundResult:
        """Check without counting (`StateStore.peek`): a limit whose slice holds the
        request's cost in conforming units allows it (source `cache`); for the others
        peek.lua asks the fleet's bucket in Redis for the rest of the cost (the slice's
        units are leased from it already). Nothing is leased, spent or given back. As
        the admissions of this store, within its bound: units other instances hold in
        their slices are not counted."""
        exact = self.exact
        if not exact.health.up:
            return await exact.peek(limit_keys, limits, now)
        verdicts: list[LimitVerdict | None] = []
        ask: list[int] = []
        held: list[int] = []
        age = 0.0
        for i, (key, spec) in enumerate(zip(limit_keys, limits, strict=True)):
            sl = self.slices.get(key)
            usable = 0 if sl is None or not _same_bucket(sl.spec, spec) else sl.usable(now)
            held.append(usable)
            if sl is not None and usable >= spec.cost:
                remaining = min(sl.burst_units, sl.remaining + usable)
                reset = (sl.burst_units - remaining) * spec.interval_s
                verdicts.append(LimitVerdict(True, 0.0, remaining, reset, 0.0))
                age = max(age, now - sl.synced_at)
            else:
                verdicts.append(None)
                ask.append(i)
        source = SOURCE_CACHE
        if ask:
            asked = await exact.peek(
                [limit_keys[i] for i in ask],
                [limits[i]._replace(cost=limits[i].cost - held[i]) for i in ask],
                now,
            )
            source, age = asked.source, max(age, asked.age_s)
            for i, verdict in zip(ask, asked.limits, strict=True):
                burst = max(1, int(limits[i].tolerance_s / limits[i].interval_s + 1e-6))
                verdicts[i] = verdict._replace(remaining=min(burst, verdict.remaining + held[i]))
        final = tuple(v for v in verdicts if v is not None)
        admitted = all(v.allowed or s.shadow for v, s in zip(final, limits, strict=True))
        return InboundResult(None, final, admitted, source, age)

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
        exact: list[int] = []
        for i, (key, spec) in enumerate(zip(limit_keys, limits, strict=True)):
            # A slice admission reports no TAT (0.0): its units came from a leased
            # slice, also when the request waited for that lease (source "redis").
            # Anything else was decided exactly (or on the fallback) and goes back there.
            sliced = source == SOURCE_CACHE or (
                source == SOURCE_REDIS and admitted_tats is not None and admitted_tats[i] == 0.0
            )
            sl = self.slices.get(key) if sliced else None
            # the same limit (a refund that earns no retry credit says credit_s 0)
            if sl is not None and (sl.spec is spec or _same_bucket(sl.spec, spec)):
                sl.put_back(spec.cost)  # leased units, unspent after all
            elif not sliced:
                exact.append(i)
            # (a slice's unit whose slice has gone, or changed its limit: nowhere to go,
            # whatever the source said; the bucket in Redis would take none of it back
            # and only earn the key retry credit a slice's unit never earns)
        if exact:
            await self.exact.refund(
                [limit_keys[i] for i in exact],
                [limits[i] for i in exact],
                source,
                now,
                [admitted_tats[i] for i in exact] if admitted_tats is not None else None,
                fleet=fleet,
            )

    @staticmethod
    def _result(
        gate: Gate | None,
        verdicts: tuple[LimitVerdict, ...],
        admitted: bool,
        waited: float,
        age: float,
    ) -> InboundResult:
        if waited > 0.0:
            return InboundResult(gate, verdicts, admitted, SOURCE_REDIS, waited)
        return InboundResult(gate, verdicts, admitted, SOURCE_CACHE, max(0.0, age))

    def record_now(
        self,
        breaker_key: str,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        slow: bool,
        now: float,
    ) -> str | None:
        """`record` of a gate the cache gave, without an await: counted locally, sent
        with the next sync. None (nothing changed) for a probe or a fallback gate,
        which are recorded where they were decided: await `record`."""
        if gate.epoch < 0 or gate.probe_id:
            return None
        cb = self.breakers.get(breaker_key)
        if outcome != IGNORED and (
            cb is None or cb.epoch < 0 or self._closing or self.exact._closed
        ):
            # A sync dropped the cached breaker as idle while this call ran (a call longer
            # than IDLE_INTERVALS syncs, on a breaker no other call used meanwhile; made
            # again since by a request whose refresh is still out): its outcome goes to
            # Redis, where the gate's epoch is known. Dropped here, the failures of the
            # calls that hang never reached the fleet's breaker.
            # So does one recorded while `aclose` runs or after it: counted here after the
            # close's own flush, it waited for a sync that never came, and nothing said
            # so. The exact store sends it as it sends its own (or counts it dropped).
            return None
        if cb is None or outcome == IGNORED or cb.epoch != gate.epoch or cb.state != CLOSED:
            return cb.state if cb is not None else gate.state
        cb.count(outcome, slow)
        if len(cb.runs) >= MAX_SYNC_RUNS:
            self._backlog = True
        if now > cb.counted_at:  # (a success is recorded at its request's start)
            cb.counted_at = now
        return cb.state

    async def record(
        self,
        breaker_key: str,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        slow: bool,
        now: float,
    ) -> str:
        local = self.record_now(breaker_key, breaker, gate, outcome, slow, now)
        if local is not None:
            return local
        # Fallback gates are recorded locally; probes exactly (they hold a lease).
        state = await self.exact.record(breaker_key, breaker, gate, outcome, slow, now)
        cb = self.breakers.get(breaker_key)
        if gate.probe_id and cb is not None and state != gate.state:
            cb.state = state
            cb.synced_at = -math.inf  # the epoch moved: refresh before the next decision
        return state

    async def breaker_gate(
        self, breaker_key: str, breaker: BreakerConfig, now: float
    ) -> tuple[Gate, str, float]:
        result = await self.admit(breaker_key, breaker, (), (), now)
        assert result.gate is not None
        return result.gate, result.source, result.age_s

    # ------------------------------------------------------------ outbound budgets

    async def budget_request(self, budget_key: str, cfg: RetryConfig, now: float) -> None:
        """Deferred like RedisStore's: sent with the next budget call or within a sync."""
        await self.exact.budget_request(budget_key, cfg, now)

    async def budget_try_retry(
        self, budget_key: str, cfg: RetryConfig, now: float
    ) -> tuple[bool, str, float]:
        """Budgets stay exact in tiered mode: one call per retry (retries are rare)."""
        return await self.exact.budget_try_retry(budget_key, cfg, now)

    async def budget_refund(
        self,
        budget_key: str,
        cfg: RetryConfig,
        source: str,
        age_s: float,
        now: float,
        spent_at: float | None = None,
    ) -> None:
        """Budgets are exact in tiered mode: given back where they were spent."""
        await self.exact.budget_refund(budget_key, cfg, source, age_s, now, spent_at)

    def budget_refund_sync(
        self,
        budget_key: str,
        cfg: RetryConfig,
        source: str,
        age_s: float,
        now: float,
        spent_at: float | None = None,
    ) -> None:
        """`budget_refund` for sync callers (`FidelitySyncTransport`), as `outbound_gate_sync`."""
        self.exact.budget_refund_sync(budget_key, cfg, source, age_s, now, spent_at)

    async def outbound_gate(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        budget_key: str | None,
        cfg: RetryConfig | None,
        retry: bool,
        now: float,
    ) -> tuple[Gate | None, bool, str, float]:
        """Budget in Redis only for a retry; the breaker gate from the cache. The exact
        store's answer for the retry says when Redis spent it (`GateAnswer.spent_at`),
        or why it decided without Redis; passed on."""
        allowed, source, age = True, SOURCE_CACHE, 0.0
        spent: tuple[Any, ...] = ()
        if budget_key is not None and cfg is not None:
            if retry:
                spent = await self.exact.outbound_gate(None, None, budget_key, cfg, True, now)
                _, allowed, source, age = spent
            else:
                await self.exact.budget_request(budget_key, cfg, now)
        gate = None
        why: str | None = None
        if allowed and breaker_key is not None and breaker is not None:
            result = await self.admit(breaker_key, breaker, (), (), now)
            gate = result.gate
            if not retry or result.source != SOURCE_CACHE:
                source, age, why = result.source, result.age_s, result.why
        if isinstance(spent, GateAnswer) and source == spent[2]:
            return GateAnswer((gate, allowed, source, age), spent.why or why, spent.spent_at)
        if why is not None:  # the breaker's gate decided without Redis: why, as Redis says
            return GateAnswer((gate, allowed, source, age), why)
        return gate, allowed, source, age

    def outbound_gate_sync(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        budget_key: str | None,
        cfg: RetryConfig | None,
        retry: bool,
        now: float,
    ) -> tuple[Gate | None, bool, str, float]:
        """For sync callers in any thread (`FidelitySyncTransport`): exact, from Redis,
        over its blocking client. The cache belongs to the event loop's side."""
        return self.exact.outbound_gate_sync(breaker_key, breaker, budget_key, cfg, retry, now)

    def record_sync(
        self,
        breaker_key: str,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        slow: bool,
        now: float,
    ) -> str:
        """The outcome of a call gated by `outbound_gate_sync`, where it was decided."""
        return self.exact.record_sync(breaker_key, breaker, gate, outcome, slow, now)

    # ------------------------------------------------------------ syncing

    def _note_gate(self, cb: CachedBreaker, gate: Gate, now: float) -> None:
        """Learn from an exact gate (half-open): cache it for at most one sync interval."""
        cb.state = gate.state
        cb.learn_epoch(gate.epoch)
        cb.synced_at = now
        if gate.verdict == "reject":
            wait = gate.retry_after_s
            if gate.state != OPEN:
                wait = min(wait, self.sync_s)
            cb.open_until = now + wait
        elif gate.verdict == "probe":
            cb.open_until = now + self.sync_s

    def _want(self, sl: Slice, now: float) -> int:
        """How many units this instance should hold: its demand over one interval, x2."""
        sl.roll(now, self.sync_s)
        want = math.ceil(sl.demand_rate(self.sync_s) * self.sync_s * 2.0)
        cost = sl.need if sl.need > sl.cost else sl.cost
        return min(max(want, cost), sl.max_slice(cost))

    async def _fetch(
        self, breaker_key: str | None, keys: Sequence[tuple[str, int]], asked_at: float
    ) -> float:
        """Refresh one breaker and lease for `keys` ((key, the request's cost) pairs),
        waiting on leases in flight.

        Returns the age estimate of what it fetched (> 0), 0.0 if nothing
        needed fetching after all, or -1.0 if Redis failed.
        """
        age = 0.0
        for attempt in range(3):
            now = self._clock.monotonic()
            slices = self.slices
            # (a slice given back meanwhile, idle by a sync's measure while this
            # request waited: nothing to lease for here; `admit` decides it exactly)
            keys = [(k, cost) for k, cost in keys if k in slices]
            if any(_stale(slices[k].pending) for k, _ in keys):
                self._forget_closed_loop()
            need = [
                (k, cost)
                for k, cost in keys
                if slices[k].tokens < cost
                and slices[k].blocked_until <= now
                and not (attempt and slices[k].failed)  # its lease failed: no second try
            ]
            waits = [slices[k].pending for k, _ in need if slices[k].pending is not None]
            fetch = [(k, cost) for k, cost in need if slices[k].pending is None]
            if not fetch and breaker_key is None:
                if not waits:
                    return age
                await asyncio.wait([w for w in waits if w is not None])
                continue
            got = await self._lease(breaker_key, fetch, asked_at)
            if got < 0.0:
                return got
            age = max(got, 1e-9)
            breaker_key = None
        return age

    async def _lease(
        self, breaker_key: str | None, keys: Sequence[tuple[str, int]], asked_at: float
    ) -> float:
        """Join this tick's lease call: the breaker refreshes and leases every request of
        one event-loop tick asks for go out as one sync.lua call in the next tick, sized
        by the demand of all of them (a batch of simultaneous arrivals shares one lease)."""
        batch = self._lease_batch
        if batch is not None and _stale(batch.done):
            self._forget_closed_loop()
            batch = None
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._lease_batch = _LeaseBatch(loop.create_future())
            task = loop.create_task(self._lease_flush())
            self._lease_tasks.add(task)
            task.add_done_callback(functools.partial(self._lease_done, batch))
        batch.now = max(batch.now, asked_at)
        if breaker_key is not None:
            batch.breakers[breaker_key] = None
        for key, cost in keys:
            sl = self.slices.get(key)
            if sl is not None and sl.pending is None:
                batch.keys[key] = None
                sl.pending = batch.done
            if sl is not None and cost > sl.need:
                sl.need = cost  # the lease takes at least what this request lacks
        # wait without cancelling the shared future when this request is cancelled
        await asyncio.wait((batch.done,))
        return float(batch.done.result())

    def _forget_closed_loop(self) -> None:
        """Forget the lease batch and the leases in flight of an event loop that closed
        without finishing them (they never will, and a future of another loop cannot be
        awaited): the requests of the loops after it lease anew."""
        batch = self._lease_batch
        if batch is not None and _stale(batch.done):
            self._lease_batch = None
        lost = units = 0
        for token, (loop, calls, given) in list(self._carrying.items()):
            if loop.is_closed():
                # taken from the breakers and never sent nor counted (its `finally` and
                # the reply's handling never run): counted as a lost reply's are
                del self._carrying[token]
                lost += calls
                units += given
        if lost or units:
            self.exact.stats.dropped_records += lost
            self.stats.units_not_returned += units
            logger.warning(
                "fidelity_mw: %d breaker outcome(s) lost and %d leased unit(s) not known "
                "given back: a tiered sync carrying them was left unfinished by an event "
                "loop that closed",
                lost,
                units,
            )
        for sl in self.slices.values():
            if _stale(sl.pending):
                sl.pending = None
        self._lease_tasks = {t for t in self._lease_tasks if not _stale(t)}

    def _lease_done(self, batch: _LeaseBatch, task: asyncio.Task[None]) -> None:
        self._lease_tasks.discard(task)
        if batch.done.done():
            return
        # Cancelled before its first step (aclose): its `finally` never ran. Its
        # requests decide as if Redis had failed, and later ones start a new batch.
        if self._lease_batch is batch:
            self._lease_batch = None
        for key in batch.keys:
            sl = self.slices.get(key)
            if sl is not None and sl.pending is batch.done:
                sl.pending = None
        batch.done.set_result(-1.0)

    async def _lease_flush(self) -> None:
        batch, self._lease_batch = self._lease_batch, None
        if batch is None:
            return
        got = -1.0
        try:
            now = batch.now  # the requests' time base, as for every other slice decision
            limits = []
            for key in batch.keys:
                sl = self.slices.get(key)
                if sl is not None:
                    limits.append((key, sl.spec, 0, self._want(sl, now)))
            breakers = [k for k in batch.breakers if k in self.breakers]
            if now - self._last_sync >= 0.5 * self.sync_s:
                # The periodic sync is half due: it rides on this call instead of
                # costing one of its own a moment later.
                self._last_sync = now
                self._quiet_timer.arm(self.sync_s)
                more_breakers, more_limits = self._plan_sync(now, batch.keys)
                breakers += [k for k in more_breakers if k not in batch.breakers]
                breakers = [k for k in breakers if k in self.breakers]  # planning drops idle ones
                limits += more_limits
            if not breakers and not limits:
                # Everything the batch asked for left before it went out (a sync's
                # planning dropped its breaker as idle, a close cleared the tables): a
                # call with no KEYS would be a round trip for nothing, and on a Redis
                # Cluster one sent to whichever node, outside the prefix's slot.
                got = 0.0
                return
            self.stats.leases += 1
            got = await self._sync_call(breakers, limits, now)
        finally:
            for key in batch.keys:
                sl = self.slices.get(key)
                if sl is not None and sl.pending is batch.done:
                    sl.pending = None
            if not batch.done.done():
                batch.done.set_result(got)

    async def _sync_call(
        self,
        breaker_keys: Sequence[str],
        limits: Sequence[tuple[str, LimitSpec, int, int]],
        now: float,
    ) -> float:
        """One sync.lua call: flush+refresh breakers, give back / lease units.

        `limits` holds (key, spec, give_back, want). Returns the age estimate,
        or -1.0 if Redis failed (the exact store is then in its failure mode).
        Outcomes counted more than the breaker's window before `now` (the traffic
        stopped, or Redis was away, and no sync ran) are dropped: sent now, they would
        count in the current window for failures any window had long forgotten.
        """
        exact = self.exact
        keys: list[str] = []
        args: list[Any] = [self._rng(), len(breaker_keys), len(limits)]
        flushed: list[CachedBreaker] = []
        flushed_calls: list[int] = []
        budget = MAX_SYNC_RUNS
        for bkey in breaker_keys:
            cb = self.breakers[bkey]
            if cb.calls and now - cb.counted_at > cb.config.window_s:
                exact.stats.dropped_records += cb.calls
                cb.reset_counts()
            keys.append(exact.key("br", bkey))
            keys.append(exact.key("bp", bkey))
            args.extend(exact.breaker_config_args(cb.config))
            runs, calls, n = cb.take(budget)
            budget -= n
            if cb.calls:
                self._backlog = True  # the rest go with the next sync, made at once
            args.extend((cb.epoch, runs))
            flushed_calls.append(calls)
            flushed.append(cb)
        futures: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for key, spec, give, want in limits:
            keys.append(exact.key("rl", key))
            sl = self.slices.get(key)
            # A saturated key leases ahead: units that conform within one sync
            # interval (see Slice.add), so the bucket never sits full unleased.
            ahead = self.sync_s if want > 0 and sl is not None and sl.saturated else 0
            # All or nothing below what the waiting requests lack beyond the units
            # held (the latest request's cost for a top-up): a lease must serve one,
            # never strand fewer units than it needs, nor ask more than it needs.
            min_take = 1
            if sl is not None and want > 0:
                need = sl.need if sl.need > 0 else sl.cost
                sl.need = 0
                min_take = min(want, max(1, need - sl.tokens))
            args.extend((spec.interval_s, spec.tolerance_s, give, want, min_take, ahead))
            if want > 0 and sl is not None and sl.pending is None:
                sl.pending = loop.create_future()
                futures.append(sl.pending)
        # A streak these runs complete opens once it stood two sync intervals with no
        # success synced meanwhile: every process with traffic syncs within one, and
        # none knows how its runs interleave with the others' (decide.breaker.streak_stands)
        args.append(STREAK_WAIT_SYNCS * self.sync_s)
        token = object()
        carried = sum(flushed_calls)
        # units given back: taken off their slices already (a slice given back whole is
        # gone), so only this call knows them
        given = sum(give for _key, _spec, give, _want in limits)
        if carried or given:
            self._carrying[token] = (loop, carried, given)
        try:
            got = await exact.call(SYNC, keys, args)
        except asyncio.CancelledError:
            # Cancelled before the call answered (waiting for a pooled connection when the
            # close's bounded wait ends, or a loop ends with the task): the outcomes it
            # took from the breakers are gone, as a lost reply's are; counted, never
            # resent. (A call cancelled once out answers None: counted below.) So are
            # the units it gave back: the close's line said nothing of them.
            exact.stats.dropped_records += sum(flushed_calls)
            self.stats.units_not_returned += given
            raise
        finally:
            if carried or given:
                self._carrying.pop(token, None)
            for key, _spec, _give, _want in limits:
                sl = self.slices.get(key)
                if sl is not None and sl.pending is not None and sl.pending in futures:
                    sl.pending = None
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)
        if got is None:
            # the outcomes it carried are lost, like a failed record's
            exact.stats.dropped_records += sum(flushed_calls)
            self.stats.units_not_returned += given
            return -1.0
        reply, age = got
        try:
            _check_sync_reply(reply, len(flushed), len(limits))
            self._apply_sync(reply, age, flushed, flushed_calls, limits)
        except (IndexError, TypeError, ValueError, AttributeError) as exc:
            exact._bad_reply(exc)
            # Whether Redis counted them is unknown: counted as dropped, never resent
            exact.stats.dropped_records += sum(flushed_calls)
            self.stats.units_not_returned += given
            return -1.0
        return age

    def _apply_sync(
        self,
        reply: Sequence[Any],
        age: float,
        flushed: Sequence[CachedBreaker],
        flushed_calls: Sequence[int],
        limits: Sequence[tuple[str, LimitSpec, int, int]],
    ) -> None:
        """sync.lua's reply, applied. A breaker or key it failed alone (its Redis key
        holds a value that is not ours) is left as it was, as if it had not been in the
        call: a request on it then goes to the exact store, which fails that request
        alone, as in exact mode. The failed breaker's outcomes are lost like a failed
        record's; units given back to a failed key were not taken back."""
        now = self._clock.monotonic()
        exact = self.exact
        i = 1
        for cb, calls in zip(flushed, flushed_calls, strict=True):
            if _failed_entry(reply[i]):
                exact._failed(reply_error(_text(reply[i])[1:]))
                exact.stats.dropped_records += calls
                i += 3
                continue
            cb.state = _text(reply[i])
            cb.learn_epoch(int(reply[i + 1]))
            cb.open_until = now - age + float(reply[i + 2])
            cb.synced_at = now
            i += 3
        sync_s = self.sync_s
        asked_at = now - 2.0 * age  # when the call started: the earliest the server read
        for key, spec, _give, want in limits:
            sl = self.slices.get(key)
            if _failed_entry(reply[i]):
                exact._failed(reply_error(_text(reply[i])[1:]))
                self.stats.units_not_returned += _give
                if sl is not None:
                    sl.failed = True
                i += 4
                continue
            granted, remaining, retry = int(reply[i]), int(reply[i + 1]), float(reply[i + 2])
            first = float(reply[i + 3])
            i += 4
            if sl is None:
                continue
            sl.failed = False
            # Units that all conform already are usable at once (whatever time base
            # the caller's `now` uses). Otherwise unit j conforms at `now` + `first` +
            # j x interval, `first` <= 0 when the first ones conform already: the
            # server read its clock at most at our `now`, so none is spent early.
            conforming = 0 if first > 1e-9 else int(-first / spec.interval_s + 1e-6) + 1
            sl.add(granted, -math.inf if granted <= conforming else now + first)
            sl.remaining = remaining
            sl.synced_at = now
            # the bucket's next unit beyond the granted ones (its first conforms at `first`)
            sl.free_at = now + first + granted * spec.interval_s
            if want <= 0:
                continue
            if remaining > 0 or (granted >= want and not sl.saturated):
                # The bucket had all that was asked (and more): not saturated.
                sl.saturated = False
                sl.blocked_until = 0.0
                continue
            # The grant emptied the bucket: the fleet asks for more than it refills.
            # Cache the refusal: no lease before the bucket can serve one request
            # (`retry`, counted from the call's start, the earliest moment the
            # server can have read its clock), and none before the bucket has had
            # time to refill this instance's share of it, so a saturated key costs
            # about one lease per refill time per instance, not one per request.
            # The wait is jittered so the fleet's leases spread out, and scaled by
            # the fleet size (N instances asking once per N x the bucket's refill
            # time x 0.5 on average). The periodic sync, made anyway, leases for
            # the key once `retry_at` has passed; leases of a saturated key reach
            # ahead (`ahead` in _sync_call), so the bucket does not sit full while
            # the fleet waits.
            sl.saturated = True
            sl.retry_at = asked_at + retry
            refill = sl.burst_units * sl.spec.interval_s
            wait = refill * self._members(now) * (0.25 + 0.5 * self._rng())
            sl.blocked_until = min(max(sl.retry_at, now + wait), now + IDLE_INTERVALS * sync_s)

    def _members(self, now: float) -> int:
        """The fleet size as last announced (1 when unknown or too old)."""
        share = self.exact.fleet.share(now) if self.exact.fleet.enabled else None
        size = share.size if share is not None else None
        return size if size is not None and size >= 1 else 1

    def _maybe_sync(self, now: float) -> None:
        if now - self._last_sync < 0.8 * self.sync_s and not self._backlog:
            return
        task = self._sync_task
        if task is not None and not task.done():
            if alive(task):
                return
            self._forget_closed_loop()  # (its leases too: the loop that ran them closed)
        self._last_sync = now
        self._backlog = False
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_logged(now))
        self._quiet_timer.arm(self.sync_s)

    def _holds(self) -> bool:
        """Outcomes counted and not sent, or leased units (given back once idle)."""
        return bool(self.slices) or any(cb.calls for cb in list(self.breakers.values()))

    def _quiet_due(self) -> None:
        """The quiet timer: a sync interval since the last sync. Once per interval, and
        only while something is held: a quiet process's last outcomes reach the fleet's
        breakers within about one interval, its idle slices go back within two, then
        the timer stops until a request syncs again."""
        if self.exact._closed or self._closing or not self._holds():
            return
        if not self.exact.health.up:
            # A sync now makes no round trip and drops what it carries (the outcomes,
            # the units it gives back): held, they go once Redis answers again (its
            # probe runs meanwhile), or are dropped once older than the breaker's window,
            # as before the timer, when no sync ran during an outage.
            self._quiet_timer.arm(self.sync_s)
            return
        now = self._clock.monotonic()
        wait = self._last_sync + self.sync_s - now
        if wait <= 0.0:
            self._maybe_sync(now)  # (none if one is running: looked at again below)
            wait = self.sync_s
        self._quiet_timer.arm(wait)

    async def _sync_logged(self, now: float) -> None:
        try:
            await self._sync_all(now)
        except Exception:  # a background task: nobody else would see it
            logger.exception("fidelity_mw: tiered sync failed")

    async def _sync_all(self, now: float) -> None:
        """The periodic reconciliation: one call for everything that is due."""
        breaker_keys, limits = self._plan_sync(now, ())
        if not breaker_keys and not limits:
            return
        self.stats.syncs += 1
        await self._sync_call(breaker_keys, limits, now)

    def _plan_sync(
        self, now: float, skip: Collection[str]
    ) -> tuple[list[str], list[tuple[str, LimitSpec, int, int]]]:
        """What a sync sends now: breakers to flush and refresh, and per slice
        (key, spec, give_back, want). Slices in `skip` are left out.

        One call carries at most MAX_SYNC_KEYS keys. The tables are swept like
        a cursor: every entry planned here moves to the end of its table, so
        the next sync starts with the ones left over, and every slice (an idle
        one holding leased units too) is reached within
        len(table) / MAX_SYNC_KEYS syncs, however many keys stay hot."""
        sync_s = self.sync_s
        breakers = self.breakers
        breaker_keys: list[str] = []
        for bkey, cb in list(breakers.items()):
            if now - cb.used_at > IDLE_INTERVALS * sync_s and not cb.calls:
                del breakers[bkey]
                continue
            if len(breaker_keys) >= MAX_SYNC_KEYS // 2:
                break
            if cb.calls or now - cb.synced_at >= 0.5 * sync_s:
                breaker_keys.append(bkey)
                breakers[bkey] = breakers.pop(bkey)  # to the end: the cursor moves on
        limits: list[tuple[str, LimitSpec, int, int]] = []
        slices = self.slices
        for key, sl in list(slices.items()):
            if len(limits) + len(breaker_keys) >= MAX_SYNC_KEYS:
                break
            if sl.pending is not None or key in skip:
                continue
            if now - sl.used_at >= sync_s:
                if now - sl.synced_at >= sync_s:
                    # Idle for a whole interval: the lease ends, give everything back.
                    limits.append((key, sl.spec, sl.tokens, 0))
                    del slices[key]
                continue
            slices[key] = slices.pop(key)  # to the end: the cursor moves on
            want = self._want(sl, now)
            if sl.tokens > want:
                limits.append((key, sl.spec, sl.tokens - want, 0))
                sl.tokens = want
            elif (sl.tokens * 2 < want if sl.saturated else sl.tokens < want) and (
                sl.blocked_until <= now or (sl.saturated and sl.retry_at <= now)
            ):
                # A roomy key is topped up to its target at every sync (the call is
                # made anyway): topped up only below half of it, a slice could run dry
                # before the next sync's units arrived (its round trip is long on a
                # busy event loop) and every request meanwhile waited for a lease.
                # A blocked saturated key is leased for here too: this call is made
                # anyway, and the bucket may have refilled since the last lease.
                limits.append((key, sl.spec, 0, want - sl.tokens))
            else:
                limits.append((key, sl.spec, 0, 0))  # refresh `remaining` and the age
        return breaker_keys, limits

    # ------------------------------------------------------------ lifecycle

    def _held(self) -> tuple[int, int]:
        """Outcomes counted here and not yet sent, units leased and not spent."""
        calls = sum(cb.calls for cb in self.breakers.values())
        units = sum(sl.tokens for sl in self.slices.values() if sl.pending is None)
        return calls, units

    async def _sync_closing(self) -> None:
        """The last syncs: every outcome counted here, every unit held given back."""
        now = self._clock.monotonic()
        for _ in range(64):  # (a bound besides the time: each round empties some)
            breaker_keys = [k for k, cb in self.breakers.items() if cb.calls]
            breaker_keys = breaker_keys[: MAX_SYNC_KEYS // 2]
            limits = [
                (key, sl.spec, sl.tokens, 0)
                for key, sl in self.slices.items()
                if sl.tokens > 0 and sl.pending is None
            ][: MAX_SYNC_KEYS - len(breaker_keys)]
            if not breaker_keys and not limits:
                return
            for key, _spec, _give, _want in limits:
                del self.slices[key]  # (given back whole: `_apply_sync` finds none)
            if await self._sync_call(breaker_keys, limits, now) < 0.0:
                return

    async def _flush_at_close(self, since: tuple[int, int] | None = None) -> None:
        """As `RedisStore._flush_at_close`: a process that exits (a deploy's shutdown)
        lost the outcomes it counted since its last sync (its failures never reached
        the fleet's breakers) and kept the units it had leased from the fleet's buckets
        until they refilled. Sent for at most `CLOSE_FLUSH_S` if Redis answers; what is
        left is counted and said once (with what the calls the close cancelled since
        `since`, the counters when it began, carried away)."""
        exact = self.exact
        dropped, unreturned = (
            since
            if since is not None
            else (
                exact.stats.dropped_records,
                self.stats.units_not_returned,
            )
        )
        if not any(self._held()) and (
            exact.stats.dropped_records,
            self.stats.units_not_returned,
        ) == (
            dropped,
            unreturned,
        ):
            return
        if exact.health.up:
            try:
                await asyncio.wait_for(self._sync_closing(), CLOSE_FLUSH_S)
            except TimeoutError:
                pass
            except Exception:  # closing must go on
                logger.debug("fidelity_mw: tiered state not sent at close", exc_info=True)
        calls, units = self._held()
        lost = calls + (exact.stats.dropped_records - dropped)
        # units a give-back call failed or was cancelled with: taken off their slices,
        # `_held` no longer sees them
        self.stats.units_not_returned += units
        units = self.stats.units_not_returned - unreturned
        if not (lost or units):
            return
        exact.stats.dropped_records += calls
        self.breakers.clear()
        self.slices.clear()
        why = (
            "Redis is unreachable"
            if not exact.health.up
            else f"Redis refused them or did not take them within {CLOSE_FLUSH_S:g} s"
        )
        logger.warning(
            "fidelity_mw: closing the tiered store with %d breaker outcome(s) not sent "
            "and %d leased unit(s) not given back (their buckets refill on their own): %s",
            lost,
            units,
            why,
        )

    async def _settle(self) -> None:
        """Let the lease and sync calls out now end, for at most `CLOSE_FLUSH_S`: their
        replies applied, the close's flush gives back what they leased. Cancelled, a call
        that had reached Redis took its units from the fleet's buckets all the same, and
        nothing gave them back or said so (the flush leaves out a slice whose lease is
        out)."""
        running = [t for t in (*self._lease_tasks, self._sync_task) if alive(t)]
        if running and self.exact.health.up:
            await asyncio.wait(running, timeout=CLOSE_FLUSH_S)

    async def aclose(self) -> None:
        # The quiet timer first, and firing to no effect, before the first await: one
        # that fired while a cancelled sync ended started a sync after the task to cancel
        # was read, which reopened the exact store's client after its close.
        self._closing = True
        self._quiet_timer.cancel()
        try:
            self._forget_closed_loop()  # (a closed loop's tasks: neither cancelled nor awaited)
            await self._settle()
            await self._flush_at_close()
            since = (self.exact.stats.dropped_records, self.stats.units_not_returned)
            for lease in list(self._lease_tasks):
                lease.cancel()
            await asyncio.gather(*self._lease_tasks, return_exceptions=True)
            task = self._sync_task
            if alive(task):
                task.cancel()
                await ended(task)
            # What requests leased meanwhile (their outcomes go to the exact store now),
            # and what the calls just cancelled carried away
            await self._flush_at_close(since)
            self._quiet_timer.cancel()  # (armed by a request meanwhile)
            await self.exact.aclose()
        finally:
            self._closing = False

    # ------------------------------------------------------------ read-only view

    async def snapshot(
        self, now: float, *, top: int = 20, configs: SnapshotConfigs | None = None
    ) -> StoreSnapshot:
        """What this instance decides on (cached breakers, leased slices), and the exact
        fleet state underneath (`layers`)."""
        for key in list(self.breakers):  # name the keys this instance syncs to the exact view
            self.exact.breaker_keys(key)
        for key in list(self.slices):
            self.exact.key("rl", key)
        exact = await self.exact.snapshot(now, top=top, configs=configs)
        cached = [(key, cb) for key, cb in list(self.breakers.items()) if cb.synced_at > -math.inf]
        breaker_count = len(cached)  # (never synced: nothing to show yet)
        want = configs.top_breakers if configs is not None else None
        if want is not None and breaker_count > want:  # as the memory store lists them
            keys = [key for key, _ in cached]
            cached = [cached[i] for i in first_breakers(keys, [cb.state for _, cb in cached], want)]
        breakers = tuple(
            BreakerView(
                key,
                cb.state,
                cb.epoch,
                None,
                cb.calls,
                cb.failures,
                cb.slow,
                0,
                0,
                max(0.0, cb.open_until - now) if cb.state != CLOSED else 0.0,
                SOURCE_CACHE,
                max(0.0, now - cb.synced_at),
            )
            for key, cb in cached
        )
        slices = []
        for key, sl in list(self.slices.items()):
            used = max(0, sl.burst_units - sl.remaining - sl.tokens)
            slices.append(
                LimiterKeyView(
                    key,
                    used * sl.spec.interval_s,
                    SOURCE_CACHE,
                    max(0.0, now - sl.synced_at),
                    held=sl.tokens,
                )
            )
        slice_count = len(slices)
        # the busiest `top` (a selection: up to max_keys slices), ties in the table's order
        slices = heapq.nlargest(max(0, top), slices, key=_backlog)
        ages = [b.age_s for b in breakers] + [v.age_s for v in slices]
        stats = self.stats
        return StoreSnapshot(
            kind="tiered",
            source=SOURCE_CACHE,
            age_s=max(ages, default=0.0),
            breakers=breakers,
            limiter_keys=tuple(slices),
            limiter_key_count=slice_count,
            budgets=exact.budgets,
            breaker_count=breaker_count,
            budget_count=exact.budget_count,
            detail={
                "sync_interval_ms": self.config.sync_interval_ms,
                "requests": stats.requests,
                "decided_locally": stats.local,
                "waited_for_redis": stats.waited,
                "delegated_exact": stats.delegated,
                "syncs": stats.syncs,
            },
            notes=("breakers and slices as this instance last synced them",),
            layers=(exact,),
        )


def _backlog(view: LimiterKeyView) -> float:
    return view.backlog_s


def _same_bucket(held: LimitSpec, spec: LimitSpec) -> bool:
    """Units of one bucket: a slice serves every request on its key whose limit has the
    same rate and burst, whatever its cost (per request), retry credit (earned in Redis)
    or shadow flag. (Compared as a whole, a limit name that routes share with a cost
    each replaced the slice on every change of cost: its units stranded, a lease per
    request.)"""
    return held.interval_s == spec.interval_s and held.tolerance_s == spec.tolerance_s


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_BREAKER_STATES: Final = frozenset((CLOSED, OPEN, HALF_OPEN))


def _failed_entry(value: Any) -> bool:
    """A breaker's or key's first value in sync.lua's reply says it failed alone ("!")."""
    return isinstance(value, bytes | str) and value[:1] in (b"!", "!")


def _check_sync_reply(reply: Any, breakers: int, limits: int) -> None:
    """sync.lua's reply, before any of it is applied: the server time, 3 values per
    breaker and 4 per limit key; each breaker's state one of the three (or "!" and an
    error's text: that breaker failed alone)."""
    if not isinstance(reply, list | tuple) or len(reply) != 1 + 3 * breakers + 4 * limits:
        raise ValueError(f"not a sync reply for {breakers} breakers and {limits} keys")
    for j in range(breakers):
        state = reply[1 + 3 * j]
        if _text(state) not in _BREAKER_STATES and not _failed_entry(state):
            raise ValueError(f"breaker state {reply[1 + 3 * j]!r}")
