"""Review of the outbound transport as a whole (rev27o): what a user of httpx-retries,
stamina or Envoy would try. Each test of a defect failed before its fix; a few (a proxy
on the client, redirects, the sync twins) hold what docs/outbound.md now says."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

from _loopback import LoopbackServer, refused_port
from fidelity_mw import FidelitySyncTransport, FidelityTransport, Policy
from fidelity_mw.outbound import wire
from fidelity_mw.outbound.wire import SPEND_MAX_S
from fidelity_mw.policy import DeadlineConfig, HedgeConfig, RetryConfig, UpstreamConfig
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio

RETRY = RetryConfig(attempts=3, base_ms=1, max_ms=2, budget_min_per_s=100.0)


class Told:
    """An upstream that notes the `x-request-timeout-ms` and read timeout of every
    attempt, and answers the statuses scripted (the last one again when they run out)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses) or [200]
        self.seen: list[tuple[str | None, float | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout") or {}
        self.seen.append((request.headers.get("x-request-timeout-ms"), timeouts.get("read")))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return httpx.Response(status)


def _policy(default_ms: int = 30_000) -> Policy:
    return Policy(
        deadline=DeadlineConfig(default_ms=default_ms),
        upstreams=(UpstreamConfig(host="up.internal", retry=RETRY, breaker=None),),
    )


# ---------------------------------------------------------------- the next hop's deadline


@pytest.mark.parametrize(
    ("client_timeout", "default_ms", "told"),
    [
        # httpx's default client: every timeout 5 s, the attempt's 10 s. The next hop was
        # told 9750 ms: it worked on (and retried its own upstreams) for almost 5 s after
        # this side's read timeout had fired and this side had retried it.
        (httpx.Timeout(5.0), 30_000, "4750"),
        (httpx.Timeout(5.0, read=1.0), 30_000, "900"),
        (None, 30_000, "9750"),  # no read timeout of the client's: the attempt's
        (httpx.Timeout(30.0), 30_000, "9750"),  # a longer one: the attempt's
        # the deadline leaves less than the attempt timeout: the shorter of it and the read
        # (the retry goes out a backoff later: it may be told a millisecond less)
        (httpx.Timeout(5.0, read=1.0), 3_000, "900"),
        # (the attempt has the deadline's 3000 ms less a tenth, and tells a tenth less)
        (httpx.Timeout(5.0), 3_000, "2500"),
    ],
)
async def test_the_next_hop_is_told_no_more_than_the_clients_read_timeout(
    client_timeout: httpx.Timeout | None, default_ms: int, told: str
) -> None:
    upstream = Told(503, 200)
    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=_policy(default_ms), clock=FakeClock(),
        telemetry=False,
    )  # fmt: skip
    async with httpx.AsyncClient(transport=transport, timeout=client_timeout) as client:
        for _ in range(3):  # the first call, its retry, then the shortcut's calls
            assert (await client.get("http://up.internal/x")).status_code == 200
            upstream.statuses = [200]
    assert len(upstream.seen) == 4
    for header, read in upstream.seen:
        assert header is not None
        assert read is not None
        assert int(told) - 1 <= int(header) <= int(told)
        assert int(header) < read * 1000.0
    assert [header for header, _ in upstream.seen[2:]] == [told, told]


@pytest.mark.parametrize(
    ("timeout", "told"), [(httpx.Timeout(5.0), "4750"), (httpx.Timeout(5.0, read=1.0), "900")]
)
def test_the_sync_transport_tells_the_next_hop_no_more_than_its_read_timeout(
    timeout: httpx.Timeout, told: str
) -> None:
    upstream = Told(503, 200)
    transport = FidelitySyncTransport(
        httpx.MockTransport(upstream), policy=_policy(), clock=FakeClock(), telemetry=False
    )
    with httpx.Client(transport=transport, timeout=timeout) as client:
        assert client.get("http://up.internal/x").status_code == 200
        assert client.get("http://up.internal/x").status_code == 200
    assert [header for header, _ in upstream.seen] == [told] * 3


# ---------------------------------------------------------------- the client's settings


class Seen:
    """An attempt observer that notes the URL of every attempt the transport makes (a
    subclass of the transport would not do: compiled, it is a native class)."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def attempt_start(self, ctx: object, request: httpx.Request, attempt: int) -> None:
        self.urls.append(str(request.url))

    def attempt_end(self, token: object, response: object, error: object) -> None:
        return None


def _closed_port() -> int:
    return refused_port()  # nobody listens on it: a connection is refused at once


async def test_a_proxy_on_the_client_goes_around_the_transport() -> None:
    """docs/outbound.md said proxies "stay where they were": a `proxy=` on the client is
    mounted by httpx for every URL, ahead of `transport=`. The docs now say to put it on
    the inner transport (next test); this holds the reason."""
    seen = Seen()
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(200)), policy=_policy(),
        clock=FakeClock(), observer=seen,
    )  # fmt: skip
    proxy = f"http://127.0.0.1:{_closed_port()}"
    async with httpx.AsyncClient(transport=transport, proxy=proxy) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("http://up.internal/x")
    assert seen.urls == []  # never seen: no retry, no breaker, no deadline


async def test_a_proxy_on_the_inner_transport_is_retried_through() -> None:
    clock = FakeClock()
    proxy = f"http://127.0.0.1:{_closed_port()}"
    seen = Seen()
    transport = FidelityTransport(
        httpx.AsyncHTTPTransport(proxy=proxy), policy=_policy(), clock=clock, observer=seen
    )
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("http://up.internal/x")
    assert seen.urls == ["http://up.internal/x"] * 3  # three attempts through the proxy
    assert len(clock.sleeps) == 2  # the proxy refused three attempts: two backoffs


async def test_each_redirect_hop_is_a_call_of_its_own() -> None:
    """httpx follows redirects above the transport: every hop is a first attempt of a
    call of its own (its own attempt count and retries), and the headers of ours that the
    hop before carried do not travel on with the redirect."""
    seen: list[tuple[str, str | None, list[str]]] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        attempts = request.headers.get_list("x-fidelity-attempt")
        seen.append((request.url.path, request.headers.get("x-request-timeout-ms"), attempts))
        if request.url.path == "/old":
            return httpx.Response(302, headers={"location": "/new"})
        if len([s for s in seen if s[0] == "/new"]) == 1:
            return httpx.Response(503)
        return httpx.Response(200)

    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=_policy(), clock=FakeClock(), telemetry=False
    )
    async with httpx.AsyncClient(
        transport=transport, follow_redirects=True, timeout=None
    ) as client:
        response = await client.get("http://up.internal/old")
    assert response.status_code == 200
    assert [(path, attempts) for path, _, attempts in seen] == [
        ("/old", ["1"]), ("/new", ["1"]), ("/new", ["2"]),
    ]  # fmt: skip
    assert {told for _, told, _ in seen} == {"9750"}
    assert "x-fidelity-attempt" not in response.request.headers


# ---------------------------------------------------------------- failed answers' connections


class Failing:
    """An ASGI upstream that answers `failures` 503s (with a body of `size` bytes) before
    each 200, and notes the client port every request came from."""

    def __init__(self, failures: int, size: int, chunked: bool = False) -> None:
        self.failures = failures
        self.size = size
        self.chunked = chunked
        self.ports: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.ports.append(scope["client"][1])
        failed = len(self.ports) % (self.failures + 1) != 0
        body = b"x" * self.size if failed else b"ok"
        headers = [] if self.chunked else [(b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 503 if failed else 200,
                    "headers": headers})  # fmt: skip
        half = len(body) // 2
        await send({"type": "http.response.body", "body": body[:half], "more_body": True})
        await send({"type": "http.response.body", "body": body[half:]})


@pytest.fixture
def patient_spend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real-time bound on reading a failed answer, lengthened: the server runs in a
    thread of the test's process, and on a loaded machine its second body message came
    0.1 s after the first (the connection was dropped, a second port seen)."""
    monkeypatch.setattr(wire, "SPEND_MAX_S", 5.0)


@pytest.mark.usefixtures("patient_spend")
@pytest.mark.parametrize(("size", "chunked"), [(0, False), (600, False), (600, True)])
async def test_a_failed_attempts_connection_goes_back_to_the_pool(size: int, chunked: bool) -> None:
    """docs/outbound.md: "Failed attempts' responses are closed before the backoff sleep, so
    their connections go back to the pool". Closed with their body unread, they were
    dropped: every retry opened a new connection (a TLS handshake, on HTTPS) to an
    upstream that was failing already. A short body is read to its end first."""
    upstream = Failing(failures=2, size=size, chunked=chunked)
    policy = Policy(upstreams=(UpstreamConfig(host="127.0.0.1", retry=RETRY, breaker=None),))
    transport = FidelityTransport(policy=policy, clock=FakeClock(), telemetry=False)
    with LoopbackServer(upstream) as server:
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(3):
                assert (await client.get(server.url + "/")).status_code == 200
    assert len(upstream.ports) == 9
    assert len(set(upstream.ports)) == 1  # one connection for every attempt


@pytest.mark.usefixtures("patient_spend")
@pytest.mark.parametrize(("size", "chunked"), [(600, False), (600, True)])
def test_the_sync_transport_gives_a_failed_attempts_connection_back_too(
    size: int, chunked: bool
) -> None:
    upstream = Failing(failures=2, size=size, chunked=chunked)
    policy = Policy(upstreams=(UpstreamConfig(host="127.0.0.1", retry=RETRY, breaker=None),))
    transport = FidelitySyncTransport(policy=policy, clock=FakeClock(), telemetry=False)
    with LoopbackServer(upstream) as server, httpx.Client(transport=transport) as client:
        for _ in range(3):
            assert client.get(server.url + "/").status_code == 200
    assert len(upstream.ports) == 9
    assert len(set(upstream.ports)) == 1


async def test_a_long_failed_answer_is_not_read_before_the_retry() -> None:
    """Reading is for a short body (an error page): a long one is dropped with its
    connection, as before, rather than downloaded to keep a connection."""
    upstream = Failing(failures=1, size=1 << 20)
    policy = Policy(upstreams=(UpstreamConfig(host="127.0.0.1", retry=RETRY, breaker=None),))
    transport = FidelityTransport(policy=policy, clock=FakeClock(), telemetry=False)
    with LoopbackServer(upstream) as server:
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get(server.url + "/")).status_code == 200
    assert len(upstream.ports) == 2
    assert len(set(upstream.ports)) == 2


