"""Pure retry logic: backoff and jitter, Retry-After, the retry decision, the budget."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fidelity_mw.decide.budget import BudgetWindow, budget_allowance, budget_allows
from fidelity_mw.decide.retry import (
    GIVE_UP_ATTEMPTS,
    GIVE_UP_BODY,
    GIVE_UP_DEADLINE,
    GIVE_UP_DOWNSTREAM,
    GIVE_UP_NO_RETRY_AFTER,
    GIVE_UP_NOT_IDEMPOTENT,
    GIVE_UP_RETRY_AFTER,
    backoff_ceiling,
    backoff_delay,
    is_idempotent,
    parse_retry_after,
    plan_retry,
    retryable_error,
    retryable_status,
)
from fidelity_mw.policy import RetryConfig
from fidelity_mw.state.memory import MemoryStore
from fidelity_mw.testing import seeded_random

WALL = 1_700_000_000.0


def fixed(value: float):  # type: ignore[no-untyped-def]
    return lambda: value


# ---------------------------------------------------------------- backoff


def test_full_jitter_stays_within_the_exponential_envelope() -> None:
    rng = seeded_random(7)
    base, cap = 0.1, 2.0
    for n in range(12):
        ceiling = min(cap, base * 2**n)
        delays = [backoff_delay(n, base, cap, "full", rng) for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in delays)
        # and it really is spread over the envelope, not stuck at one end
        assert min(delays) < ceiling * 0.1
        assert max(delays) > ceiling * 0.9


@given(
    n=st.integers(min_value=0, max_value=200),
    base=st.floats(min_value=0.0, max_value=10.0),
    cap=st.floats(min_value=0.0, max_value=100.0),
    u=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_full_jitter_bound_holds_for_any_input(n: int, base: float, cap: float, u: float) -> None:
    delay = backoff_delay(n, base, cap, "full", fixed(u))
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(n, 62))


def test_envelope_is_capped_and_never_overflows() -> None:
    assert backoff_ceiling(0, 0.1, 2.0) == pytest.approx(0.1)
    assert backoff_ceiling(3, 0.1, 2.0) == pytest.approx(0.8)
    assert backoff_ceiling(5, 0.1, 2.0) == 2.0
    assert backoff_ceiling(10_000, 0.1, 2.0) == 2.0
    assert backoff_ceiling(-1, 0.1, 2.0) == pytest.approx(0.1)


def test_equal_jitter_keeps_half_the_envelope() -> None:
    rng = seeded_random(3)
    for n in range(6):
        c = min(2.0, 0.1 * 2**n)
        for _ in range(100):
            assert c / 2 <= backoff_delay(n, 0.1, 2.0, "equal", rng) <= c


def test_decorrelated_jitter_grows_from_the_previous_delay() -> None:
    assert backoff_delay(0, 0.1, 2.0, "decorrelated", fixed(0.0)) == pytest.approx(0.1)
    assert backoff_delay(0, 0.1, 2.0, "decorrelated", fixed(0.999999)) == pytest.approx(0.3, 1e-4)
    assert backoff_delay(1, 0.1, 2.0, "decorrelated", fixed(0.999999), 0.5) == pytest.approx(
        1.5, 1e-4
    )
    assert backoff_delay(2, 0.1, 2.0, "decorrelated", fixed(0.999999), 1.5) == 2.0  # capped
    rng = seeded_random(11)
    previous = None
    for n in range(20):
        delay = backoff_delay(n, 0.1, 2.0, "decorrelated", rng, previous)
        low = 0.1
        high = min(2.0, 3 * (previous if previous is not None else 0.1))
        assert low <= delay <= max(low, high)
        previous = delay


def test_no_jitter_is_the_envelope() -> None:
    assert [backoff_delay(n, 0.1, 2.0, "none", fixed(0.5)) for n in range(6)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    )


def test_unknown_jitter_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="jitter"):
        backoff_delay(0, 0.1, 2.0, "fancy", fixed(0.5))


# ---------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        (b"0", 0.0),
        ("1.5", 1.5),
        (b"30", 30.0),
    ],
)
def test_retry_after_delta_seconds(value: str | bytes, expected: float) -> None:
    assert parse_retry_after(value, WALL) == expected


def test_retry_after_http_date_forms() -> None:
    when = datetime.fromtimestamp(WALL + 90, UTC)
    imf = format_datetime(when, usegmt=True)  # Tue, 14 Nov 2023 22:14:50 GMT
    assert parse_retry_after(imf, WALL) == pytest.approx(90.0)
    assert parse_retry_after(imf.encode(), WALL) == pytest.approx(90.0)
    rfc850 = when.strftime("%A, %d-%b-%y %H:%M:%S GMT")
    assert parse_retry_after(rfc850, WALL) == pytest.approx(90.0)
    asctime = when.strftime("%a %b %d %H:%M:%S %Y")  # no zone: HTTP-dates are GMT
    assert parse_retry_after(asctime, WALL) == pytest.approx(90.0)


def test_retry_after_date_in_the_past_means_now() -> None:
    past = format_datetime(datetime.fromtimestamp(WALL - 3600, UTC), usegmt=True)
    assert parse_retry_after(past, WALL) == 0.0


@pytest.mark.parametrize(
    "junk",
    [
        None,
        "",
        "   ",
        "soon",
        "-1",
        "+5",
        "1e3",
        "1.2.3",
        "5 seconds",
        "Wed, 99 Foo 2023 25:61:00 GMT",
        "Tuesday",
        b"\xff\xfe",
        "9" * 100,
        "inf",
        "nan",
    ],
)
def test_retry_after_junk_is_ignored(junk: str | bytes | None) -> None:
    assert parse_retry_after(junk, WALL) is None


# ---------------------------------------------------------------- what is retryable


def test_idempotency() -> None:
    for method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE", "get"):
        assert is_idempotent(method, False)
    for method in ("POST", "PATCH", "CONNECT"):
        assert not is_idempotent(method, False)
        assert is_idempotent(method, True)  # Idempotency-Key makes it safe


def test_retryable_statuses_and_errors_follow_the_config() -> None:
    cfg = RetryConfig()
    assert [s for s in (200, 404, 429, 500, 502, 503, 504) if retryable_status(s, cfg)] == [
        429,
        502,
        503,
        504,
    ]
    assert not retryable_status(429, RetryConfig(on_429=False))
    assert retryable_status(500, RetryConfig(on_status=(500,)))
    assert retryable_error("connect", cfg)
    assert retryable_error("timeout", cfg)
    assert retryable_error("network", cfg)
    assert not retryable_error("local", cfg)
    assert not retryable_error("other", cfg)
    assert not retryable_error("connect", RetryConfig(on_connect_error=False))
    assert not retryable_error("timeout", RetryConfig(on_read_timeout=False))


# ---------------------------------------------------------------- plan_retry


def plan(**overrides):  # type: ignore[no-untyped-def]
    args = {
        "cfg": RetryConfig(),
        "attempt": 1,
        "idempotent": True,
        "replayable": True,
        "downstream_exhausted": False,
        "retry_after_s": None,
        "status": 503,
        "remaining_s": 30.0,
        "rng": fixed(0.5),
    }
    args.update(overrides)
    return plan_retry(**args)


def test_plan_retries_with_full_jitter_backoff() -> None:
    first = plan(attempt=1)
    assert first.retry
    assert first.delay_s == pytest.approx(0.05)
    second = plan(attempt=2)
    assert second.retry
    assert second.delay_s == pytest.approx(0.1)


def test_plan_gives_up_in_order_of_the_reasons() -> None:
    assert plan(downstream_exhausted=True, idempotent=False).reason == GIVE_UP_DOWNSTREAM
    assert plan(idempotent=False, replayable=False).reason == GIVE_UP_NOT_IDEMPOTENT
    assert plan(replayable=False).reason == GIVE_UP_BODY
    assert plan(attempt=3).reason == GIVE_UP_ATTEMPTS
    assert plan(attempt=1, cfg=RetryConfig(attempts=1)).reason == GIVE_UP_ATTEMPTS
    for give_up in (plan(attempt=3), plan(replayable=False)):
        assert not give_up.retry
        assert give_up.delay_s == 0.0


def test_retry_after_is_a_floor_on_the_delay() -> None:
    p = plan(retry_after_s=4.0)
    assert p.retry
    assert p.delay_s == 4.0
    small = plan(retry_after_s=0.001)
    assert small.delay_s == pytest.approx(0.05)  # the backoff is longer


def test_retry_after_beyond_the_cap_is_not_waited_for() -> None:
    p = plan(retry_after_s=31.0, remaining_s=100.0)
    assert (p.retry, p.reason) == (False, GIVE_UP_RETRY_AFTER)
    assert plan(retry_after_s=31.0, remaining_s=100.0, cfg=RetryConfig(retry_after_max_s=60)).retry


def test_429_only_when_its_retry_after_fits_in_the_deadline() -> None:
    assert plan(status=429, retry_after_s=2.0, remaining_s=5.0).retry
    assert plan(status=429, retry_after_s=5.0, remaining_s=5.0).reason == GIVE_UP_DEADLINE
    assert plan(status=429, retry_after_s=40.0, remaining_s=5.0).reason == GIVE_UP_DEADLINE
    assert plan(status=429, retry_after_s=None).reason == GIVE_UP_NO_RETRY_AFTER


def test_no_backoff_sleep_runs_past_the_deadline() -> None:
    # 0.999 x 0.1 s backoff against 0.05 s left: give up now instead of sleeping
    p = plan(rng=fixed(0.999), remaining_s=0.05)
    assert (p.retry, p.reason) == (False, GIVE_UP_DEADLINE)
    ok = plan(rng=fixed(0.1), remaining_s=0.05)
    assert ok.retry
    assert ok.delay_s < 0.05
    assert plan(remaining_s=None).retry  # no deadline at all


def test_a_paused_host_delays_the_retry() -> None:
    p = plan(paused_s=3.0)
    assert p.retry
    assert p.delay_s == 3.0
    assert plan(paused_s=3.0, remaining_s=2.0).reason == GIVE_UP_DEADLINE


# ---------------------------------------------------------------- budget


def test_budget_arithmetic_defaults() -> None:
    cfg = RetryConfig()  # 20 % of requests + 3/s over a 10 s window
    assert budget_allowance(0, cfg) == pytest.approx(30.0)
    assert budget_allowance(100, cfg) == pytest.approx(50.0)
    assert budget_allows(100, 49, cfg)
    assert not budget_allows(100, 50, cfg)
    ratio_only = RetryConfig(budget_min_per_s=0.0)
    assert not budget_allows(4, 0, ratio_only)  # 0.2 x 4 = 0.8 < 1
    assert budget_allows(5, 0, ratio_only)  # 0.2 x 5 = 1.0: float noise must not deny it
    assert budget_allows(10, 1, ratio_only)
    assert not budget_allows(10, 2, ratio_only)


def test_budget_window_accounting() -> None:
    cfg = RetryConfig(budget_ratio=0.2, budget_min_per_s=0.0, budget_window_s=10.0)
    window = BudgetWindow(cfg)
    now = 100.0
    for _ in range(10):
        window.request(now)
    assert window.try_retry(now)
    assert window.try_retry(now)
    assert not window.try_retry(now)  # 2 of 0.2 x 10 spent
    assert window.totals(now) == (10, 2)  # a denied retry spends nothing
    for _ in range(5):
        window.request(now + 5.0)
    assert window.try_retry(now + 5.0)  # 0.2 x 15 = 3
    assert not window.try_retry(now + 5.0)
    # the first ten requests (and their retries) leave the window after 10 s
    assert window.totals(now + 10.5) == (5, 1)
    assert window.try_retry(now + 10.5) is False  # 0.2 x 5 = 1, 1 already spent
    assert window.totals(now + 30.0) == (0, 0)


def test_budget_floor_allows_retries_without_traffic() -> None:
    cfg = RetryConfig(budget_ratio=0.0, budget_min_per_s=0.5, budget_window_s=4.0)
    window = BudgetWindow(cfg)
    spent = sum(window.try_retry(50.0) for _ in range(10))
    assert spent == 2  # 0.5/s x 4 s


def test_budget_window_slides_bucket_by_bucket() -> None:
    cfg = RetryConfig(budget_ratio=1.0, budget_min_per_s=0.0, budget_window_s=10.0)
    window = BudgetWindow(cfg)
    rnd = random.Random(5)
    events: list[float] = []
    now = 0.0
    for _ in range(400):
        now += rnd.random() * 0.7
        window.request(now)
        events.append(now)
        requests, _ = window.totals(now)
        # everything from the last 9 s (0.9 window) is in; nothing older than 10 s is
        assert sum(1 for t in events if t > now - 9.0) <= requests
        assert requests <= sum(1 for t in events if t > now - 10.0)


@pytest.mark.anyio
async def test_memory_store_budget_operations() -> None:
    store = MemoryStore()
    cfg = RetryConfig(budget_ratio=0.5, budget_min_per_s=0.0)
    await store.budget_request("budget:a", cfg, 10.0)
    store.budget_request_now("budget:a", cfg, 10.0)
    assert await store.budget_try_retry("budget:a", cfg, 10.0) == (True, "memory", 0.0)
    assert store.budget_try_retry_now("budget:a", cfg, 10.0) == (False, "memory", 0.0)
    # budgets are per key
    assert store.budget_try_retry_now("budget:b", cfg, 10.0)[0] is False
    # a new config (policy reload) starts a fresh window
    other = RetryConfig(budget_ratio=0.5, budget_min_per_s=1.0)
    assert store.budget_try_retry_now("budget:a", other, 10.0)[0] is True
    # the first attempt's bookkeeping: count and gate under one lock
    assert store.outbound_begin_now("upstream:a", None, "budget:a", other, 11.0) is None
    assert store.budget_window("budget:a", other).totals(11.0)[0] == 1
