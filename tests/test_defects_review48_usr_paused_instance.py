"""A service's instance that paused retries with a 503's `Retry-After`, then answered
other calls well, was still kept from every retry: calls whose first attempt went to a
refusing or a slow instance sent their retries there too and failed (502/504), while
the healthy instance answered every first attempt it got (review 48, usr48)."""

from __future__ import annotations

import asyncio
import random
import tomllib

import httpx
from fastapi import FastAPI

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.testing import FakeClock

HEALTHY, REFUSING, SLOW = "10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"

POLICY = f"""
version = 1

[[rate_limit]]
name = "per-client"
match = "/api/*"
key = "client_ip"
rate = "100/s"
burst = 100

[[upstream]]
host = "inventory"
instances = ["http://{HEALTHY}", "http://{REFUSING}", "http://{SLOW}"]
retry = {{ attempts = 3, base_ms = 1, max_ms = 5 }}
breaker = {{ min_calls = 1000 }}   # no breaker opens here: the pause alone is at work
"""


def service(seed: int) -> tuple[FastAPI, list[str]]:
    """A FastAPI front calling one service of three instances: one that answers 503 with
    `Retry-After: 30` once and then every call well, one that refuses connections, one
    whose answers never come within the attempt's time."""
    sent: list[str] = []
    busy = [True]

    def upstream(request: httpx.Request) -> httpx.Response:
        where = f"{request.url.host}:{request.url.port}"
        sent.append(where)
        if where == REFUSING:
            raise httpx.ConnectError("connection refused", request=request)
        if where == SLOW:
            raise httpx.ReadTimeout("timed out", request=request)
        if busy[0]:
            busy[0] = False
            return httpx.Response(503, headers={"retry-after": "30"}, text="busy")
        return httpx.Response(200, json={"stock": 7})

    client = httpx.AsyncClient(
        base_url="http://inventory", transport=FidelityTransport(httpx.MockTransport(upstream))
    )
    app = FastAPI()
    app.add_middleware(
        FidelityMiddleware,
        policy=Policy.from_dict(tomllib.loads(POLICY)),
        clock=FakeClock(),
        rng=random.Random(seed).random,
        telemetry=False,
    )

    @app.get("/api/stock")
    async def stock() -> dict[str, object]:
        response = await client.get("/stock")
        response.raise_for_status()
        return {"stock": response.json()["stock"]}

    return app, sent


async def drive(app: FastAPI, n: int) -> list[int]:
    transport = httpx.ASGITransport(app=app, client=("192.0.2.1", 1000))
    async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
        return [(await client.get("/api/stock")).status_code for _ in range(n)]


def test_a_retry_goes_to_the_instance_that_answered_well_since_its_pause() -> None:
    failed_while_healthy = 0
    for seed in range(6):
        app, sent = service(seed)
        statuses = asyncio.run(drive(app, 12))
        # the call that met the 503 fails or not (the other two instances fail too); once
        # the paused instance has answered a call well, it answers every retry sent to it
        served = [n for n, s in enumerate(statuses) if s == 200]
        assert served, (seed, statuses, sent)
        after = statuses[served[0] :]
        failed_while_healthy += sum(1 for s in after if s != 200)
        assert sent.count(HEALTHY) >= len(served)
    assert failed_while_healthy == 0
