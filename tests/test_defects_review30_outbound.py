"""The outbound transport's open edges after rev27o (out30): what a user of httpx-retries,
stamina or Envoy would expect. Each test of a behaviour change failed before it."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import httpx
import pytest
import trustme

from _loopback import LoopbackServer
from fidelity_mw import (
    BreakerConfig,
    CircuitOpen,
    FidelitySyncTransport,
    FidelityTransport,
    Policy,
    PolicyError,
)
from fidelity_mw.policy import HedgeConfig, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

RETRY = RetryConfig(attempts=3, base_ms=1, max_ms=2, budget_min_per_s=100.0)
OURS = ("x-fidelity-attempt", "x-request-timeout-ms")


class Seen:
    """An upstream that notes the headers of every attempt and answers the statuses
    scripted (the last one again when they run out)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses) or [200]
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(request.headers.copy())
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return httpx.Response(status)


# ---------------------------------------------------------------- protocol headers


def _told(headers: httpx.Headers) -> bool:
    return any(name in headers for name in OURS)


@pytest.mark.parametrize(
    ("url", "told"),
    [
        ("https://api.stripe.com/v1/charges", False),  # a third party
        ("http://example.org/", False),
        ("http://8.8.8.8/", False),  # a public address
        ("http://10.0.0.5:8080/", True),  # inside trusted_peers
        ("http://127.0.0.1:8080/", True),
        ("http://localhost:8080/", True),
        ("http://payments/", True),  # one label: a cluster or compose name
        ("http://payments.internal/", True),
        ("http://payments.default.svc.cluster.local/", True),
        ("http://payments.svc/", True),
        ("http://printer.home.arpa/", True),
    ],
)
async def test_our_protocol_headers_go_only_to_hosts_of_the_system(url: str, told: bool) -> None:
    """`x-fidelity-attempt` and `x-request-timeout-ms` are our cross-service protocol: they
    went to every host, api.stripe.com included (a third party learns our retry counts
    and deadlines, and may reject unknown headers)."""
    upstream = Seen(503, 200)
    policy = Policy(upstreams=(UpstreamConfig(retry=RETRY, breaker=None),))
    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=policy, clock=FakeClock(), telemetry=False
    )
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(3):  # a retried call, then the shortcut's calls
            assert (await client.get(url)).status_code == 200
    assert len(upstream.headers) == 4
    assert [_told(h) for h in upstream.headers] == [told] * 4


def test_the_sync_transport_keeps_our_headers_from_third_parties_too() -> None:
    upstream = Seen(503, 200)
    policy = Policy(upstreams=(UpstreamConfig(retry=RETRY, breaker=None),))
    transport = FidelitySyncTransport(
        httpx.MockTransport(upstream), policy=policy, clock=FakeClock(), telemetry=False
    )
    with httpx.Client(transport=transport) as client:
        assert client.get("https://api.stripe.com/v1/charges").status_code == 200
        assert client.get("http://payments.internal/").status_code == 200
    assert [_told(h) for h in upstream.headers] == [False, False, True]


@pytest.mark.parametrize(
    ("mode", "url", "told"),
    [
        ("always", "https://payments.acme-corp.net/", True),  # internal, public-looking name
        ("never", "http://payments.internal/", False),
        ("never", "http://10.0.0.5/", False),
        ("auto", "https://payments.acme-corp.net/", False),
    ],
)
async def test_protocol_headers_can_be_forced_per_upstream(mode: str, url: str, told: bool) -> None:
    upstream = Seen(503, 200)
    host = httpx.URL(url).host
    entry = UpstreamConfig(host=host, retry=RETRY, breaker=None, protocol_headers=mode)  # type: ignore[arg-type]
    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=Policy(upstreams=(entry,)), clock=FakeClock(),
        telemetry=False,
    )  # fmt: skip
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get(url)).status_code == 200
    assert [_told(h) for h in upstream.headers] == [told, told]


