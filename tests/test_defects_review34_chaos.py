"""Defects the seeded chaos harness (tests/test_chaos_chain.py) found, each shrunk to
the smallest schedule that shows it, as a plain test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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
    RateLimit,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock, seeded_random

B_URL = "http://10.0.2.1:8080"  # an address inside trusted_peers: one of ours
C_URL = "http://10.0.3.1:8080"


def _policy(breaker: BreakerConfig) -> Policy:
    retry = RetryConfig(attempts=3, base_ms=10, max_ms=100)
    return Policy(upstreams=(UpstreamConfig(host="*", retry=retry, breaker=breaker),))


def _hop(
    name: str,
    client: httpx.AsyncClient,
    url: str,
    clock: FakeClock,
    seed: int,
    catch: bool,
    breaker: BreakerConfig,
    served: list[str],
) -> Any:
    async def handler(request: Request) -> Response:
        served.append(name)
        try:
            upstream = await client.get(url)
        except httpx.HTTPError:
            if not catch:
                raise  # the middleware answers it
            return Response(name.encode(), 502)
        return Response(name.encode(), 502 if upstream.status_code >= 500 else 200)

    app = Starlette(routes=[Route("/", handler)])
    app.add_middleware(
        FidelityMiddleware, policy=_policy(breaker), clock=clock, rng=seeded_random(seed),
        telemetry=False,
    )  # fmt: skip
    return app


class _BrokenBody(httpx.AsyncByteStream):
    """A 200's body that the connection drops after its first chunk."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"p"
        raise httpx.ReadError("connection reset by peer")


def _chain(
    c_answers: list[int | str],
    catch: bool = True,
    breaker: BreakerConfig = BreakerConfig(),  # noqa: B008 - frozen
    served: list[str] | None = None,
) -> tuple[Any, list[int]]:
    """A -> B -> C in process on one FakeClock; C answers `c_answers` in turn, again
    and again (a status, or "broken": a 200 whose body breaks). Returns A's app and the
    list C's calls land in (their attempt headers); `served` gets the hop of each
    request a hop's handler ran for."""
    clock = FakeClock()
    calls: list[int] = []
    served = [] if served is None else served

    def leaf(request: httpx.Request) -> httpx.Response:
        calls.append(int(request.headers.get("x-fidelity-attempt", "0")))
        answer = c_answers[(len(calls) - 1) % len(c_answers)]
        if answer == "broken":
            return httpx.Response(200, stream=_BrokenBody())
        assert isinstance(answer, int)
        return httpx.Response(answer)

    to_c = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(leaf), clock=clock, telemetry=False)
    )
    b = _hop("B", to_c, C_URL + "/", clock, 2, catch, breaker, served)
    to_b = httpx.AsyncClient(
        transport=FidelityTransport(
            # (an error B lets out is answered 500, as a server would)
            httpx.ASGITransport(app=b, raise_app_exceptions=False),
            clock=clock,
            telemetry=False,
        )
    )
    return _hop("A", to_b, B_URL + "/", clock, 1, True, breaker, served), calls