class Noted(httpx.AsyncByteStream, httpx.SyncByteStream):
    """A body that notes the read timeout its request carries while it is read (httpcore
    reads it then), and whether it was closed."""

    def __init__(self, request: httpx.Request, notes: list[object]) -> None:
        self.request = request
        self.notes = notes

    def _note(self) -> None:
        self.notes.append(self.request.extensions["timeout"]["read"])

    async def __aiter__(self) -> Any:
        self._note()
        yield b"busy"

    def __iter__(self) -> Any:
        self._note()
        yield b"busy"

    async def aclose(self) -> None:
        self.notes.append("closed")

    def close(self) -> None:
        self.notes.append("closed")


def _stalling(notes: list[object]) -> httpx.MockTransport:
    """Two 503s whose bodies note how they are read, then a 200."""

    def upstream(request: httpx.Request) -> httpx.Response:
        if notes.count("closed") == 2:
            return httpx.Response(200)
        return httpx.Response(503, headers={"content-length": "4"}, stream=Noted(request, notes))

    return httpx.MockTransport(upstream)


async def test_a_failed_answer_is_read_in_short_reads_and_closed() -> None:
    """A body that stalls after its head costs the retry at most a short read, not the
    attempt's read timeout (30 s here)."""
    notes: list[object] = []
    transport = FidelityTransport(
        _stalling(notes), policy=_policy(), clock=FakeClock(), telemetry=False
    )
    async with httpx.AsyncClient(transport=transport, timeout=30.0) as client:
        response = await client.get("http://up.internal/x")
    assert response.status_code == 200
    assert notes == [SPEND_MAX_S, "closed"] * 2
    assert response.request.extensions["timeout"] == httpx.Timeout(30.0).as_dict()  # its own


