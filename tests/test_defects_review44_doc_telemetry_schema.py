"""docs/telemetry.md's tables against what the product emits, both ways.

Real requests through the middleware and `FidelityTransport`, a real OpenTelemetry SDK
(in-memory span exporter and metric reader), in the scenarios the tables speak of:
plain requests (lean attributes), every refusal the middleware answers (429, breaker
shed, deadline, bulkhead), an app failure, a disconnect, a trusted caller's retry,
outbound retries, hedges and give-ups, a long request that drops records, a
non-standard method, breaker transitions, Redis unreachable (fallback), and
`request_attributes="all"`. For each table:

- everything emitted is in the table (the names of span attributes, span events and
  their attributes, metrics, their units, instruments and attributes);
- everything in the table is emitted in one of these scenarios;
- decision reasons and detail keys, too many to reach one by one here, must be
  emitted or at least exist in the source (documented, never produced: a dead row).

test_defects_review37_docs checks the first direction on one run, by a backticked name
anywhere in the page; this one reads the tables themselves.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics.export import Sum
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock, seeded_random
from test_telemetry_helpers import Pipeline, pipeline

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "telemetry.md").read_text(encoding="utf-8")
SRC = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "src").rglob("*.py"))
# also written in the Lua scripts' replies (reasons decided on Redis)
SRC += "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "src").rglob("*.lua"))

TICK = re.compile(r"`([^`]+)`")


# ---------------------------------------------------------------- the tables


def _section(start: str, end: str) -> str:
    i = DOC.index(start)
    return DOC[i : DOC.index(end, i + len(start))]


def _cells(line: str) -> list[str]:
    """A table row's cells (a `\\|` inside a cell is no border)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def _first_column(table: str) -> list[str]:
    names: list[str] = []
    for line in table.splitlines():
        if line.startswith("| `"):
            names += TICK.findall(_cells(line)[0])
    return names


def _table_after(marker: str) -> str:
    i = DOC.index(marker)
    lines = DOC[i:].splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("|"))
    end = next(k for k in range(start, len(lines)) if not lines[k].startswith("|"))
    return "\n".join(lines[start:end])


def server_attributes() -> set[str]:
    table = _table_after("Attributes set on that span")
    semconv = _section("On the span fidelity_mw starts itself", "`url.query`")
    names = set(_first_column(table))
    names |= {n for n in TICK.findall(semconv) if "." in n and " " not in n}
    return names - exception_event_attributes()


def exception_event_attributes() -> set[str]:
    semconv = _section("On the span fidelity_mw starts itself", "`url.query`")
    return {n for n in TICK.findall(semconv) if n.startswith("exception.")}


def event_table() -> str:
    return _table_after("The event's attributes:")


def event_attributes() -> set[str]:
    return {n for n in _first_column(event_table()) if not n.endswith("<key>`")} - {
        "fidelity.detail.<key>"
    }


def documented_values(column_name: str) -> set[str]:
    row = next(line for line in event_table().splitlines() if f"`{column_name}`" in line)
    meaning = _cells(row)[3]
    return set(TICK.findall(meaning))


def detail_keys() -> set[str]:
    row = next(
        line for line in event_table().splitlines() if line.startswith("| `fidelity.detail.")
    )
    meaning = _cells(row)[3]
    return {k for k in TICK.findall(meaning) if re.fullmatch(r"[a-z_]+", k)}


def client_attributes() -> set[str]:
    table = _table_after("`FidelityTransport` calls the observer around every attempt")
    return {n for n in _first_column(table) if "." in n}


def metrics_table() -> dict[str, tuple[str, str, set[str]]]:
    """name -> (instrument, unit, attributes)."""
    out: dict[str, tuple[str, str, set[str]]] = {}
    for line in _table_after("## Metrics").splitlines()[2:]:
        cells = _cells(line)
        name = TICK.findall(cells[0])[0]
        unit = TICK.findall(cells[2])[0]
        attributes = {a for a in TICK.findall(cells[3]) if "." in a}
        out[name] = (cells[1], unit, attributes)
    return out


