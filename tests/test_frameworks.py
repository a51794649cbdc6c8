"""Real Starlette and FastAPI apps: the middleware is invisible when it does not intervene.

Where it matters, the same scenario runs with and without the middleware and
the two are compared message by message.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import fidelity_mw
from _asgi import http_scope
from fidelity_mw import BreakerConfig, FidelityMiddleware, Policy, RateLimit
from fidelity_mw.testing import FakeClock

with warnings.catch_warnings():  # Starlette 1.x asks for httpx2; httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

# A policy with every inbound layer on but nothing that adds headers, so a
# response through the middleware can be compared byte for byte with one without.
QUIET = Policy(
    breaker=BreakerConfig(),
    rate_limits=(RateLimit(name="l", rate="1000/s"),),
    rate_limit_headers="never",
)
LIMITED = Policy(rate_limits=(RateLimit(name="l", rate="1/h", burst=1),))

CHUNKS = [b"first ", b"", b"second " * 100, b"third", b"\x00\xff"]


class Log:
    def __init__(self) -> None:
        self.events: list[Any] = []


# ---------------------------------------------------------------- apps


def starlette_app(log: Log) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        log.events.append("startup")
        yield {"greeting": "hello"}
        log.events.append("shutdown")

    async def stream(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for chunk in CHUNKS:
                yield chunk
                await asyncio.sleep(0)

        return StreamingResponse(body(), media_type="application/octet-stream")

    async def echo(request: Request) -> Response:
        parts = []
        async for part in request.stream():
            parts.append(part)
        log.events.append(("parts", parts))
        return Response(b"".join(parts), media_type="application/octet-stream")

    async def hello(request: Request) -> Response:
        log.events.append(("ctx", fidelity_mw.current(), request.state.fidelity))
        return PlainTextResponse(f"{request.state.greeting} world")

    async def plain(request: Request) -> Response:
        return PlainTextResponse("hello world")

    async def background(request: Request) -> Response:
        def task(value: str) -> None:
            log.events.append(("background", value, fidelity_mw.current()))

        return PlainTextResponse("queued", background=BackgroundTask(task, "done"))

    async def boom(request: Request) -> Response:
        raise LookupError("the app's own error")

    async def handled(request: Request) -> Response:
        raise ValueError("handled by the app")

    async def value_error(request: Request, exc: Exception) -> Response:
        return JSONResponse({"handled": str(exc)}, status_code=418)

    async def broken_stream(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"partial"
            raise LookupError("mid-stream")

        return StreamingResponse(body())

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        log.events.append(("ws-ctx", fidelity_mw.current()))
        while True:
            message = await websocket.receive_text()
            if message == "bye":
                await websocket.close(code=1000)
                return
            await websocket.send_text(message.upper())

    return Starlette(
        routes=[
            Route("/stream", stream),
            Route("/echo", echo, methods=["POST"]),
            Route("/hello", hello),
            Route("/plain", plain),
            Route("/background", background),
            Route("/boom", boom),
            Route("/handled", handled),
            Route("/broken-stream", broken_stream),
            WebSocketRoute("/ws", ws),
        ],
        lifespan=lifespan,
        exception_handlers={ValueError: value_error},
    )


def fastapi_app(log: Log) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.events.append("startup")
        yield
        log.events.append("shutdown")

    app = FastAPI(lifespan=lifespan)

    def request_id() -> str | None:
        ctx = fidelity_mw.current()
        return ctx.request_id if ctx else None

    @app.get("/sync")
    def sync_route(dep: str | None = Depends(request_id)) -> dict[str, Any]:
        ctx = fidelity_mw.current()
        return {
            "thread": threading.current_thread().name,
            "request_id": ctx.request_id if ctx else None,
            "dep": dep,
            "deadline": ctx.deadline_at if ctx else None,
        }

    @app.get("/async")
    async def async_route(request: Request) -> dict[str, Any]:
        ctx = fidelity_mw.current()
        assert ctx is request.state.fidelity
        return {"request_id": ctx.request_id if ctx else None, "route": ctx.route if ctx else None}

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.post("/items")
    async def create(body: dict[str, Any]) -> dict[str, Any]:
        return {"got": body}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for chunk in CHUNKS:
                yield chunk

        return StreamingResponse(body())

    @app.get("/background")
    async def background(tasks: BackgroundTasks) -> dict[str, str]:
        tasks.add_task(lambda: log.events.append("background ran"))
        return {"status": "queued"}

    @app.get("/missing")
    async def missing() -> None:
        raise HTTPException(status_code=404, detail="no such thing")

    @app.get("/boom")
    async def boom() -> None:
        raise LookupError("the app's own error")

    @app.get("/sync-boom")
    def sync_boom() -> None:
        raise LookupError("sync error")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"hello": await websocket.receive_text()})
        await websocket.close()

    return app


def with_middleware(app: Any, clock: FakeClock, policy: Policy = QUIET) -> Any:
    app.add_middleware(FidelityMiddleware, policy=policy, clock=clock, telemetry=False)
    return app


# ---------------------------------------------------------------- raw ASGI


async def run_asgi(
    app: Any,
    method: str,
    path: str,
    body_parts: list[bytes] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[list[Mapping[str, Any]], BaseException | None]:
    """Drive one HTTP request through `app`; every message it sends, and what it raised."""
    parts = body_parts or [b""]
    incoming: list[dict[str, Any]] = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]
    done = asyncio.Event()
    messages: list[Mapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Mapping[str, Any]) -> None:
        messages.append(dict(message))
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    scope = http_scope(
        path,
        method,
        spec_version="2.3",
        headers=[(b"host", b"testserver"), *(headers or [])],
        client=("192.0.2.10", 4321),
        state={},
    )
    error: BaseException | None = None
    try:
        await app(scope, receive, send)
    except Exception as exc:
        error = exc
    return messages, error


def compare(make: Callable[[Log], Any], clock: FakeClock, *request: Any, **kw: Any) -> Any:
    """Run the same request on the bare app and on the wrapped one; they must match."""
    bare, wrapped = make(Log()), with_middleware(make(Log()), clock)
    plain, plain_error = asyncio.run(run_asgi(bare, *request, **kw))
    through, through_error = asyncio.run(run_asgi(wrapped, *request, **kw))
    assert through == plain
    assert type(through_error) is type(plain_error)
    assert str(through_error) == str(plain_error)
    return plain, plain_error


# ---------------------------------------------------------------- streaming and bodies


@pytest.mark.parametrize("make", [starlette_app, fastapi_app])
def test_streaming_passes_through_chunk_by_chunk(
    make: Callable[[Log], Any], clock: FakeClock
) -> None:
    messages, error = compare(make, clock, "GET", "/stream")
    assert error is None
    bodies = [m["body"] for m in messages if m["type"] == "http.response.body"]
    assert bodies[: len(CHUNKS)] == CHUNKS  # not merged, not split, not reordered
    assert [m.get("more_body", False) for m in messages[1:]][-1] is False


def test_streaming_through_httpx(clock: FakeClock) -> None:
    app = with_middleware(starlette_app(Log()), clock)

    async def go() -> bytes:
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://t") as client,
            client.stream("GET", "/stream") as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/octet-stream"
            return b"".join([chunk async for chunk in response.aiter_raw()])

    assert asyncio.run(go()) == b"".join(CHUNKS)


def test_request_body_reaches_the_app_untouched(clock: FakeClock) -> None:
    parts = [b"a" * 70_000, b"", b"\x00\x01\x02", b"end"]
    log = Log()
    app = with_middleware(starlette_app(log), clock)
    messages, error = asyncio.run(run_asgi(app, "POST", "/echo", parts))
    assert error is None
    ((_, seen),) = log.events
    assert b"".join(seen) == b"".join(parts)
    assert messages[1]["body"] == b"".join(parts)
    # Exactly the parts the bare app sees, in the same pieces.
    bare_log = Log()
    asyncio.run(run_asgi(starlette_app(bare_log), "POST", "/echo", parts))
    assert log.events == bare_log.events
    compare(starlette_app, clock, "POST", "/echo", parts)


def test_fastapi_json_body(clock: FakeClock) -> None:
    app = with_middleware(fastapi_app(Log()), clock)
    with TestClient(app) as client:
        response = client.post("/items", json={"a": [1, 2, {"b": None}]})
    assert response.status_code == 200
    assert response.json() == {"got": {"a": [1, 2, {"b": None}]}}


@pytest.mark.parametrize("make", [starlette_app, fastapi_app])
def test_head(make: Callable[[Log], Any], clock: FakeClock) -> None:
    path = "/plain" if make is starlette_app else "/items/3"
    if make is fastapi_app:
        # FastAPI routes are GET-only: HEAD is a 405 with and without us.
        messages, _ = compare(make, clock, "HEAD", path)
        assert messages[0]["status"] == 405
        return
    messages, error = compare(make, clock, "HEAD", path)
    assert error is None
    assert messages[0]["status"] == 200
    head_headers = dict(messages[0]["headers"])
    assert head_headers[b"content-length"] == b"11"  # the server drops the body itself


def test_head_through_testclient(clock: FakeClock) -> None:
    app = with_middleware(starlette_app(Log()), clock)
    with TestClient(app) as client:
        get, head = client.get("/plain"), client.head("/plain")
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"] == "11"


# ---------------------------------------------------------------- websockets and lifespan


def test_websocket_passes_through_starlette(clock: FakeClock) -> None:
    log = Log()
    # a path no limit covers passes through (a limited one: tests/test_websocket_limits.py)
    unlimited = Policy(rate_limits=(RateLimit(name="l", rate="1/h", burst=1, exclude=("/ws",)),))
    app = with_middleware(starlette_app(log), clock, unlimited)
    with TestClient(app) as client:
        for _ in range(3):
            with client.websocket_connect("/ws") as ws:
                ws.send_text("hi")
                assert ws.receive_text() == "HI"
                ws.send_text("there")
                assert ws.receive_text() == "THERE"
                ws.send_text("bye")
                closed = ws.receive()
                assert closed == {"type": "websocket.close", "code": 1000, "reason": ""}
    assert [e for e in log.events if e[0] == "ws-ctx"] == [("ws-ctx", None)] * 3


def test_websocket_passes_through_fastapi(clock: FakeClock) -> None:
    app = with_middleware(fastapi_app(Log()), clock, LIMITED)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        ws.send_text("you")
        assert ws.receive_json() == {"hello": "you"}


@pytest.mark.parametrize("make", [starlette_app, fastapi_app])
def test_lifespan_runs(make: Callable[[Log], Any], clock: FakeClock) -> None:
    log = Log()
    app = with_middleware(make(log), clock)
    with TestClient(app):
        assert log.events == ["startup"]
    assert log.events == ["startup", "shutdown"]


def test_lifespan_state_and_context_share_request_state(clock: FakeClock) -> None:
    log = Log()
    app = with_middleware(starlette_app(log), clock)
    with TestClient(app) as client:
        first = client.get("/hello")
        second = client.get("/hello")
    assert first.text == second.text == "hello world"  # lifespan state still there
    contexts = [e for e in log.events if isinstance(e, tuple) and e[0] == "ctx"]
    assert len(contexts) == 2
    for _, current, from_state in contexts:
        assert current is from_state
        assert current is not None
    assert contexts[0][1] is not contexts[1][1]


# ---------------------------------------------------------------- background tasks


def test_starlette_background_task_runs(clock: FakeClock) -> None:
    log = Log()
    app = with_middleware(starlette_app(log), clock)
    with TestClient(app) as client:
        response = client.get("/background")
    assert response.text == "queued"
    ran = [e for e in log.events if isinstance(e, tuple) and e[0] == "background"]
    assert len(ran) == 1
    assert ran[0][1] == "done"


def test_fastapi_background_task_runs(clock: FakeClock) -> None:
    log = Log()
    app = with_middleware(fastapi_app(log), clock)
    with TestClient(app) as client:
        assert client.get("/background").json() == {"status": "queued"}
    assert "background ran" in log.events


# ---------------------------------------------------------------- exceptions


@pytest.mark.parametrize(
    ("make", "path"),
    [
        (starlette_app, "/boom"),
        (starlette_app, "/handled"),
        (starlette_app, "/broken-stream"),
        (starlette_app, "/nowhere"),
        (fastapi_app, "/boom"),
        (fastapi_app, "/sync-boom"),
        (fastapi_app, "/missing"),
        (fastapi_app, "/items/not-a-number"),
    ],
)
def test_exceptions_behave_as_without_the_middleware(
    make: Callable[[Log], Any], path: str, clock: FakeClock
) -> None:
    compare(make, clock, "GET", path)


@pytest.mark.parametrize("make", [starlette_app, fastapi_app])
def test_exception_reaches_the_test_client_unchanged(
    make: Callable[[Log], Any], clock: FakeClock
) -> None:
    app = with_middleware(make(Log()), clock)
    with TestClient(app) as client, pytest.raises(LookupError, match="the app's own error"):
        client.get("/boom")
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500


def test_app_exception_handlers_still_apply(clock: FakeClock) -> None:
    app = with_middleware(starlette_app(Log()), clock)
    with TestClient(app) as client:
        response = client.get("/handled")
    assert response.status_code == 418
    assert response.json() == {"handled": "handled by the app"}


def test_http_exceptions_and_validation_errors(clock: FakeClock) -> None:
    app = with_middleware(fastapi_app(Log()), clock)
    with TestClient(app) as client:
        missing = client.get("/missing")
        invalid = client.get("/items/not-a-number")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no such thing"}
    assert invalid.status_code == 422


# ---------------------------------------------------------------- context in frameworks


def test_sync_fastapi_routes_see_the_context(clock: FakeClock) -> None:
    app = with_middleware(fastapi_app(Log()), clock)
    with TestClient(app) as client:
        first = client.get("/sync", headers={"x-request-timeout-ms": "2500"}).json()
        second = client.get("/sync").json()
    assert first["request_id"] is not None
    assert first["thread"] != threading.main_thread().name  # really ran in the pool
    assert first["dep"] == first["request_id"]  # dependencies too
    assert first["deadline"] == pytest.approx(clock.monotonic() + 2.5)
    assert second["request_id"] not in (None, first["request_id"])


def test_async_fastapi_route_context_and_route_template(clock: FakeClock) -> None:
    app = with_middleware(fastapi_app(Log()), clock)
    with TestClient(app) as client:
        body = client.get("/async").json()
    assert body["request_id"]
    assert body["route"] == "/async"


def test_fastapi_limit_rejection(clock: FakeClock) -> None:
    app = with_middleware(fastapi_app(Log()), clock, LIMITED)
    with TestClient(app) as client:
        assert client.get("/items/1").status_code == 200
        rejected = client.get("/items/2")
    assert rejected.status_code == 429
    assert rejected.headers["content-type"] == "application/problem+json"
    assert rejected.headers["retry-after"] == "3600"
    assert rejected.json()["limit"] == "l"


def test_default_construction_as_documented() -> None:
    """`app.add_middleware(FidelityMiddleware, policy=...)` with nothing else: real
    clock, default telemetry."""
    app = fastapi_app(Log())
    app.add_middleware(FidelityMiddleware, policy=LIMITED)
    with TestClient(app) as client:
        statuses = [client.get("/items/1").status_code for _ in range(2)]
        assert client.get("/async").status_code == 429
    assert statuses == [200, 429]


def test_lifespan_shutdown_closes_the_state_store() -> None:
    from starlette.testclient import TestClient

    from fidelity_mw.state.memory import MemoryStore

    class CountingStore(MemoryStore):
        closed = 0

        async def aclose(self) -> None:
            CountingStore.closed += 1

    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", ok)], lifespan=lifespan)
    app.add_middleware(FidelityMiddleware, store=CountingStore(), telemetry=False)
    with TestClient(app) as client:
        assert client.get("/").status_code == 200
        assert CountingStore.closed == 0
    assert events == ["startup", "shutdown"]
    assert CountingStore.closed == 1
