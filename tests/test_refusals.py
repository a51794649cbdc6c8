"""Control decisions the middleware answers for the app (issue 13.3, 13.4, 13.6).

An outbound refusal that escaped the app is a 503/504 problem response, never a
500 with a traceback; a deadline that passes while the app runs is a 504 and the
app's work is cancelled (a started response is never cut); units of requests
answered 5xx by a control decision or an upstream fault come back to limits
with `charge = "served"`. All on a fake clock: nothing waits for real.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, Router

from _asgi import http_scope
from fidelity_mw import (
    BreakerConfig,
    CircuitOpen,
    DeadlineConfig,
    FidelityMiddleware,
    Policy,
    RateLimit,
    RouteConfig,
    current,
)
from fidelity_mw.context import GIVE_UP, LAYER_BUDGET, LAYER_RETRY, context_from_scope
from fidelity_mw.decide.breaker import CLOSED
from fidelity_mw.errors import DeadlineExceeded
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio

DEADLINE = DeadlineConfig(default_ms=2000)


def scope_for(target: str) -> dict[str, Any]:
    path, _, query = target.partition("?")
    return http_scope(
        path,
        query_string=query.encode(),
        headers=[(b"host", b"testserver")],
        client=("192.0.2.1", 5000),
    )


class Rig:
    """A Starlette app behind the middleware, driven with raw ASGI calls."""

    def __init__(self, clock: FakeClock, policy: Policy | None = None, **options: Any) -> None:
        self.clock = clock
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.raise_: BaseException | None = None

        async def refuse(request: Request) -> Response:
            assert self.raise_ is not None
            raise self.raise_

        async def slow(request: Request) -> Response:
            try:
                clock.advance(float(request.query_params.get("s", "5")))
                await asyncio.sleep(0)  # the app's next await: cancelled there
            except asyncio.CancelledError:
                self.cancelled.append(request.url.path)
                raise
            self.finished.append(request.url.path)
            return PlainTextResponse("late but whole")

        async def started(request: Request) -> Response:
            async def body() -> Any:
                yield b"first "
                clock.advance(5.0)  # past the deadline, response already started
                await asyncio.sleep(0)
                yield b"second"

            from starlette.responses import StreamingResponse

            return StreamingResponse(body())

        async def swallow(request: Request) -> Response:
            try:
                clock.advance(5.0)
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                self.cancelled.append("swallowed")
            return PlainTextResponse("after swallowing")

        async def ok(request: Request) -> Response:
            return PlainTextResponse("ok")

        # A bare router: exceptions reach the middleware as they do under Starlette's
        # ServerErrorMiddleware (outermost) with `app.add_middleware`.
        app = Router(
            routes=[
                Route("/refuse", refuse),
                Route("/slow", slow),
                Route("/free", slow),
                Route("/started", started),
                Route("/swallow", swallow),
                Route("/ok", ok),
            ]
        )
        policy = policy or Policy(
            deadline=DEADLINE,
            breaker=BreakerConfig(consecutive_failures=1, open_s=60.0),
            routes=(RouteConfig(match="/free", enforce=False),),
        )
        options.setdefault("telemetry", False)
        self.mw = FidelityMiddleware(app, policy=policy, clock=clock, **options)

    async def call(self, path: str) -> tuple[int, dict[bytes, bytes], bytes, Any]:
        scope = scope_for(path)
        messages: list[Mapping[str, Any]] = []

        done = asyncio.Event()
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()  # a client that stays until the response is complete
            return {"type": "http.disconnect"}

        async def send(message: Mapping[str, Any]) -> None:
            messages.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        await self.mw(scope, receive, send)
        start = messages[0]
        body = b"".join(m.get("body", b"") for m in messages[1:])
        return start["status"], dict(start["headers"]), body, context_from_scope(scope)

    def route_breaker(self, route: str) -> str:
        store = self.mw.engine.store
        assert isinstance(store, MemoryStore)
        return store.breakers[f"route:{route}"].state


def problem(body: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(body)
    return doc


# ---------------------------------------------------------------- refusals that escaped


async def test_an_escaped_circuit_open_is_a_503_with_retry_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(FakeClock())
    rig.raise_ = CircuitOpen("open", host="payments.internal", retry_after_s=4.2)
    status, headers, body, ctx = await rig.call("/refuse")
    assert status == 503
    assert headers[b"retry-after"] == b"5"
    assert headers[b"content-type"] == b"application/problem+json"
    assert headers[b"x-fidelity-decided-by"] == b"breaker"
    assert b"x-fidelity-retry" not in headers  # nothing was retried
    doc = problem(body)
    assert doc["status"] == 503
    assert doc["type"].endswith("upstream-circuit-open")
    assert (doc["layer"], doc["upstream"]) == ("breaker", "payments.internal")
    assert (ctx.decided_by, ctx.outcome, ctx.status) == ("breaker", "shed", 503)
    assert rig.route_breaker("/refuse") == CLOSED  # not the route's failure
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_escaped_deadline_exceeded_is_a_504() -> None:
    rig = Rig(FakeClock())
    rig.raise_ = DeadlineExceeded("late", host="payments.internal")
    status, headers, body, ctx = await rig.call("/refuse")
    assert status == 504
    assert b"retry-after" not in headers
    assert headers[b"x-fidelity-decided-by"] == b"deadline"
    assert problem(body)["upstream"] == "payments.internal"
    assert (ctx.decided_by, ctx.outcome) == ("deadline", "expired")


async def test_a_spent_retry_budget_is_a_503_marked_exhausted() -> None:
    rig = Rig(FakeClock())

    async def raise_after_give_up(scope: Any, receive: Any, send: Any) -> None:
        ctx = current()
        assert ctx is not None
        ctx.decide(LAYER_RETRY, "payments.internal", "retry", "connect_error")
        ctx.decide(LAYER_BUDGET, "payments.internal", GIVE_UP, "budget")
        ctx.upstream_exhausted = True
        raise httpx.ConnectError("refused")

    rig.mw.app = raise_after_give_up
    status, headers, body, ctx = await rig.call("/any")
    assert status == 503
    assert headers[b"x-fidelity-retry"] == b"exhausted"
    assert headers[b"x-fidelity-decided-by"] == b"budget"
    assert problem(body)["type"].endswith("retry-budget-exhausted")
    assert (ctx.decided_by, ctx.outcome) == ("budget", "shed")


async def test_a_timeout_that_was_the_deadline_is_a_504() -> None:
    clock = FakeClock()
    rig = Rig(clock)

    async def timed_out(scope: Any, receive: Any, send: Any) -> None:
        clock.advance(3.0)  # the attempt's timeout was the rest of the 2 s deadline
        raise httpx.ReadTimeout("timed out")

    rig.mw.app = timed_out
    # not enforced here: the exception must be what answers
    rig.mw.engine._plans.clear()
    status, _, body, ctx = await rig.call("/free")
    assert status == 504
    assert problem(body)["layer"] == "deadline"
    assert ctx.outcome == "expired"


async def test_other_exceptions_still_propagate() -> None:
    rig = Rig(FakeClock())
    rig.raise_ = httpx.ConnectError("refused")  # a real upstream failure, no give-up
    with pytest.raises(httpx.ConnectError):
        await rig.call("/refuse")
    rig = Rig(FakeClock())  # the first failure opened that route's breaker
    rig.raise_ = RuntimeError("bug")
    with pytest.raises(RuntimeError):
        await rig.call("/refuse")


async def test_answering_refusals_can_be_turned_off() -> None:
    rig = Rig(FakeClock(), answer_refusals=False)
    rig.raise_ = CircuitOpen("open", host="payments.internal", retry_after_s=1.0)
    with pytest.raises(CircuitOpen):
        await rig.call("/refuse")


async def test_a_refusal_after_the_response_started_is_left_alone() -> None:
    rig = Rig(FakeClock())

    async def half(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise CircuitOpen("open", host="payments.internal", retry_after_s=1.0)

    rig.mw.app = half
    with pytest.raises(CircuitOpen):
        await rig.call("/any")


# ---------------------------------------------------------------- deadline while running


async def test_past_the_deadline_the_app_is_cancelled_and_answered_504() -> None:
    rig = Rig(FakeClock())
    status, headers, body, ctx = await rig.call("/slow?s=5")
    assert status == 504
    assert rig.cancelled == ["/slow"]
    assert rig.finished == []
    assert headers[b"x-fidelity-decided-by"] == b"deadline"
    assert problem(body)["type"].endswith("deadline-expired")
    assert (ctx.decided_by, ctx.outcome, ctx.status) == ("deadline", "expired", 504)
    assert [(d.layer, d.verdict, d.reason) for d in ctx.decisions][-1] == (
        "deadline",
        "reject",
        "expired_while_running",
    )
    assert rig.route_breaker("/slow") == CLOSED  # the caller's deadline, not our failure


async def test_within_the_deadline_nothing_is_cancelled() -> None:
    rig = Rig(FakeClock())
    status, _, body, _ = await rig.call("/slow?s=1.5")
    assert (status, body) == (200, b"late but whole")
    assert rig.cancelled == []


async def test_enforce_false_lets_the_route_finish() -> None:
    rig = Rig(FakeClock())
    status, _, body, _ = await rig.call("/free?s=5")
    assert (status, body) == (200, b"late but whole")
    assert rig.cancelled == []


async def test_a_started_response_is_never_cut() -> None:
    rig = Rig(FakeClock())
    status, _, body, ctx = await rig.call("/started")
    assert (status, body) == (200, b"first second")
    assert ctx.outcome == "served"


async def test_an_app_that_swallows_the_cancellation_still_gets_a_504() -> None:
    clock = FakeClock()
    rig = Rig(clock)

    async def swallowing(scope: Any, receive: Any, send: Any) -> None:
        try:
            clock.advance(5.0)
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            rig.cancelled.append("swallowed")  # and returns without an answer

    rig.mw.app = swallowing
    status, _, _, ctx = await rig.call("/any")
    assert status == 504
    assert rig.cancelled == ["swallowed"]
    assert ctx.outcome == "expired"
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0  # our cancellation was taken back


async def test_an_answer_after_a_swallowed_cancellation_goes_out() -> None:
    rig = Rig(FakeClock())
    status, _, body, _ = await rig.call("/swallow")
    assert (status, body) == (200, b"after swallowing")  # started: never replaced


async def test_an_outside_cancellation_wins() -> None:
    clock = FakeClock()
    rig = Rig(clock)

    async def cancelled_twice(scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # e.g. the server shutting down, at the same time
        clock.advance(5.0)
        await asyncio.sleep(0)

    rig.mw.app = cancelled_twice
    task = asyncio.ensure_future(rig.call("/any"))
    with pytest.raises(asyncio.CancelledError):
        await task


# ---------------------------------------------------------------- charge = served | always


def charged(charge: str) -> Policy:
    return Policy(
        deadline=DEADLINE,
        breaker=None,
        rate_limits=(RateLimit(name="l", rate="1/min", burst=1, charge=charge),),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("charge", "second"), [("served", 200), ("always", 429)])
async def test_a_deadline_504_costs_quota_only_when_charged_always(
    charge: str, second: int
) -> None:
    rig = Rig(FakeClock(), charged(charge))
    assert (await rig.call("/slow?s=5"))[0] == 504
    assert (await rig.call("/ok"))[0] == second


@pytest.mark.parametrize(("charge", "second"), [("served", 200), ("always", 429)])
async def test_a_control_refusal_costs_quota_only_when_charged_always(
    charge: str, second: int
) -> None:
    rig = Rig(FakeClock(), charged(charge))
    rig.raise_ = CircuitOpen("open", host="h", retry_after_s=1.0, attempts_made=2)
    assert (await rig.call("/refuse"))[0] == 503
    assert (await rig.call("/ok"))[0] == second


@pytest.mark.parametrize(("charge", "second"), [("served", 200), ("always", 429)])
async def test_an_upstream_give_up_answered_5xx_by_the_app(charge: str, second: int) -> None:
    rig = Rig(FakeClock(), charged(charge))

    async def bad_gateway(scope: Any, receive: Any, send: Any) -> None:
        ctx = current()
        assert ctx is not None
        ctx.upstream_exhausted = True  # the transport gave up on the upstream
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    rig.mw.app = bad_gateway
    status, headers, _, _ = await rig.call("/any")
    assert (status, headers[b"x-fidelity-retry"]) == (502, b"exhausted")
    rig.mw.app = Router(routes=[Route("/ok", lambda r: PlainTextResponse("ok"))])
    assert (await rig.call("/ok"))[0] == second


async def test_an_app_failure_of_its_own_always_costs_quota() -> None:
    rig = Rig(FakeClock(), charged("served"))

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    rig.mw.app = broken
    assert (await rig.call("/any"))[0] == 500
    assert (await rig.call("/any"))[0] == 429


async def test_the_deadline_fires_on_the_real_event_loop() -> None:
    """The system clock: the middleware's one timer is the loop's `call_later`."""
    cancelled = []

    async def hangs(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.Event().wait()  # until cancelled: the test waits ~30 ms
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    mw = FidelityMiddleware(hangs, policy=Policy(breaker=None), telemetry=False)
    sent: list[Mapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)

    scope = scope_for("/")
    scope["headers"] = [(b"x-request-timeout-ms", b"30")]
    await asyncio.wait_for(mw(scope, receive, send), timeout=10.0)
    assert sent[0]["status"] == 504
    assert cancelled == [True]
    assert mw._deadlines.inflight == {}
    # the next request on the same loop is armed and served as usual
    ok = Router(routes=[Route("/", lambda r: PlainTextResponse("ok"))])
    mw.app = ok
    sent.clear()
    await mw(scope_for("/"), receive, send)
    assert sent[0]["status"] == 200
    assert mw._deadlines.inflight == {}


async def test_a_timer_left_on_an_event_loop_that_is_gone_is_replaced() -> None:
    """A middleware outliving its event loop (tests, `asyncio.run` twice): its one timer
    sits on the old loop, overdue. The next request on the new loop, even with a later
    deadline than that timer's, gets a timer on the new loop and is cut at its deadline."""
    cancelled = []

    async def hangs(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    mw = FidelityMiddleware(hangs, policy=Policy(breaker=None), telemetry=False)
    gone = asyncio.new_event_loop()
    gone.close()
    watch = mw._deadlines
    # what an earlier loop left behind: its timer, 2 s overdue (so before any deadline)
    now = time.monotonic()
    watch._loop = gone
    watch._timer_at = now - 2.0
    watch._recheck_at = now - 1.0
    sent: list[Mapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)

    scope = scope_for("/")
    scope["headers"] = [(b"x-request-timeout-ms", b"30")]
    await asyncio.wait_for(mw(scope, receive, send), timeout=10.0)
    assert sent[0]["status"] == 504
    assert cancelled == [True]
    assert watch._loop is asyncio.get_running_loop()


# ------------------------------------- an upstream given up on, its error let out


def _retrying_app(
    error: httpx.TransportError, attempts: int = 3
) -> tuple[Router, list[str], Policy]:
    """An app that calls a dead upstream through FidelityTransport and lets the error out
    (no try/except around the call: the common handler)."""
    from fidelity_mw import FidelityTransport, RetryConfig, UpstreamConfig

    sent: list[str] = []

    def dead(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.host)
        raise error

    client = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(dead)))

    async def handler(request: Request) -> Response:
        await client.get("http://payments.internal/charge")
        return PlainTextResponse("unreachable")

    retry = RetryConfig(attempts=attempts, base_ms=1, max_ms=1)
    policy = Policy(
        deadline=DEADLINE,
        breaker=BreakerConfig(consecutive_failures=1, open_s=60.0),
        upstreams=(UpstreamConfig(host="*", retry=retry),),
    )
    return Router(routes=[Route("/charge", handler)]), sent, policy


