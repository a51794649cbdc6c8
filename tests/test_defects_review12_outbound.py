"""Outbound and state defects left alone by review 11, and a review of the balancer
(out12): each test failed before its fix."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from _redis_patience import up_after_probe
from fidelity_mw import FidelityMiddleware, FidelityTransport, Policy
from fidelity_mw.context import SOURCE_FALLBACK
from fidelity_mw.decide.breaker import OPEN
from fidelity_mw.engine import Engine
from fidelity_mw.policy import (
    BreakerConfig,
    DeadlineConfig,
    HedgeConfig,
    RetryConfig,
    StateConfig,
    UpstreamConfig,
)
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_server import PATIENT, QUIET, RedisServer, ReplicaServer, require_redis

pytestmark = pytest.mark.anyio

URL = "http://svc.internal/x"


def _client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


# ------------------------------------- 1. raise_for_status() on one of two calls at once


def _gather_app(raise_on: str, seen: list[Any]) -> Starlette:
    """Two calls to one upstream at once in one request (`asyncio.gather`): `/given-up`
    answers 503 every time (retried, then given up), `/other` answers only once the
    first call has given up: 500 (not retried: no give-up of its own), or first 503 and
    then 200 (its retry is recorded after the other call's give-up)."""
    gave_up = asyncio.Event()
    other: list[int] = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/given-up":
            if request.headers["x-fidelity-attempt"] == "3":
                gave_up.set()  # (the loop records its give-up right after this answer)
            return httpx.Response(503)
        await gave_up.wait()
        await asyncio.sleep(0)
        other.append(1)
        if raise_on == "other":
            return httpx.Response(500)
        return httpx.Response(503 if len(other) == 1 else 200)

    outbound = httpx.AsyncClient(transport=FidelityTransport(httpx.MockTransport(upstream)))

    async def handler(request: Request) -> Response:
        seen.append(request.scope)
        first, second = await asyncio.gather(
            outbound.get("http://payments.internal/given-up"),
            outbound.get("http://payments.internal/other"),
        )
        (first if raise_on == "given-up" else second).raise_for_status()
        return PlainTextResponse("not reached")

    app = Starlette(routes=[Route("/", handler)])
    policy = Policy(
        deadline=DeadlineConfig(default_ms=5000),
        breaker=BreakerConfig(consecutive_failures=100),
        upstreams=(
            UpstreamConfig(
                host="*",
                retry=RetryConfig(attempts=3, base_ms=1, max_ms=1),
                breaker=BreakerConfig(consecutive_failures=100),
            ),
        ),
    )
    app.add_middleware(FidelityMiddleware, policy=policy, clock=FakeClock(), telemetry=False)
    return app


async def test_raise_for_status_on_the_call_given_up_on_while_another_retries() -> None:
    """Before: the mapping read the request's last decision for the upstream, which was
    the other call's retry: a bare 500."""
    seen: list[Any] = []
    async with _client(_gather_app("given-up", seen)) as client:
        got = await client.get("/")
    assert got.status_code == 502
    assert got.headers["x-fidelity-retry"] == "exhausted"
    assert json.loads(got.content)["type"].endswith("upstream-failed")


async def test_raise_for_status_on_an_unretried_500_beside_a_give_up_stays_the_apps() -> None:
    """Before: the other call's give-up, the last decision for the upstream, was read as
    this 500's: a 502 marked exhausted for a status we never retried."""
    seen: list[Any] = []
    async with _client(_gather_app("other", seen)) as client:
        got = await client.get("/")
    assert got.status_code == 500
    assert got.text == "Internal Server Error"


# ------------------------------------- 2. the tiered store's first-attempt fallback says why


@pytest.mark.redis
async def test_a_tiered_first_attempt_without_redis_says_why(own_redis: RedisServer) -> None:
    """Before: the first attempt's gate came from the exact store's fallback (the cache's
    `admit`) as a plain answer: the decision said `fallback` and not why, where the
    Redis store's says `fallback_why` (a retry's budget answer said it already)."""
    clock = FakeClock()
    policy = Policy(
        state=StateConfig(url="tiered+" + own_redis.url, **PATIENT, **QUIET),
        upstreams=(
            UpstreamConfig(
                host="*",
                retry=RetryConfig(attempts=3, base_ms=1, max_ms=2),
                breaker=BreakerConfig(consecutive_failures=3, open_s=5.0, open_jitter=0.0),
            ),
        ),
    )
    store = TieredStore(config=policy.state, rng=seeded_random(3), clock=clock)
    engine = Engine(policy, clock=clock, store=store)
    t = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)), engine=engine, telemetry=False
    )
    own_redis.stop()
    try:
        async with httpx.AsyncClient(transport=t) as client:
            for _ in range(2):  # the call that finds Redis down, and one while it is
                response = await client.get("http://svc.internal/x")
                decisions = response.extensions["fidelity_context"].decisions
                first = [d for d in decisions if d.layer == "retry"]
                assert [d.state_source for d in first] == [SOURCE_FALLBACK]
                assert first[0].details["fallback_why"] == "unreachable"  # type: ignore[index]
    finally:
        await store.aclose()


