"""Refunds on shared state: units an admitted request took come back, exactly, in Redis
and in tiered mode (where they go back to the slice they were leased into)."""

from __future__ import annotations

import time

import pytest
import redis as redis_sync

from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import REFUND, RedisStore, load_script
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import seeded_random
from redis_server import PATIENT

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

# 1/min with a burst of 3: nothing refills during a test
SLOW3 = LimitSpec("r", 60.0, 180.0, 1, False)


async def admitted(store: RedisStore | TieredStore, key: str) -> tuple[bool, str]:
    result = await store.admit(None, None, [key], [SLOW3], time.monotonic())
    return result.admitted, result.source


async def test_redis_refund_gives_the_units_back(redis_url: str) -> None:
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT), rng=seeded_random(2))
    try:
        assert [(await admitted(store, "r|a"))[0] for _ in range(4)] == [True, True, True, False]
        await store.refund(["r|a"], [SLOW3], "redis", time.monotonic())
        assert [(await admitted(store, "r|a"))[0] for _ in range(2)] == [True, False]
        # a refund never banks more than a full bucket
        for _ in range(10):
            await store.refund(["r|b"], [SLOW3], "redis", time.monotonic())
        assert [(await admitted(store, "r|b"))[0] for _ in range(4)] == [True, True, True, False]
    finally:
        await store.aclose()


async def test_tiered_refund_returns_units_to_the_slice(redis_url: str) -> None:
    burst40 = LimitSpec("r", 60.0, 2400.0, 1, False)  # leases slices of 40 // 4 = 10 units
    config = StateConfig(url="tiered+" + redis_url, sync_interval_ms=60_000, **PATIENT)
    store = TieredStore(config=config, rng=seeded_random(2))
    try:
        first = await store.admit(None, None, ["r|t"], [burst40], time.monotonic())
        assert (first.admitted, first.source) == (True, "redis")  # waited for a lease
        held = store.slices["r|t"].tokens
        second = await store.admit(None, None, ["r|t"], [burst40], time.monotonic())
        assert (second.admitted, second.source) == (True, "cache")
        assert store.slices["r|t"].tokens == held - 1
        await store.refund(["r|t"], [burst40], "cache", time.monotonic())
        assert store.slices["r|t"].tokens == held
    finally:
        await store.aclose()


async def test_redis_keeps_the_refunded_seconds_beside_the_tat(redis_url: str) -> None:
    """A key that never had a refund holds the plain TAT and reports it; after a
    refund it holds "tat refunded", lives until their sum is past, and admissions
    report that sum (the marker a later refund needs, see decide.gcra.refund)."""
    store = RedisStore(config=StateConfig(url=redis_url, **PATIENT), rng=seeded_random(2))
    client = redis_sync.Redis.from_url(redis_url)
    name = store.key("rl", "r|v")
    try:
        first = await store.admit(None, None, ["r|v"], [SLOW3], time.monotonic())
        second = await store.admit(None, None, ["r|v"], [SLOW3], time.monotonic())
        plain = client.get(name)
        assert b" " not in plain
        assert float(plain) == second.limits[0].tat == first.limits[0].tat + 60.0
        await store.refund(["r|v"], [SLOW3], "redis", time.monotonic(), [first.limits[0].tat])
        tat, refunded = (float(x) for x in client.get(name).split())
        assert 59.0 < refunded <= 60.0  # the first unit was out for about a minute
        assert tat + refunded == pytest.approx(second.limits[0].tat)
        assert client.pttl(name) > (tat - time.time()) * 1000  # until tat + refunded
        third = await store.admit(None, None, ["r|v"], [SLOW3], time.monotonic())
        stored = float(client.get(name).split()[0])
        assert third.limits[0].tat == pytest.approx(stored + refunded)
        # the second unit's refund counts the first refund: one minute back, not two
        await store.refund(["r|v"], [SLOW3], "redis", time.monotonic(), [second.limits[0].tat])
        left, spent = (float(x) for x in client.get(name).split())
        assert left == pytest.approx(stored - 60.0 + (60.0 - refunded), abs=1.0)
        assert spent + left == pytest.approx(stored + refunded)
    finally:
        client.close()
        await store.aclose()


def test_refund_script_runs_on_the_server_clock() -> None:
    assert load_script("refund").sha == REFUND.sha
    assert "server_now()" in REFUND.source


@pytest.mark.parametrize(
    ("tiered", "charge", "after"),
    [
        (False, "served", 200),
        (False, "always", 429),
        (True, "served", 200),
        (True, "always", 429),
    ],
    ids=["redis-served", "redis-always", "tiered-served", "tiered-always"],
)
async def test_charge_served_refunds_a_control_refusal_on_shared_state(
    redis_url: str, tiered: bool, charge: str, after: int
) -> None:
    """Issue 13.6 through the middleware on Redis and tiered state: a request the
    middleware answered 503 for an escaped CircuitOpen costs no quota with
    `charge = "served"`, and costs it with `charge = "always"`."""
    from fidelity_mw import CircuitOpen, FidelityMiddleware, Policy, RateLimit

    url = ("tiered+" if tiered else "") + redis_url
    limit = RateLimit(name=f"c-{charge}-{tiered}", rate="1/min", burst=1, charge=charge)  # type: ignore[arg-type]
    policy = Policy(
        state=StateConfig(url=url, sync_interval_ms=60_000, **PATIENT),
        rate_limits=(limit,),
        breaker=None,
    )
    refuse = True

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        if refuse:
            raise CircuitOpen("open", host="payments.internal", retry_after_s=1.0)
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    mw = FidelityMiddleware(app, policy=policy, telemetry=False)

    async def status() -> int:
        sent: list[dict] = []  # type: ignore[type-arg]

        async def receive() -> dict:  # type: ignore[type-arg]
            return {"type": "http.request", "body": b""}

        async def send(message: dict) -> None:  # type: ignore[type-arg]
            sent.append(message)

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": [],
            "client": ("192.0.2.7", 1),
        }
        await mw(scope, receive, send)
        return int(sent[0]["status"])

    try:
        assert await status() == 503
        refuse = False
        assert await status() == after
    finally:
        await mw.engine.aclose()
