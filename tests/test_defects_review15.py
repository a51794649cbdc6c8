"""Review 15: the route naming (route12) and operator (rev12) changes, seen afresh; each
test failed before its fix.

1. The state URL check refused parameters that worked: `?protocol=3` (redis-py 8's own
   default) or `?protocol=2`, `?decode_responses=true` (the store reads str replies as
   it reads bytes), and a blank value (`?db=` from an empty template variable), which
   redis-py leaves out. A policy that ran before the upgrade no longer started. And a
   TLS key's `?ssl_password=` was shown in policy errors and `fidelity-mw map`.
2. A `Mount("/")` (FastAPI's `app.mount("/", StaticFiles(...))`) gave the `http.route`
   template `/{path}/{path:path}`.
3. The plan cache keyed a `Host` app's plans by the Host header cut at its first colon:
   every IPv6 literal was `[`, so `[::2]` got the plan (and the name) of `[::1]`.
4. A throttled warning whose end-of-interval line was lost (the loop that was to run it
   closed: `asyncio.run` per job, a test's loop, a forked worker) never scheduled one
   again for that message: the flag was carried to every later entry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Host, Mount, Route, Router

from fidelity_mw import FidelityMiddleware, Policy, PolicyError, RateLimit, _logs
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT


async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def _url_problems(url: str) -> list[str]:
    try:
        Policy.from_dict({"state": {"url": url}})
    except PolicyError as exc:
        return [f"{i.path}: {i.message}" for i in exc.issues]
    return []


# ------------------------------------------- 1. state URLs that worked before the check


def test_a_state_url_that_worked_before_the_check_still_passes() -> None:
    for fine in (
        "redis://r:6379/0?protocol=3",
        "rediss://r:6380/0?protocol=2&ssl_cert_reqs=none",
        "redis://r:6379/0?decode_responses=true",
        "redis://r:6379/0?encoding=utf-8",
        # a blank value is left out by redis-py (an empty template variable)
        "redis://r:6379/0?db=&password=",
        "redis://r:6379/0?ssl_cert_reqs=",
        "unix:///run/redis.sock?health_check_interval=",
    ):
        assert _url_problems(fine) == [], fine
    [protocol] = _url_problems("redis://r:6379/0?protocol=4")
    assert "protocol=4: write 2 or 3" in protocol
    # still refused: what the store sets itself
    assert _url_problems("redis://r:6379/0?socket_timeout=5")


def test_a_unix_socket_url_with_socket_keepalive_is_a_policy_error() -> None:
    """A unix socket connection takes no `socket_keepalive` (redis-py: a TypeError at
    the first connection, the middleware then ran without state)."""
    [problem] = _url_problems("unix:///run/redis.sock?socket_keepalive=true")
    assert "socket_keepalive" in problem
    assert "unix" in problem


@pytest.mark.anyio
@pytest.mark.parametrize("query", ["protocol=3", "protocol=2", "decode_responses=true"])
async def test_the_store_counts_in_redis_with_those_parameters(redis_url: str, query: str) -> None:
    config = StateConfig(url=f"{redis_url}?{query}", on_error="closed", **PATIENT)
    store = RedisStore(config=config)
    policy = Policy(
        rate_limits=[RateLimit(name="per-client", rate="2/s", match="/*")], state=config
    )
    app = Starlette(routes=[Route("/x", _ok)])
    app.add_middleware(FidelityMiddleware, policy=policy, store=store, telemetry=False)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            codes = [(await client.get("/x")).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        assert store.health.up
    finally:
        await store.aclose()


def test_a_tls_key_passphrase_in_the_state_url_is_never_shown() -> None:
    """`?ssl_password=` (the key file's passphrase) was shown whole in policy errors and
    `fidelity-mw map`: only `?password=` was masked."""
    [problem] = _url_problems("redis://r:6379/0?ssl_password=hunter2")
    assert "hunter2" not in problem
    assert "ssl_password=***" in problem


# ------------------------------------------- 2. a root mount's template


def test_a_root_mount_has_the_template_starlette_routes_it_by() -> None:
    app = Starlette(routes=[Route("/a", _ok), Mount("/", app=PlainTextResponse("static"))])
    engine = FidelityMiddleware(app, policy=Policy(), telemetry=False).engine
    plan = engine.plan_for(_scope("/index.html", "t"))
    assert plan.template == "/{path:path}"
    assert plan.route == "/{path}/*"  # the name (the identity) as before


# ------------------------------------------- 3. the plan cache under IPv6 literal hosts


def _scope(path: str, host: str, method: str = "GET") -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "headers": [(b"host", host.encode())],
    }


def test_two_ipv6_hosts_keep_two_plans() -> None:
    app = Starlette(
        routes=[
            Host("[::1]", app=Router(routes=[Route("/items/{id}", _ok)])),
            Host("[::2]", app=Router(routes=[Route("/items/{id}", _ok)])),
        ]
    )
    engine = FidelityMiddleware(app, policy=Policy(), telemetry=False).engine
    assert engine.plan_for(_scope("/items/1", "[::1]:8000")).route == "[::1]/items/{id}"
    assert engine.plan_for(_scope("/items/1", "[::2]:8000")).route == "[::2]/items/{id}"
    # with its port or without: the same host, the same plan
    plan = engine.plan_for(_scope("/items/1", "[::1]"))
    assert engine.plan_for(_scope("/items/1", "[::1]:8000")) is plan


# ------------------------------------------- 4. a lost end-of-interval line


def test_a_lost_end_of_interval_line_does_not_stop_later_ones(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    later: list[tuple[float, Callable[[], None]]] = []

    def schedule(delay: float, callback: Callable[[], None]) -> bool:
        later.append((clock.monotonic() + delay, callback))
        return True

    monkeypatch.setattr(_logs, "clock", clock.monotonic)
    monkeypatch.setattr(_logs, "schedule", schedule)
    _logs.reset()
    log = logging.getLogger("fidelity_mw.test_review15")
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert _logs.warn(log, "OOM", "redis said %s", "OOM")
        clock.advance(1.0)
        assert not _logs.warn(log, "OOM", "redis said %s", "OOM")
        assert len(later) == 1
        later.clear()  # its loop closed: the line never runs
        clock.advance(20.0)
        assert _logs.warn(log, "OOM", "redis said %s", "OOM")  # tells the 1 left out
        clock.advance(1.0)
        assert not _logs.warn(log, "OOM", "redis said %s", "OOM")
        assert len(later) == 1  # before: none, ever again, for this message
        clock.advance(9.0)
        later.pop()[1]()
    said = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert said[-1] == (
        "redis said OOM (1 more like it in the last 10 s, not logged; the last 9.0 s ago)"
    )
