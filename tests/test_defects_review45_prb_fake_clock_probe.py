"""Review 45 (prb45): on a `FakeClock` (`fidelity_mw.testing.fake_time`), the probe that
watches an unreachable Redis ran the test's clock away.

The probe waited between its tries in a task sleeping on the store's clock, and
`FakeClock.sleep` records the wait and advances the clock: with Redis unreachable the
loop moved the clock 479-497 s ahead in 0.2 s of real time (~1300 waits in
`clock.sleeps`), so every window refilled and every deadline and breaker open time
passed by itself, where the testing docs say time moves only with `clock.advance(...)`.
Now the probe waits on a timer on the clock: the test's `advance` runs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.redis_sync import PROBE_CAP_S
from fidelity_mw.testing import FakeClock, fake_time
from redis_server import PATIENT, QUIET, RedisServer, held_port, require_redis

pytestmark = [
    pytest.mark.redis,
    pytest.mark.filterwarnings("ignore::fidelity_mw.testing.FakeTimeWarning"),
]

REQUESTS = 20


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def _until(condition: Callable[[], bool], budget_s: float = 30.0) -> bool:
    """Let the event loop run (real round trips) until `condition` holds; whether it
    did. Real time only: the fake clock is not moved here."""
    for _ in range(int(budget_s / 0.005)):
        if condition():
            return True
        await asyncio.sleep(0.005)
    return condition()


def test_an_unreachable_redis_leaves_the_fake_clock_alone_until_the_test_moves_it(
    tmp_path: Path,
) -> None:
    require_redis()
    # nothing listens there yet, and the port stays ours until the server starts on it
    hold = held_port()
    server = RedisServer(tmp_path, port=int(hold.getsockname()[1]))
    app = Starlette(routes=[Route("/ok", ok)])
    policy = Policy(
        rate_limits=[RateLimit(name="per-client", rate="5/s", burst=5, match="/ok")],
        state=StateConfig(url=server.url, on_error="local", **PATIENT, **QUIET),
    )
    app.add_middleware(FidelityMiddleware, policy=policy, telemetry=False)

    async def run(clock: FakeClock) -> None:
        start = clock.monotonic()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            statuses = []
            for _ in range(REQUESTS):
                statuses.append((await client.get("/ok")).status_code)
                await asyncio.sleep(0.01)  # real time for the store's background work
            store = app.middleware_stack.app.engine.store  # type: ignore[union-attr]
            assert store.fallback_why == "unreachable"
            # before: ~0.2 s of real time moved the clock by hundreds of seconds, and
            # hundreds of probe waits were recorded
            assert clock.sleeps == []
            assert clock.monotonic() == start
            # the window did not refill by itself: the burst, then refusals
            assert statuses.count(200) <= 5
            assert statuses.count(429) >= REQUESTS - 5
            assert store.stats.recoveries == []

            hold.close()
            server.start()
            try:
                tries = store.health.attempt
                assert store.health.probe_at - clock.monotonic() <= PROBE_CAP_S
                clock.advance(PROBE_CAP_S)  # the probe's time: it runs now
                assert await _until(lambda: store.health.up)
                # exactly one probe: the one that waited (it asks ROLE, then writes)
                assert store.health.attempt == tries
                with server.client() as admin:
                    stats = admin.info("commandstats")
                assert stats["cmdstat_role"]["calls"] == 1
                assert len(store.stats.recoveries) == 1
                assert store.stats.recovered_at == [start + PROBE_CAP_S]
                assert clock.sleeps == []
                assert clock.monotonic() == start + PROBE_CAP_S
                assert store.fallback_why is None
            finally:
                await store.aclose()
                server.stop()

    try:
        with fake_time(app=app) as clock:
            asyncio.run(run(clock))
    finally:
        hold.close()  # already closed unless the test failed before the server started
