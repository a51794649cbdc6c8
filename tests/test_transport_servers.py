"""FidelityTransport against real HTTP servers on loopback (uvicorn in a thread).

Real sockets, real httpx transports, real timeouts; backoff is real too but
tiny (base 1 ms, cap 5 ms). Where a test needs a long wait (Retry-After) the
transport gets a FakeClock instead, so nothing here waits out a window.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from _loopback import LoopbackServer, refused_port
from fidelity_mw import (
    DeadlineConfig,
    DecisionContext,
    Engine,
    FidelitySyncTransport,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.context import _CURRENT
from fidelity_mw.outbound.wire import connected_peer_trusted
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

Scope = dict[str, Any]


class Upstream:
    """An ASGI app that counts what it receives and misbehaves on request, by path."""

    def __init__(self) -> None:
        self.hits: collections.Counter[tuple[str, str]] = collections.Counter()
        self.headers: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
        self.lock = threading.Lock()
        self.released: asyncio.Event | None = None  # lives in the server's loop
        self.loop: asyncio.AbstractEventLoop | None = None

    async def hang(self) -> None:
        if self.released is None:
            self.loop = asyncio.get_running_loop()
            self.released = asyncio.Event()
        await self.released.wait()

    def release(self) -> None:
        """From the test thread: let every hanging handler finish (before shutdown)."""
        if self.loop is not None and self.released is not None:
            self.loop.call_soon_threadsafe(self.released.set)

    def count(self, method: str, path: str) -> int:
        return self.hits[(method, path)]

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:  # read the whole body first, as a real handler would
            message = await receive()
            more = message.get("more_body", False)
        method, path = scope["method"], scope["path"]
        with self.lock:
            self.hits[(method, path)] += 1
            n = self.hits[(method, path)]
            self.headers[path].append({k.decode(): v.decode() for k, v in scope["headers"]})
        headers: list[tuple[bytes, bytes]] = []
        if path == "/ok":
            status = 200
        elif path == "/hang":  # far past any attempt timeout; released at teardown
            await self.hang()
            status = 200
        elif path == "/retry-after":
            status = 503 if n == 1 else 200
            headers = [(b"retry-after", b"2")]
        elif path == "/flap":
            status = 503 if n % 2 == 1 else 200
        elif path == "/exhausted":
            status = 503
            headers = [(b"x-fidelity-retry", b"exhausted")]
        else:
            status = 503
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"x"})


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Upstream, str]]:
    app = Upstream()
    with LoopbackServer(app) as server:
        yield app, server.url
        app.release()


@pytest.fixture
def fresh(upstream: tuple[Upstream, str]) -> tuple[Upstream, str]:
    app, url = upstream
    app.hits.clear()
    app.headers.clear()
    return app, url


class Sent(httpx.AsyncHTTPTransport):
    """The inner transport, keeping what the client sent: one request per attempt, with
    its headers as sent (the transport takes an attempt's own headers off the request
    when the call ends)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((request.method, request.url.path, dict(request.headers)))
        return await super().handle_async_request(request)

    def headers(self, method: str, path: str, name: str) -> list[str]:
        """`name`'s value on each attempt sent of `method` `path`, in the order sent."""
        return [h.get(name, "") for m, p, h in self.requests if (m, p) == (method, path)]


async def received(app: Upstream, method: str, path: str, n: int) -> int:
    """The server's receipts of `method` `path`, once it has `n` (or after 30 s). Behind an
    80 ms attempt timeout a starved server thread may read a request after the client
    gave up on it; the client's count is the test's, this says the server saw as many."""
    for _ in range(3_000):
        if app.count(method, path) >= n:
            break
        await asyncio.sleep(0.01)
    return app.count(method, path)


async def two_idle_connections(client: httpx.AsyncClient, url: str) -> None:
    """Two keep-alive connections in the client's pool, so that neither of two attempts
    connects inside its 80 ms (a starved client may not finish even a loopback connect
    in that time: a ConnectTimeout, no request sent)."""
    for response in await asyncio.gather(client.get(url + "/ok"), client.get(url + "/ok")):
        assert response.status_code == 200


def policy(**retry: Any) -> Policy:
    timeout_ms = retry.pop("attempt_timeout_ms", 2_000)
    trusted = retry.pop("trusted_peers", None)
    retry = {"base_ms": 1, "max_ms": 5, **retry}
    extra = {} if trusted is None else {"trusted_peers": trusted}
    return Policy(
        deadline=DeadlineConfig(default_ms=10_000),
        upstreams=(
            UpstreamConfig(
                host="*",
                retry=RetryConfig(**retry),
                breaker=None,
                attempt_timeout_ms=timeout_ms,
            ),
        ),
        **extra,
    )


class Bound:
    def __init__(self, engine: Engine) -> None:
        now = engine.clock.monotonic()
        self.ctx = DecisionContext(engine, "/test", "GET", now, deadline_at=now + 10.0)

    def __enter__(self) -> DecisionContext:
        self.token = _CURRENT.set(self.ctx)
        return self.ctx

    def __exit__(self, *exc: object) -> None:
        _CURRENT.reset(self.token)


def reasons(ctx: DecisionContext) -> list[str]:
    return [d.reason for d in ctx.decisions]


