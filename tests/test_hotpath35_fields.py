"""The inbound hot path keeps its per-request objects' fields as instance values.

Interpreted (Python 3.11), an attribute read that falls through to a class-level
default is never specialized: it costs about 200 instructions against 15 for a read
of the instance's own value. So the fields the response path reads on every request
are stored on the watcher and the context, None or False included (benchmarks:
`server_inprocess.py --instructions`). These tests keep a later change from leaving
one to its class default again; compiled, the classes are native and have no `vars`.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import DeadlineConfig, FidelityMiddleware, Policy, RateLimit
from fidelity_mw.context import INTERPRETED, DecisionContext, new_request_context
from fidelity_mw.engine import Engine
from fidelity_mw.inbound.watch import ResponseWatcher
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="compiled: native classes, no vars")

# what ResponseWatcher.__call__ and the middleware after the app read of the watcher
WATCHER_READS = {"send", "ctx", "end", "slot", "monotonic", "expired", "watch", "stall_s"}
# what the middleware and the watcher read of the context on every request (and every
# outbound call made inside it: out44)
CONTEXT_READS = {"shed_by", "response_headers", "response_complete", "_pending", "_room_at"}


class Spy:
    """An ASGI app around the route that keeps the `send` it was given."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sends: list[Any] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.sends.append(send)
        await self.app(scope, receive, send)


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _serve(policy: Policy, headers: dict[str, str]) -> Spy:
    import asyncio

    spy = Spy(Starlette(routes=[Route("/r", ok)]))
    app = FidelityMiddleware(spy, policy=policy, clock=FakeClock(), telemetry=False)

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/r", headers=headers)
            assert response.status_code == 200

    asyncio.run(go())
    return spy


@pytest.mark.parametrize(
    ("policy", "headers"),
    [
        (Policy(), {}),  # the default: a breaker, a default deadline, no limit
        (
            Policy(rate_limits=[RateLimit(name="per-client", rate="100/s")]),
            {"x-request-timeout-ms": "800"},
        ),
        (Policy(breaker=None, deadline=DeadlineConfig(default_ms=None)), {}),  # no layer
    ],
    ids=["default", "limit+caller-deadline", "no-layers"],
)
def test_the_watcher_holds_every_field_its_response_reads(
    policy: Policy, headers: dict[str, str]
) -> None:
    spy = _serve(policy, headers)
    (send,) = spy.sends
    watcher = send.__self__  # (the app gets the watcher's bound method)
    assert type(watcher) is ResponseWatcher
    assert watcher.complete  # (the response went through it)
    missing = WATCHER_READS - set(vars(watcher))
    assert not missing, f"left to the class default: {sorted(missing)}"


def test_the_request_context_holds_the_fields_read_on_every_request() -> None:
    engine = Engine(Policy(), clock=FakeClock())
    for ctx in (
        new_request_context(engine, "/r", "GET", 1.0),
        DecisionContext(engine, "/r", "GET", 1.0),
    ):
        missing = CONTEXT_READS - set(vars(ctx))
        assert not missing, f"left to the class default: {sorted(missing)}"
        assert ctx.shed_by is None
        assert ctx.response_headers is None
