"""Review 38: broken-body reports to a remote store stay bounded, and the bound heals.

The reports pending at once are bounded (review 36: `MAX_PENDING_REPORTS`, the rest
dropped and counted). A report to a remote store is a task on the event loop of the
call whose body broke, and its room came back only when that task ended. An event loop
closed without running its pending tasks to their end (a loop of one's own:
`run_until_complete`, then `close`; a worker thread's loop; a test's) never ends them:
their room never came back, and after enough such loops every later report, in every
loop, was dropped, while the set kept every dead task (and its loop) alive. A report
of a closed loop now gives its room back when the bound is reached."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fidelity_mw import FidelityTransport
from fidelity_mw.context import DecisionContext
from fidelity_mw.decide.breaker import Gate
from fidelity_mw.outbound import body as body_module
from fidelity_mw.policy import BreakerConfig
from fidelity_mw.state.redis import RedisStats

BOUND = body_module.MAX_PENDING_REPORTS


class _Store:
    """A remote store whose `record` ends only when its loop lets it (`hang`: never)."""

    def __init__(self, hang: bool) -> None:
        self.stats = RedisStats()
        self.hang = hang
        self.recorded = 0

    async def record(self, *args: Any) -> str:
        if self.hang:
            await asyncio.get_running_loop().create_future()
        self.recorded += 1
        return "closed"


def _broke(store: _Store) -> None:
    engine = FidelityTransport(httpx.MockTransport(lambda r: httpx.Response(200))).engine
    ctx = DecisionContext(engine, "out", "GET", 0.0)
    gate = Gate("allow", "closed", 1, 0.0)
    watch = body_module.Watch(
        ctx, "up.internal", store, None, "upstream:up.internal", BreakerConfig(), gate,
        "redis", None,
    )  # fmt: skip
    watch.broke(httpx.ReadError("reset"), 1, False)


@pytest.fixture(autouse=True)
def _nothing_pending() -> Iterator[None]:
    yield
    body_module._RECORDS.clear()


def _short_lived_loop(store: _Store, reports: int, run_first: bool) -> None:
    """A loop of one's own that reports broken bodies, then is closed with the reports
    still pending (`run_first`: each task has begun, and waits; else none has run)."""
    loop = asyncio.new_event_loop()
    try:

        async def call() -> None:
            for _ in range(reports):
                _broke(store)
            if run_first:
                await asyncio.sleep(0)

        loop.run_until_complete(call())
    finally:
        loop.close()  # without cancelling what is pending


def test_reports_left_pending_by_closed_loops_give_their_room_back() -> None:
    before = body_module.dropped()
    hanging = _Store(hang=True)
    loops = 6
    per_loop = BOUND // 4  # together, past the bound
    for i in range(loops):
        _short_lived_loop(hanging, per_loop, run_first=i % 2 == 0)
    # each loop's reports had room: the dead loops' room came back as it ran out
    assert body_module.dropped() == before
    assert hanging.stats.dropped_records == 0

    # a live loop's report is sent (was dropped: every room held by the dead loops)
    live = _Store(hang=False)

    async def main() -> None:
        _broke(live)
        await asyncio.gather(*[t for t in body_module._RECORDS if not t.get_loop().is_closed()])

    asyncio.run(main())
    assert live.recorded == 1
    assert body_module.dropped() == before
    assert live.stats.dropped_records == 0
    # and the dead loops' tasks are not kept forever: at most a bound's worth remain
    assert len(body_module._RECORDS) <= BOUND


def test_a_live_loops_pending_reports_still_hold_the_bound() -> None:
    """Healing gives back only a closed loop's room: reports pending on a loop that runs
    are bounded as before."""
    before = body_module.dropped()
    _short_lived_loop(_Store(hang=True), BOUND, run_first=True)  # dead: room comes back
    store = _Store(hang=True)

    async def main() -> None:
        for _ in range(BOUND + 5):
            _broke(store)
        live = [t for t in body_module._RECORDS if not t.get_loop().is_closed()]
        assert len(live) == BOUND
        assert body_module.dropped() - before == 5
        for task in live:
            task.cancel()
        await asyncio.gather(*live, return_exceptions=True)

    asyncio.run(main())
    gc.collect()
    assert store.stats.dropped_records == 5
