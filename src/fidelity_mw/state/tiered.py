"""Tiered state: local decisions on leased slices of the fleet's quota, reconciled with Redis.

`tiered+redis://...` trades exactness for round trips. Each instance:

- **Limits.** Leases a *slice* of each hot key's quota from the global GCRA
  bucket in Redis (the slice's units are taken from the bucket when leased)
  and admits locally while the slice lasts. A request that finds its slice
  empty waits for one lease round trip; a key whose bucket is (nearly) empty
  is blocked locally until the bucket could have refilled a slice, instead of
  asking Redis on every request. Every sync the instance tops up
  slices that run low and gives back what it holds beyond its current need,
  and all of an idle key's units.
- **Breakers.** Gates on a cached copy of each route breaker, refreshed on
  every sync and never used when older than one sync interval (then the
  request refreshes it first). Outcomes are counted locally and applied to
  the shared window at the next sync. Half-open probes are leased from Redis
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
window starts: at most N x max_slice (N instances, max_slice = burst / 4).
The price is under-admission: units in one instance's slice are not
available to the others until given back (at most one sync interval later).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from .._types import Clock, RandomSource
from ..decide.breaker import CLOSED, FAILURE, IGNORED, OPEN, Gate
from ..decide.gcra import LimitVerdict
from ..policy import BreakerConfig, RetryConfig, StateConfig
from .base import InboundResult, LimitSpec, StateStore
from .redis import SOURCE_REDIS, SYNC, RedisStore

SOURCE_CACHE: Final = "cache"

logger = logging.getLogger("fidelity_mw.tiered")

# How many keys one sync call carries at most (the rest wait for the next).
MAX_SYNC_KEYS: Final = 256
# A cached breaker nobody used for this many sync intervals is dropped.
IDLE_INTERVALS: Final = 10


class Slice:
    """Units of one limit key leased from Redis and not yet spent."""

    __slots__ = (
        "blocked_until",
        "demand",
        "pending",
        "remaining",
        "retry_at",
        "spec",
        "synced_at",
        "tokens",
    )

    def __init__(self, spec: LimitSpec, now: float) -> None:
        self.spec = spec
        self.tokens = 0  # units this instance may still admit
        self.remaining = 0  # units left in the global bucket at the last sync
        self.synced_at = now
        self.blocked_until = 0.0  # bucket known empty until then
        self.retry_at = 0.0
        self.demand = 0  # units asked for since the last sync
        self.pending: asyncio.Future[None] | None = None

    @property
    def burst_units(self) -> int:
        return max(1, int(self.spec.tolerance_s / self.spec.interval_s + 1e-6))

    def max_slice(self) -> int:
        return max(self.spec.cost, self.burst_units // 4)


class CachedBreaker:
    """The last synced state of one shared breaker, plus outcomes not yet sent."""

    __slots__ = (
        "calls",
        "config",
        "epoch",
        "failures",
        "had_success",
        "lead",
        "maxrun",
        "open_until",
        "slow",
        "state",
        "synced_at",
        "trail",
        "used_at",
    )

    def __init__(self, config: BreakerConfig) -> None:
        self.config = config
        self.state = CLOSED
        self.epoch = -1  # unknown until the first sync
        self.open_until = 0.0
        self.synced_at = -math.inf
        self.used_at = 0.0
        self.reset_counts()

    def reset_counts(self) -> None:
        self.calls = self.failures = self.slow = 0
        self.lead = self.maxrun = self.trail = 0
        self.had_success = False

    def count(self, outcome: str, slow: bool) -> None:
        self.calls += 1
        if slow:
            self.slow += 1
        if outcome == FAILURE:
            self.failures += 1
            self.trail += 1
            if not self.had_success:
                self.lead += 1
        else:
            if self.had_success and self.trail > self.maxrun:
                self.maxrun = self.trail
            self.trail = 0
            self.had_success = True


@dataclass
class TieredStats:
    requests: int = 0
    local: int = 0  # decided on the cache alone
    waited: int = 0  # waited for a lease/refresh round trip
    delegated: int = 0  # half-open: decided exactly by RedisStore
    syncs: int = 0  # background sync calls
    leases: int = 0  # synchronous lease/refresh calls


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
        self.breakers: dict[str, CachedBreaker] = {}
        self.stats = TieredStats()
        self._sync_task: asyncio.Task[None] | None = None
        self._last_sync = -math.inf

    @property
    def round_trips(self) -> int:
        return self.exact.stats.round_trips

    # ------------------------------------------------------------ inbound

    async def admit(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
    ) -> InboundResult:
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
        wanted: list[str] = []
        for key, spec in zip(limit_keys, limits, strict=True):
            sl = slices.get(key)
            if sl is None or sl.spec != spec:
                sl = slices[key] = Slice(spec, now)
            sl.demand += spec.cost
            if sl.tokens < spec.cost and sl.blocked_until <= now:
                wanted.append(key)
        waited = 0.0
        if refresh is not None or wanted:
            waited = await self._fetch(refresh, wanted)
            if waited < 0.0:  # Redis failed: the exact store is now in its failure mode
                return exact.fallback_admit(breaker_key, breaker, limit_keys, limits, now)
            self.stats.waited += 1
            now = self._clock.monotonic()
        # --- the breaker, on the cache
        gate: Gate | None = None
        age = 0.0
        if cb is not None:
            if cb.state == CLOSED:
                gate = Gate("allow", CLOSED, cb.epoch, 0.0)
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
        # --- the limits, on the slices
        admitted = True
        ok: list[bool] = []
        for key, spec in zip(limit_keys, limits, strict=True):
            sl = slices[key]
            allowed = sl.tokens >= spec.cost
            ok.append(allowed)
            if not allowed and not spec.shadow:
                admitted = False
        verdicts: list[LimitVerdict] = []
        for key, spec, allowed in zip(limit_keys, limits, ok, strict=True):
            sl = slices[key]
            if allowed and admitted:
                sl.tokens -= spec.cost
            remaining = min(sl.burst_units, sl.remaining + sl.tokens)
            reset = (sl.burst_units - remaining) * spec.interval_s
            if allowed:
                verdicts.append(LimitVerdict(True, 0.0, remaining, reset, 0.0))
            else:
                wait = max(sl.retry_at, sl.blocked_until) - now
                verdicts.append(
                    LimitVerdict(False, 0.0, remaining, reset, max(wait, spec.interval_s))
                )
            age = max(age, now - sl.synced_at)
        if not waited:
            self.stats.local += 1
        self._maybe_sync(now)
        return self._result(gate, tuple(verdicts), admitted, waited, age)

    async def refund(
        self, limit_keys: Sequence[str], limits: Sequence[LimitSpec], source: str, now: float
    ) -> None:
        if source != SOURCE_CACHE:  # decided exactly (a probe) or on fallback: not a slice
            await self.exact.refund(limit_keys, limits, source, now)
            return
        for key, spec in zip(limit_keys, limits, strict=True):
            sl = self.slices.get(key)
            if sl is not None and sl.spec == spec:
                sl.tokens += spec.cost  # leased units, unspent after all

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

    async def record(
        self,
        breaker_key: str,
        breaker: BreakerConfig,
        gate: Gate,
        outcome: str,
        slow: bool,
        now: float,
    ) -> str:
        if gate.epoch < 0 or gate.probe_id:
            # Fallback gates are recorded locally; probes exactly (they hold a lease).
            state = await self.exact.record(breaker_key, breaker, gate, outcome, slow, now)
            cb = self.breakers.get(breaker_key)
            if gate.probe_id and cb is not None and state != gate.state:
                cb.state = state
                cb.synced_at = -math.inf  # the epoch moved: refresh before the next decision
            return state
        cb = self.breakers.get(breaker_key)
        if cb is None or outcome == IGNORED or cb.epoch != gate.epoch or cb.state != CLOSED:
            return cb.state if cb is not None else gate.state
        cb.count(outcome, slow)
        return cb.state

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

    async def outbound_gate(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        budget_key: str | None,
        cfg: RetryConfig | None,
        retry: bool,
        now: float,
    ) -> tuple[Gate | None, bool, str, float]:
        """Budget in Redis only for a retry; the breaker gate from the cache."""
        allowed, source, age = True, SOURCE_CACHE, 0.0
        if budget_key is not None and cfg is not None:
            if retry:
                allowed, source, age = await self.exact.budget_try_retry(budget_key, cfg, now)
            else:
                await self.exact.budget_request(budget_key, cfg, now)
        gate = None
        if allowed and breaker_key is not None and breaker is not None:
            gate, gate_source, gate_age = await self.breaker_gate(breaker_key, breaker, now)
            if not retry or gate_source != SOURCE_CACHE:
                source, age = gate_source, gate_age
        return gate, allowed, source, age

    # ------------------------------------------------------------ syncing

    def _note_gate(self, cb: CachedBreaker, gate: Gate, now: float) -> None:
        """Learn from an exact gate (half-open): cache it for at most one sync interval."""
        cb.state = gate.state
        cb.epoch = gate.epoch
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
        elapsed = max(now - sl.synced_at, self.sync_s)
        rate = sl.demand / elapsed
        want = math.ceil(rate * self.sync_s * 2.0)
        return min(max(want, sl.spec.cost), sl.max_slice())

    async def _fetch(self, breaker_key: str | None, keys: Sequence[str]) -> float:
        """Refresh one breaker and lease for `keys` (waiting on leases in flight).

        Returns the age estimate of what it fetched (> 0), 0.0 if nothing
        needed fetching after all, or -1.0 if Redis failed.
        """
        age = 0.0
        for _ in range(3):
            now = self._clock.monotonic()
            slices = self.slices
            need = [
                k
                for k in keys
                if slices[k].tokens < slices[k].spec.cost and slices[k].blocked_until <= now
            ]
            waits = [slices[k].pending for k in need if slices[k].pending is not None]
            fetch = [k for k in need if slices[k].pending is None]
            if not fetch and breaker_key is None:
                if not waits:
                    return age
                await asyncio.wait([w for w in waits if w is not None])
                continue
            self.stats.leases += 1
            got = await self._sync_call(
                [breaker_key] if breaker_key is not None else [],
                [(k, slices[k].spec, 0, self._want(slices[k], now)) for k in fetch],
            )
            if got < 0.0:
                return got
            age = max(got, 1e-9)
            breaker_key = None
        return age

    async def _sync_call(
        self, breaker_keys: Sequence[str], limits: Sequence[tuple[str, LimitSpec, int, int]]
    ) -> float:
        """One sync.lua call: flush+refresh breakers, give back / lease units.

        `limits` holds (key, spec, give_back, want). Returns the age estimate,
        or -1.0 if Redis failed (the exact store is then in its failure mode).
        """
        exact = self.exact
        keys: list[str] = []
        args: list[Any] = [self._rng(), len(breaker_keys), len(limits)]
        flushed: list[CachedBreaker] = []
        for bkey in breaker_keys:
            cb = self.breakers[bkey]
            keys.append(exact.key("br", bkey))
            keys.append(exact.key("bp", bkey))
            args.extend(exact.breaker_config_args(cb.config))
            args.extend(
                (
                    cb.epoch,
                    cb.calls,
                    cb.failures,
                    cb.slow,
                    cb.lead,
                    cb.maxrun,
                    cb.trail,
                    1 if cb.had_success else 0,
                )
            )
            cb.reset_counts()
            flushed.append(cb)
        futures: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for key, spec, give, want in limits:
            keys.append(exact.key("rl", key))
            args.extend((spec.interval_s, spec.tolerance_s, give, want, spec.cost))
            sl = self.slices.get(key)
            if want > 0 and sl is not None and sl.pending is None:
                sl.pending = loop.create_future()
                futures.append(sl.pending)
        try:
            got = await exact.call(SYNC, keys, args)
        finally:
            for key, _spec, _give, _want in limits:
                sl = self.slices.get(key)
                if sl is not None and sl.pending is not None and sl.pending in futures:
                    sl.pending = None
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)
        if got is None:
            return -1.0
        reply, age = got
        try:
            self._apply_sync(reply, age, flushed, limits)
        except (IndexError, TypeError, ValueError, AttributeError) as exc:
            exact._bad_reply(exc)
            return -1.0
        return age

    def _apply_sync(
        self,
        reply: Sequence[Any],
        age: float,
        flushed: Sequence[CachedBreaker],
        limits: Sequence[tuple[str, LimitSpec, int, int]],
    ) -> None:
        now = self._clock.monotonic()
        i = 1
        for cb in flushed:
            cb.state = _text(reply[i])
            cb.epoch = int(reply[i + 1])
            cb.open_until = now - age + float(reply[i + 2])
            cb.synced_at = now
            i += 3
        sync_s = self.sync_s
        for key, _spec, _give, want in limits:
            granted, remaining, retry = int(reply[i]), int(reply[i + 1]), float(reply[i + 2])
            i += 3
            sl = self.slices.get(key)
            if sl is None:
                continue
            sl.tokens += granted
            sl.remaining = remaining
            sl.synced_at = now
            sl.demand = 0
            if want > 0 and granted == 0:
                # The bucket cannot cover one request: stop asking until it could
                # have refilled this slice (at least `retry`, at most 10 syncs;
                # at least a quarter sync, so a hot empty key costs <= 4 calls
                # per sync interval).
                refill = want * sl.spec.interval_s
                block = max(retry, min(refill, sync_s), sync_s / 4.0)
                sl.blocked_until = now + min(block, IDLE_INTERVALS * sync_s)
                sl.retry_at = now - age + retry
            elif 0 < granted < want:
                # A short grant: the bucket is (nearly) empty. Spend what came,
                # then do not ask again before it could refill a slice.
                sl.blocked_until = now + min(want * sl.spec.interval_s, sync_s)
                sl.retry_at = sl.blocked_until
            elif granted:
                sl.blocked_until = 0.0

    def _maybe_sync(self, now: float) -> None:
        if now - self._last_sync < 0.8 * self.sync_s:
            return
        task = self._sync_task
        if task is not None and not task.done():
            return
        self._last_sync = now
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_logged(now))

    async def _sync_logged(self, now: float) -> None:
        try:
            await self._sync_all(now)
        except Exception:  # a background task: nobody else would see it
            logger.exception("fidelity_mw: tiered sync failed")

    async def _sync_all(self, now: float) -> None:
        """The periodic reconciliation: one call for everything that is due."""
        sync_s = self.sync_s
        breaker_keys: list[str] = []
        for bkey, cb in list(self.breakers.items()):
            if now - cb.used_at > IDLE_INTERVALS * sync_s and not cb.calls:
                del self.breakers[bkey]
                continue
            if cb.calls or now - cb.synced_at >= 0.5 * sync_s:
                breaker_keys.append(bkey)
        limits: list[tuple[str, LimitSpec, int, int]] = []
        for key, sl in list(self.slices.items()):
            if len(limits) + len(breaker_keys) >= MAX_SYNC_KEYS:
                break
            if sl.pending is not None:
                continue
            if sl.demand == 0:
                if now - sl.synced_at >= sync_s:
                    # Idle for a whole interval: the lease ends, give everything back.
                    limits.append((key, sl.spec, sl.tokens, 0))
                    del self.slices[key]
                continue
            want = self._want(sl, now)
            if sl.tokens > want:
                limits.append((key, sl.spec, sl.tokens - want, 0))
                sl.tokens = want
            elif sl.tokens * 2 < want and sl.blocked_until <= now:
                limits.append((key, sl.spec, 0, want - sl.tokens))
            else:
                limits.append((key, sl.spec, 0, 0))  # refresh `remaining` and the age
        if not breaker_keys and not limits:
            return
        self.stats.syncs += 1
        await self._sync_call(breaker_keys, limits)

    # ------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        task = self._sync_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.exact.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