def _get(app: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
            return await client.get("/")

    return asyncio.run(go())


def test_a_hop_that_retried_then_met_a_status_it_does_not_retry_is_exhausted() -> None:
    # Seed 148 of the harness, shrunk: B's call to C got a 503 (retried), then a 500 (a
    # status B does not retry), and B answered 502 unmarked. A retried B (502 is in its
    # on_status), and every one of A's attempts had B retry C again: 6 calls at C for one
    # request, 3 x 2, the multiplication across hops that "retries happen at one hop"
    # rules out. B retried, so B owned the call's retries: its 5xx says exhausted.
    app, calls = _chain([503, 500])
    response = _get(app)
    assert response.status_code == 502
    assert response.headers.get("x-fidelity-retry") == "exhausted"
    assert calls == [1, 2]  # B's two attempts; A did not send B's round again


def test_a_first_attempt_a_hop_does_not_retry_is_still_the_callers_to_retry() -> None:
    # The other side of the rule: B did not retry (a 500 on its first attempt), so A is
    # the nearest owner that can, and does (C gets one call per attempt of A's).
    app, calls = _chain([500])
    response = _get(app)
    assert response.status_code == 502
    assert response.headers.get("x-fidelity-retry") == "exhausted"  # by A, which retried
    assert calls == [1, 1, 1]


def test_a_hop_that_retried_then_had_its_answer_break_mid_body_is_exhausted() -> None:
    # Seed 285, shrunk: B's call to C got a 503 (retried), then a 200 whose body broke
    # while B read it (the transport counts that on C's breaker as a failure). B answered
    # 502 unmarked, and A sent B's round again twice: C saw 6 calls for one request.
    app, calls = _chain([503, "broken"])
    response = _get(app)
    assert response.status_code == 502
    assert response.headers.get("x-fidelity-retry") == "exhausted"
    assert calls == [1, 2]


def test_the_broken_body_the_app_lets_out_after_a_retry_is_answered_502_marked() -> None:
    # The same with B's handler letting the ReadError out: the middleware answers it as
    # an upstream given up on after retrying (502, marked), not as B's own bug (a bare
    # 500, which A's breaker counted against B).
    app, calls = _chain([503, "broken"], catch=False)
    response = _get(app)
    assert response.status_code == 502
    assert response.headers.get("x-fidelity-retry") == "exhausted"
    assert calls == [1, 2]


def test_a_body_that_breaks_on_the_first_attempt_leaves_the_retry_to_the_caller() -> None:
    # B did not retry: A is the nearest owner that can, and does.
    app, calls = _chain(["broken"])
    response = _get(app)
    assert response.status_code == 502
    assert calls == [1, 1, 1]


def _get_all(app: Any, n: int) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
            return [await client.get("/") for _ in range(n)]

    return asyncio.run(go())


# breakers that open on the second failure in a row and stay open: what opened shows
_QUICK = BreakerConfig(consecutive_failures=2, open_s=30.0, open_min_s=30.0, open_jitter=0.0)


def test_a_fault_bs_breaker_owns_does_not_open_as_breaker_for_b() -> None:
    # The real-server chaos scenario, shrunk: one instance of C reset its connections
    # mid-body; B (which does not retry an answer whose body broke: its head was handed
    # back) answered 502, and A's breaker for B counted each one. It opened, and A shed
    # 46 of 60 requests while two of C's three instances were healthy. The same with a
    # 500 B does not retry. B's breaker for C counted the fault: the breaker next to it
    # owns it. B's 502 says so (`x-fidelity-fault: upstream`), and A leaves it alone.
    for answer in ("broken", 500):
        served: list[str] = []
        app, calls = _chain([answer], breaker=_QUICK, served=served)
        first, second = _get_all(app, 2)
        # 1st: A tried B three times; B's breaker for C opened on the 2nd C failure and
        # refused the 3rd (exhausted). A's breaker for B stayed closed, so the 2nd request
        # reached B (and B's open breaker for C answered it, exhausted, at once)
        assert calls == [1, 1], answer
        assert served.count("B") == 4, (answer, served)
        assert first.status_code == second.status_code == 502
        assert second.headers.get("x-fidelity-retry") == "exhausted"


def test_bs_answer_after_a_failure_of_its_own_upstream_is_marked() -> None:
    # B answers its caller directly: the marker is on B's 502, and only there
    clock = FakeClock()
    to_c = httpx.AsyncClient(
        transport=FidelityTransport(
            httpx.MockTransport(lambda request: httpx.Response(500)), clock=clock,
            telemetry=False,
        )
    )  # fmt: skip
    served: list[str] = []
    b = _hop("B", to_c, C_URL + "/", clock, 2, True, BreakerConfig(), served)
    (failed,) = _get_all(b, 1)
    assert failed.status_code == 502
    assert failed.headers.get("x-fidelity-fault") == "upstream"
    assert "x-fidelity-retry" not in failed.headers  # B did not retry: A may
    to_ok = httpx.AsyncClient(
        transport=FidelityTransport(
            httpx.MockTransport(lambda request: httpx.Response(200)), clock=clock,
            telemetry=False,
        )
    )  # fmt: skip
    b = _hop("B", to_ok, C_URL + "/", clock, 2, True, BreakerConfig(), served)
    (ok,) = _get_all(b, 1)
    assert ok.status_code == 200
    assert "x-fidelity-fault" not in ok.headers


def test_a_callers_retry_after_an_upstream_fault_spends_no_quota() -> None:
    # Seed 1 of the harness (a tight limit at B), shrunk: C answered B's first call 500
    # (not retried by B), B answered 502, and A retried it (B did not). B had charged
    # both attempts: the retry took the token the client's next request needed, which B
    # then refused (429). "Retries never spend the client's rate-limit quota": B's 502
    # for its upstream's fault gives the units back, and A's retry is paid from the
    # retry credit that earns. (As it always was for a 502 after B gave up retrying.)
    clock = FakeClock()
    answers = iter([500])

    def leaf(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers, 200))

    to_c = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(leaf), clock=clock, telemetry=False)
    )
    served: list[str] = []
    b_answers: list[tuple[int | None, int]] = []
    b = _hop("B", to_c, C_URL + "/", clock, 2, True, BreakerConfig(), served)
    limit = RateLimit(name="per-client", rate="2/s", burst=2)
    b.user_middleware.clear()
    b.add_middleware(
        FidelityMiddleware,
        policy=Policy(rate_limits=(limit,), upstreams=_policy(BreakerConfig()).upstreams),
        clock=clock, rng=seeded_random(2), telemetry=False, observer=_Statuses(b_answers),
    )  # fmt: skip
    to_b = httpx.AsyncClient(
        transport=FidelityTransport(
            httpx.ASGITransport(app=b, raise_app_exceptions=False), clock=clock, telemetry=False
        )
    )
    a = _hop("A", to_b, B_URL + "/", clock, 1, True, BreakerConfig(), served)
    first, second = _get_all(a, 2)  # two requests at one instant: B's limit holds two
    assert first.status_code == second.status_code == 200
    # (status, x-fidelity-attempt) of B's answers: the first request's 502 and A's retry
    # of it, then the second request, admitted (not a 429 and A's retry after it)
    assert b_answers == [(502, 1), (200, 2), (200, 1)]


class _Statuses:
    """A request observer keeping (status, inbound attempt) of each answer."""

    def __init__(self, into: list[tuple[int | None, int]]) -> None:
        self.into = into

    def start(self, ctx: Any, scope: Any) -> None:
        return None

    def end(self, ctx: Any, scope: Any, token: Any) -> None:
        self.into.append((ctx.status, ctx.inbound_attempt))
