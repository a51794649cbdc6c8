"""Websocket handshakes under the route's rate limits (inbound/websocket.py).

A handshake on a path a `[[rate_limit]]` covers is admitted by that limit like a GET:
the same keys and store call, the same records. Refused, the app does not run: the
server's `websocket.http.response` extension carries the same 429 (or the
closed-on-error 503) as HTTP, else the handshake is closed with 1013. Deadline,
bulkhead and route breaker do not apply. A websocket no limit covers passes through
untouched, as every websocket did before.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.context import DecisionContext
from fidelity_mw.errors import StateUnavailable
from fidelity_mw.policy import BreakerConfig, ConcurrencyConfig, StateConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock

with warnings.catch_warnings():  # Starlette 1.x asks for httpx2; httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient, WebSocketDenialResponse

PER_CLIENT = RateLimit(name="sockets", rate="2/min", burst=2, match="/ws*")


class Recorder:
    """A RequestObserver that keeps every context it saw end."""

    def __init__(self) -> None:
        self.ended: list[DecisionContext] = []

    def start(self, ctx: DecisionContext, scope: Any) -> None:
        return None

    def end(self, ctx: DecisionContext, scope: Any, token: Any) -> None:
        self.ended.append(ctx)


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


def make_app(
    policy: Policy,
    clock: FakeClock,
    observer: Any = None,
    ws: Callable[[WebSocket], Any] = echo,
    **kw: Any,
) -> Starlette:
    app = Starlette(routes=[WebSocketRoute("/ws", ws), Route("/ws-info", hello)])
    app.add_middleware(
        FidelityMiddleware,
        policy=policy,
        clock=clock,
        telemetry=False,
        observer=observer,
        **kw,
    )
    return app


def connect_and_echo(client: TestClient, text: str = "hi", **kw: Any) -> str:
    with client.websocket_connect("/ws", **kw) as socket_:
        socket_.send_text(text)
        reply: str = socket_.receive_text()
        return reply


def denied(client: TestClient, **kw: Any) -> WebSocketDenialResponse:
    with pytest.raises(WebSocketDenialResponse) as info, client.websocket_connect("/ws", **kw):
        pass
    return info.value


# ------------------------------------------------------------ the denial response


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


CONNECT: dict[str, Any] = {"type": "websocket.connect"}


def _run(app: Any, scope: dict[str, Any], inbox: list[dict[str, Any]]) -> list[dict[str, Any]]:
    talk = Conversation(*inbox)
    sent = talk.run(app, scope)
    inbox[:] = talk.inbox
    return sent


def test_the_handshake_over_the_limit_gets_the_429_of_an_http_request() -> None:
    clock = FakeClock()
    recorder = Recorder()
    app = make_app(Policy(rate_limits=(PER_CLIENT,)), clock, recorder)
    with TestClient(app) as client:
        assert connect_and_echo(client, "one") == "ONE"
        assert connect_and_echo(client, "two") == "TWO"
        refused = denied(client)
        http = client.get("/ws-info")  # the same limit and key: an HTTP request's answer
        clock.advance(30.0)  # one unit back at 2/min
        assert connect_and_echo(client, "three") == "THREE"
    assert refused.status_code == 429
    headers = refused.headers
    assert headers["content-type"] == "application/problem+json"
    assert headers["cache-control"] == "no-store"
    assert headers["x-fidelity-decided-by"] == "ratelimit"
    assert headers["retry-after"] == "30"
    assert headers["ratelimit-policy"] == '"sockets";q=2;w=60'
    assert headers["ratelimit"] == '"sockets";r=0;t=30'
    assert refused.json() == {
        "type": "urn:fidelity-mw:problem:rate-limited",
        "title": "Too Many Requests",
        "status": 429,
        "detail": "rate limit 'sockets' exceeded; retry in 30 s",
        "limit": "sockets",
    }
    assert http.status_code == 429  # the same counter as the handshakes
    for name in ("retry-after", "ratelimit-policy", "ratelimit", "x-fidelity-decided-by"):
        assert http.headers[name] == headers[name]
    assert http.json() == refused.json()
    # the records: the limit's, as for HTTP; no deadline, breaker or bulkhead record
    first, refused_ctx = recorder.ended[0], recorder.ended[2]
    assert [(d.layer, d.subject, d.verdict, d.reason) for d in first.decisions] == [
        ("ratelimit", "sockets", "allow", "under_limit")
    ]
    assert (first.status, first.outcome, first.decided_by) == (101, "served", "app")
    assert first.client_key == "testclient"
    assert [(d.layer, d.verdict, d.reason) for d in refused_ctx.decisions] == [
        ("ratelimit", "reject", "over_limit")
    ]
    assert (refused_ctx.status, refused_ctx.outcome, refused_ctx.decided_by) == (
        429,
        "rejected",
        "ratelimit",
    )
    assert len(recorder.ended) == 5  # three handshakes admitted, one refused, one GET


def test_a_refused_handshake_reads_its_connect_and_never_runs_the_app() -> None:
    """Raw ASGI: the refusal reads the first message (`websocket.connect`), answers, and
    leaves the app alone."""
    clock = FakeClock()
    ran: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["path"])
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})

    limited = FidelityMiddleware(
        app,
        policy=Policy(rate_limits=(RateLimit(name="one", rate="1/h", burst=1),)),
        clock=clock,
        telemetry=False,
    )
    scope = {
        "type": "websocket",
        "path": "/ws",
        "headers": [],
        "client": ("10.0.0.1", 5000),
        "extensions": {"websocket.http.response": {}},
    }
    talks = [Conversation(CONNECT), Conversation(CONNECT)]
    for talk in talks:
        talk.run(limited, scope)
    reads, sent = talks[1].reads, talks[1].sent
    assert ran == ["/ws"]  # the second handshake never reached the app
    assert reads == ["websocket.connect"]  # ...which read its connect itself
    assert [m["type"] for m in sent] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert sent[0]["status"] == 429
    assert json.loads(sent[1]["body"])["type"] == "urn:fidelity-mw:problem:rate-limited"


# ------------------------------------------------------------ the close fallback


def test_without_the_extension_the_handshake_is_closed_1013_with_a_reason() -> None:
    clock = FakeClock()
    recorder = Recorder()
    ran: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(1)
        await receive()
        await send({"type": "websocket.accept"})

    limited = FidelityMiddleware(
        app,
        policy=Policy(rate_limits=(RateLimit(name="one", rate="1/h", burst=1),)),
        clock=clock,
        observer=recorder,
    )
    scope = {"type": "websocket", "path": "/ws", "headers": [], "client": ("10.0.0.2", 1)}
    admitted = _run(limited, dict(scope), [{"type": "websocket.connect"}])
    inbox = [{"type": "websocket.connect"}]
    refused = _run(limited, dict(scope), inbox)
    assert [m["type"] for m in admitted] == ["websocket.accept"]
    assert ran == [1]
    assert inbox == []  # its connect was read
    assert refused == [
        {"type": "websocket.close", "code": 1013, "reason": "rate limited; retry in 3600 s"}
    ]
    ctx = recorder.ended[-1]
    assert (ctx.status, ctx.outcome, ctx.decided_by) == (403, "rejected", "ratelimit")


def test_the_close_fallback_through_the_testclient() -> None:
    """Starlette's TestClient offers the extension; an app that hides it (as a server
    without it) gets the close, which the client sees as a disconnect with 1013."""
    clock = FakeClock()
    inner = make_app(Policy(rate_limits=(RateLimit(name="one", rate="1/h", burst=1),)), clock)

    async def without_extension(scope: Any, receive: Any, send: Any) -> None:
        scope = {k: v for k, v in scope.items() if k != "extensions"}
        await inner(scope, receive, send)

    with TestClient(without_extension) as client:
        assert connect_and_echo(client) == "HI"
        with pytest.raises(WebSocketDisconnect) as closed:  # noqa: PT012, SIM117
            with client.websocket_connect("/ws") as socket_:
                socket_.send_text("x")  # (answered, were the handshake admitted)
                socket_.receive_text()
    assert closed.value.code == 1013
    assert closed.value.reason == "rate limited; retry in 3600 s"


# ------------------------------------------------------------ state failure, closed


class _Away(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.admit_now = None  # type: ignore[assignment]  # a shared store: awaited

    async def admit(self, *args: Any, **kwargs: Any) -> Any:
        raise StateUnavailable("redis is unreachable", why="unreachable")


@pytest.mark.parametrize("extension", [True, False])
def test_closed_on_error_refuses_the_handshake_with_the_state_answer(extension: bool) -> None:
    recorder = Recorder()
    ran: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(1)

    policy = Policy(rate_limits=(PER_CLIENT,), state=StateConfig(on_error="closed"))
    closed = FidelityMiddleware(
        app, policy=policy, clock=FakeClock(), store=_Away(), observer=recorder
    )
    scope: dict[str, Any] = {"type": "websocket", "path": "/ws", "headers": [], "client": None}
    if extension:
        scope["extensions"] = {"websocket.http.response": {}}
    sent = _run(closed, scope, [{"type": "websocket.connect"}])
    assert ran == []
    if extension:
        assert sent[0]["type"] == "websocket.http.response.start"
        assert sent[0]["status"] == 503
        headers = dict(sent[0]["headers"])
        assert headers[b"retry-after"] == b"1"
        assert headers[b"x-fidelity-decided-by"] == b"state"
        body = json.loads(sent[1]["body"])
        assert body["type"] == "urn:fidelity-mw:problem:state-unavailable"
    else:
        assert sent == [
            {"type": "websocket.close", "code": 1013, "reason": "service unavailable; retry in 1 s"}
        ]
    ctx = recorder.ended[0]
    assert (ctx.outcome, ctx.decided_by) == ("shed", "state")
    [decision] = ctx.decisions
    assert (decision.layer, decision.subject, decision.verdict) == (
        "ratelimit",
        "sockets",
        "reject",
    )
    assert decision.reason == "state_error:StateUnavailable"


def test_open_on_error_admits_the_handshake() -> None:
    policy = Policy(rate_limits=(PER_CLIENT,), state=StateConfig(on_error="open"))
    app = make_app(policy, FakeClock(), store=_Away())
    with TestClient(app) as client:
        assert connect_and_echo(client) == "HI"


# ------------------------------------------------------------ what does not apply


def test_deadline_bulkhead_and_breaker_do_not_apply_to_a_handshake() -> None:
    """An expired caller deadline, a full bulkhead and an open route breaker each refuse
    an HTTP request of the route; its handshakes are asked of the limits alone."""
    recorder = Recorder()

    async def failing(request: Request) -> Response:
        return PlainTextResponse("down", status_code=500)

    app = Starlette(routes=[Route("/ws", failing), WebSocketRoute("/ws", echo)])
    policy = Policy(
        rate_limits=(RateLimit(name="sockets", rate="100/s", match="/ws*"),),
        concurrency=ConcurrencyConfig(limit=1, max_queue=0),
        breaker=BreakerConfig(consecutive_failures=1, open_s=60.0),
    )
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), observer=recorder)
    with TestClient(app) as client:
        assert client.get("/ws").status_code == 500
        shed = client.get("/ws")  # the route's breaker is open now
        expired = {"x-request-timeout-ms": "0"}
        # a second socket while the first is open: it holds no bulkhead slot
        with (
            client.websocket_connect("/ws", headers=expired) as first,
            client.websocket_connect("/ws") as second,
        ):
            first.send_text("a")
            second.send_text("b")
            assert (first.receive_text(), second.receive_text()) == ("A", "B")
    assert (shed.status_code, shed.headers["x-fidelity-decided-by"]) == (503, "breaker")
    sockets = [ctx for ctx in recorder.ended if ctx.status == 101]
    assert len(sockets) == 2
    assert [ctx.route for ctx in sockets] == ["/ws", "/ws"]  # the GET route's identity
    assert {d.layer for ctx in sockets for d in ctx.decisions} == {"ratelimit"}
    assert all(ctx.deadline_at is None for ctx in sockets)


def test_a_cost_function_is_not_called_for_a_handshake_which_costs_one() -> None:
    calls: list[str] = []

    def cost(request: Request) -> int:
        calls.append(request.url.path)
        return 2

    limit = RateLimit(name="costed", rate="3/min", burst=3, match="/ws*", cost=cost)
    app = make_app(Policy(rate_limits=(limit,)), FakeClock())
    with TestClient(app) as client:
        for _ in range(3):  # 3 units, one per handshake
            assert connect_and_echo(client) == "HI"
        assert denied(client).status_code == 429
    assert calls == []


def test_a_limit_that_leaves_get_out_does_not_count_handshakes() -> None:
    writes = RateLimit(name="writes", rate="1/h", burst=1, methods=("POST",))
    excluded = RateLimit(name="most", rate="1/h", burst=1, exclude=("/ws",))
    app = make_app(Policy(rate_limits=(writes, excluded)), FakeClock())
    with TestClient(app) as client:
        for _ in range(3):
            assert connect_and_echo(client) == "HI"


# ------------------------------------------------------------ no limit: as before


def test_a_websocket_no_limit_covers_passes_through_unchanged() -> None:
    """The app gets the server's own `receive` and `send`, and every message passes as it
    is, in both directions; no decision context is made."""
    seen: list[Any] = []
    received: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.extend([receive, send, dict(scope.get("state") or {})])
        for _ in range(3):
            received.append(await receive())
        await send({"type": "websocket.accept", "subprotocol": "chat", "headers": [(b"a", b"b")]})
        await send({"type": "websocket.send", "bytes": b"\x00\xff"})
        await send({"type": "websocket.send", "text": "t"})
        await send({"type": "websocket.close", "code": 4000, "reason": "bye"})

    for policy in (
        Policy(rate_limits=(RateLimit(name="api", rate="1/h", burst=1, match="/api/*"),)),
        Policy(),
    ):
        seen.clear()
        received.clear()
        mw = FidelityMiddleware(app, policy=policy, clock=FakeClock(), telemetry=False)
        inbox = [
            {"type": "websocket.connect"},
            {"type": "websocket.receive", "bytes": b"\x01"},
            {"type": "websocket.receive", "text": "x"},
        ]
        scope = {"type": "websocket", "path": "/ws", "headers": [], "client": ("1.2.3.4", 9)}
        for _ in range(3):  # never limited
            received.clear()
            seen.clear()
            talk = Conversation(*inbox)
            sent = talk.run(mw, scope)
            assert seen[0] == talk.receive  # the server's own, not wrapped
            assert seen[1] == talk.send
            assert seen[2] == {}
            assert received == inbox
            assert sent == [
                {"type": "websocket.accept", "subprotocol": "chat", "headers": [(b"a", b"b")]},
                {"type": "websocket.send", "bytes": b"\x00\xff"},
                {"type": "websocket.send", "text": "t"},
                {"type": "websocket.close", "code": 4000, "reason": "bye"},
            ]


def test_an_admitted_socket_passes_its_messages_unchanged() -> None:
    """On a limited route the app's messages after the handshake pass as they are."""
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept", "subprotocol": "chat"})
        await send({"type": "websocket.send", "bytes": b"\x00\xff"})
        await send({"type": "websocket.close", "code": 4000, "reason": "bye"})

    mw = FidelityMiddleware(
        app, policy=Policy(rate_limits=(PER_CLIENT,)), clock=FakeClock(), telemetry=False
    )
    scope = {"type": "websocket", "path": "/ws", "headers": [], "client": ("1.2.3.4", 9)}
    sent = _run(mw, scope, [{"type": "websocket.connect"}])
    fields = [(b"ratelimit-policy", b'"sockets";q=2;w=60'), (b"ratelimit", b'"sockets";r=1;t=30')]
    assert sent == [
        # the handshake's answer carries the fields, as an HTTP response does
        {"type": "websocket.accept", "subprotocol": "chat", "headers": fields},
        {"type": "websocket.send", "bytes": b"\x00\xff"},
        {"type": "websocket.close", "code": 4000, "reason": "bye"},
    ]


