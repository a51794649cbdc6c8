"""The concurrency limiter (bulkhead), fixed and adaptive, with priority classes: pure logic."""

from __future__ import annotations

import pytest

from fidelity_mw.decide.concurrency import (
    AT_LIMIT,
    CRITICAL,
    DEFAULT,
    PACE_S,
    PACED,
    PRIORITY_SHARE,
    SHEDDABLE,
    STALE,
    UNDER_LIMIT,
    ConcurrencyLimiter,
    ConcurrencySpec,
)


def test_fixed_limit_admits_at_most_limit_in_flight() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=3))
    assert [lim.try_acquire(CRITICAL).admitted for _ in range(5)] == [True] * 3 + [False] * 2
    refused = lim.try_acquire(CRITICAL)
    assert refused.reason == AT_LIMIT
    assert refused.in_flight == 3
    assert refused.limit == 3
    assert lim.release() == []
    assert lim.try_acquire(CRITICAL).admitted
    assert lim.in_flight == 3


def test_priorities_shed_lowest_class_first() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=10, default_share=0.8, sheddable_share=0.5))
    admitted = {p: 0 for p in (CRITICAL, DEFAULT, SHEDDABLE)}
    # Rising pressure: each round offers one request of every class.
    for _ in range(10):
        for p in (SHEDDABLE, DEFAULT, CRITICAL):
            if lim.try_acquire(p).admitted:
                admitted[p] += 1
    assert lim.in_flight == 10
    # sheddable stopped at 5 in flight, default at 8, critical filled the rest
    assert admitted[SHEDDABLE] < admitted[DEFAULT] <= admitted[CRITICAL] + admitted[DEFAULT]
    assert lim.try_acquire(SHEDDABLE).reason == AT_LIMIT
    lim.release()
    lim.release()
    lim.release()  # 7 in flight
    assert lim.try_acquire(SHEDDABLE).reason == PRIORITY_SHARE
    assert lim.try_acquire(DEFAULT).admitted  # 8
    assert not lim.try_acquire(DEFAULT).admitted
    assert lim.try_acquire(CRITICAL).admitted  # 9


def test_priority_order_of_shedding_under_growing_load() -> None:
    """Under growing load sheddable is refused first, then default; critical up to the limit."""
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=20, default_share=0.9, sheddable_share=0.5))
    first_refused: dict[str, int] = {}
    while lim.in_flight < 20:
        for p in (SHEDDABLE, DEFAULT):
            if not lim.try_acquire(p).admitted:
                first_refused.setdefault(p, lim.in_flight)
            else:
                lim.release()
        assert lim.try_acquire(CRITICAL).admitted
    assert first_refused == {SHEDDABLE: 10, DEFAULT: 18}


def test_every_class_keeps_one_slot_on_a_tiny_limit() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=1, sheddable_share=0.1))
    assert lim.try_acquire(SHEDDABLE).admitted


def test_queue_wakes_best_priority_first_then_arrival_order() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=1, max_queue=3))
    assert lim.try_acquire(CRITICAL).admitted
    assert lim.can_queue()
    lim.enqueue(SHEDDABLE, "s1")
    lim.enqueue(DEFAULT, "d1")
    lim.enqueue(DEFAULT, "d2")
    assert not lim.can_queue()
    # A newcomer does not overtake queued requests of its own class.
    assert not lim.try_acquire(DEFAULT).admitted
    assert lim.release() == ["d1"]
    assert lim.release() == ["d2"]
    assert lim.abandon("s1") is True
    assert lim.abandon("s1") is False
    assert lim.release() == []
    assert lim.in_flight == 0
    assert lim.waiting == 0


def test_release_never_goes_negative() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=2))
    lim.release()
    assert lim.in_flight == 0


