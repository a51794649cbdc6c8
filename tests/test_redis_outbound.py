"""Outbound state in Redis: host breakers and retry budgets, one call per attempt."""

from __future__ import annotations

import anyio
import pytest

from fidelity_mw.decide.breaker import FAILURE
from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore, hashed_key
from fidelity_mw.testing import seeded_random
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

# 20 % of requests + 0.1/s x 10 s = 2 + 1 retries for 10 requests
BUDGET = RetryConfig(budget_ratio=0.2, budget_min_per_s=0.1, budget_window_s=10.0)
HOST = BreakerConfig(min_calls=1, consecutive_failures=1, open_s=30.0, half_open_probes=1)


def store(url: str, **state: object) -> RedisStore:
    config = StateConfig(url=url, **{**PATIENT, **state})  # type: ignore[arg-type]
    return RedisStore(config=config, rng=seeded_random(11))


async def test_budget_decides_like_memory_store(redis_url: str) -> None:
    redis_store = store(redis_url)
    memory = MemoryStore(rng=seeded_random(11))
    now = 100.0
    try:
        for _ in range(10):
            await redis_store.budget_request("budget:h", BUDGET, now)
            memory.budget_request_now("budget:h", BUDGET, now)
        got = [(await redis_store.budget_try_retry("budget:h", BUDGET, now))[0] for _ in range(6)]
        want = [memory.budget_try_retry_now("budget:h", BUDGET, now)[0] for _ in range(6)]
        assert got == want == [True, True, True, False, False, False]
        allowed, source, age = await redis_store.budget_try_retry("budget:h", BUDGET, now)
        assert (allowed, source) == (False, "redis")
        assert age >= 0.0
    finally:
        await redis_store.aclose()


async def test_budget_is_shared_by_the_fleet(redis_url: str) -> None:
    """Requests counted on A earn retries on B; B's retries use up A's allowance."""
    a, b = store(redis_url), store(redis_url)
    try:
        for _ in range(10):
            await a.budget_request("budget:h", BUDGET, 0.0)
        await a.breaker_gate("upstream:h", HOST, 0.0)  # the counts ride on A's next call
        assert [(await b.budget_try_retry("budget:h", BUDGET, 0.0))[0] for _ in range(4)] == [
            True,
            True,
            True,
            False,
        ]
        assert not (await a.budget_try_retry("budget:h", BUDGET, 0.0))[0]
    finally:
        await a.aclose()
        await b.aclose()


async def test_one_call_per_attempt(redis_url: str, redis_server) -> None:  # type: ignore[no-untyped-def]
    redis_store = store(redis_url)
    try:
        await redis_store.breaker_gate("upstream:warm", HOST, 0.0)  # loads the script
        with redis_server.client() as client:
            client.config_resetstat()
            # first attempt, as the transport does it: count the request, gate the breaker
            await redis_store.budget_request("budget:h", BUDGET, 0.0)
            gate, source, _age = await redis_store.breaker_gate("upstream:h", HOST, 0.0)
            assert (gate.verdict, source) == ("allow", "redis")
            # a retry through the fused call: budget + breaker in one script
            gate2, allowed, source, _age = await redis_store.outbound_gate(
                "upstream:h", HOST, "budget:h", BUDGET, True, 0.0
            )
            assert gate2 is not None
            assert allowed
            assert gate2.verdict == "allow"
            calls = client.info("commandstats")["cmdstat_evalsha"]["calls"]
        assert calls == 2
    finally:
        await redis_store.aclose()


async def test_denied_retry_takes_no_probe_and_rejected_gate_spends_no_retry(
    redis_url: str,
) -> None:
    redis_store = store(redis_url)
    tight = RetryConfig(budget_ratio=0.0, budget_min_per_s=0.1, budget_window_s=10.0)  # 1 retry
    try:
        gate, _allowed, _s, _a = await redis_store.outbound_gate(
            "upstream:p", HOST, "budget:p", tight, False, 0.0
        )
        assert gate is not None
        assert await redis_store.record("upstream:p", HOST, gate, FAILURE, False, 0.0) == "open"
        # open: the breaker rejects, so the retry is not spent
        gate, allowed, _s, _a = await redis_store.outbound_gate(
            "upstream:p", HOST, "budget:p", tight, True, 0.0
        )
        assert gate is not None
        assert gate.verdict == "reject"
        assert allowed  # the budget would have allowed it ...
        assert (await redis_store.budget_try_retry("budget:p", tight, 0.0))[0]  # ... still there
        # now the budget is spent: a denied retry does not even ask the breaker
        gate, allowed, _s, _a = await redis_store.outbound_gate(
            "upstream:p", HOST, "budget:p", tight, True, 0.0
        )
        assert gate is None
        assert not allowed
    finally:
        await redis_store.aclose()


