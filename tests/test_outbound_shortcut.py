"""The async transport's shortcut for the common call (issue 17, item 3).

`FidelityTransport.handle_async_request` makes a plain upstream's call on in-process
state itself once it has seen one from that engine, and hands anything it does not
handle to `first_attempt` / `First` from the step it reached. These tests run the same
calls, in the same order, on one reused transport of each kind (the async one takes its
shortcut, the sync one goes through `First`) and on a fresh async transport per call (no
shortcut yet), and require the same store operations, decisions, attempt counts, wire
headers, timeouts and outcomes from all three; and that each of the shortcut's hand-offs
was really taken.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelitySyncTransport, FidelityTransport
from fidelity_mw.context import _CURRENT, DecisionContext
from fidelity_mw.engine import Engine
from fidelity_mw.policy import BreakerConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

URL = "http://svc.internal/x"
KEY = "upstream:svc.internal"


class Store(MemoryStore):
    """A memory store that logs its outbound operations, and can fail its first gate."""

    def __init__(self) -> None:
        super().__init__(rng=seeded_random(3))
        self.ops: list[tuple[Any, ...]] = []
        self.fail_begin = False

    def outbound_begin_now(self, *args: Any) -> Any:
        self.ops.append(("begin", args[0], args[-1]))
        if self.fail_begin:
            raise RuntimeError("state unavailable")
        return super().outbound_begin_now(*args)

    def outbound_gate_now(self, *args: Any) -> Any:
        self.ops.append(("gate", args[0], args[-2], args[-1]))
        return super().outbound_gate_now(*args)

    def record_now(self, *args: Any) -> Any:
        self.ops.append(("record", args[0], args[3], args[-1]))
        return super().record_now(*args)


class Step:
    """One call: what the upstream answers to each of its attempts (a status, or an
    exception to raise), and how the call is made."""

    def __init__(
        self,
        *answers: int | type[BaseException],
        headers: dict[str, str] | None = None,
        deadline_ms: float | None = None,
        timeout: float | None = 5.0,
        advance: float = 0.0,
        fail_begin: bool = False,
        method: str = "GET",
    ) -> None:
        self.answers = answers
        self.headers = headers
        self.deadline_ms = deadline_ms  # None: outside any request (the call's own context)
        self.timeout = timeout  # None: the request carries no timeouts at all
        self.advance = advance
        self.fail_begin = fail_begin
        self.method = method

    def request(self) -> httpx.Request:
        if self.timeout is None:
            return httpx.Request(self.method, URL, headers=self.headers)
        timeout = httpx.Timeout(self.timeout).as_dict()
        return httpx.Request(
            self.method, URL, headers=self.headers, extensions={"timeout": timeout}
        )


class Watcher:
    """An attempt observer that logs what it is told (`AttemptObserver`, `CallObserver`)."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def attempt_start(self, ctx: DecisionContext, request: httpx.Request, attempt: int) -> Any:
        self.log.append(("start", attempt, request.headers.get("x-fidelity-attempt")))
        return attempt

    def attempt_end(
        self, token: Any, response: httpx.Response | None, error: BaseException | None
    ) -> None:
        status = None if response is None else response.status_code
        self.log.append(("end", token, status, type(error).__name__ if error else None))

    def call_end(self, ctx: DecisionContext) -> None:
        self.log.append(("call_end", len(ctx.decisions)))


def make_engine() -> tuple[Engine, Store, FakeClock]:
    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="*",
                retry=RetryConfig(attempts=3, base_ms=1, max_ms=1),
                breaker=BreakerConfig(
                    consecutive_failures=2, min_calls=100, open_s=0.05, open_jitter=0.0
                ),
            ),
        )
    )
    store, clock = Store(), FakeClock()
    return Engine(policy, clock=clock, rng=seeded_random(5), store=store), store, clock


