"""Coalescing on a real redis-server: one tick's admissions and records in one EVALSHA,
each decided exactly as it would be alone (the memory store is the reference)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from _asgi import http_scope
from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.decide.breaker import FAILURE
from fidelity_mw.errors import StateUnavailable
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import BATCH, RedisStore
from fidelity_mw.testing import seeded_random
from redis_server import PATIENT, QUIET

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


def spec(per_min: float, burst: int, cost: int = 1, shadow: bool = False, name: str = "l"):
    interval = 60.0 / per_min  # slow enough that real time cannot refill during a test
    return LimitSpec(name, interval, burst * interval, cost, shadow)


def store(url: str, **state: object) -> RedisStore:
    # generous timeouts: a loaded machine must not turn a slow reply into a fallback
    config = StateConfig(url=url, **{**PATIENT, **QUIET, **state})  # type: ignore[arg-type]
    return RedisStore(config=config, rng=seeded_random(7))


def flat(result):  # type: ignore[no-untyped-def]
    gate = (result.gate.verdict, result.gate.state) if result.gate is not None else None
    limits = tuple((v.allowed, v.remaining) for v in result.limits)
    return gate, limits, result.admitted


def script_calls(redis_server) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with redis_server.client() as client:
        stats = client.info("commandstats")
    return {name[len("cmdstat_") :]: value["calls"] for name, value in stats.items()}


def reset_stats(redis_server) -> None:  # type: ignore[no-untyped-def]
    with redis_server.client() as client:
        client.config_resetstat()


A = spec(1, 3, name="a")
B = spec(1, 5, name="b")
C2 = spec(1, 5, cost=2, name="c")
SHADOW = spec(1, 1, shadow=True, name="s")
# (breaker key, limit keys, limits): clients sharing and not sharing buckets, costs,
# shadow limits, a limit that runs out first (the other must not be charged)
REQUESTS = [
    ("route:/x", ["a|k1", "b|k1"], [A, B]),
    ("route:/x", ["a|k1", "b|k1"], [A, B]),
    (None, ["b|k1"], [B]),
    ("route:/y", ["a|k1", "b|k1"], [A, B]),
    ("route:/x", ["a|k1", "b|k1"], [A, B]),  # a is empty: rejected, b untouched
    (None, ["b|k1"], [B]),
    ("route:/x", ["c|k2"], [C2]),
    ("route:/x", ["c|k2"], [C2]),
    ("route:/y", ["c|k2"], [C2]),
    (None, ["s|k3", "b|k3"], [SHADOW, B]),
    (None, ["s|k3", "b|k3"], [SHADOW, B]),  # shadow would reject: recorded, not enforced
    ("route:/z", [], []),
] * 2


async def test_one_tick_of_admissions_is_one_evalsha_with_sequential_verdicts(
    redis_url: str,
    redis_server,  # type: ignore[no-untyped-def]
) -> None:
    redis_store = store(redis_url, sync_interval_ms=60_000)
    memory = MemoryStore(rng=seeded_random(7))
    breaker = BreakerConfig()
    with redis_server.client() as client:
        client.script_load(BATCH.source)  # so the count below is EVALSHA alone
    reset_stats(redis_server)
    try:
        got = await asyncio.gather(
            *(
                redis_store.admit(bkey, breaker if bkey else None, keys, limits, 0.0)
                for bkey, keys, limits in REQUESTS
            )
        )
        calls = script_calls(redis_server)
    finally:
        await redis_store.aclose()
    want = [
        memory.admit_now(bkey, breaker if bkey else None, keys, limits, 0.0)
        for bkey, keys, limits in REQUESTS
    ]
    assert [flat(r) for r in got] == [flat(r) for r in want]
    assert sum(r.admitted for r in got) < len(REQUESTS)  # some were refused: a real test
    assert calls.get("evalsha") == 1
    assert "eval" not in calls
    assert all(r.source == "redis" and r.age_s >= 0.0 for r in got)
    assert len({id(r) for r in got}) == len(REQUESTS)  # each its own decision
    assert redis_store.stats.round_trips == 1
    assert redis_store.coalescer.batches == 1


async def test_batched_verdicts_equal_one_call_each(redis_url: str) -> None:
    """The same requests, concurrent and coalesced vs one script call each, in order."""
    batched = store(redis_url, key_prefix="batched")
    single = store(redis_url, key_prefix="single")
    single.coalesce = False
    breaker = BreakerConfig()
    try:
        together = await asyncio.gather(
            *(batched.admit(b, breaker if b else None, k, s, 0.0) for b, k, s in REQUESTS)
        )
        apart = [await single.admit(b, breaker if b else None, k, s, 0.0) for b, k, s in REQUESTS]
    finally:
        await batched.aclose()
        await single.aclose()
    assert [flat(r) for r in together] == [flat(r) for r in apart]
    assert batched.stats.round_trips == 1 + batched.stats.script_loads
    assert single.stats.round_trips == len(REQUESTS) + single.stats.script_loads


async def test_records_coalesce_and_open_the_breaker_like_sequential_records(
    redis_url: str,
    redis_server,  # type: ignore[no-untyped-def]
) -> None:
    cfg = BreakerConfig(min_calls=3, consecutive_failures=3, open_s=30.0)
    redis_store = store(redis_url)
    memory = MemoryStore(rng=seeded_random(7))
    try:
        gates = await asyncio.gather(
            *(redis_store.admit("route:/f", cfg, (), (), 0.0) for _ in range(3))
        )
        local = [memory.admit_now("route:/f", cfg, (), (), 0.0) for _ in range(3)]
        reset_stats(redis_server)
        states = await asyncio.gather(
            *(redis_store.record("route:/f", cfg, g.gate, FAILURE, False, 0.0) for g in gates)  # type: ignore[arg-type]
        )
        record_calls = script_calls(redis_server).get("evalsha", 0) + script_calls(
            redis_server
        ).get("eval", 0)
        want = [memory.record_now("route:/f", cfg, g.gate, FAILURE, False, 0.0) for g in local]  # type: ignore[arg-type]
        assert states == want == ["closed", "closed", "open"]
        assert record_calls == 1
        shed = await asyncio.gather(
            *(redis_store.admit("route:/f", cfg, (), (), 0.0) for _ in range(4))
        )
        assert {(r.gate.verdict, r.gate.state) for r in shed} == {("reject", "open")}  # type: ignore[union-attr]
    finally:
        await redis_store.aclose()


async def test_half_open_probes_in_one_batch(redis_url: str) -> None:
    """Probe slots are taken in arrival order inside the batch; a probe whose request a
    limit refuses gives its slot back to the next request in the same batch."""
    cfg = BreakerConfig(min_calls=1, consecutive_failures=1, open_s=0.05, open_jitter=0.0,
                        half_open_probes=2, probe_lease_s=60.0)  # fmt: skip
    redis_store = store(redis_url)
    memory = MemoryStore(rng=seeded_random(7))
    empty = spec(1, 1, name="e")
    try:
        # open both breakers, and empty the limit "e|x"
        gate = (await redis_store.admit("route:/h", cfg, ["e|x"], [empty], 0.0)).gate
        await redis_store.record("route:/h", cfg, gate, FAILURE, False, 0.0)  # type: ignore[arg-type]
        local = memory.admit_now("route:/h", cfg, ["e|x"], [empty], 0.0).gate
        memory.record_now("route:/h", cfg, local, FAILURE, False, 0.0)  # type: ignore[arg-type]
        await anyio.sleep(0.08)  # Redis decides on its own clock: wait out open_s for real
        asks = [["e|x"], [], [], [], []]
        got = await asyncio.gather(
            *(redis_store.admit("route:/h", cfg, keys, [empty] * len(keys), 0.0) for keys in asks)
        )
        want = [memory.admit_now("route:/h", cfg, k, [empty] * len(k), 1.0) for k in asks]
    finally:
        await redis_store.aclose()
    assert [flat(r) for r in got] == [flat(r) for r in want]
    assert [r.gate.verdict for r in got] == ["probe", "probe", "probe", "reject", "reject"]  # type: ignore[union-attr]
    assert [r.admitted for r in got] == [False, True, True, False, False]
    assert (
        redis_store.stats.round_trips - redis_store.stats.script_loads == 3
    )  # admit, record, batch


async def test_keys_of_one_batch_share_one_cluster_slot(redis_cluster) -> None:  # type: ignore[no-untyped-def]
    prefix = "batch1"
    redis_store = RedisStore(
        config=StateConfig(url=redis_cluster.url, key_prefix=prefix, **PATIENT, **QUIET),
        rng=seeded_random(1),
    )
    try:
        got = await asyncio.gather(
            *(
                redis_store.admit(
                    f"route:/r{i}",
                    BreakerConfig(),
                    [f"a|c{i}", "g|*"],
                    [A, spec(1, 100, name="g")],
                    0.0,
                )
                for i in range(10)
            )
        )
        states = await asyncio.gather(
            *(
                redis_store.record(f"route:/r{i}", BreakerConfig(), r.gate, FAILURE, False, 0.0)  # type: ignore[arg-type]
                for i, r in enumerate(got)
            )
        )
    finally:
        await redis_store.aclose()
    assert [r.admitted for r in got] == [True] * 10
    assert {r.source for r in got} == {"redis"}
    assert states == ["closed"] * 10
    assert redis_store.coalescer.batches == 2
    names = {k.decode() for node in redis_cluster.nodes for k in node.client().keys("{batch1}*")}
    assert len(names) == 10 + 1 + 10  # a per client, g, breakers
    assert {key_slot(k.encode()) for k in names} == {key_slot(b"{batch1}")}


async def test_noscript_recovery_for_a_batch(redis_url: str, redis_server) -> None:  # type: ignore[no-untyped-def]
    redis_store = store(redis_url)
    limit = spec(1, 10)
    try:
        first = await asyncio.gather(
            *(redis_store.admit(None, None, ["l|n"], [limit], 0.0) for _ in range(3))
        )
        with redis_server.client() as client:
            client.script_flush()
        reset_stats(redis_server)
        again = await asyncio.gather(
            *(redis_store.admit(None, None, ["l|n"], [limit], 0.0) for _ in range(3))
        )
        calls = script_calls(redis_server)
    finally:
        await redis_store.aclose()
    assert [r.limits[0].remaining for r in first + again] == [9, 8, 7, 6, 5, 4]
    assert calls.get("evalsha") == 1  # NOSCRIPT ...
    assert calls.get("eval") == 1  # ... then EVAL once
    assert {r.source for r in again} == {"redis"}
    assert redis_store.stats.fallbacks == 0


@pytest.mark.parametrize("on_error", ["local", "open", "closed"])
async def test_a_failed_batch_degrades_every_request_in_it(own_redis, on_error: str) -> None:  # type: ignore[no-untyped-def]
    # a killed server refuses at once: generous timeouts only keep a loaded machine's
    # slow warm-up from counting as a failure
    config = StateConfig(
        url=own_redis.url, timeout_ms=5000, connect_timeout_ms=5000, on_error=on_error
    )  # type: ignore[arg-type]
    redis_store = RedisStore(config=config, rng=seeded_random(3))
    limit = spec(1, 3)
    n = 6
    try:
        warm = await redis_store.admit(None, None, ["l|w"], [limit], time.monotonic())
        assert warm.source == "redis"
        trips = redis_store.stats.round_trips
        own_redis.kill()
        got = await asyncio.gather(
            *(redis_store.admit("route:/d", BreakerConfig(), ["l|d"], [limit], time.monotonic())
              for _ in range(n)),
            return_exceptions=True,
        )  # fmt: skip
        stats = redis_store.stats
        assert redis_store.coalescer.batches == 1
        assert stats.errors == 1  # one call failed, and it was not retried
        assert stats.round_trips == trips
        assert stats.fallbacks == n  # each request is its own fallback decision
    finally:
        await redis_store.aclose()
    if on_error == "closed":
        assert all(isinstance(r, StateUnavailable) for r in got)
        return
    assert all(not isinstance(r, BaseException) and r.source == "fallback" for r in got)
    admitted = [r.admitted for r in got]  # type: ignore[union-attr]
    if on_error == "open":
        assert admitted == [True] * n
    else:  # decided on the local store, in arrival order
        assert admitted == [True, True, True, False, False, False]


_examples = itertools.count()
LIMITS = {"a": A, "b": B, "c": C2, "s": SHADOW}
request_lists = st.lists(
    st.tuples(
        st.sampled_from([None, "route:/p", "route:/q"]),
        st.lists(
            st.tuples(st.sampled_from("abcs"), st.sampled_from(["k1", "k2"])),
            max_size=3,
            unique=True,
        ),
    ),
    min_size=2,
    max_size=24,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(requests=request_lists)
async def test_any_tick_of_admissions_decides_like_the_memory_store(
    redis_url: str, requests
) -> None:  # type: ignore[no-untyped-def]
    """Generated ticks: whatever mix of routes, limits and clients arrives together,
    one call decides it and every verdict equals the memory store's, in order."""
    prefix = f"h{next(_examples)}"  # a fresh bucket set per example
    redis_store = store(redis_url, key_prefix=prefix)
    memory = MemoryStore(rng=seeded_random(7))
    breaker = BreakerConfig()
    plan = [
        (
            bkey,
            [f"{name}|{client}" for name, client in limits],
            [LIMITS[name] for name, _ in limits],
        )
        for bkey, limits in requests
    ]
    try:
        got = await asyncio.gather(
            *(redis_store.admit(b, breaker if b else None, k, s, 0.0) for b, k, s in plan)
        )
    finally:
        await redis_store.aclose()
    want = [memory.admit_now(b, breaker if b else None, k, s, 0.0) for b, k, s in plan]
    assert [flat(r) for r in got] == [flat(r) for r in want]
    assert redis_store.stats.round_trips - redis_store.stats.script_loads == 1


