"""Review of the breaker model as merged: broken bodies (BROKEN, `erased`/`er`, `reopens`
kept through a close) together with Redis TIME stepping back (windows rotating again,
open-until capped, probe leases from now).

The differential runs the same mixed sequences (successes, failures, ignored calls,
bodies that break or end, probes, time going forward and back) on the memory store and
on a real redis-server with its TIME pinned (tests/redis_clock.py), and compares the
whole breaker after every step, the window's bucket end included.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis as redis_sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fidelity_mw.decide.breaker import BROKEN, FAILURE, IGNORED, SUCCESS
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock
from redis_clock import CLOCK_KEY, RedisClock

T0 = 1_000.0
ROUTE = "route:/r"
T = TypeVar("T")
OUTCOMES = {"s": SUCCESS, "f": FAILURE, "i": IGNORED, "stream": SUCCESS}

BREAKERS = (
    BreakerConfig(min_calls=3, failure_ratio=0.5, window_s=2.0, open_s=2.0, open_min_s=0.25,
                  open_jitter=0.0, half_open_probes=2, probe_lease_s=1.5),
    BreakerConfig(min_calls=20, window_s=1.0, open_s=1.0, open_min_s=0.5, open_jitter=0.2,
                  half_open_probes=1, probe_lease_s=0.75, consecutive_failures=3),
    BreakerConfig(min_calls=4, failure_ratio=0.5, window_s=10.0, open_s=4.0, open_min_s=0.5,
                  open_jitter=0.0, half_open_probes=1, probe_lease_s=1.0,
                  consecutive_failures=2),
)  # fmt: skip


def _redis_breaker(client: redis_sync.Redis, store: RedisStore, key: str) -> tuple[Any, ...]:
    hkey, pkey = store.breaker_keys(key)
    st_, ep, ou, ro, co, er, be, w, pc = client.hmget(
        hkey, "st", "ep", "ou", "ro", "co", "er", "be", "w", "pc"
    )
    return (
        (st_ or b"closed").decode(),
        int(ep or 0),
        float(ou or 0.0),
        float(be or 0.0),
        int(ro or 0),
        int(co or 0),
        int(er.split()[0]) if er else 0,  # ("streak calls be": lib.lua)
        [int(n) for n in w.split(b",")] if w else [0] * 30,
        int(client.zcard(pkey)),
        int(pc or 0),
    )


def _memory_breaker(store: MemoryStore, key: str) -> tuple[Any, ...]:
    state = store.breakers.get(key)
    if state is None:
        return ("closed", 0, 0.0, 0.0, 0, 0, 0, [0] * 30, 0, 0)
    return (
        state.state,
        state.epoch,
        state.open_until,
        state._bucket_end,
        state.reopens,
        state.consecutive,
        state.erased,
        [n for bucket in state.buckets for n in bucket],
        len(state.probes),
        state.closed_by,
    )


async def _differential(
    url: str, breaker: BreakerConfig, ops: list[tuple[Any, ...]], u: float
) -> None:
    client = redis_sync.Redis.from_url(url)
    client.flushdb()
    now = T0
    client.set(CLOCK_KEY, repr(now))
    memory = MemoryStore(rng=lambda: u)
    red = RedisStore(
        config=StateConfig(url=url, timeout_ms=5_000, connect_timeout_ms=5_000),
        rng=lambda: u,
        clock=FakeClock(),
    )
    streaming: list[tuple[Any, Any]] = []  # calls recorded as successes, bodies unread
    # Redis's probe ids are the caller's own (a random number per gate), memory's its
    # counter: each Redis id by the memory id of the same gate, to compare `pc`
    same_probe: dict[int, int] = {0: 0}
    try:
        for step in ops:
            kind = step[0]
            if kind == "advance":  # negative: Redis TIME went back (a failover)
                now += step[1]
                client.set(CLOCK_KEY, repr(now))
            elif kind in ("call", "pair"):  # a pair: both admitted before either ends
                gates = []
                for _ in step[1:]:
                    m = await memory.admit(ROUTE, breaker, (), (), now)
                    r = await red.admit(ROUTE, breaker, (), (), now)
                    assert m.gate is not None
                    assert r.gate is not None
                    assert (m.gate.verdict, m.gate.epoch, bool(m.gate.probe_id)) == (
                        r.gate.verdict,
                        r.gate.epoch,
                        bool(r.gate.probe_id),
                    ), step
                    same_probe[int(r.gate.probe_id)] = m.gate.probe_id
                    gates.append((m.gate, r.gate))
                for how, (mg, rg) in zip(step[1:], gates, strict=True):
                    if mg.verdict != "reject":
                        outcome = OUTCOMES[how]
                        await memory.record(ROUTE, breaker, mg, outcome, False, now)
                        await red.record(ROUTE, breaker, rg, outcome, False, now)
                        if how == "stream":
                            streaming.append((mg, rg))
            elif kind in ("break", "end") and streaming:
                mg, rg = streaming.pop(step[1] % len(streaming))
                if kind == "break":
                    await memory.record(ROUTE, breaker, mg, BROKEN, False, now)
                    await red.record(ROUTE, breaker, rg, BROKEN, False, now)
            await red._flush_deferred_now()
            mine = _memory_breaker(memory, ROUTE)
            theirs = _redis_breaker(client, red, ROUTE)
            theirs = (*theirs[:9], same_probe.get(theirs[9], -1))
            assert mine[:2] == theirs[:2], (step, mine, theirs)
            assert math.isclose(mine[2], theirs[2], abs_tol=1e-6), (step, mine, theirs)
            assert math.isclose(mine[3], theirs[3], abs_tol=1e-6), (step, mine, theirs)
            if mine[0] != "closed":
                # (an open breaker's window and `er` are never read again: a close clears
                # them. Redis's deferred successes, sent together, add all of them to the
                # window where the model ignored those after the one that opened it.)
                mine, theirs = mine[:6] + mine[8:], theirs[:6] + theirs[8:]
            assert mine[4:] == theirs[4:], (step, mine, theirs)
    finally:
        await red.aclose()
        client.close()


async def _on_both_stores(
    redis_url: str, run: Callable[[Any, redis_sync.Redis | None], Awaitable[T]]
) -> list[T]:
    """`run` on a memory store, then on a Redis store (with its inspection client), each
    starting at T0."""
    client = redis_sync.Redis.from_url(redis_url)
    client.flushdb()
    client.set(CLOCK_KEY, repr(T0))
    red = RedisStore(
        config=StateConfig(url=redis_url, timeout_ms=5_000, connect_timeout_ms=5_000),
        rng=lambda: 0.5,
        clock=FakeClock(),
    )
    try:
        return [await run(MemoryStore(rng=lambda: 0.5), None), await run(red, client)]
    finally:
        await red.aclose()
        client.close()


KINDS = st.sampled_from(["s", "f", "i", "stream", "stream"])
diff_op = st.one_of(
    st.tuples(st.just("call"), KINDS),
    st.tuples(st.just("pair"), KINDS, KINDS),
    st.tuples(st.just("break"), st.integers(0, 5)),
    st.tuples(st.just("end"), st.integers(0, 5)),
    st.tuples(
        st.just("advance"),
        st.sampled_from([0.05, 0.2, 0.3, 0.6, 1.1, 2.5, 6.0, -0.5, -3.0, -30.0]),
    ),
)


@pytest.mark.redis
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    index=st.sampled_from(range(len(BREAKERS))),
    u=st.sampled_from([0.1, 0.5, 0.9]),
    ops=st.lists(diff_op, min_size=5, max_size=40),
)
def test_memory_and_redis_agree_with_broken_bodies_and_time_steps(
    redis_url: str, redis_clock: RedisClock, index: int, u: float, ops: list[tuple[Any, ...]]
) -> None:
    asyncio.run(_differential(redis_url, BREAKERS[index], ops, u))


CASES = [
    # a break reported first after TIME went back, its streak opening the breaker
    # (the window's buckets then turned at other instants: a failure nine buckets on
    # opened one breaker, not the other)
    [("call", "f"), ("call", "stream"), ("advance", -30.0), ("break", 0), ("advance", 0.6),
     ("call", "s"), ("call", "f"), ("call", "s"), ("call", "s"), ("advance", 9.95),
     ("call", "f")],
]  # fmt: skip


@pytest.mark.redis
@pytest.mark.parametrize("case", range(len(CASES)))
def test_memory_and_redis_agree_on_these_sequences(
    redis_url: str, redis_clock: RedisClock, case: int
) -> None:
    asyncio.run(_differential(redis_url, BREAKERS[2], CASES[case], 0.5))


def _old_record(client: redis_sync.Redis, hkey: str, failed: bool) -> None:
    """What a process of the version before `er` writes when it records a plain outcome
    in the current bucket (its br_save: `co`, `be`, `w`; it knows no `er`)."""
    co, w = client.hmget(hkey, "co", "w")
    window = [int(n) for n in w.split(b",")]
    window[27] += 1
    window[28] += 1 if failed else 0
    client.hset(
        hkey,
        mapping={"co": int(co) + 1 if failed else 0, "w": ",".join(map(str, window))},
    )


@pytest.mark.redis
def test_a_streak_an_old_process_ended_is_not_carried_on_by_a_broken_body(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """Upgrade mid-fleet: a process of the version before broken bodies records a failure
    and then a success on the same breaker hash. Its success ends the streak; the `er` a
    new process wrote before (3 failures) must not come back when a body breaks: 3 + 1
    would reach consecutive_failures = 4 where the calls were F,F,F,S,F,S then a break
    (the memory store: a streak of 2, closed)."""
    breaker = BreakerConfig(min_calls=100, window_s=10.0, open_s=1.0, consecutive_failures=4)

    async def run() -> tuple[str, str]:
        client = redis_sync.Redis.from_url(redis_url)
        client.flushdb()
        client.set(CLOCK_KEY, repr(T0))
        memory = MemoryStore(rng=lambda: 0.5)
        red = RedisStore(
            config=StateConfig(url=redis_url, timeout_ms=5_000, connect_timeout_ms=5_000),
            rng=lambda: 0.5,
            clock=FakeClock(),
        )
        hkey, _ = red.breaker_keys(ROUTE)
        try:
            for store in (memory, red):
                for outcome in (FAILURE, FAILURE, FAILURE, SUCCESS):
                    gate = (await store.admit(ROUTE, breaker, (), (), T0)).gate
                    assert gate is not None
                    await store.record(ROUTE, breaker, gate, outcome, False, T0)
                    streaming = gate
                await red._flush_deferred_now()
                if store is red:
                    _old_record(client, hkey, failed=True)
                    _old_record(client, hkey, failed=False)
                else:
                    for outcome in (FAILURE, SUCCESS):
                        gate = (await store.admit(ROUTE, breaker, (), (), T0)).gate
                        assert gate is not None
                        await store.record(ROUTE, breaker, gate, outcome, False, T0)
                await store.record(ROUTE, breaker, streaming, BROKEN, False, T0)
            await red._flush_deferred_now()
            return memory.breakers[ROUTE].state, (client.hget(hkey, "st") or b"closed").decode()
        finally:
            await red.aclose()
            client.close()

    assert asyncio.run(run()) == ("closed", "closed")


@pytest.mark.redis
@pytest.mark.parametrize("late", [FAILURE, BROKEN])
def test_a_probe_whose_success_did_not_close_the_breaker_does_not_reopen_it(
    redis_url: str, redis_clock: RedisClock, late: str
) -> None:
    """Two probes of one half-open round: A's success closes the breaker; B's success
    comes after (its slot went with the close: not counted). B failing outright then
    changes nothing; B's body breaking must weigh the same, not re-open the breaker for
    a doubled open time as if B's success had closed it (decide/breaker.py's `_broken`
    says so; it re-opened whenever the epoch was the one after the probe's)."""
    breaker = BREAKERS[0]  # half_open_probes = 2

    async def run(store: Any, client: redis_sync.Redis | None) -> tuple[str, int]:
        now = T0
        for _ in range(3):
            gate = (await store.admit(ROUTE, breaker, (), (), now)).gate
            await store.record(ROUTE, breaker, gate, FAILURE, False, now)
        now += 1.0
        if client is not None:
            client.set(CLOCK_KEY, repr(now))
        a = (await store.admit(ROUTE, breaker, (), (), now)).gate
        b = (await store.admit(ROUTE, breaker, (), (), now)).gate
        assert (a.verdict, b.verdict) == ("probe", "probe")
        await store.record(ROUTE, breaker, a, SUCCESS, False, now)
        if late == BROKEN:
            await store.record(ROUTE, breaker, b, SUCCESS, False, now)
        state = await store.record(ROUTE, breaker, b, late, False, now)
        gate = (await store.admit(ROUTE, breaker, (), (), now)).gate
        return state, gate.epoch

    # closed in the epoch A's success began (open 1, half-open 2, closed 3)
    assert asyncio.run(_on_both_stores(redis_url, run)) == [("closed", 3), ("closed", 3)]


