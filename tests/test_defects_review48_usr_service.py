"""A user's FastAPI service, built as README.md and docs/quickstart.md say, under faults
(review 48, usr48): the middleware in two lines, one upstream service of three instances
through `FidelityTransport` and its balancer (docs/outbound.md), a per-client limit and the
route breaker, traces through the real SDK and OTLP/HTTP exporter to an in-test receiver.

Every server is real (uvicorn on loopback): one instance answers 503 with a long
`Retry-After` once and then every call well, one never answers within the attempt's time,
one refuses connections. Clients send malformed headers, one bursts, one leaves in the
middle of a streamed answer. Counts, not timings; the one time bound (`attempt_timeout_ms`)
has slack for a loaded machine.

Before round 48 the healthy instance's pause kept every retry away from it after it had
answered other calls well: a call whose first attempt met the refusing or the slow
instance sent its retries to the other failing one and failed (502/504) beside it.
"""

from __future__ import annotations

import asyncio
import random
import threading
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from _loopback import LoopbackServer, refused_port
from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy
from test_telemetry_otlp import Receiver, attrs, otlp_http_providers

pytestmark = pytest.mark.slow

CHUNKS = 40

POLICY = """
version = 1
trusted_proxies = ["127.0.0.0/8"]   # the test's clients come through "a proxy" on loopback

[[rate_limit]]
name = "per-client"
match = "/api/*"
key = "client_ip"
rate = "5/min"
burst = 5

[[upstream]]
host = "inventory"
instances = [{instances}]
attempt_timeout_ms = 1500
retry = {{ attempts = 3, base_ms = 1, max_ms = 5 }}
"""


