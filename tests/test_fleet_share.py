"""Fleet-aware fallback: each instance enforces its share of a limit while Redis is away.

The arithmetic (decide/fleet.py) on explicit times; the store's membership and
fallback against a real redis-server that the tests kill, on a FakeClock (the
store announces itself, reads the fleet size, and uses it, or not, when Redis
is gone). The 4-process measurement is in tests/test_redis_fleet_share.py.
"""

from __future__ import annotations

import httpx
import pytest

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.decide.fleet import (
    UNKNOWN_NEVER_SEEN,
    UNKNOWN_STALE,
    FleetShare,
    fleet_share,
    share_spec,
)
from fidelity_mw.inbound.admission import fleet_details
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.fleet import ANNOUNCE_S
from fidelity_mw.state.local import LocalState
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_server import PATIENT, RedisServer, refused_port

RATE = 100.0
BURST = 20
SPEC = LimitSpec("l", 1.0 / RATE, BURST / RATE, 1, False)
# No refill within a test: what a fresh key admits is its burst.
SLOW = LimitSpec("s", 60.0, 60.0 * BURST, 1, False)


# ---------------------------------------------------------------- the arithmetic


def test_share_spec_divides_rate_and_burst() -> None:
    quarter = share_spec(SPEC, 4)
    assert quarter.interval_s == pytest.approx(4.0 / RATE)  # rate / 4
    assert quarter.tolerance_s / quarter.interval_s == pytest.approx(BURST / 4)  # burst / 4
    assert (quarter.name, quarter.cost, quarter.shadow) == ("l", 1, False)
    assert share_spec(SPEC, 1) == SPEC


def test_share_spec_keeps_one_request_of_burst() -> None:
    tiny = LimitSpec("t", 0.1, 0.2, 2, False)  # burst 2, cost 2
    share = share_spec(tiny, 8)
    assert share.tolerance_s / share.interval_s == pytest.approx(2.0)  # not 2 / 8
    table = LocalState()
    assert table.admit_now(None, None, ["k"], [share], 0.0).admitted  # one request fits


def test_shares_of_four_instances_admit_about_one_limit() -> None:
    """Four instances offered 2x the limit between them for 10 s (fake time): with the
    share they admit at most rate x t + burst together; with the whole limit each, ~4x."""

    def admitted(spec: LimitSpec) -> int:
        instances = [LocalState() for _ in range(4)]
        total = 0
        for i in range(int(2 * RATE * 10)):  # 2000 arrivals, round-robin
            now = i / (2 * RATE)
            if instances[i % 4].admit_now(None, None, ["k"], [spec], now).admitted:
                total += 1
        return total

    bound = RATE * 10 + BURST
    shared = admitted(share_spec(SPEC, 4))
    whole = admitted(SPEC)
    assert shared <= bound
    assert shared >= 0.95 * RATE * 10  # not far below the limit either
    assert whole > 1.8 * bound  # each instance takes its whole rate: all 2000 arrive


def test_fleet_share_known_never_seen_and_stale() -> None:
    assert fleet_share(4, 100.0, 130.0, 60.0) == FleetShare(4, 30.0)
    assert fleet_share(4, 100.0, 160.0, 60.0) == FleetShare(4, 60.0)  # at the bound: known
    assert fleet_share(4, 100.0, 160.5, 60.0) == FleetShare(None, 60.5, UNKNOWN_STALE)
    assert fleet_share(None, None, 160.0, 60.0) == FleetShare(None, None, UNKNOWN_NEVER_SEEN)
    assert fleet_share(4, 100.0, 100.0, 0.0).size is None  # 0: never trusted


def test_fleet_details_for_the_decision_record() -> None:
    assert fleet_details(FleetShare(4, 1.23456)) == {"fleet_size": 4, "fleet_size_age_s": 1.235}
    assert fleet_details(FleetShare(None, 75.0, UNKNOWN_STALE)) == {
        "fleet_share": "unknown",
        "fleet_share_why": "stale",
        "fleet_size_age_s": 75.0,
    }
    assert fleet_details(FleetShare(None, None, UNKNOWN_NEVER_SEEN)) == {
        "fleet_share": "unknown",
        "fleet_share_why": "never_seen",
    }


# ---------------------------------------------------------------- the store, on a real Redis


def member(url: str, clock: FakeClock, prefix: str = "fl", **state: object) -> RedisStore:
    config = StateConfig(url=url, key_prefix=prefix, **{**PATIENT, **state})  # type: ignore[arg-type]
    store = RedisStore(config=config, rng=seeded_random(3), clock=clock)
    store.coalesce = False  # a call while Redis is down returns at once: no await, no probe
    return store


async def announce(store: RedisStore) -> None:
    """One call that reaches Redis (so the store announces itself), and that announcement."""
    await store.admit(None, None, ["w|warm"], [SPEC], store._clock.monotonic())
    assert store.fleet.task is not None
    await store.fleet.task