@pytest.mark.parametrize(
    ("error", "status", "title"),
    [
        (httpx.ConnectError("refused"), 502, "Bad Gateway"),
        (httpx.ReadTimeout("timed out"), 504, "Gateway Timeout"),
    ],
)
async def test_an_upstream_error_let_out_after_retrying_is_answered_marked_exhausted(
    error: httpx.TransportError, status: int, title: str, caplog: pytest.LogCaptureFixture
) -> None:
    """We retried the upstream and gave up; the app let the error out. The server's bare
    500 carried no `x-fidelity-retry: exhausted`, so a caller could retry a request we
    had already retried (retries multiply down a chain). Now the answer names the
    upstream and carries the marker, as the app's own 5xx after a give-up does; the
    outcome is the app's failure, not a control decision."""
    app, sent, policy = _retrying_app(error)
    rig = Rig(FakeClock(), policy)
    rig.mw.app = app
    with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
        got, headers, body, ctx = await rig.call("/charge")
    assert sent == ["payments.internal"] * 3  # retried, then given up
    assert got == status
    assert headers[b"x-fidelity-retry"] == b"exhausted"
    assert b"x-fidelity-decided-by" not in headers  # the upstream failed, not a control layer
    doc = problem(body)
    assert (doc["status"], doc["title"], doc["upstream"]) == (status, title, "payments.internal")
    assert doc["type"].endswith("upstream-failed")
    assert (ctx.decided_by, ctx.outcome) == ("app", "failed")
    assert type(error).__name__ in caplog.text
    assert f"answered {status}" in caplog.text


async def test_an_upstream_error_not_retried_still_propagates() -> None:
    """With retries off we did not retry: the caller is the nearest owner that may, so
    nothing is marked and the app's error stands as before."""
    app, sent, policy = _retrying_app(httpx.ConnectError("refused"), attempts=1)
    rig = Rig(FakeClock(), policy)
    rig.mw.app = app
    with pytest.raises(httpx.ConnectError):
        await rig.call("/charge")
    assert sent == ["payments.internal"]


async def test_answering_an_upstream_give_up_can_be_turned_off() -> None:
    app, _, policy = _retrying_app(httpx.ConnectError("refused"))
    rig = Rig(FakeClock(), policy, answer_refusals=False)
    rig.mw.app = app
    with pytest.raises(httpx.ConnectError):
        await rig.call("/charge")
