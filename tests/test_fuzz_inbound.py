"""Fuzzing everything a caller controls, through the real FidelityMiddleware.

Raw ASGI calls carry any header bytes (non-latin-1, NUL, duplicates, 1 MB
values), any client address (IPv4, IPv6, junk, none) and odd paths and
methods. The app behind the middleware always answers 200, so:

- the middleware never raises;
- every request gets exactly one response (one start, one final body);
- a 500 would be the middleware's own: there is none; a request the app did
  not see was answered 429, 503 or 504 by a layer, with a problem body;
- the client key is the direct peer unless that peer is a trusted proxy.

Telemetry is on, with a real OpenTelemetry SDK (in-memory exporter), so junk
traceparent / tracestate / baggage go through the propagators too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from _asgi import http_scope
from fidelity_mw import (
    BreakerConfig,
    DeadlineConfig,
    FidelityMiddleware,
    Policy,
    RateLimit,
    RouteConfig,
)
from fidelity_mw.context import context_from_scope
from fidelity_mw.decide.breaker import OPEN
from fidelity_mw.headers import client_key
from fidelity_mw.telemetry import Telemetry
from fidelity_mw.testing import FakeClock, seeded_random

MB = 1024 * 1024
LAYER_STATUSES = {429, 503, 504}
TRUSTED = ("10.0.0.0/8", "::1/128", "2001:db8::/32")
TRUSTED_NETS = tuple(ipaddress.ip_network(c) for c in TRUSTED)


# ---------------------------------------------------------------- the app and the middlewares


class App:
    """Answers 200 to everything, after reading the whole body; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        self.calls += 1
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})


def telemetry() -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    mp = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return Telemetry(tracer_provider=tp, meter_provider=mp, client_key_salt=b"fuzz"), exporter


def policies() -> dict[str, Policy]:
    limits = (
        RateLimit(name="per-ip", rate="5/s", burst=5, match="/api/*"),
        RateLimit(name="per-key", rate="3/s", burst=3, key="header:X-Api-Key", match="/api/*"),
        RateLimit(name="shadow", rate="1/min", burst=1, shadow=True, match="/api/*"),
        RateLimit(name="global", rate="1000/s", key="global"),
    )
    deadline = DeadlineConfig(
        header=("x-request-timeout-ms", "grpc-timeout", "x-envoy-expected-rq-timeout-ms"),
        default_ms=30_000,
    )
    routes = (
        RouteConfig(match="/shed*", name="shed"),
        RouteConfig(match="/nobreaker*", breaker=False, deadline_ms=50),
    )
    breaker = BreakerConfig(min_calls=3, open_s=5)
    return {
        "untrusted": Policy(rate_limits=limits, deadline=deadline, routes=routes, breaker=breaker),
        "trusted": Policy(
            rate_limits=limits,
            deadline=deadline,
            routes=routes,
            breaker=breaker,
            trusted_proxies=TRUSTED,
            trusted_peers=TRUSTED,
        ),
        "one-ip-limit": Policy(rate_limits=(RateLimit(rate="2/s", burst=2),), breaker=None),
    }


class Rig:
    def __init__(self, name: str, policy: Policy) -> None:
        self.name = name
        self.app = App()
        self.clock = FakeClock()
        self.observer, self.spans = telemetry()
        self.mw = FidelityMiddleware(
            self.app,
            policy=policy,
            clock=self.clock,
            rng=seeded_random(7),
            observer=self.observer,
        )
        # one route is shed for good: its breaker is open and the clock never moves far
        plan = self.mw.engine.plan_for({"method": "GET", "path": "/shed", "type": "http"})
        if plan.breaker is not None and plan.breaker_key is not None:
            state = self.mw.engine.store.breaker_state(plan.breaker_key, plan.breaker)  # type: ignore[attr-defined]
            state.force(OPEN, self.clock.monotonic(), seeded_random(1))


@pytest.fixture(scope="module")
def rigs() -> dict[str, Rig]:
    return {name: Rig(name, policy) for name, policy in policies().items()}