# ---------------------------------------------------------------- the body watcher


def _pol() -> Any:
    from fidelity_mw import Policy
    from fidelity_mw.policy import RetryConfig, UpstreamConfig

    breaker = BreakerConfig(min_calls=1, failure_ratio=0.5)
    return Policy(
        upstreams=(UpstreamConfig(breaker=breaker, retry=RetryConfig(attempts=1)),),
        breaker=None,
    )


def test_a_body_cut_by_closing_the_client_is_not_the_upstreams_break() -> None:
    """The caller closes its client (an app shutting down) while a body is still being
    read: the connection pool drops the connection and the read fails with ReadError.
    That is our doing, not the upstream's: no BROKEN report (it opened the breaker at
    min_calls 1, and on Redis every instance shutting down mid-stream would have counted
    failures on the fleet's shared breakers), no failed_in_body decision."""
    import httpx

    from fidelity_mw import FidelityTransport

    async def run() -> tuple[str, tuple[int, int, int], str, list[str]]:
        hold = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
            await writer.drain()
            await hold.wait()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = FidelityTransport(policy=_pol(), telemetry=False)
        client = httpx.AsyncClient(transport=transport)
        error = ""
        try:
            async with client.stream("GET", f"http://127.0.0.1:{port}/") as response:
                chunks = response.aiter_raw()
                await chunks.__anext__()
                await client.aclose()
                try:
                    async for _ in chunks:
                        pass
                except httpx.HTTPError as exc:
                    error = type(exc).__name__
            ctx = response.extensions["fidelity_context"]
        finally:
            hold.set()
            server.close()
        state = transport.engine.store.breakers[f"upstream:127.0.0.1:{port}"]
        reasons = [d.reason for d in ctx.decisions]
        return state.state, state.totals(transport.engine.clock.monotonic()), error, reasons

    state, totals, error, reasons = asyncio.run(run())
    assert error == "ReadError"  # (what the caller sees is unchanged)
    assert (state, totals) == ("closed", (1, 0, 0))
    assert "failed_in_body" not in reasons


