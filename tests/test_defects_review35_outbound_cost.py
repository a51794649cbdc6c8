"""The outbound success path's cost (issue 17 item 3), held by counts, not times.

The async transport's shortcut makes a successful first attempt with two store calls
(`outbound_begin_cells` before it, `record_cells` after it: `outbound_begin_now` and
`record_now` on the plan's own cells, out42) and no other Python call of ours; the
in-process store answers a plain success from the breaker's state without calling
`BreakerState.record`, and must leave the breaker exactly as that call would.
"""

from __future__ import annotations

import asyncio
import dis
import inspect
import logging
import random
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import pytest

import fidelity_mw
import fidelity_mw.outbound.transport
from fidelity_mw import FidelityTransport
from fidelity_mw.context import _CURRENT, DecisionContext
from fidelity_mw.decide.breaker import FAILURE, IGNORED, SUCCESS, BreakerState
from fidelity_mw.engine import Engine
from fidelity_mw.policy import BreakerConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.local import LocalState
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

SRC = str(Path(fidelity_mw.__file__).resolve().parent)
# The counts of Python calls: only where the transport and the store run as Python.
_INTERPRETED = fidelity_mw.outbound.transport.__file__.endswith(".py")  # type: ignore[attr-defined]
interpreted_only = pytest.mark.skipif(
    not _INTERPRETED, reason="compiled: the transport and the store make no Python frames"
)


def _ours(frame: FrameType) -> str | None:
    """`file:function` of a new frame of fidelity_mw's own code (None for anyone else's,
    and for a coroutine resumed: its frame is past its first RESUME)."""
    code = frame.f_code
    path = code.co_filename
    if not path.startswith(SRC):
        return None
    if code.co_flags & (inspect.CO_COROUTINE | inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR):
        first = next(i.offset for i in dis.get_instructions(code) if i.opname == "RESUME")
        if frame.f_lasti > first:
            return None
    return f"{Path(path).relative_to(SRC)}:{code.co_name}"


class Null(httpx.AsyncBaseTransport):
    def __init__(self, status: int = 200) -> None:
        self.status = status

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(self.status, content=b"ok")


@interpreted_only
@pytest.mark.parametrize(
    "url",
    [
        "http://svc.internal/x",  # a host of the system: told our two headers
        "http://api.example.com/x",  # a third party: told nothing
    ],
)
def test_a_successful_shortcut_call_makes_two_store_calls_and_nothing_else(url: str) -> None:
    transport = FidelityTransport(Null(), telemetry=False)
    ctx = DecisionContext(transport.engine, "/r", "GET", transport.engine.clock.monotonic())
    ctx.deadline_at = ctx.started_at + 30.0
    timeouts = httpx.Timeout(5.0).as_dict()

    async def call() -> tuple[list[str], httpx.Request]:
        request = httpx.Request("GET", url, extensions={"timeout": dict(timeouts)})
        called: list[str] = []

        def profile(frame: FrameType, event: str, arg: Any) -> None:
            name = _ours(frame) if event == "call" else None
            if name is not None:
                called.append(name)

        before = list(request.headers.raw)
        token = _CURRENT.set(ctx)
        sys.setprofile(profile)
        try:
            response = await transport.handle_async_request(request)
        finally:
            sys.setprofile(None)
            _CURRENT.reset(token)
        assert response.status_code == 200
        assert list(request.headers.raw) == before  # nothing of ours left on it
        return called, request

    async def calls() -> list[list[str]]:
        return [(await call())[0] for _ in range(3)]

    found = asyncio.run(calls())
    # The first call arms the shortcut (its plan, observer and store looked up); the
    # next ones take it: the transport's own frame and the store's two operations.
    assert (
        found[1]
        == found[2]
        == [
            "outbound/transport.py:handle_async_request",
            "state/local.py:outbound_begin_cells",
            "state/local.py:record_cells",
        ]
    )


# ---------------------------------------------------------------- record_now's first answer


# BreakerState's fields (its `__slots__`, which the compiled class does not expose)
_FIELDS = (
    "_bucket_end", "_bucket_s", "_totals", "buckets", "closed_by", "closed_gate", "config",
    "consecutive", "epoch", "erased", "next_probe_id", "open_until", "opened_at", "probes",
    "reopens", "state",
)  # fmt: skip


