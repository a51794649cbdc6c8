"""A fleet of processes on one Redis whose breakers have a fleet-wide home (fle40).

One process with a bad path to an upstream (its node's network, its DNS, its connection
pool) sees every call fail while the others' calls succeed. With the breaker's home in
Redis its failures open the one breaker the fleet shares, and the healthy processes'
calls are refused `breaker_open` although their path works. Until fle40 the policy gave
no choice; `breaker.scope = "process"` now keeps a breaker of each process's own (in
Redis, under a key with its id). The default stays `fleet` (an upstream that is down for
everyone is shed by every process at once) and is pinned here too.

Each "process" is an Engine with a store of its own (its own client and process id) on
one real redis-server: what decides is the store, not the OS process.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from fidelity_mw import FidelityTransport, Policy
from fidelity_mw.admin.view import snapshot_configs
from fidelity_mw.decide.breaker import FAILURE, SUCCESS
from fidelity_mw.engine import Engine
from fidelity_mw.errors import CircuitOpen, PolicyError
from fidelity_mw.policy import (
    BreakerConfig,
    RateLimit,
    RetryConfig,
    StateConfig,
    UpstreamConfig,
)
from fidelity_mw.routeplan import costed_plan
from fidelity_mw.state.base import breaker_home
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore, hashed_key
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import seeded_random
from redis_server import PATIENT, QUIET, RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

HOST = "pay.internal"


def member(url: str, scope: str, bad: bool, seed: int) -> tuple[Engine, httpx.AsyncClient]:
    """One process of the fleet: its engine and a client whose upstream path is healthy,
    or broken (`bad`: every attempt fails to connect, from this process only)."""
    breaker = BreakerConfig(
        min_calls=4, failure_ratio=0.5, open_s=60.0, open_min_s=60.0, scope=scope
    )
    policy = Policy(
        state=StateConfig(url=url, sync_interval_ms=20, **{**PATIENT, **QUIET}),
        upstreams=(UpstreamConfig(host=HOST, breaker=breaker, retry=RetryConfig(attempts=1)),),
    )
    engine = Engine(policy, rng=seeded_random(seed))

    def answer(request: httpx.Request) -> httpx.Response:
        if bad:
            raise httpx.ConnectError("no route to host", request=request)
        return httpx.Response(200)

    transport = FidelityTransport(httpx.MockTransport(answer), engine=engine)
    return engine, httpx.AsyncClient(transport=transport, base_url=f"http://{HOST}")


async def calls(client: httpx.AsyncClient, n: int) -> dict[str, int]:
    """n calls one after another: how each ended."""
    ended = {"ok": 0, "breaker_open": 0, "failed": 0}
    for _ in range(n):
        try:
            response = await client.get("/charge")
        except CircuitOpen:
            ended["breaker_open"] += 1
        except httpx.ConnectError:
            ended["failed"] += 1
        else:
            assert response.status_code == 200
            ended["ok"] += 1
        await asyncio.sleep(0.005)  # a tiered process's sync runs between calls
    return ended


async def test_by_default_one_process_with_a_bad_path_opens_the_fleets_breaker(
    redis_url: str,
) -> None:
    """The default home (`scope = "fleet"`, as documented): the fleet shares the host's
    breaker, so the healthy process is refused while the bad one's failures hold it open."""
    sick, sick_client = member(redis_url, "fleet", bad=True, seed=1)
    well, well_client = member(redis_url, "fleet", bad=False, seed=2)
    try:
        assert await calls(sick_client, 6) == {"ok": 0, "breaker_open": 2, "failed": 4}
        assert await calls(well_client, 10) == {"ok": 0, "breaker_open": 10, "failed": 0}
    finally:
        for engine, client in ((sick, sick_client), (well, well_client)):
            await client.aclose()
            await engine.store.aclose()


@pytest.mark.parametrize("mode", ["redis", "tiered"])
async def test_a_process_scoped_breaker_opens_for_its_own_process_alone(
    redis_url: str, redis_server: RedisServer, mode: str
) -> None:
    """`scope = "process"`: the bad process's breaker opens (it stops calling at once),
    the healthy process calls on, every call served; each process's breaker is a key of
    its own in Redis, the shared one is never written."""
    url = redis_url if mode == "redis" else "tiered+" + redis_url
    sick, sick_client = member(url, "process", bad=True, seed=1)
    well, well_client = member(url, "process", bad=False, seed=2)
    try:
        sick_ended = await calls(sick_client, 12)
        well_ended = await calls(well_client, 30)
        assert well_ended == {"ok": 30, "breaker_open": 0, "failed": 0}
        # its own breaker opened after min_calls failures (tiered: within a sync of them)
        assert sick_ended["failed"] >= 4
        assert sick_ended["breaker_open"] >= 1
        assert sick_ended["ok"] == 0
        with redis_server.client() as client:
            keys = {k.decode() for k in client.keys("{fmw}:br:*")}
        sick_id, well_id = sick.store.process_id, well.store.process_id  # type: ignore[attr-defined]
        assert sick_id != well_id
        assert hashed_key("fmw", "br", f"upstream:{HOST}@{sick_id}") in keys
        assert hashed_key("fmw", "br", f"upstream:{HOST}") not in keys
    finally:
        for engine, client in ((sick, sick_client), (well, well_client)):
            await client.aclose()
            await engine.store.aclose()


