"""The store's script calls go over `LaneClient`'s own connections, not redis-py's
`execute_command` and pool: the same replies and errors, at most `pool_size`
connections, a connection the server closed replaced before anything is sent on it,
and the middleware's plain successes recorded without a coroutine (`record_now`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from fidelity_mw.decide.breaker import FAILURE, IGNORED, SUCCESS
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import LaneClient, RedisStore
from fidelity_mw.testing import seeded_random
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

LIMIT = LimitSpec("l", 1e-6, 1.0, 1, False)


def store(url: str, **state: object) -> RedisStore:
    config = StateConfig(url=url, **{**PATIENT, **QUIET, **state})  # type: ignore[arg-type]
    return RedisStore(config=config, rng=seeded_random(7))


async def test_script_calls_skip_execute_command(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(self: Redis, *args: Any, **options: Any) -> Any:
        raise AssertionError(f"execute_command({args[0]!r}) on the store's hot path")

    monkeypatch.setattr(Redis, "execute_command", refuse)
    redis_store = store(redis_url, key_prefix="lane1")
    breaker = BreakerConfig()
    try:
        for coalesce in (False, True):
            redis_store.coalesce = coalesce
            results = await asyncio.gather(
                *(redis_store.admit("route:/x", breaker, [f"k{i}"], [LIMIT], 0.0) for i in range(5))
            )
            assert {r.source for r in results} == {"redis"}
            assert all(r.admitted for r in results)
            gate = results[0].gate
            assert gate is not None
            assert await redis_store.record("route:/x", breaker, gate, FAILURE, False, 0.0)
        assert redis_store.stats.errors == 0
        assert redis_store.coalescer.batches >= 1
    finally:
        await redis_store.aclose()


async def test_lane_opens_at_most_pool_size_connections_and_closes_them(redis_url: str) -> None:
    redis_store = store(redis_url, key_prefix="lane2", pool_size=2)
    redis_store.coalesce = False
    try:
        results = await asyncio.gather(
            *(redis_store.admit(None, None, [f"l|{i}"], [LIMIT], 0.0) for i in range(40))
        )
        client = redis_store.client()
        assert isinstance(client, LaneClient)
        assert 1 <= len(client.lane_opened) <= 2
        assert all(conn.is_connected for conn in client.lane_opened)
        opened = list(client.lane_opened)
    finally:
        await redis_store.aclose()
    assert {r.source for r in results} == {"redis"}
    assert not any(conn.is_connected for conn in opened)


async def test_connection_closed_by_server_is_replaced_before_sending(
    redis_server: Any, redis_url: str
) -> None:
    """Redis closed the idle connection (a restart, its idle `timeout`): the next call
    reconnects before sending instead of losing its reply on the dead socket."""
    redis_store = store(redis_url, key_prefix="lane3")
    try:
        assert (await redis_store.admit(None, None, ["a"], [LIMIT], 0.0)).source == "redis"
        with redis_server.client() as admin:
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        for _ in range(6000):  # until the event loop has seen the EOF (30 s at most)
            await asyncio.sleep(0.005)
            client = redis_store.client()
            assert isinstance(client, LaneClient)
            if all(c._reader is None or c._reader.at_eof() for c in client.lane_free):
                break
        result = await redis_store.admit(None, None, ["a"], [LIMIT], 0.0)
        assert result.source == "redis"
        assert redis_store.stats.lost_replies == 0
        assert redis_store.stats.reconnects == 0
        assert redis_store.health.up
    finally:
        await redis_store.aclose()


async def test_failed_lane_connection_reconnects_on_next_use(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_store = store(redis_url, key_prefix="lane4", on_error="open")
    try:
        assert (await redis_store.admit(None, None, ["a"], [LIMIT], 0.0)).source == "redis"
        client = redis_store.client()
        assert isinstance(client, LaneClient)
        (conn,) = client.lane_opened
        real_send = type(conn).send_packed_command

        async def broken(self: Any, *args: Any, **kwargs: Any) -> None:
            await self.disconnect()  # as redis-py does when a write fails
            raise RedisConnectionError("Error 32 while writing to socket. Broken pipe.")

        monkeypatch.setattr(type(conn), "send_packed_command", broken)
        result = await redis_store.admit(None, None, ["a"], [LIMIT], 0.0)
        assert result.source == "fallback"  # failed twice: once, and once on a fresh one
        assert not conn.is_connected
        monkeypatch.setattr(type(conn), "send_packed_command", real_send)
        await redis_store._probe()  # Redis answers PING: up again
        result = await redis_store.admit(None, None, ["a"], [LIMIT], 0.0)
        assert result.source == "redis"
        assert client.lane_opened == [conn]  # the same connection, connected again
        assert conn.is_connected
    finally:
        await redis_store.aclose()


async def test_record_now_takes_plain_successes_in_process(redis_url: str) -> None:
    redis_store = store(redis_url, key_prefix="lane5")
    breaker = BreakerConfig()
    try:
        result = await redis_store.admit("route:/y", breaker, ["k"], [LIMIT], 0.0)
        gate = result.gate
        assert gate is not None
        assert not gate.probe_id
        trips = redis_store.stats.round_trips
        assert redis_store.record_now("route:/y", breaker, gate, SUCCESS, False, 0.0) == "closed"
        assert redis_store.record_now("route:/y", breaker, gate, IGNORED, False, 0.0) == "closed"
        assert redis_store._deferred["route:/y"][2] == 1  # rides on the next call
        # a failure and a slow call must reach Redis: None, nothing changed
        assert redis_store.record_now("route:/y", breaker, gate, FAILURE, False, 0.0) is None
        assert redis_store.record_now("route:/y", breaker, gate, SUCCESS, True, 0.0) is None
        assert redis_store._deferred["route:/y"][2] == 1
        assert redis_store.stats.round_trips == trips
    finally:
        await redis_store.aclose()


async def test_middleware_records_plain_successes_without_a_coroutine(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from fidelity_mw import FidelityMiddleware, Policy, RateLimit

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def no_coroutine(self: RedisStore, *args: Any) -> str:
        raise AssertionError("RedisStore.record awaited for a plain success")

    monkeypatch.setattr(RedisStore, "record", no_coroutine)
    policy = Policy(
        state=StateConfig(url=redis_url, key_prefix="lane6", **{**PATIENT, **QUIET}),  # type: ignore[arg-type]
        rate_limits=(RateLimit(name="per-client", rate="1000/s", key="client_ip"),),
    )
    app = FidelityMiddleware(
        Starlette(routes=[Route("/hello", hello)]), policy=policy, telemetry=False
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(3):
            response = await client.get("/hello")
            assert response.status_code == 200
    redis_store = app.engine.store
    assert isinstance(redis_store, RedisStore)
    try:
        assert redis_store.stats.fallbacks == 0
        (entry,) = redis_store._deferred.values()
        assert entry[2] >= 1  # the successes wait to ride on the next call
    finally:
        await redis_store.aclose()


async def test_a_batch_goes_as_one_argument(redis_url: str) -> None:
    redis_store = store(redis_url, key_prefix="lane7", sync_interval_ms=60_000)
    sent: list[int] = []
    send = redis_store.coalescer._call

    async def counted(script, keys, args):  # type: ignore[no-untyped-def]
        sent.append(len(args))
        return await send(script, keys, args)

    redis_store.coalescer._call = counted
    try:
        got = await asyncio.gather(
            *(redis_store.admit(None, None, [f"k{i}"], [LIMIT], 0.0) for i in range(20))
        )
    finally:
        await redis_store.aclose()
    assert {r.source for r in got} == {"redis"}
    assert sent == [1]  # 20 operations, one ARGV


async def test_route_values_follow_the_limits_passed(redis_url: str) -> None:
    """The per-route cache of what admit sends is checked against the breaker and limits
    of every call: other limits under the same breaker key (or none) are sent as given."""
    other = LimitSpec("m", 60.0, 180.0, 1, False)  # burst 3, one more a minute
    breaker = BreakerConfig()
    for coalesce in (True, False):
        redis_store = store(redis_url, key_prefix=f"lane8{coalesce}")
        redis_store.coalesce = coalesce
        try:
            one = await redis_store.admit("route:/z", breaker, ["a"], (LIMIT,), 0.0)
            two = await redis_store.admit("route:/z", breaker, ["a", "b"], [LIMIT, other], 0.0)
            again = await redis_store.admit("route:/z", breaker, ["b"], [other], 0.0)
            none = await redis_store.admit("route:/z", breaker, [], (), 0.0)
            plain = await redis_store.admit(None, None, ["c"], [other], 0.0)
        finally:
            await redis_store.aclose()
        assert [len(r.limits) for r in (one, two, again, none, plain)] == [1, 2, 1, 0, 1]
        assert {r.source for r in (one, two, again, none, plain)} == {"redis"}
        assert two.limits[1].remaining == 2  # "m": burst 3, one taken
        assert again.limits[0].remaining == 1  # the same key "b" of "m", one more taken
        assert none.gate is not None
        assert plain.gate is None
        with pytest.raises(ValueError, match="limit keys"):
            await store(redis_url, key_prefix="lane9").admit(None, None, ["x"], (), 0.0)
