"""GCRA: exact numbers, the token-bucket properties, several limits, shadow mode."""

from __future__ import annotations

import math
from fractions import Fraction

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fidelity_mw import FidelityMiddleware, Policy, RateLimit
from fidelity_mw.decide.gcra import gcra, policy_field, retry_after_header
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import FakeClock

NOW = 1_000.0


def spec(name: str, count: int, period_s: float, burst: int, cost: int = 1, shadow: bool = False):  # type: ignore[no-untyped-def]
    interval = period_s / count
    return LimitSpec(name, interval, burst * interval, cost, shadow)


# ---------------------------------------------------------------- exact numbers


def test_fresh_key_admits_a_full_burst_then_rejects() -> None:
    interval, tolerance = 0.1, 0.5  # 10/s, burst 5
    tat = NOW
    remaining = []
    for _ in range(5):
        verdict = gcra(tat, NOW, interval, tolerance)
        assert verdict.allowed
        assert verdict.retry_after_s == 0.0
        tat = verdict.tat
        remaining.append(verdict.remaining)
    assert remaining == [4, 3, 2, 1, 0]
    assert tat == pytest.approx(NOW + 0.5)
    assert gcra(tat, NOW, interval, tolerance).reset_s == pytest.approx(0.5)

    rejected = gcra(tat, NOW, interval, tolerance)
    assert not rejected.allowed
    assert rejected.tat == tat  # a rejection stores nothing new
    assert rejected.remaining == 0
    assert rejected.retry_after_s == pytest.approx(0.1)
    assert rejected.reset_s == pytest.approx(0.5)


def test_refill_is_one_unit_per_interval() -> None:
    interval, tolerance = 0.1, 0.5
    tat = NOW + 0.5  # bucket empty
    assert not gcra(tat, NOW + 0.099, interval, tolerance).allowed
    assert gcra(tat, NOW + 0.099, interval, tolerance).retry_after_s == pytest.approx(0.001)
    after = gcra(tat, NOW + 0.1, interval, tolerance)
    assert after.allowed
    assert after.remaining == 0
    # Half a second later the bucket is full again: a fresh burst of 5.
    verdict = gcra(tat, NOW + 0.5, interval, tolerance)
    assert verdict.allowed
    assert verdict.remaining == 4
    # Long idle: no more than a full bucket, ever.
    assert gcra(tat, NOW + 3600, interval, tolerance).remaining == 4


def test_cost() -> None:
    interval, tolerance = 0.1, 0.5
    first = gcra(NOW, NOW, interval, tolerance, cost=3)
    assert first.allowed
    assert first.remaining == 2
    assert first.tat == pytest.approx(NOW + 0.3)
    second = gcra(first.tat, NOW, interval, tolerance, cost=3)
    assert not second.allowed
    assert second.remaining == 2  # two units are there, three were asked for
    assert second.retry_after_s == pytest.approx(0.1)
    assert gcra(first.tat, NOW, interval, tolerance, cost=2).allowed
    assert gcra(first.tat, NOW + 0.1, interval, tolerance, cost=3).allowed


def test_exact_boundary_is_admitted_despite_float_drift() -> None:
    # 3/s with burst 3: intervals of 1/3 s do not add up exactly in floats.
    interval = 1 / 3
    tolerance = 3 * interval
    tat = NOW
    for _ in range(3):
        verdict = gcra(tat, NOW, interval, tolerance)
        assert verdict.allowed
        tat = verdict.tat
    assert not gcra(tat, NOW, interval, tolerance).allowed
    assert gcra(tat, NOW + 1.0, interval, tolerance, cost=3).allowed


def test_slow_rate() -> None:
    interval = 600 / 5  # 5 per 10 minutes
    tat = NOW
    for _ in range(5):
        verdict = gcra(tat, NOW, interval, 5 * interval)
        tat = verdict.tat
    rejected = gcra(tat, NOW + 1, interval, 5 * interval)
    assert not rejected.allowed
    assert rejected.retry_after_s == pytest.approx(119.0)
    assert retry_after_header(rejected.retry_after_s) == "119"