# ------------------------------ 3. a raw task.cancel() while a remote gate call is in flight


class _Reads:
    """Counts the replies awaited on redis-py's connections (`read_response`, patched):
    a call's script is sent and its reply awaited (the server is paused) once one more
    is waited for. (The task's await chain cannot be walked: compiled, our coroutines
    do not show it.)"""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from redis.asyncio.connection import AbstractConnection

        self.waiting = 0
        real = AbstractConnection.read_response
        reads = self

        async def read_response(conn: Any, *args: Any, **kwargs: Any) -> Any:
            reads.waiting += 1
            return await real(conn, *args, **kwargs)

        monkeypatch.setattr(AbstractConnection, "read_response", read_response)

    async def in_flight(self, task: asyncio.Task[Any], since: int) -> None:
        """Until the call's script is sent and its reply awaited (`since`: the count of
        replies awaited before the server was paused)."""
        for _ in range(10_000):
            if self.waiting > since:
                return
            assert not task.done()
            await asyncio.sleep(0)
        raise AssertionError("the gate call never reached its reply")

    async def resume_once_cancelled(self, task: asyncio.Task[Any], server: RedisServer) -> None:
        """Resume the paused server once the cancellation has reached the call: the call
        is over, or awaits its reply again (the fix: `state/redis.py`, `_late_reply`)."""
        before = self.waiting
        for _ in range(10_000):
            if task.done() or self.waiting > before:
                break
            await asyncio.sleep(0)
        server.resume()


PROBING = BreakerConfig(
    consecutive_failures=1, open_s=0.01, open_jitter=0.0, half_open_probes=1, probe_lease_s=30.0
)


