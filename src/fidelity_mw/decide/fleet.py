"""One instance's share of a fleet-wide limit, for deciding alone while the shared state is away.

When the shared store is unreachable each instance enforces its limits on
its own. Enforcing the whole limit in each of N instances lets the fleet admit
N times the limit; enforcing 1/N of it keeps the fleet near the limit, as long
as N is still the fleet's size and the load is spread evenly. N comes from the
last membership count the instance read from the shared store, so it has an
age: past `max_age_s` it is no longer trusted and the share is unknown.

The load is rarely spread evenly (a keep-alive connection stays with the
process that accepted it), so each member also reports how many requests it
decided since its last announcement, and reads back its fraction of the
fleet's load (`FleetTable`, mirrored by state/lua/fleet.lua). Its share is
then a weight (`load_weight`): a part `even_ratio` of the limit split evenly,
so a member idle when the shared state went away can still serve, and the
rest split by load. The weights of all members sum to 1, so the fleet still
admits about one limit. A weight is quantized (`quantize_weight`) so that the
local buckets of one weight are not replaced by another's at every reading.
A load fraction that is unknown or older than `load_max_age_s` gives the even
share 1/N, and the decision says why.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .specs import LimitSpec

UNKNOWN_NEVER_SEEN = "never_seen"
UNKNOWN_STALE = "stale"
# Why a known fleet size is shared evenly although load weighting is on.
LOAD_UNREPORTED = "unreported"  # a live member reports no load, or none has any
LOAD_STALE = "stale"  # the fraction was read more than `load_max_age_s` ago
LOAD_LARGE_FLEET = "large_fleet"  # more than LOAD_MAX_MEMBERS live members
# Why a member enforces only the floor, even_ratio / N: its announcements failed for so
# long while Redis answered it that the others may have dropped it from the fleet (they
# split the whole limit among themselves).
LOAD_UNANNOUNCED = "unannounced"

# The grid of weights: 16 steps per doubling (each 4.4 % above the one below).
WEIGHT_STEPS = 16
# A held weight is kept while the new weight is within this many steps of it.
WEIGHT_HOLD_STEPS = 1.0
# The load table is read whole at every announcement (each member's once a second), so
# its cost in Redis grows with the square of the fleet's size: above this many live
# members no load is kept or read, and the share is even.
LOAD_MAX_MEMBERS = 64
# A member's rate is its count over at least this long (two announcements in a row).
LOAD_MIN_INTERVAL_S = 0.1
# A member's load is kept this many member ttls after its last announcement, so a
# member back from a quiet spell has a rate over that spell (not an unknown one).
LOAD_RETAIN_TTLS = 10


class FleetShare(NamedTuple):
    """What a fallback decision knew about the fleet. `size` None: the share is unknown
    (`why` says why) and the instance enforces the whole limit.

    `weight` None: the even share 1/`size` (`load_why` says why when load weighting
    is on); otherwise the part of each limit this instance enforces, from `load`, its
    fraction of the fleet's load."""

    size: int | None
    age_s: float | None  # how old the fleet size is (None: never seen)
    why: str = ""  # "" when known; UNKNOWN_NEVER_SEEN | UNKNOWN_STALE otherwise
    weight: float | None = None
    load: float | None = None
    load_why: str = ""  # "" unless weighting is on and the share is even: LOAD_*


