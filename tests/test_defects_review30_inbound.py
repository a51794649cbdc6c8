"""Defects and open edges a thirtieth round (inbound, policy) closed.

1. The policy's globs (`[[rate_limit]] match` / `exclude`, `[[route]] match`) were
   matched against the whole `scope["path"]`, the `root_path` included. An app served
   under a root path (`uvicorn --root-path /svc`, behind a proxy that strips `/svc`)
   gets `/svc/api/x` as its path from servers that follow the ASGI spec (uvicorn 0.26
   and later) while its routes match `/api/x` (Starlette's `get_route_path`): a limit
   written `match = "/api/*"` then applied to nothing, and no word said. Globs now
   match the path the app's routes see, under either server convention (path with or
   without the root path), for HTTP requests and websocket handshakes alike; a plan
   cached for a path under one root path is not served to the same path under another;
   a glob that matches only with the root path is named in a warning.
3. `[deadline] header` accepted a name twice, also in two spellings (`X-Timeout` and
   `x-timeout`: one header, names are case-insensitive): now a policy error naming
   the field and each repeat.
4. A list of statuses (`failure_statuses`, `retry.on_status`) reported its first bad
   value alone: a fix per run of `fidelity-mw check`. Every bad value is now in the
   one error (and every bad name of `[deadline] header`).
5. `Depends(fidelity.limit(...))`'s 429 said `Retry-After` as the plain GCRA wait: a
   store's rejecting verdict with no wait (a Redis script's clamp, a custom store)
   went out as `Retry-After: 0`, and the problem detail "retry in 0 s". It now says
   it as every other refusal does (responses.refusal_retry_after: at least 1, whole
   seconds rounded up), and the `RateLimit` field's `t` no later.
6. `[[route]] enforce = false` ("the deadline is recorded, never acted on") still
   answered 504 for a deadline already past on arrival. Such a route now serves it:
   a `deadline` `would_reject` `expired_on_arrival` decision (details `enforce:
   false`) records what enforcement would have done, the app runs with the past
   deadline on its context (`remaining_s()` 0; outbound calls see it, as they do a
   deadline that passes while it runs). The FastAPI route class (without the
   middleware) does the same.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from _asgi import http_scope
from fidelity_mw import FidelityMiddleware, Policy, PolicyError, RateLimit
from fidelity_mw.context import DecisionContext
from fidelity_mw.decide.gcra import LimitVerdict
from fidelity_mw.policy import BreakerConfig, DeadlineConfig, RouteConfig
from fidelity_mw.state.base import InboundResult, LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock

with warnings.catch_warnings():  # Starlette 1.x asks for httpx2; httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient, WebSocketDenialResponse

Message = dict[str, Any]

API = RateLimit(name="api", rate="2/h", match="/api/*")


class Recorder:
    """A RequestObserver that keeps every context it saw end."""

    def __init__(self) -> None:
        self.ended: list[DecisionContext] = []

    def start(self, ctx: DecisionContext, scope: Any) -> None:
        return None

    def end(self, ctx: DecisionContext, scope: Any, token: Any) -> None:
        self.ended.append(ctx)


async def _item(request: Request) -> Response:
    return PlainTextResponse("item")


async def _echo(websocket: WebSocket) -> None:
    await websocket.accept()
    while True:
        try:
            text = await websocket.receive_text()
        except WebSocketDisconnect:
            return
        await websocket.send_text(text.upper())


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _app(policy: Policy, observer: Any = None) -> Starlette:
    app = Starlette(
        routes=[
            Route("/api/items/{item_id}", _item),
            WebSocketRoute("/api/ws", _echo),
            Mount("/api/sub", routes=[Route("/leaf", _item)]),
        ]
    )
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=FakeClock(), observer=observer, telemetry=False
    )
    return app


def _scope(
    path: str, root_path: str = "", client: tuple[str, int] = ("203.0.113.7", 4711)
) -> dict[str, Any]:
    return http_scope(
        path, root_path=root_path, headers=[(b"host", b"t")], client=client, server=("t", 80)
    )


def _status(app: Any, scope: dict[str, Any]) -> int:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return int(sent[0]["status"])


def _statuses(app: Any, scopes: Sequence[dict[str, Any]]) -> list[int]:
    return [_status(app, scope) for scope in scopes]


class _Uvicorn:
    """uvicorn on loopback with `--root-path`, in a thread (the socket bound first)."""

    def __init__(self, app: Any, root_path: str, ws: str = "auto") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            root_path=root_path,
            ws=ws,
            log_level="error",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> _Uvicorn:
        self.thread.start()
        start = time.monotonic()
        while not self.server.started:  # startup: a few milliseconds
            assert self.thread.is_alive()
            assert time.monotonic() - start < 10
            time.sleep(0.002)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


# ------------------------------------------------------------ 1. globs and root_path


def test_under_uvicorn_root_path_a_limit_on_the_route_path_counts() -> None:
    """`uvicorn --root-path /svc`: the proxy strips `/svc`, uvicorn puts it back in
    `scope["path"]` (`/svc/api/items/7`), the route matches `/api/items/{item_id}`."""
    recorder = Recorder()
    app = _app(Policy(rate_limits=(API,)), recorder)
    with _Uvicorn(app, "/svc") as server:
        url = f"http://127.0.0.1:{server.port}/api/items/7"
        responses = [httpx.get(url, timeout=10) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[0].headers["ratelimit"] == '"api";r=1;t=1800'
    assert responses[2].headers["x-fidelity-decided-by"] == "ratelimit"
    assert recorder.ended[0].route == "/api/items/{item_id}"


def test_under_uvicorn_root_path_a_websocket_handshake_is_admitted_by_the_limit() -> None:
    import websocket as websocket_client  # websocket-client

    app = _app(Policy(rate_limits=(API,)))
    with _Uvicorn(app, "/svc", ws="wsproto") as server:
        url = f"ws://127.0.0.1:{server.port}/api/ws"
        opened = []
        for i in range(2):
            conn = websocket_client.create_connection(url, timeout=10)
            conn.send(f"m{i}")
            assert conn.recv() == f"M{i}"
            opened.append(conn)
        with pytest.raises(websocket_client.WebSocketBadStatusException) as refused:
            websocket_client.create_connection(url, timeout=10)
        for conn in opened:
            conn.close()
    assert refused.value.status_code == 429


@pytest.mark.parametrize("with_root", [True, False], ids=["path-has-root", "path-without"])
def test_both_server_conventions_match_the_route_path(with_root: bool) -> None:
    """The ASGI spec (and uvicorn since 0.26): `path` holds the root path; older
    servers left it out. Either way the route path is `/api/items/7`."""
    app = _app(Policy(rate_limits=(API,)))
    path = "/svc/api/items/7" if with_root else "/api/items/7"
    assert _statuses(app, [_scope(path, "/svc") for _ in range(3)]) == [200, 200, 429]


def test_a_path_under_another_root_path_is_not_served_the_cached_plan() -> None:
    """The same path under root "" (no limit covers `/svc/api/items/7` there) and then
    under root `/svc` (the limit's `/api/items/7`): the first plan is not the second's."""
    app = _app(Policy(rate_limits=(API,)))
    first = _status(app, _scope("/svc/api/items/7", ""))
    assert first == 404  # the router sees /svc/api/items/7: no such route, no limit
    served = _statuses(app, [_scope("/svc/api/items/7", "/svc") for _ in range(3)])
    assert served == [200, 200, 429]
    # and the other way round: the path under "" stays the un-limited one
    assert _statuses(app, [_scope("/svc/api/items/7", "") for _ in range(3)]) == [404, 404, 404]


def test_a_route_entry_and_an_exclude_match_the_route_path() -> None:
    recorder = Recorder()
    policy = Policy(
        rate_limits=(RateLimit(name="api", rate="2/h", match="/api/*", exclude=("/api/sub/*",)),),
        routes=(RouteConfig(match="/api/items/*", name="items", deadline_ms=1234),),
    )
    app = _app(policy, recorder)
    assert _statuses(app, [_scope("/svc/api/sub/leaf", "/svc") for _ in range(3)]) == [
        200,
        200,
        200,
    ]
    assert _statuses(app, [_scope("/svc/api/items/1", "/svc") for _ in range(3)]) == [200, 200, 429]
    assert recorder.ended[-1].route == "items"


def test_a_mounted_app_with_the_middleware_matches_its_own_route_paths() -> None:
    """The middleware on an app mounted at `/inner` under a server root `/svc`: its
    globs are its own routes' paths (`/api/*`), as its router sees them."""
    inner = _app(Policy(rate_limits=(API,)))
    outer = Starlette(routes=[Mount("/inner", app=inner)])
    with TestClient(outer, root_path="/svc") as client:
        codes = [client.get("/svc/inner/api/items/7").status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_a_websocket_under_testclient_root_path_is_admitted_by_the_limit() -> None:
    app = _app(Policy(rate_limits=(API,)))
    with TestClient(app, root_path="/edge") as client:
        for _ in range(2):
            with client.websocket_connect("/edge/api/ws") as ws:
                ws.send_text("x")
                assert ws.receive_text() == "X"
        with pytest.raises(WebSocketDenialResponse) as refused:  # noqa: SIM117
            with client.websocket_connect("/edge/api/ws"):
                pass
    assert refused.value.status_code == 429


def test_the_root_path_itself_is_the_apps_root() -> None:
    """`/svc` under root `/svc` is the app's root (the router's "" redirects to `/`):
    a limit on `/` counts it."""
    app = _app(Policy(rate_limits=(RateLimit(name="root", rate="1/h", match="/"),)))
    assert _statuses(app, [_scope("/svc", "/svc") for _ in range(2)])[1] == 429


def test_a_glob_written_with_the_root_path_is_named_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = _app(Policy(rate_limits=(RateLimit(name="old", rate="1/h", match="/svc/api/*"),)))
    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        _statuses(app, [_scope("/svc/api/items/1", "/svc"), _scope("/svc/api/items/2", "/svc")])
    said = [r.getMessage() for r in caplog.records if "root_path" in r.getMessage()]
    assert len(said) == 1
    assert "rate_limit[0] glob '/svc/api/*'" in said[0]
    assert "'/api/items/1'" in said[0]


# ------------------------------------------------------------ 3, 4. policy lists


@pytest.mark.parametrize(
    ("headers", "said"),
    [
        (
            ["x-request-timeout-ms", "x-request-timeout-ms"],
            '"x-request-timeout-ms" is listed twice',
        ),
        (
            ["X-Request-Timeout-Ms", "x-request-timeout-ms"],
            '"x-request-timeout-ms" repeats "X-Request-Timeout-Ms"',
        ),
        (["grpc-timeout", "x-a", "GRPC-Timeout"], '"GRPC-Timeout" repeats "grpc-timeout"'),
    ],
)
def test_a_deadline_header_named_twice_is_an_error_naming_the_field(
    headers: list[str], said: str
) -> None:
    with pytest.raises(PolicyError) as raised:
        Policy.from_dict({"deadline": {"header": headers}})
    [issue] = raised.value.issues
    assert issue.path == "deadline.header"
    assert said in issue.message
    assert "case-insensitive" in issue.message
    with pytest.raises(PolicyError, match="listed twice"):
        DeadlineConfig(header=("x-a", "x-a"))


def test_every_bad_deadline_header_name_is_reported_at_once() -> None:
    with pytest.raises(PolicyError) as raised:
        Policy.from_dict({"deadline": {"header": ["bad name", "x-ok", "a:b", "X-OK"]}})
    [issue] = raised.value.issues
    assert '"bad name", "a:b" are not valid header names' in issue.message
    assert '"X-OK" repeats "x-ok"' in issue.message


def test_every_bad_failure_status_is_reported_in_one_error() -> None:
    with pytest.raises(PolicyError) as raised:
        Policy.from_dict({"breaker": {"failure_statuses": [600, 503, 99, "6xx", "5xx", 1000]}})
    [issue] = raised.value.issues
    assert issue.path == "breaker.failure_statuses"
    assert issue.message.startswith('600, 99, "6xx", 1000 are not HTTP status codes')
    with pytest.raises(PolicyError, match=r"(?s)^.*: 600 is not an HTTP status code"):
        BreakerConfig(failure_statuses=(600, 503))


def test_every_bad_retry_status_is_reported_in_one_error() -> None:
    with pytest.raises(PolicyError) as raised:
        Policy.from_dict({"upstream": [{"host": "a", "retry": {"on_status": [1, 503, 2]}}]})
    [issue] = raised.value.issues
    assert issue.path == "upstream[0].retry.on_status"
    assert issue.message.startswith("1, 2 are not HTTP status codes")


# ------------------------------------------------------------ 5. Depends(limit)'s 429


class _NoWaitStore(MemoryStore):
    """A store whose limit refuses with no wait (a Redis script's clamp; a custom store)."""

    admit_now = None  # type: ignore[assignment]

    async def admit(
        self,
        breaker_key: str | None,
        breaker: BreakerConfig | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
    ) -> InboundResult:
        verdict = LimitVerdict(False, now, 0, 0.0, 0.0)
        return InboundResult(None, (verdict,) * len(limits), False, "redis", 0.0)


@pytest.mark.parametrize("wait", [0.0, -1.0, float("nan")])
def test_a_depends_limits_429_says_retry_after_at_least_1(wait: float) -> None:
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    class Store(_NoWaitStore):
        async def admit(self, *args: Any) -> InboundResult:
            result = await super().admit(*args)
            return result._replace(limits=(result.limits[0]._replace(retry_after_s=wait),))

    fidelity = Fidelity(policy=Policy(breaker=None), store=Store(), clock=FakeClock())
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(fidelity.limit("5/s"))])
    async def x() -> dict[str, str]:
        return {}

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/x")

    response = asyncio.run(get())
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["detail"].endswith("retry in 1 s")
    assert response.headers["ratelimit"].endswith(";r=0;t=0")  # (no t below 0, nor NaN)