def test_a_body_cut_by_closing_the_client_is_not_the_upstreams_break_sync() -> None:
    """The same with the blocking transport: httpx.Client closed while a body is read."""
    import socket
    import threading

    import httpx

    from fidelity_mw import FidelitySyncTransport

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    done = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
            done.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    transport = FidelitySyncTransport(policy=_pol(), telemetry=False)
    client = httpx.Client(transport=transport)
    error = ""
    try:
        with client.stream("GET", f"http://127.0.0.1:{port}/") as response:
            chunks = response.iter_raw()
            next(chunks)
            client.close()
            try:
                for _ in chunks:
                    pass
            except httpx.HTTPError as exc:
                error = type(exc).__name__
    finally:
        done.set()
        thread.join(5)
        listener.close()
    state = transport.engine.store.breakers[f"upstream:127.0.0.1:{port}"]
    assert error == "ReadError"
    assert (state.state, state.totals(transport.engine.clock.monotonic())) == ("closed", (1, 0, 0))


@pytest.mark.redis
def test_the_probe_that_closed_the_breaker_reopens_it_on_both_stores(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """The closing probe's body breaking re-opens the breaker on Redis too: Redis keeps
    `pc` as the caller's own probe id, a string (read back as a number it never equalled
    the id a record sends, and Redis stayed closed where memory re-opened)."""
    breaker = BREAKERS[0]

    async def run(store: Any, client: redis_sync.Redis | None) -> str:
        now = T0
        for _ in range(3):
            gate = (await store.admit(ROUTE, breaker, (), (), now)).gate
            await store.record(ROUTE, breaker, gate, FAILURE, False, now)
        now += 1.0
        if client is not None:
            client.set(CLOCK_KEY, repr(now))
        a = (await store.admit(ROUTE, breaker, (), (), now)).gate
        assert a.verdict == "probe"
        assert await store.record(ROUTE, breaker, a, SUCCESS, False, now) == "closed"
        state: str = await store.record(ROUTE, breaker, a, BROKEN, False, now)
        return state

    assert asyncio.run(_on_both_stores(redis_url, run)) == ["open", "open"]
