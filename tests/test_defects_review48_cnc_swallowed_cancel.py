"""Review 48 (cnc48): a Redis script call cancelled as its command finished sending.

redis-py sends a command under `asyncio.wait_for(..., socket_timeout)`. On Python 3.11
`wait_for` swallows a cancellation that arrives in the tick its inner send completes
(it returns the send's result): the store's call then went on to read its reply, for
up to `timeout_ms`, as if never cancelled. A request's deadline or `aclose` cancelling
a call was ignored, and what the call carried (a budget flush's counts, tests in
test_defects_review48_cnc_cancelled_counts.py) was neither kept nor counted lost; the
budget-flush test failed 2 runs of 3 on it. Now the lane client sees the cancellation
asked for (the task's `cancelling()` count) and ends the call cancelled.

The moment is made exact: the connection's send (redis-py's own, then the test's
`cancel()`) completes in the tick the caller's task is cancelled. Against the real
redis-server the suite starts; fails on the old code (on 3.11: the call answered).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.redis import OUTBOUND, RECORD, LaneClient, RedisStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def _cancelled_as_sent(
    store: RedisStore, script: Any, keys: list[str], args: list[Any]
) -> asyncio.Task[Any]:
    client = store._bind()[1]
    assert isinstance(client, LaneClient)
    assert client.lane_free, "the warm-up call left its connection"
    conn = client.lane_free[-1]
    assert conn.socket_timeout  # (redis-py sends under wait_for only with one)
    real = conn._send_packed_command
    caller: list[asyncio.Task[Any]] = []

    async def send_then_cancel(command: Any) -> None:
        await real(command)
        caller[0].cancel()  # the caller is cancelled as the send completes

    conn._send_packed_command = send_then_cancel
    try:
        task = asyncio.get_running_loop().create_task(store.call(script, keys, args))
        caller.append(task)
        done, _ = await asyncio.wait([task], timeout=60)
        assert done, "the call never ended"
        return task
    finally:
        del conn._send_packed_command  # (the instance attribute: redis-py's own again)


async def test_a_record_call_cancelled_as_it_is_sent_ends_cancelled(redis_url: str) -> None:
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    gate, _source, _age = await store.breaker_gate("cnc48:sent", BreakerConfig(), 0.0)
    keys = list(store.breaker_keys("cnc48:sent"))
    args = [0.5, gate.epoch, 0, "i", 0, gate.epoch, 1, *store.breaker_config_args(BreakerConfig())]
    task = await _cancelled_as_sent(store, RECORD, keys, args)
    assert task.cancelled()  # before: the reply read and returned, the cancellation lost
    # the connection whose reply was not read is not used again as it is
    assert not any(c.is_connected for c in store._bind()[1].lane_free)
    _gate, source, _age = await store.breaker_gate("cnc48:sent", BreakerConfig(), 0.0)
    assert source == "redis"  # the next call finds a sound connection
    await store.aclose()


async def test_a_gate_cancelled_as_it_is_sent_ends_cancelled_with_its_reply(
    redis_url: str,
) -> None:
    clock = FakeClock()
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    await store.breaker_gate("cnc48:gate", BreakerConfig(), 0.0)
    keys, args, _taken = store._outbound_call("cnc48:gate", BreakerConfig(), None, None, False)
    task = await _cancelled_as_sent(store, OUTBOUND, keys, args)
    assert task.cancelled()  # before: answered, the cancellation lost
    # its reply was read all the same (what the script took rides on the cancellation)
    assert store._bind()[1].lane_free[-1].is_connected
    _gate, source, _age = await store.breaker_gate("cnc48:gate", BreakerConfig(), 0.0)
    assert source == "redis"
    await store.aclose()
