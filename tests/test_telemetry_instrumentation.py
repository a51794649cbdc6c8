"""Telemetry next to the OpenTelemetry instrumentations: ASGI, FastAPI and Starlette in
either installation order, and httpx (no doubled CLIENT spans)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.context import DecisionContext
from fidelity_mw.engine import Engine
from fidelity_mw.telemetry import Telemetry, schema
from fidelity_mw.telemetry.summary import entry_layer
from fidelity_mw.testing import FakeClock
from test_telemetry_helpers import (
    SEEN,
    Pipeline,
    RetryingFakeTransport,
    UvicornThread,
    call,
    counter_values,
    decision_events,
    pipeline,
    routes,
    starlette_app,
)

pytestmark = pytest.mark.anyio

POLICY = Policy(rate_limits=(RateLimit(name="one", rate="1/s", burst=1),))
NO_SEND_SPANS: Any = ["send", "receive"]


@pytest.fixture
def otel() -> Any:
    p = pipeline()
    yield p
    p.shutdown()


class SpyTelemetry(Telemetry):
    """Counts `before_response_end` calls: does this middleware build call the hook?"""

    hook_calls = 0

    def before_response_end(self, ctx: DecisionContext, scope: Any, token: Any) -> None:
        self.hook_calls += 1
        super().before_response_end(ctx, scope, token)


def spy(otel: Pipeline) -> SpyTelemetry:
    return SpyTelemetry(tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider)


def fidelity_spans(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if s.attributes and schema.DECISIONS in s.attributes]


def assert_annotated_instrumentation_span(
    spans: list[ReadableSpan], tel: SpyTelemetry, scope_name: str, decided_by: str
) -> None:
    """Instrumentation outside the middleware: its SERVER span carries the decisions and
    no span of ours is added - when the middleware calls `before_response_end` (the
    instrumentation ends its span with the last body message, before `end` runs).
    Without that call the decisions land on one child span instead of being lost."""
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert len(servers) == 1
    server = servers[0]
    assert server.instrumentation_scope is not None
    assert server.instrumentation_scope.name == scope_name
    annotated = fidelity_spans(spans)
    assert len(annotated) == 1
    if tel.hook_calls:
        assert len(spans) == 1
        assert annotated[0] is server
    else:  # a middleware without the hook call: a fallback child span
        assert len(spans) == 2
        assert annotated[0].parent is not None
        assert server.context is not None
        assert annotated[0].parent.span_id == server.context.span_id
    attrs = dict(annotated[0].attributes or {})
    assert attrs.get(schema.DECIDED_BY, "app") == decided_by
    if decided_by == "app":  # a plain request: lean attributes
        assert schema.POLICY_VERSION not in attrs
    else:
        assert attrs[schema.POLICY_VERSION] == POLICY.version
    # every decision in the summary; an event only for those that were not `allow`
    verdicts = [part.split("/")[1] for part in attrs[schema.DECISIONS].split(" ")]
    assert "allow" in verdicts
    events = decision_events(annotated[0])
    assert [e[schema.VERDICT] for e in events] == [v for v in verdicts if v != "allow"]


# ------------------------------------------------------------ the hook, without a middleware


def test_instrumentation_span_annotated_before_it_ends(otel: Pipeline) -> None:
    """What the middleware's calls amount to when an instrumentation span is current."""
    tracer = otel.tracer_provider.get_tracer("opentelemetry.instrumentation.asgi")
    tel = otel.telemetry
    ctx = DecisionContext(engine=Engine(), route="/x", method="GET", started_at=0.0)
    span = tracer.start_span("GET /x", kind=SpanKind.SERVER)
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=False):
        token = tel.start(ctx, {"type": "http", "headers": []})
        ctx.decide("ratelimit", "one", "allow", "under_limit")
        ctx.status = 200
        tel.before_response_end(ctx, {}, token)
        span.end()  # the instrumentation ends its span with the last body message
        ctx.decided_by, ctx.outcome = "app", "served"
        tel.end(ctx, {}, token)
    (only,) = otel.finished()
    attrs = dict(only.attributes or {})
    assert attrs.get(schema.DECIDED_BY, "app") == "app"
    assert attrs.get(schema.OUTCOME, "served") == "served"
    assert "http.response.status_code" not in attrs  # not ours to set on their span
    assert len(decision_events(only)) == 1


