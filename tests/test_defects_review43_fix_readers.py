"""Review 43 (fix43): `engine.policy_readers` held every middleware built on an engine.

hed42 left it: each `FidelityMiddleware` appended its bound `_read_policy` to its
engine's `policy_readers`, so many middlewares built on one long-lived engine (an app
factory called per test, a middleware per mounted app rebuilt) stayed alive as long as
the engine did, each re-reading the policy on every swap. The engine now holds each
middleware's reader weakly (`Engine.read_policy_with`); the middleware holds it. (Compiled,
the middleware is a native class, which takes no weak reference: the reader is a small
object of its own.)
"""

from __future__ import annotations

import gc

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware
from fidelity_mw.engine import Engine
from fidelity_mw.policy import Policy, RateLimit
from fidelity_mw.testing import FakeClock

pytestmark = pytest.mark.anyio

N = 50


async def _ok(request: Request) -> Response:
    return PlainTextResponse("ok")


def _middleware(engine: Engine) -> FidelityMiddleware:
    return FidelityMiddleware(Starlette(routes=[Route("/x", _ok)]), engine=engine, telemetry=False)


async def _statuses(app: FidelityMiddleware, n: int) -> list[int]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return [(await client.get("/x")).status_code for _ in range(n)]


def _live(engine: Engine) -> int:
    return sum(1 for _ in engine.live_policy_readers())


async def test_dropped_middlewares_go_and_a_swap_still_reaches_the_live_one() -> None:
    engine = Engine(Policy(), clock=FakeClock())
    kept = _middleware(engine)
    assert await _statuses(kept, 2) == [200, 200]
    for _ in range(N):
        app = _middleware(engine)
        assert await _statuses(app, 1) == [200]
    del app
    gc.collect()
    # (counted, not weakly referenced: compiled, the middleware takes no weak reference)
    # (this engine's only: other tests' middlewares may still be around in a full run)
    alive = [
        o for o in gc.get_objects() if isinstance(o, FidelityMiddleware) and o.engine is engine
    ]
    assert alive == [kept]  # none kept by the engine (before: all 51)
    del alive
    assert _live(engine) == 1
    # the engine's list does not grow with middlewares built and dropped
    assert len(engine.policy_readers) == 1
    engine.policy = Policy(rate_limits=(RateLimit(name="tight", rate="2/minute"),))
    assert await _statuses(kept, 3) == [200, 200, 429]


async def test_every_live_middleware_reads_a_swapped_policy() -> None:
    engine = Engine(Policy(), clock=FakeClock())
    apps = [_middleware(engine) for _ in range(3)]
    gc.collect()
    engine.policy = Policy(rate_limits=(RateLimit(name="tight", rate="1/minute"),))
    for app in apps:
        assert app.policy is engine.policy
    # (one counter, the engine's store: the first request takes it, the others are refused)
    assert [await _statuses(app, 1) for app in apps] == [[200], [429], [429]]
