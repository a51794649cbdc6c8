"""Review 40, inbound refusals: an upstream's 504 the transport did not retry.

Given up on after retrying, an upstream's 504 let out of the app is answered 504
(review 39: a timeout one hop down is a gateway timeout, as our own read timeout's
error is). Not retried because the upstream asked for a longer wait than the call
waits (`retry_after_too_long`, marked on the response since review 39), the same
504 was answered 502 `Bad Gateway`: one timeout, two statuses, by whether a retry
was tried. Both are now built by one helper (`refusals._upstream_answer`, which the
broken body's 502/504 shares): 504 for a 504, 502 for the rest.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import (
    BreakerConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio

HOST = "10.0.4.1"


def _app(status: int) -> Any:
    def network(request: httpx.Request) -> httpx.Response:
        # longer than the 2 s the call waits: not retried
        return httpx.Response(status, headers={"retry-after": "10"}, text="later")

    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host=HOST,
                retry=RetryConfig(attempts=3, base_ms=1, max_ms=2, retry_after_max_s=2.0),
                breaker=BreakerConfig(consecutive_failures=50),
            ),
        )
    )
    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(network), telemetry=False)
    )

    async def call(request: Request) -> Response:
        answer = await client.get(f"http://{HOST}/pay")
        answer.raise_for_status()
        return PlainTextResponse("paid")

    app = Starlette(routes=[Route("/pay", call)])
    return FidelityMiddleware(app, policy=policy, clock=FakeClock(), telemetry=False)


@pytest.mark.parametrize(
    ("upstream", "answered", "title"),
    [(504, 504, "Gateway Timeout"), (503, 502, "Bad Gateway"), (502, 502, "Bad Gateway")],
)
async def test_an_upstream_status_not_retried_for_its_wait_keeps_its_kind(
    upstream: int, answered: int, title: str
) -> None:
    transport = httpx.ASGITransport(app=_app(upstream), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        response = await client.get("/pay")
    assert response.status_code == answered
    document = response.json()
    assert document["title"] == title
    assert document["type"].endswith("upstream-failed")
    assert document["detail"] == f"upstream {HOST!r} answered {upstream}"
    assert response.headers["x-fidelity-fault"] == "upstream"
    assert response.headers.get("x-fidelity-retry") is None  # not retried: our caller may
