"""Review 35, long-lived requests (streams, long polls, jobs of many calls): bounded memory
and no slot held forever.

1. Decision records: each outbound call made inside a request added a record to the
   request's context until its response completed (2,000 calls -> 2,002 records, 321 KB; a
   stream that polls an upstream grew without bound). The context now makes room past
   `MAX_DECISIONS` (context.py), keeping the request's own records, the latest, and the
   first `MAX_FLAGGED` other than `allow`, and counting the rest: the span's summary and
   the counters stay exact (`fidelity.decisions.dropped`, `...dropped_counts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import Counter
from typing import Any

import httpx
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy, current
from fidelity_mw.context import MAX_DECISIONS, MAX_FLAGGED, Decision
from fidelity_mw.errors import CircuitOpen
from fidelity_mw.testing import FakeClock
from test_telemetry_helpers import call, counter_values, decision_events, pipeline

# ---------------------------------------------------------------- decision records


def _records_bytes(records: list[Decision]) -> int:
    """The records' memory: the list, each record, each details mapping once (a constant
    one, as the first attempt's, is shared by every record that has it)."""
    total = sys.getsizeof(records)
    seen: set[int] = set()
    for d in records:
        total += sys.getsizeof(d)
        if d.details and id(d.details) not in seen:
            seen.add(id(d.details))
            total += sys.getsizeof(d.details)
    return total


def _server_span(p: Any) -> Any:
    (span,) = [s for s in p.finished() if s.kind is SpanKind.SERVER]
    return span


def _counts(packed: str, dropped_counts: str | None = None) -> Counter[str]:
    """Every decision of a span's summary, by `layer/verdict/reason@source`: the records
    kept (`fidelity.decisions`) and those counted instead (`...dropped_counts`)."""
    counts: Counter[str] = Counter(entry.split("+")[0] for entry in packed.split())
    for entry in (dropped_counts or "").split():
        kind, n = entry.rsplit("=", 1)
        counts[kind] += int(n)
    return counts


class _Polling:
    """A Starlette app whose one route makes `calls` outbound calls through the real
    transport (a MockTransport upstream) inside one request, as a stream that polls an
    upstream does; every 40th call's first attempt is answered 503 (retried)."""

    def __init__(self, calls: int, answer: Any = None) -> None:
        self.calls = calls
        self.clock = FakeClock()
        self.seen: dict[str, Any] = {}
        self.peak = 0
        upstream = httpx.MockTransport(answer or self.answer)
        self.client = httpx.AsyncClient(transport=FidelityTransport(upstream, clock=self.clock))

    @staticmethod
    def answer(request: httpx.Request) -> httpx.Response:
        i = int(request.url.params["i"])
        if i % 40 == 7 and request.headers.get("x-fidelity-attempt", "1") == "1":
            return httpx.Response(503)
        return httpx.Response(200, text="x")

    async def poll(self, request: Any) -> PlainTextResponse:
        ctx = current()
        assert ctx is not None
        self.seen["ctx"] = ctx
        for i in range(self.calls):
            # (the upstream's breaker may open: the stream goes on without it)
            with contextlib.suppress(CircuitOpen):
                await self.client.get(f"http://feed.internal/poll?i={i}")
            self.peak = max(self.peak, len(ctx._decisions))
        return PlainTextResponse("done")

    def app(self, **options: Any) -> Starlette:
        app = Starlette(routes=[Route("/poll", self.poll)])
        app.add_middleware(FidelityMiddleware, policy=Policy(), clock=self.clock, **options)
        return app


