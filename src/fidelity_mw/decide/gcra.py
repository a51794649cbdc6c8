"""GCRA rate limiting: pure arithmetic on one number per key (the theoretical arrival time).

A limit of `rate` with bucket size `burst` admits at most rate*t + burst units
over any interval of length t, and rejects a request only when admitting it
would break that bound (it is an exact token bucket). Refunds (`refund_seconds`,
`marker`) give back units still outstanding; retry credit (`earn_credit`,
`spend_credit`, `credit_verdict`) lets the retries of refunded requests past a
bucket that refilled meanwhile, within a documented bound. Nothing here knows
about storage: the state stores keep the TAT, the refunded seconds and the
credit, and call these.
"""

from __future__ import annotations

import math
from types import FunctionType
from typing import Any, ClassVar, Final

from .fields import replaced, shown

# Float sums of the emission interval drift by ulps; without slack the last
# unit of a full burst would be refused. One millionth of an interval covers
# that on a clock near 0 (a process's monotonic clock). Near the present Unix
# time (Redis TIME, about 1.8e9 s) one ulp is about 2.4e-7 s, more than a
# millionth of any interval under a quarter second: there the last unit of a
# burst decided at one instant (a coalesced batch) was refused and `remaining`
# read one low. Each addition of the interval rounds by at most half an ulp
# of `now`, and a burst decided at one instant adds it once per unit: the slack
# covers that many half ulps and 32 more, and never exceeds half an interval,
# so no whole unit can come of it. A burst decided at one instant of more than
# about interval / 2.4e-7 s units (some 4,000 at 1000/s, 40 at 100,000/s) may
# be off by one unit either way: its float error passes half an interval, and
# Unix time in a double cannot tell its units apart. The slack does not cover
# the rounding of the stored TAT itself, half an ulp of now per admission,
# which adds up at rates of a few ulps per interval: +4.9 % at 1e6/s on Unix
# time (docs/state.md, "Precision"); nothing measurable on a clock near 0.
_SLACK: Final = 1e-6
_HALF_ULP: Final = 2.0**-53  # relative
# How far past a full burst a stored TAT can lie ahead of `now` on a clock that never
# goes back: an admission leaves it at most `tolerance_s` ahead; a tiered lease of units
# that conform later (sync.lua's `ahead`) at most one sync interval more, and the policy
# caps that at 60 s: twice that is a margin no lease reaches. A TAT further ahead was
# stored before the clock went back (Redis `TIME` after a failover to a replica whose
# clock is behind, an NTP step): it is read as an empty bucket, `now + tolerance_s`, so
# the key refuses for at most one burst's refill time (plus this margin), not for as
# long as the clock was wrong (lib.lua's `unstep` mirrors it).
CLOCK_STEP_S: Final = 120.0
# "The reader's burst" above is not the writer's during a rolling restart that changes a
# limit: an old process's burst of 100 at one unit per 36 s leaves the TAT an hour ahead,
# and a new process with a burst of 10 read that as a clock step, stored its own empty
# bucket and forgave the old one's debt (90 units back at every refusal). So a write that
# leaves the TAT more than CLOCK_STEP_S ahead records how far (`written_s`, kept beside
# the TAT), and the guard allows the larger of that and the reader's tolerance. A TAT at
# most CLOCK_STEP_S ahead is within every reader's margin: it records nothing, so keys
# of per-second limits stay one number.


def recorded(ahead_s: float) -> float:
    """What a key records beside a TAT written `ahead_s` ahead of now (0.0: nothing)."""
    return ahead_s if ahead_s > CLOCK_STEP_S else 0.0


def slack_s(now: float, interval_s: float, tolerance_s: float) -> float:
    """The float slack of a decision at `now` (seconds). lib.lua's slack_of mirrors it."""
    slack = _SLACK * interval_s + (now if now >= 0.0 else -now) * _HALF_ULP * (
        tolerance_s / interval_s + 32.0
    )
    half = 0.5 * interval_s
    return slack if slack < half else half


# The records below are small slotted classes, not NamedTuples: interpreted (3.11), a slot
# read is specialized (about 15 machine instructions) where a NamedTuple's field is not
# (about 145, a descriptor call), and a request reads a dozen of them; compiled, they are
# native classes whose fields are struct reads. Treat them as immutable, as the tuples were:
# `_replace` makes a changed copy; `_fields`, equality and hashing are a NamedTuple's (field
# by field), but they are no tuples (no indexing or unpacking).