async def test_each_event_loop_coalesces_its_own_ticks(redis_url: str) -> None:
    """A worker thread's loop (a sync transport's) using the store first does not
    stop the main loop from coalescing, and each loop's batch stays on its loop."""
    redis_store = store(redis_url)
    limit = spec(1, 100)

    async def tick() -> list[bool]:
        got = await asyncio.gather(
            *(redis_store.admit(None, None, ["l|t"], [limit], 0.0) for _ in range(4))
        )
        return [r.admitted for r in got]

    other = asyncio.new_event_loop()  # stays open, as a worker thread's loop would
    try:
        in_thread = await anyio.to_thread.run_sync(other.run_until_complete, tick())
        assert redis_store.coalescer.batches == 1
        assert await tick() == in_thread == [True] * 4
        assert redis_store.coalescer.batches == 2
    finally:
        await anyio.to_thread.run_sync(other.run_until_complete, redis_store.aclose_loop())
        other.close()
        await redis_store.aclose()


# ---------------------------------------------------------------- through the middleware


def _middleware(url: str, on_error: str = "local") -> FidelityMiddleware:
    async def inner(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    policy = Policy(
        state=StateConfig(
            url=url,
            on_error=on_error,  # type: ignore[arg-type]
            timeout_ms=5000,
            connect_timeout_ms=5000,
            **QUIET,
        ),
        rate_limits=(RateLimit(name="api", rate="3/minute", key="client_ip"),),
    )
    return FidelityMiddleware(inner, policy=policy, telemetry=False)


async def _requests(app: FidelityMiddleware, n: int) -> list[tuple[int, list[str]]]:
    """`n` requests in one tick, straight through ASGI: (status, decision sources) each."""

    async def one() -> tuple[int, list[str]]:
        scope = http_scope(
            headers=[(b"host", b"t")], client=("10.0.0.1", 1234), server=("t", 80), state={}
        )
        statuses: list[int] = []

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message) -> None:  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(scope, receive, send)
        ctx = scope["state"]["fidelity"]
        return statuses[0], [d.state_source for d in ctx.decisions if d.layer != "deadline"]

    return await asyncio.gather(*(one() for _ in range(n)))


