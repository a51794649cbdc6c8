"""Breaker state machine: every transition on a fake clock, and the probe bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fidelity_mw import BreakerConfig
from fidelity_mw.decide.breaker import (
    CLOSED,
    FAILURE,
    HALF_OPEN,
    IGNORED,
    OPEN,
    SUCCESS,
    BreakerState,
    Gate,
)

T0 = 1_000.0


def mid() -> float:
    """A random source that yields no jitter: open for exactly open_s."""
    return 0.5


def call(b: BreakerState, now: float, outcome: str, slow: bool = False) -> str:
    gate = b.gate(now, mid)
    assert gate.verdict in ("allow", "probe"), gate
    return b.record(gate.epoch, gate.probe_id, outcome, now, mid, slow)


def tripped(config: BreakerConfig, now: float = T0) -> BreakerState:
    b = BreakerState(config)
    b.force(OPEN, now, mid)
    return b


# ---------------------------------------------------------------- closed -> open


def test_opens_on_failure_ratio_only_with_min_calls() -> None:
    b = BreakerState(BreakerConfig(failure_ratio=0.5, min_calls=4, window_s=10))
    for _ in range(3):
        assert call(b, T0, FAILURE) == CLOSED  # 100 % failures, but too few calls
    assert call(b, T0, FAILURE) == OPEN
    assert b.gate(T0, mid).verdict == "reject"


def test_failure_ratio_threshold_is_inclusive() -> None:
    b = BreakerState(BreakerConfig(failure_ratio=0.5, min_calls=4, window_s=10))
    assert call(b, T0, SUCCESS) == CLOSED
    assert call(b, T0, SUCCESS) == CLOSED
    assert call(b, T0, SUCCESS) == CLOSED
    assert call(b, T0, FAILURE) == CLOSED  # 1/4
    assert call(b, T0, FAILURE) == CLOSED  # 2/5 < 0.5
    assert call(b, T0, FAILURE) == OPEN  # 3/6 = 0.5


def test_successes_keep_it_closed() -> None:
    b = BreakerState(BreakerConfig(failure_ratio=0.5, min_calls=4, window_s=10))
    for _ in range(50):
        assert call(b, T0, SUCCESS) == CLOSED
        assert call(b, T0, SUCCESS) == CLOSED
        assert call(b, T0, FAILURE) == CLOSED  # 1/3 stays under 0.5


def test_window_slides_old_failures_out() -> None:
    b = BreakerState(BreakerConfig(failure_ratio=0.5, min_calls=4, window_s=10))
    for _ in range(3):
        call(b, T0, FAILURE)
    assert b.totals(T0) == (3, 3, 0)
    # 10 s later the window no longer holds them: one more failure is 1 of 1 call.
    assert call(b, T0 + 10.5, FAILURE) == CLOSED
    assert b.totals(T0 + 10.5) == (1, 1, 0)
    # Within the window they still count.
    b2 = BreakerState(BreakerConfig(failure_ratio=0.5, min_calls=4, window_s=10))
    for _ in range(3):
        call(b2, T0, FAILURE)
    assert call(b2, T0 + 8.0, FAILURE) == OPEN


def test_a_call_exactly_one_window_later_lands_in_a_fresh_bucket_once() -> None:
    """1001.0 - 1000.1 over 0.1 rounds down to 8.99...: the rotation must still end its
    bucket after `now`, so one instant never rotates twice (reading the totals at the
    same instant must not move the window again)."""
    b = BreakerState(BreakerConfig(failure_ratio=0.6, min_calls=3, window_s=1.0))
    call(b, T0, FAILURE)
    call(b, T0, FAILURE)
    assert call(b, T0 + 1.0, SUCCESS) == CLOSED  # the failures are one window old
    assert b.totals(T0 + 1.0) == (1, 0, 0)
    assert b.totals(T0 + 1.0) == (1, 0, 0)  # the same instant again: nothing moves
    # ... so the success is still in the window 0.95 s later (a second rotation at
    # T0 + 1.0 had aged it by one bucket and dropped it here).
    assert b.totals(T0 + 1.95) == (1, 0, 0)


def test_opens_on_slow_call_ratio() -> None:
    config = BreakerConfig(min_calls=4, slow_call_ms=100, slow_call_ratio=0.5, window_s=10)
    b = BreakerState(config)
    assert call(b, T0, SUCCESS) == CLOSED
    assert call(b, T0, SUCCESS) == CLOSED
    assert call(b, T0, SUCCESS, slow=True) == CLOSED
    assert b.totals(T0) == (3, 0, 1)
    assert call(b, T0, SUCCESS, slow=True) == OPEN  # 2 slow of 4, no failure at all


def test_slow_calls_do_not_count_without_a_slow_ratio() -> None:
    b = BreakerState(BreakerConfig(min_calls=2, window_s=10))
    for _ in range(10):
        assert call(b, T0, SUCCESS, slow=True) == CLOSED


def test_opens_on_consecutive_failures() -> None:
    b = BreakerState(BreakerConfig(min_calls=1000, consecutive_failures=3))
    assert call(b, T0, FAILURE) == CLOSED
    assert call(b, T0, FAILURE) == CLOSED
    assert call(b, T0, SUCCESS) == CLOSED  # resets the run
    assert call(b, T0, FAILURE) == CLOSED
    assert call(b, T0, FAILURE) == CLOSED
    assert call(b, T0 + 600, FAILURE) == OPEN  # a run, however spread out in time


def test_open_rejects_with_time_until_half_open() -> None:
    b = BreakerState(BreakerConfig(open_s=5, open_min_s=5, open_jitter=0.0))
    for _ in range(20):
        call(b, T0, FAILURE)
    assert b.state == OPEN
    epoch = b.epoch
    gate = b.gate(T0 + 1.5, mid)
    # (field by field: compiled, Gate is a native class whose float field takes no approx)
    assert (gate.verdict, gate.state, gate.epoch) == ("reject", OPEN, epoch)
    assert gate.retry_after_s == pytest.approx(3.5)
    assert b.state == OPEN


# ---------------------------------------------------------------- open -> half-open


@pytest.mark.parametrize(("r", "factor"), [(0.0, 0.8), (0.5, 1.0), (0.75, 1.1), (0.9999, 1.19996)])
def test_open_duration_jitter(r: float, factor: float) -> None:
    b = BreakerState(BreakerConfig(open_s=10, open_min_s=10, open_jitter=0.2))
    b.force(OPEN, T0, lambda: r)
    assert b.open_until == pytest.approx(T0 + 10 * factor)
    assert b.gate(T0 + 10 * factor - 1e-6, mid).verdict == "reject"
    gate = b.gate(T0 + 10 * factor, mid)
    assert gate.verdict == "probe"
    assert b.state == HALF_OPEN


@settings(max_examples=100, deadline=None)
@given(
    r=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    open_s=st.floats(min_value=0.01, max_value=600),
    jitter=st.floats(min_value=0.0, max_value=0.9),
)
def test_open_duration_stays_within_jitter_bounds(r: float, open_s: float, jitter: float) -> None:
    b = BreakerState(BreakerConfig(open_s=open_s, open_min_s=open_s, open_jitter=jitter))
    b.force(OPEN, T0, lambda: r)
    duration = b.open_until - T0
    assert open_s * (1 - jitter) - 1e-9 <= duration <= open_s * (1 + jitter) + 1e-9
    rejected = b.gate(T0, mid)
    assert rejected.verdict == "reject"
    assert rejected.retry_after_s == pytest.approx(duration)
    assert b.gate(T0 + duration, mid).verdict == "probe"


def test_every_transition_bumps_the_epoch() -> None:
    b = BreakerState(BreakerConfig(min_calls=1, open_s=1, open_jitter=0))
    epochs = [b.epoch]
    call(b, T0, FAILURE)  # -> open
    epochs.append(b.epoch)
    b.gate(T0 + 1, mid)  # -> half-open
    epochs.append(b.epoch)
    call(b, T0 + 1, SUCCESS)  # probe -> closed
    epochs.append(b.epoch)
    assert b.state == CLOSED
    assert epochs == [0, 1, 2, 3]


# ---------------------------------------------------------------- half-open


def test_half_open_admits_at_most_n_probes() -> None:
    b = tripped(BreakerConfig(open_s=1, open_jitter=0, half_open_probes=2, probe_lease_s=30))
    first = b.gate(T0 + 1, mid)
    second = b.gate(T0 + 1, mid)
    third = b.gate(T0 + 1, mid)
    assert (first.verdict, second.verdict, third.verdict) == ("probe", "probe", "reject")
    assert first.probe_id != second.probe_id
    assert third.state == HALF_OPEN
    # Retry-After for a full half-open: until the oldest lease runs out, capped at open_s.
    assert third.retry_after_s == pytest.approx(1.0)


def test_probe_success_closes_and_resets_counts() -> None:
    config = BreakerConfig(min_calls=2, open_s=1, open_jitter=0, half_open_probes=2)
    b = tripped(config)
    probe = b.gate(T0 + 1, mid)
    assert b.record(probe.epoch, probe.probe_id, SUCCESS, T0 + 1, mid) == CLOSED
    assert b.totals(T0 + 1) == (0, 0, 0)
    assert b.gate(T0 + 1, mid).verdict == "allow"
    # A fresh window: one failure is not 2 calls yet.
    assert call(b, T0 + 1, FAILURE) == CLOSED


def test_probe_failure_reopens_with_a_new_open_period() -> None:
    b = tripped(BreakerConfig(open_s=4, open_min_s=4, open_jitter=0.2, half_open_probes=3))
    probe = b.gate(T0 + 5, mid)
    other = b.gate(T0 + 5, mid)
    assert b.record(probe.epoch, probe.probe_id, FAILURE, T0 + 6, lambda: 0.0) == OPEN
    assert b.open_until == pytest.approx(T0 + 6 + 4 * 0.8)
    assert b.gate(T0 + 6, mid).verdict == "reject"
    # The other probe of the failed round does not close it afterwards.
    assert b.record(other.epoch, other.probe_id, SUCCESS, T0 + 6.5, mid) == OPEN


def test_probes_of_a_failed_round_keep_their_slots() -> None:
    b = tripped(BreakerConfig(open_s=1, open_jitter=0, half_open_probes=2, probe_lease_s=60))
    failing = b.gate(T0 + 1, mid)
    still_running = b.gate(T0 + 1, mid)
    b.record(failing.epoch, failing.probe_id, FAILURE, T0 + 1, mid)
    assert b.state == OPEN
    assert b.gate(T0 + 2, mid).verdict == "probe"
    # `still_running` is a real call on the route: only one new probe fits.
    assert b.gate(T0 + 2, mid).verdict == "reject"
    # When it reports, its (stale) outcome is not counted but its slot is freed.
    assert b.record(still_running.epoch, still_running.probe_id, SUCCESS, T0 + 2, mid) == HALF_OPEN
    assert b.gate(T0 + 2, mid).verdict == "probe"


def test_slow_probe_reopens() -> None:
    b = tripped(BreakerConfig(open_s=1, open_jitter=0, slow_call_ms=100, slow_call_ratio=0.5))
    probe = b.gate(T0 + 1, mid)
    assert b.record(probe.epoch, probe.probe_id, SUCCESS, T0 + 1, mid, slow=True) == OPEN


def test_probe_lease_expiry_frees_the_slot() -> None:
    b = tripped(BreakerConfig(open_s=1, open_jitter=0, half_open_probes=1, probe_lease_s=10))
    lost = b.gate(T0 + 1, mid)
    assert lost.verdict == "probe"
    assert b.gate(T0 + 10.9, mid).verdict == "reject"
    assert b.gate(T0 + 10.9, mid).retry_after_s == pytest.approx(0.1)
    fresh = b.gate(T0 + 11, mid)  # the lost probe's lease ran out
    assert fresh.verdict == "probe"
    # The lost probe reporting late changes nothing, nor frees the new slot.
    assert b.record(lost.epoch, lost.probe_id, FAILURE, T0 + 12, mid) == HALF_OPEN
    assert b.gate(T0 + 12, mid).verdict == "reject"
    assert b.record(fresh.epoch, fresh.probe_id, SUCCESS, T0 + 12, mid) == CLOSED


def test_ignored_probe_frees_its_slot_and_keeps_half_open() -> None:
    b = tripped(BreakerConfig(open_s=1, open_jitter=0, half_open_probes=1))
    probe = b.gate(T0 + 1, mid)
    assert b.gate(T0 + 1, mid).verdict == "reject"
    assert b.record(probe.epoch, probe.probe_id, IGNORED, T0 + 1, mid) == HALF_OPEN
    again = b.gate(T0 + 1, mid)
    assert again.verdict == "probe"
    assert b.record(again.epoch, again.probe_id, IGNORED, T0 + 1, mid) == HALF_OPEN


def test_probe_reported_twice_counts_once() -> None:
    b = tripped(BreakerConfig(open_s=1, open_jitter=0, half_open_probes=2))
    probe = b.gate(T0 + 1, mid)
    b.gate(T0 + 1, mid)
    assert b.record(probe.epoch, probe.probe_id, IGNORED, T0 + 1, mid) == HALF_OPEN
    assert b.record(probe.epoch, probe.probe_id, FAILURE, T0 + 1, mid) == HALF_OPEN


# ---------------------------------------------------------------- stale and ignored


def test_stale_epoch_success_does_not_close() -> None:
    b = BreakerState(BreakerConfig(min_calls=2, open_s=1, open_jitter=0, half_open_probes=1))
    slow_call = b.gate(T0, mid)  # admitted while closed
    call(b, T0, FAILURE)
    call(b, T0, FAILURE)
    assert b.state == OPEN
    assert b.record(slow_call.epoch, 0, SUCCESS, T0 + 0.5, mid) == OPEN
    b.gate(T0 + 1, mid)  # -> half-open, a probe in flight
    assert b.record(slow_call.epoch, 0, SUCCESS, T0 + 1, mid) == HALF_OPEN


def test_stale_epoch_failure_does_not_reopen_or_count() -> None:
    b = BreakerState(BreakerConfig(min_calls=1, open_s=1, open_jitter=0))
    old_calls = [b.gate(T0, mid) for _ in range(5)]
    call(b, T0, FAILURE)  # opens
    probe = b.gate(T0 + 1, mid)
    b.record(probe.epoch, probe.probe_id, SUCCESS, T0 + 1, mid)
    assert b.state == CLOSED
    for gate in old_calls:  # failures of calls admitted two epochs ago
        assert b.record(gate.epoch, gate.probe_id, FAILURE, T0 + 2, mid) == CLOSED
    assert b.totals(T0 + 2) == (0, 0, 0)


def test_ignored_outcomes_never_count() -> None:
    b = BreakerState(BreakerConfig(min_calls=1, consecutive_failures=1))
    for _ in range(100):
        assert call(b, T0, IGNORED) == CLOSED
    assert b.totals(T0) == (0, 0, 0)
    assert b.consecutive == 0
    b = BreakerState(BreakerConfig(min_calls=1000, consecutive_failures=2))
    call(b, T0, FAILURE)
    call(b, T0, IGNORED)  # neither resets nor extends the run
    assert b.consecutive == 1
    assert call(b, T0, FAILURE) == OPEN


def test_force() -> None:
    b = BreakerState(BreakerConfig(open_s=2, open_jitter=0))
    b.force(OPEN, T0, mid)
    assert b.gate(T0, mid).verdict == "reject"
    b.force(CLOSED, T0, mid)
    assert b.gate(T0, mid).verdict == "allow"


# ---------------------------------------------------------------- probe bound


class ProbeBound(RuleBasedStateMachine):
    """Whatever happens, never more than `half_open_probes` probes in flight.

    A probe is in flight from its gate until it reports; the lease is long, so
    no slot is freed by time. Probes of an earlier half-open round that are
    still running count too (they are real concurrent calls on a recovering
    route) until the breaker closes: closed, it admits every call anyway.
    """

    def __init__(self) -> None:
        super().__init__()
        self.limit = 2
        self.config = BreakerConfig(
            min_calls=2,
            window_s=10,
            open_s=1,
            open_jitter=0.2,
            half_open_probes=self.limit,
            probe_lease_s=86_400,
            consecutive_failures=2,
        )
        self.breaker = BreakerState(self.config)
        self.now = T0
        self.calls: list[Gate] = []
        self.closed_epoch = -1

    @rule(random=st.floats(min_value=0, max_value=0.999))
    def gate(self, random: float) -> None:
        gate = self.breaker.gate(self.now, lambda: random)
        if gate.verdict != "reject":
            self.calls.append(gate)
        else:
            assert gate.retry_after_s >= 0

    @rule(dt=st.sampled_from([0.0, 0.1, 0.5, 1.0, 1.3, 5.0, 20.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @precondition(lambda self: bool(self.calls))
    @rule(
        index=st.integers(min_value=0),
        outcome=st.sampled_from([SUCCESS, FAILURE, FAILURE, IGNORED]),
        slow=st.booleans(),
        random=st.floats(min_value=0, max_value=0.999),
    )
    def finish(self, index: int, outcome: str, slow: bool, random: float) -> None:
        gate = self.calls.pop(index % len(self.calls))
        self.breaker.record(gate.epoch, gate.probe_id, outcome, self.now, lambda: random, slow)

    @rule()
    def trip(self) -> None:
        self.breaker.force(OPEN, self.now, mid)

    @invariant()
    def probes_in_flight_within_bound(self) -> None:
        # A close ends every half-open round: a closed breaker admits everything, so a
        # probe still running from before it is an ordinary call from then on.
        if self.breaker.state == CLOSED:
            self.closed_epoch = self.breaker.epoch
        in_flight = sum(
            1 for gate in self.calls if gate.verdict == "probe" and gate.epoch > self.closed_epoch
        )
        assert in_flight <= self.limit
        assert len(self.breaker.probes) <= self.limit

    @invariant()
    def state_is_known(self) -> None:
        assert self.breaker.state in (CLOSED, OPEN, HALF_OPEN)


ProbeBound.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestProbeBound = ProbeBound.TestCase


@settings(max_examples=100, deadline=None)
@given(
    probes=st.integers(min_value=1, max_value=5),
    attempts=st.integers(min_value=1, max_value=30),
)
def test_half_open_never_admits_more_than_the_limit_at_once(probes: int, attempts: int) -> None:
    b = tripped(BreakerConfig(open_s=1, open_jitter=0, half_open_probes=probes))
    gates = [b.gate(T0 + 1, mid) for _ in range(attempts)]
    assert sum(g.verdict == "probe" for g in gates) == min(probes, attempts)
