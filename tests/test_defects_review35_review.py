"""Review 35: a fresh reviewer's pass over review 34's new code (the upstream-fault marker,
newest-first admission, the slot held to the last body message, our answers through the
app's CORS layer). Each test fails without its fix."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
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

B_URL = "http://10.0.2.1:8080"  # inside trusted_peers: one of ours
C_URL = "http://10.0.3.1:8080"  # one of ours too (a fidelity_mw service)
THIRD_PARTY_URL = "http://203.0.113.7:8080"  # outside trusted_peers (TEST-NET-3)

# opens on the second failure in a row and stays open: whether it opened shows
_QUICK = BreakerConfig(consecutive_failures=2, open_s=30.0, open_min_s=30.0, open_jitter=0.0)


def _policy(breaker: BreakerConfig | None = _QUICK) -> Policy:
    retry = RetryConfig(attempts=3, base_ms=10, max_ms=100)
    return Policy(upstreams=(UpstreamConfig(host="*", retry=retry, breaker=breaker),))


def _gateway(
    client: httpx.AsyncClient,
    url: str,
    clock: FakeClock,
    served: list[str],
    *,
    method: str = "GET",
    forward: bool = False,
    breaker: BreakerConfig | None = _QUICK,
) -> Any:
    """B: calls `url` once per request and answers 502 on its 5xx (or, `forward`, passes
    its answer on as it came, headers and all: a gateway, a BFF)."""

    async def handler(request: Request) -> Response:
        served.append("B")
        upstream = await client.request(method, url)
        if forward:
            return Response(upstream.content, upstream.status_code, headers=upstream.headers)
        return Response(b"B", 502 if upstream.status_code >= 500 else 200)

    app = Starlette(routes=[Route("/", handler)])
    app.add_middleware(
        FidelityMiddleware, policy=_policy(breaker), clock=clock, rng=seeded_random(2),
        telemetry=False,
    )  # fmt: skip
    return app


def _caller(b: Any, clock: FakeClock) -> Any:
    """A: calls B (trusted) with the default retries and a quick breaker, answers 502 on
    B's 5xx."""
    to_b = httpx.AsyncClient(
        transport=FidelityTransport(
            httpx.ASGITransport(app=b, raise_app_exceptions=False), clock=clock, telemetry=False
        )
    )

    async def handler(request: Request) -> Response:
        try:
            upstream = await to_b.get(B_URL + "/")
        except httpx.HTTPError:
            return Response(b"A", 502)
        return Response(b"A", 502 if upstream.status_code >= 500 else 200)

    app = Starlette(routes=[Route("/", handler)])
    app.add_middleware(
        FidelityMiddleware, policy=_policy(), clock=clock, rng=seeded_random(1),
        telemetry=False,
    )  # fmt: skip
    return app


def _mock(status: int, headers: dict[str, str], clock: FakeClock) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=FidelityTransport(
            httpx.MockTransport(lambda request: httpx.Response(status, headers=headers)),
            clock=clock,
            telemetry=False,
        )
    )


def _get_all(app: Any, n: int) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
            return [await client.get("/") for _ in range(n)]

    return asyncio.run(go())


# ------------------------------------------ x-fidelity-fault: upstream across two hops

# C's answers that say the fault is not C's: its breaker for its own upstream D counted
# it (`x-fidelity-fault`), or C's own control layer refused (`x-fidelity-decided-by`)
_NOT_C = [
    (500, {"x-fidelity-fault": "upstream"}, "GET"),
    (503, {"x-fidelity-decided-by": "breaker", "retry-after": "5"}, "POST"),
]


@pytest.mark.parametrize(("status", "headers", "method"), _NOT_C)
def test_a_fault_a_callee_disowned_is_disowned_by_its_caller_too(
    status: int, headers: dict[str, str], method: str
) -> None:
    # A -> B -> C -> D, D failing. C's breaker for D counted it and C's 500 says so; B's
    # breaker for C leaves it alone (the breaker next to the fault owns it), and B does
    # not retry it. B's own 502 was unmarked: A's breaker for B counted D's fault, opened
    # on the second one, and shed A's requests to B. The marker went one hop, not two.
    clock = FakeClock()
    served: list[str] = []
    b = _gateway(_mock(status, headers, clock), C_URL + "/", clock, served, method=method)
    (answer,) = _get_all(b, 1)
    assert answer.status_code == 502
    assert answer.headers.get_list("x-fidelity-fault") == ["upstream"]

    served.clear()
    first, second = _get_all(_caller(b, clock), 2)
    assert first.status_code == second.status_code == 502
    # A retried B's 502 (B did not retry) and its breaker for B never opened: every one
    # of A's three attempts per request reached B
    assert served == ["B"] * 6


