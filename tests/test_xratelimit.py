"""`rate_limit_header_names`: the X-RateLimit-* fields slowapi and GitHub clients read."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.errors import PolicyError
from fidelity_mw.fastapi import Fidelity
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio

X_FIELDS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


def app_with(clock: FakeClock, *limits: RateLimit, **settings: Any) -> Starlette:
    async def ok(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/r", ok)])
    policy = Policy(breaker=None, rate_limits=limits, **settings)
    app.add_middleware(FidelityMiddleware, policy=policy, clock=clock, telemetry=False)
    return app


async def get(app: Any, n: int, path: str = "/r") -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return [await client.get(path) for _ in range(n)]


def x_fields(response: httpx.Response) -> tuple[int, int, int] | None:
    if "x-ratelimit-limit" not in response.headers:
        return None
    limit, remaining, reset = (int(response.headers[name]) for name in X_FIELDS)
    return limit, remaining, reset


async def test_x_ratelimit_fields_instead_of_ietf(clock: FakeClock):
    app = app_with(clock, RateLimit(name="a", rate="3/min"), rate_limit_header_names="x-ratelimit")
    answers = await get(app, 4)
    wall = int(clock.wall())  # the fake clock's wall time is whole seconds
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    # bucket of 3; one unit per 20 s: more quota 20 s from now, as Unix seconds
    assert [x_fields(r) for r in answers] == [
        (3, 2, wall + 20),
        (3, 1, wall + 20),
        (3, 0, wall + 20),
        (3, 0, wall + 20),
    ]
    assert answers[3].headers["retry-after"] == "20"
    assert all("ratelimit" not in r.headers for r in answers)


async def test_both_and_the_limit_closest_to_refusing(clock: FakeClock):
    roomy = RateLimit(name="roomy", rate="100/min")
    tight = RateLimit(name="tight", rate="2/min")
    shadow = RateLimit(name="trial", rate="1/min", shadow=True)
    app = app_with(clock, roomy, tight, shadow, rate_limit_header_names="both")
    first, second, third = await get(app, 3)
    wall = int(clock.wall())
    # the shadow limit has fewer units left but is never advertised
    assert x_fields(first) == (2, 1, wall + 30)
    assert x_fields(second) == (2, 0, wall + 30)
    assert third.status_code == 429
    assert x_fields(third) == (2, 0, wall + 30)
    assert third.headers["ratelimit"].startswith('"roomy";r=')


async def test_reset_never_after_the_retry_after_and_the_default_unchanged(clock: FakeClock):
    app = app_with(clock, RateLimit(name="a", rate="1/min", burst=1))
    (ok,) = await get(app, 1)
    assert x_fields(ok) is None  # ietf by default
    assert ok.headers["ratelimit"] == '"a";r=0;t=60'
    app = app_with(
        clock,
        RateLimit(name="a", rate="1/min", burst=1),
        rate_limit_header_names="x-ratelimit",
        rate_limit_headers="on_reject",
    )
    ok, refused = await get(app, 2)
    assert x_fields(ok) is None  # on_reject: only the 429 carries them
    assert x_fields(refused) == (1, 0, int(clock.wall()) + 60)
    clock.advance(12.5)
    wall = clock.wall()
    (later,) = await get(app, 1)
    assert later.status_code == 429
    assert later.headers["retry-after"] == "48"
    assert x_fields(later) == (1, 0, int(wall) + 48)


async def test_a_custom_rejection_keeps_the_fields(clock: FakeClock):
    def on_reject(ctx: object, decision: object) -> Response:
        return PlainTextResponse("slow down", status_code=429)

    async def ok(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/r", ok)])
    policy = Policy(
        breaker=None,
        rate_limits=(RateLimit(name="a", rate="1/min", burst=1),),
        rate_limit_header_names="x-ratelimit",
    )
    app.add_middleware(
        FidelityMiddleware, policy=policy, clock=clock, telemetry=False, on_reject=on_reject
    )
    _, refused = await get(app, 2)
    assert refused.text == "slow down"
    assert x_fields(refused) == (1, 0, int(clock.wall()) + 60)


async def test_the_fastapi_dependency_follows_the_policy(clock: FakeClock):
    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/dep", dependencies=[Depends(fidelity.limit("2/min"))])
    async def dep() -> str:
        return "ok"

    policy = Policy(breaker=None, rate_limit_header_names="x-ratelimit")
    app.add_middleware(FidelityMiddleware, policy=policy, clock=clock, telemetry=False)
    fidelity.install(app)
    answers = await get(app, 3, "/dep")
    wall = int(clock.wall())
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert [x_fields(r) for r in answers] == [
        (2, 1, wall + 30),
        (2, 0, wall + 30),
        (2, 0, wall + 30),
    ]
    assert all("ratelimit" not in r.headers for r in answers)

    quiet = FastAPI()
    quiet.get("/dep", dependencies=[Depends(fidelity.limit("1/min", name="q"))])(dep)
    never = Policy(breaker=None, rate_limit_headers="never", rate_limit_header_names="both")
    quiet.add_middleware(FidelityMiddleware, policy=never, clock=clock, telemetry=False)
    fidelity.install(quiet)
    ok, refused = await get(quiet, 2, "/dep")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "60"
    for response in (ok, refused):
        assert not {"ratelimit", "ratelimit-policy", *X_FIELDS} & set(response.headers)


def test_a_bad_value_names_the_field():
    with pytest.raises(PolicyError) as caught:
        Policy.from_dict({"rate_limit_header_names": "github"})
    (issue,) = caught.value.issues
    assert issue.path == "rate_limit_header_names"
    assert "x-ratelimit" in issue.message
