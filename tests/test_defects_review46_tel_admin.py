"""The admin page's figures for a service's instance breakers on Redis.

A Redis breaker's window is read as stored and aged to the server's `TIME` with the
breaker's config (its `window_s`), as `br_rotate` would age it. The page looked the
config up by the key's host: for an instance breaker (`upstream:10.0.0.7:8080`) that is
the instance's address, which no `[[upstream]]` names, so it took the `*` entry's
breaker (the defaults, 30 s window) instead of the service's. With the service's
`window_s = 120`, 40 s after four failures the page showed 0 calls and 0 failures for
a breaker whose window still held all four (the next decision would count them); and
with `breaker = false` on `*`, no aging at all.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis

from fidelity_mw import Engine, FidelityTransport, Policy
from fidelity_mw.admin import AdminApp
from fidelity_mw.testing import FakeClock, seeded_random
from redis_server import PATIENT, QUIET


def _policy(url: str, default_breaker: bool) -> Policy:
    upstreams: list[dict[str, Any]] = [
        {
            "host": "payments",
            "instances": ["http://10.0.0.7:8080", "http://10.0.0.8:8080"],
            "retry": {"attempts": 1},
            # counts failures, never opens here
            "breaker": {"window_s": 120, "min_calls": 100},
        }
    ]
    if not default_breaker:
        upstreams.append({"host": "*", "breaker": False})
    return Policy.from_dict({"state": {"url": url, **PATIENT, **QUIET}, "upstream": upstreams})


@pytest.mark.anyio
@pytest.mark.redis
@pytest.mark.parametrize("default_breaker", [True, False])
async def test_an_instance_breaker_is_aged_with_its_services_window(
    redis_url: str, default_breaker: bool
) -> None:
    engine = Engine(_policy(redis_url, default_breaker), clock=FakeClock(), rng=seeded_random(3))
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(503)), engine=engine
    )
    admin = AdminApp(engine)
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(4):
                assert (await client.get("http://payments/x")).status_code == 503

        def instances(doc: dict[str, Any]) -> dict[str, tuple[int, int]]:
            return {
                b["subject"]: (b["calls"], b["failures"])
                for b in doc["breakers"]
                if b["subject"].startswith("10.0.0.")
            }

        def age_by(seconds: float) -> None:
            # time passing, for the page, which reads the server's TIME: the stored
            # window's end moved that far into the past
            with redis.Redis.from_url(redis_url) as r:
                for host in ("10.0.0.7:8080", "10.0.0.8:8080"):
                    key = store.breaker_keys("upstream:" + host)[0]
                    end = r.hget(key, "be")
                    if end is not None:
                        r.hset(key, "be", float(end) - seconds)

        store: Any = engine.store
        now = instances(await admin.state(engine))
        assert sum(calls for calls, _ in now.values()) == 4, now
        age_by(40.0)  # inside the service's 120 s window
        later = instances(await admin.state(engine))
        # before: {...: (0, 0)} (aged with a 30 s window), or not aged at all
        assert later == now
        age_by(200.0)  # past it
        assert set(instances(await admin.state(engine)).values()) == {(0, 0)}
    finally:
        await engine.aclose()
