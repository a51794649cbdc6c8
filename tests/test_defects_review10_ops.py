"""State and outbound follow-ups of review 10 (ops10): each test failed before its fix."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

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
from redis_server import HOST, PATIENT, QUIET, RedisServer, require_redis

URL = "http://svc.internal/x"
BREAKER = BreakerConfig(consecutive_failures=3, open_s=5.0, open_jitter=0.0)
RETRY = RetryConfig(attempts=3, base_ms=1, max_ms=2)
LIMIT = LimitSpec("l", 0.001, 1.0, 1, False)


class _Replica(RedisServer):
    """A redis-server started as a replica of `primary`: it answers PING, ROLE and reads,
    and refuses every write with `READONLY`."""

    def __init__(self, workdir: Path, primary: RedisServer) -> None:
        super().__init__(workdir)
        self.primary = primary

    def argv(self) -> list[str]:
        return [*super().argv(), "--replicaof", HOST, str(self.primary.port)]


@pytest.fixture
def replica(tmp_path: Path) -> Iterator[_Replica]:
    require_redis()
    primary = RedisServer(tmp_path / "primary").start()
    server = _Replica(tmp_path / "replica", primary)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        primary.stop()


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
    replica: _Replica, caplog: pytest.LogCaptureFixture
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
async def test_outbound_fallback_decisions_say_why(replica: _Replica) -> None:
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
async def test_a_retry_decided_without_redis_says_why(replica: _Replica) -> None:
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
async def test_closed_on_a_replica_says_read_only_not_unreachable(replica: _Replica) -> None:
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
    replica: _Replica,
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
    replica: _Replica, on_error: str
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
