"""Services with instances: the pure balancer (decide/balance.py) and the transport using it.

Fake clock and seeded randomness throughout; the upstream is httpx.MockTransport.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fidelity_mw import FidelitySyncTransport, FidelityTransport
from fidelity_mw.decide.balance import (
    PICK_BOUND,
    PICK_ONLY,
    PICK_P2C,
    PICK_PANIC,
    InstanceView,
    choose,
    ejected,
    ewma,
    open_in_rotation,
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


def view(outstanding: int = 0, latency: float = 0.01, open_until: float = 0.0) -> InstanceView:
    return InstanceView(outstanding, latency, open_until, NOW - 1.0)


# ---------------------------------------------------------------- the pure balancer


def test_p2c_prefers_fewer_outstanding_weighted_by_latency() -> None:
    rng = seeded_random(1)
    views = [view(outstanding=5), view(outstanding=0), view(outstanding=0, latency=1.0)]
    picks = Counter(choose(views, [], NOW, rng).chosen for _ in range(300))
    # the idle fast instance wins every pair it is in; the busy one and the slow one
    # only win against each other (cost 0.06 vs 1.0: the busy fast one)
    assert picks[1] > picks[0] > 0
    assert picks[2] == 0


def test_unmeasured_instance_is_tried() -> None:
    views = [view(latency=0.05), view(latency=0.0)]
    pick = choose(views, [], NOW, seeded_random(2))
    assert pick.chosen == 1
    assert pick.reason == PICK_P2C


def test_a_retry_avoids_instances_already_tried() -> None:
    views = [view(), view(), view()]
    for seed in range(50):
        pick = choose(views, [0, 1], NOW, seeded_random(seed))
        assert pick.chosen == 2
        assert pick.reason == PICK_ONLY
    # all tried: any admissible one again, rather than none
    assert choose(views, [0, 1, 2], NOW, seeded_random(0)).chosen in (0, 1, 2)


def test_never_an_ejected_instance() -> None:
    views = [view(open_until=NOW + 5), view(), view()]
    assert ejected(views, NOW, 0.5) == {0}
    for seed in range(100):
        assert choose(views, [], NOW, seeded_random(seed)).chosen != 0
    # its open time over, it is admissible again
    assert ejected(views, NOW + 5.0, 0.5) == set()


def test_ejection_bound_keeps_the_nearest_to_recovery_in() -> None:
    views = [view(open_until=NOW + 5), view(open_until=NOW + 1), view(), view()]
    assert ejected(views, NOW, 0.25) == {0}  # bound 1 of 4: the one open longest
    assert ejected(views, NOW, 0.5) == {0, 1}
    assert ejected(views, NOW, 0.0) == {0}  # at least one may always be ejected
    # kept in rotation, it is picked only when no instance not known open is left (round
    # 48: it won the power of two choices against closed ones on cost alone before)
    picks = {choose(views, [], NOW, seeded_random(s), max_ejected_ratio=0.25) for s in range(60)}
    assert {p.chosen for p in picks} == {2, 3}
    assert not any(p.bypass for p in picks)
    picks = {
        choose(views, [2, 3], NOW, seeded_random(s), max_ejected_ratio=0.25) for s in range(60)
    }
    assert {(p.chosen, p.reason, p.bypass) for p in picks} == {(1, PICK_BOUND, True)}


def test_open_instances_in_rotation_beyond_the_bound_or_in_panic() -> None:
    closed = view()
    shut = view(open_until=NOW + 5)
    assert not open_in_rotation([closed, closed, closed], NOW)
    assert not open_in_rotation([shut, closed, closed], NOW)  # ejected: within the bound of 1
    assert open_in_rotation([shut, shut, closed], NOW)  # the bound keeps one of them in
    assert open_in_rotation([shut, shut, shut], NOW)
    assert open_in_rotation([shut], NOW)  # ejected, none admissible: panic uses it
    # every open one ejected, one admissible of three: panic below a threshold of 0.5 ...
    assert open_in_rotation([shut, shut, closed], NOW, max_ejected_ratio=1.0)
    # ... and not below 0.3: the closed instance takes the traffic
    assert not open_in_rotation(
        [shut, shut, closed], NOW, panic_threshold=0.3, max_ejected_ratio=1.0
    )
    assert not open_in_rotation([view(open_until=NOW), closed], NOW)  # its open time is over


def test_panic_spreads_over_all_instances() -> None:
    views = [view(open_until=NOW + 5), view(open_until=NOW + 5), view()]
    picks = [
        choose(views, [], NOW, seeded_random(s), panic_threshold=0.5, max_ejected_ratio=1.0)
        for s in range(60)
    ]
    assert {p.chosen for p in picks} == {0, 1, 2}
    assert {p.reason for p in picks} == {PICK_PANIC}
    assert all(p.panic and p.admissible == 1 for p in picks)
    # above the threshold: no panic
    calm = choose(views, [], NOW, seeded_random(0), panic_threshold=0.3, max_ejected_ratio=1.0)
    assert calm.chosen == 2
    assert not calm.panic


def test_ewma_moves_towards_samples_and_forgets_with_time() -> None:
    assert ewma(0.0, 0.0, 0.2, NOW, 5.0) == 0.2  # the first sample as it is
    near = ewma(0.1, NOW - 0.1, 1.0, NOW, 5.0)
    far = ewma(0.1, NOW - 50.0, 1.0, NOW, 5.0)
    assert 0.1 < near < far <= 1.0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.floats(0.0, 5.0), st.floats(0.0, 200.0)),
        min_size=1,
        max_size=12,
    ),
    st.sets(st.integers(0, 11)),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.integers(0, 2**32),
)
def test_property_an_attempt_is_never_refused_when_an_instance_is_admissible(
    specs: list[tuple[int, float, float]],
    tried: set[int],
    panic: float,
    bound: float,
    seed: int,
) -> None:
    views = [InstanceView(o, lat, until, 0.0) for o, lat, until in specs]
    admissible = [i for i, v in enumerate(views) if v.open_until <= NOW]
    pick = choose(views, tried, NOW, seeded_random(seed), panic_threshold=panic,
                  max_ejected_ratio=bound)  # fmt: skip
    assert 0 <= pick.chosen < len(views)
    if admissible and not pick.panic:
        # an instance not known open is preferred to a bypassed one only by the bound
        out = ejected(views, NOW, bound)
        assert pick.chosen not in out
    if any(i not in tried for i in range(len(views)) if i not in ejected(views, NOW, bound)):
        assert pick.panic or pick.chosen not in tried


# ---------------------------------------------------------------- through the transport


class Fleet:
    """Three instances behind one MockTransport; `statuses[key]` answers for that instance."""

    def __init__(self, **statuses: int) -> None:
        self.statuses = statuses
        self.seen: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        key = f"{request.url.host}:{request.url.port}"
        self.seen.append(key)
        assert request.headers["host"] == "payments"  # the logical host travels on
        return httpx.Response(self.statuses.get(key, 200))


def service_policy(**upstream: Any) -> Policy:
    retry = RetryConfig(attempts=3, base_ms=1, max_ms=2)
    cfg = UpstreamConfig(host="payments", instances=INSTANCES, retry=retry, **upstream)
    return Policy(upstreams=(cfg,))


def service_transport(fleet: Fleet, pol: Policy, store: MemoryStore | None = None) -> Any:
    engine = Engine(pol, clock=FakeClock(), rng=seeded_random(7), store=store or MemoryStore())
    return FidelityTransport(httpx.MockTransport(fleet), engine=engine, telemetry=False)


async def test_the_logical_host_is_rewritten_per_attempt_and_each_pick_recorded() -> None:
    fleet = Fleet()
    t = service_transport(fleet, service_policy())
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(30):
            response = await client.get("http://payments/pay?x=1")
            assert response.status_code == 200
            assert response.request.url == httpx.URL("http://payments/pay?x=1")
    assert set(fleet.seen) == set(KEYS)
    lb = [d for d in response.extensions["fidelity_context"].decisions if d.layer == "lb"]
    assert len(lb) == 1
    assert lb[0].subject == "payments"
    assert lb[0].details["instance"] in KEYS
    assert lb[0].reason in (PICK_P2C, PICK_ONLY)
    assert lb[0].state_source == "memory"


async def test_a_retry_goes_to_another_instance() -> None:
    fleet = Fleet(**{KEYS[0]: 503, KEYS[1]: 503})
    t = service_transport(fleet, service_policy(breaker=None))
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(20):
            fleet.seen.clear()
            response = await client.get("http://payments/pay")
            assert response.status_code == 200  # the third instance answers, always in time
            assert len(fleet.seen) == len(set(fleet.seen))  # never the same instance twice
            assert fleet.seen[-1] == KEYS[2]


def test_sync_transport_balances_the_same_way() -> None:
    fleet = Fleet(**{KEYS[0]: 503, KEYS[1]: 503})
    engine = Engine(service_policy(breaker=None), clock=FakeClock(), rng=seeded_random(7))
    t = FidelitySyncTransport(httpx.MockTransport(fleet), engine=engine, telemetry=False)
    with httpx.Client(transport=t) as client:
        for _ in range(10):
            fleet.seen.clear()
            assert client.get("http://payments/pay").status_code == 200
            assert len(fleet.seen) == len(set(fleet.seen))


async def test_never_sends_to_an_instance_whose_breaker_is_open() -> None:
    fleet = Fleet()
    store = MemoryStore(rng=seeded_random(3))
    breaker = BreakerConfig(open_s=30.0)
    t = service_transport(fleet, service_policy(breaker=breaker), store)
    store.breaker_state("upstream:" + KEYS[0], breaker).force(OPEN, 1_000.0, seeded_random(0))
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(40):
            assert (await client.get("http://payments/pay")).status_code == 200
    assert KEYS[0] not in fleet.seen
    assert set(fleet.seen) == {KEYS[1], KEYS[2]}


async def test_ejection_bound_keeps_an_open_instance_in_rotation() -> None:
    """Three breakers open, at most one third ejected: two open instances stay in. (Round
    48: with two open and one closed, the one the bound keeps in gets no call while the
    closed one is there; before, it took about half of them.)"""
    fleet = Fleet()
    store = MemoryStore(rng=seeded_random(3))
    breaker = BreakerConfig(open_s=30.0)
    pol = service_policy(breaker=breaker, max_ejected_ratio=0.34, panic_threshold=0.0)
    t = service_transport(fleet, pol, store)
    for key in KEYS[:2]:
        store.breaker_state("upstream:" + key, breaker).force(OPEN, 1_000.0, seeded_random(0))
    reasons: Counter[str] = Counter()
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(20):
            response = await client.get("http://payments/pay")
            assert response.status_code == 200
        assert set(fleet.seen) == {KEYS[2]}  # the closed one while it is there
        store.breaker_state("upstream:" + KEYS[2], breaker).force(OPEN, 1_000.0, seeded_random(0))
        for _ in range(60):
            response = await client.get("http://payments/pay")
            assert response.status_code == 200
            ctx = response.extensions["fidelity_context"]
            reasons.update(d.reason for d in ctx.decisions if d.layer == "lb")
    # every first attempt goes around a breaker the bound keeps in (nothing better is
    # left); the one ejected gets none, and once a kept one answered around its breaker
    # the calls go there (its answer is newer evidence than its breaker's state)
    assert set(reasons) == {PICK_BOUND}
    assert len(set(fleet.seen[20:])) <= 2
    assert len(set(fleet.seen[21:])) == 1


async def test_panic_spreads_over_all_instances_and_records_it() -> None:
    fleet = Fleet()
    store = MemoryStore(rng=seeded_random(3))
    breaker = BreakerConfig(open_s=30.0)
    pol = service_policy(breaker=breaker, max_ejected_ratio=1.0, panic_threshold=0.5)
    t = service_transport(fleet, pol, store)
    for key in KEYS[:2]:
        store.breaker_state("upstream:" + key, breaker).force(OPEN, 1_000.0, seeded_random(0))
    reasons: Counter[str] = Counter()
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(60):
            response = await client.get("http://payments/pay")
            assert response.status_code == 200  # never shed
            ctx = response.extensions["fidelity_context"]
            reasons.update(d.reason for d in ctx.decisions if d.layer == "lb")
    assert set(fleet.seen[-40:]) == set(KEYS)
    assert reasons[PICK_PANIC] >= 40


async def test_a_resolver_names_the_instances() -> None:
    fleet = Fleet()
    engine = Engine(Policy(), clock=FakeClock(), rng=seeded_random(7))
    t = FidelityTransport(
        httpx.MockTransport(fleet),
        engine=engine,
        telemetry=False,
        resolver=lambda host: INSTANCES[:2] if host == "payments" else None,
    )
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(20):
            assert (await client.get("http://payments/pay")).status_code == 200
    assert set(fleet.seen) == set(KEYS[:2])


@pytest.mark.parametrize("sync", [False, True])
def test_a_failing_resolver_keeps_the_instances_it_named_last(sync: bool) -> None:
    """Service discovery down (the resolver raises): calls go on to the instances it
    named last, not fail with the resolver's error."""
    fleet = Fleet()
    answers: list[Any] = [INSTANCES[:2]]

    def resolver(host: str) -> Any:
        answer = answers[-1]
        if isinstance(answer, Exception):
            raise answer
        return answer if host == "payments" else None

    engine = Engine(Policy(), clock=FakeClock(), rng=seeded_random(7))
    kind = FidelitySyncTransport if sync else FidelityTransport
    inner = httpx.MockTransport(fleet)
    t = kind(inner, engine=engine, telemetry=False, resolver=resolver)  # type: ignore[arg-type]

    async def get_async() -> int:
        async with httpx.AsyncClient(transport=t) as client:
            return (await client.get("http://payments/pay")).status_code

    def get() -> int:
        if not sync:
            return asyncio.run(get_async())
        with httpx.Client(transport=t) as client:
            return client.get("http://payments/pay").status_code

    assert get() == 200
    answers.append(OSError("discovery is down"))
    for _ in range(10):
        assert get() == 200
    assert set(fleet.seen) == set(KEYS[:2])


