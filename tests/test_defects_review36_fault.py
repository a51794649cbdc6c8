"""Review 36: the request's "an upstream failed" marks (`x-fidelity-fault: upstream`,
`x-fidelity-retry: exhausted`, the `charge = "served"` refund) follow the failure the
response reports, not any failure an earlier, optional call of the request met."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fidelity_mw import (
    BreakerConfig,
    CircuitOpen,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RateLimit,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock, seeded_random

UP_URL = "http://10.0.3.1:8080/"  # inside trusted_peers: one of ours


def _service(
    answers: list[int],
    handler: Callable[[httpx.AsyncClient], Any],
    attempts: int = 1,
    breaker: BreakerConfig = BreakerConfig(),  # noqa: B008 - frozen
) -> Any:
    """A service whose one route calls an upstream answering `answers` in turn (then
    200), under a limit of one request a minute (`charge = "served"`)."""
    clock = FakeClock()
    feed = iter(answers)

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(feed, 200))

    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(upstream), clock=clock, telemetry=False)
    )

    async def route(request: Request) -> Response:
        result: Response = await handler(client)
        return result

    app = Starlette(routes=[Route("/", route)])
    retry = RetryConfig(attempts=attempts, base_ms=10, max_ms=10)
    policy = Policy(
        rate_limits=(RateLimit(name="per-client", rate="1/min", burst=1),),
        upstreams=(UpstreamConfig(host="*", retry=retry, breaker=breaker),),
    )
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock, rng=seeded_random(3), telemetry=False
    )
    return app


def _twice(app: Any) -> list[httpx.Response]:
    """Two requests of one client at one instant: the second is admitted only if the
    first's unit came back."""

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            return [await client.get("/"), await client.get("/")]

    return asyncio.run(go())


async def _optional_then_own_500(client: httpx.AsyncClient) -> Response:
    # an optional enrichment call fails (500, counted by the breaker for it); the page
    # goes on without it, and then fails on its own
    await client.get(UP_URL)
    return Response(b"our own bug", 500)


def test_an_apps_own_500_after_an_optional_upstream_failure_is_its_own() -> None:
    first, second = _twice(_service([500], _optional_then_own_500))
    assert first.status_code == 500
    # not "the upstream's fault": the callers' breakers for us must count it
    assert "x-fidelity-fault" not in first.headers
    # and charged: the client's second request meets the limit
    assert second.status_code == 429


async def _optional_given_up_then_own_500(client: httpx.AsyncClient) -> Response:
    await client.get(UP_URL)  # 503, 503: retried, then given up on
    return Response(b"our own bug", 500)


def test_an_apps_own_500_after_an_optional_give_up_is_not_exhausted() -> None:
    first, second = _twice(_service([503, 503], _optional_given_up_then_own_500, attempts=2))
    assert first.status_code == 500
    assert "x-fidelity-retry" not in first.headers
    assert "x-fidelity-fault" not in first.headers
    assert second.status_code == 429


async def _optional_then_raise(client: httpx.AsyncClient) -> Response:
    await client.get(UP_URL)
    raise RuntimeError("our own bug")


def test_an_apps_own_error_after_an_optional_upstream_failure_is_charged() -> None:
    first, second = _twice(_service([500], _optional_then_raise))
    assert first.status_code == 500
    assert second.status_code == 429


async def _raise_for_status(client: httpx.AsyncClient) -> Response:
    (await client.get(UP_URL)).raise_for_status()
    return Response(b"ok")


def test_the_upstreams_error_let_out_is_still_refunded() -> None:
    # the error the app lets out is the upstream's: its unit comes back (as before)
    first, second = _twice(_service([500], _raise_for_status))
    assert first.status_code == 500
    assert second.status_code == 200


async def _wrapped(client: httpx.AsyncClient) -> Response:
    try:
        (await client.get(UP_URL)).raise_for_status()
    except httpx.HTTPStatusError as exc:
        raise RuntimeError("the catalogue failed") from exc
    return Response(b"ok")