@pytest.mark.redis
@pytest.mark.parametrize("how", ["task.cancel", "asyncio.timeout"])
async def test_a_raw_cancel_while_the_probe_gate_is_in_flight_frees_the_slot(
    own_redis: RedisServer, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the anyio shield around the gate call does not hold against a raw
    `task.cancel()` (what `asyncio.timeout` and `wait_for` do): the reply was lost with the
    probe slot the script took, and the half-open breaker refused every call until the
    probe lease (30 s) ran out. Now the reply is read all the same and the slot given
    back; the cancellation still ends the call."""
    policy = Policy(
        state=StateConfig(url=own_redis.url, **PATIENT, **QUIET),
        upstreams=(UpstreamConfig(host="*", retry=RetryConfig(attempts=1), breaker=PROBING),),
    )
    store = RedisStore(config=policy.state, rng=seeded_random(1))
    engine = Engine(policy, clock=FakeClock(), store=store)
    answers = iter([503, 200])
    t = FidelityTransport(
        httpx.MockTransport(lambda r: httpx.Response(next(answers))),
        engine=engine,
        telemetry=False,
    )
    try:
        async with httpx.AsyncClient(transport=t) as client:
            assert (await client.get(URL)).status_code == 503  # opens the breaker
            await asyncio.sleep(0.02)  # (the server's clock: half-open after 10 ms)
            reads = _Reads(monkeypatch)
            own_redis.pause()
            since = reads.waiting
            if how == "task.cancel":
                task = asyncio.create_task(client.get(URL))
                await reads.in_flight(task, since)
                task.cancel()
                await reads.resume_once_cancelled(task, own_redis)
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:

                async def bounded() -> None:
                    async with asyncio.timeout(None) as timeout:
                        call = asyncio.create_task(client.get(URL))
                        await reads.in_flight(call, since)
                        timeout.reschedule(asyncio.get_running_loop().time())
                        resumer = asyncio.create_task(reads.resume_once_cancelled(call, own_redis))
                        try:
                            await call
                        finally:
                            await resumer

                # (the timeout cancels this task, which awaits the call: the call's task
                # is cancelled through the await, a raw cancel as well)
                with pytest.raises(TimeoutError):
                    await bounded()
            response = await client.get(URL)  # the slot is free: this call is the probe
            assert response.status_code == 200
            decisions = response.extensions["fidelity_context"].decisions
            assert ("breaker", "probe") in {(d.layer, d.verdict) for d in decisions}
    finally:
        own_redis.resume()
        await store.aclose()


@pytest.mark.redis
async def test_a_raw_cancel_while_a_retrys_gate_is_in_flight_gives_the_retry_back(
    own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry's gate spends a retry of the budget: lost with the reply before, so with
    a budget of one retry per window the next call's retry was refused."""
    retry = RetryConfig(
        attempts=2, base_ms=1, max_ms=1, budget_ratio=0.0, budget_min_per_s=0.1
    )  # one retry per 10 s window
    policy = Policy(
        state=StateConfig(url=own_redis.url, **PATIENT, **QUIET),
        # (no breaker: the failure's outcome would be a script call of its own first)
        upstreams=(UpstreamConfig(host="*", retry=retry, breaker=None),),
    )
    store = RedisStore(config=policy.state, rng=seeded_random(1))
    engine = Engine(policy, clock=FakeClock(), store=store)
    paused = asyncio.Event()
    since: list[int] = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/held" and not paused.is_set():
            own_redis.pause()  # the retry's gate, next, stays in flight
            since.append(reads.waiting)
            paused.set()
        return httpx.Response(503 if request.headers["x-fidelity-attempt"] == "1" else 200)

    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    try:
        async with httpx.AsyncClient(transport=t) as client:
            reads = _Reads(monkeypatch)
            task = asyncio.create_task(client.get("http://svc.internal/held"))
            await paused.wait()
            await reads.in_flight(task, since[0])
            task.cancel()
            await reads.resume_once_cancelled(task, own_redis)
            with pytest.raises(asyncio.CancelledError):
                await task
            response = await client.get("http://svc.internal/next")
            assert response.status_code == 200  # its retry had the budget's one retry
            verdicts = [d.verdict for d in response.extensions["fidelity_context"].decisions]
            assert "retry" in verdicts
    finally:
        own_redis.resume()
        await store.aclose()


# ------------------------------------- 4. a writable replica (`replica-read-only no`)


class WritableReplica(ReplicaServer):
    """A replica that takes writes (`replica-read-only no`): they stay on it until it
    resyncs with its primary, and its primary's clients never see them."""

    def argv(self) -> list[str]:
        return [*super().argv(), "--replica-read-only", "no"]


@pytest.fixture
def writable_replica(tmp_path: Path) -> Iterator[WritableReplica]:
    require_redis()
    primary = RedisServer(tmp_path / "primary").start()
    server = WritableReplica(tmp_path / "replica", primary)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        primary.stop()


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(100_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("never")


@pytest.mark.redis
async def test_a_writable_replica_found_by_the_probe_is_not_taken_back(
    writable_replica: WritableReplica, caplog: pytest.LogCaptureFixture
) -> None:
    """Kept (docs/operations.md): a replica is never the store's home, writable or not:
    its writes are lost when it resyncs, and the processes that reach the primary never
    see them (a limit counted on two servers admits twice). The probe that ends an outage
    asks ROLE; a replica keeps the store in `on_error` (`fallback_why = "read_only"`)
    until it is promoted. While it answers every script (no outage, no probe) it is used:
    the store does not ask ROLE per call. The line logged says what the probe found."""
    caplog.set_level(logging.WARNING, "fidelity_mw")
    clock = FakeClock()
    store = RedisStore(
        config=StateConfig(
            url=writable_replica.url, timeout_ms=200, connect_timeout_ms=2_000, **QUIET
        ),
        rng=seeded_random(2),
        clock=clock,
    )
    limit = LimitSpec("l", 0.001, 1.0, 1, False)
    try:
        assert (await store.admit(None, None, ["l|a"], [limit], 0.0)).source == "redis"
        writable_replica.pause()  # an outage: the next call times out
        try:
            assert (await store.admit(None, None, ["l|a"], [limit], 0.0)).source == "fallback"
        finally:
            writable_replica.resume()
        # the probe asked ROLE (the fake clock moved to its time)
        await _until(lambda: up_after_probe(store) or store.fallback_why == "read_only")
        result = await store.admit(None, None, ["l|a"], [limit], 0.0)
        assert (result.source, result.why) == ("fallback", "read_only")
        lines = [r.getMessage() for r in caplog.records if "found by the probe" in r.getMessage()]
        assert len(lines) == 1
        assert "is a replica (ROLE" in lines[0]
        assert not store.up
        with writable_replica.client() as admin:
            admin.execute_command("REPLICAOF", "NO", "ONE")
        await _until(lambda: up_after_probe(store))
        assert (await store.admit(None, None, ["l|a"], [limit], 0.0)).source == "redis"
    finally:
        await store.aclose()


# ---------------------------------------------------------------- 5. the balancer

INSTANCES = ("http://10.0.0.1:8001", "http://10.0.0.2:8002", "http://10.0.0.3:8003")
KEYS = ("10.0.0.1:8001", "10.0.0.2:8002", "10.0.0.3:8003")
STEADY = BreakerConfig(open_s=30.0, failure_ratio=1.0, min_calls=1_000)  # opens only by hand


def _service(store: MemoryStore, **upstream: Any) -> Engine:
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2, budget_min_per_s=100.0)
    cfg = UpstreamConfig(host="payments", instances=INSTANCES, retry=retry, **upstream)
    return Engine(Policy(upstreams=(cfg,)), clock=FakeClock(), rng=seeded_random(7), store=store)


async def test_a_retry_goes_back_to_a_tried_instance_rather_than_give_up_as_breaker_open() -> None:
    """Two of three breakers open, the bound keeps one of them in rotation; the third
    instance is healthy and answers one transient 503. Before: the retry avoided it
    (tried), found only the open instance kept in, and gave up as `breaker_open`
    (telling callers not to retry either) while the healthy instance was there. Envoy's
    previous-hosts predicate gives way when no other host is left: the retry goes back
    to the instance whose breaker admits it."""
    ejected_one, _kept_in, healthy = KEYS
    seen: list[str] = []
    transient = [True]

    def upstream(request: httpx.Request) -> httpx.Response:
        key = f"{request.url.host}:{request.url.port}"
        seen.append(key)
        if key == healthy:
            transient[0] = not transient[0]
            return httpx.Response(200 if transient[0] else 503)
        return httpx.Response(503)

    store = MemoryStore(rng=seeded_random(3))
    engine = _service(store, breaker=STEADY, max_ejected_ratio=0.34, panic_threshold=0.0)
    for key, until in zip(KEYS[:2], (2_000.0, 1_500.0), strict=True):
        store.breaker_state("upstream:" + key, STEADY).force(OPEN, until, seeded_random(0))
    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    back: list[list[str]] = []
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(30):
            seen.clear()
            response = await client.get("http://payments/pay")
            assert response.status_code == 200, seen
            if seen[:1] == [healthy]:
                back.append(list(seen))
            assert ejected_one not in seen
            ctx = response.extensions["fidelity_context"]
            assert not ctx.upstream_exhausted
    assert [healthy, healthy] in back  # a transient 503 of the healthy one, retried there


async def test_a_hedged_calls_retry_avoids_the_instance_its_hedge_waits_on() -> None:
    """The call's attempt is slow, a hedge goes to another instance and waits there, then
    the attempt fails: its retry went to whichever instance the balancer liked, the
    hedge's included (the loop avoided only its own attempts' instances), so with the
    hedge's instance the fastest known the call had two attempts waiting on one instance
    and none on the third. Now a retry avoids every instance the call has sent to."""
    clock = FakeClock()
    hedge_waits = asyncio.Event()
    sent: list[str] = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        key = f"{request.url.host}:{request.url.port}"
        sent.append(key)
        if len(sent) == 1:  # the call's attempt: slow, then a 503
            await hedge_waits.wait()
            return httpx.Response(503)
        if len(sent) == 2:  # the hedge: no answer while the call goes on
            hedge_waits.set()
            await asyncio.Event().wait()
        return httpx.Response(200)

    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2, budget_min_per_s=100.0)
    cfg = UpstreamConfig(
        host="payments",
        instances=INSTANCES,
        retry=retry,
        breaker=STEADY,
        hedge=HedgeConfig(after_ms=50),
    )
    engine = Engine(
        Policy(upstreams=(cfg,)), clock=clock, rng=seeded_random(7), store=MemoryStore()
    )
    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    up = t.upstream(engine, httpx.URL("http://payments/pay"))
    assert up.instances is not None
    # two fast instances (the attempt and its hedge go there) and a slow one
    for instance, latency in zip(up.instances, (0.001, 0.002, 1.0), strict=True):
        instance.latency_s, instance.latency_at = latency, clock.monotonic()
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 200
    assert len(sent) == 3
    assert len(set(sent)) == 3, sent  # the retry went to the third instance