def test_late_decisions_added_once_when_span_still_open(otel: Pipeline) -> None:
    tracer = otel.tracer_provider.get_tracer("opentelemetry.instrumentation.asgi")
    tel = otel.telemetry
    ctx = DecisionContext(engine=Engine(), route="/x", method="GET", started_at=0.0)
    span = tracer.start_span("GET /x", kind=SpanKind.SERVER)
    from opentelemetry import trace

    with trace.use_span(span, end_on_exit=False):
        token = tel.start(ctx, {"type": "http", "headers": []})
        ctx.decide("ratelimit", "one", "allow", "under_limit")
        ctx.status = 200
        tel.before_response_end(ctx, {}, token)
        ctx.decide("retry", "up:80", "allow", "attempt")  # a background call, after the body
        ctx.decided_by, ctx.outcome = "app", "served"
        tel.end(ctx, {}, token)
    span.end()
    (only,) = otel.finished()
    assert [e["fidelity.layer"] for e in decision_events(only)] == ["ratelimit", "retry"]
    assert dict(only.attributes or {}).get(schema.DECIDED_BY, "app") == "app"


# ------------------------------------------------------------ ASGI


async def test_asgi_instrumentation_outside(otel: Pipeline) -> None:
    tel = spy(otel)
    app = starlette_app()
    app.add_middleware(FidelityMiddleware, policy=POLICY, clock=FakeClock(), observer=tel)
    outer = OpenTelemetryMiddleware(
        app, tracer_provider=otel.tracer_provider, exclude_spans=NO_SEND_SPANS
    )
    assert (await call(outer, "/items/1")).status_code == 200
    assert_annotated_instrumentation_span(
        otel.finished(), tel, "opentelemetry.instrumentation.asgi", "app"
    )
    otel.spans.clear()
    assert (await call(outer, "/items/1")).status_code == 429
    assert_annotated_instrumentation_span(
        otel.finished(), tel, "opentelemetry.instrumentation.asgi", "ratelimit"
    )


async def test_asgi_instrumentation_inside(otel: Pipeline) -> None:
    """Middleware outside the instrumentation: our SERVER span is the request's; the
    instrumentation's span (INTERNAL, as it finds a span current) nests inside it."""
    tel = otel.telemetry
    inner = OpenTelemetryMiddleware(
        starlette_app(), tracer_provider=otel.tracer_provider, exclude_spans=NO_SEND_SPANS
    )
    app = FidelityMiddleware(inner, policy=POLICY, clock=FakeClock(), observer=tel)
    assert (await call(app, "/items/1")).status_code == 200
    spans = otel.finished()
    ours = [s for s in spans if s.kind is SpanKind.SERVER]
    assert len(ours) == 1
    assert ours[0].instrumentation_scope is not None
    assert ours[0].instrumentation_scope.name == "fidelity_mw"
    assert fidelity_spans(spans) == ours
    theirs = [s for s in spans if s is not ours[0]]
    assert len(theirs) == 1
    assert theirs[0].kind is SpanKind.INTERNAL
    assert theirs[0].parent is not None
    assert ours[0].context is not None
    assert theirs[0].parent.span_id == ours[0].context.span_id
    otel.spans.clear()
    # a rejected request never reaches the instrumentation: our span alone
    assert (await call(app, "/items/1")).status_code == 429
    (span,) = otel.finished()
    assert dict(span.attributes or {}).get(schema.DECIDED_BY, "app") == "ratelimit"


async def test_allowed_requests_are_annotated_from_the_facts_each_with_its_own_values(
    otel: Pipeline,
) -> None:
    """On the allowed path the span and the counters need only the summary: the
    records stay unbuilt (the admission's facts) until somebody reads them, and
    the attributes shared by a shape and outcome are built once, while each request
    still gets its own outcome and client key hash."""
    tel = spy(otel)
    app = starlette_app()
    policy = Policy(rate_limits=(RateLimit(name="many", rate="1000/s", burst=1000),))
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), observer=tel)
    outer = OpenTelemetryMiddleware(
        app, tracer_provider=otel.tracer_provider, exclude_spans=NO_SEND_SPANS
    )
    seen = []
    for i, (path, status) in enumerate((("/ok", 200), ("/fail", 500)) * 2):
        assert (await call(outer, path)).status_code == status
        ctx = SEEN["ctx"]
        # built for the first request of a route only (to summarise them once)
        assert (ctx._pending is not None) == (i >= 2)
        (span,) = otel.finished()
        otel.spans.clear()
        attrs = dict(span.attributes or {})
        seen.append((attrs.get(schema.OUTCOME, "served"), attrs.get(schema.ROUTE)))
        assert attrs.get(schema.DECIDED_BY, "app") == "app"
        assert attrs[schema.CLIENT_KEY_HASH] == tel.hash_client_key("127.0.0.1")
        assert attrs[schema.DECISIONS] == " ".join(
            f"{entry_layer(d.layer, d.subject)}/{d.verdict}/{d.reason}@{d.state_source}"
            for d in ctx.decisions
        )
        assert [d.layer for d in ctx.decisions] == ["deadline", "breaker", "ratelimit"]
    # a served request's route is its counters' (and its span's http.route when the
    # instrumentation sets one), not one more attribute
    assert seen == [("served", None), ("failed", "/fail")] * 2
    requests = counter_values(otel.metrics, "fidelity.requests", schema.OUTCOME, schema.ROUTE)
    assert requests == {("served", "/ok"): 2, ("failed", "/fail"): 2}


