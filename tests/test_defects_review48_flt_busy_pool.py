"""Fleet announcements of a process whose connections are always busy (flt48).

An announcement was skipped whenever every one of the store's `pool_size` connections
was taken or a call waited for one. A process whose requests keep its pool saturated
(more calls at once than connections, each one finding others waiting) skipped every
announcement: 0 of them in 4 s with 50 concurrent requests on `pool_size = 2` (script
calls not coalesced). Its fleet size then went stale after `fleet_share_max_age_s`, so
in an outage it enforced the whole of each limit, while the others dropped it from the
fleet and split the limit among themselves. Now an announcement skipped for a busy pool
makes the next one wait its turn for a connection (one script call among the requests'
calls, at most one a second)."""

from __future__ import annotations

import asyncio

import pytest

from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_server import PATIENT

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

LIMIT = LimitSpec("l", 0.001, 1.0, 1, False)
WORKERS = 12
SECONDS = 10.0
STEP_S = 0.5
PER_STEP = 30  # admissions between two steps of the fake clock


async def test_a_saturated_pool_still_announces(redis_url: str) -> None:
    clock = FakeClock()
    config = StateConfig(
        url=redis_url,
        key_prefix="flt48busy",
        pool_size=2,
        fleet_share_max_age_s=60.0,
        **PATIENT,
    )
    store = RedisStore(config=config, rng=seeded_random(48), clock=clock)
    store.coalesce = False  # one script call per admission: the pool stays busy
    done = 0

    async def worker(i: int) -> None:
        nonlocal done
        while clock.monotonic() - start < SECONDS:
            result = await store.admit(None, None, [f"l|{i}"], [LIMIT], clock.monotonic())
            assert result.source == "redis"
            done += 1
            if done % PER_STEP == 0:
                clock.advance(STEP_S)

    start = clock.monotonic()
    try:
        await asyncio.gather(*(worker(i) for i in range(WORKERS)))
        if store.fleet.task is not None:
            await store.fleet.task
        announces, failed = store.fleet.announces, store.fleet.failed
        share = store.fleet.share(clock.monotonic())
    finally:
        await store.aclose()
    print("requests", done, "announces", announces, "skipped", failed)
    # old code: 0 announces (every one of about 10 skipped), the size never read
    assert announces >= 3
    assert share.age_s is not None
    assert share.age_s <= 3.0
