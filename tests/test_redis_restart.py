"""Redis restarted under a full pool: no flapping (issue 12 #22).

Every pooled connection to the old server is dead after a restart. Each of
them used to fail once on first use, and each failure declared Redis down
again: a few short extra outages per restart. A failed call on a stale pooled
connection is now retried once on a fresh connection before Redis is
declared down; redis-py itself still retries nothing.
"""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import seeded_random

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

LIMIT = LimitSpec("l", 0.001, 1.0, 1, False)
POOL = 8


async def _burst(store: RedisStore, n: int) -> list[str]:
    results = await asyncio.gather(
        *(store.admit(None, None, [f"l|{i}"], [LIMIT], time.monotonic()) for i in range(n))
    )
    return [r.source for r in results]


async def test_defect22_kill_and_restart_under_a_full_pool_is_one_outage(
    own_redis,  # type: ignore[no-untyped-def]
) -> None:
    # a generous timeout: on a busy machine a slow reply must not pass for an outage
    config = StateConfig(url=own_redis.url, timeout_ms=1_000, pool_size=POOL)
    store = RedisStore(config=config, rng=seeded_random(3))
    try:
        # fill the pool: POOL connections, all idle afterwards
        assert set(await _burst(store, 4 * POOL)) == {"redis"}
        own_redis.kill()
        sources: list[str] = await _burst(store, 2 * POOL)  # fails over
        # (bounds, not waits: each loop ends once it saw what it waits for, so a starved
        # machine gets 30 s and a quiet one loses nothing)
        down_until = time.monotonic() + 30.0
        while store.stats.outages < 1 and time.monotonic() < down_until:
            sources += await _burst(store, 2 * POOL)  # until the store knows it is down
            await anyio.sleep(0.005)
        assert store.stats.outages == 1
        own_redis.start()  # same port, empty
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and sources.count("redis") < 20 * POOL:
            sources += await _burst(store, 2 * POOL)
            await anyio.sleep(0.005)
        outages = store.stats.outages
    finally:
        await store.aclose()
    assert sources.count("redis") >= 20 * POOL
    assert outages <= 1, f"{outages} outages for one restart"


def _flaky(monkeypatch: pytest.MonkeyPatch, errors: list[BaseException]) -> None:
    """The next calls fail with `errors` (in order) before reaching Redis, as a pooled
    connection to a restarted server does on first use."""
    real = RedisStore._evalsha

    async def flaky(self, client, script, keys, args):  # type: ignore[no-untyped-def]
        if errors:
            raise errors.pop(0)
        return await real(self, client, script, keys, args)

    monkeypatch.setattr(RedisStore, "_evalsha", flaky)


async def test_defect22_one_stale_connection_failure_is_retried_on_a_fresh_connection(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(config=StateConfig(url=redis_url), rng=seeded_random(3))
    try:
        assert (await store.admit(None, None, ["l|a"], [LIMIT], time.monotonic())).source == "redis"
        _flaky(monkeypatch, [RedisConnectionError("Connection closed by server.")])
        result = await store.admit(None, None, ["l|a"], [LIMIT], time.monotonic())
        assert result.source == "redis"
        assert store.up
        assert store.stats.outages == 0
        assert store.stats.reconnects == 1
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    "errors",
    [
        [RedisConnectionError("reset"), RedisConnectionError("refused")],  # really down
        [TimeoutError("slow")],  # a timeout is not a stale connection: never retried
        [RedisTimeoutError("slow")],
    ],
)
async def test_defect22_no_other_retries(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, errors: list[BaseException]
) -> None:
    store = RedisStore(config=StateConfig(url=redis_url), rng=seeded_random(3))
    retried = len(errors) - 1
    try:
        _flaky(monkeypatch, errors)
        result = await store.admit(None, None, ["l|a"], [LIMIT], time.monotonic())
        assert result.source == "fallback"
        assert store.stats.outages == 1
        assert store.stats.reconnects == retried
    finally:
        await store.aclose()
