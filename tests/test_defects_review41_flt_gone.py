"""Review 41 (flt41, item 3): a handler that answers after reading its client's disconnect.

A handler racing its work against its client (reading `receive` until `http.disconnect`,
as the real chain's `cancel` hops do, or Starlette's `is_disconnected()`) that answers
anyway once the client left (a 499, a partial result, a 500 for the cancelled call)
answers nobody. It was recorded `served` (or `failed` for a 5xx, counted on the route
breaker): every hop of a chain whose client left said `served`. Now `disconnected`, no
outcome of the route breaker's, as when the app raises on the cancel. The server's
disconnect read after the response started (uvicorn answers one to every read once the
response is complete) changes nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fidelity_mw import BreakerConfig, ConcurrencyConfig, FidelityMiddleware, Policy
from fidelity_mw.testing import FakeClock, seeded_random


class Outcomes:
    def __init__(self) -> None:
        self.seen: list[tuple[int | None, str | None]] = []

    def start(self, ctx: Any, scope: Any) -> None:
        return None

    def end(self, ctx: Any, scope: Any, token: Any) -> None:
        self.seen.append((ctx.status, ctx.outcome))


def _app(answer: int, after: bool, timed: bool) -> tuple[Starlette, Outcomes, Any]:
    async def route(request: Request) -> Response:
        if not after:
            while (await request.receive())["type"] != "http.disconnect":
                pass
        return Response(b"late", answer)

    policy = Policy(
        breaker=BreakerConfig(
            consecutive_failures=2, min_calls=2, open_s=30.0, open_min_s=30.0,
            **({"slow_call_ms": 10_000, "slow_call_ratio": 0.9} if timed else {}),
        ),
        concurrency=ConcurrencyConfig(limit=8) if timed else None,
    )  # fmt: skip
    outcomes = Outcomes()
    app = Starlette(routes=[Route("/", route)])
    app.add_middleware(
        FidelityMiddleware,
        policy=policy,
        clock=FakeClock(),
        rng=seeded_random(1),
        telemetry=False,
        observer=outcomes,
    )
    return app, outcomes, policy


async def _call(app: Starlette, client_leaves: bool, read_after: bool) -> list[dict[str, Any]]:
    """One GET as a server runs it: the body, then (the client leaving) a disconnect;
    `read_after`: the app's middleware stack reads once more after the response (a
    server answers a disconnect to that read)."""
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": b"", "more_body": False}]
    if client_leaves:
        messages.append({"type": "http.disconnect"})

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(0)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/", "raw_path": b"/", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"svc")], "client": ("127.0.0.1", 5000), "server": ("svc", 80),
    }  # fmt: skip
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("timed", [False, True])
@pytest.mark.parametrize("answer", [499, 200, 500])
def test_an_answer_after_the_client_left_is_recorded_disconnected(answer: int, timed: bool) -> None:
    app, outcomes, _policy = _app(answer, after=False, timed=timed)

    async def go() -> None:
        for _ in range(3):
            await _call(app, client_leaves=True, read_after=False)

    asyncio.run(go())
    # before: (answer, "served") for 499 and 200, (500, "failed") for 500, and the two
    # 500s opened the route breaker: the third request answered 503 by it
    assert outcomes.seen == [(answer, "disconnected")] * 3


def test_a_disconnect_read_after_the_response_started_changes_nothing() -> None:
    async def route(request: Request) -> Response:
        return Response(b"ok")

    outcomes = Outcomes()

    async def reads_after(scope: Any, receive: Any, send: Any) -> None:
        await inner(scope, receive, send)
        # (its body, then uvicorn's disconnect, answered to every read once complete)
        while (await receive())["type"] != "http.disconnect":
            pass

    inner: Any = Starlette(routes=[Route("/", route)])
    app = Starlette()
    app.router.routes.clear()
    app.mount("/", reads_after)
    app.add_middleware(
        FidelityMiddleware, clock=FakeClock(), rng=seeded_random(1), telemetry=False,
        observer=outcomes,
    )  # fmt: skip

    async def go() -> None:
        for _ in range(2):
            await _call(app, client_leaves=False, read_after=True)

    asyncio.run(go())
    assert outcomes.seen == [(200, "served")] * 2