class LimitSpec:
    """One rate limit as the decision code sees it: arithmetic only."""

    __slots__ = ("cost", "credit_s", "interval_s", "name", "shadow", "tolerance_s")

    _fields: ClassVar[tuple[str, ...]] = (
        "name",
        "interval_s",
        "tolerance_s",
        "cost",
        "shadow",
        "credit_s",
    )

    def __init__(
        self,
        name: str,
        interval_s: float,  # emission interval: period / count
        tolerance_s: float,  # burst x interval_s
        cost: int,
        shadow: bool,
        # Retry credit: how long a refund's credit stays spendable (seconds; 0: off;
        # `earn_credit`). The policy's `retry_credit_s` under `charge = "served"`.
        credit_s: float = 0.0,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self.tolerance_s = tolerance_s
        self.cost = cost
        self.shadow = shadow
        self.credit_s = credit_s

    def _replace(self, **changes: Any) -> LimitSpec:
        """A copy with these fields changed (NamedTuple's `_replace`)."""
        return replaced(self, changes)

    def _key(self) -> tuple[str, float, float, int, bool, float]:
        return (self.name, self.interval_s, self.tolerance_s, self.cost, self.shadow, self.credit_s)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LimitSpec):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return shown(self)

    def __reduce__(self) -> tuple[type[LimitSpec], tuple[Any, ...]]:
        # Pickled and copied by the constructor, as a NamedTuple: compiled, a native
        # class cannot be made without its __init__'s arguments (pickle's default did).
        return LimitSpec, self._key()


class LimitVerdict:
    """One limit's answer to one request."""

    __slots__ = ("allowed", "credit", "remaining", "reset_s", "retry_after_s", "tat")

    _fields: ClassVar[tuple[str, ...]] = (
        "allowed",
        "tat",
        "remaining",
        "reset_s",
        "retry_after_s",
        "credit",
    )

    def __init__(
        self,
        allowed: bool,
        tat: float,  # the TAT to store (unchanged when rejected); admissions report `marker`
        remaining: int,  # whole units left in the bucket after this decision
        reset_s: float,  # seconds until the bucket is full again
        retry_after_s: float,  # seconds until this request would be admitted (0 if allowed)
        # Admitted from the key's retry credit (`spend_credit`): GCRA alone refused it. Its
        # `tat` is then the marker of a full bucket and remaining / reset_s describe the
        # bucket, which this admission left as it was.
        credit: bool = False,
    ) -> None:
        self.allowed = allowed
        self.tat = tat
        self.remaining = remaining
        self.reset_s = reset_s
        self.retry_after_s = retry_after_s
        self.credit = credit

    def _replace(self, **changes: Any) -> LimitVerdict:
        """A copy with these fields changed (NamedTuple's `_replace`)."""
        return replaced(self, changes)

    def _key(self) -> tuple[bool, float, int, float, float, bool]:
        return (
            self.allowed,
            self.tat,
            self.remaining,
            self.reset_s,
            self.retry_after_s,
            self.credit,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LimitVerdict):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return shown(self)

    def __reduce__(self) -> tuple[type[LimitVerdict], tuple[Any, ...]]:
        # Pickled and copied by the constructor, as a NamedTuple: compiled, a native
        # class cannot be made without its __init__'s arguments (pickle's default did).
        return LimitVerdict, self._key()


# This module runs as Python source (not compiled by mypyc): `gcra` then builds its verdict
# without the class call (interpreted, calling a class whose `__init__` is Python code costs
# an interpreter call of its own); compiled, the native constructor is the cheap way, and
# `object.__new__` would skip a native class's setup.
_object_new: Final = object.__new__


def _probe() -> None:
    return None


_INTERPRETED: Final = type(_probe) is FunctionType


