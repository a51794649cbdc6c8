"""Review 11: defects found in this session's merged changes (check without counting,
per-request cost, hedging pause/resume, Redis read-only handling, mount naming), each
with the test that failed before its fix."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from fidelity_mw import FidelityMiddleware, Policy, RateLimit, check_limits, current
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


# ---------------------------------------------------------------- check_limits under a Mount


async def test_check_limits_from_a_mounted_app_leaves_the_route_its_name(
    clock: FakeClock,
) -> None:
    """`check_limits(request, path=...)` inside a mounted app built the plan from the
    endpoint's scope (the sub-app, its root_path): the path was named `/export`, not
    `/v2/export`, and that plan was cached for the middleware's own requests, so the
    check renamed the route (its breaker, its records) for good."""
    v2 = FastAPI()

    @v2.post("/export")
    async def export() -> dict[str, str | None]:
        ctx = current()
        return {"route": None if ctx is None else ctx.route}

    @v2.get("/quota")
    async def quota(request: Request) -> dict[str, Any]:
        check = await check_limits(request, path="/v2/export", method="POST")
        return {"allowed": check.allowed, "limits": [s.name for s in check.limits]}

    app = FastAPI()
    app.mount("/v2", v2)
    policy = Policy(rate_limits=(RateLimit(name="exports", match="/v2/export", rate="2/min"),))
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock, rng=seeded_random(1), telemetry=False
    )
    async with client(app) as c:
        assert (await c.get("/v2/quota")).json() == {"allowed": True, "limits": ["exports"]}
        assert (await c.post("/v2/export")).json() == {"route": "/v2/export"}
