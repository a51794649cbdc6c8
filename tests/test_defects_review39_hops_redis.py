"""Review 39: B's Redis state store down mid-chain (scenario 5). No defect found; held.

B keeps its breakers and retry budget on Redis (the suite's redis-server, killed or
paused while the chain serves). B degrades as its `on_error` says and records it: `local`
and `open` decide on local state (decisions `fallback`), every request served; `closed`
refuses (503 `state`), which A, one hop up, takes for the callee's control decision: no
failure of A's breaker for B, a 502 with `Retry-After` for the client, never a 500. When
Redis answers again, requests are served.
"""

from __future__ import annotations

import dataclasses
import time

import httpx
import pytest

import _hops38
import _hops39 as hops
from fidelity_mw.policy.model import StateConfig
from redis_server import RedisServer

pytestmark = pytest.mark.redis


@pytest.mark.parametrize(
    ("how", "on_error"), [("kill", "local"), ("pause", "local"), ("kill", "closed")]
)
def test_real_chain_bs_redis_down_degrades_at_b_and_opens_nothing_above(
    own_redis: RedisServer, how: str, on_error: str
) -> None:
    def b_policy(instances: tuple[str, ...]) -> object:
        return dataclasses.replace(
            _hops38.policy(instances), state=StateConfig(url=own_redis.url, on_error=on_error)
        )

    n = 4
    with hops.chain("raise", b_policy=b_policy, b_store=None) as rig:
        with httpx.Client(timeout=30.0) as client:
            warm = [hops.send(client, rig, f"warm{i}") for i in range(3)]
            getattr(own_redis, how)()
            try:
                down = [hops.send(client, rig, f"down{i}") for i in range(n)]
            finally:
                if how == "pause":
                    own_redis.resume()
                else:
                    own_redis.start()
            # served again once Redis answers (the store notices at its next call)
            after: list[int] = []
            deadline = time.monotonic() + 20.0
            while len(after) < 3 and time.monotonic() < deadline:
                answer = hops.send(client, rig, f"after{len(after)}")
                after = [*after, answer.status] if answer.status == 200 else []
                time.sleep(0.05)
        seen = rig.seen
        a_counted = [k for k, s in rig.a_store.breakers.items() if s.epoch or s.consecutive]
    print(f"\nredis {how}, on_error={on_error}: {[(a.status, a.headers) for a in down]}")
    assert all(a.status == 200 for a in warm)
    sources = {
        d.state_source
        for i in range(n)
        for d in hops.decisions(seen, "B", f"down{i}")
        if d.layer == "breaker"
    }
    assert sources == {"fallback"}  # recorded: decided without Redis
    if on_error == "local":
        assert [a.status for a in down] == [200] * n
    else:
        for a in down:  # B refused, as its policy says; A passed it on, never a 500
            assert a.status in (502, 503), (a.status, a.headers)
            assert a.headers.get("retry-after", "").isdigit(), a.headers
    assert a_counted == []  # A's breakers: nothing (B's state is B's concern)
    assert _hops38.breaker_opens(seen, "A") == {}
    assert after == [200, 200, 200]
