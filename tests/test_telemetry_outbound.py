"""The attempt observer: one CLIENT span per attempt (HTTP semantic conventions), trace
context injected per attempt; unit-level with hand-made httpx requests and responses,
then through FidelityTransport."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.trace import NoOpTracerProvider, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.context import DecisionContext
from fidelity_mw.engine import Engine
from fidelity_mw.telemetry import Telemetry, schema
from fidelity_mw.testing import FakeClock, seeded_random
from test_telemetry_helpers import (
    Pipeline,
    call,
    decision_events,
    metric_points,
    pipeline,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def otel() -> Any:
    p = pipeline()
    yield p
    p.shutdown()


def ctx() -> DecisionContext:
    return DecisionContext(engine=Engine(), route="/orders", method="GET", started_at=0.0)


def parent_of(request: httpx.Request) -> str:
    """The span id the injected traceparent names."""
    return request.headers["traceparent"].split("-")[2]


def test_one_client_span_per_attempt_with_semconv(otel: Pipeline) -> None:
    tel = otel.telemetry
    c = ctx()
    request = httpx.Request("GET", "https://user:pw@pay.example:8443/charges?id=7&sig=abc#top")
    c.decide("retry", "pay.example:8443", "allow", "attempt")
    first = tel.attempt_start(c, request, 1)
    first_parent = parent_of(request)
    tel.attempt_end(first, httpx.Response(503, request=request), None)
    c.decide("retry", "pay.example:8443", "retry", "status_503", details={"delay_ms": 12.5})
    second = tel.attempt_start(c, request, 2)
    second_parent = parent_of(request)
    tel.attempt_end(second, httpx.Response(200, request=request), None)

    spans = otel.finished()
    assert [s.kind for s in spans] == [SpanKind.CLIENT, SpanKind.CLIENT]
    assert [s.name for s in spans] == ["GET", "GET"]
    one, two = (dict(s.attributes or {}) for s in spans)
    assert one == {
        "http.request.method": "GET",
        "url.full": "https://pay.example:8443/charges?id=7&sig=REDACTED",
        "server.address": "pay.example",
        "server.port": 8443,
        "http.response.status_code": 503,
        "network.protocol.version": "1.1",
        "error.type": "503",
        "fidelity.decisions": "retry/allow/attempt@memory",
    }
    assert spans[0].status.status_code is StatusCode.ERROR
    assert two["http.request.resend_count"] == 1
    assert two["http.response.status_code"] == 200
    assert "error.type" not in two
    assert spans[1].status.status_code is StatusCode.UNSET
    # context injected per attempt: each attempt names its own span
    assert [format(s.context.span_id, "016x") for s in spans if s.context] == [
        first_parent,
        second_parent,
    ]
    # each attempt carries the decisions that led to it
    assert [e["fidelity.verdict"] for e in decision_events(spans[0])] == ["allow"]
    (retry,) = decision_events(spans[1])
    assert retry["fidelity.reason"] == "status_503"
    assert retry["fidelity.detail.delay_ms"] == 12.5


def test_attempt_events_are_the_decisions_since_the_previous_attempt(otel: Pipeline) -> None:
    c = ctx()
    request = httpx.Request("GET", "http://up:8080/x")
    c.decide("ratelimit", "per-client", "allow", "under_limit")  # inbound, another subject
    c.decide("retry", "up:8080", "allow", "attempt")
    otel.telemetry.attempt_end(otel.telemetry.attempt_start(c, request, 1), None, OSError())
    c.decide("breaker", "up:8080", "probe", "half_open_probe")
    c.decide("retry", "up:8080", "retry", "connect_error")
    otel.telemetry.attempt_end(
        otel.telemetry.attempt_start(c, request, 2), httpx.Response(200), None
    )
    first, second = otel.finished()
    assert [e["fidelity.reason"] for e in decision_events(first)] == ["attempt"]
    assert [e["fidelity.reason"] for e in decision_events(second)] == [
        "half_open_probe",
        "connect_error",
    ]


def test_transport_error_and_default_port(otel: Pipeline) -> None:
    request = httpx.Request("POST", "https://api.example/v1")
    token = otel.telemetry.attempt_start(ctx(), request, 1)
    otel.telemetry.attempt_end(token, None, httpx.ConnectError("refused"))
    (span,) = otel.finished()
    attrs = dict(span.attributes or {})
    assert attrs["server.port"] == 443
    assert attrs["error.type"] == "ConnectError"
    assert "http.response.status_code" not in attrs
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ConnectError"


def test_attempt_span_is_current_during_the_attempt_only(otel: Pipeline) -> None:
    request = httpx.Request("GET", "http://up/x")
    outside = trace.get_current_span()
    token = otel.telemetry.attempt_start(ctx(), request, 1)
    inside = trace.get_current_span()
    assert inside.get_span_context().span_id == int(parent_of(request), 16)
    # opentelemetry-instrumentation-httpx is not instrumenting: nothing suppressed
    assert not otel_context.get_value("suppress_http_instrumentation")
    otel.telemetry.attempt_end(token, httpx.Response(204), None)
    assert trace.get_current_span() is outside


def test_baggage_and_parent_are_propagated(otel: Pipeline) -> None:
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("server") as server:
        token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            request = httpx.Request("GET", "http://up/x")
            attempt = otel.telemetry.attempt_start(ctx(), request, 1)
            otel.telemetry.attempt_end(attempt, httpx.Response(200), None)
        finally:
            otel_context.detach(token)
    assert request.headers["baggage"] == "tenant=acme"
    client = next(s for s in otel.finished() if s.kind is SpanKind.CLIENT)
    assert client.parent is not None
    assert client.parent.span_id == server.get_span_context().span_id


def test_client_spans_off_still_injects_the_current_context() -> None:
    p = pipeline(client_spans=False)
    tracer = p.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("server") as server:
        request = httpx.Request("GET", "http://up/x")
        assert p.telemetry.attempt_start(ctx(), request, 1) is None
    assert int(parent_of(request), 16) == server.get_span_context().span_id
    assert [s.name for s in p.finished()] == ["server"]
    p.shutdown()


def test_no_tracing_passes_a_propagated_context_through() -> None:
    tel = Telemetry(tracer_provider=NoOpTracerProvider())
    incoming = TraceContextTextMapPropagator().extract(
        {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    )
    token = otel_context.attach(incoming)
    try:
        request = httpx.Request("GET", "http://up/x")
        assert tel.attempt_start(ctx(), request, 1) is None
    finally:
        otel_context.detach(token)
    assert request.headers["traceparent"].split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_client_duration_metric(otel: Pipeline) -> None:
    request = httpx.Request("GET", "http://up:8080/x")
    token = otel.telemetry.attempt_start(ctx(), request, 1)
    otel.telemetry.attempt_end(token, httpx.Response(502), None)
    ((attrs, point),) = metric_points(otel.metrics, "http.client.request.duration")
    assert attrs == {
        "http.request.method": "GET",
        "server.address": "up",
        "server.port": 8080,
        "http.response.status_code": 502,
        "error.type": "502",
    }
    assert point.count == 1


# ------------------------------------------------------------ through FidelityTransport


def transport_module() -> Any:
    return pytest.importorskip("fidelity_mw.outbound.transport")


async def test_fidelity_transport_retries_make_one_span_per_attempt(otel: Pipeline) -> None:
    FidelityTransport = transport_module().FidelityTransport
    seen: list[str] = []  # the traceparent each attempt carried (one request object, reused)
    answers = iter([503, 503, 200])

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["traceparent"])
        return httpx.Response(next(answers), headers={"retry-after": "0"})

    transport = FidelityTransport(
        httpx.MockTransport(upstream),
        clock=FakeClock(),
        rng=seeded_random(1),
        observer=otel.telemetry,
    )
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("http://inventory:8080/stock")
    assert response.status_code == 200
    spans = otel.finished()
    assert [s.kind for s in spans] == [SpanKind.CLIENT] * 3
    attrs = [dict(s.attributes or {}) for s in spans]
    assert [a.get("http.request.resend_count") for a in attrs] == [None, 1, 2]
    assert [a["http.response.status_code"] for a in attrs] == [503, 503, 200]
    assert {a["url.full"] for a in attrs} == {"http://inventory:8080/stock"}
    # a fresh traceparent per attempt, naming that attempt's span
    parents = [traceparent.split("-")[2] for traceparent in seen]
    assert parents == [format(s.context.span_id, "016x") for s in spans if s.context]
    assert len(set(parents)) == 3
    # the decisions behind each attempt ride on its span
    verdicts = [[e["fidelity.verdict"] for e in decision_events(s)] for s in spans]
    assert [v[-1] for v in verdicts] == ["allow", "retry", "retry"]


async def test_fidelity_transport_inside_a_request_lands_under_the_server_span(
    otel: Pipeline,
) -> None:
    FidelityTransport = transport_module().FidelityTransport
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    # no observer given to the transport: inside the request it reports to the
    # middleware's Telemetry (the engine's attempt observer)
    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(lambda r: httpx.Response(200)))
    )

    async def handler(request: Any) -> PlainTextResponse:
        response = await client.get("http://inventory/stock")
        return PlainTextResponse(str(response.status_code))

    app = Starlette(routes=[Route("/orders", handler)])
    app.add_middleware(
        FidelityMiddleware, policy=Policy(), clock=FakeClock(), observer=otel.telemetry
    )
    assert (await call(app, "/orders")).text == "200"
    await client.aclose()
    spans = otel.finished()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    (attempt,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert attempt.parent is not None
    assert server.context is not None
    assert attempt.parent.span_id == server.context.span_id
    # the outbound decisions are also the request's: on the server span too
    layers = [(e["fidelity.layer"], e["fidelity.subject"]) for e in decision_events(server)]
    assert ("retry", "inventory") in layers
    assert dict(server.attributes or {}).get(schema.DECIDED_BY, "app") == "app"


async def test_sync_transport_in_a_sync_fastapi_route(otel: Pipeline) -> None:
    """Sync routes run in a worker thread; the request's context (and our server span)
    reach it, and each attempt of the sync transport is a CLIENT span under it."""
    FidelitySyncTransport = transport_module().FidelitySyncTransport
    from fastapi import FastAPI

    answers = iter([502, 200])
    client = httpx.Client(
        transport=FidelitySyncTransport(
            httpx.MockTransport(lambda r: httpx.Response(next(answers))),
            clock=FakeClock(),
            rng=seeded_random(3),
        )
    )
    app = FastAPI()

    @app.get("/sync")
    def sync_route() -> dict[str, int]:
        return {"status": client.get("http://ledger:9000/balance").status_code}

    app.add_middleware(
        FidelityMiddleware, policy=Policy(), clock=FakeClock(), observer=otel.telemetry
    )
    assert (await call(app, "/sync")).json() == {"status": 200}  # (a mock: nothing to close)
    spans = otel.finished()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    attempts = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert [dict(s.attributes or {}).get("http.request.resend_count") for s in attempts] == [
        None,
        1,
    ]
    assert server.context is not None
    for span in attempts:
        assert span.parent is not None
        assert span.parent.span_id == server.context.span_id


async def test_calls_outside_a_request_reach_the_decision_metrics() -> None:
    """The transport tells the observer when a call it owns the context of is over."""
    import httpx

    from fidelity_mw import FidelityTransport
    from fidelity_mw.telemetry import schema
    from fidelity_mw.testing import FakeClock
    from test_telemetry_helpers import counter_values, pipeline

    p = pipeline()
    answers = iter([503, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers))

    transport = FidelityTransport(
        httpx.MockTransport(handler), clock=FakeClock(), observer=p.telemetry
    )
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get("http://api.internal/x")).status_code == 200
    decisions = counter_values(p.metrics, "fidelity.decisions", schema.LAYER, schema.VERDICT)
    assert decisions.get(("retry", "retry")) == 1
    p.shutdown()


def test_client_duration_hosts_are_bounded(otel: Pipeline) -> None:
    """ops8 walkthrough: every distinct upstream host was a new series set of the
    histogram (the SDK bounds nothing), so a service calling URLs its clients supply
    (webhooks) grew its /metrics without end. Past MAX_CLIENT_HOSTS: `_OTHER`."""
    from fidelity_mw.telemetry.metrics import MAX_CLIENT_HOSTS

    for n in range(MAX_CLIENT_HOSTS + 50):
        request = httpx.Request("GET", f"http://hook-{n}.example:8080/x")
        token = otel.telemetry.attempt_start(ctx(), request, 1)
        otel.telemetry.attempt_end(token, httpx.Response(200), None)
    points = metric_points(otel.metrics, "http.client.request.duration")
    hosts = {attrs["server.address"] for attrs, _ in points}
    assert len(hosts) == MAX_CLIENT_HOSTS + 1
    [other] = [(attrs, p) for attrs, p in points if attrs["server.address"] == "_OTHER"]
    assert "server.port" not in other[0]
    assert other[1].count == 50
    assert sum(p.count for _, p in points) == MAX_CLIENT_HOSTS + 50  # every attempt counted