def _drive(lim: ConcurrencyLimiter, steps: int, base_s: float, capacity: int) -> list[int]:
    """A closed loop that always wants more: latency grows once in-flight passes capacity."""
    limits = []
    for _ in range(steps):
        while lim.try_acquire(CRITICAL).admitted:
            pass
        lim.release(base_s * max(1.0, lim.in_flight / capacity))
        limits.append(lim.limit)
    return limits


@pytest.mark.parametrize("shed_stale", [False, True])
@pytest.mark.parametrize("capacity", [10, 40, 100])
def test_adaptive_limit_converges_near_capacity(capacity: int, shed_stale: bool) -> None:
    spec = ConcurrencySpec(limit=5, adaptive=True, max_limit=1000, shed_stale=shed_stale)
    lim = ConcurrencyLimiter(spec)
    limits = _drive(lim, 20_000, 0.01, capacity)
    tail = sorted(limits[-4000:])
    median = tail[len(tail) // 2]
    # Near the knee of the latency curve: above capacity (so the server is used)
    # and at most tolerance-ish above it (so latency stays within ~2x of its floor).
    assert capacity <= median <= 2 * capacity
    assert max(limits[-4000:]) <= 2 * capacity


def test_adaptive_limit_shrinks_when_latency_rises_and_recovers() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=5, adaptive=True, max_limit=1000))
    _drive(lim, 6000, 0.01, 60)
    high = lim.limit
    _drive(lim, 6000, 0.01, 15)  # the server got 4x slower per request in flight
    low = lim.limit
    assert low < high / 2
    _drive(lim, 6000, 0.01, 60)
    assert lim.limit > 2 * low


def test_adaptive_limit_follows_a_new_baseline() -> None:
    """A permanently slower dependency is re-measured, not treated as overload forever."""
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=5, adaptive=True, max_limit=1000))
    _drive(lim, 10_000, 0.01, 40)
    before = lim.limit
    _drive(lim, 10_000, 0.03, 40)
    assert lim.estimate is not None
    assert lim.estimate.baseline_s == pytest.approx(0.03)
    assert abs(lim.limit - before) <= before // 4


def test_adaptive_limit_does_not_grow_while_idle() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=20, adaptive=True))
    for _ in range(500):
        assert lim.try_acquire(DEFAULT).admitted
        lim.release(0.01)
    assert lim.limit == 20


def test_dropped_requests_shrink_the_adaptive_limit() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=100, adaptive=True, min_limit=5))
    for _ in range(100):
        lim.try_acquire(CRITICAL)
        lim.release(dropped=True)
    assert lim.limit == 5


def test_policy_concurrency_tables_validate_and_round_trip() -> None:
    from fidelity_mw.errors import PolicyError
    from fidelity_mw.policy import Policy

    policy = Policy.from_dict(
        {
            "concurrency": {"limit": 10, "adaptive": True},
            "route": [{"match": "/x*", "priority": "sheddable", "concurrency": {"limit": 3}}],
        }
    )
    assert policy.concurrency is not None
    assert policy.concurrency.adaptive
    assert policy.routes[0].concurrency is not None
    assert policy.routes[0].concurrency.limit == 3
    assert Policy.from_dict(policy.to_dict()) == policy
    with pytest.raises(PolicyError) as err:
        Policy.from_dict(
            {"concurrency": {"limit": 0, "sheddable_share": 0.95}, "route": [{"priority": "low"}]}
        )
    paths = [issue.path for issue in err.value.issues]
    assert paths == ["concurrency.limit", "concurrency.sheddable_share", "route[0].priority"]


