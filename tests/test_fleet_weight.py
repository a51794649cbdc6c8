"""The fleet share weighted by each member's load (decide/fleet.py, state/lua/fleet.lua).

While Redis is away each member enforces a weight of each limit: `even_ratio` / N
plus (1 - `even_ratio`) x its fraction of the fleet's load, read with the fleet size.
The arithmetic and the load table on explicit times; the table against fleet.lua on a
real redis-server (pinned clock); the stores on a FakeClock against a real Redis that
the tests kill. The 4-process runs are in tests/test_redis_fleet_share.py.
"""

from __future__ import annotations

import math
import random

import pytest
import redis

from fidelity_mw.decide.fleet import (
    LOAD_LARGE_FLEET,
    LOAD_MAX_MEMBERS,
    LOAD_STALE,
    LOAD_UNREPORTED,
    WEIGHT_STEPS,
    FleetShare,
    FleetTable,
    MemberLoad,
    fleet_share,
    load_weight,
    quantize_weight,
    share_spec,
    weight_tag,
    weighted_spec,
)
from fidelity_mw.errors import PolicyError
from fidelity_mw.inbound.admission import fleet_details
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.fleet import ANNOUNCE_S, FLEET, MEMBER_TTL_S, Fleet
from fidelity_mw.state.local import LocalState
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_clock import RedisClock, clocked
from redis_server import PATIENT, RedisServer

RATE = 100.0
BURST = 20
SPEC = LimitSpec("l", 1.0 / RATE, BURST / RATE, 1, False)
SLOW = LimitSpec("s", 60.0, 60.0 * BURST, 1, False)  # no refill within a test
STEP = 2.0 ** (1.0 / WEIGHT_STEPS)  # one step of the weight grid


# ---------------------------------------------------------------- the weight


def test_weights_of_all_members_sum_to_one() -> None:
    rng = random.Random(19)
    for _ in range(200):
        n = rng.randint(2, 12)
        raw = [rng.expovariate(1.0) * (rng.random() < 0.8) for _ in range(n)]
        raw[0] += 0.01  # some load somewhere
        fractions = [r / sum(raw) for r in raw]
        even = rng.choice([0.01, 0.2, 0.5, 1.0])
        weights = [load_weight(n, f, even) for f in fractions]
        assert sum(weights) == pytest.approx(1.0)
        # quantized, each is within one step of its weight: the sum within one step of 1
        quantized = [quantize_weight(w) for w in weights]
        assert 1.0 / STEP <= sum(quantized) <= STEP
        assert all(0.0 < q <= 1.0 for q in quantized)


def test_an_idle_member_keeps_its_floor() -> None:
    assert load_weight(4, 0.0, 0.2) == pytest.approx(0.05)
    assert load_weight(4, 1.0, 0.2) == pytest.approx(0.85)
    assert load_weight(4, 0.25, 0.2) == pytest.approx(0.25)  # an even load: the even share
    assert load_weight(1, 0.0, 0.2) == 1.0  # alone: the whole limit
    assert load_weight(3, 0.7, 1.0) == pytest.approx(1.0 / 3)  # 1: the even share
    # the floor's share of a limit still admits requests
    floor = weighted_spec(SPEC, quantize_weight(load_weight(4, 0.0, 0.2)))
    table = LocalState()
    admitted = sum(table.admit_now(None, None, ["k"], [floor], 0.0).admitted for _ in range(5))
    assert admitted == 1  # burst 20 x 0.05


def test_weighted_spec_scales_rate_and_burst() -> None:
    w = quantize_weight(0.5)
    half = weighted_spec(SPEC, w)
    assert half.interval_s == pytest.approx(2.0 / RATE)
    assert half.tolerance_s / half.interval_s == pytest.approx(BURST / 2)
    assert weighted_spec(SPEC, 1.0) == SPEC
    # never a burst below one request's cost
    tiny = weighted_spec(LimitSpec("t", 0.1, 0.2, 2, False), 0.1)
    assert tiny.tolerance_s / tiny.interval_s == pytest.approx(2.0)
    # at a weight of 1/N it is the even share
    even = share_spec(SPEC, 4)
    quarter = weighted_spec(SPEC, 0.25)
    assert quarter.interval_s == pytest.approx(even.interval_s)
    assert quarter.tolerance_s == pytest.approx(even.tolerance_s)


