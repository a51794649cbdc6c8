"""upstream_failure_response(exc): the app answers its own upstream failure (a call sent
once) in the shape of the middleware's 502 `upstream-failed`."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fidelity_mw import (
    CircuitOpen,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    upstream_failure_response,
)
from fidelity_mw.errors import DeadlineExceeded
from fidelity_mw.testing import fake_time

REQUEST = httpx.Request("POST", "http://payments.internal/charges")


def test_a_status_error_is_a_502_naming_the_upstream() -> None:
    failed = httpx.Response(500, request=REQUEST)
    exc = httpx.HTTPStatusError("500", request=REQUEST, response=failed)
    response = upstream_failure_response(exc)
    assert response.status_code == 502
    assert response.media_type == "application/problem+json"
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["cache-control"] == "no-store"
    assert response.body == (
        b'{"type":"urn:fidelity-mw:problem:upstream-failed","title":"Bad Gateway",'
        b'"status":502,"detail":"upstream \'payments.internal\' answered 500",'
        b'"upstream":"payments.internal"}'
    )


def test_a_timeout_is_a_504_and_the_detail_may_be_the_apps() -> None:
    exc = httpx.ReadTimeout("slow", request=REQUEST)
    response = upstream_failure_response(exc, "payment failed")
    assert response.status_code == 504
    assert b'"title":"Gateway Timeout"' in response.body
    assert b'"detail":"payment failed"' in response.body


def test_an_error_without_its_request_names_no_upstream() -> None:
    response = upstream_failure_response(httpx.ConnectError("refused"))
    assert response.status_code == 502
    assert b'"detail":"an upstream failed (ConnectError)"' in response.body
    assert b'upstream":' not in response.body


@pytest.mark.parametrize(
    "exc",
    [
        CircuitOpen("open", host="payments.internal", retry_after_s=3.0),
        DeadlineExceeded("late", host="payments.internal"),
    ],
    ids=["circuit-open", "deadline"],
)
def test_a_control_refusal_is_raised_again(exc: httpx.HTTPError) -> None:
    with pytest.raises(type(exc)) as raised:
        upstream_failure_response(exc)
    assert raised.value is exc


def test_through_the_middleware_the_same_shape_and_the_breaker_still_answers() -> None:
    """A POST sent once, failing: the app's 502 as the middleware would write it; once
    the host breaker opens, the same clause lets CircuitOpen out and the middleware
    answers 503 with Retry-After."""
    policy = Policy.from_dict(
        {
            "upstream": [
                {
                    "host": "payments.internal",
                    "retry": {"attempts": 1},
                    "breaker": {
                        "consecutive_failures": 2,
                        "open_s": 30,
                        "open_min_s": 30,
                        "open_jitter": 0,
                    },
                }
            ]
        }
    )
    down = httpx.MockTransport(lambda request: httpx.Response(500))
    http = httpx.AsyncClient(transport=FidelityTransport(down))

    async def order(request: Request) -> Response:
        try:
            response = await http.post("http://payments.internal/charges")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            return upstream_failure_response(exc)
        return JSONResponse(response.json())

    app = Starlette(routes=[Route("/orders", order, methods=["POST"])])
    app.add_middleware(FidelityMiddleware, policy=policy, telemetry=False)

    async def calls() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
            return [await client.post("/orders") for _ in range(3)]

    with fake_time(app=app):
        failed, failed_again, shed = asyncio.run(calls())
    for response in (failed, failed_again):
        assert response.status_code == 502
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"] == "urn:fidelity-mw:problem:upstream-failed"
        assert response.json()["upstream"] == "payments.internal"
    assert shed.status_code == 503
    assert shed.headers["retry-after"] == "30"
    assert shed.headers["x-fidelity-decided-by"] == "breaker"
