"""Review 34, adoption: the README's two lines added to apps as they are found, with the
middleware, exception handlers and clients they already have."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from _asgi import http_scope
from fidelity_mw import (
    FidelityMiddleware,
    FidelitySyncTransport,
    FidelityTransport,
    Policy,
    RateLimit,
)
from fidelity_mw.testing import FakeClock

UI = "https://ui.example"


def _send(app: Any, requests: list[tuple[str, str, dict[str, str]]]) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return [
                await client.request(method, path, headers=headers)
                for method, path, headers in requests
            ]

    return asyncio.run(run())


# ---------------------------------------------- our answers through the app's CORS layer

_CORS = {
    "allow_origins": [UI],
    "allow_credentials": True,
    "allow_methods": ["GET", "POST"],
    "expose_headers": ["Retry-After", "RateLimit", "RateLimit-Policy"],
}


def _cors_app(*, fidelity_outside: bool, upstream: httpx.MockTransport | None = None) -> FastAPI:
    """An app with CORS for its browser UI, the middleware added as the README says:
    after the app's own `add_middleware` calls (outside them), or before (inside)."""
    clock = FakeClock()
    policy = Policy.from_dict(
        {
            "rate_limit": [{"name": "per-client", "match": "/api/*", "rate": "1/min"}],
            "upstream": [{"host": "inventory.internal", "retry": {"attempts": 2}}],
        }
    )
    client = httpx.AsyncClient(
        base_url="http://inventory.internal",
        transport=FidelityTransport(upstream or httpx.MockTransport(lambda r: httpx.Response(200))),
    )
    app = FastAPI()

    @app.get("/api/items")
    async def items() -> dict[str, int]:
        return {"n": 1}

    @app.get("/stock")
    async def stock() -> dict[str, int]:
        (await client.get("/stock")).raise_for_status()
        return {"n": 1}

    mw: dict[str, Any] = {"policy": policy, "clock": clock, "telemetry": False}
    if fidelity_outside:
        app.add_middleware(CORSMiddleware, **_CORS)
        app.add_middleware(FidelityMiddleware, **mw)
    else:
        app.add_middleware(FidelityMiddleware, **mw)
        app.add_middleware(CORSMiddleware, **_CORS)
    return app


@pytest.mark.parametrize("fidelity_outside", [True, False], ids=["readme-order", "cors-outside"])
def test_a_429_of_ours_carries_the_apps_cors_headers(fidelity_outside: bool) -> None:
    """Added after the app's CORSMiddleware (the README's order for an existing app), the
    middleware's 429 went out without `Access-Control-Allow-Origin`: the browser reported
    a CORS failure, and the page could read neither the status nor `Retry-After`."""
    app = _cors_app(fidelity_outside=fidelity_outside)
    browser = {"origin": UI, "cookie": "session=1"}
    preflight = {"origin": UI, "access-control-request-method": "GET"}
    responses = _send(
        app,
        [
            ("OPTIONS", "/api/items", preflight),
            ("GET", "/api/items", browser),
            ("GET", "/api/items", browser),
            ("GET", "/api/items", {"origin": "https://evil.example"}),
            ("GET", "/api/items", {}),
        ],
    )
    pre, served, refused, foreign, plain = responses
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == UI
    assert served.status_code == 200  # the preflight cost nothing
    assert refused.status_code == 429
    assert refused.headers["access-control-allow-origin"] == UI
    assert refused.headers["access-control-allow-credentials"] == "true"
    exposed = refused.headers["access-control-expose-headers"].lower()
    assert "retry-after" in exposed
    assert "ratelimit" in exposed
    assert refused.headers["retry-after"] == "60"
    assert refused.headers["x-fidelity-decided-by"] == "ratelimit"
    # an origin the app does not allow is told nothing more than the app would tell it
    assert foreign.status_code == 429
    assert "access-control-allow-origin" not in foreign.headers
    assert plain.status_code == 429
    assert "access-control-allow-origin" not in plain.headers


def test_an_upstream_give_up_answered_by_us_carries_the_apps_cors_headers() -> None:
    """The 502 the middleware answers for an upstream given up on (the app let the error
    out) is ours too: with CORS inside, a browser got it without the CORS headers."""
    app = _cors_app(
        fidelity_outside=True, upstream=httpx.MockTransport(lambda r: httpx.Response(503))
    )
    (failed,) = _send(app, [("GET", "/stock", {"origin": UI})])
    assert failed.status_code == 502
    assert failed.headers["x-fidelity-retry"] == "exhausted"
    assert failed.headers["access-control-allow-origin"] == UI


