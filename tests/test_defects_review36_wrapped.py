"""Review 36: an outbound refusal that escapes a Starlette or FastAPI app is answered by the
middleware (503 + Retry-After, decided by the breaker) however the app is wrapped: also
`FidelityMiddleware(app, ...)` from outside, where Starlette's ServerErrorMiddleware
inside us answered it 500 first (and we saw the exception only after that 500 went
out). Through a real uvicorn server and httpx."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
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

UP = "http://10.0.3.1:8080/"


def _policy() -> Policy:
    breaker = BreakerConfig(consecutive_failures=1, open_min_s=30.0, open_s=60.0)
    return Policy(
        breaker=None,
        upstreams=(UpstreamConfig(host="*", retry=RetryConfig(attempts=1), breaker=breaker),),
    )


def _client(clock: FakeClock) -> httpx.AsyncClient:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    return httpx.AsyncClient(
        transport=FidelityTransport(
            httpx.MockTransport(refused), policy=_policy(), clock=clock, telemetry=False
        )
    )


def _caller(server: LoopbackServer) -> httpx.Client:
    # (a connection per request: uvicorn closes one whose app raised)
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    return httpx.Client(base_url=server.url, limits=no_reuse)


def _starlette(client: httpx.AsyncClient) -> Any:
    async def page(request: Request) -> Response:
        await client.get(UP)  # CircuitOpen, let out
        return PlainTextResponse("ok")

    async def own(request: Request) -> Response:
        raise RuntimeError("the app's own bug")

    return Starlette(routes=[Route("/", page), Route("/own", own)])


def _fastapi(client: httpx.AsyncClient) -> Any:
    app = FastAPI()

    @app.get("/")
    async def page() -> str:
        await client.get(UP)
        return "ok"

    @app.get("/own")
    async def own() -> str:
        raise RuntimeError("the app's own bug")

    return app


@pytest.mark.parametrize("build", [_starlette, _fastapi])
@pytest.mark.parametrize("wrapped", ["outside", "add_middleware"])
def test_an_escaped_circuit_open_is_a_503_however_the_app_is_wrapped(
    build: Callable[[httpx.AsyncClient], Any], wrapped: str
) -> None:
    clock = FakeClock()
    client = _client(clock)
    app = build(client)
    if wrapped == "outside":
        app = FidelityMiddleware(app, policy=_policy(), clock=clock, telemetry=False)
    else:
        app.add_middleware(FidelityMiddleware, policy=_policy(), clock=clock, telemetry=False)
    with LoopbackServer(app) as server, _caller(server) as caller:
        # the upstream refuses the first call, which opens its breaker (the app's
        # 500 for that: outside, Starlette's; inside, the middleware's 502)
        assert caller.get("/").status_code in (500, 502)
        answer = caller.get("/")
        assert answer.status_code == 503  # (outside: 500, Starlette's)
        assert answer.headers["x-fidelity-decided-by"] == "breaker"
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.headers["content-type"] == "application/problem+json"
        # the app's own error stays its 500, with Starlette's body
        own = caller.get("/own")
        assert own.status_code == 500
        assert own.text == "Internal Server Error"
        assert "x-fidelity-decided-by" not in own.headers
        # and the next request is answered as the first
        assert caller.get("/").status_code == 503


def test_with_answer_refusals_off_the_handlers_500_goes_out_as_before() -> None:
    clock = FakeClock()
    client = _client(clock)
    app = FidelityMiddleware(
        _starlette(client), policy=_policy(), clock=clock, telemetry=False, answer_refusals=False
    )
    with LoopbackServer(app) as server, _caller(server) as caller:
        caller.get("/")  # (opens the breaker)
        answer = caller.get("/")
        assert answer.status_code == 500
        assert answer.text == "Internal Server Error"
