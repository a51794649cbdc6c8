"""Review 44 (hop44): a service's retry that found every other instance paused gave up.

B calls the service `c` of three instances. Two of them answered earlier calls 503 with
`Retry-After: 1` (their own route breakers' sheds, say: all of C is failing), so B
paused them for 1 s. A new call's first attempt goes to the third instance, which
answers a plain 503 (no Retry-After). The retry had nowhere to go but a paused instance,
and B gave up at once as `retry_after_too_long` although no Retry-After was too long:
the pauses were ones the call could wait (every pause is at most `retry_after_max_s`),
well before its deadline. That give-up is not "exhausted" (B had not retried), so B's
caller A sent the request again after the 1 s B advised, and B's new round went to C
again: up to 5 calls at C for one request, and a clean answer only after A's wait and
B's second round (the design question of review 38's all-of-C-down test).

Now the retry waits for the first pause to end and goes there, as it does when another
instance's gate refuses the retry after an answer that had a Retry-After it could
wait: B's attempts run out (exhausted, A does not send it again), or the instance has
recovered and answers. A pause that ends past the deadline gives up at once
(`deadline`, as a Retry-After that reaches the deadline does).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fidelity_mw import (
    BreakerConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock, seeded_random

INSTANCES = ("http://10.0.4.1:8080", "http://10.0.4.2:8080", "http://10.0.4.3:8080")


class Rig:
    """B: its route calls `http://c/`; `mode[host]` is each instance's answer."""

    def __init__(self, seed: int = 3) -> None:
        self.clock = FakeClock()
        self.calls: list[str] = []
        self.mode: dict[str, str] = {}
        self.records: list[Any] = []
        transport = FidelityTransport(
            httpx.MockTransport(self.upstream), clock=self.clock, telemetry=False
        )
        client = httpx.AsyncClient(transport=transport)

        async def route(request: Request) -> Response:
            answer = await client.get("http://c/")
            answer.raise_for_status()
            return Response(answer.content)

        rig = self

        class Keep:
            def start(self, ctx: object, scope: object) -> None:
                return None

            def end(self, ctx: Any, scope: object, token: object) -> None:
                rig.records.append(list(ctx.decisions))

        retry = RetryConfig(attempts=3, base_ms=1, max_ms=1, retry_after_max_s=5.0)
        # B's breaker for an instance opens on its first failure (a callee's own refusal
        # is none): the instance that answers a plain 503 is then known open
        one_failure = BreakerConfig(
            consecutive_failures=1, min_calls=1, open_s=30.0, open_min_s=30.0, open_jitter=0.0
        )
        policy = Policy(
            breaker=None,
            upstreams=(
                UpstreamConfig(host="c", instances=INSTANCES, retry=retry, breaker=one_failure),
            ),
        )
        app = Starlette(routes=[Route("/", route)])
        app.add_middleware(
            FidelityMiddleware,
            policy=policy,
            clock=self.clock,
            rng=seeded_random(seed),
            observer=Keep(),
            telemetry=False,
        )
        self.app = app

    def upstream(self, request: httpx.Request) -> httpx.Response:
        host = str(request.url.host)
        self.calls.append(host)
        mode = self.mode.get(host, "ok")
        if mode == "503":
            return httpx.Response(503)
        if mode == "shed":  # a callee's own control layer: 503, Retry-After 1
            return httpx.Response(
                503, headers={"retry-after": "1", "x-fidelity-decided-by": "breaker"}
            )
        return httpx.Response(200, content=b"ok")

    def get(self, timeout_ms: int | None = None) -> httpx.Response:
        headers = {} if timeout_ms is None else {"x-request-timeout-ms": str(timeout_ms)}

        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
                return await client.get("/", headers=headers)

        return asyncio.run(go())

    def pause_two(self) -> None:
        """Instances 2 and 3 shed (Retry-After 1) until B has been told by both; 1 serves."""
        self.mode = {"10.0.4.2": "shed", "10.0.4.3": "shed"}
        told: set[str] = set()
        for _ in range(20):
            before = len(self.calls)
            assert self.get().status_code == 200
            told.update(h for h in self.calls[before:] if h != "10.0.4.1")
            if told == {"10.0.4.2", "10.0.4.3"}:
                return
            self.clock.advance(0.01)
        raise AssertionError(f"not both paused: {told}")


def _give_ups(decisions: list[Any]) -> list[str]:
    return [d.reason for d in decisions if d.verdict in ("give_up", "reject")]


def test_a_retry_with_every_other_instance_paused_waits_for_the_first_pause() -> None:
    rig = Rig()
    rig.pause_two()
    # all of C failing now: the instance B still sends to answers a plain 503
    rig.mode["10.0.4.1"] = "503"
    before = len(rig.calls)
    response = rig.get()
    calls = rig.calls[before:]
    decisions = rig.records[-1]
    # before: one call to 10.0.4.1, a give-up `retry_after_too_long` after 1 attempt,
    # and a 502 without `x-fidelity-retry: exhausted`: A sends it again
    assert calls[0] == "10.0.4.1"
    assert len(calls) == 3, (calls, decisions)
    assert _give_ups(decisions) == ["attempts"], decisions
    assert response.status_code == 502
    assert response.headers.get("x-fidelity-retry") == "exhausted"
    retries = [d for d in decisions if d.verdict == "retry"]
    # the first retry waited for the first pause to end (1 s after it began), no longer
    assert 900.0 <= retries[0].details["delay_ms"] <= 1000.0, retries


def test_the_waited_instance_serves_the_retry_once_it_has_recovered() -> None:
    rig = Rig()
    rig.pause_two()
    rig.mode = {"10.0.4.1": "503"}  # the paused ones have recovered, the other fails
    before = len(rig.calls)
    response = rig.get()
    calls = rig.calls[before:]
    # before: 502 (give-up `retry_after_too_long`), a healthy instance there after 1 s
    assert response.status_code == 200, (calls, rig.records[-1])
    assert calls == ["10.0.4.1", calls[1]]


def test_a_pause_past_the_deadline_gives_up_at_once() -> None:
    rig = Rig()
    rig.pause_two()
    rig.mode["10.0.4.1"] = "503"
    before = len(rig.calls)
    response = rig.get(timeout_ms=300)  # the pauses end in about 1 s: past the deadline
    calls = rig.calls[before:]
    assert calls == ["10.0.4.1"]
    assert response.status_code == 502
    # (the wait would reach the deadline: `deadline`, as for a Retry-After that does)
    assert _give_ups(rig.records[-1]) == ["deadline"]