class Noted:
    """An ASGI upstream that notes every request's headers; 503 first, then 200."""

    def __init__(self) -> None:
        self.headers: list[dict[bytes, bytes]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.headers.append(dict(scope["headers"]))
        status = 503 if len(self.headers) == 1 else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def acme_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """`payments.prod.acme.net` resolves to 127.0.0.1 (an internal service under a
    public-looking name, as a company's own DNS names it)."""
    import socket

    real = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        # (anyio asks with the name IDNA-encoded, as bytes)
        ours = host in ("payments.prod.acme.net", b"payments.prod.acme.net")
        return real("127.0.0.1" if ours else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)


@pytest.mark.parametrize("trusted", [True, False])
async def test_a_public_looking_name_of_ours_is_told_once_its_first_answer_came_from_our_network(
    acme_is_loopback: None, trusted: bool
) -> None:
    """`auto` judged a DNS name by its name alone, so an internal service under a company
    name (`payments.prod.acme.net`) never heard our deadline again after upgrading. Its
    first answer's address, inside `trusted_peers`, now makes it one of ours: that call's
    retry and every later call carry our headers. Outside them it stays a stranger."""
    upstream = Noted()
    peers = ("127.0.0.0/8",) if trusted else ()
    policy = Policy(upstreams=(UpstreamConfig(retry=RETRY, breaker=None),), trusted_peers=peers)
    with LoopbackServer(upstream) as server:
        transport = FidelityTransport(policy=policy, telemetry=False)
        url = f"http://payments.prod.acme.net:{server.port}/"
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get(url)).status_code == 200  # 503, retried
            assert (await client.get(url)).status_code == 200
    told = [b"x-fidelity-attempt" in h for h in upstream.headers]
    assert told == ([False, True, True] if trusted else [False, False, False])
    if trusted:
        assert upstream.headers[1][b"x-fidelity-attempt"] == b"2"
        assert upstream.headers[2][b"x-fidelity-attempt"] == b"1"


def test_the_sync_transport_learns_a_name_of_ours_too(acme_is_loopback: None) -> None:
    upstream = Noted()
    policy = Policy(upstreams=(UpstreamConfig(retry=RETRY, breaker=None),))
    with LoopbackServer(upstream) as server:
        transport = FidelitySyncTransport(policy=policy, telemetry=False)
        with httpx.Client(transport=transport) as client:
            url = f"http://payments.prod.acme.net:{server.port}/"
            for _ in range(2):
                assert client.get(url).status_code == 200
    assert [b"x-fidelity-attempt" in h for h in upstream.headers] == [False, True, True]


def test_check_warns_of_protocol_headers_always_for_every_host(tmp_path: Any) -> None:
    from fidelity_mw.tools.check import check_file

    everywhere = tmp_path / "everywhere.toml"
    everywhere.write_text('[[upstream]]\nhost = "*"\nprotocol_headers = "always"\n')
    [warning] = [w for w in check_file(everywhere).warnings if "protocol_headers" in w.path]
    assert "third parties" in warning.message
    assert warning.line == 3
    ours = tmp_path / "ours.toml"
    ours.write_text('[[upstream]]\nhost = "*.prod.acme.net"\nprotocol_headers = "always"\n')
    assert not [w for w in check_file(ours).warnings if "protocol_headers" in w.path]


def test_protocol_headers_is_validated() -> None:
    with pytest.raises(PolicyError, match="protocol_headers"):
        UpstreamConfig(protocol_headers="sometimes")  # type: ignore[arg-type]


async def test_a_service_speaks_our_protocol_when_all_its_instances_are_ours() -> None:
    upstream = Seen(200)
    policy = Policy(
        upstreams=(
            UpstreamConfig(host="payments", instances=("http://10.0.0.7:8080",), breaker=None),
            UpstreamConfig(
                host="partner",
                instances=("https://a.partner.com", "https://b.partner.com"),
                breaker=None,
            ),
        )
    )
    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=policy, clock=FakeClock(), telemetry=False
    )
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get("http://payments/x")
        await client.get("http://partner/x")
    assert [_told(h) for h in upstream.headers] == [True, False]