def test_instances_must_be_base_urls() -> None:
    from fidelity_mw.errors import PolicyError

    with pytest.raises(PolicyError):
        UpstreamConfig(host="payments", instances=("10.0.0.1:8001",))
    with pytest.raises(PolicyError):
        UpstreamConfig(host="payments", instances=("http://a:1/path",))
    assert UpstreamConfig(host="p", instances=("https://a:1/",)).instances == ("https://a:1/",)


async def test_a_retry_never_overrides_an_open_breaker() -> None:
    """Panic and the ejection bound keep a call from being refused; a retry is optional,
    so it goes only to an instance whose breaker admits it."""
    fleet = Fleet(**dict.fromkeys(KEYS, 503))
    store = MemoryStore(rng=seeded_random(3))
    breaker = BreakerConfig(open_s=30.0)
    pol = service_policy(breaker=breaker, max_ejected_ratio=1.0)
    t = service_transport(fleet, pol, store)
    for key in KEYS:
        store.breaker_state("upstream:" + key, breaker).force(OPEN, 1_000.0, seeded_random(0))
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(10):
            fleet.seen.clear()
            response = await client.get("http://payments/pay")
            assert response.status_code == 503
            assert len(fleet.seen) == 1  # the panicked first attempt, no retry
            ctx = response.extensions["fidelity_context"]
            assert ctx.decisions[-1].reason == "breaker_open"
            assert ctx.upstream_exhausted  # callers are told not to retry either


