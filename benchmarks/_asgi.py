"""The in-process ASGI harness the benchmarks share: one route, one request shape, timed batches.

Calling the app directly (no server, no sockets) measures what the middleware
itself costs per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse

Scope = dict[str, Any]
CLIENT = "10.1.2.3"


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def make_scope() -> Scope:
    """GET /hello from one client, with a caller deadline, as a server would pass it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/hello",
        "raw_path": b"/hello",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"api.example"),
            (b"user-agent", b"bench/1.0"),
            (b"accept", b"*/*"),
            (b"x-request-timeout-ms", b"5000"),
        ],
        "client": (CLIENT, 50000),
        "server": ("127.0.0.1", 8000),
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def run_batch(
    app: Any,
    n: int,
    timer: Callable[[], float] = time.perf_counter,
    keep_scopes: bool = False,
) -> float:
    """Seconds per request over n sequential requests (every one must be a 200).

    `timer=time.process_time` counts this process's CPU time only: on a shared
    machine other processes' load then moves the numbers much less. The scopes
    are built before the clock starts; each is dropped once answered, as a server
    does (kept alive, a batch's scopes hold every request's context and make the
    garbage collector run more often), unless `keep_scopes`.
    """
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    scopes: list[Scope | None] = [make_scope() for _ in range(n)]
    start = timer()
    if keep_scopes:
        for scope in scopes:
            await app(scope, receive, send)
    else:
        for i in range(n):
            scope, scopes[i] = scopes[i], None
            await app(scope, receive, send)
            del scope
    elapsed = timer() - start
    if len(statuses) != n or any(s != 200 for s in statuses):
        raise RuntimeError(f"unexpected statuses: {set(statuses)}")
    return elapsed / n
