"""A closed-mode refusal while Redis is up says why: the call failed (`error`)."""

from __future__ import annotations

import httpx
import pytest
from redis.exceptions import ResponseError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.redis import RedisStore
from redis_server import PATIENT, QUIET
from test_telemetry_helpers import decision_events, pipeline


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


@pytest.mark.anyio
@pytest.mark.redis
async def test_a_closed_refusal_while_redis_is_up_says_the_call_failed(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis answers, but with an error (OOM under `maxmemory`): with `on_error = "closed"`
    the request is refused, and its decision says `fallback_why = error` (the store is
    up, so only the exception knows why), as the `local` mode's fallback decisions do."""

    async def oom(self, client, script, keys, args):  # type: ignore[no-untyped-def]
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")

    monkeypatch.setattr(RedisStore, "_evalsha", oom)
    config = StateConfig(url=redis_url, on_error="closed", **PATIENT, **QUIET)
    store = RedisStore(config=config)
    pipe = pipeline()
    policy = Policy(
        rate_limits=[RateLimit(name="per-client", rate="100/s", match="/*")], state=config
    )
    app = Starlette(routes=[Route("/x", _ok)])
    app.add_middleware(FidelityMiddleware, policy=policy, store=store, observer=pipe.telemetry)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/x")
        assert response.status_code == 503
        assert store.health.up
        events = [e for span in pipe.finished() for e in decision_events(span)]
        refused = [e for e in events if e["fidelity.verdict"] == "reject"]
        assert len(refused) == 1
        assert refused[0]["fidelity.detail.fallback_why"] == "error"
    finally:
        await store.aclose()
