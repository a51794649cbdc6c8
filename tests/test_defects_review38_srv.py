"""Review 38: the middleware's own answers go out without the request's context too.

Review 37 made the server take the last message of the app's response with the
request's DecisionContext out of `current()` (uvicorn arms its keep-alive timer inside
that `send`, and `loop.call_later` copies the current context: the context and all it
holds lived on in that copy until the connection's next request). The middleware's own
answers (a 429 of a limit, a 503 of the breaker, a 504 of the deadline on arrival, a
control refusal that escaped the app, an `on_reject` response, a cost function's
HTTPException) do not pass the response watcher, and still sent their last message
with the request's context current: under an abusive client, every refused request's
context lived on. They now send it with what was current before the middleware (None,
or an outer context), as the app's responses do; `current()` is the request's again
after it. Tested as test_defects_review37_srv.py tests the app's responses."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fidelity_mw import (
    BreakerConfig,
    CircuitOpen,
    FidelityMiddleware,
    Policy,
    RateLimit,
    current,
)
from fidelity_mw.context import _CURRENT, Decision, DecisionContext
from fidelity_mw.testing import FakeClock

Scope = dict[str, Any]


def scope(path: str = "/api/items", timeout_ms: bytes = b"5000") -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-request-timeout-ms", timeout_ms)],
        "client": ("192.0.2.7", 5000),
        "server": ("testserver", 80),
    }


class Server:
    """A server's `send`: copies the current context at every message, as uvicorn's
    `call_later` for its keep-alive timer does at the last one."""

    def __init__(self) -> None:
        self.copies: list[tuple[str, contextvars.Context]] = []
        self.statuses: list[int] = []

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.statuses.append(message["status"])
        more = message.get("more_body", False)
        kind = message["type"] + (" (more)" if more else "")
        self.copies.append((kind, contextvars.copy_context()))

    @staticmethod
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    def current_at_last(self) -> DecisionContext | None:
        kind, copy = self.copies[-1]
        assert kind == "http.response.body"
        return copy.run(current)


class App:
    """Raises a CircuitOpen on /refused (an outbound refusal let out), else answers 200."""

    def __init__(self) -> None:
        self.seen: list[DecisionContext | None] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.seen.append(current())
        if scope["path"] == "/refused":
            raise CircuitOpen("open", host="up.internal", retry_after_s=5.0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _costly(request: Request) -> int:
    raise HTTPException(413, "too large")


def _policy(**limit: Any) -> Policy:
    return Policy(
        breaker=BreakerConfig(consecutive_failures=1, open_min_s=30.0, open_s=60.0),
        rate_limits=(RateLimit(name="per-client", rate="1/h", burst=1, match="/api/*", **limit),),
    )


def _run(
    mw: FidelityMiddleware, paths: list[Scope], outer: DecisionContext | None = None
) -> list[Server]:
    servers = [Server() for _ in paths]

    async def main() -> None:
        if outer is not None:
            _CURRENT.set(outer)
        for server, sc in zip(servers, paths, strict=True):
            seen: list[DecisionContext | None] = []
            await mw(sc, server.receive, server.send)
            seen.append(current())
            assert seen == [outer]  # the middleware put back what it found

    asyncio.run(main())
    return servers


@pytest.mark.parametrize("outer", [False, True])
def test_a_limits_429_is_sent_without_the_requests_context(outer: bool) -> None:
    mw = FidelityMiddleware(App(), policy=_policy(), clock=FakeClock(), telemetry=False)
    around = DecisionContext(mw.engine, "outer", "GET", 0.0) if outer else None
    first, refused = _run(mw, [scope(), scope()], outer=around)
    assert first.statuses == [200]
    assert refused.statuses == [429]
    start_kind, start_copy = refused.copies[0]
    assert start_kind == "http.response.start"
    assert isinstance(start_copy.run(current), DecisionContext)  # (ours until the last)
    assert refused.current_at_last() is around  # (was the request's context)


def test_a_deadline_on_arrival_and_an_open_breaker_send_their_last_message_without_it() -> None:
    app = App()
    mw = FidelityMiddleware(app, policy=_policy(), clock=FakeClock(), telemetry=False)
    expired, refused, shed = _run(
        mw, [scope("/api/a", timeout_ms=b"0"), scope("/refused"), scope("/refused")]
    )
    assert expired.statuses == [504]
    assert refused.statuses == [503]  # the CircuitOpen the app let out
    assert shed.statuses == [503]
    assert [s.current_at_last() for s in (expired, refused, shed)] == [None, None, None]
    assert len(app.seen) == 2
    assert all(isinstance(c, DecisionContext) for c in app.seen)


def test_an_on_reject_response_and_a_cost_functions_answer_too() -> None:
    hooked: list[DecisionContext | None] = []

    def on_reject(ctx: DecisionContext, decision: Decision) -> Response:
        hooked.append(current())  # the hook still sees the request's context
        return JSONResponse({"limited": True}, status_code=429)

    mw = FidelityMiddleware(
        App(), policy=_policy(), clock=FakeClock(), telemetry=False, on_reject=on_reject
    )
    _first, refused = _run(mw, [scope(), scope()])
    assert refused.statuses == [429]
    assert refused.current_at_last() is None
    assert len(hooked) == 1
    assert isinstance(hooked[0], DecisionContext)

    costly = FidelityMiddleware(
        App(), policy=_policy(cost=_costly), clock=FakeClock(), telemetry=False
    )
    (answered,) = _run(costly, [scope()])
    assert answered.statuses == [413]
    assert answered.current_at_last() is None
