"""A fleet degraded before an outage (flt48).

Two members of four lose Redis first (their calls time out: they decide alone, on the
fleet size and weight they read before, a quarter each). fleet.lua dropped them after the
member ttl (5 s) of silence, so the two that still reached Redis read a fleet of 2 and a
load fraction of a half: when Redis went away for them too, each enforced half of every
limit, and the fleet admitted 1.5 limits. Now a silent member counts, with the load it
reported last, for as long as it may trust its own reading (`fleet_share_max_age_s`, at
most 60 s), and a store that closes leaves at once. On the model of fleet.lua
(`FleetTable`) and a fake clock; fleet.lua against the model on a real Redis."""

from __future__ import annotations

import random

import pytest
import redis

from fidelity_mw.decide.fleet import FleetTable
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.fleet import ANNOUNCE_S, FLEET, MEMBER_HOLD_MAX_S, MEMBER_TTL_S, Fleet
from fidelity_mw.state.local import LocalState
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_clock import RedisClock, clocked
from redis_server import PATIENT
from test_defects_review24_fleet import Table, enforced, second

pytestmark = pytest.mark.anyio

RATE = 100.0
BURST = 20
SPEC = LimitSpec("l", 1.0 / RATE, BURST / RATE, 1, False)
LOADS = [100, 100, 100, 100]
OUTAGE_S = 10


async def degraded_fleet(clock: FakeClock, table: Table, silent_s: float) -> list[Fleet]:
    """Four members in step, then the second and third silent for `silent_s` (their
    calls to Redis time out) while the first and fourth announce as before."""
    fleets = [Fleet("f", 60.0, 0.2, 30.0) for _ in range(4)]
    for _ in range(4):
        await second(fleets, table, LOADS)
    assert all(f.size == 4 for f in fleets)
    reaching = [fleets[0], fleets[3]]
    for _ in range(int(silent_s)):
        await second(reaching, table, [100, 100])
    return fleets


def admitted_in_outage(fleets: list[Fleet], now: float) -> tuple[int, list[float]]:
    """Every member falls back at `now` and is offered twice its part of the limit for
    OUTAGE_S seconds: the requests the fleet admits, and each member's part."""
    parts = [enforced(f.share(now)) for f in fleets]
    admitted = 0
    offered = 2 * RATE / len(fleets)
    for fleet in fleets:
        local = LocalState()
        keys, specs = fleet.for_share(["k"], [SPEC], fleet.share(now))
        for i in range(int(offered * OUTAGE_S)):
            if local.admit_now(None, None, keys, specs, now + i / offered).admitted:
                admitted += 1
    return admitted, parts


async def test_a_fleet_degraded_before_an_outage_is_not_read_smaller() -> None:
    clock = FakeClock()
    table = Table(clock)
    fleets = await degraded_fleet(clock, table, 2 * MEMBER_TTL_S)
    now = clock.monotonic()
    admitted, parts = admitted_in_outage(fleets, now)
    bound = RATE * OUTAGE_S + BURST
    print("parts", parts, "admitted", admitted, "of a limit of", bound)
    # old code: [0.5, 0.25, 0.25, 0.5], 1508 admitted (1.48 limits); now 1005
    assert [f.share(now).size for f in fleets] == [4, 4, 4, 4]  # old code: 2 for the first
    assert sum(parts) == pytest.approx(1.0, rel=0.05)
    assert admitted <= 1.05 * bound
    assert admitted >= 0.9 * RATE * OUTAGE_S  # (the fleet still admits about one limit)


async def test_a_member_silent_past_the_hold_leaves_the_fleet() -> None:
    """A member that died without closing counts until the hold ends (the others' shares
    are smaller meanwhile: the fleet admits less, never more), then leaves."""
    clock = FakeClock()
    table = Table(clock)
    fleets = await degraded_fleet(clock, table, MEMBER_HOLD_MAX_S - 2 * ANNOUNCE_S)
    assert fleets[0].share(clock.monotonic()).size == 4
    for _ in range(4):
        await second([fleets[0], fleets[3]], table, [100, 100])
    share = fleets[0].share(clock.monotonic())
    assert share.size == 2
    assert enforced(share) + enforced(fleets[3].share(clock.monotonic())) == pytest.approx(
        1.0, rel=0.05
    )


async def test_a_member_that_closed_leaves_at_once() -> None:
    clock = FakeClock()
    table = Table(clock)
    fleets = [Fleet("f", 60.0, 0.2, 30.0) for _ in range(4)]
    for _ in range(4):
        await second(fleets, table, LOADS)
    table.table.leave(fleets[1].id)
    await second([fleets[0]], table, [100])
    assert fleets[0].share(clock.monotonic()).size == 3


