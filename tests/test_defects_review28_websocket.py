"""Review 28: the websocket admission (inbound/websocket.py) as an ASGI server and a
demanding user see it: conformance of the raw messages, what an admitted socket keeps
open, and the route a websocket is named by (Starlette's `WebSocketRoute` has no
`methods`; FastAPI's included routes list it with `methods = None`)."""

from __future__ import annotations

import asyncio
import gc
import json
import warnings
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.context import DecisionContext
from fidelity_mw.routes import UNMATCHED
from fidelity_mw.testing import FakeClock

with warnings.catch_warnings():  # Starlette 1.x asks for httpx2; httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient, WebSocketDenialResponse

EXTENSION = {"websocket.http.response": {}}
CONNECT: dict[str, Any] = {"type": "websocket.connect"}


class Recorder:
    """A RequestObserver that keeps every context it saw end."""

    def __init__(self) -> None:
        self.ended: list[DecisionContext] = []

    def start(self, ctx: DecisionContext, scope: Any) -> None:
        return None

    def end(self, ctx: DecisionContext, scope: Any, token: Any) -> None:
        self.ended.append(ctx)


class Conversation:
    """One raw ASGI websocket call: the server's `receive` (from `inbox`) and `send`."""

    def __init__(self, *inbox: dict[str, Any]) -> None:
        self.inbox = list(inbox)
        self.reads: list[str] = []
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        message = self.inbox.pop(0)
        self.reads.append(message["type"])
        return message

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def run(self, app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
        asyncio.run(app(dict(scope), self.receive, self.send))
        return self.sent


def ws_scope(path: str = "/ws", **kw: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "websocket",
        "path": path,
        "headers": [],
        "client": ("10.0.0.1", 5000),
    }
    scope.update(kw)
    return scope


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    while True:
        try:
            text = await websocket.receive_text()
        except WebSocketDisconnect:
            return
        await websocket.send_text(text.upper())


async def hello(request: Request) -> Response:
    return PlainTextResponse("hello")


def by_route(**kw: Any) -> Policy:
    return Policy(
        rate_limits=(RateLimit(name="per-route", rate="2/h", burst=2, key="route", **kw),)
    )


# ------------------------------------------------------------ 1. ASGI conformance


def test_the_accept_passes_its_subprotocol_and_headers_unchanged() -> None:
    """Without RateLimit fields to add, the app's accept message is the server's: its
    subprotocol, its headers in order, the app's dict not copied or touched."""
    accept = {
        "type": "websocket.accept",
        "subprotocol": "chat.v2",
        "headers": [(b"x-a", b"1"), (b"set-cookie", b"s=1")],
    }

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send(accept)
        await send({"type": "websocket.send", "text": "hi"})
        await send({"type": "websocket.close", "code": 1000})

    limited = FidelityMiddleware(
        app,
        policy=Policy(
            rate_limits=(RateLimit(name="one", rate="9/h", burst=9),),
            rate_limit_headers="on_reject",
        ),
        clock=FakeClock(),
        telemetry=False,
    )
    sent = Conversation(CONNECT).run(limited, ws_scope())
    assert sent[0] is accept
    assert sent[0]["subprotocol"] == "chat.v2"
    assert sent[0]["headers"] == [(b"x-a", b"1"), (b"set-cookie", b"s=1")]
    assert [m["type"] for m in sent[1:]] == ["websocket.send", "websocket.close"]


def test_the_accept_with_ratelimit_fields_keeps_the_apps_subprotocol_and_headers() -> None:
    accept = {"type": "websocket.accept", "subprotocol": "chat.v2", "headers": [(b"x-a", b"1")]}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(accept)

    limited = FidelityMiddleware(
        app,
        policy=Policy(
            rate_limits=(RateLimit(name="one", rate="9/h", burst=9),),
            rate_limit_headers="always",
        ),
        clock=FakeClock(),
        telemetry=False,
    )
    sent = Conversation(CONNECT).run(limited, ws_scope())
    assert sent[0]["subprotocol"] == "chat.v2"
    names = [name for name, _ in sent[0]["headers"]]
    assert names[0] == b"x-a"
    assert b"ratelimit" in names
    assert accept["headers"] == [(b"x-a", b"1")]  # the app's message is not changed


def test_the_denial_is_one_start_and_one_final_body_message() -> None:
    """`websocket.http.response.body` ends with `more_body` false (or absent), as the
    spec requires of the last body message; the start carries status and headers."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})

    limited = FidelityMiddleware(
        app,
        policy=Policy(rate_limits=(RateLimit(name="one", rate="1/h", burst=1),)),
        clock=FakeClock(),
        telemetry=False,
    )
    Conversation(CONNECT).run(limited, ws_scope(extensions=EXTENSION))
    sent = Conversation(CONNECT).run(limited, ws_scope(extensions=EXTENSION))
    assert [m["type"] for m in sent] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    start, body = sent
    assert start["status"] == 429
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/problem+json"
    assert int(headers[b"content-length"]) == len(body["body"])
    assert body.get("more_body", False) is False
    assert json.loads(body["body"])["status"] == 429


@pytest.mark.parametrize("extension", [True, False])
def test_a_client_gone_before_the_refusal_is_sent_nothing(extension: bool) -> None:
    """The first message is a disconnect (the client left while we decided): nothing is
    sent on a socket that is gone, the record says `disconnected`, and it is read once."""
    recorder = Recorder()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})

    limited = FidelityMiddleware(
        app,
        policy=Policy(rate_limits=(RateLimit(name="one", rate="1/h", burst=1),)),
        clock=FakeClock(),
        observer=recorder,
    )
    scope = ws_scope(extensions=EXTENSION) if extension else ws_scope()
    Conversation(CONNECT).run(limited, scope)
    talk = Conversation({"type": "websocket.disconnect", "code": 1001})
    assert talk.run(limited, scope) == []
    assert talk.reads == ["websocket.disconnect"]
    ctx = recorder.ended[-1]
    assert (ctx.outcome, ctx.decided_by, ctx.client_disconnected) == (
        "disconnected",
        "ratelimit",
        True,
    )


def test_an_admitted_app_reads_the_connect_itself_once() -> None:
    reads: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reads.append((await receive())["type"])
        await send({"type": "websocket.accept"})
        reads.append((await receive())["type"])

    limited = FidelityMiddleware(
        app,
        policy=Policy(rate_limits=(RateLimit(name="one", rate="9/h", burst=9),)),
        clock=FakeClock(),
        telemetry=False,
    )
    talk = Conversation(CONNECT, {"type": "websocket.disconnect", "code": 1000})
    talk.run(limited, ws_scope())
    assert reads == ["websocket.connect", "websocket.disconnect"]
    assert talk.reads == reads


def test_the_apps_own_denial_response_is_passed_whole_and_records_its_status() -> None:
    recorder = Recorder()
    messages = [
        {"type": "websocket.http.response.start", "status": 401, "headers": []},
        {"type": "websocket.http.response.body", "body": b"no", "more_body": True},
        {"type": "websocket.http.response.body", "body": b"pe"},
    ]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        for message in messages:
            await send(message)

    limited = FidelityMiddleware(
        app,
        policy=Policy(
            rate_limits=(RateLimit(name="one", rate="9/h", burst=9),),
            rate_limit_headers="on_reject",
        ),
        clock=FakeClock(),
        observer=recorder,
    )
    sent = Conversation(CONNECT).run(limited, ws_scope(extensions=EXTENSION))
    assert sent == messages
    (ctx,) = recorder.ended
    assert (ctx.status, ctx.outcome, ctx.decided_by) == (401, "served", "app")


# ------------------------------------------------------------ 2. long-lived sockets


def test_many_sockets_leave_no_context_task_or_plan_behind() -> None:
    """Each admitted socket's context ends at its accept and is dropped with its scope;
    the gate keeps one plan per path, and no task of ours outlives the sockets."""
    recorder = Recorder()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await receive()  # until the client goes

    limited = FidelityMiddleware(
        app,
        policy=Policy(rate_limits=(RateLimit(name="many", rate="1000/s", burst=1000),)),
        clock=FakeClock(),
        observer=recorder,
    )

    async def main() -> int:
        async def one(i: int) -> None:
            talk = Conversation(CONNECT, {"type": "websocket.disconnect", "code": 1000})
            scope = ws_scope(client=(f"10.0.{i // 250}.{i % 250}", 1))
            await limited(scope, talk.receive, talk.send)

        await asyncio.gather(*(one(i) for i in range(300)))
        return len(asyncio.all_tasks())

    def live_contexts() -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if isinstance(obj, DecisionContext))

    before = live_contexts()  # (other tests' may still be about)
    tasks_left = asyncio.run(main())
    assert tasks_left == 1  # main itself
    assert len(recorder.ended) == 300
    assert {ctx.status for ctx in recorder.ended} == {101}
    recorder.ended.clear()
    assert live_contexts() == before
    gate = limited._websockets
    assert gate is not None
    assert len(gate._plans) == 1


def test_the_handshake_span_is_not_current_once_the_socket_is_open() -> None:
    """After the accept, what the app does (an outbound call) is not under the
    handshake's span: it ended, and the context is what it was before."""
    from opentelemetry import trace

    from test_telemetry_helpers import pipeline

    otel = pipeline()
    seen: dict[str, bool] = {}

    async def ws(websocket: WebSocket) -> None:
        seen["during"] = trace.get_current_span().get_span_context().is_valid
        await websocket.accept()
        seen["after"] = trace.get_current_span().get_span_context().is_valid
        await websocket.close()

    try:
        app = Starlette(routes=[WebSocketRoute("/ws", ws)])
        policy = Policy(rate_limits=(RateLimit(name="one", rate="9/h", burst=9),))
        app.add_middleware(
            FidelityMiddleware, policy=policy, clock=FakeClock(), observer=otel.telemetry
        )
        with (
            TestClient(app) as client,
            pytest.raises(WebSocketDisconnect),
            client.websocket_connect("/ws") as s,
        ):
            s.receive_text()
        (span,) = otel.finished()
    finally:
        otel.shutdown()
    assert seen == {"during": True, "after": False}
    assert span.end_time is not None


# ------------------------------------------------------------ 4. route names


def _starlette(*routes: Any, observer: Any, policy: Policy) -> Starlette:
    app = Starlette(routes=list(routes))
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False, observer=observer
    )
    return app