async def test_a_callers_own_timeout_header_to_a_third_party_goes_as_set() -> None:
    """Not ours to own where we do not speak the protocol: a header the caller set
    itself goes unchanged (to one of ours, the deadline's replaces it, as before)."""
    upstream = Seen(200)
    policy = Policy(upstreams=(UpstreamConfig(breaker=None),))
    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=policy, clock=FakeClock(), telemetry=False
    )
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get("https://api.example.com/", headers={"x-request-timeout-ms": "77"})
        await client.get("http://up.internal/", headers={"x-request-timeout-ms": "77"})
    assert upstream.headers[0]["x-request-timeout-ms"] == "77"
    assert upstream.headers[1]["x-request-timeout-ms"] != "77"


# ---------------------------------------------------------------- TLS to an instance's address


class Hosts:
    """An ASGI upstream that answers 200 and notes every request's Host header."""

    def __init__(self) -> None:
        self.hosts: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.hosts.append(dict(scope["headers"]).get(b"host", b"").decode())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def tls(tmp_path: Any) -> tuple[str, ssl.SSLContext]:
    """A certificate for `payments.internal` alone (no IP address in it), issued by a test
    CA, and a client context that trusts that CA."""
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("payments.internal").private_key_and_cert_chain_pem.write_to_path(str(pem))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return str(pem), context


def _service(port: int) -> Policy:
    return Policy(
        upstreams=(
            UpstreamConfig(
                host="payments.internal", instances=(f"https://127.0.0.1:{port}",),
                retry=RetryConfig(attempts=1), breaker=None,
            ),
        )
    )  # fmt: skip


async def test_https_to_an_instance_address_verifies_the_services_name(
    tls: tuple[str, ssl.SSLContext],
) -> None:
    """The balancer sent `https://payments.internal/` to `https://10.0.0.5:443` and
    httpcore checked the certificate against the address (SNI none, verification against
    the IP): a certificate for the service's name failed every call. Envoy's `auto_sni`
    takes the name from the Host header."""
    pem, context = tls
    upstream = Hosts()
    with LoopbackServer(upstream, ssl_certfile=pem) as server:
        transport = FidelityTransport(
            httpx.AsyncHTTPTransport(verify=context), policy=_service(server.port),
            clock=FakeClock(), telemetry=False,
        )  # fmt: skip
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get("https://payments.internal/x")
            again = await client.get("https://payments.internal/x")
    assert response.status_code == again.status_code == 200
    assert upstream.hosts == ["payments.internal", "payments.internal"]  # Host kept
    # the request as built again: no extension of ours left on it
    assert "sni_hostname" not in response.request.extensions


def test_the_sync_transport_verifies_the_services_name_too(
    tls: tuple[str, ssl.SSLContext],
) -> None:
    pem, context = tls
    upstream = Hosts()
    with LoopbackServer(upstream, ssl_certfile=pem) as server:
        transport = FidelitySyncTransport(
            httpx.HTTPTransport(verify=context), policy=_service(server.port),
            clock=FakeClock(), telemetry=False,
        )  # fmt: skip
        with httpx.Client(transport=transport) as client:
            assert client.get("https://payments.internal/x").status_code == 200
    assert upstream.hosts == ["payments.internal"]


async def test_a_wrong_certificate_still_fails(tls: tuple[str, ssl.SSLContext]) -> None:
    """Verification is kept, against the service's name: a service named otherwise than
    its certificate still fails."""
    pem, context = tls
    with LoopbackServer(Hosts(), ssl_certfile=pem) as server:
        policy = Policy(
            upstreams=(
                UpstreamConfig(
                    host="billing.internal", instances=(f"https://127.0.0.1:{server.port}",),
                    retry=RetryConfig(attempts=1), breaker=None,
                ),
            )
        )  # fmt: skip
        transport = FidelityTransport(
            httpx.AsyncHTTPTransport(verify=context), policy=policy, clock=FakeClock(),
            telemetry=False,
        )  # fmt: skip
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(httpx.ConnectError, match="certificate"):
                await client.get("https://billing.internal/x")


# ---------------------------------------------------------------- trace context on the request


def _traced() -> Any:
    from opentelemetry.sdk.trace import TracerProvider

    return TracerProvider()