def test_a_depends_limits_429_rounds_a_fraction_up_as_the_middleware_does() -> None:
    from fastapi import Depends, FastAPI

    from fidelity_mw.fastapi import Fidelity

    clock = FakeClock()
    fidelity = Fidelity(policy=Policy(breaker=None), clock=clock)
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(fidelity.limit("2/s", burst=1))])
    async def x() -> dict[str, str]:
        return {}

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return [await client.get("/x") for _ in range(2)]

    first, refused = asyncio.run(run())
    assert (first.status_code, refused.status_code) == (200, 429)
    assert refused.headers["retry-after"] == "1"  # 0.5 s, rounded up


# ------------------------------------------------------------ 6. enforce = false


def _deadline_app(recorder: Recorder | None = None, telemetry: bool = False) -> Any:
    seen: list[float | None] = []

    async def endpoint(request: Request) -> Response:
        ctx = request.state.fidelity
        seen.append(ctx.remaining_s())
        return PlainTextResponse("served")

    app = Starlette(routes=[Route("/free", endpoint), Route("/strict", endpoint)])
    policy = Policy(routes=(RouteConfig(match="/free", enforce=False),))
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=FakeClock(), observer=recorder, telemetry=False
    )
    app.state.seen = seen
    return app


def _get(app: Any, path: str, timeout_ms: str) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(path, headers={"x-request-timeout-ms": timeout_ms})

    return asyncio.run(run())


