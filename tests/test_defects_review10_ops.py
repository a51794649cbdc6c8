"""State and outbound follow-ups of review 10 (ops10): each test failed before its fix."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelitySyncTransport, FidelityTransport
from fidelity_mw.context import SOURCE_FALLBACK
from fidelity_mw.engine import Engine
from fidelity_mw.errors import CircuitOpen, StateUnavailable
from fidelity_mw.policy import BreakerConfig, Policy, RetryConfig, StateConfig, UpstreamConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_server import PATIENT, QUIET, RedisServer, ReplicaServer, require_redis

URL = "http://svc.internal/x"
BREAKER = BreakerConfig(consecutive_failures=3, open_s=5.0, open_jitter=0.0)
RETRY = RetryConfig(attempts=3, base_ms=1, max_ms=2)
LIMIT = LimitSpec("l", 0.001, 1.0, 1, False)


def _policy(url: str, on_error: str = "local") -> Policy:
    return Policy(
        state=StateConfig(url=url, on_error=on_error, **PATIENT, **QUIET),  # type: ignore[arg-type]
        upstreams=(UpstreamConfig(host="*", retry=RETRY, breaker=BREAKER),),
    )


def _engine(url: str, clock: FakeClock, on_error: str = "local") -> Engine:
    policy = _policy(url, on_error)
    store = RedisStore(config=policy.state, rng=seeded_random(3), clock=clock)
    return Engine(policy, clock=clock, store=store)


# ---------------------------------------------------------------- 1. the blocking client


@pytest.mark.redis
def test_the_blocking_client_on_a_replica_is_one_outage_with_its_why_and_one_line(
    replica: ReplicaServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: `FidelitySyncTransport`'s client paused 0.5 s on every `READONLY` and asked
    again, taking the replica back for one call each time: no outage counted, no log line,
    no `fallback_why`. Now it is one outage, found read-only, probed with ROLE (under the
    backoff) until a writable primary answers."""
    caplog.set_level(logging.WARNING, "fidelity_mw.redis")
    clock = FakeClock()
    engine = _engine(replica.url, clock)
    store = engine.store
    assert isinstance(store, RedisStore)
    t = FidelitySyncTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)), engine=engine, telemetry=False
    )
    try:
        with httpx.Client(transport=t) as client:
            for _ in range(6):
                response = client.get(URL)
                assert response.status_code == 200
                clock.advance(1.0)  # past every pause: each call probes the replica again
            link = store.sync_link()
            assert store.stats.outages == 1
            assert not link.up
            assert link.fallback_why == "read_only"
            assert store.fallback_why == "read_only"  # (the gauge, the snapshot read this)
            lines = [r for r in caplog.records if "read-only replica" in r.getMessage()]
            assert len(lines) == 1
            decisions = response.extensions["fidelity_context"].decisions
            fell = [d for d in decisions if d.state_source == SOURCE_FALLBACK]
            assert fell
            assert all(d.details["fallback_why"] == "read_only" for d in fell)  # type: ignore[index]
            # promoted: the next probe (ROLE says master) brings the client back
            with replica.client() as admin:
                admin.execute_command("REPLICAOF", "NO", "ONE")
            clock.advance(1.0)
            response = client.get(URL)
            decisions = response.extensions["fidelity_context"].decisions
            assert {d.state_source for d in decisions if d.layer == "retry"} == {"redis"}
            assert link.up
            assert store.fallback_why is None
            assert store.stats.outages == 1
            assert len(store.stats.recoveries) == 1
    finally:
        store.sync_link().close()