async def test_a_retry_may_go_around_an_open_breaker_whose_instance_answered_last() -> None:
    """Every breaker open, the bound keeps two instances in: one answers again (the
    fault is over there), one still fails. A retry of the failing one's 503 goes to the
    one whose last call around its open breaker succeeded; before that call, and again
    once it fails, a retry is refused as before."""
    healthy, failing = KEYS[1], KEYS[2]
    fleet = Fleet(**{KEYS[0]: 503, healthy: 200, failing: 503})
    store = MemoryStore(rng=seeded_random(3))
    breaker = BreakerConfig(open_s=30.0)
    pol = service_policy(breaker=breaker, max_ejected_ratio=0.34, panic_threshold=0.0)
    t = service_transport(fleet, pol, store)
    # KEYS[0] open longest: the one ejected; the other two stay in rotation
    for key, until in zip(KEYS, (2_000.0, 1_000.0, 1_000.0), strict=True):
        store.breaker_state("upstream:" + key, breaker).force(OPEN, until, seeded_random(0))
    calls: list[tuple[list[str], int]] = []
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(40):
            fleet.seen.clear()
            response = await client.get("http://payments/pay")
            calls.append((list(fleet.seen), response.status_code))
            if fleet.seen == [failing, healthy]:
                ctx = response.extensions["fidelity_context"]
                picks = [d for d in ctx.decisions if d.layer == "lb"]
                assert [p.details["answered_around_open"] for p in picks] == [False, True]
                assert all(p.details["breaker_known_open"] for p in picks)
        fleet.statuses[healthy] = 503  # the fault is back there too
        for _ in range(10):
            fleet.seen.clear()
            response = await client.get("http://payments/pay")
            calls.append((list(fleet.seen), response.status_code))
            assert response.status_code == 503
    assert all(KEYS[0] not in seen for seen, _ in calls)  # ejected throughout
    first_ok = next(i for i, (seen, _) in enumerate(calls) if seen == [healthy])
    before, after, again = calls[:first_ok], calls[first_ok:40], calls[40:]
    assert all(seen == [failing] and status == 503 for seen, status in before)  # refused
    assert all(status == 200 for _, status in after)  # every call of the healthy phase
    # (round 48: once it answered around its open breaker, first attempts go there too,
    # rather than to the kept instance that has not answered)
    assert all(seen == [healthy] for seen, _ in after)
    # once its call around the breaker failed, no retry goes around it any more
    assert all(len(seen) == 1 for seen, _ in again[1:])


