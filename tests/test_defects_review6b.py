"""Defects a sixth review found (a second reviewer, beside test_defects_review6.py).

1. A bulkhead request refused because others of its class wait ahead of it in the queue
   (paced there while the event loop is the bottleneck), with room under the limit and
   under its class's share: the refusal said `priority_share`, and a queue that was full
   turned it into a 503 whose record blamed the class's share; it also marked the limit
   as binding, so with `shed_stale` the adaptive limit grew for a refusal it never made.
"""

from __future__ import annotations

from fidelity_mw.decide.concurrency import (
    AT_LIMIT,
    DEFAULT,
    PACED,
    PRIORITY_SHARE,
    SHEDDABLE,
    ConcurrencyLimiter,
    ConcurrencySpec,
)

# --------------------------- 1. refused behind the queue, not by the limit or the share


def _paced_with_one_queued(shed_stale: bool = False) -> ConcurrencyLimiter:
    """A route paced by a lagging loop: one request in flight, one queued as `paced`."""
    limiter = ConcurrencyLimiter(
        ConcurrencySpec(
            limit=10, adaptive=True, measure_samples=0, max_queue=1, shed_stale=shed_stale
        )
    )
    assert limiter.try_acquire(DEFAULT, 0.0).admitted
    limiter.release(0.01, lag_s=0.01)  # floor 20 ms, a lag of 10 ms: the loop is the bottleneck
    assert limiter.pacing
    assert limiter.try_acquire(DEFAULT, 1.0).admitted
    refused = limiter.try_acquire(DEFAULT, 1.0)
    assert refused.reason == PACED
    assert not limiter.enqueue(DEFAULT, object(), paced=True)
    limiter.new_turn()
    return limiter


def test_a_request_behind_a_paced_queue_is_not_refused_for_its_class_share() -> None:
    limiter = _paced_with_one_queued()
    refused = limiter.try_acquire(DEFAULT, 2.0)
    assert not refused.admitted
    assert (refused.in_flight, refused.limit) == (1, 10)  # room under the limit and the share
    assert refused.reason not in (PRIORITY_SHARE, AT_LIMIT)
    assert refused.reason == PACED  # it waits its turn behind them, as they do


def test_that_refusal_does_not_count_as_the_limit_binding() -> None:
    limiter = _paced_with_one_queued(shed_stale=True)
    limiter.binding = False
    limiter.try_acquire(DEFAULT, 2.0)
    assert not limiter.binding


def test_a_refusal_by_the_share_still_says_so() -> None:
    limiter = ConcurrencyLimiter(ConcurrencySpec(limit=4, sheddable_share=0.5))
    assert limiter.try_acquire(SHEDDABLE).admitted
    assert limiter.try_acquire(SHEDDABLE).admitted
    refused = limiter.try_acquire(SHEDDABLE)
    assert (refused.admitted, refused.reason) == (False, PRIORITY_SHARE)
    assert limiter.binding
    assert limiter.try_acquire(DEFAULT).admitted
    assert limiter.try_acquire(DEFAULT).admitted
    assert limiter.try_acquire(DEFAULT).reason == AT_LIMIT