@pytest.mark.parametrize(("status", "retry_after"), [(503, "120"), (429, "60"), (503, "31")])
async def test_one_instances_retry_after_beyond_the_wait_sends_the_retry_elsewhere(
    status: int, retry_after: str
) -> None:
    """One instance of three answers with a `Retry-After` the call cannot wait (beyond
    `retry_after_max_s`, 30 s, whose wait also reaches the call's 30 s deadline).
    Before: the call gave up (`retry_after_too_long` / `deadline`, marked exhausted) while
    two instances stood by; that instance's word is about itself (its retries are paused,
    as a 429's are). Now the retry goes to another instance after its backoff, and
    the instance is paused for what it said (at most `retry_after_max_s`)."""
    busy = KEYS[0]
    seen: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        key = f"{request.url.host}:{request.url.port}"
        seen.append(key)
        if key == busy:
            return httpx.Response(status, headers={"retry-after": retry_after})
        return httpx.Response(200)

    store = MemoryStore(rng=seeded_random(3))
    engine = _service(store, breaker=None)
    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    clock = engine.clock
    firsts = 0
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(20):
            seen.clear()
            response = await client.get("http://payments/pay")
            assert response.status_code == 200, seen
            if seen[0] == busy:
                firsts += 1
                assert len(seen) == 2
                ctx = response.extensions["fidelity_context"]
                (retried,) = [d for d in ctx.decisions if d.verdict == "retry"]
                assert retried.details["delay_ms"] <= 100.0  # the backoff, not the wait  # type: ignore[index]
                up = t.upstream(engine, httpx.URL("http://payments/pay"))
                assert up.instances is not None
                wait = min(float(retry_after), 30.0)
                assert up.instances[0].paused_until == pytest.approx(
                    clock.monotonic() - retried.details["delay_ms"] / 1000.0 + wait  # type: ignore[index, operator]
                )
    assert firsts > 0