def test_adaptive_limit_goes_below_four_on_a_route_one_request_saturates() -> None:
    """A CPU-bound route on one event loop: every request in flight adds its own
    service time. Gradient2's constant sqrt(limit) headroom would hold the limit at
    4 (4 * 0.5 + sqrt(4) == 4) whatever the latency; the limit must reach 1-2.
    (The floor is measured one at a time here: on this curve 4 in flight are 4x slower.)"""
    spec = ConcurrencySpec(limit=4, adaptive=True, max_limit=1000, measure_limit=1)
    lim = ConcurrencyLimiter(spec)
    limits = _drive(lim, 3000, 0.01, 1)
    tail = sorted(limits[-1000:])
    assert tail[len(tail) // 2] <= 2
    assert max(tail) <= 3


def test_adaptive_limit_started_far_too_high_under_overload_comes_down() -> None:
    """The floor is measured first (limit held at 4 for 20 requests), so a service that
    starts under overload does not take its queued latencies for the floor."""
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=500, adaptive=True, max_limit=1000))
    assert lim.limit == 4
    limits = _drive(lim, 20, 0.01, 10)
    assert limits[:-1] == [4] * 19
    assert lim.estimate is not None
    assert lim.estimate.baseline_s == pytest.approx(0.01)
    assert limits[-1] == 500  # measured: back to the configured start
    limits = _drive(lim, 40, 0.01, 10)
    assert limits[-1] <= 20  # -10 % per sample at the gradient's floor
    limits = _drive(lim, 2000, 0.01, 10)  # the 500 admitted meanwhile drain
    assert lim.in_flight <= 20
    assert max(limits[-500:]) <= 20


def test_the_floor_is_measured_at_min_limit_when_that_is_above_measure_limit() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=50, adaptive=True, min_limit=10))
    assert lim.limit == 10
    _drive(lim, 20, 0.01, 100)
    assert lim.estimate is not None
    assert not lim.estimate.measuring
    assert lim.limit >= 50


def test_dropped_requests_while_the_floor_is_measured_lower_the_limit_it_returns_to() -> None:
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=100, adaptive=True))
    for _ in range(10):
        lim.try_acquire(CRITICAL)
        lim.release(dropped=True)
    for _ in range(20):
        lim.try_acquire(CRITICAL)
        lim.release(0.01)
    assert lim.limit == round(100 * 0.9**10)


def test_event_loop_lag_counts_in_the_latency_signal() -> None:
    """The route answers at its floor, but work waits for the event loop: the limit shrinks."""
    spec = ConcurrencySpec(limit=20, adaptive=True, measure_samples=0)
    lim = ConcurrencyLimiter(spec)
    for _ in range(200):
        while lim.try_acquire(CRITICAL).admitted:
            pass
        lim.release(0.01)
    assert lim.limit >= 100  # busy at its floor: grows
    high = lim.limit
    for _ in range(30):
        lim.release(0.01, lag_s=0.02)  # 3x the floor in all
        lim.try_acquire(CRITICAL)
    assert lim.limit < high / 4
    assert lim.estimate is not None
    assert lim.estimate.baseline_s == pytest.approx(0.01)


def _lagging(lag_s: float, limit: int = 4) -> ConcurrencyLimiter:
    """An adaptive limiter with a 10 ms floor whose last release reported `lag_s`."""
    lim = ConcurrencyLimiter(ConcurrencySpec(limit=limit, adaptive=True, measure_samples=0))
    for lag in (0.0, lag_s):
        assert lim.try_acquire(CRITICAL).admitted
        lim.release(0.01, lag_s=lag)
        lim.new_turn()
    assert lim.estimate is not None
    assert lim.estimate.baseline_s == pytest.approx(0.01)
    assert lim.limit == limit
    return lim


def test_a_lagging_event_loop_admits_one_more_request_per_turn() -> None:
    """The loop's lag reached a quarter of the floor: requests let in together would only queue
    for its CPU, so a route with one in flight takes one more per turn, at its limit."""
    lim = _lagging(0.006)
    assert lim.pacing
    assert lim.try_acquire(DEFAULT).admitted
    refused = lim.try_acquire(DEFAULT)
    assert (refused.admitted, refused.reason, refused.in_flight) == (False, PACED, 1)
    lim.new_turn()
    assert lim.try_acquire(DEFAULT).admitted
    assert not lim.try_acquire(DEFAULT).admitted
    lim.new_turn()
    assert lim.try_acquire(DEFAULT).admitted
    assert lim.in_flight == 3


