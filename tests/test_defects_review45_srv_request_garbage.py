"""What a request leaves for the server's event loop and garbage collector, counted.

Review 45 looked for the middleware's cost under a real server that its own
instructions do not explain (benchmarks/server_where.py). Two of the suspects are
about objects and callbacks, and both are countable without a clock:

- a reference cycle made per request is freed only by the cyclic collector: under a
  server every such request adds to the young generation's count until a collection
  runs, and objects of requests still in flight are promoted into costlier ones. None
  is made today on any path; these tests keep it so (each path's objects are freed by
  reference counting when the request ends);
- a callback, timer or task scheduled per request is run by the loop's C code, which
  an in-process count of the middleware's own work may not show. Under uvicorn's own
  protocol the middleware schedules none beyond what the server does for a bare route.

Both fail when a request's objects are tied into a cycle (tried: the decision context
holding itself) or when the middleware arms a timer per request (tried: the deadline
armed through `loop.call_later`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.testing import FakeClock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def _boom(request: Request) -> Response:
    raise RuntimeError("boom")


async def _unavailable(request: Request) -> Response:
    return PlainTextResponse("no", status_code=503)


async def _streamed(request: Request) -> Response:
    async def parts() -> Any:
        yield b"a"
        yield b"b"

    return StreamingResponse(parts())


def _app(clock: FakeClock, telemetry: bool, **policy: Any) -> Any:
    async def late(request: Request) -> Response:
        clock.advance(10.0)  # past the caller's deadline: the watcher answers 504
        await asyncio.sleep(0)
        return PlainTextResponse("late")

    routes = [
        Route("/ok", _ok),
        Route("/limited", _ok),
        Route("/boom", _boom),
        Route("/unavailable", _unavailable),
        Route("/late", late),
        Route("/streamed", _streamed),
    ]
    limits = [
        RateLimit(name="per-client", rate="1000000000/second", key="client_ip", match="/ok"),
        RateLimit(name="tight", rate="1/minute", key="client_ip", match="/limited"),
    ]
    return FidelityMiddleware(
        Starlette(routes=routes),
        policy=Policy(rate_limits=limits, **policy),
        clock=clock,
        telemetry=telemetry,
    )


async def _call(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> int | None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("test", 80),
    }
    received: list[int] = []
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        if received:  # the body was read: then the client is gone
            return {"type": "http.disconnect"}
        received.append(1)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    # the app's own error is re-raised to the server after its 500
    with contextlib.suppress(RuntimeError):
        await app(scope, receive, send)
    return int(sent[0]["status"]) if sent else None


@pytest.fixture
def saved_garbage() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()


def _free_cycles() -> None:
    """Free what is in cycles now, for good: under DEBUG_SAVEALL a collection keeps what
    it finds in `gc.garbage`, and clearing that list leaves the cycles to be found again
    (an earlier test's leftovers then counted as this one's)."""
    gc.set_debug(0)
    gc.garbage.clear()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)


PATHS = [
    ("/ok", [], 200),
    ("/ok", [(b"x-request-timeout-ms", b"800")], 200),
    ("/limited", [], 429),
    ("/boom", [], 500),
    ("/unavailable", [], 503),
    ("/late", [(b"x-request-timeout-ms", b"800")], 504),
    ("/streamed", [], 200),
]


@pytest.mark.parametrize("telemetry", [False, True], ids=["telemetry-off", "telemetry-default"])
@pytest.mark.parametrize(
    ("path", "headers", "status"), PATHS, ids=[p[0] + str(len(p[1])) for p in PATHS]
)
def test_a_request_leaves_no_reference_cycle(
    saved_garbage: None, telemetry: bool, path: str, headers: list[tuple[bytes, bytes]], status: int
) -> None:
    clock = FakeClock()
    # no route breaker on the app's own errors: each of them stays a 500 / 503 answer
    app = _app(clock, telemetry, breaker=None)

    async def run() -> collections.Counter[int | None]:
        for _ in range(10):  # caches filled, the limit's key made, the plan built
            await _call(app, path, headers)
        _free_cycles()
        statuses: collections.Counter[int | None] = collections.Counter()
        for _ in range(100):
            statuses[await _call(app, path, headers)] += 1
            clock.advance(0.001)
        return statuses

    statuses = asyncio.run(run())
    assert statuses == {status: 100}
    found = gc.collect()
    kinds = collections.Counter(type(o).__name__ for o in gc.garbage)
    assert found == 0, f"{found} objects in cycles after 100 requests: {kinds.most_common(8)}"


class _CountingLoop:
    """Callbacks, timers and tasks the loop is asked for (uvloop's own Loop, subclassed:
    the calls uvicorn, asyncio's tasks and the middleware make through its methods)."""

    @staticmethod
    def make(counts: collections.Counter[str]) -> asyncio.AbstractEventLoop:
        import uvloop

        class Loop(uvloop.Loop):  # type: ignore[misc]
            def call_soon(self, *args: Any, **kwargs: Any) -> Any:
                counts["call_soon"] += 1
                return super().call_soon(*args, **kwargs)

            def call_later(self, *args: Any, **kwargs: Any) -> Any:
                counts["call_later"] += 1
                return super().call_later(*args, **kwargs)

            def call_at(self, *args: Any, **kwargs: Any) -> Any:
                counts["call_at"] += 1
                return super().call_at(*args, **kwargs)

            def create_task(self, *args: Any, **kwargs: Any) -> Any:
                counts["create_task"] += 1
                return super().create_task(*args, **kwargs)

            def create_future(self) -> Any:
                counts["create_future"] += 1
                return super().create_future()

        return Loop()


def test_under_uvicorns_protocol_a_request_schedules_nothing_more_than_bare(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("uvloop")
    from benchmarks import server_inprocess

    # The middleware's one deadline timer is armed by the first request and fires at its
    # deadline (real time here): an hour's deadline keeps that firing, and the re-arming
    # by the next request, out of a run slowed down by a busy machine.
    assert b"x-request-timeout-ms: 5000" in server_inprocess.REQUEST
    monkeypatch.setattr(
        server_inprocess,
        "REQUEST",
        server_inprocess.REQUEST.replace(b"timeout-ms: 5000", b"timeout-ms: 3600000"),
    )

    requests = 4 * server_inprocess.CONNECTIONS
    per_request: dict[str, dict[str, float]] = {}
    for variant in ("bare", "fidelity-memory"):
        counts: collections.Counter[str] = collections.Counter()
        loop = _CountingLoop.make(counts)

        async def run(variant: str = variant, counts: Any = counts) -> None:
            server = server_inprocess.Server(variant)
            await server.run(requests)  # warm-up
            counts.clear()
            await server.run(requests)

        try:
            loop.run_until_complete(run())
        finally:
            loop.close()
        per_request[variant] = {k: n / requests for k, n in counts.items()}
    # uvicorn: one task per request, its keep-alive timer, the task's steps
    assert per_request["bare"]["create_task"] == 1.0
    assert per_request["bare"]["call_later"] == 1.0
    assert per_request["fidelity-memory"] == per_request["bare"]
