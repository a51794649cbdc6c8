"""Review 32 of the state layer, by fault injection against a real redis-server.

1. Redis `TIME` going back (a failover to a replica whose clock is behind, an NTP step):
   every TAT, open-until and probe lease stored before the step lay that much further in
   the future. A 10/s limit then refused for as long as the clock was wrong (600 s behind:
   `Retry-After: 600`), a breaker with `open_s = 5` stayed open for 600 s, and a half-open
   probe's lease held its slot for 600 s more. Now the harm is bounded by the limit's and
   the breaker's own times (decide/gcra.py `CLOCK_STEP_S`, decide/breaker.py `gate`, and
   lib.lua's `unstep`, `br_open_left`, `br_gate`), memory and Redis alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest
import redis as redis_sync

from _redis_patience import answered_by_redis, answered_by_redis_sync, up_after_probe
from fidelity_mw.decide.breaker import FAILURE, SUCCESS, Gate
from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig
from fidelity_mw.state.base import InboundResult, LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_clock import RedisClock
from redis_server import PATIENT, QUIET, RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

SPEC = LimitSpec("c", 1.0, 5.0, 1, False)  # 1/s, burst 5
BREAKER = BreakerConfig(
    min_calls=2,
    failure_ratio=0.5,
    open_min_s=2.0,
    open_s=8.0,
    open_jitter=0.25,
    half_open_probes=1,
    probe_lease_s=10.0,
)
MOST_OPEN = 2.0 * 1.25  # open_min_s x (1 + jitter): the first open period at its longest
T1 = 1_000_000.0
BACK = 600.0  # the new primary's clock is ten minutes behind


def _redis(url: str) -> RedisStore:
    config = StateConfig(url=url, **PATIENT, **QUIET)
    return RedisStore(config=config, rng=lambda: 0.5)


class Both:
    """The memory store and the Redis store, asked the same at the same `now`."""

    def __init__(self, red: RedisStore, clock: RedisClock) -> None:
        self.memory = MemoryStore(rng=lambda: 0.5)
        self.red = red
        self.clock = clock

    async def admit(self, now: float, breaker: bool = False) -> tuple[InboundResult, InboundResult]:
        self.clock.set(now)
        args = ("route:/r", BREAKER, [], []) if breaker else (None, None, ["c|k"], [SPEC])
        m = await self.memory.admit(*args, now)  # type: ignore[arg-type]
        r = await self.red.admit(*args, now)  # type: ignore[arg-type]
        assert r.source == "redis"
        assert m.admitted == r.admitted
        if breaker:
            mg, rg = _gate(m), _gate(r)
            assert (mg.verdict, mg.state) == (rg.verdict, rg.state)
            assert mg.retry_after_s == pytest.approx(rg.retry_after_s, abs=1e-6)
        else:
            assert m.limits[0].allowed == r.limits[0].allowed
            assert m.limits[0].retry_after_s == pytest.approx(r.limits[0].retry_after_s, abs=1e-6)
        return m, r

    async def fail(self, now: float, gates: tuple[Gate, Gate]) -> None:
        self.clock.set(now)
        await self.memory.record("route:/r", BREAKER, gates[0], FAILURE, False, now)
        await self.red.record("route:/r", BREAKER, gates[1], FAILURE, False, now)


def _gate(result: InboundResult) -> Gate:
    assert result.gate is not None
    return result.gate


def _gates(pair: tuple[InboundResult, InboundResult]) -> tuple[Gate, Gate]:
    return _gate(pair[0]), _gate(pair[1])


async def test_a_clock_that_went_back_costs_a_limit_one_refill_not_the_step(
    redis_url: str, redis_clock: RedisClock
) -> None:
    both = Both(_redis(redis_url), redis_clock)
    try:
        got = [await both.admit(T1) for _ in range(6)]
        assert [m.admitted for m, _ in got] == [True] * 5 + [False]
        back = T1 - BACK
        _m, r = await both.admit(back)
        # Before: refused for 601 s (the TAT stood 605 s ahead of the new now)
        assert not r.admitted
        assert r.limits[0].retry_after_s == pytest.approx(SPEC.interval_s)  # an empty bucket
        assert r.limits[0].reset_s == pytest.approx(SPEC.tolerance_s)
        _m, r = await both.admit(back + SPEC.interval_s)
        assert r.admitted  # one unit refilled since the step, and no more
        _m, r = await both.admit(back + SPEC.interval_s)
        assert not r.admitted
    finally:
        await both.red.aclose()


async def test_a_clock_that_went_back_keeps_a_breaker_open_for_its_open_time_only(
    redis_url: str, redis_clock: RedisClock
) -> None:
    both = Both(_redis(redis_url), redis_clock)
    try:
        for _ in range(2):
            await both.fail(T1, _gates(await both.admit(T1, breaker=True)))
        _m, r = await both.admit(T1, breaker=True)
        assert _gate(r).state == "open"
        back = T1 - BACK
        _m, r = await both.admit(back, breaker=True)
        # Before: open for 602 s more (Retry-After: 602) where open_s is 8
        assert _gate(r).verdict == "reject"
        assert 0.0 < _gate(r).retry_after_s <= MOST_OPEN
        _m, r = await both.admit(back + MOST_OPEN, breaker=True)
        assert _gate(r).verdict == "probe"
        # the probe is out; the clock goes back again before it reports
        again = back - BACK
        _m, r = await both.admit(again, breaker=True)
        # Before: its lease held the only slot for 610 s (the wait said open_s, 8 s)
        assert _gate(r).verdict == "reject"
        assert _gate(r).retry_after_s <= BREAKER.probe_lease_s
        _m, r = await both.admit(again + BREAKER.probe_lease_s, breaker=True)
        assert _gate(r).verdict == "probe"  # its lease ran out
    finally:
        await both.red.aclose()


async def test_a_tiered_copy_of_a_breaker_opened_before_the_step_is_bounded_too(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """sync.lua reports the time left open to tiered instances: bounded the same way."""
    red = _redis(redis_url)
    clock = FakeClock(start=50.0)
    config = StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET)
    tiered = TieredStore(config=config, rng=lambda: 0.5, clock=clock)
    try:
        redis_clock.set(T1)
        for _ in range(2):
            gate = (await red.admit("route:/r", BREAKER, [], [], T1)).gate
            assert gate is not None
            await red.record("route:/r", BREAKER, gate, FAILURE, False, T1)
        redis_clock.set(T1 - BACK)
        got = await tiered.admit("route:/r", BREAKER, [], [], clock.monotonic())
        assert _gate(got).verdict == "reject"
        assert 0.0 < _gate(got).retry_after_s <= MOST_OPEN  # before: 602 s
        # and a limit drained before the step: its lease finds an empty bucket, whose next
        # unit conforms one interval later (before: 605 s later)
        redis_clock.set(T1)
        for _ in range(5):
            await red.admit(None, None, ["c|t"], [SPEC], T1)
        redis_clock.set(T1 - BACK)
        lease = await tiered.admit(None, None, ["c|t"], [SPEC], clock.monotonic())
        assert not lease.admitted
        assert lease.limits[0].retry_after_s == pytest.approx(SPEC.interval_s)
        redis_clock.set(T1 - BACK + SPEC.interval_s)
        exact = await red.admit(None, None, ["c|t"], [SPEC], 0.0)
        assert exact.admitted  # the repair was stored: one unit refilled since
    finally:
        await tiered.aclose()
        await red.aclose()


# ------------------------------------------- 2. a key of another type mid-admission


async def test_a_limit_key_of_another_type_fails_its_admission_without_taking_a_probe(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """A limit key holding a value that is not ours (`WRONGTYPE`: a key-prefix collision)
    fails its admission, which then decides per `on_error`. Scripts are not rolled back on
    an error: admit_at took the half-open probe slot (ZADD) before it read the limit key,
    and the failure left the lease behind without its probe id saved. Every request of the
    colliding client, once per lease, took the route's only probe slot that way: the other
    clients were refused `half_open` for the lease (30 s), and never probed while it kept
    coming. Now the limit keys are read before the gate writes anything."""
    red = _redis(redis_url)
    client = redis_clock.client
    breaker = BreakerConfig(
        min_calls=1,
        consecutive_failures=1,
        open_min_s=1.0,
        open_s=1.0,
        open_jitter=0.0,
        half_open_probes=1,
        probe_lease_s=30.0,
    )
    try:
        redis_clock.set(T1)
        gate = _gate(await red.admit("route:/w", breaker, [], [], T1))
        await red.record("route:/w", breaker, gate, FAILURE, False, T1)
        client.hset(red.key("rl", "c|odd"), "not", "ours")
        redis_clock.set(T1 + 2.0)  # open time over: the next request probes
        for together in (False, True):  # admit.lua alone, and inside a batch.lua call
            if together:
                odd, _ = await asyncio.gather(
                    red.admit("route:/w", breaker, ["c|odd"], [SPEC], 0.0),
                    red.admit("route:/other", breaker, ["c|x"], [SPEC], 0.0),
                )
            else:
                odd = await red.admit("route:/w", breaker, ["c|odd"], [SPEC], 0.0)
            assert odd.source == "fallback"
            assert odd.why == "error"
            probes = client.zcard(red.breaker_keys("route:/w")[1])
            assert probes == 0  # before: 1, a lease nobody holds
        assert red.coalescer.batches == 1
        good = await red.admit("route:/w", breaker, ["c|fine"], [SPEC], 0.0)
        assert good.source == "redis"
        assert _gate(good).verdict == "probe"  # before: reject, half_open, for 30 s
    finally:
        await red.aclose()


# ---------------------------------- 3. the fleet key holding another app's value


async def test_a_fleet_key_of_another_type_is_logged_not_only_counted(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`{prefix}:fleet` is named by the prefix alone: two apps that share a `key_prefix`
    share it. Holding another app's value, every announcement failed with WRONGTYPE while
    every request was decided on Redis, and only a debug line said so: the fleet size was
    never read, and the first outage enforced the whole of each limit on every process
    with nothing to tell why beforehand. Now the refusal is a warning naming the key."""
    client = redis_sync.Redis.from_url(redis_url)
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT), rng=lambda: 0.5)
    try:
        client.set(store.fleet.key, "another app's value")
        got = await store.admit(None, None, ["c|k"], [SPEC], 0.0)
        assert got.source == "redis"
        task = store.fleet.task
        assert task is not None
        await task
        assert store.fleet.failed == 1
        assert store.fleet.size is None
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("WRONGTYPE" in m and store.fleet.key in m for m in warned), warned
    finally:
        client.delete(store.fleet.key)
        client.close()
        await store.aclose()


