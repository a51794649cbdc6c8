"""A breaker the policy no longer has, after a policy swap (`breaker = false`).

The store keeps such a breaker as it was, and nothing uses or updates it again: an
upstream whose breaker was open when a swap set `breaker = false` stayed `open` in the
breaker gauge and on the admin page for good (`[('api', 'open')]` an hour later), and
the example `FidelityBreakerOpen` alert with it, though every call to it now goes
through ungated. From the swap on it leaves both; another upstream's breaker stays.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from fidelity_mw import Engine, FidelityTransport, Policy
from fidelity_mw.admin import AdminApp
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock
from redis_clock import RedisClock
from redis_server import PATIENT
from test_telemetry_helpers import metric_points, pipeline

pytestmark = pytest.mark.anyio

TIGHT = {"consecutive_failures": 1, "min_calls": 1, "open_s": 3600.0, "open_min_s": 3600.0}


def _policy(state: dict[str, Any] | None, api_breaker: bool) -> Policy:
    data: dict[str, Any] = {
        "upstream": [
            {"host": "api", "retry": {"attempts": 1}, "breaker": TIGHT if api_breaker else False},
            {"host": "other", "retry": {"attempts": 1}, "breaker": TIGHT},
        ]
    }
    if state is not None:
        data["state"] = state
    return Policy.from_dict(data)


def _gauge(reader: Any) -> list[tuple[str, str]]:
    return sorted(
        (a[schema.SUBJECT], a[schema.BREAKER_STATE])
        for a, point in metric_points(reader, schema.METRIC_BREAKER_STATE)
        if point.value == 1
    )


async def _page(admin: AdminApp, engine: Engine) -> list[tuple[str, str]]:
    doc = await admin.state(engine)
    return sorted((b["subject"], b["state"]) for b in doc["breakers"] if b["kind"] == "upstream")


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_breaker_the_swap_took_away_leaves_the_gauge_and_the_page(
    store: str, request: pytest.FixtureRequest
) -> None:
    state = None
    if store == "redis":
        redis_url = request.getfixturevalue("redis_url")
        request.getfixturevalue("redis_clock")
        state = {"url": redis_url, **PATIENT}
    clock = FakeClock()
    engine = Engine(_policy(state, api_breaker=True), clock=clock)
    p = pipeline()
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(503)),
        engine=engine,
        observer=p.telemetry,
    )
    admin = AdminApp(engine)
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            for host in ("api", "other"):
                assert (await client.get(f"http://{host}/x")).status_code == 503  # opens it
                with pytest.raises(httpx.TransportError):  # refused: open (Redis: seen so)
                    await client.get(f"http://{host}/x")
            assert _gauge(p.metrics) == [("api", "open"), ("other", "open")]
            assert await _page(admin, engine) == [("api", "open"), ("other", "open")]

            engine.policy = _policy(state, api_breaker=False)
            # before: [('api', 'open'), ('other', 'open')], an hour later still
            assert _gauge(p.metrics) == [("other", "open")]
            assert await _page(admin, engine) == [("other", "open")]
            assert (await client.get("http://api/x")).status_code == 503  # sent, ungated
            clock.advance(3600.0)
            if store == "redis":
                redis_clock: RedisClock = request.getfixturevalue("redis_clock")
                redis_clock.set(redis_clock.now + 3600.0)
            assert ("api", "open") not in _gauge(p.metrics)
            assert ("api", "open") not in await _page(admin, engine)

            if store == "memory":  # given back: the store's breaker, as it is, again
                engine.policy = _policy(state, api_breaker=True)
                assert ("api", "open") in _gauge(p.metrics)
    finally:
        await engine.aclose()
        p.shutdown()
