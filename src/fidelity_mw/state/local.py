"""Process-local state: the decide/ objects of one process, behind one lock. Exact, O(1), bounded.

`LocalState` is what `MemoryStore` (the embedded default) decides on, and
what a Redis store falls back to while Redis is unreachable.

Bound: at most `max_keys` limiter keys (default 100,000). A key whose TAT is
in the past is indistinguishable from a fresh key, so sweeping those away
loses nothing; only if every key is still active does eviction drop those
whose loss forgives the fewest units (counted in `evicted_active`), which can
only make the limiter more lenient for those clients, never stricter, and
keeps the buckets every request charges (global, per route) to the last.
Retry credit (`decide.gcra.earn_credit`) sits in its own table of keys that
have some, at most `max_keys` too: expired credit goes at every sweep, and
past the bound the oldest earned goes (that only withdraws credit).

Breakers and retry budgets are keyed by route and by upstream host. Hosts can
be many (a service that calls URLs its clients supply: webhooks, link
previews), so they are bounded too: at most `max_breakers` of each (default
10,000, about 2 KB per host). An idle one (a closed breaker with nothing in
its window, no probe and no failure streak; a budget window with nothing in
it) is the same as a fresh one and is swept away first; only if that is not
enough are active ones dropped (counted in `breakers_evicted_active` /
`budgets_evicted_active`), which again only makes them more lenient: budgets
the oldest-inserted first, breakers those whose loss costs least first (closed
host breakers with nothing but successes; open and half-open ones, and route
breakers, last).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from types import FunctionType
from typing import Any, ClassVar, Final, TypeVar

from .._mypyc import mypyc_attr
from ..decide.breaker import CLOSED, IGNORED, SUCCESS, BreakerState, Gate
from ..decide.budget import BudgetWindow
from ..decide.fields import replaced, shown
from ..decide.fleet import FleetShare
from ..decide.gcra import (
    CLOCK_STEP_S,
    LimitSpec,
    LimitVerdict,
    credit_verdict,
    earn_credit,
    gcra,
    marker,
    peek,
    recorded,
    refund_seconds,
    slack_s,
    spend_credit,
)
from ..decide.specs import BreakerParams, BudgetParams, RandomSource

_T = TypeVar("_T")


class InboundResult:
    """The answer to `StateStore.admit`: the breaker gate, each limit's verdict, and
    provenance. (Defined here, where the in-process store builds one per request, so the
    compiled build makes it a native class; `state.base` exports it.) A slotted record,
    not a tuple (as `decide.gcra.LimitVerdict`): `_replace`, `_fields`, equality and
    hashing as a NamedTuple's. Treat it as immutable."""

    __slots__ = ("admitted", "age_s", "fleet", "gate", "limits", "source", "why")

    _fields: ClassVar[tuple[str, ...]] = (
        "gate",
        "limits",
        "admitted",
        "source",
        "age_s",
        "fleet",
        "why",
    )

    def __init__(
        self,
        gate: Gate | None,  # None when the route has no breaker
        limits: tuple[LimitVerdict, ...],  # same order as the specs; () when the breaker shed
        admitted: bool,
        source: str,  # memory | redis | cache | fallback
        age_s: float,  # how old the state behind this decision was
        # A local fallback decision of a shared store: the fleet share its limits used.
        fleet: FleetShare | None = None,
        # A fallback decision of a shared store: why it decided without the shared state,
        # "unreachable", "read_only" (a replica refused the writes) or "error" (it is up,
        # this call failed); None otherwise.
        why: str | None = None,
    ) -> None:
        self.gate = gate
        self.limits = limits
        self.admitted = admitted
        self.source = source
        self.age_s = age_s
        self.fleet = fleet
        self.why = why

    def _replace(self, **changes: Any) -> InboundResult:
        """A copy with these fields changed (NamedTuple's `_replace`)."""
        return replaced(self, changes)

    def _key(self) -> tuple[object, ...]:
        return (
            self.gate,
            self.limits,
            self.admitted,
            self.source,
            self.age_s,
            self.fleet,
            self.why,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InboundResult):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return shown(self)

    def __reduce__(self) -> tuple[type[InboundResult], tuple[Any, ...]]:
        # Pickled and copied by the constructor, as a NamedTuple: compiled, a native
        # class cannot be made without its __init__'s arguments (pickle's default did).
        return InboundResult, self._key()


_object_new: Final = object.__new__


