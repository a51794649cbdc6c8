"""Review 41: the middleware's warning for an upstream's failure the app let out.

Every such answer was logged as "the app let out X from an upstream it gave up on
after retrying", also for the ones nothing retried: a POST's 5xx that may not be sent
again, a 5xx not retried because the upstream asked for a longer wait than the call
waits, a body that broke while the app read it. An operator reading the log looked for
retries that never happened. The line now says what happened (the problem document's
own words), and "after retrying" only where the outbound layer did retry.
"""

from __future__ import annotations

import logging
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


def _app(method: str, status: int, retry_after: str | None) -> Any:
    def network(request: httpx.Request) -> httpx.Response:
        headers = {} if retry_after is None else {"retry-after": retry_after}
        return httpx.Response(status, headers=headers, text="no")

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
        answer = await client.request(method, f"http://{HOST}/pay")
        answer.raise_for_status()
        return PlainTextResponse("paid")

    app = Starlette(routes=[Route("/pay", call, methods=["GET", "POST"])])
    return FidelityMiddleware(app, policy=policy, clock=FakeClock(), telemetry=False)


async def _let_out(
    caplog: pytest.LogCaptureFixture, method: str, status: int, retry_after: str | None
) -> tuple[httpx.Response, str]:
    app = _app(method, status, retry_after)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            response = await client.request(method, "/pay")
    lines = [r.getMessage() for r in caplog.records if "let out" in r.getMessage()]
    assert len(lines) == 1, lines
    return response, lines[0]


async def test_a_post_not_sent_again_is_not_said_to_be_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    response, line = await _let_out(caplog, "POST", 503, None)
    assert response.status_code == 502
    assert response.headers.get("x-fidelity-retry") is None
    assert "retrying" not in line
    assert f"upstream {HOST!r} answered 503" in line
    assert "; answered 502" in line


async def test_a_5xx_not_retried_for_its_wait_is_not_said_to_be_retried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    response, line = await _let_out(caplog, "GET", 503, "10")
    assert response.status_code == 502
    assert "retrying" not in line
    assert f"upstream {HOST!r} answered 503" in line


async def test_a_give_up_after_retries_still_says_so(caplog: pytest.LogCaptureFixture) -> None:
    response, line = await _let_out(caplog, "GET", 503, None)
    assert response.status_code == 502
    assert response.headers["x-fidelity-retry"] == "exhausted"
    assert f"upstream {HOST!r} answered 503 after retrying" in line
