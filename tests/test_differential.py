"""Differential tests: one model, many implementations.

Hypothesis generates operation sequences (admit a request on a route breaker
and up to three limits, record an outcome for any call in flight, refund an
admitted request, outbound gates with the retry budget, advance time, several
probes in flight at once) and runs each against the memory store and the
Redis store on a real redis-server, step by step:

- every answer must be the same (gate verdict, state, epoch, probe id,
  retry-after; each limit's verdict, remaining, reset; the budget's answer),
  and after every step the breakers' state must be the same (state, epoch,
  open-until, failed-probe rounds, probe slots held);
- every limit admission must be one the reference ledger (an exact token
  bucket over the admitted requests, refunded ones removed) would make, and
  every admission from retry credit one the exact credit reference allows
  (`RefCredit`: each refund credits its cost, one burst at most, expiring);
- the tiered store, which decides on leased slices, is held to its documented
  bound instead: from a fresh bucket, never more than rate x t + burst units
  net of refunds (tests/test_differential.py::test_tiered_stays_within_its_bound).

Time: Redis decides on its own clock, so the scripts run on a pinned clock
(tests/redis_clock.py: a test-only copy of each script whose server_now()
reads a key; production scripts are untouched) set to the same `now` the
memory store gets. The Redis store defers plain successes to its next call
by design (they cannot change the state); the test flushes them right after
each record so both windows count them at the same instant (the deferral
itself: test_defects_state.py::test_defect11_deferred_successes_open_like_single_ones).

Concurrent admissions are sent in one event-loop tick, so the Redis store
coalesces them into one batch.lua call: that script is held to the same answers.

Planted bugs (test_planted_bug_is_caught) show the comparison has teeth:
each plant, in Python or in Lua, must make the differential check fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import pytest
import redis as redis_sync
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import FlakyFailure

import fidelity_mw
from fidelity_mw.decide import breaker as breaker_module
from fidelity_mw.decide import budget as budget_module
from fidelity_mw.decide.breaker import FAILURE, IGNORED, SUCCESS, Gate, streak_stands
from fidelity_mw.decide.budget import BudgetWindow
from fidelity_mw.policy import BreakerConfig, RetryConfig, StateConfig
from fidelity_mw.state import local as local_module
from fidelity_mw.state import redis as redis_module
from fidelity_mw.state import tiered as tiered_module
from fidelity_mw.state.base import InboundResult, LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.tiered import TieredStore
from fidelity_mw.testing import FakeClock
from redis_clock import CLOCK_KEY, LONG_TTL, TTL_LOG, RedisClock, patch_scripts
from redis_server import PATIENT
from reference_model import TOKEN_TOL, RefCredit, RefLedger

pytestmark = pytest.mark.redis

T0 = 1_000.0
ROUTE = "route:/api"
HOST = "upstream:h"
BUDGET = "budget:h"

# name, count, period, burst, shadow, retry credit (s): short enough to expire in a sequence
LIMITS = (
    ("a", 2, 1.0, 3, False, 0.3),
    ("b", 1, 1.0, 2, False, 0.0),
    ("s", 1, 1.0, 1, True, 0.6),
)
SPECS = tuple(
    LimitSpec(name, period / count, burst * period / count, 1, shadow, credit)
    for name, count, period, burst, shadow, credit in LIMITS
)

BREAKERS = (
    BreakerConfig(
        min_calls=2, failure_ratio=0.5, window_s=2.0, open_s=1.0, open_min_s=0.25,
        open_jitter=0.0, half_open_probes=2, probe_lease_s=1.5,
    ),
    BreakerConfig(
        min_calls=3, failure_ratio=0.6, window_s=1.0, open_s=2.0, open_min_s=0.5,
        open_jitter=0.2, half_open_probes=1, probe_lease_s=0.75, consecutive_failures=3,
    ),
    BreakerConfig(
        min_calls=1, failure_ratio=1.0, window_s=5.0, open_s=0.5, open_min_s=0.5,
        open_jitter=0.1, half_open_probes=3, probe_lease_s=2.0, slow_call_ms=100,
        slow_call_ratio=0.5,
    ),
)  # fmt: skip
RETRY = RetryConfig(budget_ratio=0.5, budget_min_per_s=0.5, budget_window_s=2.0)

op = st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0.01, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5])),
    st.tuples(
        st.just("admit"),
        st.sampled_from([True, True, False]),  # the route breaker
        st.integers(0, 7),  # which limits (a bit mask over LIMITS)
        st.integers(0, 1),  # which client
        st.integers(1, 4),  # how many such requests at this instant
        st.booleans(),  # sent to Redis concurrently (one coalesced batch.lua call)
    ),
    st.tuples(
        st.just("record"),
        st.integers(0, 20),
        st.sampled_from([SUCCESS, FAILURE, FAILURE, IGNORED]),
        st.booleans(),
    ),
    st.tuples(st.just("refund"), st.integers(0, 20)),
    st.tuples(st.just("outbound"), st.booleans()),
    # a whole call on the route breaker: admitted, then its outcome at once
    st.tuples(st.just("call"), st.sampled_from([SUCCESS, FAILURE, FAILURE]), st.booleans()),
)
cases = st.tuples(
    st.sampled_from(range(len(BREAKERS))),
    st.sampled_from([0.5, 0.1, 0.93]),  # the jitter draw, the same for both stores
    st.lists(op, min_size=5, max_size=40),
)
# Requests of several costs on the same counters (a per-request cost: each request's
# spec carries its own cost; the stores take it from the spec, whatever the last one was)
costed_op = st.one_of(
    op,
    st.tuples(
        st.just("admit"),
        st.sampled_from([True, False]),
        st.integers(1, 7),
        st.integers(0, 1),
        st.integers(1, 3),
        st.booleans(),
        st.integers(1, 3),  # the cost of each of these requests
    ),
    # would a request (of this cost) be admitted now? then one is sent at once
    st.tuples(st.just("peek"), st.integers(1, 7), st.integers(0, 1), st.integers(1, 3)),
)
costed_cases = st.tuples(
    st.sampled_from(range(len(BREAKERS))),
    st.sampled_from([0.5, 0.1, 0.93]),
    st.lists(costed_op, min_size=5, max_size=40),
)


def _burst(spec: LimitSpec) -> int:
    return round(spec.tolerance_s / spec.interval_s)


# ---------------------------------------------------------------- comparing answers


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def _same_gate(m: Gate | None, r: Gate | None, what: str) -> None:
    if m is None or r is None:
        assert m is r, (what, m, r)
        return
    # (probe ids: the memory store's own counter; the Redis store's its own choice, sent
    # with the gate: a probe in both, or in neither)
    assert (m.verdict, m.state, m.epoch, bool(m.probe_id)) == (
        r.verdict,
        r.state,
        r.epoch,
        bool(r.probe_id),
    ), (what, m, r)
    assert _close(m.retry_after_s, r.retry_after_s), (what, m, r)


def _same_admit(m: InboundResult, r: InboundResult) -> None:
    _same_gate(m.gate, r.gate, "admit gate")
    assert m.admitted == r.admitted, ("admitted", m, r)
    assert len(m.limits) == len(r.limits), (m, r)
    for mv, rv in zip(m.limits, r.limits, strict=True):
        assert (mv.allowed, mv.credit, mv.remaining) == (rv.allowed, rv.credit, rv.remaining), (
            "limit",
            m,
            r,
        )
        assert _close(mv.reset_s, rv.reset_s), ("reset", m, r)
        assert _close(mv.retry_after_s, rv.retry_after_s), ("retry_after", m, r)


def _breaker_snapshot_memory(store: MemoryStore, key: str) -> tuple[Any, ...]:
    state = store.breakers.get(key)
    if state is None:
        return ("closed", 0, 0.0, 0, 0)
    return (state.state, state.epoch, state.open_until, state.reopens, len(state.probes))


def _breaker_snapshot_redis(
    client: redis_sync.Redis, store: RedisStore, key: str
) -> tuple[Any, ...]:
    hkey, pkey = store.breaker_keys(key)
    st_, ep, ou, ro = client.hmget(hkey, "st", "ep", "ou", "ro")
    return (
        (st_ or b"closed").decode(),
        int(ep or 0),
        float(ou or 0.0),
        int(ro or 0),
        int(client.zcard(pkey)),
    )


def _same_budget(
    memory: MemoryStore, red: RedisStore, client: redis_sync.Redis, now: float
) -> None:
    """The retry budget's window, counted alike (requests and retries in it at `now`).

    Read from a copy of the memory ring: `totals` turns the ring it reads, and the Redis
    ring turns only when the script counts; a ring turned at other instants sums its
    bucket ends differently (each sum rounded), so the two would part at a float edge
    for the test's reading, not the stores' doing."""
    window = memory.budgets.get(BUDGET)
    mine = (0, 0)
    if window is not None:
        copy = BudgetWindow(window.config)
        copy._bucket_end, copy._index = window._bucket_end, window._index
        copy.requests, copy.retries = list(window.requests), list(window.retries)
        mine = copy.totals(now)
    be, ix, rq, rt = client.hmget(red.key("bu", BUDGET), "be", "ix", "rq", "rt")
    theirs = (0, 0)
    if be is not None:
        ring = BudgetWindow(RETRY)
        ring._bucket_end, ring._index = float(be), int(ix)
        ring.requests = [int(n) for n in rq.split(b",")]
        ring.retries = [int(n) for n in rt.split(b",")]
        theirs = ring.totals(now)
    assert mine == theirs, ("budget", now, mine, theirs)


def _same_breakers(memory: MemoryStore, red: RedisStore, client: redis_sync.Redis) -> None:
    for key in (ROUTE, HOST):
        m = _breaker_snapshot_memory(memory, key)
        r = _breaker_snapshot_redis(client, red, key)
        assert (m[0], m[1], m[3], m[4]) == (r[0], r[1], r[3], r[4]), (key, m, r)
        assert _close(m[2], r[2]), (key, m, r)


# ---------------------------------------------------------------- one sequence


@dataclass
class Charged:
    """An admitted request's charges, per store, for a refund."""

    keys: list[str]
    specs: list[LimitSpec]
    memory_tats: list[float]
    redis_tats: list[float]
    ledger: list[tuple[RefLedger, int]]


