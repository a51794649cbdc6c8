"""Review 45 (hop45, item 2): an upstream's 429 given up on is answered 503, not 502.

hop44 measured it from outside (benchmarks/hops_blackbox.py, `b_limited`): B limited by
its own policy answered A 429 with `Retry-After`; A's transport retried after the waits,
gave up, and A's app let `raise_for_status()` out, which the middleware answered as the
upstream's failure: **502** `upstream-failed`. A 429 is a valid answer, not a bad
gateway, and the client did not cause B's limit, so it must not get a 429 either: it
gets **503** `upstream-throttled` with the wait, `x-fidelity-retry: exhausted` (we
retried: our callers do not) and `x-fidelity-fault: upstream` (the limit is our
upstream's, as an upstream's failure is: our callers' breakers leave it alone). So too
`upstream_failure_response` for a 429 the app answers itself.
"""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fidelity_mw import (
    BreakerConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
    upstream_failure_response,
)
from fidelity_mw.testing import FakeClock, seeded_random


def _chain() -> tuple[Starlette, list[int]]:
    """A's route calls B and lets `raise_for_status()` out; B answers the first call and
    then refuses every call by its limit (429, `Retry-After: 1`, as B's own middleware
    answers), all on one fake clock."""
    clock = FakeClock()
    calls: list[int] = []

    def b(request: httpx.Request) -> httpx.Response:
        status = 200 if not calls else 429
        calls.append(status)
        if status == 200:
            return httpx.Response(200, content=b"b")
        headers = {"retry-after": "1", "x-fidelity-decided-by": "ratelimit"}
        return httpx.Response(429, headers=headers)

    retry = RetryConfig(attempts=3, base_ms=1, max_ms=1, retry_after_max_s=5.0)
    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(b), clock=clock, telemetry=False)
    )

    async def a_route(request: Request) -> Response:
        answer = await client.get("http://b/b")
        answer.raise_for_status()
        return Response(answer.content)

    a = Starlette(routes=[Route("/", a_route)])
    a.add_middleware(
        FidelityMiddleware,
        policy=Policy(
            breaker=BreakerConfig(consecutive_failures=2, min_calls=2),
            upstreams=(UpstreamConfig(host="b", retry=retry),),
        ),
        clock=clock,
        rng=seeded_random(1),
        telemetry=False,
    )
    return a, calls


def _get(app: Starlette, n: int) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
            return [await client.get("/") for _ in range(n)]

    return asyncio.run(go())


def test_a_callees_429_given_up_on_reaches_the_client_as_503_with_the_wait() -> None:
    app, calls = _chain()
    first, second, third = _get(app, 3)
    assert first.status_code == 200
    # B's limit then refuses every try of A's (3 attempts, each after B's wait) ...
    assert calls == [200] + [429] * 6
    for r in (second, third):
        # ... before: 502 `upstream-failed`, a bad gateway the client could not tell from
        # a broken B
        assert r.status_code == 503, (r.status_code, r.text)
        assert r.json()["type"] == "urn:fidelity-mw:problem:upstream-throttled"
        assert r.json()["title"] == "Service Unavailable"
        assert r.headers["x-fidelity-retry"] == "exhausted"
        assert r.headers["x-fidelity-fault"] == "upstream"
        assert int(r.headers["retry-after"]) >= 1
        # not our own refusal: no layer of ours decided it
        assert "x-fidelity-decided-by" not in r.headers


def test_the_503_for_a_429_is_no_failure_of_the_route_breaker() -> None:
    app, _ = _chain()
    statuses = [r.status_code for r in _get(app, 5)]
    # the route breaker opens after 2 consecutive failures: counted, the 4th would be shed
    assert statuses == [200, 503, 503, 503, 503]


def test_upstream_failure_response_answers_a_429_with_503() -> None:
    request = httpx.Request("GET", "http://pay.example/charge")
    response = httpx.Response(429, headers={"retry-after": "4"}, request=request)
    exc = httpx.HTTPStatusError("throttled", request=request, response=response)
    answer = upstream_failure_response(exc)
    assert answer.status_code == 503
    assert b"upstream-throttled" in answer.body
    # a 5xx stays a bad gateway
    failed = httpx.Response(500, request=request)
    exc500 = httpx.HTTPStatusError("failed", request=request, response=failed)
    assert upstream_failure_response(exc500).status_code == 502
