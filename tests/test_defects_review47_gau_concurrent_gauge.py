"""The breaker gauge on Redis when two calls to one service run together in one request.

On a store it cannot read directly (Redis) the gauge takes each instance's breaker
state from the request's decisions: the `lb` decision names the instance, and the
retry layer's decision after it (the attempt it led to) says the breaker let that
attempt through closed. Calls made together (`asyncio.gather` over one client) share
the request's record, so one call's pick could in principle be paired with the other
call's attempt, and an open instance shown `closed` (hiding `FidelityBreakerOpen`).

Measured (round 47): it is not so. The loop records an attempt's pick, its probe and its
retry-layer decision with no await between them, so no other call's decisions come
between a pick and its attempt; and an instance this process saw open is read open
at each collection (`BreakerWatch._learned_open`), whatever a decision said. In 360
requests of random failures and clock steps, together and one after another, no
breaker Redis held open was shown otherwise (and none shown open that was not). This
pins that, through the middleware, against the Redis store's own reading of its
breakers.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import Engine, FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.admin.view import snapshot_configs
from fidelity_mw.telemetry import schema
from fidelity_mw.testing import FakeClock, seeded_random
from redis_clock import RedisClock
from redis_server import PATIENT
from test_telemetry_helpers import metric_points, pipeline

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

HOSTS = ["10.0.0.7", "10.0.0.8", "10.0.0.9"]


def _policy(redis_url: str, hosts: list[str]) -> Policy:
    return Policy.from_dict(
        {
            "state": {"url": redis_url, **PATIENT},
            "upstream": [
                {
                    "host": "payments",
                    "instances": [f"http://{h}:8080" for h in hosts],
                    "retry": {"attempts": 3},
                    # one failure opens an instance's breaker
                    "breaker": {"consecutive_failures": 1, "min_calls": 1},
                }
            ],
        }
    )


def _gauge(reader: Any) -> dict[str, str]:
    return {
        a[schema.SUBJECT]: a[schema.BREAKER_STATE]
        for a, point in metric_points(reader, schema.METRIC_BREAKER_STATE)
        if point.value == 1 and a.get(schema.BREAKER_SCOPE) == "upstream"
    }


class _Service:
    """A route that calls the service twice at once; instances in `bad` answer 503."""

    def __init__(self, redis_url: str, redis_clock: RedisClock, hosts: list[str], seed: int):
        self.rnd = random.Random(seed)
        self.bad: set[str] = set()
        self.clock = FakeClock()
        self.redis_clock = redis_clock
        redis_clock.set(self.clock.monotonic())
        self.engine = Engine(_policy(redis_url, hosts), clock=self.clock, rng=seeded_random(seed))
        self.p = pipeline()
        self.sent: list[str] = []  # "<path>@<host>" as each attempt arrived
        self.client = httpx.AsyncClient(
            transport=FidelityTransport(
                httpx.MockTransport(self._instance), engine=self.engine, observer=self.p.telemetry
            )
        )
        app = Starlette(routes=[Route("/r", self._route)])
        self.app = FidelityMiddleware(app, engine=self.engine, observer=self.p.telemetry)

    async def _instance(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(f"{request.url.path}@{request.url.host}")
        for _ in range(self.rnd.randrange(3)):  # the other call runs meanwhile
            await asyncio.sleep(0)
        return httpx.Response(503 if request.url.host in self.bad else 200)

    async def _route(self, request: Request) -> PlainTextResponse:
        answers = await asyncio.gather(
            self.client.get("http://payments/a"),
            self.client.get("http://payments/b"),
            return_exceptions=True,
        )
        codes = [a.status_code if isinstance(a, httpx.Response) else 0 for a in answers]
        return PlainTextResponse(" ".join(map(str, codes)))

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.redis_clock.set(self.clock.monotonic())

    async def request(self, outer: httpx.AsyncClient) -> None:
        await outer.get("http://app/r")

    async def truth(self) -> dict[str, str]:
        """The Redis store's own reading of its breakers."""
        snap = await self.engine.store.snapshot(
            self.clock.monotonic(), configs=snapshot_configs(self.engine)
        )
        return {b.key.split(":", 1)[1]: b.state for b in snap.breakers}

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.engine.aclose()
        self.p.shutdown()


async def test_an_instance_that_opened_shows_open_while_the_other_call_goes_on(
    redis_url: str, redis_clock: RedisClock
) -> None:
    s = _Service(redis_url, redis_clock, HOSTS[:2], seed=0)
    s.bad.add("10.0.0.7")
    try:
        outer = httpx.AsyncClient(transport=httpx.ASGITransport(app=s.app))
        async with outer:
            for _ in range(6):  # until a call reaches 10.0.0.7 (the balancer's draw)
                await s.request(outer)
                if any(x.endswith("@10.0.0.7") for x in s.sent):
                    break
            for _ in range(4):
                truth = await s.truth()
                assert truth.get("10.0.0.7:8080") == "open", truth
                assert _gauge(s.p.metrics) == {
                    "10.0.0.7:8080": "open",
                    "10.0.0.8:8080": "closed",
                }, (truth, s.sent)
                await s.request(outer)
            # the two calls ran together: a call's attempt arrived between the other's
            paths = [x.split("@")[0] for x in s.sent]
            assert any(a != b for a, b in itertools.pairwise(paths)), s.sent
            s.bad.clear()
            s.advance(120.0)  # past any open time: probes, then closed
            for _ in range(6):
                await s.request(outer)
            truth = await s.truth()
            assert set(truth.values()) == {"closed"}, truth
            assert _gauge(s.p.metrics) == {
                "10.0.0.7:8080": "closed",
                "10.0.0.8:8080": "closed",
            }, truth
    finally:
        await s.aclose()


@pytest.mark.parametrize("seed", [0, 1])
async def test_no_breaker_open_on_redis_shows_otherwise(
    redis_url: str, redis_clock: RedisClock, seed: int
) -> None:
    """Random failures and clock steps, two calls at once per request: after each request
    the gauge shows open exactly the instances Redis holds open. (A successful probe's
    close shows only at the instance's next attempt, as for a host's breaker: not
    asserted.)"""
    s = _Service(redis_url, redis_clock, HOSTS, seed=seed)
    wrong: list[tuple[int, str, str, str | None]] = []
    held_open = 0  # breakers Redis held open, summed over the requests
    try:
        outer = httpx.AsyncClient(transport=httpx.ASGITransport(app=s.app))
        async with outer:
            for n in range(40):
                if s.rnd.random() < 0.3:
                    s.bad ^= {s.rnd.choice(HOSTS)}
                s.advance(s.rnd.choice([0.0, 0.0, 1.0, 5.0, 31.0, 61.0]))
                await s.request(outer)
                truth = await s.truth()
                gauge = _gauge(s.p.metrics)
                held_open += sum(1 for state in truth.values() if state == "open")
                for key in set(truth) | set(gauge):
                    held, shown = truth.get(key, "closed"), gauge.get(key)
                    if (held == "open") != (shown == "open"):
                        wrong.append((n, key, held, shown))
        assert len(s.sent) > 80, s.sent
        assert held_open >= 5, held_open  # (the run had open breakers to show)
    finally:
        await s.aclose()
    assert wrong == []