# ------------------------------------------------------------ FastAPI and Starlette


def fastapi_app() -> FastAPI:
    app = FastAPI()
    for route in routes():
        app.router.routes.append(route)
    return app


@pytest.mark.parametrize("order", ["instrument_first", "middleware_first"])
async def test_fastapi_instrumentor_either_order(otel: Pipeline, order: str) -> None:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    tel = spy(otel)
    app = fastapi_app()

    def instrument() -> None:
        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=otel.tracer_provider, exclude_spans=NO_SEND_SPANS
        )

    if order == "instrument_first":
        instrument()
    app.add_middleware(FidelityMiddleware, policy=POLICY, clock=FakeClock(), observer=tel)
    if order == "middleware_first":
        instrument()
    try:
        assert (await call(app, "/items/1")).status_code == 200
        # FastAPIInstrumentor always wraps the whole middleware stack: outside
        assert_annotated_instrumentation_span(
            otel.finished(), tel, "opentelemetry.instrumentation.fastapi", "app"
        )
        otel.spans.clear()
        assert (await call(app, "/items/1")).status_code == 429
        assert_annotated_instrumentation_span(
            otel.finished(), tel, "opentelemetry.instrumentation.fastapi", "ratelimit"
        )
    finally:
        FastAPIInstrumentor.uninstrument_app(app)


@pytest.mark.parametrize("order", ["instrument_first", "middleware_first"])
async def test_starlette_instrumentor_either_order(otel: Pipeline, order: str) -> None:
    pytest.importorskip("opentelemetry.instrumentation.starlette")
    from opentelemetry.instrumentation.starlette import StarletteInstrumentor

    tel = spy(otel)
    app = starlette_app()

    def instrument() -> None:
        StarletteInstrumentor.instrument_app(app, tracer_provider=otel.tracer_provider)

    if order == "instrument_first":
        instrument()  # add_middleware puts the later one outside: fidelity outermost
    app.add_middleware(FidelityMiddleware, policy=POLICY, clock=FakeClock(), observer=tel)
    if order == "middleware_first":
        instrument()  # the instrumentation outermost
    try:
        assert (await call(app, "/items/1")).status_code == 200
        spans = otel.finished()
        annotated = fidelity_spans(spans)
        assert len(annotated) == 1
        assert dict(annotated[0].attributes or {}).get(schema.DECIDED_BY, "app") == "app"
        trace_ids = {s.context.trace_id for s in spans if s.context is not None}
        assert len(trace_ids) == 1  # one trace either way
        servers = [s for s in spans if s.kind is SpanKind.SERVER]
        assert len(servers) == 1  # never two SERVER spans for one request
        if order == "middleware_first":
            assert_annotated_instrumentation_span(
                [s for s in spans if "http send" not in s.name and "http receive" not in s.name],
                tel,
                "opentelemetry.instrumentation.starlette",
                "app",
            )
        else:
            assert annotated[0] is servers[0]
            assert servers[0].instrumentation_scope is not None
            assert servers[0].instrumentation_scope.name == "fidelity_mw"
    finally:
        StarletteInstrumentor.uninstrument_app(app)


# ------------------------------------------------------------ httpx


def flaky_upstream() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    calls = {"n": 0}

    async def endpoint(request: Any) -> PlainTextResponse:
        calls["n"] += 1
        return PlainTextResponse(
            "busy" if calls["n"] == 1 else "ok", 503 if calls["n"] == 1 else 200
        )

    return Starlette(routes=[Route("/x", endpoint)])