def test_a_fault_b_does_not_own_is_still_counted_against_b() -> None:
    # The converse, unchanged: C failing by itself (an unmarked 500) is C's; B's breaker
    # for it counts it, and B's 502 is marked. With B's breaker for C off, nobody at B
    # counted it: B's 502 is unmarked, and A's breaker for B opens on it.
    clock = FakeClock()
    served: list[str] = []
    b = _gateway(_mock(500, {}, clock), C_URL + "/", clock, served, breaker=None)
    first, second = _get_all(_caller(b, clock), 2)
    assert first.status_code == second.status_code == 502
    assert served == ["B", "B"]  # A's breaker opened on the 2nd: no 3rd attempt, no 2nd request


# -------------------------------- a third party's signals passed on by an app of ours


_FORGED = [
    {"x-fidelity-retry": "exhausted", "x-fidelity-fault": "upstream"},
    {"x-fidelity-decided-by": "breaker", "retry-after": "1"},
]


@pytest.mark.parametrize("forged", _FORGED)
def test_a_third_partys_signals_an_app_passes_on_are_not_ours(forged: dict[str, str]) -> None:
    # B is a gateway: it answers with its upstream's response as it came, headers and
    # all. That upstream is a third party, outside trusted_peers: B's transport does not
    # believe its `x-fidelity-retry: exhausted`, `x-fidelity-fault: upstream` or
    # `x-fidelity-decided-by`. But B's answer carried them on, from a trusted peer (B): A
    # believed them, and its breaker for B ignored B's failures (and, for "exhausted", A
    # did not retry). Any API on the internet could switch off A's breaker for B with a
    # header. The middleware writes these markers itself, from what its request's own
    # calls found; an app's own (passed on) are dropped from its 5xx.
    clock = FakeClock()
    served: list[str] = []
    # (a POST: B does not retry it, and had nothing to say of it itself)
    b = _gateway(
        _mock(503, forged, clock), THIRD_PARTY_URL + "/", clock, served, method="POST",
        forward=True, breaker=None,
    )  # fmt: skip
    (answer,) = _get_all(b, 1)
    assert answer.status_code == 503
    for marker in ("x-fidelity-fault", "x-fidelity-retry", "x-fidelity-decided-by"):
        assert marker not in answer.headers

    served.clear()
    answers = _get_all(_caller(b, clock), 3)
    assert [a.status_code for a in answers] == [502, 502, 502]
    # A's first request: two attempts, its breaker for B opening on the second failure;
    # the other two are refused by it. (Believed, the forged markers had A's breaker
    # never open: three requests at B, or nine, each retried.)
    assert served == ["B", "B"]


def test_a_trusted_callees_refusal_an_app_passes_on_is_still_disowned() -> None:
    # The same gateway in front of one of ours: C's own breaker refused B's POST (503,
    # decided-by). B's answer does not pass C's marker on as its own; it says what B's
    # call found, in B's words: the fault is not B's (`x-fidelity-fault: upstream`), and
    # A's breaker for B leaves it alone.
    clock = FakeClock()
    served: list[str] = []
    refused = {"x-fidelity-decided-by": "breaker", "retry-after": "1"}
    b = _gateway(
        _mock(503, refused, clock), C_URL + "/", clock, served, method="POST", forward=True
    )  # fmt: skip
    (answer,) = _get_all(b, 1)
    assert answer.status_code == 503
    assert "x-fidelity-decided-by" not in answer.headers
    assert answer.headers.get_list("x-fidelity-fault") == ["upstream"]

    served.clear()
    first, second = _get_all(_caller(b, clock), 2)
    assert first.status_code == second.status_code == 502
    assert served == ["B"] * 6  # A retried each 503 and never opened its breaker for B


def test_a_marker_of_ours_on_a_passed_on_answer_is_said_once() -> None:
    # B's breaker for the third party counted its 502: B's answer is marked, by B, once
    # (the upstream's own copy of the header, passed on, is not a second one). (A 500
    # passed on is B's own since review 36: tests/test_defects_review36_fault.py.)
    clock = FakeClock()
    served: list[str] = []
    b = _gateway(
        _mock(502, {"x-fidelity-fault": "upstream"}, clock), THIRD_PARTY_URL + "/", clock,
        served, forward=True, method="POST",
    )  # fmt: skip
    (answer,) = _get_all(b, 1)
    assert answer.status_code == 502
    assert answer.headers.get_list("x-fidelity-fault") == ["upstream"]


def test_an_apps_own_headers_below_500_pass_untouched() -> None:
    # Only a 5xx is read for the markers: anything else the app says goes out as it is
    clock = FakeClock()
    served: list[str] = []
    headers = {"x-fidelity-fault": "upstream", "x-fidelity-retry": "exhausted"}
    b = _gateway(
        _mock(404, headers, clock), THIRD_PARTY_URL + "/", clock, served, forward=True
    )  # fmt: skip
    (answer,) = _get_all(b, 1)
    assert answer.status_code == 404
    assert answer.headers.get("x-fidelity-fault") == "upstream"
    assert answer.headers.get("x-fidelity-retry") == "exhausted"
