"""Review 45 (fin45): a plain success deferred by one thread while another takes the
deferred successes of the same breaker (`RedisStore._deferred`).

A plain success (not a probe, not slow) waits in `_deferred` to ride on the next call
about its breaker. A `FidelitySyncTransport`'s threads record outcomes and make those
calls too. `_defer_success` read the breaker's entry, then added one to it; a call in
another thread that took the entry (`_take_deferred`, a pop) in between sent the count
it read, and the one added after went nowhere: a success the fleet's breaker window
never saw (its failure ratio read higher). rev45 took the budget counts under a lock
(`_pending_lock`); the deferred successes now are too. The interleaving is made
deterministic: thread A has read the entry, thread B's call runs before A adds to it.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from fidelity_mw.decide.breaker import SUCCESS
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

KEY = "upstream:api.internal"
BREAKER = BreakerConfig(min_calls=100)
WAIT_S = 60.0  # a bound on a wait that ends as soon as the other thread has acted


class _Interleaved(dict[str, Any]):
    """`_deferred`, where thread A, having read the entry, lets thread B take it."""

    def __init__(self, items: dict[str, Any], a: list[threading.Thread], lock: Any) -> None:
        super().__init__(items)
        self.a = a
        self.lock = lock
        self.a_read = threading.Event()
        self.b_took = threading.Event()

    def get(self, key: str, default: Any = None) -> Any:
        value = super().get(key, default)
        if self.a and threading.current_thread() is self.a[0] and not self.a_read.is_set():
            self.a_read.set()
            # A store that defers under a lock holds it here: B cannot come in between
            # (it waits for the lock), which is the point.
            if self.lock is None or not self.lock.locked():
                assert self.b_took.wait(WAIT_S)
        return value

    def pop(self, key: str, *default: Any) -> Any:
        value = super().pop(key, *default)
        if self.a and threading.current_thread() is not self.a[0] and key == KEY:
            self.b_took.set()
        return value


async def _window_calls(store: RedisStore) -> int:
    """The calls the fleet's breaker window holds (`w`: calls, failures, slow a bucket;
    only successes here, so the sum of all is the calls')."""
    raw = await store.client().hget(store.key("br", KEY), "w")
    return sum(int(float(v)) for v in raw.split(b",")) if raw else 0


async def test_a_success_deferred_while_another_thread_takes_them(redis_url: str) -> None:
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    try:
        gate, _source, _age = await store.breaker_gate(KEY, BREAKER, clock.monotonic())
        before = await _window_calls(store)
        for _ in range(2):  # two plain successes waiting
            store.record_now(KEY, BREAKER, gate, SUCCESS, False, clock.monotonic())
        assert store._unsent()[1] == 2
        a: list[threading.Thread] = []
        table = _Interleaved(store._deferred, a, getattr(store, "_deferred_lock", None))
        store._deferred = table
        errors: list[BaseException] = []
        now = clock.monotonic()

        def defer() -> None:  # thread A: a third success
            try:
                store.record_now(KEY, BREAKER, gate, SUCCESS, False, now)
            except BaseException as exc:  # (said by the assertion below)
                errors.append(exc)

        def call() -> None:  # thread B: a call about the breaker takes them along
            try:
                assert table.a_read.wait(WAIT_S)
                store.outbound_gate_sync(KEY, BREAKER, None, None, False, now)
            except BaseException as exc:
                errors.append(exc)

        a.append(threading.Thread(target=defer))
        b = threading.Thread(target=call)
        b.start()
        a[0].start()
        a[0].join(WAIT_S)
        b.join(WAIT_S)
        assert not a[0].is_alive()
        assert not b.is_alive()
        assert errors == []
        assert table.a_read.is_set()
        await store.breaker_gate(KEY, BREAKER, clock.monotonic())  # takes what is left along
        sent = await _window_calls(store) - before
        assert (sent, store._unsent()[1]) == (3, 0)  # before: (2, 0), the third success lost
    finally:
        await store.aclose()