async def test_global_httpx_instrumentation_is_suppressed_inside_our_attempts(
    otel: Pipeline,
) -> None:
    """HTTPXClientInstrumentor().instrument() patches httpx's own transports, i.e. the
    inner transport of each attempt: ours describe the attempt, theirs are suppressed."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    instrumentor = HTTPXClientInstrumentor()
    instrumentor.instrument(tracer_provider=otel.tracer_provider)
    try:
        with UvicornThread(flaky_upstream()) as server:
            transport = RetryingFakeTransport(httpx.AsyncHTTPTransport(), otel.telemetry)
            async with httpx.AsyncClient(transport=transport) as client:
                response = await client.get(server.url + "/x")
    finally:
        instrumentor.uninstrument()
    assert response.status_code == 200
    spans = otel.finished()
    clients = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert len(clients) == 2  # one per attempt, ours only
    for span in clients:
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == "fidelity_mw"
    assert [dict(s.attributes or {}).get("http.request.resend_count") for s in clients] == [
        None,
        1,
    ]
    assert [dict(s.attributes or {})["http.response.status_code"] for s in clients] == [503, 200]


async def test_client_level_httpx_instrumentation_is_annotated_not_nested(
    otel: Pipeline,
) -> None:
    """instrument_client() wraps the client's transport (ours): its CLIENT span covers
    the whole call; we add resend_count and per-attempt events instead of nesting."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    answers = iter([503, 200])
    inner = httpx.MockTransport(lambda request: httpx.Response(next(answers)))
    transport = RetryingFakeTransport(inner, otel.telemetry)
    client = httpx.AsyncClient(transport=transport)
    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=otel.tracer_provider)
    try:
        response = await client.get("http://upstream:8080/x")
    finally:
        HTTPXClientInstrumentor.uninstrument_client(client)
        await client.aclose()
    assert response.status_code == 200
    (span,) = otel.finished()
    assert span.kind is SpanKind.CLIENT
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "opentelemetry.instrumentation.httpx"
    assert dict(span.attributes or {})["http.request.resend_count"] == 1
    attempts = [dict(e.attributes or {}) for e in span.events if e.name == "fidelity.attempt"]
    assert attempts == [
        {"http.response.status_code": 503, "error.type": "503"},
        {"http.response.status_code": 200},
    ]
    assert [e["fidelity.verdict"] for e in decision_events(span)] == ["allow", "retry"]


# ------------------------------------------------------------ the app's choices are kept

OPEN = Policy()


async def test_fastapi_excluded_url_gets_no_span_of_ours(otel: Pipeline) -> None:
    """Defect 12.20: a request the app's instrumentation excluded got a SERVER span of
    ours (on whatever provider the observer had), and the app's spans hung off it."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    app = fastapi_app()
    app.add_middleware(FidelityMiddleware, policy=OPEN, clock=FakeClock(), observer=spy(otel))
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=otel.tracer_provider, excluded_urls="ok", exclude_spans=NO_SEND_SPANS
    )
    try:
        assert (await call(app, "/ok")).status_code == 200
        assert otel.finished() == []
        # a traced URL is still annotated: the exclusion is per request, not per app
        assert (await call(app, "/items/1")).status_code == 200
        assert len(fidelity_spans(otel.finished())) == 1
    finally:
        FastAPIInstrumentor.uninstrument_app(app)


async def test_starlette_instrumentation_inside_excluded_url_gets_no_span(otel: Pipeline) -> None:
    """The instrumentation inside the middleware (added first): its exclusion list is asked
    before ours would start a span."""
    app = starlette_app()
    app.add_middleware(
        OpenTelemetryMiddleware, tracer_provider=otel.tracer_provider, excluded_urls="ok"
    )
    app.add_middleware(FidelityMiddleware, policy=OPEN, clock=FakeClock(), observer=spy(otel))
    assert (await call(app, "/ok")).status_code == 200
    assert otel.finished() == []
    assert (await call(app, "/items/1")).status_code == 200
    servers = [s for s in otel.finished() if s.kind is SpanKind.SERVER]
    assert len(servers) == 1  # ours, with the instrumentation's INTERNAL span inside


async def test_suppressed_http_instrumentation_gets_no_span_of_ours(otel: Pipeline) -> None:
    from opentelemetry.instrumentation.utils import suppress_http_instrumentation

    app = starlette_app()
    app.add_middleware(FidelityMiddleware, policy=OPEN, clock=FakeClock(), observer=spy(otel))
    with suppress_http_instrumentation():
        assert (await call(app, "/ok")).status_code == 200
    assert otel.finished() == []
