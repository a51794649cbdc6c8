"""The retry budget, pure: retries <= ratio x requests + floor x window, over a sliding window.

Finagle's and Envoy's idea: retries may add at most a fixed share of load on
top of the requests, plus a small per-second floor so a quiet service can
still retry. Time comes in as `now`; the stores keep the windows.
"""

from __future__ import annotations

from typing import Final

from .specs import BudgetParams
from .window import buckets_passed

_BUDGET_BUCKETS: Final = 10
_EPSILON: Final = 1e-9
# A bucket bound found by stepping back from the current bucket's end is within a few
# ulps of the bound the counts met (the ring's ends are sums, each rounded): an instant
# that close to a bound is taken as the later bucket's. 2**-48 of the end is 16 ulps.
BOUND_SLACK: Final = 2.0**-48


def budget_allowance(requests: int, cfg: BudgetParams) -> float:
    """Retries allowed in one window: budget_ratio x requests + budget_min_per_s x window."""
    return cfg.budget_ratio * requests + cfg.budget_min_per_s * cfg.budget_window_s


def budget_allows(requests: int, retries: int, cfg: BudgetParams) -> bool:
    """May one more retry be spent, given the window's requests and retries so far?"""
    return retries + 1 <= budget_allowance(requests, cfg) + _EPSILON


def buckets_back(end: float, at: float, bucket_s: float) -> int:
    """How many buckets before the one ending at `end` the instant `at` (< `end`) fell in:
    the `k` with `end - (k + 1) x bucket_s <= at < end - k x bucket_s`. The division can
    land a hair off (an instant at a bucket's start divides to 1.0000000000002): the
    guess is checked against the bucket's own bounds, as `buckets_passed` does."""
    back = int((end - at) / bucket_s)
    if end - back * bucket_s <= at:
        back -= 1
    elif end - (back + 1) * bucket_s > at:
        back += 1
    return back


class BudgetWindow:
    """One upstream's retry budget: requests and retries over a sliding window.

    The window is a ring of 10 buckets of `budget_window_s / 10` each, so a
    count leaves the window between 0.9 and 1.0 windows after it was made.
    "Requests" are top-level calls (first attempts); retries are not
    requests, so retrying never earns more retries.
    """

    __slots__ = ("_bucket_end", "_bucket_s", "_index", "config", "requests", "retries")

    def __init__(self, config: BudgetParams) -> None:
        self.config = config
        self._bucket_s = config.budget_window_s / _BUDGET_BUCKETS
        self._bucket_end = 0.0
        self._index = 0
        self.requests = [0] * _BUDGET_BUCKETS
        self.retries = [0] * _BUDGET_BUCKETS

    def totals(self, now: float) -> tuple[int, int]:
        """(requests, retries) in the window ending at `now`."""
        self._rotate(now)
        return sum(self.requests), sum(self.retries)

    def request(self, now: float) -> None:
        """Count one top-level request."""
        end = self._bucket_end
        if now >= end or end - now > 2.0 * self._bucket_s:
            self._rotate(now)
        self.requests[self._index] += 1

    def allows(self, now: float) -> bool:
        """Would the budget allow one more retry now? (Spends nothing.)"""
        requests, retries = self.totals(now)
        return budget_allows(requests, retries, self.config)

    def spend(self, now: float) -> None:
        """Count one retry (after `allows` said yes)."""
        end = self._bucket_end
        if now >= end or end - now > 2.0 * self._bucket_s:
            self._rotate(now)
        self.retries[self._index] += 1

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget allows it; True if spent."""
        if not self.allows(now):
            return False
        self.retries[self._index] += 1
        return True

    def refund(self, now: float, age_s: float, spent_at: float | None = None) -> bool:
        """Give back one retry counted `age_s` ago whose attempt was not sent (cancelled
        during its backoff, or the deadline passed first): taken off the bucket it was
        counted in while that bucket is still in the window and holds a retry; once it
        has left the window it counts no more anyway. True if one was given back.

        Reads the ring as it stands, without rotating it (the next count rotates), the
        way `state/lua/budget_refund.lua` does: the bucket `age_s` back from `now` is
        found from the current bucket's end. `spent_at`, when the caller has it (the
        time the state's own clock spent the retry at), names that bucket instead of
        the age: an age measured on another clock can land in the next bucket."""
        end = self._bucket_end
        # (the slack: a retry counted at a bucket's very start is that bucket's, though
        # the start stepped back to lies a few ulps after it)
        spent = (now - age_s if spent_at is None else spent_at) + end * BOUND_SLACK
        if end == 0.0 or spent >= end:  # nothing counted yet, or not in this window
            return False
        bucket_s = self._bucket_s
        back = buckets_back(end, spent, bucket_s)
        passed = buckets_passed(now, end, bucket_s) if now >= end else 0
        if back < 0 or back + passed >= _BUDGET_BUCKETS:
            return False
        index = (self._index - back) % _BUDGET_BUCKETS
        if self.retries[index] <= 0:
            return False
        self.retries[index] -= 1
        return True

    def _rotate(self, now: float) -> None:
        if now < self._bucket_end:
            if self._bucket_end - now > 2.0 * self._bucket_s:
                # set before the clock went back (`BreakerState._rotate`): the window
                # rotates again from one bucket ahead
                self._bucket_end = now + self._bucket_s
            return
        if self._bucket_end == 0.0:
            self._bucket_end = now + self._bucket_s
            return
        bucket_s = self._bucket_s
        steps = buckets_passed(now, self._bucket_end, bucket_s)
        requests, retries = self.requests, self.retries
        if steps >= _BUDGET_BUCKETS:
            for i in range(_BUDGET_BUCKETS):
                requests[i] = retries[i] = 0
            self._index = 0
        else:
            index = self._index
            for _ in range(steps):
                index = (index + 1) % _BUDGET_BUCKETS
                requests[index] = retries[index] = 0
            self._index = index
        self._bucket_end += steps * bucket_s
