"""Review 46 (hop46): what hop45's waiting retry still refused right after an outage.

hop45 made a retry that follows a callee's own shed wait, up to the callee's
Retry-After, for an instance of the service to answer again, when every other instance
was known open at B. In hops_blackbox (`all_503`, default policy) 1-20 healthy requests a
run were still refused right after the outage, every one by such a retry, in two ways:

1. The retry was planned while another instance looked free here (a half-open breaker
   whose probe slot another call took a moment later): the Retry-After then paused only
   the instance that sent it (`instance` scope), the retry found every instance left
   known open (the half-open one's probe out), and gave up at once: no wait at all.
2. The retry waited, and an instance did answer well again, but a shed of its own had
   paused it a moment before; the pause outlived that good answer, the wait did not take
   the instance, and the call gave up at the wait's end (4-13 a run of 5, the most).

Now both wait and go to the instance that answers again; in an outage they give up as
before, at the callee's Retry-After, having sent nothing more.
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

INSTANCES = ("http://10.0.6.1:8080", "http://10.0.6.2:8080", "http://10.0.6.3:8080")
HOSTS = tuple(u.split("//")[1].split(":")[0] for u in INSTANCES)
SHED_BODY = b'{"type":"breaker-open"}'
OPEN_S = 30.0


def shed() -> httpx.Response:
    """An instance's own route breaker's refusal, as the middleware answers it."""
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
    """B: its route calls `http://c/`. B's breaker for an instance opens on its first
    failure for 30 s and then admits one probe. `answer(rid, host, n)` is the instance's
    answer to the n-th call of the run (async: it may wait)."""

    def __init__(self, seed: int = 3) -> None:
        self.clock = FakeClock()
        self.calls: list[tuple[str, str]] = []  # (request id, instance)
        self.records: dict[str, list[Any]] = {}
        self.answer: Any = None
        transport = FidelityTransport(
            httpx.MockTransport(self.upstream), clock=self.clock, telemetry=False
        )
        client = httpx.AsyncClient(transport=transport)

        async def route(request: Request) -> Response:
            rid = request.headers.get("x-id", "?")
            answer = await client.get("http://c/", headers={"x-id": rid})
            answer.raise_for_status()
            return Response(answer.content)

        rig = self

        class Keep:
            def start(self, ctx: object, scope: Any) -> str:
                return dict(scope["headers"]).get(b"x-id", b"?").decode()

            def end(self, ctx: Any, scope: object, token: str) -> None:
                rig.records[token] = list(ctx.decisions)

        retry = RetryConfig(attempts=3, base_ms=1, max_ms=1, retry_after_max_s=5.0)
        one_failure = BreakerConfig(
            consecutive_failures=1, min_calls=1, open_s=OPEN_S, open_min_s=OPEN_S,
            open_jitter=0.0, half_open_probes=1,
        )  # fmt: skip
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

    async def upstream(self, request: httpx.Request) -> httpx.Response:
        host = str(request.url.host)
        rid = request.headers.get("x-id", "?")
        self.calls.append((rid, host))
        if self.answer is None:
            return httpx.Response(200, content=b"ok")
        answer: httpx.Response = await self.answer(rid, host, len(self.calls))
        return answer

    def run(self, *rids: str) -> list[httpx.Response]:
        async def one(client: httpx.AsyncClient, rid: str) -> httpx.Response:
            return await client.get("/", headers={"x-id": rid, "x-request-timeout-ms": "5000"})

        async def go() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
                return list(await asyncio.gather(*(one(client, rid) for rid in rids)))

        return asyncio.run(go())

    def outage(self) -> None:
        """Every instance answers a plain 503 until B's breakers for all three are open."""

        async def failing(rid: str, host: str, n: int) -> httpx.Response:
            return httpx.Response(503)

        self.answer = failing
        for n in range(12):
            self.run(f"o{n}")
            if {h for _, h in self.calls} == set(HOSTS):
                self.calls.clear()
                return
            self.clock.advance(0.01)
        raise AssertionError(f"not all open: {self.calls}")

    def of(self, rid: str) -> list[str]:
        return [h for r, h in self.calls if r == rid]