def test_a_starlette_websocket_route_names_the_handshake() -> None:
    recorder = Recorder()
    app = _starlette(
        WebSocketRoute("/ws/{room}", echo),
        Route("/info", hello),
        observer=recorder,
        policy=by_route(),
    )
    with TestClient(app) as client:
        with client.websocket_connect("/ws/a") as socket_:
            socket_.send_text("x")
            assert socket_.receive_text() == "X"
        with client.websocket_connect("/ws/b") as socket_:
            socket_.send_text("x")
            assert socket_.receive_text() == "X"
        # key = "route": /ws/a and /ws/b share the route's counter
        with pytest.raises(WebSocketDenialResponse), client.websocket_connect("/ws/c"):
            pass
    assert [ctx.route for ctx in recorder.ended] == ["/ws/{room}"] * 3


def test_an_http_request_and_a_handshake_on_one_path_keep_their_own_names() -> None:
    """The plan of an HTTP GET to a websocket path (the router's 404: unmatched) and the
    handshake's are two plans, whichever comes first."""
    recorder = Recorder()
    app = _starlette(WebSocketRoute("/ws/{room}", echo), observer=recorder, policy=by_route())
    with TestClient(app) as client:
        assert client.get("/ws/a").status_code == 404
        with client.websocket_connect("/ws/a") as socket_:
            socket_.send_text("x")
            assert socket_.receive_text() == "X"
        assert client.get("/ws/b").status_code == 404
    assert [ctx.route for ctx in recorder.ended] == [UNMATCHED, "/ws/{room}", UNMATCHED]


