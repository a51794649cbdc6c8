"""MemoryStore: one atomic step for breaker and limits, bounded memory, thread safety."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fidelity_mw import BreakerConfig
from fidelity_mw.decide.breaker import CLOSED, FAILURE, HALF_OPEN, OPEN, SUCCESS
from fidelity_mw.decide.gcra import LimitVerdict
from fidelity_mw.state.base import InboundResult, LimitSpec
from fidelity_mw.state.memory import MemoryStore

T0 = 1_000.0
BREAKER = BreakerConfig(min_calls=2, open_s=1, open_min_s=1, open_jitter=0, half_open_probes=1)


def mid() -> float:
    return 0.5


def limit(name: str = "l", per_s: float = 1.0, burst: int = 1, cost: int = 1) -> LimitSpec:
    interval = 1.0 / per_s
    return LimitSpec(name, interval, burst * interval, cost, False)


def trip(store: MemoryStore, key: str = "route:/x", config: BreakerConfig = BREAKER) -> None:
    store.breaker_state(key, config).force(OPEN, T0, mid)


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Make threads interleave as often as possible."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


# ---------------------------------------------------------------- atomic admit


def test_admit_without_breaker_or_limits() -> None:
    result = MemoryStore().admit_now(None, None, (), (), T0)
    assert result.admitted
    assert result.gate is None
    assert result.limits == ()
    assert (result.source, result.age_s) == ("memory", 0.0)


def test_breaker_shed_touches_no_limit() -> None:
    store = MemoryStore(rng=mid)
    trip(store)
    spec = limit(burst=2)
    for _ in range(10):
        result = store.admit_now("route:/x", BREAKER, ["l|c"], [spec], T0 + 0.5)
        assert not result.admitted
        assert result.gate is not None
        assert result.gate.verdict == "reject"
        assert result.gate.retry_after_s == pytest.approx(0.5)
        assert result.limits == ()
    assert store.limits.tats == {}
    # The client's whole burst is still there once the route recovers.
    store.breaker_state("route:/x", BREAKER).force(CLOSED, T0, mid)
    assert store.admit_now("route:/x", BREAKER, ["l|c"], [spec], T0 + 1).limits[0].remaining == 1


def test_probe_slot_is_released_when_a_limit_rejects() -> None:
    store = MemoryStore(rng=mid)
    trip(store)
    spec = limit(burst=1)
    assert store.admit_now(None, None, ["l|greedy"], [spec], T0 + 1).admitted  # spend the quota
    rejected = store.admit_now("route:/x", BREAKER, ["l|greedy"], [spec], T0 + 1)
    assert not rejected.admitted
    assert rejected.gate is not None
    assert rejected.gate.verdict == "probe"  # it was given the only probe slot...
    assert not rejected.limits[0].allowed
    state = store.breaker_state("route:/x", BREAKER)
    assert state.probes == {}  # ...and gave it back
    assert state.state == HALF_OPEN
    # Another client gets the probe, and its success closes the breaker.
    probe = store.admit_now("route:/x", BREAKER, ["l|polite"], [spec], T0 + 1)
    assert probe.admitted
    assert probe.gate is not None
    assert probe.gate.verdict == "probe"
    assert store.record_now("route:/x", BREAKER, probe.gate, SUCCESS, False, T0 + 1) == CLOSED


def test_fast_path_results_carry_every_field() -> None:
    """The hot path builds its records without their constructors (interpreted): every
    return path must still set all the fields, defaults included (a field added to
    InboundResult or LimitVerdict must be added there too)."""
    store = MemoryStore(rng=mid)
    one, two = limit(burst=1), limit("m", burst=1)
    results = [
        store.admit_now(None, None, (), (), T0),  # nothing to decide
        store.admit_now("route:/x", BREAKER, (), (), T0),  # breaker only
        store.admit_now("route:/x", BREAKER, ["l|c"], [one], T0),  # one limit, admitted
        store.admit_now("route:/x", BREAKER, ["l|c"], [one], T0),  # one limit, refused
        store.admit_now(None, None, ["l|d", "m|d"], [one, two], T0),  # several limits
    ]
    trip(store)
    results.append(store.admit_now("route:/x", BREAKER, ["l|e"], [one], T0 + 0.5))  # shed
    assert [r.admitted for r in results] == [True, True, True, False, True, False]
    for result in results:
        assert all(hasattr(result, name) for name in InboundResult._fields)
        assert result.fleet is None  # a memory decision is never a fleet share
        for verdict in result.limits:
            assert isinstance(verdict, LimitVerdict)
            assert all(hasattr(verdict, name) for name in LimitVerdict._fields)


def test_limit_rejection_is_not_a_breaker_outcome() -> None:
    store = MemoryStore(rng=mid)
    config = BreakerConfig(min_calls=1, consecutive_failures=1)
    spec = limit(burst=1)
    store.admit_now("route:/x", config, ["l|c"], [spec], T0)
    for _ in range(50):
        assert not store.admit_now("route:/x", config, ["l|c"], [spec], T0).admitted
    assert store.breaker_state("route:/x", config).totals(T0) == (0, 0, 0)


def test_record_and_gate() -> None:
    store = MemoryStore(rng=mid)
    gates = [store.admit_now("route:/x", BREAKER, (), (), T0).gate for _ in range(2)]
    for gate in gates:
        assert gate is not None
        store.record_now("route:/x", BREAKER, gate, FAILURE, False, T0)
    assert store.gate_now("route:/x", BREAKER, T0).verdict == "reject"
    assert asyncio.run(store.breaker_gate("route:/x", BREAKER, T0 + 1))[0].verdict == "probe"


def test_async_admit_matches_admit_now() -> None:
    store = MemoryStore(rng=mid)
    spec = limit(burst=2)

    async def run() -> list[bool]:
        return [
            (await store.admit("route:/x", BREAKER, ["l|c"], [spec], T0)).admitted for _ in range(3)
        ]

    assert asyncio.run(run()) == [True, True, False]


def test_new_config_starts_a_fresh_breaker() -> None:
    store = MemoryStore(rng=mid)
    trip(store)
    other = BreakerConfig(min_calls=2)
    assert store.admit_now("route:/x", other, (), (), T0).gate.verdict == "allow"  # type: ignore[union-attr]


# ---------------------------------------------------------------- bounded memory


def test_idle_keys_are_swept_without_loss() -> None:
    store = MemoryStore(max_keys=16)
    spec = limit(per_s=1, burst=1)
    for i in range(16):
        assert store.admit_now(None, None, [f"l|{i}"], [spec], T0).admitted
    assert len(store.limits.tats) == 16
    # Every key's bucket is full again a second later: all of them are idle.
    assert store.admit_now(None, None, ["l|new"], [spec], T0 + 1).admitted
    assert set(store.limits.tats) == {"l|new"}
    assert store.limits.evicted_active == 0
    # A swept key behaves exactly as if it had been kept.
    assert store.admit_now(None, None, ["l|3"], [spec], T0 + 1).admitted
    assert not store.admit_now(None, None, ["l|3"], [spec], T0 + 1).admitted


def test_active_keys_are_evicted_only_past_the_bound() -> None:
    store = MemoryStore(max_keys=16)
    spec = limit(per_s=0.001, burst=1)  # nobody goes idle
    for i in range(100):
        store.admit_now(None, None, [f"l|{i}"], [spec], T0)
        assert len(store.limits.tats) <= 16
    assert store.limits.evicted_active > 0


@settings(max_examples=60, deadline=None)
@given(
    max_keys=st.integers(min_value=4, max_value=24),
    n_limits=st.integers(min_value=1, max_value=3),
    ops=st.lists(
        st.tuples(st.integers(min_value=0, max_value=40), st.integers(min_value=0, max_value=400)),
        min_size=1,
        max_size=120,
    ),
)
# a key swept at the very time its TAT is due (a float sum a few ulps past `now`: full,
# within gcra's slack) and charged again at that time: its new TAT is ulps off the
# unbounded store's
@example(max_keys=4, n_limits=2, ops=[(1, 0), (0, 92), (1, 108)])
def test_bound_is_respected_and_sweeping_is_lossless(
    max_keys: int, n_limits: int, ops: list[tuple[int, int]]
) -> None:
    """Never more than max_keys keys; while no active key was evicted, decisions are
    those of an unbounded store: the same verdicts and counts, times equal up to float
    noise (a swept key's TAT was within gcra's slack of full, not exactly `now`)."""
    bounded = MemoryStore(max_keys=max_keys)
    reference = MemoryStore(max_keys=10**9)
    specs = [limit(f"l{j}", per_s=10.0 / (j + 1), burst=2) for j in range(n_limits)]
    now = T0
    for client, dt_ms in ops:
        now += dt_ms / 1000
        keys = [f"{s.name}|{client}" for s in specs]
        got = bounded.admit_now(None, None, keys, specs, now)
        want = reference.admit_now(None, None, keys, specs, now)
        assert len(bounded.limits.tats) <= max_keys
        if bounded.limits.evicted_active == 0:
            assert same_decision(got, want), (got, want)


def same_decision(got: InboundResult, want: InboundResult) -> bool:
    """Equal but for float noise in the times (1 ns; the slack gcra admits with is a
    millionth of an emission interval, 100 ns and more here)."""
    if got._replace(limits=()) != want._replace(limits=()) or len(got.limits) != len(want.limits):
        return False
    return all(
        (a.allowed, a.remaining, a.credit) == (b.allowed, b.remaining, b.credit)
        and abs(a.tat - b.tat) <= 1e-9
        and abs(a.reset_s - b.reset_s) <= 1e-9
        and abs(a.retry_after_s - b.retry_after_s) <= 1e-9
        for a, b in zip(got.limits, want.limits, strict=True)
    )


# ---------------------------------------------------------------- threads


def hammer(workers: int, per_worker: int, fn) -> list:  # type: ignore[no-untyped-def,type-arg]
    results: list = []  # type: ignore[type-arg]
    lock = threading.Lock()
    start = threading.Barrier(workers)

    def work() -> None:
        start.wait()
        mine = [fn() for _ in range(per_worker)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.usefixtures("fast_switching")
def test_threads_never_exceed_the_limit() -> None:
    store = MemoryStore()
    specs = [limit("a", per_s=1, burst=150), limit("b", per_s=1, burst=100, cost=1)]
    keys = ["a|shared", "b|shared"]
    results = hammer(8, 250, lambda: store.admit_now(None, None, keys, specs, T0).admitted)
    assert len(results) == 2000
    assert sum(results) == 100  # exactly the tighter burst: no lost update, no overshoot
    # Rejections consumed nothing of the wider limit.
    assert store.admit_now(None, None, ["a|shared"], specs[:1], T0).limits[0].remaining == 49


@pytest.mark.usefixtures("fast_switching")
def test_threads_with_moving_time_stay_within_rate() -> None:
    store = MemoryStore()
    spec = [limit(per_s=100, burst=10)]
    tick = iter(range(10**9))
    tick_lock = threading.Lock()

    def one() -> tuple[float, bool]:
        with tick_lock:
            now = T0 + next(tick) * 0.001  # the clock moves 1 ms per call
        return now, store.admit_now(None, None, ["l|k"], spec, now).admitted

    results = hammer(6, 300, one)
    span = max(t for t, _ in results) - T0
    admitted = sum(ok for _, ok in results)
    assert admitted <= 100 * span + 10 + 1e-6
    assert admitted > 10  # time moved, the bucket refilled


@pytest.mark.usefixtures("fast_switching")
def test_threads_get_at_most_n_probes() -> None:
    config = BreakerConfig(open_s=1, open_jitter=0, half_open_probes=3, probe_lease_s=600)
    store = MemoryStore(rng=mid)
    trip(store, config=config)
    gates = hammer(8, 100, lambda: store.admit_now("route:/x", config, (), (), T0 + 1).gate)
    assert sum(g.verdict == "probe" for g in gates) == 3
    assert len({g.probe_id for g in gates if g.verdict == "probe"}) == 3


def test_in_process_fast_path_contract() -> None:
    """StateStore says "no fast path" with None; MemoryStore fills it with sync twins of
    admit/record that decide exactly as the coroutines do; Redis's fallback is no store."""
    from fidelity_mw.state.base import StateStore
    from fidelity_mw.state.local import LocalState
    from fidelity_mw.state.redis import RedisStore

    assert StateStore.admit_now is None
    assert StateStore.record_now is None
    redis_store = RedisStore("redis://127.0.0.1:1/0")
    assert redis_store.admit_now is None
    # (Redis's record_now takes only outcomes that need no round trip, as tiered's does:
    # tests/test_redis_lane.py)
    assert redis_store.outbound_gate_now is None
    assert type(redis_store.local) is LocalState
    assert not isinstance(redis_store.local, StateStore)

    fast, slow = MemoryStore(rng=mid), MemoryStore(rng=mid)
    assert fast.admit_now is not None
    assert fast.record_now is not None
    spec = limit(per_s=1.0, burst=2)
    for step in range(4):
        now = T0 + step * 0.25
        a = fast.admit_now("route:/x", BREAKER, ["k"], [spec], now)
        b = asyncio.run(slow.admit("route:/x", BREAKER, ["k"], [spec], now))
        assert a == b
        if a.gate is not None:
            sa = fast.record_now("route:/x", BREAKER, a.gate, FAILURE, False, now)
            sb = asyncio.run(slow.record("route:/x", BREAKER, b.gate, FAILURE, False, now))  # type: ignore[arg-type]
            assert sa == sb
    assert fast.breaker_state("route:/x", BREAKER).state == OPEN


def test_outbound_gate_breaker_rejection_spends_no_retry() -> None:
    """As outbound.lua does it: a retry the open breaker refuses costs no budget, a retry
    the budget denies takes no gate (this drifted: memory spent the retry first)."""
    from fidelity_mw.policy import RetryConfig

    store = MemoryStore(rng=mid)
    cfg = RetryConfig(budget_ratio=0.0, budget_min_per_s=0.1, budget_window_s=10.0)  # 1 retry
    trip(store, "upstream:h")
    gate, allowed = store.outbound_gate_now("upstream:h", BREAKER, "budget:h", cfg, True, T0)
    assert allowed
    assert gate is not None
    assert gate.verdict == "reject"
    assert store.budget_window("budget:h", cfg).totals(T0) == (0, 0)  # nothing spent
    gate, allowed = store.outbound_gate_now(None, None, "budget:h", cfg, True, T0)
    assert (gate, allowed) == (None, True)
    assert store.budget_window("budget:h", cfg).totals(T0) == (0, 1)
    gate, allowed = store.outbound_gate_now("upstream:h", BREAKER, "budget:h", cfg, True, T0)
    assert (gate, allowed) == (None, False)  # denied: no gate taken