async def test_middleware_requests_of_one_tick_share_a_call_each_with_its_decision(
    redis_url: str,
    redis_server,  # type: ignore[no-untyped-def]
) -> None:
    app = _middleware(redis_url)
    with redis_server.client() as client:
        client.script_load(BATCH.source)
        client.config_resetstat()
    try:
        got = await _requests(app, 5)
        # (before aclose, which sends the served requests' deferred successes)
        calls = script_calls(redis_server)
    finally:
        await app.engine.aclose()
    assert [status for status, _ in got] == [200, 200, 200, 429, 429]
    assert all(sources and set(sources) == {"redis"} for _, sources in got)
    assert calls.get("evalsha") == 1


@pytest.mark.parametrize(("on_error", "statuses"), [
    ("local", [200, 200, 200, 429, 429]), ("open", [200] * 5), ("closed", [503] * 5),
])  # fmt: skip
async def test_middleware_batch_on_a_killed_redis_falls_back_per_request(
    own_redis,  # type: ignore[no-untyped-def]
    on_error: str,
    statuses: list[int],
) -> None:
    app = _middleware(own_redis.url, on_error)
    own_redis.kill()
    try:
        got = await _requests(app, 5)
    finally:
        await app.engine.aclose()
    assert [status for status, _ in got] == statuses
    assert all(sources and set(sources) == {"fallback"} for _, sources in got)


