"""Review 45 (hop45): right after a whole-service outage, a retry gave up while the
service answered again.

hop44 measured it from outside (benchmarks/hops_blackbox.py, `all_503`, default policy):
after every instance of C answered 503 for 2 s and recovered, ours refused 0-32 healthy
requests a run where plain httpx refused none. In each: B's first attempt went around
its own open breaker (the ejection bound) to an instance whose own route breaker still
shed (`x-fidelity-decided-by: breaker`, its `Retry-After`), and the retry found every
other instance known open at B and gave up at once (`breaker_open`). The callee's
breakers probe one by one after an outage, each at the end of its own open period, and
B's breakers for them stay open as long; a request that came before the first probe had
nowhere to go at that moment, but an instance answered again within the wait the callee
had asked for.

Now such a retry waits, up to that Retry-After (never past the deadline), for an
instance to answer well again (another call's attempt found it answering), and goes
there; when none does, it gives up as before. It sends nothing while it waits, so in an
outage the service sees no call more than before.
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

INSTANCES = ("http://10.0.5.1:8080", "http://10.0.5.2:8080", "http://10.0.5.3:8080")
HOSTS = tuple(u.split("//")[1].split(":")[0] for u in INSTANCES)


SHED_BODY = b'{"type":"breaker-open"}'


class Shed(httpx.AsyncByteStream):
    """A shed's body as on the wire (length given): when its connection was given back."""

    def __init__(self, clock: FakeClock, closed_at: list[float]) -> None:
        self.clock = clock
        self.closed_at = closed_at

    async def __aiter__(self) -> Any:
        yield SHED_BODY

    async def aclose(self) -> None:
        self.closed_at.append(self.clock.monotonic())


class Rig:
    """B: its route calls `http://c/`; `mode[host]` is each instance's answer. B's breaker
    for an instance opens on its first failure and stays open 30 s."""

    def __init__(self, seed: int = 3) -> None:
        self.clock = FakeClock()
        self.calls: list[tuple[str, str]] = []  # (request id, instance)
        self.mode: dict[str, str] = {}
        self.records: dict[str, list[Any]] = {}
        self.on_shed: Any = None
        self.shed_closed_at: list[float] = []
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
        self.calls.append((request.headers.get("x-id", "?"), host))
        mode = self.mode.get(host, "ok")
        if mode == "503":
            return httpx.Response(503)
        if mode == "shed":  # the instance's own route breaker: 503, Retry-After 2
            if self.on_shed is not None:
                self.on_shed(host)
            body = Shed(self.clock, self.shed_closed_at)
            return httpx.Response(
                503,
                headers={
                    "retry-after": "2",
                    "x-fidelity-decided-by": "breaker",
                    "content-length": str(len(SHED_BODY)),
                },
                stream=body,
            )
        return httpx.Response(200, content=b"ok")

    async def get(self, client: httpx.AsyncClient, rid: str, after: float = 0.0) -> httpx.Response:
        if after:
            await self.clock.sleep(after)
        return await client.get("/", headers={"x-id": rid, "x-request-timeout-ms": "5000"})

    def run(self, *requests: tuple[str, float]) -> list[httpx.Response]:
        async def go() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
                return list(
                    await asyncio.gather(*(self.get(client, rid, at) for rid, at in requests))
                )

        return asyncio.run(go())

    def outage(self) -> None:
        """Every instance answers a plain 503 until B's breakers for all three are open."""
        self.mode = dict.fromkeys(HOSTS, "503")
        for n in range(12):
            self.run((f"o{n}", 0.0))
            if {h for _, h in self.calls} == set(HOSTS):
                return
            self.clock.advance(0.01)
        raise AssertionError(f"not all open: {self.calls}")

    def of(self, rid: str) -> list[str]:
        return [h for r, h in self.calls if r == rid]


def _give_ups(decisions: list[Any]) -> list[str]:
    return [d.reason for d in decisions if d.verdict in ("give_up", "reject")]


def test_a_retry_after_a_shed_waits_for_an_instance_that_answers_again() -> None:
    rig = Rig()
    rig.outage()
    # C recovered, but each instance's own route breaker still sheds until it probes;
    # B's breakers for all three are open (30 s)
    rig.mode = dict.fromkeys(HOSTS, "shed")

    def recovered(host: str) -> None:
        # right after the first shed, the other instances' route breakers probe and close
        rig.mode = {h: ("shed" if h == host else "ok") for h in HOSTS}
        rig.on_shed = None

    rig.on_shed = recovered
    # r1's first attempt is shed; r2, 0.2 s later, goes around B's breaker to another
    # instance and is answered
    r1, r2 = rig.run(("r1", 0.0), ("r2", 0.2))
    shed_at = rig.of("r1")[0]
    assert rig.mode[shed_at] == "shed"
    assert r2.status_code == 200, rig.records["r2"]
    # before: r1 gave up at once (`breaker_open`) with the shed's 503 (502 at B), one call
    assert r1.status_code == 200, (rig.of("r1"), rig.records["r1"])
    assert len(rig.of("r1")) == 2
    assert rig.of("r1")[1] != shed_at
    assert _give_ups(rig.records["r1"]) == []


def test_in_an_outage_the_waiting_retry_sends_nothing_and_gives_up_as_before() -> None:
    rig = Rig()
    rig.outage()
    rig.mode = dict.fromkeys(HOSTS, "shed")  # nobody answers again
    start = rig.clock.monotonic()
    (r1,) = rig.run(("r1", 0.0))
    # one call, as before (no extra call in an outage), the same give-up
    assert rig.of("r1") == [rig.of("r1")[0]]
    assert r1.status_code == 502
    assert _give_ups(rig.records["r1"]) == ["breaker_open"]
    # with the callee's wait passed on, as the give-up at once did
    assert int(r1.headers["retry-after"]) >= 2
    # it waited the callee's Retry-After for an instance to answer, no longer
    waited = rig.clock.monotonic() - start
    assert 1.9 <= waited <= 2.1, waited
    # the shed was read and its connection given back before the wait, not held through
    # it: calls waiting out an outage do not drain a pool other upstreams share
    assert rig.shed_closed_at, "the shed's body was never closed"
    assert rig.shed_closed_at[0] - start < 0.1, rig.shed_closed_at


def test_a_call_whose_deadline_is_shorter_than_the_wait_gives_up_at_once() -> None:
    rig = Rig()
    rig.outage()
    rig.mode = dict.fromkeys(HOSTS, "shed")
    start = rig.clock.monotonic()

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=rig.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
            return await client.get("/", headers={"x-id": "r1", "x-request-timeout-ms": "500"})

    r1 = asyncio.run(go())
    assert len(rig.of("r1")) == 1
    assert r1.status_code in (502, 503)
    assert rig.clock.monotonic() - start < 0.5  # no waiting past the deadline
