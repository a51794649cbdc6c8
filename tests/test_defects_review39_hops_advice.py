"""Review 39: every instance of C paused by a Retry-After longer than B waits (scenario 2).

C's three instances each answer 503 with `Retry-After: 5`, longer than B waits
(`retry_after_max_s` 2 s) and, with a client deadline of 2 s, longer than the deadline.
B tries each instance once (the first request) or the one its first attempt goes to
(later ones: every instance is paused, a first attempt is not held back), and gives up:
`retry_after_too_long`, or `deadline` when the wait also reaches the deadline (as
docs/outbound.md says). B answers 502 `exhausted` with its advice, A does not retry it.

The defect: the advice was spread at every hop. B told A `Retry-After` 5 plus up to half
of it (6 to 8), and A spread what B said again: the client of A -> B -> C was told up to
12 s (11 seen) for C's 5, and waited for a spread of spreads long after C was back. Now
the hop next to the give-up spreads it once; a trusted callee's advice (its 5xx says
`x-fidelity-retry: exhausted` or `x-fidelity-fault: upstream`) is passed on as it is.
"""

from __future__ import annotations

import asyncio
from collections import Counter

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
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock, seeded_random

UPSTREAM = "http://10.0.3.1:8080/"  # inside the default trusted_peers


def _passing_on(headers: dict[str, str], style: str = "map") -> Starlette:
    """A service whose route calls an upstream of ours that answers 503 `Retry-After: 5`
    with `headers`, and answers 502 for it ("map"), or lets out `raise_for_status()`
    ("raise"). Its breaker for the upstream counts (and never opens)."""
    clock = FakeClock()

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, headers={"retry-after": "5", **headers})

    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(upstream), clock=clock, telemetry=False)
    )

    async def route(request: Request) -> Response:
        answer = await client.get(UPSTREAM)
        if style == "raise":
            answer.raise_for_status()
        return Response(b"upstream failed", 502)

    app = Starlette(routes=[Route("/", route)])
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=1, retry_after_max_s=2.0)
    counting = BreakerConfig(min_calls=1000, consecutive_failures=1000)
    policy = Policy(upstreams=(UpstreamConfig(host="*", retry=retry, breaker=counting),))
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock, rng=seeded_random(7), telemetry=False
    )
    return app


def _answers(app: Starlette, n: int) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            return [await client.get("/") for _ in range(n)]

    return asyncio.run(go())


def _advised(app: Starlette, n: int) -> list[str]:
    answers = _answers(app, n)
    assert [r.status_code for r in answers] == [502] * n
    return [r.headers.get("retry-after", "") for r in answers]


@pytest.mark.parametrize(
    "marker",
    [{"x-fidelity-retry": "exhausted"}, {"x-fidelity-fault": "upstream"}],
    ids=["exhausted", "fault_upstream"],
)
def test_a_callees_advice_is_passed_on_not_spread_again(marker: dict[str, str]) -> None:
    # before: 5 plus a draw from [0, 2.5) s, rounded up: 6, 7 or 8
    assert _advised(_passing_on(marker), 12) == ["5"] * 12


def test_an_upstreams_own_retry_after_is_still_spread() -> None:
    # no marker: the upstream's own word (not a hop's advice), spread by the hop that
    # gave up on it, as before
    advised = [int(v) for v in _advised(_passing_on({}), 12)]
    assert all(5 <= v <= 8 for v in advised), advised
    assert len(set(advised)) > 1, advised


@pytest.mark.parametrize(
    "marker", [{}, {"x-fidelity-fault": "upstream"}], ids=["app_503", "fault_upstream"]
)
def test_an_upstream_503_whose_retry_after_was_not_waited_let_out_is_a_marked_502(
    marker: dict[str, str],
) -> None:
    # The transport would not wait the upstream's Retry-After (5 s; it waits 2 s) and
    # gave up on the first attempt (`retry_after_too_long`): a refusal of ours to wait.
    # Before, the app's bare 500: no Retry-After for the client, and every caller's
    # breaker counted it against this service.
    answers = _answers(_passing_on(marker, "raise"), 4)
    for response in answers:
        assert response.status_code == 502
        assert response.headers.get("x-fidelity-fault") == "upstream"
        assert "x-fidelity-retry" not in response.headers  # not retried: our caller may
        assert response.headers.get("retry-after", "").isdigit()


# ---------------------------------------------------------------- real servers


@pytest.mark.parametrize(
    ("timeout_ms", "reasons"),
    [(2000, {"attempts", "deadline"}), (None, {"attempts", "retry_after_too_long"})],
    ids=["deadline_2s", "no_deadline"],
)
@pytest.mark.parametrize("decided", ["", "breaker"], ids=["c_app", "c_breaker"])
def test_real_chain_every_instance_of_c_paused_past_what_b_waits(
    timeout_ms: int | None, reasons: set[str], decided: str
) -> None:
    n = 6
    knobs = hops.Knobs(retry_after=5, decided=decided)
    with hops.chain("raise", knobs=knobs) as rig:
        with httpx.Client(timeout=30.0) as client:
            for i in range(3):
                rig.faults.set(i, "503ra")
            answers = [hops.send(client, rig, f"p{i}", timeout_ms=timeout_ms) for i in range(n)]
        seen = rig.seen
        a_counted = [k for k, s in rig.a_store.breakers.items() if s.epoch or s.consecutive]
    print(f"\npaused ({timeout_ms}, {decided or 'app'}):")
    print([(a.status, a.headers.get("retry-after")) for a in answers])
    # B's refusal reaches the client as a 502 marked exhausted, never a 500, with a
    # Retry-After it can use: C's 5 s, spread once (at most half of it more)
    # (before: B's bare 500 for those it gave up on at once, without the wait)
    for a in answers:
        assert a.status == 502, (a.rid, a.status, a.headers)
        assert a.headers.get("x-fidelity-fault") == "upstream"
        assert 5 <= int(a.headers.get("retry-after", "0")) <= 8, a.headers
    # B gave up for the reasons the docs name; A did not retry B
    b_reasons = Counter(
        d.reason
        for rec in seen.by("B")
        for d in rec.decisions
        if d.verdict == "give_up" and d.layer in ("retry", "deadline")
    )
    assert set(b_reasons) <= reasons, b_reasons
    # (A: B's exhausted answer, or B's refusal to wait, whose Retry-After A will not
    # wait either: A sent each request to B once)
    a_reasons = Counter(
        d.reason for rec in seen.by("A") for d in rec.decisions if d.verdict == "give_up"
    )
    assert sum(a_reasons.values()) == n, a_reasons
    assert set(a_reasons) <= {"downstream_exhausted", "retry_after_too_long"}, a_reasons
    assert len(seen.by("B")) == n
    assert max(seen.c_calls_by_rid.values()) <= _hops38.ATTEMPTS
    # a Retry-After is no breaker failure anywhere above C
    assert a_counted == []
    assert _hops38.breaker_opens(seen, "B") == Counter()
