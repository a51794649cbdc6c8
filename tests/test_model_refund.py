"""Refunds (decide.gcra.refund) against the reference ledger, in pure arithmetic.

The rule a refund follows: an admission reports its marker (stored TAT plus
the seconds the key has refunded so far); a refund gives back at most
marker - refunded now - now seconds, never more than the request took. Any
order of admissions, refunds and clock advances must admit only what an
exact token bucket over the admitted requests, refunded ones removed
(`RefLedger`), would admit.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fidelity_mw.decide.gcra import gcra, marker, refund
from reference_model import TOKEN_TOL, RefLedger

T0 = 1_000.0


class Key:
    """One limiter key as the stores keep it: the TAT and the seconds refunded."""

    def __init__(self, interval: float, burst: int) -> None:
        self.interval = interval
        self.tolerance = burst * interval
        self.tat = 0.0
        self.refunded = 0.0

    def admit(self, now: float, cost: int) -> float | None:
        verdict = gcra(self.tat, now, self.interval, self.tolerance, cost)
        if not verdict.allowed:
            return None
        self.tat = verdict.tat
        return marker(verdict.tat, self.refunded)

    def refund(self, mark: float, now: float, cost: int) -> float:
        back = self.tat - refund(self.tat, mark, now, self.interval, cost, self.refunded)
        self.tat -= back
        self.refunded += back
        return back


def test_a_refund_after_another_refund_gives_back_only_outstanding_units() -> None:
    """Rate 1/s, burst 2. Refunding r1 moves r2's and r3's units forward in the refill
    order, so their admission TATs overstate how long those units stay out: r2's
    refilled at 1001, r3's is out until 1002 only. The old rule (admission TAT
    minus now) gave back a second for r2 as well, and two units were free at 1001
    where the exact bucket (r1, r2, r3 removed) holds one."""
    key = Key(1.0, 2)
    m1 = key.admit(1000.0, 1)
    m2 = key.admit(1000.0, 1)
    assert (m1, m2, key.tat) == (1001.0, 1002.0, 1002.0)
    assert key.refund(m1, 1000.0, 1) == 1.0  # r1's unit was out until 1001
    m3 = key.admit(1000.0, 1)
    assert (key.tat, m3) == (1002.0, 1003.0)  # r3's marker counts r1's refund
    assert key.refund(m2, 1001.0, 1) == 0.0  # r2's unit refilled at 1001
    m4 = key.admit(1001.0, 1)
    assert m4 is not None
    assert key.tat == 1003.0
    assert key.refund(m3, 1001.0, 1) == 1.0
    # r1, r2, r3 removed: only r4 holds a unit at 1001, one of the two is free
    assert gcra(key.tat, 1001.0, 1.0, 2.0, 1).remaining == 0
    assert key.admit(1001.0, 1) is not None
    assert key.admit(1001.0, 1) is None


def test_without_refunds_the_marker_is_the_tat() -> None:
    key = Key(0.5, 3)
    assert key.admit(T0, 2) == key.tat == T0 + 1.0


refund_op = st.tuples(st.just("refund"), st.integers(0, 20))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.sampled_from([0.1, 0.25, 0.5, 1.0, 2.5])),
        st.tuples(st.just("admit"), st.sampled_from([1, 1, 2]), st.integers(1, 2)),
        refund_op,
        refund_op,  # refunds after refunds are what goes wrong
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(
    limit=st.sampled_from([(1, 1.0, 2), (2, 1.0, 3), (3, 1.0, 1), (1, 0.1, 8)]),
    steps=ops,
)
def test_refunds_never_admit_more_than_the_reference(
    limit: tuple[int, float, int], steps: list[tuple[int | str, ...]]
) -> None:
    count, period, burst = limit
    key = Key(period / count, burst)
    ledger = RefLedger(count, period, burst)
    now = T0
    charged: list[tuple[float, int, int]] = []  # marker, cost, ledger index
    for step in steps:
        if step[0] == "advance":
            now += float(step[1])
        elif step[0] == "admit":
            _, cost, repeat = step
            assert isinstance(cost, int)
            assert isinstance(repeat, int)
            for _ in range(repeat):
                mark = key.admit(now, cost)
                if mark is not None:
                    assert ledger.tokens(now) >= cost - TOKEN_TOL, (now, cost)
                    charged.append((mark, cost, ledger.admit(now, cost)))
        elif charged:
            mark, cost, index = charged.pop(int(step[1]) % len(charged))
            back = key.refund(mark, now, cost)
            assert 0.0 <= back <= cost * key.interval + 1e-9
            ledger.refund(index)
