"""Review 46 (hop46): a retry that only waits held the breaker's probe slot.

A retry takes its breaker's gate (and the retry budget) when it is decided, before its
wait: its backoff, or a Retry-After it waits (up to `retry_after_max_s`, 30 s by
default; rev45 noted it for a retry waiting out a paused instance, 1d64cb8). When the
breaker was half-open that gate is a probe: its slot was held through the whole wait, so
every other call found the breaker half-open with its probes out and was refused
(`CircuitOpen`), though nothing was being sent to the upstream.

Now the slot is given back for the wait and taken again when the attempt goes out; when
the breaker refuses it then (another call's probe failed and it opened again), the
retry budget gets the retry back and the call ends as the breaker's refusal.
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
    CircuitOpen,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock, seeded_random

SHED_BODY = b'{"type":"breaker-open"}'


def shed() -> httpx.Response:
    """The upstream's own route breaker's refusal (a 503 the middleware answers): no
    failure for our breaker, a Retry-After of 2 s that the retry waits."""
    return httpx.Response(
        503,
        headers={
            "retry-after": "2",
            "x-fidelity-decided-by": "breaker",
            "content-length": str(len(SHED_BODY)),
        },
        content=SHED_BODY,
    )


class Rig:
    """B: its route calls the plain upstream `http://10.0.7.1/` (an address: a trusted
    peer); our breaker for it opens on one failure for 1 s (2 s after a failed probe)
    and then admits one probe. `script[rid]` answers each call of that request in
    turn."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.calls: list[str] = []
        self.records: dict[str, list[Any]] = {}
        self.script: dict[str, list[httpx.Response]] = {}
        self.errors: dict[str, BaseException] = {}
        clock = self.clock

        async def sleep(seconds: float) -> None:  # waits for the test to move time
            clock.sleeps.append(seconds)
            until = clock.monotonic() + max(0.0, seconds)
            for _ in range(1_000_000):
                if clock.monotonic() >= until:
                    return
                await asyncio.sleep(0)
            raise AssertionError("the test never moved time")

        clock.sleep = sleep  # type: ignore[method-assign]
        transport = FidelityTransport(
            httpx.MockTransport(self.upstream), clock=self.clock, telemetry=False
        )
        client = httpx.AsyncClient(transport=transport)
        rig = self

        async def route(request: Request) -> Response:
            rid = request.headers.get("x-id", "?")
            try:
                answer = await client.get("http://10.0.7.1/", headers={"x-id": rid})
            except CircuitOpen as exc:
                rig.errors[rid] = exc
                return Response(b"refused", 503)
            return Response(answer.content, answer.status_code)

        class Keep:
            def start(self, ctx: object, scope: Any) -> str:
                return dict(scope["headers"]).get(b"x-id", b"?").decode()

            def end(self, ctx: Any, scope: object, token: str) -> None:
                rig.records[token] = list(ctx.decisions)

        retry = RetryConfig(attempts=3, base_ms=1, max_ms=1, retry_after_max_s=5.0)
        breaker = BreakerConfig(
            consecutive_failures=1, min_calls=1, open_s=5.0, open_min_s=1.0, open_jitter=0.0,
            half_open_probes=1,
        )  # fmt: skip
        policy = Policy(
            breaker=None, upstreams=(UpstreamConfig(host="10.0.7.1", retry=retry, breaker=breaker),)
        )
        app = Starlette(routes=[Route("/", route)])
        app.add_middleware(
            FidelityMiddleware,
            policy=policy,
            clock=self.clock,
            rng=seeded_random(5),
            observer=Keep(),
            telemetry=False,
        )
        self.app = app

    def upstream(self, request: httpx.Request) -> httpx.Response:
        rid = request.headers.get("x-id", "?")
        self.calls.append(rid)
        queue = self.script.get(rid)
        return queue.pop(0) if queue else httpx.Response(200, content=b"ok")

    def of(self, rid: str) -> int:
        return self.calls.count(rid)


async def _spin(check: Any) -> None:
    for _ in range(20_000):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("the scenario did not unfold")


def _run(rig: Rig, second: list[httpx.Response]) -> dict[str, Any]:
    """`o` opens the breaker; 1 s later r1's probe is shed and its retry waits the
    shed's Retry-After (2 s); 0.5 s into that wait r2 comes (answered `second`)."""
    rig.script["o"] = [httpx.Response(503)]
    rig.script["r1"] = [shed()]
    rig.script["r2"] = second

    async def go() -> dict[str, Any]:
        transport = httpx.ASGITransport(app=rig.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:

            def get(rid: str) -> Any:
                return client.get("/", headers={"x-id": rid, "x-request-timeout-ms": "9000"})

            out: dict[str, Any] = {"o": await get("o")}
            rig.clock.advance(1.1)  # our breaker for c: half-open, one probe
            rig.clock.sleeps.clear()
            r1 = asyncio.ensure_future(get("r1"))
            await _spin(lambda: rig.clock.sleeps)  # r1 was shed, and waits
            assert rig.clock.sleeps == [2.0], rig.clock.sleeps
            rig.clock.advance(0.5)
            out["r2"] = await get("r2")  # r1 still waits
            assert not r1.done()
            rig.clock.advance(1.6)
            out["r1"] = await r1
            return out

    return asyncio.run(go())


def test_a_call_during_a_retrys_wait_probes_the_half_open_breaker() -> None:
    rig = Rig()
    out = _run(rig, [httpx.Response(200, content=b"ok")])
    # before: r2 was refused without a call (`CircuitOpen`: half-open, its probe slot
    # held by r1, which was only waiting), answered 503
    assert out["r2"].status_code == 200, (rig.errors, rig.records["r2"])
    assert rig.of("r2") == 1
    assert "r2" not in rig.errors
    assert any(d.reason == "half_open_probe" for d in rig.records["r2"])
    # r2's probe closed the breaker; r1's retry went out after its wait, admitted
    assert out["r1"].status_code == 200, rig.records["r1"]
    assert rig.of("r1") == 2
    # (its first attempt was the breaker's probe; its retry was not, nor held one)
    assert [d.reason for d in rig.records["r1"]].count("half_open_probe") == 1


def test_a_retry_refused_when_it_goes_out_gives_its_budget_back() -> None:
    rig = Rig()
    # r2's probe fails: the breaker opens again, for 2 s (past r1's wait)
    out = _run(rig, [httpx.Response(503)])
    assert out["r2"].status_code == 503
    assert rig.of("r2") == 1  # (before: 0, refused)
    # r1's retry, taken again as it goes out, is refused: nothing sent, its retry given
    # back to the budget, and the call ends as the breaker's refusal
    assert rig.of("r1") == 1
    assert isinstance(rig.errors.get("r1"), CircuitOpen), rig.records["r1"]
    refunds = [d for d in rig.records["r1"] if d.verdict == "refund"]
    assert len(refunds) == 1, rig.records["r1"]
    assert refunds[0].details["why"] == "breaker"
    ends = [d.reason for d in rig.records["r1"] if d.verdict in ("give_up", "reject")]
    assert ends == ["breaker_open"], rig.records["r1"]
