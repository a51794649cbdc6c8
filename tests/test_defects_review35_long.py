"""Review 35, long-lived requests (streams, long polls, jobs of many calls): bounded memory
and no slot held forever.

1. Decision records: each outbound call made inside a request added a record to the
   request's context until its response completed (2,000 calls -> 2,002 records, 321 KB; a
   stream that polls an upstream grew without bound). The context now makes room past
   `MAX_DECISIONS` (context.py), keeping the request's own records, the latest, and the
   first `MAX_FLAGGED` other than `allow`, and counting the rest: the span's summary and
   the counters stay exact (`fidelity.decisions.dropped`, `...dropped_counts`).
2. A client that stops reading a streamed response held its bulkhead slot as long as it
   kept its connection: `[concurrency] send_stall_timeout_s` bounds one send's stall
   (below).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import Counter
from typing import Any

import httpx
import pytest
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from _asgi import http_scope
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


# ---------------------------------------------------------------- a client that stops reading
#
# 2. A client that never reads a streamed response held its bulkhead slot (and its adaptive
#    limit's) for as long as it kept the connection: a deadline never cuts a started
#    response, and uvicorn has no write timeout. Now one body message that waits longer
#    than `[concurrency] send_stall_timeout_s` gives the slot back, records a `shed`
#    `send_stalled` decision and ends the response (`SendStalled`, an OSError, from the
#    app's `send`, on which Starlette's StreamingResponse ends as on a disconnect).


def _stream_app(seen: dict[str, Any], chunk: bytes, chunks: int) -> Starlette:
    """`/stream`: a long streamed body; `/ok`: a plain answer. One route for the bulkhead."""

    async def stream(request: Any) -> Any:
        from starlette.responses import StreamingResponse

        seen["ctx"] = current()

        async def body() -> Any:
            for _ in range(chunks):
                yield chunk
                seen["sent"] = seen.get("sent", 0) + 1

        return StreamingResponse(body(), media_type="application/octet-stream")

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/stream", stream), Route("/ok", ok)])


def _stall_policy(stall_s: float, **concurrency: Any) -> Policy:
    from fidelity_mw import RouteConfig
    from fidelity_mw.policy import ConcurrencyConfig

    return Policy(
        breaker=None,
        routes=(
            RouteConfig(
                match="/*",
                name="all",
                concurrency=ConcurrencyConfig(send_stall_timeout_s=stall_s, **concurrency),
            ),
        ),
    )


def _scope(path: str) -> dict[str, Any]:
    return http_scope(
        path,
        spec_version="2.3",
        headers=[(b"host", b"test")],
        client=("10.0.0.1", 5000),
        server=("test", 80),
    )


async def _asgi_get(app: Any, path: str) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # (never: the client stays)
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(_scope(path), receive, send)
    status: int = sent[0]["status"]
    return status


@pytest.mark.anyio
async def test_a_client_that_stops_reading_gives_the_slot_back_after_the_stall_bound() -> None:
    """In process, on a fake clock: the server's `send` blocks from the third body message
    on (a client that took nothing more); advanced past the bound, the slot is free for
    the next request while that connection is still open, and the stream has ended."""
    clock = FakeClock()
    seen: dict[str, Any] = {}
    app = _stream_app(seen, b"x" * 1024, 1_000)
    mw = FidelityMiddleware(app, policy=_stall_policy(5.0, limit=1), clock=clock, telemetry=False)
    blocked = asyncio.Event()
    forever = asyncio.Event()
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await forever.wait()
        return {"type": "http.disconnect"}

    async def stalled_send(message: dict[str, Any]) -> None:
        messages.append(message)
        if len(messages) >= 3:  # start and a chunk taken; the next one the client never takes
            blocked.set()
            await forever.wait()

    streaming = asyncio.ensure_future(mw(_scope("/stream"), receive, stalled_send))
    await asyncio.wait_for(blocked.wait(), 10)
    limiter = mw.engine.bulkheads["all"]
    assert limiter.in_flight == 1
    assert await _asgi_get(mw, "/ok") == 503  # the slot is held by the stalled stream
    clock.advance(4.9)
    for _ in range(5):
        await asyncio.sleep(0)
    assert limiter.in_flight == 1  # not yet: the bound is 5 s
    clock.advance(0.2)
    await asyncio.wait_for(streaming, 10)  # the response was ended: the app returned
    assert not forever.is_set()  # ... while the connection stays
    assert limiter.in_flight == 0
    assert await _asgi_get(mw, "/ok") == 200
    ctx = seen["ctx"]
    stalls = [d for d in ctx.decisions if d.reason == "send_stalled"]
    assert [(d.layer, d.verdict, d.subject) for d in stalls] == [("concurrency", "shed", "all")]
    assert stalls[0].details == {"stalled_ms": 5000.0}
    assert (ctx.decided_by, ctx.outcome) == ("concurrency", "disconnected")
    assert seen["sent"] == 1
    assert len(messages) == 3  # start, a chunk, the stalled one: nothing after it


@pytest.mark.anyio
async def test_a_stream_read_slowly_but_steadily_is_never_cut() -> None:
    """The bound is on one send: a client that takes each chunk within it, however many
    chunks and however long the whole stream, keeps its response (and its slot to the
    last message, as before)."""
    clock = FakeClock()
    seen: dict[str, Any] = {}
    mw = FidelityMiddleware(
        _stream_app(seen, b"x" * 100, 50),
        policy=_stall_policy(5.0, limit=1),
        clock=clock,
        telemetry=False,
    )
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError

    async def slow_send(message: dict[str, Any]) -> None:
        messages.append(message)
        clock.advance(4.0)  # each chunk taken after 4 s: 200 s in all
        await asyncio.sleep(0)

    await mw(_scope("/stream"), receive, slow_send)
    assert messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert len(messages) == 52
    ctx = seen["ctx"]
    assert not [d for d in ctx.decisions if d.reason == "send_stalled"]
    assert (ctx.decided_by, ctx.outcome) == ("app", "served")
    assert mw.engine.bulkheads["all"].in_flight == 0


@pytest.mark.anyio
async def test_the_stall_bound_costs_one_timer_per_bound_not_one_per_message() -> None:
    """The bound is kept by one timer per middleware (watch.StallWatch): a stream of
    1,000 messages taken at once sets it once (a timer handle per message cost about
    three times the message's own work in the middleware)."""
    clock = FakeClock()
    timers: list[float] = []
    call_later = clock.call_later

    def counting(delay: float, callback: Any) -> Any:
        timers.append(delay)
        return call_later(delay, callback)

    clock.call_later = counting  # type: ignore[method-assign]
    seen: dict[str, Any] = {}
    mw = FidelityMiddleware(
        _stream_app(seen, b"x" * 100, 1_000),
        policy=_stall_policy(5.0, limit=1),
        clock=clock,
        telemetry=False,
    )
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    before = len(timers)
    await mw(_scope("/stream"), receive, send)
    assert len(messages) == 1_002
    assert timers[before:].count(5.0) == 1  # (and the deadline's own, 30 s)
    assert seen["ctx"].outcome == "served"


@pytest.mark.anyio
async def test_the_stall_bound_switched_off_holds_the_slot_as_before() -> None:
    clock = FakeClock()
    seen: dict[str, Any] = {}
    mw = FidelityMiddleware(
        _stream_app(seen, b"x" * 1024, 1_000),
        policy=_stall_policy(0, limit=1),
        clock=clock,
        telemetry=False,
    )
    blocked = asyncio.Event()
    forever = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await forever.wait()
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def stalled_send(message: dict[str, Any]) -> None:
        sent.append(message)
        if len(sent) >= 3:
            blocked.set()
            await forever.wait()

    streaming = asyncio.ensure_future(mw(_scope("/stream"), receive, stalled_send))
    await asyncio.wait_for(blocked.wait(), 10)
    clock.advance(3_600.0)
    for _ in range(5):
        await asyncio.sleep(0)
    assert mw.engine.bulkheads["all"].in_flight == 1
    assert not streaming.done()
    forever.set()  # the client leaves: then the slot comes back
    await asyncio.wait_for(streaming, 10)
    assert mw.engine.bulkheads["all"].in_flight == 0


@pytest.mark.slow
def test_under_uvicorn_a_client_that_stops_reading_frees_the_slot_for_the_next() -> None:
    """A real uvicorn server and a raw socket client that sends its request, reads the
    head of the response and then reads nothing more, keeping its connection. Small
    socket buffers on both ends and a stream far larger than them and uvicorn's write
    buffer: the app's `send` soon waits on the client. Before, `/ok` (the same route's
    bulkhead, limit 1) was refused 503 for as long as that client stayed; now it is
    served once the stall bound (1 s) passed, while the client still holds its socket.
    The bound runs on a FakeClock, moved by the test: on the real clock a busy machine
    let it pass before the first `/ok` arrived, which was then served at once."""
    import socket
    import time

    from _loopback import LoopbackServer

    seen: dict[str, Any] = {}
    clock = FakeClock()
    app = FidelityMiddleware(
        _stream_app(seen, b"y" * 65_536, 100_000),  # 6.5 GB: never sent whole
        policy=_stall_policy(1.0, limit=1),
        telemetry=False,
        clock=clock,
    )
    server = LoopbackServer(app)
    server.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8_192)  # (accepted: inherited)
    with server, socket.socket(socket.AF_INET, socket.SOCK_STREAM) as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4_096)
        stalled.connect(("127.0.0.1", server.port))
        stalled.sendall(b"GET /stream HTTP/1.1\r\nhost: test\r\n\r\n")
        assert stalled.recv(64).startswith(b"HTTP/1.1 200")  # the stream started; no more read
        cap = time.monotonic() + 30.0  # generous: bounded in real time too
        with httpx.Client(base_url=server.url, timeout=10.0) as client:
            statuses = [client.get("/ok").status_code]  # the bound has not passed
            while statuses[-1] != 200 and time.monotonic() < cap:
                # the bound passes for the send waiting now (a send that began after the
                # last move waits its own bound: moved again, until one is cut)
                clock.advance(1.0)
                time.sleep(0.02)  # (the stall is handed to the server's loop thread)
                statuses.append(client.get("/ok").status_code)
        assert statuses[-1] == 200, statuses[-10:]
        assert statuses[0] == 503  # held by the stalled stream at first
        ctx = seen["ctx"]
        stalls = [d for d in ctx.decisions if d.reason == "send_stalled"]
        assert [(d.layer, d.verdict) for d in stalls] == [("concurrency", "shed")]
        assert (ctx.decided_by, ctx.outcome) == ("concurrency", "disconnected")
        assert seen["sent"] < 1_000  # the stream ended long before its end
        assert app.engine.bulkheads["all"].in_flight == 0


def test_the_stall_bound_in_toml_is_checked_and_named(tmp_path: Any) -> None:
    from fidelity_mw.errors import PolicyError

    def load(text: str) -> Policy:
        path = tmp_path / "fidelity.toml"
        path.write_text("version = 1\n[concurrency]\nlimit = 4\n" + text)
        return Policy.from_toml(path)

    concurrency = load("send_stall_timeout_s = 2.5\n").concurrency
    assert concurrency is not None
    assert concurrency.send_stall_timeout_s == 2.5
    default = load("").concurrency
    assert default is not None
    assert default.send_stall_timeout_s == 60.0
    off = load("send_stall_timeout_s = 0\n").concurrency
    assert off is not None
    assert off.send_stall_timeout_s == 0
    for bad in ("-1", '"10s"', "nan"):
        with pytest.raises(PolicyError, match="send_stall_timeout_s"):
            load(f"send_stall_timeout_s = {bad}\n")
