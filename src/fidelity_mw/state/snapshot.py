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

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..decide.breaker import OPEN, BreakerState
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


@dataclass(frozen=True, slots=True)
class SnapshotConfigs:
    """Configs a remote store needs to age windows it holds only as numbers."""

    breaker: Callable[[str], BreakerConfig | None] = lambda _key: None
    retry: Callable[[str], RetryConfig | None] = lambda _key: None


def top_limiter_keys(
    items: Mapping[str, float], now: float, top: int, source: str, age_s: float
) -> tuple[LimiterKeyView, ...]:
    """The `top` keys furthest ahead of `now` (TAT in the past: idle, left out)."""
    busy = sorted(
        ((tat - now, key) for key, tat in items.items() if tat > now),
        reverse=True,
    )[:top]
    return tuple(LimiterKeyView(key, backlog, source, age_s) for backlog, key in busy)


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


def local_snapshot(local: LocalTables, kind: str, now: float, top: int) -> StoreSnapshot:
    """Everything a process-local state holds, aged to `now`, under its lock."""
    with local._lock:
        breakers = tuple(
            _breaker_view(key, state, now) for key, state in list(local.breakers.items())
        )
        budgets = tuple(
            BudgetView(key, *window.totals(now), "memory", 0.0)
            for key, window in list(local.budgets.items())
        )
        tats = local.limits.tats
        limiter = top_limiter_keys(tats, now, top, "memory", 0.0)
        count = len(tats)
    return StoreSnapshot(
        kind=kind,
        source="memory",
        age_s=0.0,
        breakers=breakers,
        limiter_keys=limiter,
        limiter_key_count=count,
        budgets=budgets,
        detail={
            "max_keys": local.limits.max_keys,
            "evicted_active_keys": local.limits.evicted_active,
            "breakers_evicted_active": local.breakers_evicted_active,
            "budgets_evicted_active": local.budgets_evicted_active,
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