async def test_a_busy_tick_sends_every_batch_in_the_next_tick(redis_url: str) -> None:
    """150 admissions in one tick: three batch calls (64 + 64 + 22), each started in the
    tick right after the one that queued them, not a tick later through a splitting task."""
    redis_store = store(redis_url, sync_interval_ms=60_000)
    loop = asyncio.get_running_loop()
    ticks = [0]

    def tick() -> None:  # runs once per event-loop iteration
        ticks[0] += 1
        if ticks[0] < 10_000:
            loop.call_soon(tick)

    queued: list[int] = []
    started: list[int] = []
    send = redis_store.coalescer._call

    async def counted(script, keys, args):  # type: ignore[no-untyped-def]
        started.append(ticks[0])
        return await send(script, keys, args)

    async def admit(i: int):  # type: ignore[no-untyped-def]
        queued.append(ticks[0])
        return await redis_store.admit(None, None, [f"a|c{i}"], [A], 0.0)

    redis_store.coalescer._call = counted
    loop.call_soon(tick)
    try:
        got = await asyncio.gather(*(admit(i) for i in range(150)))
    finally:
        ticks[0] = 10_000
        await redis_store.aclose()
    assert [r.admitted for r in got] == [True] * 150
    assert {r.source for r in got} == {"redis"}
    assert redis_store.coalescer.batches == 3
    assert redis_store.coalescer.coalesced == 150
    assert len(set(queued)) == 1  # one tick queued them all
    assert started == [queued[0] + 1] * 3