def test_a_websocket_route_and_an_http_route_of_one_template() -> None:
    """A GET route and a websocket route at one path: each scope is the route's."""
    recorder = Recorder()
    app = _starlette(
        WebSocketRoute("/live", echo),
        Route("/live", hello),
        observer=recorder,
        policy=by_route(),
    )
    with TestClient(app) as client:
        assert client.get("/live").text == "hello"
        with client.websocket_connect("/live") as socket_:
            socket_.send_text("x")
            assert socket_.receive_text() == "X"
    assert [ctx.route for ctx in recorder.ended] == ["/live", "/live"]


def test_a_mounted_websocket_route_and_root_path() -> None:
    recorder = Recorder()
    app = _starlette(
        Mount("/api", routes=[WebSocketRoute("/ws/{room}", echo)]),
        observer=recorder,
        policy=by_route(),
    )
    with TestClient(app) as client, client.websocket_connect("/api/ws/a") as socket_:
        socket_.send_text("x")
        assert socket_.receive_text() == "X"
    with (
        TestClient(app, root_path="/edge") as client,
        client.websocket_connect("/edge/api/ws/a") as socket_,
    ):
        socket_.send_text("x")
        assert socket_.receive_text() == "X"
    assert [ctx.route for ctx in recorder.ended] == ["/api/ws/{room}"] * 2


