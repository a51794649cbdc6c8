"""Review 46: a `Depends(fidelity.limit)` refusal of a websocket handshake, on a server
without the ASGI denial extension, was sent as `websocket.http.response.*` messages all
the same (the installed handler's 429 response): messages such a server does not take
(ASGI 2.4), so the client got the server's error for the refusal. docs/inbound.md speaks
of "the close it becomes where the server has no denial extension", and the middleware
closes its own refusals there with 1013 and a reason. Now the form's refusal is closed
the same way; with the extension it is still the 429 denial."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import Depends, FastAPI, WebSocket

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.testing import FakeClock

EXTENSION = {"websocket.http.response": {}}


def _app(with_middleware: bool) -> FastAPI:
    clock = FakeClock()
    fidelity = Fidelity(clock=clock)
    app = FastAPI()

    @app.websocket("/ws", dependencies=[Depends(fidelity.limit("1/h", key="header:x-k"))])
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    if with_middleware:
        sockets = RateLimit(name="sockets", rate="2/h", burst=2)
        app.add_middleware(FidelityMiddleware, policy=Policy(rate_limits=(sockets,)), clock=clock)
    fidelity.install(app)
    return app


def _handshake(app: FastAPI, key: bytes, extensions: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"svc"), (b"x-k", key)],
        "client": ("10.0.0.1", 5000),
        "server": ("svc", 80),
        "subprotocols": [],
        "state": {},
        "extensions": extensions,
    }
    asyncio.run(app(scope, receive, send))
    return sent


@pytest.mark.parametrize("with_middleware", [True, False])
def test_a_forms_refusal_is_a_close_where_the_server_has_no_denial_extension(
    with_middleware: bool,
) -> None:
    app = _app(with_middleware)
    assert _handshake(app, b"a", {})[0]["type"] == "websocket.accept"
    refused = _handshake(app, b"a", {})
    # (old code: websocket.http.response.start, 429, and its body)
    assert [m["type"] for m in refused] == ["websocket.close"]
    assert refused[0]["code"] == 1013
    assert refused[0]["reason"] == "rate limited; retry in 3600 s"
    if with_middleware:
        # the form's close gave the middleware's unit back: another client's handshake
        # is the middleware's second of 2, and its first refusal the third
        assert _handshake(app, b"b", {})[0]["type"] == "websocket.accept"
        third = _handshake(app, b"c", {})
        assert [(m["type"], m["code"]) for m in third] == [("websocket.close", 1013)]
        assert third[0]["reason"] == "rate limited; retry in 1800 s"  # the middleware's


@pytest.mark.parametrize("with_middleware", [True, False])
def test_with_the_extension_the_forms_refusal_is_still_the_429_denial(
    with_middleware: bool,
) -> None:
    app = _app(with_middleware)
    assert _handshake(app, b"a", EXTENSION)[0]["type"] == "websocket.accept"
    refused = _handshake(app, b"a", EXTENSION)
    assert [m["type"] for m in refused] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert refused[0]["status"] == 429