async def test_a_batch_sends_each_key_once(redis_url: str) -> None:
    """50 requests on one route breaker and one hot limit key: the batch call carries
    the 3 keys once (the client's cost is per argument), and decides as before."""
    redis_store = store(redis_url, sync_interval_ms=60_000)
    memory = MemoryStore(rng=seeded_random(7))
    sent: list[int] = []
    send = redis_store.coalescer._call

    async def counted(script, keys, args):  # type: ignore[no-untyped-def]
        sent.append(len(keys))
        return await send(script, keys, args)

    redis_store.coalescer._call = counted
    breaker = BreakerConfig()
    try:
        got = await asyncio.gather(
            *(redis_store.admit("route:/h", breaker, ["a|hot"], [A], 0.0) for _ in range(50))
        )
    finally:
        await redis_store.aclose()
    want = [memory.admit_now("route:/h", breaker, ["a|hot"], [A], 0.0) for _ in range(50)]
    assert [flat(r) for r in got] == [flat(r) for r in want]
    assert sum(r.admitted for r in got) == 3  # the burst, then refusals: a real test
    assert sent == [3]


async def test_cached_argument_text_is_what_the_values_would_send(redis_url: str) -> None:
    """An admission hands the batch its values pre-joined (constant parts cached, and no
    argument list built: one sent alone splits the text again): the same text, value for
    value, as joining the arguments the same admission sends with coalescing off."""
    coalesced = store(redis_url, sync_interval_ms=60_000)
    plain = store(redis_url, sync_interval_ms=60_000)  # the same seed: the same jitter
    plain.coalesce = False
    # the same probe ids too (drawn per admission with a breaker)
    coalesced._probe_ids = random.Random(7)
    plain._probe_ids = random.Random(7)
    texts: list[str | None] = []
    arguments: list[list[object]] = []
    call = coalesced.coalescer.call
    plain_call = plain.call

    async def spy(script, keys, args, text=None):  # type: ignore[no-untyped-def]
        texts.append(text)
        return await call(script, keys, args, text)

    async def plain_spy(script, keys, args):  # type: ignore[no-untyped-def]
        arguments.append(list(args))
        return await plain_call(script, keys, args)

    coalesced.coalescer = type(
        "Spy", (), {"call": staticmethod(spy), "aclose": call.__self__.aclose}
    )()  # type: ignore[assignment]
    plain.call = plain_spy  # type: ignore[method-assign]
    breaker = BreakerConfig()
    try:
        for bkey, keys, limits in REQUESTS:
            await coalesced.admit(bkey, breaker if bkey else None, keys, limits, 0.0)
            await plain.admit(bkey, breaker if bkey else None, keys, limits, 0.0)
    finally:
        await coalesced.aclose()
        await plain.aclose()
    assert len(texts) == len(arguments) == len(REQUESTS)
    for text, args in zip(texts, arguments, strict=True):
        assert text == ",".join(map(str, args))
    # and alone, the text split again is what redis-py would send for those values
    for text, args in zip(texts, arguments, strict=True):
        assert text is not None
        assert [str(v).encode() for v in text.split(",")] == [_wire(v) for v in args]


def _wire(value: object) -> bytes:
    """redis-py's Encoder.encode: bytes as they are, str encoded, a number as its repr."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, int | float):
        return repr(value).encode()
    return str(value).encode()
