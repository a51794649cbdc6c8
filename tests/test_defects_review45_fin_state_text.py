"""Review 45 (fin45, left by doc45): with `[state] on_error = "closed"`, an upstream
without a breaker (`breaker = false`) whose retry budget's count could not reach the
store was refused with a `CircuitOpen` that spoke of a breaker's state: "breaker state
for api.internal is unreachable", and the app's 503 "the circuit breaker state for
upstream 'api.internal' is unreachable". It has no breaker; what could not be read is
its retry budget's state. The type, the 503 and who decided stay as they were.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import CircuitOpen, FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.errors import StateUnavailable
from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio

HOST = "api.internal"


class Unreachable(MemoryStore):
    def outbound_begin_now(self, *args: Any, **kw: Any) -> Any:
        raise StateUnavailable("10.0.0.7:6379 timed out", why="unreachable")

    outbound_gate_now = outbound_begin_now


def _ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200)


def _policy(breaker: BreakerConfig | None) -> Policy:
    return Policy(
        state=StateConfig(on_error="closed"),
        upstreams=(UpstreamConfig(host=HOST, retry=RetryConfig(attempts=3), breaker=breaker),),
        breaker=None,
    )


@pytest.mark.parametrize(
    ("breaker", "said"),
    [(None, "retry budget state"), (BreakerConfig(), "breaker state")],
)
async def test_the_refusal_names_the_state_that_was_unread(
    breaker: BreakerConfig | None, said: str
) -> None:
    transport = FidelityTransport(
        httpx.MockTransport(_ok), policy=_policy(breaker), clock=FakeClock(),
        store=Unreachable(), telemetry=False,
    )  # fmt: skip
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(CircuitOpen) as refused:
            await client.get(f"http://{HOST}/")
    # before, without a breaker: "breaker state for api.internal is unreachable ..."
    assert str(refused.value) == f"{said} for {HOST} is unreachable and the policy fails closed"
    assert refused.value.state_of == said.removesuffix(" state")
    assert isinstance(refused.value.state_error, StateUnavailable)
    assert refused.value.attempts_made == 0


@pytest.mark.parametrize(
    ("breaker", "said"),
    [(None, "retry budget state"), (BreakerConfig(), "circuit breaker state")],
)
async def test_the_apps_503_names_the_state_that_was_unread(
    breaker: BreakerConfig | None, said: str
) -> None:
    async def calls(request: Request) -> Response:
        transport = FidelityTransport(httpx.MockTransport(_ok))  # the middleware's policy
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get(f"http://{HOST}/")
        return PlainTextResponse("never")

    app = Starlette(routes=[Route("/x", calls)])
    app.add_middleware(
        FidelityMiddleware, policy=_policy(breaker), store=Unreachable(), clock=FakeClock(),
        telemetry=False,
    )  # fmt: skip
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/x")
    assert response.status_code == 503
    assert response.headers["x-fidelity-decided-by"] == "state"
    body = response.json()
    assert body["type"] == "urn:fidelity-mw:problem:upstream-circuit-open"
    # before, without a breaker: "the circuit breaker state for upstream ..."
    assert body["detail"] == (
        f"the {said} for upstream '{HOST}' is unreachable "
        "and the policy says to fail closed; retry in 1 s"
    )
