"""Review 38: multi-hop faults, healthy requests failed by our own decisions.

A chain client -> A -> B -> C on real uvicorn servers (tests/_hops38.py), B balancing
three instances of C, every hop under FidelityMiddleware. Faults bounded in count: one
instance failing (500, 503, hanging) or slow, a fault on one route only, all of C down
for a while then healthy, a client's limit at A while C is down. Counts, not timings;
the one time that enters is the margin after a fault for the breakers' open period.

The defect found: the route breaker counted an answer that reported an upstream's
failure which a breaker for that upstream had counted already. Every hop above the
fault then opened its route breaker on it (A's for a fault of C's, two hops away, that
B's breaker for C owned), shed the route while it was open, and after the fault held
its requests for an open period of its own on top of the breaker next to the fault.
Now such an answer is no failure of the route breaker (`inbound.watch.owned_upstream`);
with `breaker = false` on the upstream, nobody else counts it and the route breaker
still does.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import _hops38 as hops
from fidelity_mw import (
    BreakerConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RateLimit,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock, seeded_random

# after a fault: the longest open period, one probe, and slack for a busy machine
RECOVERY_S = 2 * hops.OPEN_S + 0.6


# ---------------------------------------------------------------- in process, fake clock


def _one_hop(style: str, upstream_breaker: bool) -> tuple[Starlette, FakeClock]:
    """A service whose route calls an upstream that always answers 503; its route
    breaker opens after 2 consecutive failures."""
    clock = FakeClock()

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(upstream), clock=clock, telemetry=False)
    )

    async def route(request: Request) -> Response:
        answer = await client.get("http://10.0.3.1:8080/")
        if style == "raise":
            answer.raise_for_status()
        return Response(b"upstream failed", 502)

    app = Starlette(routes=[Route("/", route)])
    retry = RetryConfig(attempts=2, base_ms=1, max_ms=1)
    # the upstream's breaker never opens in this run: it only counts
    counting = BreakerConfig(min_calls=1000, consecutive_failures=1000)
    policy = Policy(
        breaker=BreakerConfig(consecutive_failures=2, min_calls=2, open_s=30.0, open_min_s=30.0),
        upstreams=(
            UpstreamConfig(host="*", retry=retry, breaker=counting if upstream_breaker else None),
        ),
    )
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock, rng=seeded_random(1), telemetry=False
    )
    return app, clock


def _statuses(app: Starlette, n: int) -> list[tuple[int, str | None]]:
    async def go() -> list[tuple[int, str | None]]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            out = []
            for _ in range(n):
                r = await client.get("/")
                out.append((r.status_code, r.headers.get("x-fidelity-decided-by")))
            return out

    return asyncio.run(go())


@pytest.mark.parametrize("style", ["map", "raise"])
def test_the_route_breaker_leaves_an_upstream_fault_to_the_upstreams_breaker(style: str) -> None:
    app, _clock = _one_hop(style, upstream_breaker=True)
    answers = _statuses(app, 6)
    # every one is the upstream's failure, answered 502 and marked so; the route
    # breaker (2 consecutive failures) never opened on it: before the fix, requests 3 to
    # 6 were its 503s
    assert answers == [(502, None)] * 6


@pytest.mark.parametrize("style", ["map", "raise"])
def test_without_a_breaker_for_the_upstream_the_route_breaker_still_counts_it(
    style: str,
) -> None:
    app, _clock = _one_hop(style, upstream_breaker=False)
    answers = _statuses(app, 4)
    assert answers[:2] == [(502, None)] * 2
    assert answers[2:] == [(503, "breaker")] * 2


# ---------------------------------------------------------------- real servers


def _drive(
    rig: hops.Chain, n: int, phase: str, routes: tuple[str, ...] = ("ok",), pause: float = 0.005
) -> list[hops.Answer]:
    out = []
    with httpx.Client(timeout=20.0) as client:
        for i in range(n):
            out.append(hops.send(client, rig, f"{phase}{i}", routes[i % len(routes)], phase))
            time.sleep(pause)
    return out


def _after(rig: hops.Chain, n: int) -> tuple[list[hops.Answer], list[hops.Answer]]:
    """`n` requests after the fault; (those sent within RECOVERY_S, those after it),
    going on past RECOVERY_S until at least 5 were sent after it."""
    early: list[hops.Answer] = []
    late: list[hops.Answer] = []
    start = time.monotonic()
    i = 0
    with httpx.Client(timeout=20.0) as client:
        while i < n or len(late) < 5:
            sent = time.monotonic() - start
            answer = hops.send(client, rig, f"after{i}", "ok", "after")
            (late if sent >= RECOVERY_S else early).append(answer)
            i += 1
            time.sleep(0.01)
    return early, late


def _show(name: str, *groups: list[hops.Answer]) -> None:
    for group in groups:
        if group:
            print(f"\n{name} {group[0].phase}: {dict(hops.summary(group)[group[0].phase])}")


def _retried(record: hops.HopRecord) -> bool:
    """Did this hop retry a call for the request?"""
    return any(d.layer == "retry" and d.verdict == "retry" for d in record.decisions)


def _no_500_and_refusals_advised(answers: list[hops.Answer]) -> None:
    for a in answers:
        assert a.status != 500, (a.rid, a.headers)
        if a.status >= 500:
            assert a.status in (502, 503, 504), (a.rid, a.status)
        if a.headers.get("x-fidelity-decided-by") is not None:
            # a refusal of ours: named, 503/504, with the wait
            assert a.status in (503, 504), (a.rid, a.status)
            assert a.headers.get("retry-after", "").isdigit(), (a.rid, a.headers)


@pytest.mark.parametrize("style", ["raise", "map"])
def test_real_chain_all_of_c_down_then_healthy_opens_no_breaker_above_b(style: str) -> None:
    with hops.chain(style) as rig:
        warm = _drive(rig, 6, "warm")
        for i in range(3):
            rig.faults.set(i, "503")
        fault = _drive(rig, 24, "fault")
        rig.faults.clear()
        early, late = _after(rig, 20)
        seen = rig.seen
    _show(f"all of C down ({style})", warm, fault, early, late)
    assert all(a.status == 200 for a in warm)
    _no_500_and_refusals_advised(fault + early + late)
    # the fault was answered by B (its give-ups, its breakers for C): A refused nothing
    # and opened no breaker, neither its breaker for B nor its route breaker
    assert hops.breaker_opens(seen, "A") == Counter()
    assert not [r for r in seen.by("A") if r.decided_by not in ("app", None)]
    assert hops.breaker_opens(seen, "B").keys() <= {"c"}
    # Retries at one hop: A sent a request to B again only after an answer of B's that
    # had not retried C (B gave up on its first attempt: `retry_after_too_long` when C's
    # other instances were paused by their own breakers' Retry-After, and B's 502 said
    # wait 1 s; docs/outbound.md: B did not retry, A is the nearest owner), so C's calls
    # per request are B's attempts of its last try plus one for each earlier one: they
    # add up, never multiply. (Seen at load 16: one request, B tried once, A resent after
    # 1 s, B tried 3 times: 4 calls at C.) Without any such resend: B's attempts.
    for rid, calls in seen.c_calls_by_rid.items():
        tries = [r for r in seen.by("B") if r.rid == rid]
        assert not [r for r in tries[:-1] if _retried(r)], (rid, calls, tries)
        assert calls <= hops.ATTEMPTS + len(tries) - 1, (rid, calls, tries)
    # no breaker held open past the fault: everything sent after the open period and a
    # probe succeeds
    assert [a.status for a in late] == [200] * len(late)


@pytest.mark.parametrize("mode", ["500", "503", "hang", "slow"])
def test_real_chain_one_instance_of_c_failing_costs_no_request(mode: str) -> None:
    # (a 500 is not retried at B: the app answers 502 for it, which A may retry, B not
    # having retried; let out instead, it is the app's own 500, as documented)
    style = "map" if mode == "500" else "raise"
    with hops.chain(style) as rig:
        _drive(rig, 6, "warm")
        rig.faults.set(0, mode)
        fault = _drive(rig, 30, "fault")
        rig.faults.clear()
        seen = rig.seen
    _show(f"C0 {mode}", fault)
    # B's retry (or A's, of B's unretried 502) went to a healthy instance: all served.
    # For a 500, which B does not retry, A's retries reach B as new requests: B's
    # balancer weighs the instance that failed the last one up (`failure_weight`), so
    # they go elsewhere before any breaker has opened (once, all three of A's attempts
    # went to C0 while only C0's breaker could have told).
    assert [a.status for a in fault] == [200] * len(fault)
    assert hops.breaker_opens(seen, "A") == Counter()
    assert not [r for r in seen.by("A") if r.decided_by not in ("app", None)]
    # retries add up across hops, never multiply (B's attempts plus A's, less one)
    assert max(seen.c_calls_by_rid.values()) <= 2 * hops.ATTEMPTS - 1
    # the healthy instances served them between them, never ejected: every pick found
    # at least both of them admissible
    healthy = sum(n for (i, _route), n in seen.c_calls.items() if i != 0)
    if mode != "slow":  # (a slow one still serves its share)
        assert healthy >= len(fault)
    assert min(hops.admissible(seen)) >= 2, hops.admissible(seen)


def test_real_chain_a_fault_on_one_route_of_c_fails_only_that_route() -> None:
    with hops.chain("raise") as rig:
        _drive(rig, 6, "warm", ("ok", "bad"))
        for i in range(3):
            rig.faults.set(i, "503", route="bad")
        fault = _drive(rig, 30, "fault", ("ok", "bad"))
        seen = rig.seen
    _show("C's /bad down", fault)
    _no_500_and_refusals_advised(fault)
    assert [a.status for a in fault if a.route == "ok"] == [200] * 15
    assert all(a.status in (502, 503) for a in fault if a.route == "bad")
    assert hops.breaker_opens(seen, "A") == Counter()


def test_real_chain_a_client_is_not_throttled_for_requests_c_failed() -> None:
    # 4 requests a second, burst 4, per client at A; the client sends 16 at once while
    # C is down: each was answered 502 for C's fault, and its units came back
    limit = RateLimit(name="per-client", rate="4/s", burst=4)
    with hops.chain("raise", a_limits=(limit,)) as rig:
        for i in range(3):
            rig.faults.set(i, "503")
        fault = _drive(rig, 16, "fault", pause=0.0)
        seen = rig.seen
    _show("client limit at A, C down", fault)
    _no_500_and_refusals_advised(fault)
    assert [a.status for a in fault if a.status == 429] == []
    assert not [r for r in seen.by("A") if r.decided_by == "ratelimit"]


# ---------------------------------------------------------------- exhausted after a retry


def _service_of_two(style: str) -> tuple[Starlette, list[str], list[object]]:
    """B: its route calls the service `c` of two instances, each answering 503 with a
    Retry-After (10 s) longer than B waits (2 s), within its deadline (30 s)."""
    clock = FakeClock()
    calls: list[str] = []
    records: list[object] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url.host))
        return httpx.Response(503, headers={"retry-after": "10"})

    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(upstream), clock=clock, telemetry=False)
    )

    async def route(request: Request) -> Response:
        answer = await client.get("http://c/")
        if style == "raise":
            answer.raise_for_status()
        return Response(b"upstream failed", 502)

    class Keep:
        def start(self, ctx: object, scope: object) -> None:
            return None

        def end(self, ctx: object, scope: object, token: object) -> None:
            records.extend(getattr(ctx, "decisions", ()))

    app = Starlette(routes=[Route("/", route)])
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=1, retry_after_max_s=2.0)
    policy = Policy(
        breaker=None,
        upstreams=(
            UpstreamConfig(
                host="c", instances=("http://10.0.3.1:8080", "http://10.0.3.2:8080"), retry=retry
            ),
        ),
    )
    app.add_middleware(
        FidelityMiddleware,
        policy=policy,
        clock=clock,
        rng=seeded_random(1),
        observer=Keep(),
        telemetry=False,
    )
    return app, calls, records


@pytest.mark.parametrize("style", ["map", "raise"])
def test_a_give_up_after_a_retry_is_exhausted_whatever_stopped_the_next(style: str) -> None:
    app, calls, records = _service_of_two(style)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            return await client.get("/")

    response = asyncio.run(go())
    # B tried one instance, then the other; both paused beyond what B waits: it gave up
    assert sorted(calls) == ["10.0.3.1", "10.0.3.2"]
    give_ups = [d for d in records if getattr(d, "verdict", None) == "give_up"]
    assert [getattr(d, "reason", None) for d in give_ups] == ["retry_after_too_long"]
    # B retried, so its caller must not: before the fix this 502 was unmarked, and A sent
    # the request again (C saw B's two calls, then B's three for A's retry)
    assert response.status_code == 502
    assert response.headers.get("x-fidelity-retry") == "exhausted"


def test_real_chain_all_of_c_hanging_costs_one_hops_attempts_and_recovers() -> None:
    # every instance of C hangs: B's attempts end at the time B told C (its attempt
    # timeout, less a tenth), when C's deadline answers 504; B gives up after its
    # attempts and A does not retry B
    with hops.chain("raise") as rig:
        _drive(rig, 3, "warm")
        for i in range(3):
            rig.faults.set(i, "hang")
        fault = _drive(rig, 5, "fault")
        rig.faults.clear()
        early, late = _after(rig, 5)
        seen = rig.seen
    _show("all of C hanging", fault, early, late)
    _no_500_and_refusals_advised(fault + early + late)
    assert all(a.status in (502, 504) for a in fault)
    assert all(a.headers.get("x-fidelity-retry") == "exhausted" for a in fault)
    assert hops.breaker_opens(seen, "A") == Counter()
    assert max(seen.c_calls_by_rid.values()) <= hops.ATTEMPTS
    assert [a.status for a in late] == [200] * len(late)


def test_real_chain_a_rate_limit_at_c_is_not_the_clients() -> None:
    # C limits its caller B (one address) to 2 a second per instance; the client's
    # requests at A are within every limit of A's. C's 429s are B's to wait or give up
    # on: never a 500, never a 429 of A's limit
    limit = RateLimit(name="per-caller", rate="2/s", burst=2)
    client_limit = RateLimit(name="per-client", rate="100/s", burst=100)
    with hops.chain("raise", a_limits=(client_limit,), c_limits=(limit,)) as rig:
        answers = _drive(rig, 24, "limited", pause=0.02)
        seen = rig.seen
    _show("a limit at C", answers)
    _no_500_and_refusals_advised(answers)
    refused_at_c = sum(1 for i in range(3) for r in seen.by(f"C{i}") if r.status == 429)
    assert refused_at_c > 0  # the limit at C did bind
    assert not [r for r in seen.by("A") if r.decided_by == "ratelimit"]
    assert hops.breaker_opens(seen, "A") == Counter()
    assert hops.breaker_opens(seen, "B") == Counter()  # a 429 is never a breaker failure


# ---------------------------------------------------------------- a give-up not retried


def _not_retried(decided_by: str | None) -> Starlette:
    """B: its route lets out `raise_for_status()` on an upstream of ours answering 503
    with a Retry-After (10 s) longer than B waits (2 s): given up on its first attempt,
    `retry_after_too_long`. With `decided_by`, the 503 is the callee's control layer's."""
    clock = FakeClock()
    headers = {"retry-after": "10"}
    if decided_by is not None:
        headers["x-fidelity-decided-by"] = decided_by

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers=headers)

    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(upstream), clock=clock, telemetry=False)
    )

    async def route(request: Request) -> Response:
        answer = await client.get("http://10.0.3.1:8080/")
        answer.raise_for_status()
        return Response(answer.content)

    app = Starlette(routes=[Route("/", route)])
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=1, retry_after_max_s=2.0)
    counting = BreakerConfig(min_calls=1000, consecutive_failures=1000)
    policy = Policy(upstreams=(UpstreamConfig(host="*", retry=retry, breaker=counting),))
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock, rng=seeded_random(1), telemetry=False
    )
    return app


@pytest.mark.parametrize("decided_by", ["breaker", None])
def test_a_5xx_not_retried_for_its_wait_and_let_out_is_a_marked_502(
    decided_by: str | None,
) -> None:
    """A callee's own refusal ("breaker": its breaker's 503), or an upstream's plain 503
    (None), whose Retry-After (10 s) the transport would not wait (it waits 2 s): given up
    on the first attempt (`retry_after_too_long`). Before: the app's bare 500, unmarked,
    which B's callers' breakers counted against B, without the wait (review 38 for the
    callee's refusal; review 39, every instance of C paused past what B waits, for the
    plain 503). Now a 502 marked as the upstream's fault, with the wait."""
    app = _not_retried(decided_by)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            return await client.get("/")

    response = asyncio.run(go())
    assert response.status_code == 502
    assert response.headers.get("x-fidelity-fault") == "upstream"
    assert "x-fidelity-retry" not in response.headers  # B did not retry: its caller may
    assert "x-fidelity-decided-by" not in response.headers
    assert response.headers.get("retry-after", "").isdigit()