class Upstream:
    """The inner transport's handler: each step's answers in order, 5 ms each."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.answers: list[int | type[BaseException]] = []
        self.wire: list[tuple[Any, ...]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        headers = request.headers
        self.wire.append(
            (
                headers.get_list("x-fidelity-attempt"),
                headers.get_list("x-request-timeout-ms"),
                dict(request.extensions["timeout"]),
            )
        )
        self.clock.advance(0.005)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, int):
            return httpx.Response(answer)
        raise answer("upstream")


def outcome(
    engine: Engine,
    store: Store,
    upstream: Upstream,
    step: Step,
    request: httpx.Request,
    watcher: Watcher | None,
) -> Callable[[httpx.Response | BaseException, DecisionContext | None], dict[str, Any]]:
    before = list(request.headers.raw)

    def seen(result: httpx.Response | BaseException, ctx: DecisionContext | None) -> dict[str, Any]:
        if isinstance(result, httpx.Response):
            own = result.extensions.get("fidelity_context")
            assert (own is None) == (ctx is not None)  # only a call's own context goes back
            ctx = ctx or own
            shown: Any = result.status_code
        else:
            shown = type(result).__name__
        assert ctx is not None
        facts = {
            "result": shown,
            "ops": list(store.ops),
            "decisions": [
                (d.layer, d.verdict, d.reason, d.state_source, d.state_age_s, d.at)
                for d in ctx.decisions
            ],
            "attempts": dict(ctx.attempts),
            "wire": list(upstream.wire),
            "headers_after": list(request.headers.raw) == before,
            "timeout_after": request.extensions.get("timeout"),
            "exhausted": ctx.upstream_exhausted,
            "observed": list(watcher.log) if watcher else None,
        }
        if watcher:
            watcher.log.clear()
        store.ops.clear()
        upstream.wire.clear()
        return facts

    return seen


def begin(engine: Engine, store: Store, clock: FakeClock, upstream: Upstream, step: Step) -> Any:
    clock.advance(step.advance)
    store.fail_begin = step.fail_begin
    upstream.answers = list(step.answers)
    ctx = None
    if step.deadline_ms is not None:
        ctx = DecisionContext(engine, "/route", "GET", clock.monotonic())
        ctx.deadline_at = clock.monotonic() + step.deadline_ms / 1000.0
    return ctx


def watched(engine: Engine, how: str) -> tuple[Watcher | None, dict[str, Any]]:
    """No observer, the transport's own (`observer=`), or the engine's (as telemetry is)."""
    watcher = Watcher() if how else None
    if how == "engine":
        engine.attempt_observer = watcher
        return watcher, {"telemetry": True}
    return watcher, {"observer": watcher, "telemetry": False}


def run_async(
    steps: list[Step], fresh: bool = False, how: str = ""
) -> tuple[list[dict[str, Any]], list[str]]:
    """The steps on one async transport (or a new one per step); also which way each took."""
    engine, store, clock = make_engine()
    watcher, options = watched(engine, how)
    upstream = Upstream(clock)
    paths: list[str] = []

    def transport() -> FidelityTransport:
        made = FidelityTransport(httpx.MockTransport(upstream), engine=engine, **options)
        handle, first = made._handle, made._first

        async def spy_handle(request: httpx.Request) -> httpx.Response:
            paths.append("handle")
            return await handle(request)

        async def spy_first(*args: Any) -> httpx.Response:
            paths.append("first")
            return await first(*args)

        made._handle = spy_handle  # type: ignore[method-assign]
        made._first = spy_first  # type: ignore[method-assign]
        return made

    async def main() -> list[dict[str, Any]]:
        shared = transport()
        out = []
        for step in steps:
            ctx = begin(engine, store, clock, upstream, step)
            request = step.request()
            seen = outcome(engine, store, upstream, step, request, watcher)
            token = _CURRENT.set(ctx)
            mark = len(paths)
            result: httpx.Response | BaseException
            try:
                result = await (transport() if fresh else shared).handle_async_request(request)
            except BaseException as exc:  # compared, not swallowed
                result = exc
            finally:
                _CURRENT.reset(token)
            if len(paths) == mark:
                paths.append("shortcut")
            out.append(seen(result, ctx))
        return out

    return asyncio.run(main()), paths


def run_sync(steps: list[Step], how: str = "") -> list[dict[str, Any]]:
    engine, store, clock = make_engine()
    watcher, options = watched(engine, how)
    upstream = Upstream(clock)
    transport = FidelitySyncTransport(httpx.MockTransport(upstream), engine=engine, **options)
    out = []
    for step in steps:
        ctx = begin(engine, store, clock, upstream, step)
        request = step.request()
        seen = outcome(engine, store, upstream, step, request, watcher)
        token = _CURRENT.set(ctx)
        result: httpx.Response | BaseException
        try:
            result = transport.handle_request(request)
        except BaseException as exc:  # compared, not swallowed
            result = exc
        finally:
            _CURRENT.reset(token)
        out.append(seen(result, ctx))
    return out


# Each step, and the way the reused async transport must take it.
STEPS = [
    (Step(200), "handle"),  # the transport's first call: the shortcut is not armed yet
    (Step(200), "shortcut"),
    (Step(200, deadline_ms=30_000), "shortcut"),  # inside a request's context
    (Step(503, 200), "shortcut"),  # the loop takes over from the failed response
    (Step(httpx.ConnectError, 200), "shortcut"),  # ... and from the inner transport's error
    (Step(404, method="POST"), "shortcut"),  # not retryable: recorded, handed back
    (Step(200, headers={"x-request-timeout-ms": "7"}), "first"),  # the caller's own header
    (Step(200, headers={"X-Fidelity-Attempt": "9"}, deadline_ms=30_000), "first"),
    (Step(200, deadline_ms=250), "shortcut"),  # the deadline caps the attempt timeout
    (Step(503, 200, deadline_ms=250), "shortcut"),  # ... and the retry's, shorter
    (Step(200, deadline_ms=0), "first"),  # passed already: nothing is sent
    (Step(200, timeout=1.0), "first"),  # timeouts not seen before
    (Step(200, timeout=1.0), "shortcut"),  # ... and now seen
    (Step(200, timeout=30.0), "first"),  # timeouts the attempt timeout caps
    (Step(503, 200, timeout=30.0), "shortcut"),  # ... capped again, on every attempt
    (Step(200, timeout=None), "first"),  # no timeouts at all: capped too
    (Step(200, timeout=None), "shortcut"),
    (Step(200, fail_begin=True), "first"),  # the first gate failed: fail-open, recorded
    (Step(503, 503, 503), "shortcut"),  # two failures open the breaker: the retry is refused
    (Step(200, deadline_ms=30_000), "first"),  # open: refused before anything is sent
    (Step(200, advance=0.1), "first"),  # half-open: this call is the probe, and closes it
    (Step(200), "shortcut"),
]


@pytest.mark.parametrize("how", ["", "transport", "engine"])
def test_the_shortcut_and_first_make_the_same_calls(how: str) -> None:
    """Without an observer, with the transport's own, and with the engine's."""
    steps = [step for step, _ in STEPS]
    shortcut, paths = run_async(steps, how=how)
    # every hand-off was really taken (a test that could not fail otherwise)
    assert paths == [path for _, path in STEPS]
    if how:  # and the observer saw every attempt, and every call's own end
        assert all(facts["observed"] for facts in shortcut if facts["wire"])
        assert ("call_end", 1) in shortcut[1]["observed"]
    fresh, _ = run_async(steps, fresh=True, how=how)
    sync = run_sync(steps, how=how)
    for number, (a, f, s) in enumerate(zip(shortcut, fresh, sync, strict=True)):
        assert a == f, f"step {number}: shortcut vs a fresh transport"
        assert a == s, f"step {number}: async vs sync"


def test_what_the_shortcut_does_on_a_success() -> None:
    steps = [Step(200), Step(200, deadline_ms=30_000)]
    results, paths = run_async(steps)
    assert paths == ["handle", "shortcut"]
    done = results[1]
    assert done["result"] == 200
    at = done["ops"][0][2]
    assert done["ops"] == [("begin", KEY, at), ("record", KEY, "success", at + 0.005)]
    assert done["decisions"] == [("retry", "allow", "attempt", "memory", 0.0, at)]
    assert done["attempts"] == {"svc.internal": 1}
    # one attempt header and one deadline header on the wire, and both off again
    # (told the 5 s read timeout, less a tenth: shorter than the 10 s attempt timeout)
    assert done["wire"] == [(["1"], ["4750"], httpx.Timeout(5.0).as_dict())]
    assert done["headers_after"] is True


def test_the_callers_own_header_is_replaced_on_the_wire_and_given_back() -> None:
    steps = [Step(200), Step(200, headers={"x-request-timeout-ms": "7"})]
    results, paths = run_async(steps)
    assert paths == ["handle", "first"]
    assert results[1]["wire"][0][:2] == (["1"], ["4750"])
    assert results[1]["headers_after"] is True


@pytest.mark.parametrize("cancel_on", [1, 2])
def test_a_cancelled_attempt_gives_its_gate_back(cancel_on: int) -> None:
    """Cancelled while the attempt is in flight, on the transport's first call (`First`)
    or a later one (the shortcut): the breaker slot is released the same way."""
    engine, store, clock = make_engine()
    calls = 0

    class Cancelling(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            nonlocal calls
            calls += 1
            if calls == cancel_on:
                raise asyncio.CancelledError
            return httpx.Response(200)

    async def main() -> list[tuple[Any, ...]]:
        transport = FidelityTransport(Cancelling(), engine=engine, telemetry=False)
        for _ in range(cancel_on - 1):
            await transport.handle_async_request(httpx.Request("GET", URL))
        store.ops.clear()
        with pytest.raises(asyncio.CancelledError):
            await transport.handle_async_request(httpx.Request("GET", URL))
        return list(store.ops)

    ops = asyncio.run(main())
    at = clock.monotonic()
    assert ops == [("begin", KEY, at), ("record", KEY, "ignored", at)]


class RemoteLike:
    """A store without in-process twins (as Redis is): the loop awaits its operations."""

    def __init__(self) -> None:
        self.state = Store()
        self.ops: list[str] = []

    async def outbound_gate(self, *args: Any) -> Any:
        self.ops.append("gate")
        return await self.state.outbound_gate(*args)

    async def record(self, *args: Any) -> Any:
        self.ops.append("record")
        return await self.state.record(*args)


def test_an_engine_whose_store_is_replaced_is_not_taken_on_the_shortcut() -> None:
    """Armed on in-process state, then the engine's store becomes one without
    in-process operations: its calls go through the loop, not the shortcut."""
    engine, _, clock = make_engine()
    upstream = Upstream(clock)
    upstream.answers = [200]
    transport = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    remote = RemoteLike()

    async def main() -> list[int]:
        statuses = [(await transport.handle_async_request(httpx.Request("GET", URL))).status_code]
        engine.store = remote  # type: ignore[assignment]
        for _ in range(2):
            response = await transport.handle_async_request(httpx.Request("GET", URL))
            statuses.append(response.status_code)
        return statuses

    assert asyncio.run(main()) == [200, 200, 200]
    assert remote.ops == ["gate", "record"] * 2


def test_capped_timeouts_are_remembered_and_each_request_gets_its_own() -> None:
    """A client whose timeouts exceed the attempt timeout (10 s) sends equal ones with
    every request: the shortcut takes them, capped, each request with its own mapping."""
    engine, _, clock = make_engine()
    upstream = Upstream(clock)
    upstream.answers = [200]
    transport = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    long = httpx.Timeout(30.0, connect=2.0).as_dict()
    requests = [httpx.Request("GET", URL, extensions={"timeout": dict(long)}) for _ in range(3)]
    handle = transport._handle
    general = 0

    async def counted(request: httpx.Request) -> httpx.Response:
        nonlocal general
        general += 1
        return await handle(request)

    transport._handle = counted  # type: ignore[method-assign]

    async def main() -> None:
        for request in requests:
            await transport.handle_async_request(request)

    asyncio.run(main())
    assert general == 1  # the first call; the others took the shortcut
    capped = {"connect": 2.0, "read": 10.0, "write": 10.0, "pool": 10.0}
    assert [wire[2] for wire in upstream.wire] == [capped] * 3
    timeouts = [request.extensions["timeout"] for request in requests]
    assert timeouts == [capped] * 3
    assert len({id(t) for t in timeouts}) == 3


@pytest.mark.parametrize("calls_before", [0, 1])
def test_a_failure_before_the_send_leaves_nothing_of_ours_on_the_request(
    calls_before: int,
) -> None:
    """A request context whose pending decisions cannot be built (a broken builder)
    fails the call before anything is sent, on `First` (the transport's first call) and
    on the shortcut alike: the request keeps only the caller's headers."""
    engine, _, clock = make_engine()
    upstream = Upstream(clock)
    upstream.answers = [200]
    transport = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)

    def broken(ctx: DecisionContext) -> None:
        raise RuntimeError("cannot build")

    async def main() -> httpx.Request:
        for _ in range(calls_before):
            await transport.handle_async_request(httpx.Request("GET", URL))
        ctx = DecisionContext(engine, "/route", "GET", clock.monotonic())
        ctx._pending = (broken,)
        request = httpx.Request("GET", URL, headers={"accept": "text/plain"})
        token = _CURRENT.set(ctx)
        try:
            with pytest.raises(RuntimeError, match="cannot build"):
                await transport.handle_async_request(request)
        finally:
            _CURRENT.reset(token)
        return request

    request = asyncio.run(main())
    assert [name for name, _ in request.headers.raw] == [b"Host", b"accept"]
    assert len(upstream.wire) == calls_before  # the failed call sent nothing


