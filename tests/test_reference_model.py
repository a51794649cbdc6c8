"""The reference model's own checks: hand-computed cases (tests/reference_model.py)."""

from __future__ import annotations

from reference_model import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    RefBreaker,
    RefBucket,
    RefBudget,
    RefLedger,
    window_cuts,
)


def test_bucket_refills_at_rate_and_caps_at_burst() -> None:
    b = RefBucket(count=2, period_s=1.0, burst=3, start=0.0)
    assert b.ask(0.0, 3).allowed == {True}
    b.take(3)
    assert b.ask(0.0, 1).allowed == {False}
    assert b.ask(0.5, 1).allowed == {True}  # 0.5 s x 2/s = 1 token
    b.take(1)
    assert b.refill(100.0) == 3


def test_bucket_threshold_is_ambiguous_only_within_tolerance() -> None:
    b = RefBucket(count=1, period_s=1.0, burst=1, start=0.0)
    b.take(1)
    assert b.ask(0.9999, 1).allowed == {False}
    assert b.ask(0.999999, 1).allowed == {True, False}
    assert b.ask(0.999999, 1).tokens_before < 1
    assert b.ask(0.99999999999, 1).allowed == {True}  # short by float noise only


def test_window_cuts() -> None:
    times = [0.0, 5.0, 9.5, 9.95]
    # at 10.0 with a 1 s window: 9.95 surely in (age .05), 9.5 surely in (age .5),
    # 5.0 and 0.0 surely out
    assert window_cuts(times, 10.0, 1.0) == [2]
    # age 0.95 falls in the band [0.9, 1.0): either
    assert window_cuts([9.05], 10.0, 1.0) == [0, 1]


def test_breaker_model_opens_closes_and_ignores_stale_outcomes() -> None:
    m = RefBreaker(
        failure_ratio=0.5,
        min_calls=2,
        window_s=10,
        open_s=1,
        open_jitter=0.0,
        half_open_probes=1,
        probe_lease_s=5,
    )
    v, early, _ = m.gate(0.0)
    assert v == "allow"
    assert early is not None
    v, call, _ = m.gate(0.0)
    assert call is not None
    assert m.record(call, "failure", 0.0, False) == {CLOSED}  # 1 call < min_calls
    v, call, _ = m.gate(0.0)
    assert call is not None
    assert m.record(call, "failure", 0.0, False) == {OPEN}
    assert m.gate(0.5)[0] == "reject"
    v, probe, _ = m.gate(1.0)
    assert v == "probe"
    assert probe is not None
    assert m.gate(1.0)[0] == "reject"  # one probe at a time
    assert m.record(early, "failure", 1.0, False) == {HALF_OPEN}  # stale epoch
    assert m.record(probe, "success", 1.0, False) == {CLOSED}
    assert m.events == []


def test_budget_model_floor_and_ratio() -> None:
    b = RefBudget(ratio=0.5, floor_per_s=0.1, window_s=10)  # floor: 1 retry per window
    assert b.allowed(0.0) == {True}
    b.spend(0.0)
    assert b.allowed(0.0) == {False}
    b.request(0.0)
    b.request(0.0)
    assert b.allowed(0.0) == {True}  # 0.5 x 2 + 1 = 2 >= 2
    b.spend(0.0)
    assert b.allowed(0.0) == {False}
    assert b.allowed(20.0) == {True}  # everything left the window


def test_ledger_refund_gives_back_only_what_had_not_refilled() -> None:
    ledger = RefLedger(count=1, period_s=1.0, burst=10)
    a = ledger.admit(0.0, 1)
    assert ledger.tokens(0.0) == 9
    assert ledger.tokens(1.0) == 10  # A's unit refilled
    for _ in range(10):
        ledger.admit(1.0, 1)
    ledger.refund(a)
    assert ledger.tokens(1.0) == 0  # A never happened: the bucket is still empty