def test_quantized_weights_hold_while_the_load_wavers() -> None:
    assert quantize_weight(0.25) == 0.25  # a point of the grid
    assert quantize_weight(1.3) == 1.0
    held = quantize_weight(0.8)
    assert abs(math.log2(held / 0.8)) * WEIGHT_STEPS <= 0.5
    # within a step of the held weight it stays, so its local buckets stay
    assert quantize_weight(held * STEP**0.9, held) == held
    assert quantize_weight(held / STEP**0.9, held) == held
    assert quantize_weight(held * STEP**1.6, held) == pytest.approx(held * STEP**2)
    assert quantize_weight(held / STEP**1.4, held) == pytest.approx(held / STEP)
    # each grid point names buckets of its own
    grid = {quantize_weight(2.0 ** (-k / WEIGHT_STEPS)) for k in range(0, 200)}
    assert len({weight_tag(w) for w in grid}) == len(grid) == 200


def test_stale_or_unknown_load_gives_the_even_share() -> None:
    known = fleet_share(
        4, 100.0, 110.0, 60.0, weighted=True, weight=0.8, load=0.9, load_max_age_s=30.0
    )
    assert known == FleetShare(4, 10.0, "", 0.8, 0.9)
    stale = fleet_share(
        4, 100.0, 130.5, 60.0, weighted=True, weight=0.8, load=0.9, load_max_age_s=30.0
    )
    assert stale == FleetShare(4, 30.5, "", None, None, LOAD_STALE)
    unknown = fleet_share(4, 100.0, 110.0, 60.0, weighted=True, load_max_age_s=30.0)
    assert unknown == FleetShare(4, 10.0, "", None, None, LOAD_UNREPORTED)
    never = fleet_share(
        4, 100.0, 100.0, 60.0, weighted=True, weight=0.8, load=0.9, load_max_age_s=0
    )
    assert never.load_why == LOAD_STALE
    # the size's own bound still comes first: the whole limit
    assert fleet_share(4, 100.0, 161.0, 60.0, weighted=True, weight=0.8, load=0.9).size is None
    # weighting off: today's even share, nothing more to say
    assert fleet_share(4, 100.0, 110.0, 60.0, weight=0.8, load=0.9) == FleetShare(4, 10.0)


def test_decision_records_name_the_weight() -> None:
    assert fleet_details(FleetShare(4, 1.23456, "", 0.8409, 0.93712)) == {
        "fleet_size": 4,
        "fleet_size_age_s": 1.235,
        "fleet_weight": 0.8409,
        "fleet_load_fraction": 0.937,
    }
    assert fleet_details(FleetShare(4, 40.0, "", None, None, LOAD_STALE)) == {
        "fleet_size": 4,
        "fleet_size_age_s": 40.0,
        "fleet_weight": 0.25,
        "fleet_load": "unknown",
        "fleet_load_why": "stale",
    }


def test_policy_fields_are_validated() -> None:
    assert StateConfig().fleet_share_even_ratio == 0.2
    assert StateConfig().fleet_share_load_max_age_s == 30.0
    for ratio in (0.0, 1.5, float("nan")):
        with pytest.raises(PolicyError):
            StateConfig(fleet_share_even_ratio=ratio)
    with pytest.raises(PolicyError):
        StateConfig(fleet_share_load_max_age_s=-1.0)


