"""Review 32: the adaptive concurrency limit after a durable latency rise.

A route that durably got slower without being overloaded (a deploy, a slower dependency)
saw every sample past `tolerance` x its old floor: the limit shrank to `min_limit` and
stayed there until the next re-measurement, 2,000 samples later (a minute at 40 ms, ten at
400 ms), shedding with 503s load the route could serve. The floor is now replaced early on
that evidence, but not when latency rises because of load: latency that grows with what
is in flight, or with the event loop's lag. Simulated on a fake clock: an open-loop load
driving the pure limiter, and the middleware with the testing clock."""

from __future__ import annotations

from fidelity_mw.decide.concurrency import CRITICAL, ConcurrencyLimiter, ConcurrencySpec


def test_a_measurement_resumed_at_a_fractional_limit_ends_on_a_full_route() -> None:
    """The limit is rounded (3.6 admits 4) but measurement samples were counted only at
    3.6 in flight or fewer: on a route kept full none was, and the measurement (the limit
    held at the probe) never ended."""
    spec = ConcurrencySpec(limit=4, adaptive=True, remeasure_every=10, measure_samples=5)
    lim = ConcurrencyLimiter(spec)
    est = lim.estimate
    assert est is not None
    for _ in range(spec.measure_samples):
        lim.try_acquire(CRITICAL)
        lim.release(0.01)
    lim.try_acquire(CRITICAL)
    lim.release(dropped=True)  # 4 -> 3.6
    for _ in range(spec.remeasure_every):
        lim.try_acquire(CRITICAL)
        lim.release(0.01)
    assert est.measuring
    assert lim.limit == 4
    for _ in range(spec.measure_samples):
        while lim.try_acquire(CRITICAL).admitted:
            pass
        assert lim.in_flight == 4
        lim.release(0.01)
    assert not est.measuring