# ------------------------------------------- 4. a primary whose writes are paused


async def _until(condition: Callable[[], bool], budget_s: float = 10.0) -> None:
    """Let the event loop run (real round trips) until `condition` holds."""
    for _ in range(int(budget_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)


async def test_a_primary_with_writes_paused_is_one_outage_not_a_flap(
    own_redis: RedisServer,
) -> None:
    """`CLIENT PAUSE <ms> WRITE` (what `FAILOVER` and a manual failover do while the
    replica catches up) holds every script and answers ROLE at once. The probe asked ROLE
    only, found a primary, and brought the store back for one call that timed out: 6
    outages in a 2 s pause under load, each holding a tick's requests for `timeout_ms`
    (measured: 60 requests over 80 ms against 10 for one outage). Now the probe writes
    too (the probe script the ACL case uses), as the store's scripts do; so does the
    blocking client's."""
    clock = FakeClock()
    config = StateConfig(url=own_redis.url, timeout_ms=100, connect_timeout_ms=1000, **QUIET)
    store = RedisStore(config=config, rng=lambda: 0.5, clock=clock)
    breaker = BreakerConfig()
    with own_redis.client() as admin:
        try:
            # both clients up (a starved Redis may answer past 100 ms: tried again)
            got = await answered_by_redis(
                lambda: store.admit(None, None, ["c|k"], [SPEC], 0.0), lambda r: r.source, store
            )
            assert got.source == "redis"
            link = store.sync_link()
            gate = answered_by_redis_sync(
                lambda: store.outbound_gate_sync("upstream:a", breaker, None, None, False, 0.0),
                lambda r: r[2],
                clock,
            )
            assert gate[2] == "redis"
            before = store.stats.outages  # (0, unless a warm-up timed out)
            admin.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
            got = await store.admit(None, None, ["c|k"], [SPEC], 0.0)  # times out
            assert (got.source, got.why) == ("fallback", "unreachable")
            # the probe's backoff waits on the fake clock: moved to each probe at once
            await _until(lambda: store.health.attempt >= 4 or up_after_probe(store))
            assert not store.health.up  # before: back after its first probe
            for _ in range(3):
                got = await store.admit(None, None, ["c|k"], [SPEC], 0.0)
                assert got.source == "fallback"
            assert store.stats.outages == before + 1  # before: one more per probe
            # the blocking client: its first call times out, each later one probes first
            for _ in range(3):
                answer = store.outbound_gate_sync("upstream:a", breaker, None, None, False, 0.0)
                assert answer[2] == "fallback"
                clock.advance(1.0)  # past its backoff pause: the next call probes
            assert not link.up
            # its own outage, counted in the same stats: one (before: one per probe)
            assert store.stats.outages == before + 2
            admin.execute_command("CLIENT", "UNPAUSE")
            await _until(lambda: up_after_probe(store))
            got = await answered_by_redis(
                lambda: store.admit(None, None, ["c|k"], [SPEC], 0.0), lambda r: r.source, store
            )
            assert got.source == "redis"
        finally:
            with contextlib.suppress(Exception):
                admin.execute_command("CLIENT", "UNPAUSE")
            await store.aclose()


# ---------------------------------------- 5. windows after the clock went back


async def test_a_breaker_window_rotates_again_after_the_clock_went_back(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """A breaker's window does not rotate until the clock passes the bucket end it stored:
    600 s behind, the successes counted before the step stayed in the window for 600 s, and
    a failing route was not opened on its ratio (100 successes, then 20 failures: 0.17).
    Now a bucket end more than two buckets ahead rotates again from one bucket ahead, in
    decide/breaker.py and lib.lua alike."""
    both = Both(_redis(redis_url), redis_clock)
    cfg = BreakerConfig(min_calls=5, failure_ratio=0.5, window_s=10.0)
    try:
        for store in (both.memory, both.red):
            redis_clock.set(T1)
            for _ in range(100):
                gate = _gate(await store.admit("route:/w", cfg, [], [], T1))
                await store.record("route:/w", cfg, gate, SUCCESS, False, T1)
            back = T1 - BACK
            redis_clock.set(back)
            gate = _gate(await store.admit("route:/w", cfg, [], [], back))
            await store.record("route:/w", cfg, gate, FAILURE, False, back)  # the step, seen
            later = back + cfg.window_s + 2.0
            redis_clock.set(later)
            states = []
            for _ in range(20):
                gate = _gate(await store.admit("route:/w", cfg, [], [], later))
                if gate.verdict == "reject":
                    break
                states.append(await store.record("route:/w", cfg, gate, FAILURE, False, later))
            assert states[-1] == "open", type(store)  # before: closed, all 20
            assert len(states) == cfg.min_calls  # the old successes are out of the window
    finally:
        await both.red.aclose()


async def test_a_retry_budget_window_rotates_again_after_the_clock_went_back(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """The same for a retry budget (decide/budget.py, outbound.lua): the requests counted
    before the step kept earning retries for as long as the clock was wrong (100 requests
    at ratio 0.5: 50 retries a window later, where the floor alone allows one)."""
    both = Both(_redis(redis_url), redis_clock)
    cfg = RetryConfig(budget_ratio=0.5, budget_min_per_s=0.1, budget_window_s=10.0)
    try:
        for store in (both.memory, both.red):
            redis_clock.set(T1)
            for _ in range(100):
                await store.budget_request("budget:api", cfg, T1)
            await store.outbound_gate(None, None, "budget:api", cfg, False, T1)  # sends them
            back = T1 - BACK
            redis_clock.set(back)
            await store.outbound_gate(None, None, "budget:api", cfg, False, back)
            later = back + cfg.budget_window_s + 2.0
            redis_clock.set(later)
            allowed = 0
            for _ in range(60):
                allowed += (await store.budget_try_retry("budget:api", cfg, later))[0]
            assert allowed == 1, type(store)  # the floor, 0.1/s x 10 s; before: 51
    finally:
        await both.red.aclose()


# ------------------------------------------ 6. an eviction policy that forgets state


@pytest.mark.parametrize(("policy", "warned"), [("allkeys-lru", True), ("noeviction", False)])
async def test_an_eviction_policy_that_can_drop_live_state_is_logged_once(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture, policy: str, warned: bool
) -> None:
    """Under `allkeys-*` / `volatile-*` Redis evicts our keys (all have a TTL) under memory
    pressure: measured, an open breaker closed and a drained bucket refilled, with nothing
    said anywhere. The store now reads the policy once and says so."""
    with own_redis.client() as admin:
        admin.config_set("maxmemory", "64mb")
        admin.config_set("maxmemory-policy", policy)
    store = _redis(own_redis.url)
    try:
        for _ in range(3):
            assert (await store.admit(None, None, ["c|k"], [SPEC], 0.0)).source == "redis"
        task = store._eviction_task
        assert task is not None
        await task
        assert store.eviction_policy == policy
        lines = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
        assert len(lines) == (1 if warned else 0), lines
    finally:
        await store.aclose()


def test_a_tat_a_longest_lease_ahead_is_not_taken_for_a_clock_step() -> None:
    """The margin is past anything a clock that never goes back leaves: a tiered lease
    ahead on a saturated key, at the longest sync interval the policy accepts (60 s),
    plus the slack, stays as it is; a TAT further ahead is read as an empty bucket."""
    from fidelity_mw.decide.gcra import gcra, slack_s

    now, interval, tol = 1.8e9, 0.1, 1.0
    leased = now + tol + 60.0 + slack_s(now, interval, tol)
    assert gcra(leased, now, interval, tol).tat == leased
    assert gcra(now + tol + 600.0, now, interval, tol).tat == now + tol


# ------------------------------------------- 7. the state page and one odd key


async def test_the_state_page_leaves_out_a_key_of_another_type_not_all_of_redis(
    redis_url: str,
) -> None:
    """`snapshot` reads every key this instance used in one pipeline. One of them holding
    another app's value (WRONGTYPE) raised for the whole pipeline: the state page showed
    the local fallback state ("redis read failed") while Redis answered everything else.
    Now that key is left out, and a note says so."""
    client = redis_sync.Redis.from_url(redis_url)
    red = _redis(redis_url)
    cfg = BreakerConfig(min_calls=1, consecutive_failures=1, open_min_s=60.0, open_s=60.0)
    try:
        for route in ("route:/a", "route:/b"):
            gate = _gate(await red.admit(route, cfg, [f"c|{route}"], [SPEC], 0.0))
            await red.record(route, cfg, gate, FAILURE, False, 0.0)
        hash_key = red.breaker_keys("route:/a")[0]
        client.delete(hash_key)
        client.set(hash_key, "another app's value")
        snap = await red.snapshot(0.0)
        assert snap.source == "redis"  # before: "fallback", the local view
        assert [b.key for b in snap.breakers] == ["route:/b"]
        assert snap.breakers[0].state == "open"
        assert snap.limiter_key_count == 2
        assert any("not ours" in note for note in snap.notes)
    finally:
        client.close()
        await red.aclose()