def test_a_busy_member_refuses_far_less_with_the_weighted_share() -> None:
    """Three members, one given 97 % of 2x the limit (a keep-alive skew) for 10 s of fake
    time: with the even share it enforces a third of the limit and refuses most of its
    traffic the fleet limit would admit; weighted by load it enforces most of the limit.
    Both admit at most about one limit together."""
    weights = [quantize_weight(load_weight(3, f, 0.2)) for f in (0.97, 0.01, 0.02)]

    def run(specs: list[LimitSpec]) -> tuple[list[int], list[int]]:
        members = [LocalState() for _ in range(3)]
        admitted, refused = [0, 0, 0], [0, 0, 0]
        for i in range(int(2 * RATE * 10)):
            now = i / (2 * RATE)
            m = 0 if i % 100 < 97 else 1 + i % 2
            if members[m].admit_now(None, None, ["k"], [specs[m]], now).admitted:
                admitted[m] += 1
            else:
                refused[m] += 1
        return admitted, refused

    even_admitted, even_refused = run([share_spec(SPEC, 3)] * 3)
    load_admitted, load_refused = run([weighted_spec(SPEC, w) for w in weights])
    whole = LocalState()  # one bucket the whole fleet shares: what Redis would admit
    exact = sum(
        whole.admit_now(None, None, ["k"], [SPEC], i / (2 * RATE)).admitted
        for i in range(int(2 * RATE * 10))
    )
    bound = RATE * 10 + BURST
    assert exact <= bound
    assert sum(load_admitted) <= 1.05 * bound
    # about its limit: the busy member's weight is 0.2 / 3 + 0.8 x 0.97 = 0.84 of it
    assert sum(load_admitted) > 0.85 * RATE * 10
    assert sum(even_admitted) < 0.5 * RATE * 10  # the even share: about a third of it
    # requests refused that the fleet-wide limit would have admitted: 4x fewer
    assert exact - sum(load_admitted) < 0.25 * (exact - sum(even_admitted))
    assert load_admitted[0] > 2 * even_admitted[0]
    assert load_refused[0] < even_refused[0]


# ---------------------------------------------------------------- the load table


def test_table_fractions_from_rates_of_live_members() -> None:
    table = FleetTable()
    assert table.announce("a", 3, 0.0, 5.0) == (1, 1.0)  # its first: 3 / ttl
    assert table.loads["a"] == MemberLoad(0.0, -5.0, 3 / 5.0, -10.0, 3 / 5.0)
    size, fraction = table.announce("b", 2, 0.5, 5.0)  # 0.4/s against 0.6/s
    assert (size, fraction) == (2, pytest.approx(0.4))
    # a's load rises to 90/s: read at first as its previous rate against b's...
    size, fraction = table.announce("a", 90, 1.0, 5.0)
    assert table.loads["a"] == MemberLoad(1.0, 0.0, 90.0, -5.0, 0.6)
    assert (size, fraction) == (2, pytest.approx(0.6 / (0.6 + 0.4)))
    # ... and as it is once it held for two announcements
    size, fraction = table.announce("a", 90, 2.0, 5.0)
    assert (size, fraction) == (2, pytest.approx(90 / 90.4))
    # b rises to 5/s: believed one interval late, against a's 90 then
    size, fraction = table.announce("b", 10, 2.5, 5.0)
    assert (size, fraction) == (2, pytest.approx(0.4 / 90.4))
    # a falls to 1/s: believed at once, against b's latest 5
    size, fraction = table.announce("a", 1, 3.0, 5.0)
    assert (size, fraction) == (2, pytest.approx(1 / 6))
    # a member silent for a ttl is gone, its load no longer counted...
    assert table.announce("a", 5, 8.0, 5.0) == (1, 1.0)
    # ... but kept for a while: back after a quiet spell, its rate is over that spell
    size, fraction = table.announce("b", 1, 9.5, 5.0)
    assert table.loads["b"].rate == pytest.approx(1 / 7.0)  # 1 over the 7 s since t = 2.5
    assert (size, fraction) == (2, pytest.approx((1 / 7) / (1 / 7 + 1.0)))
    # ten ttls later it is dropped from the table
    table.announce("a", 1, 61.0, 5.0)
    assert "b" not in table.loads


