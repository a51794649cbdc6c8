"""`fidelity-mw map` (the state map: each layer's home, staleness bound and failure mode)
against what the Redis store does, on a real redis-server.

Two rows said what the code does not:
- in Redis mode (exact and tiered) the breaker and the retry budget were "about half a
  round trip: decided atomically in Redis". The gate and a retry's spend are; but a plain
  success rides on the process's next call about its breaker, and a request's budget
  count on its next outbound call, each sent at the latest after one `sync_interval_ms`
  (docs/state.md's key table says so; the map did not): another process's window and
  budget are up to a sync interval behind this one's traffic;
- with `on_error = "closed"` every outbound row said "503 + Retry-After: 1", the
  middleware's inbound answer. The transport raises `CircuitOpen` (`retry_after_s` 1)
  without reaching the upstream, before a first attempt (with or without a breaker)
  and before a retry its breaker gates (the caller gets `CircuitOpen`, not the answer
  that was to be retried); without a breaker a retry is not made. operations.md's
  "At a glance" and its `on_error` advice ("`closed` stops retries") said the inbound
  side only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from fidelity_mw import CircuitOpen, FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.decide.breaker import SUCCESS
from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock
from fidelity_mw.tools.statemap import layers_for
from redis_server import PATIENT, QUIET
from test_docs import ROOT

pytestmark = pytest.mark.redis


def rows(policy: Policy) -> dict[tuple[str, str, str], Any]:
    return {(row.direction, row.layer, row.subject): row for row in layers_for(policy)}


def test_the_map_says_what_waits_a_sync_interval(redis_url: str) -> None:
    """The map's staleness of a Redis breaker and budget, and the store holding a plain
    success and a budget count until one sync interval has passed."""
    for url in (redis_url, "tiered+" + redis_url):
        policy = Policy.from_dict({"state": {"url": url}, "upstream": [{"host": "pay"}]})
        layers = rows(policy)
        budget = layers["outbound", "budget", "upstream pay"]
        assert "request counts are batched" in budget.staleness
        assert "at the latest after one sync interval (100 ms" in budget.staleness
        if not url.startswith("tiered+"):
            breaker = layers["outbound", "breaker", "upstream pay"]
            assert "plain successes reach it" in breaker.staleness
            assert "at the latest after one sync interval (100 ms" in breaker.staleness

    async def run() -> None:
        clock = FakeClock()
        config = StateConfig(url=redis_url, **PATIENT, **QUIET)
        store = RedisStore(config=config, clock=clock)
        breaker, key = BreakerConfig(), "upstream:map.internal"
        client = store.client()
        try:
            t0 = clock.monotonic()
            gate, _source, _age = await store.breaker_gate(key, breaker, t0)
            await store.record(key, breaker, gate, SUCCESS, False, t0)
            await store.budget_request("budget:map.internal", RetryConfig(), t0)
            assert store._unsent()[1:] == (1, 1)  # held back: no round trip for them
            assert await client.hget(store.key("br", key), "w") is None
            await asyncio.sleep(0)
            assert store._unsent()[1:] == (1, 1)  # the clock has not moved: still held
            clock.advance(store.sync_s)  # one sync interval later: the timers fire
            for _ in range(50):  # the background sends
                await asyncio.sleep(0)
                for task in (store._deferred_task, store._flush_task):
                    if task is not None and not task.done():
                        await asyncio.wait_for(asyncio.shield(task), 60)
                if store._unsent() == (0, 0, 0):
                    break
            assert store._unsent() == (0, 0, 0)
            # sent one sync interval after they were made, not with the gate's half trip
            assert clock.monotonic() - t0 >= store.sync_s
            assert await client.hget(store.key("br", key), "w") is not None
        finally:
            await store.aclose()

    asyncio.run(run())


def test_fail_closed_outbound_is_what_the_map_says(own_redis: Any, tmp_path: Path) -> None:
    """Redis gone with `on_error = "closed"`: inbound, the middleware's 503 with
    `Retry-After: 1`; outbound, `CircuitOpen` as the map now says (it said 503)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    def policy(breaker: bool) -> Policy:
        up: dict[str, Any] = {"host": "pay.internal", "retry": {"base_ms": 0, "max_ms": 0}}
        if not breaker:
            up["breaker"] = False
        state = {"url": own_redis.url, "on_error": "closed", **PATIENT}
        return Policy.from_dict({"state": state, "upstream": [up]})

    layers = rows(policy(True))
    for layer in ("breaker", "budget"):
        failure = layers["outbound", layer, "upstream pay.internal"].on_failure
        assert "CircuitOpen" in failure, failure
        assert "503" not in failure, failure
    assert (
        "503 + Retry-After: 1"
        in layers[
            "inbound", "breaker", "every other route (framework route template, else !unmatched)"
        ].on_failure
    )
    assert "a retry is not made" in layers["outbound", "budget", "upstream pay.internal"].on_failure

    async def call(p: Policy, stop_after_first: bool) -> tuple[str, int]:
        calls = 0

        def upstream(request: httpx.Request) -> httpx.Response:
            nonlocal calls
            calls += 1
            if stop_after_first:
                own_redis.stop()
            return httpx.Response(503)

        transport = FidelityTransport(httpx.MockTransport(upstream), policy=p, clock=FakeClock())
        async with httpx.AsyncClient(transport=transport) as client:
            try:
                response = await client.get("http://pay.internal/x")
            except CircuitOpen as exc:
                return f"CircuitOpen {exc.retry_after_s:g}", calls
            return str(response.status_code), calls

    # Redis answers the first attempt's gate, then goes: the retry
    assert asyncio.run(call(policy(True), True)) == ("CircuitOpen 1", 1)
    own_redis.start()
    assert asyncio.run(call(policy(False), True)) == ("503", 1)
    # Redis gone before the call: nothing reaches the upstream, breaker or not
    assert asyncio.run(call(policy(True), False)) == ("CircuitOpen 1", 0)
    assert asyncio.run(call(policy(False), False)) == ("CircuitOpen 1", 0)

    async def inbound() -> httpx.Response:
        async def home(request: Any) -> PlainTextResponse:
            return PlainTextResponse("ok")

        app = Starlette(routes=[Route("/", home)])
        app.add_middleware(FidelityMiddleware, policy=policy(True), clock=FakeClock())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get("/")

    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    assert "(`closed`; an outbound call raises `CircuitOpen`)" in operations
    assert "to a host with Redis state raises `CircuitOpen`" in operations

    response = asyncio.run(inbound())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-fidelity-decided-by"] == "state"
