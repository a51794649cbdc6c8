"""Review 14 of the outbound changes merged from out12 (give-up marker, raw cancel of a
Redis gate, balancer): each test failed before its fix."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.decide.breaker import HALF_OPEN
from fidelity_mw.engine import Engine
from fidelity_mw.policy import (
    BreakerConfig,
    DeadlineConfig,
    HedgeConfig,
    RetryConfig,
    StateConfig,
    UpstreamConfig,
)
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_server import PATIENT, QUIET, RedisServer

pytestmark = pytest.mark.anyio

URL = "http://svc.internal/x"

INSTANCES = ("http://10.0.0.1:8001", "http://10.0.0.2:8002")
KEYS = ("10.0.0.1:8001", "10.0.0.2:8002")
STEADY = BreakerConfig(open_s=30.0, failure_ratio=1.0, min_calls=1_000, half_open_probes=1)


# ------------------------------------- 1. a Retry-After's reroute never goes back to it


@pytest.mark.parametrize("seed", range(6))
async def test_a_rerouted_retry_never_goes_back_to_the_instance_that_said_retry_after(
    seed: int,
) -> None:
    """Two instances: A answers `503 Retry-After: 120` (beyond `retry_after_max_s`), B is
    half-open with its one probe out (another call's: not known open here). The call
    may not wait A's word, and B may take the retry: A is paused and the retry planned
    after the backoff alone. B's gate refuses it (no probe slot); before, the pick then
    fell back on the one instance left, A, paused, and the retry went there after the
    backoff: A asked again at once, against the word that paused it."""
    busy, probing = KEYS
    seen: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host}:{request.url.port}")
        return httpx.Response(503, headers={"retry-after": "120"})

    store = MemoryStore(rng=seeded_random(3))
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2, budget_min_per_s=100.0)
    cfg = UpstreamConfig(host="payments", instances=INSTANCES, retry=retry, breaker=STEADY)
    clock = FakeClock()
    engine = Engine(Policy(upstreams=(cfg,)), clock=clock, rng=seeded_random(seed), store=store)
    now = clock.monotonic()
    store.breaker_state("upstream:" + probing, STEADY).force(HALF_OPEN, now, seeded_random(0))
    probe = store.gate_now("upstream:" + probing, STEADY, now)
    assert probe.probe_id  # the probe slot is out: B refuses every other call
    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 503
    assert seen == [busy]


# ------------------------------------- 2. the marker, with a hedged call at once


def _client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


def _hedged_beside_app() -> Starlette:
    """Two calls at once (`asyncio.gather`): one to `payments` answers 503 every time
    (retried, then given up), one to the hedged `catalog` is slow and its hedge answers
    200 once the first call has given up."""
    gave_up = asyncio.Event()

    async def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.host == "payments.internal":
            if request.headers["x-fidelity-attempt"] == "3":
                gave_up.set()
            return httpx.Response(503)
        if request.headers["x-fidelity-attempt"] == "1":
            await asyncio.Event().wait()  # the slow attempt: its hedge wins
        await gave_up.wait()
        await asyncio.sleep(0)
        return httpx.Response(200)

    outbound = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(upstream)))

    async def handler(request: Request) -> Response:
        first, _second = await asyncio.gather(
            outbound.get("http://payments.internal/pay"),
            outbound.get("http://catalog.internal/items"),
        )
        first.raise_for_status()
        return PlainTextResponse("not reached")

    app = Starlette(routes=[Route("/", handler)])
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=1)
    steady = BreakerConfig(consecutive_failures=100)
    policy = Policy(
        deadline=DeadlineConfig(default_ms=5000),
        breaker=steady,
        upstreams=(
            UpstreamConfig(host="payments.internal", retry=retry, breaker=steady),
            UpstreamConfig(
                host="catalog.internal", retry=retry, breaker=steady, hedge=HedgeConfig(after_ms=5)
            ),
        ),
    )
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app


async def test_raise_for_status_on_a_give_up_beside_a_hedged_call_that_won() -> None:
    """Before: the hedged call, ended by its hedge's good answer, set the request's
    `upstream_exhausted` back to what it was when that call began (False), the other
    call's give-up meanwhile included; the mapping asked that flag before the response's
    own marker, and the given-up 503's `raise_for_status()` was a bare 500."""
    async with _client(_hedged_beside_app()) as client:
        got = await client.get("/")
    assert got.status_code == 502
    assert got.headers["x-fidelity-retry"] == "exhausted"


# ------------------------------------- 3. a probe's outcome under a raw task.cancel()

PROBING = BreakerConfig(
    consecutive_failures=1, open_s=0.01, open_min_s=0.01, open_jitter=0.0,
    half_open_probes=1, probe_lease_s=30.0,
)  # fmt: skip


@pytest.mark.redis
async def test_a_raw_cancel_as_the_probes_answer_arrives_still_records_it(
    own_redis: RedisServer,
) -> None:
    """The probe's 503 arrives and the caller is cancelled by a raw `task.cancel()`
    (`asyncio.timeout`, `wait_for`) while its outcome is on its way to Redis. The anyio
    shield around that record does not hold against a raw cancel: the record was dropped
    (a coalesced one, the default, is not sent once its caller is gone), the probe slot
    stayed leased and the half-open breaker refused every call, in every process, for
    the probe lease (30 s). Now the record goes on in a task of its own."""
    policy = Policy(
        state=StateConfig(url=own_redis.url, **PATIENT, **QUIET),
        upstreams=(UpstreamConfig(host="*", retry=RetryConfig(attempts=1), breaker=PROBING),),
    )
    store = RedisStore(config=policy.state, rng=seeded_random(1))
    engine = Engine(policy, clock=FakeClock(), store=store)
    answers = iter([503, 503, 200])
    cancel: list[asyncio.Task[Any]] = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        if cancel:  # the probe: its caller is cancelled as the answer comes back
            asyncio.get_running_loop().call_soon(cancel[0].cancel)
        return httpx.Response(status)

    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    try:
        async with httpx.AsyncClient(transport=t) as client:
            assert (await client.get(URL)).status_code == 503  # opens the breaker
            await asyncio.sleep(0.02)  # (the server's clock: half-open after 10 ms)
            task = asyncio.create_task(client.get(URL))
            cancel.append(task)
            (ended,) = await asyncio.gather(task, return_exceptions=True)
            assert isinstance(ended, asyncio.CancelledError)
            cancel.clear()
            await asyncio.sleep(0.05)  # the probe's failure reopened it for 10 ms
            response = await client.get(URL)  # the slot is free: this call is the probe
            assert response.status_code == 200
            decisions = response.extensions["fidelity_context"].decisions
            assert ("breaker", "probe") in {(d.layer, d.verdict) for d in decisions}
    finally:
        await store.aclose()


# ------------------------------------- 4. the marker on a response the app builds anew


def _rewrapping_app(status: int, attempts: int) -> Starlette:
    async def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status)

    outbound = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(upstream)))

    async def handler(request: Request) -> Response:
        got = await outbound.get("http://payments.internal/pay")
        # a response of its own (detached from the stream, headers filtered ...)
        again = httpx.Response(
            got.status_code, headers=got.headers, content=got.content, request=got.request
        )
        again.raise_for_status()
        return PlainTextResponse("not reached")

    app = Starlette(routes=[Route("/", handler)])
    steady = BreakerConfig(consecutive_failures=100)
    retry = RetryConfig(attempts=attempts, base_ms=1, max_ms=1)
    policy = Policy(
        deadline=DeadlineConfig(default_ms=5000),
        breaker=steady,
        upstreams=(UpstreamConfig(host="payments.internal", retry=retry, breaker=steady),),
    )
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app


