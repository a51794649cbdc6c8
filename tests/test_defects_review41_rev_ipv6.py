"""Review 41: an upstream at an IPv6 address, where a host and its port meet in a key.

A plain host's records name it by `host:port` (`Upstream.key`): for an IPv6 address,
`fd00::5:8080`. `refusals._not_resendable` (a POST's 5xx our breaker counted and the
transport may not send again is the upstream's failure, answered 502 marked
`x-fidelity-fault: upstream`) compared the URL's host with that subject up to its first
colon: "" for every IPv6 address, so such a POST's 503 reached the client as the app's
bare 500, which a caller's breaker counts against us (flt40's defect, for IPv6). It now
compares the whole key.

Left (the report says why): `body.Watch.cut_by_deadline` reads the attempt timeout of
the entry matching its subject, and `fd00::5:8080` cannot say whether it holds a port.
Its other subjects are checked here.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import (
    BreakerConfig,
    FidelityMiddleware,
    FidelityTransport,
    Policy,
    RetryConfig,
    UpstreamConfig,
)
from fidelity_mw.context import DecisionContext
from fidelity_mw.engine import Engine
from fidelity_mw.outbound.body import Watch
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio


def _app(host: str, url_host: str) -> Any:
    def network(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="no")

    policy = Policy(
        upstreams=(
            UpstreamConfig(
                host=host,
                retry=RetryConfig(attempts=3, base_ms=1, max_ms=2),
                breaker=BreakerConfig(consecutive_failures=50),
            ),
        )
    )
    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(network), telemetry=False)
    )

    async def call(request: Request) -> Response:
        answer = await client.post(f"http://{url_host}/pay", content=b"{}")
        answer.raise_for_status()
        return PlainTextResponse("paid")

    app = Starlette(routes=[Route("/pay", call, methods=["POST"])])
    return FidelityMiddleware(app, policy=policy, clock=FakeClock(), telemetry=False)


@pytest.mark.parametrize(
    ("host", "url_host"),
    [("10.0.4.1", "10.0.4.1:8080"), ("fd00::5", "[fd00::5]:8080"), ("fd00::5", "[fd00::5]")],
)
async def test_a_post_not_sent_again_is_the_upstreams_failure_at_any_address(
    host: str, url_host: str
) -> None:
    transport = httpx.ASGITransport(app=_app(host, url_host), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        response = await client.post("/pay")
    assert response.status_code == 502
    assert response.headers["x-fidelity-fault"] == "upstream"


@pytest.mark.parametrize("key", ["fd00::5", "10.0.4.1:8080", "svc.internal"])
def test_a_cut_body_reads_the_attempt_timeout_of_its_hosts_entry(key: str) -> None:
    host = key.rsplit(":", 1)[0] if key.count(":") == 1 else key
    policy = Policy(upstreams=(UpstreamConfig(host=host, attempt_timeout_ms=1_000),))
    clock = FakeClock()
    engine = Engine(policy, clock=clock)
    ctx = DecisionContext(engine, "/pay", "GET", clock.monotonic())
    ctx.deadline_at = ctx.started_at + 2.0  # 2 s: at least half of 1 s (not of 10 s)
    clock.advance(2.0)
    watch = Watch(ctx, key, None, None, "upstream:" + key, None, None, "memory", None)
    assert watch.cut_by_deadline()
