"""Review 34, telemetry as an operator meets it in Jaeger and Prometheus.

Spans go through the real SDK and OTLP/HTTP exporter to the in-test OTLP receiver
(test_telemetry_otlp.Receiver, which decodes the protobuf), as a collector in front of
Jaeger gets them; metrics through the SDK's readers, the tiered store on a real
redis-server.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from fidelity_mw import BreakerConfig, FidelityMiddleware, Policy, RateLimit
from fidelity_mw.policy import StateConfig
from fidelity_mw.testing import FakeClock
from redis_server import PATIENT
from test_telemetry_helpers import call, counter_values, metric_points, pipeline, starlette_app
from test_telemetry_otlp import Receiver, attrs, otlp_http_providers

with warnings.catch_warnings():  # Starlette 1.x asks for httpx2; httpx works
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient, WebSocketDenialResponse

pytestmark = pytest.mark.anyio


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


# ---------------------------------------------------------------- websocket spans


def test_a_websocket_handshake_span_is_named_and_routed_by_its_template(
    receiver: Receiver,
) -> None:
    """Our SERVER span for a websocket handshake was named `GET` with no `http.route`:
    the template was looked up through the HTTP plan cache, which reads the scope's
    `method`, and a websocket scope has none. Every handshake of every websocket route
    was one `GET` span in Jaeger, accepted or refused alike, while `fidelity.route`
    named the route."""

    async def room(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    setup = otlp_http_providers(receiver.endpoint, "chat")
    try:
        app = Starlette(routes=[WebSocketRoute("/ws/{room}", room)])
        policy = Policy(rate_limits=(RateLimit(name="per-client", rate="1/m", burst=1),))
        app.add_middleware(
            FidelityMiddleware,
            policy=policy,
            clock=FakeClock(),
            tracer_provider=setup.tracer_provider,
            meter_provider=setup.meter_provider,
        )
        client = TestClient(app)
        with client.websocket_connect("/ws/a") as ws:
            assert ws.receive_text() == "hi"
        with pytest.raises(WebSocketDenialResponse), client.websocket_connect("/ws/b"):
            pass
        setup.force_flush()
    finally:
        setup.shutdown()

    spans = sorted(receiver.spans(), key=lambda s: s.start_time_unix_nano)
    server = spans[0].SPAN_KIND_SERVER
    assert [(s.name, s.kind) for s in spans] == [("GET /ws/{room}", server)] * 2
    accepted, refused = (attrs(s.attributes) for s in spans)
    assert accepted["http.route"] == refused["http.route"] == "/ws/{room}"
    assert accepted["url.path"] == "/ws/a"  # the raw path stays in url.path alone
    assert (accepted["http.response.status_code"], accepted.get("fidelity.outcome", "served")) == (
        101,
        "served",
    )
    assert (refused["http.response.status_code"], refused.get("fidelity.outcome", "served")) == (
        429,
        "rejected",
    )


# ---------------------------------------------------------------- exception events


async def test_an_app_exception_is_an_exception_event_on_our_server_span(
    receiver: Receiver,
) -> None:
    """Our own SERVER span said `error.type = RuntimeError` and status ERROR, but had no
    `exception` event: the message and stack trace that the ASGI instrumentation's span
    carries (its `record_exception`) were missing from Jaeger's view of the request."""
    setup = otlp_http_providers(receiver.endpoint, "orders")
    try:
        app = starlette_app()
        app.add_middleware(
            FidelityMiddleware,
            policy=Policy(),
            clock=FakeClock(),
            tracer_provider=setup.tracer_provider,
            meter_provider=setup.meter_provider,
        )
        assert (await call(app, "/boom")).status_code == 500
        assert (await call(app, "/fail")).status_code == 500
        setup.force_flush()
    finally:
        setup.shutdown()

    by_name = {s.name: s for s in receiver.spans()}
    boom = by_name["GET /boom"]
    assert boom.status.code == boom.status.STATUS_CODE_ERROR
    assert attrs(boom.attributes)["error.type"] == "RuntimeError"
    (event,) = [e for e in boom.events if e.name == "exception"]
    exc = attrs(event.attributes)
    assert exc["exception.type"] == "RuntimeError"
    assert exc["exception.message"] == "the app broke"
    assert "_boom" in exc["exception.stacktrace"]  # where the app broke
    # a 5xx the app answered is an error without an exception
    fail = by_name["GET /fail"]
    assert attrs(fail.attributes)["error.type"] == "500"
    assert [e.name for e in fail.events if e.name == "exception"] == []


