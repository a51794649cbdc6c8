"""Read-only views of a store's state, for the live state page (`fidelity_mw.admin`).

A store's `snapshot(now, ...)` returns one `StoreSnapshot`: what it holds right
now, each item with where it was read from (`source`: memory | redis | cache
| fallback) and how old that reading is (`age_s`). Taking a snapshot changes
no decision: windows are aged to `now` exactly as the next decision would
age them, nothing is admitted, counted or evicted.

Keys are the logical ones (`route:/items/{id}`, `per-client|203.0.113.7`):
whoever shows them outside the process hashes the client part first.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from operator import attrgetter
from typing import Any, Final, Protocol

from ..decide.breaker import CLOSED, OPEN, BreakerState
from ..decide.budget import BudgetWindow
from ..policy import BreakerConfig, RetryConfig


@dataclass(frozen=True, slots=True)
class BreakerView:
    key: str  # route:<route> | upstream:<host[:port]>
    state: str  # closed | open | half_open
    epoch: int  # transitions so far (the state changed when this changed)
    since_s: float | None  # seconds in this state, when the store knows it
    calls: int  # in the sliding window
    failures: int
    slow: int
    consecutive: int  # failures in a row
    probes: int  # half-open probes in flight
    retry_after_s: float  # open: seconds until probes are admitted
    source: str
    age_s: float


@dataclass(frozen=True, slots=True)
class LimiterKeyView:
    key: str  # "<limit name>|<client key>"
    backlog_s: float  # TAT - now: quota in use, in seconds of refill
    source: str
    age_s: float
    held: int | None = None  # tiered: units of a leased slice not yet spent


@dataclass(frozen=True, slots=True)
class BudgetView:
    key: str  # budget:<host or host glob>
    requests: int  # in the window
    retries: int
    source: str
    age_s: float


@dataclass(frozen=True, slots=True)
class InstanceView:
    service: str
    address: str
    ejected: bool
    ejected_for_s: float | None
    source: str
    age_s: float


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    kind: str  # memory | redis | tiered | the class name of another store
    source: str  # where this snapshot mostly comes from
    age_s: float
    breakers: tuple[BreakerView, ...] = ()
    limiter_keys: tuple[LimiterKeyView, ...] = ()  # the `top` busiest, busiest first
    limiter_key_count: int = 0  # how many keys the store holds (or knows of)
    budgets: tuple[BudgetView, ...] = ()
    instances: tuple[InstanceView, ...] = ()
    detail: Mapping[str, Any] = field(default_factory=dict)  # store health and counters
    notes: tuple[str, ...] = ()  # what this view cannot show, in words
    layers: tuple[StoreSnapshot, ...] = ()  # tiered: the exact store underneath
    # how many breakers / budgets the store holds, when it lists only some of them
    # (`SnapshotConfigs.top_breakers`); None: those listed are all of them
    breaker_count: int | None = None
    budget_count: int | None = None


@dataclass(frozen=True, slots=True)
class SnapshotConfigs:
    """Configs a remote store needs to age windows it holds only as numbers."""

    breaker: Callable[[str], BreakerConfig | None] = lambda _key: None
    retry: Callable[[str], RetryConfig | None] = lambda _key: None
    # How many breakers and retry budgets the caller will show (None: all). A store
    # that holds more may list only these: the breakers not closed first, then route
    # breakers (`first_breakers`), the budgets with the most retries first
    # (`top_budgets`), and say how many it holds (`StoreSnapshot.breaker_count`).
    top_breakers: int | None = None
    top_budgets: int | None = None


def top_limiter_keys(
    items: Mapping[str, float], now: float, top: int, source: str, age_s: float
) -> tuple[LimiterKeyView, ...]:
    """The `top` keys furthest ahead of `now` (TAT in the past: idle, left out)."""
    return _top_tats(items.values(), items.keys(), now, top, source, age_s)


def _top_tats(
    tats: Iterable[float], keys: Iterable[str], now: float, top: int, source: str, age_s: float
) -> tuple[LimiterKeyView, ...]:
    # A selection, not a sort: a memory store holds up to 100,000 keys, and sorting
    # them all took 20 ms per refresh (under the store's lock, on the event loop).
    busy = heapq.nlargest(max(0, top), zip(tats, keys, strict=True))
    return tuple(LimiterKeyView(key, tat - now, source, age_s) for tat, key in busy if tat > now)


def first_breakers(
    keys: Sequence[str], states: Sequence[object], limit: int, *, routes_first: bool = False
) -> list[int]:
    """Where the first `limit` breakers are in `keys` / `states` (a table's keys and its
    breakers' states, in its order), ranked by (closed, not a route breaker): those not
    closed, route breakers (`route:...`) first among them, then closed route breakers,
    then the rest. With `routes_first`, by (not a route breaker, closed). Each rank in
    the table's order: the same as a stable sort by rank cut at `limit`, without the
    sort or a key per breaker: two comprehensions over the table, then work per breaker
    chosen. (A memory store holds a breaker per upstream host its calls named, up to
    10,000 by default; few of them are routes' or not closed.)

    Indexes, not (key, breaker) pairs: a pair per breaker, kept alive through the
    selection, is an allocation the garbage collector counts, and enough of them start
    a full collection of the heap (150 ms at 100,000 breakers)."""
    limit = max(0, limit)
    # (a key is a route breaker's when "route:" <= key < "route;": no call per key)
    routes = [i for i, key in enumerate(keys) if _ROUTE <= key < _ROUTE_END]
    not_closed = [i for i, state in enumerate(states) if state != CLOSED]
    open_routes = [i for i in routes if states[i] != CLOSED]
    closed_routes = [i for i in routes if states[i] == CLOSED]
    open_others = [i for i in not_closed if not _ROUTE <= keys[i] < _ROUTE_END]
    if routes_first:
        ranked = (open_routes, closed_routes, open_others)
    else:
        ranked = (open_routes, open_others, closed_routes)
    chosen: list[int] = []
    for group in ranked:
        chosen += group[: limit - len(chosen)]
    if len(chosen) < limit:  # the rest (closed, not a route's): only as many as needed
        rest = (
            i
            for i, state in enumerate(states)
            if state == CLOSED and not _ROUTE <= keys[i] < _ROUTE_END
        )
        chosen += islice(rest, limit - len(chosen))
    return chosen


_STATE: Final = attrgetter("state")
_ROUTE: Final = "route:"
_ROUTE_END: Final = "route;"  # the first string after every "route:..." one


def top_budgets(
    windows: Sequence[BudgetWindow],
    now: float,
    limit: int,
    lock: contextlib.AbstractContextManager[Any] | None = None,
) -> list[tuple[int, int, int]]:
    """The `limit` retry budgets with the most retries, then the most requests, in the
    window aged to `now` (ties in the order given): (index, requests, retries) each.
    `lock`: the lock of the state that holds the windows, held while they are aged
    (aging rotates them).

    Only the windows that can still make the list are aged. A window holds at most what
    its buckets sum to now, and nothing once a whole window has passed since its last
    bucket ended: with those bounds as candidates, best first, windows are aged until
    the `limit`-th best found beats every bound left. Usually that ages about `limit`
    windows, not all of them. (The bounds are read without the lock: a count that
    lands meanwhile is in the bound of the next snapshot.)"""
    limit = max(0, limit)
    bounds = [
        (-sum(w.retries), -sum(w.requests), i)
        if now < w._bucket_end + w.config.budget_window_s
        else (0, 0, i)  # stale: nothing left in it (`totals` still ages it if examined)
        for i, w in enumerate(windows)
    ]
    heapq.heapify(bounds)  # the best bound first: (-retries, -requests, index)
    kept: list[tuple[int, int, int]] = []  # (retries, requests, -index): kept[0] the worst
    with lock or contextlib.nullcontext():
        while bounds and limit:
            bound = heapq.heappop(bounds)
            if len(kept) == limit:
                worst = kept[0]
                if (-worst[0], -worst[1], -worst[2]) < bound:
                    break  # nothing left can beat the worst kept
            index = bound[2]
            requests, retries = windows[index].totals(now)
            entry = (retries, requests, -index)
            if len(kept) < limit:
                heapq.heappush(kept, entry)
            elif entry > kept[0]:
                heapq.heapreplace(kept, entry)
    kept.sort(reverse=True)
    return [(-negated, requests, retries) for retries, requests, negated in kept]


class _Tats(Protocol):
    tats: dict[str, float]
    max_keys: int
    evicted_active: int


class LocalTables(Protocol):
    """What a snapshot reads of process-local state (`state/local.py`'s `LocalState`)."""

    _lock: threading.Lock
    breakers: dict[str, BreakerState]
    budgets: dict[str, BudgetWindow]
    breakers_evicted_active: int
    budgets_evicted_active: int

    @property
    def limits(self) -> _Tats: ...


def local_snapshot(
    local: LocalTables,
    kind: str,
    now: float,
    top: int,
    configs: SnapshotConfigs | None = None,
) -> StoreSnapshot:
    """What a process-local state holds, aged to `now`: every breaker and budget, or the
    `configs.top_breakers` / `top_budgets` first of them, and the `top` busiest keys.

    Its lock is the one every decision on this state takes: under it the tables are
    copied (in C) and only the items listed are aged; choosing them reads the copies
    without it. (Aging every breaker under the lock held it 40 ms per page refresh at
    10,000 breakers, on the event loop: the memory store now calls this in a worker
    thread, a Redis store's fallback on the loop.)"""
    want_breakers = configs.top_breakers if configs is not None else None
    want_budgets = configs.top_budgets if configs is not None else None
    lock = local._lock
    with lock:
        # (keys and values as two lists: no pair per item for the collector to count)
        breaker_keys, breaker_states = list(local.breakers), list(local.breakers.values())
        budget_keys, windows = list(local.budgets), list(local.budgets.values())
        table = local.limits
        tats, keys = list(table.tats.values()), list(table.tats)
        max_keys, evicted = table.max_keys, table.evicted_active
        breakers_evicted = local.breakers_evicted_active
        budgets_evicted = local.budgets_evicted_active
    chosen: Sequence[int] = range(len(breaker_keys))
    if want_breakers is not None and len(breaker_keys) > want_breakers:
        # (states read without the lock: a breaker that changes state meanwhile is
        # ranked as it was a moment before, and shown as it is)
        chosen = first_breakers(breaker_keys, list(map(_STATE, breaker_states)), want_breakers)
    counted: list[tuple[int, int, int]] | None = None
    if want_budgets is not None and len(windows) > want_budgets:
        counted = top_budgets(windows, now, want_budgets, lock)
    with lock:
        breakers = tuple(_breaker_view(breaker_keys[i], breaker_states[i], now) for i in chosen)
        if counted is None:
            counted = [(i, *window.totals(now)) for i, window in enumerate(windows)]
    budgets = tuple(BudgetView(budget_keys[i], q, r, "memory", 0.0) for i, q, r in counted)
    return StoreSnapshot(
        kind=kind,
        source="memory",
        age_s=0.0,
        breakers=breakers,
        limiter_keys=_top_tats(tats, keys, now, top, "memory", 0.0),
        limiter_key_count=len(keys),
        budgets=budgets,
        breaker_count=len(breaker_keys),
        budget_count=len(windows),
        detail={
            "max_keys": max_keys,
            "evicted_active_keys": evicted,
            "breakers_evicted_active": breakers_evicted,
            "budgets_evicted_active": budgets_evicted,
        },
    )


def _breaker_view(key: str, state: BreakerState, now: float) -> BreakerView:
    calls, failures, slow = state.totals(now)  # ages the window, as the next call would
    since = None
    retry_after = 0.0
    if state.state == OPEN:
        since = now - state.opened_at
        retry_after = max(0.0, state.open_until - now)
    return BreakerView(
        key,
        state.state,
        state.epoch,
        since,
        calls,
        failures,
        slow,
        state.consecutive,
        len(state.probes),
        retry_after,
        "memory",
        0.0,
    )
