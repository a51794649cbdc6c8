"""A call that waited for a connection while Redis went down does not go to Redis (red47).

docs/operations.md: once a call has timed out (Redis paused, stalled), "following
requests: local, no wait". A request whose call was waiting for one of the `pool_size`
connections when the calls ahead of it timed out (and marked Redis down) took the
connection they gave back and sent its script to the same unanswering Redis, waiting
`timeout_ms` once more: up to twice `timeout_ms`, and one more call and error counted per
such request. The ones still waiting kept waiting for a connection until their own
`timeout_ms` ran out, then fell back as "every connection busy" (`pool_waits`), though
Redis was known down. Now a call that gets its connection after Redis was marked down,
and every call still waiting when it is, decides per `on_error` at once.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import seeded_random
from redis_server import QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

LIMIT = LimitSpec("l", 0.001, 1.0, 1, False)


async def test_calls_waiting_for_a_connection_do_not_go_to_a_redis_marked_down(
    own_redis,  # type: ignore[no-untyped-def]
) -> None:
    # 400 ms: long enough that the later calls start (100 ms after the first) while
    # the first ones still wait, on a loaded box too
    config = StateConfig(
        url=own_redis.url, timeout_ms=400, connect_timeout_ms=2_000, pool_size=2, **QUIET
    )
    store = RedisStore(config=config, rng=seeded_random(47))
    store.coalesce = False  # one script call per admission: the calls are counted
    sent: list[str] = []
    real = store._evalsha

    async def counting(client, script, keys, args):  # type: ignore[no-untyped-def]
        sent.append(keys[0])
        return await real(client, script, keys, args)

    took: dict[str, float] = {}

    async def admit(name: str) -> str:
        start = time.monotonic()
        result = await store.admit(None, None, [f"l|{name}"], [LIMIT], start)
        took[name] = round(time.monotonic() - start, 3)
        return result.source

    try:
        assert await admit("warm") == "redis"  # connects: the pool holds one
        sent.clear()
        store._evalsha = counting  # type: ignore[method-assign]
        own_redis.pause()  # SIGSTOP: every call hangs until timeout_ms
        try:
            first = [asyncio.create_task(admit(f"a{i}")) for i in range(2)]  # the 2 connections
            await asyncio.sleep(0.1)
            later = [asyncio.create_task(admit(f"b{i}")) for i in range(4)]  # wait for one
            sources = await asyncio.gather(*first, *later)
            outages, pool_waits = store.stats.outages, store.stats.pool_waits
        finally:
            own_redis.resume()
    finally:
        await store.aclose()
    print("seconds each admission took:", took)  # (reported, not asserted)
    assert sources == ["fallback"] * 6
    assert outages == 1
    assert pool_waits == 0  # old code: 2 (Redis known down, counted as a busy pool)
    # old code: ['l|a0', 'l|a1', 'l|b0', 'l|b1'] (b0 and b1 took the connections the
    # timed-out calls gave back and waited timeout_ms again on the stopped server)

    assert len(sent) == 2, sent


def test_blocking_calls_waiting_for_a_connection_do_not_go_to_a_redis_marked_down(
    own_redis,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same for `FidelitySyncTransport`'s blocking client: threads whose call waited
    for one of its `pool_size` connections while another thread's call timed out."""
    import threading

    from redis.connection import Connection

    from fidelity_mw.policy import BreakerConfig, RetryConfig

    config = StateConfig(
        url=own_redis.url, timeout_ms=400, connect_timeout_ms=2_000, pool_size=2, **QUIET
    )
    store = RedisStore(config=config, rng=seeded_random(49))
    breaker, retry = BreakerConfig(), RetryConfig()
    sent: list[str] = []
    real_send = Connection.send_packed_command

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        # every command a thread sends (a reconnection's handshake too)
        sent.append(threading.current_thread().name)
        return real_send(self, *args, **kwargs)

    sources: dict[str, str] = {}
    took: dict[str, float] = {}

    def gate(name: str) -> None:
        start = time.monotonic()
        answer = store.outbound_gate_sync("upstream:h", breaker, "budget:h", retry, False, 0.0)
        took[name] = round(time.monotonic() - start, 3)
        sources[name] = answer[2]

    try:
        gate("warm")
        assert sources.pop("warm") == "redis"
        monkeypatch.setattr(Connection, "send_packed_command", counting)
        own_redis.pause()
        try:
            first = [threading.Thread(target=gate, args=(f"a{i}",), name=f"a{i}") for i in range(2)]
            later = [threading.Thread(target=gate, args=(f"b{i}",), name=f"b{i}") for i in range(4)]
            for thread in first:
                thread.start()
            time.sleep(0.1)
            for thread in later:
                thread.start()
            for thread in first + later:
                thread.join(timeout=10)
            outages = store.stats.outages
        finally:
            own_redis.resume()
    finally:
        asyncio.run(store.aclose())
    print("seconds each blocking gate took:", took)  # (reported, not asserted)
    assert sorted(sources.values()) == ["fallback"] * 6
    assert outages == 1
    # old code: two of the b threads sent too (a reconnection's handshake or the script,
    # on the connection a timed-out call gave back) and waited timeout_ms once more
    assert {name for name in sent} <= {"a0", "a1"}, sent