def test_the_accept_carries_the_ratelimit_fields_as_an_http_response_would() -> None:
    for when, expected in (("always", True), ("on_reject", False)):
        policy = Policy(rate_limits=(PER_CLIENT,), rate_limit_headers=when)
        app = make_app(policy, FakeClock())
        with TestClient(app) as client, client.websocket_connect("/ws") as socket_:
            headers = dict(socket_.extra_headers or [])
        if expected:
            assert headers[b"ratelimit-policy"] == b'"sockets";q=2;w=60'
            assert headers[b"ratelimit"] == b'"sockets";r=1;t=30'
        else:
            assert headers == {}


# ------------------------------------------------------------ the app's own answer


def test_the_apps_own_refusal_of_the_handshake_is_served_and_charged() -> None:
    recorder = Recorder()

    async def refusing(websocket: WebSocket) -> None:
        await websocket.close(code=1008)

    app = make_app(Policy(rate_limits=(PER_CLIENT,)), FakeClock(), recorder, ws=refusing)
    with TestClient(app) as client:
        for _ in range(2):
            with pytest.raises(WebSocketDisconnect), client.websocket_connect("/ws"):
                pass
        assert denied(client).status_code == 429  # both were charged
    first = recorder.ended[0]
    assert (first.status, first.outcome, first.decided_by) == (403, "served", "app")


