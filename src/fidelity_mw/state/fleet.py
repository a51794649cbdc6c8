"""Fleet membership, for the fleet-aware local fallback of the Redis store.

While Redis answers, each `RedisStore` announces itself at most once per
`ANNOUNCE_S` (a background call started by the store's own traffic, so an
idle instance costs nothing): `fleet.lua` adds its random id to the sorted
set ``{prefix}:fleet`` scored by the server's `TIME`, drops members silent
for more than `MEMBER_TTL_S`, and returns how many are left. The instance
keeps that count and the local time it was read.

While Redis is unreachable and `on_error = "local"`, each limit is enforced
as this instance's share of it (`decide.fleet.share_spec`: rate / N,
burst / N), on local keys of their own, so the fleet admits about one limit
instead of N. When the count is unknown (never read, or older than
`state.fleet_share_max_age_s`), the instance enforces the whole limit, as
without this feature, and the decision says so.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from ..decide.fleet import FleetShare, fleet_share, share_spec
from ..decide.specs import LimitSpec
from .scripts import Script, load_script

logger = logging.getLogger("fidelity_mw.redis")

FLEET: Final = load_script("fleet")
# How often an instance in use announces itself, and how long a silent member counts.
ANNOUNCE_S: Final = 1.0
MEMBER_TTL_S: Final = 5.0

_SPEC_CACHE_MAX: Final = 10_000

# Runs one script on Redis and returns its reply; raises on failure.
RunScript = Callable[[Script, Sequence[str], Sequence[Any]], Awaitable[Any]]


class Fleet:
    """This instance's membership: its id, the fleet size last read and when."""

    def __init__(self, prefix: str, max_age_s: float) -> None:
        self.id = secrets.token_hex(8)
        self.key = f"{{{prefix}}}:fleet"
        self.max_age_s = max_age_s
        self.enabled = max_age_s > 0.0
        self.size: int | None = None
        self.seen_at: float | None = None  # the store clock's monotonic time of that read
        self.due = -math.inf if self.enabled else math.inf  # next announcement
        self.announces = 0
        self.failed = 0
        self.task: asyncio.Task[None] | None = None
        self._specs: dict[tuple[LimitSpec, int], LimitSpec] = {}
        self._prefixes: dict[int, str] = {}

    def tick(self, now: float, run: RunScript, clock: Callable[[], float]) -> None:
        """Announce in the background if one is due (called after a successful call)."""
        self.due = now + ANNOUNCE_S
        task = self.task
        if task is None or task.done():
            self.task = asyncio.get_running_loop().create_task(self._announce(run, clock))

    async def _announce(self, run: RunScript, clock: Callable[[], float]) -> None:
        try:
            reply = await run(FLEET, (self.key,), (self.id, MEMBER_TTL_S))
            size = int(reply)
        except Exception as exc:  # dropped: the requests' own calls detect an outage
            self.failed += 1
            logger.debug("fidelity_mw: fleet announcement failed (%s)", type(exc).__name__)
            return
        self.announces += 1
        if size >= 1:
            self.size, self.seen_at = size, clock()

    def share(self, now: float) -> FleetShare:
        return fleet_share(self.size, self.seen_at, now, self.max_age_s)

    def scaled(
        self, limit_keys: Sequence[str], limits: Sequence[LimitSpec], members: int
    ) -> tuple[list[str], list[LimitSpec]]:
        """The limits as this instance's share of `members`, on local keys of their own
        (a key's state under the whole limit or another share never mixes with these; the
        NUL ends the prefix where a real key has its limit name, which never holds one)."""
        prefix = self._prefixes.get(members)
        if prefix is None:
            prefix = self._prefixes[members] = f"share 1/{members}\x00"
        specs = self._specs
        out = []
        for spec in limits:
            scaled = specs.get((spec, members))
            if scaled is None:
                if len(specs) >= _SPEC_CACHE_MAX:
                    specs.clear()
                scaled = specs[(spec, members)] = share_spec(spec, members)
            out.append(scaled)
        return [prefix + key for key in limit_keys], out
