"""docs/migration.md, "From nopanic or pyresilience": our side of each difference it names.

Each test checks what fidelity_mw does where nopanic 0.3.0 or pyresilience 0.4.1 behave
otherwise (their side was checked by running their code, not here: they are not imported).
Time is a FakeClock: backoff and Retry-After waits are recorded, never slept.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import CircuitOpen, Engine, FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.testing import FakeClock

URL = "http://payments.internal/invoices/7"


def policy(**upstream: Any) -> Policy:
    return Policy.from_dict({"upstream": [{"host": "payments.internal", **upstream}]})


def statuses(*codes: int, headers: dict[str, str] | None = None) -> Any:
    """An upstream answering `codes` in turn (the last one from then on), counting calls."""
    seen: list[httpx.Request] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        code = codes[min(len(seen), len(codes)) - 1]
        return httpx.Response(code, headers=headers if code != 200 else None)

    return upstream, seen


def test_a_returned_5xx_counts_against_the_host_breaker_and_a_4xx_does_not() -> None:
    # nopanic's and pyresilience's breakers see raised exceptions only: a returned 500
    # is a success to them, and with raise_for_status() a 404 becomes a failure.
    clock = FakeClock()
    breaker = {"consecutive_failures": 3, "open_min_s": 5, "open_jitter": 0}
    pol = policy(retry={"attempts": 1}, breaker=breaker)
    engine = Engine(pol, clock=clock)
    not_found, seen_404 = statuses(404)
    broken, seen_500 = statuses(500)

    async def run() -> None:
        lookups = httpx.AsyncClient(
            transport=FidelityTransport(
                httpx.MockTransport(not_found), engine=engine, telemetry=False
            )
        )
        for _ in range(5):  # five 404s in a row: the caller's mistake, not the host's
            assert (await lookups.get(URL)).status_code == 404
        charges = httpx.AsyncClient(
            transport=FidelityTransport(httpx.MockTransport(broken), engine=engine, telemetry=False)
        )
        for _ in range(3):  # returned, not raised: no raise_for_status() needed
            assert (await charges.get(URL)).status_code == 500
        with pytest.raises(CircuitOpen):
            await charges.get(URL)

    asyncio.run(run())
    assert (len(seen_404), len(seen_500)) == (5, 3)


def test_the_host_breaker_is_one_per_host_in_the_engines_store_shared_by_its_clients() -> None:
    # pyresilience builds one breaker per decorated function, nopanic one per object you
    # create: two functions calling one host trip separately unless you share it.
    clock = FakeClock()
    breaker = {"consecutive_failures": 2, "open_min_s": 5, "open_jitter": 0}
    pol = Policy.from_dict(
        {
            "upstream": [
                {"host": "payments.internal", "retry": {"attempts": 1}, "breaker": breaker},
                {"host": "ledger.internal", "retry": {"attempts": 1}, "breaker": breaker},
            ]
        }
    )
    engine = Engine(pol, clock=clock)  # the middleware's engine: one per app
    down, _ = statuses(503)
    up, ledger_calls = statuses(200)

    def client(handler: Any) -> httpx.AsyncClient:
        transport = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
        return httpx.AsyncClient(transport=transport)

    async def run() -> None:
        invoices, refunds, ledger = client(down), client(down), client(up)
        for _ in range(2):
            assert (await invoices.get(URL)).status_code == 503
        with pytest.raises(CircuitOpen):  # another client, the same host: already open
            await refunds.get("http://payments.internal/refunds/1")
        assert (await ledger.get("http://ledger.internal/entries")).status_code == 200

    asyncio.run(run())
    assert len(ledger_calls) == 1  # another host: its own breaker, closed


def test_retry_after_is_a_floor_on_the_wait_and_a_longer_one_ends_the_call() -> None:
    # nopanic honours it only on an exception with a `retry_after` attribute (httpx's
    # HTTPStatusError has none); pyresilience's retry_after_delay clamps it to max_delay,
    # so it retries before the time the server asked for.
    clock = FakeClock()
    upstream, seen = statuses(503, 200, headers={"retry-after": "5"})
    pol = policy(retry={"attempts": 3, "max_ms": 2000})
    transport = FidelityTransport(httpx.MockTransport(upstream), policy=pol, clock=clock)

    async def call(client: httpx.AsyncClient) -> int:
        return (await client.get(URL)).status_code

    assert asyncio.run(call(httpx.AsyncClient(transport=transport))) == 200
    assert len(seen) == 2
    assert clock.sleeps
    assert min(clock.sleeps) >= 5.0  # not max_ms's 2 s

    too_long, seen_long = statuses(503, 200, headers={"retry-after": "60"})
    clock2 = FakeClock()
    transport2 = FidelityTransport(httpx.MockTransport(too_long), policy=pol, clock=clock2)
    # beyond retry_after_max_s (30 s): no early retry; the 503 is handed back at once
    assert asyncio.run(call(httpx.AsyncClient(transport=transport2))) == 503
    assert len(seen_long) == 1
    assert clock2.sleeps == []


def test_the_retry_budget_is_a_share_of_the_calls_not_a_fixed_bucket() -> None:
    # pyresilience's budget is a token bucket (max_retries, refill_rate): as many retries
    # at 10 calls a second as at 10,000. Ours (like nopanic's RetryBudget) is a share.
    def retries(calls: int) -> int:
        clock = FakeClock()
        upstream, seen = statuses(503)
        pol = policy(
            retry={"attempts": 3, "budget_ratio": 0.2, "budget_min_per_s": 0},
            breaker=False,
        )
        transport = FidelityTransport(httpx.MockTransport(upstream), policy=pol, clock=clock)

        async def run() -> None:
            client = httpx.AsyncClient(transport=transport)
            for _ in range(calls):
                await client.get(URL)

        asyncio.run(run())
        return len(seen) - calls

    assert retries(100) == 20
    assert retries(1000) == 200


def test_a_post_is_sent_once_unless_it_carries_an_idempotency_key() -> None:
    # Both decorators retry whatever the function does: a POST three times.
    clock = FakeClock()
    upstream, seen = statuses(503)
    transport = FidelityTransport(
        httpx.MockTransport(upstream), policy=policy(breaker=False), clock=clock
    )

    async def run() -> list[int]:
        client = httpx.AsyncClient(transport=transport)
        first = (await client.post(URL, json={"amount": 5})).status_code
        keyed = await client.post(URL, json={"amount": 5}, headers={"idempotency-key": "k1"})
        return [first, keyed.status_code]

    assert asyncio.run(run()) == [503, 503]  # the last response, not an exception
    assert [r.headers.get("idempotency-key") for r in seen] == [None, "k1", "k1", "k1"]


def test_the_remaining_deadline_goes_downstream_with_every_attempt() -> None:
    # nopanic's deadline() and pyresilience's timeout bound this process only.
    clock = FakeClock()
    sent: list[int] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        # read while the attempt runs: the transport takes its headers off afterwards
        sent.append(int(request.headers["x-request-timeout-ms"]))
        clock.advance(0.4)  # the attempt takes 400 ms
        return httpx.Response(503 if len(sent) == 1 else 200)

    pol = Policy.from_dict(
        {
            "deadline": {"default_ms": 3000},
            "upstream": [{"host": "payments.internal", "breaker": False}],
        }
    )
    transport = FidelityTransport(httpx.MockTransport(upstream), policy=pol, clock=clock)
    assert asyncio.run(httpx.AsyncClient(transport=transport).get(URL)).status_code == 200
    assert len(sent) == 2
    assert 0 < sent[0] < 3000  # less a margin, so the next hop answers before we time out
    # the retry is told what is left after the first one's 400 ms (each value less its
    # margins, a tenth of the attempt's time and a tenth of that: 0.81 of the difference)
    assert sent[1] <= sent[0] - 0.8 * 400


def test_half_open_admits_a_bounded_number_of_probes_at_once() -> None:
    # pyresilience admits every call while half-open; ours lets `half_open_probes` through.
    clock = FakeClock()
    breaker = {
        "consecutive_failures": 1,
        "open_min_s": 1,
        "open_s": 1,
        "open_jitter": 0,
        "half_open_probes": 2,
    }
    pol = policy(retry={"attempts": 1}, breaker=breaker)
    release = asyncio.Event()
    calls: list[str] = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) == 1:
            return httpx.Response(503)  # opens the breaker
        await release.wait()
        return httpx.Response(200)

    transport = FidelityTransport(httpx.MockTransport(upstream), policy=pol, clock=clock)

    async def run() -> list[object]:
        client = httpx.AsyncClient(transport=transport)
        assert (await client.get(URL)).status_code == 503
        clock.advance(1.5)  # the open period is over: half-open

        async def probe() -> object:
            try:
                return (await client.get(URL)).status_code
            except CircuitOpen:
                return "refused"

        tasks = [asyncio.ensure_future(probe()) for _ in range(4)]
        for _ in range(20):  # let every call reach the gate (no time passes)
            await asyncio.sleep(0)
        release.set()
        return list(await asyncio.gather(*tasks))

    outcomes = asyncio.run(run())
    assert sorted(map(str, outcomes)) == ["200", "200", "refused", "refused"]
    assert len(calls) == 3


def _inbound_app() -> Starlette:
    async def report(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def broken(request: Request) -> PlainTextResponse:
        return PlainTextResponse("no", status_code=500)  # answered, not raised

    app = Starlette(routes=[Route("/report", report), Route("/broken", broken)])
    pol = Policy.from_dict(
        {
            "rate_limit": [{"name": "per-client", "match": "/report", "rate": "1/min"}],
            "breaker": {"consecutive_failures": 3, "open_min_s": 5, "open_jitter": 0},
        }
    )
    app.add_middleware(FidelityMiddleware, policy=pol, clock=FakeClock(), telemetry=False)
    return app


def test_inbound_limits_are_per_client_and_refuse_with_429_and_retry_after() -> None:
    # pyresilience's ResilientMiddleware has one bucket for all clients, and its refusal
    # (RateLimitExceededError, uncaught) reaches the client as a 500 without Retry-After.
    app = _inbound_app()

    async def get(client_ip: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=(client_ip, 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            return await client.get("/report")

    async def run() -> list[httpx.Response]:
        return [await get(ip) for ip in ("10.0.0.1", "10.0.0.1", "10.0.0.2")]

    first, again, other = asyncio.run(run())
    assert (first.status_code, again.status_code, other.status_code) == (200, 429, 200)
    assert int(again.headers["retry-after"]) > 0


def test_the_route_breaker_counts_a_5xx_the_route_answered() -> None:
    # pyresilience's ResilientMiddleware counts raised exceptions only: a route that
    # answers 500 never opens it.
    app = _inbound_app()

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            return [(await client.get("/broken")).status_code for _ in range(4)]

    assert asyncio.run(run()) == [500, 500, 500, 503]