def test_a_whole_starlette_app_with_cors_wrapped_by_the_middleware() -> None:
    """`FidelityMiddleware(app)` around a Starlette app whose CORS layer is declared in
    `middleware=` (its stack not built yet): our answers carry that layer's headers."""

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({})

    inner = Starlette(
        routes=[Route("/", hello)],
        middleware=[Middleware(CORSMiddleware, allow_origins=["*"])],
    )
    app = FidelityMiddleware(
        inner,
        policy=Policy(rate_limits=(RateLimit(name="one", rate="1/min"),)),
        clock=FakeClock(),
        telemetry=False,
    )
    served, refused = _send(app, [("GET", "/", {"origin": UI}), ("GET", "/", {"origin": UI})])
    assert served.headers["access-control-allow-origin"] == "*"
    assert refused.status_code == 429
    assert refused.headers["access-control-allow-origin"] == "*"


def test_an_on_reject_hooks_own_cors_header_is_kept() -> None:
    app = FastAPI()

    @app.get("/")
    async def root() -> dict[str, int]:
        return {}

    def hook(ctx: Any, decision: Any) -> JSONResponse:
        return JSONResponse(
            {"quota": True}, status_code=429, headers={"access-control-allow-origin": "x"}
        )

    app.add_middleware(CORSMiddleware, allow_origins=["*"])
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy(rate_limits=(RateLimit(name="one", rate="1/min"),)),
        clock=FakeClock(),
        telemetry=False,
        on_reject=hook,
    )
    _, refused = _send(app, [("GET", "/", {"origin": UI}), ("GET", "/", {"origin": UI})])
    assert refused.json() == {"quota": True}
    assert refused.headers.get_list("access-control-allow-origin") == ["x"]


def test_a_cors_layer_that_decides_per_request_is_asked_for_each_answer() -> None:
    """Starlette's own class answers alike for an origin, and is asked once per origin; a
    subclass (origins from a database, say) may change its mind, and is asked each time."""
    allowed: set[str] = {UI}

    class TenantCors(CORSMiddleware):
        def is_allowed_origin(self, origin: str) -> bool:
            return origin in allowed

    async def hello(request: Request) -> JSONResponse:
        return JSONResponse({})

    app = FidelityMiddleware(
        TenantCors(Starlette(routes=[Route("/", hello)]), allow_origins=["https://x.example"]),
        policy=Policy(rate_limits=(RateLimit(name="one", rate="1/min"),)),
        clock=FakeClock(),
        telemetry=False,
    )
    browser = ("GET", "/", {"origin": UI})
    _, first = _send(app, [browser, browser])
    allowed.clear()
    (second,) = _send(app, [browser])
    assert first.status_code == second.status_code == 429
    assert first.headers["access-control-allow-origin"] == UI
    assert "access-control-allow-origin" not in second.headers


# ------------------------------------------- a transport given to the wrong kind of client


def test_the_async_transport_in_a_sync_client_says_which_to_use() -> None:
    """`httpx.Client(transport=FidelityTransport())` failed with an AttributeError
    (`__enter__`, `handle_request`) that named neither class."""
    with pytest.raises(TypeError, match="FidelitySyncTransport"):
        httpx.Client(transport=FidelityTransport(telemetry=False)).get("http://a.internal/")
    with (
        pytest.raises(TypeError, match="FidelitySyncTransport"),
        httpx.Client(transport=FidelityTransport(telemetry=False)),
    ):
        pass


def test_the_sync_transport_in_an_async_client_says_which_to_use() -> None:
    async def call() -> None:
        client = httpx.AsyncClient(transport=FidelitySyncTransport(telemetry=False))
        await client.get("http://a.internal/")

    with pytest.raises(TypeError, match="FidelityTransport"):
        asyncio.run(call())

    async def enter() -> None:
        async with httpx.AsyncClient(transport=FidelitySyncTransport(telemetry=False)):
            pass

    with pytest.raises(TypeError, match="FidelityTransport"):
        asyncio.run(enter())


@pytest.mark.parametrize(
    ("outer", "inner", "says"),
    [
        (FidelityTransport, httpx.HTTPTransport, "FidelitySyncTransport"),
        (FidelitySyncTransport, httpx.AsyncHTTPTransport, "FidelityTransport"),
    ],
)
def test_an_inner_transport_of_the_wrong_kind_fails_when_built(
    outer: Any, inner: Any, says: str
) -> None:
    """It failed at the first call, with an AttributeError of the inner transport's."""
    with pytest.raises(TypeError, match=f"got {inner.__name__}.*{says}"):
        outer(inner(), telemetry=False)


