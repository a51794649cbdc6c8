"""Caller-chosen probe ids and late probe outcomes: memory and Redis decide alike.

A Redis admission sends the probe id it would be given (`RedisStore._probe_id`); one
whose reply is lost reports its call's outcome under that id alone once Redis answers
(`ANY_EPOCH`, `RedisStore._report_late`). The pure model (`BreakerState.gate(...,
probe_id=)`, `record(ANY_EPOCH, ...)`) and the Lua scripts must agree step by step: the
same gates (verdict, state, epoch, the chosen probe id, retry-after) and the same state
(state, epoch, open-until, failed rounds, slots held) after every operation. Random
sequences mix plain calls, probes reported as usual, and "lost" admissions (the answer
thrown away: a timeout) reported late, across failed half-open rounds (a late report
of a probe of an earlier round frees its slot and counts nowhere).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import pytest
import redis as redis_sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fidelity_mw.decide.breaker import ANY_EPOCH, FAILURE, IGNORED, SUCCESS, BreakerState, Gate
from fidelity_mw.policy import BreakerConfig, StateConfig
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.testing import FakeClock
from redis_clock import RedisClock

pytestmark = [pytest.mark.redis]

ROUTE = "route:/ids"
T0 = 1_000.0
BREAKERS = (
    BreakerConfig(
        min_calls=2, failure_ratio=0.5, open_min_s=0.5, open_s=2.0, open_jitter=0.0,
        half_open_probes=2, probe_lease_s=1.5,
    ),
    BreakerConfig(
        min_calls=1, consecutive_failures=1, open_min_s=0.25, open_s=1.0, open_jitter=0.2,
        half_open_probes=1, probe_lease_s=0.75,
    ),
    BreakerConfig(
        min_calls=3, failure_ratio=0.5, open_min_s=0.25, open_s=1.0, open_jitter=0.1,
        half_open_probes=3, probe_lease_s=2.0,
    ),
)  # fmt: skip
OUTCOMES = st.sampled_from([SUCCESS, FAILURE, FAILURE, IGNORED])
op = st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0.05, 0.25, 0.5, 1.0, 1.25, 2.5])),
    st.tuples(st.just("admit")),  # answered: a probe is reported later as usual
    st.tuples(st.just("lost")),  # its answer lost: reported late, by its id alone
    st.tuples(st.just("record"), st.integers(0, 9), OUTCOMES),
    st.tuples(st.just("late"), st.integers(0, 9), OUTCOMES),
)
cases = st.tuples(st.sampled_from(range(len(BREAKERS))), st.lists(op, min_size=4, max_size=40))


class Harness:
    def __init__(self, url: str, pinned: RedisClock) -> None:
        self.loop = asyncio.new_event_loop()
        self.pinned = pinned
        self.client = redis_sync.Redis.from_url(url, socket_timeout=5.0)
        config = StateConfig(url=url, timeout_ms=5_000, connect_timeout_ms=5_000)
        self.red = RedisStore(config=config, rng=lambda: 0.5, clock=FakeClock())
        self.next_id = 10**15  # (far from the counters' 1, 2, 3; within 2^53)

    def close(self) -> None:
        self.loop.run_until_complete(self.red.aclose())
        self.loop.close()
        self.client.close()

    def snapshot(self) -> tuple[Any, ...]:
        hkey, pkey = self.red.breaker_keys(ROUTE)
        st_, ep, ou, ro = self.client.hmget(hkey, "st", "ep", "ou", "ro")
        return (
            (st_ or b"closed").decode(),
            int(ep or 0),
            float(ou or 0.0),
            int(ro or 0),
            int(self.client.zcard(pkey)),
        )

    async def gate(self, cfg: BreakerConfig, memory: BreakerState, now: float) -> tuple[Gate, Gate]:
        self.next_id += 1
        pid = self.next_id
        self.red._probe_id = lambda: pid  # type: ignore[method-assign]
        m = memory.gate(now, lambda: 0.5, pid)
        got = await self.red.admit(ROUTE, cfg, [], [], now)
        assert got.source == "redis"
        r = got.gate
        assert r is not None
        assert (m.verdict, m.state, m.epoch, m.probe_id) == (
            r.verdict,
            r.state,
            r.epoch,
            r.probe_id,
        )
        assert math.isclose(m.retry_after_s, r.retry_after_s, abs_tol=1e-6), (m, r)
        return m, r

    async def run(self, index: int, ops: list[tuple[Any, ...]]) -> None:
        cfg = BREAKERS[index]
        self.client.delete(*self.red.breaker_keys(ROUTE))
        self.red._late.clear()
        memory = BreakerState(cfg)
        now = T0
        inflight: list[tuple[Gate, Gate]] = []  # answered gates not yet reported
        lost: list[int] = []  # probe ids sent with an answer thrown away
        for step in ops:
            kind = step[0]
            self.pinned.set(now)
            if kind == "advance":
                now += step[1]
            elif kind == "admit":
                m, r = await self.gate(cfg, memory, now)
                if m.verdict != "reject":
                    inflight.append((m, r))
            elif kind == "lost":
                m, _r = await self.gate(cfg, memory, now)
                lost.append(m.probe_id or self.next_id)  # (the id was sent either way)
            elif kind == "record" and inflight:
                m, r = inflight.pop(step[1] % len(inflight))
                outcome = step[2]
                if not m.probe_id and outcome == SUCCESS:
                    outcome = FAILURE  # (a plain success waits to ride along in Redis)
                memory.record(m.epoch, m.probe_id, outcome, now, lambda: 0.5)
                await self.red.record(ROUTE, cfg, r, outcome, False, now)
            elif kind == "late" and lost:
                pid = lost.pop(step[1] % len(lost))
                memory.record(ANY_EPOCH, pid, step[2], now, lambda: 0.5)
                self.red._report_late(ROUTE, cfg, pid, step[2], False)
                task = self.red._late_task
                assert task is not None
                await task
            mine = (
                memory.state,
                memory.epoch,
                memory.open_until,
                memory.reopens,
                len(memory.probes),
            )
            theirs = self.snapshot()
            assert (mine[0], mine[1], mine[3], mine[4]) == (
                theirs[0], theirs[1], theirs[3], theirs[4],
            ), (step, mine, theirs)  # fmt: skip
            assert math.isclose(mine[2], theirs[2], abs_tol=1e-6), (step, mine, theirs)
        assert self.red.stats.dropped_records == 0


@pytest.fixture
def harness(redis_url: str, redis_clock: RedisClock) -> Iterator[Harness]:
    h = Harness(redis_url, redis_clock)
    try:
        yield h
    finally:
        h.close()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases)
def test_caller_chosen_probe_ids_and_late_outcomes_decide_alike(
    harness: Harness, case: tuple[int, list[tuple[Any, ...]]]
) -> None:
    harness.loop.run_until_complete(harness.run(*case))


def test_a_late_outcome_of_an_earlier_rounds_probe_counts_nowhere(harness: Harness) -> None:
    """Two probes; one fails (open again), the open time passes (half-open again): the
    other, whose answer was lost, reports a success late. It frees its slot, and closes
    nothing: it was admitted in a round that is over (before the slots were marked
    stale, a report by id alone could not tell)."""
    ops: list[tuple[Any, ...]] = [
        ("admit",), ("record", 0, FAILURE), ("admit",), ("record", 0, FAILURE),  # open
        ("advance", 1.0),
        ("lost",), ("admit",), ("record", 0, FAILURE),  # the lost one probes; re-open
        ("advance", 1.25),  # open 1 s; the lost probe's lease (1.5 s) runs on
        ("admit",),  # half-open again: a fresh probe, the lost one still holds its slot
        ("late", 0, SUCCESS),  # stale: frees its slot only
    ]  # fmt: skip
    harness.loop.run_until_complete(harness.run(0, ops))
    hkey, _ = harness.red.breaker_keys(ROUTE)
    assert harness.snapshot()[0] == "half_open"
    assert harness.snapshot()[4] == 1  # the fresh probe's slot
    assert int(harness.client.hget(hkey, "ep") or 0) == 4
