"""Review 44 (rev44): the deadline's timer fired from inside the request's own task.

A clock that runs its timers as it is moved on (`fidelity_mw.testing.FakeClock.advance`,
what `fake_time` gives tests) fired the deadline watch synchronously when the app itself,
or an upstream it mocks, moved time past the request's deadline. The watch cancelled the
running task; the cancel landed at its next await, whatever the app did before that: an
app that answered before awaiting again had its response sent and the server's task end
cancelled (the middleware raised CancelledError, which the app never raised; found by
tests/test_defects_review44_rev_outbound_fuzz.py, 40 of 60 drawn cases), and one that
streamed its answer had the body cut after the start. Now such an expiry is acted on from
the loop, as a real timer fires: an app that answered first keeps its answer, one still
waiting when the loop turns gets the 504.
"""

from __future__ import annotations

import asyncio
from typing import Any

from _asgi import http_scope
from fidelity_mw import FidelityMiddleware, Policy
from fidelity_mw.policy import DeadlineConfig
from fidelity_mw.testing import FakeClock


def serve(app: Any) -> tuple[list[tuple[str, Any]], BaseException | None, FakeClock]:
    clock = FakeClock()
    mw = FidelityMiddleware(
        app(clock),
        policy=Policy(deadline=DeadlineConfig(default_ms=100), breaker=None),
        clock=clock,
        telemetry=False,
    )
    sent: list[tuple[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append((message["type"], message.get("status", message.get("body"))))

    raised: BaseException | None = None
    try:
        asyncio.run(mw(http_scope("/a"), receive, send))
    except BaseException as exc:  # (what the server would get is the point)
        raised = exc
    return sent, raised, clock


def test_an_app_that_answers_after_its_clock_passed_the_deadline_keeps_its_answer() -> None:
    def app(clock: FakeClock) -> Any:
        async def answer(scope: Any, receive: Any, send: Any) -> None:
            clock.advance(0.5)  # (a mocked upstream that took 500 ms of fake time)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        return answer

    sent, raised, _ = serve(app)
    # old: the same messages, then CancelledError out of the middleware
    assert raised is None, repr(raised)
    assert sent == [("http.response.start", 200), ("http.response.body", b"ok")]


def test_a_streamed_answer_started_before_the_task_awaited_is_not_cut() -> None:
    def app(clock: FakeClock) -> Any:
        async def stream(scope: Any, receive: Any, send: Any) -> None:
            clock.advance(0.5)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for part in (b"a", b"b"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
                await asyncio.sleep(0)  # (old: cancelled here, the body cut after "a")
            await send({"type": "http.response.body", "body": b"c"})

        return stream

    sent, raised, _ = serve(app)
    assert raised is None, repr(raised)
    assert [m for _, m in sent] == [200, b"a", b"b", b"c"]


def test_an_app_still_waiting_when_the_loop_turns_gets_the_504_as_before() -> None:
    def app(clock: FakeClock) -> Any:
        async def slow(scope: Any, receive: Any, send: Any) -> None:
            clock.advance(0.5)
            await asyncio.sleep(0)  # cancelled here: the deadline passed first
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"late"})

        return slow

    sent, raised, _ = serve(app)
    assert raised is None, repr(raised)
    assert [kind for kind, _ in sent] == ["http.response.start", "http.response.body"]
    assert sent[0] == ("http.response.start", 504)
