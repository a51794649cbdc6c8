"""Review 37: the 500 held while an httpx error is handled (inbound/watch.py,
`ResponseWatcher.held`) goes out as the app sent it when the middleware does not answer
the error itself. Letting it out (`release_held`) sent it through the watcher again while
that error was still being handled, so the watcher held it once more:

- a 500 of more than `_MOST_HELD` messages, streamed from an `except httpx.HTTPError`
  block, was let out, held again, let out ... until a RecursionError ended the app (the
  client got the server's bare 500 instead of the app's body);
- a handler's 500 for an httpx error the middleware does not answer (an app wrapped from
  outside, `FidelityMiddleware(app)`, whose error handler answers its own error page) was
  held again as the middleware let it out and re-raised, and never sent: the client got
  the server's bare 500, not the app's page.

Through a real uvicorn server and httpx: what the server sends is the point."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from _loopback import LoopbackServer
from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.testing import FakeClock

_CHUNKS = 12  # more than the watcher holds (8 messages)


def _wrapped(app: Any) -> FidelityMiddleware:
    return FidelityMiddleware(app, policy=Policy(breaker=None), clock=FakeClock(), telemetry=False)


def _caller(server: LoopbackServer) -> httpx.Client:
    # (a connection per request: uvicorn closes one whose app raised)
    return httpx.Client(base_url=server.url, limits=httpx.Limits(max_keepalive_connections=0))


async def _streams_its_500(scope: Any, receive: Any, send: Any) -> None:
    try:
        raise httpx.ConnectError("the upstream is down")
    except httpx.HTTPError:
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 500, "headers": headers})
        for i in range(_CHUNKS):
            await send({"type": "http.response.body", "body": b"%d;" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b"end"})


def test_a_long_500_streamed_while_an_httpx_error_is_handled_goes_out_whole() -> None:
    with LoopbackServer(_wrapped(_streams_its_500)) as server, _caller(server) as caller:
        answer = caller.get("/")
        assert answer.status_code == 500
        assert answer.headers["content-type"] == "text/plain"
        assert answer.text == "".join(f"{i};" for i in range(_CHUNKS)) + "end"
        # and the next one too (no state left behind)
        assert caller.get("/").text.endswith(";end")


async def _fails(request: Request) -> Response:
    # a plain client's error (not our transport's): nothing the middleware answers
    raise httpx.ConnectError("the upstream is down")


async def _own_page(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": "upstream", "kind": type(exc).__name__}, status_code=500)


def test_the_apps_own_error_page_for_an_httpx_error_we_do_not_answer_reaches_the_client() -> None:
    app = Starlette(routes=[Route("/", _fails)], exception_handlers={500: _own_page})
    with LoopbackServer(_wrapped(app)) as server, _caller(server) as caller:
        for _ in range(2):
            answer = caller.get("/")
            assert answer.status_code == 500
            assert answer.headers["content-type"] == "application/json"
            assert answer.json() == {"error": "upstream", "kind": "ConnectError"}
            assert "x-fidelity-decided-by" not in answer.headers