def test_paced_admissions_are_pace_s_apart_by_the_callers_clock() -> None:
    """A loop turn is not enough when it came within PACE_S of the last admission
    (requests let in that close together, with alike awaits, wake together)."""
    lim = _lagging(0.006)
    assert lim.try_acquire(DEFAULT, now=1.0).admitted
    lim.new_turn()
    early = lim.try_acquire(DEFAULT, now=1.0 + PACE_S / 2)
    assert (early.admitted, early.reason) == (False, PACED)
    assert lim.try_acquire(DEFAULT, now=1.0 + PACE_S * 1.01).admitted
    lim.new_turn()
    assert not lim.try_acquire(DEFAULT, now=1.0 + PACE_S * 1.5).admitted
    lim.release(0.01, lag_s=0.006)
    lim.release(0.01, lag_s=0.006)
    assert lim.in_flight == 0
    # nothing in flight: no batch to stagger, whatever the clock says
    assert lim.try_acquire(DEFAULT, now=1.0 + PACE_S * 1.6).admitted


def test_critical_requests_are_never_paced() -> None:
    """Pacing must not shed the class that may fill the whole limit, nor hand the
    turn's one admission to a lower class ahead of it."""
    lim = _lagging(0.006)
    assert lim.try_acquire(SHEDDABLE, now=1.0).admitted
    assert lim.pacing
    assert not lim.try_acquire(DEFAULT, now=1.0).admitted
    assert lim.try_acquire(CRITICAL, now=1.0).admitted
    assert lim.try_acquire(CRITICAL, now=1.0).admitted
    assert lim.in_flight == 3


def test_pacing_lets_the_first_request_into_an_idle_route() -> None:
    """A turn that admitted one which already finished: nothing is in flight, so the
    next one is no batch."""
    lim = _lagging(0.006)
    assert lim.try_acquire(CRITICAL).admitted
    lim.release(0.01, lag_s=0.006)
    assert lim.try_acquire(CRITICAL).admitted


def test_no_pacing_while_the_loop_keeps_up_or_on_a_fixed_limit() -> None:
    lim = _lagging(0.002)  # under a quarter of the 10 ms floor
    assert not lim.pacing
    assert [lim.try_acquire(CRITICAL).admitted for _ in range(5)] == [True] * 4 + [False]
    fixed = ConcurrencyLimiter(ConcurrencySpec(limit=3))
    fixed.release(0.01, lag_s=1.0)
    fixed.in_flight = 0
    assert not fixed.pacing
    assert [fixed.try_acquire(CRITICAL).admitted for _ in range(3)] == [True] * 3


def test_pacing_ends_as_the_lag_fades() -> None:
    """One lagging stretch paces for a while (lag comes and goes while the loop is
    busy), not for ever: each later report weighs the old peak down by 1 %."""
    lim = _lagging(0.02)
    fades = 0
    while lim.pacing:
        fades += 1
        assert lim.try_acquire(CRITICAL).admitted
        lim.release(0.01, lag_s=0.0)
        assert fades < 1000
    # 0.02 * 0.99**n < 0.0025 from n = 207 on
    assert fades == 207
    lim.new_turn()
    assert [lim.try_acquire(CRITICAL).admitted for _ in range(3)] == [True] * 3


def _stale_limiter(limit: int = 4) -> ConcurrencyLimiter:
    """`_lagging` with `shed_stale`: 10 ms floor, tolerance 1.5, the loop the bottleneck.
    A request that waited over 5 ms to be seen is stale beside one in flight, 15 ms alone."""
    lim = ConcurrencyLimiter(
        ConcurrencySpec(limit=limit, adaptive=True, measure_samples=0, shed_stale=True)
    )
    for lag in (0.0, 0.006):
        assert lim.try_acquire(CRITICAL).admitted
        lim.release(0.01, lag_s=lag)
        lim.new_turn()
    assert lim.pacing
    assert lim.stale_after_s == pytest.approx(0.005)
    return lim