class Instances:
    """The three instances: healthy after one 503, never in time, refusing."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.busy = True
        self.lock = threading.Lock()
        self.stop = threading.Event()  # the slow instance answers once the test is over

        async def healthy(request: Request) -> Response:
            with self.lock:
                self.calls["healthy"] += 1
                busy, self.busy = self.busy, False
            if busy:
                return PlainTextResponse("busy", status_code=503, headers={"retry-after": "60"})
            if request.url.path == "/stream":

                async def chunks() -> AsyncIterator[bytes]:
                    for n in range(CHUNKS):
                        yield b"%04d\n" % n
                        await asyncio.sleep(0.005)

                return StreamingResponse(chunks())
            return PlainTextResponse("7")

        async def slow(request: Request) -> Response:
            with self.lock:
                self.calls["slow"] += 1
            # (a thread's event, set from the test's loop: polled, not awaited)
            while not self.stop.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            return PlainTextResponse("late")

        self.healthy = LoopbackServer(Starlette(routes=[Route("/{p:path}", healthy)]))
        self.slow = LoopbackServer(Starlette(routes=[Route("/{p:path}", slow)]))
        self.refused = f"http://127.0.0.1:{refused_port()}"


def build_service(instances: Instances, tracer_provider: Any, meter_provider: Any) -> FastAPI:
    urls = [instances.healthy.url, instances.slow.url, instances.refused]
    policy = Policy.from_dict(
        tomllib.loads(POLICY.format(instances=", ".join(f'"{u}"' for u in urls)))
    )
    # README's two lines (the providers: docs/telemetry.md, not the global ones)
    app = FastAPI()
    app.add_middleware(
        FidelityMiddleware,
        policy=policy,
        rng=random.Random(48).random,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )
    inventory = httpx.AsyncClient(base_url="http://inventory", transport=FidelityTransport())

    @app.get("/api/stock")
    async def stock() -> dict[str, int]:
        response = await inventory.get("/stock")
        response.raise_for_status()
        return {"stock": int(response.text)}

    @app.get("/api/stream")
    async def stream() -> StreamingResponse:
        response = await inventory.send(inventory.build_request("GET", "/stream"), stream=True)

        async def through() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        return StreamingResponse(through(), status_code=response.status_code)

    return app


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


def server_spans(receiver: Receiver) -> list[dict[str, Any]]:
    return [attrs(s.attributes) for s in receiver.spans() if s.kind == s.SPAN_KIND_SERVER]


def test_a_fastapi_service_over_three_faulty_instances(receiver: Receiver) -> None:
    instances = Instances()
    setup = otlp_http_providers(receiver.endpoint, "stock-front")
    app = build_service(instances, setup.tracer_provider, setup.meter_provider)
    statuses: list[int] = []

    async def scenario(base: str) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:

            async def get(path: str, client_ip: str, **headers: str) -> httpx.Response:
                response = await client.get(path, headers={"x-forwarded-for": client_ip, **headers})
                statuses.append(response.status_code)
                return response

            # 1. One client after another: the first may meet the 503 (and the other two
            # instances); once the healthy instance has answered, every request is served.
            seen["first"] = [
                (await get("/api/stock", f"192.0.2.{n}")).status_code for n in range(14)
            ]
            # 2. Malformed headers: ignored, recorded, never a failure of ours.
            seen["malformed"] = [
                (await get("/api/stock", "198.51.100.1", **{"x-request-timeout-ms": "soon"})),
                (await get("/api/stock", "198.51.100.2", **{"grpc-timeout": "-1S"})),
                (await get("/api/stock", "198.51.100.3", traceparent="00-zz-zz-01")),
                (await get("/api/stock", "not-an-address")),
            ]
            # 3. A burst from one client: its burst served, the rest refused; others served.
            burst = await asyncio.gather(*(get("/api/stock", "203.0.113.9") for _ in range(8)))
            seen["burst"] = Counter(r.status_code for r in burst)
            seen["beside_burst"] = (await get("/api/stock", "203.0.113.10")).status_code
            # 4. A streamed answer through the front, whole; then one whose client leaves.
            whole = await get("/api/stream", "203.0.113.20")
            seen["stream"] = (whole.status_code, whole.content.count(b"\n"))
            async with client.stream(
                "GET", "/api/stream", headers={"x-forwarded-for": "203.0.113.21"}
            ) as partial:
                statuses.append(partial.status_code)
                async for _ in partial.aiter_raw():
                    break  # the client leaves after its first chunk
            await asyncio.sleep(0.1)
            seen["after_leave"] = (await get("/api/stock", "203.0.113.22")).status_code
        instances.stop.set()
        return seen

    try:
        with instances.healthy, instances.slow, LoopbackServer(app) as front:
            seen = asyncio.run(scenario(front.url))
        setup.force_flush()
    finally:
        setup.shutdown()

    first = seen["first"]
    served = [n for n, s in enumerate(first) if s == 200]
    assert served, first
    assert served[0] <= 1, first  # the 503 fails one request at most
    assert first[served[0] :] == [200] * (len(first) - served[0]), str(first)
    assert [r.status_code for r in seen["malformed"]] == [200] * 4
    assert seen["burst"] == Counter({200: 5, 429: 3})
    assert seen["beside_burst"] == 200
    assert seen["stream"] == (200, CHUNKS)
    assert seen["after_leave"] == 200

    spans = server_spans(receiver)
    assert len(spans) == len(statuses)  # one SERVER span per request
    by_status = Counter(s["http.response.status_code"] for s in spans)
    assert by_status == Counter(statuses)
    # every request that was not a plain success says who decided and how it ended
    for span in spans:
        if span["http.response.status_code"] == 429:
            assert span["fidelity.decided_by"] == "ratelimit"
            assert "ratelimit:per-client/reject/over_limit@memory" in span["fidelity.decisions"]
        if "fidelity.outcome" in span:
            assert span["fidelity.decided_by"]
    malformed = [
        s["fidelity.decisions"] for s in spans if "malformed_header" in s["fidelity.decisions"]
    ]
    assert len(malformed) == 2
    assert all("deadline/allow/route_default@request" in d for d in malformed)
    (left,) = [s for s in spans if s.get("fidelity.outcome") == "disconnected"]
    assert left["http.route"] == "/api/stream"
    # no request was shed by the route breaker: the upstream's failures are not the route's
    assert not any("breaker/shed" in s["fidelity.decisions"] for s in spans)
    # every attempt has its CLIENT span, named after the instance its `lb` pick chose
    client_spans = [attrs(s.attributes) for s in receiver.spans() if s.kind == s.SPAN_KIND_CLIENT]
    picks = sum(s["fidelity.decisions"].count("lb/allow/") for s in spans)
    assert len(client_spans) == picks
    for span in client_spans:
        assert span["fidelity.decisions"].startswith("lb/allow/")
    assert sum(instances.calls.values()) <= picks  # (refused connections reach nobody)