async def test_outbound_falls_back_locally(own_redis) -> None:  # type: ignore[no-untyped-def]
    redis_store = store(own_redis.url, timeout_ms=50, connect_timeout_ms=50)
    try:
        await redis_store.breaker_gate("upstream:f", HOST, 0.0)
        own_redis.kill()
        for _ in range(10):
            await redis_store.budget_request("budget:f", BUDGET, 0.0)
        gate, source, age = await redis_store.breaker_gate("upstream:f", HOST, 0.0)
        assert source == "fallback"
        assert gate.verdict == "allow"
        assert gate.epoch < 0
        assert age >= 0.0
        # counted locally while Redis is gone: 10 requests -> 3 retries
        answers = [await redis_store.budget_try_retry("budget:f", BUDGET, 0.0) for _ in range(4)]
        assert [a[0] for a in answers] == [True, True, True, False]
        assert {a[1] for a in answers} == {"fallback"}
        # the local breaker takes the outcome of a fallback gate
        assert await redis_store.record("upstream:f", HOST, gate, FAILURE, False, 0.0) == "open"
    finally:
        await redis_store.aclose()


async def test_budget_counts_are_sent_within_a_sync_interval(redis_url: str, redis_server) -> None:  # type: ignore[no-untyped-def]
    redis_store = store(redis_url, sync_interval_ms=20)
    try:
        await redis_store.budget_request("budget:q", BUDGET, 0.0)
        await anyio.sleep(0.03)
        await redis_store.budget_request("budget:q", BUDGET, 0.0)  # older than 20 ms: send
        for _ in range(3000):  # bounded: 30 s on a starved machine; ~10 ms when quiet
            await anyio.sleep(0.01)
            with redis_server.client() as client:
                raw = client.hget(hashed_key("fmw", "bu", "budget:q"), "rq")
            if raw is not None and sum(int(n) for n in raw.decode().split(",")) == 2:
                break
        assert raw is not None
        assert sum(int(n) for n in raw.decode().split(",")) == 2
    finally:
        await redis_store.aclose()


async def test_a_reply_that_is_not_ours_falls_back(redis_url: str) -> None:
    redis_store = store(redis_url)

    async def garbage(*_args: object) -> list[bytes]:
        return [b"not", b"an", b"admit", b"reply"]

    redis_store._evalsha = garbage  # type: ignore[method-assign]
    try:
        result = await redis_store.admit("route:/g", HOST, (), (), 0.0)
        gate, source, _age = await redis_store.breaker_gate("upstream:g", HOST, 0.0)
    finally:
        await redis_store.aclose()
    assert result.source == "fallback"
    assert result.admitted
    assert source == "fallback"
    assert gate.verdict == "allow"
    assert redis_store.up  # Redis answered: nothing to probe


async def test_transport_asks_redis_once_per_attempt(redis_url: str, redis_server) -> None:  # type: ignore[no-untyped-def]
    """Through FidelityTransport: each attempt's breaker gate and budget is one script call."""
    import httpx

    from fidelity_mw import FidelityTransport, Policy, UpstreamConfig
    from fidelity_mw.engine import Engine
    from fidelity_mw.testing import FakeClock

    class CountingStore(RedisStore):
        """The real store; counts which operations the transport uses."""

        def __init__(self, **kw: object) -> None:
            super().__init__(**kw)  # type: ignore[arg-type]
            self.ops: dict[str, int] = {}

        def _count(self, name: str) -> None:
            self.ops[name] = self.ops.get(name, 0) + 1

        async def outbound_gate(self, *args, **kw):  # type: ignore[no-untyped-def]
            self._count("outbound_gate")
            return await super().outbound_gate(*args, **kw)

        async def breaker_gate(self, *args, **kw):  # type: ignore[no-untyped-def]
            self._count("breaker_gate")
            return await super().breaker_gate(*args, **kw)

        async def budget_try_retry(self, *args, **kw):  # type: ignore[no-untyped-def]
            self._count("budget_try_retry")
            return await super().budget_try_retry(*args, **kw)

        async def budget_request(self, *args, **kw):  # type: ignore[no-untyped-def]
            self._count("budget_request")
            return await super().budget_request(*args, **kw)

    policy = Policy(
        state=StateConfig(url=redis_url, **PATIENT, **QUIET),
        upstreams=(UpstreamConfig(host="api.internal", retry=RetryConfig(base_ms=1)),),
    )
    redis_store = CountingStore(config=policy.state, rng=seeded_random(3))
    engine = Engine(policy, clock=FakeClock(), store=redis_store)
    answers = iter([503, 503, 200])
    upstream_calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal upstream_calls
        upstream_calls += 1
        return httpx.Response(next(answers))

    transport = FidelityTransport(httpx.MockTransport(handler), engine=engine, telemetry=False)
    try:
        await redis_store.breaker_gate("upstream:warm", HOST, 0.0)  # loads the scripts
        redis_store.ops.clear()
        with redis_server.client() as client:
            client.config_resetstat()
            async with httpx.AsyncClient(transport=transport) as http:
                response = await http.get("http://api.internal/x")
            evalsha = client.info("commandstats")["cmdstat_evalsha"]["calls"]
        assert response.status_code == 200
        assert upstream_calls == 3
        assert redis_store.ops == {"outbound_gate": 3}
        # one gate+budget call per attempt, plus the two failures' breaker records
        assert evalsha <= 3 + 2
        ctx = response.extensions["fidelity_context"]
        retries = [d for d in ctx.decisions if d.layer == "retry" and d.verdict == "retry"]
        assert len(retries) == 2
        assert {d.state_source for d in retries} == {"redis"}
    finally:
        await redis_store.aclose()
