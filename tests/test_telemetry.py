"""Telemetry with the SDK's in-memory exporter: every span attribute, every event field,
every metric; privacy; trace context extraction; the no-SDK path."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import NoOpTracerProvider, SpanKind, StatusCode

from fidelity_mw import BreakerConfig, FidelityMiddleware, Policy, RateLimit
from fidelity_mw.context import Decision, DecisionContext
from fidelity_mw.engine import Engine
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.telemetry import Telemetry, schema
from fidelity_mw.testing import FakeClock
from test_telemetry_helpers import (
    SEEN,
    Pipeline,
    call,
    counter_values,
    decision_events,
    metric_points,
    pipeline,
    span_strings,
    starlette_app,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def otel() -> Any:
    p = pipeline()
    yield p
    p.shutdown()


def policy(**kw: Any) -> Policy:
    kw.setdefault("rate_limits", (RateLimit(name="per-client", rate="2/s", burst=2),))
    kw.setdefault("breaker", BreakerConfig(consecutive_failures=2, open_s=5.0))
    return Policy(**kw)


def app_with(otel: Pipeline, pol: Policy | None = None, **kw: Any) -> Any:
    app = starlette_app()
    app.add_middleware(
        FidelityMiddleware,
        policy=pol or policy(),
        clock=kw.pop("clock", None) or FakeClock(),
        observer=otel.telemetry,
        **kw,
    )
    return app


def only_span(otel: Pipeline) -> Any:
    spans = otel.finished()
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


# ------------------------------------------------------------ our own SERVER span


async def test_served_request_gets_one_server_span_with_every_attribute(otel: Pipeline) -> None:
    """A plain request (every decision `allow`, served by the app): its decisions and its
    client key hash; `decided_by` / `outcome` absent mean `app` / `served`, and the route and
    policy version are left out (`request_attributes="lean"`, the default)."""
    pol = policy()
    response = await call(app_with(otel, pol), "/items/7")
    assert response.status_code == 200
    span = only_span(otel)
    assert span.kind is SpanKind.SERVER
    assert span.name == "GET /items/{id}"
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "fidelity_mw"
    attrs = dict(span.attributes or {})
    assert attrs == {
        "http.request.method": "GET",
        "http.route": "/items/{id}",
        "url.path": "/items/7",
        "url.scheme": "http",
        "network.protocol.version": "1.1",
        "http.response.status_code": 200,
        schema.CLIENT_KEY_HASH: otel.telemetry.hash_client_key("127.0.0.1"),
        schema.DECISIONS: "deadline/allow/route_default@request "
        "breaker/allow/breaker_closed@memory ratelimit:per-client/allow/under_limit@memory",
    }
    assert span.status.status_code is StatusCode.UNSET
    # no decision was stale: `fidelity.stale_decisions` is absent rather than 0
    assert schema.STALE_DECISIONS not in attrs


async def test_one_event_per_decision_with_all_fields(otel: Pipeline) -> None:
    await call(app_with(otel), "/items/1")
    span = only_span(otel)
    ctx: DecisionContext = SEEN["ctx"]
    events = decision_events(span)
    assert len(events) == len(ctx.decisions) >= 2
    assert all(e.name == "fidelity.decision" for e in span.events)
    for event, d in zip(events, ctx.decisions, strict=True):
        expected = {
            "fidelity.layer": d.layer,
            "fidelity.verdict": d.verdict,
            "fidelity.reason": d.reason,
            "fidelity.subject": d.subject,
            "fidelity.state.source": d.state_source,
            "fidelity.state.age_ms": round(d.state_age_s * 1000.0, 3),
        }
        if d.is_stale:
            expected["fidelity.state.stale"] = True
        expected.update({f"fidelity.detail.{k}": v for k, v in (d.details or {}).items()})
        assert event == expected
    layers = [e["fidelity.layer"] for e in events]
    assert "breaker" in layers
    assert "ratelimit" in layers
    # events are time-stamped inside the span: the decisions' monotonic times put on
    # the wall clock by an offset read once (two clock reads a preempted thread may
    # take far apart on a busy machine: the slack is for that, not for the middleware)
    assert span.start_time is not None
    assert span.end_time is not None
    slack_ns = 1_000_000_000
    for e in span.events:
        assert span.start_time - slack_ns <= e.timestamp <= span.end_time + slack_ns


async def test_rate_limited_request(otel: Pipeline) -> None:
    app = app_with(otel, policy(rate_limits=(RateLimit(name="tight", rate="1/s", burst=1),)))
    assert (await call(app, "/ok")).status_code == 200
    assert (await call(app, "/ok")).status_code == 429
    span = otel.finished()[-1]
    attrs = dict(span.attributes or {})
    assert attrs.get(schema.DECIDED_BY, "app") == "ratelimit"
    assert attrs.get(schema.OUTCOME, "served") == "rejected"
    assert attrs["http.response.status_code"] == 429
    assert span.status.status_code is StatusCode.UNSET  # a 4xx is not a server error
    reject = [e for e in decision_events(span) if e["fidelity.verdict"] == "reject"]
    assert len(reject) == 1
    assert reject[0]["fidelity.layer"] == "ratelimit"
    assert reject[0]["fidelity.subject"] == "tight"
    assert reject[0]["fidelity.reason"] == "over_limit"
    assert reject[0]["fidelity.detail.retry_after_s"] > 0


async def test_breaker_shed_request(otel: Pipeline) -> None:
    app = app_with(otel)
    for _ in range(2):
        assert (await call(app, "/fail")).status_code == 500
    response = await call(app, "/fail")
    assert response.status_code == 503
    failed, shed = otel.finished()[1], otel.finished()[2]
    assert dict(failed.attributes or {}).get(schema.OUTCOME, "served") == "failed"
    assert dict(failed.attributes or {})["error.type"] == "500"
    assert failed.status.status_code is StatusCode.ERROR
    attrs = dict(shed.attributes or {})
    assert attrs.get(schema.DECIDED_BY, "app") == "breaker"
    assert attrs.get(schema.OUTCOME, "served") == "shed"
    assert attrs["http.response.status_code"] == 503
    assert shed.status.status_code is StatusCode.ERROR
    events = decision_events(shed)
    assert "ratelimit" not in {e["fidelity.layer"] for e in events}  # never reached the limiter
    (event,) = [e for e in events if e["fidelity.layer"] == "breaker"]
    assert event["fidelity.layer"] == "breaker"
    assert event["fidelity.verdict"] == "shed"
    assert event["fidelity.reason"] == "breaker_open"
    assert event["fidelity.detail.retry_after_s"] > 0


async def test_expired_deadline(otel: Pipeline) -> None:
    response = await call(app_with(otel), "/ok", headers={"x-request-timeout-ms": "0"})
    assert response.status_code == 504
    attrs = dict(only_span(otel).attributes or {})
    assert attrs.get(schema.DECIDED_BY, "app") == "deadline"
    assert attrs.get(schema.OUTCOME, "served") == "expired"
    assert attrs["http.response.status_code"] == 504


async def test_app_exception(otel: Pipeline) -> None:
    response = await call(app_with(otel), "/boom")
    assert response.status_code == 500
    spans = otel.finished()
    span = spans[-1]
    attrs = dict(span.attributes or {})
    assert attrs.get(schema.DECIDED_BY, "app") == "app"
    assert attrs.get(schema.OUTCOME, "served") == "failed"
    assert span.status.status_code is StatusCode.ERROR


class StaleStore(MemoryStore):
    """Memory state reported as a 2.5 s old cached copy (what a tiered store answers)."""

    def admit_now(self, *args: Any, **kw: Any) -> Any:
        return super().admit_now(*args, **kw)._replace(source="cache", age_s=2.5)


class BrokenStore(MemoryStore):
    def admit_now(self, *args: Any, **kw: Any) -> Any:
        raise ConnectionError("redis is down")


async def test_staleness_fields(otel: Pipeline) -> None:
    await call(app_with(otel, store=StaleStore()), "/ok")
    span = only_span(otel)
    attrs = dict(span.attributes or {})
    stored = [e for e in decision_events(span) if e["fidelity.state.source"] == "cache"]
    assert len(stored) == 2  # breaker + limit
    assert attrs[schema.STALE_DECISIONS] == 2
    for event in stored:
        assert event["fidelity.state.age_ms"] == 2500.0
        assert event["fidelity.state.stale"] is True
    fresh = [e for e in decision_events(span) if e["fidelity.state.source"] != "cache"]
    assert all("fidelity.state.stale" not in e for e in fresh)
    ((attrs_, point),) = [
        (a, p)
        for a, p in metric_points(otel.metrics, "fidelity.state.age")
        if a[schema.LAYER] == "ratelimit"
    ]
    assert attrs_ == {schema.LAYER: "ratelimit", schema.STATE_SOURCE: "cache"}
    assert point.count == 1
    assert point.sum == 2.5


async def test_state_failure_decides_on_fallback(otel: Pipeline) -> None:
    response = await call(app_with(otel, store=BrokenStore()), "/ok")
    assert response.status_code == 200
    span = only_span(otel)
    fallback = [e for e in decision_events(span) if e["fidelity.state.source"] == "fallback"]
    assert len(fallback) == 1
    assert fallback[0]["fidelity.reason"] == "state_error:ConnectionError"
    assert fallback[0]["fidelity.state.stale"] is True
    assert dict(span.attributes or {})[schema.STALE_DECISIONS] == 1


# ------------------------------------------------------------ privacy


async def test_client_keys_hashed_and_no_header_values_or_bodies(otel: Pipeline) -> None:
    pol = policy(
        rate_limits=(
            RateLimit(name="by-key", rate="10/s", key="header:x-api-key"),
            RateLimit(name="by-ip", rate="10/s"),
        )
    )
    secret_headers = {
        "x-api-key": "key-SECRET-123",
        "authorization": "Bearer TOKEN-SECRET",
        "cookie": "session=COOKIE-SECRET",
        "user-agent": "AGENT-SECRET",
    }
    await call(
        app_with(otel, pol), "/items/1?q=QUERY-SECRET", "POST", secret_headers, content="BODY"
    )
    text = span_strings(otel.finished())
    for secret in ("SECRET", "BODY", "127.0.0.1"):
        assert secret not in text
    attrs = dict(only_span(otel).attributes or {})
    key_hash = attrs[schema.CLIENT_KEY_HASH]
    assert len(key_hash) == 16
    assert int(key_hash, 16) >= 0


def test_client_key_hash_is_keyed() -> None:
    a = Telemetry(client_key_salt="one", tracer_provider=NoOpTracerProvider())
    b = Telemetry(client_key_salt="two", tracer_provider=NoOpTracerProvider())
    assert a.hash_client_key("10.0.0.1") == a.hash_client_key("10.0.0.1")
    assert a.hash_client_key("10.0.0.1") != a.hash_client_key("10.0.0.2")
    assert a.hash_client_key("10.0.0.1") != b.hash_client_key("10.0.0.1")


# ------------------------------------------------------------ trace context


async def test_incoming_trace_context_and_baggage_are_continued(otel: Pipeline) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_id = "00f067aa0ba902b7"
    headers = {
        "traceparent": f"00-{trace_id}-{parent_id}-01",
        "baggage": "tenant=acme,plan=gold",
    }
    response = await call(app_with(otel), "/items/2", headers=headers)
    assert response.json()["baggage"] == {"tenant": "acme", "plan": "gold"}
    span = only_span(otel)
    assert span.context is not None
    assert format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == parent_id
    assert span.parent.is_remote


async def test_unsampled_parent_adds_nothing(otel: Pipeline) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    off = TracerProvider(sampler=ALWAYS_OFF)
    tracer = off.get_tracer("test")
    with tracer.start_as_current_span("unsampled"):
        token = otel.telemetry.start(_ctx(), {"type": "http", "headers": []})
    assert token is None


def _ctx(route: str = "/x") -> DecisionContext:
    return DecisionContext(engine=Engine(), route=route, method="GET", started_at=0.0)


async def test_unknown_method_and_unmatched_route(otel: Pipeline) -> None:
    ctx = DecisionContext(engine=Engine(), route="!unmatched", method="BREW", started_at=0.0)
    token = otel.telemetry.start(ctx, {"type": "http", "headers": [], "path": "/pot"})
    ctx.decided_by, ctx.outcome, ctx.status = "app", "served", 418
    otel.telemetry.end(ctx, {}, token)
    span = only_span(otel)
    assert span.name == "HTTP"
    attrs = dict(span.attributes or {})
    assert attrs["http.request.method"] == "_OTHER"
    assert attrs["http.request.method_original"] == "BREW"
    assert "http.route" not in attrs


# ------------------------------------------------------------ metrics


async def test_metrics(otel: Pipeline) -> None:
    app = app_with(otel, policy(rate_limits=(RateLimit(name="roomy", rate="100/s"),)))
    assert (await call(app, "/ok")).status_code == 200
    for _ in range(2):
        assert (await call(app, "/fail")).status_code == 500  # trips the breaker (2 in a row)
    assert (await call(app, "/fail")).status_code == 503  # shed: the route breaker is open
    reader = otel.metrics

    requests = counter_values(reader, "fidelity.requests", schema.OUTCOME, schema.DECIDED_BY)
    assert requests == {("served", "app"): 1, ("failed", "app"): 2, ("shed", "breaker"): 1}
    failures = counter_values(reader, "fidelity.failures", schema.FAILURE_CAUSE, schema.DECIDED_BY)
    assert failures == {("app", "app"): 2, ("control", "breaker"): 1}

    decisions = counter_values(
        reader, "fidelity.decisions", schema.LAYER, schema.VERDICT, schema.STATE_SOURCE
    )
    assert decisions[("breaker", "allow", "memory")] == 3
    assert decisions[("breaker", "shed", "memory")] == 1
    assert decisions[("ratelimit", "allow", "memory")] == 3

    # memory state is always fresh: no state-age samples (see test_staleness_fields)
    assert metric_points(reader, "fidelity.state.age") == []

    breaker = {
        a[schema.BREAKER_STATE]: p.value
        for a, p in metric_points(reader, "fidelity.breaker.state")
        if a[schema.SUBJECT] == "/ok" and a.get(schema.BREAKER_SCOPE) == "route"
    }
    assert breaker == {"closed": 1, "open": 0, "half_open": 0}
    fail_breaker = {
        a[schema.BREAKER_STATE]: p.value
        for a, p in metric_points(reader, "fidelity.breaker.state")
        if a[schema.SUBJECT] == "/fail"
    }
    assert fail_breaker == {"closed": 0, "open": 1, "half_open": 0}


def test_breaker_gauge_from_decisions_when_the_store_cannot_be_read() -> None:
    p = pipeline()
    ctx = _ctx()
    ctx.engine.store = object()  # type: ignore[assignment]
    ctx.add(Decision("breaker", "payments:443", "give_up", "breaker_open", "redis", 0.2, 1.0))
    p.telemetry.call_end(ctx)
    states = {
        a[schema.BREAKER_STATE]: pt.value
        for a, pt in metric_points(p.metrics, "fidelity.breaker.state")
        if a[schema.SUBJECT] == "payments:443"
    }
    assert states == {"closed": 0, "open": 1, "half_open": 0}
    p.shutdown()


def test_breaker_gauge_does_not_keep_a_dropped_observer_alive() -> None:
    """The gauge's callback lives as long as the meter provider; it must not keep the
    observer (and the engines and states it watches) alive after the app dropped it."""
    p = pipeline()
    ctx = _ctx()
    ctx.engine.store = object()  # type: ignore[assignment]
    ctx.add(Decision("breaker", "payments:443", "give_up", "breaker_open", "redis", 0.2, 1.0))
    p.telemetry.call_end(ctx)
    watched = weakref.ref(p.telemetry._breakers)
    p.telemetry = None  # type: ignore[assignment]
    gc.collect()
    assert watched() is None
    # collecting afterwards finds no breaker to report, and does not fail
    assert not [a for a, _pt in metric_points(p.metrics, "fidelity.breaker.state")]
    p.shutdown()


def test_retry_budget_metric_and_standalone_calls() -> None:
    p = pipeline()
    ctx = _ctx("outbound")
    ctx.add(Decision("retry", "api:8080", "allow", "attempt", "memory", 0.0, 1.0))
    ctx.add(Decision("retry", "api:8080", "retry", "status_503", "memory", 0.0, 1.0))
    ctx.add(Decision("budget", "api:8080", "give_up", "budget", "memory", 0.0, 1.0))
    p.telemetry.call_end(ctx)
    budget = counter_values(
        p.metrics, "fidelity.retry_budget.usage", schema.SUBJECT, schema.BUDGET_RESULT
    )
    assert budget == {("api:8080", "drawn"): 1, ("api:8080", "exhausted"): 1}
    decisions = counter_values(p.metrics, "fidelity.decisions", schema.LAYER, schema.VERDICT)
    assert decisions == {("retry", "allow"): 1, ("retry", "retry"): 1, ("budget", "give_up"): 1}
    p.shutdown()


# ------------------------------------------------------------ without an SDK


def test_explicit_noop_provider_records_nothing() -> None:
    tel = Telemetry(tracer_provider=NoOpTracerProvider())
    assert tel.start(_ctx(), {"type": "http", "headers": []}) is None


_NO_SDK = textwrap.dedent(
    """
    import httpx
    from opentelemetry import trace
    from fidelity_mw.context import Decision, DecisionContext
    from fidelity_mw.engine import Engine
    from fidelity_mw.telemetry import Telemetry, configure_otel
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    tel = Telemetry()  # global providers: none set yet
    ctx = DecisionContext(engine=Engine(), route="/x", method="GET", started_at=0.0)
    ctx.add(Decision("ratelimit", "l", "allow", "under_limit"))
    scope = {"type": "http", "headers": [(b"traceparent",
             b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]}
    assert tel.start(ctx, scope) is None
    tel.end(ctx, scope, None)
    request = httpx.Request("GET", "http://up/x")
    assert tel.attempt_start(ctx, request, 1) is None
    assert "traceparent" not in request.headers  # nothing to propagate
    tel.attempt_end(None, httpx.Response(200), None)

    # configured later (after the app was built): picked up at once
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    exporter = InMemorySpanExporter()
    configure_otel("late")
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))
    token = tel.start(ctx, scope)
    assert token is not None
    tel.end(ctx, scope, token)
    trace.get_tracer_provider().force_flush()
    (span,) = exporter.get_finished_spans()
    assert span.resource.attributes["service.name"] == "late"
    assert span.attributes["fidelity.route"] == "/x"
    print("OK")
    """
)


def test_without_sdk_nothing_is_recorded_until_a_provider_is_set() -> None:
    env = {"PATH": "/usr/bin:/bin", "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}
    result = subprocess.run(
        [sys.executable, "-c", _NO_SDK], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"


# ------------------------------------------------------------ the caller's context is kept


async def test_own_span_keeps_the_callers_context(otel: Pipeline) -> None:
    """Defect 12.18: with no span current, the request headers were extracted into an
    empty Context, so baggage and values attached by outer layers vanished in the app."""
    from opentelemetry import baggage
    from opentelemetry import context as otel_context

    key = otel_context.create_key("outer-layer-data")
    seen: dict[str, Any] = {}

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        seen["value"] = otel_context.get_value(key)
        seen["tenant"] = baggage.get_baggage("tenant")
        seen["span"] = trace.get_current_span().get_span_context().is_valid
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    inner = FidelityMiddleware(
        endpoint, policy=policy(), clock=FakeClock(), observer=otel.telemetry
    )

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        ctx = otel_context.set_value(key, "kept", baggage.set_baggage("tenant", "acme"))
        token = otel_context.attach(ctx)
        try:
            await inner(scope, receive, send)
        finally:
            otel_context.detach(token)

    assert (await call(outer, "/ok")).status_code == 200
    assert seen == {"value": "kept", "tenant": "acme", "span": True}
    only_span(otel)  # ours, and still one


# ------------------------------------------------------------ the default: one summary


async def test_default_is_one_summary_and_events_only_for_non_allow_decisions() -> None:
    otel = pipeline(decision_events="non_allow")
    try:
        app = app_with(otel, policy(rate_limits=(RateLimit(name="one", rate="1/s", burst=1),)))
        assert (await call(app, "/ok")).status_code == 200
        assert (await call(app, "/ok")).status_code == 429
        served, rejected = otel.finished()
        assert decision_events(served) == []
        assert dict(served.attributes or {})[schema.DECISIONS] == (
            "deadline/allow/route_default@request breaker/allow/breaker_closed@memory "
            "ratelimit:one/allow/under_limit@memory"
        )
        summary = dict(rejected.attributes or {})[schema.DECISIONS].split(" ")
        assert summary[-1] == "ratelimit:one/reject/over_limit@memory"
        (event,) = decision_events(rejected)
        assert (event[schema.LAYER], event[schema.VERDICT], event[schema.SUBJECT]) == (
            "ratelimit",
            "reject",
            "one",
        )
    finally:
        otel.shutdown()


def test_decision_events_option_is_checked() -> None:
    with pytest.raises(ValueError, match="decision_events"):
        Telemetry(decision_events="some")


def test_telemetry_uses_no_private_opentelemetry_names() -> None:
    """Only public OpenTelemetry API on the request path: no `module._private` attribute, no
    `_internal` module, no private method of an SDK class (an SDK upgrade may remove any
    of them). (`configure_otel`, run once at startup, runs the SDK's own configurator.)"""
    import re
    from pathlib import Path

    import fidelity_mw.telemetry as package

    private = re.compile(
        r"\b(?:trace_api|metrics_api|otel_context|propagate|opentelemetry[\w.]*)\._\w"
        r"|_internal\b|\._add_event\b|_SUPPRESS\w*_KEY|_ProxyMeterProvider"
    )
    for name in ("__init__.py", "observer.py", "schema.py"):
        path = Path(package.__file__).parent / name
        hits = [line for line in path.read_text().splitlines() if private.search(line)]
        assert hits == [], path.name


# ------------------------------------------------------------ OTel's provider convention


async def test_middleware_and_transport_take_tracer_and_meter_providers() -> None:
    """Like OpenTelemetry's own instrumentations: providers for this app only, no globals."""
    import httpx

    from fidelity_mw import FidelityTransport

    otel = pipeline()
    try:
        app = starlette_app()
        app.add_middleware(
            FidelityMiddleware,
            policy=policy(),
            clock=FakeClock(),
            tracer_provider=otel.tracer_provider,
            meter_provider=otel.meter_provider,
        )
        assert (await call(app, "/ok")).status_code == 200
        (server,) = otel.finished()
        assert server.kind is SpanKind.SERVER
        assert dict(server.attributes or {}).get(schema.DECIDED_BY, "app") == "app"
        requests = counter_values(otel.metrics, schema.METRIC_REQUESTS, schema.OUTCOME)
        assert requests == {("served",): 1}

        otel.spans.clear()
        transport = FidelityTransport(
            httpx.MockTransport(lambda request: httpx.Response(200)),
            tracer_provider=otel.tracer_provider,
            meter_provider=otel.meter_provider,
        )
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get("http://up.example/x")).status_code == 200
        (attempt,) = otel.finished()
        assert attempt.kind is SpanKind.CLIENT
        assert dict(attempt.attributes or {})["server.address"] == "up.example"
    finally:
        otel.shutdown()
