"""Review 46 (hop46): the wait for evidence is the async transport's only.

hop45's retry that waits, after a callee's own shed, for an instance of the service to
answer again (`loop._parked`) ran in the sync transport too, and there it blocks the
calling thread for up to the callee's Retry-After. A sync client's thread is mostly a
server's worker (a sync route's, from one pool every sync route of the app shares): in
an outage of the service every call waits that long and gives up all the same, so the
pool fills with calls waiting for evidence that comes only at the outage's end, and
routes that never call the service wait for a thread.

Chosen: the sync transport does not wait for evidence; such a retry gives up at once
(`breaker_open`, the callee's Retry-After passed on), as before round 45. A wait the
retry policy itself asks for (the callee's Retry-After before a retry to the same host,
up to `retry_after_max_s`) still blocks the thread, as documented: that is the retry the
user configured.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from fidelity_mw import (
    BreakerConfig,
    FidelitySyncTransport,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.decide.breaker import OPEN
from fidelity_mw.engine import Engine
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

INSTANCES = ("http://10.0.8.1:8080", "http://10.0.8.2:8080", "http://10.0.8.3:8080")
SHED_BODY = b'{"type":"breaker-open"}'
RETRY = RetryConfig(attempts=3, base_ms=1, max_ms=1, retry_after_max_s=5.0)
BREAKER = BreakerConfig(
    consecutive_failures=1, min_calls=1, open_s=30.0, open_min_s=30.0, open_jitter=0.0
)


def shed(request: httpx.Request) -> httpx.Response:
    """Every instance's own route breaker sheds (a trusted peer: an address)."""
    return httpx.Response(
        503,
        headers={
            "retry-after": "2",
            "x-fidelity-decided-by": "breaker",
            "content-length": str(len(SHED_BODY)),
        },
        content=SHED_BODY,
    )


def outage_engine(clock: FakeClock) -> Engine:
    """A service of three instances whose breakers here are all open (30 s)."""
    store = MemoryStore(rng=seeded_random(3))
    policy = Policy(
        breaker=None,
        upstreams=(UpstreamConfig(host="c", instances=INSTANCES, retry=RETRY, breaker=BREAKER),),
    )
    for url in INSTANCES:
        key = "upstream:" + url.split("//")[1]
        store.breaker_state(key, BREAKER).force(OPEN, clock.monotonic(), seeded_random(0))
    return Engine(policy, store=store, clock=clock, rng=seeded_random(3))


def _ends(response: httpx.Response) -> list[str]:
    ctx: Any = response.extensions["fidelity_context"]
    return [d.reason for d in ctx.decisions if d.verdict in ("give_up", "reject")]


def test_the_sync_transport_gives_up_at_once_where_the_async_one_waits() -> None:
    sync_clock, async_clock = FakeClock(), FakeClock()
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url.host))
        return shed(request)

    sync = FidelitySyncTransport(
        httpx.MockTransport(handler), engine=outage_engine(sync_clock), telemetry=False
    )
    with httpx.Client(transport=sync) as client:
        answer = client.get("http://c/")
    # before: the thread was blocked 2 s (40 looks of 50 ms) for the same give-up
    assert sync_clock.sleeps == [], sync_clock.sleeps[:5]
    assert answer.status_code == 503
    assert len(seen) == 1  # one call, the same give-up
    assert _ends(answer) == ["breaker_open"]

    # the async transport, on the same outage, waits the callee's Retry-After for an
    # instance to answer again (none does: the same give-up at its end, no call more)
    seen.clear()
    transport = FidelityTransport(
        httpx.MockTransport(handler), engine=outage_engine(async_clock), telemetry=False
    )

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport) as client:
            return await client.get("http://c/")

    waited = asyncio.run(go())
    assert waited.status_code == 503
    assert len(seen) == 1
    assert _ends(waited) == ["breaker_open"]
    assert 1.9 <= sum(async_clock.sleeps) <= 2.1, async_clock.sleeps


def test_the_sync_transport_still_waits_a_retry_after_its_policy_waits() -> None:
    """A plain host's 503 with Retry-After: 2: the retry waits it (a thread blocked for
    the retry the user configured), then goes again."""
    clock = FakeClock()
    answers = [shed, lambda request: httpx.Response(200, content=b"ok")]
    policy = Policy(breaker=None, upstreams=(UpstreamConfig(host="10.0.8.9", retry=RETRY),))
    engine = Engine(policy, clock=clock, rng=seeded_random(3))
    transport = FidelitySyncTransport(
        httpx.MockTransport(lambda request: answers.pop(0)(request)), engine=engine,
        telemetry=False,
    )  # fmt: skip
    with httpx.Client(transport=transport) as client:
        answer = client.get("http://10.0.8.9/")
    assert answer.status_code == 200
    assert clock.sleeps == [2.0]