def gcra(
    tat: float,
    now: float,
    interval_s: float,
    tolerance_s: float,
    cost: int = 1,
    written_s: float = 0.0,
) -> LimitVerdict:
    """Decide one request of `cost` units.

    `interval_s` is the emission interval (period / count) and `tolerance_s`
    is burst * interval_s. A fresh key has tat <= now. `written_s`: how far ahead
    the write of the TAT left it, as the key records it (`recorded`; 0.0: none).
    """
    if tat > now:
        if tat - now > (written_s if written_s > tolerance_s else tolerance_s) + CLOCK_STEP_S:
            tat = now + tolerance_s  # stored before the clock went back: an empty bucket
        base = tat
    else:
        base = now
    new_tat = base + cost * interval_s
    if new_tat <= base and cost > 0:
        # The charge is under half an ulp of the clock (an interval under 1.2e-7 s on
        # today's Unix time: past 8.4e6/s) and the sum rounded back to `base`: nothing
        # would ever be charged. One ulp instead (lib.lua's `gcra` does the same).
        new_tat = math.nextafter(base, math.inf)
    allow_at = new_tat - tolerance_s
    # slack_s, inline: this runs for every limit of every request
    slack = _SLACK * interval_s + (now if now >= 0.0 else -now) * _HALF_ULP * (
        tolerance_s / interval_s + 32.0
    )
    if slack > 0.5 * interval_s:
        slack = 0.5 * interval_s
    if allow_at - now > slack:
        remaining = int((tolerance_s - (base - now) + slack) / interval_s)
        return LimitVerdict(False, tat, max(0, remaining), base - now, allow_at - now)
    remaining = int((tolerance_s - (new_tat - now) + slack) / interval_s)
    if _INTERPRETED:  # the common answer without the class call (see _INTERPRETED)
        verdict: LimitVerdict = _object_new(LimitVerdict)
        verdict.allowed = True
        verdict.tat = new_tat
        verdict.remaining = remaining if remaining > 0 else 0
        verdict.reset_s = new_tat - now
        verdict.retry_after_s = 0.0
        verdict.credit = False
        return verdict
    return LimitVerdict(True, new_tat, remaining if remaining > 0 else 0, new_tat - now, 0.0)


def refund_seconds(
    admitted_tat: float | None,
    now: float,
    interval_s: float,
    cost: int = 1,
    refunded_s: float = 0.0,
) -> float:
    """The seconds a refund of one admitted request of `cost` units gives back to the TAT.

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
    all of them. The caller lowers the TAT by the result and adds it to the
    key's `refunded_s` (and may credit the key with the request's cost,
    `earn_credit`).
    """
    back = cost * interval_s
    if admitted_tat is not None:
        outstanding = admitted_tat - refunded_s - now
        if outstanding < 0.0:
            outstanding = 0.0
        if outstanding < back:
            back = outstanding
    return back


def refund(
    tat: float,
    admitted_tat: float | None,
    now: float,
    interval_s: float,
    cost: int = 1,
    refunded_s: float = 0.0,
) -> float:
    """The TAT after giving back one admitted request of `cost` units (`refund_seconds`).

    A result within float noise of `now` or earlier is a full bucket.
    """
    return tat - refund_seconds(admitted_tat, now, interval_s, cost, refunded_s)


def marker(tat: float, refunded_s: float) -> float:
    """What an admission that stored `tat` reports as its `LimitVerdict.tat`.

    The key's virtual TAT: the stored TAT plus every second refunded so far.
    It never decreases (a refund moves seconds from the one to the other), so
    a key may be forgotten only once it is <= now: then every marker issued
    is in the past and a fresh key (refunded_s 0) gives nothing back for them.
    """
    return tat + refunded_s


# ------------------------------------------------------------------ retry credit
#
# A refund gives back to the bucket only what is still outstanding, and what it
# gives back is worth something only until the bucket is full again: a client
# whose bucket was (nearly) full when its request failed upstream has lost it
# to the refill by the time its retry arrives (a retry waits out Retry-After or
# a backoff; the failures of one fault then come back together), so the retry
# pays a second time and the retries of a fault can meet 429s. So each refund
# also credits the key with its request's cost: spendable only by an admission
# that GCRA alone would refuse (the retry that found the bucket empty), never
# more than one burst at a time, gone `window_s` after the last refund that
# earned some. A credit admission leaves the TAT as it was. Over any window the
# key admits at most rate x t + burst units (net of refunds) plus the units
# credited by the refunds that kept the credit alive in that window.