@pytest.mark.redis
def test_the_blocking_client_probes_before_asking_an_unreachable_redis_again(
    tmp_path: Path,
) -> None:
    """Down, the first call after the pause probes (ROLE) rather than sending its script:
    one outage for the whole time, and the pause grows (backoff) while it stays down."""
    require_redis()
    server = RedisServer(tmp_path / "r").start()
    clock = FakeClock()
    store = RedisStore(
        config=StateConfig(url=server.url, timeout_ms=500, connect_timeout_ms=500, **QUIET),
        rng=seeded_random(1),
        clock=clock,
    )
    args = ("h", BREAKER, "b", RETRY, False)
    try:
        assert store.outbound_gate_sync(*args, 0.0)[2] == "redis"
        server.stop()
        answer = store.outbound_gate_sync(*args, 0.0)
        assert answer[2] == "fallback"
        assert answer.why == "unreachable"  # type: ignore[attr-defined]
        link = store.sync_link()
        assert store.fallback_why == "unreachable"
        pauses = []
        for _ in range(4):
            pauses.append(link._paused_until - clock.monotonic())
            clock.advance(pauses[-1])
            assert store.outbound_gate_sync(*args, 0.0)[2] == "fallback"
        assert pauses[-1] > pauses[0]
        assert store.stats.outages == 1
        server.start()
        clock.advance(1.0)
        assert store.outbound_gate_sync(*args, 0.0)[2] == "redis"
        assert store.fallback_why is None
    finally:
        store.sync_link().close()
        server.stop()


# ---------------------------------------------------------------- 2. outbound decisions say why


@pytest.mark.anyio
@pytest.mark.redis
async def test_outbound_fallback_decisions_say_why(replica: ReplicaServer) -> None:
    """Before: the transport's decisions taken without Redis said `fallback` and nothing
    about why, where the inbound ones say `fallback_why`."""
    clock = FakeClock()
    engine = _engine(replica.url, clock)
    answers = iter([503, 200, 200, 200])
    t = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(next(answers))),
        engine=engine,
        telemetry=False,
    )
    try:
        async with httpx.AsyncClient(transport=t) as client:
            response = await client.get(URL)
            assert response.status_code == 200
            await asyncio.sleep(0.02)
            response = await client.get(URL)
        for r in (response,):
            decisions = r.extensions["fidelity_context"].decisions
            fell = [d for d in decisions if d.state_source == SOURCE_FALLBACK]
            assert fell
            assert all(d.details["fallback_why"] == "read_only" for d in fell)  # type: ignore[index]
    finally:
        await engine.store.aclose()


@pytest.mark.anyio
@pytest.mark.redis
async def test_a_retry_decided_without_redis_says_why(replica: ReplicaServer) -> None:
    clock = FakeClock()
    engine = _engine(replica.url, clock)
    answers = iter([503, 200])
    t = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(next(answers))),
        engine=engine,
        telemetry=False,
    )
    try:
        async with httpx.AsyncClient(transport=t) as client:
            response = await client.get(URL)
        assert response.status_code == 200
        decisions = response.extensions["fidelity_context"].decisions
        retries = [d for d in decisions if d.verdict == "retry"]
        assert [d.state_source for d in retries] == ["fallback"]
        assert retries[0].details["fallback_why"] == "read_only"  # type: ignore[index]
    finally:
        await engine.store.aclose()


# ------------------------------------------------------- 2. on_error = "closed" says what it is


@pytest.mark.anyio
@pytest.mark.redis
async def test_closed_on_a_replica_says_read_only_not_unreachable(replica: ReplicaServer) -> None:
    """Before: `StateUnavailable` said "redis is unreachable" for a replica that answered."""
    clock = FakeClock()
    store = RedisStore(
        config=StateConfig(url=replica.url, on_error="closed", **PATIENT, **QUIET), clock=clock
    )
    try:
        with pytest.raises(StateUnavailable):
            await store.admit(None, None, ["l|a"], [LIMIT], 0.0)
        with pytest.raises(StateUnavailable, match="read-only replica") as raised:
            await store.admit(None, None, ["l|a"], [LIMIT], 0.0)
        assert raised.value.why == "read_only"
        with pytest.raises(StateUnavailable, match="read-only replica") as raised:
            await store.outbound_gate("h", BREAKER, None, None, False, 0.0)
        assert raised.value.why == "read_only"
    finally:
        await store.aclose()