@pytest.mark.parametrize("statuses", [(200,), (503, 200)])
async def test_the_trace_context_of_our_span_is_not_left_on_the_request(
    statuses: tuple[int, ...],
) -> None:
    """The attempt's CLIENT span is injected as `traceparent` into the request; it stayed
    on it after the call: the request the caller holds carried our ended span, and sent
    again its first attempt went out under the old span's context (httpx replaced it only
    because the observer injected again; another observer, or none, kept it)."""
    upstream = Seen(*statuses)
    policy = Policy(upstreams=(UpstreamConfig(retry=RETRY, breaker=None),))
    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=policy, clock=FakeClock(),
        tracer_provider=_traced(),
    )  # fmt: skip
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(2):  # the loop's call, then the shortcut's
            request = client.build_request("GET", "http://up.internal/x", headers={"a": "1"})
            built = request.headers.multi_items()
            response = await client.send(request)
            assert response.status_code == 200
            assert request.headers.multi_items() == built
    assert all("traceparent" in h for h in upstream.headers)  # sent, per attempt


async def test_a_callers_own_traceparent_is_given_back() -> None:
    upstream = Seen(503, 200)
    policy = Policy(upstreams=(UpstreamConfig(retry=RETRY, breaker=None),))
    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=policy, clock=FakeClock(),
        tracer_provider=_traced(),
    )  # fmt: skip
    theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("http://up.internal/x", headers={"traceparent": theirs})
    assert response.request.headers.get_list("traceparent") == [theirs]
    # the attempts carried our spans' context (the current trace's), not the header's
    assert all(h.get_list("traceparent") != [theirs] for h in upstream.headers)


def test_the_sync_transport_leaves_no_trace_context_on_the_request() -> None:
    upstream = Seen(503, 200)
    policy = Policy(upstreams=(UpstreamConfig(retry=RETRY, breaker=None),))
    transport = FidelitySyncTransport(
        httpx.MockTransport(upstream), policy=policy, clock=FakeClock(),
        tracer_provider=_traced(),
    )  # fmt: skip
    with httpx.Client(transport=transport) as client:
        response = client.get("http://up.internal/x")
    assert "traceparent" not in response.request.headers
    assert all("traceparent" in h for h in upstream.headers)


# ---------------------------------------------------------------- answers closed unread


class SlowFirst:
    """An ASGI upstream whose first request waits until the second one (the hedge) was
    answered a failure with a short body; then the first answers 200. Notes client ports."""

    def __init__(self, status: int = 503) -> None:
        self.status = status
        self.ports: list[int] = []
        self.answered: asyncio.Event | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if self.answered is None:
            self.answered = asyncio.Event()
        self.ports.append(scope["client"][1])
        if len(self.ports) == 1:
            await self.answered.wait()
            status, body = 200, b"ok"
        else:
            status, body = self.status, b"x" * 600
        headers = [(b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        if len(self.ports) > 1:
            self.answered.set()


async def _drained() -> None:
    """Wait for the losers' answers being read in tasks of their own."""
    from fidelity_mw.outbound import hedge

    await asyncio.gather(*list(getattr(hedge, "_DRAINING", ())))


async def test_a_failed_hedges_answer_gives_its_connection_back() -> None:
    """rev27o read a failed attempt's short answer before its retry so its connection went
    back to the pool; a failed hedge's answer (a 503 that came in whole) was still closed
    unread: its connection dropped, the next call paid a new one."""
    upstream = SlowFirst()
    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="127.0.0.1", retry=RetryConfig(attempts=1), breaker=None,
                hedge=HedgeConfig(after_ms=1),
            ),
        )
    )  # fmt: skip
    inner = httpx.AsyncHTTPTransport()
    transport = FidelityTransport(inner, policy=policy, clock=FakeClock(), telemetry=False)
    with LoopbackServer(upstream) as server:
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get(server.url + "/")
            assert response.status_code == 200
            assert len(upstream.ports) == 2  # the call's attempt and its hedge
            await _drained()
            pool = inner._pool.connections
            assert len(pool) == 2  # both connections kept, idle
            assert all(c.is_idle() for c in pool)


