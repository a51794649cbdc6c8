"""Fuzzing what the app does, through the real FidelityMiddleware.

The other fuzz tests vary what a caller sends and what an upstream answers, behind an app
that always answers 200. Here the app is a script drawn by hypothesis: it reads its body
(once, twice, never), starts a response (once, twice, never), sends body messages (with or
without the last one), raises before or after the start, swallows the deadline's cancel,
returns without answering. The same script runs once bare, behind a server-like `send`
that refuses what a server refuses (a second start, a body before the start, a message
after the last), and once behind the middleware, under several policies. Invariants:

- an exception leaves the middleware only if the app (or the server's `send`) raised it
  bare, and then the same one (Starlette's ServerErrorMiddleware, outside, answers it);
- the messages that reach the server are the app's, in order (headers may be added), but
  where the middleware answers for the app (its deadline passed before the response
  started: one 504);
- every bulkhead slot is given back, nothing is left in the deadline watch, no task is
  left pending, and the `current()` context is what it was before the request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from _asgi import http_scope
from fidelity_mw import BreakerConfig, FidelityMiddleware, Policy, RateLimit, RouteConfig
from fidelity_mw.context import current
from fidelity_mw.policy import ConcurrencyConfig, DeadlineConfig
from fidelity_mw.telemetry import Telemetry
from fidelity_mw.testing import FakeClock, seeded_random


class AppError(Exception):
    """The app's own fault."""


class ServerRefused(RuntimeError):
    """What a server raises for a message out of order (uvicorn's RuntimeError)."""


# ---------------------------------------------------------------- the scripted app

# A step: (kind, argument)
STEPS = st.one_of(
    st.tuples(st.just("recv"), st.none()),
    st.tuples(st.just("start"), st.sampled_from([200, 201, 204, 404, 429, 500, 502, 503])),
    st.tuples(st.just("body"), st.booleans()),  # argument: more_body
    st.tuples(st.just("raise"), st.none()),
    st.tuples(st.just("yield"), st.none()),
    st.tuples(st.just("expire"), st.none()),  # the clock passes the deadline
    st.tuples(st.just("swallow"), st.none()),  # catch a cancel from here on and go on
    st.tuples(st.just("return"), st.none()),
    # an httpx error caught by the app, answered 500 from its `except` (as an error handler
    # does); argument: (body messages of that answer, the last one sent, re-raised)
    st.tuples(st.just("handle"), st.tuples(st.integers(0, 10), st.booleans(), st.booleans())),
)


@dataclass
class Run:
    sent: list[tuple[str, Any]] = field(default_factory=list)
    raised: BaseException | None = None
    app_raised: BaseException | None = None
    called: bool = False


def script_app(steps: list[tuple[str, Any]], clock: FakeClock, run: Run) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        run.called = True
        swallow = False
        for kind, arg in steps:
            try:
                if kind == "recv":
                    await receive()
                elif kind == "start":
                    await send({"type": "http.response.start", "status": arg, "headers": []})
                elif kind == "body":
                    await send({"type": "http.response.body", "body": b"x", "more_body": arg})
                elif kind == "raise":
                    run.app_raised = AppError("boom")
                    raise run.app_raised
                elif kind == "yield":
                    await asyncio.sleep(0)
                elif kind == "expire":
                    clock.advance(10.0)
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
                elif kind == "swallow":
                    swallow = True
                elif kind == "return":
                    return
                elif kind == "handle":
                    bodies, last, reraise = arg
                    try:
                        raise httpx.ConnectError("refused")
                    except httpx.ConnectError as exc:
                        await send({"type": "http.response.start", "status": 500, "headers": []})
                        for i in range(bodies):
                            more = not (last and i == bodies - 1)
                            await send(
                                {"type": "http.response.body", "body": b"e", "more_body": more}
                            )
                        if reraise:
                            run.app_raised = exc
                            raise
            except asyncio.CancelledError:
                if not swallow:
                    raise
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()

    return app


