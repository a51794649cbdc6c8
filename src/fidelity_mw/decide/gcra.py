"""GCRA rate limiting: pure arithmetic on one number per key (the theoretical arrival time).

A limit of `rate` with bucket size `burst` admits at most rate*t + burst units
over any interval of length t, and rejects a request only when admitting it
would break that bound (it is an exact token bucket). Nothing here knows about
storage: the state stores keep the TAT and call `gcra`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

# Float sums of the emission interval drift by ulps; without slack the last
# unit of a full burst would be refused. One millionth of an interval is far
# below any clock resolution that matters here.
_SLACK = 1e-6


class LimitVerdict(NamedTuple):
    allowed: bool
    tat: float  # the TAT to store (unchanged when rejected); admissions report `marker`
    remaining: int  # whole units left in the bucket after this decision
    reset_s: float  # seconds until the bucket is full again
    retry_after_s: float  # seconds until this request would be admitted (0 if allowed)


# A NamedTuple's constructor is a Python-level function; building the tuple
# directly skips that frame on the per-request path (same object, same type).
_new = tuple.__new__


def gcra(
    tat: float, now: float, interval_s: float, tolerance_s: float, cost: int = 1
) -> LimitVerdict:
    """Decide one request of `cost` units.

    `interval_s` is the emission interval (period / count) and `tolerance_s`
    is burst * interval_s. A fresh key has tat <= now.
    """
    base = tat if tat > now else now
    new_tat = base + cost * interval_s
    allow_at = new_tat - tolerance_s
    if allow_at - now > _SLACK * interval_s:
        remaining = int((tolerance_s - (base - now)) / interval_s + _SLACK)
        return _new(LimitVerdict, (False, tat, max(0, remaining), base - now, allow_at - now))
    remaining = int((tolerance_s - (new_tat - now)) / interval_s + _SLACK)
    return _new(
        LimitVerdict, (True, new_tat, remaining if remaining > 0 else 0, new_tat - now, 0.0)
    )


def refund(
    tat: float,
    admitted_tat: float | None,
    now: float,
    interval_s: float,
    cost: int = 1,
    refunded_s: float = 0.0,
) -> float:
    """The TAT after giving back one admitted request of `cost` units.

    `admitted_tat` is the marker its admission reported (`LimitVerdict.tat`:
    the TAT it stored plus the key's `refunded_s` then, see `marker`), and
    `refunded_s` the seconds this key has given back so far. The bucket
    refills in order, so the request's units are outstanding at most until
    `admitted_tat - refunded_s`: every refund since its admission (of an
    earlier request) moved its units forward in that order by what it gave
    back. Refunds of later requests are counted too; that errs on the side of
    giving back less. At most that much past `now` comes back, never more
    than the request took: giving back units that had already refilled would
    admit more than rate x t + burst. `None` (admission unknown) gives back
    all of them. The caller adds what was given back (`tat` minus the result)
    to the key's `refunded_s`. A result within float noise of `now` or
    earlier is a full bucket.
    """
    back = cost * interval_s
    if admitted_tat is not None:
        back = min(back, max(0.0, admitted_tat - refunded_s - now))
    return tat - back


def marker(tat: float, refunded_s: float) -> float:
    """What an admission that stored `tat` reports as its `LimitVerdict.tat`.

    The key's virtual TAT: the stored TAT plus every second refunded so far.
    It never decreases (a refund moves seconds from the one to the other), so
    a key may be forgotten only once it is <= now: then every marker issued
    is in the past and a fresh key (refunded_s 0) gives nothing back for them.
    """
    return tat + refunded_s


def retry_after_header(seconds: float) -> str:
    """Retry-After as integer seconds, rounded up, never 0 for a real wait."""
    return str(max(1, math.ceil(seconds - 1e-9))) if seconds > 0 else "0"


def policy_field(name: str, quota: int, window_s: float) -> str:
    """One RateLimit-Policy item (draft-ietf-httpapi-ratelimit-headers, sf-list)."""
    return f'"{name}";q={quota};w={max(1, math.ceil(window_s - 1e-9))}'
