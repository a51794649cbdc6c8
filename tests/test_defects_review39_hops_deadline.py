"""Review 39: the deadline across hops (scenarios 1 and 3 of the multi-hop round).

1. A service whose own deadline fires while its call to a callee is in flight. The
   attempt's time was the rest of the deadline, so the attempt's timeout and the
   middleware's deadline raced; the deadline won (its timer is armed at the deadline, the
   attempt's read timeout only after connecting and sending), the app was cancelled and
   the cancelled attempt was counted by no breaker. A callee that hangs, without
   fidelity_mw, never opened the breaker next to it for requests whose deadline was
   shorter than the attempt timeout (every hop below the first, with the defaults: the
   first hop tells the next its attempt timeout less a tenth). Now an attempt bounded by
   the deadline gets the rest of it less a margin (a tenth, 2 to 250 ms): its own timeout
   ends it first, and the breaker counts it.
2. Having timed out at the deadline, the call retried with what was left (the margin: a
   tenth of what the failed attempt had), and so did every hop above: slivers of
   attempts, 2-3 calls at C for one request. Now an attempt that timed out at the rest of
   the deadline (our timeout, or the callee's deadline 504 for the time we told it) gives
   up as `deadline`.
3. A client deadline shorter than what a healthy callee needs: B's breaker counted every
   such timeout against the callee (the callee's deadline 504, since review 38), and a
   client sending short deadlines opened B's breakers for a healthy C, which every other
   request then lost. Now a timeout at a rest of the deadline under half the attempt
   timeout is the caller's choice, no evidence against the callee (as the route breaker
   leaves its own deadline's 504 alone).
4. A callee's 504 given up on and let out (`raise_for_status()`) was answered 502: a
   hop's timeout reached the client as a bad gateway, where the same time running out at
   a callee without fidelity_mw (our read timeout) was a 504. Now 504.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import _hops38
import _hops39 as hops
from fidelity_mw import (
    BreakerConfig,
    DeadlineConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock, seeded_random

UPSTREAM = "http://10.0.3.1:8080/"  # inside the default trusted_peers
KEY = "upstream:10.0.3.1:8080"
COUNTING = BreakerConfig(min_calls=1000, consecutive_failures=1000)  # counts, never opens


# ---------------------------------------------------------------- in process, fake clock


def _timing_out(
    deadline_ms: int, *, at_bound: bool = True, answer: int | None = None
) -> tuple[FidelityTransport, list[float], FakeClock]:
    """A transport outside a request (its deadline: the policy's default) to an upstream
    whose every attempt times out: after the whole time the attempt was given (the fake
    clock moved by its read timeout), or at once (`at_bound=False`). With `answer`, the
    upstream answers that status (marked by its deadline) instead of timing out."""
    clock = FakeClock()
    given: list[float] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        read = request.extensions["timeout"]["read"]
        given.append(read)
        if at_bound:
            clock.advance(read if answer is None else read * 0.9)
        if answer is not None:
            return httpx.Response(answer, headers={"x-fidelity-decided-by": "deadline"})
        raise httpx.ReadTimeout("timed out", request=request)

    policy = Policy(
        deadline=DeadlineConfig(default_ms=deadline_ms),
        upstreams=(
            UpstreamConfig(
                host="*",
                attempt_timeout_ms=1000,
                retry=RetryConfig(attempts=3, base_ms=1, max_ms=1),
                breaker=COUNTING,
            ),
        ),
    )
    transport = FidelityTransport(
        httpx.MockTransport(upstream),
        policy=policy,
        clock=clock,
        rng=seeded_random(1),
        telemetry=False,
    )
    return transport, given, clock


def _call(transport: FidelityTransport) -> tuple[Any, BaseException | None]:
    async def go() -> tuple[Any, BaseException | None]:
        async with httpx.AsyncClient(transport=transport, timeout=None) as client:
            try:
                response = await client.get(UPSTREAM)
            except httpx.HTTPError as exc:
                return getattr(exc, "fidelity_give_up", None), exc
            return response.extensions["fidelity_context"], None

    return asyncio.run(go())


def _counted(transport: FidelityTransport) -> int:
    state = transport.engine.store.breakers.get(KEY)  # type: ignore[attr-defined]
    return 0 if state is None else int(state.consecutive)


def test_an_attempt_bounded_by_the_deadline_gets_it_less_a_margin() -> None:
    transport, given, _clock = _timing_out(600)
    _call(transport)
    # 600 ms less a tenth: our timeout fires before the deadline cancels the request
    assert given[0] == pytest.approx(0.54)


@pytest.mark.parametrize("answer", [None, 504])
def test_a_timeout_at_the_rest_of_the_deadline_is_counted_and_not_retried(
    answer: int | None,
) -> None:
    # 600 ms of a 1000 ms attempt timeout: over half, a hang's evidence
    transport, given, _clock = _timing_out(600, answer=answer)
    give_up, _error = _call(transport)
    # before: retried with what was left (60 ms, then 6), twice
    assert len(given) == 1
    if answer is None:
        assert (give_up.layer, give_up.reason) == ("deadline", "deadline")
    assert _counted(transport) == 1


@pytest.mark.parametrize("answer", [None, 504])
def test_a_timeout_at_a_short_callers_deadline_is_no_evidence(answer: int | None) -> None:
    # 300 ms of a 1000 ms attempt timeout: the caller's choice, not the callee's failure
    transport, given, _clock = _timing_out(300, answer=answer)
    _call(transport)
    assert len(given) == 1
    assert _counted(transport) == 0  # before: 1 (3 with the retries' slivers)


def test_a_timeout_sooner_than_the_deadline_is_retried_and_counted_as_before() -> None:
    transport, given, _clock = _timing_out(600, at_bound=False)
    _call(transport)
    assert len(given) == 3
    assert _counted(transport) == 3


def _gateway(status: int) -> Starlette:
    """A service whose route lets out `raise_for_status()` on an upstream it retried
    until its attempts ran out, answering `status` each time."""
    clock = FakeClock()
    client = httpx.AsyncClient(
        transport=FidelityTransport(
            httpx.MockTransport(lambda request: httpx.Response(status)),
            clock=clock,
            telemetry=False,
        )
    )

    async def route(request: Request) -> Response:
        answer = await client.get(UPSTREAM)
        answer.raise_for_status()
        return Response(answer.content)

    app = Starlette(routes=[Route("/", route)])
    retry = RetryConfig(attempts=2, base_ms=1, max_ms=1)
    policy = Policy(upstreams=(UpstreamConfig(host="*", retry=retry, breaker=COUNTING),))
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock, rng=seeded_random(1), telemetry=False
    )
    return app


@pytest.mark.parametrize(("status", "answered"), [(504, 504), (503, 502), (502, 502)])
def test_an_upstreams_504_given_up_on_is_answered_504(status: int, answered: int) -> None:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=_gateway(status), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            return await client.get("/")

    response = asyncio.run(go())
    assert response.status_code == answered  # before: 502 for the 504 too
    assert response.headers["x-fidelity-retry"] == "exhausted"
    assert response.json()["type"] == "urn:fidelity-mw:problem:upstream-failed"


# ---------------------------------------------------------------- real servers

# after a fault: the longest open period, one probe, and slack for a busy machine
RECOVERY_S = 2 * _hops38.OPEN_S + 0.6


def _no_500(answers: list[hops.Answer]) -> None:
    for a in answers:
        assert a.status != 500, (a.rid, a.headers)
        assert a.status < 500 or a.status in (502, 503, 504), (a.rid, a.status)


def _opened_or_counted(rig: hops.Chain) -> tuple[int, int]:
    """(B's breakers for C that opened, failures they count now)."""
    states = rig.b_breakers().values()
    return sum(1 for s in states if s.epoch > 0), sum(s.consecutive for s in states)


def _remaining_ms(seen: _hops38.Seen, hop: str, rid: str) -> float | None:
    """The time left when the request arrived at the hop (C: whichever instance got it),
    None when it did not get there in time."""
    for rec in seen.records:
        if rec.hop.startswith(hop) and rec.rid == rid:
            for d in rec.decisions:
                if d.layer == "deadline" and d.verdict == "allow" and d.details:
                    return float(d.details["remaining_ms"])
    return None


def _a_counted(rig: hops.Chain) -> list[tuple[str, int, int]]:
    """A's breakers (its route's, its breaker for B) that counted or opened."""
    return [
        (key, s.epoch, s.consecutive)
        for key, s in rig.a_store.breakers.items()
        if s.epoch or s.consecutive
    ]


@pytest.mark.parametrize("c_plain", [True, False], ids=["plain_c", "fidelity_c"])
def test_real_chain_a_hang_past_the_deadline_is_counted_next_to_it(c_plain: bool) -> None:
    # Every instance of C hangs; the client's deadline (800 ms) reaches B as 648 ms, less
    # than B's attempt timeout for C (1000 ms): B's attempts are bounded by its deadline.
    n = 8
    with hops.chain("raise", c_plain=c_plain) as rig:
        with httpx.Client(timeout=30.0) as client:
            warm = [hops.send(client, rig, f"warm{i}") for i in range(3)]
            for i in range(3):
                rig.faults.set(i, "hang")
            fault = [hops.send(client, rig, f"hang{i}", timeout_ms=800) for i in range(n)]
            opened, counted = _opened_or_counted(rig)
            rig.faults.clear()
            early: list[hops.Answer] = []
            late: list[hops.Answer] = []
            start = time.monotonic()
            i = 0
            while len(late) < 5:
                sent = time.monotonic() - start
                answer = hops.send(client, rig, f"after{i}")
                (late if sent >= RECOVERY_S else early).append(answer)
                i += 1
                time.sleep(0.01)
        seen = rig.seen
        a_counted = _a_counted(rig)
    print(f"\nhang ({'plain' if c_plain else 'fidelity'} C): {[a.status for a in fault]}")
    print(f"B's breakers for C: {opened} opened, {counted} failures counted")
    assert all(a.status == 200 for a in warm)
    _no_500(fault + early + late)
    # every hung request: one attempt at B, which timed out at its deadline (less the
    # margin) and gave up; before, with a plain C, its deadline cancelled the attempt
    # (counted by nobody), and with C's deadline 504 B retried with what was left and A
    # sent the request again (2 or 3 calls at C per request)
    assert all(a.status == 504 for a in fault), [a.status for a in fault]
    assert all(a.headers.get("x-fidelity-retry") == "exhausted" for a in fault)
    assert [seen.c_calls_by_rid[f"hang{i}"] for i in range(n)] == [1] * n
    # B's breakers for C count the hang (8 hung attempts over 3 instances, 4 in a row
    # open one): before, with a plain C, not one failure was counted
    assert opened + counted >= 4, (opened, counted)
    # nobody else counts it: A's breaker for B and its route breaker left it to B's
    assert a_counted == []
    assert _hops38.breaker_opens(seen, "A") == Counter()
    # and after the hang: served again within an open period and a probe
    assert [a.status for a in late] == [200] * len(late)


def test_real_chain_a_client_deadline_shorter_than_one_attempt_opens_no_breaker() -> None:
    # C is healthy, answering in 150 ms; one client's deadline is 100 ms: every hop's
    # budget shrinks (A tells B less, B tells C less), C's deadline runs out first, and
    # the client gets a 504. A client-caused timeout: nobody's breaker counts it
    n = 10
    with hops.chain("raise", knobs=hops.Knobs(slow_s=0.15)) as rig:
        with httpx.Client(timeout=30.0) as client:
            warm = [hops.send(client, rig, f"warm{i}") for i in range(3)]
            for i in range(3):
                rig.faults.set(i, "slow")
            short = [hops.send(client, rig, f"short{i}", timeout_ms=100) for i in range(n)]
            opened, counted = _opened_or_counted(rig)
            # the other clients' requests, with time enough: served, no breaker open
            others = [hops.send(client, rig, f"other{i}") for i in range(6)]
        seen = rig.seen
        a_counted = _a_counted(rig)
    print(f"\nshort deadline: {[a.status for a in short]}; B counted {counted}, opened {opened}")
    assert all(a.status == 200 for a in warm)
    _no_500(short)
    assert all(a.status == 504 for a in short), [(a.status, a.headers) for a in short]
    # before: B's breakers for C opened on them (one per 4 in a row), and B and A retried
    # with what was left of the deadline (2 or 3 calls at C per request)
    assert (opened, counted) == (0, 0)
    assert a_counted == []
    assert all(seen.c_calls_by_rid[f"short{i}"] <= 1 for i in range(n))
    # each hop's budget shrank: C was told less than B, B less than A's 100 ms
    for i in range(n):
        left = [_remaining_ms(seen, hop, f"short{i}") for hop in ("A", "B", "C")]
        print(f"short{i}: remaining at A, B, C: {left}")
        shrinking = [ms for ms in left if ms is not None]
        assert shrinking == sorted(shrinking, reverse=True), left
        assert left[0] is None or left[0] <= 100
    assert [a.status for a in others] == [200] * len(others)
