"""Review 44 (flt44): a breaker written into a memory store's table directly, and the
outbound cells a plan holds (out43; docs/outbound.md, "State").

No product path, tool or admin page writes `store.breakers[key]` around the store's
operations (one test does, without cells). A plan's cell is the table's entry as it
was fetched: a direct write is not seen by it until a cell leaves a table
(`LocalState._cells_dropped`), and `forget_breakers` is the documented way to make it
seen. Both halves are held here, so a change to either is noticed.
"""

from __future__ import annotations

from fidelity_mw.decide.breaker import BreakerState
from fidelity_mw.policy import BreakerConfig, RetryConfig
from fidelity_mw.state.memory import MemoryStore

KEY = "upstream:api.example:443"


def test_a_direct_write_is_seen_by_held_cells_after_forget_breakers() -> None:
    store = MemoryStore()
    breaker = BreakerConfig()
    cells = store.outbound_cells(KEY, breaker, "budget:api.example:443", RetryConfig())
    store.outbound_begin_cells(cells, 1.0)
    first = store.breakers[KEY]
    assert cells.state is first

    written = BreakerState(breaker)
    store.breakers[KEY] = written  # around the store's operations
    store.outbound_begin_cells(cells, 2.0)
    assert cells.state is first  # not seen: documented, not enforced

    store.forget_breakers([KEY])
    store.breakers[KEY] = written
    store.outbound_begin_cells(cells, 3.0)
    assert cells.state is written