async def test_raise_for_status_on_a_rewrapped_given_up_response() -> None:
    """Before out12 the give-up was found by the request's URL, so a response the app
    built anew from the one given up on (`httpx.Response(..., request=got.request)`)
    mapped as well; the marker lives on the response object, which the new one does not
    carry: a bare 500. The request carries it too (with the status it was for)."""
    async with _client(_rewrapping_app(503, 3)) as client:
        got = await client.get("/")
    assert got.status_code == 502
    assert got.headers["x-fidelity-retry"] == "exhausted"


async def test_a_request_sent_again_does_not_keep_an_earlier_give_up() -> None:
    """The request's marker is the last call's: a request sent once more, whose 503 is
    not retried (one attempt: not exhaustion), is the app's own error."""

    async def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    policy = Policy(
        upstreams=(
            UpstreamConfig(host="a.internal", retry=RetryConfig(attempts=3, base_ms=1, max_ms=1)),
        ),
    )
    engine = Engine(policy, clock=FakeClock())
    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        request = client.build_request("GET", "http://a.internal/x")
        first = await client.send(request)
        assert first.extensions.get("fidelity_give_up") is not None
        t2 = FidelityTransport(
            httpx.MockTransport(upstream),
            engine=Engine(
                Policy(upstreams=(UpstreamConfig(host="*", retry=RetryConfig(attempts=1)),)),
                clock=FakeClock(),
            ),
            telemetry=False,
        )
        async with httpx.AsyncClient(transport=t2) as other:
            second = await other.send(request)
        assert second.extensions.get("fidelity_give_up") is None
        assert request.extensions.get("fidelity_give_up") is None


# ------------------------------------- 5. an interrupt while a late reply is read


@pytest.mark.redis
async def test_an_interrupt_while_the_late_reply_is_read_drops_the_connection(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gate's call is cancelled while its reply is on its way, and the read of that
    reply after the cancellation (`_late_reply`) is interrupted by a KeyboardInterrupt
    or SystemExit. Before: those went through without dropping the connection, which
    went back to the lane with the reply unread: the next command on it, sent before
    that reply arrived, would read it as its own. Now it is dropped, as for any other
    failed read (and the interrupt still goes on)."""
    from redis.asyncio.connection import AbstractConnection

    from fidelity_mw.policy import StateConfig as Config
    from fidelity_mw.state.redis import LaneClient, build_client

    config = Config(url=own_redis.url, **PATIENT, **QUIET)
    client = build_client(own_redis.url, config)
    assert isinstance(client, LaneClient)
    try:
        assert await client.run("PING") == b"PONG"
        (conn,) = client.lane_free
        faults: list[BaseException] = [asyncio.CancelledError(), KeyboardInterrupt()]

        async def read_response(self: Any, *args: Any, **kwargs: Any) -> Any:
            raise faults.pop(0)  # (the reply stays unread on the connection)

        monkeypatch.setattr(AbstractConnection, "read_response", read_response)
        with pytest.raises(KeyboardInterrupt):
            await client.run("PING", keep_reply=True)
        monkeypatch.undo()
        assert client.lane_free == [conn]
        assert not conn.is_connected
        assert await client.run("ECHO", "mine") == b"mine"
    finally:
        await client.aclose()
