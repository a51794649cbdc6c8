"""Review 42: breakers of instances the resolver dropped while a call to them was out.

flt41 made the transport forget the memory breakers of instances its resolver no longer
names, but not one with a call in flight (its outcome would make the breaker again), and
never came back to it: on a service with traffic, a rolling replacement mostly drops
instances that have a call out, so their breakers stayed (an open one for good, never
idle) as before the fix. Now such an instance's breaker is forgotten at the first
resolver answer after its last call ended.
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


def _instance_keys(store: MemoryStore) -> set[str]:
    return {k for k in store.breakers if k.startswith("upstream:10.")}


def test_an_instance_dropped_with_a_call_out_loses_its_breaker_once_the_call_ends() -> None:
    names = {"c": ["http://10.0.0.1:80", "http://10.0.0.2:80"]}
    retry = RetryConfig(attempts=1)
    policy = Policy(upstreams=(UpstreamConfig(host="c", breaker=BREAKER, retry=retry),))
    store = MemoryStore()
    engine = Engine(policy, clock=FakeClock(), rng=seeded_random(1), store=store)

    async def go() -> tuple[str, set[str], set[str], set[str], set[str]]:
        release = asyncio.Event()
        hold: list[str] = []  # "hold": the next call waits for `release`; then its host

        async def upstream(request: httpx.Request) -> httpx.Response:
            if hold == ["hold"]:  # one slow call, out while the change comes
                hold[0] = str(request.url.host)
                await release.wait()
                return httpx.Response(503)
            return httpx.Response(200)

        transport = FidelityTransport(
            httpx.MockTransport(upstream),
            engine=engine,
            telemetry=False,
            resolver=lambda host: names.get(host),
        )
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(4):
                await client.get("http://c/x")
            before = _instance_keys(store)
            hold.append("hold")
            slow = asyncio.create_task(client.get("http://c/x"))
            for _ in range(50):
                if hold != ["hold"]:
                    break
                await asyncio.sleep(0)
            out = hold[0]
            assert out != "hold", "the slow call is out"
            names["c"] = ["http://10.0.1.1:80", "http://10.0.1.2:80"]  # a rolling replacement
            await client.get("http://c/x")  # the resolver's new answer taken
            during = _instance_keys(store)
            release.set()
            assert (await asyncio.wait_for(slow, 5.0)).status_code == 503
            ended = _instance_keys(store)
            for _ in range(2):
                await client.get("http://c/x")
            return out, before, during, ended, _instance_keys(store)

    out, before, during, ended, settled = asyncio.run(go())
    other = ({"10.0.0.1", "10.0.0.2"} - {out}).pop()
    assert before == {"upstream:10.0.0.1", "upstream:10.0.0.2"}
    assert f"upstream:{other}" not in during  # no call out: forgotten at the change
    assert f"upstream:{out}" in during  # its call still out: kept for it
    assert f"upstream:{out}" in ended  # the call's outcome recorded on it
    # before: the dropped instance's breaker stayed, for good
    assert settled == {"upstream:10.0.1.1", "upstream:10.0.1.2"}
