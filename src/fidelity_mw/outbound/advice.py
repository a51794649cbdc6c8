"""When a caller may usefully come back after the outbound layer gave up, pure.

A 5xx that follows an outbound give-up (retries spent, a breaker refusing, the
budget spent) tells the caller only that this request failed. What the outbound
layer knows says more: no attempt can be admitted before the earliest of the
upstream's breakers lets a probe through, the upstream asked for a wait with
its own `Retry-After`, a 429 paused retries to it. That time goes to the
caller as `Retry-After`, so a client that honours it does not spend its
retries while nothing could serve them. Nothing is made up: without such
knowledge there is no hint.

Every caller that failed in one burst would be told the same instant, and a
client's retries would land together on top of its own new requests (a retry
storm of its own, and 429s from a per-client limit that were avoidable). So
the advice is spread: the hint plus a uniform draw over a window
(`retry_spread_s`), never earlier than the hint.

Time (`now`, monotonic seconds) is an argument; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, NamedTuple

from .._types import RandomSource

FROM_INSTANCES: Final = "instance_breakers"  # every instance's breaker is known open
FROM_BREAKER: Final = "host_breaker"  # the upstream's breaker is open
FROM_UPSTREAM: Final = "upstream_retry_after"  # the upstream's own Retry-After
FROM_PAUSE: Final = "retry_pause"  # a 429's Retry-After paused retries to the host


class RetryHint(NamedTuple):
    """Seconds until an attempt could be admitted again, and what says so."""

    wait_s: float
    source: str


def retry_hint(
    now: float,
    *,
    instances_open_until: Iterable[float] | None = None,
    instances_wait_cap_s: float | None = None,
    breaker_wait_s: float | None = None,
    upstream_retry_after_s: float | None = None,
    paused_until: float = 0.0,
) -> RetryHint | None:
    """The longest of the known waits, or None when nothing is known to block a retry.

    A service is blocked until the first of its instances' breakers admits a
    probe (any instance not known open means no wait from the breakers);
    `breaker_wait_s` is a plain upstream's breaker (instances' breakers take its
    place). When open instances still take new requests (the ejection bound
    keeps some in, or panic spreads over all: `decide.balance.open_in_rotation`),
    the service answers again as soon as one of them does, whatever its
    breaker's open time: the caller passes `instances_wait_cap_s` (the
    breakers' shortest open time) and the instances' wait is at most that.
    Every wait is a condition that must pass before a new attempt can be
    admitted or welcome, so the longest one is the answer.
    """
    waits: list[tuple[float, str]] = []
    if instances_open_until is not None:
        earliest = min((until - now for until in instances_open_until), default=0.0)
        if instances_wait_cap_s is not None and earliest > instances_wait_cap_s:
            earliest = instances_wait_cap_s
        if earliest > 0.0:
            waits.append((earliest, FROM_INSTANCES))
    elif breaker_wait_s is not None and breaker_wait_s > 0.0:
        waits.append((breaker_wait_s, FROM_BREAKER))
    if upstream_retry_after_s is not None and upstream_retry_after_s > 0.0:
        waits.append((upstream_retry_after_s, FROM_UPSTREAM))
    if paused_until > now:
        waits.append((paused_until - now, FROM_PAUSE))
    if not waits:
        return None
    wait, source = max(waits)
    return RetryHint(wait, source)


def retry_spread_s(hint_s: float, share: float, min_s: float) -> float:
    """The window advised retries are spread over: `share` of the hint, at least
    `min_s` (both 0: no spread, every caller is told the hint itself)."""
    return max(hint_s * share, min_s, 0.0)


def spread_wait(wait_s: float, spread_s: float, rng: RandomSource) -> float:
    """The wait to advise: `wait_s` plus a uniform draw from [0, spread_s)."""
    if spread_s <= 0.0:
        return wait_s
    return wait_s + rng() * spread_s
