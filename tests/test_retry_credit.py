"""Retry credit through the whole stack (issue 13 item 6): a client inside its own limit
is not throttled for retrying requests the service failed.

A real Starlette app behind `FidelityMiddleware` calls its upstream through
`FidelityTransport` (real httpx, a mock upstream that answers 503 while the
fault lasts). The client's bucket is full; it sends a burst of 5 (its burst);
4 of them wait on the upstream for a second and then fail (503 after the
transport's retry): their units had refilled meanwhile, so the refunds give
back nothing to the bucket. A second after its first burst the client sends its
next burst of 5 plus the 4 retries. With retry credit all 9 are served; with
`retry_credit_s = 0` the bucket (5 + what refilled) refuses 4 of them.
All on a fake clock.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import (
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RateLimit,
    RetryConfig,
    UpstreamConfig,
    current,
)
from fidelity_mw.context import DecisionContext
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

CLIENT = {"x-client-id": "c1"}


class Rig:
    def __init__(self, retry_credit_s: float) -> None:
        self.clock = FakeClock()
        self.t0 = self.clock.monotonic()
        self.release = asyncio.Event()
        self.waiting = 0
        self.contexts: list[DecisionContext] = []

        async def upstream(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/fail":
                self.waiting += 1
                await self.release.wait()  # in flight until the test says the fault ends
                return httpx.Response(503)
            return httpx.Response(200)

        client = httpx.AsyncClient(
            transport=FidelityTransport(httpx.MockTransport(upstream), telemetry=False)
        )

        async def work(request: Request) -> Response:
            ctx = current()
            assert ctx is not None
            self.contexts.append(ctx)
            what = request.path_params["what"]
            if what in ("breaker", "ratelimit"):
                # another layer refused the request after admission (an outbound breaker
                # before sending, which the app answers; a `Depends(limit)` 429)
                self.waiting += 1
                await self.release.wait()
                ctx.shed_by = what
                return PlainTextResponse("refused", status_code=503 if what == "breaker" else 429)
            answer = await client.get(f"http://api.internal/{what}")
            status = 200 if answer.is_success else 503
            return PlainTextResponse("done", status_code=status)

        policy = Policy(
            breaker=None,
            rate_limits=(
                RateLimit(
                    name="per-client",
                    rate="5/s",
                    burst=5,
                    key="header:x-client-id",
                    retry_credit_s=retry_credit_s,
                ),
            ),
            upstreams=(
                UpstreamConfig(
                    host="api.internal", retry=RetryConfig(attempts=2, base_ms=0), breaker=None
                ),
            ),
        )
        app = Starlette(routes=[Route("/{what}", work)])
        app.add_middleware(
            FidelityMiddleware,
            policy=policy,
            clock=self.clock,
            rng=seeded_random(3),
            telemetry=False,
        )
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://front"
        )

    async def get(self, what: str) -> int:
        return (await self.http.get(f"/{what}", headers=CLIENT)).status_code


async def run(rig: Rig, fail: str = "fail") -> tuple[list[int], list[int]]:
    """The first burst (4 of 5 fail a second later), then retries + the next burst."""
    calls = [asyncio.ensure_future(rig.get(fail)) for _ in range(4)]
    for _ in range(100):  # until the 4 are admitted and waiting on the upstream
        if rig.waiting == 4:
            break
        await asyncio.sleep(0)
    assert rig.waiting == 4
    assert await rig.get("ok") == 200  # the fifth of the burst: the bucket is empty now
    rig.clock.advance(1.0)  # the fault lasts a second: the bucket refilled meanwhile
    rig.release.set()
    first = list(await asyncio.gather(*calls))
    assert rig.clock.monotonic() == rig.t0 + 1.0  # (backoff 0: the retries took no time)
    second = [await rig.get("ok") for _ in range(4 + 5)]  # 4 retries, the next burst
    return first, second


async def test_retries_of_requests_the_service_failed_are_not_throttled() -> None:
    rig = Rig(retry_credit_s=10.0)
    first, second = await run(rig)
    assert first == [503] * 4
    assert second == [200] * 9
    reasons = [
        d.reason for ctx in rig.contexts[-9:] for d in ctx.decisions if d.layer == "ratelimit"
    ]
    assert reasons == ["under_limit"] * 5 + ["retry_credit"] * 4
    # the credit is spent: the client is back to its own limit
    assert await rig.get("ok") == 429


async def test_without_retry_credit_the_retries_are_throttled() -> None:
    rig = Rig(retry_credit_s=0.0)
    first, second = await run(rig)
    assert first == [503] * 4
    assert second == [200] * 5 + [429] * 4


async def test_a_request_another_layer_shed_earns_credit_too() -> None:
    """The app answered 503 for an outbound breaker that refused its call: the service
    failed the request as surely as an upstream 503 does."""
    rig = Rig(retry_credit_s=10.0)
    first, second = await run(rig, "breaker")
    assert first == [503] * 4
    assert second == [200] * 9


async def test_a_429_of_another_limit_earns_no_credit() -> None:
    """A `Depends(limit)` 429 gives the middleware's units back (one layer's refusal costs
    no quota of another) but is the client's own doing: no credit for its retries."""
    rig = Rig(retry_credit_s=10.0)
    first, second = await run(rig, "ratelimit")
    assert first == [429] * 4
    assert second == [200] * 5 + [429] * 4