def new_result(
    gate: Gate | None, limits: tuple[LimitVerdict, ...], admitted: bool, source: str, age_s: float
) -> InboundResult:
    """`InboundResult(gate, limits, admitted, source, age_s)` (no fleet share, no fallback
    reason), the in-process stores' answer per request. Interpreted, without the class call
    (a class whose `__init__` is Python code costs an interpreter call of its own);
    compiled, the native constructor (`object.__new__` would skip its setup)."""
    if _INTERPRETED:
        result: InboundResult = _object_new(InboundResult)
        result.gate = gate
        result.limits = limits
        result.admitted = admitted
        result.source = source
        result.age_s = age_s
        result.fleet = None
        result.why = None
        return result
    return InboundResult(gate, limits, admitted, source, age_s)


def _probe() -> None:
    return None


# This module runs as Python source (not compiled by mypyc)
_INTERPRETED: Final = type(_probe) is FunctionType


# A TAT this close to `now` (in emission intervals) is a full bucket: float sums
# leave ulps behind (gcra uses the same slack when admitting).
_FULL_SLACK: Final = 1e-6


def _marked(refunded: dict[str, float], key: str, verdict: LimitVerdict) -> LimitVerdict:
    """An admission's verdict reporting the key's virtual TAT (`decide.gcra.marker`)."""
    spent = refunded.get(key)
    return verdict if spent is None else verdict._replace(tat=marker(verdict.tat, spent))


def _from_credit(
    table: GcraTable, key: str, spec: LimitSpec, refused: LimitVerdict, now: float
) -> tuple[LimitVerdict, float, float] | None:
    """A refused limit admitted from the key's retry credit (`decide.gcra.spend_credit`):
    (its verdict, the credit left, the expiry), or None. Commits nothing."""
    held = table.credits.get(key)
    if held is None:
        return None
    left = spend_credit(held[0], held[1], now, spec.interval_s, spec.cost)
    if left is None:
        return None
    verdict = credit_verdict(refused, now, table.refunded.get(key, 0.0))
    return verdict, left, held[1]


def _keep_credit(credits: dict[str, tuple[float, float]], key: str, left: float, at: float) -> None:
    if left > 0.0:
        credits[key] = (left, at)
    else:  # spent: as if there had never been any (Redis stores none either)
        credits.pop(key, None)


