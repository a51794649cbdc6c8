"""Regression tests for defects found by the second review pass: each failed on
the code before its fix."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from fidelity_mw.policy import StateConfig
from fidelity_mw.state.redis import RedisStats
from fidelity_mw.state.redis_sync import SyncLink
from fidelity_mw.testing import FakeClock
from redis_server import RedisServer


@dataclass(frozen=True)
class _Script:
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


PING_SCRIPT = _Script("return 1")
# INCR on a hash: Redis answers WRONGTYPE, an error reply to this one call
BAD_SCRIPT = _Script("redis.call('HSET', KEYS[1], 'f', 1) return redis.call('INCR', KEYS[1])")


def _link(url: str, **state: int) -> tuple[SyncLink, RedisStats]:
    stats = RedisStats()
    config = StateConfig(url=url, **state)  # type: ignore[arg-type]
    return SyncLink(url, False, config, FakeClock(), stats), stats


def test_sync_link_script_error_fails_only_that_call(redis_url: str) -> None:
    link, stats = _link(redis_url, timeout_ms=5_000, connect_timeout_ms=5_000)
    try:
        assert link.call(BAD_SCRIPT, ["{fmw}:review2:bad"], []) is None
        assert stats.errors == 1
        # Redis answered: the next call goes to it (the clock has not moved)
        got = link.call(PING_SCRIPT, [], [])
        assert got is not None
        assert got[0] == 1
    finally:
        link.close()


def test_sync_link_full_pool_fails_only_that_call(redis_url: str) -> None:
    link, stats = _link(redis_url, pool_size=1, timeout_ms=50, connect_timeout_ms=5_000)
    try:
        pool = link.client().connection_pool
        held = pool.get_connection()  # another thread's call, in flight
        try:
            assert link.call(PING_SCRIPT, [], []) is None
        finally:
            pool.release(held)
        assert stats.errors == 1
        assert stats.pool_waits == 1
        got = link.call(PING_SCRIPT, [], [])
        assert got is not None
        assert got[0] == 1
    finally:
        link.close()


def test_sync_link_survives_a_restart_without_pausing(own_redis: RedisServer) -> None:
    link, stats = _link(own_redis.url, timeout_ms=5_000, connect_timeout_ms=5_000)
    try:
        assert link.call(PING_SCRIPT, [], []) is not None
        own_redis.restart()
        # (not a defect: a guard) the pooled connection is to the old server; redis-py's
        # blocking pool replaces it before use, so nothing fails and nothing pauses
        got = link.call(PING_SCRIPT, [], [])
        assert got is not None
        assert got[0] == 1
        assert stats.errors == 0
    finally:
        link.close()


def test_sync_link_pauses_when_redis_is_unreachable(own_redis: RedisServer) -> None:
    link, stats = _link(own_redis.url, timeout_ms=1_000, connect_timeout_ms=1_000)
    try:
        own_redis.stop()
        assert link.call(PING_SCRIPT, [], []) is None
        errors = stats.errors
        own_redis.start()
        # down: the pause spares every thread a timeout per call
        assert link.call(PING_SCRIPT, [], []) is None
        assert stats.errors == errors
    finally:
        link.close()
