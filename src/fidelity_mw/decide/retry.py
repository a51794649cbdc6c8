"""Outbound retry logic, pure: backoff with jitter, Retry-After, the retry decision, the budget.

Nothing here knows about httpx, ASGI or a clock: time (`now`, `wall_now`) and
randomness (`rng`, uniform floats in [0, 1)) come in as arguments, and
transport errors come in as a *kind* string that the adapter maps them to
(`ERROR_CONNECT`, ...). The outbound adapter wires it to httpx; `budget.py` holds the retry
budget arithmetic and `state/` keeps the budget windows.
"""

from __future__ import annotations

import math
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final, NamedTuple

from .specs import RandomSource, RetryParams

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

# What went wrong with an attempt, as the adapter classifies it.
ERROR_CONNECT: Final = "connect"  # never reached the server (refused, DNS, connect timeout)
ERROR_TIMEOUT: Final = "timeout"  # read/write timeout: the server may have seen the request
ERROR_NETWORK: Final = "network"  # connection broken mid-exchange: ditto
ERROR_LOCAL: Final = "local"  # our side (pool exhausted, bad URL, protocol misuse): no retry
ERROR_OTHER: Final = "other"  # not a transport error at all: no retry

# Why a retry did not happen (Decision reasons; docs/outbound.md).
GIVE_UP_ATTEMPTS: Final = "attempts"
GIVE_UP_BUDGET: Final = "budget"
GIVE_UP_BREAKER: Final = "breaker_open"
GIVE_UP_DEADLINE: Final = "deadline"
GIVE_UP_NOT_IDEMPOTENT: Final = "not_idempotent"
GIVE_UP_BODY: Final = "body_not_replayable"
GIVE_UP_DOWNSTREAM: Final = "downstream_exhausted"
GIVE_UP_RETRY_AFTER: Final = "retry_after_too_long"  # Retry-After beyond retry_after_max_s
GIVE_UP_NO_RETRY_AFTER: Final = "retry_after_missing"  # a 429 without a usable Retry-After
# a call that retried, then failed in a way it does not retry (a 500, a body that broke):
# it owned the call's retries all the same
GIVE_UP_FAILED_AFTER_RETRY: Final = "failed_after_retry"

# Give-ups after which our own callers are told not to retry us
# (`x-fidelity-retry: exhausted`): we retried, or a retry could not have helped.
EXHAUSTING_REASONS: Final = frozenset(
    {
        GIVE_UP_ATTEMPTS,
        GIVE_UP_BUDGET,
        GIVE_UP_BREAKER,
        GIVE_UP_DEADLINE,
        GIVE_UP_DOWNSTREAM,
        GIVE_UP_FAILED_AFTER_RETRY,
    }
)


def exhausting(reason: str, attempts_made: int, attempts: int) -> bool:
    """Whether a give-up (`reason`, after `attempts_made` attempts of a call configured
    for `attempts`) tells our callers not to retry us: we retried, or a retry could not
    have helped. Any give-up after a retry is one, whatever stopped the next: B's call
    to a service whose instances each answered a `Retry-After` too long to wait gave up
    as `retry_after_too_long` after two attempts, unmarked, and A sent it again: C saw
    five calls for one request. `attempts` with retries configured off (`attempts = 1`)
    is not: we did not retry, so the caller is the nearest owner and may."""
    if attempts_made > 1:
        return True
    return reason in EXHAUSTING_REASONS and (reason != GIVE_UP_ATTEMPTS or attempts > 1)


_MAX_EXPONENT = 62  # 2**62 * base is far past any cap; keeps the float finite
_MAX_RETRY_AFTER_CHARS = 64


# ---------------------------------------------------------------- backoff


def backoff_ceiling(retry: int, base_s: float, cap_s: float) -> float:
    """min(cap, base * 2**retry): the exponential envelope for retry number `retry` (0-based)."""
    if retry < 0:
        retry = 0
    return min(cap_s, base_s * (2.0 ** min(retry, _MAX_EXPONENT)))


def backoff_delay(
    retry: int,
    base_s: float,
    cap_s: float,
    jitter: str,
    rng: RandomSource,
    previous_s: float | None = None,
) -> float:
    """Seconds to wait before retry number `retry` (0 = the first retry).

    - ``full``: uniform in [0, min(cap, base·2^n)] (AWS "full jitter", the default).
    - ``equal``: half the envelope fixed, half random: [c/2, c].
    - ``decorrelated``: uniform in [base, 3·previous], capped (previous starts at base).
    - ``none``: the envelope itself, no randomness.
    """
    if jitter == "full":
        return rng() * backoff_ceiling(retry, base_s, cap_s)
    if jitter == "equal":
        ceiling = backoff_ceiling(retry, base_s, cap_s)
        return ceiling / 2.0 + rng() * ceiling / 2.0
    if jitter == "decorrelated":
        prev = base_s if previous_s is None or previous_s < base_s else previous_s
        high = prev * 3.0
        return min(cap_s, base_s + rng() * (high - base_s))
    if jitter == "none":
        return backoff_ceiling(retry, base_s, cap_s)
    raise ValueError(f"unknown jitter mode {jitter!r}: use full, equal, decorrelated or none")