def scope_for(
    method: str, path: str, headers: list[tuple[bytes, bytes]], client: Any
) -> dict[str, Any]:
    return http_scope(
        path, method, spec_version="2.3", headers=headers, client=client, server=("127.0.0.1", 8000)
    )


async def drive(rig: Rig, scope: dict[str, Any], body: bytes = b"") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # a real server blocks until the client goes away
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await rig.mw(scope, receive, send)
    return sent


def check_one_response(rig: Rig, sent: list[dict[str, Any]], app_calls_before: int) -> int:
    """Exactly one response; 200 from the app, or a layer's 429/503/504 with a problem body."""
    starts = [m for m in sent if m["type"] == "http.response.start"]
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert len(starts) == 1, sent
    assert sent[0] is starts[0]
    finals = [m for m in bodies if not m.get("more_body", False)]
    assert len(finals) == 1
    assert sent[-1] is finals[0]
    status = starts[0]["status"]
    app_ran = rig.app.calls > app_calls_before
    if app_ran:
        assert status == 200, status
        assert rig.app.calls == app_calls_before + 1
    else:
        assert status in LAYER_STATUSES, status
        headers = dict(starts[0]["headers"])
        assert headers[b"content-type"] == b"application/problem+json"
        problem = json.loads(b"".join(m.get("body", b"") for m in bodies))
        assert problem["status"] == status
    return int(status)


def check_client_key(rig: Rig, scope: dict[str, Any]) -> None:
    ctx = context_from_scope(scope)
    assert ctx is not None
    if ctx.client_key is None:
        return
    client = scope["client"]
    peer = client[0] if client else None
    if rig.name != "trusted" or peer is None:
        # an IPv6 peer counts by its /64 (client_ipv6_prefix), an IPv4-mapped one as IPv4
        assert ctx.client_key == (client_key(peer) if peer is not None else "unknown")
        return
    try:
        peer_ip = ipaddress.ip_address(peer)
    except ValueError:
        assert ctx.client_key == peer  # junk peer: never trusted
        return
    if not any(peer_ip in net for net in TRUSTED_NETS):
        assert ctx.client_key == client_key(peer)  # untrusted peer: forwarding headers ignored
    else:  # an address, or an IPv6 client's /64
        assert ctx.client_key == client_key(peer) or ipaddress.ip_network(ctx.client_key)


# ---------------------------------------------------------------- strategies

DEADLINE_NAMES = [b"x-request-timeout-ms", b"grpc-timeout", b"x-envoy-expected-rq-timeout-ms"]
OTHER_NAMES = [
    b"x-forwarded-for",
    b"forwarded",
    b"x-api-key",
    b"x-fidelity-attempt",
    b"x-fidelity-retry",
    b"baggage",
    b"traceparent",
    b"tracestate",
    b"content-length",
    b"X-Forwarded-For",  # not lowercase: a server bug, still no crash
]