# ---------------------------------------------------------------- retry budget counter


async def test_a_hedge_counts_as_drawn_from_the_retry_budget() -> None:
    """A hedge asks the retry budget like a retry (docs/outbound.md, "Hedged requests")
    and the budget counted it, but `fidelity.retry_budget.usage{result="drawn"}` counted
    only `retry` verdicts: on a hedged upstream the series said no budget was used while
    the budget itself was spent, and the exhausted series then rose with nothing drawn."""
    from test_hedging import Upstream, transport

    otel = pipeline()
    try:
        upstream = Upstream()
        t, clock = transport(upstream, instances=())
        t._observer = otel.telemetry
        async with httpx.AsyncClient(transport=t) as client:
            response = await client.get("http://payments/pay")
        assert response.status_code == 200
        ctx = response.extensions["fidelity_context"]
        assert [d.verdict for d in ctx.decisions if d.layer == "retry"] == ["allow", "hedge"]
        (window,) = t.engine.store.budgets.values()
        _requests, retries = window.totals(clock.monotonic())
        drawn = counter_values(
            otel.metrics,
            "fidelity.retry_budget.usage",
            "fidelity.subject",
            "fidelity.retry_budget.result",
        )
        assert retries == 1
        assert drawn == {("payments", "drawn"): retries}
    finally:
        otel.shutdown()


# ---------------------------------------------------------------- breaker gauge, tiered


@pytest.mark.redis
async def test_a_tiered_breaker_the_cache_dropped_keeps_its_last_reading(redis_url: str) -> None:
    """On tiered state the gauge reads the store's cache of the shared breakers, and the
    cache drops a breaker one second (10 sync intervals) after its last request: the
    series of an open route breaker vanished between two requests of a quiet route, so
    `FidelityBreakerOpen` (`for: 1m`) never fired. Redis state keeps the last reading
    (docs/telemetry.md); the tiered store now does too."""
    from fidelity_mw.state.tiered import TieredStore

    p = pipeline(decision_events="non_allow")
    config = StateConfig(url="tiered+" + redis_url, key_prefix=f"tel34g{time.time_ns()}", **PATIENT)
    store = TieredStore(config=config)
    app = starlette_app()
    policy = Policy(breaker=BreakerConfig(consecutive_failures=2, open_s=60.0))
    app.add_middleware(FidelityMiddleware, policy=policy, store=store, observer=p.telemetry)

    def gauge() -> dict[str, str]:
        return {
            a["fidelity.subject"]: a["fidelity.breaker.state"]
            for a, point in metric_points(p.metrics, "fidelity.breaker.state")
            if point.value == 1 and a.get("fidelity.breaker.scope") == "route"
        }

    try:
        # the failures reach Redis with the store's next sync, which opens the breaker
        # fleet-wide and brings its state back: bounded, until a request is shed
        statuses = []
        for _ in range(1500):  # bounded: 30 s on a starved machine
            statuses.append((await call(app, "/fail")).status_code)
            if statuses[-1] == 503:
                break
            await asyncio.sleep(0.02)
        assert statuses[:2] == [500, 500]
        assert statuses[-1] == 503
        assert "route:/fail" in store.breakers
        assert gauge()["/fail"] == "open"
        # the periodic sync, well after the last request, drops the idle breaker
        store._plan_sync(time.monotonic() + 60.0, ())
        assert "route:/fail" not in store.breakers
        assert gauge()["/fail"] == "open"
    finally:
        await store.aclose()
        p.shutdown()


# ---------------------------------------------------------------- metrics without tracing


