"""Review 38: a callee that hangs opened no breaker on any hop.

B gives C its attempt time less a tenth (`x-request-timeout-ms`), so C's deadline answers
a hanging C with a 504 marked `x-fidelity-decided-by: deadline` a little before B's own
attempt timeout would fire. B's transport took every marked answer for a control
decision of the callee's, no evidence against it: a C that hung on every request cost
each of B's requests all its attempts, and no breaker (B's for C, C's route breaker,
which leaves the deadline's 504 alone) ever opened. Now a marked deadline 504 is
counted as B's own timeout would be, unless the callee says the time ran out at an
upstream of its own (`x-fidelity-fault: upstream`, which the callee's deadline 504 now
carries once the request called an upstream: the breaker for that upstream owns it).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import _hops38 as hops
from fidelity_mw import (
    BreakerConfig,
    CircuitOpen,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.errors import DeadlineExceeded
from fidelity_mw.testing import FakeClock

UPSTREAM = "http://10.0.3.1:8080/"  # inside the default trusted_peers: its markers believed


def _calls_until_open(headers: dict[str, str], status: int = 504, calls: int = 8) -> int | None:
    """How many calls a transport makes to an upstream answering `status` with
    `headers` before its breaker refuses one (None: it never did in `calls` calls)."""
    clock = FakeClock()
    sent = 0

    def upstream(request: httpx.Request) -> httpx.Response:
        nonlocal sent
        sent += 1
        return httpx.Response(status, headers=headers)

    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host="*",
                retry=RetryConfig(attempts=1),
                breaker=BreakerConfig(consecutive_failures=3, min_calls=3, open_s=30.0),
            ),
        )
    )
    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=policy, clock=clock, telemetry=False
    )

    async def go() -> int | None:
        async with httpx.AsyncClient(transport=transport) as client:
            for i in range(calls):
                try:
                    await client.get(UPSTREAM)
                except CircuitOpen:
                    return i
                clock.advance(0.01)
        return None

    opened = asyncio.run(go())
    assert sent == (calls if opened is None else opened)
    return opened


def test_a_callees_deadline_504_counts_against_it_as_our_timeout_would() -> None:
    # before the fix: never opened (every 504 a control decision of the callee's)
    assert _calls_until_open({"x-fidelity-decided-by": "deadline"}) == 3
    assert _calls_until_open({"x-fidelity-decided-by": "Deadline "}) == 3
    # an unmarked 504 counted before and still does
    assert _calls_until_open({}) == 3


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        # out of time at an upstream of the callee's: that upstream's breaker owns it
        (504, {"x-fidelity-decided-by": "deadline", "x-fidelity-fault": "upstream"}),
        # the callee retried and gave up: its breaker next to the fault owns it
        (504, {"x-fidelity-decided-by": "deadline", "x-fidelity-retry": "exhausted"}),
        # the callee's breaker, its bulkhead: control decisions, no evidence
        (503, {"x-fidelity-decided-by": "breaker", "retry-after": "1"}),
        (503, {"x-fidelity-decided-by": "concurrency", "retry-after": "1"}),
        (503, {"x-fidelity-decided-by": "deadline"}),  # (a deadline's is a 504)
    ],
)
def test_the_callees_other_control_answers_are_still_no_evidence(
    status: int, headers: dict[str, str]
) -> None:
    assert _calls_until_open(headers, status) is None


def _service(calls_before: int) -> Starlette:
    """A service whose route makes `calls_before` upstream calls, then finds its
    deadline spent before the next (the outbound layer's refusal, let out)."""
    client = httpx.AsyncClient(
        transport=FidelityTransport(
            httpx.MockTransport(lambda request: httpx.Response(200)), telemetry=False
        )
    )

    async def route(request: Request) -> Response:
        for _ in range(calls_before):
            (await client.get(UPSTREAM)).raise_for_status()
        raise DeadlineExceeded("no time left to call it", host="10.0.3.1:8080")

    app = Starlette(routes=[Route("/", route)])
    app.add_middleware(FidelityMiddleware, policy=Policy(), telemetry=False)
    return app


@pytest.mark.parametrize("calls_before", [0, 1])
def test_a_deadline_504_after_an_upstream_call_says_the_time_may_have_gone_there(
    calls_before: int,
) -> None:
    app = _service(calls_before)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            return await client.get("/", headers={"x-request-timeout-ms": "1000"})

    response = asyncio.run(go())
    assert response.status_code == 504
    assert response.headers["x-fidelity-decided-by"] == "deadline"
    fault = response.headers.get("x-fidelity-fault")
    # no call made: the time ran out here (a caller counts it); after one: maybe there
    assert fault == ("upstream" if calls_before else None)


def test_real_chain_all_of_c_hanging_opens_bs_breakers_for_c() -> None:
    # every instance of C hangs: C's deadline answers each of B's attempts 504 a tenth
    # before B's attempt timeout. Before the fix, B's breakers for C's instances stayed
    # closed through every request (each attempt `breaker_closed`); now they open on
    # the hang (per instance: 4 consecutive failures) and B's later attempts are their
    # probes (the rig's open period, 0.4 s, is shorter than one hung attempt) or refused
    n = 6
    with hops.chain("raise") as rig:
        with httpx.Client(timeout=30.0) as client:
            for i in range(3):
                hops.send(client, rig, f"warm{i}", "ok", "warm")
            for i in range(3):
                rig.faults.set(i, "hang")
            fault = [hops.send(client, rig, f"hang{i}", "ok", "fault") for i in range(n)]
        rig.faults.clear()
        seen = rig.seen
    assert all(a.status in (502, 503, 504) for a in fault), [a.status for a in fault]
    gates = [
        d.reason
        for rec in seen.by("B")
        if rec.rid == f"hang{n - 1}"
        for d in rec.decisions
        if d.layer == "breaker" and d.subject == "c"
    ]
    assert gates, "B's last request asked no breaker for C"
    assert "breaker_closed" not in gates, gates
    # C's own answers were its deadline's: the hang, with no upstream of C's to blame
    assert {r.decided_by for r in seen.by("C0") if r.rid.startswith("hang")} == {"deadline"}
    # and A, one hop further, opened none: the fault is C's, B's breakers own it
    assert hops.breaker_opens(seen, "A") == {}
