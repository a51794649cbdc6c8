"""Review 11: defects found in this session's merged changes, each with the test that
failed before its fix.

- check_limits(request, path=...) inside a mounted app named the path as the sub-app
  routes it and cached that plan for the middleware (`/v2/export` became `/export`);
  with the middleware on the mounted app, the mounted app's view stays.
- A cost function that raised (the documented `len(await request.json())` on a body
  that is not a batch) was a 500 the route breaker counted: one client opened the route.
  Now the request costs the burst; an HTTPException or a client gone passes through.
- Plans were cached by (method, path) while a Host route's endpoint overrides depend on
  the host: one host's `@fidelity.deadline` served the other host's endpoint.
"""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request

from _asgi import http_scope
from fidelity_mw import FidelityMiddleware, Policy, RateLimit, check_limits, current
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.state.memory import MemoryStore
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


# ---------------------------------------------------------------- a cost function that raises


async def test_a_cost_function_broken_by_the_body_is_no_failure_of_the_route(
    clock: FakeClock,
) -> None:
    """The documented cost function (`len(await request.json())`) raised on a body of
    valid JSON that is not a batch (`5`): the dependency runs before FastAPI reports the
    body's validation error, so every such request was a 500 that the route breaker
    counted, and one client opened the route for everyone. Now the request costs the
    burst (its cost is unknown), FastAPI answers its 422, and the route stays closed."""
    fidelity = Fidelity()

    async def batch_size(request: Request) -> int:
        return len(await request.json())

    async def too_large(request: Request) -> int:
        raise HTTPException(413, "too large")

    app = FastAPI()

    @app.post("/items", dependencies=[Depends(fidelity.limit("10/s", cost=batch_size))])
    async def add(items: list[str]) -> dict[str, int]:
        return {"added": len(items)}

    @app.post("/big", dependencies=[Depends(fidelity.limit("10/s", cost=too_large))])
    async def big() -> dict[str, int]:
        return {}

    fidelity.install(app)
    app.add_middleware(
        FidelityMiddleware, policy=Policy(), clock=clock, rng=seeded_random(1), telemetry=False
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        statuses = []
        for _ in range(30):
            statuses.append((await c.post("/items", json=5)).status_code)
            clock.advance(1.0)  # the bucket refilled: FastAPI's answer, not ours
        assert set(statuses) == {422}
        assert (await c.post("/items", json=["a", "b"])).json() == {"added": 2}
        clock.advance(1.0)
        # a cost that cannot be read takes the burst: nothing left right after it
        assert (await c.post("/items", json=5)).status_code == 422
        assert (await c.post("/items", json=["a"])).status_code == 429
        # an HTTPException raised by the cost function is the app's answer, as before
        assert (await c.post("/big")).status_code == 413


async def test_check_limits_in_a_mounted_app_with_its_own_middleware(clock: FakeClock) -> None:
    """(The fix above keeps this:) with the middleware on the mounted app, its requests
    are named as the mounted app routes them, and so is the check's."""
    v2 = FastAPI()

    @v2.post("/export")
    async def export() -> dict[str, str | None]:
        ctx = current()
        return {"route": None if ctx is None else ctx.route}

    @v2.get("/quota")
    async def quota(request: Request) -> dict[str, Any]:
        check = await check_limits(request, path="/v2/export", method="POST")
        return {"allowed": check.allowed, "limits": [s.name for s in check.limits]}

    # (the globs of a middleware on the mounted app match its own route paths, as its
    # router sees them: `/export`, not `/v2/export`; review 30)
    policy = Policy(rate_limits=(RateLimit(name="exports", match="/export", rate="2/min"),))
    v2.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock, rng=seeded_random(1), telemetry=False
    )
    app = FastAPI()
    app.mount("/v2", v2)
    async with client(app) as c:
        assert (await c.get("/v2/quota")).json() == {"allowed": True, "limits": ["exports"]}
        assert (await c.post("/v2/export")).json() == {"route": "/export"}


async def test_a_client_gone_while_the_cost_function_reads_is_not_charged(
    clock: FakeClock,
) -> None:
    """(With the fix above:) a client that disconnects while the cost function reads the
    body is the middleware's `disconnected`, not a cost function failure charged the burst."""
    fidelity = Fidelity()
    limit = fidelity.limit("10/min", cost=lambda r: _body_size(r), name="upload")

    app = FastAPI()

    @app.post("/upload", dependencies=[Depends(limit)])
    async def upload() -> dict[str, int]:
        return {}

    fidelity.install(app)
    store = MemoryStore()
    app.add_middleware(
        FidelityMiddleware, policy=Policy(), clock=clock, store=store, telemetry=False
    )
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope(
        "/upload", "POST", headers=[(b"host", b"t")], client=("10.0.0.1", 1), server=("t", 80)
    )
    with contextlib.suppress(Exception):
        await app(scope, receive, send)
    assert not store.limits.tats  # nothing charged
    assert not [m for m in sent if m.get("status") == 200]


async def _body_size(request: Request) -> int:
    return len(await request.body())


# ---------------------------------------------------------------- one path, two hosts


async def test_two_hosts_with_one_path_keep_their_own_endpoint_overrides(
    clock: FakeClock,
) -> None:
    """Since endpoint overrides under a `Host` are found, a request's plan depends on its
    host, but plans were cached by (method, path) alone: whichever host came first gave
    the other its endpoint's `@fidelity.deadline` (a 50 ms deadline on the wrong host's
    endpoint), or took it away from its own."""
    fidelity = Fidelity()
    api, admin = FastAPI(), FastAPI()

    @api.get("/items/{item}")
    async def api_item(item: int) -> dict[str, float | None]:
        ctx = current()
        return {"deadline_at": None if ctx is None else ctx.deadline_at}

    @admin.get("/items/{item}")
    @fidelity.deadline(50)
    async def admin_item(item: int) -> dict[str, float | None]:
        ctx = current()
        return {"deadline_at": None if ctx is None else ctx.deadline_at}

    fidelity.install(api)
    fidelity.install(admin)
    app = FastAPI()
    app.host("api.example.com", api)
    app.host("admin.example.com", admin)
    app.add_middleware(
        FidelityMiddleware, policy=Policy(), clock=clock, rng=seeded_random(1), telemetry=False
    )
    transport = httpx.ASGITransport(app=app)
    now = clock.monotonic()
    default_s = Policy().deadline.default_ms / 1000.0
    for host, deadline in [("api", default_s), ("admin", 0.05), ("api", default_s)]:
        base = f"http://{host}.example.com"
        async with httpx.AsyncClient(transport=transport, base_url=base) as c:
            answer = (await c.get("/items/1")).json()
        assert answer["deadline_at"] == pytest.approx(now + deadline), host
