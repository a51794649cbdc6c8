"""Retry credit (decide.gcra.earn_credit / spend_credit / credit_verdict), issue 13 item 6.

A refund gives back only units still outstanding; what it falls short of the
request's `cost * interval` becomes credit on the key (capped at one burst,
expiring `credit_s` after the last refund that earned some). Credit admits only
what GCRA alone refuses and leaves the TAT alone; a refund of such an admission
gives nothing back to the TAT and returns its cost as credit.

Pure arithmetic on fake time, the memory store, and a Hypothesis check against an
exact reference: GCRA admissions conform to the ledger of live GCRA admissions (as
without credit), credit admissions are exactly those an exact credit balance
allows, and over any window the key admits at most rate x t + burst units plus
the units credited by the refunds of the credit that was alive in the window.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fidelity_mw import Policy, RateLimit
from fidelity_mw.decide.gcra import (
    LimitVerdict,
    credit_verdict,
    earn_credit,
    gcra,
    marker,
    refund_seconds,
    spend_credit,
)
from fidelity_mw.engine import RoutePlan
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.memory import MemoryStore
from reference_model import TOKEN_TOL, RefCredit, RefLedger

T0 = 1_000.0
# 5/s, burst 5 (the demo's client limit): interval 0.2 s, tolerance 1 s
SPEC = LimitSpec("l", 0.2, 1.0, 1, False, 10.0)
KEY = "l|c"


def admit(store: MemoryStore, now: float, spec: LimitSpec = SPEC) -> LimitVerdict:
    result = store.admit_now(None, None, [KEY], [spec], now)
    return result.limits[0]


def fill_and_fail(store: MemoryStore, spec: LimitSpec = SPEC, n: int = 4) -> list[float]:
    """Take the whole burst at T0; `n` of those requests fail one second later, when
    their units have refilled: their refunds give back nothing."""
    markers = [admit(store, T0, spec).tat for _ in range(5)]
    assert not admit(store, T0, spec).allowed
    store.refund_now([KEY] * n, [spec] * n, T0 + 1.0, markers[:n])
    return markers


# ---------------------------------------------------------------- pure arithmetic


def test_a_refund_gives_back_what_is_outstanding_and_credits_the_whole_cost() -> None:
    # admitted at 1000 with marker 1000.6 (three units out), refunded at 1000.5
    assert refund_seconds(1000.6, 1000.5, 0.2, 1, 0.0) == pytest.approx(0.1)
    # the credit is the request's cost, for its retry, whatever the bucket got back
    assert earn_credit(0.0, 0.0, 0.2, 1000.5, 0.2, 1.0, 10.0) == (0.2, 1010.5)


def test_credit_is_capped_at_one_burst_and_refreshed_by_each_earning_refund() -> None:
    credit, expires = earn_credit(0.9, 1005.0, 0.2, 1000.0, 0.2, 1.0, 10.0)
    assert (credit, expires) == (1.0, 1010.0)
    # expired credit starts again from nothing
    assert earn_credit(0.9, 1005.0, 0.2, 1006.0, 0.2, 1.0, 10.0) == (0.2, 1016.0)


def test_no_credit_when_off() -> None:
    assert earn_credit(0.0, 0.0, 0.2, 1000.0, 0.2, 1.0, 0.0) == (0.0, 0.0)
    assert earn_credit(0.4, 1003.0, 0.2, 1000.0, 0.2, 1.0, 0.0) == (0.4, 1003.0)


def test_spending_needs_a_whole_request_of_live_credit() -> None:
    assert spend_credit(0.4, 1010.0, 1000.0, 0.2, 1) == pytest.approx(0.2)
    assert spend_credit(0.2, 1010.0, 1000.0, 0.2, 1) == 0.0
    assert spend_credit(0.2 - 1e-9, 1010.0, 1000.0, 0.2, 1) == 0.0  # float noise
    assert spend_credit(0.19, 1010.0, 1000.0, 0.2, 1) is None
    assert spend_credit(0.4, 1010.0, 1000.0, 0.2, 3) is None  # cost 3 needs 0.6
    assert spend_credit(1.0, 1010.0, 1010.0, 0.2, 1) is None  # expired


def test_a_credit_verdict_reports_a_full_buckets_marker() -> None:
    refused = gcra(1001.0, 1000.0, 0.2, 1.0, 1)
    assert not refused.allowed
    verdict = credit_verdict(refused, 1000.0, 0.3)
    assert verdict.allowed
    assert verdict.credit
    assert verdict.tat == marker(1000.0, 0.3)
    assert (verdict.remaining, verdict.reset_s, verdict.retry_after_s) == (0, 1.0, 0.0)
    # its refund gives nothing back to the TAT, whatever happened since
    assert refund_seconds(verdict.tat, 1000.0, 0.2, 1, 0.3) == 0.0
    assert refund_seconds(verdict.tat, 1000.5, 0.2, 1, 0.7) == 0.0


# ---------------------------------------------------------------- the memory store


def test_credit_is_earned_by_refunds_that_fall_short_and_spent_on_refusals() -> None:
    store = MemoryStore()
    fill_and_fail(store)
    now = T0 + 1.0
    held = store.limits.credits[KEY]
    assert held == (pytest.approx(0.8), now + 10.0)
    assert store.limits.tats.get(KEY, now) <= now + 1e-6  # a full bucket: only the credit held
    verdicts = [admit(store, now) for _ in range(10)]
    # a full bucket (5) first, then the 4 units of credit, then a refusal
    assert [v.allowed for v in verdicts] == [True] * 9 + [False]
    assert [v.credit for v in verdicts] == [False] * 5 + [True] * 4 + [False]
    assert verdicts[-1].retry_after_s > 0
    assert KEY not in store.limits.credits  # spent: dropped
    assert store.limits.tats[KEY] == pytest.approx(now + 1.0)  # only GCRA moved it


def test_credit_expires() -> None:
    store = MemoryStore()
    fill_and_fail(store)
    later = T0 + 1.0 + 10.0
    assert [admit(store, later).allowed for _ in range(6)] == [True] * 5 + [False]


def test_credit_is_capped_at_the_burst() -> None:
    store = MemoryStore()
    for start in (T0, T0 + 1.0):  # twice 4 failed requests: 8 units short, 5 kept
        markers = [admit(store, start).tat for _ in range(5)]
        store.refund_now([KEY] * 4, [SPEC] * 4, start + 1.0, markers[:4])
    assert store.limits.credits[KEY][0] == pytest.approx(1.0)
    now = T0 + 2.0
    assert sum(admit(store, now).allowed for _ in range(20)) == 5 + 5


@pytest.mark.parametrize("spec", [SPEC._replace(credit_s=0.0)])
def test_no_credit_when_it_is_off(spec: LimitSpec) -> None:
    store = MemoryStore()
    fill_and_fail(store, spec)
    assert not store.limits.credits
    assert [admit(store, T0 + 1.0, spec).allowed for _ in range(6)] == [True] * 5 + [False]


def test_charge_always_has_no_credit_and_served_has_ten_seconds() -> None:
    served = RateLimit(name="s", rate="5/s")
    always = RateLimit(name="a", rate="5/s", charge="always")
    off = RateLimit(name="o", rate="5/s", retry_credit_s=0.0)
    plan = RoutePlan("/x", None, (served, always, off), None, None)
    assert [spec.credit_s for spec in plan.specs] == [10.0, 0.0, 0.0]
    assert Policy.from_dict({"rate_limit": [{"retry_credit_s": 2.5}]}).rate_limits[
        0
    ].retry_credit_s == (2.5)


def test_a_refund_of_a_credit_admission_returns_its_credit_and_leaves_the_tat() -> None:
    store = MemoryStore()
    fill_and_fail(store)
    now = T0 + 1.0
    for _ in range(5):
        admit(store, now)
    spent = admit(store, now)
    assert spent.credit
    assert store.limits.credits[KEY][0] == pytest.approx(0.6)
    tat = store.limits.tats[KEY]
    store.refund_now([KEY], [SPEC], now + 0.1, [spent.tat])
    assert store.limits.tats[KEY] == tat  # nothing given back to the bucket
    assert store.limits.credits[KEY] == (pytest.approx(0.8), now + 0.1 + 10.0)
    # 4 units of credit again, not 5: nothing was minted twice
    assert sum(admit(store, now + 0.1).allowed for _ in range(10)) == 4


def test_a_multi_limit_request_spends_credit_only_when_admitted() -> None:
    store = MemoryStore()
    fill_and_fail(store)
    other = LimitSpec("o", 1.0, 1.0, 1, False)  # 1/s, burst 1: empty after one request
    now = T0 + 1.0
    for _ in range(5):
        admit(store, now)
    assert store.admit_now(None, None, [KEY, "o|c"], [SPEC, other], now).admitted
    refused = store.admit_now(None, None, [KEY, "o|c"], [SPEC, other], now)
    assert not refused.admitted
    assert refused.limits[0].credit  # would have come from credit ...
    assert store.limits.credits[KEY][0] == pytest.approx(0.6)  # ... but nothing was spent


def test_without_refunds_nothing_changes() -> None:
    """Credit on or off, a store that never refunds holds the same values."""
    stores = {w: MemoryStore() for w in (0.0, 10.0)}
    for w, store in stores.items():
        spec = SPEC._replace(credit_s=w)
        for step in range(40):
            now = T0 + step * 0.07
            for _ in range(step % 3):
                admit(store, now, spec)
    a, b = stores[0.0].limits, stores[10.0].limits
    assert (a.tats, a.refunded, a.credits) == (b.tats, b.refunded, b.credits)
    assert not b.credits


# ---------------------------------------------------------------- against the reference


class Key:
    """One limiter key as the stores keep it: TAT, refunded seconds, credit, expiry."""

    def __init__(self, interval: float, burst: int, window: float) -> None:
        self.interval = interval
        self.tolerance = burst * interval
        self.window = window
        self.tat = 0.0
        self.refunded = 0.0
        self.credit = 0.0
        self.expires = 0.0

    def admit(self, now: float, cost: int) -> tuple[LimitVerdict, bool]:
        """The verdict, and whether GCRA alone would have admitted it."""
        verdict = gcra(self.tat, now, self.interval, self.tolerance, cost)
        if verdict.allowed:
            self.tat = verdict.tat
            return verdict._replace(tat=marker(verdict.tat, self.refunded)), True
        left = spend_credit(self.credit, self.expires, now, self.interval, cost)
        if left is None:
            return verdict, False
        self.credit, self.expires = (left, self.expires) if left > 0 else (0.0, 0.0)
        return credit_verdict(verdict, now, self.refunded), False

    def refund(self, mark: float, now: float, cost: int) -> float:
        give = refund_seconds(mark, now, self.interval, cost, self.refunded)
        self.tat -= give
        self.refunded += give
        self.credit, self.expires = earn_credit(
            self.credit,
            self.expires,
            cost * self.interval,
            now,
            self.interval,
            self.tolerance,
            self.window,
        )
        return give


ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.sampled_from([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 4.0])),
        st.tuples(st.just("admit"), st.sampled_from([1, 1, 2]), st.integers(1, 4)),
        st.tuples(st.just("refund"), st.integers(0, 20)),
        st.tuples(st.just("refund"), st.integers(0, 20)),
    ),
    min_size=1,
    max_size=50,
)


@settings(max_examples=400, deadline=None)
@given(
    limit=st.sampled_from([(5, 1.0, 5), (1, 1.0, 2), (2, 1.0, 3), (1, 0.1, 8)]),
    window=st.sampled_from([10.0, 1.0, 0.3]),
    steps=ops,
)
# A refund at 1000.0 + 0.05 + 0.25, the float that 1000.0 + 0.3 (the credit's expiry)
# also rounds to: the store finds the credit gone, the exact model alive. Rejected.
@example(
    limit=(5, 1.0, 5),
    window=0.3,
    steps=[
        ("admit", 1, 1),
        ("admit", 1, 4),
        ("refund", 0),
        ("refund", 0),
        ("advance", 0.05),
        ("advance", 0.25),
        ("refund", 0),
        ("admit", 1, 1),
        ("admit", 1, 4),
    ],
)
def test_credit_admits_exactly_what_the_reference_allows(
    limit: tuple[int, float, int], window: float, steps: list[tuple[int | str, ...]]
) -> None:
    count, period, burst = limit
    interval = period / count
    key = Key(interval, burst, window)
    ledger = RefLedger(count, period, burst)
    credit = RefCredit(interval, burst, window)
    now = T0
    # marker, cost, ledger index (None: admitted from credit), admission number
    charged: list[tuple[float, int, int | None, int]] = []
    admitted: dict[int, tuple[Fraction, int]] = {}  # the live ones: time, cost
    for step in steps:
        if step[0] == "advance":
            now += float(step[1])
        elif step[0] == "admit":
            _, cost, repeat = step
            assert isinstance(cost, int)
            assert isinstance(repeat, int)
            for _ in range(repeat):
                verdict, by_gcra = key.admit(now, cost)
                if by_gcra:
                    # as without credit: the exact bucket of live GCRA admissions holds it
                    assert ledger.tokens(now) >= cost - TOKEN_TOL, (now, cost)
                    charged.append((verdict.tat, cost, ledger.admit(now, cost), len(admitted)))
                    admitted[len(admitted)] = (Fraction(now), cost)
                    continue
                assert verdict.allowed in credit.answers(now, cost), (now, verdict)
                if verdict.allowed:
                    assert verdict.credit
                    credit.spend(cost)
                    charged.append((verdict.tat, cost, None, len(admitted)))
                    admitted[len(admitted)] = (Fraction(now), cost)
        elif charged:
            mark, cost, index, number = charged.pop(int(step[1]) % len(charged))
            give = key.refund(mark, now, cost)
            assert 0.0 <= give <= cost * interval + 1e-9
            if index is None:
                assert give == 0.0  # a credit admission took nothing from the bucket
            else:
                ledger.refund(index)
            credit.earn(now, Fraction(cost * interval))
            # the refunded request no longer counts (its units, or its credit, came back)
            admitted[number] = (Fraction(-1), 0)
        # over any window ending now: at most rate x t + burst + the credited units
        rate = Fraction(count) / Fraction(period)
        end = Fraction(now)
        live = [(t, c) for t, c in admitted.values() if c]
        for start, _ in live:
            units = sum(c for t, c in live if start <= t <= end)
            bound = rate * (end - start) + burst
            bound += credit.earned_alive(float(start), now) / Fraction(interval)
            assert units <= bound + TOKEN_TOL, (float(start), now, units, float(bound))