def test_a_request_of_2000_outbound_calls_keeps_its_records_bounded_and_its_summary_exact() -> None:
    # one period of the upstream's answers (40 calls, one retried) in a short request: no
    # record dropped, the reference for what each call records
    short = _Polling(40)
    reference = pipeline(decision_events="non_allow")
    assert asyncio.run(call(short.app(observer=reference.telemetry), "/poll")).status_code == 200
    assert short.seen["ctx"].dropped_total == 0
    span = _server_span(reference)
    per_period = _counts(span.attributes["fidelity.decisions"])
    own = Counter({k: v for k, v in per_period.items() if not k.startswith(("retry", "budget"))})
    calls = per_period - own
    assert calls["retry/allow/attempt@memory"] == 40  # one per call; the retry its own
    assert sum(v for k, v in calls.items() if "/allow/" not in k) >= 1  # the retry

    polling = _Polling(2_100)  # 52 periods and a half (call 2,087 fails too)
    p = pipeline(decision_events="non_allow")
    assert asyncio.run(call(polling.app(observer=p.telemetry), "/poll")).status_code == 200
    ctx = polling.seen["ctx"]

    # bounded all along, not only at the end: before, 2,100 calls held 2,155 records
    assert polling.peak <= MAX_DECISIONS
    assert len(ctx._decisions) <= MAX_DECISIONS
    assert _records_bytes(ctx._decisions) < 48 * 1024  # before: 2,155 records, 252 KB
    assert ctx.dropped_total > 1_800

    span = _server_span(p)
    attrs = span.attributes
    assert attrs["fidelity.decisions.dropped"] == ctx.dropped_total
    # exact: the records kept and those counted add up to every decision taken
    half = _Polling(20)
    half_p = pipeline(decision_events="non_allow")
    asyncio.run(call(half.app(observer=half_p.telemetry), "/poll"))
    half_span = _server_span(half_p)
    expected = own + Counter({k: 52 * v for k, v in calls.items()})
    expected += _counts(half_span.attributes["fidelity.decisions"]) - own
    got = _counts(attrs["fidelity.decisions"], attrs["fidelity.decisions.dropped_counts"])
    assert got == expected
    assert attrs["fidelity.decisions.dropped"] == sum(got.values()) - len(
        attrs["fidelity.decisions"].split()
    )
    # the request's own decisions kept, first
    kept = attrs["fidelity.decisions"].split()
    assert [k for k in kept[: len(own)]] == [k for k in per_period if k in own]
    # every failure's record kept (53 < MAX_FLAGGED), each with its span event
    events = decision_events(span)
    failures = sum(v for k, v in expected.items() if "/allow/" not in k)
    assert failures == 53
    assert len(events) == failures
    assert {e["fidelity.verdict"] for e in events} == {"retry"}
    # the counter saw every decision too
    counted = counter_values(p.metrics, "fidelity.decisions", "fidelity.layer", "fidelity.verdict")
    assert counted[("retry", "allow")] == expected["retry/allow/attempt@memory"]


def test_failures_past_the_bound_are_counted_and_the_first_ones_kept() -> None:
    """An upstream that fails every call: its breaker opens and every later call is a
    decision other than `allow`. The first MAX_FLAGGED of them keep their records (and
    span events); the rest are counted by kind."""

    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500)

    polling = _Polling(1_000, broken)
    p = pipeline(decision_events="non_allow")
    assert asyncio.run(call(polling.app(observer=p.telemetry), "/poll")).status_code == 200
    ctx = polling.seen["ctx"]
    assert polling.peak <= MAX_DECISIONS
    assert ctx.dropped_total > 500
    flagged = [d for d in ctx.decisions if d.verdict != "allow"]
    # room is made at MAX_DECISIONS: then at most MAX_FLAGGED between head and tail stay
    assert MAX_FLAGGED <= len(flagged) <= MAX_DECISIONS
    span = _server_span(p)
    attrs = span.attributes
    dropped = _counts("", attrs["fidelity.decisions.dropped_counts"])
    assert sum(dropped.values()) == attrs["fidelity.decisions.dropped"] == ctx.dropped_total
    assert any("/allow/" not in kind for kind in dropped)  # failures among the counted
    events = decision_events(span)
    # one event per failure kept, up to the SDK's own bound on a span's events (128)
    assert len(events) == min(len(flagged), 128)
    # the first failures are the ones kept: the breaker's opening among them
    assert any(e["fidelity.layer"] == "breaker" for e in events)
    counted = counter_values(p.metrics, "fidelity.decisions", "fidelity.layer", "fidelity.verdict")
    kinds: Counter[tuple[str, str]] = Counter()
    every = _counts(attrs["fidelity.decisions"], attrs["fidelity.decisions.dropped_counts"])
    for entry, n in every.items():
        layer = entry.split("/")[0].split(":")[0]
        kinds[layer, entry.split("/")[1]] += n
    for key, n in kinds.items():
        assert counted[key] == n, key


def test_records_exported_by_index_stay_where_they_are() -> None:
    """Telemetry that annotated an instrumentation's span at the response's last message
    exported the records up to then by index, and adds events from that index on at the
    end (`before_response_end`, `end`): room is made after them only, and the count of
    records taken stays exact."""
    from fidelity_mw.context import KEEP_TAIL, DecisionContext
    from fidelity_mw.engine import Engine

    ctx = DecisionContext(Engine(Policy(), clock=FakeClock()), "/r", "GET", 0.0)

    def record(i: int, verdict: str = "allow") -> None:
        ctx.decisions.append(Decision("retry", "up", verdict, "attempt", "memory", 0.0, i))

    for i in range(300):
        record(i)
    exported = list(ctx.decisions)
    ctx.seal(len(exported))
    for i in range(300, 1_300):
        record(i, "retry" if i % 100 == 0 else "allow")
    records = ctx.decisions
    assert records[: len(exported)] == exported  # nothing before the seal moved
    assert len(records) <= len(exported) + MAX_DECISIONS
    after = records[len(exported) :]
    assert [d.at for d in after if d.verdict == "retry"] == list(range(300, 1_300, 100))
    assert [d.at for d in after[-KEEP_TAIL:]] == list(range(1_300 - KEEP_TAIL, 1_300))
    assert len(records) + ctx.dropped_total == 1_300
    assert ctx.dropped_counts == {("retry", "up", "allow", "attempt", "memory"): ctx.dropped_total}