class Stuck(FakeClock):
    """A backoff that waits until the call is cancelled (`entered` once it waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = anyio.Event()

    async def sleep(self, seconds: float) -> None:
        self.entered.set()
        await anyio.sleep_forever()


async def test_a_call_cancelled_in_its_backoff_leaves_the_request_as_built() -> None:
    """The short reads of the failed answer were left on the request: sent again (an
    outer loop's `client.send(request)`), it timed out each read after 0.1 s."""
    notes: list[object] = []
    transport = FidelityTransport(
        _stalling(notes), policy=_policy(), clock=(clock := Stuck()), telemetry=False
    )
    async with httpx.AsyncClient(transport=transport, timeout=30.0) as client:
        request = client.build_request("GET", "http://up.internal/x")
        async with anyio.create_task_group() as group:
            group.start_soon(client.send, request)
            await clock.entered.wait()  # in the backoff: cancelled there
            group.cancel_scope.cancel()
    assert notes == [SPEND_MAX_S, "closed"]
    assert request.extensions["timeout"] == httpx.Timeout(30.0).as_dict()


def test_the_sync_transport_reads_a_failed_answer_in_short_reads_too() -> None:
    notes: list[object] = []
    transport = FidelitySyncTransport(
        _stalling(notes), policy=_policy(), clock=FakeClock(), telemetry=False
    )
    with httpx.Client(transport=transport, timeout=30.0) as client:
        response = client.get("http://up.internal/x")
    assert response.status_code == 200
    assert notes == [SPEND_MAX_S, "closed"] * 2


# ---------------------------------------------------------------- an inner transport's own retries


@pytest.mark.parametrize("sync", [False, True])
def test_an_inner_transport_that_retries_connects_itself_is_warned_about(
    sync: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """`httpx.AsyncHTTPTransport(retries=3)` makes up to 4 connects inside every attempt of
    ours, with httpcore's own sleeps (0.5 s, 1 s) between them that no timeout bounds: 12
    connects per call with the default 3 attempts, and an attempt that outlives the
    deadline. Nothing said so (the audit finds it in code it reads; this is where it runs)."""
    caplog.set_level("WARNING", logger="fidelity_mw")
    if sync:
        FidelitySyncTransport(httpx.HTTPTransport(retries=3), telemetry=False)
        FidelitySyncTransport(httpx.HTTPTransport(), telemetry=False)
    else:
        FidelityTransport(httpx.AsyncHTTPTransport(retries=3), telemetry=False)
        FidelityTransport(httpx.AsyncHTTPTransport(), telemetry=False)
        FidelityTransport(telemetry=False)
    warned = [r.getMessage() for r in caplog.records if "retries" in r.getMessage()]
    assert len(warned) == 1
    assert "retries=3" in warned[0]
    assert "retries=0" in warned[0]


# ---------------------------------------------------------------- hedging a keyed POST


class KeyedServer:
    """An upstream that keeps the IETF Idempotency-Key draft: a request whose key's first
    request is still in progress is answered 409. The first request waits for `release`."""

    def __init__(self) -> None:
        self.in_progress: set[str] = set()
        self.release = anyio.Event()
        self.performed = 0
        self.seen: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        key = request.headers.get("idempotency-key", "")
        self.seen.append(request.method)
        if key in self.in_progress:
            return httpx.Response(409, json={"error": "idempotency_key_in_use"})
        self.in_progress.add(key)
        try:
            await self.release.wait()
            self.performed += 1
            return httpx.Response(200, json={"charged": True})
        finally:
            self.in_progress.discard(key)


async def test_a_post_with_an_idempotency_key_is_not_hedged() -> None:
    """A hedge is a second request while the first is in progress, which is exactly what the
    draft has the server refuse (409) for a keyed request; that 409 was a good answer and
    won the race: the caller saw 409 for a charge the first request made."""
    server = KeyedServer()
    policy = Policy(
        upstreams=(
            UpstreamConfig(host="payments.internal", retry=RETRY, hedge=HedgeConfig(after_ms=50)),
        )
    )
    clock = FakeClock()
    transport = FidelityTransport(
        httpx.MockTransport(server), policy=policy, clock=clock, telemetry=False
    )

    async def answer_later() -> None:
        for _ in range(50):  # (the hedge delay runs on the fake clock: it passes at once)
            await anyio.lowlevel.checkpoint()
        server.release.set()

    async with httpx.AsyncClient(transport=transport) as client, anyio.create_task_group() as tg:
        tg.start_soon(answer_later)
        response = await client.post(
            "http://payments.internal/charge", json={"cents": 100},
            headers={"Idempotency-Key": "k-1"},
        )  # fmt: skip
    assert response.status_code == 200
    assert server.seen == ["POST"]
    assert server.performed == 1
    # a GET (idempotent by its method) is hedged as before
    server = KeyedServer()
    transport = FidelityTransport(
        httpx.MockTransport(server), policy=policy, clock=FakeClock(), telemetry=False
    )
    async with httpx.AsyncClient(transport=transport) as client, anyio.create_task_group() as tg:
        tg.start_soon(answer_later)
        response = await client.get("http://payments.internal/charge/1")
    assert server.seen == ["GET", "GET"]


def _error_then_503_then_200() -> httpx.MockTransport:
    answers: list[Any] = [httpx.ConnectError("refused"), 503, 200]

    def upstream(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return httpx.Response(answer, content=b"busy" if answer == 503 else b"ok")

    return httpx.MockTransport(upstream)


async def test_a_failed_answer_read_after_a_connect_error_does_not_raise_that_error() -> None:
    """Compiled, the reading's `finally` ran while the transport handled the first
    attempt's connect error, and raised that error again: the call failed with it."""
    transport = FidelityTransport(
        _error_then_503_then_200(), policy=_policy(), clock=FakeClock(), telemetry=False
    )
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("http://up.internal/x")
    assert response.status_code == 200
    assert response.text == "ok"


def test_the_sync_transport_reads_a_failed_answer_after_a_connect_error_too() -> None:
    transport = FidelitySyncTransport(
        _error_then_503_then_200(), policy=_policy(), clock=FakeClock(), telemetry=False
    )
    with httpx.Client(transport=transport) as client:
        response = client.get("http://up.internal/x")
    assert response.status_code == 200


# ---------------------------------------------------------------- trust through a proxy


class ExhaustedBehindProxy:
    """A forward proxy on loopback whose upstream (any host) answers 503 marked as a
    fidelity_mw callee's give-up: what a third party could send."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.targets.append(scope["path"])
        headers = [(b"x-fidelity-retry", b"exhausted"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


async def test_an_upstream_reached_through_a_proxy_is_not_trusted_by_the_proxys_address() -> None:
    """A DNS-named upstream is trusted by the address its connection reached: through a
    proxy, that is the proxy's (loopback or private, so trusted by default), and any
    upstream behind it, a third party's too, was believed when it said "exhausted" (no
    retry) or "decided by" (no failure for our breaker)."""
    proxy = ExhaustedBehindProxy()
    with LoopbackServer(proxy) as server:
        inner = httpx.AsyncHTTPTransport(proxy=server.url)
        transport = FidelityTransport(inner, policy=_policy(), clock=FakeClock(), telemetry=False)
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get("http://api.partner.example/x")
    assert response.status_code == 503
    assert len(proxy.targets) == 3  # retried as any 503: the marker is not believed
    reasons = [d.reason for d in response.extensions["fidelity_context"].decisions]
    assert "downstream_exhausted" not in reasons
