"""A fleet mid-rollout (fle40): two processes on one Redis with different rates or bursts
for one limit, as during a rolling restart that changes the policy (there is no hot
reload: docs/operations.md, "Changing the policy"). The key carries no version: both
count on one TAT, in seconds of refill (docs/state.md).

Each "process" is a store of its own (its own client) on one real redis-server; the
limits refill so slowly (one unit per 36 s or more) that real time adds nothing during a
test: every count below is exact.
"""

from __future__ import annotations

import time

import pytest

from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import seeded_random
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def spec(per_hour: int, burst: int) -> LimitSpec:
    interval = 3600.0 / per_hour
    return LimitSpec("quota", interval, burst * interval, 1, False)


def process(url: str, seed: int, tiered: bool = False) -> RedisStore | TieredStore:
    config = StateConfig(url=("tiered+" if tiered else "") + url, **{**PATIENT, **QUIET})
    return (TieredStore if tiered else RedisStore)(config=config, rng=seeded_random(seed))


async def rounds(
    old: RedisStore | TieredStore,
    new: RedisStore | TieredStore,
    old_spec: LimitSpec,
    new_spec: LimitSpec,
    n: int = 4,
) -> tuple[int, int]:
    """n rounds of the old process asking 150 times, then the new one 3 times."""
    admitted_old = admitted_new = 0
    for _ in range(n):
        for _ in range(150):
            result = await old.admit(None, None, ["quota|k"], [old_spec], time.monotonic())
            admitted_old += result.admitted
        for _ in range(3):
            result = await new.admit(None, None, ["quota|k"], [new_spec], time.monotonic())
            admitted_new += result.admitted
    return admitted_old, admitted_new


@pytest.mark.parametrize("tiered", [False, True], ids=["redis", "tiered"])
async def test_a_rate_cut_mid_rollout_admits_at_most_the_larger_burst_in_seconds(
    redis_url: str, tiered: bool
) -> None:
    """10/min cut to 5/min, a burst of 10 both (60 s and 120 s of refill). The key's TAT
    is seconds of refill: the old process fills its 60 s, the new one finds 60 s of its
    120 s free (5 of its units) and fills them, and then neither admits more than the
    refill. Together: at most the larger burst, in seconds, plus what refilled."""
    old_spec = LimitSpec("quota", 6.0, 60.0, 1, False)
    new_spec = LimitSpec("quota", 12.0, 120.0, 1, False)
    old, new = process(redis_url, 1, tiered), process(redis_url, 2, tiered)
    started = time.monotonic()
    try:
        admitted_old, admitted_new = await rounds(old, new, old_spec, new_spec)
    finally:
        await old.aclose()
        await new.aclose()
    elapsed = time.monotonic() - started
    assert admitted_old >= 10
    assert admitted_new >= 1  # (tiered: its first lease may find less than its target)
    # seconds of refill charged <= the larger burst's + the time that passed (+ the
    # interval of a unit that conformed within it)
    assert admitted_old * 6.0 + admitted_new * 12.0 <= 120.0 + elapsed + 12.0


async def test_a_burst_cut_mid_rollout_gives_the_old_processes_no_fresh_bursts(
    redis_url: str,
) -> None:
    """100/hour with a burst of 100 cut to a burst of 10: every refusal of the new process
    (the TAT is up to an hour ahead, past its 360 s + 120 s) rewrote the key to its own
    empty bucket, 360 s ahead, and the old process had 90 units again: 370 admitted in
    4 rounds (measured: 100, 190, 280, 370) where either policy allows 100 at most.
    Fixed by fle41 (a strict xfail until then): the key records the tolerance that wrote
    it (tests/test_defects_review41_fle_rollout.py)."""
    old_spec, new_spec = spec(100, 100), spec(100, 10)
    old, new = process(redis_url, 1), process(redis_url, 2)
    try:
        admitted_old, admitted_new = await rounds(old, new, old_spec, new_spec)
    finally:
        await old.aclose()
        await new.aclose()
    assert admitted_new == 0
    assert admitted_old <= 100
