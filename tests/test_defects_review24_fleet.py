"""Review of the fleet share weighted by load (fleet19): the fleet-wide bound while Redis
is away, per-client keys, weight changes and the fleet's key churn. Each test failed before
its fix (or says what it pins down)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest

from fidelity_mw.decide.fleet import (
    LOAD_UNANNOUNCED,
    FleetShare,
    FleetTable,
    load_weight,
    quantize_weight,
    weighted_spec,
)
from fidelity_mw.inbound.admission import fleet_details
from fidelity_mw.policy import StateConfig
from fidelity_mw.state.base import LimitSpec
from fidelity_mw.state.fleet import ANNOUNCE_S, MEMBER_TTL_S, Fleet
from fidelity_mw.state.local import LocalState
from fidelity_mw.state.redis import RedisStore
from fidelity_mw.state.scripts import Script
from fidelity_mw.testing import FakeClock, seeded_random

pytestmark = pytest.mark.anyio


class Table:
    """The fleet's table in Redis (the pure model of fleet.lua), on the test's clock;
    members in `failing` find their announcements fail (as when every connection of
    that process stays busy: `RedisStore._fleet_run` skips it)."""

    def __init__(self, clock: FakeClock) -> None:
        self.table = FleetTable()
        self.clock = clock
        self.failing: set[str] = set()

    def runner(self, member: str) -> Any:
        async def run(script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
            if member in self.failing:
                raise ConnectionError("no connection free for the fleet announcement")
            # (the hold, when the announcement sends one: ARGV[4] of fleet.lua)
            size, fraction = self.table.announce(
                str(args[0]),
                float(args[2]),
                self.clock.monotonic(),
                float(args[1]),
                *(float(a) for a in args[3:4]),
            )
            return [size, "-1" if fraction is None else repr(fraction)]

        return run


def enforced(share: FleetShare) -> float:
    """The part of each limit a member enforces with `share` (1: the whole limit)."""
    if share.size is None:
        return 1.0
    if share.weight is not None:
        return share.weight
    return 1.0 / share.size


async def second(fleets: list[Fleet], table: Table, loads: list[int]) -> None:
    """One second of traffic: each member decides its load (Redis answers its requests),
    and announces once (the tick after a successful call) at its own phase."""
    for fleet, load in zip(fleets, loads, strict=True):
        fleet.demand += load
        fleet.tick(table.clock.monotonic(), table.runner(fleet.id), table.clock.monotonic)
        assert fleet.task is not None
        await fleet.task
        table.clock.advance(ANNOUNCE_S / len(fleets))


async def test_a_member_whose_announcements_fail_keeps_no_large_weight() -> None:
    """1. The busy member of four (90 % of the requests) keeps serving while its fleet
    announcements fail (its connections all busy) for longer than the member ttl. The
    others drop it from the fleet and split the whole limit among themselves (1/3 each);
    it held its weight of 0.77 read before: 1.77 x the fleet limit in an outage. The
    issue's bound is 1.2 x."""
    clock = FakeClock()
    table = Table(clock)
    # (flt48: trusting a size for 120 s, a member silent for the hold, 60 s, is dropped
    # while its own reading is still in use; at 60 s both ended together)
    fleets = [Fleet("f", 120.0, 0.2, 30.0) for _ in range(4)]
    loads = [900, 34, 33, 33]
    for _ in range(4):
        await second(fleets, table, loads)
    busy = fleets[0]
    assert busy.weight is not None
    assert busy.weight > 0.7
    table.failing.add(busy.id)
    for _ in range(int(MEMBER_TTL_S) + 2):
        await second(fleets, table, loads)
    assert busy.failed >= MEMBER_TTL_S
    # (flt48) the others count a silent member, with the load it reported last, for
    # the hold (it may be deciding alone on its share): it keeps its weight meanwhile
    now = clock.monotonic()
    held = [enforced(f.share(now)) for f in fleets]
    assert held[0] == busy.weight
    assert sum(held) == pytest.approx(1.0, rel=0.05)
    for _ in range(int(busy.hold_s - MEMBER_TTL_S)):
        await second(fleets, table, loads)
    # Redis goes away now: what each member enforces
    now = clock.monotonic()
    others = [enforced(f.share(now)) for f in fleets[1:]]
    assert sum(others) == pytest.approx(1.0, rel=0.05)  # they no longer count the busy one
    mine = busy.share(now)
    assert mine.size == 4
    assert sum(others) + enforced(mine) <= 1.2
    # it keeps an idle member's floor, and the decision says why
    assert mine.weight == pytest.approx(0.05, rel=0.05)
    assert fleet_details(mine)["fleet_load_why"] == LOAD_UNANNOUNCED
    # once an announcement counts again, its weight is its own again
    table.failing.clear()
    await second(fleets, table, loads)
    assert busy.share(clock.monotonic()).weight == busy.weight
    assert busy.weight is not None
    assert busy.weight > 0.7