def test_a_route_that_does_not_enforce_deadlines_serves_one_past_on_arrival() -> None:
    recorder = Recorder()
    app = _deadline_app(recorder)
    response = _get(app, "/free", "0")
    assert response.status_code == 200
    assert response.text == "served"
    assert "x-fidelity-decided-by" not in response.headers
    assert app.state.seen == [0.0]  # the app sees the deadline: passed
    ctx = recorder.ended[-1]
    [deadline] = [d for d in ctx.decisions if d.layer == "deadline"]
    assert (deadline.verdict, deadline.reason) == ("would_reject", "expired_on_arrival")
    assert deadline.details == {"remaining_ms": 0.0, "enforce": False}
    assert ctx.outcome == "served"
    # a route that enforces it answers 504, as before
    assert _get(app, "/strict", "0").status_code == 504


def test_the_summary_of_a_would_reject_is_not_an_allowed_requests() -> None:
    """The telemetry summary is cached by the facts of the admission: a deadline past on
    arrival is a fact of its own (else its span said `deadline/allow/caller_deadline`)."""
    from fidelity_mw.context import context_from_scope
    from fidelity_mw.telemetry.summary import summary_of

    mw = FidelityMiddleware(
        _ok_app,
        policy=Policy(routes=(RouteConfig(match="/free", enforce=False),)),
        clock=FakeClock(),
        telemetry=False,
    )
    packed = []
    for timeout in (b"5000", b"0"):
        scope = _scope("/free")
        scope["headers"] = [(b"x-request-timeout-ms", timeout)]
        assert _status(mw, scope) == 200
        ctx = context_from_scope(scope)
        assert ctx is not None
        packed.append(summary_of(ctx).packed)
    assert packed[0].startswith("deadline/allow/caller_deadline@request")
    assert packed[1].startswith("deadline/would_reject/expired_on_arrival@request")