# ------------------------------------------ a background task holds no bulkhead slot


def _scope(path: str) -> dict[str, Any]:
    return http_scope(
        path, "POST", headers=[(b"host", b"app")], client=("10.0.0.1", 5000), server=("app", 80)
    )


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def test_a_background_task_after_the_response_holds_no_bulkhead_slot() -> None:
    """A `BackgroundTasks` task runs inside the app's call, after the response went out.
    The slot was given back only when that call returned: with a limit of 1, every
    request that came while a signup's e-mail was still being sent was shed 503, the
    client having had its answer and nothing of the request in flight."""

    async def run() -> list[int]:
        mail_sent = asyncio.Event()
        blocking = asyncio.Event()
        app = FastAPI()

        mails: list[int] = []

        async def send_mail() -> None:
            mails.append(1)
            if len(mails) == 1:  # the first one is slow to send
                await mail_sent.wait()

        slow_running = asyncio.Event()

        @app.post("/signup")
        async def signup(request: Request, background: BackgroundTasks) -> dict[str, int]:
            if "x-hold" in request.headers:  # a signup still being handled
                slow_running.set()
                await blocking.wait()
            background.add_task(send_mail)
            return {}

        policy = Policy.from_dict({"concurrency": {"limit": 1, "max_queue": 0}})
        app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
        statuses: list[int] = []
        answered = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            elif not message.get("more_body", False):
                answered.set()

        first = asyncio.create_task(app(_scope("/signup"), _receive, send))
        await answered.wait()  # answered; its e-mail still being sent
        assert not first.done()
        await app(_scope("/signup"), _receive, send)
        await app(_scope("/signup"), _receive, send)
        mail_sent.set()
        await first
        # given back once: one request in flight still fills the limit of 1
        held = _scope("/signup")
        held["headers"] = [*held["headers"], (b"x-hold", b"1")]
        slow = asyncio.create_task(app(held, _receive, send))
        await slow_running.wait()
        await app(_scope("/signup"), _receive, send)
        blocking.set()
        await slow
        return statuses

    assert asyncio.run(run()) == [200, 200, 200, 503, 200]  # the last: the held one's


# ------------------------------------- memory state under `uvicorn --workers N`, said


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["/srv/.venv/bin/uvicorn", "app:app", "--workers", "4"], ("uvicorn", 4)),
        (
            ["/usr/lib/python3/site-packages/uvicorn/__main__.py", "app:app", "--workers=3"],
            ("uvicorn", 3),
        ),
        (["gunicorn", "-k", "uvicorn_worker.UvicornWorker", "-w", "8", "app:app"], ("gunicorn", 8)),
        (["gunicorn", "-w2", "app:app"], ("gunicorn", 2)),
        (["hypercorn", "--workers", "2", "app:app"], ("hypercorn", 2)),
        (["uvicorn", "app:app"], None),  # the server's default: WEB_CONCURRENCY, or 1
        (["uvicorn", "app:app", "-w", "4"], None),  # uvicorn has no -w
        (["pytest", "-w", "4"], None),  # another program's flag
        ([], None),
    ],
)
def test_the_worker_count_on_the_servers_command_line(
    argv: list[str], said: tuple[str, int] | None
) -> None:
    from fidelity_mw.state.factory import server_workers

    assert server_workers(argv) == said


def test_memory_state_under_uvicorn_workers_is_said_at_startup(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """operations.md said the startup warning could not see a `--workers` given on the
    command line, only `WEB_CONCURRENCY`: `uvicorn app:app --workers 4` on the default
    memory:// state admitted 4 x every limit without a word. Its workers keep the
    supervisor's command line, and the count is read from it."""
    import logging

    from fidelity_mw.state import factory

    monkeypatch.setattr(factory, "_warned_workers", False)
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    caplog.set_level(logging.WARNING, "fidelity_mw.state")
    monkeypatch.setattr("sys.argv", ["/srv/bin/uvicorn", "app:app", "--workers", "1"])
    FidelityMiddleware(FastAPI(), policy=Policy(), telemetry=False)
    assert not caplog.records
    monkeypatch.setenv("WEB_CONCURRENCY", "2")  # the command line overrides it
    monkeypatch.setattr("sys.argv", ["/srv/bin/uvicorn", "app:app", "--workers", "4"])
    FidelityMiddleware(FastAPI(), policy=Policy(), telemetry=False)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("fidelity_mw: uvicorn --workers 4: memory:// state under 4 worker")