def server(run: Run, gone_at: int | None = None) -> tuple[Any, Any]:
    """A receive with one body message, then the client waiting; a send that keeps ASGI's
    order as a server does, and raises OSError from the `gone_at`th message on (the
    client left)."""
    delivered = False
    state = {"started": False, "done": False, "sends": 0}

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"payload", "more_body": False}
        # (a real server blocks until the client leaves: here it has left, or the app
        # reading twice would wait for ever, bare and behind us alike)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        kind = message["type"]
        state["sends"] += 1
        if gone_at is not None and state["sends"] > gone_at:
            raise OSError("the client went away")
        if state["done"]:
            raise ServerRefused(f"{kind} after the response completed")
        if kind == "http.response.start":
            if state["started"]:
                raise ServerRefused("a second start")
            state["started"] = True
            run.sent.append(("start", message["status"]))
        elif kind == "http.response.body":
            if not state["started"]:
                raise ServerRefused("body before start")
            more = bool(message.get("more_body", False))
            run.sent.append(("body", more))
            if not more:
                state["done"] = True

    return receive, send


# ---------------------------------------------------------------- the middlewares

POLICIES: dict[str, Policy] = {
    "plain": Policy(breaker=None),
    "limits+breaker": Policy(
        rate_limits=(RateLimit(rate="1000/s", burst=1000),),
        breaker=BreakerConfig(min_calls=2, open_s=1),
    ),
    "deadline": Policy(deadline=DeadlineConfig(default_ms=1_000), breaker=None),
    "bulkhead+deadline": Policy(
        deadline=DeadlineConfig(default_ms=1_000),
        concurrency=ConcurrencyConfig(limit=2),
        breaker=BreakerConfig(min_calls=2, open_s=1),
    ),
    "adaptive": Policy(
        deadline=DeadlineConfig(default_ms=1_000),
        concurrency=ConcurrencyConfig(limit=4, adaptive=True, min_limit=2),
        breaker=None,
        routes=(RouteConfig(match="/*", name="all"),),
    ),
}


async def run_bare(steps: list[tuple[str, Any]], gone_at: int | None = None) -> Run:
    run = Run()
    app = script_app(steps, FakeClock(), run)
    receive, send = server(run, gone_at)
    try:
        await app(http_scope("/x", "POST"), receive, send)
    except BaseException as exc:
        run.raised = exc
    return run


async def run_through(
    mw: FidelityMiddleware, clock: FakeClock, steps: list[Any], gone_at: int | None = None
) -> Run:
    run = Run()
    mw.app = script_app(steps, clock, run)
    receive, send = server(run, gone_at)
    try:
        await mw(http_scope("/x", "POST"), receive, send)
    except BaseException as exc:
        run.raised = exc
    return run


def bulkheads_empty(mw: FidelityMiddleware) -> None:
    plan = mw.engine.plan_for({"type": "http", "method": "POST", "path": "/x", "root_path": ""})
    if plan.bulkhead is not None:
        assert plan.bulkhead.in_flight == 0


def breaker_failures(mw: FidelityMiddleware) -> tuple[int, int] | None:
    """The route breaker's failures in its window, and its probes in flight."""
    plan = mw.engine.plan_for({"type": "http", "method": "POST", "path": "/x", "root_path": ""})
    if plan.breaker is None or plan.breaker_key is None:
        return None
    state = mw.engine.store.breaker_state(plan.breaker_key, plan.breaker)  # type: ignore[attr-defined]
    _, failed, _ = state.totals(mw.engine.clock.monotonic())
    return failed, len(state.probes)


def same_kind(bare: BaseException | None, ours: BaseException | None) -> bool:
    if bare is None or ours is None:
        return bare is ours
    return type(bare) is type(ours)


