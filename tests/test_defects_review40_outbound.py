"""Review 40, outbound: what a call leaves behind on the request and in the balancer.

1. A call whose first attempt ended it (the async shortcut, `First.finish` in the
   blocking transport) left that attempt's timeouts on `request.extensions["timeout"]`
   (they bound the body's reads, which httpcore takes from the request when the caller
   reads it): capped at the rest of a short deadline, the request sent again later,
   without any deadline, was sent with that sliver (225 ms of its own 5 s) and told the
   callee so. The loop restored them; now every call starts from the request's own.
2. A transport's balancer kept the times it read on the system clock when a test's
   `fake_time()` put its engine on a fake clock (with a fresh state): an instance that
   had failed before the block was weighed as failing that very instant for the whole
   block (its failure stamped tens of thousands of seconds "after" the fake now, and
   only a success sent after it ends it), so it got no call at all, however far the
   fake clock went.
3. A service with `breaker = false`: a body that broke off while read (after a head as
   quick as the others') did not weigh its instance up, where a failed attempt does,
   breaker or none (review 39 weighed broken bodies only where a breaker watched them):
   the instance breaking every body kept a third of the calls. Now the body is watched
   for the balancer's weight alone (no breaker counts it, nor marks the request).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelitySyncTransport, FidelityTransport
from fidelity_mw.context import _CURRENT, DecisionContext
from fidelity_mw.engine import Engine
from fidelity_mw.policy import BreakerConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, fake_time, seeded_random

URL = "http://svc.internal/x"
OWN = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}


def _engine() -> tuple[Engine, FakeClock]:
    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="*",
                retry=RetryConfig(attempts=3, base_ms=1, max_ms=1),
                breaker=BreakerConfig(),
            ),
        )
    )
    clock = FakeClock()
    return Engine(policy, clock=clock, store=MemoryStore(rng=seeded_random(3))), clock


def _call_async(engine: Engine, handler: Any, request: httpx.Request) -> httpx.Response:
    transport = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    return asyncio.run(transport.handle_async_request(request))


def _call_sync(engine: Engine, handler: Any, request: httpx.Request) -> httpx.Response:
    transport = FidelitySyncTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    return transport.handle_request(request)


@pytest.mark.parametrize("call", [_call_async, _call_sync])
@pytest.mark.parametrize("status", [200, 404])
def test_a_request_sent_again_is_sent_with_its_own_timeouts(call: Any, status: int) -> None:
    engine, clock = _engine()
    sent: list[tuple[str, float]] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        sent.append(
            (request.headers["x-request-timeout-ms"], request.extensions["timeout"]["read"])
        )
        clock.advance(0.005)
        return httpx.Response(status)

    request = httpx.Request("GET", URL, extensions={"timeout": dict(OWN)})
    ctx = DecisionContext(engine, "/route", "GET", clock.monotonic())
    ctx.deadline_at = clock.monotonic() + 0.25  # shorter than the attempt timeout
    token = _CURRENT.set(ctx)
    try:
        call(engine, upstream, request)
    finally:
        _CURRENT.reset(token)
    # the attempt's timeouts stay while its body may still be read
    assert request.extensions["timeout"]["read"] == pytest.approx(0.225)
    call(engine, upstream, request)  # later, outside any request: no deadline
    assert sent[0] == ("203", pytest.approx(0.225))  # the deadline's, less its tenth
    # its own 5 s (the attempt timeout, 10 s, caps none of them), told as such
    assert sent[1] == ("4750", 5.0)
    assert request.extensions["timeout"] == OWN


@pytest.mark.parametrize("call", [_call_async, _call_sync])
def test_timeouts_the_caller_set_since_are_the_ones_sent(call: Any) -> None:
    engine, clock = _engine()
    reads: list[float] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        reads.append(request.extensions["timeout"]["read"])
        return httpx.Response(200)

    request = httpx.Request("GET", URL, extensions={"timeout": dict(OWN)})
    ctx = DecisionContext(engine, "/route", "GET", clock.monotonic())
    ctx.deadline_at = clock.monotonic() + 0.25
    token = _CURRENT.set(ctx)
    try:
        call(engine, upstream, request)
    finally:
        _CURRENT.reset(token)
    request.extensions["timeout"] = {"connect": 1.0, "read": 2.0, "write": 1.0, "pool": 1.0}
    call(engine, upstream, request)
    assert reads == [pytest.approx(0.225), 2.0]


INSTANCES = ("http://10.0.0.1:80", "http://10.0.0.2:80")


def test_fake_time_gives_a_transports_balancer_a_fresh_start() -> None:
    failing = {"on": True}

    def network(request: httpx.Request) -> httpx.Response:
        if request.url.host == "10.0.0.1" and failing["on"]:
            return httpx.Response(503)  # (retried on the other instance)
        return httpx.Response(200)

    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="svc",
                instances=INSTANCES,
                retry=RetryConfig(attempts=3, base_ms=1, max_ms=1),
            ),
        )
    )
    # its own engine, on the system clock: the kind `fake_time()` takes over
    transport = FidelityTransport(httpx.MockTransport(network), policy=policy, telemetry=False)

    async def calls(n: int) -> Counter[str]:
        picked: Counter[str] = Counter()
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(n):
                response = await client.get("http://svc/x")
                assert response.status_code == 200
                ctx = response.extensions["fidelity_context"]
                picked.update(str(d.details["instance"]) for d in ctx.decisions if d.layer == "lb")
        return picked

    async def scenario() -> Counter[str]:
        while (await calls(1))["10.0.0.1"] == 0:  # until 10.0.0.1 failed once
            pass
        failing["on"] = False
        with fake_time() as clock:
            clock.advance(60.0)  # far past any failure's fade
            return await calls(40)

    picked = asyncio.run(scenario())
    # both instances healthy and fresh: the balancer spreads the calls (it sent none to
    # 10.0.0.1, weighed as failing at every fake instant)
    assert picked["10.0.0.1"] > 0
    assert picked["10.0.0.2"] > 0


class BrokenBody(httpx.AsyncByteStream):
    """A body that breaks off after its first chunk."""

    async def __aiter__(self) -> Any:
        yield b"par"
        raise httpx.ReadError("connection reset")


THREE = ("http://10.0.1.1:8080", "http://10.0.1.2:8080", "http://10.0.1.3:8080")


@pytest.mark.anyio
async def test_without_a_breaker_a_broken_body_weighs_its_instance_up() -> None:
    clock = FakeClock()
    seen: list[str] = []

    def network(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url.host))
        clock.advance(0.010)
        if request.url.host == "10.0.1.1":
            return httpx.Response(200, stream=BrokenBody())
        return httpx.Response(200, text="ok")

    up = UpstreamConfig(
        host="payments",
        instances=THREE,
        retry=RetryConfig(attempts=3, base_ms=1, max_ms=2),
        breaker=None,
    )
    engine = Engine(
        Policy(upstreams=(up,)),
        clock=clock,
        rng=seeded_random(7),
        store=MemoryStore(rng=seeded_random(3)),
    )
    transport = FidelityTransport(httpx.MockTransport(network), engine=engine, telemetry=False)
    broke = 0
    contexts = []
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(30):
            try:
                response = await client.get("http://payments/pay")
                contexts.append(response.extensions["fidelity_context"])
            except httpx.ReadError:
                broke += 1
    assert broke == 1  # its first pick; then the others take the calls (it kept 11)
    assert seen.count("10.0.1.1") == 1
    # no breaker: no breaker decision, nothing marked on the requests that went well
    assert not any(d.reason == "failed_in_body" for c in contexts for d in c.decisions)