def fleet_share(
    seen_size: int | None,
    seen_at: float | None,
    now: float,
    max_age_s: float,
    *,
    weighted: bool = False,
    weight: float | None = None,
    load: float | None = None,
    load_max_age_s: float = math.inf,
) -> FleetShare:
    """The share to use at `now`, from the fleet size last seen at `seen_at`.

    A size seen more than `max_age_s` ago is stale (`max_age_s` 0: never trusted).
    `weighted`: load weighting is on, and `weight` (from `load`, read with the size)
    is used while at most `load_max_age_s` old (0: never); otherwise the even share.
    """
    if seen_size is None or seen_at is None or seen_size < 1:
        return FleetShare(None, None, UNKNOWN_NEVER_SEEN)
    age = max(0.0, now - seen_at)
    if age > max_age_s or max_age_s <= 0.0:
        return FleetShare(None, age, UNKNOWN_STALE)
    if not weighted:
        return FleetShare(seen_size, age)
    if weight is None or load is None:
        why = LOAD_LARGE_FLEET if seen_size > LOAD_MAX_MEMBERS else LOAD_UNREPORTED
        return FleetShare(seen_size, age, "", None, None, why)
    if age > load_max_age_s or load_max_age_s <= 0.0:
        return FleetShare(seen_size, age, "", None, None, LOAD_STALE)
    return FleetShare(seen_size, age, "", weight, load)


def share_spec(spec: LimitSpec, members: int) -> LimitSpec:
    """`spec` scaled to 1/`members` of the fleet: rate / N and burst / N, but never a burst
    below one request's cost (so every instance can still admit a request)."""
    if members <= 1:
        return spec
    interval = spec.interval_s * members
    burst = max(float(spec.cost), spec.tolerance_s / spec.interval_s / members)
    return spec._replace(interval_s=interval, tolerance_s=burst * interval)


def weighted_spec(spec: LimitSpec, weight: float) -> LimitSpec:
    """`spec` scaled to `weight` of the fleet (0 < weight <= 1): rate x weight and burst x
    weight, never a burst below one request's cost."""
    if weight >= 1.0 or weight <= 0.0:
        return spec
    interval = spec.interval_s / weight
    burst = max(float(spec.cost), spec.tolerance_s / spec.interval_s * weight)
    return spec._replace(interval_s=interval, tolerance_s=burst * interval)


def load_weight(members: int, fraction: float, even_ratio: float) -> float:
    """The part of each limit a member with `fraction` of the fleet's load enforces:
    `even_ratio` / N + (1 - `even_ratio`) x `fraction`. Over members whose fractions sum
    to 1 the weights sum to 1; an idle member keeps `even_ratio` / N."""
    if members <= 1:
        return 1.0
    fraction = min(1.0, max(0.0, fraction))
    return even_ratio / members + (1.0 - even_ratio) * fraction


def quantize_weight(weight: float, held: float | None = None) -> float:
    """`weight` on a grid of powers of 2 ** (1 / WEIGHT_STEPS), at most 1; `held` (the
    weight in use) is kept while `weight` is within WEIGHT_HOLD_STEPS steps of it, so a
    load that wavers does not move the share (and its local buckets) at every reading."""
    if weight >= 1.0:
        return 1.0
    weight = max(weight, 1e-9)
    steps = math.log2(weight) * WEIGHT_STEPS
    if (
        held is not None
        and 0.0 < held <= 1.0
        and abs(steps - math.log2(held) * WEIGHT_STEPS) <= WEIGHT_HOLD_STEPS
    ):
        return held
    return min(1.0, math.pow(2.0, round(steps) / WEIGHT_STEPS))


def weight_tag(weight: float) -> str:
    """How a weight names its local buckets (and the state page reads it back): distinct
    for each point of the grid."""
    return f"{weight:.5g}"


class MemberLoad(NamedTuple):
    """One member's entry in the fleet's load table: its rates over its last two
    intervals between announcements, [prev_since, since] and [since, seen_at]."""

    seen_at: float  # the shared clock's time of its last announcement
    since: float  # ... of the one before (the start of the interval `rate` covers)
    rate: float  # requests it decided per second in [since, seen_at]
    prev_since: float
    prev_rate: float  # ... in [prev_since, since]


