"""Review 41 (flt41, item 4): breakers of instances the resolver no longer names.

B finds C's instances through a resolver; a rolling restart (new ports), a rescheduled
pod (a new address) leaves the old addresses behind. The balancer forgot them (its
instance list is the resolver's), but the memory store kept each one's breaker, an open
one for good (never idle, so never swept), until the store's cap of 10,000: one entry
per address any instance ever had. Now the breakers of instances no longer named are
forgotten on memory state, unless a plan of the engine's transports still calls that
address (another service's instance, a plain host) or a call to it is in flight. A
fleet's breakers on Redis are not this process's to drop (they expire).
"""

from __future__ import annotations

import asyncio

import httpx

from fidelity_mw import FidelityTransport
from fidelity_mw.engine import Engine
from fidelity_mw.policy import BreakerConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

BREAKER = BreakerConfig(
    failure_ratio=0.5, min_calls=2, window_s=5.0, open_s=5.0, open_min_s=5.0,
    open_jitter=0.0, half_open_probes=1, consecutive_failures=2,
)  # fmt: skip


def _rig(
    names: dict[str, list[str]], failing: set[str]
) -> tuple[httpx.AsyncClient, MemoryStore, list[str]]:
    retry = RetryConfig(attempts=1)
    policy = Policy(
        upstreams=(
            UpstreamConfig(host="c", breaker=BREAKER, retry=retry),
            UpstreamConfig(host="d", breaker=BREAKER, retry=retry),
            UpstreamConfig(host="*", breaker=BREAKER, retry=retry),
        )
    )
    store = MemoryStore()
    engine = Engine(policy, clock=FakeClock(), rng=seeded_random(1), store=store)
    calls: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        calls.append(f"{request.url.host}:{request.url.port}")
        return httpx.Response(503 if request.url.host in failing else 200)

    transport = FidelityTransport(
        httpx.MockTransport(upstream),
        engine=engine,
        telemetry=False,
        resolver=lambda host: names.get(host),
    )
    return httpx.AsyncClient(transport=transport), store, calls


def _instance_keys(store: MemoryStore) -> set[str]:
    return {k for k in store.breakers if k.startswith("upstream:10.")}


def test_a_rolling_replacement_leaves_no_breaker_behind() -> None:
    names = {"c": [f"http://10.0.0.{i}:80" for i in range(3)]}
    failing = {"10.0.0.0"}

    async def go() -> list[set[str]]:
        client, store, _calls = _rig(names, failing)
        seen = []
        async with client:
            for generation in range(5):
                for _ in range(12):
                    await client.get("http://c/x")
                seen.append(_instance_keys(store))
                # every instance replaced by one on a new address (the failing one too)
                base = 10 * (generation + 1)
                names["c"] = [f"http://10.0.{base}.{i}:80" for i in range(3)]
                failing.clear()
                failing.add(f"10.0.{base}.0")
            await client.get("http://c/x")  # (the resolver asked: the last change taken)
            seen.append(_instance_keys(store))
        return seen

    seen = asyncio.run(go())
    # before: 3, 6, 9, 12, 15, 16 entries (every address ever named, the open ones too)
    assert [len(s) for s in seen] == [3, 3, 3, 3, 3, 1]
    assert all(key.startswith("upstream:10.0.50.") for key in seen[-1])


def test_an_address_another_plan_still_calls_keeps_its_breaker() -> None:
    shared = "http://10.0.0.9:80"
    names = {"c": ["http://10.0.0.1:80", shared], "d": [shared]}

    async def go() -> tuple[set[str], set[str], str]:
        client, store, _calls = _rig(names, {"10.0.0.9"})
        async with client:
            for _ in range(6):
                await client.get("http://c/x")
                await client.get("http://d/x")
            before = _instance_keys(store)
            state = store.breakers["upstream:10.0.0.9"].state
            names["c"] = ["http://10.0.0.1:80"]  # c no longer names it; d still does
            await client.get("http://c/x")
            return before, _instance_keys(store), state

    before, after, state = asyncio.run(go())
    assert state == "open"
    assert "upstream:10.0.0.9" in before
    assert after == before  # still d's instance: its open breaker stays


def test_an_instance_named_again_starts_with_a_closed_breaker() -> None:
    names = {"c": ["http://10.0.0.2:80"]}
    failing = {"10.0.0.2"}

    async def go() -> tuple[str, list[int], str]:
        client, store, _calls = _rig(names, failing)
        async with client:
            for _ in range(4):
                await client.get("http://c/x")
            state = store.breakers["upstream:10.0.0.2"].state
            names["c"] = ["http://10.0.0.1:80"]
            await client.get("http://c/x")
            gone = "upstream:10.0.0.2" not in store.breakers
            names["c"] = ["http://10.0.0.2:80"]  # back (the same address), healthy now
            failing.clear()
            got = [(await client.get("http://c/x")).status_code for _ in range(3)]
            return state, got, f"forgotten={gone}"

    state, got, gone = asyncio.run(go())
    assert state == "open"
    assert gone == "forgotten=True"
    # a fresh view and a closed breaker, as a new instance gets (the clock never moved:
    # its old breaker would still be open for its 5 s)
    assert got == [200, 200, 200]