def test_a_fastapi_limits_refusal_gives_the_middlewares_units_back() -> None:
    """One layer's refusal costs no quota of another, as for HTTP: the dependency's 429
    on the handshake hands the middleware's units back."""
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    clock = FakeClock()
    fidelity = Fidelity(clock=clock)
    app = FastAPI()
    recorder = Recorder()

    @app.websocket("/ws", dependencies=[Depends(fidelity.limit("1/h", key="header:x-k"))])
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(rate_limits=(PER_CLIENT,)),
        clock=clock,
        observer=recorder,
    )
    fidelity.install(app)
    limits = []
    with TestClient(app) as client:
        with client.websocket_connect("/ws", headers={"x-k": "a"}) as socket_:
            assert socket_.receive_text() == "hi"
        for _ in range(2):  # the dependency's 429s: the middleware's units come back
            limits.append(denied(client, headers={"x-k": "a"}).json()["limit"])
        with client.websocket_connect("/ws", headers={"x-k": "b"}) as socket_:
            assert socket_.receive_text() == "hi"  # the middleware's second unit
        limits.append(denied(client, headers={"x-k": "c"}).json()["limit"])
    assert limits == ["/ws:1/h", "/ws:1/h", "sockets"]
    refused = [ctx for ctx in recorder.ended if ctx.status == 429]
    assert [(c.outcome, c.decided_by) for c in refused] == [("rejected", "ratelimit")] * 3