def test_fastapi_websocket_routes_top_level_and_included() -> None:
    from fastapi import APIRouter, FastAPI

    recorder = Recorder()
    app = FastAPI()
    router = APIRouter(prefix="/r")

    @app.websocket("/ws/{room}")
    async def top(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        await websocket.send_text(room)
        await websocket.close()

    @router.websocket("/inner/{room}")
    async def inner(websocket: WebSocket, room: str) -> None:
        await websocket.accept()
        await websocket.send_text(room)
        await websocket.close()

    app.include_router(router)
    app.add_middleware(
        FidelityMiddleware, policy=by_route(), clock=FakeClock(), telemetry=False, observer=recorder
    )
    with TestClient(app) as client:
        for path in ("/ws/a", "/r/inner/b"):
            with client.websocket_connect(path) as socket_:
                assert socket_.receive_text() == path[-1]
        # an HTTP GET to a websocket-only path is the router's 404: no route of its own
        assert client.get("/ws/a").status_code == 404
        assert client.get("/r/inner/b").status_code == 404
    assert [ctx.route for ctx in recorder.ended] == [
        "/ws/{room}",
        "/r/inner/{room}",
        UNMATCHED,
        UNMATCHED,
    ]


def test_the_apps_own_denial_carries_the_ratelimit_fields_as_its_accept_would() -> None:
    """`rate_limit_headers = "always"`: an HTTP response of the app's carries the
    RateLimit fields (HTTP: every limited response), so its own answer to a handshake
    does too, as its accept does."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.http.response.start", "status": 401, "headers": []})
        await send({"type": "websocket.http.response.body", "body": b"nope"})

    limited = FidelityMiddleware(
        app,
        policy=Policy(rate_limits=(RateLimit(name="one", rate="9/h", burst=9),)),
        clock=FakeClock(),
        telemetry=False,
    )
    start = Conversation(CONNECT).run(limited, ws_scope(extensions=EXTENSION))[0]
    headers = dict(start["headers"])
    assert headers[b"ratelimit"] == b'"one";r=8;t=400'
    assert b"ratelimit-policy" in headers


def test_a_fastapi_limits_denial_carries_the_middlewares_fields_as_refunded() -> None:
    """The dependency's 429 gives the middleware's units back; its fields say so (as
    for HTTP: `refunded_fields`), not one unit low."""
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    clock = FakeClock()
    fidelity = Fidelity(clock=clock)
    app = FastAPI()

    @app.websocket("/ws", dependencies=[Depends(fidelity.limit("1/h", key="header:x-k"))])
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    @app.get("/ws-http", dependencies=[Depends(fidelity.limit("1/h", key="header:x-k"))])
    async def http() -> str:
        return "ok"

    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(rate_limits=(RateLimit(name="sockets", rate="5/h", burst=5),)),
        clock=clock,
        telemetry=False,
    )
    fidelity.install(app)
    with TestClient(app) as client:
        with (
            pytest.raises(WebSocketDisconnect),
            client.websocket_connect("/ws", headers={"x-k": "a"}) as socket_,
        ):
            socket_.receive_text()
        refused = client.websocket_connect
        with pytest.raises(WebSocketDenialResponse) as info, refused("/ws", headers={"x-k": "a"}):
            pass
        assert client.get("/ws-http", headers={"x-k": "b"}).status_code == 200
        http_refused = client.get("/ws-http", headers={"x-k": "b"})
    denial = info.value
    assert denial.status_code == http_refused.status_code == 429
    ours = [v for v in denial.headers.get_list("ratelimit") if v.startswith('"sockets"')]
    http_ours = [v for v in http_refused.headers.get_list("ratelimit") if '"sockets"' in v]
    assert ours == ['"sockets";r=4;t=720']  # one handshake charged, the refused one not
    assert http_ours[0].startswith('"sockets";r=3;')  # HTTP, the same rule: ws + 1 GET charged


def test_websocket_routes_under_two_hosts_keep_two_names() -> None:
    from starlette.routing import Host, Router

    recorder = Recorder()
    app = _starlette(
        Host("a.example.com", app=Router([WebSocketRoute("/ws", echo)])),
        Host("b.example.com", app=Router([WebSocketRoute("/ws", echo)])),
        observer=recorder,
        policy=by_route(),
    )
    with TestClient(app) as client:
        for host in ("a.example.com", "b.example.com", "a.example.com"):
            with client.websocket_connect("/ws", headers={"host": host}) as socket_:
                socket_.send_text("x")
                assert socket_.receive_text() == "X"
    assert [ctx.route for ctx in recorder.ended] == [
        "a.example.com/ws",
        "b.example.com/ws",
        "a.example.com/ws",
    ]


def test_a_websocket_route_of_a_mounted_starlette_app() -> None:
    recorder = Recorder()
    sub = Starlette(routes=[WebSocketRoute("/ws/{room}", echo)])
    app = _starlette(Mount("/sub", app=sub), observer=recorder, policy=by_route())
    with TestClient(app) as client, client.websocket_connect("/sub/ws/a") as socket_:
        socket_.send_text("x")
        assert socket_.receive_text() == "X"
    assert [ctx.route for ctx in recorder.ended] == ["/sub/ws/{room}"]