async def test_an_ejected_instance_is_readmitted_when_its_probe_succeeds() -> None:
    fleet = Fleet()
    clock = FakeClock()
    store = MemoryStore(rng=seeded_random(3))
    breaker = BreakerConfig(open_s=2.0, open_jitter=0.0, half_open_probes=1)
    engine = Engine(service_policy(breaker=breaker), clock=clock, rng=seeded_random(7), store=store)
    t = FidelityTransport(httpx.MockTransport(fleet), engine=engine, telemetry=False)
    a = store.breaker_state("upstream:" + KEYS[0], breaker)
    a.force(OPEN, clock.monotonic(), seeded_random(0))
    async with httpx.AsyncClient(transport=t) as client:
        for _ in range(20):
            assert (await client.get("http://payments/pay")).status_code == 200
        assert KEYS[0] not in fleet.seen  # ejected while open
        clock.advance(2.5)  # its open time is over: the next pick of it is a probe
        probes = 0
        for _ in range(40):
            response = await client.get("http://payments/pay")
            decisions = response.extensions["fidelity_context"].decisions
            probes += sum(1 for d in decisions if d.verdict == "probe")
    assert probes == 1  # one successful probe closed it
    assert a.state == "closed"
    assert fleet.seen[-40:].count(KEYS[0]) > 1  # back in rotation