def test_the_fields_compared_are_the_breakers() -> None:
    if _INTERPRETED:
        assert set(_FIELDS) == set(BreakerState.__slots__)


def _slots(state: BreakerState) -> dict[str, Any]:
    out = {}
    for name in _FIELDS:
        value = getattr(state, name)
        out[name] = [list(b) for b in value] if name == "buckets" else value
        if name in ("_totals", "probes"):
            out[name] = type(value)(value)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_record_now_answers_a_success_as_the_breaker_would(seed: int) -> None:
    """Twin stores, the same gates and outcomes at the same times: one records through
    `LocalState.record_now` (its first answer inlined), the other through
    `BreakerState.record` itself. After every step the two breakers are the same, and so
    are the states they answered. Times go forward in steps around a bucket's length and
    sometimes back (a clock stepped back: Redis TIME after a failover)."""
    rnd = random.Random(seed)
    cfg = BreakerConfig(
        failure_ratio=0.5,
        min_calls=4,
        window_s=1.0,
        open_s=0.2,
        open_jitter=0.0,
        slow_call_ms=50,
        slow_call_ratio=0.5,
        consecutive_failures=rnd.choice([None, 3]),
    )
    fast = LocalState(rng=seeded_random(seed))
    slow = LocalState(rng=seeded_random(seed))
    key = "upstream:svc"
    now = 100.0
    for _ in range(400):
        r = rnd.random()
        now += rnd.choice([0.0, 0.001, 0.05, 0.1, 0.3]) if r > 0.05 else -rnd.choice([0.2, 5.0])
        gate_a = fast.gate_now(key, cfg, now)
        gate_b = slow.gate_now(key, cfg, now)
        assert gate_a == gate_b
        if gate_a.verdict == "reject":
            continue
        outcome = rnd.choices([SUCCESS, FAILURE, IGNORED], [0.85, 0.12, 0.03])[0]
        is_slow = rnd.random() < 0.05
        ended = now + rnd.choice([0.0, 0.002, 0.08])
        if rnd.random() < 0.1:  # an outcome reported after a later call began
            gate_a2 = fast.gate_now(key, cfg, ended)
            gate_b2 = slow.gate_now(key, cfg, ended)
            assert gate_a2 == gate_b2
        got = fast.record_now(key, cfg, gate_a, outcome, is_slow, ended)
        state_b = slow.breakers[key]
        want = state_b.record(gate_b.epoch, gate_b.probe_id, outcome, ended, slow._rng, is_slow)
        assert got == want
        assert _slots(fast.breakers[key]) == _slots(state_b)


def test_an_equal_gate_that_is_not_the_closed_one_is_recorded_the_long_way() -> None:
    """A closed gate equal to the breaker's but another object (a Redis store's fallback
    builds its own) is counted too: by `BreakerState.record`."""
    cfg = BreakerConfig(failure_ratio=0.5, min_calls=4, window_s=1.0)
    store = LocalState(rng=seeded_random(1))
    gate = store.gate_now("b", cfg, 1.0)
    copy = gate._replace()
    assert copy == gate
    assert copy is not gate
    assert store.record_now("b", cfg, copy, SUCCESS, False, 1.01) == "closed"
    assert store.breakers["b"].totals(1.01) == (1, 0, 0)


# ---------------------------------------------------------------- the shortcut's record


def _engine(breaker: BreakerConfig) -> tuple[Engine, FakeClock]:
    clock = FakeClock()
    policy = Policy(
        upstreams=(UpstreamConfig(host="svc.internal", retry=RetryConfig(), breaker=breaker),)
    )
    return Engine(policy, clock=clock, store=MemoryStore(rng=seeded_random(2))), clock


class Slow(httpx.AsyncBaseTransport):
    def __init__(self, clock: FakeClock, took: float) -> None:
        self.clock = clock
        self.took = took

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.clock.advance(self.took)
        return httpx.Response(200, content=b"ok")


