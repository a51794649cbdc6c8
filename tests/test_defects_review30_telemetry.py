"""Review 30: telemetry, metrics and the live state page as a demanding SRE reads them in
Jaeger and Prometheus: series that client-supplied hosts must not multiply, a span
processor that raises, the page's script under a mount whose path the client chose, and
the types of the decision events' attributes."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from starlette.applications import Starlette
from starlette.routing import Mount

from fidelity_mw import (
    BreakerConfig,
    Engine,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    UpstreamConfig,
)
from fidelity_mw.admin import AdminApp
from fidelity_mw.context import DecisionContext
from fidelity_mw.testing import FakeClock
from test_telemetry_helpers import (
    call,
    counter_values,
    metric_points,
    pipeline,
    run,
    starlette_app,
)


def _calls(transport: FidelityTransport, urls: list[str]) -> None:
    async def go() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            for url in urls:
                await client.get(url)

    run(go())


# ---------------------------------------------------------------- cardinality


def test_the_retry_budget_counter_folds_the_host_not_the_result() -> None:
    """A service that calls URLs its clients supply (webhooks) retries each host's 503s:
    `fidelity.retry_budget.usage` is keyed by upstream host. Past its bound of 2048 series
    the tally folded its *last* attribute, which there is the result: every new host
    still made a series of its own (2,100 hosts, 2,100 series) and lost `drawn` /
    `exhausted`, the label the exhausted-budget alert selects on."""
    p = pipeline(decision_events="non_allow")
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(503)),
        policy=Policy(),
        clock=FakeClock(),
        observer=p.telemetry,
    )
    hosts = 2100
    _calls(transport, [f"http://h{i}.hooks.example/event" for i in range(hosts)])
    points = metric_points(p.metrics, "fidelity.retry_budget.usage")
    subjects = {attrs["fidelity.subject"] for attrs, _ in points}
    results = {attrs["fidelity.retry_budget.result"] for attrs, _ in points}
    assert len(subjects) <= 2048 + 1, len(subjects)
    assert "_other" in subjects
    assert results == {"drawn"}
    # nothing lost: every host's retries are counted, the folded ones under `_other`
    assert sum(point.value for _, point in points) == 2 * hosts


def test_the_breaker_gauge_is_bounded_for_a_memory_store_and_keeps_the_open_one() -> None:
    """The gauge read every breaker a memory store holds (up to its 10,000), three series
    each: a webhook sender's upstream breakers, one per host its clients named, made
    thousands of `fidelity_breaker_state` series. Bounded like the stores it cannot read
    (1024 breakers), the open breaker (the one the alert needs) listed first."""
    p = pipeline(decision_events="non_allow")
    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="down.example",
                breaker=BreakerConfig(consecutive_failures=1, open_s=30.0, open_min_s=30.0),
            ),
        )
    )

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503 if request.url.host == "down.example" else 200)

    transport = FidelityTransport(
        httpx.MockTransport(handler), policy=policy, clock=FakeClock(), observer=p.telemetry
    )
    urls = [f"http://h{i}.hooks.example/event" for i in range(1100)]
    _calls(transport, [*urls[:600], "http://down.example/x", *urls[600:]])
    store: Any = transport.engine.store
    assert len(store.breakers) > 1024  # the store holds them all
    points = metric_points(p.metrics, "fidelity.breaker.state")
    breakers = {attrs["fidelity.subject"] for attrs, _ in points}
    assert len(breakers) <= 1024, len(breakers)
    assert len(points) == 3 * len(breakers)
    current = {
        attrs["fidelity.subject"]: attrs["fidelity.breaker.state"]
        for attrs, point in points
        if point.value == 1
    }
    assert current["down.example"] == "open"


def test_a_late_span_is_named_by_the_method_as_the_conventions_name_it() -> None:
    """The child span the decisions go on when the instrumentation's span ended first was
    named by the raw request method (`fidelity FOO-1 /x`, `fidelity FOO-2 /x`, ...): one
    span name per method a client cares to send. As the server span: `HTTP` for
    non-standard methods."""
    p = pipeline(decision_events="non_allow")
    engine = Engine(Policy(), clock=FakeClock())
    tracer = p.tracer_provider.get_tracer("opentelemetry.instrumentation.asgi")
    names = set()
    for method in ("FOO-1", "FOO-2", "GET"):
        ctx = DecisionContext(engine=engine, route="/x", method=method, started_at=0.0)
        ctx.status = 200
        server = tracer.start_span("GET /x", kind=trace.SpanKind.SERVER)
        with trace.use_span(server, end_on_exit=False):
            token = p.telemetry.start(ctx, {"type": "http", "method": method, "path": "/x"})
        server.end()  # ended with the last body message; no before_response_end call
        p.telemetry.end(ctx, {"type": "http"}, token)
        names |= {s.name for s in p.finished() if s.name.startswith("fidelity ")}
    assert names == {"fidelity HTTP /x", "fidelity GET /x"}


# ---------------------------------------------------------------- never break a request


class _RaisingProcessor(SpanProcessor):
    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("a span processor broke")


def test_a_raising_span_processor_costs_no_request_count_and_leaves_no_context() -> None:
    """`Span.end()` runs the span processors, and the SDK lets an exception of one through.
    `end` then skipped detaching our span's context (the caller's context kept an ended
    span current: later requests in it, in-process, got no span at all) and the request's
    counters (the request was not counted)."""
    p = pipeline(decision_events="non_allow")
    p.tracer_provider.add_span_processor(_RaisingProcessor())
    app = starlette_app()
    app.add_middleware(FidelityMiddleware, policy=Policy(), observer=p.telemetry, clock=FakeClock())

    async def go() -> list[int]:
        statuses = []
        for _ in range(3):
            statuses.append((await call(app, "/ok")).status_code)
            assert trace.get_current_span() is trace.INVALID_SPAN
        return statuses

    assert run(go()) == [200, 200, 200]
    assert len(p.finished()) == 3  # every request had its span
    assert counter_values(p.metrics, "fidelity.requests", "fidelity.outcome") == {("served",): 3}


def test_a_raising_span_processor_costs_no_client_duration_point() -> None:
    p = pipeline(decision_events="non_allow")
    p.tracer_provider.add_span_processor(_RaisingProcessor())
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(200)),
        policy=Policy(),
        clock=FakeClock(),
        observer=p.telemetry,
    )
    _calls(transport, ["http://api.example/a", "http://api.example/b"])
    points = metric_points(p.metrics, "http.client.request.duration")
    assert sum(point.count for _, point in points) == 2


# ---------------------------------------------------------------- schema


def test_duration_details_are_always_doubles() -> None:
    """`fidelity.detail.retry_after_s` was a double on a rejection (`0.999`) and an int on
    an `advise` decision (the header's whole seconds): a backend that types a field by
    its first value (Elasticsearch, ClickHouse) then truncates or rejects the other. A
    duration detail (`*_s`, `*_ms`) is a double whatever the layer passed."""
    p = pipeline(decision_events="non_allow")
    engine = Engine(Policy(), clock=FakeClock())
    ctx = DecisionContext(engine=engine, route="/x", method="GET", started_at=0.0)
    ctx.decide(
        "retry",
        "api.example",
        "advise",
        "retry_after_budget",
        details={"retry_after_s": 3, "wait_s": 2, "spread_s": 0.5, "delay_ms": 7, "attempt": 2},
    )
    tracer = p.tracer_provider.get_tracer("test")
    span = tracer.start_span("GET /x", kind=trace.SpanKind.SERVER)
    with trace.use_span(span, end_on_exit=False):
        token = p.telemetry.start(ctx, {"type": "http", "method": "GET", "path": "/x"})
    p.telemetry.before_response_end(ctx, {"type": "http"}, token)
    span.end()
    (event,) = [e for e in p.finished()[0].events if e.name == "fidelity.decision"]
    attrs = dict(event.attributes or {})
    for key in ("retry_after_s", "wait_s", "spread_s", "delay_ms"):
        value = attrs[f"fidelity.detail.{key}"]
        assert type(value) is float, (key, value)
    assert attrs["fidelity.detail.attempt"] == 2
    assert type(attrs["fidelity.detail.attempt"]) is int  # a count stays an int


# ---------------------------------------------------------------- the live state page


async def _page(app: Any, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get(path)


@pytest.mark.anyio
async def test_the_pages_script_cannot_be_closed_by_the_mount_path() -> None:
    """The page writes its JSON URL (the mount's root path) into its script with
    `json.dumps`, which leaves `<` and `/` alone. Under a mount with a path parameter the
    root path is the client's: `/</script><script>alert(1)</script>/_fidelity/` closed
    the script and ran the client's, on a loopback page served without a token."""
    engine = Engine(Policy())
    app = Starlette(routes=[Mount("/{tenant:path}/_fidelity", app=AdminApp(engine))])
    evil = "/</script><script>alert(1)</script>"
    page = await _page(app, evil + "/_fidelity/")
    assert page.status_code == 200
    assert page.text.count("</script>") == 1  # its own
    assert "<script>alert(1)" not in page.text
    # the script still reads the same URL
    literal = re.search(r"const STATE_URL = (\".*?\") \+", page.text)
    assert literal is not None
    assert json.loads(literal.group(1)) == evil + "/_fidelity/state.json"


@pytest.mark.anyio
async def test_a_token_refusal_says_how_to_authenticate() -> None:
    """401 without `WWW-Authenticate` (RFC 9110 15.5.2: the server MUST send one): the
    scheme the page expects is `Bearer`."""
    engine = Engine(Policy())
    app = AdminApp(engine, token="s3cret-admin-token-0123")
    refused = await _page(app, "/state.json")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.anyio
async def test_the_page_lists_a_bounded_number_of_breakers_the_open_ones_first() -> None:
    """A webhook sender's memory store holds a breaker per host its clients named (up to
    10,000): the page listed every one, 3.8 MB of JSON rebuilt every two seconds on the
    event loop for each open page. It lists `top_breakers` (200), those not closed
    first, and says how many there are."""
    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="down.example",
                breaker=BreakerConfig(consecutive_failures=1, open_s=30.0, open_min_s=30.0),
            ),
        )
    )
    engine = Engine(policy, clock=FakeClock())

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503 if request.url.host == "down.example" else 200)

    transport = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        for i in range(600):
            await client.get(f"http://h{i}.hooks.example/event")
        await client.get("http://down.example/x")
    state = await _page(Starlette(routes=[Mount("/a", app=AdminApp(engine))]), "/a/state.json")
    body = state.json()
    assert body["store"]["breaker_count"] == 601
    assert len(body["breakers"]) == 200
    assert body["breakers"][0]["key"] == "upstream:down.example"
    assert body["breakers"][0]["state"] == "open"
    few = await AdminApp(engine, top_breakers=1000).state(engine)
    assert len(few["breakers"]) == 601  # under the bound: all, in the store's order
    assert few["breakers"][0]["key"] == "upstream:h0.hooks.example"


@pytest.mark.anyio
async def test_the_page_lists_a_bounded_number_of_retry_budgets_the_busiest_first() -> None:
    """The same service has a retry budget per host too: 10,000 hosts made 1.1 MB of
    budgets in every refresh. It lists `top_budgets` (200), those with the most retries
    first, and says how many there are."""
    engine = Engine(Policy(), clock=FakeClock())

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503 if request.url.host == "flaky.example" else 200)

    transport = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        for i in range(300):
            await client.get(f"http://h{i}.hooks.example/event")
        await client.get("http://flaky.example/x")
    body = await AdminApp(engine).state(engine)
    assert body["store"]["budget_count"] == 301
    assert len(body["budgets"]) == 200
    assert body["budgets"][0]["key"].endswith("flaky.example")
    assert body["budgets"][0]["retries"] == 2
