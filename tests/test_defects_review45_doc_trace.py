"""docs/telemetry.md's example trace, and its one event as an exporter sends it, against
the run it describes: examples/jaeger's two services in-process on a fake clock, the
second failing order (`decision_events="all"`).

The page showed a trace of an older release: the backend's breaker shed with
`retry_after_s=4.581` and the frontend waited `delay_ms=5000.0` for its third attempt
(the first open period is `open_min_s` now: 0.5 s, and the shed's `Retry-After` 1 s), the
backend was told `remaining_ms=10000.0` (9750: the frontend's 10 s attempt less its
margin), no `advise` event, no `retry_after_s`/`retry_after_scope` details on the retry
after a `Retry-After`, no retry hint on the give-up, another policy version. Now every
span (kind, name, status, the attributes shown) and every event (layer, verdict,
reason, subject, source, detail keys; the values but the jittered ones) is compared.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
from opentelemetry.trace import SpanKind

from fidelity_mw.testing import FakeClock
from test_defects_review45_doc_blocks import block
from test_telemetry_examples import load
from test_telemetry_helpers import decision_events, pipeline

# detail values drawn with jitter, or read off a clock the jitter moved
JITTERED = {"delay_ms", "retry_after_s", "retry_hint_s", "retry_hint_spread_s", "wait_s"}
JITTERED |= {"spread_s", "remaining"}


def _value(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def page_spans() -> list[dict[str, Any]]:
    """The spans of the page's trace, in its order, with their attributes and events."""
    spans: list[dict[str, Any]] = []
    code = block("telemetry.md", "frontend SERVER GET /orders/{sku}")
    for raw in code.splitlines():
        line = raw.lstrip("├└│─ ")
        head = re.match(r"(\w+) (SERVER|CLIENT) (GET(?: /\S+)?)\s+(.*)$", line)
        if head:
            rest = head.group(4)
            attrs = dict(re.findall(r"(\S+?)=(\S+)", rest))
            status = re.search(r"status (\d+)", rest)
            assert status is not None
            attrs["http.response.status_code"] = status.group(1)
            spans.append(
                {
                    "service": head.group(1),
                    "kind": head.group(2),
                    "name": head.group(3),
                    "attrs": attrs,
                    "events": [],
                }
            )
        elif line.startswith("event fidelity.decision"):
            words = line.split()[2:]
            details = dict(w.removeprefix("detail.").split("=", 1) for w in words[5:])
            spans[-1]["events"].append((*words[:5], details))
        else:
            spans[-1]["attrs"].update(re.findall(r"(\S+?)=(\S+)", line))
    return spans


def run_spans() -> list[tuple[str, Any]]:
    """(service, span) of the second failing order, in the page's order."""
    services = load("services")
    front, back = pipeline(), pipeline()
    clock = FakeClock()
    backend = services.create_backend(telemetry=back.telemetry, clock=clock)
    frontend = services.create_frontend(
        telemetry=front.telemetry,
        backend_url="http://backend:8001",
        backend_transport=httpx.ASGITransport(backend),
        clock=clock,
    )

    async def orders() -> list[int]:
        transport = httpx.ASGITransport(frontend)
        async with httpx.AsyncClient(transport=transport, base_url="http://frontend") as c:
            return [
                (await c.get("/orders/sku-3", params={"fail": "1"})).status_code for _ in range(2)
            ]

    try:
        assert asyncio.run(orders()) == [502, 502]
        f_spans, b_spans = front.finished(), back.finished()
    finally:
        front.shutdown()
        back.shutdown()
    servers = sorted(
        (s for s in f_spans if s.kind is SpanKind.SERVER), key=lambda s: s.start_time or 0
    )
    order = servers[1]
    clients = sorted(
        (s for s in f_spans if s.kind is SpanKind.CLIENT and s.parent is not None),
        key=lambda s: s.start_time or 0,
    )
    clients = [s for s in clients if s.parent.span_id == order.context.span_id]
    out: list[tuple[str, Any]] = [("frontend", order)]
    for client in clients:
        out.append(("frontend", client))
        (callee,) = [
            s
            for s in b_spans
            if s.parent is not None and s.parent.span_id == client.context.span_id
        ]
        out.append(("backend", callee))
    return out


def _event(e: dict[str, Any]) -> tuple[Any, ...]:
    details = {
        k.removeprefix("fidelity.detail."): v
        for k, v in e.items()
        if k.startswith("fidelity.detail.")
    }
    return (
        e["fidelity.layer"],
        e["fidelity.verdict"],
        e["fidelity.reason"],
        e["fidelity.subject"],
        e["fidelity.state.source"],
        details,
    )


def _same_details(page: dict[str, str], run: dict[str, Any]) -> bool:
    if set(page) != set(run):
        return False
    return all(k in JITTERED or _value(v) == run[k] for k, v in page.items())


def test_the_example_trace_is_the_run() -> None:
    page = page_spans()
    run = run_spans()
    assert len(page) == len(run) == 7
    for shown, (service, span) in zip(page, run, strict=True):
        where = f"{shown['service']} {shown['kind']} {shown['name']}"
        assert (shown["service"], shown["kind"], shown["name"]) == (
            service,
            span.kind.name,
            span.name,
        ), where
        attrs = dict(span.attributes or {})
        for key, value in shown["attrs"].items():
            assert attrs.get(key) == _value(value) or str(attrs.get(key)) == value, (
                where,
                key,
                value,
                attrs.get(key),
            )
        events = [_event(e) for e in decision_events(span)]
        assert len(shown["events"]) == len(events), (where, shown["events"], events)
        for (*head, details), (*got, got_details) in zip(shown["events"], events, strict=True):
            assert tuple(head) == tuple(got), (where, head, got)
            assert _same_details(details, got_details), (where, head, details, got_details)


def test_the_exported_event_is_the_sheds() -> None:
    """The page's OTLP/JSON-like event: the backend's shed of the second attempt."""
    shown = json.loads(block("telemetry.md", '"name": "fidelity.decision"'))
    shed = run_spans()[4][1]
    (event,) = [e for e in decision_events(shed) if e["fidelity.verdict"] == "shed"]
    attrs = shown["attributes"]
    assert shown["name"] == "fidelity.decision"
    assert set(attrs) == set(event), (set(attrs), set(event))
    for key, value in attrs.items():
        if key.removeprefix("fidelity.detail.") not in JITTERED:
            assert event[key] == value, (key, value, event[key])
