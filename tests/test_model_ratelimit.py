"""GCRA (ratelimit.gcra) against a plain token bucket in exact fractions.

Arbitrary sequences of requests (several keys, several limits, costs from 1
to more than the burst) and clock advances (multiples of a quarter interval,
to sit on the edges, and arbitrary floats): every verdict, `remaining`,
`reset_s` and `retry_after_s` must be what the token bucket says.
"""

from __future__ import annotations

from fractions import Fraction

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fidelity_mw.decide.gcra import gcra
from reference_model import RefBucket, floors_near

T0 = 1_000.0
RATES = [(1, 1.0), (3, 1.0), (10, 1.0), (100, 1.0), (5, 60.0), (7, 10.0), (2, 3600.0)]
KEYS = ["k0", "k1", "k2"]


def near(actual: float, expected: Fraction, interval: Fraction) -> bool:
    """Seconds agree up to a hundred-thousandth of an interval (float vs exact)."""
    return abs(Fraction(actual) - expected) <= interval / 100_000 + Fraction(1, 10**9)


class GcraAgainstTokenBucket(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.limits: list[tuple[int, float, int]] = []  # (count, period_s, burst)
        self.tats: dict[tuple[int, str], float] = {}
        self.model: dict[tuple[int, str], RefBucket] = {}
        self.admitted = 0
        self.rejected = 0

    @initialize(
        limits=st.lists(
            st.tuples(st.sampled_from(RATES), st.integers(1, 12)), min_size=1, max_size=3
        )
    )
    def setup(self, limits: list[tuple[tuple[int, float], int]]) -> None:
        self.limits = [(count, period, burst) for (count, period), burst in limits]
        for i, (count, period, burst) in enumerate(self.limits):
            for key in KEYS:
                self.model[(i, key)] = RefBucket(count, period, burst, self.now)

    def interval(self, i: int) -> float:
        count, period, _ = self.limits[i]
        return period / count

    @rule(
        which=st.integers(0, 2),
        key=st.sampled_from(KEYS),
        extra=st.integers(0, 13),
    )
    def request(self, which: int, key: str, extra: int) -> None:
        i = which % len(self.limits)
        count, period, burst = self.limits[i]
        cost = 1 + extra % (burst + 1)  # 1 .. burst + 1 (never admissible)
        interval = period / count
        bucket = self.model[(i, key)]
        answer = bucket.ask(self.now, cost)
        tat = self.tats.get((i, key), self.now)
        v = gcra(tat, self.now, interval, burst * interval, cost)
        assert v.allowed in answer.allowed, (answer, v)
        exact_interval = bucket.interval
        if v.allowed:
            self.admitted += 1
            bucket.take(cost)
            self.tats[(i, key)] = v.tat
            after = bucket.tokens
            assert v.retry_after_s == 0.0
            assert v.remaining in floors_near(after), (after, v)
            assert near(v.reset_s, (bucket.burst - after) * exact_interval, exact_interval)
        else:
            self.rejected += 1
            assert v.tat == tat, "a rejection changes nothing"
            tokens = answer.tokens_before
            assert v.remaining in floors_near(tokens), (tokens, v)
            assert v.retry_after_s > 0.0
            assert near(
                v.retry_after_s, max(Fraction(0), cost - tokens) * exact_interval, exact_interval
            )
            assert near(v.reset_s, (bucket.burst - tokens) * exact_interval, exact_interval)

    @rule(quarters=st.integers(0, 12), which=st.integers(0, 2))
    def advance_on_grid(self, quarters: int, which: int) -> None:
        """Land on (or near) the instants where a token becomes whole."""
        self.now += quarters * self.interval(which % len(self.limits)) / 4

    @rule(dt=st.floats(0.0, 5.0, allow_nan=False))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def idle_long(self) -> None:
        self.now += 2 * max(self.interval(i) * b for i, (_, _, b) in enumerate(self.limits))

    @invariant()
    def stored_tats_stay_within_one_burst(self) -> None:
        # a stored TAT is never more than burst intervals ahead of now
        for (i, _key), tat in self.tats.items():
            _, _, burst = self.limits[i]
            assert tat - self.now <= burst * self.interval(i) * (1 + 1e-9) + 1e-9


GcraAgainstTokenBucket.TestCase.settings = settings(
    max_examples=120, stateful_step_count=60, deadline=None
)
TestGcraAgainstTokenBucket = GcraAgainstTokenBucket.TestCase