@pytest.mark.parametrize(
    ("seconds", "header"),
    [
        (0.0, "0"),
        (0.001, "1"),
        (0.999, "1"),
        (1.0, "1"),
        (1.0001, "2"),
        (59.5, "60"),
        (120.0, "120"),
    ],
)
def test_retry_after_is_whole_seconds_rounded_up(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header


def test_structured_fields() -> None:
    assert policy_field("per-client", 100, 1.0) == '"per-client";q=100;w=1'
    assert policy_field("slow", 5, 0.5) == '"slow";q=5;w=1'  # w is whole seconds, at least 1
    assert policy_field("thirds", 3, 3 * (10 / 3) + 1e-12) == '"thirds";q=3;w=10'  # float noise
    assert policy_field("up", 2, 2.5) == '"up";q=2;w=3'  # rounded up: never overstates the rate


# ---------------------------------------------------------------- properties


def reference_need(
    admitted: list[tuple[Fraction, int]], now: Fraction, cost: int, rate: Fraction, burst: int
) -> Fraction:
    """How far admitting `cost` now would exceed rate*t + burst, worst window ending now.

    Positive: admitting breaks the bound for some window [s, now]. The windows
    that matter start at an admission (or now).
    """
    need = Fraction(cost - burst)  # the window [now, now]
    total = 0
    for at, units in reversed(admitted):
        total += units
        need = max(need, total + cost - burst - rate * (now - at))
    return need


requests_strategy = st.lists(
    st.tuples(st.integers(min_value=0, max_value=1500), st.integers(min_value=1, max_value=8)),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=20),
    period=st.sampled_from([1, 2, 60]),
    burst=st.integers(min_value=1, max_value=8),
    requests=requests_strategy,
)
def test_gcra_is_an_exact_token_bucket(
    count: int, period: int, burst: int, requests: list[tuple[int, int]]
) -> None:
    """Admitted iff admitting keeps every window ending now within rate*t + burst.

    Times are whole milliseconds and rates rational, so the reference is exact
    (Fractions); the smallest non-zero excess is far above GCRA's float slack.
    """
    rate = Fraction(count, period)
    interval = period / count
    tolerance = burst * interval
    now = Fraction(int(NOW))
    tat = NOW
    admitted: list[tuple[Fraction, int]] = []
    for dt_ms, raw_cost in requests:
        cost = min(raw_cost, burst)
        now += Fraction(dt_ms, 1000)
        verdict = gcra(tat, float(now), interval, tolerance, cost)
        need = reference_need(admitted, now, cost, rate, burst)
        assert verdict.allowed == (need <= 0), (need, verdict)
        if verdict.allowed:
            tat = verdict.tat
            admitted.append((now, cost))
            tokens_left = -reference_need(admitted, now, 0, rate, burst)
            assert verdict.remaining == math.floor(tokens_left)
            assert verdict.reset_s == pytest.approx(float((burst - tokens_left) / rate), abs=1e-6)
        else:
            assert verdict.tat == tat
            # Waiting exactly the reported time is enough, and necessary.
            assert verdict.retry_after_s == pytest.approx(float(need / rate), rel=1e-9, abs=1e-6)
            assert verdict.remaining == math.floor(cost - need)  # whole units there now

    # Over ANY interval, admitted units <= rate*t + burst (intervals between
    # admissions are the tightest ones).
    for i, (start, _) in enumerate(admitted):
        total = 0
        for at, units in admitted[i:]:
            total += units
            assert total <= rate * (at - start) + burst


@settings(max_examples=100, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=50),
    burst=st.integers(min_value=1, max_value=10),
    gaps=st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=1, max_size=80),
)
def test_bound_holds_with_float_times(count: int, burst: int, gaps: list[float]) -> None:
    """Arbitrary float times: over any interval, at most rate*t + burst (float tolerance)."""
    interval = 1.0 / count
    tat = now = NOW
    times = []
    for gap in gaps:
        now += gap
        verdict = gcra(tat, now, interval, burst * interval)
        if verdict.allowed:
            tat = verdict.tat
            times.append(now)
        else:
            assert verdict.retry_after_s > 0
            # a rejection is temporary: after retry_after the same request fits
            assert gcra(tat, now + verdict.retry_after_s, interval, burst * interval).allowed
    for i in range(len(times)):
        for j in range(i, len(times)):
            assert j - i + 1 <= count * (times[j] - times[i]) + burst + 1e-6


# ---------------------------------------------------------------- several limits


def admit(store: MemoryStore, specs: list[LimitSpec], now: float, client: str = "c"):  # type: ignore[no-untyped-def]
    keys = [f"{s.name}|{client}" for s in specs]
    return store.admit_now(None, None, keys, specs, now)


