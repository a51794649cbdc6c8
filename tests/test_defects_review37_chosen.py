"""Review 37: a route whose upstream the client chooses (a webhook's test call, a callback
URL) under `charge = "served"`. Without a way to say so, a client pointing its requests at
a host of its own that fails got every request's units back (a 502 after the upstream's
failure, the middleware's 503 once that host's breaker opened), and retry credit
besides: its rate limit never held, while each request still made up to `attempts` calls
for it. And each of those 502s counted on the route's breaker: one client's dead host
opened it, and every other client's requests were shed.

`[[upstream]] client_chosen = true` says so (usually on `host = "*"`, after the entries of
the operator's own upstreams): a request that called such a host pays its units however
it ends, and its upstream failures are no failure of the route's breaker. Upstreams the
operator configured keep the refund."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fidelity_mw import (
    BreakerConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    PolicyError,
    RateLimit,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.testing import FakeClock, seeded_random

OURS = "payments.internal"  # the operator's upstream: an entry of its own
RETRY = RetryConfig(attempts=2, base_ms=10, max_ms=10)
HOST_BREAKER = BreakerConfig(consecutive_failures=2, open_min_s=60.0, open_s=120.0)


def _policy(chosen: bool, route_breaker: BreakerConfig | None = None) -> Policy:
    return Policy(
        breaker=route_breaker,
        rate_limits=(RateLimit(name="per-client", rate="2/min", burst=2, key="header:x-client"),),
        upstreams=(
            UpstreamConfig(host=OURS, retry=RETRY, breaker=HOST_BREAKER),
            UpstreamConfig(host="*", retry=RETRY, breaker=HOST_BREAKER, client_chosen=chosen),
        ),
    )


def _service(policy: Policy) -> tuple[Any, list[str]]:
    """A webhook service: `/test?url=...` calls the URL the client names and answers 502
    when it fails (the transport's error let out: the middleware answers it); `/pay`
    calls the operator's own upstream. Every host named `*.down.example` answers 503."""
    clock = FakeClock()
    called: list[str] = []

    def upstreams(request: httpx.Request) -> httpx.Response:
        called.append(request.url.host)
        down = request.url.host.endswith("down.example") or request.url.host == OURS
        return httpx.Response(503 if down else 200)

    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(upstreams), clock=clock, telemetry=False)
    )

    async def test_hook(request: Request) -> Response:
        try:
            answer = await client.get(request.query_params["url"])
        except httpx.TransportError:  # (CircuitOpen among them)
            return JSONResponse({"hook": "refused"}, status_code=502)
        if answer.status_code >= 500:
            return JSONResponse({"hook": "failed"}, status_code=502)
        return JSONResponse({"hook": "ok"})

    async def let_out(request: Request) -> Response:
        answer = await client.get(request.query_params["url"])
        answer.raise_for_status()
        return JSONResponse({"hook": "ok"})

    async def pay(request: Request) -> Response:
        try:
            answer = await client.get(f"http://{OURS}/charge")
        except httpx.TransportError:
            return JSONResponse({}, status_code=502)
        return JSONResponse({}, status_code=502 if answer.status_code >= 500 else 200)

    app = Starlette(
        routes=[Route("/test", test_hook), Route("/raise", let_out), Route("/pay", pay)]
    )
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock, rng=seeded_random(5), telemetry=False
    )
    return app, called


def _requests(app: Any, paths: list[tuple[str, str]]) -> list[httpx.Response]:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as c:
            return [await c.get(path, headers={"x-client": who}) for who, path in paths]

    return asyncio.run(go())


@pytest.mark.parametrize("path", ["/test", "/raise"])
def test_a_client_whose_own_host_fails_pays_for_its_requests(path: str) -> None:
    app, called = _service(_policy(chosen=True))
    # four requests at one instant, burst 2, each to a new host of the client's: the
    # first two are answered (502: the hook's host failed), the other two refused, as
    # for any client over its limit
    urls = [f"{path}?url=http://{n}.down.example/" for n in "abcd"]
    answers = _requests(app, [("mallory", url) for url in urls])
    assert [a.status_code for a in answers] == [502, 502, 429, 429]
    assert "retry_credit" not in answers[2].text
    assert len(called) == 4  # two requests, two attempts each: no more made for it


@pytest.mark.parametrize(("path", "refused"), [("/test", 502), ("/raise", 503)])
def test_a_client_whose_host_our_breaker_refuses_pays_for_its_requests(
    path: str, refused: int
) -> None:
    app, called = _service(_policy(chosen=True))
    # the first request's two failed attempts open that host's breaker; the next one's
    # call is refused (the app's 502 for it, or CircuitOpen let out: our 503), and still
    # charged
    answers = _requests(app, [("mallory", f"{path}?url=http://a.down.example/")] * 3)
    assert [a.status_code for a in answers] == [502, refused, 429]
    if refused == 503:
        assert answers[1].headers["x-fidelity-decided-by"] == "breaker"
    else:  # its RateLimit field says the unit stays spent
        assert answers[1].headers["ratelimit"].startswith('"per-client";r=0;')
    assert len(called) == 2


def test_without_the_switch_such_requests_were_free() -> None:
    """(The behaviour the switch changes, kept where it is not set.)"""
    app, _called = _service(_policy(chosen=False))
    urls = [f"/test?url=http://{n}.down.example/" for n in "abcd"]
    answers = _requests(app, [("mallory", url) for url in urls])
    assert [a.status_code for a in answers] == [502, 502, 502, 502]


def test_the_operators_own_upstream_failing_still_gives_units_back() -> None:
    app, called = _service(_policy(chosen=True))
    answers = _requests(app, [("alice", "/pay")] * 4)
    # the operator's upstream failed them: refunded (the breaker for it opened after
    # the first request's two attempts; its refusals are refunded too)
    assert [a.status_code for a in answers] == [502, 502, 502, 502]
    assert set(called) == {OURS}


def test_one_clients_dead_host_does_not_open_the_route_breaker_for_the_others() -> None:
    route_breaker = BreakerConfig(consecutive_failures=2, open_min_s=60.0, open_s=120.0)
    app, _called = _service(_policy(chosen=True, route_breaker=route_breaker))
    answers = _requests(
        app,
        [
            ("mallory", "/test?url=http://a.down.example/"),
            ("mallory", "/test?url=http://b.down.example/"),
            ("alice", "/test?url=http://hooks.alice.example/"),
        ],
    )
    assert [a.status_code for a in answers] == [502, 502, 200]


def test_the_switch_in_toml_and_its_errors(tmp_path: Any) -> None:
    path = tmp_path / "fidelity.toml"
    path.write_text('version = 1\n[[upstream]]\nhost = "*"\nclient_chosen = true\n')
    assert Policy.from_toml(path).upstream_for("hooks.example").client_chosen is True
    path.write_text('version = 1\n[[upstream]]\nhost = "*"\nclient_chosen = "yes"\n')
    with pytest.raises(PolicyError, match="client_chosen"):
        Policy.from_toml(path)
    # left out, the policy's version is the one it had before the key existed
    plain = Policy(upstreams=(UpstreamConfig(host="*"),))
    assert "client_chosen" not in plain.to_dict()["upstream"][0]
    assert Policy(upstreams=(UpstreamConfig(host="*", client_chosen=False),)) == plain
