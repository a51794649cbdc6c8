"""Review 37: an outbound refusal or give-up that reaches the middleware inside an
exception group (the calls of an `asyncio.TaskGroup`, or of anyio's task group, which
FastAPI apps use) is answered as the same error let out alone: 503 for a `CircuitOpen`,
502 for an upstream given up on after retrying. It was the server's bare 500 (and, for an
app wrapped from outside, Starlette's ServerErrorMiddleware's 500 went out before we saw
the group). A group with an error of the app's own stays the app's 500. Through a real
uvicorn server and httpx."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from _loopback import LoopbackServer
from fidelity_mw import (
    BreakerConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock

BROKEN = "http://10.0.3.1:8080/"  # refuses connections; its breaker opens on one failure
RETRIED = "http://10.0.3.2:8080/"  # refuses connections; retried, no breaker
FINE = "http://10.0.3.3:8080/"


def _policy() -> Policy:
    return Policy(
        breaker=None,
        upstreams=(
            UpstreamConfig(
                host="10.0.3.1",
                retry=RetryConfig(attempts=1),
                breaker=BreakerConfig(consecutive_failures=1, open_min_s=30.0, open_s=60.0),
            ),
            UpstreamConfig(
                host="10.0.3.2", retry=RetryConfig(attempts=2, base_ms=1, max_ms=1), breaker=None
            ),
        ),
    )


def _client(clock: FakeClock) -> httpx.AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "10.0.3.3":
            return httpx.Response(200)
        raise httpx.ConnectError("connection refused", request=request)

    return httpx.AsyncClient(
        transport=FidelityTransport(
            httpx.MockTransport(answer), policy=_policy(), clock=clock, telemetry=False
        )
    )


async def _asyncio_group(client: httpx.AsyncClient, urls: list[str]) -> None:
    async with asyncio.TaskGroup() as tg:
        for url in urls:
            tg.create_task(client.get(url))


async def _anyio_group(client: httpx.AsyncClient, urls: list[str]) -> None:
    async with anyio.create_task_group() as tg:
        for url in urls:
            tg.start_soon(client.get, url)


def _app(client: httpx.AsyncClient, group: Callable[..., Any]) -> Starlette:
    async def both(request: Request) -> Response:
        await group(client, [request.query_params["url"], FINE])
        return PlainTextResponse("ok")

    async def own_bug(request: Request) -> Response:
        async def bug() -> None:
            raise RuntimeError("the app's own bug")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(client.get(BROKEN))
            tg.create_task(bug())
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", both), Route("/own", own_bug)])


@pytest.mark.parametrize("group", [_asyncio_group, _anyio_group])
@pytest.mark.parametrize("wrapped", ["outside", "add_middleware"])
def test_a_task_groups_refusal_and_give_up_are_answered_as_let_out_alone(
    group: Callable[..., Any], wrapped: str
) -> None:
    clock = FakeClock()
    app: Any = _app(_client(clock), group)
    if wrapped == "outside":
        app = FidelityMiddleware(app, policy=_policy(), clock=clock, telemetry=False)
    else:
        app.add_middleware(FidelityMiddleware, policy=_policy(), clock=clock, telemetry=False)
    no_reuse = httpx.Limits(max_keepalive_connections=0)  # (uvicorn closes after a raise)
    with LoopbackServer(app) as server, httpx.Client(base_url=server.url, limits=no_reuse) as c:
        c.get("/", params={"url": BROKEN})  # (its one failure opens that breaker)
        refused = c.get("/", params={"url": BROKEN})
        assert refused.status_code == 503
        assert refused.headers["x-fidelity-decided-by"] == "breaker"
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["content-type"] == "application/problem+json"
        gave_up = c.get("/", params={"url": RETRIED})
        assert gave_up.status_code == 502
        assert gave_up.headers["x-fidelity-retry"] == "exhausted"
        assert gave_up.json()["upstream"] == "10.0.3.2:8080"
        own = c.get("/own")  # a refusal beside an error of the app's own: the app's 500
        assert own.status_code == 500
        assert "x-fidelity-decided-by" not in own.headers