def test_an_error_raised_from_the_upstreams_is_the_upstreams() -> None:
    first, second = _twice(_service([500], _wrapped))
    assert first.status_code == 500
    assert second.status_code == 200


async def _gateway(client: httpx.AsyncClient) -> Response:
    upstream = await client.get(UP_URL)
    return Response(b"upstream failed", 502 if upstream.status_code >= 500 else 200)


def test_a_gateway_answer_still_reports_the_upstreams_fault() -> None:
    first, second = _twice(_service([500], _gateway))
    assert first.status_code == 502
    assert first.headers["x-fidelity-fault"] == "upstream"
    assert second.status_code == 200  # refunded


async def _passed_on(client: httpx.AsyncClient) -> Response:
    upstream = await client.get(UP_URL)
    return Response(upstream.content, upstream.status_code)


def test_an_upstreams_500_passed_on_is_the_services_own() -> None:
    # A 500 cannot tell a passed-on upstream 500 from the service's own bug: it is the
    # service's (a gateway says 502; tests above). An upstream's 503 passed on reports it.
    first, second = _twice(_service([500], _passed_on))
    assert first.status_code == 500
    assert "x-fidelity-fault" not in first.headers
    assert second.status_code == 429
    first, second = _twice(_service([503], _passed_on))
    assert first.status_code == 503
    assert first.headers["x-fidelity-fault"] == "upstream"
    assert second.status_code == 200


async def _given_up_gateway(client: httpx.AsyncClient) -> Response:
    upstream = await client.get(UP_URL)
    return Response(b"", 503 if upstream.status_code >= 500 else 200)


def test_a_gateway_answer_after_a_give_up_stays_exhausted() -> None:
    first, second = _twice(_service([503, 503], _given_up_gateway, attempts=2))
    assert first.status_code == 503
    assert first.headers["x-fidelity-retry"] == "exhausted"
    assert second.status_code == 200


# ---------------------------------------- the same for a refusal inside the app (shed_by)

ONE_STRIKE = BreakerConfig(consecutive_failures=1, open_min_s=60.0, open_s=60.0)


async def _optional_refused_then(client: httpx.AsyncClient, own: str) -> Response:
    # the optional call fails (its breaker opens), the next is refused by that breaker
    # before it is sent (CircuitOpen, caught: the page goes on without it)
    await client.get(UP_URL)
    with contextlib.suppress(CircuitOpen):
        await client.get(UP_URL)
    if own == "raise":
        raise RuntimeError("our own bug")
    if own == "503":
        return Response(b"recommendations unavailable", 503)  # the refusal, reported
    return Response(b"our own bug", 500)


def test_an_apps_own_500_after_an_optional_refusal_is_its_own() -> None:
    first, second = _twice(
        _service([500], lambda c: _optional_refused_then(c, "500"), breaker=ONE_STRIKE)
    )
    assert first.status_code == 500
    assert "x-fidelity-retry" not in first.headers  # (the refusal's give-up: not this 500's)
    assert second.status_code == 429  # charged: not shed by the upstream's breaker


def test_an_apps_own_error_after_an_optional_refusal_is_charged() -> None:
    first, second = _twice(
        _service([500], lambda c: _optional_refused_then(c, "raise"), breaker=ONE_STRIKE)
    )
    assert first.status_code == 500
    assert second.status_code == 429


def test_a_503_for_the_refusal_is_still_the_refusals() -> None:
    first, second = _twice(
        _service([500], lambda c: _optional_refused_then(c, "503"), breaker=ONE_STRIKE)
    )
    assert first.status_code == 503
    assert first.headers["x-fidelity-retry"] == "exhausted"
    # its unit came back: the next request is admitted, and meets the open breaker
    assert second.status_code == 503
    assert second.headers["x-fidelity-decided-by"] == "breaker"