# ---------------------------------------------------------------- Retry-After


def parse_retry_after(value: str | bytes | None, wall_now: float) -> float | None:
    """Seconds to wait from a `Retry-After` value: delta-seconds or an HTTP-date.

    `wall_now` is the current Unix time (only HTTP-dates need it). A date in
    the past gives 0.0. Anything else (negative, non-numeric, an unparseable
    date, an oversized value) gives None: junk is ignored, never an error.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        if len(value) > _MAX_RETRY_AFTER_CHARS:
            return None
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    text = value.strip()
    if not text or len(text) > _MAX_RETRY_AFTER_CHARS:
        return None
    if text.isdigit() and text.isascii():  # RFC 9110 delta-seconds: 1*DIGIT
        return float(int(text))
    if (
        text.isascii()  # str.isdigit() also takes superscripts, which float() refuses
        and text[0].isdigit()
        and text.count(".") == 1
        and text.replace(".", "", 1).isdigit()
    ):
        seconds = float(text)  # lenient: "1.5" is common enough and unambiguous
        return seconds if math.isfinite(seconds) else None
    if not text[0].isalpha():  # HTTP-dates start with a day name; "-1", "+5" are junk
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # asctime form carries no zone; HTTP-dates are always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - wall_now)


# ---------------------------------------------------------------- the decision


def is_idempotent(method: str, has_idempotency_key: bool) -> bool:
    """GET, HEAD, OPTIONS, PUT, DELETE, TRACE, or any request with an `Idempotency-Key`."""
    return has_idempotency_key or method.upper() in IDEMPOTENT_METHODS


def retryable_status(status: int, cfg: RetryParams) -> bool:
    """Is this status worth another attempt (before idempotency, budget and deadline)?"""
    if status == 429:
        return cfg.on_429
    return status in cfg.on_status


def retryable_error(kind: str, cfg: RetryParams) -> bool:
    """Is this kind of transport error worth another attempt?"""
    if kind == ERROR_CONNECT:
        return cfg.on_connect_error
    if kind in (ERROR_TIMEOUT, ERROR_NETWORK):
        return cfg.on_read_timeout
    return False


class RetryPlan(NamedTuple):
    """The answer to "retry this?": either a delay, or the reason for giving up."""

    retry: bool
    delay_s: float
    reason: str  # why not (a GIVE_UP_* value) when retry is False; "" otherwise


def plan_retry(
    *,
    cfg: RetryParams,
    attempt: int,
    idempotent: bool,
    replayable: bool,
    downstream_exhausted: bool,
    retry_after_s: float | None,
    status: int | None,
    remaining_s: float | None,
    rng: RandomSource,
    previous_delay_s: float | None = None,
    paused_s: float = 0.0,
) -> RetryPlan:
    """Decide whether a *retryable* failure of attempt number `attempt` (1-based) is retried.

    The caller has already established that the status or error is one the
    config retries (`retryable_status` / `retryable_error`). Checks, in order:
    the downstream's don't-retry signal, idempotency, body replayability,
    attempts left, Retry-After (capped at `retry_after_max_s`; a 429 is only
    retried when it carries one), then the deadline: the backoff sleep must
    end before it. `paused_s` is how long retries to this host are paused
    by an earlier 429. The budget and the breaker are asked by the adapter
    afterwards: they are state, this is arithmetic.
    """
    if downstream_exhausted:  # first: the signal must travel up even for a POST
        return RetryPlan(False, 0.0, GIVE_UP_DOWNSTREAM)
    if not idempotent:
        return RetryPlan(False, 0.0, GIVE_UP_NOT_IDEMPOTENT)
    if not replayable:
        return RetryPlan(False, 0.0, GIVE_UP_BODY)
    if attempt >= cfg.attempts:
        return RetryPlan(False, 0.0, GIVE_UP_ATTEMPTS)
    if status == 429 and retry_after_s is None:
        # A rate limit with no hint: retrying on our own schedule only burns attempts.
        return RetryPlan(False, 0.0, GIVE_UP_NO_RETRY_AFTER)
    delay = backoff_delay(
        attempt - 1, cfg.base_ms / 1000.0, cfg.max_ms / 1000.0, cfg.jitter, rng, previous_delay_s
    )
    if retry_after_s is not None:
        if retry_after_s > cfg.retry_after_max_s:
            if remaining_s is not None and retry_after_s >= remaining_s:
                return RetryPlan(False, 0.0, GIVE_UP_DEADLINE)
            return RetryPlan(False, 0.0, GIVE_UP_RETRY_AFTER)
        delay = max(delay, retry_after_s)
    delay = max(delay, paused_s)
    if remaining_s is not None and delay >= remaining_s:
        return RetryPlan(False, 0.0, GIVE_UP_DEADLINE)
    return RetryPlan(True, delay, "")