async def test_the_hold_follows_the_size_age_bound() -> None:
    """A member trusts its own reading for `fleet_share_max_age_s`: the others count it
    that long after it went silent, within the member ttl and MEMBER_HOLD_MAX_S."""
    assert Fleet("f", 60.0).hold_s == 60.0
    assert Fleet("f", 20.0).hold_s == 20.0
    assert Fleet("f", 1.0).hold_s == MEMBER_TTL_S
    assert Fleet("f", 3_600.0).hold_s == MEMBER_HOLD_MAX_S


@pytest.mark.redis
def test_fleet_lua_mirrors_the_table_with_a_hold(redis_url: str, redis_clock: RedisClock) -> None:
    """Random announcements and leaves of five members, with a hold, on the pinned clock:
    fleet.lua answers what FleetTable answers, and holds the same members and loads."""
    script = clocked(FLEET)
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
    keys = ("{h}:fleet", "{h}:fleet:load")
    rng = random.Random(4848)
    try:
        for run in range(6):
            client.delete(*keys)
            table = FleetTable()
            now = 1_000.0 + 1_000.0 * run
            hold = [0.0, 12.0, 30.0, 60.0, 3.0, 20.0][run]
            for _ in range(150):
                now += rng.choice([0.0, 0.05, 0.3, 1.0, 2.5, 6.0, 15.0 * (rng.random() < 0.1)])
                redis_clock.set(now)
                member = rng.choice("abcde")
                if rng.random() < 0.05:
                    table.leave(member)
                    client.zrem(keys[0], member)
                    client.hdel(keys[1], member)
                    continue
                count = rng.choice([-1, 0, 1, 3, 40, 250]) if run % 2 else rng.randint(0, 50)
                size, fraction = table.announce(member, count, now, MEMBER_TTL_S, hold)
                reply = client.eval(script.source, 2, *keys, member, MEMBER_TTL_S, count, hold)
                assert int(reply[0]) == size
                got = float(reply[1])
                if fraction is None:
                    assert got == -1.0
                else:
                    assert got == pytest.approx(fraction, rel=1e-12)
                stored = {
                    k.decode(): tuple(float(x) for x in v.split())
                    for k, v in client.hgetall(keys[1]).items()
                }
                assert stored.keys() == table.loads.keys()
                for m, values in stored.items():
                    assert values == pytest.approx(tuple(table.loads[m]), rel=1e-12)
                assert {m.decode() for m in client.zrange(keys[0], 0, -1)} == set(table.members)
            expected_ms = 1000 * max(10 * MEMBER_TTL_S, hold)
            assert 0 < client.pttl(keys[0]) <= expected_ms
    finally:
        client.close()


@pytest.mark.redis
async def test_a_store_that_closes_leaves_the_fleet(redis_url: str) -> None:
    """`aclose` takes the process out of `{prefix}:fleet` and its load: a rolling restart
    whose processes close is not read as a fleet twice its size for the hold."""
    prefix = "flt48close"
    stores = [
        RedisStore(
            config=StateConfig(url=redis_url, key_prefix=prefix, **PATIENT),
            rng=seeded_random(i),
        )
        for i in range(2)
    ]
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    fleet_key = f"{{{prefix}}}:fleet"
    try:
        client.delete(fleet_key, fleet_key + ":load")
        for i, store in enumerate(stores):
            result = await store.admit(None, None, [f"l|{i}"], [SPEC], 0.0)
            assert result.source == "redis"
            assert store.fleet.task is not None
            await store.fleet.task
            assert store.fleet.announces == 1
        ids = {m.decode() for m in client.zrange(fleet_key, 0, -1)}
        assert ids == {s.fleet.id for s in stores}
        await stores[0].aclose()
        assert {m.decode() for m in client.zrange(fleet_key, 0, -1)} == {stores[1].fleet.id}
        assert stores[0].fleet.id.encode() not in client.hkeys(fleet_key + ":load")
    finally:
        for store in stores:
            await store.aclose()
        client.delete(fleet_key, fleet_key + ":load")
        client.close()


async def test_members_that_call_redis_less_often_than_the_ttl_all_count() -> None:
    """A tiered store calls Redis at its syncs (and leases): with `sync_interval_ms =
    8000` its members announce every 8 s, and a member ttl of 5 s dropped each one between
    two of its announcements. Four in step, 2 s apart: each read a fleet of 3, and in an
    outage the fleet enforced 4 x 1/3 of each limit (old code); now all four count."""
    clock = FakeClock()
    table = Table(clock)
    fleets = [Fleet("f", 60.0) for _ in range(4)]
    period = 8.0
    for _ in range(5):
        for fleet in fleets:
            fleet.tick(clock.monotonic(), table.runner(fleet.id), clock.monotonic)
            assert fleet.task is not None
            await fleet.task
            clock.advance(period / len(fleets))
    now = clock.monotonic()
    sizes = [f.share(now).size for f in fleets]
    print("sizes read", sizes)
    assert sizes == [4, 4, 4, 4]  # old code: [3, 3, 3, 3]
    assert sum(enforced(f.share(now)) for f in fleets) == pytest.approx(1.0)
