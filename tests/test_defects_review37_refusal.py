"""Review 37: an app's own 4xx after an optional upstream call that a layer of ours refused
(the upstream's breaker open) was taken for the report of that refusal: its units came
back under `charge = "always"` too, the route breaker left it out and the request was
recorded `shed` by the breaker. A login route whose optional risk-score call was refused
answered each wrong password 401, and its limit (`always`, for login attempts) held no
guess while the risk service's breaker was open. Only a gateway status or a 429 reports
an outbound refusal; any 4xx still reports a per-route form's own (its on_reject hook's)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

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


def _login_service(charge: str, answer: int) -> tuple[Any, list[Any]]:
    clock = FakeClock()
    risk = httpx.AsyncClient(
        transport=FidelityTransport(
            httpx.MockTransport(lambda request: httpx.Response(503)), clock=clock, telemetry=False
        )
    )
    contexts: list[Any] = []

    async def login(request: Request) -> Response:
        contexts.append(request.state.fidelity)
        with contextlib.suppress(httpx.HTTPError):  # optional: without a risk score
            await risk.get("http://risk.internal/score")
        return JSONResponse({"detail": "wrong password"}, status_code=answer)

    app = Starlette(routes=[Route("/login", login, methods=["POST"])])
    breaker = BreakerConfig(consecutive_failures=1, open_min_s=60.0, open_s=120.0)
    policy = Policy(
        rate_limits=(RateLimit(name="logins", rate="1/min", burst=3, charge=charge),),  # type: ignore[arg-type]
        upstreams=(UpstreamConfig(host="*", retry=RetryConfig(attempts=1), breaker=breaker),),
    )
    app.add_middleware(FidelityMiddleware, policy=policy, clock=clock, telemetry=False)
    return app, contexts


def _attempts(app: Any, n: int) -> list[int]:
    async def go() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as c:
            return [
                (await c.post("/login", json={"pw": f"guess{i}"})).status_code for i in range(n)
            ]

    return asyncio.run(go())


@pytest.mark.parametrize("charge", ["always", "served"])
@pytest.mark.parametrize("status", [401, 404, 422])
def test_an_apps_own_4xx_after_a_refused_optional_call_is_charged(charge: str, status: int) -> None:
    app, contexts = _login_service(charge, status)
    # the first call fails (503) and opens the risk service's breaker: every later call
    # is refused (CircuitOpen) before anything is sent
    assert _attempts(app, 6) == [status] * 3 + [429] * 3
    second = contexts[1]
    assert second.shed_by == "breaker"
    assert second.decided_by == "app"
    assert second.outcome == "served"


@pytest.mark.parametrize("status", [502, 503, 429])
def test_an_answer_that_reports_the_refusal_still_gives_the_units_back(status: int) -> None:
    app, contexts = _login_service("always", status)
    # the first request is charged (its call was made and failed: no refusal); the
    # others report the breaker's refusal and are refunded
    assert _attempts(app, 6) == [status] * 6
    assert contexts[1].decided_by == "breaker"
    assert contexts[1].outcome == "shed"
