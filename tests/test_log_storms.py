"""A fault that lasts logs one line per interval, not one per request (ops8 walkthrough).

Found by running a service under load: Redis out of memory (`maxmemory` +
`noeviction`) or a read-only replica answered every script call with an error and
the store logged each one (~1700 WARNING lines in 5 s from two workers); with
`on_error = "closed"` every request of an outage logged `deciding without state`.
Decisions and metrics still record every one; the log says it once per interval
with a count of the lines it left out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy, RateLimit, _logs
from fidelity_mw.errors import StateUnavailable
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock, seeded_random

logger = logging.getLogger("fidelity_mw.test_log_storms")


@pytest.fixture(autouse=True)
def fake_log_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    clock = FakeClock()
    monkeypatch.setattr(_logs, "clock", clock.monotonic)
    _logs.reset()
    yield clock
    _logs.reset()


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_first_line_at_once_then_one_per_interval_with_a_count(
    fake_log_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logged = [_logs.warn(logger, "OOM", "store said %s", "OOM") for _ in range(100)]
        assert logged == [True] + [False] * 99
        assert _logs.warn(logger, "READONLY", "store said %s", "READONLY")  # another kind
        fake_log_clock.advance(_logs.INTERVAL_S)
        assert _logs.warn(logger, "OOM", "store said %s", "OOM")
        fake_log_clock.advance(_logs.INTERVAL_S)
        assert _logs.warn(logger, "OOM", "store said %s", "OOM")  # none left out since
    said = lines(caplog, "store said OOM")
    assert len(said) == 3
    assert "at most one line per 10 s" in said[0]
    assert said[1] == "store said OOM (99 more like it in the last 10 s, not logged)"
    assert said[2] == "store said OOM"
    assert len(lines(caplog, "store said READONLY")) == 1


class DownStore(MemoryStore):
    """Redis down with on_error = "closed": every admission raises StateUnavailable."""

    def admit_now(self, *args: Any) -> Any:
        raise StateUnavailable("redis is unreachable and state.on_error is 'closed'")


def test_on_error_closed_outage_logs_once_not_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    policy = Policy(
        state=StateConfig(on_error="closed"),
        rate_limits=[RateLimit(name="l", rate="100/s")],
    )
    mw = FidelityMiddleware(
        ok_app, policy=policy, store=DownStore(), clock=FakeClock(), telemetry=False
    )

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [(await client.get("/x")).status_code for _ in range(50)]

    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        assert asyncio.run(run()) == [503] * 50
    assert len(lines(caplog, "deciding without state")) == 1


@pytest.mark.redis
def test_redis_out_of_memory_logs_once_not_per_call(
    own_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    limit = LimitSpec("l", 0.001, 0.5, 1, False)
    with own_redis.client() as admin:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1")  # every write is refused: OOM

    async def run() -> list[str]:
        store = RedisStore(config=StateConfig(url=own_redis.url), rng=seeded_random(3))
        try:
            sources = []
            for i in range(30):
                result = await store.admit(None, None, [f"l|k{i}"], [limit], float(i))
                sources.append(result.source)
            # a tick's admissions share one call (batch.lua): each op errs on its own
            results = await asyncio.gather(
                *(store.admit(None, None, [f"l|b{i}"], [limit], 40.0) for i in range(10))
            )
            return sources + [r.source for r in results]
        finally:
            await store.aclose()

    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        sources = asyncio.run(run())
    assert sources == ["fallback"] * 40  # every decision still says so
    said = lines(caplog, "redis replied with an error")
    assert len(said) == 1
    assert "maxmemory" in said[0]


def test_a_failing_key_function_and_observer_log_one_traceback_not_one_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """App code that fails on every request (a `key=` function reading a header some
    clients omit, an observer whose exporter broke) logged a traceback per request."""

    async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def tenant(scope: Any) -> str:
        raise KeyError("x-tenant")

    class BrokenObserver:
        def start(self, ctx: Any, scope: Any) -> None:
            raise RuntimeError("exporter gone")

        def end(self, ctx: Any, scope: Any, token: Any) -> None:
            raise RuntimeError("exporter gone")

    policy = Policy(rate_limits=[RateLimit(name="per-tenant", rate="1000/s", key=tenant)])
    mw = FidelityMiddleware(ok_app, policy=policy, clock=FakeClock(), observer=BrokenObserver())

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [(await client.get("/x")).status_code for _ in range(30)]

    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        assert asyncio.run(run()) == [200] * 30
    keyed = [r for r in caplog.records if "key function of 'per-tenant' failed" in r.getMessage()]
    assert len(keyed) == 1
    assert keyed[0].exc_info is not None  # the traceback, once
    assert len(lines(caplog, "telemetry observer failed")) == 1


# the middleware's set-up fallback and the outbound attempt observer (rev27i's review)


def errors(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and text in r.getMessage()]


def test_a_request_that_cannot_be_set_up_is_served_and_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    served: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        served.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = FidelityMiddleware(app, policy=Policy(), telemetry=False)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> None:
        for _ in range(5):  # a hand-built scope without "method": set-up fails every time
            scope = {"type": "http", "path": "/x", "headers": [], "query_string": b""}
            await middleware(scope, receive, send)

    with caplog.at_level(logging.ERROR, logger="fidelity_mw"):
        asyncio.run(run())
    assert served == ["/x"] * 5  # never a 500 of ours: each request passed through
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200] * 5
    logged = errors(caplog, "could not set up the request")
    assert len(logged) == 1
    assert logged[0].exc_info is not None  # the first one with its traceback


class BrokenObserver:
    def attempt_start(self, ctx: Any, request: httpx.Request, attempt: int) -> Any:
        raise RuntimeError("observer bug")

    def attempt_end(self, token: Any, response: Any, error: Any) -> None:
        raise RuntimeError("observer bug")


def test_a_failing_attempt_observer_is_logged_once_per_interval_and_calls_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = Policy.from_dict({"upstream": [{"host": "a.internal"}]})
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(200)),
        policy=policy,
        clock=FakeClock(),
        observer=BrokenObserver(),
    )

    async def run() -> list[int]:
        async with httpx.AsyncClient(transport=transport) as client:
            return [(await client.get("http://a.internal/x")).status_code for _ in range(6)]

    with caplog.at_level(logging.ERROR, logger="fidelity_mw"):
        assert asyncio.run(run()) == [200] * 6
    assert len(errors(caplog, "attempt observer failed")) == 1


def test_a_websocket_that_cannot_be_set_up_passes_through_and_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    opened: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        opened.append(scope["path"])
        await receive()
        await send({"type": "websocket.close", "code": 1000})

    policy = Policy(rate_limits=[RateLimit(name="per-client", rate="100/s")])
    middleware = FidelityMiddleware(app, policy=policy, telemetry=False)
    gate = middleware._websockets
    assert gate is not None

    def broken(scope: Any) -> Any:
        raise RuntimeError("plan bug")

    gate.plan_for = broken  # type: ignore[method-assign]

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    async def run() -> None:
        for _ in range(4):
            scope = {"type": "websocket", "path": "/ws", "headers": [], "client": ("1.2.3.4", 1)}
            await middleware(scope, receive, send)

    with caplog.at_level(logging.ERROR, logger="fidelity_mw"):
        asyncio.run(run())
    assert opened == ["/ws"] * 4
    assert len(errors(caplog, "could not set up a websocket")) == 1