def test_all_limits_must_allow_and_a_rejection_consumes_nothing() -> None:
    store = MemoryStore()
    wide = spec("wide", 10, 1.0, 10)
    narrow = spec("narrow", 1, 1.0, 2)
    specs = [wide, narrow]
    assert admit(store, specs, NOW).admitted
    assert admit(store, specs, NOW).admitted
    wide_tat = store.limits.tats["wide|c"]
    for _ in range(20):
        result = admit(store, specs, NOW)
        assert not result.admitted
        assert result.limits[0].allowed  # wide alone would have said yes
        assert not result.limits[1].allowed
    # Twenty rejections later, the wide limit has spent exactly two units.
    assert store.limits.tats["wide|c"] == wide_tat
    only_wide = admit(store, [wide], NOW)
    assert only_wide.admitted
    assert only_wide.limits[0].remaining == 7


def test_each_limit_reports_its_own_wait() -> None:
    store = MemoryStore()
    fast = spec("fast", 10, 1.0, 1)  # clears in 0.1 s
    slow = spec("slow", 1, 4.0, 1)  # clears in 4 s
    assert admit(store, [fast, slow], NOW).admitted
    result = admit(store, [fast, slow], NOW)
    assert not result.admitted
    assert [v.retry_after_s for v in result.limits] == pytest.approx([0.1, 4.0])
    assert not admit(store, [fast, slow], NOW + 3.9).admitted
    assert admit(store, [fast, slow], NOW + 4.0).admitted


def test_keys_are_independent() -> None:
    store = MemoryStore()
    lim = [spec("l", 1, 1.0, 1)]
    assert admit(store, lim, NOW, "a").admitted
    assert not admit(store, lim, NOW, "a").admitted
    assert admit(store, lim, NOW, "b").admitted


# ---------------------------------------------------------------- shadow


def test_shadow_never_rejects_and_reports_what_it_would_do() -> None:
    store = MemoryStore()
    shadow = spec("s", 1, 1.0, 2, shadow=True)
    verdicts = [admit(store, [shadow], NOW) for _ in range(5)]
    assert all(r.admitted for r in verdicts)
    assert [r.limits[0].allowed for r in verdicts] == [True, True, False, False, False]


@settings(max_examples=50, deadline=None)
@given(gaps=st.lists(st.integers(min_value=0, max_value=700), min_size=1, max_size=40))
def test_shadow_would_reject_exactly_where_enforcement_rejects(gaps: list[int]) -> None:
    enforced, shadowed = MemoryStore(), MemoryStore()
    real = spec("l", 2, 1.0, 3)
    dry = real._replace(shadow=True)
    now = NOW
    for gap in gaps:
        now += gap / 1000
        a = admit(enforced, [real], now)
        b = admit(shadowed, [dry], now)
        assert b.admitted
        assert a.admitted == b.limits[0].allowed


def test_shadow_limit_beside_an_enforced_one() -> None:
    store = MemoryStore()
    enforced = spec("e", 100, 1.0, 100)
    shadow = spec("s", 1, 1.0, 1, shadow=True)
    for i in range(4):
        result = admit(store, [enforced, shadow], NOW)
        assert result.admitted
        assert result.limits[1].allowed == (i == 0)
    assert result.limits[0].remaining == 96  # the enforced limit counted every request


@pytest.mark.anyio
async def test_shadow_mode_through_the_middleware(clock: FakeClock, rng) -> None:  # type: ignore[no-untyped-def]
    seen = []

    async def endpoint(request: Request) -> PlainTextResponse:
        seen.append(request.state.fidelity)
        return PlainTextResponse("ok")

    policy = Policy(rate_limits=(RateLimit(name="dry", rate="1/s", burst=1, shadow=True),))
    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(FidelityMiddleware, policy=policy, clock=clock, rng=rng, telemetry=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        statuses = [(await c.get("/")).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    verdicts = [ctx.last("ratelimit").verdict for ctx in seen]
    assert verdicts == ["allow", "would_reject", "would_reject"]
    would = seen[1].last("ratelimit")
    assert would.subject == "dry"
    assert would.reason == "over_limit_shadow"
    assert would.details is not None
    assert would.details["shadow"] is True
    assert would.details["retry_after_s"] == pytest.approx(1.0)