def test_a_streaming_body_is_judged_before_the_shortcut_sends_it() -> None:
    """A body that cannot be sent twice (an async iterator; MockTransport reads it, which
    leaves a replayable-looking buffer behind) is not retried, on the shortcut as on a
    fresh transport: the judgement is made before the first send."""

    def run(fresh: bool) -> list[Any]:
        engine, store, clock = make_engine()
        upstream = Upstream(clock)
        shared = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)

        async def body() -> Any:
            yield b"part"

        async def main() -> list[Any]:
            upstream.answers = [200]
            await shared.handle_async_request(httpx.Request("GET", URL))  # arms the shortcut
            upstream.answers = [503, 200]
            store.ops.clear()
            transport = (
                FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
                if fresh
                else shared
            )
            response = await transport.handle_async_request(
                httpx.Request("PUT", URL, content=body())
            )
            ctx = response.extensions["fidelity_context"]
            return [response.status_code, [(d.verdict, d.reason) for d in ctx.decisions]]

        return asyncio.run(main())

    shortcut = run(fresh=False)
    assert shortcut == run(fresh=True)
    assert shortcut[0] == 503  # not sent again
    assert ("give_up", "body_not_replayable") in shortcut[1]


def test_the_shortcut_follows_the_host_and_a_new_policy() -> None:
    """The shortcut keeps its last upstream plan at hand: calls alternating between two
    hosts each get their own plan (and breaker), and a policy the engine swaps in replaces
    the plan of a host the shortcut has just served."""
    engine, store, clock = make_engine()
    upstream = Upstream(clock)
    upstream.answers = [200]
    transport = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    other = "http://other.internal:8080/y"
    tighter = Policy(
        upstreams=(
            UpstreamConfig(host="svc.internal", attempt_timeout_ms=2000),
            UpstreamConfig(host="*"),
        )
    )

    async def main() -> None:
        for url in (URL, URL, other, URL, other, other):
            await transport.handle_async_request(httpx.Request("GET", url))
        engine.policy = tighter
        for url in (URL, URL):
            await transport.handle_async_request(httpx.Request("GET", url))

    asyncio.run(main())
    keys = [op[1] for op in store.ops if op[0] == "begin"]
    assert (
        keys
        == [KEY, KEY, "upstream:other.internal:8080", KEY]
        + ["upstream:other.internal:8080"] * 2
        + [KEY] * 2
    )
    assert [wire[1] for wire in upstream.wire] == [["9750"]] * 6 + [["1800"]] * 2
