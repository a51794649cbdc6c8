"""The balancer weighs an instance that just failed (review 39).

Before, a failure quicker than an instance's latency estimate left the estimate as it
was (a fast 500 is no evidence of speed) and nothing else: the instance failing fast
kept its place in the power of two choices, and won it when its estimate was the
lowest (or unmeasured, when it counts as fast as the fastest). Between services, a
500 that B does not retry goes back to A, whose retry reaches B as a new call: B's
pick fell on the failing instance again, three times out of three in one run of the
real chain (tests/test_defects_review38_hops.py), before any breaker had opened.

Fake clock and seeded randomness; the network is httpx.MockTransport.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityTransport
from fidelity_mw.decide.balance import (
    FAILURE_FADE_S,
    FAILURE_PENALTY,
    InstanceView,
    choose,
    cost,
    failure_weight,
)
from fidelity_mw.decide.breaker import OPEN
from fidelity_mw.engine import Engine
from fidelity_mw.policy import BreakerConfig, Policy, RetryConfig, UpstreamConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio

NOW = 100.0
INSTANCES = ("http://10.0.0.1:8001", "http://10.0.0.2:8002", "http://10.0.0.3:8003")
KEYS = ("10.0.0.1:8001", "10.0.0.2:8002", "10.0.0.3:8003")


def fixed(*values: float) -> Any:
    """A random source answering `values` in turn."""
    it = itertools.cycle(values)
    return lambda: next(it)


def picks(views: list[InstanceView], now: float = NOW) -> Counter[int]:
    """The instance chosen for every pair of draws on a fine grid: the power of two
    choices over all the pairs it can make."""
    grid = [k / 12 for k in range(12)]
    return Counter(choose(views, (), now, fixed(a, b)).chosen for a in grid for b in grid)


# ---------------------------------------------------------------- the pure model


def test_the_weight_of_a_failure_fades_to_nothing() -> None:
    assert failure_weight(0.0, NOW) == 0.0  # none
    assert failure_weight(NOW, NOW) == 1.0
    assert failure_weight(NOW + 1.0, NOW) == 1.0  # (a clock read before it)
    assert failure_weight(NOW - FAILURE_FADE_S / 4, NOW) == pytest.approx(0.75)
    assert failure_weight(NOW - FAILURE_FADE_S, NOW) == 0.0
    assert failure_weight(NOW - 10 * FAILURE_FADE_S, NOW) == 0.0


def test_right_after_a_failure_an_instance_counts_as_slower_than_the_slowest() -> None:
    failed = InstanceView(0, 0.001, 0.0, 0.0, failed_at=NOW)
    # the fastest by far, and still taken for FAILURE_PENALTY times the slowest
    assert cost(failed, 0.001, NOW, 0.010) == pytest.approx(FAILURE_PENALTY * 0.010)
    # fading back to its own estimate
    half = NOW + FAILURE_FADE_S / 2
    assert cost(failed, 0.001, half, 0.010) == pytest.approx(0.001 + (0.040 - 0.001) / 2)
    assert cost(failed, 0.001, NOW + FAILURE_FADE_S, 0.010) == pytest.approx(0.001)
    # unmeasured: the default estimate is its own
    unmeasured = InstanceView(0, 0.0, 0.0, 0.0, failed_at=NOW)
    assert cost(unmeasured, 0.010, NOW, 0.010) == pytest.approx(FAILURE_PENALTY * 0.010)


@pytest.mark.parametrize("latency", [0.001, 0.0])  # the fastest, or unmeasured
def test_the_instance_that_failed_fast_is_not_picked_while_the_others_are_idle(
    latency: float,
) -> None:
    views = [
        InstanceView(0, latency, 0.0, 0.0, failed_at=NOW),
        InstanceView(0, 0.010, 0.0, 0.0),
        InstanceView(0, 0.012, 0.0, 0.0),
    ]
    assert picks(views)[0] == 0
    # without the failure it wins every pair it is drawn in (fastest, or as fast as
    # the fastest and first drawn)
    healthy = [views[0]._replace(failed_at=0.0), *views[1:]]
    assert picks(healthy)[0] > 0


def test_it_is_weighed_not_ejected() -> None:
    """Picked when the others are busier by enough, and again once the failure is old."""
    busy = [
        InstanceView(0, 0.010, 0.0, 0.0, failed_at=NOW),
        InstanceView(4, 0.010, 0.0, 0.0),  # 5 x 10 ms > 4 x 10 ms
        InstanceView(4, 0.010, 0.0, 0.0),
    ]
    assert picks(busy)[0] > 0
    idle = [busy[0], InstanceView(0, 0.010, 0.0, 0.0), InstanceView(0, 0.010, 0.0, 0.0)]
    assert picks(idle)[0] == 0
    later = NOW + FAILURE_FADE_S
    assert picks(idle, later) == picks([v._replace(failed_at=0.0) for v in idle], later)


def test_a_retry_still_falls_back_on_a_failed_instance_when_it_is_the_only_one() -> None:
    views = [InstanceView(0, 0.010, 0.0, 0.0, failed_at=NOW), InstanceView(0, 0.010, NOW + 30, NOW)]
    pick = choose(views, (), NOW, fixed(0.5), max_ejected_ratio=0.5)
    assert pick.chosen == 0  # the other is ejected: the penalty never refuses a call


# ---------------------------------------------------------------- through the transport


class Fleet:
    """Three instances behind one MockTransport; `statuses[key]` answers for that instance;
    each answer takes `latency_s[key]` on the fake clock."""

    def __init__(self, clock: FakeClock, **statuses: int) -> None:
        self.clock = clock
        self.statuses = statuses
        self.latency_s: dict[str, float] = {}
        self.seen: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        key = f"{request.url.host}:{request.url.port}"
        self.seen.append(key)
        self.clock.advance(self.latency_s.get(key, 0.010))
        return httpx.Response(self.statuses.get(key, 200))


def transport(fleet: Fleet, *, breaker: BreakerConfig | None, **cfg: Any) -> tuple[Any, Any]:
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2)  # 500 is not retried (502-504 are)
    up = UpstreamConfig(host="payments", instances=INSTANCES, retry=retry, breaker=breaker, **cfg)
    store = MemoryStore(rng=seeded_random(3))
    engine = Engine(Policy(upstreams=(up,)), clock=fleet.clock, rng=seeded_random(7), store=store)
    return FidelityTransport(httpx.MockTransport(fleet), engine=engine, telemetry=False), store


async def test_a_fast_failing_instance_gets_no_new_call_before_any_breaker_opens() -> None:
    """The chain's case in one process: C0 answers 500 at once (not retried), the others
    in 10 ms. No breaker at all here, so only the balancer can keep calls off C0."""
    fleet = Fleet(FakeClock(), **{KEYS[0]: 500})
    fleet.latency_s[KEYS[0]] = 0.0001
    t, _ = transport(fleet, breaker=None)
    statuses: list[int] = []
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(40):  # 0.4 s of fake time: the first failure still weighs ~0.96
            statuses.append((await client.get("http://payments/pay")).status_code)
        # the instance is back in rotation once its failure has faded (and fails again)
        fleet.clock.advance(FAILURE_FADE_S)
        fleet.seen.clear()
        for _ in range(40):
            await client.get("http://payments/pay")
    assert statuses.count(500) == 1  # its first pick; before: about a third of the calls
    assert fleet.seen.count(KEYS[0]) >= 1


async def test_a_success_after_the_failure_ends_its_weight_at_once() -> None:
    """The two others ejected (their breakers open, within the bound): C0 is the only
    candidate; it fails once, then answers. The pick after its success carries no
    weight of the failure; the pick after the failure carried all of it."""
    clock = FakeClock()
    fleet = Fleet(clock, **{KEYS[0]: 500})
    breaker = BreakerConfig(open_s=60.0)
    t, store = transport(fleet, breaker=breaker, max_ejected_ratio=0.67, panic_threshold=0.0)
    for key in KEYS[1:]:
        store.breaker_state("upstream:" + key, breaker).force(OPEN, 10_000.0, seeded_random(0))
    weights: list[float] = []
    async with httpx.AsyncClient(transport=t) as client:
        for status in (500, 200, 200):
            fleet.statuses[KEYS[0]] = status
            response = await client.get("http://payments/pay")
            assert response.status_code == status
            ctx = response.extensions["fidelity_context"]
            lbs = [d for d in ctx.decisions if d.layer == "lb"]
            assert [d.details["instance"] for d in lbs] == [KEYS[0]]
            weights.append(lbs[0].details["failure_weight"])
    assert weights[0] == 0.0  # nothing failed yet
    assert weights[1] == pytest.approx(1.0, abs=0.01)  # 10 ms after the failure
    assert weights[2] == 0.0  # the success in between ended it


async def test_an_exhausted_callee_is_no_failure_of_the_instance() -> None:
    """A trusted callee that gave up after its own retries (`x-fidelity-retry:
    exhausted`) failed at its upstream, not itself: no weight on the instance."""
    clock = FakeClock()
    fleet = Fleet(clock)

    def exhausted(request: httpx.Request) -> httpx.Response:
        response = fleet(request)
        if request.url.port == 8001:
            headers = {"x-fidelity-retry": "exhausted", "x-fidelity-decided-by": "retry"}
            return httpx.Response(502, headers=headers)
        return response

    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2)
    up = UpstreamConfig(host="payments", instances=INSTANCES, retry=retry, breaker=None)
    engine = Engine(
        Policy(upstreams=(up,), trusted_peers=("10.0.0.0/8",)),
        clock=clock,
        rng=seeded_random(7),
        store=MemoryStore(rng=seeded_random(3)),
    )
    t = FidelityTransport(httpx.MockTransport(exhausted), engine=engine, telemetry=False)
    async with httpx.AsyncClient(transport=t) as client:
        answers = [(await client.get("http://payments/pay")) for _ in range(30)]
    weights = [
        d.details["failure_weight"]
        for r in answers
        for d in r.extensions["fidelity_context"].decisions
        if d.layer == "lb" and d.details["instance"] == KEYS[0]
    ]
    # it keeps its share of the calls (a third; one, were it weighed after its first)
    assert [r.status_code for r in answers].count(502) >= 5
    assert weights
    assert set(weights) == {0.0}


class BrokenBody(httpx.AsyncByteStream):
    """A body that breaks off after its first chunk."""

    async def __aiter__(self) -> Any:
        yield b"par"
        raise httpx.ReadError("connection reset")


async def test_a_body_that_broke_weighs_its_instance_up() -> None:
    """C0 answers 200 and then breaks off its body (after the attempt looked a success):
    the body's break weighs C0 up as a failed attempt does. Before, the success had ended
    any weight and C0 kept a third of the calls until its breaker opened."""
    clock = FakeClock()

    def network(request: httpx.Request) -> httpx.Response:
        key = f"{request.url.host}:{request.url.port}"
        seen.append(key)
        clock.advance(0.010)
        if key == KEYS[0]:
            return httpx.Response(200, stream=BrokenBody())
        return httpx.Response(200, text="ok")

    seen: list[str] = []
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2)
    up = UpstreamConfig(
        host="payments", instances=INSTANCES, retry=retry, breaker=BreakerConfig(open_s=60.0)
    )
    engine = Engine(
        Policy(upstreams=(up,)),
        clock=clock,
        rng=seeded_random(7),
        store=MemoryStore(rng=seeded_random(3)),
    )
    t = FidelityTransport(httpx.MockTransport(network), engine=engine, telemetry=False)
    broke = 0
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(30):
            try:
                await client.get("http://payments/pay")
            except httpx.ReadError:
                broke += 1
    assert broke == 1  # C0's first pick; then the others take the calls
    assert seen.count(KEYS[0]) == 1
