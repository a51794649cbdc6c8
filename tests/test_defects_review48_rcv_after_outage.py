"""rcv48: after a whole-service outage, where B's first attempts and its waiting retries go.

benchmarks/hops_blackbox.py `all_503` (C's three instances 503 for 2 s, default policy):
1. The ejection bound kept one of B's known-open instances of C in rotation, and the power
   of two choices weighed it on cost alone against a closed or half-open one: about half
   the first attempts went to an instance B knew open; C's own breaker shed them and their
   retries were what B's retry budget refused (0-11 healthy requests a run). Now such an
   instance is picked only when no untried candidate is better (not known open, or one
   that answered around its open breaker last), as its breaker's probe.
2. The retries waiting for an instance to answer again (`loop._parked`) all went at one
   look to the first instance that answered (~20 within 5 ms at an instance whose breaker
   had just closed). Now they go paced (`decide.balance.ramp_room`: the breaker's
   `half_open_probes` at once, twice as many every 50 ms), to the instance with the fewest
   requests in flight among those that answer, and never later than their wait's end.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest
from tests.test_balance import KEYS, Fleet, service_policy, service_transport

from fidelity_mw.decide.balance import (
    PICK_BOUND,
    RAMP_STEP_S,
    InstanceView,
    choose,
    ramp_room,
)
from fidelity_mw.decide.breaker import OPEN
from fidelity_mw.engine import Engine
from fidelity_mw.outbound.loop import READ, SLEEP, _parked
from fidelity_mw.outbound.upstream import Instance
from fidelity_mw.policy import BreakerConfig, Policy
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

NOW = 100.0


def _view(open_until: float = 0.0, failed_at: float = 0.0, answered: bool = False) -> InstanceView:
    return InstanceView(0, 0.01, open_until, NOW - 1.0, 0.0, failed_at, answered)


# ---------------------------------------------------------------- 1: the pick


def test_a_first_attempt_prefers_a_half_open_instance_to_one_the_bound_keeps_open() -> None:
    """Right after an outage: one instance's open time is over (half-open here: it failed
    last), two still open; the bound (one of three) keeps one of those in. Before: the
    kept one won about half the picks (its failure as old); now none."""
    views = [
        _view(open_until=NOW + 2.0, failed_at=NOW - 0.1),  # ejected (open longest)
        _view(open_until=NOW + 0.5, failed_at=NOW - 0.1),  # kept in by the bound
        _view(failed_at=NOW - 0.1),  # its open time over: half-open
    ]
    picks = Counter(choose(views, [], NOW, seeded_random(s)).chosen for s in range(200))
    assert picks == Counter({2: 200})
    # nothing better left (the half-open one tried): the kept one, as the bound says
    again = {choose(views, [2], NOW, seeded_random(s)) for s in range(50)}
    assert {(p.chosen, p.reason, p.bypass) for p in again} == {(1, PICK_BOUND, True)}


def test_an_instance_that_answered_around_its_open_breaker_is_as_good_as_a_closed_one() -> None:
    views = [
        _view(open_until=NOW + 2.0),  # ejected
        _view(open_until=NOW + 0.5, answered=True),  # kept in, and answered around it
        _view(open_until=NOW + 0.4),  # kept in, not answered
    ]
    bound = {"max_ejected_ratio": 0.34}
    picks = Counter(choose(views, [], NOW, seeded_random(s), **bound).chosen for s in range(100))
    assert picks == Counter({1: 100})


@pytest.mark.anyio
async def test_first_attempts_go_to_the_closed_instance_not_to_the_open_one_kept_in() -> None:
    """Two of three breakers open (instances failing), the bound keeps one of them in:
    every first attempt goes to the closed instance. Before, about half went to the open
    one and failed there."""
    fleet = Fleet(**{KEYS[0]: 503, KEYS[1]: 503})
    store = MemoryStore(rng=seeded_random(3))
    breaker = BreakerConfig(open_s=30.0)
    pol = service_policy(breaker=breaker, max_ejected_ratio=0.34, panic_threshold=0.0)
    t = service_transport(fleet, pol, store)
    for key in KEYS[:2]:
        store.breaker_state("upstream:" + key, breaker).force(OPEN, 1_000.0, seeded_random(0))
    firsts: list[str] = []
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(40):
            fleet.seen.clear()
            response = await client.get("http://payments/pay")
            assert response.status_code == 200
            firsts.append(fleet.seen[0])
    assert Counter(firsts) == Counter({KEYS[2]: 40})


# ---------------------------------------------------------------- 2: the waiting retries


def test_the_ramp_doubles_each_step_from_the_probes() -> None:
    assert [ramp_room(n, NOW, NOW, 3) for n in range(4)] == [True, True, True, False]
    assert ramp_room(5, NOW, NOW + RAMP_STEP_S, 3)
    assert not ramp_room(6, NOW, NOW + RAMP_STEP_S, 3)
    assert ramp_room(11, NOW, NOW + 2 * RAMP_STEP_S, 3)
    assert not ramp_room(12, NOW, NOW + 2 * RAMP_STEP_S, 3)
    assert ramp_room(10**6, NOW, NOW + 60.0, 3)  # (no overflow on a long ramp)


class _Rig:
    """Parked retries (`loop._parked`) driven on a fake clock: each sleeps as it asks."""

    def __init__(self, n_instances: int) -> None:
        self.clock = FakeClock()
        engine = Engine(Policy(), clock=self.clock)
        self.instances = [Instance(f"http://10.0.0.{k}:80", engine) for k in range(n_instances)]
        for i in self.instances:  # all known open and failing: the outage
            i.open_until, i.failed_at = self.clock.monotonic() + 5.0, self.clock.monotonic()

    def run(self, n: int, until_s: float, recover: dict[int, float], **kw: Any) -> list[Any]:
        """`n` retries parked at once (the tried list: none), waiting up to `until_s`;
        instance k answers again at `recover[k]` s. (when, instance index) of each
        release, None for one that found none."""
        start = self.clock.monotonic()
        shed = httpx.Response(503)
        gens = [
            _parked(self.instances, [], self.clock, start, start + until_s, shed, **kw)
            for _ in range(n)
        ]
        wake: list[float] = []
        for g in gens:
            assert next(g)[0] == READ
            effect = g.send(None)
            wake.append(start + effect[1])
        out: list[Any] = [None] * n
        live = set(range(n))
        while live:
            k = min(live, key=lambda j: (wake[j], j))
            at = wake[k]
            self.clock.advance(max(0.0, at - self.clock.monotonic()))
            for index, when in recover.items():
                i = self.instances[index]
                if start + when <= self.clock.monotonic() and i.failed_at:
                    i.open_until, i.failed_at = 0.0, 0.0  # a probe closed its breaker
            try:
                effect = g2 = gens[k].send(None)
            except StopIteration as done:
                live.discard(k)
                found = done.value
                if found is not None:
                    out[k] = (round(at - start, 3), self.instances.index(found))
                continue
            assert g2[0] == SLEEP
            wake[k] = at + effect[1]
        return out


def test_waiting_retries_go_paced_not_all_at_once_to_the_first_that_answers() -> None:
    """20 retries parked by one shed wave; instance 0 answers again at 0.12 s, instance 1
    at 0.18 s. Before: all 20 at one look to instance 0. Now: one at first (no breaker:
    one probe), then twice as many each 50 ms, over both instances."""
    released = _Rig(3).run(20, 2.0, {0: 0.12, 1: 0.18})
    assert all(r is not None for r in released)
    per_look = Counter(released)  # (look, instance)
    assert per_look[(0.15, 0)] == 1
    assert max(per_look.values()) <= 8, per_look  # (before: 20 at 0.15 to instance 0)
    assert min(when for when, _ in released) == 0.15  # the first look after it answered
    assert {index for _, index in released} == {0, 1}  # spread as each answers


def test_the_probes_go_at_once_and_none_waits_past_its_wait() -> None:
    """`half_open_probes` = 3 at the first look; with a wait ending 0.05 s after the
    instance answered, every retry goes by the wait's end, paced or not."""
    released = _Rig(3).run(20, 0.2, {0: 0.12}, first=3)
    assert all(r is not None for r in released)
    per_look = Counter(when for when, _ in released)
    assert per_look[0.15] == 3
    assert max(when for when, _ in released) <= 0.2