async def test_connection_refused_is_retried_then_raised() -> None:
    t = FidelityTransport(policy=policy(), telemetry=False)
    url = f"http://127.0.0.1:{refused_port()}/x"
    async with httpx.AsyncClient(transport=t) as client:
        with Bound(t.engine) as ctx, pytest.raises(httpx.ConnectError):
            await client.get(url)
    assert reasons(ctx) == ["attempt", "connect_error", "connect_error", "attempts"]
    assert ctx.upstream_exhausted
    print(f"\nconnection refused: {ctx.attempts} attempts, then ConnectError")


async def test_a_hanging_server_hits_the_attempt_timeout(fresh: tuple[Upstream, str]) -> None:
    app, url = fresh
    sent = Sent()
    t = FidelityTransport(sent, policy=policy(attempts=2, attempt_timeout_ms=80), telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        await two_idle_connections(client, url)
        with Bound(t.engine) as ctx, pytest.raises(httpx.ReadTimeout):
            await client.get(url + "/hang")
        assert await received(app, "GET", "/hang", 2) == 2
    assert reasons(ctx) == ["attempt", "timeout_error", "attempts"]
    assert sent.headers("GET", "/hang", "x-request-timeout-ms") == ["72", "72"]
    assert sent.headers("GET", "/hang", "x-fidelity-attempt") == ["1", "2"]
    # as the server read them (in its own order: two connections)
    server = sorted(
        (h["x-fidelity-attempt"], h["x-request-timeout-ms"]) for h in app.headers["/hang"]
    )
    assert server == [("1", "72"), ("2", "72")]


async def test_503_with_retry_after_is_honoured(fresh: tuple[Upstream, str]) -> None:
    app, url = fresh
    clock = FakeClock()  # Retry-After: 2 would be a real 2 s wait otherwise
    t = FidelityTransport(policy=policy(), clock=clock, rng=seeded_random(1), telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get(url + "/retry-after")
    assert response.status_code == 200
    assert app.count("GET", "/retry-after") == 2
    assert clock.sleeps == [2.0]


async def test_a_flapping_upstream_is_smoothed_over(fresh: tuple[Upstream, str]) -> None:
    app, url = fresh
    t = FidelityTransport(policy=policy(), rng=seeded_random(2), telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        statuses = [(await client.get(url + "/flap")).status_code for _ in range(10)]
    assert statuses == [200] * 10
    assert app.count("GET", "/flap") == 20  # every call: a 503, then a 200
    assert [h["x-fidelity-attempt"] for h in app.headers["/flap"]] == ["1", "2"] * 10


async def test_a_post_is_never_sent_twice(fresh: tuple[Upstream, str]) -> None:
    app, url = fresh
    sent = Sent()
    t = FidelityTransport(sent, policy=policy(attempts=5, attempt_timeout_ms=80), telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(3):
            assert (await client.post(url + "/fail", content=b"pay 10")).status_code == 503
        with pytest.raises(httpx.ReadTimeout):  # (on the connection the 503s left open)
            await client.post(url + "/hang", content=b"pay 10")
        assert len(sent.headers("POST", "/hang", "x-fidelity-attempt")) == 1  # never retried
        assert await received(app, "POST", "/hang", 1) == 1
    assert len(sent.headers("POST", "/fail", "x-fidelity-attempt")) == 3
    assert app.count("POST", "/fail") == 3  # one per call, never a retry
    print(f"\nPOST: 3 calls -> {app.count('POST', '/fail')} received; timed out -> 1 received")


async def test_exhausted_signal_from_loopback_stops_retries(fresh: tuple[Upstream, str]) -> None:
    app, url = fresh
    t = FidelityTransport(policy=policy(), telemetry=False)
    localhost = url.replace("127.0.0.1", "localhost")
    async with httpx.AsyncClient(transport=t) as client:
        with Bound(t.engine) as ctx:
            assert (await client.get(url + "/exhausted")).status_code == 503
            assert (await client.get(localhost + "/exhausted")).status_code == 503
    assert app.count("GET", "/exhausted") == 2  # one attempt each
    assert reasons(ctx).count("downstream_exhausted") == 2
    assert ctx.upstream_exhausted

    untrusting = FidelityTransport(policy=policy(trusted_peers=()), telemetry=False)
    async with httpx.AsyncClient(transport=untrusting) as client:
        await client.get(url + "/exhausted")
    assert app.count("GET", "/exhausted") == 2 + 3  # not trusted: retried as usual


async def test_a_dns_name_is_trusted_by_the_address_it_connected_to(
    fresh: tuple[Upstream, str],
) -> None:
    _, url = fresh
    nets = Engine(Policy()).trusted_peers
    async with httpx.AsyncClient() as client:
        response = await client.get(url + "/ok")
        assert connected_peer_trusted(response, nets)
        assert not connected_peer_trusted(response, Engine(Policy(trusted_peers=())).trusted_peers)


def test_sync_transport_against_a_real_server(fresh: tuple[Upstream, str]) -> None:
    app, url = fresh
    t = FidelitySyncTransport(policy=policy(), rng=seeded_random(3), telemetry=False)
    with httpx.Client(transport=t) as client:
        assert [client.get(url + "/flap").status_code for _ in range(3)] == [200] * 3
        assert client.post(url + "/fail", content=b"once").status_code == 503
        with pytest.raises(httpx.ConnectError):
            client.get(f"http://127.0.0.1:{refused_port()}/")
    assert app.count("GET", "/flap") == 6
    assert app.count("POST", "/fail") == 1
