"""Review 39: a 5xx the transport did not retry because the upstream asked for a longer
wait than the call waits reached the client as the app's 500.

`retry_after_too_long` after one attempt is not exhausting (we did not retry; our
caller may), so the transport left the response unmarked, and an app's
`raise_for_status()` on it let out an error the middleware did not answer: the
server's bare 500, which our callers' breakers count against us. Seen on the real
chain (tests/test_defects_review38_hops.py, all of C down): C's other instances
paused by their breakers' `Retry-After`, B's retry of a plain 503 refused, B's app
raised, A got a 500. Now the transport marks such a response with its give-up and the
middleware answers the app's error 502 `upstream-failed`, `x-fidelity-fault:
upstream` and the wait as `Retry-After` when the upstream's breaker counted it, not
`exhausted`. A 5xx not retried for no decision of ours (retries off) stays the app's
500.

In process: httpx.ASGITransport in front, the network an httpx.MockTransport.
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

SLOW_DOWN = "10.0.4.1"  # 503, Retry-After: 10 (longer than the 2 s the call waits)
NO_RETRY = "10.0.4.2"  # 503 as well; retries off


def _app(retry_after: str, *, breaker: bool = True) -> Any:
    def network(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"retry-after": retry_after}, text="busy")

    opens = BreakerConfig(consecutive_failures=50) if breaker else None
    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host=SLOW_DOWN,
                retry=RetryConfig(attempts=3, base_ms=1, max_ms=2, retry_after_max_s=2.0),
                breaker=opens,
            ),
            UpstreamConfig(host=NO_RETRY, retry=RetryConfig(attempts=1), breaker=opens),
        )
    )
    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(network), telemetry=False)
    )

    async def call(request: Request) -> Response:
        host = request.path_params["host"]
        answer = await client.get(f"http://{host}/pay")
        answer.raise_for_status()
        return PlainTextResponse("paid")

    app = Starlette(routes=[Route("/pay/{host}", call)])
    return FidelityMiddleware(app, policy=policy, clock=FakeClock(), telemetry=False)


async def _get(app: Any, host: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        return await client.get(f"/pay/{host}")


@pytest.mark.parametrize("breaker", [True, False])
async def test_a_5xx_not_retried_for_its_long_retry_after_is_answered_502(breaker: bool) -> None:
    response = await _get(_app("10", breaker=breaker), SLOW_DOWN)
    assert response.status_code == 502
    assert response.json()["type"].endswith("upstream-failed")
    assert response.headers.get("x-fidelity-retry") is None  # we did not retry: A may
    if breaker:
        # the upstream's breaker counted it: our callers' breakers leave it to that one;
        # and the wait passes on, for a caller that retries
        assert response.headers["x-fidelity-fault"] == "upstream"
        assert int(response.headers["retry-after"]) >= 2
    else:  # nobody counted it: our callers' breakers may
        assert response.headers.get("x-fidelity-fault") is None


async def test_a_5xx_not_retried_because_retries_are_off_stays_the_apps_500() -> None:
    response = await _get(_app("10"), NO_RETRY)
    assert response.status_code == 500


async def test_a_short_retry_after_is_waited_and_the_give_up_exhausts() -> None:
    """(Unchanged: a wait the call could make is made; after the attempts, 502 exhausted.)"""
    response = await _get(_app("1"), SLOW_DOWN)
    assert response.status_code == 502
    assert response.headers["x-fidelity-retry"] == "exhausted"
