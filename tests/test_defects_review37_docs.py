"""What the docs promise, checked against what the code emits and exports.

- docs/telemetry.md names every attribute our spans and events carry, every metric
  and metric attribute, and every decision layer, verdict, reason and detail key that
  a varied run (limits, shadow, per-request cost, breaker, deadline, bulkhead, retries,
  a service's balancer, a give-up) emits; a new attribute or reason fails here until
  it is documented.
- docs/inbound.md lists every kind of problem document the middleware and the FastAPI
  forms answer with (`urn:fidelity-mw:problem:<kind>`, what a client may rely on) and
  its extension members; `circuit-open` and `deadline-exceeded` were named nowhere, and
  the members `route`, `priority`, `cost` and `burst` not among those documented.
- docs/policy.md says "in Python, the same keys are the dataclass fields": every
  section's class imports from `fidelity_mw` (ConcurrencyConfig and HedgeConfig did
  not: `from fidelity_mw import ConcurrencyConfig` was an ImportError).
"""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.sdk.trace import ReadableSpan

import fidelity_mw
from fidelity_mw.policy.reference import SECTIONS
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock, seeded_random
from test_telemetry_helpers import metric_points, pipeline

ROOT = Path(__file__).resolve().parent.parent
TELEMETRY_MD = (ROOT / "docs" / "telemetry.md").read_text(encoding="utf-8")
# Names the docs give as a pattern rather than one by one (docs/telemetry.md, the
# `fidelity.reason` row): `status_503`, `state_error:ConnectionError`, an advice's
# `retry_after_<retry_hint_from>`.
REASON_PATTERNS = (
    re.compile(r"status_\d{3}"),
    re.compile(r"state_error:\w+"),
    re.compile(r"retry_after_\w+"),
)
# The HTTP semantic conventions' own names, documented by OpenTelemetry, and the
# SDK's exception event.
FOREIGN = {"exception.type", "exception.message", "exception.stacktrace", "exception.escaped"}


def documented(name: str) -> bool:
    return f"`{name}`" in TELEMETRY_MD


def detail_row() -> str:
    row = next(line for line in TELEMETRY_MD.splitlines() if line.startswith("| `fidelity.detail."))
    return row


def test_every_schema_name_is_documented() -> None:
    names = {
        value
        for key, value in vars(schema).items()
        if key.isupper() and isinstance(value, str) and "." in value and key != "DETAIL_PREFIX"
    }
    missing = sorted(name for name in names if not documented(name))
    assert not missing, f"in fidelity_mw.telemetry.schema, not in docs/telemetry.md: {missing}"


def test_every_section_class_imports_from_the_package() -> None:
    for _, _, cls, _ in SECTIONS:
        assert getattr(fidelity_mw, cls.__name__) is cls
        assert cls.__name__ in fidelity_mw.__all__
    for name in ("ConcurrencyConfig", "HedgeConfig", "RetryConfig"):
        assert name in fidelity_mw.__all__
        assert getattr(fidelity_mw, name).__module__ == "fidelity_mw.policy.model"


# ---------------------------------------------------------------- a varied run


