"""The tiered store against the token-bucket model: it may admit less than the model
only while its slices are being leased, never refuse a request the fleet's bucket
could serve many times over (a real redis-server, started by the suite).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fidelity_mw.clock import SYSTEM_CLOCK
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import seeded_random

pytestmark = pytest.mark.redis

GENEROUS = LimitSpec("ip", 1 / 5000, 1.0, 1, False)  # 5000/s, burst 5000


async def _admit_all(redis_url: str, concurrent: int) -> list[bool]:
    config = StateConfig(url="tiered+" + redis_url, timeout_ms=500, connect_timeout_ms=500)
    store = TieredStore(config=config, rng=seeded_random(1), clock=SYSTEM_CLOCK)
    try:
        results = await asyncio.gather(
            *(
                store.admit(None, None, [f"ip|cold-{concurrent}"], [GENEROUS], time.monotonic())
                for _ in range(concurrent)
            )
        )
    finally:
        await store.aclose()
    return [r.admitted for r in results]


@pytest.mark.parametrize("concurrent", [1, 2])
def test_a_few_requests_on_a_cold_key_are_admitted(redis_url: str, concurrent: int) -> None:
    assert all(asyncio.run(_admit_all(redis_url, concurrent)))


@pytest.mark.parametrize("concurrent", [10, 50])
def test_concurrent_requests_on_a_cold_key_are_not_refused(redis_url: str, concurrent: int) -> None:
    admitted = asyncio.run(_admit_all(redis_url, concurrent))
    assert all(admitted), f"{admitted.count(False)} of {concurrent} refused"
