"""Review 43 (rvw43): a trusted callee's advice, refused a retry, is not spread again.

B answers A 503 `x-fidelity-fault: upstream` with `Retry-After: 1`: its middleware's
advice after its own upstream failed, spread by B already (`decisions.advised`). A retries
such an answer after its wait; when A's retry budget refuses that retry, A's give-up
passes B's `Retry-After` on (fix43: never before it), and it was spread again: the client
was told 2 where B said 1, the spread of spreads review 39 took out of the give-up that
does not retry. The refusal now passes a trusted callee's advice on as it is; an
upstream's own `Retry-After` (no marker) is still spread by the hop that gave up on it.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.testing import FakeClock, seeded_random

UPSTREAM = "http://10.0.3.1:8080/"  # inside the default trusted_peers


def _refused_retries(headers: dict[str, str], service: bool = False) -> Starlette:
    """A service whose route calls an upstream of ours that answers 503 `Retry-After: 1`
    with `headers`, and answers 502 for it; its retry budget refuses every retry. With
    `service`, the upstream is a service of two instances (the loop's instance step)."""
    clock = FakeClock()

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"retry-after": "1", **headers})

    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(upstream), clock=clock, telemetry=False)
    )

    async def route(request: Request) -> Response:
        await client.get("http://svc.internal/" if service else UPSTREAM)
        return Response(b"upstream failed", 502)

    app = Starlette(routes=[Route("/", route)])
    retry = RetryConfig(
        attempts=3, base_ms=1, max_ms=1, retry_after_max_s=2.0,
        budget_ratio=0.0, budget_min_per_s=0.0,
    )  # fmt: skip
    if service:
        instances = ("http://10.0.3.1:8080", "http://10.0.3.2:8080")
        upstream_cfg = UpstreamConfig(host="svc.internal", retry=retry, instances=instances)
    else:
        upstream_cfg = UpstreamConfig(host="*", retry=retry)
    policy = Policy(upstreams=(upstream_cfg,))
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock, rng=seeded_random(7), telemetry=False
    )
    return app


def _advised(app: Starlette, n: int) -> list[str]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            return [await client.get("/") for _ in range(n)]

    answers = asyncio.run(go())
    assert [r.status_code for r in answers] == [502] * n
    return [r.headers.get("retry-after", "") for r in answers]


@pytest.mark.parametrize("service", [False, True], ids=["host", "service"])
def test_a_callees_advice_refused_a_retry_is_passed_on_not_spread_again(service: bool) -> None:
    # before: 1 plus a draw from [0, 0.5) s, rounded up: "2" (12 of 12 with this seed)
    marker = {"x-fidelity-fault": "upstream"}
    assert _advised(_refused_retries(marker, service), 12) == ["1"] * 12


@pytest.mark.parametrize("service", [False, True], ids=["host", "service"])
def test_an_upstreams_own_retry_after_refused_a_retry_is_still_spread(service: bool) -> None:
    advised = [int(v) for v in _advised(_refused_retries({}, service), 12)]
    assert all(1 <= v <= 2 for v in advised), advised
    assert 2 in advised, advised
