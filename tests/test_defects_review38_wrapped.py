"""Review 38: an app's own error raised `from` an outbound refusal or give-up is answered
as the refusal or give-up itself.

An app that turns the transport's error into one of its own
(`raise PaymentsDown(...) from exc`) let out an error the route breaker already ignored
and whose units it gave back (`raised_by_refusal`, `raised_by_upstream`), but the client
got the server's bare 500: no `Retry-After`, no `x-fidelity-retry: exhausted`, and a
caller's breaker counted our refusal as our failure. The middleware answers it as it
answers the un-wrapped error: 503 + `Retry-After` for an open breaker, 502 with the
exhausted marker after a give-up. Only an explicit cause counts: an error raised while
handling one (`__context__`, a bug in a fallback) stays the app's 500.

In process (httpx.ASGITransport) and through a real uvicorn server, the middleware
wrapping the app from outside (Starlette's ServerErrorMiddleware inside it answers the
500 first: held) and added with `add_middleware` (the error reaches it first)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

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
    RateLimit,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock

DOWN = "http://10.0.3.1:8080/"  # refuses connections: its breaker opens at once
FLAKY = "http://10.0.3.2:8080/"  # refuses connections: retried, then given up on


class PaymentsDown(Exception):
    """The app's own error for an upstream it could not use."""


def _policy() -> Policy:
    opens = BreakerConfig(consecutive_failures=1, open_min_s=30.0, open_s=60.0)
    return Policy(
        breaker=BreakerConfig(consecutive_failures=1, open_min_s=30.0, open_s=60.0),
        rate_limits=(RateLimit(name="per-client", rate="5/h", burst=5, charge="served"),),
        upstreams=(
            UpstreamConfig(host="10.0.3.1", retry=RetryConfig(attempts=1), breaker=opens),
            UpstreamConfig(host="10.0.3.2", retry=RetryConfig(attempts=2), breaker=None),
        ),
    )


def _app(clock: FakeClock) -> Starlette:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = httpx.AsyncClient(
        transport=FidelityTransport(
            httpx.MockTransport(refused), policy=_policy(), clock=clock, telemetry=False
        )
    )

    def calling(url: str, how: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                await client.get(url)
            except httpx.HTTPError as exc:
                if how == "from":
                    raise PaymentsDown("payments are unavailable") from exc
                if how == "during":  # a fallback's own bug while handling it
                    raise PaymentsDown("the fallback failed")  # noqa: B904
                raise
            return PlainTextResponse("paid")

        return endpoint

    async def grouped(request: Request) -> Response:
        # two calls in a task group, each error turned into the app's own
        async def one() -> None:
            try:
                await client.get(DOWN)
            except httpx.HTTPError as exc:
                raise PaymentsDown("payments are unavailable") from exc

        async with asyncio.TaskGroup() as group:
            group.create_task(one())
            group.create_task(one())
        return PlainTextResponse("paid")

    async def own(request: Request) -> Response:
        raise PaymentsDown("the app's own bug")

    return Starlette(
        routes=[
            Route("/open", calling(DOWN, "")),
            Route("/down", calling(DOWN, "")),
            Route("/down-from", calling(DOWN, "from")),
            Route("/down-during", calling(DOWN, "during")),
            Route("/flaky", calling(FLAKY, "")),
            Route("/flaky-from", calling(FLAKY, "from")),
            Route("/grouped", grouped),
            Route("/own", own),
        ]
    )


def _built(wrapped: str) -> Any:
    clock = FakeClock()
    app = _app(clock)
    options: dict[str, Any] = {"policy": _policy(), "clock": clock, "telemetry": False}
    if wrapped == "outside":
        return FidelityMiddleware(app, **options)
    app.add_middleware(FidelityMiddleware, **options)
    return app


@contextmanager
def _served(app: Any, where: str) -> Iterator[Callable[[str], httpx.Response]]:
    if where == "uvicorn":
        no_reuse = httpx.Limits(max_keepalive_connections=0)  # (uvicorn closes after an error)
        with LoopbackServer(app) as server, httpx.Client(base_url=server.url, limits=no_reuse) as c:
            yield c.get
        return
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    def get(path: str) -> httpx.Response:
        async def one() -> httpx.Response:
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await c.get(path)

        return asyncio.run(one())

    yield get


@pytest.mark.parametrize("where", ["in_process", "uvicorn"])
@pytest.mark.parametrize("wrapped", ["outside", "add_middleware"])
def test_an_error_raised_from_a_circuit_open_is_answered_as_the_circuit_open(
    wrapped: str, where: str
) -> None:
    with _served(_built(wrapped), where) as get:
        get("/open")  # the upstream refuses: its breaker opens
        plain = get("/down")  # CircuitOpen let out as it is
        answer = get("/down-from")  # PaymentsDown from CircuitOpen
        assert plain.status_code == 503
        assert answer.status_code == 503  # (was the server's bare 500)
        for name in ("x-fidelity-decided-by", "content-type"):
            assert answer.headers[name] == plain.headers[name]
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.json()["type"] == plain.json()["type"]
        # the route breaker (one failure opens it) ignored it: the next is the upstream's
        # refusal again, not the route's
        after = get("/down-from")
        assert after.status_code == 503
        assert after.json()["type"] == plain.json()["type"]
        assert after.json()["upstream"] == plain.json()["upstream"] == "10.0.3.1:8080"
        # an error raised while handling the refusal, not from it, is the app's own 500
        during = get("/down-during")
        assert during.status_code == 500
        assert "x-fidelity-decided-by" not in during.headers
        assert "retry-after" not in during.headers


@pytest.mark.parametrize("where", ["in_process", "uvicorn"])
@pytest.mark.parametrize("wrapped", ["outside", "add_middleware"])
def test_an_error_raised_from_a_give_up_is_answered_502_exhausted(wrapped: str, where: str) -> None:
    with _served(_built(wrapped), where) as get:
        plain = get("/flaky")  # two attempts refused, the error let out as it is
        answer = get("/flaky-from")
        assert plain.status_code == 502
        assert plain.headers["x-fidelity-retry"] == "exhausted"
        assert answer.status_code == 502  # (was the server's bare 500)
        assert answer.headers["x-fidelity-retry"] == "exhausted"
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["upstream"] == plain.json()["upstream"]
        own = get("/own")
        assert own.status_code == 500
        assert "x-fidelity-retry" not in own.headers


@pytest.mark.parametrize("wrapped", ["outside", "add_middleware"])
def test_a_task_groups_errors_raised_from_refusals_are_answered_as_them(wrapped: str) -> None:
    with _served(_built(wrapped), "in_process") as get:
        get("/open")  # the upstream's breaker opens
        answer = get("/grouped")  # ExceptionGroup[PaymentsDown from CircuitOpen, ...]
        assert answer.status_code == 503  # (was the server's bare 500)
        assert answer.headers["x-fidelity-decided-by"] == "breaker"
        assert int(answer.headers["retry-after"]) >= 1
