"""Review 41 (flt41, item 1): a half-open breaker with its probes in flight, as a balancer reads it.

On memory state the balancer reads its instances' breakers fresh before every pick
(`MemoryStore.breakers_open_until_now`). A half-open breaker whose probe slots were all
held read as "not open" there, while its gate refused every call: each pick drew a
refusal first, and every call's read wiped what other calls' refusals had taught. A call
that gave up while another call had just read the breakers (the real chain: 1 to 2 of 9
of B's 502s during a half-open round) advised no wait: a Redis or tiered store, whose
balancer learns from the gates alone, kept the instances out for the shortest open time
and advised it. The read now says what the gate's refusal would teach
(`decide.breaker.known_open_s` of `BreakerState.refusing`), on every store alike.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_differential_probe_ids as diff
from fidelity_mw import FidelityTransport
from fidelity_mw.decide.breaker import (
    FAILURE,
    HALF_OPEN,
    OPEN,
    SUCCESS,
    BreakerState,
    Gate,
    known_open_s,
)
from fidelity_mw.engine import Engine
from fidelity_mw.policy import BreakerConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random
from redis_clock import RedisClock
from test_defects_review19_outbound import Remote

INSTANCES = ("http://i0:80", "http://i1:80", "http://i2:80")
BREAKER = BreakerConfig(
    failure_ratio=0.5, min_calls=6, window_s=5.0, open_s=0.4, open_min_s=0.2,
    open_jitter=0.0, half_open_probes=1, consecutive_failures=4,
)  # fmt: skip


def _policy(attempts: int) -> Policy:
    retry = RetryConfig(attempts=attempts, base_ms=2, max_ms=5)
    return Policy(
        upstreams=(UpstreamConfig(host="c", instances=INSTANCES, breaker=BREAKER, retry=retry),)
    )


async def _two_calls(remote: bool, attempts: int, seed: int) -> list[list[tuple[str, Any]]]:
    """Every instance's breaker half-open with its probe out (another request's); one call
    waits on its attempt while a second call goes through; both answered 503. Each call's
    give-up decisions: (reason, retry hint)."""
    clock = FakeClock()
    store: Any = Remote() if remote else MemoryStore()
    inner: MemoryStore = store.inner if remote else store
    engine = Engine(_policy(attempts), clock=clock, rng=seeded_random(seed), store=store)
    release, started = asyncio.Event(), asyncio.Event()
    held: list[str] = []

    async def upstream(request: httpx.Request) -> httpx.Response:
        if not held:
            held.append(request.url.host)
            started.set()
            await release.wait()
        return httpx.Response(503)

    now = clock.monotonic()
    for n in range(3):
        inner.breaker_state(f"upstream:i{n}", BREAKER, now).force(OPEN, now, seeded_random(3))
    clock.advance(0.25)
    for n in range(3):
        gate = inner.gate_now(f"upstream:i{n}", BREAKER, clock.monotonic())
        assert gate.verdict == "probe"  # (the probes in flight: their calls never report)
    transport = FidelityTransport(httpx.MockTransport(upstream), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=transport) as client:
        first = asyncio.ensure_future(client.get("http://c/x"))
        await started.wait()
        second = await client.get("http://c/x")
        release.set()
        answers = [await first, second]
    out = []
    for response in answers:
        assert response.status_code == 503
        ctx = response.extensions["fidelity_context"]
        out.append(
            [
                (d.reason, (d.details or {}).get("retry_hint_s"))
                for d in ctx.decisions
                if d.verdict in ("give_up", "reject")
            ]
        )
    return out


@pytest.mark.parametrize("attempts", [1, 3])
def test_a_call_giving_up_during_a_half_open_round_advises_the_wait_on_memory_as_on_redis(
    attempts: int,
) -> None:
    """Before: on memory, with one attempt, 100 of 100 such calls gave up with no hint
    (the other call's read had set every instance back to "not open"); the gate-only
    store (as Redis) advised 0.2 s (the shortest open time) for every one."""
    got: dict[bool, Counter[tuple[tuple[str, Any], ...]]] = {}
    for remote in (False, True):
        got[remote] = Counter()
        for seed in range(20):
            for give_ups in asyncio.run(_two_calls(remote, attempts, seed)):
                got[remote][tuple(give_ups)] += 1
    print(got)
    for remote in (False, True):
        for give_ups in got[remote]:
            assert give_ups, got
            assert all(hint is not None for _reason, hint in give_ups), got
    assert got[False] == got[True]  # the same give-ups, the same advice (no clock moved)


def test_the_read_says_what_the_gate_would_refuse_with() -> None:
    store = MemoryStore()
    now = 1_000.0
    state = store.breaker_state("k", BREAKER, now)
    assert store.breakers_open_until_now(["k", "none"], now) == [0.0, 0.0]
    state.force(OPEN, now, seeded_random(0))
    assert store.breakers_open_until_now(["k"], now) == [now + 0.2]  # (open_min_s)
    now += 0.25
    assert store.breakers_open_until_now(["k"], now) == [0.0]  # a probe may go
    gate = store.gate_now("k", BREAKER, now)
    assert (gate.verdict, gate.state) == ("probe", HALF_OPEN)
    # its probe in flight: refused, for the lease's wait (30 s, up to open_s 0.4) taught
    # as the shortest open time at most (0.2 s), as a gate's refusal teaches the balancer
    assert store.breakers_open_until_now(["k"], now) == [now + 0.2]
    assert store.gate_now("k", BREAKER, now).verdict == "reject"
    store.record_now("k", BREAKER, gate, SUCCESS, False, now + 0.01)
    assert store.breakers_open_until_now(["k"], now + 0.01) == [0.0]


# ---------------------------------------------- the read against the gate (the model)

LEASED = (
    BREAKER,
    BreakerConfig(
        min_calls=2, failure_ratio=0.5, open_min_s=0.5, open_s=2.0, open_jitter=0.2,
        half_open_probes=2, probe_lease_s=1.5,
    ),
    BreakerConfig(
        min_calls=1, consecutive_failures=1, open_min_s=0.25, open_s=1.0, open_jitter=0.0,
        half_open_probes=1, probe_lease_s=0.3,
    ),
)  # fmt: skip
ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.sampled_from([0.01, 0.1, 0.25, 0.5, 1.0, 2.5])),
        st.tuples(st.just("back"), st.sampled_from([0.05, 0.5, 5.0])),  # the clock went back
        st.tuples(st.just("gate"), st.just(0)),
        st.tuples(st.just("record"), st.integers(0, 9), st.sampled_from([SUCCESS, FAILURE])),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(index=st.sampled_from(range(len(LEASED))), steps=ops)
def test_refusing_predicts_the_gate_and_changes_nothing(
    index: int, steps: list[tuple[Any, ...]]
) -> None:
    cfg = LEASED[index]
    state = BreakerState(cfg)
    now = 1_000.0
    out: list[Gate] = []
    for kind, arg, *rest in steps:
        if kind == "advance":
            now += arg
        elif kind == "back":
            now -= arg
        elif kind == "record" and out:
            gate = out.pop(arg % len(out))
            state.record(gate.epoch, gate.probe_id, rest[0], now, lambda: 0.5)
        before = _fields(state)  # (not a deep copy: compiled, the class has no copy protocol)
        refused, wait = state.refusing(now)
        assert _fields(state) == before
        gate = state.gate(now, lambda: 0.5)
        if gate.verdict == "reject":
            assert (refused, wait) == (gate.state, gate.retry_after_s), (gate, refused, wait)
        else:
            assert (refused, wait) == ("", 0.0), (gate, refused, wait)
            out.append(gate)


def _fields(state: BreakerState) -> tuple[Any, ...]:
    return (
        state.state, state.epoch, state.open_until, dict(state.probes), state.reopens,
        state.consecutive, [list(b) for b in state.buckets],
    )  # fmt: skip


# ------------------------------------ the memory read against the Lua gate (differential)

redis_cases = st.tuples(
    st.sampled_from(range(len(diff.BREAKERS))),
    st.lists(
        st.one_of(
            st.tuples(st.just("advance"), st.sampled_from([0.05, 0.25, 0.5, 1.0, 1.25, 2.5])),
            st.tuples(st.just("admit")),
            st.tuples(st.just("lost")),
            st.tuples(st.just("record"), st.integers(0, 9), diff.OUTCOMES),
        ),
        min_size=4,
        max_size=30,
    ),
)


@pytest.fixture
def read_harness(redis_url: str, redis_clock: RedisClock) -> Iterator[diff.Harness]:
    h = diff.Harness(redis_url, redis_clock)
    try:
        yield h
    finally:
        h.close()


@pytest.mark.redis
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=redis_cases)
def test_the_memory_read_teaches_what_the_lua_gate_teaches(
    read_harness: diff.Harness, case: tuple[int, list[tuple[Any, ...]]]
) -> None:
    """Before every admission, memory's read of the model's breaker (the state the Redis
    breaker mirrors step by step: `test_differential_probe_ids`) is what the balancer
    learns from the Lua gate's answer (`_learned_open`'s rule)."""
    harness = read_harness
    store = MemoryStore()
    checked: list[Gate] = []
    original = harness.gate

    async def gate(cfg: BreakerConfig, model: BreakerState, now: float) -> tuple[Gate, Gate]:
        store.breakers["k"] = model
        read = store.breakers_open_until_now(["k"], now)[0]
        m, r = await original(cfg, model, now)
        refused = r.verdict == "reject"
        taught = now + known_open_s(r.state, r.retry_after_s, cfg) if refused else 0.0
        assert math.isclose(read, taught, abs_tol=1e-6), (read, taught, r)
        checked.append(r)
        return m, r

    harness.gate = gate  # type: ignore[method-assign]
    harness.loop.run_until_complete(harness.run(*case))
    assert len(checked) == sum(1 for op in case[1] if op[0] in ("admit", "lost"))
