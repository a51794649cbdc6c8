"""A real three-service chain on loopback: A -> B -> C, with C failing.

Three uvicorn servers per variant. With fidelity_mw on every hop, B retries
C (the nearest owner), gives up, and answers A with `x-fidelity-retry:
exhausted`; A does not retry B, so C sees `attempts` calls per top-level
request. With a plain retry loop on every hop, C sees attempts^2.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from _loopback import LoopbackServer
from fidelity_mw import (
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)

ATTEMPTS = 3
TOP_LEVEL_REQUESTS = 2


class FailingC:
    """Service C: always 503, counting the calls it receives."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        with self.lock:
            self.calls += 1
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"C is down"})


def fidelity_policy() -> Policy:
    # Tiny real backoff: the test is about how many calls reach C, not about waiting.
    retry = RetryConfig(attempts=ATTEMPTS, base_ms=2, max_ms=5)
    return Policy(upstreams=(UpstreamConfig(host="*", retry=retry),))


def fidelity_hop(next_url: str) -> Any:
    """A service that calls the next hop through FidelityTransport, under FidelityMiddleware."""
    client = httpx.AsyncClient(transport=FidelityTransport(telemetry=False))

    async def handler(request: Request) -> Response:
        upstream = await client.get(next_url)
        return Response(b"upstream failed", 502 if upstream.status_code >= 500 else 200)

    app = Starlette(routes=[Route("/", handler)])
    return FidelityMiddleware(app, policy=fidelity_policy(), telemetry=False)


def plain_hop(next_url: str) -> Any:
    """The same service with the usual hand-written retry loop and no fidelity_mw."""
    client = httpx.AsyncClient()

    async def call_with_retries() -> httpx.Response:
        for attempt in range(1, ATTEMPTS + 1):
            response = await client.get(next_url)
            if response.status_code < 500 or attempt == ATTEMPTS:
                return response
            await response.aclose()
            await asyncio.sleep(0.002 * attempt)
        raise AssertionError("unreachable")

    async def handler(request: Request) -> Response:
        upstream = await call_with_retries()
        return Response(b"upstream failed", 502 if upstream.status_code >= 500 else 200)

    return Starlette(routes=[Route("/", handler)])


@contextmanager
def chain(hop: Callable[[str], Any]) -> Iterator[tuple[FailingC, str]]:
    """Start C, then B calling C, then A calling B; yield (C, A's URL)."""
    c = FailingC()
    with ExitStack() as stack:
        c_server = stack.enter_context(LoopbackServer(c))
        b_server = stack.enter_context(LoopbackServer(hop(c_server.url + "/")))
        a_server = stack.enter_context(LoopbackServer(hop(b_server.url + "/")))
        yield c, a_server.url + "/"


def drive(c: FailingC, url: str) -> tuple[list[int], list[httpx.Response]]:
    per_request: list[int] = []
    responses: list[httpx.Response] = []
    with httpx.Client(timeout=10.0) as client:
        for _ in range(TOP_LEVEL_REQUESTS):
            before = c.calls
            responses.append(client.get(url))
            per_request.append(c.calls - before)
    return per_request, responses


def test_with_fidelity_on_every_hop_c_sees_at_most_attempts_calls() -> None:
    with chain(fidelity_hop) as (c, url):
        per_request, responses = drive(c, url)
    print(f"\nfidelity_mw on every hop: C calls per top-level request = {per_request}")
    assert per_request == [ATTEMPTS] * TOP_LEVEL_REQUESTS
    for response in responses:
        assert response.status_code == 502
        # A gave up because B said so, and tells its own caller the same
        assert response.headers["x-fidelity-retry"] == "exhausted"


def test_with_a_retry_loop_on_every_hop_c_sees_attempts_squared() -> None:
    with chain(plain_hop) as (c, url):
        per_request, responses = drive(c, url)
    print(f"\nplain retry loop on every hop: C calls per top-level request = {per_request}")
    assert per_request == [ATTEMPTS**2] * TOP_LEVEL_REQUESTS
    assert all(r.status_code == 502 for r in responses)
    assert all("x-fidelity-retry" not in r.headers for r in responses)