def earn_credit(
    credit_s: float,
    expires_at: float,
    units_s: float,
    now: float,
    interval_s: float,
    tolerance_s: float,
    window_s: float,
) -> tuple[float, float]:
    """The key's (credit_s, expires_at) after a refund of a request that took `units_s`
    (its `cost * interval_s`).

    Nothing changes when credit is off (`window_s` 0). Credit that had expired
    starts again from 0; the sum is capped at `tolerance_s` (one burst) and
    expires `window_s` after this refund. `interval_s` is for the float slack.
    """
    if window_s <= 0.0 or units_s <= _SLACK * interval_s:
        return credit_s, expires_at
    if expires_at <= now:
        credit_s = 0.0
    credit_s += units_s
    if credit_s > tolerance_s:
        credit_s = tolerance_s
    return credit_s, now + window_s


def spend_credit(
    credit_s: float, expires_at: float, now: float, interval_s: float, cost: int = 1
) -> float | None:
    """The credit left after admitting one request of `cost` units from it, or None
    when the credit is gone or too small. Only for a request GCRA refused.

    A remainder within float noise of 0 is 0 (the stores then drop the credit).
    """
    need = cost * interval_s
    if expires_at <= now or credit_s - need < -_SLACK * interval_s:
        return None
    left = credit_s - need
    return left if left > _SLACK * interval_s else 0.0


def credit_verdict(refused: LimitVerdict, now: float, refunded_s: float) -> LimitVerdict:
    """The verdict of an admission from credit, made of GCRA's refusal.

    Its marker is that of a full bucket (`marker(now, refunded_s)`): its units
    never came from the bucket, so a refund of it gives nothing back to the TAT
    and returns its whole cost as credit (net: the credit it spent) instead of
    minting it twice. `remaining` and `reset_s` are the bucket's, as refused.
    """
    return LimitVerdict(
        True, marker(now, refunded_s), refused.remaining, refused.reset_s, 0.0, True
    )


# ------------------------------------------------------------------ check without counting


def peek(
    tat: float,
    now: float,
    interval_s: float,
    tolerance_s: float,
    cost: int = 1,
    credit_s: float = 0.0,
    credit_expires_at: float = 0.0,
    refunded_s: float = 0.0,
    written_s: float = 0.0,
) -> LimitVerdict:
    """Would a request of `cost` units be admitted now? The verdict an admission would
    get (`gcra`, then the key's retry credit, `spend_credit`), of which nothing is
    stored: limits' `test()`, for hints. The key's state is `tat` (`now` for a fresh
    key), its credit and expiry, and its refunded seconds.

    `remaining` and `reset_s` describe the bucket as it is, not as the request would
    leave it (what an admission that another limit refused reports too), and `tat` is
    the stored TAT, unchanged. `retry_after_s` is 0 when it would be admitted, else
    when it would be. `written_s`: as in `gcra`.
    """
    verdict = gcra(tat, now, interval_s, tolerance_s, cost, written_s)
    if verdict.allowed:
        # the bucket as it is: an admission of nothing
        as_is = gcra(tat, now, interval_s, tolerance_s, 0, written_s)
        return LimitVerdict(True, tat, as_is.remaining, as_is.reset_s, 0.0)
    if (
        credit_s > 0.0
        and spend_credit(credit_s, credit_expires_at, now, interval_s, cost) is not None
    ):
        return credit_verdict(verdict, now, refunded_s)._replace(tat=tat)
    return verdict


# The longest Retry-After we write: a wait from an exception the app raised may be
# infinite or absurd, and the header is whole seconds, not a 300-digit number.
MAX_RETRY_AFTER_S: Final = 365 * 86_400


def retry_after_header(seconds: float) -> str:
    """Retry-After as integer seconds, rounded up, never 0 for a real wait; "0" for no
    wait (or NaN), at most a year."""
    if not seconds > 0:
        return "0"
    if seconds >= MAX_RETRY_AFTER_S:
        return str(MAX_RETRY_AFTER_S)
    return str(max(1, math.ceil(seconds - 1e-9)))


def policy_field(name: str, quota: int, window_s: float) -> str:
    """One RateLimit-Policy item (draft-ietf-httpapi-ratelimit-headers, sf-list)."""
    return f'"{name}";q={quota};w={max(1, math.ceil(window_s - 1e-9))}'