async def test_outbound_attempts_are_timed_with_metrics_and_no_tracing() -> None:
    """`http_client_request_duration_seconds` is one of the Prometheus series
    docs/operations.md lists ("each outbound attempt through FidelityTransport"), but it
    was recorded only under a CLIENT span of ours: a metrics-only setup (the Prometheus
    recipe: a meter provider, no tracer) never had it."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    from fidelity_mw import FidelityTransport, UpstreamConfig
    from fidelity_mw.engine import Engine
    from fidelity_mw.policy import RetryConfig

    registry = CollectorRegistry()
    meter_provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    answers = iter([503, 200])
    inner = httpx.MockTransport(lambda request: httpx.Response(next(answers)))
    engine = Engine(
        Policy(upstreams=(UpstreamConfig(host="*", retry=RetryConfig(base_ms=0, max_ms=0)),)),
        clock=FakeClock(),
    )
    transport = FidelityTransport(inner, engine=engine, meter_provider=meter_provider)
    try:
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get("http://api.example/items")).status_code == 200
        text = generate_latest(registry).decode()
    finally:
        meter_provider.shutdown()
    counts = {
        line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("http_client_request_duration_seconds_count{")
    }
    by_status = {
        next(p for p in labels.split(",") if p.startswith("http_response_status_code=")): n
        for labels, n in counts.items()
    }
    # one point per attempt: the 503 and the retry's 200
    assert by_status == {
        'http_response_status_code="503"': 1.0,
        'http_response_status_code="200"': 1.0,
    }
    assert all('server_address="api.example"' in labels for labels in counts)
    assert all('error_type="503"' in labels for labels in counts if "503" in labels)


# ---------------------------------------------------------------- the summary's state age


async def test_a_long_outage_s_state_age_stays_one_plus_in_the_summary(receiver: Receiver) -> None:
    """`fidelity.decisions` appends `+<age>ms` to a decision on aged state, formatted
    with `:g`: from 1,000,000 ms on (a 17-minute Redis outage, when the fallback
    decisions' age is what an operator reads) it became `+1.2e+06ms`, whose own `+`
    split the entry a second time, and six digits were all that was left of the age."""
    from test_telemetry_otlp import StaleStore

    class LongOutage(StaleStore):
        def admit_now(self, *args: Any, **kw: Any) -> Any:
            return super().admit_now(*args, **kw)._replace(source="fallback", age_s=1234.5678)

    setup = otlp_http_providers(receiver.endpoint, "orders")
    try:
        app = starlette_app()
        policy = Policy(rate_limits=(RateLimit(name="per-client", rate="10/s", burst=10),))
        app.add_middleware(
            FidelityMiddleware,
            policy=policy,
            clock=FakeClock(),
            store=LongOutage(),
            tracer_provider=setup.tracer_provider,
            meter_provider=setup.meter_provider,
        )
        assert (await call(app, "/ok")).status_code == 200
        setup.force_flush()
    finally:
        setup.shutdown()

    (span,) = receiver.spans()
    packed = attrs(span.attributes)["fidelity.decisions"]
    aged = {}
    for entry in packed.split(" "):  # as docs/telemetry.md says to read it
        layer, _verdict, rest = entry.split("/")
        source, *age = rest.split("@")[1].split("+")
        if age:
            (text,) = age  # one `+` per entry
            assert text.endswith("ms")
            aged[layer] = (source, float(text[:-2]))
    assert aged == {
        "breaker": ("fallback", pytest.approx(1_234_567.8)),
        "ratelimit:per-client": ("fallback", pytest.approx(1_234_567.8)),
    }


# ---------------------------------------------------------------- the span's end


async def test_our_server_span_ends_with_the_response_not_the_background_task(
    receiver: Receiver,
) -> None:
    """Our SERVER span ended when the middleware returned: after the route's background
    task, which Starlette runs once the response is out. A request answered at once
    with a slow task behind it showed the task's duration as its latency in Jaeger (and
    in span-derived latency metrics), where the ASGI instrumentation's span ends with
    the last body message."""
    from starlette.background import BackgroundTask
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    marks: dict[str, int] = {}

    async def task() -> None:
        marks["task_started"] = time.time_ns()
        await asyncio.sleep(0)

    async def answer(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok", background=BackgroundTask(task))

    setup = otlp_http_providers(receiver.endpoint, "orders")
    try:
        app = Starlette(routes=[Route("/orders", answer)])
        app.add_middleware(
            FidelityMiddleware,
            policy=Policy(),
            clock=FakeClock(),
            tracer_provider=setup.tracer_provider,
            meter_provider=setup.meter_provider,
        )
        assert (await call(app, "/orders")).status_code == 200
        setup.force_flush()
    finally:
        setup.shutdown()

    (span,) = receiver.spans()
    assert span.name == "GET /orders"
    assert span.start_time_unix_nano <= span.end_time_unix_nano <= marks["task_started"]
    assert attrs(span.attributes).get("fidelity.outcome", "served") == "served"


# ---------------------------------------------------------------- a three-service chain (held up)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
ROOT_SPAN = "00f067aa0ba902b7"


def _chain(receiver: Receiver, instrumented: bool, flags: str) -> tuple[list[Any], Any]:
    """front -> middle -> back on three real uvicorn servers, each with its own OTLP
    providers (service.name front/middle/back); back answers its first call 503, which
    middle's FidelityTransport retries. Returns the received spans (with their service)
    and front's JSON answer."""
    from opentelemetry import baggage
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from fidelity_mw import FidelityTransport, UpstreamConfig
    from fidelity_mw.policy import RetryConfig
    from test_telemetry_helpers import servers

    names = ("front", "middle", "back")
    setups = [otlp_http_providers(receiver.endpoint, name) for name in names]
    urls: list[str] = []
    failed = [False]

    def service(i: int) -> Any:
        setup = setups[i]

        async def handle(request: Request) -> JSONResponse:
            if i == 2:
                if not failed[0]:
                    failed[0] = True
                    return JSONResponse({}, status_code=503)
                return JSONResponse(
                    {
                        "traceparent": request.headers.get("traceparent"),
                        "baggage": dict(baggage.get_all() or {}),
                    }
                )
            client = httpx.AsyncClient(
                transport=FidelityTransport(tracer_provider=setup.tracer_provider)
            )
            if instrumented:
                HTTPXClientInstrumentor.instrument_client(
                    client, tracer_provider=setup.tracer_provider
                )
            async with client:
                answer = await client.get(f"{urls[i + 1]}/s/{i + 1}")
            return JSONResponse(answer.json(), status_code=answer.status_code)

        app: Any = Starlette(routes=[Route("/s/{n}", handle)])
        retry = RetryConfig(base_ms=1, max_ms=2)
        app.add_middleware(
            FidelityMiddleware,
            policy=Policy(upstreams=(UpstreamConfig(host="*", retry=retry),)),
            tracer_provider=setup.tracer_provider,
            meter_provider=setup.meter_provider,
        )
        if instrumented:
            app = OpenTelemetryMiddleware(app, tracer_provider=setup.tracer_provider)
        return app

    try:
        with servers(*(service(i) for i in range(3))) as running:
            urls.extend(s.url for s in running)
            answer = httpx.get(
                f"{urls[0]}/s/0",
                headers={
                    "traceparent": f"00-{TRACE_ID}-{ROOT_SPAN}-{flags}",
                    "tracestate": "vendor=abc",
                    "baggage": "tenant=t1",
                },
                timeout=30.0,
            )
        assert answer.status_code == 200
        for setup in setups:
            setup.force_flush()
    finally:
        for setup in setups:
            setup.shutdown()
    spans = [
        (attrs(rs.resource.attributes)["service.name"], span)
        for request in receiver.traces
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    return spans, answer.json()


@pytest.mark.slow
@pytest.mark.parametrize("instrumented", [False, True], ids=["alone", "asgi+httpx-instrumented"])
def test_a_three_service_chain_is_one_trace_with_each_hop_under_its_attempt(
    receiver: Receiver, instrumented: bool
) -> None:
    spans, answer = _chain(receiver, instrumented, "01")
    assert {span.trace_id.hex() for _, span in spans} == {TRACE_ID}
    assert {span.trace_state for _, span in spans} == {"vendor=abc"}
    assert answer["baggage"] == {"tenant": "t1"}  # two hops on
    by_id = {span.span_id.hex(): (svc, span) for svc, span in spans}

    def parent(span: Any) -> tuple[str, Any]:
        return by_id[span.parent_span_id.hex()]

    def kinds(svc: str, kind: int) -> list[Any]:
        return [s for name, s in spans if name == svc and s.kind == kind]

    server_kind, client_kind = spans[0][1].SPAN_KIND_SERVER, spans[0][1].SPAN_KIND_CLIENT
    (front,) = kinds("front", server_kind)  # one SERVER span per hop, never two
    assert front.parent_span_id.hex() == ROOT_SPAN
    (middle,) = kinds("middle", server_kind)
    backs = sorted(kinds("back", server_kind), key=lambda s: s.start_time_unix_nano)
    assert len(backs) == 2  # the 503, and the retry
    (front_call,) = kinds("front", client_kind)
    assert parent(front_call)[1] is front
    assert parent(middle)[1] is front_call
    middle_calls = kinds("middle", client_kind)
    for call_span in middle_calls:
        assert parent(call_span)[1] is middle
    resend = [attrs(s.attributes).get("http.request.resend_count") for s in middle_calls]
    if instrumented:
        # the httpx instrumentation's CLIENT span wraps the call: annotated, not nested
        (call_span,) = middle_calls
        assert resend == [1]
        assert [e.name for e in call_span.events].count("fidelity.attempt") == 2
        assert {parent(b)[1].span_id for b in backs} == {call_span.span_id}
        # our decisions are on the instrumentation's SERVER spans
        assert "fidelity.decisions" in attrs(middle.attributes)
    else:
        assert sorted(resend, key=lambda r: r or 0) == [None, 1]  # one CLIENT span per attempt
        assert sorted(parent(b)[1].span_id for b in backs) == sorted(
            s.span_id for s in middle_calls
        )
        assert [attrs(b.attributes)["http.response.status_code"] for b in backs] == [503, 200]
    # one trace: every span but the front's SERVER has its parent among the spans
    assert all(s is front or s.parent_span_id.hex() in by_id for _, s in spans)


@pytest.mark.slow
def test_a_sampled_out_chain_exports_nothing_and_passes_the_trace_on(receiver: Receiver) -> None:
    spans, answer = _chain(receiver, False, "00")
    assert spans == []  # no span of any hop, no orphan root
    assert answer["traceparent"].split("-")[1] == TRACE_ID  # the trace id went on
    assert answer["traceparent"].endswith("-00")  # still sampled out
    assert answer["baggage"] == {"tenant": "t1"}


# ---------------------------------------------------------------- logs


@pytest.mark.redis
async def test_replies_lost_on_every_call_are_one_warning_not_one_per_request(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reply lost after its call was sent in full is never resent, and Redis is not
    marked down for it: the request falls back and the next call tries again on a fresh
    connection. Behind a middlebox that resets every connection after the command went
    through, every call loses its reply, and each one logged its own WARNING: a line per
    request for as long as it lasted, where every other lasting Redis fault logs once
    per interval (fidelity_mw._logs)."""
    import logging

    from fidelity_mw.state.base import LimitSpec
    from fidelity_mw.state.redis import RedisStore
    from fidelity_mw.testing import seeded_random
    from redis_server import QUIET
    from test_defects_review3 import _LossyProxy

    bucket = LimitSpec("l", 1_000.0, 10_000.0, 1, False)
    async with _LossyProxy(redis_url) as proxy:
        config = StateConfig(url=proxy.url, **PATIENT, **QUIET)  # type: ignore[arg-type]
        store = RedisStore(config=config, rng=seeded_random(7))
        key = f"tel34:lost:{time.monotonic_ns()}"
        try:
            warm = await store.admit(None, None, [key], [bucket], 0.0)
            assert warm.source == "redis"
            if store._eviction_task is not None:  # its one background read, done first
                await store._eviction_task
            caplog.set_level(logging.WARNING, logger="fidelity_mw.redis")
            sources = []
            for _ in range(10):
                proxy.armed = True  # this call's reply is lost too
                sources.append((await store.admit(None, None, [key], [bucket], 0.0)).source)
        finally:
            await store.aclose()
    assert proxy.dropped == 10
    assert sources == ["fallback"] * 10
    assert store.stats.lost_replies == 10  # every one still counted
    lost = [r for r in caplog.records if "reply lost" in r.getMessage()]
    assert len(lost) == 1
    assert lost[0].levelno == logging.WARNING


async def test_an_upstream_outage_let_out_of_every_request_is_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An app that lets out the error of an upstream the outbound layer gave up on is
    answered 502, and the middleware said so in a WARNING: one line per request, so an
    upstream outage was a log storm at the request rate, exactly when the log is read."""
    import logging

    from starlette.requests import Request
    from starlette.routing import Route

    from fidelity_mw import FidelityTransport, UpstreamConfig
    from fidelity_mw.policy import RetryConfig

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(down)))

    async def orders(request: Request) -> Any:
        return await client.get("http://inventory.internal/items")  # not caught

    app = Starlette(routes=[Route("/orders", orders)])
    upstreams = (UpstreamConfig(host="*", retry=RetryConfig(base_ms=0, max_ms=0), breaker=None),)
    app.add_middleware(
        FidelityMiddleware, policy=Policy(upstreams=upstreams), clock=FakeClock(), telemetry=False
    )
    caplog.set_level(logging.WARNING, logger="fidelity_mw")
    statuses = [(await call(app, "/orders")).status_code for _ in range(10)]
    await client.aclose()
    assert statuses == [502] * 10
    said = [r for r in caplog.records if "let out ConnectError" in r.getMessage()]
    assert len(said) == 1
    assert said[0].levelno == logging.WARNING


