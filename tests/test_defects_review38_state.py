"""Review 38 of the state stores: the memory store's bounds and its twins of Redis's answers.

- A flood of upstream hosts (URLs clients supply: webhooks, link previews) past
  `max_breakers` dropped the oldest-inserted breakers first: the route breakers, made at
  the first requests. An open route breaker was dropped, and the next request on its
  failing route was admitted by a fresh, closed one. Now the breakers whose loss costs
  least go first (`_breaker_worth`: closed host breakers with nothing but successes), and
  open ones and route breakers last.
- A retry given back (`budget_refund`) by a transport whose retry config equals, but is
  not, the one the window was made with (two transports on one store that each loaded
  the same policy) was dropped: the memory store compared the configs by identity there,
  and by equality everywhere else (`budget_window` keeps the window for an equal config).
  Redis keeps one window per key whatever the config object: it gave the retry back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from fidelity_mw.decide.breaker import CLOSED, FAILURE, SUCCESS, Gate
from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_clock import RedisClock
from redis_server import PATIENT, QUIET

pytestmark = pytest.mark.anyio

T0 = 1_000.0
BREAKER = BreakerConfig(
    min_calls=1, failure_ratio=0.5, window_s=30.0, open_s=60.0, open_min_s=60.0, open_jitter=0.0
)


async def _open_route_then_flood(store: MemoryStore, hosts: int) -> None:
    """Open the route breaker, then call `hosts` new upstream hosts once each (a success
    each: every one still has a call in its window, none is idle)."""
    result = await store.admit("route:/api", BREAKER, [], [], T0)
    assert result.gate is not None
    assert store.record_now("route:/api", BREAKER, result.gate, FAILURE, False, T0) == "open"
    for i in range(hosts):
        gate, *_ = await store.outbound_gate(f"upstream:h{i}", BREAKER, None, None, False, T0)
        assert gate is not None
        await store.record(f"upstream:h{i}", BREAKER, gate, SUCCESS, False, T0)


async def test_a_flood_of_new_hosts_keeps_an_open_route_breaker() -> None:
    store = MemoryStore(rng=lambda: 0.5, max_breakers=8)
    await _open_route_then_flood(store, 40)
    assert len(store.breakers) <= 8
    assert store.breakers_evicted_active > 0  # active hosts had to go, and were counted
    result = await store.admit("route:/api", BREAKER, [], [], T0 + 1.0)
    assert result.gate is not None
    # before: a fresh breaker, ('allow', 'closed'): the failing route served again
    assert (result.gate.verdict, result.gate.state) == ("reject", "open")


async def test_what_the_flood_drops_first_costs_least() -> None:
    """Closed host breakers with nothing but successes go first (the oldest of them
    first); one with a failure in its window, a route breaker, an open host breaker
    stay while such remain."""
    store = MemoryStore(rng=lambda: 0.5, max_breakers=8)
    keep = BreakerConfig(min_calls=5, window_s=30.0, open_s=60.0, open_min_s=60.0)
    # a closed route breaker with a call in its window, a closed host with a failure,
    # an open host: made first, each older than every host of the flood
    route = await store.admit("route:/ok", keep, [], [], T0)
    assert route.gate is not None
    store.record_now("route:/ok", keep, route.gate, SUCCESS, False, T0)
    gate, *_ = await store.outbound_gate("upstream:flaky", keep, None, None, False, T0)
    assert gate is not None
    await store.record("upstream:flaky", keep, gate, FAILURE, False, T0)
    gate, *_ = await store.outbound_gate("upstream:down", BREAKER, None, None, False, T0)
    assert gate is not None
    await store.record("upstream:down", BREAKER, gate, FAILURE, False, T0)
    assert store.breakers["upstream:down"].state == "open"
    for i in range(20):
        gate, *_ = await store.outbound_gate(f"upstream:h{i}", keep, None, None, False, T0)
        assert gate is not None
        await store.record(f"upstream:h{i}", keep, gate, SUCCESS, False, T0)
    assert {"route:/ok", "upstream:flaky", "upstream:down"} <= set(store.breakers)
    assert store.breakers["upstream:flaky"].totals(T0) == (1, 1, 0)
    assert "upstream:h19" in store.breakers  # the newest host: just made


def _budget_configs() -> tuple[RetryConfig, RetryConfig]:
    """The same budget loaded twice (two transports, each with the policy it loaded)."""
    first = RetryConfig(budget_ratio=0.0, budget_min_per_s=0.1, budget_window_s=10.0)
    second = RetryConfig(budget_ratio=0.0, budget_min_per_s=0.1, budget_window_s=10.0)
    assert first == second
    assert first is not second
    return first, second


async def test_a_retry_given_back_under_an_equal_config_comes_back() -> None:
    """The budget allows one retry a window (0.1/s x 10 s): spent under one config
    object, refused under the other (the same window), given back under the other:
    then one retry is allowed again."""
    mine, theirs = _budget_configs()
    store = MemoryStore(rng=lambda: 0.5)
    assert (await store.budget_try_retry("budget:h", mine, T0))[0]
    assert not (await store.budget_try_retry("budget:h", theirs, T0))[0]  # one window
    await store.budget_refund("budget:h", theirs, "memory", 0.0, T0)
    assert store.budgets["budget:h"].totals(T0) == (0, 0)  # before: (0, 1), kept
    assert (await store.budget_try_retry("budget:h", mine, T0))[0]


@pytest.mark.redis
async def test_the_refund_under_an_equal_config_decides_as_redis_does(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """The differential: the memory store and Redis (outbound.lua, budget_refund.lua), at
    the same pinned times, allow the same retries around that refund."""
    mine, theirs = _budget_configs()
    red = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), rng=lambda: 0.5)
    got = {}
    try:
        for name, store in (("memory", MemoryStore(rng=lambda: 0.5)), ("redis", red)):
            redis_clock.set(T0)
            answers = [(await store.budget_try_retry("budget:h", mine, T0))[0]]
            answers.append((await store.budget_try_retry("budget:h", theirs, T0))[0])
            redis_clock.set(T0 + 0.5)
            await store.budget_refund("budget:h", theirs, store.source, 0.5, T0 + 0.5, T0)
            answers.append((await store.budget_try_retry("budget:h", mine, T0 + 0.5))[0])
            answers.append((await store.budget_try_retry("budget:h", theirs, T0 + 0.5))[0])
            got[name] = answers
        assert red.stats.fallbacks == 0  # every answer was Redis's
    finally:
        await red.aclose()
    assert got == {"memory": [True, False, True, False], "redis": [True, False, True, False]}


# ---------------------------------------------------------------- deferred successes


class _GatedClock(FakeClock):
    """A fake clock whose `sleep` ends, and whose timers fire, when the test says one
    interval has passed (the deferred successes' flush waits on a timer since review 45)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[asyncio.Future[None]] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        await future

    def call_later(self, delay: float, callback: Callable[[], None]) -> Any:
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda done: None if done.cancelled() else callback())
        self.waiting.append(future)
        return future  # (its cancel() is the handle's)

    def interval_passes(self) -> None:
        waiting, self.waiting = self.waiting, []
        for future in waiting:
            if not future.done():
                future.set_result(None)


