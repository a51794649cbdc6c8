"""Review 17: the tiered store with costs that vary per request (`cost=fn`).

The tiered store was written for a cost fixed per limit: a lease took at least the
slice's spec cost (the largest cost the key had seen), whatever the waiting request
cost and whatever the slice already held; a refusal's retry-after was counted for that
largest cost too. Each case is checked against the memory and Redis stores' answers on
the same sequence: one instance, so tiered must admit what they admit once its slice
and the bucket together hold the request's cost, and its retry-after must stay near
theirs (real redis-server, scripts on a pinned copy of the fake clock).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import InboundResult, LimitSpec, StateStore
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_clock import RedisClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def spec(rate: float, burst: int, cost: int) -> LimitSpec:
    return LimitSpec("l", 1.0 / rate, burst / rate, cost, False)


class Stores:
    """Memory, Redis and tiered on one fake clock (Redis's pinned to it)."""

    def __init__(self, url: str, redis_clock: RedisClock) -> None:
        self.clock = FakeClock()
        self.redis_clock = redis_clock
        self.base = redis_clock.now - self.clock.monotonic()
        config = StateConfig(url=url, **PATIENT, **QUIET)  # type: ignore[arg-type]
        tiered = StateConfig(url="tiered+" + url, **PATIENT, **QUIET)  # type: ignore[arg-type]
        self.all: dict[str, StateStore] = {
            "memory": MemoryStore(),
            "redis": RedisStore(config=config, rng=seeded_random(1), clock=self.clock),
            "tiered": TieredStore(config=tiered, rng=seeded_random(1), clock=self.clock),
        }

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.redis_clock.set(self.base + self.clock.monotonic())

    async def admit(self, key: str, limit: LimitSpec) -> dict[str, InboundResult]:
        now = self.clock.monotonic()
        # each store on its own key: one Redis server under the exact and tiered stores
        return {
            name: await store.admit(None, None, [f"{name}|{key}"], [limit], now)
            for name, store in self.all.items()
        }

    async def refund(self, key: str, limit: LimitSpec, got: dict[str, InboundResult]) -> None:
        now = self.clock.monotonic()
        for name, store in self.all.items():
            result = got[name]
            tats: Sequence[float] = [v.tat for v in result.limits]
            await store.refund([f"{name}|{key}"], [limit], result.source, now, tats)

    async def close(self) -> None:
        for store in self.all.values():
            await store.aclose()


def admitted(got: dict[str, InboundResult]) -> dict[str, bool]:
    return {name: result.admitted for name, result in got.items()}


async def test_a_costlier_request_is_served_by_the_slice_and_the_bucket_together(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """Burst 10: a request of 4, one of 3 given back (a redirect), then one of 6: the
    slice holds 4 and the bucket 2. The lease needs 2 more units, not 6: before, it
    asked all-or-nothing for the slice's largest cost, got nothing and refused."""
    stores = Stores(redis_url, redis_clock)
    rate, burst = 0.01, 10  # no refill within the test
    try:
        assert admitted(await stores.admit("k", spec(rate, burst, 4))) == dict.fromkeys(
            stores.all, True
        )
        three = spec(rate, burst, 3)
        got = await stores.admit("k", three)
        assert admitted(got) == dict.fromkeys(stores.all, True)
        await stores.refund("k", three, got)
        stores.advance(0.001)
        got = await stores.admit("k", spec(rate, burst, 6))
        assert admitted(got) == dict.fromkeys(stores.all, True), got["tiered"]
        # and the bucket is empty now everywhere
        stores.advance(0.001)
        assert admitted(await stores.admit("k", spec(rate, burst, 1))) == dict.fromkeys(
            stores.all, False
        )
    finally:
        await stores.close()


async def test_the_retry_after_of_a_costed_refusal_is_near_the_exact_one(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """Burst 100 at 10/s: a batch of 90, then the bucket emptied by 1-unit requests;
    the next 1-unit refusal's retry-after is about one interval (0.1 s) in the exact
    stores. Tiered said ~9 s: the time for 90 units (the largest cost seen)."""
    stores = Stores(redis_url, redis_clock)
    one = spec(10.0, 100, 1)
    try:
        assert all(admitted(await stores.admit("k", spec(10.0, 100, 90))).values())
        refused: dict[str, InboundResult] = {}
        for _ in range(40):
            stores.advance(0.001)
            got = await stores.admit("k", one)
            for name, result in got.items():
                if not result.admitted:
                    refused.setdefault(name, result)
            if len(refused) == len(stores.all):
                break
        assert set(refused) == set(stores.all)
        exact = refused["redis"].limits[0].retry_after_s
        assert exact == pytest.approx(refused["memory"].limits[0].retry_after_s, abs=0.01)
        assert exact <= 0.1 + 1e-6
        tiered = refused["tiered"].limits[0].retry_after_s
        # within one sync interval (100 ms by default) of the exact answer
        assert tiered <= exact + 0.1 + 1e-6, tiered
        # and the instance keeps it: a client asking every 10 ms is admitted again
        # within one more sync interval (the periodic sync leases once the bucket can
        # serve the request; the refusal's cached block does not hold it back)
        store = stores.all["tiered"]
        deadline = stores.clock.monotonic() + tiered + 0.1
        served = False
        while not served and stores.clock.monotonic() < deadline:
            stores.advance(0.01)
            now = stores.clock.monotonic()
            served = (await store.admit(None, None, ["tiered|k"], [one], now)).admitted
            for _ in range(3):  # the background sync gets its turn, as on a server
                await asyncio.sleep(0)
        assert served
    finally:
        await stores.close()