def _give_ups(decisions: list[Any]) -> list[str]:
    return [d.reason for d in decisions if d.verdict in ("give_up", "reject")]


async def _until(check: Any) -> None:
    """Let the other requests run until `check()`."""
    for _ in range(20_000):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("the scenario did not unfold")


def test_a_retry_whose_other_instances_turned_half_open_and_busy_waits() -> None:
    """Item 1: the instance that looked free when the retry was planned is half-open
    with its one probe slot taken by then. Before: given up at once (`breaker_open`,
    one call, 502) while the probes at work answered well a moment later."""
    rig = Rig()
    rig.outage()
    rig.clock.advance(OPEN_S + 0.1)  # B's breakers for all three: half-open, a probe each
    release_at = rig.clock.monotonic() + 0.5
    first: list[str] = []

    async def answer(rid: str, host: str, n: int) -> httpx.Response:
        if n == 1:
            # the first probe (r1's): a shed, once the other two probes are out
            first.append(rid)
            await _until(lambda: len(rig.calls) >= 3)
            return shed()
        if n in (2, 3):
            # the other two probes take 0.5 s (or until r1 ended) and succeed
            await _until(lambda: rig.clock.monotonic() >= release_at or first[0] in rig.records)
            return httpx.Response(200, content=b"ok")
        return httpx.Response(200, content=b"ok")

    rig.answer = answer
    responses = dict(zip(("r1", "r2", "r3"), rig.run("r1", "r2", "r3"), strict=True))
    (shed_rid,) = first
    records = rig.records[shed_rid]
    # the retry was planned with another instance looking free: the Retry-After paused
    # only the instance that sent it (the scenario; hop45's wait did not cover it)
    shed_at = rig.of(shed_rid)[0]
    # before: 502 after one call, `breaker_open`, without waiting
    assert responses[shed_rid].status_code == 200, (rig.of(shed_rid), records)
    assert _give_ups(records) == []
    calls = rig.of(shed_rid)
    assert len(calls) == 2, calls
    assert calls[1] != shed_at, calls
    retried = [d for d in records if d.verdict == "retry"]
    assert retried, records
    assert retried[0].details["retry_after_scope"] == "instance", records
    assert all(r.status_code == 200 for r in responses.values())


def test_in_an_outage_such_a_retry_waits_the_retry_after_and_gives_up_as_before() -> None:
    """Item 1, its cost: nobody answers again, so the wait ends at the callee's
    Retry-After with the same give-up, and nothing more was sent."""
    rig = Rig()
    rig.outage()
    rig.clock.advance(OPEN_S + 0.1)
    start = rig.clock.monotonic()
    first: list[str] = []

    async def answer(rid: str, host: str, n: int) -> httpx.Response:
        if n == 1:
            first.append(rid)
            await _until(lambda: len(rig.calls) >= 3)
            return shed()
        if n in (2, 3):  # the other probes fail, 3 s later (after the wait)
            await _until(lambda: rig.clock.monotonic() >= start + 3.0 or first[0] in rig.records)
            return httpx.Response(503)
        return httpx.Response(200, content=b"ok")

    rig.answer = answer
    responses = dict(zip(("r1", "r2", "r3"), rig.run("r1", "r2", "r3"), strict=True))
    (shed_rid,) = first
    assert len(rig.of(shed_rid)) == 1  # no call more
    assert responses[shed_rid].status_code == 502
    assert _give_ups(rig.records[shed_rid]) == ["breaker_open"]
    assert int(responses[shed_rid].headers["retry-after"]) >= 2
    ended = next(d.at for d in rig.records[shed_rid] if d.reason == "breaker_open")
    assert 1.9 <= ended - start <= 2.2, ended - start  # waited the Retry-After, no longer


