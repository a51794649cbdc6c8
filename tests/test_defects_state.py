"""Regression tests for state defects (issue 12): each failed on the code before its fix.

Redis tests run the real scripts on a pinned clock (tests/redis_clock.py), so
memory and Redis see the same `now`.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fidelity_mw.decide.breaker import FAILURE, OPEN, SUCCESS, Gate
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec, StateStore
from fidelity_mw.state.local import GcraTable
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_clock import RedisClock
from redis_server import PATIENT

T0 = 1_000.0


def mid() -> float:
    return 0.5


def redis_store(url: str, **state: object) -> RedisStore:
    config = StateConfig(url=url, **{**PATIENT, **state})  # type: ignore[arg-type]
    return RedisStore(config=config, rng=mid)


async def gate(store: StateStore, key: str, cfg: BreakerConfig, now: float) -> Gate:
    return (await store.breaker_gate(key, cfg, now))[0]


# ---------------------------------------------------------------- #11 ratio on every outcome

RATIO = BreakerConfig(min_calls=4, failure_ratio=0.5, open_jitter=0.0, window_s=30.0)


async def _fffs(store: StateStore, set_now) -> Gate:  # type: ignore[no-untyped-def]
    set_now(T0)
    for outcome in (FAILURE, FAILURE, FAILURE, SUCCESS):
        g = await gate(store, "upstream:h", RATIO, T0)
        assert g.verdict == "allow"
        await store.record("upstream:h", RATIO, g, outcome, False, T0)
    return await gate(store, "upstream:h", RATIO, T0)


@pytest.mark.anyio
async def test_defect11_ratio_checked_on_success_memory() -> None:
    store = MemoryStore(rng=mid)
    after = await _fffs(store, lambda now: None)
    assert after.verdict == "reject"
    assert after.state == OPEN


@pytest.mark.anyio
@pytest.mark.redis
async def test_defect11_ratio_checked_on_success_redis(
    redis_url: str, redis_clock: RedisClock
) -> None:
    store = redis_store(redis_url)
    try:
        after = await _fffs(store, redis_clock.set)
    finally:
        await store.aclose()
    assert after.verdict == "reject"
    assert after.state == OPEN


@pytest.mark.anyio
@pytest.mark.redis
async def test_defect11_deferred_successes_open_like_single_ones(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """F,F,F then four plain successes applied in one batch: the first success opens it."""
    store = redis_store(redis_url)
    try:
        redis_clock.set(T0)
        gates = [await gate(store, "upstream:h", RATIO, T0) for _ in range(7)]
        for g in gates[:3]:
            await store.record("upstream:h", RATIO, g, FAILURE, False, T0)
        for g in gates[3:]:
            await store.record("upstream:h", RATIO, g, SUCCESS, False, T0)  # deferred
        after = await gate(store, "upstream:h", RATIO, T0)
    finally:
        await store.aclose()
    memory = MemoryStore(rng=mid)
    mgates = [await gate(memory, "upstream:h", RATIO, T0) for _ in range(7)]
    for g, outcome in zip(mgates, [FAILURE] * 3 + [SUCCESS] * 4, strict=True):
        await memory.record("upstream:h", RATIO, g, outcome, False, T0)
    assert (await gate(memory, "upstream:h", RATIO, T0)).verdict == "reject"
    assert after.verdict == "reject"


# ---------------------------------------------------------------- #10 half-open probe slots

PROBES = BreakerConfig(
    min_calls=1, failure_ratio=0.5, open_s=1.0, open_jitter=0.0, half_open_probes=2
)


async def _probes_after_reopen(store: StateStore, set_now) -> list[str]:  # type: ignore[no-untyped-def]
    key = "upstream:p"
    set_now(T0)
    g = await gate(store, key, PROBES, T0)
    await store.record(key, PROBES, g, FAILURE, False, T0)  # opens until T0 + 1
    set_now(T0 + 1.0)
    p1 = await gate(store, key, PROBES, T0 + 1.0)
    p2 = await gate(store, key, PROBES, T0 + 1.0)
    assert (p1.verdict, p2.verdict) == ("probe", "probe")
    assert (await gate(store, key, PROBES, T0 + 1.0)).verdict == "reject"
    await store.record(key, PROBES, p1, FAILURE, False, T0 + 1.0)  # re-opens; p2 in flight
    set_now(T0 + 2.5)
    return [(await gate(store, key, PROBES, T0 + 2.5)).verdict for _ in range(3)]


@pytest.mark.anyio
async def test_defect10_probe_in_flight_keeps_its_slot_memory() -> None:
    verdicts = await _probes_after_reopen(MemoryStore(rng=mid), lambda now: None)
    assert verdicts == ["probe", "reject", "reject"]


@pytest.mark.anyio
@pytest.mark.redis
async def test_defect10_redis_half_open_admits_no_more_probes_than_configured(
    redis_url: str, redis_clock: RedisClock
) -> None:
    store = redis_store(redis_url)
    try:
        verdicts = await _probes_after_reopen(store, redis_clock.set)
    finally:
        await store.aclose()
    assert verdicts == ["probe", "reject", "reject"]


# ---------------------------------------------------------------- #4 refund after refill

BURST10 = LimitSpec("l", 1.0, 10.0, 1, False)  # 1/s, burst 10


async def _refund_after_refill(store: StateStore, set_now) -> int:  # type: ignore[no-untyped-def]
    """A admitted at t, the bucket refills, ten more drain it, then A is refunded."""
    set_now(T0)
    a = await store.admit(None, None, ["k"], [BURST10], T0)
    assert a.admitted
    set_now(T0 + 1.0)  # A's unit has refilled: the bucket is full again
    admitted = 0
    for _ in range(10):
        admitted += (await store.admit(None, None, ["k"], [BURST10], T0 + 1.0)).admitted
    await store.refund(["k"], [BURST10], a.source, T0 + 1.0, [a.limits[0].tat])
    for _ in range(3):
        admitted += (await store.admit(None, None, ["k"], [BURST10], T0 + 1.0)).admitted
    return admitted


@pytest.mark.anyio
async def test_defect4_refund_never_gives_back_refilled_units_memory() -> None:
    assert await _refund_after_refill(MemoryStore(rng=mid), lambda now: None) == 10


@pytest.mark.anyio
@pytest.mark.redis
async def test_defect4_refund_never_gives_back_refilled_units_redis(
    redis_url: str, redis_clock: RedisClock
) -> None:
    store = redis_store(redis_url)
    try:
        assert await _refund_after_refill(store, redis_clock.set) == 10
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_defect4_refund_gives_back_what_is_still_outstanding() -> None:
    """A at t=0 (TAT 1), B at 0.2 (TAT 2); refund A at 0.5: half of A's unit is still
    outstanding, so the TAT moves back by 0.5, never by the full unit."""
    store = MemoryStore(rng=mid)
    spec = LimitSpec("l", 1.0, 2.0, 1, False)
    a = await store.admit(None, None, ["k"], [spec], 0.0)
    await store.admit(None, None, ["k"], [spec], 0.2)
    await store.refund(["k"], [spec], a.source, 0.5, [a.limits[0].tat])
    assert store.limits.tats["k"] == pytest.approx(1.5)


# ---------------------------------------------------------------- #3 eviction


def _global_and_client(burst: int = 10) -> tuple[LimitSpec, LimitSpec]:
    glob = LimitSpec("global", 0.1, burst * 0.1, 1, False)  # 10/s, burst `burst`
    client = LimitSpec("per-client", 12.0, 60.0, 1, False)  # 5/min, burst 5
    return glob, client


def test_defect3_eviction_keeps_the_global_bucket() -> None:
    """max_keys reached by new client addresses: a burst-10 global limit admitted 20 at
    one instant when the oldest-inserted key (the global one) was evicted."""
    store = MemoryStore(max_keys=8, rng=mid)
    glob, client = _global_and_client()
    admitted = sum(
        store.admit_now(None, None, ["global", f"client|{i}"], [glob, client], T0).admitted
        for i in range(20)
    )
    assert admitted == 10


@settings(max_examples=150, deadline=None)
@given(
    max_keys=st.integers(4, 12),
    burst=st.integers(1, 15),
    clients=st.lists(st.integers(0, 40), min_size=1, max_size=60),
)
def test_defect3_property_a_bucket_every_request_charges_never_over_admits(
    max_keys: int, burst: int, clients: list[int]
) -> None:
    """At one instant (no refill), whatever clients arrive in whatever order, the global
    bucket admits at most its burst: it owes more units than any client's bucket, so
    eviction never picks it."""
    store = MemoryStore(max_keys=max_keys, rng=mid)
    glob, client = _global_and_client(burst)
    admitted = sum(
        store.admit_now(None, None, ["global", f"client|{c}"], [glob, client], T0).admitted
        for c in clients
    )
    assert admitted <= burst


@settings(max_examples=150, deadline=None)
@given(
    debts=st.lists(
        st.tuples(st.floats(-5.0, 50.0), st.sampled_from([0.01, 0.1, 1.0, 12.0])),
        min_size=1,
        max_size=40,
    ),
    max_keys=st.integers(2, 30),
    incoming=st.integers(1, 3),
)
def test_defect3_property_eviction_forgives_the_fewest_units(
    debts: list[tuple[float, float]], max_keys: int, incoming: int
) -> None:
    """One sweep: idle keys go first; of the active ones, every evicted key forgives no
    more units than any key kept, and exactly enough go to fit the bound."""
    table = GcraTable(max_keys)
    table.next_sweep = 0  # force a sweep
    for i, (ahead_s, interval) in enumerate(debts):
        table.tats[f"k{i}"] = T0 + ahead_s
        table.intervals[f"k{i}"] = interval
    units = {k: (table.tats[k] - T0) / table.intervals[k] for k in table.tats}
    active = {k for k, u in units.items() if u > 1e-6}  # within float noise: full
    table.make_room(T0, incoming)
    kept = set(table.tats)
    assert kept <= active
    keep = max(0, min((max_keys * 3) // 4, max_keys - incoming))
    assert len(kept) == min(len(active), keep)
    evicted = active - kept
    assert table.evicted_active == len(evicted)
    if kept and evicted:
        assert max(units[k] for k in evicted) <= min(units[k] for k in kept)


# ---------------------------------------------------------------- #5 tiered slice table


def _tiered(redis_url: str, clock: FakeClock, **state: object) -> TieredStore:
    config = StateConfig(url="tiered+" + redis_url, sync_interval_ms=100, **state)  # type: ignore[arg-type]
    store = TieredStore(config=config, rng=mid, clock=clock)
    store._last_sync = math.inf  # no background syncs: the test runs them one by one
    return store


HOT = LimitSpec("ip", 0.01, 1.0, 1, False)  # 100/s, burst 100


@pytest.mark.anyio
@pytest.mark.redis
async def test_defect5_idle_slices_are_released_while_many_keys_stay_hot(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """300 hot keys kept every sync busy with the first 256 slices: idle slices behind
    them were never given back (their units stranded, the table growing)."""
    clock = FakeClock(start=T0)
    store = _tiered(redis_url, clock)
    try:
        hot = [f"ip|hot-{i}" for i in range(300)]
        idle = [f"ip|idle-{i}" for i in range(50)]
        for key in hot + idle:
            assert (await store.admit(None, None, [key], [HOT], T0)).admitted
        for _ in range(6):
            clock.advance(0.1)
            redis_clock.set(clock.monotonic())
            for key in hot:
                await store.admit(None, None, [key], [HOT], clock.monotonic())
            await store._sync_all(clock.monotonic())
        stranded = [key for key in idle if key in store.slices]
    finally:
        await store.aclose()
    assert stranded == []


@pytest.mark.anyio
@pytest.mark.redis
async def test_defect5_slice_table_is_bounded_by_max_keys(
    redis_url: str, redis_clock: RedisClock
) -> None:
    clock = FakeClock(start=T0)
    store = _tiered(redis_url, clock, max_keys=16)
    try:
        results = [await store.admit(None, None, [f"ip|{i}"], [HOT], T0) for i in range(50)]
        size = len(store.slices)
    finally:
        await store.aclose()
    assert all(r.admitted for r in results)  # beyond the bound: decided exactly, not refused
    assert size <= 16