def test_a_request_that_waited_too_long_to_be_seen_is_not_queued_behind_another() -> None:
    """While the loop is the bottleneck, a request that would wait for another's work
    and already waited past the tolerance to be read is shed (`stale`); a fresh one
    is admitted, without waiting out PACE_S (it was read while the loop waited for
    I/O, not in a batch), but still one per turn."""
    lim = _stale_limiter()
    assert lim.try_acquire(DEFAULT, now=1.0, waited_s=0.009).admitted  # alone: runs at once
    stale = lim.try_acquire(DEFAULT, now=1.0, waited_s=0.006)
    assert (stale.admitted, stale.reason, stale.in_flight) == (False, STALE, 1)
    lim.new_turn()
    assert lim.try_acquire(SHEDDABLE, now=1.0002, waited_s=0.006).reason == STALE
    fresh = lim.try_acquire(DEFAULT, now=1.0002, waited_s=0.001)
    assert (fresh.admitted, fresh.reason, fresh.in_flight) == (True, UNDER_LIMIT, 2)
    assert lim.try_acquire(DEFAULT, now=1.0004, waited_s=0.0).reason == PACED  # same turn
    assert lim.in_flight == 2


def test_critical_requests_are_never_shed_as_stale() -> None:
    lim = _stale_limiter()
    assert lim.try_acquire(DEFAULT, now=1.0, waited_s=0.0).admitted
    assert lim.try_acquire(CRITICAL, now=1.0, waited_s=1.0).admitted
    assert lim.try_acquire(CRITICAL, now=1.0, waited_s=1.0).admitted


def test_the_stale_rule_leaves_the_old_rules_first() -> None:
    """Limit and priority shares decide before staleness: the reason is theirs, and
    a class's share is no larger for being fresh."""
    lim = _stale_limiter(limit=2)
    assert lim.try_acquire(SHEDDABLE, now=1.0, waited_s=0.0).admitted
    lim.new_turn()
    share = lim.try_acquire(SHEDDABLE, now=1.01, waited_s=0.0)  # 2 * 0.5 = 1 slot
    assert (share.admitted, share.reason) == (False, PRIORITY_SHARE)
    assert lim.try_acquire(DEFAULT, now=1.01, waited_s=0.0).admitted
    lim.new_turn()
    full = lim.try_acquire(DEFAULT, now=1.02, waited_s=0.5)
    assert (full.admitted, full.reason) == (False, AT_LIMIT)
    full = lim.try_acquire(CRITICAL, now=1.02, waited_s=0.0)
    assert (full.admitted, full.reason) == (False, AT_LIMIT)


@pytest.mark.parametrize("case", ["off", "unknown", "keeps_up", "fixed"])
def test_no_stale_shedding_without_the_option_a_bound_or_a_lagging_loop(case: str) -> None:
    if case == "fixed":
        lim = ConcurrencyLimiter(ConcurrencySpec(limit=4, shed_stale=True))
    elif case == "off":
        lim = _lagging(0.006)
    else:
        lim = _stale_limiter()
    if case == "keeps_up":
        for _ in range(400):  # the lag peak fades below a quarter of the floor
            lim.release(0.01, lag_s=0.0)
        assert not lim.pacing
    waited = None if case == "unknown" else 1.0
    assert lim.try_acquire(DEFAULT, now=1.0, waited_s=waited).admitted
    lim.new_turn()
    second = lim.try_acquire(DEFAULT, now=1.1, waited_s=waited)
    assert (second.admitted, second.reason) == (True, UNDER_LIMIT)


