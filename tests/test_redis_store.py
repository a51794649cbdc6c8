"""RedisStore against a real redis-server: same decisions as MemoryStore, one round trip,
NOSCRIPT recovery, keys clients cannot steer, no client-side retries."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import anyio
import httpx
import pytest
from redis.asyncio import ConnectionPool, Redis
from redis.crc import key_slot
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.decide.breaker import FAILURE, SUCCESS
from fidelity_mw.errors import PolicyError
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.factory import store_from_policy
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import (
    ADMIT,
    OUTBOUND,
    RECORD,
    SYNC,
    RedisStore,
    Slots,
    build_client,
    hashed_key,
    load_script,
)
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import seeded_random
from redis_clock import RedisClock
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

KEY_RE = re.compile(r"^\{fmw\}:(rl|br|bp|bu):[0-9a-f]{32}$")


def spec(rate_per_s: float, burst: int, cost: int = 1, shadow: bool = False, name: str = "l"):
    interval = 1.0 / rate_per_s
    return LimitSpec(name, interval, burst * interval, cost, shadow)


def store(url: str, **state: object) -> RedisStore:
    config = StateConfig(url=url, **{**PATIENT, **QUIET, **state})  # type: ignore[arg-type]
    return RedisStore(config=config, rng=seeded_random(7))


def flat(result):  # type: ignore[no-untyped-def]
    """What must agree between stores: gate verdict/state, per-limit verdicts, admitted."""
    gate = (result.gate.verdict, result.gate.state) if result.gate is not None else None
    limits = tuple((v.allowed, v.remaining) for v in result.limits)
    return gate, limits, result.admitted


# ---------------------------------------------------------------- semantics


async def test_limits_decide_like_memory_store(redis_url: str) -> None:
    """Same sequence, same decisions: bursts, costs, shadow, all-or-nothing commits."""
    redis_store = store(redis_url)
    memory = MemoryStore(rng=seeded_random(7))
    slow = 1.0 / 60  # one unit per minute: real time cannot refill during the test
    a = spec(slow, 3, name="a")
    b = spec(slow, 5, name="b")
    c2 = spec(slow, 5, cost=2, name="c")
    shadow = spec(slow, 1, shadow=True, name="s")
    sequence = [
        (["a|k1", "b|k1"], [a, b]),  # a runs out first; b must not be charged after that
        (["a|k1", "b|k1"], [a, b]),
        (["a|k1", "b|k1"], [a, b]),
        (["a|k1", "b|k1"], [a, b]),
        (["b|k1"], [b]),
        (["b|k1"], [b]),
        (["b|k1"], [b]),
        (["c|k1"], [c2]),
        (["c|k1"], [c2]),
        (["c|k1"], [c2]),
        (["s|k1", "b|k2"], [shadow, b]),
        (["s|k1", "b|k2"], [shadow, b]),  # shadow would reject: recorded, not enforced
        (["s|k1", "b|k2"], [shadow, b]),
    ]
    now = 5_000.0
    try:
        for keys, specs in sequence:
            got = await redis_store.admit(None, None, keys, specs, now)
            want = memory.admit_now(None, None, keys, specs, now)
            assert flat(got) == flat(want), (keys, got, want)
            assert got.source == "redis"
            assert got.age_s >= 0.0
    finally:
        await redis_store.aclose()
    assert redis_store.stats.round_trips == len(sequence) + redis_store.stats.script_loads


async def test_one_round_trip_per_request(redis_url: str, redis_server) -> None:  # type: ignore[no-untyped-def]
    """Breaker gate + three limits = one EVALSHA; the success rides on the next one."""
    redis_store = store(redis_url, sync_interval_ms=60_000)
    breaker = BreakerConfig()
    limits = [spec(1000, 100, name=n) for n in "xyz"]
    keys = [f"{n}|client" for n in "xyz"]
    await redis_store.admit("route:/warm", breaker, keys, limits, 0.0)  # loads the script
    with redis_server.client() as client:
        client.config_resetstat()
        for _ in range(20):
            result = await redis_store.admit("route:/a", breaker, keys, limits, 0.0)
            assert result.admitted
            assert result.gate is not None
            await redis_store.record("route:/a", breaker, result.gate, SUCCESS, False, 0.0)
        stats = client.info("commandstats")
    await redis_store.aclose()
    calls = {name: value["calls"] for name, value in stats.items()}
    assert calls.get("cmdstat_evalsha") == 20  # one per request, successes included
    assert "cmdstat_eval" not in calls


async def test_breaker_transitions_like_memory_store(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """closed -> open -> half_open (probes limited) -> closed, step by step, both stores
    on one pinned clock (the scripts read it for TIME): no real wait, and no machine's
    stall can move one store's clock past open_s and not the other's."""
    cfg = BreakerConfig(min_calls=4, failure_ratio=0.5, open_s=0.1, open_jitter=0.0,
                        half_open_probes=2)  # fmt: skip
    redis_store = store(redis_url)
    memory = MemoryStore(rng=seeded_random(7))
    key = "route:/b"
    clock = redis_clock

    def tick(step_s: float = 0.001) -> float:
        clock.set(clock.now + step_s)
        return clock.now

    async def both_gate():  # type: ignore[no-untyped-def]
        now = tick()
        got = await redis_store.admit(key, cfg, (), (), now)
        want = memory.admit_now(key, cfg, (), (), now)
        assert flat(got) == flat(want)
        return got.gate, want.gate

    async def both_record(gates, outcome):  # type: ignore[no-untyped-def]
        now = tick()
        state = await redis_store.record(key, cfg, gates[0], outcome, False, now)
        assert state == memory.record_now(key, cfg, gates[1], outcome, False, now)
        return state

    try:
        for outcome in (SUCCESS, SUCCESS, FAILURE, FAILURE):
            gates = await both_gate()
            assert gates[0].verdict == "allow"
            state = await both_record(gates, outcome)
        assert state == "open"
        rejected = await both_gate()
        assert rejected[0] is not None
        assert rejected[0].verdict == "reject"
        assert 0.0 < rejected[0].retry_after_s <= 0.1
        tick(0.15)  # past open_s
        probe1 = await both_gate()
        probe2 = await both_gate()
        third = await both_gate()
        assert [probe1[0].verdict, probe2[0].verdict, third[0].verdict] == [
            "probe",
            "probe",
            "reject",
        ]
        assert third[0].state == "half_open"
        assert await both_record(probe1, SUCCESS) == "closed"
        # the other probe reports late: its slot died with the epoch, nothing changes
        assert await both_record(probe2, FAILURE) == "closed"
        assert (await both_gate())[0].verdict == "allow"
    finally:
        await redis_store.aclose()


async def test_probe_slot_given_back_when_a_limit_rejects(redis_url: str) -> None:
    cfg = BreakerConfig(min_calls=1, open_s=0.05, open_jitter=0.0, half_open_probes=1,
                        consecutive_failures=1)  # fmt: skip
    redis_store = store(redis_url)
    tight = spec(1 / 60, 1)
    try:
        gate = (await redis_store.admit("route:/p", cfg, (), (), 0.0)).gate
        assert await redis_store.record("route:/p", cfg, gate, FAILURE, False, 0.0) == "open"
        assert (await redis_store.admit(None, None, ["l|spent"], [tight], 0.0)).admitted
        await anyio.sleep(0.06)
        rejected = await redis_store.admit("route:/p", cfg, ["l|spent"], [tight], 0.0)
        assert rejected.gate is not None
        assert rejected.gate.verdict == "probe"
        assert not rejected.admitted  # the limit said no ...
        again = await redis_store.admit("route:/p", cfg, ["l|fresh"], [tight], 0.0)
        assert again.gate is not None
        assert again.gate.verdict == "probe"
        assert again.admitted
    finally:
        await redis_store.aclose()


# ---------------------------------------------------------------- scripts


def test_scripts_are_package_files_with_stable_shas() -> None:
    for script in (ADMIT, RECORD, SYNC, OUTBOUND):
        again = load_script(script.name)
        assert again.sha == script.sha
        assert "server_now()" in script.source  # every script runs on the server's clock
        assert "redis.call('TIME')" in script.source


def test_wheel_ships_the_lua_scripts(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    hatchling = Path(sys.executable).with_name("hatchling")
    subprocess.run(
        [str(hatchling), "build", "-t", "wheel", "-d", str(tmp_path)],
        cwd=root,
        check=True,
        capture_output=True,
        timeout=60,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for lua in ("lib", "admit", "record", "sync", "outbound", "batch", "budget_refund"):
        assert f"fidelity_mw/state/lua/{lua}.lua" in names


async def test_noscript_recovery_after_script_flush(redis_url: str, redis_server) -> None:  # type: ignore[no-untyped-def]
    redis_store = store(redis_url)
    limit = spec(1 / 60, 10)
    try:
        assert (await redis_store.admit(None, None, ["l|a"], [limit], 0.0)).admitted
        loads = redis_store.stats.script_loads
        with redis_server.client() as client:
            client.script_flush()
            assert client.script_exists(ADMIT.sha) == [False]
        result = await redis_store.admit(None, None, ["l|a"], [limit], 0.0)
        assert result.source == "redis"
        assert result.limits[0].remaining == 8  # state survived, only the script was lost
        assert redis_store.stats.script_loads == loads + 1
        with redis_server.client() as client:
            assert client.script_exists(ADMIT.sha) == [True]
        assert redis_store.stats.fallbacks == 0
    finally:
        await redis_store.aclose()


# ---------------------------------------------------------------- keys


async def test_client_input_cannot_steer_key_names(redis_url: str, redis_server) -> None:  # type: ignore[no-untyped-def]
    redis_store = store(redis_url)
    hostile = [
        "l|{evil}",
        "l|a:b:c:{x}:}{",
        "l|" + "A" * 100_000,
        "l|\x00\n*3\r\n$3\r\nDEL",
        "l|\udcff",
    ]
    # one an hour: each bucket's key outlives the test (at 10/s it expired 100 ms after
    # its request, and a starved run counted 7 keys of 10)
    limit = spec(1 / 3600, 10)
    breaker = BreakerConfig()
    try:
        for key in hostile:
            result = await redis_store.admit("route:{/x}:" + key, breaker, [key], [limit], 0)
            assert result.admitted
            assert result.gate is not None
            await redis_store.record("route:{/x}:" + key, breaker, result.gate, FAILURE, False, 0)
    finally:
        await redis_store.aclose()
    with redis_server.client() as client:
        keys = [k.decode() for k in client.keys("*")]
    assert len(keys) == 2 * len(hostile)  # one TAT and one breaker hash each
    assert all(KEY_RE.match(k) for k in keys), keys
    assert {key_slot(k.encode()) for k in keys} == {key_slot(b"{fmw}")}


def test_key_prefix_with_braces_is_refused() -> None:
    with pytest.raises(PolicyError, match="key_prefix"):
        RedisStore(config=StateConfig(url="redis://127.0.0.1:1/0", key_prefix="a}b"))
    assert KEY_RE.match(hashed_key("fmw", "rl", "{x}")) is not None


# ---------------------------------------------------------------- the client


def test_client_is_built_without_retries() -> None:
    config = StateConfig(url="redis://127.0.0.1:6390/3", timeout_ms=40, connect_timeout_ms=30,
                         pool_size=7)  # fmt: skip
    client = build_client(config.url, config)
    assert isinstance(client, Redis)
    pool = client.connection_pool
    assert isinstance(pool, ConnectionPool)
    assert pool.max_connections == 7
    kwargs = pool.connection_kwargs
    assert kwargs["retry"].get_retries() == 0
    assert kwargs["socket_timeout"] == pytest.approx(0.04)
    assert kwargs["socket_connect_timeout"] == pytest.approx(0.03)
    assert kwargs["db"] == 3
    connection = pool.make_connection()
    assert connection.retry.get_retries() == 0
    assert connection.retry_on_error == []


async def test_unix_socket_url(redis_server) -> None:  # type: ignore[no-untyped-def]
    redis_store = store(redis_server.unix_url, key_prefix="unixtest")
    try:
        result = await redis_store.admit(None, None, ["l|u"], [spec(1, 5)], 0.0)
        assert result.source == "redis"
        assert result.limits[0].remaining == 4
    finally:
        await redis_store.aclose()


def test_factory_builds_stores_by_url(rng, clock) -> None:  # type: ignore[no-untyped-def]
    for url, kind in (
        ("redis://127.0.0.1:1/0", RedisStore),
        ("rediss://127.0.0.1:1/0", RedisStore),
        ("unix:///tmp/x.sock", RedisStore),
        ("tiered+redis://127.0.0.1:1/0", TieredStore),
        ("memory://", MemoryStore),
    ):
        built = store_from_policy(Policy(state=StateConfig(url=url)), rng, clock)
        assert isinstance(built, kind)


# ---------------------------------------------------------------- through the middleware


def _app(url: str, **state: object) -> tuple[FidelityMiddleware, list]:  # type: ignore[type-arg]
    seen: list = []  # type: ignore[type-arg]

    async def ok(request: Request) -> Response:
        seen.append(request.state.fidelity)
        return PlainTextResponse("ok")

    async def boom(request: Request) -> Response:
        return PlainTextResponse("no", status_code=500)

    policy = Policy(
        state=StateConfig(url=url, **{**PATIENT, **state}),  # type: ignore[arg-type]
        rate_limits=(RateLimit(name="api", rate="1/min", burst=3, key="client_ip", match="/ok"),),
        breaker=BreakerConfig(min_calls=3, failure_ratio=0.5, open_s=30.0),
    )
    app = Starlette(routes=[Route("/ok", ok), Route("/boom", boom)])
    return FidelityMiddleware(app, policy=policy, telemetry=False), seen


async def test_middleware_decides_on_redis(redis_url: str) -> None:
    app, seen = _app(redis_url)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        statuses = [(await client.get("/ok")).status_code for _ in range(5)]
    await app.engine.aclose()
    assert statuses == [200, 200, 200, 429, 429]
    sources = {d.state_source for ctx in seen for d in ctx.decisions if d.layer != "deadline"}
    assert sources == {"redis"}


async def test_shared_breaker_sheds_on_every_instance(redis_url: str) -> None:
    """Failures seen by instance A open the breaker; instance B sheds without calling its app."""
    app_a, _ = _app(redis_url)
    app_b, seen_b = _app(redis_url)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app_a), base_url="http://a") as a,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app_b), base_url="http://b") as b,
    ):
        assert [(await a.get("/boom")).status_code for _ in range(3)] == [500, 500, 500]
        shed = await b.get("/boom")
        assert shed.status_code == 503
        assert int(shed.headers["retry-after"]) >= 1
        assert (await a.get("/boom")).status_code == 503
    await app_a.engine.aclose()
    await app_b.engine.aclose()
    assert seen_b == []


async def test_fleet_wide_probe_limit(redis_url: str) -> None:
    """Five instances, many concurrent gates after the open period: exactly 2 probes."""
    cfg = BreakerConfig(min_calls=1, consecutive_failures=1, open_s=0.05, open_jitter=0.0,
                        half_open_probes=2, probe_lease_s=60.0)  # fmt: skip
    fleet = [store(redis_url) for _ in range(5)]
    try:
        gate = (await fleet[0].admit("route:/f", cfg, (), (), 0.0)).gate
        assert await fleet[0].record("route:/f", cfg, gate, FAILURE, False, 0.0) == "open"
        await asyncio.sleep(0.06)
        results = await asyncio.gather(
            *(member.breaker_gate("route:/f", cfg, 0.0) for member in fleet for _ in range(8))
        )
    finally:
        for member in fleet:
            await member.aclose()
    verdicts = [gate.verdict for gate, _source, _age in results]
    assert verdicts.count("probe") == 2
    assert verdicts.count("reject") == 38
    assert {source for _gate, source, _age in results} == {"redis"}


# ---------------------------------------------------------------- deferred successes


def window_calls(redis_server, breaker_key: str) -> int:  # type: ignore[no-untyped-def]
    with redis_server.client() as client:
        raw = client.hget(hashed_key("fmw", "br", breaker_key), "w")
    if raw is None:
        return 0
    numbers = [int(n) for n in raw.decode().split(",")]
    return sum(numbers[0::3])


async def test_successes_ride_on_the_next_call(redis_url: str, redis_server) -> None:  # type: ignore[no-untyped-def]
    """A plain success costs no round trip; the next admit (or a failure) carries it."""
    cfg = BreakerConfig(min_calls=4, failure_ratio=0.6)
    redis_store = store(redis_url, sync_interval_ms=60_000)  # no timed flush in this test
    memory = MemoryStore(rng=seeded_random(7))
    try:
        gate = (await redis_store.admit("route:/d", cfg, (), (), 0.0)).gate
        local_gate = memory.admit_now("route:/d", cfg, (), (), 0.0).gate
        assert gate is not None
        assert local_gate is not None
        trips = redis_store.stats.round_trips
        for _ in range(3):
            assert await redis_store.record("route:/d", cfg, gate, SUCCESS, False, 0.0) == "closed"
            memory.record_now("route:/d", cfg, local_gate, SUCCESS, False, 0.0)
        assert redis_store.stats.round_trips == trips  # no calls for successes
        assert window_calls(redis_server, "route:/d") == 0
        # four failures: with the three successes carried first, 4/7 < 0.6 stays closed
        # (had they been dropped, 4/4 would have opened it)
        states = []
        for _ in range(4):
            states.append(await redis_store.record("route:/d", cfg, gate, FAILURE, False, 0.0))
            memory.record_now("route:/d", cfg, local_gate, FAILURE, False, 0.0)
        assert states == ["closed"] * 4
        assert memory.breakers["route:/d"].state == "closed"
        assert window_calls(redis_server, "route:/d") == 7
        await redis_store.record("route:/d", cfg, gate, SUCCESS, False, 0.0)
        await redis_store.admit("route:/d", cfg, (), (), 0.0)  # carries it
        assert window_calls(redis_server, "route:/d") == 8
    finally:
        await redis_store.aclose()


async def test_deferred_successes_are_flushed_after_one_sync_interval(
    redis_url: str,
    redis_server,  # type: ignore[no-untyped-def]
) -> None:
    redis_store = store(redis_url, sync_interval_ms=20)
    cfg = BreakerConfig()
    try:
        gate = (await redis_store.admit("route:/idle", cfg, (), (), 0.0)).gate
        assert gate is not None
        for _ in range(5):
            await redis_store.record("route:/idle", cfg, gate, SUCCESS, False, 0.0)
        for _ in range(3000):  # bounded: 30 s on a starved machine; ~10 ms when quiet
            await anyio.sleep(0.01)
            if window_calls(redis_server, "route:/idle") == 5:
                break
        assert window_calls(redis_server, "route:/idle") == 5
    finally:
        await redis_store.aclose()


async def test_bounded_pool_queues_calls_instead_of_failing(redis_url: str) -> None:
    redis_store = store(redis_url, pool_size=2)
    limit = spec(1e6, 1_000_000)
    try:
        results = await asyncio.gather(
            *(redis_store.admit(None, None, [f"l|{i}"], [limit], 0.0) for i in range(50))
        )
        client = redis_store.client()
        assert isinstance(client, Redis)
        pool = client.connection_pool
        opened = len(pool._available_connections) + len(pool._in_use_connections)
        assert opened <= 2
    finally:
        await redis_store.aclose()
    assert {r.source for r in results} == {"redis"}
    assert redis_store.stats.pool_waits == 0


async def test_slots_bound_waits_and_hand_over() -> None:
    slots = Slots(1)
    assert slots.try_acquire()
    assert not slots.try_acquire()
    assert not await slots.acquire(0.01)  # nobody released in time
    waiting = asyncio.ensure_future(slots.acquire(5.0))
    await asyncio.sleep(0)
    slots.release()  # handed straight to the waiter
    assert await waiting
    assert not slots.try_acquire()
    slots.release()
    assert slots.try_acquire()


async def test_one_store_serves_several_event_loops(redis_url: str) -> None:
    """Sync code paths run coroutines on worker-thread loops: each loop gets its own client."""
    redis_store = store(redis_url)
    limit = spec(1e6, 1_000_000)

    async def burst() -> list[str]:
        return [
            (await redis_store.admit(None, None, ["l|loops"], [limit], 0.0)).source
            for _ in range(20)
        ]

    async def in_a_worker_thread() -> list[str]:
        try:
            return await burst()
        finally:
            await redis_store.aclose_loop()  # this loop ends with the thread

    try:
        theirs = asyncio.to_thread(asyncio.run, in_a_worker_thread())
        mine, other = await asyncio.gather(burst(), theirs)
    finally:
        await redis_store.aclose()
    assert set(mine) == set(other) == {"redis"}
    assert redis_store.stats.fallbacks == 0