# ---------------------------------------------------------------- one meter provider, two observers


async def test_the_middleware_and_a_transport_on_one_meter_provider_both_count() -> None:
    """docs/telemetry.md has the middleware and the transports each take the app's
    providers (`meter_provider=`). Each made its own `Telemetry`, whose instruments have
    the same names on the same meter, and the SDK keeps the first registration of a name
    and drops the later one's callbacks without a word: the transport's decisions
    (calls outside a request) and its upstream breakers never reached Prometheus."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    from fidelity_mw import FidelityTransport

    registry = CollectorRegistry()
    meter_provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    app = starlette_app()
    app.add_middleware(
        FidelityMiddleware, policy=Policy(), clock=FakeClock(), meter_provider=meter_provider
    )
    inner = httpx.MockTransport(lambda request: httpx.Response(200))
    transport = FidelityTransport(inner, meter_provider=meter_provider)
    try:
        for _ in range(3):
            assert (await call(app, "/ok")).status_code == 200
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(2):
                assert (await client.get("http://api.example/items")).status_code == 200
        text = generate_latest(registry).decode()
    finally:
        meter_provider.shutdown()

    def series(name: str, *labels: str) -> dict[tuple[str, ...], float]:
        out = {}
        for line in text.splitlines():
            if line.startswith(name + "{"):
                found = tuple(
                    part for part in line.split("{", 1)[1].split("}")[0].split(",") if part
                )
                key = tuple(p for p in found if p.split("=")[0] in labels)
                out[key] = float(line.rsplit(" ", 1)[1])
        return out

    decisions = series("fidelity_decisions_total", "fidelity_layer", "fidelity_verdict")
    assert decisions[('fidelity_layer="deadline"', 'fidelity_verdict="allow"')] == 3.0
    assert decisions[('fidelity_layer="retry"', 'fidelity_verdict="allow"')] == 2.0
    breakers = series("fidelity_breaker_state", "fidelity_subject", "fidelity_breaker_state")
    assert breakers[('fidelity_breaker_state="closed"', 'fidelity_subject="/ok"')] == 1.0
    assert breakers[('fidelity_breaker_state="closed"', 'fidelity_subject="api.example"')] == 1.0