def test_the_tables_are_read() -> None:
    """The parsing above finds what it is for (a table renamed must not pass empty)."""
    assert {"fidelity.decided_by", "fidelity.decisions", "http.route"} <= server_attributes()
    assert {"fidelity.layer", "fidelity.state.stale"} <= event_attributes()
    assert {"url.full", "fidelity.attempt.cancelled"} <= client_attributes()
    assert {"retry_after_s", "fleet_share", "failure_weight"} <= detail_keys()
    assert len(metrics_table()) == 9
    assert {"reject", "would_reject", "fail"} <= documented_values("fidelity.verdict")


# ---------------------------------------------------------------- the run


class Emitted:
    def __init__(self) -> None:
        self.server: set[str] = set()
        self.internal: set[str] = set()
        self.client: set[str] = set()
        self.events: dict[str, set[str]] = {}  # event name -> its attributes
        self.values: dict[str, set[str]] = {
            schema.LAYER: set(),
            schema.VERDICT: set(),
            schema.REASON: set(),
            schema.STATE_SOURCE: set(),
        }
        self.details: set[str] = set()
        # name -> (instrument kind, unit, attributes)
        self.metrics: dict[str, tuple[str, str, set[str]]] = {}
        self.metric_values: dict[str, set[str]] = {}

    def add_spans(self, pipe: Pipeline) -> None:
        for span in pipe.finished():
            attrs = set(span.attributes or {})
            {"SERVER": self.server, "CLIENT": self.client}.get(
                span.kind.name, self.internal
            ).update(attrs)
            for event in span.events:
                ev = dict(event.attributes or {})
                self.events.setdefault(event.name, set()).update(ev)
                for key, seen in self.values.items():
                    if key in ev:
                        seen.add(str(ev[key]))
                self.details |= {
                    k.removeprefix(schema.DETAIL_PREFIX)
                    for k in ev
                    if k.startswith(schema.DETAIL_PREFIX)
                }

    def add_metrics(self, pipe: Pipeline) -> None:
        data = pipe.metrics.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = type(metric.data).__name__
                    if isinstance(metric.data, Sum) and not metric.data.is_monotonic:
                        kind = "UpDownSum"
                    attributes: set[str] = set()
                    for point in metric.data.data_points:
                        attributes |= set(point.attributes or {})
                        for k, v in (point.attributes or {}).items():
                            self.metric_values.setdefault(k, set()).add(str(v))
                    before = self.metrics.get(metric.name, (kind, metric.unit or "", set()))
                    self.metrics[metric.name] = (kind, metric.unit or "", before[2] | attributes)


async def _item(request: Request) -> PlainTextResponse:
    return PlainTextResponse("item")