def test_on_reject_shapes_the_denial_as_for_http() -> None:
    def shaped(ctx: Any, decision: Any) -> Response:
        return JSONResponse({"slow": "down"}, status_code=429, headers={"retry-after": "9"})

    app = make_app(
        Policy(rate_limits=(RateLimit(name="one", rate="1/h", burst=1),)),
        FakeClock(),
        on_reject=shaped,
    )
    with TestClient(app) as client:
        assert connect_and_echo(client) == "HI"
        refused = denied(client)
    assert refused.status_code == 429
    assert refused.json() == {"slow": "down"}
    assert refused.headers["retry-after"] == "9"


# ------------------------------------------------------------ a real server


def test_uvicorn_wsproto_the_n_plus_first_handshake_in_the_window_gets_429() -> None:
    import uvicorn
    import websocket as websocket_client  # websocket-client

    clock = FakeClock()
    app = make_app(Policy(rate_limits=(PER_CLIENT,)), clock)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, ws="wsproto", log_level="error", lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        while not server.started:  # startup: a few milliseconds
            assert thread.is_alive()
            assert time.monotonic() - start < 10
            time.sleep(0.002)
        url = f"ws://127.0.0.1:{port}/ws"
        opened = []
        for i in range(2):  # N = 2 within the window: connect and echo, held open
            conn = websocket_client.create_connection(url, timeout=10)
            conn.send(f"m{i}")
            assert conn.recv() == f"M{i}"
            opened.append(conn)
        with pytest.raises(websocket_client.WebSocketBadStatusException) as refused:
            websocket_client.create_connection(url, timeout=10)
        for conn in opened:  # the open sockets go on
            conn.send("still")
            assert conn.recv() == "STILL"
            conn.close()
        clock.advance(30.0)  # the window moves on: one handshake's worth back
        again = websocket_client.create_connection(url, timeout=10)
        again.send("back")
        assert again.recv() == "BACK"
        again.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    error = refused.value
    assert error.status_code == 429
    headers = {k.lower(): v for k, v in (error.resp_headers or {}).items()}
    assert headers["retry-after"] == "30"
    assert headers["content-type"] == "application/problem+json"
    assert headers["ratelimit"] == '"sockets";r=0;t=30'
    assert json.loads(error.resp_body)["type"] == "urn:fidelity-mw:problem:rate-limited"