class StillClock(FakeClock):
    """The Redis store's clock in the harness: it never moves, and a background sleep never
    ends. The sequences flush what they mean to themselves (`_flush_deferred_now`; budget
    counts ride on the next outbound call, as the memory side counts them). On a
    `FakeClock`, whose sleep advances it, the deferred-success flush ran whenever the loop
    let it: it moved the store's clock, so budget counts waiting to be sent looked a sync
    interval old and went out in the background before the memory side counted them (a
    failure that depended on the sequences run before on the same harness)."""

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.get_running_loop().create_future()  # (cancelled with its task)


class Harness:
    """One event loop, one Redis store and one inspection client for many sequences
    (a fresh connection per sequence would cost more than the sequence)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.client = redis_sync.Redis.from_url(url, socket_timeout=5.0)
        config = StateConfig(url=url, timeout_ms=5_000, connect_timeout_ms=5_000)
        self.u = 0.5
        # The store's own clock (its background flushes' waits, the age of budget
        # counts waiting to be sent) is a fake one: on the wall clock, whether a flush
        # ran before or after a step depended on how fast the machine was, so a
        # failing sequence could pass on replay.
        self.red = RedisStore(config=config, rng=lambda: self.u, clock=StillClock())

    def run(self, case: tuple[int, float, list[tuple[Any, ...]]]) -> Sequence_:
        return self.loop.run_until_complete(_run(self, *case))

    def close(self) -> None:
        self.loop.run_until_complete(self.red.aclose())
        self.loop.close()
        self.client.close()


@pytest.fixture
def harness(redis_url: str, redis_clock: RedisClock) -> Iterator[Harness]:
    h = Harness(redis_url)
    try:
        yield h
    finally:
        h.close()


class RedisUnavailable(Exception):
    """The server did not answer: not a verdict of the test (a planted bug must not
    count as caught because of it)."""


@dataclass
class Sequence_:
    """What one sequence keeps beside the stores."""

    ledgers: dict[str, RefLedger] = field(default_factory=dict)
    credits: dict[str, RefCredit] = field(default_factory=dict)
    credit_admissions: int = 0
    refunded_keys: set[str] = field(default_factory=set)
    inflight: list[tuple[str, Gate, Gate]] = field(default_factory=list)
    charged: list[Charged] = field(default_factory=list)
    retries: list[float] = field(default_factory=list)  # when each retry was counted
    # top-level requests counted by `budget_request`: Redis sends them with the next
    # outbound call, so the memory store counts them then (the same instant)
    requests: int = 0
    # the Redis gates taken over the blocking client (FidelitySyncTransport's path):
    # their outcomes go back the same way (`record_sync`)
    sync_gates: set[int] = field(default_factory=set)

    def ledger(self, key: str) -> RefLedger:
        ledger = self.ledgers.get(key)
        if ledger is None:
            name = key.split("|")[0]
            count, period, burst = next((c, p, b) for n, c, p, b, _, _ in LIMITS if n == name)
            ledger = self.ledgers[key] = RefLedger(count, period, burst)
        return ledger

    def credit(self, key: str) -> RefCredit:
        credit = self.credits.get(key)
        if credit is None:
            name = key.split("|")[0]
            spec = next(s for s in SPECS if s.name == name)
            burst = round(spec.tolerance_s / spec.interval_s)
            credit = self.credits[key] = RefCredit(spec.interval_s, burst, spec.credit_s)
        return credit


def _from_redis(result: InboundResult) -> InboundResult:
    if result.source != "redis":
        raise RedisUnavailable(result)
    return result


async def _admit(
    memory: MemoryStore,
    red: RedisStore,
    bkey: str | None,
    bcfg: BreakerConfig | None,
    keys: list[str],
    specs: list[LimitSpec],
    now: float,
    seq: Sequence_,
    repeat: int = 1,
    together: bool = False,
) -> InboundResult:
    if together:  # one event-loop tick: the Redis store coalesces them, in this order
        reds = await asyncio.gather(
            *(red.admit(bkey, bcfg, keys, specs, now) for _ in range(repeat))
        )
    for i in range(repeat):
        m = await memory.admit(bkey, bcfg, keys, specs, now)
        r = reds[i] if together else await red.admit(bkey, bcfg, keys, specs, now)
        _check_admit(m, _from_redis(r), keys, specs, now, seq)
    return m


def _check_admit(
    m: InboundResult,
    r: InboundResult,
    keys: list[str],
    specs: list[LimitSpec],
    now: float,
    seq: Sequence_,
) -> None:
    _same_admit(m, r)
    entry = Charged([], [], [], [], [])
    decided = zip(keys, specs, m.limits, r.limits, strict=True) if m.limits else ()
    for key, spec, mv, rv in decided:
        ledger = seq.ledger(key)
        tokens = ledger.tokens(now)
        credit = seq.credit(key)
        if mv.credit:
            # GCRA refused it; the credit the refunds earned (exact) covers it
            assert True in credit.answers(now, spec.cost), (key, now, credit.balance)
            if m.admitted:
                seq.credit_admissions += 1
                credit.spend(spec.cost)
                entry.keys.append(key)
                entry.specs.append(spec)
                entry.memory_tats.append(mv.tat)
                entry.redis_tats.append(rv.tat)
            continue
        if not mv.allowed:
            # refused: the credit could not cover it either
            assert False in credit.answers(now, spec.cost), (key, now, credit.balance)
        if mv.allowed and m.admitted:
            # the reference bucket holds the units this admission took
            assert tokens >= spec.cost - TOKEN_TOL, (key, float(tokens), now)
            entry.keys.append(key)
            entry.specs.append(spec)
            entry.memory_tats.append(mv.tat)
            entry.redis_tats.append(rv.tat)
            entry.ledger.append((ledger, ledger.admit(now, spec.cost)))
        elif not mv.allowed and key not in seq.refunded_keys:
            # without refunds (which may give back less than the ledger forgets)
            # a refusal means the bucket was short
            assert tokens < spec.cost + TOKEN_TOL, (key, float(tokens), now)
    if entry.keys:
        seq.charged.append(entry)
    if m.admitted and m.gate is not None and r.gate is not None:
        seq.inflight.append((ROUTE, m.gate, r.gate))


async def _run(
    h: Harness, breaker_index: int, u: float, ops: Sequence[tuple[Any, ...]]
) -> Sequence_:
    breaker = BREAKERS[breaker_index]
    client = h.client
    client.flushdb()
    now = T0
    client.set(CLOCK_KEY, repr(now))
    h.u = u
    memory = MemoryStore(rng=lambda: u)
    red = h.red
    red._deferred.clear()
    red._pending.clear()
    for task in (red._deferred_task, red._flush_task):  # an earlier sequence's
        if task is not None and not task.done():
            task.cancel()
    red.coalescer._batch = redis_module.BATCH  # the script as patched now (plants too)
    seq = Sequence_()
    for step in ops:
        kind = step[0]
        if kind == "advance":
            now += step[1]
            client.set(CLOCK_KEY, repr(now))
        elif kind == "admit":
            _, with_breaker, mask, who, repeat, together = step[:6]
            specs = [s for i, s in enumerate(SPECS) if mask & (1 << i)]
            if len(step) > 6:  # a per-request cost (fidelity.limit(cost=fn)), up to the burst
                specs = [s._replace(cost=min(step[6], _burst(s))) for s in specs]
            keys = [f"{s.name}|c{who}" for s in specs]
            bkey = ROUTE if with_breaker else None
            bcfg = breaker if with_breaker else None
            await _admit(memory, red, bkey, bcfg, keys, specs, now, seq, repeat, together)
        elif kind == "peek":
            await _peek(memory, red, client, step, now, seq)
        elif kind == "call":
            before = len(seq.inflight)
            await _admit(memory, red, ROUTE, breaker, [], [], now, seq)
            if len(seq.inflight) > before:  # admitted: it ends at once
                step = ("record", before, step[1], step[2])
        if step[0] == "record" and seq.inflight:
            _, index, outcome, slow = step
            key, mg, rg = seq.inflight.pop(index % len(seq.inflight))
            slow = slow and breaker.slow_call_ratio is not None
            await memory.record(key, breaker, mg, outcome, slow, now)
            if id(rg) in seq.sync_gates:
                seq.sync_gates.discard(id(rg))
                red.record_sync(key, breaker, rg, outcome, slow, now)
            else:
                await red.record(key, breaker, rg, outcome, slow, now)
            await red._flush_deferred_now()
        if kind == "refund" and seq.charged:
            entry = seq.charged.pop(step[1] % len(seq.charged))
            await memory.refund(entry.keys, entry.specs, "memory", now, entry.memory_tats)
            await red.refund(entry.keys, entry.specs, "redis", now, entry.redis_tats)
            for ledger, index in entry.ledger:
                ledger.refund(index)
            for key, spec in zip(entry.keys, entry.specs, strict=True):
                seq.credit(key).earn(now, Fraction(spec.cost * spec.interval_s))
            seq.refunded_keys.update(entry.keys)
        elif kind in ("outbound", "outbound_sync", "host_gate", "try_retry"):
            # every outbound call takes the budget requests counted so far along
            for _ in range(seq.requests):
                await memory.budget_request(BUDGET, RETRY, now)
            seq.requests = 0
            retry = step[1] if kind in ("outbound", "outbound_sync") else kind == "try_retry"
            blocking = kind == "outbound_sync" or (kind != "outbound" and step[1])
            bkey, bcfg = (None, None) if kind == "try_retry" else (HOST, breaker)
            ukey, ucfg = (None, None) if kind == "host_gate" else (BUDGET, RETRY)
            if blocking:  # FidelitySyncTransport's path: one call over the blocking client
                mg, ma, _, _ = await memory.outbound_gate(bkey, bcfg, ukey, ucfg, retry, now)
                rg, ra, source, _ = red.outbound_gate_sync(bkey, bcfg, ukey, ucfg, retry, now)
            elif kind == "host_gate":  # the host breaker alone
                mg, _, _ = await memory.breaker_gate(HOST, breaker, now)
                rg, source, _ = await red.breaker_gate(HOST, breaker, now)
                ma = ra = True
            elif kind == "try_retry":  # the budget alone
                ma, _, _ = await memory.budget_try_retry(BUDGET, RETRY, now)
                ra, source, _ = await red.budget_try_retry(BUDGET, RETRY, now)
                mg = rg = None
            else:
                mg, ma, _, _ = await memory.outbound_gate(bkey, bcfg, ukey, ucfg, retry, now)
                rg, ra, source, _ = await red.outbound_gate(bkey, bcfg, ukey, ucfg, retry, now)
            if source != "redis":
                raise RedisUnavailable(source)
            if blocking and rg is not None:
                seq.sync_gates.add(id(rg))
            assert ma == ra, ("budget", retry, ma, ra)
            _same_gate(mg, rg, "outbound gate")
            if mg is not None and rg is not None and mg.verdict != "reject":
                seq.inflight.append((HOST, mg, rg))
                if retry and ma:
                    seq.retries.append(now)
            _same_budget(memory, red, client, now)
        elif kind == "budget_refund" and seq.retries:
            spent = seq.retries.pop(step[1] % len(seq.retries))
            # odd: the store's time of the spend (`GateAnswer.spent_at`) names the bucket
            said = spent if step[1] % 2 else None
            await memory.budget_refund(BUDGET, RETRY, "memory", now - spent, now, said)
            if len(step) > 2 and step[2]:  # over the blocking client
                red.budget_refund_sync(BUDGET, RETRY, "redis", now - spent, now, said)
            else:
                await red.budget_refund(BUDGET, RETRY, "redis", now - spent, now, said)
        elif kind == "request":
            seq.requests += 1
            await red.budget_request(BUDGET, RETRY, now)
            _same_budget(memory, red, client, now)
        if not red.up:
            raise RedisUnavailable("redis failed during the test")
        _same_breakers(memory, red, client)
    return seq


async def _peek(
    memory: MemoryStore,
    red: RedisStore,
    client: redis_sync.Redis,
    step: tuple[Any, ...],
    now: float,
    seq: Sequence_,
) -> None:
    """Check without counting: both stores answer alike, as the reference would, change
    nothing, and say what an admission at the same instant then decides."""
    _, mask, who, cost = step
    specs = [s._replace(cost=min(cost, _burst(s))) for i, s in enumerate(SPECS) if mask & (1 << i)]
    keys = [f"{s.name}|c{who}" for s in specs]
    table = memory.limits
    before = (dict(table.tats), dict(table.credits), dict(table.refunded))
    stored = [client.get(red.key("rl", key)) for key in keys]
    m = await memory.peek(keys, specs, now)
    r = await red.peek(keys, specs, now)
    if r.source != "redis":
        raise RedisUnavailable(r.source)
    assert (dict(table.tats), dict(table.credits), dict(table.refunded)) == before
    assert [client.get(red.key("rl", key)) for key in keys] == stored
    assert m.gate is None
    assert r.gate is None
    assert m.admitted == r.admitted, (m, r)
    for key, spec, mv, rv in zip(keys, specs, m.limits, r.limits, strict=True):
        assert (mv.allowed, mv.credit, mv.remaining) == (rv.allowed, rv.credit, rv.remaining)
        assert _close(mv.reset_s, rv.reset_s), (mv, rv)
        assert _close(mv.retry_after_s, rv.retry_after_s), (mv, rv)
        tokens = seq.ledger(key).tokens(now)
        if mv.credit:
            assert True in seq.credit(key).answers(now, spec.cost), (key, now)
        elif mv.allowed:
            assert tokens >= spec.cost - TOKEN_TOL, (key, float(tokens), now)
        elif key not in seq.refunded_keys:
            assert tokens < spec.cost + TOKEN_TOL, (key, float(tokens), now)
    admitted = await _admit(memory, red, None, None, keys, specs, now, seq)
    assert admitted.admitted == m.admitted
    assert [(v.allowed, v.credit) for v in admitted.limits] == [
        (v.allowed, v.credit) for v in m.limits
    ]


# ---------------------------------------------------------------- the tests


# Half-open probe slots at a transition, and one probe more than the breaker allows:
# sequences the search found for the plants "every transition drops the probe slots" and
# "one probe more than configured", kept as explicit cases for every plant. Found by
# the derandomized search alone, the two plants were caught only for some seeds (its
# seed is the test's source: 2 of 6 other seeds tried missed the first in 400
# sequences, 2 the second), so an edit of the test's source could turn them red.
PROBE_SLOTS_CASE: tuple[int, float, list[tuple[Any, ...]]] = (
    2,
    0.93,
    [
        ("record", 0, SUCCESS, True),
        ("admit", True, 1, 0, 3, True),
        ("record", 0, SUCCESS, True),
        ("advance", 2.5),
        ("admit", True, 1, 0, 2, False),
        ("record", 2, FAILURE, False),
        ("call", FAILURE, False),
        ("advance", 0.5),
    ],
)
PROBE_COUNT_CASE: tuple[int, float, list[tuple[Any, ...]]] = (
    2,
    0.1,
    [
        ("refund", 11),
        ("record", 19, SUCCESS, False),
        ("admit", True, 5, 0, 4, True),
        ("advance", 0.5),
        ("record", 1, FAILURE, True),
        ("call", FAILURE, False),
        ("refund", 0),
        ("advance", 1.0),
        ("record", 6, FAILURE, False),
        ("admit", True, 0, 0, 4, True),
        ("admit", False, 7, 1, 1, False),
        ("outbound", False),
    ],
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=cases)
@example(case=PROBE_SLOTS_CASE)
@example(case=PROBE_COUNT_CASE)
def test_memory_and_redis_decide_alike_and_as_the_reference(
    harness: Harness, case: tuple[int, float, list[tuple[Any, ...]]]
) -> None:
    harness.run(case)


BUDGET_CASE: tuple[int, float, list[tuple[Any, ...]]] = (
    0,
    0.5,
    [
        ("outbound", False),  # 1000.0: the ring's buckets are [1000.0, 1000.2) ...
        ("outbound", False),
        ("advance", 0.1),
        ("outbound", True),  # a retry counted at 1000.1
        ("advance", 0.75),
        ("outbound", True),  # ... and at 1000.85
        ("advance", 0.5),
        ("outbound", False),  # 1001.35: the ring turns two buckets on
        ("budget_refund", 1),  # the retry of 1000.85 comes off its bucket, not this one
        ("advance", 0.8),
        ("outbound", True),  # 1002.15: counted in the bucket 1000.1's was in
        ("budget_refund", 0),  # 1000.1's bucket has left the window: nothing comes back
        ("outbound", True),
        ("outbound", True),
    ],
)


# The retry budget with refunds: a retry the budget counted, given back (its attempt was
# not sent), from any of the retries counted so far. (A strategy of its own: a new
# operation in `op` would change the sequences the planted-bug test draws.)
budget_op = st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.5])),
    st.tuples(st.just("outbound"), st.booleans()),
    st.tuples(st.just("budget_refund"), st.integers(0, 20)),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(budget_op, min_size=5, max_size=40))
@example(ops=BUDGET_CASE[2])
@example(
    ops=[  # found by Hypothesis on the compiled build: refunds at a bucket's edge
        ("outbound", False),
        ("outbound", True),
        ("advance", 0.1),
        ("outbound", False),
        ("outbound", True),
        ("advance", 0.1),
        ("budget_refund", 1),
        ("budget_refund", 0),
    ]
)
@example(
    ops=[  # found by Hypothesis: a refund, then the ring turning at a float edge
        ("outbound", True),
        ("advance", 0.05),
        ("advance", 0.05),
        ("advance", 0.05),
        ("advance", 0.75),
        ("outbound", False),
        ("advance", 0.75),
        ("budget_refund", 0),
        ("advance", 0.25),
        ("advance", 0.25),
        ("outbound", False),
        ("advance", 0.1),
        ("advance", 0.25),
        ("advance", 1.5),
        ("outbound", False),
    ]
)
@example(
    ops=[  # a retry counted at a bucket's very start, given back after the ring turned
        ("outbound", True),  # 1000.0
        ("advance", 0.1),
        ("advance", 0.1),
        ("outbound", False),  # 1000.2: the ring turns (its end is now a sum of two)
        ("budget_refund", 0),
    ]
)
def test_budget_refunds_decide_alike(harness: Harness, ops: list[tuple[Any, ...]]) -> None:
    harness.run((0, 0.5, ops))


# Every outbound operation a store offers, each way it is called: the fused gate (async and
# over the blocking client), the host breaker's gate alone, the budget alone (a retry),
# top-level requests counted without a call (they ride on the next one), outcomes recorded
# either way, retries given back either way.
outbound_op = st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0.05, 0.1, 0.25, 0.5, 0.75, 1.5])),
    st.tuples(st.just("outbound"), st.booleans()),
    st.tuples(st.just("outbound_sync"), st.booleans()),
    st.tuples(st.just("host_gate"), st.booleans()),  # True: over the blocking client
    st.tuples(st.just("try_retry"), st.booleans()),
    st.tuples(st.just("request")),
    st.tuples(st.just("budget_refund"), st.integers(0, 20), st.booleans()),
    st.tuples(
        st.just("record"),
        st.integers(0, 20),
        st.sampled_from([SUCCESS, FAILURE, FAILURE, IGNORED]),
        st.booleans(),
    ),
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    index=st.sampled_from(range(len(BREAKERS))),
    u=st.sampled_from([0.5, 0.1, 0.93]),
    ops=st.lists(outbound_op, min_size=5, max_size=40),
)
def test_every_outbound_operation_decides_alike(
    harness: Harness, index: int, u: float, ops: list[tuple[Any, ...]]
) -> None:
    """budget_request, budget_try_retry, breaker_gate and the blocking client's
    outbound_gate_sync / record_sync / budget_refund_sync, beside outbound_gate: the memory
    store and Redis answer alike and hold the same host breaker and budget window."""
    harness.run((index, u, ops))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=costed_cases)
def test_requests_of_several_costs_decide_alike_and_as_the_reference(
    harness: Harness, case: tuple[int, float, list[tuple[Any, ...]]]
) -> None:
    """A per-request cost is the spec's cost of that request: every store, and the batch
    script, decide each one as the exact bucket does, refunds included. A check without
    counting (`peek`) answers alike in both stores, changes nothing, and says what an
    admission at that instant decides."""
    harness.run(case)


def test_a_check_without_counting_sees_retry_credit(harness: Harness) -> None:
    """A refund credits its cost; with the bucket empty again, a check says the next
    request is admitted from that credit (as the admission then is), and once it is
    spent, that it is not."""
    ops = [
        ("admit", False, 1, 0, 3, False),  # limit a's burst of 3, spent
        ("refund", 0),  # one unit back, and one unit of credit
        ("admit", False, 1, 0, 1, False),  # the unit given back, spent again
        ("peek", 1, 0, 1),  # GCRA refuses; the credit admits
        ("peek", 1, 0, 1),  # the credit is spent
    ]
    harness.run((0, 0.5, ops))


def test_a_known_tricky_sequence(harness: Harness) -> None:
    """Hand-picked: open, probes in flight across a failed round (open time grows),
    two requests coalesced into one batch call, a refund, the budget at its edge."""
    ops: list[tuple[Any, ...]] = [
        ("admit", True, 1, 0, 1, False),
        ("admit", True, 1, 0, 1, False),
        ("record", 0, FAILURE, False),
        ("record", 0, FAILURE, False),  # min_calls 2, 100 % failures: open for 0.25 s
        ("advance", 0.25),
        ("admit", True, 3, 1, 1, False),  # probe 1
        ("admit", True, 3, 1, 1, False),  # probe 2
        ("admit", True, 3, 1, 1, False),  # no third slot
        ("record", 0, FAILURE, False),  # re-open for 0.5 s; probe 2 keeps its slot
        ("advance", 0.5),
        ("admit", True, 1, 2, 2, True),  # one free slot only; both in one batch
        ("record", 1, SUCCESS, False),  # the fresh probe closes it
        ("refund", 0),
        ("advance", 1.0),
        ("outbound", False),
        ("outbound", True),
        ("outbound", True),
        ("outbound", True),
    ]
    harness.run((0, 0.5, ops))


def test_a_bucket_edge_in_floating_point(harness: Harness) -> None:
    """Found by Hypothesis: at exactly one window after two failures the bucket
    arithmetic rounds down (8.99... steps); Python rotated a second time at the same
    instant and Lua did not, so Redis opened where memory stayed closed."""
    ops: list[tuple[Any, ...]] = [
        ("call", FAILURE, False),
        ("admit", True, 0, 0, 1, False),
        ("record", 0, FAILURE, False),
        ("advance", 1.0),
        ("call", SUCCESS, False),
    ]
    harness.run((1, 0.5, ops))


# ---------------------------------------------------------------- planted bugs


def _python_no_growth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(breaker_module, "open_time", lambda cfg, reopens: cfg.open_s)


def _python_ratio_on_failure_only(monkeypatch: pytest.MonkeyPatch) -> None:
    real = breaker_module.BreakerState._should_open

    def should_open(self: Any, now: float) -> bool:
        return self.consecutive > 0 and real(self, now)  # right after a success: 0

    monkeypatch.setattr(breaker_module.BreakerState, "_should_open", should_open)


def _python_gcra_one_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = local_module.gcra

    def gcra(tat: float, now: float, interval: float, tolerance: float, cost: int = 1) -> Any:
        return real(tat, now, interval, tolerance + interval, cost)

    monkeypatch.setattr(local_module, "gcra", gcra)


def _python_credit_never_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    real = local_module.spend_credit
    monkeypatch.setattr(
        local_module,
        "spend_credit",
        lambda credit, expires, now, interval, cost=1: real(credit, math.inf, now, interval, cost),
    )


def _python_credit_not_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    real = local_module.earn_credit
    monkeypatch.setattr(
        local_module,
        "earn_credit",
        lambda credit, expires, units, now, interval, tol, window: real(
            credit, expires, units, now, interval, math.inf, window
        ),
    )


def _python_refund_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        local_module,
        "refund_seconds",
        lambda admitted, now, interval, cost, refunded=0.0: cost * interval,
    )


def _python_refund_ignores_refunded(monkeypatch: pytest.MonkeyPatch) -> None:
    real = local_module.refund_seconds
    monkeypatch.setattr(
        local_module,
        "refund_seconds",
        lambda admitted, now, interval, cost, refunded=0.0: real(admitted, now, interval, cost),
    )


def _python_refund_any_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    def refund(self: BudgetWindow, now: float, age_s: float, spent_at: float | None = None) -> bool:
        self._rotate(now)
        for index in range(len(self.retries)):
            if self.retries[index] > 0:
                self.retries[index] -= 1
                return True
        # nothing in the window: a retry from a bucket gone is taken off anyway
        self.retries[self._index] -= 1
        return True

    monkeypatch.setattr(budget_module.BudgetWindow, "refund", refund)


def _lua(*edits: tuple[str, str]) -> Callable[[pytest.MonkeyPatch], None]:
    def plant(monkeypatch: pytest.MonkeyPatch) -> None:
        patch_scripts(monkeypatch, (*LONG_TTL, *edits))

    return plant


PLANTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    # Python (the memory store / decide)
    "py: open time does not grow": _python_no_growth,
    "py: ratio checked on failures only": _python_ratio_on_failure_only,
    "py: gcra admits one unit over the burst": _python_gcra_one_extra,
    "py: refund gives back units that refilled": _python_refund_everything,
    "py: a refund ignores the seconds refunded before": _python_refund_ignores_refunded,
    "py: retry credit never expires": _python_credit_never_expires,
    "py: retry credit is not capped at the burst": _python_credit_not_capped,
    # Lua (the Redis store)
    "lua: every transition drops the probe slots": _lua(
        (
            "  if state == 'closed' then\n    redis.call('DEL', b.pkey)\n  else\n",
            "  redis.call('DEL', b.pkey)\n  if false then\n",
        )
    ),
    "lua: one probe more than configured": _lua(
        ("if inflight < b.cfg.probes then", "if inflight <= b.cfg.probes then")
    ),
    "lua: ratio checked on failures only": _lua(
        (
            "  -- every outcome, a success too: F,F,F,S reaches min_calls on the success\n"
            "  if br_should_open(b, now) then",
            "  if failed and br_should_open(b, now) then",
        )
    ),
    "lua: gcra slack of a whole interval": _lua(
        ("if allow_at - now > slack then", "if allow_at - now > interval then")
    ),
    "lua: open time does not grow": _lua(
        ("local t = first * 2 ^ reopens", "local t = cfg.open_s")
    ),
    "lua: a coalesced batch decides on a later clock": _lua(
        (
            "    ok, reply = pcall(admit_at, values, 3, keys, now)\n",
            "    now = now + 0.01\n    ok, reply = pcall(admit_at, values, 3, keys, now)\n",
        )
    ),
    "lua: a refund ignores the seconds refunded before": _lua(
        ("local outstanding = admitted - refunded - now", "local outstanding = admitted - now")
    ),
    "lua: an admission from credit moves the TAT": _lua(
        (
            "allowed, code, credit, retry = true, 2, left, 0",
            "allowed, code, credit, retry, tat = true, 2, left, 0, tat + cost * interval",
        )
    ),
    "lua: retry credit is not capped at the burst": _lua(
        ("  if credit > tol then\n    credit = tol", "  if credit > 1e9 then\n    credit = tol")
    ),
    "lua: an admission from credit reported as a plain one": _lua(
        (
            "        allowed, code, credit, retry = true, 2, left, 0",
            "        allowed, code, credit, retry = true, 1, left, 0",
        )
    ),
    "lua: budget counts a denied retry": _lua(
        ("if w.want and allowed then", "if w.want then")
    ),
    "lua: a budget refund from a bucket that left the window": _lua(
        ("if back < 0 or back + passed >= BUCKETS then", "if back < 0 then")
    ),
    "lua: a budget refund from the current bucket": _lua(
        ("local j = (ix - back) % BUCKETS + 1", "local j = ix + 1")
    ),
    "py: a budget refund from a bucket that left the window": _python_refund_any_bucket,
}  # fmt: skip


@pytest.mark.parametrize("name", list(PLANTS))
def test_planted_bug_is_caught(
    name: str, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    if name.startswith("py:") and fidelity_mw.compiled:
        # the compiled modules call these directly: a patched module attribute never runs
        pytest.skip("compiled build: the plant patches a function compiled code binds")
    PLANTS[name](monkeypatch)

    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: we only need "caught"
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(case=cases)
    @example(case=CREDIT_CASE)
    @example(case=BUDGET_CASE)
    @example(case=PROBE_SLOTS_CASE)
    @example(case=PROBE_COUNT_CASE)
    def differential(case: tuple[int, float, list[tuple[Any, ...]]]) -> None:
        harness.run(case)

    # Caught: a sequence failed. Hypothesis calls it flaky when the failing sequence then
    # passes on its replay (seen once, in the compiled build, while the store's background
    # flushes ran on the wall clock; the harness now gives the store a fake clock); the
    # failure it saw first would still be the plant's.
    with pytest.raises((AssertionError, FlakyFailure)) as caught:
        differential()
    if isinstance(caught.value, FlakyFailure):
        assert all(isinstance(e, AssertionError) for e in caught.value.exceptions)


# ---------------------------------------------------------------- tiered, within its bound


tiered_op = st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.02, 0.05, 0.1, 0.3, 1.0])),
    st.tuples(st.just("admit"), st.integers(0, 1), st.integers(1, 4)),
    # a per-request cost: requests of several costs on one counter
    st.tuples(st.just("admit"), st.integers(0, 1), st.integers(1, 2), st.integers(1, 8)),
    # a check without counting (of this cost), then that request at once
    st.tuples(st.just("peek"), st.integers(0, 1), st.integers(1, 8)),
    st.tuples(st.just("refund"), st.integers(0, 20)),
    st.tuples(
        st.just("sync"),
    ),
)
TIERED_LIMIT = LimitSpec("t", 0.1, 0.8, 1, False)  # 10/s, burst 8


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(tiered_op, min_size=5, max_size=40))
def test_tiered_stays_within_its_bound(
    redis_url: str, redis_clock: RedisClock, ops: list[tuple[Any, ...]]
) -> None:
    """From a fresh bucket, one tiered instance admits at most rate x t + burst units
    (net of refunds) per key, whatever the order of admits, refunds and syncs."""
    asyncio.run(_run_tiered(redis_url, ops))


async def _run_tiered(url: str, ops: Sequence[tuple[Any, ...]]) -> None:
    client = redis_sync.Redis.from_url(url, socket_timeout=2.0)
    client.flushdb()
    clock = FakeClock(start=T0)
    client.set(CLOCK_KEY, repr(T0))
    config = StateConfig(url="tiered+" + url, sync_interval_ms=100, **PATIENT)
    store = TieredStore(config=config, rng=lambda: 0.5, clock=clock)
    store._last_sync = math.inf  # syncs only when the sequence says so
    net: dict[str, int] = {}
    admitted: list[tuple[str, str, float, LimitSpec]] = []
    rate = Fraction(1) / Fraction(TIERED_LIMIT.interval_s)
    burst = Fraction(TIERED_LIMIT.tolerance_s) / Fraction(TIERED_LIMIT.interval_s)
    try:
        for step in ops:
            now = clock.monotonic()
            if step[0] == "advance":
                clock.advance(step[1])
                client.set(CLOCK_KEY, repr(clock.monotonic()))
            elif step[0] == "admit":
                key = f"t|c{step[1]}"
                spec = TIERED_LIMIT._replace(cost=step[3]) if len(step) > 3 else TIERED_LIMIT
                for _ in range(step[2]):
                    result = await store.admit(None, None, [key], [spec], now)
                    if result.admitted:
                        net[key] = net.get(key, 0) + spec.cost
                        admitted.append((key, result.source, result.limits[0].tat, spec))
            elif step[0] == "peek":
                key = f"t|c{step[1]}"
                spec = TIERED_LIMIT._replace(cost=step[2])
                held = {k: (sl.tokens, sl.ready_at) for k, sl in store.slices.items()}
                stored = client.get(store.exact.key("rl", key))
                peeked = await store.peek([key], [spec], now)
                assert {k: (sl.tokens, sl.ready_at) for k, sl in store.slices.items()} == held
                assert client.get(store.exact.key("rl", key)) == stored
                sl = store.slices.get(key)
                blocked = sl is not None and sl.blocked_until > now
                result = await store.admit(None, None, [key], [spec], now)
                # A refusal is sure: the slice and the bucket together hold too little.
                assert peeked.admitted or not result.admitted, (peeked, result)
                # And what they hold together serves the request (the lease takes what
                # the slice lacks, whatever cost the key saw before), unless the key's
                # refusal is cached (a saturated key, blocked: docs/state.md)
                assert result.admitted or not peeked.admitted or blocked, (peeked, result)
                if result.admitted:
                    net[key] = net.get(key, 0) + spec.cost
                    admitted.append((key, result.source, result.limits[0].tat, spec))
            elif step[0] == "refund" and admitted:
                key, source, tat, spec = admitted.pop(step[1] % len(admitted))
                back_to_slice = source == "redis" and tat == 0.0 and key in store.slices
                await store.refund([key], [spec], source, now, [tat])
                # a slice verdict (also one that waited for its lease) goes back to the slice
                if source == "cache" or tat > 0.0 or back_to_slice:
                    net[key] -= spec.cost
            elif step[0] == "sync":
                await store._sync_all(now)
            elapsed = Fraction(clock.monotonic() - T0)
            for key, units in net.items():
                assert units <= rate * elapsed + burst + TOKEN_TOL, (key, units, float(elapsed))
    finally:
        await store.aclose()
        client.close()


# Two instances on one Redis, requests arriving in batches (one event-loop tick each:
# they share one lease call, and those a shared lease left short are decided exactly,
# on the bucket alone), of several costs, with refunds and syncs in between.
fleet_op = st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.02, 0.05, 0.1, 0.3, 1.0])),
    st.tuples(
        st.just("batch"),
        st.integers(0, 1),  # which instance
        st.integers(0, 1),  # which client
        st.lists(st.integers(0, 10), min_size=1, max_size=12),  # costs (burst 8), at once
    ),
    st.tuples(st.just("refund"), st.integers(0, 40)),
    st.tuples(st.just("sync"), st.integers(0, 1)),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(fleet_op, min_size=5, max_size=30))
def test_tiered_fleet_with_batched_arrivals_stays_within_its_bound(
    redis_url: str,
    redis_clock: RedisClock,
    ops: list[tuple[Any, ...]],
) -> None:
    """From a fresh bucket, two tiered instances together admit at most rate x t + burst
    units (net of refunds) per key, whatever batches arrive where: a request a shared
    lease left short goes to Redis on the bucket alone, which under-admits (the units its
    slice holds wait for the next request) and never over-admits (a slice's units were
    taken from the bucket when leased)."""
    asyncio.run(_run_tiered_fleet(redis_url, ops))


async def _run_tiered_fleet(url: str, ops: Sequence[tuple[Any, ...]]) -> None:
    client = redis_sync.Redis.from_url(url, socket_timeout=2.0)
    client.flushdb()
    clock = FakeClock(start=T0)
    client.set(CLOCK_KEY, repr(T0))
    config = StateConfig(url="tiered+" + url, sync_interval_ms=100, **PATIENT)
    stores = [TieredStore(config=config, rng=lambda: 0.5, clock=clock) for _ in range(2)]
    for store in stores:
        store._last_sync = math.inf  # syncs only when the sequence says so
    net: dict[str, int] = {}
    admitted: list[tuple[int, str, str, float, LimitSpec]] = []
    rate = Fraction(1) / Fraction(TIERED_LIMIT.interval_s)
    burst = Fraction(TIERED_LIMIT.tolerance_s) / Fraction(TIERED_LIMIT.interval_s)
    try:
        for step in ops:
            now = clock.monotonic()
            if step[0] == "advance":
                clock.advance(step[1])
                client.set(CLOCK_KEY, repr(clock.monotonic()))
            elif step[0] == "batch":
                _, which, who, costs = step
                key = f"t|c{who}"
                specs = [TIERED_LIMIT._replace(cost=cost) for cost in costs]
                store = stores[which]
                results = await asyncio.gather(
                    *(store.admit(None, None, [key], [spec], now) for spec in specs)
                )
                for spec, result in zip(specs, results, strict=True):
                    if result.admitted:
                        net[key] = net.get(key, 0) + spec.cost
                        tat = result.limits[0].tat
                        admitted.append((which, key, result.source, tat, spec))
            elif step[0] == "refund" and admitted:
                which, key, source, tat, spec = admitted.pop(step[1] % len(admitted))
                store = stores[which]
                back_to_slice = source == "redis" and tat == 0.0 and key in store.slices
                await store.refund([key], [spec], source, now, [tat])
                # a slice verdict (also one that waited for its lease) goes back to the slice
                if source == "cache" or tat > 0.0 or back_to_slice:
                    net[key] -= spec.cost
            elif step[0] == "sync":
                await stores[step[1]]._sync_all(now)
            elapsed = Fraction(clock.monotonic() - T0)
            for key, units in net.items():
                assert units <= rate * elapsed + burst + TOKEN_TOL, (key, units, float(elapsed))
    finally:
        for store in stores:
            await store.aclose()
        client.close()


def test_a_unit_leased_ahead_conforms_one_interval_after_the_bucket_base(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """Found by Hypothesis: sync.lua reported a unit leased ahead as conforming at
    base - tolerance, one interval early, so the slice spent it early and the
    instance admitted 10 units in 0.12 s where rate x t + burst is 9.2."""
    ops: list[tuple[Any, ...]] = [
        ("admit", 0, 1),
        ("advance", 0.1),
        ("admit", 0, 3),
        ("admit", 0, 4),
        ("sync",),
        ("sync",),
        ("advance", 0.02),
        ("admit", 0, 2),
    ]
    asyncio.run(_run_tiered(redis_url, ops))


def test_units_leased_ahead_past_the_first_conform_one_interval_apart(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """Found by Hypothesis: when the first unit of a lease reaching ahead conformed
    already, the slice took every unit of it as usable at once; the second conforms one
    interval later (10 units in 0.15 s where rate x t + burst is 9.5)."""
    ops: list[tuple[Any, ...]] = [
        ("sync",), ("admit", 0, 4), ("refund", 20), ("sync",), ("sync",), ("refund", 18),
        ("admit", 0, 4), ("sync",), ("admit", 0, 1), ("admit", 0, 3), ("admit", 1, 4),
        ("sync",), ("admit", 1, 2), ("refund", 0), ("advance", 0.1), ("refund", 10),
        ("admit", 0, 1), ("refund", 19), ("admit", 0, 2), ("advance", 0.05), ("sync",),
        ("sync",), ("sync",), ("admit", 0, 2), ("advance", 0.3),
    ]  # fmt: skip
    asyncio.run(_run_tiered(redis_url, ops))


def test_a_slice_and_the_bucket_together_serve_a_costlier_request(
    redis_url: str, redis_clock: RedisClock
) -> None:
    """Found by Hypothesis (review 17): a request of 1, then one of 4 (leases of 2 and
    4: the slice holds 1, the bucket 2), then a peek of 3 says yes and the request of 3
    was refused: its lease asked for the largest cost seen (4) all or nothing, where 2
    more units served it."""
    ops: list[tuple[Any, ...]] = [("admit", 1, 1), ("admit", 1, 4), ("peek", 1, 3)]
    asyncio.run(_run_tiered(redis_url, ops))


# Limit a (2/s, burst 3, credit 0.3 s): a burst of 3 whose refunds come once the units
# refilled (the bucket gets nothing back, the key 3 units of credit), 3 more refunded at
# once (their units come back, and the credit stays capped at the burst), a burst that
# takes the bucket and then the credit, a credit admission refunded (its credit comes
# back, the TAT stays), then the credit expires. Also an explicit case for every plant.
CREDIT_CASE: tuple[int, float, list[tuple[Any, ...]]] = (
    0,
    0.5,
    [
        ("admit", False, 1, 0, 3, False),
        ("advance", 2.5),
        ("admit", False, 1, 0, 3, False),
        *[("refund", 0)] * 6,
        ("admit", False, 1, 0, 8, False),  # 3 from the bucket, 3 from credit, 2 refused
        ("refund", 20),  # the last one admitted: from credit
        ("admit", False, 1, 0, 2, False),  # its credit back: 1 admitted, 1 refused
        ("advance", 0.1),
        ("refund", 0),
        ("advance", 1.0),  # expired
        ("admit", False, 1, 0, 4, True),
    ],
)


def test_retry_credit_earned_capped_spent_refunded_and_expired(harness: Harness) -> None:
    seq = harness.run(CREDIT_CASE)
    assert seq.credit_admissions == 4


def test_a_refund_after_another_refund(harness: Harness) -> None:
    """Found by Hypothesis: a refund shifts every later request's units back in the
    refill order, so a later request's admission TAT overstates how long its units
    stay out; refunding it by that TAT gave back a unit that had already refilled
    and the bucket admitted one request more than rate x t + burst."""
    ops: list[tuple[Any, ...]] = [
        ("admit", True, 2, 0, 2, False),
        ("refund", 0),
        ("admit", True, 2, 0, 1, False),
        ("advance", 0.25),
        ("advance", 0.75),
        ("refund", 0),
        ("admit", True, 2, 0, 1, False),
        ("refund", 0),
        ("admit", True, 2, 0, 2, False),
    ]
    harness.run((0, 0.5, ops))


# ---------------------------------------------------------------- tiered breakers, replayed


tiered_breaker_op = st.one_of(
    st.tuples(st.just("advance"), st.sampled_from([0.01, 0.05, 0.1, 0.3, 0.7])),
    # calls admitted on the cached breaker and ended: (failed, slow) each, in order
    st.tuples(
        st.just("calls"),
        st.lists(
            st.tuples(st.sampled_from([False, False, True]), st.sampled_from([False, True])),
            min_size=1,
            max_size=12,
        ),
    ),
    st.tuples(st.just("sync")),
)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    index=st.sampled_from(range(len(BREAKERS))),
    ops=st.lists(tiered_breaker_op, min_size=3, max_size=30),
)
@example(index=0, ops=[("calls", [(True, False), (True, False), *[(False, False)] * 3]), ("sync",)])
# min_calls 3, ratio 0.6: F, F, then a run of successes whose first reaches min_calls (2 of 3)
@example(index=1, ops=[("calls", [(True, False), (True, False), *[(False, False)] * 4]), ("sync",)])
# an outcome exactly window_s old at a sync, Redis's window turned at an empty sync between
# (found by hypothesis: an ulp apart, the two windows read it differently at that instant)
@example(
    index=0,
    ops=[
        ("calls", [(True, False)]),
        ("sync",),
        *[("advance", d) for d in (0.3, 0.7, 0.7)],
        ("sync",),
        ("advance", 0.3),
        ("sync",),
    ],
)
def test_tiered_breaker_outcomes_open_it_as_the_model_does(
    redis_url: str, redis_clock: RedisClock, index: int, ops: list[tuple[Any, ...]]
) -> None:
    """A tiered instance counts a closed breaker's outcomes locally and sends them with
    its next sync: sync.lua replays them in order, so the breaker in Redis ends as the
    model's does when the same outcomes are recorded one by one at the sync's instant
    (state, epoch, open-until, and the window while closed), a failure streak they
    complete opening once it stood two sync intervals (`decide.breaker.streak_stands`,
    fle41). Until it opens: from there half-open probes are exact (RedisStore.admit,
    held to the model above)."""
    asyncio.run(_run_tiered_breaker(redis_url, BREAKERS[index], ops))


def _window_reader(
    breaker: BreakerConfig, buckets: list[list[int]], bucket_end: float
) -> Callable[[float], tuple[int, int, int]]:
    """A breaker window's totals at an instant, read from a fresh copy each time (a read
    turns the window it reads)."""

    def totals_at(at: float) -> tuple[int, int, int]:
        ring = breaker_module.BreakerState(breaker)
        ring.buckets = [list(b) for b in buckets]
        ring._totals = [sum(b[0] for b in buckets), sum(b[1] for b in buckets)]
        ring._totals.append(sum(b[2] for b in buckets))
        ring._bucket_end = bucket_end
        return ring.totals(at)

    return totals_at


async def _run_tiered_breaker(url: str, breaker: BreakerConfig, ops: Sequence[Any]) -> None:
    client = redis_sync.Redis.from_url(url, socket_timeout=2.0)
    client.flushdb()
    clock = FakeClock(start=T0)
    client.set(CLOCK_KEY, repr(T0))
    # a copy that stays fresh between the syncs the sequence makes
    config = StateConfig(url="tiered+" + url, sync_interval_ms=60_000, **PATIENT)
    store = TieredStore(config=config, rng=lambda: 0.5, clock=clock)
    store._last_sync = math.inf
    memory = MemoryStore(rng=lambda: 0.5)
    pending: list[tuple[Gate, str, bool]] = []  # the memory store's, recorded at the sync
    counted_at = -math.inf
    # the model's streak opens through streak_stands at each sync, not at once
    model = dataclasses.replace(breaker, consecutive_failures=None)
    wait = tiered_module.STREAK_WAIT_SYNCS * config.sync_interval_ms / 1000.0
    since, epoch = 0.0, 0
    try:
        for step in ops:
            now = clock.monotonic()
            if step[0] == "advance":
                clock.advance(step[1])
                client.set(CLOCK_KEY, repr(clock.monotonic()))
            elif step[0] == "calls":
                for failed, slow in step[1]:
                    result = await store.admit(ROUTE, breaker, (), (), now)
                    assert result.gate is not None
                    assert result.gate.verdict == "allow", result
                    mine = await memory.admit(ROUTE, model, (), (), now)
                    assert mine.gate is not None
                    assert mine.gate.verdict == "allow"
                    outcome = FAILURE if failed else SUCCESS
                    await store.record(ROUTE, breaker, result.gate, outcome, slow, now)
                    pending.append((mine.gate, outcome, slow))
                    counted_at = now
            elif step[0] == "sync":
                if pending and now - counted_at > breaker.window_s:
                    pending.clear()  # dropped by both: too old to count as new
                for gate, outcome, slow in pending:
                    await memory.record(ROUTE, model, gate, outcome, slow, now)
                pending.clear()
                await store._sync_all(now)
                state = memory.breakers.get(ROUTE, None)
                if state is not None and state.state == "closed":
                    if state.epoch != epoch:
                        since, epoch = 0.0, state.epoch
                    since, opens = streak_stands(
                        breaker.consecutive_failures, state.consecutive, since, now, wait
                    )
                    if opens:
                        state.force("open", now, lambda: 0.5)
                hkey, _ = store.exact.breaker_keys(ROUTE)
                st_, ep, ou, w, be = client.hmget(hkey, "st", "ep", "ou", "w", "be")
                theirs = ((st_ or b"closed").decode(), int(ep or 0))
                mine_state = (state.state, state.epoch) if state else ("closed", 0)
                assert theirs == mine_state, (theirs, mine_state)
                if state is None:
                    continue
                if state.state != "closed":
                    assert _close(float(ou), state.open_until), (ou, state.open_until)
                    cached = store.breakers[ROUTE]
                    assert (cached.state, cached.epoch) == mine_state
                    return  # from here on, probes are decided exactly
                # Redis's window as the model reads it at `now` (turned only when counted)
                counts = [int(n) for n in w.split(b",")] if w else [0] * 30
                theirs_at = _window_reader(
                    breaker, [counts[j : j + 3] for j in range(0, 30, 3)], float(be or 0.0)
                )
                mine_at = _window_reader(
                    breaker, [list(b) for b in state.buckets], state._bucket_end
                )
                if theirs_at(now) != mine_at(now):
                    # Redis turned its window at every sync, the model only where it
                    # recorded: `be + steps * bucket_s` summed along two paths can differ
                    # by an ulp, which decides a bucket that ends exactly at `now` (an
                    # outcome exactly window_s old). Only there: a millisecond later
                    # both read alike.
                    assert theirs_at(now + 1e-3) == mine_at(now + 1e-3)
                    edge = (now - state._bucket_end) / (breaker.window_s / 10)
                    assert abs(edge - round(edge)) < 1e-6, (now, theirs_at(now), mine_at(now))
    finally:
        await store.aclose()
        client.close()


# ---------------------------------------------------------------- edge values


edge_op = st.one_of(
    # time steps in emission intervals; negative: the clock went back (Redis TIME after a
    # failover to a replica whose clock is behind; the memory store gets the same now)
    st.tuples(st.just("advance"), st.sampled_from([0.0, 0.3, 1.0, 2.5, 1e3, -0.5, -3.0])),
    st.tuples(st.just("advance_burst"), st.sampled_from([0.5, 1.0, -1.0])),
    st.tuples(
        st.just("admit"),
        st.sampled_from([0, 1, 1, 2, -1, -2]),  # cost; -1: the burst, -2: one above it
        st.integers(0, 1),  # which client
        st.integers(1, 3),  # how many at this instant
        st.booleans(),  # in one coalesced batch.lua call
    ),
    st.tuples(st.just("refund"), st.integers(0, 20)),
    st.tuples(st.just("peek"), st.sampled_from([0, 1, 2, -1, -2]), st.integers(0, 1)),
)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    interval=st.sampled_from([1e-7, 1e-6, 1e-3, 0.01, 0.5, 60.0, 86_400.0]),
    burst=st.sampled_from([1, 2, 7, 1000]),
    start=st.sampled_from([T0, 1.8e9, 1_764_900_000.123456]),
    credit=st.sampled_from([0.0, 0.0, 2.0]),  # retry credit, in bursts' worth of time
    ops=st.lists(edge_op, min_size=3, max_size=30),
)
# At 1000/s with a burst of 1000 near today's Unix time a refund that gave back nothing
# (its units had refilled) left a bucket 0.2 units from full, inside the float slack
# (0.21 units): the memory store judged the key again and forgot it, refund.lua leaves a
# key it did not change as it is.
@example(
    interval=1e-3,
    burst=1000,
    start=1.8e9,
    credit=0.0,
    ops=[("admit", 1, 0, 3, False), ("advance", 0.3), ("advance", 2.5), ("refund", 0)],
)
# At 1e6/s the memory store forgot the key's refunded seconds (every marker past within
# its slack) and counted afresh; Redis kept them: R 1e-6 against 3e-6, TATs alike.
@example(
    interval=1e-6,
    burst=7,
    start=T0,
    credit=0.0,
    ops=[
        ("admit", 1, 0, 1, False),
        ("refund", 0),
        ("admit", 1, 0, 2, False),
        ("refund", 0),
        ("advance_burst", 0.5),
        ("refund", 0),
        ("admit", 1, 0, 1, False),
        ("refund", 0),
    ],
)
def test_edge_values_decide_alike(
    harness: Harness,
    interval: float,
    burst: int,
    start: float,
    credit: float,
    ops: list[tuple[Any, ...]],
) -> None:
    """Rates from 1e7/s to 1/day, bursts of 1 to 1000, costs of 0 and above the burst,
    the clock near 0 and at today's Unix time (TIME's doubles), the clock going back,
    keys with braces and non-ASCII: memory and Redis (admit.lua, batch.lua, refund.lua,
    peek.lua) answer alike, and every key Redis holds lives as long as its state is
    needed (TAT + refunded seconds, credit's expiry: the TTL the write logs, LONG_TTL)."""
    spec = LimitSpec("e", interval, burst * interval, 1, False, credit * burst * interval)
    harness.loop.run_until_complete(_run_edges(harness, spec, start, ops))


async def _run_edges(h: Harness, spec: LimitSpec, start: float, ops: Sequence[Any]) -> None:
    """Memory and Redis step by step while the clock runs forward. Once it goes back
    (Redis's TIME after a failover; the memory store runs on a monotonic clock and
    forgets a full bucket's key, which only a clock going back could tell from a fresh
    one) Redis goes on alone, held to the bound: from the start, at most rate x t + burst
    units net of refunds, t the time the clock ran forward (a step back takes no time: a
    TAT it left far ahead is read as an empty bucket, `decide.gcra.CLOCK_STEP_S`)."""
    client, red = h.client, h.red
    client.flushdb()
    red._deferred.clear()
    red._pending.clear()
    red.coalescer._batch = redis_module.BATCH
    memory: MemoryStore | None = MemoryStore(rng=lambda: 0.5)
    burst = _burst(spec)
    keys = ("e|c0", "e|{c1}é")
    now = start
    client.set(CLOCK_KEY, repr(now))
    admitted: list[tuple[str, LimitSpec, float, float, bool]] = []
    net = dict.fromkeys(keys, 0)  # units admitted from the bucket, net of refunds
    decisions = dict.fromkeys(keys, 0)
    latest = now
    forward = 0.0  # the time the clock ran forward: real time, which a step back takes none of

    def cost_of(code: int) -> int:
        return burst if code == -1 else burst + 1 if code == -2 else code

    for step in ops:
        kind = step[0]
        if kind in ("advance", "advance_burst"):
            step_s = step[1] * (spec.interval_s if kind == "advance" else spec.tolerance_s)
            now += step_s
            forward += max(0.0, step_s)
            client.set(CLOCK_KEY, repr(now))
            if now < latest:
                memory = None  # Redis alone from here
        elif kind == "admit":
            _, code, who, repeat, together = step
            one = spec._replace(cost=cost_of(code))
            key = keys[who]
            if together:
                reds = await asyncio.gather(
                    *(red.admit(None, None, [key], [one], now) for _ in range(repeat))
                )
            else:
                reds = [await red.admit(None, None, [key], [one], now) for _ in range(repeat)]
            for r in reds:
                rv = _from_redis(r).limits[0]
                mtat = rv.tat
                if memory is not None:
                    m = await memory.admit(None, None, [key], [one], now)
                    _same_admit(m, r)
                    mtat = m.limits[0].tat
                decisions[key] += 1
                if r.admitted:
                    admitted.append((key, one, mtat, rv.tat, rv.credit))
                    net[key] += 0 if rv.credit else one.cost
        elif kind == "refund" and admitted:
            key, one, mtat, rtat, credit = admitted.pop(step[1] % len(admitted))
            if memory is not None:
                await memory.refund([key], [one], "memory", now, [mtat])
            await red.refund([key], [one], "redis", now, [rtat])
            net[key] -= 0 if credit else one.cost
        elif kind == "peek":
            one = spec._replace(cost=cost_of(step[1]))
            key = keys[step[2]]
            r = _from_redis(await red.peek([key], [one], now))
            if memory is not None:
                m = await memory.peek([key], [one], now)
                assert m.admitted == r.admitted, (m, r)
                for mv, rv in zip(m.limits, r.limits, strict=True):
                    assert (mv.allowed, mv.credit, mv.remaining) == (
                        rv.allowed,
                        rv.credit,
                        rv.remaining,
                    )
                    assert _close(mv.reset_s, rv.reset_s), (mv, rv)
                    assert _close(mv.retry_after_s, rv.retry_after_s), (mv, rv)
        if not red.up:
            raise RedisUnavailable("redis failed during the test")
        latest = max(latest, now)
        logged = client.hgetall(TTL_LOG)
        client.delete(TTL_LOG)
        for key in keys:
            # Each admission stores its TAT rounded to a double of the clock's size: near
            # today's Unix time (an ulp is 2.4e-7 s) that is a whole unit at 1e6/s, and the
            # roundings add up (docs/state.md, "Precision"); on a clock near 0, nothing.
            rounding = decisions[key] * math.ulp(latest) / spec.interval_s + 1.0
            bound = forward / spec.interval_s + burst + rounding
            assert net[key] <= bound, (key, net[key], bound)
            ttl_ms = logged.get(red.key("rl", key).encode())
            _same_key(memory, red, client, key, now, ttl_ms)


def _same_key(
    memory: MemoryStore | None,
    red: RedisStore,
    client: redis_sync.Redis,
    key: str,
    now: float,
    ttl_ms: bytes | None,
) -> None:
    """One limit key, held alike: TAT (as a fill level at `now`), refunded seconds and
    retry credit; and Redis keeps the key as long as any of them is needed."""
    rkey = red.key("rl", key)
    raw = client.get(rkey)
    if raw is None:
        theirs = (None, 0.0, (0.0, 0.0))
    else:
        f = [float(x) for x in raw.split()]
        credit = (f[2], f[3]) if len(f) > 2 and f[3] > now else (0.0, 0.0)
        theirs = (f[0], f[1] if len(f) > 1 else 0.0, credit)
        # a credit's expiry keeps the key only with a credit: the burst record's fifth
        # field makes a key of "tat refunded 0 0 wrote" (a clock stepped back below 0
        # would read that expiry 0 as in the future)
        live = len(f) > 3 and f[2] > 0.0
        need = max(f[0] + (f[1] if len(f) > 1 else 0.0), f[3] if live else -math.inf)
        if ttl_ms is not None:  # written in this step, at `now`: what production set
            assert int(ttl_ms) >= (need - now) * 1000.0 - 1e-6, (key, raw, ttl_ms, need - now)
            assert int(ttl_ms) <= max(1.0, (need - now) * 1000.0 + 1.0), (key, raw, ttl_ms)
    if memory is None:
        return
    table = memory.limits
    mine_tat = table.tats.get(key)
    mine_refunded = table.refunded.get(key, 0.0) if mine_tat is not None else 0.0
    mine_credit = table.credits.get(key, (0.0, 0.0))
    if mine_credit[1] <= now:
        mine_credit = (0.0, 0.0)

    # a key's fill level at `now` (a TAT at or before now is a full bucket)
    def level(tat: float | None) -> float:
        return 0.0 if tat is None else max(0.0, tat - now)

    assert _close(level(mine_tat), level(theirs[0])), (key, mine_tat, theirs, now)
    # (Redis may keep a key's refunded seconds past TAT + R until the key expires, on its
    # own milliseconds; the memory store forgets them once every marker is past, within
    # its float slack, and may then count afresh from 0 while Redis still adds to the
    # old R. Harmless: a marker is TAT + R of its own store, and a refund reads
    # marker - R, so the TAT levels above agree; Redis's R is never the smaller.)
    if mine_refunded > 0.0 and not _close(mine_refunded, theirs[1]):
        assert mine_refunded < theirs[1], (key, mine_refunded, theirs)
    assert _close(mine_credit[0], theirs[2][0]), (key, mine_credit, theirs)
