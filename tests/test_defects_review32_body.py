"""An upstream that breaks its answers' bodies counts as failing (breaker, balancer, record).

The transport records an attempt when the response's head arrives; the body is read
later by the caller. An upstream that answers 200 and drops the connection mid-body
looked healthy: its breaker never opened, a service instance doing it kept its share.
Now a break while the caller reads the body (outbound/body.py) turns the call's success
into a failure (`BROKEN`, decide/breaker.py, with its Lua and tiered mirrors).

The upstream here is real: a raw HTTP/1.1 server on loopback (tests/_breaking_upstream.py)
that sends the head and part of the body, then closes or resets the connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis as redis_sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _breaking_upstream import PART, BreakingUpstream
from fidelity_mw import FidelitySyncTransport, FidelityTransport, Policy
from fidelity_mw.decide.breaker import (
    BROKEN,
    CLOSED,
    FAILURE,
    HALF_OPEN,
    OPEN,
    SUCCESS,
    BreakerState,
    open_time,
    streak_stands,
)
from fidelity_mw.outbound import body as body_module
from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig, UpstreamConfig
from fidelity_mw.state import tiered as tiered_module
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_clock import CLOCK_KEY, RedisClock
from redis_server import PATIENT

T0 = 1_000.0
NO_RETRY = RetryConfig(attempts=1)


def _rng() -> float:
    return 0.5


def _policy(breaker: BreakerConfig, **upstream: Any) -> Policy:
    return Policy(
        upstreams=(UpstreamConfig(breaker=breaker, retry=NO_RETRY, **upstream),), breaker=None
    )


# Open for a minute once open: the tests that then expect `CircuitOpen` call on the real
# clock, and a busy machine let the default first open period (0.5 s) pass between the
# opening and the next call, which then probed (a RemoteProtocolError in its place).
BREAKER = BreakerConfig(
    min_calls=4, failure_ratio=0.5, open_jitter=0.0, window_s=30.0, open_min_s=60.0, open_s=60.0
)


def _broken_decisions(ctx: Any) -> list[Any]:
    return [d for d in ctx.decisions if d.reason == "failed_in_body"]


# ---------------------------------------------------------------- the model


def _calls(
    cfg: BreakerConfig, kinds: str, late: bool, steps: list[float] | None = None
) -> list[tuple[Any, ...]]:
    """Calls one after the other ("s" success, "f" failure, "b" a body that breaks),
    each recorded when it ends; `late`: a broken body as it happens (a success, then
    `BROKEN`), else as the failure it is. After each call: state, window, open
    period (a call whose head opened the breaker ends the same: its body's report is
    then of an earlier epoch). `steps`: the time between calls (0.7 s each)."""
    state = BreakerState(cfg)
    now = T0
    out = []
    for i, kind in enumerate(kinds):
        gate = state.gate(now, _rng)
        if gate.verdict != "reject":
            if kind == "b" and late:
                state.record(gate.epoch, gate.probe_id, SUCCESS, now, _rng)
                state.record(gate.epoch, gate.probe_id, BROKEN, now, _rng)
            else:
                outcome = SUCCESS if kind == "s" else FAILURE
                state.record(gate.epoch, gate.probe_id, outcome, now, _rng)
        # (the window while closed: an open breaker's is dropped at its next close; not
        # the epoch: a probe whose body broke closed the breaker and re-opened it, two
        # transitions where its outright failure made one)
        window = tuple(state.totals(now)) if state.state == CLOSED else ()
        out.append((state.state, window, state.open_until))
        now += 0.7 if steps is None else steps[i]
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        BreakerConfig(min_calls=4, failure_ratio=0.5, open_jitter=0.0),
        BreakerConfig(min_calls=5, failure_ratio=1.0, open_jitter=0.0),
        BreakerConfig(min_calls=3, failure_ratio=0.3, open_jitter=0.0, window_s=2.0),
        BreakerConfig(min_calls=100, consecutive_failures=3, open_jitter=0.0),
        BreakerConfig(min_calls=6, failure_ratio=0.6, consecutive_failures=4, open_jitter=0.0),
    ],
)
def test_broken_bodies_open_the_breaker_as_the_same_failures_would(cfg: BreakerConfig) -> None:
    """The acceptance rule: N calls whose bodies break open the breaker exactly as N
    outright failures (ratio, min_calls, consecutive rules), and any mix of successes,
    failures and broken bodies as the same mix with failures in their place."""
    for kinds in ["b" * 12, "sbsbbsbbbsfb", "fsbfbsbbsf", "ssssbbbb", "bfbfbfbf"]:
        assert _calls(cfg, kinds, True) == _calls(cfg, kinds, False), kinds
    draw = random.Random(7)
    for _ in range(300):
        kinds = "".join(draw.choice("ssfbb") for _ in range(draw.randint(1, 25)))
        steps = [draw.choice([0.0, 0.01, 0.2, 0.7, 1.5, 4.0, 31.0]) for _ in kinds]
        assert _calls(cfg, kinds, True, steps) == _calls(cfg, kinds, False, steps), kinds


def test_a_new_failure_instead_would_count_the_call_twice() -> None:
    """Why `BROKEN` is not one more FAILURE: every body breaking would sit at 0.5."""
    state = BreakerState(BreakerConfig(min_calls=4, failure_ratio=0.6, open_jitter=0.0))
    for _ in range(4):
        gate = state.gate(T0, _rng)
        state.record(gate.epoch, 0, SUCCESS, T0, _rng)
        state.record(gate.epoch, 0, BROKEN, T0, _rng)
    assert state.state == OPEN  # (4 failures of 4 calls; as FAILUREs: 4 of 8, closed)


def test_a_body_that_outlives_its_bucket_counts_as_a_failed_call_now() -> None:
    """The success left the window before its body broke: nothing to turn, so the call
    counts as a failed call now (never a failure without its call in the window)."""
    cfg = BreakerConfig(min_calls=1, failure_ratio=1.0, window_s=1.0, open_jitter=0.0)
    state = BreakerState(cfg)
    gate = state.gate(T0, _rng)
    state.record(gate.epoch, 0, SUCCESS, T0, _rng)
    assert state.totals(T0 + 2.0) == (0, 0, 0)  # its bucket is gone
    assert state.record(gate.epoch, 0, BROKEN, T0 + 2.0, _rng) == OPEN
    # Turned in an older bucket while one is left: the newest success is taken
    state = BreakerState(BreakerConfig(min_calls=10, window_s=10.0, open_jitter=0.0))
    for at in (T0, T0 + 3.0):
        g = state.gate(at, _rng)
        state.record(g.epoch, 0, SUCCESS, at, _rng)
    state.record(g.epoch, 0, BROKEN, T0 + 5.0, _rng)
    assert state.totals(T0 + 5.0) == (2, 1, 0)
    assert [b[:2] for b in state.buckets if b[0]] == [[1, 0], [1, 1]]


def test_a_late_report_of_another_epoch_changes_nothing() -> None:
    cfg = BreakerConfig(min_calls=2, failure_ratio=0.5, open_jitter=0.0, open_min_s=1.0)
    state = BreakerState(cfg)
    old = state.gate(T0, _rng)
    state.record(old.epoch, 0, SUCCESS, T0, _rng)
    state.force(OPEN, T0, _rng)  # opened meanwhile (another call's failures, an operator)
    assert state.record(old.epoch, 0, BROKEN, T0, _rng) == OPEN
    state.force(CLOSED, T0, _rng)  # and closed again: a new window, not this call's
    assert state.record(old.epoch, 0, BROKEN, T0, _rng) == CLOSED
    assert state.totals(T0) == (0, 0, 0)
    assert state.consecutive == 0


def test_a_probe_whose_body_breaks_reopens_the_breaker_it_closed() -> None:
    """A half-open probe's success closed the breaker; its body breaks after: the verdict
    is overturned, the breaker re-opens as the probe's failure would have (for twice the
    open time). Once the breaker has moved on, the late report changes nothing."""
    cfg = BreakerConfig(min_calls=1, failure_ratio=1.0, open_jitter=0.0, open_min_s=1.0, open_s=8.0)
    state = BreakerState(cfg)
    g = state.gate(T0, _rng)
    state.record(g.epoch, 0, FAILURE, T0, _rng)
    assert state.state == OPEN
    assert state.open_until == T0 + open_time(cfg, 0)
    now = state.open_until
    probe = state.gate(now, _rng)
    assert probe.verdict == "probe"
    assert state.record(probe.epoch, probe.probe_id, SUCCESS, now, _rng) == CLOSED
    assert state.record(probe.epoch, probe.probe_id, BROKEN, now + 0.1, _rng) == OPEN
    assert state.open_until == now + 0.1 + open_time(cfg, 1)  # doubled: a failed round
    assert state.record(probe.epoch, probe.probe_id, BROKEN, now + 0.2, _rng) == OPEN
    epoch = state.epoch
    # the next round's probe succeeds and its body is whole: closed
    now = state.open_until
    probe = state.gate(now, _rng)
    state.record(probe.epoch, probe.probe_id, SUCCESS, now, _rng)
    assert state.state == CLOSED
    assert state.epoch == epoch + 2
    # an opening from closed starts the open time over
    g = state.gate(now, _rng)
    state.record(g.epoch, 0, FAILURE, now, _rng)
    assert state.open_until == now + open_time(cfg, 0)
    # that probe's body breaking now (the breaker moved on): nothing
    epoch = state.epoch
    assert state.record(probe.epoch, probe.probe_id, BROKEN, now, _rng) == OPEN
    assert state.epoch == epoch


def test_a_probe_that_did_not_close_the_breaker_reports_nothing_more() -> None:
    cfg = BreakerConfig(min_calls=1, failure_ratio=1.0, open_jitter=0.0, half_open_probes=1)
    state = BreakerState(cfg)
    g = state.gate(T0, _rng)
    state.record(g.epoch, 0, FAILURE, T0, _rng)
    now = state.open_until
    probe = state.gate(now, _rng)
    # its lease ran out before its success came (the next gate freed its slot for
    # another probe): not counted, still half-open, and its broken body is not either
    late = now + cfg.probe_lease_s
    assert state.gate(late, _rng).verdict == "probe"
    assert state.record(probe.epoch, probe.probe_id, SUCCESS, late, _rng) == HALF_OPEN
    assert state.record(probe.epoch, probe.probe_id, BROKEN, late, _rng) == HALF_OPEN
    assert state.epoch == probe.epoch


# ---------------------------------------------------------------- the transports


def _client_calls(transport: FidelityTransport, url: str, n: int) -> list[str]:
    """n calls, their bodies read: what each ended with."""

    async def run() -> list[str]:
        out = []
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(n):
                try:
                    response = await client.get(url)
                    out.append(f"{response.status_code}:{len(response.content)}")
                except httpx.HTTPError as exc:
                    out.append(type(exc).__name__)
        return out

    return asyncio.run(run())


@pytest.mark.parametrize("path", ["/break", "/reset"])
def test_bodies_that_break_open_the_breaker(path: str) -> None:
    """Four calls whose bodies break, min_calls 4 at 0.5: the fifth is refused. Before,
    every one counted as a success and the breaker never opened."""
    with BreakingUpstream() as up:
        transport = FidelityTransport(policy=_policy(BREAKER), telemetry=False)
        got = _client_calls(transport, up.url + path, 6)
        error = "RemoteProtocolError" if path == "/break" else "ReadError"
        assert got == [error] * 4 + ["CircuitOpen"] * 2
        assert len(up.requests) == 4
        state = transport.engine.store.breakers[f"upstream:127.0.0.1:{up.port}"]
        assert state.state == OPEN


def test_bodies_that_break_open_the_breaker_sync() -> None:
    with BreakingUpstream() as up:
        transport = FidelitySyncTransport(policy=_policy(BREAKER), telemetry=False)
        got = []
        with httpx.Client(transport=transport) as client:
            for _ in range(6):
                try:
                    client.get(up.url + "/break")
                    got.append("ok")
                except httpx.HTTPError as exc:
                    got.append(type(exc).__name__)
        assert got == ["RemoteProtocolError"] * 4 + ["CircuitOpen"] * 2
        assert len(up.requests) == 4


def test_a_whole_body_records_nothing_more() -> None:
    with BreakingUpstream() as up:
        transport = FidelityTransport(policy=_policy(BREAKER), telemetry=False)
        assert _client_calls(transport, up.url + "/whole", 5) == ["200:1000"] * 5
        state = transport.engine.store.breakers[f"upstream:127.0.0.1:{up.port}"]
        assert state.totals(state._bucket_end - 1e-9) == (5, 0, 0)


def test_only_a_body_still_to_read_is_watched_as_the_stream_it_is() -> None:
    """An in-memory body (a MockTransport handler's `content=`) is handed back as it is;
    a network one is wrapped as the kind of stream it is, so a sync read of an async
    body still fails as httpx says it does."""

    def mocked(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"ok")

    with BreakingUpstream() as up:
        in_memory = FidelityTransport(
            httpx.MockTransport(mocked), policy=_policy(BREAKER), telemetry=False
        )
        streamed = FidelityTransport(policy=_policy(BREAKER), telemetry=False)
        blocking = FidelitySyncTransport(policy=_policy(BREAKER), telemetry=False)

        async def run() -> None:
            mock = await in_memory.handle_async_request(httpx.Request("GET", "http://h/"))
            assert type(mock.stream) is httpx.ByteStream
            real = await streamed.handle_async_request(httpx.Request("GET", up.url + "/whole"))
            assert type(real.stream) is body_module.WatchedAsyncStream
            with pytest.raises(RuntimeError, match="sync iterator on an async stream"):
                real.read()
            assert len(await real.aread()) == 1000
            await real.aclose()
            await streamed.aclose()

        asyncio.run(run())
        sync = blocking.handle_request(httpx.Request("GET", up.url + "/whole"))
        assert type(sync.stream) is body_module.WatchedSyncStream
        assert len(sync.read()) == 1000
        sync.close()
        blocking.close()


def test_the_decision_says_what_broke() -> None:
    with BreakingUpstream() as up:
        transport = FidelityTransport(policy=_policy(BREAKER), telemetry=False)

        async def run() -> Any:
            async with (
                httpx.AsyncClient(transport=transport) as client,
                client.stream("GET", up.url + "/break") as response,
            ):
                ctx = response.extensions["fidelity_context"]
                with pytest.raises(httpx.RemoteProtocolError):
                    await response.aread()
                return ctx

        ctx = asyncio.run(run())
        [decision] = _broken_decisions(ctx)
        assert (decision.layer, decision.verdict, decision.subject) == (
            "breaker",
            "fail",
            f"127.0.0.1:{up.port}",
        )
        assert decision.details == {"error": "RemoteProtocolError", "bytes": PART}


def test_a_caller_that_closes_early_or_is_cancelled_records_nothing() -> None:
    """Leaving `client.stream(...)` before the end, and cancelling a read, say nothing of
    the upstream: no failure, no decision (the calls count as the successes they were)."""
    with BreakingUpstream() as up:
        transport = FidelityTransport(policy=_policy(BREAKER), telemetry=False)
        contexts = []

        async def run() -> None:
            async with httpx.AsyncClient(transport=transport) as client:
                for _ in range(5):
                    async with client.stream("GET", up.url + "/slow") as response:
                        contexts.append(response.extensions["fidelity_context"])
                        async for _chunk in response.aiter_raw():
                            break  # enough

                async def reader(reading: asyncio.Event) -> None:
                    async with client.stream("GET", up.url + "/slow") as response:
                        contexts.append(response.extensions["fidelity_context"])
                        async for _chunk in response.aiter_raw():
                            reading.set()  # then it waits for the rest, which never comes

                for _ in range(5):
                    reading = asyncio.Event()
                    task = asyncio.create_task(reader(reading))
                    await reading.wait()
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task

        asyncio.run(run())
        state = transport.engine.store.breakers[f"upstream:127.0.0.1:{up.port}"]
        assert state.state == CLOSED
        assert state.totals(state._bucket_end - 1e-9) == (10, 0, 0)
        assert not [d for ctx in contexts for d in _broken_decisions(ctx)]


def test_a_body_that_fails_to_decode_records_nothing() -> None:
    """A body that arrives whole but does not decode (`DecodingError`, raised above the
    stream, by httpx's decoder): the upstream's connection did not break, the breaker
    keeps its successes."""
    with BreakingUpstream() as up:
        transport = FidelityTransport(policy=_policy(BREAKER), telemetry=False)
        assert _client_calls(transport, up.url + "/garbled", 5) == ["DecodingError"] * 5
        state = transport.engine.store.breakers[f"upstream:127.0.0.1:{up.port}"]
        assert state.totals(state._bucket_end - 1e-9) == (5, 0, 0)


def test_a_failing_record_never_reaches_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    """The store fails while the report is made: the caller sees the upstream's own
    error, nothing else, and the failure is logged."""
    with BreakingUpstream() as up:
        transport = FidelityTransport(policy=_policy(BREAKER), telemetry=False)
        store = transport.engine.store
        real = store.record_now

        def record_now(key: str, breaker: Any, gate: Any, outcome: str, *rest: Any) -> Any:
            if outcome == BROKEN:
                raise RuntimeError("the store is down")
            return real(key, breaker, gate, outcome, *rest)

        store.record_now = record_now  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING, logger="fidelity_mw"):
            got = _client_calls(transport, up.url + "/break", 3)
        assert got == ["RemoteProtocolError"] * 3
        assert "could not record a broken body" in caplog.text
        assert "the store is down" in caplog.text


def test_the_probe_that_closed_the_breaker_reopens_it_when_its_body_breaks() -> None:
    """Through the transport, on a fake clock: the breaker opens on broken bodies, its
    probe's head closes it, its body breaking re-opens it for twice the open time."""
    clock = FakeClock(start=T0)
    cfg = BreakerConfig(min_calls=2, failure_ratio=0.5, open_jitter=0.0, open_min_s=1.0, open_s=8.0)
    with BreakingUpstream() as up:
        transport = FidelityTransport(policy=_policy(cfg), clock=clock, telemetry=False)
        assert _client_calls(transport, up.url + "/break", 3) == [
            "RemoteProtocolError",
            "RemoteProtocolError",
            "CircuitOpen",
        ]
        clock.advance(open_time(cfg, 0))
        assert _client_calls(transport, up.url + "/break", 1) == ["RemoteProtocolError"]
        state = transport.engine.store.breakers[f"upstream:127.0.0.1:{up.port}"]
        assert state.state == OPEN
        assert state.open_until == clock.monotonic() + open_time(cfg, 1)
        assert len(up.requests) == 3


def test_an_instance_whose_bodies_break_loses_its_share() -> None:
    """A service of two instances, one breaking every body, four calls at a time (so the
    balancer spreads them): its breaker opens on the broken bodies and the balancer sends
    every later call to the other; every call's in-flight count is given back. Before,
    it kept its share to the end. The transport's clock is a FakeClock: no attempt takes
    any time on it, so the balancer picks by calls in flight alone (on the real clock a
    starved thread of the broken upstream answered its first two calls 100 ms late, and
    its latency kept every later call from it: two calls, short of `min_calls`)."""
    with BreakingUpstream(always="/break") as bad, BreakingUpstream(always="/whole") as good:
        policy = _policy(
            BreakerConfig(min_calls=3, failure_ratio=0.5, open_jitter=0.0, open_min_s=60.0),
            host="svc",
            instances=(bad.url, good.url),
            max_ejected_ratio=0.5,
        )
        transport = FidelityTransport(
            policy=policy, rng=random.Random(1).random, telemetry=False, clock=FakeClock()
        )
        seen = []

        async def run() -> list[str]:
            out: list[str] = []

            async def one(client: httpx.AsyncClient) -> None:
                try:
                    response = await client.get("http://svc/x")
                    out.append(f"{response.status_code}:{len(response.content)}")
                except httpx.HTTPError as exc:
                    out.append(type(exc).__name__)

            async with httpx.AsyncClient(transport=transport) as client:
                for _ in range(20):
                    await asyncio.gather(*(one(client) for _ in range(4)))
                    seen.append(len(bad.requests))
            return out

        got = asyncio.run(run())
        assert 3 <= seen[9] <= 8
        assert seen[-1] == seen[9]  # none after its breaker opened
        assert got.count("RemoteProtocolError") == seen[-1]
        assert got.count("200:1000") == 80 - seen[-1]
        up = transport._upstreams[("svc", None)]
        assert up.instances is not None
        assert [i.outstanding for i in up.instances] == [0, 0]
        assert transport.engine.store.breakers["upstream:" + bad.url[7:]].state == OPEN


# ---------------------------------------------------------------- Redis and tiered


def _redis_policy(url: str, breaker: BreakerConfig) -> Policy:
    return Policy(
        state=StateConfig(url=url, **PATIENT),
        upstreams=(UpstreamConfig(breaker=breaker, retry=NO_RETRY),),
        breaker=None,
    )


@pytest.mark.redis
@pytest.mark.parametrize("blocking", [False, True])
def test_on_redis_bodies_that_break_open_the_shared_breaker(redis_url: str, blocking: bool) -> None:
    with BreakingUpstream() as up:
        policy = _redis_policy(redis_url, BREAKER)
        got = []
        if blocking:
            sync = FidelitySyncTransport(policy=policy, telemetry=False)
            with httpx.Client(transport=sync) as client:
                for _ in range(6):
                    try:
                        client.get(up.url + "/break")
                    except httpx.HTTPError as exc:
                        got.append(type(exc).__name__)
                        if isinstance(exc, httpx.RemoteProtocolError):
                            body_module._background().submit(lambda: None).result()
            store = sync.engine.store
        else:
            transport = FidelityTransport(policy=policy, telemetry=False)

            async def run() -> None:
                async with httpx.AsyncClient(transport=transport) as client:
                    for _ in range(6):
                        try:
                            await client.get(up.url + "/break")
                        except httpx.HTTPError as exc:
                            got.append(type(exc).__name__)
                            while body_module._RECORDS:  # (the reports, sent meanwhile)
                                await asyncio.gather(*body_module._RECORDS)
                await transport.engine.store.aclose()

            asyncio.run(run())
            store = transport.engine.store
        assert got == ["RemoteProtocolError"] * 4 + ["CircuitOpen"] * 2
        assert len(up.requests) == 4
        client = redis_sync.Redis.from_url(redis_url)
        hkey, _ = store.breaker_keys(f"upstream:127.0.0.1:{up.port}")
        assert client.hget(hkey, "st") == b"open"
        client.close()


@pytest.mark.redis
def test_on_tiered_state_broken_bodies_reach_the_shared_breaker_with_the_sync(
    redis_url: str,
) -> None:
    """A tiered instance counts the broken bodies with its other outcomes, in order, and
    sends them with its next sync: the shared breaker opens, and the next call is refused."""
    with BreakingUpstream() as up:
        policy = _redis_policy("tiered+" + redis_url, BREAKER)
        transport = FidelityTransport(policy=policy, telemetry=False)
        store = transport.engine.store
        assert isinstance(store, TieredStore)
        got: list[str] = []

        async def call(client: httpx.AsyncClient) -> None:
            try:
                await client.get(up.url + "/break")
            except httpx.HTTPError as exc:
                got.append(type(exc).__name__)
            while body_module._RECORDS:  # (the reports, sent meanwhile)
                await asyncio.gather(*body_module._RECORDS)

        async def run() -> None:
            async with httpx.AsyncClient(transport=transport) as client:
                for _ in range(4):
                    await call(client)
                await store._sync_all(transport.engine.clock.monotonic())
                await call(client)
            await store.aclose()

        asyncio.run(run())
        assert got == ["RemoteProtocolError"] * 4 + ["CircuitOpen"]
        assert len(up.requests) == 4
        client = redis_sync.Redis.from_url(redis_url)
        hkey, _ = store.exact.breaker_keys(f"upstream:127.0.0.1:{up.port}")
        assert client.hget(hkey, "st") == b"open"
        client.close()


def _redis_breaker(client: redis_sync.Redis, store: RedisStore, key: str) -> tuple[Any, ...]:
    hkey, pkey = store.breaker_keys(key)
    st_, ep, ou, ro, co, er, w = client.hmget(hkey, "st", "ep", "ou", "ro", "co", "er", "w")
    return (
        (st_ or b"closed").decode(),
        int(ep or 0),
        float(ou or 0.0),
        int(ro or 0),
        int(co or 0),
        int(er.split()[0]) if er else 0,  # ("streak calls be": lib.lua)
        [int(n) for n in w.split(b",")] if w else [0] * 30,
        int(client.zcard(pkey)),
    )


def _memory_breaker(store: MemoryStore, key: str) -> tuple[Any, ...]:
    state = store.breakers.get(key)
    if state is None:
        return ("closed", 0, 0.0, 0, 0, 0, [0] * 30, 0)
    return (
        state.state,
        state.epoch,
        state.open_until,
        state.reopens,
        state.consecutive,
        state.erased,
        [n for bucket in state.buckets for n in bucket],
        len(state.probes),
    )


ROUTE = "route:/r"
DIFF_BREAKERS = (
    BreakerConfig(min_calls=3, failure_ratio=0.5, window_s=2.0, open_s=2.0, open_min_s=0.25,
                  open_jitter=0.0, half_open_probes=2, probe_lease_s=1.5),
    BreakerConfig(min_calls=20, window_s=1.0, open_s=1.0, open_min_s=0.5, open_jitter=0.2,
                  half_open_probes=1, probe_lease_s=0.75, consecutive_failures=3),
)  # fmt: skip


async def _differential(
    url: str, breaker: BreakerConfig, ops: list[tuple[Any, ...]], u: float
) -> None:
    """The same calls on memory and on Redis (pinned clock): after every step the breaker
    is the same (state, epoch, open-until, failed rounds, streak, the streak a success
    ended, every bucket of the window, probe slots)."""
    client = redis_sync.Redis.from_url(url)
    client.flushdb()
    now = T0
    client.set(CLOCK_KEY, repr(now))
    memory = MemoryStore(rng=lambda: u)
    red = RedisStore(config=StateConfig(url=url, **PATIENT), rng=lambda: u, clock=FakeClock())
    streaming: list[tuple[Any, Any]] = []  # calls recorded as successes, bodies unread
    try:
        for step in ops:
            kind = step[0]
            if kind == "advance":
                now += step[1]
                client.set(CLOCK_KEY, repr(now))
            elif kind == "call":
                m = await memory.admit(ROUTE, breaker, (), (), now)
                r = await red.admit(ROUTE, breaker, (), (), now)
                assert m.gate is not None
                assert r.gate is not None
                # (probe ids are the caller's own on Redis: whether each is a probe)
                assert (m.gate.verdict, m.gate.epoch, bool(m.gate.probe_id)) == (
                    r.gate.verdict,
                    r.gate.epoch,
                    bool(r.gate.probe_id),
                )
                if m.gate.verdict != "reject":
                    outcome = FAILURE if step[1] == "f" else SUCCESS
                    await memory.record(ROUTE, breaker, m.gate, outcome, False, now)
                    await red.record(ROUTE, breaker, r.gate, outcome, False, now)
                    if step[1] == "stream":
                        streaming.append((m.gate, r.gate))
            elif kind in ("break", "end") and streaming:
                mg, rg = streaming.pop(step[1] % len(streaming))
                if kind == "break":
                    await memory.record(ROUTE, breaker, mg, BROKEN, False, now)
                    await red.record(ROUTE, breaker, rg, BROKEN, False, now)
            await red._flush_deferred_now()
            mine = _memory_breaker(memory, ROUTE)
            theirs = _redis_breaker(client, red, ROUTE)
            assert mine[:2] == theirs[:2], (step, mine, theirs)
            assert math.isclose(mine[2], theirs[2], abs_tol=1e-6), (step, mine, theirs)
            assert mine[3:] == theirs[3:], (step, mine, theirs)
    finally:
        await red.aclose()
        client.close()


DIFF_CASES = [
    # every call's body breaks, one after the other: opens as failures would
    [("call", "stream"), ("break", 0)] * 4,
    # concurrent streams, some whole, some broken, across buckets, through an open period
    [("call", "stream"), ("call", "stream"), ("call", "s"), ("advance", 0.3), ("break", 1),
     ("call", "f"), ("call", "stream"), ("end", 0), ("break", 0), ("call", "stream"),
     ("advance", 2.5), ("break", 0), ("call", "stream"), ("call", "stream"), ("break", 0),
     ("break", 0), ("advance", 1.0), ("call", "stream"), ("break", 0), ("call", "s")],
    # a probe whose head closes the breaker, its body breaking after
    [("call", "f"), ("call", "f"), ("call", "f"), ("advance", 0.6), ("call", "stream"),
     ("break", 0), ("advance", 1.2), ("call", "stream"), ("call", "s"), ("break", 0),
     ("advance", 0.3), ("call", "stream"), ("end", 0)],
    # a body that outlives the window: counted as a failed call when it breaks
    [("call", "stream"), ("call", "s"), ("advance", 3.0), ("call", "s"), ("break", 0)],
]  # fmt: skip


@pytest.mark.redis
@pytest.mark.parametrize("index", range(len(DIFF_BREAKERS)))
@pytest.mark.parametrize("case", range(len(DIFF_CASES)))
def test_memory_and_redis_turn_broken_bodies_alike(
    redis_url: str, redis_clock: RedisClock, index: int, case: int
) -> None:
    asyncio.run(_differential(redis_url, DIFF_BREAKERS[index], DIFF_CASES[case], 0.5))


diff_op = st.one_of(
    st.tuples(st.just("call"), st.sampled_from(["s", "f", "stream", "stream"])),
    st.tuples(st.just("break"), st.integers(0, 5)),
    st.tuples(st.just("end"), st.integers(0, 5)),
    st.tuples(st.just("advance"), st.sampled_from([0.05, 0.2, 0.3, 0.6, 1.1, 2.5])),
)


@pytest.mark.redis
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    index=st.sampled_from(range(len(DIFF_BREAKERS))),
    u=st.sampled_from([0.1, 0.5, 0.9]),
    ops=st.lists(diff_op, min_size=5, max_size=30),
)
def test_memory_and_redis_turn_broken_bodies_alike_for_any_calls(
    redis_url: str, redis_clock: RedisClock, index: int, u: float, ops: list[tuple[Any, ...]]
) -> None:
    asyncio.run(_differential(redis_url, DIFF_BREAKERS[index], ops, u))


async def _tiered(url: str, breaker: BreakerConfig, kinds: str) -> None:
    """Calls counted by a tiered instance between two syncs (a success and its broken
    body counted in order, "b"), sent with the sync: Redis ends as the model does with
    the same outcomes recorded one by one at the sync's instant, a failure streak they
    complete opening only once it stood two sync intervals (`streak_stands`, fle41)."""
    client = redis_sync.Redis.from_url(url)
    client.flushdb()
    clock = FakeClock(start=T0)
    client.set(CLOCK_KEY, repr(T0))
    store = TieredStore(
        config=StateConfig(url="tiered+" + url, sync_interval_ms=60_000, **PATIENT),
        rng=_rng,
        clock=clock,
    )
    store._last_sync = math.inf
    memory = MemoryStore(rng=_rng)
    model = dataclasses.replace(breaker, consecutive_failures=None)
    try:
        pending = []
        for kind in kinds:
            result = await store.admit(ROUTE, breaker, (), (), T0)
            mine = await memory.admit(ROUTE, model, (), (), T0)
            assert result.gate is not None
            assert mine.gate is not None
            assert result.gate.verdict == mine.gate.verdict == "allow"
            outcome = FAILURE if kind == "f" else SUCCESS
            await store.record(ROUTE, breaker, result.gate, outcome, False, T0)
            pending.append((mine.gate, outcome))
            if kind == "b":
                await store.record(ROUTE, breaker, result.gate, BROKEN, False, T0)
                pending.append((mine.gate, BROKEN))
        for gate, outcome in pending:
            await memory.record(ROUTE, model, gate, outcome, False, T0)
        await store._sync_all(T0)
        state = memory.breakers[ROUTE]
        wait = tiered_module.STREAK_WAIT_SYNCS * 60.0
        if state.state == CLOSED:
            _since, opens = streak_stands(
                breaker.consecutive_failures, state.consecutive, 0.0, T0, wait
            )
            assert not opens  # (it stands from now: opens one wait later)
        mine_b = _memory_breaker(memory, ROUTE)
        theirs = _redis_breaker(client, store.exact, ROUTE)
        assert mine_b[:2] == theirs[:2], (kinds, mine_b, theirs)
        if mine_b[0] == CLOSED:
            assert mine_b[3:] == theirs[3:], (kinds, mine_b, theirs)
        else:
            assert math.isclose(mine_b[2], theirs[2], abs_tol=1e-6)
    finally:
        await store.aclose()
        client.close()


@pytest.mark.redis
@pytest.mark.parametrize(
    "kinds",
    ["bbbb", "sbsbbsb", "ssssbbb", "fbsbfs", "sssssssssssssssssssbb", "bbbbbbbbbbbbbbbbbbbbbb"],
)
@pytest.mark.parametrize("index", range(len(DIFF_BREAKERS)))
def test_tiered_sends_broken_bodies_in_order(
    redis_url: str, redis_clock: RedisClock, index: int, kinds: str
) -> None:
    asyncio.run(_tiered(redis_url, DIFF_BREAKERS[index], kinds))


@pytest.fixture(autouse=True)
def _no_reports_left() -> Iterator[None]:
    yield
    body_module._RECORDS.clear()


def test_inside_a_request_the_decision_is_the_requests_and_on_its_span() -> None:
    """An app reading an upstream's body that breaks: the decision lands in the request's
    record, so its server span's summary says what happened (and its event is there)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from fidelity_mw import FidelityMiddleware, current
    from fidelity_mw.telemetry import Telemetry

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry = Telemetry(tracer_provider=provider)
    with BreakingUpstream() as up:
        outbound = httpx.AsyncClient(transport=FidelityTransport(telemetry=False))

        async def relay(request: Request) -> PlainTextResponse:
            try:
                await outbound.get(up.url + "/break")
            except httpx.RemoteProtocolError:
                ctx = current()
                assert ctx is not None
                return PlainTextResponse(" ".join(d.reason for d in ctx.decisions), status_code=502)
            return PlainTextResponse("whole")

        app = Starlette(routes=[Route("/relay", relay)])
        app.add_middleware(FidelityMiddleware, policy=_policy(BREAKER), observer=telemetry)

        async def run() -> httpx.Response:
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                response = await client.get("/relay")
            await outbound.aclose()
            return response

        response = asyncio.run(run())
    assert response.status_code == 502
    assert response.text.split()[-1] == "failed_in_body"
    [span] = [s for s in exporter.get_finished_spans() if s.kind.name == "SERVER"]
    assert "breaker/fail/failed_in_body@memory" in str(span.attributes["fidelity.decisions"])
    events = [e.attributes for e in span.events if e.name == "fidelity.decision"]
    assert {"fidelity.reason": "failed_in_body"}.items() <= dict(events[-1] or {}).items()
