"""Review 40: C shedding load under a burst (scenario 3).

client -> A -> B -> C x3 on real uvicorn (tests/_hops40.py, `raise` style: uvicorn's
own, nothing cancelled). Each instance of C has a small bulkhead (2 in flight, no
queue) in front of a slow handler, and a burst of clients arrives at A at once: C's
middleware sheds what does not fit (503, `Retry-After: 1`, `x-fidelity-decided-by:
concurrency`), or, in the second case, C's own rate limit answers 429.

The defects found:

- A 429 that B retried after its `Retry-After` and gave up on, let out by B's app
  (`raise_for_status()`), was answered as the upstream's 502 (marked exhausted) but
  counted by B's route breaker as the app's failure: C throttling B opened B's route
  breaker, which shed B's requests for its open period after C's limit had room again.
  Now an upstream's 429 given up on is no failure of the route breaker either
  (`inbound.watch.owned_upstream`, `ctx.upstream_throttled`).
- A retry the budget refused dropped the `Retry-After` of the answer it was to retry:
  B's own 503 (`budget`) went out without any wait though C had said `Retry-After: 1`
  (its bulkhead's shed), and so did A's 502 for it. Now the budget's give-up carries
  the upstream's word as every other give-up does (`outbound.loop._settle`).

What must hold: B's breakers for C stay closed (a callee's own control refusal is no
evidence against it; a 429 never is); A's breaker for B and A's route breaker count
nothing; B's retries stay within its attempts and its retry budget (counted at C per
client request and in all); A does not retry what B gave up on; nothing answers 500,
and a refusal says how long to wait. After the burst, requests are served at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import _hops38
import _hops39
import _hops40 as hops
from fidelity_mw import (
    BreakerConfig,
    ConcurrencyConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RateLimit,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock, seeded_random

BURST = 30


def _c_policy_bulkhead() -> object:
    return dataclasses.replace(
        _hops38.policy(), concurrency=ConcurrencyConfig(limit=2, max_queue=0)
    )


def _c_policy_limit() -> object:
    limit = RateLimit(name="per-caller", rate="4/s", burst=4, key="global", match="/c/*")
    return hops.with_bulkhead(_hops38.policy(limits=(limit,)))


async def _burst(rig: hops.Chain, prefix: str, n: int) -> list[tuple[int, dict[str, str]]]:
    async def one(i: int) -> tuple[int, dict[str, str]]:
        async with httpx.AsyncClient(timeout=30.0) as client:
            r = await client.get(f"{rig.url}/x/ok", headers={"x-hop-id": f"{prefix}{i}"})
            return r.status_code, dict(r.headers)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def _run(c_policy: object, mode: str) -> None:
    knobs = _hops39.Knobs(slow_s=0.3)
    with hops.chain("raise", c_policy=c_policy, knobs=knobs) as rig:  # type: ignore[arg-type]
        warm = asyncio.run(_burst(rig, "warm", 1))
        for i in range(3):
            rig.faults.set(i, mode)
        got = asyncio.run(_burst(rig, "burst", BURST))
        seen = rig.seen
        failures = rig.failures()
        b_opened = {i: s.state for i in range(3) if (s := rig.b_breaker(i)) and s.epoch}
        per_request = [seen.c_calls_by_rid[f"burst{i}"] for i in range(BURST)]
        # every call that reached C, served or shed there, per client request
        arrived = Counter(
            rec.rid for hop in ("C0", "C1", "C2") for rec in seen.by(hop) if rec.rid[:5] == "burst"
        )
        a_calls = Counter(rec.rid for rec in seen.by("B") if rec.rid.startswith("burst"))
        c_refused = Counter(
            (rec.hop, rec.decided_by)
            for hop in ("C0", "C1", "C2")
            for rec in seen.by(hop)
            if rec.rid.startswith("burst") and rec.decided_by not in ("app", None)
        )
        rig.faults.clear()
        after = asyncio.run(_burst(rig, "after", 6))
        # what A and B refused of their own in the requests after the burst
        refused_after = [
            (rec.hop, rec.decided_by)
            for hop in ("A", "B")
            for rec in seen.by(hop)
            if rec.rid.startswith("after") and rec.decided_by not in ("app", None)
        ]
    statuses = Counter(s for s, _ in got)
    total = sum(per_request)
    print(
        f"\n{mode}: {dict(statuses)}; C calls {total} for {BURST} requests "
        f"(max {max(per_request)}); C refused {sum(c_refused.values())}; B opened {b_opened}; "
        f"calls reaching C {sum(arrived.values())} ({sorted(Counter(arrived.values()).items())})"
    )
    assert [s for s, _ in warm] == [200]
    assert sum(c_refused.values()) > 0  # C did shed (else this tests nothing)
    for status, headers in got:
        assert status in (200, 502, 503, 504), (status, headers)
        if status != 200:
            assert headers.get("retry-after", "").isdigit(), (status, headers)
    # only B retries, within its attempts; A never resends what B gave up on
    assert max(per_request) <= _hops38.ATTEMPTS
    assert max(arrived.values()) <= _hops38.ATTEMPTS
    assert max(a_calls.values()) == 1, a_calls
    # nobody's breaker took C's load shedding for C failing, or B's answer for B's
    assert b_opened == {}
    assert {k: v for k, v in failures.items() if k[0] in "AB"} == {}
    # after the burst no breaker of A or B refuses (C throttling B opened B's route breaker)
    assert [d for d in refused_after if d[1] == "breaker"] == [], refused_after
    if mode == "":
        # C's own limit (4/s an instance) may still throttle right after the burst on a
        # loaded machine, with B's retry budget spent by the burst: B's give-up then, as
        # the upstream's, never a refusal of A's or B's breaker (above)
        assert all(s == 200 or s == 502 for s, _ in after), after
    else:  # C's bulkhead has room as soon as the burst has ended
        assert [s for s, _ in after] == [200] * 6


def test_c_shedding_by_its_bulkhead_opens_no_breaker_and_is_not_multiplied() -> None:
    _run(_c_policy_bulkhead(), "slow")


def test_c_rate_limiting_its_callers_opens_no_breaker_and_is_not_multiplied() -> None:
    _run(_c_policy_limit(), "")


# ---------------------------------------------------------------- in process, fake clock


def _one_hop(
    upstream_status: int,
    retry_after: str,
    budget: bool,
    instances: tuple[str, ...] = (),
    answer_refusals: bool = True,
) -> Starlette:
    """A service whose route calls an upstream that always answers `upstream_status` with
    `Retry-After`, letting out `raise_for_status()`; its route breaker opens after 2
    consecutive failures (never, as long as it counts none)."""
    clock = FakeClock()

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(upstream_status, headers={"retry-after": retry_after})

    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(upstream), clock=clock, telemetry=False)
    )

    async def route(request: Request) -> Response:
        answer = await client.get("http://up/")
        answer.raise_for_status()
        return Response(b"ok")

    retry = RetryConfig(
        attempts=3, base_ms=1, max_ms=1, retry_after_max_s=5.0, advice_spread=0.0,
        **({} if budget else {"budget_ratio": 0.0, "budget_min_per_s": 0.0}),
    )  # fmt: skip
    counting = BreakerConfig(min_calls=1000, consecutive_failures=1000)
    host = UpstreamConfig(host="up", instances=instances, retry=retry, breaker=counting)
    policy = Policy(
        breaker=BreakerConfig(consecutive_failures=2, min_calls=2, open_s=30.0, open_min_s=30.0),
        upstreams=(host,),
    )
    app = Starlette(routes=[Route("/", route)])
    app.add_middleware(
        FidelityMiddleware,
        policy=policy,
        clock=clock,
        rng=seeded_random(1),
        telemetry=False,
        answer_refusals=answer_refusals,
    )
    return app


def _answers(app: Starlette, n: int) -> list[tuple[int, str | None, str | None]]:
    async def go() -> list[tuple[int, str | None, str | None]]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            out = []
            for _ in range(n):
                r = await client.get("/")
                h = r.headers
                out.append((r.status_code, h.get("x-fidelity-decided-by"), h.get("retry-after")))
            return out

    return asyncio.run(go())


def test_an_upstreams_429_given_up_on_is_no_failure_of_the_route_breaker() -> None:
    answers = _answers(_one_hop(429, "1", budget=True), 5)
    # each: 3 attempts, each after the 429's wait, then the upstream's 503 with its wait
    # (review 45: a 502 until then; a 429 given up on is no bad gateway); before, the
    # route breaker counted them, and from the third on shed the route (503 `breaker`)
    assert answers == [(503, None, "1")] * 5


def test_an_upstreams_429_given_up_on_and_let_out_unanswered_is_no_failure_either() -> None:
    # (`answer_refusals = False`: the server's 500 goes out, the route breaker still
    # leaves it alone)
    answers = _answers(_one_hop(429, "1", budget=True, answer_refusals=False), 5)
    assert answers == [(500, None, None)] * 5


@pytest.mark.parametrize("instances", [(), ("http://10.0.9.1:80", "http://10.0.9.2:80")])
def test_a_retry_the_budget_refuses_keeps_the_upstreams_retry_after(
    instances: tuple[str, ...],
) -> None:
    answers = _answers(_one_hop(503, "3", budget=False, instances=instances), 3)
    # the budget's own 503, with the wait the upstream asked for (before: none)
    assert answers == [(503, "budget", "3")] * 3
