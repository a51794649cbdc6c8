"""The breaker gauge on shared state follows a breaker back to closed (ops8 walkthrough).

On Redis or tiered state the gauge cannot read the store and reports the state
the last decision revealed. An outbound attempt that a closed host breaker lets
through records no breaker decision (only probes and refusals do), so after an
upstream recovered the gauge stayed on `open` (or `half_open`) for good: in the
walkthrough 20 successful calls later it still said open on one worker and
half_open on the other, and `FidelityBreakerOpen` (examples/prometheus/alerts.yml)
would have fired until the processes restarted. It also named no
`fidelity.breaker.scope`, unlike the memory store's series.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from fidelity_mw import Engine, FidelityTransport, Policy
from fidelity_mw.context import Decision, DecisionContext
from fidelity_mw.errors import CircuitOpen
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock
from redis_clock import RedisClock
from test_telemetry_helpers import metric_points, pipeline


def gauge(reader: Any, subject: str) -> dict[tuple[str, str | None], int]:
    return {
        (a[schema.BREAKER_STATE], a.get(schema.BREAKER_SCOPE)): p.value
        for a, p in metric_points(reader, "fidelity.breaker.state")
        if a[schema.SUBJECT] == subject
    }


def current(reader: Any, subject: str) -> list[tuple[str, str | None]]:
    return [k for k, v in gauge(reader, subject).items() if v == 1]


def test_an_attempt_without_a_probe_reveals_a_closed_host_breaker() -> None:
    p = pipeline()

    def call(*decisions: Decision) -> list[tuple[str, str | None]]:
        ctx = DecisionContext(engine=Engine(), route="/x", method="GET", started_at=0.0)
        ctx.engine.store = object()  # type: ignore[assignment]  # a store it cannot read
        for d in decisions:
            ctx.add(d)
        p.telemetry.call_end(ctx)
        return current(p.metrics, "api:443")

    attempt = Decision("retry", "api:443", "allow", "attempt", "redis", 0.001, 1.0)
    refused = Decision("breaker", "api:443", "give_up", "breaker_open", "redis", 0.001, 1.0)
    probe = Decision("breaker", "api:443", "probe", "half_open_probe", "redis", 0.001, 2.0)
    assert call(attempt, refused) == [("open", "upstream")]
    # the probe's own attempt proves nothing yet
    assert call(probe, attempt) == [("half_open", "upstream")]
    # an attempt the gate let through without a probe: the breaker is closed again
    assert call(attempt) == [("closed", "upstream")]
    p.shutdown()


def test_route_breaker_decisions_carry_the_route_scope() -> None:
    p = pipeline()
    ctx = DecisionContext(engine=Engine(), route="/orders", method="GET", started_at=0.0)
    ctx.engine.store = object()  # type: ignore[assignment]
    ctx.add(Decision("breaker", "/orders", "shed", "breaker_open", "redis", 0.001, 1.0))
    token = p.telemetry.start(ctx, {"type": "http", "headers": [], "path": "/orders"})
    ctx.decided_by, ctx.outcome, ctx.status = "breaker", "shed", 503
    p.telemetry.end(ctx, {}, token)
    assert current(p.metrics, "/orders") == [("open", "route")]
    p.shutdown()


@pytest.mark.anyio
@pytest.mark.redis
async def test_gauge_on_redis_returns_to_closed_when_the_upstream_recovers(
    redis_url: str, redis_clock: RedisClock
) -> None:
    failing = True

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503 if failing else 200)

    policy = Policy.from_dict(
        {
            "state": {"url": redis_url},
            "upstream": [
                {
                    "host": "api",
                    "retry": {"attempts": 1},
                    "breaker": {"consecutive_failures": 1, "min_calls": 1},
                }
            ],
        }
    )
    engine = Engine(policy, clock=FakeClock())
    p = pipeline()
    transport = FidelityTransport(
        httpx.MockTransport(upstream), engine=engine, observer=p.telemetry
    )
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get("http://api/x")).status_code == 503  # opens it
            with pytest.raises(CircuitOpen):
                await client.get("http://api/x")
            assert current(p.metrics, "api") == [("open", "upstream")]
            failing = False
            redis_clock.set(redis_clock.now + 60.0)  # past any open period
            assert (await client.get("http://api/x")).status_code == 200  # the probe
            assert (await client.get("http://api/x")).status_code == 200
            assert current(p.metrics, "api") == [("closed", "upstream")]
    finally:
        await engine.aclose()
        p.shutdown()
