"""Redis faults under load, through a real service: uvicorn + FidelityMiddleware on Redis state.

A bounded load runs (4 concurrent clients) while the test kills Redis
(SIGKILL) and restarts it, pauses it (SIGSTOP / SIGCONT), stalls it
(`DEBUG SLEEP 0.3`) and slows it (repeated `DEBUG SLEEP 0.08`, near the
100 ms timeout). For every request: exactly one response, never a 500; during
each fault the decisions say `fallback`, after it `redis` again (the time
that takes is measured and reported); afterwards no task is left on the
service's loop and no file descriptor in the process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_sync

from fidelity_mw import Policy, RateLimit, UpstreamConfig
from fidelity_mw.policy import BreakerConfig, StateConfig
from redis_server import RedisServer, require_redis
from test_faults_support import (
    PATIENCE_S,
    FrontApp,
    RawUpstream,
    Recorder,
    ServerThread,
    fd_count,
    wait_until,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]


class DebugRedis(RedisServer):
    """A redis-server that accepts DEBUG SLEEP (off by default since Redis 7)."""

    def argv(self) -> list[str]:
        return [*super().argv(), "--enable-debug-command", "yes"]


@pytest.fixture
def debug_redis(tmp_path: Path) -> Iterator[DebugRedis]:
    require_redis()
    server = DebugRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def service(url: str, recorder: Recorder, upstream: RawUpstream) -> FrontApp:
    """`/hello` answers itself; `/proxy/item` calls a healthy upstream through
    FidelityTransport, whose host breaker and retry budget live in Redis too."""
    policy = Policy(
        state=StateConfig(url=url, timeout_ms=100, connect_timeout_ms=100, on_error="local"),
        rate_limits=(
            RateLimit(name="ip", rate="5000/s", burst=5000),
            RateLimit(name="key", rate="5000/s", burst=5000, key="header:x-api-key"),
        ),
        breaker=BreakerConfig(min_calls=20, open_s=5.0),
        upstreams=(UpstreamConfig(attempt_timeout_ms=1000),),
    )
    return FrontApp(upstream.url, policy, observer=recorder)


class Load:
    """Clients hitting the service until stopped, in a thread with its own loop."""

    def __init__(self, url: str, concurrency: int = 4) -> None:
        self.url = url
        self.concurrency = concurrency
        self.results: list[tuple[float, int | str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=10.0) as client:

            async def worker(n: int) -> None:
                i = 0
                while not self.stop.is_set():
                    i += 1
                    path = "/hello" if i % 2 else "/proxy/item"
                    try:
                        r = await client.get(path, headers={"x-api-key": f"k{n}-{i % 50}"})
                        self.results.append((time.monotonic(), r.status_code))
                    except httpx.HTTPError as exc:
                        self.results.append((time.monotonic(), type(exc).__name__))

            await asyncio.gather(*(worker(n) for n in range(self.concurrency)))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def first_redis_after(recorder: Recorder, since: float, budget_s: float = PATIENCE_S) -> float:
    """Seconds from `since` to the first request decided on shared state again
    (`redis`, or `cache` - the tiered store's synced copy - with no `fallback`)."""

    def found() -> float | None:
        for record in recorder.snapshot():
            sources = record["sources"]
            if (
                record["at"] >= since
                and "fallback" not in sources
                and ("redis" in sources or "cache" in sources)
            ):
                return float(record["at"] - since)
        return None

    assert wait_until(lambda: found() is not None, budget_s), "never back on Redis"
    took = found()
    assert took is not None
    return took


def fallbacks_between(recorder: Recorder, start: float, end: float) -> int:
    return sum(
        1 for r in recorder.snapshot() if start <= r["at"] <= end and "fallback" in r["sources"]
    )


@pytest.mark.parametrize("scheme", ["redis", "tiered+redis"])
def test_redis_killed_paused_stalled_and_slowed_under_load(
    debug_redis: DebugRedis, record_property: Any, scheme: str
) -> None:
    fds_before = fd_count()
    recorder = Recorder()
    upstream = RawUpstream()
    front = service(debug_redis.url.replace("redis", scheme, 1), recorder, upstream)
    mw = front.asgi
    recovery: dict[str, float] = {}
    fallbacks: dict[str, int] = {}
    with ServerThread(mw) as server:
        idle_tasks = server.task_count()
        with Load(server.url) as load:
            assert wait_until(lambda: len(load.results) >= 50)
            first_redis_after(recorder, 0.0)

            # -- SIGKILL, then a restart on the same port (empty, no scripts)
            t0 = time.monotonic()
            debug_redis.kill()
            # the outage lasts until the load has been decided on the fallback, not for
            # a fixed time (a busy machine may serve nothing in a fixed 0.4 s)
            assert wait_until(lambda: fallbacks_between(recorder, t0, time.monotonic()) >= 3)
            debug_redis.start()
            t1 = time.monotonic()
            recovery["kill_restart"] = first_redis_after(recorder, t1)
            fallbacks["kill"] = fallbacks_between(recorder, t0, t1)

            # -- SIGSTOP / SIGCONT: connections hang; timeouts, not errors
            t0 = time.monotonic()
            debug_redis.pause()
            try:
                # paused until requests time out onto the fallback (timeout 100 ms)
                assert wait_until(lambda: fallbacks_between(recorder, t0, time.monotonic()) >= 3)
            finally:
                debug_redis.resume()
            t1 = time.monotonic()
            recovery["pause"] = first_redis_after(recorder, t1)
            fallbacks["pause"] = fallbacks_between(recorder, t0, t1)

            # -- one stall: the server blocks for 300 ms
            with redis_sync.Redis(host="127.0.0.1", port=debug_redis.port) as admin:
                t0 = time.monotonic()
                admin.execute_command("DEBUG", "SLEEP", "0.3")
                t1 = time.monotonic()
                recovery["stall"] = first_redis_after(recorder, t1)
                fallbacks["stall"] = fallbacks_between(recorder, t0, t1)

                # -- slow: 80 ms stalls back to back for 0.6 s (timeout 100 ms)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 0.6:
                    admin.execute_command("DEBUG", "SLEEP", "0.08")
                t1 = time.monotonic()
                recovery["slow"] = first_redis_after(recorder, t1)
                fallbacks["slow"] = fallbacks_between(recorder, t0, t1)
            served = len(load.results)
            assert wait_until(lambda: len(load.results) >= served + 20)  # load after it all
        results = load.results
        server.call(front.aclose())
        server.call(mw.engine.aclose())
        assert wait_until(lambda: server.task_count() <= idle_tasks), (
            server.task_count(),
            idle_tasks,
        )
    upstream.close()
    assert wait_until(lambda: fd_count() <= fds_before), (fd_count(), fds_before)

    statuses: dict[str, int] = {}
    for _, status in results:
        assert isinstance(status, int), f"no response: {status}"
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    assert set(statuses) == {"200"}, statuses  # generous limits: every request served
    records = recorder.snapshot()
    assert len(records) == len(results)
    # decided on local state while Redis was unreachable, and said so
    assert fallbacks["kill"] > 0
    assert fallbacks["pause"] > 0
    report = {
        "requests": len(results),
        "statuses": statuses,
        "fallback_decisions": fallbacks,
        "recovery_s": {k: round(v, 3) for k, v in recovery.items()},
    }
    record_property(f"{scheme}_faults", report)
    print(f"\n{scheme} faults:", report)
