"""Review 44 (flt44): what a Redis or tiered store holds back to batch reaches Redis
within about one sync interval even when no further call comes.

A Redis store keeps a top-level request's retry-budget count waiting for the process's
next outbound call (`RedisStore.budget_request`), and a flush started only when a later
count found the oldest one a sync interval old. A process that went quiet after its
last requests kept their counts for as long as it stayed quiet (for good, if it never
called that way again): the fleet's shared budget undercounted its requests, so allowed
the fleet fewer retries. docs/state.md promised "at the latest after one
`sync_interval_ms`". Now a timer (the clock's `call_later`, else the event loop's) is
armed for the oldest count waiting. The tiered store's budget counts take the same
path; its breaker outcomes (counted in the cache, sent with the next periodic sync)
had the same shape and get the same timer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fidelity_mw.decide.breaker import FAILURE
from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

CFG = RetryConfig()


async def _counted(store: RedisStore, key: str) -> int:
    rq = await store.client().hget(store.key("bu", key), "rq")
    return sum(int(n) for n in rq.split(b",")) if rq else 0


async def _settle(store: RedisStore) -> None:
    """Let a flush the timer started run to its end (bounded; no window is waited out)."""
    for _ in range(3):
        await asyncio.sleep(0)  # (a fake clock's timer fired in `advance` runs now)
        task = store._flush_task
        if task is not None and not task.done():
            await asyncio.wait_for(asyncio.shield(task), 60)


async def test_last_counts_before_a_quiet_spell_reach_redis(redis_url: str) -> None:
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    try:
        for _ in range(3):
            await store.budget_request("budget:q0", CFG, clock.monotonic())
        await store.budget_request("budget:q1", CFG, clock.monotonic())
        clock.advance(store.sync_s / 2)
        await _settle(store)
        assert store._unsent()[2] == 4  # not yet due: they wait to ride along
        assert store.stats.round_trips == 0
        clock.advance(store.sync_s * 0.6)  # due; and no call comes
        await _settle(store)
        assert store._unsent()[2] == 0  # before: 4, for as long as the process stays quiet
        assert [await _counted(store, "budget:q0"), await _counted(store, "budget:q1")] == [3, 1]
        assert store.stats.fallbacks == 0
    finally:
        await store.aclose()


async def test_counts_made_while_a_flush_ran_are_sent_an_interval_later(redis_url: str) -> None:
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    try:
        await store.budget_request("budget:w0", CFG, clock.monotonic())
        clock.advance(store.sync_s)  # the timer starts a flush
        await store.budget_request("budget:w1", CFG, clock.monotonic())  # it may take w1 too
        await _settle(store)
        trips = store.stats.round_trips
        await store.budget_request("budget:w2", CFG, clock.monotonic())  # after the flush
        await _settle(store)
        assert store._unsent()[2] == 1
        clock.advance(store.sync_s)
        await _settle(store)
        assert store._unsent()[2] == 0  # before: 1, for good
        assert [await _counted(store, f"budget:w{i}") for i in range(3)] == [1, 1, 1]
        # one round trip for w2's flush (8 keys a call), not one a count
        assert store.stats.round_trips - trips == 1
    finally:
        await store.aclose()


async def test_many_counts_one_round_trip_per_eight_keys(redis_url: str) -> None:
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    try:
        for i in range(200):
            await store.budget_request(f"budget:m{i % 16}", CFG, clock.monotonic())
        assert store.stats.round_trips == 0  # counting costs no round trip
        clock.advance(store.sync_s)
        await _settle(store)
        assert store._unsent()[2] == 0
        stats = store.stats
        assert stats.round_trips - stats.script_loads == 2  # 16 keys, 8 a call
        assert sum([await _counted(store, f"budget:m{i}") for i in range(16)]) == 200
    finally:
        await store.aclose()


async def test_on_the_system_clock_the_loop_timer_sends_them(redis_url: str) -> None:
    """No fake clock: the event loop's `call_later`. A short interval, polled (bounded)."""
    config = StateConfig(url=redis_url, sync_interval_ms=20, **PATIENT, **QUIET)
    store = RedisStore(config=config)
    try:
        await store.budget_request("budget:s0", CFG, 0.0)
        for _ in range(6000):  # 60 s at most on a starved machine; ~20 ms when quiet
            if not store._pending and store._flush_task is not None and store._flush_task.done():
                break
            await asyncio.sleep(0.01)
        assert store._unsent()[2] == 0  # before: 1 forever
        assert await _counted(store, "budget:s0") == 1
    finally:
        await store.aclose()


async def test_redis_down_then_back_a_timer_an_interval_no_busy_loop(redis_url: str) -> None:
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    try:
        await store.budget_request("budget:d0", CFG, clock.monotonic())
        store.health.up = False  # as a failed call leaves it (the probe is not started)
        fired = 0
        due = store._pending_due

        def counting() -> None:
            nonlocal fired
            fired += 1
            due()

        store._pending_timer._callback = counting
        for _ in range(5):
            clock.advance(store.sync_s)
            await _settle(store)
        assert fired == 5  # one an interval while Redis is down, no round trip
        assert store._unsent()[2] == 1
        store.health.up = True
        clock.advance(store.sync_s)
        await _settle(store)
        assert store._unsent()[2] == 0
        assert await _counted(store, "budget:d0") == 1
    finally:
        await store.aclose()


