"""Fleet membership, for the fleet-aware local fallback of the Redis store.

While Redis answers, each `RedisStore` announces itself at most once per
`ANNOUNCE_S` (a background call started by the store's own traffic, so an
idle instance costs nothing): `fleet.lua` adds its random id to the sorted
set ``{prefix}:fleet`` scored by the server's `TIME`, drops members silent
for longer than its hold (`fleet_share_max_age_s`, at least `MEMBER_TTL_S`, at most
`MEMBER_HOLD_MAX_S`), and returns how many are left. The instance keeps that count and
the local time it was read. A member silent for that long may still be deciding alone
on the share it read (its own calls time out; it trusts that reading for
`fleet_share_max_age_s`), so it keeps counting: a member that still reaches Redis
leaves it its part rather than reading the fleet smaller and, falling back itself,
enforcing a larger share. A store that closes leaves at once (`leave`).

The same call reports how many requests the instance decided since its
last announcement, into the hash ``{prefix}:fleet:load`` (same hash slot), and
reads back its fraction of the live members' load.

While Redis is unreachable and `on_error = "local"`, each limit is enforced
as this instance's share of it, on local keys of their own, so the fleet
admits about one limit instead of N: by load
(`decide.fleet.load_weight`: `state.fleet_share_even_ratio` of the limit split
evenly, the rest by each member's fraction of the load, quantized), or evenly
(`decide.fleet.share_spec`: rate / N, burst / N) when the load is unknown,
older than `state.fleet_share_load_max_age_s`, or weighting is off
(`fleet_share_even_ratio = 1`). When the count is unknown (never read, or
older than `state.fleet_share_max_age_s`), the instance enforces the whole
limit, as without this feature, and the decision says so.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from redis.exceptions import ResponseError

from .._logs import error_kind, warn
from ..decide.fleet import (
    LOAD_UNANNOUNCED,
    FleetShare,
    fleet_share,
    load_weight,
    quantize_weight,
    share_spec,
    weight_tag,
    weighted_spec,
)
from ..decide.specs import LimitSpec
from .local import GcraTable
from .redis_sync import UNREACHABLE
from .scripts import Script, load_script
from .timer import alive

logger = logging.getLogger("fidelity_mw.redis")

FLEET: Final = load_script("fleet")
# How often an instance in use announces itself, and the member ttl: the interval its
# first rate is read over, and the least a silent member counts.
ANNOUNCE_S: Final = 1.0
MEMBER_TTL_S: Final = 5.0
# The longest a silent member counts (a member that died without closing makes the
# others' shares smaller for this long: the fleet admits less, never more).
MEMBER_HOLD_MAX_S: Final = 60.0

_SPEC_CACHE_MAX: Final = 10_000
# How many earlier shares a key's first decision under a new one looks in for its units.
_SHARES_KEPT: Final = 8

# Runs one script on Redis and returns its reply; raises on failure.
RunScript = Callable[[Script, Sequence[str], Sequence[Any]], Awaitable[Any]]


class Fleet:
    """This instance's membership: its id, the fleet size and its load fraction last
    read and when, and the requests it decided (`demand`, counted by the store)."""

    def __init__(
        self,
        prefix: str,
        max_age_s: float,
        even_ratio: float = 1.0,
        load_max_age_s: float = math.inf,
    ) -> None:
        self.id = secrets.token_hex(8)
        self.key = f"{{{prefix}}}:fleet"
        self.load_key = f"{{{prefix}}}:fleet:load"
        self.max_age_s = max_age_s
        self.enabled = max_age_s > 0.0
        # how long a silent member counts: as long as it may trust its own reading
        self.hold_s = min(max(max_age_s, MEMBER_TTL_S), MEMBER_HOLD_MAX_S)
        self.even_ratio = even_ratio
        self.load_max_age_s = load_max_age_s
        self.weighted = even_ratio < 1.0  # off: no load reported, the even share
        self.size: int | None = None
        self.seen_at: float | None = None  # the store clock's monotonic time of that read
        self.fraction: float | None = None  # this member's fraction of the load, then
        self.weight: float | None = None  # its quantized weight (None: unknown)
        self.demand = 0  # requests decided (the store counts them)
        # what the announcements count: `demand`, or a store's own count (tiered)
        self.demand_of: Callable[[], int] = lambda: self.demand
        self.reported = 0  # the count the last successful announcement covered
        self.due = -math.inf if self.enabled else math.inf  # next announcement
        self.tried_at = -math.inf  # the last announcement tried (Redis answered then)
        self.ok_at: float | None = None  # the last announcement Redis answered
        self.rejoined_at = -math.inf  # the first one answered after a gap (an outage)
        self.announces = 0
        self.failed = 0
        self.task: asyncio.Task[None] | None = None
        self._specs: dict[tuple[LimitSpec, int | float], LimitSpec] = {}
        self._prefixes: dict[int | float, str] = {}
        # the shares used on local keys (1/N or a weight -> key prefix), the latest last
        self._used: dict[int | float, str] = {}

    def tick(self, now: float, run: RunScript, clock: Callable[[], float]) -> None:
        """Announce in the background if one is due (called after a successful call)."""
        self.due = now + ANNOUNCE_S
        self.tried_at = now
        if not alive(self.task):
            self.task = asyncio.get_running_loop().create_task(self._announce(run, clock))

    async def _announce(self, run: RunScript, clock: Callable[[], float]) -> None:
        counted = self.demand_of()
        count = counted - self.reported if self.weighted else -1
        try:
            reply = await run(
                FLEET, (self.key, self.load_key), (self.id, MEMBER_TTL_S, count, self.hold_s)
            )
            size = int(reply[0])
            fraction: float | None = float(reply[1])
        except Exception as exc:  # dropped: the requests' own calls detect an outage
            self.failed += 1
            if isinstance(exc, ResponseError) and not isinstance(exc, UNREACHABLE):
                # Redis answered, and refused this call alone: a key of ours holding a
                # value of another app (WRONGTYPE: a `key_prefix` two apps share) fails
                # every announcement while every request is decided, so the fleet share
                # of the limits in an outage is unknown for good. Said, not only counted.
                warn(
                    logger,
                    error_kind(exc),
                    "fidelity_mw: redis refused the fleet announcement on %s (%s): the fleet "
                    "size goes unread, and in an outage each process enforces the whole "
                    "of each limit",
                    self.key,
                    exc,
                )
            else:
                logger.debug("fidelity_mw: fleet announcement failed (%s)", type(exc).__name__)
            return
        self.announces += 1
        self.reported = counted
        now = clock()
        if self.ok_at is not None and now - self.ok_at > self.hold_s - ANNOUNCE_S:
            # Its first reading after a gap longer than the hold (an outage): the
            # members cut off by the same outage were dropped for their silence, and
            # announce again only as their own calls succeed (the first back read a
            # fleet of 1 and a fraction of 1.0, and in a fallback a moment later, Redis
            # slow to drain what queued while it was away, enforced the whole limit).
            self.rejoined_at = now
        self.ok_at = now
        if size >= 1:
            if fraction is None or not 0.0 <= fraction <= 1.0:
                fraction = None  # (-1: unknown)
            if (
                self.size is not None
                and size < self.size
                and now - self.rejoined_at <= MEMBER_TTL_S
            ):
                # A smaller fleet read within a member ttl of its return is believed only
                # once the others had that ttl to announce again: meanwhile the size and
                # weight read before stand (a member truly gone keeps the share smaller
                # than it could be for that long, never larger).
                self.seen_at = now
                return
            self.size, self.seen_at, self.fraction = size, now, fraction
            self.weight = (
                None
                if fraction is None
                else quantize_weight(load_weight(size, fraction, self.even_ratio), self.weight)
            )

    def share(self, now: float) -> FleetShare:
        share = self._share(now)
        if (
            self.weighted
            and share.size is not None
            and share.size > 1
            and self.seen_at is not None
            and self.tried_at - self.seen_at > self.hold_s - ANNOUNCE_S
        ):
            # Redis answered it more than the hold after its last announcement that
            # counted (they failed, or were skipped on a busy pool): the others may have
            # dropped it and split the whole limit among themselves. It keeps the floor
            # of an idle member, not a weight they no longer leave it.
            floor = quantize_weight(load_weight(share.size, 0.0, self.even_ratio))
            return share._replace(weight=floor, load=None, load_why=LOAD_UNANNOUNCED)
        return share

    def _share(self, now: float) -> FleetShare:
        return fleet_share(
            self.size,
            self.seen_at,
            now,
            self.max_age_s,
            weighted=self.weighted,
            weight=self.weight,
            load=self.fraction,
            load_max_age_s=self.load_max_age_s,
        )

    def for_share(
        self, limit_keys: Sequence[str], limits: Sequence[LimitSpec], share: FleetShare | None
    ) -> tuple[Sequence[str], Sequence[LimitSpec]]:
        """The limits as `share` of them (unchanged when it is unknown or the whole)."""
        if share is None or share.size is None:
            return limit_keys, limits
        if share.weight is not None:
            if share.weight >= 1.0:
                return limit_keys, limits
            return self.scaled(limit_keys, limits, share.weight)
        if share.size > 1:
            return self.scaled(limit_keys, limits, share.size)
        return limit_keys, limits

    def scaled(
        self, limit_keys: Sequence[str], limits: Sequence[LimitSpec], members: int | float
    ) -> tuple[list[str], list[LimitSpec]]:
        """The limits as this instance's share: 1/`members` (an int), or a weight (a float,
        of the quantized grid), on local keys of their own (a key's state under the whole
        limit or another share never mixes with these; the NUL ends the prefix where a
        real key has its limit name, which never holds one)."""
        prefix = self._prefixes.get(members)
        if prefix is None:
            tag = f"1/{members}" if isinstance(members, int) else weight_tag(members)
            prefix = self._prefixes[members] = f"share {tag}\x00"
        used = self._used
        if next(reversed(used), None) != members:  # another share than the last one
            used.pop(members, None)
            used[members] = prefix
            if len(used) > _SHARES_KEPT:
                del used[next(iter(used))]
        specs = self._specs
        out = []
        for spec in limits:
            scaled = specs.get((spec, members))
            if scaled is None:
                if len(specs) >= _SPEC_CACHE_MAX:
                    specs.clear()
                scaled = specs[(spec, members)] = (
                    share_spec(spec, members)
                    if isinstance(members, int)
                    else weighted_spec(spec, members)
                )
            out.append(scaled)
        return [prefix + key for key in limit_keys], out

    def carry(
        self,
        table: GcraTable,
        limit_keys: Sequence[str],
        shared_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
    ) -> None:
        """A key's first decision under this share (`shared_keys`, `limits`: from `scaled`)
        starts from the units it spent under the share used before it (the latest that holds
        the key): a share that changes while the process decides alone (a weight read anew
        while Redis answers other calls, a fleet size) grants no fresh burst. Only units not
        yet refilled carry over, as a debt to the new share's bucket."""
        used = self._used
        if len(used) < 2:
            return
        tats = table.tats
        intervals = table.intervals
        earlier = list(used.values())[-2::-1]  # the shares before this one, latest first
        for key, shared, spec in zip(limit_keys, shared_keys, limits, strict=True):
            if shared in tats:
                continue
            for prefix in earlier:
                old = prefix + key
                tat = tats.get(old)
                if tat is None:
                    continue
                units = (tat - now) / intervals.get(old, spec.interval_s)
                if units > 0.0:
                    tats[shared] = now + units * spec.interval_s
                    intervals[shared] = spec.interval_s
                    # a debt this far ahead is no clock step (`decide.gcra.recorded`)
                    table.wrote(shared, units * spec.interval_s)
                break