@mypyc_attr(allow_interpreted_subclasses=True)  # tests subclass it
class GcraTable:
    """key -> TAT, with lossless sweeping of idle keys and least-loss eviction."""

    __slots__ = (
        "credits",
        "evicted_active",
        "intervals",
        "max_keys",
        "next_sweep",
        "refunded",
        "tats",
        "written",
    )

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.tats: dict[str, float] = {}
        # key -> emission interval, set when the key is created: eviction weighs
        # what losing a key forgives in units, not seconds.
        self.intervals: dict[str, float] = {}
        self.next_sweep = max_keys
        self.evicted_active = 0
        # key -> seconds refunded so far (`decide.gcra.refund`), only for keys that
        # had a refund: admissions look it up only while this is not empty.
        self.refunded: dict[str, float] = {}
        # key -> (retry credit in seconds, when it expires) (`decide.gcra.earn_credit`),
        # only for keys that have some: only refused admissions look it up. Independent
        # of the TAT's entry (a full bucket may hold credit), swept once expired.
        self.credits: dict[str, tuple[float, float]] = {}
        # key -> how far ahead the last write left its TAT, only where that was more
        # than `decide.gcra.CLOCK_STEP_S` (lib.lua's `wrote`): the clock-step guard
        # allows a TAT that far ahead, a debt another policy's burst ran up.
        self.written: dict[str, float] = {}

    def wrote(self, key: str, ahead_s: float) -> None:
        """A write left the key's TAT `ahead_s` ahead of now: record it (or forget an
        earlier record, as lib.lua's `store_tat` rewrites the key)."""
        ahead_s = recorded(ahead_s)
        if ahead_s > 0.0:
            self.written[key] = ahead_s
        else:
            self.written.pop(key, None)

    def unstepped(
        self, key: str, tat: float, now: float, spec: LimitSpec, refused: LimitVerdict
    ) -> LimitVerdict:
        """A refusal that read the key's TAT as stored before the clock went back, decided
        again with the tolerance the key records (a larger burst's debt is no clock step),
        and its TAT stored as decided. Only on that rare path: admissions never look the
        record up."""
        written = self.written.get(key)
        if written is not None:
            refused = gcra(tat, now, spec.interval_s, spec.tolerance_s, spec.cost, written)
        if refused.tat != tat:  # still read as a clock step: the reader's empty bucket
            self.tats[key] = refused.tat
            self.wrote(key, refused.tat - now)
        return refused

    def forgiven(self, key: str, now: float) -> float:
        """Units a client would get back if `key` were dropped now: its debt to the bucket."""
        return (self.tats[key] - now) / self.intervals.get(key, 1.0)

    def make_room(self, now: float, incoming: int = 1) -> None:
        """Make sure `incoming` more keys fit under `max_keys`.

        Idle keys (TAT <= now: a full bucket) go first and cost nothing. If
        active keys must go too, those whose loss forgives the fewest units go:
        a shared (global, per-route) bucket that every request charges owes the
        most and is the last to go.
        """
        tats = self.tats
        if len(tats) + incoming <= self.next_sweep:
            return
        # Each key's debt (`forgiven`) computed once, in one pass: at 100,000 keys that
        # were all active (a flood of new clients) the sweep, which one request pays,
        # took 280-300 ms, calling `forgiven` twice per key; 80-130 ms now (measured
        # interpreted on a loaded 2-core machine).
        intervals = self.intervals
        debts = {k: (t - now) / intervals.get(k, 1.0) for k, t in tats.items()}
        refunded = self.refunded
        # (within float noise of `now` is full too: gcra admits with the same slack)
        for key in [k for k, debt in debts.items() if debt <= _FULL_SLACK]:
            if refunded:
                # a refunded key lives until its virtual TAT (`gcra.marker`) is past
                spent = refunded.get(key)
                if spent is not None:
                    if (tats[key] + spent - now) / intervals.get(key, 1.0) > _FULL_SLACK:
                        continue
                    del refunded[key]
            del tats[key]
            del debts[key]
        keep = max(0, min((self.max_keys * 3) // 4, self.max_keys - incoming))
        overflow = len(tats) - keep
        if overflow > 0:
            # the same keys as heapq.nsmallest(overflow, ...) (documented as this sort),
            # and a C sort of floats beats a heap of a quarter of the table
            for key in sorted(debts, key=debts.__getitem__)[:overflow]:
                # (a full bucket kept for its refunded seconds goes first, forgiving none)
                self.evicted_active += debts[key] > _FULL_SLACK
                del tats[key]
                refunded.pop(key, None)
        self.sweep_credits(now)
        if len(intervals) > len(tats):
            self.intervals = {k: intervals[k] for k in tats if k in intervals}
        if self.written:
            self.written = {k: t for k, t in self.written.items() if k in tats}
        # Sweep again only after the table has grown by a quarter of its bound:
        # the O(n) scan is paid once per n/4 inserts, O(1) amortized.
        self.next_sweep = min(self.max_keys, len(tats) + max(1, self.max_keys // 4))
        self.next_sweep = max(self.next_sweep, len(tats) + 1)

    def sweep_credits(self, now: float) -> None:
        """Drop expired credit; past `max_keys` entries, the oldest earned go too (that
        only withdraws credit: the limiter is never more lenient than GCRA for it)."""
        credits = self.credits
        for key in [k for k, (_, expires) in credits.items() if expires <= now]:
            del credits[key]
        if len(credits) >= self.max_keys:
            for key in list(credits)[: len(credits) - (self.max_keys * 3) // 4]:
                del credits[key]

    def earn(self, key: str, spec: LimitSpec, now: float) -> None:
        """Credit the key with one refunded request of `spec` (`decide.gcra.earn_credit`)."""
        credits = self.credits
        held = credits.get(key)
        credit, expires = held if held is not None else (0.0, 0.0)
        units = spec.cost * spec.interval_s
        got = earn_credit(
            credit, expires, units, now, spec.interval_s, spec.tolerance_s, spec.credit_s
        )
        if got != (credit, expires):
            if held is None and len(credits) >= self.max_keys:
                self.sweep_credits(now)
            credits.pop(key, None)  # re-inserted last: the sweep drops the oldest first
            credits[key] = got


def _breaker_idle(state: BreakerState, now: float) -> bool:
    return (
        state.state == CLOSED
        and not state.probes
        and state.consecutive == 0
        and state.totals(now) == (0, 0, 0)
    )


def _budget_idle(window: BudgetWindow, now: float) -> bool:
    return window.totals(now) == (0, 0)


def _breaker_worth(key: str, state: BreakerState, now: float) -> int:
    """What losing an active breaker costs, for the order in which `_sweep` drops them
    (lowest first). Oldest-inserted alone dropped the route breakers first (made at the
    first requests): a flood of new upstream hosts (URLs clients supply) closed an open
    route breaker. Kept longest: a breaker that is not closed (dropped, it admits
    everything to a failing target at once), then route breakers (every request on the
    route passes one, as the shared buckets `GcraTable.make_room` keeps), then any with
    failures, slow calls or a failure streak to lose."""
    worth = 4 if state.state != CLOSED else 0
    if key.startswith("route:"):
        worth += 2
    if state.consecutive or state.probes:
        return worth + 1
    # (the window as the idle check just rotated it, at the same `now`)
    totals = state._totals
    return worth + 1 if totals[1] or totals[2] else worth


class OutboundCells:
    """An upstream's breaker and retry-budget cells on one `LocalState`, held by its plan
    (`outbound.upstream.Upstream.cells`): the store's own `BreakerState` and
    `BudgetWindow` for these keys and configs, fetched once, so a first attempt's gate
    and record (`LocalState.outbound_begin_cells`, `record_cells`) build no key and look
    none up. The same model as `outbound_begin_now` / `record_now`: the store fetches
    the cells as those do, and fetches them again when a cell may no longer be the
    table's (`LocalState._cells_dropped` moved: one was dropped or replaced since).
    The fields after `home` are the store's to read and write, under its lock; `home`
    is the caller's, set before the handle is shared (the operations it was made for)."""

    __slots__ = (
        "breaker",
        "breaker_key",
        "budget_key",
        "cfg",
        "dropped",
        "home",
        "state",
        "window",
    )

    def __init__(
        self,
        breaker_key: str,
        breaker: BreakerParams | None,
        budget_key: str,
        cfg: BudgetParams | None,
    ) -> None:
        self.breaker_key = breaker_key
        self.breaker = breaker
        self.budget_key = budget_key
        self.cfg = cfg
        self.home: object = None
        # `LocalState._cells_dropped` when the cells were fetched (-1: never)
        self.dropped = -1
        self.state: BreakerState | None = None
        self.window: BudgetWindow | None = None


@mypyc_attr(allow_interpreted_subclasses=True)  # MemoryStore, test stores
class LocalState:
    """Breakers, limits and budgets of this process. Thread-safe (sync routes run in a
    thread pool); every method is synchronous and does no I/O.

    Why the inbound path keeps its lock, though it runs on the event loop where the
    GIL would make each single dict operation atomic: its updates are not single
    operations (a GCRA read-modify-write, a breaker's bucket rotation and counts),
    and other threads really do share this state. The sync transport records host
    breakers from worker threads into the same `breakers` table, and making room in
    it (`_sweep`) ages every breaker, route breakers too (`totals` rotates their
    buckets); a Redis store's fallback runs here from those threads as well. Without
    the lock a rotation could interleave with a route's `record` and leave its
    totals out of step with its buckets for good. Uncontended, the lock costs two C
    calls (acquire/release, ~0.1 µs) per store call: kept, for an exact model.
    """

    def __init__(
        self,
        *,
        max_keys: int = 100_000,
        rng: RandomSource | None = None,
        max_breakers: int = 10_000,
    ) -> None:
        self.limits = GcraTable(max_keys)
        self.breakers: dict[str, BreakerState] = {}
        # Outbound retry budgets, one per upstream host.
        self.budgets: dict[str, BudgetWindow] = {}
        self.max_breakers = max_breakers
        self.breakers_evicted_active = 0
        self.budgets_evicted_active = 0
        # Breaker and budget cells dropped or replaced so far (swept, forgotten, a new
        # config): an `OutboundCells` fetched at another count may hold one no longer
        # in its table, and is fetched again. Only this class's methods count them: an
        # entry written into `breakers` or `budgets` from outside (a test) is not seen
        # by a cell held already; `forget_breakers` first (docs/outbound.md).
        self._cells_dropped = 0
        self._rng: RandomSource = rng or random.Random().random
        self._lock = threading.Lock()
        # Its methods, bound once: compiled, a call of each is then a plain C call
        # (no method lookup by name on every request).
        self._acquire: Callable[[], bool] = self._lock.acquire
        self._release: Callable[[], None] = self._lock.release

    def breaker_state(
        self, key: str, config: BreakerParams, now: float | None = None
    ) -> BreakerState:
        state = self.breakers.get(key)
        if state is None or (state.config is not config and state.config != config):
            # A different config starts a fresh breaker. An equal one (another engine or
            # transport on this store that loaded the same policy) keeps it: compared by
            # identity alone, two such callers reset each other's counts on every call.
            if state is None and now is not None and len(self.breakers) >= self.max_breakers:
                self.breakers_evicted_active += self._sweep(
                    self.breakers, _breaker_idle, now, _breaker_worth
                )
            if state is not None:
                self._cells_dropped += 1
            state = self.breakers[key] = BreakerState(config)
        return state

    def _sweep(
        self,
        table: dict[str, _T],
        idle: Callable[[_T, float], bool],
        now: float,
        worth: Callable[[str, _T, float], int] | None = None,
    ) -> int:
        """Make room in a breaker or budget table: idle entries first, then the least
        `worth` losing (`_breaker_worth`), the oldest first among equals.

        Leaves at most 3/4 of `max_breakers` (the O(n) scan, and a sort when active
        entries must go, is paid once per n/4 new hosts). Returns how many non-idle
        entries had to go.
        """
        self._cells_dropped += 1
        for key in [k for k, v in table.items() if idle(v, now)]:
            del table[key]
        overflow = len(table) - (self.max_breakers * 3) // 4
        if overflow <= 0:
            return 0
        if worth is None:
            doomed = list(table)[:overflow]
        else:
            # (a few small ranks: one pass into a list per rank, each in table order,
            # the oldest first, rather than a sort)
            ranks: dict[int, list[str]] = {}
            for k, v in table.items():
                rank = worth(k, v, now)
                held = ranks.get(rank)
                if held is None:
                    ranks[rank] = [k]
                else:
                    held.append(k)
            doomed = []
            for rank in sorted(ranks):
                doomed.extend(ranks[rank][: overflow - len(doomed)])
                if len(doomed) >= overflow:
                    break
        for key in doomed:
            del table[key]
        return overflow

    def peek_now(
        self, limit_keys: Sequence[str], limits: Sequence[LimitSpec], now: float
    ) -> InboundResult:
        """Would a request with these limits be admitted now (`StateStore.peek`)? Each
        limit's verdict as `admit_now` would decide it, from retry credit too; nothing is
        charged, spent or created. `admitted`: every limit that is not shadow allows."""
        with self._lock:
            table = self.limits
            verdicts = []
            for key, spec in zip(limit_keys, limits, strict=True):
                credit, expires = table.credits.get(key, (0.0, 0.0))
                verdicts.append(
                    peek(
                        table.tats.get(key, now),
                        now,
                        spec.interval_s,
                        spec.tolerance_s,
                        spec.cost,
                        credit,
                        expires,
                        table.refunded.get(key, 0.0),
                        table.written.get(key, 0.0),
                    )
                )
        admitted = all(v.allowed or s.shadow for v, s in zip(verdicts, limits, strict=True))
        return InboundResult(None, tuple(verdicts), admitted, "memory", 0.0)

    def admit_now(
        self,
        breaker_key: str | None,
        breaker: BreakerParams | None,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
    ) -> InboundResult:
        """Decide the route breaker and every limit of one request (see `StateStore.admit`)."""
        # Cheaper than `with` on the per-request path. Called from locals: interpreted,
        # calling a callable kept in an instance attribute is never specialized (about
        # 115 instructions more per call); compiled, the same plain calls as before.
        acquire, release = self._acquire, self._release
        acquire()
        try:
            gate: Gate | None = None
            state: BreakerState | None = None
            if breaker_key is not None and breaker is not None:
                state = self.breakers.get(breaker_key)
                if state is None or state.config is not breaker:
                    state = self.breaker_state(breaker_key, breaker, now)
                # closed: the gate `gate()` would return, without the call
                gate = state.closed_gate if state.state == CLOSED else state.gate(now, self._rng)
                if gate.verdict == "reject":
                    return InboundResult(gate, (), False, "memory", 0.0)
            if not limits:  # (a route with a breaker alone: new_result, inline)
                if _INTERPRETED:
                    result: InboundResult = _object_new(InboundResult)
                    result.gate = gate
                    result.limits = ()
                    result.admitted = True
                    result.source = "memory"
                    result.age_s = 0.0
                    result.fleet = None
                    result.why = None
                    return result
                return InboundResult(gate, (), True, "memory", 0.0)
            table = self.limits
            tats = table.tats
            n = len(limits)
            if len(tats) + n > table.next_sweep:
                table.make_room(now, n)
            if n == 1:  # the common case, without the loops
                spec = limits[0]
                key = limit_keys[0]
                tat = tats.get(key)
                verdict = gcra(
                    now if tat is None else tat, now, spec.interval_s, spec.tolerance_s, spec.cost
                )
                if verdict.allowed:
                    if tat is None:
                        table.intervals[key] = spec.interval_s
                    tats[key] = verdict.tat
                    if table.written or verdict.reset_s > CLOCK_STEP_S:
                        table.wrote(key, verdict.reset_s)
                    if table.refunded:
                        verdict = _marked(table.refunded, key, verdict)
                    if _INTERPRETED:  # new_result, inline: the common answer, one frame less
                        result = _object_new(InboundResult)
                        result.gate = gate
                        result.limits = (verdict,)
                        result.admitted = True
                        result.source = "memory"
                        result.age_s = 0.0
                        result.fleet = None
                        result.why = None
                        return result
                    return InboundResult(gate, (verdict,), True, "memory", 0.0)
                if tat is not None and verdict.tat != tat:
                    # read as stored before the clock went back (`decide.gcra.gcra`)
                    verdict = table.unstepped(key, tat, now, spec, verdict)
                if table.credits:
                    credited = _from_credit(table, key, spec, verdict, now)
                    if credited is not None:
                        _keep_credit(table.credits, key, credited[1], credited[2])
                        return InboundResult(gate, (credited[0],), True, "memory", 0.0)
                verdicts: tuple[LimitVerdict, ...] = (verdict,)
                admitted = spec.shadow
            else:
                verdicts = tuple(
                    gcra(tats.get(key, now), now, spec.interval_s, spec.tolerance_s, spec.cost)
                    for key, spec in zip(limit_keys, limits, strict=True)
                )
                stepped: list[LimitVerdict] | None = None
                for j, (key, v) in enumerate(zip(limit_keys, verdicts, strict=True)):
                    if not v.allowed and tats.get(key, v.tat) != v.tat:
                        # read as stored before the clock went back (`decide.gcra.gcra`)
                        if stepped is None:
                            stepped = list(verdicts)
                        stepped[j] = table.unstepped(key, tats[key], now, limits[j], v)
                if stepped is not None:
                    verdicts = tuple(stepped)
                spends: dict[int, tuple[LimitVerdict, float, float]] | None = None
                if table.credits:  # (no dict per request while no key has credit)
                    spends = {}
                    for j, (key, spec, v) in enumerate(
                        zip(limit_keys, limits, verdicts, strict=True)
                    ):
                        credited = None if v.allowed else _from_credit(table, key, spec, v, now)
                        if credited is not None:
                            spends[j] = credited
                    if spends:
                        verdicts = tuple(
                            spends[j][0] if j in spends else v for j, v in enumerate(verdicts)
                        )
                    else:
                        spends = None
                admitted = all(
                    v.allowed or spec.shadow for v, spec in zip(verdicts, limits, strict=True)
                )
                if not admitted:
                    # Nothing is charged: a limit that would have admitted reports its
                    # bucket as it is (its RateLimit field), not as if this request took
                    # its units (the tiered store's slices report the same).
                    verdicts = tuple(
                        gcra(tats.get(key, now), now, spec.interval_s, spec.tolerance_s, 0)
                        if v.allowed and not v.credit
                        else v
                        for key, spec, v in zip(limit_keys, limits, verdicts, strict=True)
                    )
                if admitted:
                    intervals = table.intervals
                    for key, spec, verdict in zip(limit_keys, limits, verdicts, strict=True):
                        if verdict.allowed and not verdict.credit:
                            if key not in tats:
                                intervals[key] = spec.interval_s
                            tats[key] = verdict.tat
                            if table.written or verdict.reset_s > CLOCK_STEP_S:
                                table.wrote(key, verdict.reset_s)
                    if spends is not None:
                        for j, (_, left, expires) in spends.items():
                            _keep_credit(table.credits, limit_keys[j], left, expires)
                    if table.refunded:
                        refunded = table.refunded
                        verdicts = tuple(
                            _marked(refunded, key, v) if v.allowed and not v.credit else v
                            for key, v in zip(limit_keys, verdicts, strict=True)
                        )
            if not admitted and state is not None and gate is not None and gate.probe_id:
                state.record(gate.epoch, gate.probe_id, IGNORED, now, self._rng)
            return new_result(gate, verdicts, admitted, "memory", 0.0)
        finally:
            release()

    def refund_now(
        self,
        limit_keys: Sequence[str],
        limits: Sequence[LimitSpec],
        now: float,
        admitted_tats: Sequence[float] | None = None,
    ) -> None:
        """Give back the units `admit_now` charged (see `StateStore.refund`), and credit
        their cost to limits with retry credit (`credit_s`, `decide.gcra.earn_credit`)."""
        with self._lock:
            table = self.limits
            tats = table.tats
            refunded = table.refunded
            for j, (key, spec) in enumerate(zip(limit_keys, limits, strict=True)):
                tat = tats.get(key)
                admitted = admitted_tats[j] if admitted_tats is not None else None
                # (no key: a full bucket whose markers are all past, as refund.lua reads it)
                spent = refunded.get(key, 0.0) if tat is not None else 0.0
                give = refund_seconds(admitted, now, spec.interval_s, spec.cost, spent)
                # Nothing given back leaves the key as it was, as refund.lua does: judged
                # again here, a bucket within the float slack of full was forgotten by
                # this store and kept by Redis (test_differential.py, the edge values example).
                if tat is not None and give > 0.0:
                    back = tat - give
                    spent += give
                    if back + spent - now > slack_s(now, spec.interval_s, spec.tolerance_s):
                        # kept until its virtual TAT is past, even with a full bucket
                        tats[key] = back
                        if spent > 0.0:
                            refunded[key] = spent
                    else:  # every marker issued is past: the same as no key
                        del tats[key]
                        refunded.pop(key, None)
                        table.written.pop(key, None)
                if spec.credit_s > 0.0:
                    table.earn(key, spec, now)

    def record_now(
        self,
        breaker_key: str,
        breaker: BreakerParams,
        gate: Gate,
        outcome: str,
        slow: bool,
        now: float,
    ) -> str:
        acquire, release = self._acquire, self._release  # (as in admit_now)
        acquire()
        try:
            state = self.breakers.get(breaker_key)
            if state is None or state.config is not breaker:
                state = self.breaker_state(breaker_key, breaker, now)
            # `BreakerState.record`'s first answer, without its call (most outcomes: a
            # success under the closed gate of this epoch, in the current bucket, with no
            # failure or slow call in the window). The gate by identity: `closed_gate` is
            # built once per closed epoch and carries no probe.
            end = state._bucket_end
            totals = state._totals
            if (
                gate is state.closed_gate
                and outcome == SUCCESS
                and not slow
                and state.state == CLOSED
                and now < end
                and end - now <= 2.0 * state._bucket_s
                and not (totals[1] or totals[2])
            ):
                state.buckets[-1][0] += 1
                totals[0] += 1
                state.erased = state.consecutive
                state.consecutive = 0
                return CLOSED
            return state.record(gate.epoch, gate.probe_id, outcome, now, self._rng, slow)
        finally:
            release()

    def forget_breakers(self, breaker_keys: Sequence[str]) -> int:
        """Drop these breakers (instances a service's resolver no longer names: see
        `outbound.transport._forget_breakers`). Returns how many there were."""
        with self._lock:
            breakers = self.breakers
            self._cells_dropped += 1
            return sum(1 for key in breaker_keys if breakers.pop(key, None) is not None)

    def gate_now(self, breaker_key: str, breaker: BreakerParams, now: float) -> Gate:
        with self._lock:
            return self.breaker_state(breaker_key, breaker, now).gate(now, self._rng)

    # ------------------------------------------------------------ retry budget

    def budget_window(self, key: str, cfg: BudgetParams, now: float | None = None) -> BudgetWindow:
        window = self.budgets.get(key)
        if window is None or (window.config is not cfg and window.config != cfg):
            # A different config starts a fresh window; an equal one keeps it (as above).
            if window is None and now is not None and len(self.budgets) >= self.max_breakers:
                self.budgets_evicted_active += self._sweep(self.budgets, _budget_idle, now)
            if window is not None:
                self._cells_dropped += 1
            window = self.budgets[key] = BudgetWindow(cfg)
        return window

    def budget_request_now(self, budget_key: str, cfg: BudgetParams, now: float) -> None:
        """Count one top-level outbound request (see `StateStore.budget_request`)."""
        with self._lock:
            self.budget_window(budget_key, cfg, now).request(now)

    def budget_try_retry_now(
        self, budget_key: str, cfg: BudgetParams, now: float
    ) -> tuple[bool, str, float]:
        """Spend one retry if the budget allows it (see `StateStore.budget_try_retry`)."""
        with self._lock:
            return self.budget_window(budget_key, cfg, now).try_retry(now), "memory", 0.0

    def outbound_gate_now(
        self,
        breaker_key: str | None,
        breaker: BreakerParams | None,
        budget_key: str | None,
        cfg: BudgetParams | None,
        retry: bool,
        now: float,
    ) -> tuple[Gate | None, bool]:
        """`StateStore.outbound_gate` in one step (as outbound.lua does it): a first
        attempt counts a request; a retry the budget denies takes no gate; a breaker
        rejection spends no retry. Returns (gate or None, budget allowed)."""
        with self._lock:
            window = None
            allowed = True
            if budget_key is not None and cfg is not None:
                window = self.budget_window(budget_key, cfg, now)
                if retry:
                    allowed = window.allows(now)
                else:
                    window.request(now)
            gate = None
            if allowed and breaker_key is not None and breaker is not None:
                state = self.breakers.get(breaker_key)
                if state is None or state.config is not breaker:
                    state = self.breaker_state(breaker_key, breaker, now)
                gate = state.gate(now, self._rng)
            refused = gate is not None and gate.verdict == "reject"
            if retry and allowed and window is not None and not refused:
                window.spend(now)
            return gate, allowed

    def budget_refund_now(
        self,
        budget_key: str,
        cfg: BudgetParams,
        age_s: float,
        now: float,
        spent_at: float | None = None,
    ) -> bool:
        """Give back one retry spent `age_s` ago whose attempt was not sent (see
        `StateStore.budget_refund`). True if one was given back."""
        with self._lock:
            window = self.budgets.get(budget_key)
            if window is None or (window.config is not cfg and window.config != cfg):
                # A fresh window (a new config) never counted it. An equal config is the
                # same window (`budget_window`: another transport on this store that
                # loaded the same policy spent the retry there), so it comes back.
                return False
            return window.refund(now, age_s, spent_at)

    def outbound_begin_now(
        self,
        breaker_key: str,
        breaker: BreakerParams | None,
        budget_key: str,
        cfg: BudgetParams,
        now: float,
    ) -> Gate | None:
        """`budget_request` and, with a breaker, `gate_now` under one lock: the
        transports' first attempt on memory state. None when there is no breaker."""
        lock = self._lock
        lock.acquire()  # cheaper than `with` on this path; nothing below awaits
        try:
            window = self.budgets.get(budget_key)
            if window is None or window.config is not cfg:
                window = self.budget_window(budget_key, cfg, now)
            # `window.request(now)`, without its call: a bucket end far ahead was set
            # before the clock went back, and rotates too (as there and in outbound.lua)
            end = window._bucket_end
            if now >= end or end - now > 2.0 * window._bucket_s:
                window._rotate(now)
            window.requests[window._index] += 1
            if breaker is None:
                return None
            state = self.breakers.get(breaker_key)
            if state is None or state.config is not breaker:
                state = self.breaker_state(breaker_key, breaker, now)
            if state.state == CLOSED:  # `gate`'s own first answer, without its call
                return state.closed_gate
            return state.gate(now, self._rng)
        finally:
            lock.release()

    # ------------------------------------------------- an upstream plan's own cells

    def outbound_cells(
        self,
        breaker_key: str,
        breaker: BreakerParams | None,
        budget_key: str,
        cfg: BudgetParams,
    ) -> OutboundCells:
        """A handle on this upstream's breaker and budget cells (`OutboundCells`), for
        `outbound_begin_cells` and `record_cells`; fetched at its first use."""
        return OutboundCells(breaker_key, breaker, budget_key, cfg)

    def _fetch_cells(self, cells: OutboundCells, now: float) -> None:
        """The cells as `outbound_begin_now` finds them (made if missing, a new config's
        fresh), under the lock."""
        cfg = cells.cfg
        assert cfg is not None
        window = self.budgets.get(cells.budget_key)
        if window is None or window.config is not cfg:
            window = self.budget_window(cells.budget_key, cfg, now)
        state: BreakerState | None = None
        breaker = cells.breaker
        if breaker is not None:
            state = self.breakers.get(cells.breaker_key)
            if state is None or state.config is not breaker:
                state = self.breaker_state(cells.breaker_key, breaker, now)
        cells.window = window
        cells.state = state
        # (read after the fetches: making room for a new cell drops others)
        cells.dropped = self._cells_dropped

    def outbound_begin_cells(self, cells: OutboundCells, now: float) -> Gate | None:
        """`outbound_begin_now` on the cells the handle holds: the same count and gate,
        without a key looked up (they are fetched again once one may have been dropped)."""
        acquire, release = self._acquire, self._release  # (as in admit_now)
        acquire()
        try:
            if cells.dropped != self._cells_dropped:
                self._fetch_cells(cells, now)
            window = cells.window
            assert window is not None
            # `window.request(now)`, without its call (as in outbound_begin_now)
            end = window._bucket_end
            if now >= end or end - now > 2.0 * window._bucket_s:
                window._rotate(now)
            window.requests[window._index] += 1
            state = cells.state
            if state is None:
                return None
            if state.state == CLOSED:  # `gate`'s own first answer, without its call
                return state.closed_gate
            return state.gate(now, self._rng)
        finally:
            release()

    def record_cells(
        self, cells: OutboundCells, gate: Gate, outcome: str, slow: bool, now: float
    ) -> str:
        """`record_now` on the breaker cell the handle holds (looked up by its key, as
        there, once a cell may have been dropped since the handle's fetch)."""
        acquire, release = self._acquire, self._release  # (as in admit_now)
        acquire()
        try:
            state = cells.state
            if state is None or cells.dropped != self._cells_dropped:
                # (the budget cell is left to the next begin, which fetches both; the
                # config read only here, where it is needed)
                breaker = cells.breaker
                assert breaker is not None
                state = self.breakers.get(cells.breaker_key)
                if state is None or state.config is not breaker:
                    state = self.breaker_state(cells.breaker_key, breaker, now)
            # `record_now`'s first answer, without `BreakerState.record`'s call (see there)
            end = state._bucket_end
            totals = state._totals
            if (
                gate is state.closed_gate
                and outcome == SUCCESS
                and not slow
                and state.state == CLOSED
                and now < end
                and end - now <= 2.0 * state._bucket_s
                and not (totals[1] or totals[2])
            ):
                state.buckets[-1][0] += 1
                totals[0] += 1
                state.erased = state.consecutive
                state.consecutive = 0
                return CLOSED
            return state.record(gate.epoch, gate.probe_id, outcome, now, self._rng, slow)
        finally:
            release()