def _requests(pipe: Pipeline, *, redis_down: bool = False) -> None:
    """One app, one policy, the scenarios of the module docstring."""
    from fidelity_mw.policy import (
        BreakerConfig,
        ConcurrencyConfig,
        DeadlineConfig,
        HedgeConfig,
        RateLimit,
        RetryConfig,
        RouteConfig,
        StateConfig,
        UpstreamConfig,
    )

    clock = FakeClock()
    upstream_calls: dict[str, int] = {}
    hang = asyncio.Event()

    async def upstream(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        upstream_calls[path] = upstream_calls.get(path, 0) + 1
        n = upstream_calls[path]
        if path == "/down":
            return httpx.Response(503)
        if path == "/flaky":
            return httpx.Response(503 if n % 2 else 200)
        if path == "/refused":
            raise httpx.ConnectError("refused", request=request)
        if path == "/slow" and n == 1:
            await hang.wait()  # the hedge answers first; this one is cancelled
        if path == "/tired":
            return httpx.Response(503, headers={"x-fidelity-retry": "exhausted"})
        return httpx.Response(200)

    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(upstream), observer=pipe.telemetry)
    )
    gate = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        status = 200
        if path == "/fail":
            status = 500
        elif path == "/boom":
            raise RuntimeError("boom")
        elif path == "/slow":
            await gate.wait()
        elif path == "/late":
            await clock.sleep(5)  # past the caller's deadline
        elif path == "/many":
            for _ in range(300):  # a long request: records dropped
                await client.get("http://many.internal/x")
        elif path == "/gone":
            await receive()
            await receive()  # http.disconnect: the client left
            return
        elif path == "/frob":
            status = (await client.request("FROB", "http://up.internal/frob")).status_code
        elif path.startswith("/call/"):
            what = path.removeprefix("/call/")
            host = {"down": "svc", "slow": "hedged.internal"}.get(what, "up.internal")
            try:
                status = (await client.get(f"http://{host}/{what}")).status_code
            except httpx.TransportError:
                status = 502
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    state = StateConfig(url="redis://127.0.0.1:1/0", timeout_ms=50, connect_timeout_ms=50)
    policy = Policy(
        state=state if redis_down else StateConfig(),
        deadline=DeadlineConfig(default_ms=2_000),
        rate_limits=(
            RateLimit(name="per-client", match="/limited", rate="2/s", burst=2),
            RateLimit(name="shadowed", match="/limited", rate="1/min", burst=1, shadow=True),
        ),
        breaker=BreakerConfig(min_calls=2, failure_ratio=0.5, open_min_s=5, open_s=5),
        routes=(
            RouteConfig(match="/fail", name="failing"),
            RouteConfig(match="/slow", concurrency=ConcurrencyConfig(limit=1)),
        ),
        upstreams=(
            UpstreamConfig(
                host="svc",
                instances=("http://10.0.0.7:8080", "http://10.0.0.8:8080"),
                retry=RetryConfig(attempts=2, base_ms=1, max_ms=2),
                breaker=BreakerConfig(consecutive_failures=2, open_min_s=5, open_s=5),
            ),
            UpstreamConfig(
                host="hedged.internal",
                retry=RetryConfig(attempts=2, base_ms=1, max_ms=2),
                hedge=HedgeConfig(after_ms=50),
            ),
            UpstreamConfig(
                host="up.internal",
                retry=RetryConfig(
                    attempts=3, base_ms=1, max_ms=2, budget_ratio=0.0, budget_min_per_s=0.2
                ),
            ),
        ),
    )
    mw = FidelityMiddleware(
        app, policy=policy, clock=clock, rng=seeded_random(1), observer=pipe.telemetry
    )
    routed = Starlette(routes=[Route("/items/{item_id}", _item)])
    routed.add_middleware(FidelityMiddleware, policy=Policy(), clock=clock, observer=pipe.telemetry)
    trusted = {"x-fidelity-attempt": "2"}  # from 127.0.0.1, a trusted peer by default

    async def gone() -> None:
        received: list[str] = []

        async def receive() -> dict[str, Any]:
            # the body first, then the client is gone
            received.append("x")
            if len(received) == 1:
                return {"type": "http.request", "body": b""}
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/gone",
            "raw_path": b"/gone",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"t")],
            "client": ("127.0.0.1", 5000),
            "server": ("t", 80),
        }
        await mw(scope, receive, send)

    async def main() -> None:
        transport = httpx.ASGITransport(
            app=mw, client=("127.0.0.1", 5000), raise_app_exceptions=False
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await c.get("/plain")
            await c.request("FROB", "/plain")  # non-standard method
            await c.get("/frob")  # and one sent upstream
            await c.get("/plain", headers=trusted)
            for _ in range(3):
                await c.get("/limited")  # allow, allow, reject (+ shadow would_reject)
            await c.get("/plain", headers={"x-request-timeout-ms": "abc"})
            await c.get("/plain", headers={"x-request-timeout-ms": "0"})  # expired
            await c.get("/late", headers={"x-request-timeout-ms": "100"})  # expired running
            for _ in range(4):
                await c.get("/fail")  # the route breaker opens, then sheds
            await c.get("/boom")
            for what in ("flaky", "refused", "tired", "slow"):
                await c.get(f"/call/{what}")
            for _ in range(3):
                await c.get("/call/down")  # a service: balancer, retries, breakers open
            await c.get("/many")
            held = asyncio.create_task(c.get("/slow"))
            for _ in range(20):
                await asyncio.sleep(0)
            await c.get("/slow")  # the bulkhead is full: shed
            gate.set()
            await held
            await gone()
            clock.advance(6)
            await c.get("/fail")  # a half-open probe
            await c.get("/call/down")
        routed_transport = httpx.ASGITransport(app=routed)
        async with httpx.AsyncClient(transport=routed_transport, base_url="http://t") as c:
            await c.get("/items/7")  # a route template: `http.route`
        hang.set()
        await client.aclose()

    asyncio.run(main())


@pytest.fixture(scope="module")
def emitted() -> Emitted:
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    seen = Emitted()
    for kwargs, redis_down in (
        ({}, False),  # the defaults: lean attributes, events for non-allow decisions
        ({"request_attributes": "all", "decision_events": "all"}, False),
        ({}, True),
    ):
        pipe = pipeline(**kwargs)
        try:
            _requests(pipe, redis_down=redis_down)
            seen.add_spans(pipe)
            seen.add_metrics(pipe)
        finally:
            pipe.shutdown()
    # the client-level httpx instrumentation: our attempts as `fidelity.attempt` events
    pipe = pipeline()
    answers = iter([503, 200])
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: httpx.Response(next(answers))),
        policy=Policy(),
        clock=FakeClock(),
        observer=pipe.telemetry,
    )
    client = httpx.AsyncClient(transport=transport)
    HTTPXClientInstrumentor.instrument_client(client, tracer_provider=pipe.tracer_provider)
    try:
        asyncio.run(client.get("http://upstream.internal/x"))
        seen.add_spans(pipe)
    finally:
        HTTPXClientInstrumentor.uninstrument_client(client)
        pipe.shutdown()
    return seen