def test_fractions_read_while_the_load_changes_sum_to_at_most_one() -> None:
    """Four members whose load changes together (5 to 400 requests/s, each level held
    3 s, counts +-2 %), each announcing once a second at its own phase: whenever each
    last read its fraction, the fractions sum to at most 1 (+ the counts' noise), and
    to about 1 again once a level held. Read against each other's latest rates alone
    they summed to up to 1.6 here after a rise."""
    rng = random.Random(7)
    for _ in range(50):
        table = FleetTable()
        phases = sorted(rng.random() for _ in range(4))
        levels = [rng.choice([5.0, 20.0, 100.0, 400.0]) for _ in range(5)]
        latest: dict[int, float] = {}
        for second in range(15):
            for m, phase in enumerate(phases):
                count = levels[second // 3] * (1.0 + rng.uniform(-0.02, 0.02))
                size, fraction = table.announce(str(m), count, 1_000.0 + second + phase, 5.0)
                assert size == 4 or second == 0
                if fraction is not None and second > 0:
                    latest[m] = fraction
                if len(latest) == 4:
                    assert sum(latest.values()) <= 1.03
            if second % 3 == 2 and second > 2:
                assert sum(latest.values()) >= 0.95


def test_table_fraction_unknown_when_a_live_member_reports_none() -> None:
    table = FleetTable()
    table.announce("a", 10, 0.0, 5.0)
    assert table.announce("b", -1, 0.5, 5.0) == (2, None)  # b reports none (weighting off)
    assert table.announce("a", 10, 1.0, 5.0) == (2, None)  # so nobody's fraction is known
    assert table.announce("a", 10, 6.0, 5.0) == (1, 1.0)  # b gone: known again
    fresh = FleetTable()
    assert fresh.announce("a", 0, 0.0, 5.0) == (1, None)  # no load anywhere


@pytest.mark.redis
def test_fleet_lua_mirrors_the_table(redis_url: str, redis_clock: RedisClock) -> None:
    """Random announcements of five members, some reporting no load, at random times on
    the pinned clock: fleet.lua answers what FleetTable answers, and holds the same loads."""
    script = clocked(FLEET)
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
    keys = ("{d}:fleet", "{d}:fleet:load")
    rng = random.Random(1919)
    try:
        for run in range(8):
            client.delete(*keys)
            table = FleetTable()
            now = 1_000.0 + 1_000.0 * run
            for _ in range(120):
                now += rng.choice(
                    [0.0, 0.05, 0.3, 1.0, 1.0, 2.5, 6.0, 60.0 * (rng.random() < 0.05)]
                )
                redis_clock.set(now)
                member = rng.choice("abcde")
                count = rng.choice([-1, 0, 1, 3, 40, 250]) if run % 2 else rng.randint(0, 50)
                size, fraction = table.announce(member, count, now, MEMBER_TTL_S)
                reply = client.eval(script.source, 2, *keys, member, MEMBER_TTL_S, count)
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
                live = {m.decode() for m in client.zrange(keys[0], 0, -1)}
                assert live == set(table.members)
            assert client.pttl(keys[0]) > 0
            assert client.pttl(keys[1]) > 0
    finally:
        client.close()


@pytest.mark.redis
def test_fleet_lua_mirrors_the_table_when_the_clock_goes_back(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """As above, with Redis's TIME going back now and then (a failover to a replica whose
    clock is behind): fleet.lua and FleetTable still answer alike (a member seen "later"
    than now is taken as seen now, its load entry moved with it; a rate over a negative
    interval is taken over the minimum)."""
    script = clocked(FLEET)
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
    keys = ("{b}:fleet", "{b}:fleet:load")
    rng = random.Random(2727)
    try:
        for run in range(6):
            client.delete(*keys)
            table = FleetTable()
            now = 1_000.0 + 1_000.0 * run
            for _ in range(120):
                now += rng.choice([0.0, 0.05, 0.3, 1.0, 2.5, 6.0, -0.2, -1.5, -7.0])
                redis_clock.set(now)
                member = rng.choice("abcde")
                count = rng.choice([-1, 0, 1, 3, 40]) if run % 2 else rng.randint(0, 50)
                size, fraction = table.announce(member, count, now, MEMBER_TTL_S)
                reply = client.eval(script.source, 2, *keys, member, MEMBER_TTL_S, count)
                assert int(reply[0]) == size
                if fraction is None:
                    assert float(reply[1]) == -1.0
                else:
                    assert float(reply[1]) == pytest.approx(fraction, rel=1e-12)
                live = {m.decode() for m in client.zrange(keys[0], 0, -1)}
                assert live == set(table.members)
                assert {k.decode() for k in client.hkeys(keys[1])} == set(table.loads)
    finally:
        client.close()


@pytest.mark.redis
def test_fleet_lua_keeps_no_load_for_a_large_fleet(redis_url: str, redis_clock: RedisClock) -> None:
    """Above LOAD_MAX_MEMBERS live members the table would cost each announcement a
    read of every entry: the script and the model keep no load, the share is even."""
    script = clocked(FLEET)
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
    keys = ("{l}:fleet", "{l}:fleet:load")
    table = FleetTable()
    try:
        for i in range(LOAD_MAX_MEMBERS + 3):
            now = 1_000.0 + 0.01 * i
            redis_clock.set(now)
            want = table.announce(f"m{i}", 5, now, MEMBER_TTL_S)
            reply = client.eval(script.source, 2, *keys, f"m{i}", MEMBER_TTL_S, 5)
            got = (int(reply[0]), None if float(reply[1]) == -1.0 else float(reply[1]))
            assert got == (want[0], None if want[1] is None else pytest.approx(want[1]))
            assert client.hlen(keys[1]) == len(table.loads)
        assert want == (LOAD_MAX_MEMBERS + 3, None)
        assert len(table.loads) == LOAD_MAX_MEMBERS  # the last three kept none
    finally:
        client.close()
    share = fleet_share(LOAD_MAX_MEMBERS + 3, 0.0, 1.0, 60.0, weighted=True, load_max_age_s=30.0)
    assert (share.weight, share.load_why) == (None, LOAD_LARGE_FLEET)


@pytest.mark.redis
def test_fleet_lua_drops_a_load_entry_that_is_not_ours(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """A malformed entry (written by something else) would fail every announcement and
    leave the fleet size unread for good: it is dropped instead."""
    script = clocked(FLEET)
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0)
    keys = ("{g}:fleet", "{g}:fleet:load")
    try:
        client.hset(keys[1], mapping={"a": "garbage", "x": "1 two 3"})
        reply = client.eval(script.source, 2, *keys, "a", MEMBER_TTL_S, 10)
        assert (int(reply[0]), float(reply[1])) == (1, 1.0)
        assert set(client.hkeys(keys[1])) == {b"a"}
        entry = tuple(float(x) for x in client.hget(keys[1], "a").split())
        first = 10 / MEMBER_TTL_S
        assert entry == (1_000.0, 1_000.0 - MEMBER_TTL_S, first, 1_000.0 - 2 * MEMBER_TTL_S, first)
    finally:
        client.close()


# ---------------------------------------------------------------- the stores, on a real Redis


def member(url: str, clock: FakeClock, **state: object) -> RedisStore:
    config = StateConfig(url=url, key_prefix="fw", **{**PATIENT, **state})  # type: ignore[arg-type]
    store = RedisStore(config=config, rng=seeded_random(3), clock=clock)
    store.coalesce = False  # a call while Redis is down returns at once: no await, no probe
    return store


async def serve(store: RedisStore, requests: int) -> None:
    """`requests` requests through the store (Redis up), and the announcement the first
    of them started if one was due (it counts what was decided before it ran)."""
    for i in range(requests):
        await store.admit(None, None, [f"w|{i % 7}"], [SPEC], store._clock.monotonic())
    task = store.fleet.task
    if task is not None:
        await task


async def settle(stores: list[RedisStore], clock: FakeClock, loads: list[int]) -> None:
    """Three announcement rounds: each store serves `loads[i]` requests between two (so
    it reports `loads[i]` + 1 over each ANNOUNCE_S between its announcements, twice:
    a load is read as it is once it held for two announcements)."""
    for store in stores:
        await serve(store, 1)
    for _ in range(2):
        for store, n in zip(stores, loads, strict=True):
            await serve(store, n)  # (none due yet)
        clock.advance(ANNOUNCE_S)
        for store in stores:
            await serve(store, 1)


async def burst(store: RedisStore, key: str) -> tuple[int, list[FleetShare | None]]:
    admitted, shares = 0, []
    for _ in range(2 * BURST):
        result = await store.admit(None, None, [key], [SLOW], store._clock.monotonic())
        assert result.source == "fallback"
        admitted += result.admitted
        shares.append(result.fleet)
    return admitted, shares


@pytest.mark.redis
@pytest.mark.anyio
async def test_the_busy_member_gets_the_larger_share_in_an_outage(
    own_redis: RedisServer,
) -> None:
    clock = FakeClock()
    stores = [member(own_redis.url, clock) for _ in range(2)]
    try:
        await settle(stores, clock, [60, 1])
        busy, idle = stores
        assert busy.fleet.size == idle.fleet.size == 2
        assert busy.fleet.fraction is not None
        assert busy.fleet.fraction > 0.9
        assert idle.fleet.fraction is not None
        assert idle.fleet.fraction < 0.1
        with own_redis.client() as client:
            assert client.hlen("{fw}:fleet:load") == 2
            assert client.pttl("{fw}:fleet:load") > 0
        own_redis.kill()
        clock.advance(2.0)
        got_busy, busy_shares = await burst(busy, "s|c")
        got_idle, idle_shares = await burst(idle, "s|c")
        assert got_busy > 3 * got_idle
        assert got_idle >= 1  # the idle member keeps its floor
        assert got_busy + got_idle <= BURST + 1  # together: about one burst
        for shares, store in ((busy_shares, busy), (idle_shares, idle)):
            assert {s.weight for s in shares if s is not None} == {store.fleet.weight}
        assert busy.fleet.weight is not None
        assert idle.fleet.weight is not None
        assert busy.fleet.weight + idle.fleet.weight == pytest.approx(1.0, abs=STEP - 1.0)
        assert busy.stats.fleet_unknown == idle.stats.fleet_unknown == 0
        # the store's snapshot (the state page) says the weight and the fraction
        detail = (await busy.snapshot(clock.monotonic())).detail
        assert detail["fleet_share"] == weight_tag(busy.fleet.weight)
        assert detail["fleet_load_fraction"] == round(busy.fleet.fraction, 4)
    finally:
        for store in stores:
            await store.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_stale_load_falls_back_to_the_even_share(own_redis: RedisServer) -> None:
    clock = FakeClock()
    stores = [member(own_redis.url, clock, fleet_share_load_max_age_s=10.0) for _ in range(2)]
    try:
        await settle(stores, clock, [60, 1])
        own_redis.kill()
        clock.advance(11.0)  # the load is 11 s old, the size trusted for 60 s
        admitted, shares = await burst(stores[0], "s|c")
        assert admitted == BURST // 2
        assert {(s.size, s.weight, s.load_why) for s in shares if s is not None} == {
            (2, None, LOAD_STALE)
        }
        assert stores[0].stats.fleet_unknown == 0
    finally:
        for store in stores:
            await store.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_a_member_that_reports_no_load_makes_the_share_even(
    own_redis: RedisServer,
) -> None:
    """A member with weighting off (or an older version) is in the fleet but reports no
    load: nobody's fraction is known, and every member enforces 1/N, recorded."""
    clock = FakeClock()
    stores = [
        member(own_redis.url, clock),
        member(own_redis.url, clock, fleet_share_even_ratio=1.0),
    ]
    try:
        await settle(stores, clock, [60, 1])
        await serve(stores[0], 1)  # (announced after the other's report, or not)
        clock.advance(ANNOUNCE_S)
        await serve(stores[0], 1)
        assert stores[0].fleet.size == 2
        assert stores[0].fleet.fraction is None
        own_redis.kill()
        admitted, shares = await burst(stores[0], "s|c")
        assert admitted == BURST // 2
        assert {s.load_why for s in shares if s is not None} == {LOAD_UNREPORTED}
        details = fleet_details(shares[0])  # type: ignore[arg-type]
        assert details["fleet_load_why"] == "unreported"
        assert details["fleet_weight"] == 0.5
    finally:
        for store in stores:
            await store.aclose()


def test_weighted_prefix_keeps_keys_apart() -> None:
    fleet = Fleet("fmw", 60.0, 0.2, 30.0)
    [even], _ = fleet.scaled(["l|k"], [SPEC], 4)
    [weighted], [spec] = fleet.scaled(["l|k"], [SPEC], 0.25)
    [other], _ = fleet.scaled(["l|k"], [SPEC], quantize_weight(0.3))
    assert len({even, weighted, other, "l|k"}) == 4
    assert weighted.endswith("\x00l|k")
    assert weighted.startswith("share 0.25")
    assert spec.interval_s == pytest.approx(4.0 / RATE)
    share = FleetShare(4, 1.0, "", 0.25, 0.25)
    assert fleet.for_share(["l|k"], [SPEC], share)[0] == [weighted]
    assert fleet.for_share(["l|k"], [SPEC], FleetShare(4, 1.0))[0] == [even]
    assert fleet.for_share(["l|k"], [SPEC], FleetShare(None, None, "never_seen")) == (
        ["l|k"],
        [SPEC],
    )


def test_the_state_page_reads_a_weighted_share() -> None:
    from fidelity_mw.admin.view import Since, render
    from fidelity_mw.engine import Engine
    from fidelity_mw.policy import Policy, RateLimit
    from fidelity_mw.state.snapshot import LimiterKeyView, StoreSnapshot

    clock = FakeClock()
    limit = RateLimit(name="per-client", rate="60/min", burst=8)  # 1 unit per s, 8 at once
    engine = Engine(Policy(rate_limits=(limit,), breaker=None), clock=clock)
    spec = engine.plan_for({"type": "http", "path": "/", "method": "GET"}).specs[0]
    [key], _ = Fleet("fmw", 60.0, 0.2, 30.0).scaled(["per-client|203.0.113.9"], [spec], 0.25)
    snap = StoreSnapshot(
        "redis", "fallback", 1.0, limiter_keys=(LimiterKeyView(key, 8.0, "fallback", 1.0),)
    )
    [row] = render(engine, snap, clock.monotonic(), Since(), lambda k: "h")["limiter_keys"]
    assert row["limit"] == "per-client"
    assert row["fleet_share"] == "0.25"
    # the share's bucket: 1 unit per 4 s, 2 at once; 8 s of backlog is two units in use
    assert (row["used"], row["burst"]) == (2.0, 2.0)


def test_map_says_how_the_share_is_weighted() -> None:
    from fidelity_mw.policy import Policy, RateLimit
    from fidelity_mw.tools.statemap import from_policy

    limits = (RateLimit(name="l", rate="10/s"),)

    def limit_row_and_notes(**state: object) -> tuple[str, list[str]]:
        smap = from_policy(
            Policy(state=StateConfig(url="redis://r:6379/0", **state), rate_limits=limits),  # type: ignore[arg-type]
            "t",
        )
        row = next(layer for layer in smap.layers if layer.layer == "ratelimit")
        return row.on_failure, smap.notes

    weighted, notes = limit_row_and_notes()
    assert "x 0.2 / N + 0.8 x its fraction of the fleet's requests" in weighted
    assert "{fmw}:fleet:load" in weighted
    assert "unknown or over 30 s old: rate / N" in weighted
    assert any(note.startswith("Fleet load: {fmw}:fleet:load") for note in notes)
    even, notes = limit_row_and_notes(fleet_share_even_ratio=1.0)
    assert "rate / N, burst / N" in even
    assert "fleet:load" not in even
    assert not any("fleet:load" in note for note in notes)


@pytest.mark.redis
@pytest.mark.anyio
async def test_tiered_members_report_the_requests_they_decide_locally(
    own_redis: RedisServer,
) -> None:
    """A tiered store decides most requests on its slices, without a call to Redis: its
    reported load is its own count of requests, not the exact store's calls."""
    from fidelity_mw.state.tiered import TieredStore

    clock = FakeClock()
    config = StateConfig(url="tiered+" + own_redis.url, key_prefix="tw", **PATIENT)  # type: ignore[arg-type]
    fleet = [TieredStore(config=config, rng=seeded_random(5), clock=clock) for _ in range(2)]
    for store in fleet:
        store.exact.coalesce = False

    async def announced(store: TieredStore, key: str) -> None:
        await store.admit(None, None, [key], [SPEC], clock.monotonic())  # a lease: a call
        task = store.exact.fleet.task
        assert task is not None
        await task

    try:
        for i, store in enumerate(fleet):
            await announced(store, f"w|first{i}")
        busy = fleet[0]
        for n in range(2):
            for _ in range(60):
                await busy.admit(None, None, ["w|first0"], [SPEC], clock.monotonic())
            clock.advance(ANNOUNCE_S)
            for i, store in enumerate(fleet):
                await announced(store, f"w|round{n}-{i}")
        assert busy.stats.local >= 10  # decided on its slice
        assert busy.exact.fleet.fraction is not None
        assert busy.exact.fleet.fraction > 0.9
        own_redis.kill()
        got = []
        for store in fleet:
            admitted = 0
            for _ in range(2 * BURST):
                result = await store.admit(None, None, ["s|t"], [SLOW], clock.monotonic())
                assert result.source == "fallback"
                admitted += result.admitted
            got.append(admitted)
        assert got[0] > 3 * got[1]
        assert got[0] + got[1] <= BURST + 1
    finally:
        for store in fleet:
            await store.aclose()