def test_a_slow_success_on_the_shortcut_is_counted_slow() -> None:
    breaker = BreakerConfig(slow_call_ms=100, slow_call_ratio=0.5, min_calls=100)
    engine, clock = _engine(breaker)
    inner = Slow(clock, 0.01)
    transport = FidelityTransport(inner, engine=engine, telemetry=False)

    async def calls() -> None:
        for took in (0.01, 0.01, 0.5, 0.01):  # the first arms the shortcut
            inner.took = took
            await transport.handle_async_request(httpx.Request("GET", "http://svc.internal/"))

    asyncio.run(calls())
    state = engine.store.breakers["upstream:svc.internal"]  # type: ignore[attr-defined]
    assert state.totals(clock.monotonic()) == (4, 0, 1)


def test_a_record_that_fails_on_the_shortcut_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine, _ = _engine(BreakerConfig())
    store: Any = engine.store
    transport = FidelityTransport(Null(), engine=engine, telemetry=False)
    failing = [False]
    record = store.record_now

    def record_now(*args: Any) -> Any:
        if failing[0]:
            raise RuntimeError("state gone")
        return record(*args)

    store.record_now = record_now
    transport._armed.local = (None, None)  # (its operations looked up again: this one's)

    async def calls() -> list[int]:
        out = []
        for fail in (False, False, True):
            failing[0] = fail
            response = await transport.handle_async_request(
                httpx.Request("GET", "http://svc.internal/")
            )
            out.append(response.status_code)
        return out

    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        assert asyncio.run(calls()) == [200, 200, 200]
    assert [r.getMessage() for r in caplog.records] == [
        "fidelity_mw: could not record an outcome for svc.internal: state gone"
    ]


# ---------------------------------------------------------------- the body watcher


class OneChunk(httpx.AsyncByteStream):
    """A body still to be read (not `httpx.ByteStream`): one chunk, or a break after it."""

    def __init__(self, breaks: bool = False) -> None:
        self.breaks = breaks

    async def __aiter__(self) -> Any:
        yield b"ok"
        if self.breaks:
            raise httpx.ReadError("connection reset")

    async def aclose(self) -> None:
        pass


class Streamed(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.breaks = False
        self.kind: type[OneChunk] = OneChunk

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=self.kind(self.breaks))


@interpreted_only
def test_a_streamed_body_is_watched_with_one_call_and_read_without_an_async_generator() -> None:
    """The shortcut wraps a body of a class it has seen with the watcher's constructor
    alone (no `Watch` frame, no `watch_body`), and reading it makes no async generator
    of ours (each costs the loop's first-iteration hook and a weak reference)."""
    transport = FidelityTransport(Streamed(), telemetry=False)
    url = "http://svc.internal/x"

    async def call() -> tuple[list[str], list[str], int]:
        request = httpx.Request("GET", url)
        called: list[str] = []

        def profile(frame: FrameType, event: str, arg: Any) -> None:
            name = _ours(frame) if event == "call" else None
            if name is not None:
                called.append(name)

        sys.setprofile(profile)
        try:
            response = await transport.handle_async_request(request)
        finally:
            sys.setprofile(None)
        sent = called
        called = []
        generators = len(asyncio.get_running_loop()._asyncgens)  # type: ignore[attr-defined]
        sys.setprofile(profile)
        try:
            body = b"".join([chunk async for chunk in response.stream])  # type: ignore[union-attr]
            made = len(asyncio.get_running_loop()._asyncgens) - generators  # type: ignore[attr-defined]
            await response.aclose()
        finally:
            sys.setprofile(None)
        assert body == b"ok"
        return sent, called, made

    async def calls() -> list[tuple[list[str], list[str], int]]:
        return [await call() for _ in range(3)]

    found = asyncio.run(calls())
    sent, read, made = found[2]
    assert sent == [
        "outbound/transport.py:handle_async_request",
        "context.py:__init__",  # (a call of its own: outside a request)
        "state/local.py:outbound_begin_cells",
        "state/local.py:record_cells",
        "outbound/body.py:__init__",  # the watcher's, the body's class known
    ]
    assert [name for name in read if name.startswith("outbound/")] == [
        "outbound/body.py:__aiter__",
        "outbound/body.py:__anext__",
        "outbound/body.py:__anext__",  # (its end)
        "outbound/body.py:aclose",
    ]
    assert made == 1  # the inner body's own generator, none of ours