async def test_a_retry_takes_a_closed_instance_over_a_cheaper_open_one_kept_in() -> None:
    """Four instances: one ejected, one open and kept in rotation by the bound (and the
    cheapest), two closed. Before: a retry's power of two choices weighed cost alone and
    drew the open one kept in over the closed one not tried yet, then gave up as
    `breaker_open` (a retry never goes around an open breaker without evidence)."""
    instances = (*INSTANCES, "http://10.0.0.4:8004")
    ejected_one, kept_in, failing, spare = (*KEYS, "10.0.0.4:8004")
    seen: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        key = f"{request.url.host}:{request.url.port}"
        seen.append(key)
        return httpx.Response(200 if key == spare else 503)

    store = MemoryStore(rng=seeded_random(3))
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2, budget_min_per_s=100.0)
    cfg = UpstreamConfig(
        host="payments",
        instances=instances,
        retry=retry,
        breaker=STEADY,
        max_ejected_ratio=0.25,
        panic_threshold=0.0,
    )
    clock = FakeClock()
    engine = Engine(Policy(upstreams=(cfg,)), clock=clock, rng=seeded_random(7), store=store)
    for key, until in ((ejected_one, 2_000.0), (kept_in, 1_500.0)):
        store.breaker_state("upstream:" + key, STEADY).force(OPEN, until, seeded_random(0))
    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    up = t.upstream(engine, httpx.URL("http://payments/pay"))
    assert up.instances is not None
    for instance, latency in zip(up.instances, (0.001, 0.001, 0.001, 1.0), strict=True):
        instance.latency_s, instance.latency_at = latency, clock.monotonic()
    firsts = 0
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(30):
            seen.clear()
            response = await client.get("http://payments/pay")
            assert response.status_code == 200, seen
            firsts += seen[0] == failing
    assert firsts > 0


async def test_an_instances_retry_after_is_never_cut_short_when_no_other_may_take_it() -> None:
    """The other instance of two is known open: the retry could only go back to the one
    that said `Retry-After: 120`, so the call gives up as before rather than ask it again
    after the backoff."""
    seen: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host}:{request.url.port}")
        return httpx.Response(503, headers={"retry-after": "120"})

    store = MemoryStore(rng=seeded_random(3))
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2, budget_min_per_s=100.0)
    cfg = UpstreamConfig(host="payments", instances=INSTANCES[:2], retry=retry, breaker=STEADY)
    engine = Engine(Policy(upstreams=(cfg,)), clock=FakeClock(), rng=seeded_random(7), store=store)
    store.breaker_state("upstream:" + KEYS[1], STEADY).force(OPEN, 2_000.0, seeded_random(0))
    t = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        response = await client.get("http://payments/pay")
    assert response.status_code == 503
    assert seen == [KEYS[0]]
    ctx = response.extensions["fidelity_context"]
    assert [d.reason for d in ctx.decisions if d.verdict == "give_up"] == ["deadline"]