# ---------------------------------------------------------------- spans


def test_the_run_reaches_the_scenarios(emitted: Emitted) -> None:
    verdicts = emitted.values[schema.VERDICT]
    assert {"reject", "would_reject", "shed", "retry", "probe", "give_up", "hedge"} <= verdicts
    assert {"memory", "fallback", "request"} <= emitted.values[schema.STATE_SOURCE]
    assert {"closed", "open", "half_open"} <= emitted.metric_values[schema.BREAKER_STATE]
    assert {"route", "upstream"} <= emitted.metric_values[schema.BREAKER_SCOPE]
    assert {"unreachable", "read_only"} <= emitted.metric_values[schema.FALLBACK_WHY]
    assert {"drawn", "exhausted"} <= emitted.metric_values[schema.BUDGET_RESULT]
    outcomes = {"served", "failed", "rejected", "shed", "expired", "disconnected"}
    assert outcomes <= emitted.metric_values[schema.OUTCOME]
    assert schema.STATE_STALE in emitted.events[schema.DECISION_EVENT]


def test_server_span_attributes_are_the_documented_ones(emitted: Emitted) -> None:
    documented = server_attributes()
    assert emitted.server - documented == set(), "emitted on SERVER spans, not in the tables"
    assert documented - emitted.server == set(), "in the tables, never on a SERVER span"


def test_client_span_attributes_are_the_documented_ones(emitted: Emitted) -> None:
    documented = client_attributes()
    # the decision summary, documented under the table ("Each CLIENT span carries ...");
    # the httpx instrumentation's own CLIENT span (instrument_client) carries its names
    ours = emitted.client - {schema.DECISIONS}
    foreign = {"http.method", "http.url", "http.status_code", "url.scheme", "network.peer.address"}
    assert ours - documented - foreign == set(), "emitted on CLIENT spans, not in the table"
    assert documented - emitted.client == set(), "in the table, never on a CLIENT span"
    assert emitted.internal == set() or emitted.internal <= server_attributes()


def test_span_events_are_the_documented_ones(emitted: Emitted) -> None:
    assert set(emitted.events) == {schema.DECISION_EVENT, "exception", schema.ATTEMPT_EVENT}
    decision = {
        k for k in emitted.events[schema.DECISION_EVENT] if not k.startswith(schema.DETAIL_PREFIX)
    }
    assert decision == event_attributes()
    # the SDK's exception event: what the page names, `exception.escaped` the SDK's own
    assert emitted.events["exception"] - {"exception.escaped"} == exception_event_attributes()
    # instrument_client: one event per attempt, "(`http.response.status_code`, `error.type`)"
    assert emitted.events[schema.ATTEMPT_EVENT] == {"http.response.status_code", "error.type"}


def _error_reason(reason: str) -> bool:
    """`<kind>_error`, made of `error_kind()`'s kinds (`outbound/decisions.cause_of`)."""
    from fidelity_mw.outbound import wire

    kinds = {v for k, v in vars(wire).items() if k.startswith("ERROR_") and isinstance(v, str)}
    return reason.endswith("_error") and reason.removesuffix("_error") in kinds


