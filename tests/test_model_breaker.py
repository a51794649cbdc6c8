"""BreakerState (breaker.py) against the reference breaker written from the documented rules.

Arbitrary interleavings of calls starting, finishing (success, failure, slow,
ignored) in any order, probes, calls that never report, and clock advances,
under arbitrary configurations. After every step the implementation must be
in the state the model accepts, in the same epoch, with the same number of
probe slots taken (never more than `half_open_probes`); gates must agree,
including the Retry-After a rejection announces.
"""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from fidelity_mw import BreakerConfig
from fidelity_mw.decide.breaker import FAILURE, IGNORED, SUCCESS, BreakerState, Gate
from reference_model import CLOSED, OPEN, RefBreaker, RefCall

T0 = 1_000.0
OUTCOMES = {"success": SUCCESS, "failure": FAILURE, "ignored": IGNORED}

configs = st.builds(
    BreakerConfig,
    failure_ratio=st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.6, 0.7, 1.0]),
    min_calls=st.integers(1, 6),
    window_s=st.sampled_from([1.0, 3.0, 10.0]),
    open_s=st.sampled_from([0.5, 1.0, 5.0]),
    open_jitter=st.sampled_from([0.0, 0.2, 0.5]),
    half_open_probes=st.integers(1, 3),
    probe_lease_s=st.sampled_from([0.5, 2.0, 30.0]),
    consecutive_failures=st.one_of(st.none(), st.integers(1, 4)),
    slow_call_ms=st.just(None),
    slow_call_ratio=st.just(None),
) | st.builds(
    BreakerConfig,
    failure_ratio=st.sampled_from([0.5, 1.0]),
    min_calls=st.integers(1, 4),
    window_s=st.sampled_from([1.0, 10.0]),
    open_s=st.sampled_from([1.0]),
    open_jitter=st.just(0.0),
    half_open_probes=st.integers(1, 2),
    probe_lease_s=st.sampled_from([2.0]),
    slow_call_ms=st.just(100),
    slow_call_ratio=st.sampled_from([0.3, 0.5, 1.0]),
)


class BreakerAgainstModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.inflight: list[tuple[Gate, RefCall]] = []
        self.opened = 0
        self.closed_again = 0

    @initialize(cfg=configs, seed=st.integers(0, 2**32 - 1))
    def setup(self, cfg: BreakerConfig, seed: int) -> None:
        self.cfg = cfg
        self.impl = BreakerState(cfg)
        self.impl_rng = random.Random(seed).random  # same stream as the model's own
        self.model = RefBreaker.from_config(cfg, seed)

    # ------------------------------------------------------------ calls

    @precondition(lambda self: len(self.inflight) < 8)
    @rule()
    def start(self) -> None:
        gate = self.impl.gate(self.now, self.impl_rng)
        verdict, call, (lo, hi) = self.model.gate(self.now)
        assert gate.verdict == verdict, (gate, verdict, self.model)
        assert gate.epoch == self.model.epoch
        if verdict == "reject":
            assert lo - 1e-9 <= gate.retry_after_s <= hi + 1e-9, (gate, lo, hi)
            return
        assert call is not None
        assert (gate.probe_id != 0) == (call.probe != 0)
        self.inflight.append((gate, call))

    @precondition(lambda self: self.inflight)
    @rule(
        index=st.integers(0, 7),
        outcome=st.sampled_from(["success", "failure", "ignored"]),
        slow=st.booleans(),
    )
    def finish(self, index: int, outcome: str, slow: bool) -> None:
        gate, call = self.inflight.pop(index % len(self.inflight))
        slow = slow and self.cfg.slow_call_ratio is not None
        before = self.impl.state
        state = self.impl.record(
            gate.epoch, gate.probe_id, OUTCOMES[outcome], self.now, self.impl_rng, slow
        )
        accepted = self.model.record(call, outcome, self.now, slow)
        assert state in accepted, (state, accepted, outcome, slow, self.model)
        if len(accepted) > 1 and state == OPEN:
            # the window edge made it a coin toss: follow the implementation
            self.model.open_now(self.now)
        assert state == self.model.state
        if before != OPEN and state == OPEN:
            self.opened += 1
        if before != CLOSED and state == CLOSED:
            self.closed_again += 1

    @precondition(lambda self: self.inflight)
    @rule(index=st.integers(0, 7))
    def vanish(self, index: int) -> None:
        """A call that never reports (its worker died): only the probe lease frees it."""
        self.inflight.pop(index % len(self.inflight))

    # ------------------------------------------------------------ time

    @rule(tenths=st.integers(0, 12))
    def advance_window_tenths(self, tenths: int) -> None:
        self.now += tenths * self.cfg.window_s / 10

    @rule(dt=st.floats(0.0, 3.0, allow_nan=False))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def wait_out_open_period(self) -> None:
        self.now += self.cfg.open_s * (1 + self.cfg.open_jitter)

    @rule()
    def wait_out_probe_lease(self) -> None:
        self.now += self.cfg.probe_lease_s

    # ------------------------------------------------------------ agreement

    @invariant()
    def same_state_epoch_and_probe_slots(self) -> None:
        if not hasattr(self, "impl"):
            return
        assert self.impl.state == self.model.state
        assert self.impl.epoch == self.model.epoch
        assert len(self.impl.probes) == len(self.model.probes)
        assert len(self.impl.probes) <= self.cfg.half_open_probes
        if self.model.state == OPEN:
            assert abs(self.impl.open_until - self.model.open_until) <= 1e-9


BreakerAgainstModel.TestCase.settings = settings(
    max_examples=250, stateful_step_count=60, deadline=None
)
TestBreakerAgainstModel = BreakerAgainstModel.TestCase
