"""No hidden retries in redis-py's cluster clients (review 47, red47).

The store builds its clients with `Retry(NoBackoff(), 0)` so that a call is sent once and
waits `timeout_ms` at most. redis-py's cluster clients (asyncio and blocking) handle two
error replies themselves, outside that retry object: `TRYAGAIN` (a multi-key call on a slot
being migrated) is sent again up to 16 times, the later ones 50 ms apart, and `CLUSTERDOWN`
sleeps 250 ms and reloads the topology before it is raised. Before the fix, one admission on
the migrating slot sent 16 EVALSHAs and took 0.11-0.15 s at `timeout_ms = 50`; now it is
sent once (and redirected once by ASK), and decided per `on_error` as every unreachable
answer is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from redis.asyncio.connection import DefaultParser as AsyncParser
from redis.connection import DefaultParser as SyncParser
from redis.crc import key_slot

from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.redis_sync import UNREACHABLE
from fidelity_mw.testing import seeded_random
from redis_server import QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

SLOW = LimitSpec("l", 60.0, 300.0, 1, False)  # 1/min, burst 5
# generous for the first calls on a loaded box; the calls measured fail at once
PATIENT_CONNECT = {"timeout_ms": 2_000, "connect_timeout_ms": 5_000}


def _script_calls(cluster) -> int:  # type: ignore[no-untyped-def]
    """EVALSHA and EVAL the cluster's nodes received (answered or refused) since reset."""
    total = 0
    for node in cluster.nodes:
        with node.client() as client:
            stats = client.info("commandstats")
        for name in ("cmdstat_evalsha", "cmdstat_eval"):
            entry = stats.get(name, {})
            total += sum(int(entry.get(k, 0)) for k in ("calls", "rejected_calls", "failed_calls"))
    return total


def _reset_stats(cluster) -> None:  # type: ignore[no-untyped-def]
    for node in cluster.nodes:
        with node.client() as client:
            client.config_resetstat()


@contextlib.contextmanager
def _migrating(cluster, prefix: str) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """The prefix's slot marked as migrating from its owner to another node (nothing
    moved), as `redis-cli --cluster reshard` leaves it while it moves the keys."""
    slot = key_slot(("{" + prefix + "}").encode())
    owner = cluster.node_for_slot(slot)
    other = next(n for n in cluster.nodes if n is not owner)
    with owner.client() as o, other.client() as t:
        owner_id = o.execute_command("CLUSTER", "MYID").decode()
        other_id = t.execute_command("CLUSTER", "MYID").decode()
        t.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", owner_id)
        o.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", other_id)
        try:
            yield
        finally:
            o.execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner_id)
            t.execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner_id)


def test_cluster_parsers_read_clusterdown_and_tryagain_as_unreachable() -> None:
    from fidelity_mw.state.redis_sync import cluster_parser

    for base in (AsyncParser, SyncParser):
        parser = cluster_parser(base)
        for reply in ("CLUSTERDOWN The cluster is down", "TRYAGAIN Multiple keys request"):
            error = parser.parse_error(reply)
            assert isinstance(error, UNREACHABLE)
            # not redis-py's own classes, which its cluster clients retry or sleep on
            assert type(error).__name__ == "ClusterUnavailable"
        assert type(parser.parse_error("MOVED 1 127.0.0.1:1")).__name__ == "MovedError"
        assert type(parser.parse_error("ASK 1 127.0.0.1:1")).__name__ == "AskError"
        assert base.parse_error("TRYAGAIN x").__class__.__name__ == "TryAgainError"  # untouched


async def test_tryagain_is_not_retried_by_the_asyncio_cluster_client(redis_cluster) -> None:  # type: ignore[no-untyped-def]
    prefix = "r47a"
    store = RedisStore(
        config=StateConfig(url=redis_cluster.url, key_prefix=prefix, **PATIENT_CONNECT, **QUIET),
        rng=seeded_random(47),
    )
    breaker = BreakerConfig()
    try:
        assert (await store.admit("route:/a", breaker, ["l|x"], [SLOW], 0.0)).source == "redis"
        with _migrating(redis_cluster, prefix):
            _reset_stats(redis_cluster)
            result = await store.admit("route:/a", breaker, ["l|new"], [SLOW], 0.0)
            calls = _script_calls(redis_cluster)
        assert result.source == "fallback"
        assert store.stats.outages == 1
        assert store.fallback_why == "unreachable"
    finally:
        await store.aclose()
    # old code: 16 (every TRYAGAIN sent again, the later ones after 50 ms sleeps)
    assert calls <= 2, calls  # the call, and the ASK redirection to the importing node


async def test_tryagain_is_not_retried_by_the_blocking_cluster_client(redis_cluster) -> None:  # type: ignore[no-untyped-def]
    prefix = "r47b"
    store = RedisStore(
        config=StateConfig(url=redis_cluster.url, key_prefix=prefix, **PATIENT_CONNECT, **QUIET),
        rng=seeded_random(48),
    )
    breaker = BreakerConfig()
    retry = RetryConfig()
    try:
        first = store.outbound_gate_sync("upstream:a", breaker, "budget:a", retry, False, 0.0)
        assert first[2] == "redis"
        with _migrating(redis_cluster, prefix):
            _reset_stats(redis_cluster)
            gate = store.outbound_gate_sync("upstream:a", breaker, "budget:new", retry, False, 0.0)
            calls = _script_calls(redis_cluster)
        assert gate[2] == "fallback"
        assert store.stats.outages == 1
    finally:
        await store.aclose()
    assert calls <= 2, calls  # old code: 16