async def test_announcements_that_fail_within_the_ttl_keep_the_weight() -> None:
    """A few failed announcements (fewer than the others need to drop it) change nothing."""
    clock = FakeClock()
    table = Table(clock)
    fleets = [Fleet("f", 60.0, 0.2, 30.0) for _ in range(2)]
    for _ in range(3):
        await second(fleets, table, [90, 10])
    table.failing.add(fleets[0].id)
    for _ in range(int(MEMBER_TTL_S - ANNOUNCE_S) - 1):
        await second(fleets, table, [90, 10])
    share = fleets[0].share(clock.monotonic())
    assert share.weight == fleets[0].weight
    assert share.load is not None
    assert share.load > 0.8


SLOW = LimitSpec("s", 60.0, 60.0 * 20, 1, False)  # burst 20, no refill within a test


def set_weight(store: RedisStore, fraction: float) -> None:
    """What an announcement that succeeds (Redis answers the store's other calls) leaves."""
    fleet = store.fleet
    fleet.size, fleet.seen_at, fleet.fraction = 2, store._clock.monotonic(), fraction
    fleet.weight = quantize_weight(load_weight(2, fraction, fleet.even_ratio), fleet.weight)
    fleet.tried_at = fleet.seen_at


async def test_a_weight_change_between_fallback_decisions_grants_no_fresh_burst() -> None:
    """3. Requests whose calls fail while Redis answers others (a full pool, a lost or bad
    reply) decide on the local share, and the announcements go on: the weight can change
    between two such decisions. Each weight had buckets of its own (`share <weight>`), so
    a client that had spent its share's burst got the new weight's whole burst at once:
    one burst more per change. The units spent carry over to the new weight's bucket."""
    clock = FakeClock()
    config = StateConfig(url="redis://127.0.0.1:1/0", key_prefix="rv")
    store = RedisStore(config=config, rng=seeded_random(3), clock=clock)
    try:
        set_weight(store, 0.5)
        first = store.fleet.weight
        assert first is not None
        spent = 0
        for _ in range(40):
            spent += store.fallback_admit(None, None, ["c|1"], [SLOW], clock.monotonic()).admitted
        assert spent == round(20 * first)
        set_weight(store, 0.6)  # a load that rose: the next reading
        second = store.fleet.weight
        assert second is not None
        assert second > first
        # a peek under the new weight sees the units spent under the old one
        peeked = store.fallback_peek(["c|1"], [SLOW], clock.monotonic())
        assert peeked.limits[0].remaining == round(20 * second) - spent
        more = 0
        for _ in range(40):
            result = store.fallback_admit(None, None, ["c|1"], [SLOW], clock.monotonic())
            assert result.fleet is not None
            assert result.fleet.weight == second
            more += result.admitted
        # the new weight's burst, less what this client spent under the old one
        assert spent + more == round(20 * second)
    finally:
        await store.aclose()


def test_a_client_pinned_to_a_quiet_process_gets_less_than_the_even_share() -> None:
    """2. Not a defect of the bound, a cost the docs now state (state.md, operations.md):
    the weight is the process's fraction of all its requests, and each per-client key gets
    that weight of its limit. With 4 processes, a client whose keep-alive connections all
    went to a process that takes 10 % of the fleet's requests gets 0.2 / 4 + 0.8 x 0.1 =
    0.13 of its limit in an outage (the even share: 0.25; without the share: all of it,
    every one of its requests being in that process); one pinned to the busy process
    (70 %) gets 0.61. Summed over the processes a key's weights are still one limit."""
    fractions = [0.7, 0.1, 0.1, 0.1]
    weights = [quantize_weight(load_weight(4, f, 0.2)) for f in fractions]
    assert sum(weights) == pytest.approx(1.0, rel=0.05)

    def burst_of(weight: float) -> int:
        table = LocalState()
        spec = weighted_spec(SLOW, weight) if weight < 1.0 else SLOW
        return sum(table.admit_now(None, None, ["c"], [spec], 0.0).admitted for _ in range(40))

    assert burst_of(1.0) == 20
    assert burst_of(quantize_weight(0.25)) == 5  # the even share
    assert burst_of(weights[1]) == 2  # pinned to a quiet process: 0.13 of 20 (2.6)
    assert burst_of(weights[0]) == 12  # pinned to the busy one: 0.61 of 20


def test_mixed_even_ratios_in_a_rolling_restart_stay_within_their_difference() -> None:
    """5. There is no hot reload: a changed `fleet_share_even_ratio` rolls out by restart,
    and meanwhile the members hold different ratios. Not a defect within the issue's
    bound for a change of at most 0.2; the docs (state.md) give the bound: the weights
    sum to at most 1 + (the highest ratio - the lowest)."""
    rng = random.Random(24)
    worst = 0.0
    for _ in range(2_000):
        n = rng.randint(2, 8)
        raw = [rng.expovariate(1.0) for _ in range(n)]
        ratios = [rng.choice([0.2, 0.5]) for _ in range(n)]
        total = sum(load_weight(n, r / sum(raw), e) for r, e in zip(raw, ratios, strict=True))
        assert total <= 1.0 + (max(ratios) - min(ratios)) + 1e-9
        worst = max(worst, total)
    # the busiest on 0.2, the rest on 0.5: near the bound
    assert load_weight(4, 1.0, 0.2) + 3 * load_weight(4, 0.0, 0.5) == pytest.approx(1.225)
    assert worst > 1.15
