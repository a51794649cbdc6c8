"""Retry credit in Redis (lib.lua, refund.lua, sync.lua): stored beside the TAT only while
there is some, the key kept at least until it expires, untouched by leases, and nothing
stored differently for keys that never had a refund. On the pinned test clock, where each
key's TTL is the one its write logged (LONG_TTL): the keys themselves live an hour longer."""

from __future__ import annotations

import pytest
import redis as redis_sync

from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_clock import RedisClock
from redis_server import PATIENT

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

# 5/s, burst 5, credit for 10 s
SPEC = LimitSpec("c", 0.2, 1.0, 1, False, 10.0)
T0 = 1_000.0


def fields(client: redis_sync.Redis, name: str) -> list[float]:
    return [float(x) for x in client.get(name).split()]


async def test_credit_lives_in_the_tat_key_until_it_expires(
    redis_url: str, redis_clock: RedisClock
) -> None:
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT), rng=seeded_random(2))
    client = redis_sync.Redis.from_url(redis_url)
    name = store.key("rl", "c|k")
    try:
        burst = [await store.admit(None, None, ["c|k"], [SPEC], T0) for _ in range(5)]
        assert len(fields(client, name)) == 1  # no refund yet: the plain TAT
        redis_clock.set(T0 + 1.0)  # the units refilled: the refunds give nothing back
        marks = [r.limits[0].tat for r in burst[:4]]
        await store.refund(["c|k"] * 4, [SPEC] * 4, "redis", T0 + 1.0, marks)
        _tat, refunded, credit, expires = fields(client, name)
        assert (refunded, credit, expires) == (0.0, pytest.approx(0.8), T0 + 11.0)
        # the key outlives the credit (10 s), not the bucket (1 s)
        assert redis_clock.logged_ttl_ms(name) == 10_000
        got = [await store.admit(None, None, ["c|k"], [SPEC], T0 + 1.0) for _ in range(10)]
        verdicts = [r.limits[0] for r in got]
        assert [v.allowed for v in verdicts] == [True] * 9 + [False]
        assert [v.credit for v in verdicts] == [False] * 5 + [True] * 4 + [False]
        assert verdicts[5].tat == T0 + 1.0  # a full bucket's marker: refunds give nothing
        assert len(fields(client, name)) == 1  # spent: the plain TAT again
        assert fields(client, name)[0] == pytest.approx(T0 + 2.0)  # GCRA's five only
    finally:
        client.close()
        await store.aclose()


async def test_without_refunds_redis_stores_what_it_stored_before(
    redis_url: str, redis_clock: RedisClock
) -> None:
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT), rng=seeded_random(2))
    client = redis_sync.Redis.from_url(redis_url)
    off = SPEC._replace(credit_s=0.0)
    try:
        for step in range(12):
            now = T0 + step * 0.13
            redis_clock.set(now)
            for _ in range(step % 4):
                on_result = await store.admit(None, None, ["c|on"], [SPEC], now)
                off_result = await store.admit(None, None, ["c|off"], [off], now)
                assert on_result.limits == off_result.limits
            on, off_ = store.key("rl", "c|on"), store.key("rl", "c|off")
            assert client.get(on) == client.get(off_)
            # (the TTLs as written: the keys' PTTLs run on in real time between the writes)
            assert redis_clock.logged_ttl_ms(on) == redis_clock.logged_ttl_ms(off_)
    finally:
        client.close()
        await store.aclose()


async def test_a_lease_keeps_the_credit(redis_url: str, redis_clock: RedisClock) -> None:
    """Tiered: credit earned by an exact refund stays in the key across sync.lua leases."""
    config = StateConfig(url="tiered+" + redis_url, sync_interval_ms=60_000, **PATIENT)
    clock = FakeClock(start=T0)
    store = TieredStore(config=config, rng=seeded_random(2), clock=clock)
    client = redis_sync.Redis.from_url(redis_url)
    name = store.exact.key("rl", "c|t")
    try:
        first = await store.exact.admit(None, None, ["c|t"], [SPEC], T0)
        redis_clock.set(T0 + 1.0)
        clock.advance(1.0)
        await store.refund(["c|t"], [SPEC], "redis", T0 + 1.0, [first.limits[0].tat])
        before = fields(client, name)
        assert before[2:] == [pytest.approx(0.2), T0 + 11.0]
        leased = await store.admit(None, None, ["c|t"], [SPEC], T0 + 1.0)
        assert leased.admitted
        after = fields(client, name)
        assert after[0] > before[0]  # a lease took units from the bucket ...
        assert after[2:] == before[2:]  # ... and left the credit as it was
    finally:
        client.close()
        await store.aclose()


async def test_a_refund_without_credit_still_goes_back_to_the_slice(redis_url: str) -> None:
    """The middleware refunds another limit's 429 with `credit_s` 0 (no retry credit):
    tiered still recognises the slice the unit came from."""
    burst40 = LimitSpec("c", 60.0, 2400.0, 1, False, 10.0)  # slices of 10 units
    config = StateConfig(url="tiered+" + redis_url, sync_interval_ms=60_000, **PATIENT)
    store = TieredStore(config=config, rng=seeded_random(2))
    try:
        await store.admit(None, None, ["c|s"], [burst40], T0)  # waits for a lease
        second = await store.admit(None, None, ["c|s"], [burst40], T0)
        assert second.source == "cache"
        held = store.slices["c|s"].tokens
        await store.refund(["c|s"], [burst40._replace(credit_s=0.0)], "cache", T0)
        assert store.slices["c|s"].tokens == held + 1
    finally:
        await store.aclose()