def test_a_body_that_breaks_on_the_shortcut_fails_the_call_with_its_bytes() -> None:
    """Read through the watcher's own iterator: the break is reported once, with the bytes
    read before it, and the caller's read raises the upstream's error."""
    inner = Streamed()
    transport = FidelityTransport(inner, telemetry=False)
    key = "upstream:svc.internal"

    async def calls() -> DecisionContext:
        for _ in range(2):  # the first arms the shortcut and teaches it the body's class
            response = await transport.handle_async_request(
                httpx.Request("GET", "http://svc.internal/")
            )
            await response.aread()
        inner.breaks = True
        response = await transport.handle_async_request(
            httpx.Request("GET", "http://svc.internal/")
        )
        with pytest.raises(httpx.ReadError):
            await response.aread()
        ctx: DecisionContext = response.extensions["fidelity_context"]
        return ctx

    ctx = asyncio.run(calls())
    broke = [d for d in ctx.decisions if d.reason == "failed_in_body"]
    assert len(broke) == 1
    assert broke[0].details == {"error": "ReadError", "bytes": 2}
    store: Any = transport.engine.store
    assert store.breakers[key].totals(transport.engine.clock.monotonic()) == (3, 1, 0)


def test_the_watchers_learned_are_bounded() -> None:
    """A body class made per call (at run time) is watched every time, and the table of
    the classes learned stays bounded."""
    from fidelity_mw.outbound import body as body_module

    inner = Streamed()
    transport = FidelityTransport(inner, telemetry=False)

    async def calls() -> int:
        watched = 0
        for i in range(100):
            inner.kind = type(f"Chunk{i}", (OneChunk,), {})
            response = await transport.handle_async_request(
                httpx.Request("GET", "http://svc.internal/")
            )
            watched += type(response.stream) is body_module.WatchedAsyncStream
            await response.aread()
        return watched

    # the table is the process's: filled here, it would keep any later test's body class
    # from being learned (the streamed-body test above, run after this one in a random
    # order, saw `watch_body` called every time)
    learned = dict(body_module.WATCHERS)
    try:
        assert asyncio.run(calls()) == 100
        assert len(body_module.WATCHERS) <= 64
    finally:
        body_module.WATCHERS.clear()
        body_module.WATCHERS.update(learned)


# ---------------------------------------------------------------- httpx's private layouts


def test_the_shortcut_reads_httpx_layouts_it_checked() -> None:
    """The shortcut reads a URL's host and port by position and the headers' raw list;
    with this httpx both are what it expects (else it is never armed, and every call
    goes through `_start` and `First`, which read them the public way)."""
    from fidelity_mw.outbound import transport as module

    assert module._uri_fields_fit()
    assert module._SHORTCUT_FITS
    url = httpx.URL("http://svc.internal:8080/x")
    assert url._uri_reference[2:4] == (url.host, url.port)


@interpreted_only  # (and a compiled module's Final cannot be patched)
def test_where_the_layouts_differ_calls_go_the_long_way(monkeypatch: pytest.MonkeyPatch) -> None:
    from fidelity_mw.outbound import transport as module

    monkeypatch.setattr(module, "_SHORTCUT_FITS", False)
    transport = FidelityTransport(Null(), telemetry=False)

    async def calls() -> list[str]:
        out = []
        for _ in range(3):
            request = httpx.Request("GET", "http://svc.internal/x")
            before = list(request.headers.raw)
            called: list[str] = []

            def profile(frame: FrameType, event: str, arg: Any, called: list[str] = called) -> None:
                name = _ours(frame) if event == "call" else None
                if name is not None:
                    called.append(name)

            sys.setprofile(profile)
            try:
                response = await transport.handle_async_request(request)
            finally:
                sys.setprofile(None)
            assert response.status_code == 200
            assert list(request.headers.raw) == before
            out.append(called[1])
        return out

    assert asyncio.run(calls()) == ["outbound/transport.py:_handle"] * 3
    assert transport._armed.engine is None
