"""Regression tests for defects found by the second review pass: each failed on
the code before its fix, but for two guards that hold a fixed behaviour in place
(the sync link still pauses when Redis is unreachable, and survives a restart)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from opentelemetry.sdk.trace import TracerProvider

from _asgi import http_scope
from fidelity_mw import FidelityMiddleware, FidelitySyncTransport, FidelityTransport
from fidelity_mw.context import _CURRENT
from fidelity_mw.decide.breaker import FAILURE, SUCCESS
from fidelity_mw.engine import Engine
from fidelity_mw.errors import PolicyError
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.policy import BreakerConfig, Policy, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStats, RedisStore
from fidelity_mw.state.redis_sync import SyncLink
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from fidelity_mw.tools.cli import main as cli_main
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
        ["http://10.0.0.1:8001", "http://a:notaport"],  # a base URL's shape, not a URL
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
    try:
        coro.close()  # finalised here, in another one
    except ValueError as exc:  # what it did: reset a variable set in another context
        pytest.fail(f"closing the request's coroutine raised {exc!r}")
    assert _CURRENT.get() is None  # and left this context as it was
    parked.cancel()


# ------------------------------------------ deadlines under FakeClock, armed after a wait


class SlowAdmitStore(MemoryStore):
    """In-process state that answers admission after `delay` s (a remote store's
    round trip, a queue): the middleware awaits it, and the clock moves meanwhile."""

    admit_now = None

    def __init__(self, clock: FakeClock, delay: float) -> None:
        super().__init__()
        self.clock = clock
        self.delay = delay

    async def admit(self, *args: Any, **kwargs: Any) -> Any:
        await self.clock.sleep(self.delay)
        return await super().admit(*args, **kwargs)


async def _deadline_request(
    clock: FakeClock, admit_delay: float
) -> tuple[asyncio.Task[Any], list[int]]:
    """A request with a 1 s deadline to an app that never answers by itself."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.Event().wait()

    store = SlowAdmitStore(clock, admit_delay)
    mw = FidelityMiddleware(app, policy=Policy(), clock=clock, store=store, telemetry=False)
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/x",
        "headers": [(b"x-request-timeout-ms", b"1000")],
        "client": ("1.2.3.4", 5),
    }
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    task = asyncio.get_running_loop().create_task(mw(scope, receive, send))
    for _ in range(5):
        await asyncio.sleep(0)
    return task, statuses


async def _settle(task: asyncio.Task[Any]) -> None:
    for _ in range(20):
        await asyncio.sleep(0)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.anyio
async def test_deadline_timer_counts_from_arming_not_from_arrival() -> None:
    """0.8 s of the 1 s deadline went by before the app started: 0.2 s remain, and
    the timer must fire 0.2 s later (it was set for the whole second again)."""
    clock = FakeClock()
    task, statuses = await _deadline_request(clock, 0.8)
    clock.advance(0.3)
    await _settle(task)
    assert statuses == [504]


@pytest.mark.anyio
async def test_deadline_already_passed_when_armed_is_enforced_without_advancing() -> None:
    """As on the event loop's clock, where call_later(0) runs on the next iteration."""
    clock = FakeClock()
    task, statuses = await _deadline_request(clock, 1.2)
    await _settle(task)
    assert statuses == [504]


@pytest.mark.anyio
async def test_fake_clock_call_later_now_runs_soon_like_the_loop() -> None:
    clock = FakeClock()
    fired: list[str] = []
    clock.call_later(0.0, lambda: fired.append("now"))
    clock.call_later(-1.0, lambda: fired.append("past"))
    clock.call_later(0.5, lambda: fired.append("later"))
    cancelled = clock.call_later(0.0, lambda: fired.append("cancelled"))
    cancelled.cancel()
    assert fired == []  # not from inside call_later: the loop's is never reentrant
    await asyncio.sleep(0)
    assert fired == ["now", "past"]
    clock.advance(0.5)
    assert fired == ["now", "past", "later"]


# ------------------------------------------- tiered: closing with a lease call queued


@pytest.mark.anyio
async def test_tiered_close_answers_a_request_waiting_for_its_queued_lease(
    redis_url: str,
) -> None:
    """aclose cancels the tick's lease task; cancelled before its first step it never
    ran its `finally`, so the requests waiting for that lease waited forever (and
    every later request joined the same dead batch)."""
    config = StateConfig(url="tiered+" + redis_url, timeout_ms=5_000, connect_timeout_ms=5_000)
    store = TieredStore(config=config, rng=seeded_random(5))
    spec = LimitSpec("l", 1.0, 10.0, 1, False)
    loop = asyncio.get_running_loop()
    waiting = loop.create_task(store.admit(None, None, ["k"], [spec], 1_000.0))
    await asyncio.sleep(0)  # the request joined this tick's lease; its task has not run
    await store.aclose()
    for _ in range(50):
        if waiting.done():
            break
        await asyncio.sleep(0)
    assert waiting.done()
    waiting.result()  # decided (in the failure mode or not), not hung
    later = await asyncio.wait_for(store.admit(None, None, ["k"], [spec], 1_000.0), 5.0)
    assert later is not None
    await store.aclose()