@pytest.mark.anyio
@pytest.mark.redis
async def test_the_outbound_refusal_of_a_closed_policy_on_a_replica_says_so(
    replica: ReplicaServer,
) -> None:
    clock = FakeClock()
    engine = _engine(replica.url, clock, on_error="closed")
    t = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)), engine=engine, telemetry=False
    )
    try:
        async with httpx.AsyncClient(transport=t) as client:
            with pytest.raises(CircuitOpen):
                await client.get(URL)
            with pytest.raises(CircuitOpen, match="read-only replica"):
                await client.get(URL)
    finally:
        await engine.store.aclose()


# ------------------------------------------------ 2. the FastAPI forms say why, as the middleware


@pytest.mark.anyio
@pytest.mark.redis
@pytest.mark.parametrize("on_error", ["local", "closed"])
async def test_a_limit_dependency_decided_without_redis_says_why(
    replica: ReplicaServer, on_error: str
) -> None:
    """Before: `fidelity.limit(...)` records taken on a fallback answer, and its refusals
    when the store failed closed, had no `fallback_why`, where the middleware's have it."""
    from fastapi import Depends, FastAPI

    from fidelity_mw import DecisionContext, FidelityMiddleware
    from fidelity_mw.fastapi import Fidelity

    seen: list[DecisionContext] = []

    class Keep:
        def start(self, ctx: DecisionContext, scope: object) -> None:
            return None

        def end(self, ctx: DecisionContext, scope: object, token: object) -> None:
            seen.append(ctx)

    fidelity = Fidelity()
    app = FastAPI()

    @app.get("/x", dependencies=[Depends(fidelity.limit("100/s"))])
    async def x() -> dict[str, int]:
        return {"ok": 1}

    config = StateConfig(url=replica.url, on_error=on_error, **PATIENT, **QUIET)  # type: ignore[arg-type]
    store = RedisStore(config=config)
    policy = Policy(breaker=None, state=config)
    app.add_middleware(FidelityMiddleware, policy=policy, store=store, observer=Keep())
    fidelity.install(app)
    try:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            statuses = []
            for _ in range(3):
                statuses.append((await c.get("/x")).status_code)
                await asyncio.sleep(0.02)
        assert statuses[1:] == [200 if on_error == "local" else 503] * 2
        limited = [d for ctx in seen[1:] for d in ctx.decisions if d.layer == "ratelimit"]
        assert limited
        assert all(d.state_source == "fallback" for d in limited)
        assert all(d.details["fallback_why"] == "read_only" for d in limited)  # type: ignore[index]
    finally:
        await store.aclose()


# ---------------------------------------- 3. a refund finds its bucket by the server's time

ONE_RETRY = RetryConfig(budget_ratio=0.0, budget_min_per_s=0.1, budget_window_s=10.0)
TWO_RETRIES = RetryConfig(budget_ratio=0.0, budget_min_per_s=0.2, budget_window_s=10.0)


def _stores(url: str) -> list[Any]:
    from fidelity_mw.state.tiered import TieredStore

    stores: list[Any] = []
    for each in (url, "tiered+" + url):
        config = StateConfig(url=each, **PATIENT, **QUIET)
        stores.append((TieredStore if each.startswith("tiered") else RedisStore)(config=config))
    return stores


@pytest.mark.anyio
@pytest.mark.redis
async def test_a_refund_at_a_bucket_edge_gives_the_retry_back(
    redis_url: str, redis_clock: Any
) -> None:
    """Before: the refund found the retry's bucket by its age on the caller's clock, back
    from the server's time: a retry spent 10 ms before its bucket's end, refunded with an
    age 20 ms short (round trips), named the next bucket, which held nothing: nothing came
    back, and the next retry was refused. Now the gate's answer says when the server spent
    it (`GateAnswer.spent_at`) and the refund names that bucket."""
    for store in _stores(redis_url):
        key = f"edge:{type(store).__name__}"
        redis_clock.set(1_000.0)
        try:
            exact = getattr(store, "exact", store)  # (sent now: the ring starts at 1000)
            await exact.outbound_gate(None, None, key, ONE_RETRY, False, 1_000.0)  # be = 1001
            redis_clock.set(1_000.99)
            answer = await store.outbound_gate(None, None, key, ONE_RETRY, True, 1_000.99)
            assert answer[1:3] == (True, "redis")
            assert answer.spent_at == 1_000.99
            redis_clock.set(1_001.5)
            # (the age alone names [1001, 1002): nothing there to give back)
            await store.budget_refund(key, ONE_RETRY, "redis", 0.49, 1_001.5)
            again = await store.outbound_gate(None, None, key, ONE_RETRY, True, 1_001.5)
            assert not again[1]
            await store.budget_refund(key, ONE_RETRY, "redis", 0.49, 1_001.5, answer.spent_at)
            again = await store.outbound_gate(None, None, key, ONE_RETRY, True, 1_001.5)
            assert again[1]  # given back: one more
        finally:
            await store.aclose()


