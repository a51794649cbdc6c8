"""docs/operations.md's "hangs" row (and architecture.md's deadline layer): an attempt
ends at `min(attempt_timeout_ms, remaining deadline less a tenth)`. The margin is a
tenth of the rest of the deadline, at least 2 ms and at most 250 ms, and at most half
of it (`outbound.wire.deadline_bound_s`): with the default 30 s deadline an attempt
gets 29.75 s, not 27 s; outbound.md gave the bounds without the half. Measured here as
the httpx timeouts the transport gives an attempt inside a request (a fake clock).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.outbound.wire import deadline_bound_s
from fidelity_mw.testing import FakeClock
from test_docs import ROOT


def attempt_read_timeout(deadline_ms: int) -> float:
    """The read timeout an attempt is given inside a request with `deadline_ms` left
    (attempt_timeout_ms above it, the client's timeout above both)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    seen: list[float] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"]["read"])
        return httpx.Response(200)

    policy = Policy.from_dict(
        {
            "deadline": {"max_ms": 120_000},
            "upstream": [{"host": "*", "attempt_timeout_ms": 100_000}],
        }
    )
    client = httpx.AsyncClient(
        transport=FidelityTransport(httpx.MockTransport(upstream)), timeout=600.0
    )

    async def call(request: Any) -> PlainTextResponse:
        await client.get("http://up.internal/x")
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", call)])
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)

    async def run() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            headers = {"x-request-timeout-ms": str(deadline_ms)}
            return (await c.get("/", headers=headers)).status_code

    assert asyncio.run(run()) == 200
    (read,) = seen
    return read


@pytest.mark.parametrize(
    ("deadline_ms", "attempt_s"),
    [(30_000, 29.75), (10_000, 9.75), (1_000, 0.9), (10, 0.008)],
)
def test_an_attempt_inside_a_deadline_gets_the_rest_less_the_margin(
    deadline_ms: int, attempt_s: float
) -> None:
    assert attempt_read_timeout(deadline_ms) == pytest.approx(attempt_s, abs=1e-6)


def test_the_margin_is_at_most_half() -> None:
    assert deadline_bound_s(0.003) == pytest.approx(0.0015)
    assert deadline_bound_s(0.02) == pytest.approx(0.018)


def test_the_pages_say_the_margins_bounds() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    row = next(line for line in operations.splitlines() if line.startswith("| hangs |"))
    assert "at most 250 ms" in row, row
    outbound = (ROOT / "docs" / "outbound.md").read_text(encoding="utf-8")
    said = "a tenth of it, at\n   least 2 ms, at most 250 ms, at most half of it)"
    assert said in outbound
    architecture = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert "at most 250 ms" in architecture
