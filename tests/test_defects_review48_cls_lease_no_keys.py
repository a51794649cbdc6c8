"""A lease call whose breaker left before it went out sends nothing (review 48).

`test_redis_cluster.py::test_every_script_call_names_keys_of_one_slot` failed once in a
loaded full run: a sync.lua call with no KEYS. The lease batch's flush was the one script
call with no guard against an empty plan: a breaker refresh joined a batch, a sync's
planning then dropped that breaker as idle before the flush ran, and the flush sent
sync.lua with no keys (a round trip for nothing; on a Redis Cluster, to any node).
"""

from __future__ import annotations

import asyncio

import pytest

from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.tiered import IDLE_INTERVALS, TieredStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

WIDE = LimitSpec("w", 60.0, 6000.0, 1, False)  # 1/min, burst 100
T0 = 1000.0


async def test_a_lease_left_with_nothing_to_ask_makes_no_call(redis_url: str) -> None:
    clock = FakeClock(start=T0)
    config = StateConfig(url="tiered+" + redis_url, sync_interval_ms=100, **PATIENT, **QUIET)
    store = TieredStore(config=config, rng=lambda: 0.5, clock=clock)
    breaker = BreakerConfig(min_calls=1, consecutive_failures=1)
    sent: list[tuple[str, ...]] = []
    call = store.exact.call

    async def counted(script, keys, args):  # type: ignore[no-untyped-def]
        sent.append(tuple(keys))
        return await call(script, keys, args)

    store.exact.call = counted  # type: ignore[method-assign]
    store._last_sync = float("inf")  # no periodic sync but the one this test runs
    try:
        first = await store.admit("route:/t", breaker, ["w|t"], [WIDE], T0)
        assert first.admitted
        assert sent  # the first lease
        before = len(sent)
        # A breaker refresh joins this tick's lease batch (the slice holds units) ...
        lease = asyncio.ensure_future(store._lease("route:/t", [], T0))
        await asyncio.sleep(0)
        assert store._lease_batch is not None
        # ... and a sync's planning, before the batch goes out, drops it as idle.
        idle = T0 + (IDLE_INTERVALS + 1) * store.sync_s
        store._plan_sync(idle, ())
        assert "route:/t" not in store.breakers
        got = await lease
        assert got >= 0.0  # nothing to fetch: not a Redis failure
        assert sent[before:] == [], sent[before:]  # old code: [()], sync.lua with no KEYS
        assert store.exact.stats.errors == 0
    finally:
        await store.aclose()
