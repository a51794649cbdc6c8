"""Review 46 (fin46): a 500 held while an httpx error is handled, then a second start.

The watcher holds a 500 an app sends while it handles an error the middleware may answer
itself (`ResponseWatcher.held`), until the error reaches the middleware. An app that then
sent a second `http.response.start` (a 200 from a fallback path that runs after its own
error page) had that start pass the held 500: the server took the 200 first, the app's
body went on into the held list, and the held 500 came after it (or the middleware's own
answer: a third start). Without us the server takes the app's first start, the 500, and
refuses the second (uvicorn raises into the app).

Now a start sent while a 500 is held lets the 500 out first and then goes to the server
as it is, which refuses it as it would without us: exactly one response reaches the
server, the first the app sent. Raw ASGI apps, a recording `send` that refuses what a
server refuses; the same app bare is the reference. Each test fails on the old code.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from _asgi import http_scope
from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio


class ServerRefused(RuntimeError):
    """What a server raises into the app for a message out of order (uvicorn: a
    RuntimeError)."""


class Server:
    """A recording `send` that takes one response, as a server does."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.refused: list[str] = []
        self.started = False
        self.done = False

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if self.done or (kind == "http.response.start" and self.started):
            self.refused.append(kind)
            raise ServerRefused(f"{kind} out of order")
        if kind == "http.response.start":
            self.started = True
            self.sent.append(("start", message["status"]))
        elif kind == "http.response.body":
            self.sent.append(("body", message.get("body", b"")))
            self.done = not message.get("more_body", False)


def _app(page_body: bool) -> Any:
    """Answers its own 500 while it handles an httpx error, then (a fallback after it)
    a 200; the server's refusal of that is caught, as an app that logs it would."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            raise httpx.ConnectError("the upstream is down")
        except httpx.HTTPError:
            await send({"type": "http.response.start", "status": 500, "headers": []})
            if page_body:
                await send({"type": "http.response.body", "body": b"error page"})
        try:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"fallback"})
        except ServerRefused:
            pass

    return app


async def _run(app: Any) -> Server:
    server = Server()
    try:
        await app(http_scope("/"), server.receive, server.send)
    except ServerRefused:  # (the old code: its late 500 refused, raised to the server)
        server.refused.append("raised to the server")
    return server


@pytest.mark.parametrize("page_body", [True, False], ids=["whole-500", "start-only"])
async def test_the_first_start_the_app_sent_reaches_the_server(page_body: bool) -> None:
    bare = await _run(_app(page_body))
    wrapped = await _run(
        FidelityMiddleware(
            _app(page_body), policy=Policy(breaker=None), clock=FakeClock(), telemetry=False
        )
    )
    assert bare.sent[0] == ("start", 500)
    assert wrapped.sent[0] == ("start", 500)  # before: ("start", 200), the second start
    assert [m for m in wrapped.sent if m[0] == "start"] == [("start", 500)]
    assert wrapped.sent == bare.sent
    # the app's second start refused, and nothing raised to the server (before: the
    # late 500 refused too, its error raised out of the middleware)
    assert wrapped.refused == bare.refused == ["http.response.start"]