def test_the_fastapi_route_class_without_the_middleware_does_the_same() -> None:
    from fastapi import APIRouter, FastAPI

    from fidelity_mw.fastapi import Fidelity

    fidelity = Fidelity(
        policy=Policy(routes=(RouteConfig(match="/free", enforce=False),)), clock=FakeClock()
    )
    router = APIRouter(route_class=fidelity.route_class)
    seen: list[Any] = []

    @router.get("/free")
    async def free(request: Request) -> dict[str, str]:
        seen.append(request.state.fidelity.decisions[0])
        return {"ok": "yes"}

    @router.get("/strict")
    async def strict() -> dict[str, str]:
        return {"ok": "yes"}

    app = FastAPI()
    app.include_router(router)
    fidelity.install(app)
    assert _get(app, "/free", "0").status_code == 200
    assert (seen[0].verdict, seen[0].reason) == ("would_reject", "expired_on_arrival")
    assert _get(app, "/strict", "0").status_code == 504


def test_map_says_a_route_records_deadlines_only() -> None:
    from fidelity_mw.tools.statemap import from_policy, render

    policy = Policy(
        routes=(
            RouteConfig(match="/free", name="free", enforce=False, deadline_ms=500),
            RouteConfig(match="/strict", deadline_ms=500),
        )
    )
    text = render(from_policy(policy, "p.toml"), "text")
    assert "recorded only (would_reject), never refused, on free (enforce = false)" in text
    assert "expired on arrival: recorded (would_reject), never refused" in text
    assert "504 on arrival when expired" in text  # /strict, as before