# ------------------------------------------------------------ telemetry


def test_the_handshake_span_says_what_an_http_requests_says() -> None:
    from fidelity_mw.telemetry import schema
    from test_telemetry_helpers import pipeline

    otel = pipeline()
    try:
        app = Starlette(routes=[WebSocketRoute("/ws", echo)])
        policy = Policy(rate_limits=(RateLimit(name="one", rate="1/h", burst=1),))
        app.add_middleware(
            FidelityMiddleware, policy=policy, clock=FakeClock(), observer=otel.telemetry
        )
        with TestClient(app) as client:
            assert connect_and_echo(client) == "HI"
            assert denied(client).status_code == 429
        admitted, refused = (dict(span.attributes or {}) for span in otel.finished())
    finally:
        otel.shutdown()
    assert admitted.get(schema.OUTCOME, "served") == "served"
    assert admitted.get(schema.DECIDED_BY, "app") == "app"
    assert admitted["http.response.status_code"] == 101
    assert refused.get(schema.OUTCOME, "served") == "rejected"
    assert refused.get(schema.DECIDED_BY, "app") == "ratelimit"
    assert refused["http.response.status_code"] == 429
    assert refused[schema.ROUTE] == admitted["http.route"]


# ------------------------------------------------------------ fidelity-mw map


def test_the_map_says_which_limits_count_websocket_handshakes() -> None:
    from fidelity_mw.tools.statemap import from_policy

    policy = Policy(
        rate_limits=(
            PER_CLIENT,
            RateLimit(name="reads", rate="5/s", methods=("GET",)),
            RateLimit(name="writes", rate="5/s", methods=("POST",)),
        )
    )
    decides = {
        row.subject.split("'")[1]: row.decides
        for row in from_policy(policy, "test").layers
        if row.layer == "ratelimit"
    }
    handshakes = "websocket handshakes too (refused: 429, or a close 1013)"
    assert handshakes in decides["sockets"]
    assert handshakes in decides["reads"]
    assert "websocket" not in decides["writes"]
