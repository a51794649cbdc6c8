"""Review 46 (fin46): a tiered slice replaced because another limit's spec asked for
its key (rev45's risk: "units granted for a slice replaced mid-lease go to the new
slice or are lost").

A slice serves the requests of one bucket (`_same_bucket`: rate and burst). A request
whose limit names the same key at another rate or burst (two `fidelity.limit(...,
name=)` dependencies at different rates, which no policy check catches; two apps on one
store) replaced the slice with a new one: the units the old one held were dropped, never
given back (the fleet's bucket had them taken until it refilled), and a lease out for the
old one landed in the new one, its units counted at the old spec's interval. Two such
limits taking turns replaced it on every request: each leased anew and stranded the rest.

Now a request whose limit finds the key's slice held for another bucket is decided
exactly (as when the slice table is full); the slice stays with its own spec, is spent or
given back as usual, and once idle leaves room for the other. Every unit taken from the
bucket is then admitted or given back: counted against admissions, against the real
redis-server (a rate of one an hour: nothing refills during the test). Fails on the old
code.
"""

from __future__ import annotations

import asyncio

import pytest

from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

HOUR = 3600.0
WIDE = LimitSpec("shared", HOUR, HOUR * 39, 1, False)  # one an hour, burst 40
NARROW = LimitSpec("shared", HOUR, HOUR * 29, 1, False)  # one an hour, burst 30
REQUESTS = 12


async def _taken(redis_url: str, clock: FakeClock, key: str) -> int:
    """Units gone from the bucket (both specs charge an hour a unit): a peek's remaining
    is what one more request would leave (39 on a full bucket of 40)."""
    other = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), clock=clock)
    try:
        result = await other.peek([key], [WIDE], clock.monotonic())
    finally:
        await other.aclose()
    return 39 - result.limits[0].remaining


async def test_limits_taking_turns_on_one_key_strand_no_units(redis_url: str) -> None:
    clock = FakeClock()
    store = TieredStore(
        config=StateConfig(url="tiered+" + redis_url, **PATIENT, **QUIET), clock=clock
    )
    key = "shared|client-1"
    admitted = 0
    try:
        for i in range(REQUESTS):
            spec = WIDE if i % 2 == 0 else NARROW
            result = await store.admit(None, None, [key], [spec], clock.monotonic())
            admitted += result.admitted
            await asyncio.sleep(0)
    finally:
        await store.aclose()  # gives back what the slice still holds
    assert admitted == REQUESTS
    assert await _taken(redis_url, clock, key) == admitted  # before: 22 taken for 12