def varied_run() -> tuple[list[ReadableSpan], Any]:
    """Requests that make most layers decide most ways, through one Telemetry."""
    from fidelity_mw import (
        BreakerConfig,
        ConcurrencyConfig,
        DeadlineConfig,
        FidelityMiddleware,
        FidelityTransport,
        Policy,
        RateLimit,
        RetryConfig,
        RouteConfig,
        UpstreamConfig,
    )

    pipe = pipeline()
    clock = FakeClock()
    upstream_calls = 0

    def upstream(request: httpx.Request) -> httpx.Response:
        nonlocal upstream_calls
        upstream_calls += 1
        if request.url.path == "/down":
            return httpx.Response(503, headers={"retry-after": "1"})
        return httpx.Response(503 if upstream_calls % 2 else 200)

    client = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(upstream)))
    gate = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        path = scope["path"]
        status = 200
        if path == "/fail":
            status = 500
        elif path == "/slow":
            await gate.wait()
        elif path.startswith("/call"):
            target = "http://svc/down" if path == "/call/down" else "http://up.internal/x"
            status = (await client.get(target)).status_code
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    def units(request: Any) -> int:
        return int(request.headers.get("x-units", "1"))

    policy = Policy(
        deadline=DeadlineConfig(default_ms=5_000),
        rate_limits=(
            RateLimit(name="per-client", match="/limited", rate="2/s", burst=2),
            RateLimit(name="shadowed", match="/limited", rate="1/min", burst=1, shadow=True),
            RateLimit(name="units", match="/units", rate="5/s", burst=5, cost=units),
        ),
        breaker=BreakerConfig(min_calls=2, failure_ratio=0.5, open_min_s=5, open_s=5),
        routes=(
            RouteConfig(match="/fail", name="failing"),  # its own breaker
            RouteConfig(match="/slow", concurrency=ConcurrencyConfig(limit=1)),
            RouteConfig(match="/lax", enforce=False),
        ),
        upstreams=(
            UpstreamConfig(
                host="svc",
                instances=("http://10.0.0.7:8080", "http://10.0.0.8:8080"),
                retry=RetryConfig(attempts=2, base_ms=1, max_ms=2),
            ),
            UpstreamConfig(host="up.internal", retry=RetryConfig(attempts=3, base_ms=1, max_ms=2)),
        ),
    )
    mw = FidelityMiddleware(
        app, policy=policy, clock=clock, rng=seeded_random(1), observer=pipe.telemetry
    )

    async def main() -> None:
        transport = httpx.ASGITransport(app=mw)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for _ in range(3):
                await c.get("/limited")  # allow, allow, reject (+ shadow would_reject)
            await c.get("/units", headers={"x-units": "9"})  # cost over the burst
            await c.get("/units", headers={"x-units": "0"})  # zero cost
            await c.get("/plain", headers={"x-request-timeout-ms": "abc"})  # malformed
            await c.get("/plain", headers={"x-request-timeout-ms": "800"})  # caller's
            await c.get("/lax", headers={"x-request-timeout-ms": "0"})  # not enforced
            await c.get("/plain", headers={"x-request-timeout-ms": "0"})  # expired
            for _ in range(4):
                await c.get("/fail")  # the breaker opens, then sheds
            await c.get("/call")  # a retry, then served
            await c.get("/call/down")  # a service: balancer, retries, a give-up
            held = asyncio.create_task(c.get("/slow"))
            for _ in range(20):
                await asyncio.sleep(0)
            await c.get("/slow")  # the bulkhead is full: shed
            gate.set()
            await held
            clock.advance(6)
            await c.get("/fail")  # a half-open probe

    asyncio.run(main())
    spans = pipe.finished()
    return spans, pipe.metrics