@pytest.mark.redis
async def test_deferred_successes_of_many_new_hosts_do_not_pile_up(redis_url: str) -> None:
    """Plain successes wait for the next call about their breaker, or a flush one sync
    interval later. A flush sent 64 breakers' worth, one round trip each: a service
    calling 200 new upstream hosts (once each) per interval kept 136 more every
    interval, for good (2,720 after 20 intervals). Now a flush sends them all, coalesced,
    and every one reaches Redis."""
    clock = _GatedClock()
    red = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    try:
        closed = Gate("allow", CLOSED, 0, 0.0)
        sizes = []
        for interval in range(20):
            for i in range(200):
                red.record_now(f"upstream:h{interval}-{i}", BREAKER, closed, SUCCESS, False, T0)
            for _ in range(3000):  # the flush task starts its wait (30 s at most)
                if clock.waiting:
                    break
                await asyncio.sleep(0.01)
            clock.interval_passes()
            for _ in range(3000):  # the flush's round trips (30 s at most)
                await asyncio.sleep(0.01)
                if not red._deferred:
                    break
            sizes.append(len(red._deferred))
        assert max(sizes) == 0, sizes  # before: 136, 272, ... 2720
        assert red.stats.dropped_records == 0
        assert red.stats.fallbacks == 0
        # every success was counted in its breaker's window
        snapshot = await red.snapshot(T0, top=5000)
        assert sum(view.calls for view in snapshot.breakers) == 20 * 200
    finally:
        await red.aclose()


# ---------------------------------------------------------------- budget counts waiting


@pytest.mark.redis
async def test_budget_counts_of_hosts_called_once_reach_redis(redis_url: str) -> None:
    """A tiered store counts a first attempt's budget request in the exact store's table
    of counts waiting for the next outbound call (`budget_request`). Only a key counted
    again a sync interval after its first count started their flush: keys of hosts
    called once (a new upstream host per call) waited for good, and the table grew by
    one per call (1,000 after 1,000 calls over 10 s at `sync_interval_ms = 100`, none
    of them in Redis). Now the oldest count waiting starts the flush, which sends them
    all."""
    clock = FakeClock()
    config = StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET)
    store = TieredStore(config=config, clock=clock)
    cfg = RetryConfig()
    try:
        for i in range(1_000):
            await store.outbound_gate(None, None, f"budget:h{i}", cfg, False, clock.monotonic())
            clock.advance(0.01)
            if i % 10 == 9:
                await asyncio.sleep(0.005)  # the background flush's round trips
        # The flush running (a starved machine's round trips outlast the 5 ms above)
        # ends first: until then a count may be in flight, in neither table, or sent
        # while the counts below are read. Bounded; no window is waited out.
        for _ in range(6000):
            flush = store.exact._flush_task
            if flush is None or flush.done():
                break
            await asyncio.sleep(0.01)
        waiting = sum(entry[1] for entry in store.exact._pending.values())
        assert waiting <= 10  # before: 1,000
        assert store.exact.stats.fallbacks == 0
        client = store.exact.client()
        counted = 0
        for i in range(1_000):
            rq = await client.hget(store.exact.key("bu", f"budget:h{i}"), "rq")
            counted += sum(int(n) for n in rq.split(b",")) if rq else 0
        assert counted + waiting == 1_000  # each request counted once, in Redis or waiting
    finally:
        await store.aclose()