class FleetTable:
    """The fleet's membership and load, as state/lua/fleet.lua keeps them in Redis
    (the reference the script is tested against).

    `members`: the members that count (announced within the hold, at least `ttl`) by id
    and when; `loads`: the reported loads, kept `LOAD_RETAIN_TTLS` ttls (or the hold, if
    longer) after a member's last announcement.

    Members read their fractions at different times, each against the others' rates
    as last reported, so while the load changes a fraction would be read against
    rates that have not caught up (an early reader of a rising load would see its new
    rate against the others' old ones, and the fractions would sum to more than 1).
    So a fraction is the lower of two readings: this member's latest rate against the
    others' latest (what it sees now), and its previous rate against the others' rates
    over the intervals nearest that one (a consistent reading, one interval old, in
    which the others' change has been reported). A rise is believed one interval
    late, a fall at once: while the load changes the fractions err low."""

    def __init__(self) -> None:
        self.members: dict[str, float] = {}
        self.loads: dict[str, MemberLoad] = {}

    def announce(
        self, member: str, count: float, now: float, ttl: float, hold: float = 0.0
    ) -> tuple[int, float | None]:
        """`member` announces itself at `now` with `count` requests decided since its last
        announcement (negative: it reports no load). Returns the number of members that
        count (announced within `hold`, at least `ttl`) and this member's fraction of
        their load: None when one of them reports none, they have none, or they are more
        than LOAD_MAX_MEMBERS.

        Its rate is the count over the time since its last announcement (at least
        LOAD_MIN_INTERVAL_S), or over `ttl` when there is none (and its previous rate,
        over the `ttl` before, the same). A member silent for longer than `ttl` (cut off
        from the shared state, deciding alone on the share it read) still counts, with
        the rate it reported last, until `hold`: the others' shares leave it its part."""
        hold = max(ttl, hold)
        self.members[member] = now
        # A member seen after `now` was seen before the shared clock went back (a step,
        # a failover to a server whose clock is behind): taken as seen now, or a dead
        # one would stay live for its hold plus the step, and shrink every share.
        self.members = {m: min(t, now) for m, t in self.members.items() if t > now - hold}
        size = len(self.members)
        if size > LOAD_MAX_MEMBERS:  # too large to read whole: no load (the table expires)
            self.loads.pop(member, None)
            return size, None
        prev = self.loads.get(member)
        if count < 0:
            self.loads.pop(member, None)
        elif prev is None:
            rate = count / ttl
            self.loads[member] = MemberLoad(now, now - ttl, rate, now - 2 * ttl, rate)
        else:
            rate = count / max(now - prev.seen_at, LOAD_MIN_INTERVAL_S)
            self.loads[member] = MemberLoad(now, prev.seen_at, rate, prev.since, prev.rate)
        mine = self.loads.get(member)
        live: list[tuple[str, MemberLoad]] = []
        retain = now - max(ttl * LOAD_RETAIN_TTLS, hold)
        for m, entry in list(self.loads.items()):
            if entry.seen_at > now:  # the clock went back: moved to now, as its member
                shift = now - entry.seen_at
                entry = self.loads[m] = MemberLoad(
                    now, entry.since + shift, entry.rate, entry.prev_since + shift, entry.prev_rate
                )
            if entry.seen_at < retain:
                del self.loads[m]
            elif entry.seen_at > now - hold:
                live.append((m, entry))
        if mine is None or len(live) != size:
            return size, None
        # now: the latest rates; then: mine before, the others' nearest that interval
        then_mid = (mine.prev_since + mine.since) / 2.0
        total_now = 0.0
        total_then = 0.0
        for m, entry in live:
            total_now += entry.rate
            if m == member:
                total_then += entry.prev_rate
            elif abs((entry.since + entry.seen_at) / 2.0 - then_mid) <= abs(
                (entry.prev_since + entry.since) / 2.0 - then_mid
            ):
                total_then += entry.rate
            else:
                total_then += entry.prev_rate
        if total_now <= 0.0 or total_then <= 0.0:
            return size, None
        return size, min(mine.rate / total_now, mine.prev_rate / total_then)

    def leave(self, member: str) -> None:
        """`member` leaves (its store closed): no longer counted, at once."""
        self.members.pop(member, None)
        self.loads.pop(member, None)