def test_alone_a_request_may_wait_the_whole_tolerance_and_a_quiet_route_is_never_starved() -> None:
    """Nothing in flight: it runs at once, so it is stale only past tolerance x floor
    (15 ms), and only while the route admitted one lately (within twice that): other
    work hogging the loop in long steps must not shut the route out."""
    lim = _stale_limiter()
    assert lim.try_acquire(DEFAULT, now=1.0, waited_s=0.0).admitted
    lim.release(0.01)
    assert lim.try_acquire(DEFAULT, now=1.012, waited_s=0.014).admitted
    lim.release(0.01)
    late = lim.try_acquire(DEFAULT, now=1.03, waited_s=0.016)
    assert (late.admitted, late.reason, late.in_flight) == (False, STALE, 0)
    # the last admission 31 ms ago: admitted, however long it waited
    assert lim.try_acquire(DEFAULT, now=1.043, waited_s=0.5).admitted


def test_with_stale_shedding_the_limit_grows_only_when_it_refused_someone() -> None:
    """The stale rule, not the limit, holds requests back: half the limit in use no
    longer shows the limit is used, so within-tolerance samples grow it only after
    it refused a request."""
    lim = _stale_limiter(limit=4)
    for _ in range(200):
        for _ in range(3):
            assert lim.try_acquire(CRITICAL).admitted
        for _ in range(3):
            lim.release(0.01)
    assert lim.limit == 4  # three of four in flight, latency at the floor: unchanged
    for _ in range(200):
        while lim.try_acquire(CRITICAL).admitted:
            pass
        lim.release(0.01)
    assert lim.limit > 20


def test_a_fresh_request_is_not_stale_by_the_loop_clocks_grain_on_a_fast_route() -> None:
    """A 0.4 ms floor allows 0.2 ms, finer than the loop clock's heartbeat can bound: a
    request read just now measures up to two ticks and must not be shed for it."""
    lim = ConcurrencyLimiter(
        ConcurrencySpec(limit=4, adaptive=True, measure_samples=0, shed_stale=True)
    )
    for lag in (0.0, 0.0003):
        assert lim.try_acquire(CRITICAL).admitted
        lim.release(0.0004, lag_s=lag)
        lim.new_turn()
    assert lim.pacing
    assert lim.stale_after_s == pytest.approx(0.0002)
    assert lim.try_acquire(DEFAULT, now=1.0, waited_s=0.0).admitted
    lim.new_turn()
    fresh = lim.try_acquire(DEFAULT, now=1.01, waited_s=0.0015)  # within two ticks
    assert (fresh.admitted, fresh.in_flight) == (True, 2)
    lim.new_turn()
    stale = lim.try_acquire(DEFAULT, now=1.02, waited_s=0.004)  # a CPU step's worth
    assert (stale.admitted, stale.reason) == (False, STALE)


def test_a_request_refused_at_the_limit_that_was_stale_anyway_does_not_grow_it() -> None:
    """With stale shedding the limit grows only after it refused someone; a request
    refused at the limit that the stale rule would have shed anyway is no such evidence
    (the reason stays the limit's). A fresh one refused there is."""
    lim = _stale_limiter(limit=1)
    assert lim.try_acquire(DEFAULT, now=1.0, waited_s=0.0).admitted
    lim.new_turn()
    refused = lim.try_acquire(DEFAULT, now=1.01, waited_s=0.009)  # stale beside one
    assert (refused.admitted, refused.reason) == (False, AT_LIMIT)
    assert not lim.binding
    for _ in range(50):
        lim.release(0.01, lag_s=0.003)  # within tolerance, still pacing
        assert lim.try_acquire(CRITICAL).admitted
        lim.try_acquire(DEFAULT, now=1.01, waited_s=0.009)
    assert lim.limit == 1  # never grown: nothing the limit alone held back
    fresh = lim.try_acquire(DEFAULT, now=1.02, waited_s=0.001)
    assert (fresh.admitted, fresh.reason) == (False, AT_LIMIT)
    assert lim.binding
    for _ in range(50):
        lim.release(0.01, lag_s=0.003)  # within tolerance, still pacing
        assert lim.try_acquire(CRITICAL).admitted
        lim.try_acquire(DEFAULT, now=1.02, waited_s=0.001)
    assert lim.limit >= 2
