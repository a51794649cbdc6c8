"""Review 36, operations: the Redis state page counts only the breakers it could read, and
the reports of broken bodies to a slow remote store are bounded (and what is dropped is
counted)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis as redis_sync

from fidelity_mw import FidelityTransport
from fidelity_mw.context import DecisionContext
from fidelity_mw.decide.breaker import FAILURE, Gate
from fidelity_mw.outbound import body as body_module
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStats, RedisStore
from redis_server import PATIENT, QUIET

# ------------------------------------------------- the state page's breaker count


@pytest.mark.redis
@pytest.mark.anyio
async def test_the_breaker_count_leaves_out_the_breakers_the_page_could_not_read(
    redis_url: str,
) -> None:
    """Three breakers this instance used: one hash whose fields are not numbers (another
    writer's), one whose probe set holds another type (WRONGTYPE on ZCARD). Both are left
    out of the list, and were still counted: the page said "3 breakers" over a list of
    one, as if two were held back by `top_breakers`."""
    client = redis_sync.Redis.from_url(redis_url)
    red = RedisStore(config=StateConfig(url=redis_url, **PATIENT, **QUIET), rng=lambda: 0.5)
    cfg = BreakerConfig(min_calls=1, consecutive_failures=1, open_min_s=60.0, open_s=60.0)
    spec = LimitSpec("c", 1.0, 5.0, 1, False)
    try:
        for route in ("route:/a", "route:/b", "route:/c"):
            result = await red.admit(route, cfg, [f"c|{route}"], [spec], 0.0)
            assert result.gate is not None
            await red.record(route, cfg, result.gate, FAILURE, False, 0.0)
        client.hset(red.breaker_keys("route:/a")[0], "ou", "not a time")
        probes = red.breaker_keys("route:/b")[1]
        client.delete(probes)
        client.set(probes, "another app's value")
        snap = await red.snapshot(0.0)
        assert snap.source == "redis"
        assert [b.key for b in snap.breakers] == ["route:/c"]
        assert snap.breaker_count == 1
        assert any("2 keys held values that are not ours" in note for note in snap.notes)
    finally:
        client.close()
        await red.aclose()


# ------------------------------------------------- broken-body reports, bounded


class _SlowStore:
    """A remote store whose `record` answers only when let go (Redis at its timeout)."""

    def __init__(self) -> None:
        self.stats = RedisStats()
        self.go = asyncio.Event()
        self.thread_go = threading.Event()
        self.recorded = 0

    async def record(self, *args: Any) -> str:
        await self.go.wait()
        self.recorded += 1
        return "closed"

    def record_sync(self, *args: Any) -> str:
        self.thread_go.wait(30.0)
        self.recorded += 1
        return "closed"


def _watch(store: _SlowStore) -> body_module.Watch:
    engine = FidelityTransport(httpx.MockTransport(lambda r: httpx.Response(200))).engine
    ctx = DecisionContext(engine, "out", "GET", 0.0)
    gate = Gate("allow", "closed", 1, 0.0)
    return body_module.Watch(
        ctx, "up.internal", store, None, "upstream:up.internal", BreakerConfig(), gate,
        "redis", None,
    )  # fmt: skip


# (read so, the tests fail on what they check, not on a name, where the bound is missing)
BOUND = getattr(body_module, "MAX_PENDING_REPORTS", 256)


def _dropped() -> int:
    count: int = getattr(body_module, "dropped", lambda: 0)()
    return count


@pytest.fixture(autouse=True)
def _nothing_pending() -> Iterator[None]:
    yield
    body_module._RECORDS.clear()


def test_reports_to_a_slow_store_are_bounded_and_the_dropped_counted() -> None:
    bound = BOUND
    extra = 44

    async def go() -> None:
        store = _SlowStore()
        before = _dropped()
        for _ in range(bound + extra):
            _watch(store).broke(httpx.ReadError("reset"), 1, False)
        assert len(body_module._RECORDS) == bound  # (was one task per break)
        assert _dropped() - before == extra
        assert store.stats.dropped_records == extra
        store.go.set()
        while body_module._RECORDS:
            await asyncio.gather(*body_module._RECORDS)
        assert store.recorded == bound
        # all sent: the next break is reported again
        _watch(store).broke(httpx.ReadError("reset"), 1, False)
        await asyncio.gather(*body_module._RECORDS)
        assert store.recorded == bound + 1
        assert _dropped() - before == extra

    asyncio.run(go())


def test_the_blocking_transports_reports_are_bounded_too() -> None:
    # one worker thread, and a queue that grew for as long as the store was slow
    bound = BOUND
    store = _SlowStore()
    before = _dropped()
    try:
        for _ in range(bound + 10):
            _watch(store).broke(httpx.ReadError("reset"), 1, True)
        assert _dropped() - before == 10
        assert store.stats.dropped_records == 10
    finally:
        store.thread_go.set()
    # one worker, in order: past this, every report queued before it has ended
    body_module._background().submit(lambda: None).result(timeout=30.0)
    assert store.recorded == bound
    assert getattr(body_module, "_pending", [0])[0] == 0
