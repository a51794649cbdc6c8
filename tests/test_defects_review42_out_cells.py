"""out42: an upstream plan's own breaker and budget cells on in-process state.

A first attempt on memory state gates and records on the cells its plan holds
(`LocalState.outbound_begin_cells`, `record_cells`: `outbound_begin_now` and `record_now`
without a key looked up), fetched again once a cell may have left its table (swept,
forgotten, replaced by another config). Held here to the keyed operations: twin stores
given the same steps answer the same and end in the same state, step for step; a
transport's success path looks nothing up in the store's tables; the sync transport's
threads, with breakers forgotten meanwhile, count every call.
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelitySyncTransport, FidelityTransport
from fidelity_mw.context import _CURRENT, DecisionContext
from fidelity_mw.decide.breaker import FAILURE, IGNORED, SUCCESS, BreakerState, Gate
from fidelity_mw.decide.budget import BudgetWindow
from fidelity_mw.engine import Engine
from fidelity_mw.policy import BreakerConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.local import LocalState
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

# BreakerState's and BudgetWindow's fields (their `__slots__`, which compiled classes
# do not expose)
_BREAKER = (
    "_bucket_end", "_bucket_s", "_totals", "buckets", "closed_by", "closed_gate", "config",
    "consecutive", "epoch", "erased", "next_probe_id", "open_until", "opened_at", "probes",
    "reopens", "state",
)  # fmt: skip
_BUDGET = ("_bucket_end", "_bucket_s", "_index", "config", "requests", "retries")


def _fields(value: Any, names: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for name in names:
        field = getattr(value, name)
        if name == "buckets":
            field = [list(b) for b in field]
        elif isinstance(field, list | dict | set):
            field = type(field)(field)
        out[name] = field
    return out


def _state(store: LocalState) -> Any:
    return (
        {k: _fields(v, _BREAKER) for k, v in store.breakers.items()},
        list(store.breakers),
        {k: _fields(v, _BUDGET) for k, v in store.budgets.items()},
        list(store.budgets),
        store.breakers_evicted_active,
        store.budgets_evicted_active,
    )


def test_the_fields_compared_are_the_cells() -> None:
    if hasattr(BreakerState, "__slots__") and isinstance(BreakerState.__slots__, tuple):
        assert set(_BREAKER) == set(BreakerState.__slots__)
    if hasattr(BudgetWindow, "__slots__") and isinstance(BudgetWindow.__slots__, tuple):
        assert set(_BUDGET) == set(BudgetWindow.__slots__)


@pytest.mark.parametrize("seed", range(16))
def test_cells_decide_as_the_keyed_operations(seed: int) -> None:
    """Twin stores, the same steps at the same times: one gates and records three
    upstreams' first attempts on their cells, the other by key. Between them: outcomes
    that open breakers and probes, breakers forgotten, floods of other hosts that sweep
    both tables (a store of 6 breakers and budgets at most), another config taking a
    breaker or budget key over, a clock that steps back. Every answer and the whole
    state are the same after every step."""
    rnd = random.Random(seed)
    breaker = BreakerConfig(
        failure_ratio=0.5,
        min_calls=3,
        window_s=1.0,
        open_s=0.2,
        open_jitter=0.0,
        half_open_probes=2,
        consecutive_failures=rnd.choice([None, 2]),
    )
    other_breaker = BreakerConfig(failure_ratio=0.9, min_calls=50, window_s=2.0)
    budget = RetryConfig(budget_window_s=1.0)
    other_budget = RetryConfig(budget_window_s=3.0)
    cells_store = LocalState(rng=seeded_random(seed), max_breakers=6)
    keys_store = LocalState(rng=seeded_random(seed), max_breakers=6)
    ups = [
        ("upstream:a", breaker, "budget:a"),
        ("upstream:b", breaker, "budget:b"),
        ("upstream:c", None, "budget:c"),  # no breaker: the budget's count alone
    ]
    handles = [cells_store.outbound_cells(key, cfg, bkey, budget) for key, cfg, bkey in ups]
    held: list[tuple[int, Gate, Gate]] = []  # gates taken, not recorded yet
    now = 100.0
    flood = 0
    for step in range(600):
        r = rnd.random()
        now += rnd.choice([0.0, 0.001, 0.05, 0.1, 0.3]) if r > 0.03 else -rnd.choice([0.2, 5.0])
        action = rnd.random()
        if action < 0.4:
            u = rnd.randrange(3)
            key, cfg, bkey = ups[u]
            a = cells_store.outbound_begin_cells(handles[u], now)
            b = keys_store.outbound_begin_now(key, cfg, bkey, budget, now)
            assert a == b, step
            if a is not None and a.verdict != "reject":
                assert b is not None
                held.append((u, a, b))
        elif action < 0.75 and held:
            u, gate_a, gate_b = held.pop(rnd.randrange(len(held)))
            key, cfg, _ = ups[u]
            outcome = rnd.choices([SUCCESS, FAILURE, IGNORED], [0.7, 0.27, 0.03])[0]
            slow = rnd.random() < 0.05
            got = cells_store.record_cells(handles[u], gate_a, outcome, slow, now)
            want = keys_store.record_now(key, cfg, gate_b, outcome, slow, now)
            assert got == want, step
        elif action < 0.82:
            keys = rnd.sample([u[0] for u in ups], rnd.randint(1, 2))
            assert cells_store.forget_breakers(keys) == keys_store.forget_breakers(keys)
        elif action < 0.92:
            flood += 1
            host = rnd.random() < 0.5
            for store in (cells_store, keys_store):
                if host:
                    store.gate_now(f"upstream:x{flood}", breaker, now)
                else:
                    store.budget_request_now(f"budget:x{flood}", budget, now)
        elif action < 0.96:
            key = rnd.choice([u[0] for u in ups])
            for store in (cells_store, keys_store):
                store.gate_now(key, other_breaker, now)
        else:
            bkey = rnd.choice([u[2] for u in ups])
            for store in (cells_store, keys_store):
                store.budget_request_now(bkey, other_budget, now)
        assert _state(cells_store) == _state(keys_store), step


class _Counting(dict):  # type: ignore[type-arg]
    """A table that counts its lookups (`get`, `in`, subscripts)."""

    looked = 0

    def get(self, *args: Any) -> Any:
        _Counting.looked += 1
        return super().get(*args)

    def __getitem__(self, key: Any) -> Any:
        _Counting.looked += 1
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        _Counting.looked += 1
        return super().__contains__(key)


def _engine(store: MemoryStore) -> Engine:
    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="svc.internal", retry=RetryConfig(), breaker=BreakerConfig(min_calls=100)
            ),
        )
    )
    return Engine(policy, clock=FakeClock(), store=store)


def test_a_success_on_the_shortcut_looks_nothing_up_in_the_store() -> None:
    """Before out42 every call looked its budget and its breaker up by key, twice the
    breaker (at the gate and at the record): 3 lookups a call."""
    store = MemoryStore(rng=seeded_random(1))
    store.breakers = _Counting()
    store.budgets = _Counting()
    engine = _engine(store)
    transport = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)), engine=engine, telemetry=False
    )
    ctx = DecisionContext(engine, "/r", "GET", engine.clock.monotonic())

    async def go() -> int:
        token = _CURRENT.set(ctx)
        try:
            for _ in range(2):  # (the first arms the shortcut and fetches the cells)
                await transport.handle_async_request(httpx.Request("GET", "http://svc.internal/"))
            before = _Counting.looked
            for _ in range(20):
                response = await transport.handle_async_request(
                    httpx.Request("GET", "http://svc.internal/")
                )
                assert response.status_code == 200
            return _Counting.looked - before
        finally:
            _CURRENT.reset(token)

    assert asyncio.run(go()) == 0
    now = engine.clock.monotonic()
    assert store.breakers["upstream:svc.internal"].totals(now) == (22, 0, 0)
    assert sum(store.budgets["budget:svc.internal"].requests) == 22


def test_a_forgotten_breaker_is_fetched_again_by_the_next_call() -> None:
    """`forget_breakers` drops the cell the plan holds: the next call counts on the
    table's new breaker, not on the dropped one (as a lookup by key would)."""
    store = MemoryStore(rng=seeded_random(1))
    engine = _engine(store)
    transport = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)), engine=engine, telemetry=False
    )
    key = "upstream:svc.internal"

    async def calls(n: int) -> None:
        for _ in range(n):
            await transport.handle_async_request(httpx.Request("GET", "http://svc.internal/"))

    asyncio.run(calls(3))
    dropped = store.breakers[key]
    assert store.forget_breakers([key]) == 1
    asyncio.run(calls(2))
    now = engine.clock.monotonic()
    assert store.breakers[key] is not dropped
    assert store.breakers[key].totals(now) == (2, 0, 0)
    assert dropped.totals(now) == (3, 0, 0)


