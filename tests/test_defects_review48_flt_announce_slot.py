"""A fleet announcement in flight when Redis stalls (flt48).

The announcement (state/fleet.py) is a background script call on one of the store's
`pool_size` connections. Redis stopped (SIGSTOP) just after a successful call started
one: with `pool_size = 1` the requests that came next waited for that connection, and
when the announcement timed out (`timeout_ms`) it gave the connection to the first of
them, which sent its script to the same stopped Redis and waited `timeout_ms` once more
(the announcement's timeout was kept out of the health state: Redis was not marked
down by it). Measured, three requests 50 ms after the announcement began, `timeout_ms =
400`: the first took the connection the announcement gave back, sent, and decided after
0.76 s; the other two waited out their own `timeout_ms` and fell back as for a busy pool
(`pool_waits` 2, 3 errors). Now an announcement that times out marks Redis down as a
request's call does, and the requests waiting behind it decide per `on_error` at once.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import seeded_random

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

LIMIT = LimitSpec("l", 0.001, 1.0, 1, False)


async def test_requests_behind_a_stalled_announcement_do_not_go_to_redis(
    own_redis,  # type: ignore[no-untyped-def]
) -> None:
    config = StateConfig(
        url=own_redis.url,
        timeout_ms=400,
        connect_timeout_ms=2_000,
        pool_size=1,
        fleet_share_max_age_s=60.0,
    )
    store = RedisStore(config=config, rng=seeded_random(48))
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
        assert await admit("warm") == "redis"  # connects; announces once
        assert store.fleet.task is not None
        await store.fleet.task
        assert store.fleet.announces == 1
        store.fleet.due = 0.0  # the next successful call starts an announcement
        assert await admit("start") == "redis"
        assert store.fleet.task is not None
        assert not store.fleet.task.done()
        store._evalsha = counting  # type: ignore[method-assign]
        # SIGSTOP before the loop runs the announcement: it is sent to a stopped Redis
        own_redis.pause()
        try:
            # the announcement takes the one connection and waits for its reply; the
            # requests come a moment later
            await asyncio.sleep(0.05)
            behind = [asyncio.create_task(admit(f"b{i}")) for i in range(3)]
            sources = await asyncio.gather(*behind)
            announcement = store.fleet.task
            await announcement
            sources.append(await admit("after"))  # Redis known down: local at once
            outages, errors, pool_waits = (
                store.stats.outages,
                store.stats.errors,
                store.stats.pool_waits,
            )
            failed = store.fleet.failed
        finally:
            own_redis.resume()
    finally:
        await store.aclose()
    print("seconds each admission took:", took)  # (reported, not asserted)
    assert sources == ["fallback"] * 4
    assert failed == 1  # the announcement timed out
    assert outages == 1
    assert pool_waits == 0  # old code: 2 (b1, b2: Redis not known down, a busy pool)
    # old code: ['l|b0'...] (b0 took the connection the announcement gave back and waited
    # timeout_ms again on the stopped server), 3 errors counted
    assert sent == []
    assert errors == 0
