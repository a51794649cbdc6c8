"""The fleet share right after an outage longer than a member ttl (fsh47).

Redis paused 5 s under a 4-process fleet (tests/test_redis_fleet_share.py, load 13): every
member was silent for more than the member ttl, so the first to announce again read a
fleet of 1 (and a load fraction of 1.0): fleet.lua drops members for their silence, and
the silence was the outage's. Its fallback decisions a moment later (Redis slow to drain
what queued while it was paused, a call past its 100 ms timeout) enforced the whole limit:
32 decisions with a fleet size of "1" in that run, where the fleet was still 4. On the
model of fleet.lua (`FleetTable`) and a fake clock: failed before the fix."""

from __future__ import annotations

import pytest

from fidelity_mw.decide.fleet import load_weight, quantize_weight
from fidelity_mw.state.fleet import ANNOUNCE_S, MEMBER_TTL_S, Fleet
from fidelity_mw.testing import FakeClock
from test_defects_review24_fleet import Table, enforced, second

pytestmark = pytest.mark.anyio

LOADS = [100, 100, 100, 100]


async def announce(fleet: Fleet, table: Table) -> None:
    """One announcement of `fleet` now (its first successful call after the outage)."""
    fleet.tick(table.clock.monotonic(), table.runner(fleet.id), table.clock.monotonic)
    assert fleet.task is not None
    await fleet.task


async def outage(fleets: list[Fleet], table: Table, seconds: float) -> None:
    """Redis away for `seconds`: no announcement lands; the members keep deciding."""
    for fleet in fleets:
        fleet.demand += int(100 * seconds)
    table.clock.advance(seconds)


async def test_the_first_member_back_keeps_the_fleet_size_it_read_before() -> None:
    clock = FakeClock()
    table = Table(clock)
    fleets = [Fleet("f", 60.0, 0.2, 30.0) for _ in range(4)]
    for _ in range(4):
        await second(fleets, table, LOADS)
    assert all(f.size == 4 for f in fleets)
    weight = fleets[0].weight
    assert weight == quantize_weight(load_weight(4, 0.25, 0.2))
    # (flt48: an outage longer than the hold, 60 s, for which a silent member counts)
    await outage(fleets, table, fleets[0].hold_s + 1.0)
    first = fleets[0]
    await announce(first, table)
    # Redis read it a fleet of one (the others are silent since the outage began) ...
    assert list(table.table.members) == [first.id]
    # ... and a fallback now (Redis slow again) enforces its quarter, not the whole limit
    share = first.share(clock.monotonic())
    assert share.size == 4  # was 1
    assert share.weight == weight  # was 1.0
    assert enforced(share) == pytest.approx(0.25, rel=0.05)
    assert share.age_s == 0.0
    # the others come back, each read as it returns; the fleet is whole again
    for fleet in fleets[1:]:
        clock.advance(ANNOUNCE_S / len(fleets))
        await announce(fleet, table)
    clock.advance(ANNOUNCE_S / len(fleets))
    for _ in range(2):
        await second(fleets, table, LOADS)
    assert [f.share(clock.monotonic()).size for f in fleets] == [4, 4, 4, 4]
    assert sum(enforced(f.share(clock.monotonic())) for f in fleets) == pytest.approx(1.0, 0.05)


async def test_a_member_gone_in_the_outage_is_believed_gone_a_ttl_later() -> None:
    """A member that does not come back: the smaller fleet is read one member ttl after
    the return (meanwhile the share is the smaller one: the fleet admits less, never more)."""
    clock = FakeClock()
    table = Table(clock)
    fleets = [Fleet("f", 60.0, 0.2, 30.0) for _ in range(4)]
    for _ in range(4):
        await second(fleets, table, LOADS)
    # (flt48: an outage longer than the hold, 60 s, for which a silent member counts)
    await outage(fleets, table, fleets[0].hold_s + 1.0)
    alive = fleets[:3]  # the fourth is gone
    sizes = []
    for _ in range(int(MEMBER_TTL_S / ANNOUNCE_S) + 2):
        await second(alive, table, LOADS[:3])
        sizes.append(alive[0].share(clock.monotonic()).size)
    assert sizes[0] == 4
    assert sizes[-1] == 3
    assert sum(enforced(f.share(clock.monotonic())) for f in alive) == pytest.approx(1.0, 0.05)


async def test_a_member_dropped_while_redis_answered_others_reads_the_fleet_at_once() -> None:
    """Its own gap, not the others': back with a larger fleet than before, believed at once."""
    clock = FakeClock()
    table = Table(clock)
    fleets = [Fleet("f", 60.0, 0.2, 30.0) for _ in range(2)]
    for _ in range(3):
        await second(fleets, table, [100, 100])
    newcomers = [Fleet("f", 60.0, 0.2, 30.0) for _ in range(2)]
    table.failing.add(fleets[0].id)
    for _ in range(int(MEMBER_TTL_S) + 1):
        await second([*fleets, *newcomers], table, [100] * 4)
    table.failing.clear()
    await announce(fleets[0], table)
    assert fleets[0].share(clock.monotonic()).size == 4
