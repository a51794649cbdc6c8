"""The allowed path reads the scope's keys by subscript (inb41): `get` on a scope typed as
a `MutableMapping` is a method call interpreted and a method lookup by name compiled, a
subscript a specialized dict read and a mapping slot call. A scope without any of those
keys (the spec lets a hand-built one leave out `root_path`, `headers`, `state`; a unix
socket server gives `client` None) is decided as before."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from tests._asgi import http_scope

from fidelity_mw import Engine, FidelityMiddleware, Policy, RateLimit
from fidelity_mw.context import INTERPRETED, current
from fidelity_mw.testing import FakeClock


class CountingScope(dict[str, Any]):
    """A scope that notes which keys were read with `get`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.got: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        self.got.append(key)
        return super().get(key, default)


async def endpoint(request: Any) -> PlainTextResponse:
    ctx = current()
    assert ctx is not None
    assert request.state.fidelity is ctx
    return PlainTextResponse(ctx.route)


async def raw_app(scope: Any, receive: Any, send: Any) -> None:
    """An app that reads nothing of the scope."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"/r"})


def middleware(rate: str = "100/s", app: Any = None) -> FidelityMiddleware:
    app = Starlette(routes=[Route("/r", endpoint)]) if app is None else app
    # the benchmarks' default: one limit by client address, the route breaker, a deadline
    policy = Policy(rate_limits=[RateLimit(name="per-client", rate=rate)])
    return FidelityMiddleware(app, policy=policy, clock=FakeClock(), telemetry=False)


async def call(mw: FidelityMiddleware, scope: dict[str, Any]) -> dict[str, Any]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await mw(scope, receive, send)
    start = sent[0]
    return {
        "status": start["status"],
        "headers": {k.decode(): v.decode() for k, v in start["headers"]},
        "body": b"".join(m.get("body", b"") for m in sent[1:]),
    }


def test_the_allowed_path_reads_the_scopes_keys_without_get() -> None:
    async def go() -> list[str]:
        mw = middleware(app=raw_app)
        got: list[str] = []
        for i in range(3):  # the first asks the engine for its plan; the others are cached
            scope = CountingScope(
                http_scope("/r", headers=[(b"x-request-timeout-ms", b"800")], state={})
            )
            answer = await call(mw, scope)
            assert answer["status"] == 200
            assert answer["headers"]["ratelimit"].startswith('"per-client";r=')
            if i:
                got += scope.got
        return got

    got = asyncio.run(go())
    # (the old code read four of them with `get` on every request)
    assert got == [], got


def test_a_scope_without_root_path_headers_or_state_is_decided_as_before() -> None:
    async def go() -> list[dict[str, Any]]:
        mw = middleware()
        answers = []
        for missing in ("root_path", "headers", "state", "client", None):
            for _ in range(2):  # the engine's plan, then the middleware's cached one
                scope = http_scope("/r", headers=[(b"x-request-timeout-ms", b"800")], state={})
                if missing == "client":
                    scope["client"] = None
                elif missing is not None:
                    del scope[missing]
                answers.append(await call(mw, scope))
        return answers

    answers = asyncio.run(go())
    assert [a["status"] for a in answers] == [200] * 10
    assert all(a["body"] == b"/r" for a in answers)
    remaining = [a["headers"]["ratelimit"] for a in answers]
    # one bucket for the client's address (the fake clock never moves), one of its own
    # for the requests without an address (`client` None: a unix socket's)
    by_ip = [*remaining[:6], *remaining[8:]]
    assert by_ip == [f'"per-client";r={99 - i};t=1' for i in range(8)]
    assert remaining[6:8] == ['"per-client";r=99;t=1', '"per-client";r=98;t=1']


def test_a_cached_plan_of_another_root_path_is_not_taken_for_a_scope_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []
    plan_for = Engine.plan_for

    def counting(self: Engine, scope: Any) -> Any:
        asked.append(scope.get("root_path", "<none>"))
        return plan_for(self, scope)

    monkeypatch.setattr(Engine, "plan_for", counting)

    async def go() -> None:
        mw = middleware()
        for root in ("/api", None, None, "/api"):
            scope = http_scope("/r", root_path=root or "")
            if root is None:
                del scope["root_path"]
            await call(mw, scope)

    asyncio.run(go())
    # the plan of "/api" is cached by path; a scope without root_path (the spec's "") is
    # not served by it: the engine is asked, each time (its plan is under another root)
    assert asked[:2] == ["/api", "<none>"]
    assert "<none>" in asked[2:]


def test_a_scope_with_headers_none_has_no_headers() -> None:
    async def go() -> int:
        mw = middleware()
        scope = http_scope("/r")
        scope["headers"] = None
        return (await call(mw, scope))["status"]

    assert asyncio.run(go()) == 200


def test_the_apps_messages_are_read_without_get_and_may_leave_out_optional_keys() -> None:
    sent_by_app: list[CountingScope] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        # no `headers` in the start (the spec's default: none); a body before the last
        # with `more_body`, the last without it (the spec's default: False)
        for message in (
            {"type": "http.response.start", "status": 200},
            {"type": "http.response.body", "body": b"a", "more_body": True},
            {"type": "http.response.body", "body": b"b"},
        ):
            counted = CountingScope(message)
            sent_by_app.append(counted)
            await send(counted)

    async def go() -> dict[str, Any]:
        return await call(middleware(app=app), http_scope("/r", state={}))

    answer = asyncio.run(go())
    assert answer["status"] == 200
    assert answer["body"] == b"ab"
    assert answer["headers"]["ratelimit"] == '"per-client";r=99;t=1'
    assert "ratelimit-policy" in answer["headers"]
    # (the old watcher read `headers` and `more_body` with `get`; `body` is this test's)
    assert [[k for k in m.got if k != "body"] for m in sent_by_app] == [[], [], []]


@pytest.mark.skipif(not INTERPRETED, reason="compiled: no interpreter frame to trace")
def test_a_scope_without_state_raises_nothing_in_the_middleware() -> None:
    """httpx's ASGITransport (and a server without lifespan state) leaves `state` out of
    every request: reading it must not raise and catch a KeyError each time (at ce99686
    it did: about 1.7k instructions a request more, in process)."""
    raised: list[str] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is FidelityMiddleware.__call__.__code__:
            if event == "exception":
                raised.append(arg[0].__name__)
            return tracer
        return None

    async def go() -> int:
        mw = middleware(app=raw_app)
        answers = []
        for _ in range(2):  # the engine's plan, then the cached one
            scope = http_scope("/r", headers=[(b"x-request-timeout-ms", b"800")])
            assert "state" not in scope
            sys.settrace(tracer)
            try:
                answers.append(await call(mw, scope))
            finally:
                sys.settrace(None)
        return answers[-1]["status"]

    assert asyncio.run(go()) == 200
    # (an await of a coroutine that returns is a StopIteration event of its own)
    assert [name for name in raised if name != "StopIteration"] == []
