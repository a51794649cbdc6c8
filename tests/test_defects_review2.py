"""Regression tests for defects found by the second review pass: each failed on
the code before its fix."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityMiddleware, FidelitySyncTransport, FidelityTransport
from fidelity_mw.context import _CURRENT
from fidelity_mw.engine import Engine
from fidelity_mw.policy import Policy, StateConfig
from fidelity_mw.state.redis import RedisStats
from fidelity_mw.state.redis_sync import SyncLink
from fidelity_mw.testing import FakeClock, seeded_random
from redis_server import RedisServer


@dataclass(frozen=True)
class _Script:
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


PING_SCRIPT = _Script("return 1")
# INCR on a hash: Redis answers WRONGTYPE, an error reply to this one call
BAD_SCRIPT = _Script("redis.call('HSET', KEYS[1], 'f', 1) return redis.call('INCR', KEYS[1])")


def _link(url: str, **state: int) -> tuple[SyncLink, RedisStats]:
    stats = RedisStats()
    config = StateConfig(url=url, **state)  # type: ignore[arg-type]
    return SyncLink(url, False, config, FakeClock(), stats), stats


def test_sync_link_script_error_fails_only_that_call(redis_url: str) -> None:
    link, stats = _link(redis_url, timeout_ms=5_000, connect_timeout_ms=5_000)
    try:
        assert link.call(BAD_SCRIPT, ["{fmw}:review2:bad"], []) is None
        assert stats.errors == 1
        # Redis answered: the next call goes to it (the clock has not moved)
        got = link.call(PING_SCRIPT, [], [])
        assert got is not None
        assert got[0] == 1
    finally:
        link.close()


def test_sync_link_full_pool_fails_only_that_call(redis_url: str) -> None:
    link, stats = _link(redis_url, pool_size=1, timeout_ms=50, connect_timeout_ms=5_000)
    try:
        pool = link.client().connection_pool
        held = pool.get_connection()  # another thread's call, in flight
        try:
            assert link.call(PING_SCRIPT, [], []) is None
        finally:
            pool.release(held)
        assert stats.errors == 1
        assert stats.pool_waits == 1
        got = link.call(PING_SCRIPT, [], [])
        assert got is not None
        assert got[0] == 1
    finally:
        link.close()


def test_sync_link_survives_a_restart_without_pausing(own_redis: RedisServer) -> None:
    link, stats = _link(own_redis.url, timeout_ms=5_000, connect_timeout_ms=5_000)
    try:
        assert link.call(PING_SCRIPT, [], []) is not None
        own_redis.restart()
        # (not a defect: a guard) the pooled connection is to the old server; redis-py's
        # blocking pool replaces it before use, so nothing fails and nothing pauses
        got = link.call(PING_SCRIPT, [], [])
        assert got is not None
        assert got[0] == 1
        assert stats.errors == 0
    finally:
        link.close()


def test_sync_link_pauses_when_redis_is_unreachable(own_redis: RedisServer) -> None:
    link, stats = _link(own_redis.url, timeout_ms=1_000, connect_timeout_ms=1_000)
    try:
        own_redis.stop()
        assert link.call(PING_SCRIPT, [], []) is None
        errors = stats.errors
        own_redis.start()
        # down: the pause spares every thread a timeout per call
        assert link.call(PING_SCRIPT, [], []) is None
        assert stats.errors == errors
    finally:
        link.close()


# ------------------------------------------------ resolver answers validated like `instances`

GOOD = ("http://10.0.0.1:8001", "http://10.0.0.2:8002")


@pytest.mark.parametrize(
    "bad",
    [
        ["10.0.0.1:8001"],  # no scheme: the request would go to "/pay", on no host
        ["payments-1"],
        ["ftp://10.0.0.1"],
        "http://10.0.0.3:8003",  # a string: each character became an "instance"
        [GOOD[0], "http://"],
    ],
)
@pytest.mark.parametrize("sync", [False, True])
def test_a_resolver_answer_that_is_not_base_urls_is_ignored(
    bad: Any, sync: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad answer is treated like a failing resolver: logged once (no traceback), and
    calls go on to the instances it named last."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200)

    answers: list[Any] = [GOOD]
    engine = Engine(Policy(), clock=FakeClock(), rng=seeded_random(7))
    kind = FidelitySyncTransport if sync else FidelityTransport
    t = kind(
        httpx.MockTransport(handler),
        engine=engine,
        telemetry=False,
        resolver=lambda host: answers[-1] if host == "payments" else None,
    )

    async def get_async() -> int:
        async with httpx.AsyncClient(transport=t) as client:  # type: ignore[arg-type]
            return (await client.get("http://payments/pay")).status_code

    def get() -> int:
        if not sync:
            return asyncio.run(get_async())
        with httpx.Client(transport=t) as client:  # type: ignore[arg-type]
            return client.get("http://payments/pay").status_code

    assert get() == 200
    answers.append(bad)
    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        for _ in range(6):
            assert get() == 200
    assert {u.removesuffix("/pay") for u in seen} <= set(GOOD)
    warned = [r for r in caplog.records if "resolver" in r.getMessage()]
    assert len(warned) == 1
    assert warned[0].exc_info is None


# ------------------------------------- a request's coroutine finalised in another context


@pytest.mark.anyio
async def test_a_request_coroutine_closed_in_another_context_ends_quietly() -> None:
    """A server that drops a request's coroutine (closed by it, or by the garbage
    collector, in whatever context runs then) must not make the middleware raise
    ValueError from resetting its context variable: that logged a traceback."""
    parked = asyncio.get_running_loop().create_future()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await parked  # the client went away meanwhile

    mw = FidelityMiddleware(app, policy=Policy(), clock=FakeClock(), telemetry=False)
    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "client": ("1.2.3.4", 5)}

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        pass

    coro = mw(scope, receive, send)
    contextvars.copy_context().run(coro.send, None)  # the request ran in its own context
    coro.close()  # finalised here, in another one
    assert _CURRENT.get() is None
    parked.cancel()