def held(clock: FakeClock) -> None:
    """Make the clock's sleeps wait for the test to move time (`advance`), so other
    requests can run while a call waits."""

    async def sleep(seconds: float) -> None:
        clock.sleeps.append(seconds)
        until = clock.monotonic() + max(0.0, seconds)
        for _ in range(1_000_000):
            if clock.monotonic() >= until:
                return
            await asyncio.sleep(0)
        raise AssertionError("the test never moved time")

    clock.sleep = sleep  # type: ignore[method-assign]


def test_a_waiting_retry_takes_an_instance_whose_pause_a_good_answer_outlived() -> None:
    """Item 1, the cause of most refusals measured: the instance that answers again had
    shed a call of its own a moment before, and the pause its Retry-After set outlived
    its next good answer. Before: the wait passed it by and gave up (`breaker_open`)."""
    rig = Rig()
    rig.outage()  # B's breakers for all three open for 30 s
    clock = rig.clock
    held(clock)
    clock.sleeps.clear()
    sheds = {"r1", "p1"}
    failing: list[str] = []  # r1's instance, once r1 waits: it fails other calls

    async def answer(rid: str, host: str, n: int) -> httpx.Response:
        if rid in sheds and len(rig.of(rid)) == 1:
            return shed()
        if host in failing and rid != "r1":
            return httpx.Response(503)
        return httpx.Response(200, content=b"ok")

    rig.answer = answer

    async def go() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=rig.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:

            def send(rid: str, deadline_ms: str = "5000") -> Any:
                return client.get("/", headers={"x-id": rid, "x-request-timeout-ms": deadline_ms})

            async def get(rid: str, deadline_ms: str = "5000") -> httpx.Response:
                # (another call that waits on the clock meanwhile: time moves for it)
                task = asyncio.ensure_future(send(rid, deadline_ms))
                idle = 0
                while not task.done():
                    await asyncio.sleep(0)
                    idle += 1
                    if idle % 500 == 0:
                        clock.advance(0.05)
                return task.result()

            out: dict[str, httpx.Response] = {}
            r1 = asyncio.ensure_future(send("r1"))
            # r1's first attempt (around B's open breaker: the ejection bound) is shed;
            # its retry waits, every other instance known open here
            await _until(lambda: len(clock.sleeps) >= 1)
            shed_at = rig.of("r1")[0]
            failing.append(shed_at)
            clock.advance(0.5)  # r1 looks: nothing yet
            await _until(lambda: len(clock.sleeps) >= 2)
            # 0.5 s into r1's wait, p1 goes around B's breaker to another instance, which
            # sheds it too: that instance is paused for 2 s, past the end of r1's wait
            # (p1's short deadline: no retry of its own) ...
            for k in range(10):
                out[f"p{k}"] = await get("p1" if k == 0 else f"p{k}", "100")
                if rig.of("p1")[0] != shed_at:
                    break
                sheds.add("p1")  # (sent to r1's instance: try again elsewhere)
                rig.calls = [c for c in rig.calls if c[0] != "p1"]
            paused_at = rig.of("p1")[0]
            assert paused_at != shed_at, rig.calls
            # ... and answers the next call well (a first attempt: not held back by a pause)
            for k in range(20):
                out[f"g{k}"] = await get(f"g{k}", "100")
                if rig.of(f"g{k}")[0] == paused_at:
                    break
            else:
                raise AssertionError(rig.calls)
            assert not r1.done()
            # r1 looks again (every 50 ms): that instance answered; (the old code's wait
            # ran out at 2 s)
            while not r1.done():
                clock.advance(0.05)
                for _ in range(200):
                    await asyncio.sleep(0)
            out["r1"] = await r1
            return out

    responses = asyncio.run(go())
    records = rig.records["r1"]
    # before: the paused instance was passed by: 502 at the wait's end, `breaker_open`
    assert responses["r1"].status_code == 200, (rig.of("r1"), records)
    assert _give_ups(records) == []
    assert len(rig.of("r1")) == 2