def test_layers_verdicts_and_reasons_are_documented_and_exist(emitted: Emitted) -> None:
    patterns = (r"status_\d{3}", r"state_error:\w+", r"retry_after_\w+")
    for column, key in (
        ("fidelity.layer", schema.LAYER),
        ("fidelity.verdict", schema.VERDICT),
        ("fidelity.reason", schema.REASON),
        ("fidelity.state.source", schema.STATE_SOURCE),
    ):
        documented = documented_values(column)
        undocumented = {
            v
            for v in emitted.values[key]
            if v not in documented and not any(re.fullmatch(p, v) for p in patterns)
        }
        assert undocumented == set(), f"{column}: emitted, not in its row"
        if column == "fidelity.reason":
            # the reason row also names the policy key behind `send_stalled`
            documented = {v for v in documented if re.fullmatch(r"[a-z_]+", v)}
            documented -= {"send_stall_timeout_s"}
        dead = {
            v
            for v in documented - emitted.values[key]
            if f'"{v}"' not in SRC and not _error_reason(v)
        }
        assert dead == set(), f"{column}: in its row, in no source file"
    # the layers and verdicts are few: every one is emitted in the run above, except
    # those of scenarios it does not build (a budget refusal, an advice, a body that
    # broke, a bulkhead wait) whose own tests emit them
    not_here = {"budget", "advise", "refund", "fail", "queued"}
    reasons = documented_values("fidelity.reason")
    for column, key in (("fidelity.layer", schema.LAYER), ("fidelity.verdict", schema.VERDICT)):
        # the row's own values, not the reasons or headers its prose names
        documented = {v for v in documented_values(column) if re.fullmatch(r"[a-z_]+", v)}
        assert documented - reasons - emitted.values[key] <= not_here, column


def test_detail_keys_are_documented_and_exist(emitted: Emitted) -> None:
    documented = detail_keys()
    assert emitted.details - documented == set(), "details emitted, not in the detail row"
    dead = {k for k in documented - emitted.details if f'"{k}"' not in SRC}
    assert dead == set(), "details in the row that no source file writes"


# ---------------------------------------------------------------- metrics

INSTRUMENTS = {"counter": ("Sum",), "gauge": ("Gauge",), "histogram": ("Histogram",)}


def test_metrics_are_the_documented_ones_with_their_units_and_attributes(
    emitted: Emitted,
) -> None:
    table = metrics_table()
    assert set(emitted.metrics) == set(table)
    for name, (kind, unit, attributes) in emitted.metrics.items():
        instrument, doc_unit, doc_attributes = table[name]
        assert unit == doc_unit, f"{name}: unit {unit!r}, documented {doc_unit!r}"
        word = instrument.split()[0]
        assert kind in INSTRUMENTS[word], f"{name}: a {kind}, documented as a {instrument}"
        assert attributes == doc_attributes, f"{name}: attributes differ from the table"


def test_a_retrys_state_age_is_not_its_backoff() -> None:
    """The `fidelity.state.age_ms` row said a retry's age includes its backoff, so a
    retry after a `Retry-After` over 1 s counts as stale; a retry is recorded when
    decided (63d3cd0): after a 5 s `Retry-After` on memory state its age is 0."""
    pipe = pipeline()
    answers = iter([httpx.Response(503, headers={"retry-after": "5"}), httpx.Response(200)])
    clock = FakeClock()
    transport = FidelityTransport(
        httpx.MockTransport(lambda request: next(answers)),
        policy=Policy(),
        clock=clock,
        observer=pipe.telemetry,
    )
    try:
        response = asyncio.run(httpx.AsyncClient(transport=transport).get("http://up.internal/"))
        assert response.status_code == 200
        assert clock.sleeps == [5.0]
        events = [
            dict(e.attributes or {})
            for span in pipe.finished()
            for e in span.events
            if (e.attributes or {}).get(schema.VERDICT) == "retry"
        ]
        assert len(events) >= 1
        for event in events:
            assert event[schema.STATE_AGE_MS] == 0.0
            assert schema.STATE_STALE not in event
    finally:
        pipe.shutdown()