async def burst_admitted(store: RedisStore, key: str) -> tuple[int, list[FleetShare | None]]:
    """How many of 2 x BURST requests on a fresh key a store admits (no refill)."""
    admitted, shares = 0, []
    for _ in range(2 * BURST):
        result = await store.admit(None, None, [key], [SLOW], store._clock.monotonic())
        assert result.source == "fallback"
        admitted += result.admitted
        shares.append(result.fleet)
    return admitted, shares


@pytest.mark.redis
@pytest.mark.anyio
async def test_members_announce_and_each_enforces_its_share_when_redis_dies(
    own_redis: RedisServer,
) -> None:
    clock = FakeClock()
    fleet = [member(own_redis.url, clock, fleet_share_even_ratio=1.0) for _ in range(4)]
    try:
        for store in fleet:
            await announce(store)
        assert [store.fleet.size for store in fleet] == [1, 2, 3, 4]  # each saw those before it
        clock.advance(ANNOUNCE_S)
        for store in fleet:
            await announce(store)
        assert [store.fleet.size for store in fleet] == [4, 4, 4, 4]
        with own_redis.client() as client:
            assert client.zcard("{fl}:fleet") == 4
            assert client.pttl("{fl}:fleet") > 0  # a fleet that is gone leaves nothing
        own_redis.kill()
        clock.advance(2.0)
        totals = []
        for store in fleet:
            admitted, shares = await burst_admitted(store, "s|client")
            totals.append(admitted)
            # (the age grows with the FakeClock, which each store's PING probe advances
            # whenever the test awaits: at least the 2 s, less than the bound)
            assert {s.size for s in shares if s is not None} == {4}
            assert all(s is not None and 2.0 <= s.age_s <= 30.0 for s in shares)  # type: ignore[operator]
        assert totals == [BURST // 4] * 4  # together: one burst, not four
        assert all(store.stats.fleet_unknown == 0 for store in fleet)
        # past the bound the fleet size is no longer trusted: the whole limit, recorded,
        # on keys of its own (the share's spent units do not count against it)
        clock.advance(61.0)
        admitted, shares = await burst_admitted(fleet[0], "s|client")
        assert admitted == BURST
        assert {(s.size, s.why) for s in shares if s is not None} == {(None, UNKNOWN_STALE)}
        assert all(s is not None and s.age_s is not None and s.age_s > 60.0 for s in shares)
        assert fleet[0].stats.fleet_unknown == 2 * BURST
    finally:
        for store in fleet:
            await store.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_fleet_of_one_enforces_the_whole_limit(own_redis: RedisServer) -> None:
    clock = FakeClock()
    store = member(own_redis.url, clock)
    try:
        await announce(store)
        assert store.fleet.announces == 1
        # the announcement is not a request's round trip (the counts benchmarks read)
        assert store.stats.round_trips - store.stats.script_loads == 1
        own_redis.kill()
        admitted, shares = await burst_admitted(store, "s|c")
        assert admitted == BURST
        assert {s.size for s in shares if s is not None} == {1}
    finally:
        await store.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_never_seen_fleet_enforces_the_whole_limit() -> None:
    clock = FakeClock()
    store = member(f"redis://127.0.0.1:{refused_port()}/0", clock)  # nobody listens
    try:
        admitted, shares = await burst_admitted(store, "s|c")
    finally:
        await store.aclose()
    assert admitted == BURST
    assert set(shares) == {FleetShare(None, None, UNKNOWN_NEVER_SEEN)}
    assert store.stats.fleet_unknown == 2 * BURST
    assert store.fleet.announces == 0


@pytest.mark.redis
@pytest.mark.anyio
async def test_share_off_announces_nothing_and_enforces_the_whole_limit(
    own_redis: RedisServer,
) -> None:
    clock = FakeClock()
    stores = [member(own_redis.url, clock, fleet_share_max_age_s=0) for _ in range(2)]
    try:
        for store in stores:
            await store.admit(None, None, ["w|warm"], [SPEC], clock.monotonic())
            assert store.fleet.task is None
        with own_redis.client() as client:
            assert client.exists("{fl}:fleet") == 0
        own_redis.kill()
        admitted, shares = await burst_admitted(stores[0], "s|c")
    finally:
        for store in stores:
            await store.aclose()
    assert admitted == BURST
    assert set(shares) == {None}  # today's behaviour, nothing to record


@pytest.mark.redis
@pytest.mark.anyio
async def test_refund_in_fallback_returns_units_to_the_share(own_redis: RedisServer) -> None:
    clock = FakeClock()
    fleet = [member(own_redis.url, clock, fleet_share_even_ratio=1.0) for _ in range(4)]
    try:
        for store in fleet:
            await announce(store)
        clock.advance(ANNOUNCE_S)
        await announce(fleet[0])
        assert fleet[0].fleet.size == 4
        own_redis.kill()
        store = fleet[0]
        for _ in range(BURST // 4):
            assert (await store.admit(None, None, ["s|r"], [SLOW], clock.monotonic())).admitted
        refused = await store.admit(None, None, ["s|r"], [SLOW], clock.monotonic())
        assert not refused.admitted
        await store.refund(["s|r"], [SLOW], "fallback", clock.monotonic())
        again = await store.admit(None, None, ["s|r"], [SLOW], clock.monotonic())
        assert again.admitted
        assert again.fleet is not None
        assert again.fleet.size == 4
    finally:
        for store in fleet:
            await store.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_tiered_store_falls_back_to_its_share(own_redis: RedisServer) -> None:
    clock = FakeClock()
    config = StateConfig(
        url="tiered+" + own_redis.url,
        key_prefix="tf",
        fleet_share_even_ratio=1.0,
        **PATIENT,  # type: ignore[arg-type]
    )
    fleet = [TieredStore(config=config, rng=seeded_random(5), clock=clock) for _ in range(2)]
    for store in fleet:
        store.exact.coalesce = False
    try:
        for store in fleet:
            await store.admit(None, None, ["w|warm"], [SPEC], clock.monotonic())
            await store.exact.fleet.task  # type: ignore[misc]
        await fleet[0].admit(None, None, ["w|warm"], [SPEC], clock.monotonic())
        clock.advance(ANNOUNCE_S)
        await fleet[0].admit(None, None, ["w|warm2"], [SPEC], clock.monotonic())
        await fleet[0].exact.fleet.task  # type: ignore[misc]
        assert fleet[0].exact.fleet.size == 2
        own_redis.kill()
        admitted = 0
        shares = set()
        for _ in range(2 * BURST):
            result = await fleet[0].admit(None, None, ["s|t"], [SLOW], clock.monotonic())
            if result.source == "fallback":
                admitted += result.admitted
                shares.add(result.fleet)
        assert admitted == BURST // 2
        assert {s.size for s in shares if s is not None} == {2}
    finally:
        for store in fleet:
            await store.aclose()


@pytest.mark.redis
@pytest.mark.anyio
async def test_fallback_decisions_carry_the_fleet_size(own_redis: RedisServer) -> None:
    """Through the middleware: a limiter decision taken in fallback says which share it used."""
    clock = FakeClock()
    stores = [member(own_redis.url, clock, fleet_share_even_ratio=1.0) for _ in range(2)]
    for store in stores:
        await announce(store)
    clock.advance(ANNOUNCE_S)
    await announce(stores[0])
    assert stores[0].fleet.size == 2
    policy = Policy(
        state=StateConfig(
            url=own_redis.url,
            key_prefix="fl",
            fleet_share_even_ratio=1.0,
            **PATIENT,  # type: ignore[arg-type]
        ),
        rate_limits=(RateLimit(name="l", rate="1/min", burst=4, key="global"),),
        rate_limit_headers="never",
    )
    seen = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        seen.append(scope["state"]["fidelity"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = FidelityMiddleware(app, policy=policy, clock=clock, store=stores[0], telemetry=False)
    own_redis.kill()
    clock.advance(1.5)
    try:
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            statuses = [(await client.get("/x")).status_code for _ in range(4)]
    finally:
        for store in stores:
            await store.aclose()
    assert statuses == [200, 200, 429, 429]  # burst 4 / 2 members
    limiter = [d for d in seen[0].decisions if d.layer == "ratelimit"]
    assert len(limiter) == 1
    assert limiter[0].state_source == "fallback"
    assert limiter[0].details is not None
    assert limiter[0].details["fleet_size"] == 2
    assert limiter[0].details["fleet_size_age_s"] >= 1.5  # type: ignore[operator]


# ---------------------------------------------------------------- fidelity-mw map


def test_map_says_where_the_fleet_size_lives() -> None:
    from fidelity_mw.tools.statemap import from_policy

    limits = (RateLimit(name="l", rate="10/s"),)
    on = from_policy(Policy(state=StateConfig(url="redis://r:6379/0"), rate_limits=limits), "t")
    limit = next(layer for layer in on.layers if layer.layer == "ratelimit")
    breaker = next(layer for layer in on.layers if layer.layer == "breaker")
    assert "share of the limit" in limit.on_failure
    assert "{fmw}:fleet" in limit.on_failure
    assert "share" not in breaker.on_failure  # breakers stay per process
    assert any("{fmw}:fleet" in note for note in on.notes)
    off = from_policy(
        Policy(
            state=StateConfig(url="redis://r:6379/0", fleet_share_max_age_s=0), rate_limits=limits
        ),
        "t",
    )
    limit = next(layer for layer in off.layers if layer.layer == "ratelimit")
    assert "share" not in limit.on_failure
    assert not any("fleet" in note for note in off.notes)