# ----------------------------------- redis: closing with a tick's batch not yet sent


@pytest.mark.anyio
@pytest.mark.parametrize("ticks", [1, 2])  # 1: the batch task has not run; 2: it is sending
async def test_redis_close_answers_requests_whose_batch_was_not_sent(
    redis_url: str, ticks: int
) -> None:
    """aclose cancels the coalescer's batch task; cancelled before its first step it
    never answered its requests (they waited forever), and the queue kept their list,
    so later requests joined it and waited too."""
    config = StateConfig(url=redis_url, timeout_ms=5_000, connect_timeout_ms=5_000)
    store = RedisStore(config=config, rng=seeded_random(5))
    spec = LimitSpec("l", 1.0, 10.0, 1, False)
    loop = asyncio.get_running_loop()
    waiting = [
        loop.create_task(store.admit(None, None, [f"k{i}"], [spec], 1_000.0)) for i in range(3)
    ]
    for _ in range(ticks):
        await asyncio.sleep(0)
    await store.aclose()
    for _ in range(50):
        if all(w.done() for w in waiting):
            break
        await asyncio.sleep(0)
    assert all(w.done() for w in waiting)
    for w in waiting:
        assert not w.cancelled()  # decided (per on_error), not aborted
        w.result()
    later = await asyncio.wait_for(store.admit(None, None, ["k9"], [spec], 1_000.0), 5.0)
    assert later.admitted
    await store.aclose()


# ------------------------------------ tiered: outcomes a failed sync carried are counted


@pytest.mark.anyio
async def test_tiered_outcomes_lost_with_a_failed_sync_are_counted(
    own_redis: RedisServer,
) -> None:
    """Outcomes of cached gates go to Redis with the next sync; a sync that failed
    dropped them without counting them in `dropped_records` (docs/state.md: Redis
    gates' outcomes are dropped, counted)."""
    clock = FakeClock()
    config = StateConfig(url="tiered+" + own_redis.url, timeout_ms=1_000, connect_timeout_ms=1_000)
    store = TieredStore(config=config, rng=seeded_random(5), clock=clock)
    store._last_sync = math.inf  # no background syncs: the test runs them
    breaker = BreakerConfig(min_calls=100)
    try:
        gate, _source, _age = await store.breaker_gate("route:r", breaker, clock.monotonic())
        assert gate.epoch >= 0  # a gate of the cache, as Redis last said
        for outcome in (FAILURE, FAILURE, SUCCESS):
            store.record_now("route:r", breaker, gate, outcome, False, clock.monotonic())
        before = store.exact.stats.dropped_records
        own_redis.stop()
        clock.advance(1.0)
        await store._sync_all(clock.monotonic())
        assert store.exact.stats.dropped_records - before == 3
    finally:
        await store.aclose()


@pytest.mark.anyio
async def test_a_traced_request_coroutine_closed_in_another_context_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same with tracing on: detaching our span's OpenTelemetry context there
    logged "Failed to detach context" with a traceback."""
    parked = asyncio.get_running_loop().create_future()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await parked

    provider = TracerProvider()
    mw = FidelityMiddleware(app, policy=Policy(), clock=FakeClock(), tracer_provider=provider)
    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "client": ("1.2.3.4", 5)}

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        pass

    coro = mw(scope, receive, send)
    contextvars.copy_context().run(coro.send, None)
    with caplog.at_level(logging.WARNING):
        coro.close()
    parked.cancel()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# ------------------------------------------ `fidelity-mw check` on a file that is not UTF-8


def test_check_reports_a_non_utf8_policy_as_the_middleware_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The middleware refuses such a file as a policy error (not valid TOML: not UTF-8);
    `check`, which validates "the way the middleware will", called it unreadable (a
    usage error, exit 2) without naming the problem as a finding."""
    path = tmp_path / "latin1.toml"
    path.write_bytes('[[rate_limit]]\nname = "caf\xe9"\nrate = "10/s"\n'.encode("latin-1"))
    with pytest.raises(PolicyError, match="not UTF-8"):
        Policy.from_toml(path)
    assert cli_main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: not valid TOML: the file is not UTF-8" in out


@pytest.mark.anyio
async def test_a_fastapi_route_coroutine_closed_in_another_context_ends_quietly() -> None:
    """The same for Fidelity's route class without the middleware."""
    parked = asyncio.get_running_loop().create_future()
    fidelity = Fidelity(policy=Policy(), clock=FakeClock())
    router = APIRouter(route_class=fidelity.route_class)

    @router.get("/x")
    async def x() -> dict[str, str]:
        await parked
        return {}

    app = FastAPI()
    app.include_router(router)
    scope = http_scope("/x", client=("1.2.3.4", 5))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    coro = app(scope, receive, send)
    contextvars.copy_context().run(coro.send, None)
    try:
        coro.close()  # finalised in another context than the route ran in
    except ValueError as exc:
        pytest.fail(f"closing the route's coroutine raised {exc!r}")
    parked.cancel()