async def test_a_process_scoped_route_breaker_keys_the_route_by_process(redis_url: str) -> None:
    """Route breakers take the same choice (`[breaker]` and `[[route]].breaker`); a memory
    store keeps every breaker per process already, under the plain key."""
    scope = {"type": "http", "method": "GET", "path": "/a", "root_path": "", "headers": []}
    own = BreakerConfig(scope="process")
    shared = Engine(
        Policy(
            breaker=own,
            rate_limits=(RateLimit(name="l", rate="10/s", burst=10),),
            state=StateConfig(url=redis_url, **{**PATIENT, **QUIET}),
        ),
        rng=seeded_random(3),
    )
    memory = Engine(Policy(breaker=own), rng=seeded_random(3))
    fleet = Engine(
        Policy(state=StateConfig(url=redis_url, **{**PATIENT, **QUIET})), rng=seeded_random(3)
    )
    try:
        plain = fleet.plan_for(scope).breaker_key  # (no app: the unmatched route's)
        assert plain is not None
        assert plain.startswith("route:")
        own_key = shared.plan_for(scope).breaker_key
        assert own_key == f"{plain}@{shared.store.process_id}"  # type: ignore[attr-defined]
        assert memory.plan_for(scope).breaker_key == plain
        # a request of its own cost (`cost=fn`, FastAPI's per-request cost) keeps the home
        assert costed_plan(shared.plan_for(scope), (3,)).breaker_key == own_key
        assert breaker_home("route:/a", None, shared.store) == "route:/a"
        assert breaker_home("route:/a", own, MemoryStore()) == "route:/a"
    finally:
        await shared.store.aclose()
        await fleet.store.aclose()


def test_the_scope_names_its_field_and_leaves_the_version_of_a_policy_alone() -> None:
    with pytest.raises(PolicyError, match=r"breaker\.scope"):
        Policy.from_dict({"breaker": {"scope": "cluster"}})
    # a key added later, at its default, leaves every existing policy's version as it was
    assert Policy(breaker=BreakerConfig(scope="fleet")).version == Policy().version
    assert Policy(breaker=BreakerConfig(scope="process")).version != Policy().version
    assert "scope" not in Policy().to_dict()["breaker"]


async def test_tiered_streak_of_one_process_among_successes_does_not_open(
    redis_url: str,
) -> None:
    """One process fails 1 call in 4 of the fleet's, interleaved with another's successes:
    never 5 failures in a row in the fleet's order, so the model (and exact mode, below)
    keeps the breaker closed. Tiered mode counts them on each process's copy and sends
    them at its next sync (here: at close) as a run of its own, "f40" beside "s120": the
    streak of 40 opened the fleet's breaker (a strict xfail until fle41). Now a streak a
    sync completes opens only once it stood two sync intervals with no success synced
    meanwhile (decide.breaker.streak_stands): B's successes end it."""
    cfg = BreakerConfig(min_calls=1000, consecutive_failures=5, open_s=60.0, open_min_s=60.0)
    # a long interval: no periodic sync in the loop; closing sends what each counted
    config = StateConfig(url="tiered+" + redis_url, sync_interval_ms=60_000, **{**PATIENT, **QUIET})
    a, b = (
        TieredStore(config=config, rng=seeded_random(1)),
        TieredStore(config=config, rng=seeded_random(2)),
    )
    judge = RedisStore(config=StateConfig(url=redis_url, **{**PATIENT, **QUIET}))
    try:
        for _ in range(40):
            for store, outcome in ((a, FAILURE), (b, SUCCESS), (b, SUCCESS), (b, SUCCESS)):
                now = time.monotonic()
                gate, _source, _age = await store.breaker_gate("upstream:x", cfg, now)
                assert gate.verdict == "allow"
                await store.record("upstream:x", cfg, gate, outcome, False, now)
        await a.aclose()
        await b.aclose()
        gate, _source, _age = await judge.breaker_gate("upstream:x", cfg, time.monotonic())
    finally:
        await a.aclose()
        await b.aclose()
        await judge.aclose()
    assert gate.verdict == "allow"


async def test_exact_mode_streak_of_one_process_among_successes_does_not_open(
    redis_url: str,
) -> None:
    """The same fleet in exact mode: each process's successes ride on its next call, before
    the other's next failure, so no streak of 5 forms and nothing is refused."""
    cfg = BreakerConfig(min_calls=1000, consecutive_failures=5, open_s=60.0, open_min_s=60.0)
    config = StateConfig(url=redis_url, **{**PATIENT, **QUIET})
    a, b = (
        RedisStore(config=config, rng=seeded_random(1)),
        RedisStore(config=config, rng=seeded_random(2)),
    )
    refused = 0
    try:
        for _ in range(40):
            for store, outcome in ((a, FAILURE), (b, SUCCESS), (b, SUCCESS), (b, SUCCESS)):
                now = time.monotonic()  # (the stores' own clock: a tiered sync is due by it)
                gate, _source, _age = await store.breaker_gate("upstream:x", cfg, now)
                if gate.verdict != "allow":
                    refused += 1
                    continue
                await store.record("upstream:x", cfg, gate, outcome, False, now)
    finally:
        await a.aclose()
        await b.aclose()
    assert refused == 0


def test_the_state_page_ages_a_process_scoped_upstream_breaker_with_its_own_config() -> None:
    """The state page finds a breaker's config by its key: a process's own breaker's key
    ends in "@" + its id, which read as part of the host matched no `[[upstream]]` (the
    default breaker's window then aged the counts of a breaker with another)."""
    own = BreakerConfig(window_s=120.0, scope="process")
    engine = Engine(Policy(upstreams=(UpstreamConfig(host=HOST, breaker=own),)))
    configs = snapshot_configs(engine)
    assert configs.breaker(f"upstream:{HOST}@7ac44f5f88f0fd2b") is own
    assert configs.breaker(f"upstream:{HOST}:8080@7ac44f5f88f0fd2b") is own
    assert configs.breaker(f"upstream:{HOST}") is own
