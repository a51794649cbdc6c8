"""The step arithmetic of the sliding windows (breaker and retry budget): rings of buckets."""

from __future__ import annotations


def buckets_passed(now: float, bucket_end: float, bucket_s: float) -> int:
    """How many buckets to rotate at `now` (>= `bucket_end`) so that the current one
    ends after `now`. The division can round down (1001 - 1000.1 over 0.1 is 8.99...):
    without the correction the same instant would rotate again."""
    steps = int((now - bucket_end) / bucket_s) + 1
    if bucket_end + steps * bucket_s <= now:
        steps += 1
    return steps