@pytest.mark.anyio
@pytest.mark.redis
async def test_a_refund_at_a_bucket_edge_leaves_another_calls_retry_alone(
    redis_url: str, redis_clock: Any
) -> None:
    """Before: the age named the next bucket, which held another call's retry: that one
    came off (it then left the window a bucket early with the refunded one)."""
    store = _stores(redis_url)[0]
    key = "edge:other"
    try:
        await store.outbound_gate(None, None, key, TWO_RETRIES, False, 1_000.0)  # be = 1001
        redis_clock.set(1_000.99)
        mine = await store.outbound_gate(None, None, key, TWO_RETRIES, True, 1_000.99)
        redis_clock.set(1_001.2)
        other = await store.outbound_gate(None, None, key, TWO_RETRIES, True, 1_001.2)
        assert mine[1]
        assert other[1]
        redis_clock.set(1_001.5)
        await store.budget_refund(key, TWO_RETRIES, "redis", 0.49, 1_001.5, mine.spent_at)
        # 1000.99's bucket has left the window, the other call's retry (1001.2) has not:
        # one retry left, not two
        redis_clock.set(1_010.5)
        first = await store.outbound_gate(None, None, key, TWO_RETRIES, True, 1_010.5)
        second = await store.outbound_gate(None, None, key, TWO_RETRIES, True, 1_010.5)
        assert (first[1], second[1]) == (True, False)
    finally:
        await store.aclose()


def test_the_model_and_the_memory_store_find_the_bucket_by_spent_at() -> None:
    """The model (`BudgetWindow.refund`), as budget_refund.lua: `spent_at` names the
    bucket; the age is not read then."""
    from fidelity_mw.decide.budget import BudgetWindow

    window = BudgetWindow(ONE_RETRY)
    window.request(1_000.0)
    assert window.try_retry(1_000.99)
    assert not window.refund(1_001.5, 0.49)  # the age names the next bucket
    assert window.refund(1_001.5, 0.49, 1_000.99)
    assert window.try_retry(1_001.5)


# ------------------------------------------------------ found on the way: aclose hung on the probe


@pytest.mark.anyio
async def test_a_cancelled_probe_is_not_kept_running_by_the_pools_disconnect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: redis-py's `ConnectionPool.disconnect` (a gather with return_exceptions)
    can return normally when the task awaiting it is cancelled; the probe, cancelled by
    `aclose` while dropping idle connections, went on probing, and `aclose` (awaiting it)
    hung for good (seen with a replica: the probe never ends by itself there). No I/O:
    the pool's disconnect is replaced by one that swallows the cancellation so."""
    from redis.asyncio import ConnectionPool

    from fidelity_mw.state import redis as redis_module

    async def swallowing(self: ConnectionPool, inuse_connections: bool = True) -> None:
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            return  # (as the gather with return_exceptions does)

    monkeypatch.setattr(ConnectionPool, "disconnect", swallowing)
    store = RedisStore(config=StateConfig(url="redis://127.0.0.1:1/0"))
    client = store.client()
    task = asyncio.get_running_loop().create_task(redis_module._drop_idle_connections(client))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ------------------------------------------- 4. a call cancelled while its gate is in flight


