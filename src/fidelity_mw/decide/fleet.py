"""One instance's share of a fleet-wide limit, for deciding alone while the shared state is away.

When the shared store is unreachable each instance enforces its limits on
its own. Enforcing the whole limit in each of N instances lets the fleet admit
N times the limit; enforcing 1/N of it keeps the fleet near the limit, as long
as N is still the fleet's size and the load is spread evenly. N comes from the
last membership count the instance read from the shared store, so it has an
age: past `max_age_s` it is no longer trusted and the share is unknown.
"""

from __future__ import annotations

from typing import NamedTuple

from .specs import LimitSpec

UNKNOWN_NEVER_SEEN = "never_seen"
UNKNOWN_STALE = "stale"


class FleetShare(NamedTuple):
    """What a fallback decision knew about the fleet. `size` None: the share is unknown
    (`why` says why) and the instance enforces the whole limit."""

    size: int | None
    age_s: float | None  # how old the fleet size is (None: never seen)
    why: str = ""  # "" when known; UNKNOWN_NEVER_SEEN | UNKNOWN_STALE otherwise


def fleet_share(
    seen_size: int | None, seen_at: float | None, now: float, max_age_s: float
) -> FleetShare:
    """The share to use at `now`, from the fleet size last seen at `seen_at`.

    A size seen more than `max_age_s` ago is stale (`max_age_s` 0: never trusted).
    """
    if seen_size is None or seen_at is None or seen_size < 1:
        return FleetShare(None, None, UNKNOWN_NEVER_SEEN)
    age = max(0.0, now - seen_at)
    if age > max_age_s or max_age_s <= 0.0:
        return FleetShare(None, age, UNKNOWN_STALE)
    return FleetShare(seen_size, age)


def share_spec(spec: LimitSpec, members: int) -> LimitSpec:
    """`spec` scaled to 1/`members` of the fleet: rate / N and burst / N, but never a burst
    below one request's cost (so every instance can still admit a request)."""
    if members <= 1:
        return spec
    interval = spec.interval_s * members
    burst = max(float(spec.cost), spec.tolerance_s / spec.interval_s / members)
    return spec._replace(interval_s=interval, tolerance_s=burst * interval)
