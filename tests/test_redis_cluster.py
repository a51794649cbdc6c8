"""The same scripts on a real three-master Redis Cluster: one hash tag, one slot, one node."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from fidelity_mw.decide.breaker import FAILURE
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import ADMIT, RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import seeded_random
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

SLOW = LimitSpec("l", 60.0, 300.0, 1, False)  # 1/min, burst 5
WIDE = LimitSpec("w", 60.0, 6000.0, 1, False)  # 1/min, burst 100


def all_keys(cluster) -> dict[int, list[str]]:  # type: ignore[no-untyped-def]
    """Every key on every node, by node port."""
    found = {}
    for node in cluster.nodes:
        with node.client() as client:
            found[node.port] = [k.decode() for k in client.keys("*")]
    return found


async def test_scripts_run_on_the_cluster_and_keys_share_a_slot(redis_cluster) -> None:  # type: ignore[no-untyped-def]
    prefix = "clu1"
    store = RedisStore(
        config=StateConfig(url=redis_cluster.url, key_prefix=prefix, **PATIENT, **QUIET),
        rng=seeded_random(1),
    )
    breaker = BreakerConfig(min_calls=1, consecutive_failures=3)
    try:
        # many different clients and routes: with per-key tags these would scatter
        for i in range(20):
            keys = [f"a|client{i}", f"b|client{i}", "g|*"]
            limits = [SLOW._replace(name="a"), SLOW._replace(name="b"), WIDE._replace(name="g")]
            result = await store.admit(f"route:/r{i}", breaker, keys, limits, 0.0)
            assert result.source == "redis"
            assert result.gate is not None
            await store.record(f"route:/r{i}", breaker, result.gate, FAILURE, False, 0.0)
        five = [await store.admit(None, None, ["a|same"], [SLOW], 0.0) for _ in range(6)]
        assert [r.admitted for r in five] == [True] * 5 + [False]
    finally:
        await store.aclose()
    keys = all_keys(redis_cluster)
    ours = {
        port: [k for k in names if k.startswith("{" + prefix + "}")] for port, names in keys.items()
    }
    slot = key_slot(("{" + prefix + "}").encode())
    owner = redis_cluster.node_for_slot(slot)
    assert len(ours[owner.port]) == 20 * 2 + 1 + 20 + 1  # a+b per client, g, breakers, "same"
    assert all(not names for port, names in ours.items() if port != owner.port)
    assert {key_slot(k.encode()) for k in ours[owner.port]} == {slot}


async def test_noscript_recovery_on_the_cluster(redis_cluster) -> None:  # type: ignore[no-untyped-def]
    store = RedisStore(
        config=StateConfig(url=redis_cluster.url, key_prefix="clu2", **PATIENT, **QUIET),
        rng=seeded_random(2),
    )
    try:
        assert (await store.admit(None, None, ["l|x"], [SLOW], 0.0)).source == "redis"
        for node in redis_cluster.nodes:
            with node.client() as client:
                client.script_flush()
        loads = store.stats.script_loads
        result = await store.admit(None, None, ["l|x"], [SLOW], 0.0)
        assert result.source == "redis"
        assert result.limits[0].remaining == 3
        assert store.stats.script_loads == loads + 1
        owner = redis_cluster.node_for_slot(key_slot(b"{clu2}"))
        with owner.client() as client:
            assert client.script_exists(ADMIT.sha) == [True]
    finally:
        await store.aclose()


async def test_tiered_sync_runs_on_the_cluster(redis_cluster) -> None:  # type: ignore[no-untyped-def]
    url = redis_cluster.url.replace("redis://", "tiered+redis://")
    store = TieredStore(
        config=StateConfig(url=url, key_prefix="clu3", **PATIENT), rng=seeded_random(3)
    )
    try:
        results = [
            await store.admit("route:/t", BreakerConfig(), ["w|t"], [WIDE], 0.0) for _ in range(7)
        ]
    finally:
        await store.aclose()
    assert all(r.admitted for r in results)
    assert results[0].source == "redis"
    assert "cache" in {r.source for r in results}