def test_a_store_that_overrides_its_keyed_operations_is_called_through_them() -> None:
    """A store subclass (a test's) that counts or fails in `outbound_begin_now` /
    `record_now` gets every first attempt through them, by the handle's keys."""
    called: list[str] = []

    class Spy(MemoryStore):
        def outbound_begin_now(self, *args: Any) -> Any:
            called.append("begin")
            return super().outbound_begin_now(*args)

        def record_now(self, *args: Any) -> Any:
            called.append("record")
            return super().record_now(*args)

    engine = _engine(Spy(rng=seeded_random(1)))
    transport = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)), engine=engine, telemetry=False
    )

    async def calls() -> None:
        for _ in range(3):
            await transport.handle_async_request(httpx.Request("GET", "http://svc.internal/"))

    asyncio.run(calls())
    assert called == ["begin", "record"] * 3


@pytest.mark.parametrize("forget", [False, True], ids=["calls", "calls+forget"])
def test_threads_of_the_sync_transport_count_every_call(forget: bool) -> None:
    """Eight threads call one sync transport (one plan, one handle) while another
    forgets the breaker and floods the tables now and then: no call is lost from the
    budget (nothing forgets it; the clock stands, so the window holds them all), and
    with nothing forgotten the breaker counts them all too."""
    store = MemoryStore(rng=seeded_random(1), max_breakers=50)
    engine = _engine(store)
    transport = FidelitySyncTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)), engine=engine, telemetry=False
    )
    threads, calls = 8, 150
    done = threading.Event()
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            for _ in range(calls):
                response = transport.handle_request(httpx.Request("GET", "http://svc.internal/"))
                assert response.status_code == 200
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def forgetter() -> None:
        n = 0
        while not done.is_set():
            n += 1
            store.forget_breakers(["upstream:svc.internal"])
            store.gate_now(f"upstream:x{n}", BreakerConfig(), engine.clock.monotonic())
            done.wait(0.001)

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    side = threading.Thread(target=forgetter) if forget else None
    if side is not None:
        side.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    if side is not None:
        side.join()
    assert not errors
    now = engine.clock.monotonic()
    assert sum(store.budgets["budget:svc.internal"].requests) == threads * calls
    state = store.breakers.get("upstream:svc.internal")
    counted = 0 if state is None else state.totals(now)[0]
    if forget:
        assert counted <= threads * calls
    else:
        assert counted == threads * calls