class FailsThenHedgeWins:
    """The call's attempt answers 503 (a short body) once its hedge has arrived; the hedge
    answers 200 once that 503 was sent. Notes client ports."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.hedged: asyncio.Event | None = None
        self.failed: asyncio.Event | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if self.hedged is None or self.failed is None:
            self.hedged, self.failed = asyncio.Event(), asyncio.Event()
        self.ports.append(scope["client"][1])
        first = len(self.ports) == 1
        if first:
            await self.hedged.wait()
            status, body = 503, b"x" * 600
        else:
            self.hedged.set()
            await self.failed.wait()
            status, body = 200, b"ok"
        headers = [(b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        if first:
            self.failed.set()


async def test_the_calls_answer_given_up_on_when_a_hedge_wins_gives_its_connection_back() -> None:
    upstream = FailsThenHedgeWins()
    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="127.0.0.1", retry=RetryConfig(attempts=1), breaker=None,
                hedge=HedgeConfig(after_ms=1),
            ),
        )
    )  # fmt: skip
    inner = httpx.AsyncHTTPTransport()
    transport = FidelityTransport(inner, policy=policy, clock=FakeClock(), telemetry=False)
    with LoopbackServer(upstream) as server:
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get(server.url + "/")
            assert response.status_code == 200
            assert len(upstream.ports) == 2
            await _drained()
            pool = inner._pool.connections
            assert len(pool) == 2
            assert all(c.is_idle() for c in pool)


class Opened(MemoryStore):
    """A memory store whose breaker another process opens right after each outcome is
    recorded (as on Redis, between an attempt's record and its retry's gate)."""

    opening = True

    def record_now(self, key: str, breaker: Any, gate: Any, outcome: str, *rest: Any) -> str:
        state: str = super().record_now(key, breaker, gate, outcome, *rest)
        if self.opening:
            self.breaker_state(key, breaker).force("open", rest[-1], seeded_random(0))
        return state


@pytest.mark.parametrize("sync", [False, True])
async def test_an_answer_closed_when_the_breaker_refuses_the_retry_gives_its_connection_back(
    sync: bool,
) -> None:
    """The breaker refusing the retry (`CircuitOpen`) closed the failed answer unread: its
    connection was dropped. Read short first, as before a backoff."""
    from test_defects_review27_outbound import Failing

    upstream = Failing(failures=1, size=600)
    store = Opened()
    breaker = BreakerConfig(open_s=30.0)
    policy = Policy(upstreams=(UpstreamConfig(host="127.0.0.1", retry=RETRY, breaker=breaker),))
    clock = FakeClock()
    cls = FidelitySyncTransport if sync else FidelityTransport
    transport = cls(policy=policy, clock=clock, store=store, telemetry=False)
    with LoopbackServer(upstream) as server:
        client: Any = (httpx.Client if sync else httpx.AsyncClient)(transport=transport)
        with pytest.raises(CircuitOpen):
            await _maybe(client.get(server.url + "/"))
        store.opening = False
        store.breaker_state(f"upstream:127.0.0.1:{server.port}", breaker).force(
            "closed", clock.monotonic(), seeded_random(0)
        )
        assert (await _maybe(client.get(server.url + "/"))).status_code == 200
        if sync:
            client.close()
        else:
            await client.aclose()
    assert len(upstream.ports) == 2
    assert len(set(upstream.ports)) == 1  # one connection for both calls


async def _maybe(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


# ---------------------------------------------------------------- retrying POST, per upstream


def _retrying(methods: tuple[str, ...] | None, **more: Any) -> Policy:
    retry = RETRY if methods is None else RetryConfig(
        attempts=3, base_ms=1, max_ms=2, budget_min_per_s=100.0, methods=methods
    )  # fmt: skip
    return Policy(
        upstreams=(UpstreamConfig(host="up.internal", retry=retry, breaker=None, **more),)
    )


@pytest.mark.parametrize("sync", [False, True])
async def test_an_upstream_can_retry_post(sync: bool) -> None:
    """httpx-retries and urllib3 take `allowed_methods`; only an `Idempotency-Key` made a
    POST retried here, for every upstream alike: one whose handler deduplicates (a
    payment id in the body) could not have its POSTs retried at all."""
    for methods, sent in [(None, 1), (("GET", "POST"), 2)]:
        upstream = Seen(503, 200)
        cls = FidelitySyncTransport if sync else FidelityTransport
        transport = cls(
            httpx.MockTransport(upstream), policy=_retrying(methods), clock=FakeClock(),
            telemetry=False,
        )  # fmt: skip
        client: Any = (httpx.Client if sync else httpx.AsyncClient)(transport=transport)
        response = await _maybe(client.post("http://up.internal/charge", json={"id": "p-1"}))
        assert len(upstream.headers) == sent
        assert response.status_code == (503 if sent == 1 else 200)


async def test_a_method_left_out_is_not_retried_but_a_keyed_request_is() -> None:
    for headers, sent in [({}, 1), ({"Idempotency-Key": "k"}, 2)]:
        upstream = Seen(503, 200)
        transport = FidelityTransport(
            httpx.MockTransport(upstream), policy=_retrying(()), clock=FakeClock(),
            telemetry=False,
        )  # fmt: skip
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get("http://up.internal/x", headers=headers)
        assert len(upstream.headers) == sent
        if sent == 1:
            ctx = response.extensions["fidelity_context"]
            assert ctx.decisions[-1].reason == "not_idempotent"


def test_retry_methods_are_validated_and_read_from_toml(tmp_path: Any) -> None:
    with pytest.raises(PolicyError, match="methods"):
        RetryConfig(methods=("FETCH",))
    with pytest.raises(PolicyError, match="methods"):
        RetryConfig(methods="POST")  # type: ignore[arg-type]
    path = tmp_path / "policy.toml"
    path.write_text('[[upstream]]\nhost = "ledger"\nretry = { methods = ["get", "post", "GET"] }\n')
    policy = Policy.from_toml(path)
    assert policy.upstreams[0].retry.methods == ("GET", "POST")


@pytest.mark.parametrize(
    ("methods", "method", "hedged"),
    [
        (("GET", "POST"), "POST", False),  # retried, never hedged: not idempotent
        (("PUT",), "GET", False),  # not retried: not hedged either
        (("PUT",), "PUT", True),
        (None, "GET", True),
    ],
)
async def test_hedging_stays_off_for_what_is_not_idempotent_or_not_retried(
    methods: tuple[str, ...] | None, method: str, hedged: bool
) -> None:
    import anyio
    import anyio.lowlevel

    class Held:
        """Every request waits for `release`, then answers 200."""

        def __init__(self) -> None:
            self.release = anyio.Event()
            self.seen: list[str] = []

        async def __call__(self, request: httpx.Request) -> httpx.Response:
            self.seen.append(request.method)
            await self.release.wait()
            return httpx.Response(200)

    server = Held()
    policy = _retrying(methods, hedge=HedgeConfig(after_ms=50))
    transport = FidelityTransport(
        httpx.MockTransport(server), policy=policy, clock=FakeClock(), telemetry=False
    )

    async def answer_later() -> None:
        for _ in range(50):  # (the hedge delay runs on the fake clock: it passes at once)
            await anyio.lowlevel.checkpoint()
        server.release.set()

    async with httpx.AsyncClient(transport=transport) as client, anyio.create_task_group() as tg:
        tg.start_soon(answer_later)
        response = await client.request(method, "http://up.internal/x")
    assert response.status_code == 200
    assert len(server.seen) == (2 if hedged else 1)


def test_check_warns_of_post_retried_after_it_may_have_acted(tmp_path: Any) -> None:
    from fidelity_mw.tools.check import check_file

    risky = tmp_path / "risky.toml"
    risky.write_text('[[upstream]]\nhost = "ledger"\nretry = { methods = ["GET", "POST"] }\n')
    result = check_file(risky)
    assert not result.errors
    [warning] = [w for w in result.warnings if w.path == "upstream[0].retry.methods"]
    assert "POST" in warning.message
    assert warning.line == 3
    # only failures before anything was sent: nothing to warn of
    safe = tmp_path / "safe.toml"
    safe.write_text(
        '[[upstream]]\nhost = "ledger"\n'
        'retry = { methods = ["GET", "POST"], on_read_timeout = false, on_status = [] }\n'
    )
    assert not [w for w in check_file(safe).warnings if "methods" in w.path]