async def test_aclose_leaves_no_timer(redis_url: str) -> None:
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    await store.budget_request("budget:c0", CFG, clock.monotonic())
    await store.aclose()  # sends it (as before)
    assert store._pending_timer._handle is None
    assert not [t for t in clock._timers if not t[2].cancelled]
    clock.advance(store.sync_s * 2)  # nothing left to fire
    assert await _counted(store, "budget:c0") == 1
    await store.aclose()


async def test_tiered_budget_counts_too(redis_url: str) -> None:
    clock = FakeClock()
    config = StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET)
    store = TieredStore(config=config, clock=clock)
    try:
        for _ in range(5):
            await store.outbound_gate(None, None, "budget:t0", CFG, False, clock.monotonic())
        assert store.exact._unsent()[2] == 5
        clock.advance(store.sync_s)
        await _settle(store.exact)
        assert store.exact._unsent()[2] == 0  # before: 5
        assert await _counted(store.exact, "budget:t0") == 5
    finally:
        await store.aclose()


async def test_tiered_breaker_outcomes_of_a_quiet_process_open_the_fleets_breaker(
    redis_url: str,
) -> None:
    """Failures counted in a tiered cache after its last sync, then no request: the
    fleet's breaker (read by another process's exact store) opens within one interval.
    Before, it stayed closed for as long as this process stayed quiet."""
    clock = FakeClock()
    config = StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET)
    store = TieredStore(config=config, clock=clock)
    other = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    breaker = BreakerConfig(min_calls=5, failure_ratio=0.5, window_s=600.0, open_s=600.0)
    try:
        gates = []
        for _ in range(6):  # the first leases and syncs; the rest decide on the cache
            result = await store.admit("quiet-up", breaker, (), (), clock.monotonic())
            assert result.gate is not None
            assert result.gate.verdict == "allow"
            gates.append(result.gate)
        syncs = store.stats.syncs
        for gate in gates:
            assert store.record_now("quiet-up", breaker, gate, FAILURE, False, clock.monotonic())
        assert store.breakers["quiet-up"].calls == 6
        clock.advance(store.sync_s * 1.1)  # no request comes
        for _ in range(3):
            await asyncio.sleep(0)
            task = store._sync_task
            if task is not None and not task.done():
                await asyncio.wait_for(asyncio.shield(task), 60)
        assert store.breakers["quiet-up"].calls == 0  # before: 6, unsent
        assert store.stats.syncs == syncs + 1
        gate, _source, _age = await other.breaker_gate("quiet-up", breaker, clock.monotonic())
        assert gate.state == "open"  # before: closed
        # the timer stops once nothing is held: a quiet process costs no round trips
        store.slices.clear()
        for _ in range(3):
            clock.advance(store.sync_s * 1.1)
            await asyncio.sleep(0)
        assert store.stats.syncs == syncs + 1
        assert store._quiet_timer._handle is None
    finally:
        await store.aclose()
        await other.aclose()


async def test_tiered_slice_given_back_while_its_request_awaited_a_lease(
    redis_url: str,
) -> None:
    """A request on two limits: one slice holds units, the other needs a lease, which it
    awaits; meanwhile a sync (the quiet timer's here; another request's on a busy server)
    takes the first slice for idle (its last use is this request's start, more than a
    sync interval ago on a slow round trip) and gives it back. The request read that
    slice again after its await: KeyError, a 500. Found by review40's cut-off test under
    load once the quiet timer existed; now the request is decided exactly."""
    clock = FakeClock()
    config = StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET)
    store = TieredStore(config=config, clock=clock)
    one = LimitSpec("a", 1e-5, 10.0, 1, False)
    two = LimitSpec("b", 1e-5, 10.0, 1, False)
    call = store.exact.call
    try:
        first = await store.admit(None, None, ["a|k"], [one], clock.monotonic())
        assert first.admitted
        assert store.slices["a|k"].tokens >= 1
        entered = asyncio.Event()
        release = asyncio.Event()

        async def held(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            await release.wait()
            return await call(*args, **kwargs)

        store.exact.call = held  # type: ignore[method-assign]
        clock.advance(store.sync_s * 0.1)
        late = asyncio.ensure_future(
            store.admit(None, None, ["a|k", "b|k"], [one, two], clock.monotonic())
        )
        await asyncio.wait_for(entered.wait(), 60)  # b's lease waits
        clock.advance(store.sync_s * 2.5)  # the quiet timer's sync plans meanwhile
        for _ in range(5):
            await asyncio.sleep(0)
        assert "a|k" not in store.slices  # given back as idle
        release.set()
        result = await asyncio.wait_for(late, 60)  # before: KeyError: 'a|k'
        assert result.admitted
        assert store.stats.delegated == 1
    finally:
        store.exact.call = call  # type: ignore[method-assign]
        await store.aclose()
