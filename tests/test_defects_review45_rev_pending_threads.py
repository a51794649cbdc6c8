"""Review 45 (rev45): a tiered store's budget counts waiting to ride along
(`RedisStore._pending`) taken by two threads at once.

In tiered mode a top-level outbound request's budget count waits in `_pending` for the
next outbound call to Redis, whichever key it is about. A `FidelitySyncTransport`'s
threads make those calls too (`outbound_gate_sync`), and `_outbound_call` listed the
keys waiting, then popped them one by one: a thread that listed a key another thread
took in between raised KeyError. The transport takes that for a store failure (the
call fails closed, or goes out without its breaker's gate: `state_error:KeyError`),
and the counts it had taken before were lost. The interleaving is made deterministic
here: thread A lists the waiting keys, thread B's call runs before A takes them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from fidelity_mw.policy import RetryConfig, StateConfig
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

CFG = RetryConfig()
WAIT_S = 60.0  # a bound on a wait that ends as soon as the other thread has acted


class _Interleaved(dict[str, Any]):
    """`_pending`, where thread A, having listed the keys, lets thread B take one."""

    def __init__(self, items: dict[str, Any], a: list[threading.Thread], lock: Any) -> None:
        super().__init__(items)
        self.a = a
        self.lock = lock
        self.a_listed = threading.Event()
        self.b_took = threading.Event()

    def __iter__(self) -> Iterator[str]:
        keys = list(super().__iter__())
        yield from keys
        if self.a and threading.current_thread() is self.a[0] and not self.a_listed.is_set():
            self.a_listed.set()
            # A store that takes them under a lock holds it here: B cannot come in
            # between (it waits for the lock), which is the point.
            if self.lock is None or not self.lock.locked():
                assert self.b_took.wait(WAIT_S)

    def pop(self, key: str, *default: Any) -> Any:
        value = super().pop(key, *default)
        if self.a and threading.current_thread() is not self.a[0] and key == "budget:p0":
            self.b_took.set()
        return value


async def test_two_threads_taking_the_waiting_counts(redis_url: str) -> None:
    clock = FakeClock()
    config = StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET)
    store = TieredStore(config=config, clock=clock)
    exact = store.exact
    try:
        for _ in range(3):  # three top-level requests counted, waiting
            await store.outbound_gate(None, None, "budget:p0", CFG, False, clock.monotonic())
        assert exact._unsent()[2] == 3
        a: list[threading.Thread] = []
        table = _Interleaved(exact._pending, a, getattr(exact, "_pending_lock", None))
        exact._pending = table
        errors: list[BaseException] = []
        now = clock.monotonic()

        def call(key: str, first: threading.Event | None) -> None:
            try:
                if first is not None:
                    assert first.wait(WAIT_S)
                store.outbound_gate_sync(None, None, key, CFG, False, now)
            except BaseException as exc:  # (said by the assertion below)
                errors.append(exc)

        a.append(threading.Thread(target=call, args=("budget:pa", None)))
        b = threading.Thread(target=call, args=("budget:pb", table.a_listed))
        b.start()
        a[0].start()
        a[0].join(WAIT_S)
        b.join(WAIT_S)
        assert not a[0].is_alive()
        assert not b.is_alive()
        assert errors == []  # before: [KeyError('budget:p0')] from thread A
        assert table.a_listed.is_set()
        counted = {}
        for key in ("budget:p0", "budget:pa", "budget:pb"):
            rq = await exact.client().hget(exact.key("bu", key), "rq")
            counted[key] = sum(int(n) for n in rq.split(b",")) if rq else 0
        assert counted == {"budget:p0": 3, "budget:pa": 1, "budget:pb": 1}
        assert exact._unsent()[2] == 0
    finally:
        await store.aclose()
