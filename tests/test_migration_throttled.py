"""docs/migration.md, "From throttled-py": both sides of each difference it names.

throttled-py 3.5 is in the dev extra, so its side runs here too, on its FastAPI integration
as its README wires it (`Limiter`, `@limiter.limit()`, `RateLimitMiddleware`, the 429
handler). Its limiter reads the system clock: each test stays inside one window (3 a
minute), so nothing depends on how long a test takes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from throttled.asyncio import RedisStore
from throttled.asyncio.contrib.fastapi import (
    Limiter,
    RateLimitExceededError,
    RateLimitMiddleware,
    get_remote_address,
    rate_limit_exceeded_handler,
)

from fidelity_mw import FidelityMiddleware, Policy, current
from fidelity_mw.fastapi import Fidelity
from redis_server import refused_port


def throttled_app(key_func: Any = None, store: Any = None) -> FastAPI:
    """throttled-py's documented FastAPI integration: 3 a minute on /search."""
    app = FastAPI()
    limiter = Limiter("3/m", key_func=key_func, store=store)

    @app.get("/search")
    @limiter.limit()
    async def search(request: Request) -> dict[str, str]:
        return {"q": ""}

    app.add_middleware(RateLimitMiddleware)
    app.add_exception_handler(RateLimitExceededError, rate_limit_exceeded_handler)
    return app


def fidelity_app(policy: Policy | None = None, **limit: Any) -> FastAPI:
    """The migrated app: the same quota as a dependency on the route's router. The route
    returns the limit's decision as the request's context holds it."""
    fidelity = Fidelity()
    limited = APIRouter(dependencies=[Depends(fidelity.limit("3/min", **limit))])

    @limited.get("/search")
    async def search() -> dict[str, str]:
        decision = next(d for d in current().decisions if d.layer == "ratelimit")
        details = dict(decision.details or {})
        return {"source": decision.state_source, "why": str(details.get("fallback_why"))}

    @limited.get("/export")
    def export() -> dict[str, int]:
        return {"rows": 0}

    app = FastAPI()
    app.add_middleware(FidelityMiddleware, policy=policy or Policy())
    app.include_router(limited)
    fidelity.install(app)
    return app


def responses(app: FastAPI, calls: list[tuple[str, str]]) -> list[httpx.Response]:
    """Each (client IP, path) in turn, each client on its own connection."""

    async def run() -> list[httpx.Response]:
        answers = []
        for ip, path in calls:
            transport = httpx.ASGITransport(app=app, client=(ip, 50000))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answers.append(await client.get(path))
        return answers

    return asyncio.run(run())


def statuses(app: FastAPI, calls: list[tuple[str, str]]) -> list[int]:
    return [r.status_code for r in responses(app, calls)]


FOUR_CLIENTS = [(f"10.0.0.{i}", "/search") for i in range(1, 5)]


def test_without_a_key_func_one_client_throttles_the_others_here_each_has_its_own() -> None:
    assert statuses(throttled_app(), FOUR_CLIENTS) == [200, 200, 200, 429]
    assert statuses(fidelity_app(), FOUR_CLIENTS) == [200, 200, 200, 200]
    # throttled-py's shared bucket is key = "route" here
    assert statuses(fidelity_app(key="route"), FOUR_CLIENTS) == [200, 200, 200, 429]


def test_per_client_limits_agree_on_admissions() -> None:
    one_client = [("10.0.0.1", "/search")] * 4 + [("10.0.0.2", "/search")]
    expected = [200, 200, 200, 429, 200]
    assert statuses(throttled_app(key_func=get_remote_address), one_client) == expected
    assert statuses(fidelity_app(), one_client) == expected


def test_a_plain_def_route_is_refused_by_its_async_limiter_and_limited_here() -> None:
    limiter = Limiter("3/m", key_func=get_remote_address)

    def export(request: Request) -> dict[str, int]:
        return {"rows": 0}

    with pytest.raises(TypeError, match="cannot wrap sync route"):
        limiter.limit()(export)  # type: ignore[arg-type]

    async def no_request() -> dict[str, int]:
        return {"rows": 0}

    wrapped = limiter.limit()(no_request)
    with pytest.raises(TypeError, match="requires a Request parameter"):
        asyncio.run(wrapped())

    calls = [("10.0.0.1", "/export")] * 4
    assert statuses(fidelity_app(), calls) == [200, 200, 200, 429]


def closed_port() -> int:
    return refused_port()  # bound, never listening: nobody else's server gets it either


def test_redis_down_is_a_503_for_everyone_there_and_a_recorded_fallback_here() -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    theirs = throttled_app(key_func=get_remote_address, store=RedisStore(server=url))
    answers = responses(theirs, FOUR_CLIENTS[:2])
    assert [r.status_code for r in answers] == [503, 503]
    assert answers[0].json() == {"detail": "Rate limit store unavailable"}

    policy = Policy.from_dict({"state": {"url": url, "on_error": "local"}})
    ours = responses(fidelity_app(policy), [("10.0.0.1", "/search")] * 4)
    assert [r.status_code for r in ours] == [200, 200, 200, 429]  # the limit still holds
    assert ours[0].json()["source"] == "fallback"
    assert ours[0].json()["why"] == "unreachable"


def test_the_fields_of_an_earlier_draft_there_the_structured_fields_here() -> None:
    calls = [("10.0.0.1", "/search")] * 4
    admitted, *_, refused = responses(throttled_app(key_func=get_remote_address), calls)
    assert admitted.headers["ratelimit-limit"] == "3"
    assert admitted.headers["ratelimit-remaining"] == "2"
    assert "ratelimit" not in admitted.headers
    assert refused.json() == {"detail": "Rate limit exceeded"}

    admitted, *_, refused = responses(fidelity_app(), calls)
    assert "ratelimit-limit" not in admitted.headers
    assert "r=2" in admitted.headers["ratelimit"]
    assert "q=3" in admitted.headers["ratelimit-policy"]
    assert refused.headers["content-type"] == "application/problem+json"
    assert int(refused.headers["retry-after"]) >= 1