def telemetry() -> tuple[Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    mp = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return Telemetry(tracer_provider=tp, meter_provider=mp), exporter


@pytest.mark.parametrize("traced", [False, True], ids=["plain", "traced"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_the_middleware_keeps_the_apps_messages_and_errors(name: str, traced: bool) -> None:
    clock = FakeClock()
    observer, spans = telemetry()
    mw = FidelityMiddleware(
        script_app([], clock, Run()),
        policy=POLICIES[name],
        clock=clock,
        rng=seeded_random(3),
        **({"observer": observer} if traced else {"telemetry": False}),  # type: ignore[arg-type]
    )

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        steps=st.lists(STEPS, max_size=8),
        gone_at=st.one_of(st.none(), st.none(), st.integers(0, 3)),
    )
    # Our 504 (the deadline passed before the app started; or before a 500 of the app's,
    # held, went out) to a client that left: the server raises on its body. Found by
    # seeds 10 and 11 of 20, never by the derandomized one (three 10 s steps pass the
    # default 30 s deadline too).
    @example(steps=[("expire", None)] * 3 + [("handle", (1, False, False))], gone_at=1)
    @example(
        steps=[("handle", (0, False, False)), ("body", False)] + [("expire", None)] * 3, gone_at=1
    )
    def check(steps: list[tuple[str, Any]], gone_at: int | None) -> None:
        failures = breaker_failures(mw)

        async def both() -> tuple[Run, Run, int]:
            bare = await run_bare(steps, gone_at)
            before = len(asyncio.all_tasks())
            ours = await run_through(mw, clock, steps, gone_at)
            for _ in range(5):
                await asyncio.sleep(0)
            assert current() is None
            return bare, ours, len(asyncio.all_tasks()) - before

        ended = len(spans.get_finished_spans())
        bare, ours, tasks_left = asyncio.run(both())
        if traced:  # one span per request, ended however the request went
            assert len(spans.get_finished_spans()) == ended + 1
        after = breaker_failures(mw)
        clock.advance(60.0)  # (breakers opened by this example's failures close again)
        assert tasks_left == 0
        bulkheads_empty(mw)
        if after is not None and failures is not None:
            assert after[1] == 0, "a half-open probe left in flight"
            gone = any(isinstance(e, OSError) for e in (ours.raised,))
            if gone and not isinstance(ours.app_raised, AppError):
                # the client left: no failure of the route's (but the app's own error)
                assert after[0] == failures[0], (steps, gone_at, ours)
        if not ours.called:  # refused by a layer (a breaker the app's failures opened)
            assert ours.raised is None
            assert ours.sent in (
                [("start", 503), ("body", False)],
                [("start", 429), ("body", False)],
            )
            return
        if (
            gone_at is not None
            and isinstance(ours.raised, OSError)
            and not isinstance(bare.raised, OSError)
        ):
            # Our own answer (the deadline's 504) met the server's error for a client
            # that left: the server's error goes back to it, as from an app's answer.
            assert any(k == "expire" for k, _ in steps), (steps, bare, ours)
            return
        expired = (
            any(k == "expire" for k, _ in steps) and POLICIES[name].deadline.default_ms is not None
        )
        answered = ours.sent[-2:] == [("start", 504), ("body", False)] or (
            # our 504 went out, and its body met the server's error for a client that left
            ours.sent[-1:] == [("start", 504)]
            and len(ours.sent) == gone_at
            and isinstance(ours.raised, OSError)
        )
        if expired and answered and ("start", 504) not in bare.sent:
            # the deadline passed before the response started: ours is the one answer
            assert [m for m in ours.sent if m[0] == "start"] == [("start", 504)]
            assert not isinstance(ours.raised, AppError | ServerRefused)
            return
        if ours.raised is not None and bare.raised is not None and ours.app_raised is not None:
            assert ours.raised is ours.app_raised or type(ours.raised) is type(bare.raised)
        assert same_kind(bare.raised, ours.raised), (steps, bare, ours)
        if isinstance(bare.raised, ServerRefused) and any(k == "handle" for k, _ in steps):
            # An app that breaks ASGI's order after answering 500 from an httpx error's
            # handler: the server refuses it behind us too, but the 500 was held
            # (watch.ResponseWatcher.held) and the message that breaks the order went first.
            return
        assert ours.sent == bare.sent, (steps, bare, ours)

    check()


# ---------------------------------------------------------------- many at once, cancelled

QUEUED_POLICIES: dict[str, Policy] = {
    "queue": Policy(
        deadline=DeadlineConfig(default_ms=1_000),
        concurrency=ConcurrencyConfig(limit=2, max_queue=2, queue_timeout_ms=500),
        breaker=BreakerConfig(min_calls=2, open_s=1),
    ),
    "adaptive-newest": Policy(
        deadline=DeadlineConfig(default_ms=1_000),
        concurrency=ConcurrencyConfig(
            limit=2, adaptive=True, min_limit=1, max_limit=4, max_queue=2, newest_first=True
        ),
        breaker=None,
        rate_limits=(RateLimit(rate="1000/s", burst=1000),),
    ),
}


@pytest.mark.parametrize("name", sorted(QUEUED_POLICIES))
def test_requests_cancelled_anywhere_give_back_every_slot(name: str) -> None:
    """Several requests at once through a bulkhead with a queue; some are cancelled (the
    server's task, as when a connection is torn down) after a drawn number of turns: the
    cancel reaches the caller, every slot and queue place is given back, no task is left
    and `current()` is clean."""
    clock = FakeClock()
    mw = FidelityMiddleware(
        dispatch,
        policy=QUEUED_POLICIES[name],
        clock=clock,
        rng=seeded_random(5),
        telemetry=False,
    )

    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        requests=st.lists(
            st.tuples(st.lists(STEPS, max_size=6), st.one_of(st.none(), st.integers(0, 12))),
            min_size=1,
            max_size=5,
        )
    )
    def check(requests: list[tuple[list[tuple[str, Any]], int | None]]) -> None:
        async def all_of_them() -> list[tuple[Run, bool, BaseException | None]]:
            before = asyncio.all_tasks()
            runs: list[Run] = []
            tasks = []
            for steps, _ in requests:
                run = Run()
                runs.append(run)
                app = script_app(steps, clock, run)
                receive, send = server(run)

                async def one(app: Any = app, receive: Any = receive, send: Any = send) -> None:
                    await mw(http_scope("/x", "POST"), receive, send)

                # (one middleware, one app each: the app is chosen by the request's path)
                tasks.append(asyncio.ensure_future(_with_app(mw, app, one)))
            cancelled = [False] * len(tasks)
            for turn in range(14):
                for i, (_, at) in enumerate(requests):
                    if at == turn and not tasks[i].done():
                        cancelled[i] = tasks[i].cancel()
                await asyncio.sleep(0)
            done = await asyncio.gather(*tasks, return_exceptions=True)
            for _ in range(5):
                await asyncio.sleep(0)
            assert current() is None
            left = [t for t in asyncio.all_tasks() - before if not t.done()]
            assert not left, left
            return [
                (run, c, d if isinstance(d, BaseException) else None)
                for run, c, d in zip(runs, cancelled, done, strict=True)
            ]

        results = asyncio.run(all_of_them())
        clock.advance(60.0)
        bulkheads_empty(mw)
        plan = mw.engine.plan_for({"type": "http", "method": "POST", "path": "/x", "root_path": ""})
        assert plan.bulkhead is not None
        assert not plan.bulkhead._waiters
        for (steps, _), (run, cancelled, error) in zip(requests, results, strict=True):
            if cancelled and not any(k == "swallow" for k, _ in steps):
                # the cancel is not swallowed (but by an app that swallows it itself)
                assert isinstance(error, asyncio.CancelledError), (steps, error, run)
            if not cancelled:
                # not cancelled: what the app raised, or what the server refused, or nothing
                assert error is None or isinstance(
                    error, AppError | ServerRefused | httpx.HTTPError
                ), error
            starts = [m for m in run.sent if m[0] == "start"]
            assert len(starts) <= 1

    check()


async def _with_app(mw: FidelityMiddleware, app: Any, go: Any) -> None:
    """Run `go` with `app` behind the middleware: the middleware's app dispatches to the
    request's own by the task it runs in."""
    APPS[asyncio.current_task()] = app
    try:
        await go()
    finally:
        APPS.pop(asyncio.current_task(), None)


APPS: dict[Any, Any] = {}


async def dispatch(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await APPS[asyncio.current_task()](scope, receive, send)


# ---------------------------------------------------------------- websockets and lifespan

WS_STEPS = st.lists(
    st.sampled_from(["recv", "accept", "close", "text", "deny", "deny_body", "raise", "return"]),
    max_size=6,
)


def ws_app(steps: list[str], run: Run) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        run.called = True
        for step in steps:
            if step == "recv":
                await receive()
            elif step == "accept":
                await send({"type": "websocket.accept"})
            elif step == "close":
                await send({"type": "websocket.close", "code": 1000})
            elif step == "text":
                await send({"type": "websocket.send", "text": "hi"})
            elif step == "deny":
                await send({"type": "websocket.http.response.start", "status": 403, "headers": []})
            elif step == "deny_body":
                await send({"type": "websocket.http.response.body", "body": b"no"})
            elif step == "raise":
                run.app_raised = AppError("ws boom")
                raise run.app_raised
            elif step == "return":
                return

    return app


def ws_server(run: Run) -> tuple[Any, Any]:
    messages = [{"type": "websocket.connect"}, {"type": "websocket.receive", "text": "x"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "websocket.disconnect", "code": 1001}

    async def send(message: dict[str, Any]) -> None:
        run.sent.append((message["type"], message.get("status", message.get("code"))))

    return receive, send


@pytest.mark.parametrize("name", ["plain", "limits+breaker", "bulkhead+deadline"])
def test_websocket_scopes_pass_as_they_would_bare(name: str) -> None:
    """A websocket's app, admitted, sends what it sends and raises what it raises."""
    clock = FakeClock()
    observer, _spans = telemetry()
    mw = FidelityMiddleware(
        script_app([], clock, Run()),
        policy=POLICIES[name],
        clock=clock,
        rng=seeded_random(3),
        observer=observer,
    )

    @settings(max_examples=80, deadline=None, derandomize=True)
    @given(steps=WS_STEPS)
    def check(steps: list[str]) -> None:
        def scope() -> dict[str, Any]:
            return {
                "type": "websocket",
                "asgi": {"version": "3.0"},
                "path": "/ws",
                "raw_path": b"/ws",
                "root_path": "",
                "query_string": b"",
                "headers": [(b"host", b"t")],
                "client": ("127.0.0.1", 5000),
                "server": ("t", 80),
                "subprotocols": [],
                "extensions": {"websocket.http.response": {}},
            }

        async def both() -> tuple[Run, Run]:
            bare, ours = Run(), Run()
            receive, send = ws_server(bare)
            try:
                await ws_app(steps, bare)(scope(), receive, send)
            except BaseException as exc:
                bare.raised = exc
            mw.app = ws_app(steps, ours)
            receive, send = ws_server(ours)
            try:
                await mw(scope(), receive, send)
            except BaseException as exc:
                ours.raised = exc
            assert current() is None
            return bare, ours

        clock.advance(60.0)
        bare, ours = asyncio.run(both())
        bulkheads_empty(mw)
        if not ours.called:  # refused by the route's limits: one answer of ours
            assert ours.raised is None
            return
        assert ours.raised is ours.app_raised if bare.raised else ours.raised is None
        assert ours.sent == bare.sent, (steps, bare, ours)

    check()


LIFESPAN_STEPS = st.lists(
    st.sampled_from(["recv", "startup.complete", "startup.failed", "shutdown.complete", "raise"]),
    max_size=5,
)


@pytest.mark.parametrize("name", ["plain", "limits+breaker"])
def test_lifespan_messages_and_errors_pass_as_bare(name: str) -> None:
    clock = FakeClock()

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(steps=LIFESPAN_STEPS)
    def check(steps: list[str]) -> None:
        def app_for(run: Run) -> Any:
            async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
                for step in steps:
                    if step == "recv":
                        await receive()
                    elif step == "raise":
                        run.app_raised = AppError("lifespan boom")
                        raise run.app_raised
                    else:
                        await send({"type": f"lifespan.{step}"})

            return app

        async def one(run: Run, wrap: bool) -> None:
            inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

            async def receive() -> dict[str, Any]:
                if inbox:
                    return inbox.pop(0)
                await asyncio.Event().wait()  # (never: the scripts read at most twice)
                return {}

            async def send(message: dict[str, Any]) -> None:
                run.sent.append((message["type"], None))

            app = app_for(run)
            if wrap:
                app = FidelityMiddleware(
                    app, policy=POLICIES[name], clock=clock, rng=seeded_random(3), telemetry=False
                )
            try:
                await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
            except BaseException as exc:
                run.raised = exc

        bare, ours = Run(), Run()
        if steps.count("recv") > 2:
            return
        asyncio.run(one(bare, False))
        asyncio.run(one(ours, True))
        assert ours.sent == bare.sent
        assert ours.raised is ours.app_raised if bare.raised else ours.raised is None

    check()
