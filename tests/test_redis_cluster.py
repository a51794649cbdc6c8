"""The same scripts on a real three-master Redis Cluster: one hash tag, one slot, one node."""

from __future__ import annotations

import asyncio

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


async def test_every_script_call_names_keys_of_one_slot(  # type: ignore[no-untyped-def]
    redis_cluster, monkeypatch
) -> None:
    """Every script the stores run (admit, batch, record, refund, peek, outbound,
    budget_refund, sync, fleet, the write probe; the blocking client's outbound too), each
    way it is called, on the real cluster: each call's KEYS hash to one slot, the one of
    `{prefix}` (the server's own `CLUSTER KEYSLOT` says so), and none fell back (a key of
    another slot fails the call: CROSSSLOT, or redis-py refuses it)."""
    import os
    import traceback

    from redis.asyncio.cluster import RedisCluster as AsyncCluster
    from redis.cluster import RedisCluster as SyncCluster

    from fidelity_mw.policy import RetryConfig
    from fidelity_mw.state.scripts import load_script

    calls: list[tuple[str, ...]] = []
    # per call, for a failure's message: the script, its callers in src, the test running
    where: list[str] = []
    scripts = ("admit", "batch", "record", "refund", "peek", "outbound", "budget_refund")
    names = {load_script(n).sha: n for n in (*scripts, "sync", "fleet")}

    # Only the clients this test's stores build: the class is patched for the whole
    # process, and a client another test left open (its store not closed, a thread
    # still calling) would be recorded too.
    ours: list[object] = []

    def builder(original):  # type: ignore[no-untyped-def]
        def build(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            ours.append(self)
            return original(self, *args, **kwargs)

        return build

    def recorder(original):  # type: ignore[no-untyped-def]
        def record(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if args and args[0] in ("EVALSHA", "EVAL") and any(self is c for c in ours):
                calls.append(tuple(str(a) for a in args[3 : 3 + int(args[2])]))
                site = [
                    f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}"
                    for f in traceback.extract_stack()
                    if "fidelity_mw" in f.filename
                ][-4:]
                where.append(
                    f"{names.get(str(args[1]), str(args[1])[:40])} from {site} in "
                    f"{os.environ.get('PYTEST_CURRENT_TEST')} client {id(self):#x}"
                )
            return original(self, *args, **kwargs)

        return record

    monkeypatch.setattr(AsyncCluster, "__init__", builder(AsyncCluster.__init__))
    monkeypatch.setattr(SyncCluster, "__init__", builder(SyncCluster.__init__))
    monkeypatch.setattr(AsyncCluster, "execute_command", recorder(AsyncCluster.execute_command))
    monkeypatch.setattr(SyncCluster, "execute_command", recorder(SyncCluster.execute_command))
    prefix = "clu4"
    config = StateConfig(url=redis_cluster.url, key_prefix=prefix, **PATIENT)
    store = RedisStore(config=config, rng=seeded_random(4))
    tiered_url = redis_cluster.url.replace("redis://", "tiered+redis://")
    tiered = TieredStore(
        config=StateConfig(url=tiered_url, key_prefix=prefix, **PATIENT, **QUIET),
        rng=seeded_random(5),
    )
    breaker = BreakerConfig(min_calls=1, consecutive_failures=1)
    retry = RetryConfig(budget_ratio=0.5, budget_min_per_s=1.0, budget_window_s=10.0)
    limits = [SLOW._replace(name="a"), WIDE._replace(name="g")]
    keys = ["a|client", "g|*"]
    results = []
    try:
        one = await store.admit("route:/a", breaker, keys, limits, 0.0)  # admit.lua
        results.append(one)
        results += await asyncio.gather(  # batch.lua
            *(store.admit(f"route:/{i}", breaker, keys, limits, 0.0) for i in range(3))
        )
        assert store.coalescer.batches == 1
        assert one.gate is not None
        await store.record("route:/a", breaker, one.gate, FAILURE, False, 0.0)  # record.lua
        await store.refund(keys, limits, "redis", 0.0, [v.tat for v in one.limits])
        results.append(await store.peek(keys, limits, 0.0))  # peek.lua
        await store.budget_request("budget:other", retry, 0.0)  # rides along below
        gate = await store.outbound_gate(  # outbound.lua: breaker, budget, pending budget
            "upstream:api", breaker, "budget:api", retry, False, 0.0
        )
        spent = await store.outbound_gate(None, None, "budget:api", retry, True, 0.0)
        await store.budget_refund(  # budget_refund.lua
            "budget:api", retry, spent[2], spent[3], 0.0, getattr(spent, "spent_at", None)
        )
        blocking = store.outbound_gate_sync(  # the blocking client's outbound.lua
            "upstream:api", breaker, "budget:api", retry, False, 0.0
        )
        if store.fleet.task is not None:  # fleet.lua, started by the calls above
            await store.fleet.task
        assert await store._writable(store.client())  # the write probe (no ROLE on a cluster)
        results += [  # sync.lua: leases, breaker copies
            await tiered.admit("route:/t", breaker, ["w|t"], [WIDE], 0.0) for _ in range(3)
        ]
    finally:
        await tiered.aclose()
        await store.aclose()
    assert {r.source for r in results} <= {"redis", "cache"}
    assert (gate[2], spent[2], blocking[2]) == ("redis", "redis", "redis")
    assert store.fleet.announces >= 1
    assert store.stats.errors == 0
    assert store.stats.fallbacks == 0
    slot = key_slot(("{" + prefix + "}").encode())
    with redis_cluster.node_for_slot(slot).client() as client:
        for named, site in zip(calls, where, strict=True):
            assert named, f"a script call without keys cannot be routed to the slot: {site}"
            slots = {int(client.execute_command("CLUSTER KEYSLOT", key)) for key in named}
            assert slots == {slot}, (named, site)
    assert len(calls) >= 12, calls
