"""Review 45 (rev45): on a `FakeClock` (`fidelity_mw.testing.fake_time`), a Redis store
moved the clock by itself.

A plain success on a breaker is deferred (it rides on the next call about the breaker,
or a flush a sync interval later), and the flush waited in a background task sleeping
on the store's clock. `FakeClock.sleep` records the wait and advances the clock: every
deferral moved a test's clock by `sync_interval_ms` and put a wait in `clock.sleeps`,
where the testing docs promise that time moves only with `clock.advance(...)` (and
review 44's timer for budget counts was chosen for this reason): deadlines, backoffs
and breaker open times measured on it moved between a test's requests, and an
assertion on `clock.sleeps` (quickstart's) failed with a Redis store. Now the flush
waits on a timer on the clock, which fires when the test advances it past.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.policy import StateConfig
from fidelity_mw.testing import FakeClock, fake_time
from redis_server import PATIENT, QUIET

pytestmark = [
    pytest.mark.redis,
    pytest.mark.filterwarnings("ignore::fidelity_mw.testing.FakeTimeWarning"),
]


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def _statuses(app: Starlette, n: int) -> list[int]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        statuses = []
        for _ in range(n):
            statuses.append((await client.get("/ok")).status_code)
            for _ in range(5):  # what the store does in the background after a request
                await asyncio.sleep(0)
        return statuses


def test_a_redis_store_leaves_the_fake_clock_alone(redis_url: str) -> None:
    app = Starlette(routes=[Route("/ok", ok)])
    policy = Policy(
        rate_limits=[RateLimit(name="per-client", rate="5/s", match="/ok")],
        state=StateConfig(url=redis_url, **PATIENT, **QUIET),
    )
    app.add_middleware(FidelityMiddleware, policy=policy, telemetry=False)
    with fake_time(app=app) as clock:
        start = clock.monotonic()
        statuses = asyncio.run(_statuses(app, 12))
        assert clock.sleeps == []  # before: [0.1] x 5, one a flush of deferred successes
        assert clock.monotonic() == start  # before: 0.5 s later, by itself
        assert 200 in statuses


def test_the_deferred_successes_reach_redis_once_the_clock_passes_their_interval(
    redis_url: str,
) -> None:
    """The flush still comes, a sync interval on: when the test moves the clock there."""
    app = Starlette(routes=[Route("/ok", ok)])
    policy = Policy(state=StateConfig(url=redis_url, **PATIENT, **QUIET))
    app.add_middleware(FidelityMiddleware, policy=policy, telemetry=False)

    async def run(clock: FakeClock) -> tuple[int, int, int]:
        assert await _statuses(app, 3) == [200, 200, 200]
        store = app.middleware_stack.app.engine.store  # type: ignore[union-attr]
        waiting = sum(entry[2] for entry in store._deferred.values())
        clock.advance(store.sync_s)
        for _ in range(20):
            await asyncio.sleep(0)
            task = store._deferred_task
            if task is not None and not task.done():
                await asyncio.wait_for(asyncio.shield(task), 60)
            if not store._deferred:
                break
        left = sum(entry[2] for entry in store._deferred.values())
        return waiting, left, store.stats.dropped_records

    with fake_time(app=app) as clock:
        waiting, left, dropped = asyncio.run(run(clock))
    assert waiting == 1  # (the others rode on the next request's call about the breaker)
    assert (left, dropped) == (0, 0)