special_values = st.sampled_from(
    [
        b"",
        b" ",
        b"0",
        b"-0",
        b"-1",
        b"1",
        b"0.0001",
        b"nan",
        b"NaN",
        b"inf",
        b"-inf",
        b"1e309",
        b"1e-400",
        b"9" * 70,
        b"0x10",
        b"1_000",
        b"\x00",
        b"5\x00",
        b"\xff\xfe\xfd",
        "\u0661\u0662".encode(),  # Arabic-Indic digits: isdigit() but not ASCII
        "\u0661S".encode(),
        "5\u00a0".encode(),
        b"99999999H",
        b"123456789S",
        b"1n",
        b"0m",
        b"S",
        b"exhausted",
        b"EXHAUSTED",
        b"unknown",
        b"for=unknown",
        b'for="[2001:db8::1]:4711"',
        b"for=_hidden, for=10.1.2.3",
        b'for="_gazonk"',
        b"for=192.0.2.60;proto=http;by=203.0.113.43",
        b"for=[::1]",
        b"for=",
        b";;;,,,==",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"00-00000000000000000000000000000000-0000000000000000-01",
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        b"userId=alice,serverNode=DF%2028,isProduction=false",
        b"fidelity.attempt=3;owner=me",
        b"=,=,=;;",
        b"k=" + b"v" * 9000,
    ]
)
ip_text = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]:{8080}"),
    st.ip_addresses(v=4).map(lambda a: f"{a}:443"),
    st.sampled_from(["unknown", "_hidden", "", " ", "1.2.3", "::ffff:10.0.0.1", "300.1.1.1"]),
)
xff_values = st.lists(ip_text, max_size=6).map(lambda items: ", ".join(items).encode())
forwarded_values = st.lists(
    st.tuples(ip_text, st.sampled_from(["", ";proto=https", ";by=10.0.0.1", '"', ";for=1.1.1.1"])),
    max_size=5,
).map(lambda items: ",".join(f"for={a}{extra}" for a, extra in items).encode())
number_values = st.from_regex(r"-?[0-9]{0,12}(\.[0-9]{0,6})?([eE][+-]?[0-9]{1,4})?", fullmatch=True)
grpc_values = st.from_regex(r"[0-9]{0,10}[HMSmunx]?", fullmatch=True)
header_values = st.one_of(
    special_values,
    st.binary(max_size=80),
    number_values.map(str.encode),
    grpc_values.map(str.encode),
    xff_values,
    forwarded_values,
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
)
header_names = st.one_of(
    st.sampled_from(DEADLINE_NAMES + OTHER_NAMES), st.binary(min_size=1, max_size=12)
)
headers_strategy = st.lists(st.tuples(header_names, header_values), max_size=10)
clients = st.one_of(
    st.none(),
    st.tuples(st.ip_addresses().map(str), st.integers(0, 65535)),
    st.tuples(st.sampled_from(["10.9.8.7", "::1", "2001:db8::7"]), st.just(1234)),  # trusted
    st.tuples(
        st.sampled_from(["", "unix:/run/app.sock", "not-an-ip", "10.0.0.1%eth0"]), st.just(0)
    ),
)
paths = st.one_of(
    st.sampled_from(["/api/items", "/api/", "/shed", "/shed/x", "/nobreaker", "/other", "/"]),
    st.text(min_size=0, max_size=30).map(lambda s: "/" + s),
)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "FOO", ""])


# ---------------------------------------------------------------- properties


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rig_name=st.sampled_from(["untrusted", "trusted", "one-ip-limit"]),
    method=methods,
    path=paths,
    headers=headers_strategy,
    client=clients,
    advance=st.sampled_from([0.0, 0.0, 0.3, 2.0]),
)
def test_any_request_gets_exactly_one_non_500_response(
    rigs: dict[str, Rig],
    rig_name: str,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    client: Any,
    advance: float,
) -> None:
    rig = rigs[rig_name]
    rig.clock.advance(advance)
    scope = scope_for(method, path, headers, client)
    before = rig.app.calls
    sent = asyncio.run(drive(rig, scope))
    event(f"status {check_one_response(rig, sent, before)}")
    check_client_key(rig, scope)