def test_what_a_varied_run_emits_is_documented() -> None:
    spans, reader = varied_run()
    attributes: set[str] = set()
    event_attributes: set[str] = set()
    events: set[str] = set()
    values: dict[str, set[str]] = {"layer": set(), "verdict": set(), "reason": set()}
    for span in spans:
        attributes |= set(span.attributes or {})
        for ev in span.events:
            events.add(ev.name)
            attrs = dict(ev.attributes or {})
            event_attributes |= set(attrs)
            for kind, key in (
                ("layer", schema.LAYER),
                ("verdict", schema.VERDICT),
                ("reason", schema.REASON),
            ):
                if key in attrs:
                    values[kind].add(str(attrs[key]))

    # the run reached what it is for (a thin run would check nothing)
    assert {"reject", "would_reject", "shed", "retry", "probe", "give_up"} <= values["verdict"]
    assert {"deadline", "breaker", "ratelimit", "retry", "concurrency", "lb"} <= values["layer"]

    missing = sorted(name for name in attributes | events if not documented(name))
    assert not missing, f"emitted on spans, not in docs/telemetry.md: {missing}"

    details = {
        a.removeprefix(schema.DETAIL_PREFIX)
        for a in event_attributes
        if a.startswith(schema.DETAIL_PREFIX)
    }
    row = detail_row()
    missing = sorted(key for key in details if f"`{key}`" not in row)
    assert not missing, f"decision details not in the fidelity.detail row: {missing}"
    plain = {a for a in event_attributes if not a.startswith(schema.DETAIL_PREFIX)} - FOREIGN
    missing = sorted(name for name in plain if not documented(name))
    assert not missing, f"event attributes not in docs/telemetry.md: {missing}"

    for kind in ("layer", "verdict", "reason"):
        missing = sorted(
            v
            for v in values[kind]
            if not documented(v) and not any(p.fullmatch(v) for p in REASON_PATTERNS)
        )
        assert not missing, f"{kind}s emitted, not in docs/telemetry.md: {missing}"

    metrics: set[str] = set()
    metric_attributes: set[str] = set()
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                metrics.add(metric.name)
                for point in metric.data.data_points:
                    metric_attributes |= set(point.attributes or {})
    assert schema.METRIC_REQUESTS in metrics
    assert metric_points(reader, schema.METRIC_DECISIONS)
    missing = sorted(name for name in metrics | metric_attributes if not documented(name))
    assert not missing, f"metrics or metric attributes not in docs/telemetry.md: {missing}"


# ---------------------------------------------------------------- problem documents

PROBLEM_BUILDERS = {"problem_body": 3, "problem_document": 3, "_answer": 5}


def problem_kinds_in_source() -> dict[str, set[str]]:
    """kind -> extension members, from every call that builds a problem document."""
    kinds: dict[str, set[str]] = {}
    for path in (ROOT / "src" / "fidelity_mw").rglob("*.py"):
        if path.parent.name == "admin":
            continue  # the admin page's own answers (docs/admin.md), not the service's
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            index = PROBLEM_BUILDERS.get(str(name))
            if index is None or len(node.args) <= index:
                continue
            kind = node.args[index]
            if not isinstance(kind, ast.Constant) or not isinstance(kind.value, str):
                continue  # a helper passing its own `kind` through: its callers are seen
            members = kinds.setdefault(kind.value, set())
            members |= {k.arg for k in node.keywords if k.arg}
            if name == "_answer":  # (ctx, status, layer, upstream, ...): members of its own
                members.add("layer")
                upstream = node.args[3]
                if not (isinstance(upstream, ast.Constant) and upstream.value is None):
                    members.add("upstream")
    return kinds


def test_every_problem_kind_is_in_the_inbound_table() -> None:
    inbound = (ROOT / "docs" / "inbound.md").read_text(encoding="utf-8")
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `([a-z-]+)` \| [^|]+ \| [^|]+ \|([^|]*)\|$", inbound, re.M)
    }
    kinds = problem_kinds_in_source()
    assert {"rate-limited", "circuit-open", "deadline-exceeded"} <= set(kinds)  # it found them
    assert not set(kinds) - set(rows), (
        f"problem kinds not in docs/inbound.md: {set(kinds) - set(rows)}"
    )
    for kind, members in kinds.items():
        missing = sorted(m for m in members if f"`{m}`" not in rows[kind])
        assert not missing, f"{kind}: members {missing} not in its docs/inbound.md row"


# ---------------------------------------------------------------- units in the reference


def test_every_duration_key_names_its_unit() -> None:
    """A duration's unit is in its name (`_ms` a whole number of milliseconds, `_s` a
    number of seconds), so `open_s = 5` cannot be read as milliseconds; the keys without
    a suffix are counts, shares and ratios."""
    from fidelity_mw.policy.reference import key_docs

    for doc in key_docs():
        if doc.key.endswith("_ms"):
            assert doc.type == "integer", doc.path
        elif doc.key.endswith("_s"):
            assert doc.type == "number", doc.path
        elif doc.type in ("integer", "number"):
            said = doc.description.lower()
            # (a share whose description mentions a second in passing is no duration)
            assert not re.search(r"\bmilliseconds?\b|\bin seconds\b|\bms\b", said), doc.path