class _CancelledInFlight:
    """The store's `outbound_gate`, with the caller cancelled while the reply is on its way:
    the script ran (it took what it takes), then the cancellation arrives."""

    def __init__(self, store: RedisStore, scope: Any, when: Callable[[tuple[Any, ...]], bool]):
        self.real = store.outbound_gate
        self.scope = scope
        self.when = when

    async def __call__(self, *args: Any) -> Any:
        import anyio.lowlevel

        answer = await self.real(*args)
        if self.when(args):
            self.scope.cancel()
            await anyio.lowlevel.checkpoint()  # (where the await of the reply was)
        return answer


PROBING = BreakerConfig(
    consecutive_failures=1, open_s=0.05, open_jitter=0.0, half_open_probes=1, probe_lease_s=30.0
)


@pytest.mark.anyio
@pytest.mark.redis
async def test_a_call_cancelled_while_its_probe_gate_is_in_flight_frees_the_slot(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the half-open breaker's probe slot taken by a gate whose caller was cancelled
    before the reply arrived stayed taken until the probe lease (30 s) ran out: every
    call meanwhile was refused. Now the reply is read under a shield, and the slot given
    back."""
    import anyio

    policy = Policy(
        state=StateConfig(url=redis_url, **PATIENT, **QUIET),
        upstreams=(UpstreamConfig(host="*", retry=RetryConfig(attempts=1), breaker=PROBING),),
    )
    store = RedisStore(config=policy.state, rng=seeded_random(1))
    engine = Engine(policy, clock=FakeClock(), store=store)
    answers = iter([503, 200, 200])
    t = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(next(answers))),
        engine=engine,
        telemetry=False,
    )
    try:
        async with httpx.AsyncClient(transport=t) as client:
            assert (await client.get(URL)).status_code == 503  # opens the breaker
            await asyncio.sleep(0.06)  # (the server's clock: half-open after 50 ms)
            with anyio.CancelScope() as scope:
                gate = _CancelledInFlight(store, scope, lambda args: True)
                monkeypatch.setattr(store, "outbound_gate", gate)
                await client.get(URL)
            assert scope.cancelled_caught
            monkeypatch.undo()
            response = await client.get(URL)  # the probe slot is free: this is the probe
        assert response.status_code == 200
        decisions = response.extensions["fidelity_context"].decisions
        assert [d.verdict for d in decisions if d.layer == "breaker"] == ["probe"]
    finally:
        await store.aclose()


@pytest.mark.anyio
@pytest.mark.redis
async def test_a_call_cancelled_while_its_retry_gate_is_in_flight_gives_the_retry_back(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the retry the budget spent for a call cancelled before the gate's reply
    arrived was never given back (one retry per window here: the next call could not
    retry)."""
    import anyio

    policy = Policy(
        state=StateConfig(url=redis_url, **PATIENT, **QUIET),
        upstreams=(
            UpstreamConfig(
                host="*",
                retry=RetryConfig(
                    attempts=2,
                    base_ms=1,
                    max_ms=2,
                    budget_ratio=0.0,
                    budget_min_per_s=0.1,
                    budget_window_s=10.0,
                ),
                breaker=None,
            ),
        ),
    )
    store = RedisStore(config=policy.state, rng=seeded_random(1))
    engine = Engine(policy, clock=FakeClock(), store=store)
    answers = iter([503, 503, 200])
    t = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(next(answers))),
        engine=engine,
        telemetry=False,
    )
    try:
        async with httpx.AsyncClient(transport=t) as client:
            with anyio.CancelScope() as scope:
                gate = _CancelledInFlight(store, scope, lambda args: bool(args[4]))
                monkeypatch.setattr(store, "outbound_gate", gate)
                await client.get(URL)
            assert scope.cancelled_caught
            monkeypatch.undo()
            response = await client.get(URL)  # 503, then its retry: the budget has it
        assert response.status_code == 200
        decisions = response.extensions["fidelity_context"].decisions
        assert [d.verdict for d in decisions if d.layer == "retry"] == ["allow", "retry"]
    finally:
        await store.aclose()