@pytest.mark.parametrize("name", [*DEADLINE_NAMES, *OTHER_NAMES, b"x-api-key", b"cookie"])
@pytest.mark.parametrize("rig_name", ["untrusted", "trusted"])
def test_one_megabyte_header_values(rigs: dict[str, Rig], rig_name: str, name: bytes) -> None:
    rig = rigs[rig_name]
    rig.clock.advance(10.0)  # fresh quota
    for value in (b"1" * MB, b"\xff" * MB, (b"10.1.2.3, " * (MB // 10))):
        scope = scope_for("GET", "/api/big", [(name, value)], ("10.1.1.1", 5000))
        before = rig.app.calls
        sent = asyncio.run(drive(rig, scope))
        assert check_one_response(rig, sent, before) in (200, 429)
        check_client_key(rig, scope)
        ctx = context_from_scope(scope)
        assert ctx is not None
        # a huge value never becomes a huge key (header keys are hashed past 64 chars)
        assert ctx.client_key is None or len(ctx.client_key) <= 64


@pytest.mark.parametrize("rig_name", ["untrusted", "trusted"])
def test_many_duplicate_headers(rigs: dict[str, Rig], rig_name: str) -> None:
    rig = rigs[rig_name]
    rig.clock.advance(10.0)
    headers = []
    for i in range(2_000):
        headers.append((b"x-forwarded-for", f"10.0.{i % 250}.{i % 200}".encode()))
        headers.append((b"x-request-timeout-ms", str(1000 + i).encode()))
        headers.append((b"x-api-key", b"k" * 100))
        headers.append((b"forwarded", b"for=1.2.3.4"))
    scope = scope_for("GET", "/api/dup", headers, ("10.3.3.3", 1))
    before = rig.app.calls
    sent = asyncio.run(drive(rig, scope))
    assert check_one_response(rig, sent, before) == 200
    check_client_key(rig, scope)


def test_a_request_body_passes_through_untouched(rigs: dict[str, Rig]) -> None:
    rig = rigs["untrusted"]
    rig.clock.advance(10.0)
    scope = scope_for("POST", "/api/upload", [(b"content-length", b"1048576")], ("1.1.1.1", 1))
    before = rig.app.calls
    sent = asyncio.run(drive(rig, scope, body=b"\x00" * MB))
    assert check_one_response(rig, sent, before) == 200


@pytest.mark.parametrize(
    ("header", "value", "status"),
    [
        (b"x-request-timeout-ms", b"0", 504),
        (b"x-request-timeout-ms", b"-0", 200),  # a sign is not in the grammar: malformed
        (b"grpc-timeout", b"0n", 504),
        (b"x-request-timeout-ms", b"-5", 200),  # negative: malformed, ignored
        (b"x-request-timeout-ms", b"nan", 200),
        (b"x-request-timeout-ms", b"1e309", 200),  # inf: malformed
        (b"grpc-timeout", "\u0661S".encode(), 200),  # non-ASCII digit
        (b"grpc-timeout", b"123456789S", 200),  # 9 digits: too long for grpc-timeout
        (b"x-envoy-expected-rq-timeout-ms", b"\xff", 200),
    ],
)
def test_deadline_header_edge_values(
    rigs: dict[str, Rig], header: bytes, value: bytes, status: int
) -> None:
    rig = rigs["untrusted"]
    rig.clock.advance(10.0)
    scope = scope_for("GET", "/other", [(header, value)], ("1.1.1.2", 1))
    before = rig.app.calls
    sent = asyncio.run(drive(rig, scope))
    assert check_one_response(rig, sent, before) == status


def test_through_httpx_asgi_transport(rigs: dict[str, Rig]) -> None:
    """The same middleware behind httpx: the client side of the junk we can encode."""
    rig = rigs["trusted"]

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=rig.mw, client=("10.0.0.5", 4000))
        statuses = []
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for value in [
                b"0",
                b"junk",
                b"1" * 5000,
                "ñ".encode("latin-1"),
                b"\xff\x80",
                b"for=_x",
            ]:
                rig.clock.advance(10.0)
                r = await client.get(
                    "/api/httpx",
                    headers=[
                        ("x-request-timeout-ms", value),
                        ("grpc-timeout", value),
                        ("x-forwarded-for", value),
                        ("forwarded", value),
                        ("traceparent", value),
                        ("baggage", value),
                        ("x-fidelity-attempt", value),
                    ],
                )
                statuses.append(r.status_code)
        return statuses

    statuses = asyncio.run(run())
    assert statuses[0] == 504  # 0 ms left
    assert set(statuses[1:]) <= {200}


def test_spans_were_exported_for_fuzzed_requests(rigs: dict[str, Rig]) -> None:
    """The telemetry path really ran (and, with it, the propagators on junk headers)."""
    rig = rigs["trusted"]
    rig.clock.advance(10.0)
    scope = scope_for(
        "GET",
        "/api/t",
        [(b"traceparent", b"00-zz-zz-zz"), (b"baggage", b"\xff=\xff")],
        ("10.0.0.9", 1),
    )
    before = rig.app.calls
    sent = asyncio.run(drive(rig, scope))
    assert check_one_response(rig, sent, before) == 200
    assert rig.spans.get_finished_spans()
