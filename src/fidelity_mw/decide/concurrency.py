"""Concurrency limits (bulkheads), fixed or adaptive, with priority classes. Pure: no I/O, no clock.

A fixed limit admits at most `limit` requests in flight. The adaptive limit
finds that number from the latencies it sees, in the manner of a gradient
limiter (Netflix concurrency-limits' Gradient2, Envoy's adaptive concurrency
filter): while latency stays within `tolerance` of its baseline (the lowest
latency seen lately) the limit grows by about sqrt(limit) per sample; when
latency rises above that, the limit shrinks in proportion. Unlike Gradient2,
the sqrt(limit) headroom is added only while latency is within tolerance:
added always, it props the limit up at 4 however slow requests get (at the
gradient's floor of 0.5, 4 * 0.5 + sqrt(4) == 4), and a CPU-bound route on
one event loop is saturated by 1 or 2. The baseline is measured, and replaced
early when the route durably got slower rather than loaded (GradientEstimate).

Priorities: a class may fill only its share of the limit, so under pressure
`sheddable` requests are shed first, then `default`, and `critical` ones may
use the whole limit. Waiters (an optional short queue) are woken highest
priority first, then in arrival order.

Pacing (adaptive only): while the event loop is the bottleneck (its lag, as
reported to `release`, lately reached a quarter of the route's latency floor), a
route with a request in flight admits at most one more per pacing turn: at
least one turn of the loop (the caller says when a turn ends: `new_turn`) and
`PACE_S` since the last admission (by the `now` the caller passes). On one
event loop, requests let in together do not run together:
they wait out their awaits side by side and then queue for the CPU one behind
the other, so the last of a batch pays for the whole batch, and the core idles
through the await they all began at once. Staggered, each one's await overlaps
another's CPU work. Why `PACE_S` and not just a loop turn: uvloop's timers
have millisecond resolution, so requests let in within the same millisecond
whose awaits are alike wake in the same turn and run back to back, with no
chance for the loop to read the requests waiting meanwhile. (The time is
checked here, not left to a timer: uvloop's clock is read once per loop turn,
so a 1 ms timer set just after a long CPU step is already due.) Critical
requests are never paced: pacing trades a little goodput for latency, and must
neither shed the class allowed the whole limit nor let a lower class take its
turn.

Stale shedding (adaptive, opt-in `shed_stale`): while pacing, the caller may
pass a bound on how long each request waited before it could be seen at all
(`waited_s`: on one event loop, requests that arrive during another's CPU step
are read only after it, in an order ASGI does not give). A request that would
queue behind one in flight and already waited more than the latency the route
tolerates above its floor ((tolerance - 1) x floor) is shed as `stale`: at
overload fresh requests are plentiful, and only those read while the loop was
waiting for I/O can join in-flight work and still finish near the floor. A
fresh one may join without waiting out PACE_S (it was read alone, not in a
batch), still one per turn. With nothing in flight a request runs at once, so
it may have waited the whole tolerance x floor; past that it is shed only while
the route admitted one lately, so other work hogging the loop cannot starve
the route. Since this rule, not the limit, then holds requests back, the limit
grows only after it refused one (one the stale rule would not have shed: a
stale request refused at the limit is no evidence the limit is too low).
Critical requests are never shed as stale.
This trades goodput for latency: the core idles through the await of a
request let in alone whenever no fresh one arrives meanwhile
(docs/inbound.md has the measured trade).

Newest of the turn (adaptive, `newest_first`: the policy's default for an
adaptive limit without `shed_stale`, policy/model.py): the caller holds a
turn's non-critical arrivals and hands them over together (`admit_turn`, in
arrival order) once the loop has run what was ready. Of
them the newest of the best class that has room is admitted, while pacing at
most one per turn (the others are refused: `older_in_turn`, or `paced` for a
lower class than the one admitted); while the loop keeps up, as many as have
room, newest first (the rest: `at_limit` / `priority_share`).
Why the newest: on one event loop a request read after another's CPU step
may have arrived at any time during it, in an order ASGI does not give; the
loop reads its sockets in the order data arrived, and the server starts the
requests in that order, so the last of a turn is the one that waited least.
The caller's half (inbound/bulkhead.py) also lets the admitted request start
its await before anybody's next CPU step; that is what keeps the core busy.
Held always, not only while pacing: the caller's deferral lets the loop run
between a request's await and its CPU step, which is where the lag probe
measures, so a route held only while pacing stopped holding by its own doing
(and the newest was not taken exactly when it mattered).

The busy floor (`newest_first` only): the caller reports how long each
admitted request ran on the event loop (`busy_sample`: its app's steps, the
awaits not counted). On one loop the latency gradient cannot find a
CPU-bound route's limit: two in flight take about 1.6x the floor latency
(one's await overlaps the other's CPU step, then its own runs), past the
default tolerance, so the gradient pulls the limit to 1, where the core idles
through every await. With r = floor latency / time on the loop, n requests
staggered keep the loop busy for min(1, n / r) of the time; the limit never
goes below the fewest that keep it `BUSY_SHARE` busy, ceil(BUSY_SHARE x r),
capped at `measure_limit` (a route that mostly awaits is the gradient's to
size: its floor would be large, and the gradient sees its latency stay flat).
More than that only queues on the loop.

The caller measures latency with its injected clock and reports it to
`release`; nothing here reads time.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

CRITICAL: Final = "critical"
DEFAULT: Final = "default"
SHEDDABLE: Final = "sheddable"
PRIORITIES: Final = (CRITICAL, DEFAULT, SHEDDABLE)

# Why a request was admitted or not (Decision reasons).
UNDER_LIMIT: Final = "under_limit"
AT_LIMIT: Final = "at_limit"
PRIORITY_SHARE: Final = "priority_share"
QUEUED: Final = "queued"
PACED: Final = "paced"
STALE: Final = "stale"
NEWEST_IN_TURN: Final = "newest_in_turn"  # admitted: the newest of its turn's arrivals
OLDER_IN_TURN: Final = "older_in_turn"  # refused: a newer arrival of its turn was admitted

PACE_S: Final = 0.001  # the shortest pacing turn (see the module doc)
STALE_RESOLUTION_S: Final = 0.002  # two ticks of the inbound loop clock's heartbeat
# Per report, the recent lag peak keeps this much of itself: a lagging stretch
# paces for some hundred requests after it (lag comes and goes while the loop
# is busy: a probe that lands between two CPU bursts sees none).
LAG_FADE: Final = 0.99
# The fewest slow samples in a row that replace a stale floor early (GradientEstimate).
DOUBT_SAMPLES: Final = 10
# The busy floor keeps at least this share of the event loop busy (module doc).
BUSY_SHARE: Final = 0.9


@dataclass(frozen=True, slots=True)
class ConcurrencySpec:
    """One route's concurrency limit as the decision code sees it."""

    limit: int  # the fixed limit, or the adaptive limit's starting point
    adaptive: bool = False
    min_limit: int = 1
    max_limit: int = 1000
    # The share of the limit each class may fill; critical always 1.0.
    default_share: float = 0.9
    sheddable_share: float = 0.5
    max_queue: int = 0  # waiters allowed beyond the limit (0: no queue)
    # Adaptive only:
    smoothing: float = 0.2  # weight of a new estimate in the limit
    tolerance: float = 1.5  # latency / baseline accepted before the limit shrinks
    remeasure_every: int = 2000  # samples between baseline re-measurements (0: never)
    measure_limit: int = 4  # the limit while the baseline is measured
    measure_samples: int = 20  # requests that finish at that limit make the baseline (0: none)
    shed_stale: bool = False  # shed requests that waited too long to be seen (module doc)
    newest_first: bool = False  # while pacing, admit the newest of a turn's arrivals

    def share(self, priority: str) -> float:
        if priority == SHEDDABLE:
            return self.sheddable_share
        if priority == DEFAULT:
            return self.default_share
        return 1.0


class Admission(NamedTuple):
    admitted: bool
    reason: str  # UNDER_LIMIT | AT_LIMIT | PRIORITY_SHARE | PACED
    in_flight: int  # after this decision
    limit: int  # the limit this decision was taken against


class GradientEstimate:
    """The adaptive limit: a float that moves with every latency sample.

    The baseline is the lowest latency seen since the last measurement. It is
    measured first thing, and again every `remeasure_every` samples: the limit
    drops to `measure_limit` until `measure_samples` requests have finished
    with no more than that many in flight; their lowest latency becomes the
    baseline (up or down) and the limit returns. Without the first
    measurement a service started under overload would take its first,
    queued, latencies for the floor and never shrink; without the later ones a
    baseline taken on a quieter day would hold the limit down forever.

    A route that durably got slower (a deploy, a slower dependency) does not
    wait for the next measurement: every sample is past tolerance, the limit
    shrinks until no more than `measure_limit` are in flight, and then
    `measure_samples` (at least DOUBT_SAMPLES) samples in a row past tolerance,
    each with no more than that many in flight, are the measurement: their
    lowest latency becomes the floor, and the limit goes back to where it was
    before latency left tolerance. What tells this from overload: at that few
    in flight there is no queue of ours, and the event loop keeps up (its
    recent lag, as the limiter reports it, stays under a quarter of the floor,
    the measure pacing uses, and explains under a quarter of the excess).
    Latency that grows with what is in flight comes back within tolerance as
    the limit shrinks, which starts the count again, and a lagging loop (the
    CPU-bound overload the pacing serves) stops it. A latency spread so wide
    that the floor is one fast outlier can look like a step: each early
    replacement wants twice the samples of the one before, until the next
    measurement, so between two measurements there are at most
    log2(remeasure_every / measure_samples) of them.
    """

    __slots__ = (
        "_doubt",
        "_doubt_min",
        "_doubt_needed",
        "_measured",
        "_measuring",
        "_resume",
        "_settled",
        "_since",
        "baseline_s",
        "spec",
        "value",
    )

    def __init__(self, spec: ConcurrencySpec) -> None:
        self.spec = spec
        self.value = float(spec.limit)
        self.baseline_s = 0.0  # 0: not measured yet
        self._since = 0
        # Envoy's filter does the same: the floor is measured before the limit is trusted.
        self._measuring = spec.measure_samples > 0
        self._measured: list[float] = []
        self._resume = self.value
        # Slow samples in a row that doubt the floor (`_doubt_floor`), their lowest
        # latency, and the limit before they began to shrink it.
        self._doubt = 0
        self._doubt_min = math.inf
        self._settled = self.value
        self._doubt_needed = max(spec.measure_samples, DOUBT_SAMPLES)

    @property
    def measuring(self) -> bool:
        return self._measuring

    def _probe_limit(self) -> float:
        spec = self.spec
        return float(min(max(spec.measure_limit, spec.min_limit), self._resume))

    def _probe_slots(self) -> int:
        # What the limiter admits while measuring: the probe limit rounded as the limit
        # is. Compared with the float, a limit resumed at 3.6 admitted 4, and a route
        # kept full never finished a sample at 3.6 or fewer: the measurement never ended.
        return max(self.spec.min_limit, int(self._probe_limit() + 0.5))

    def current(self) -> float:
        if self._measuring:
            return self._probe_limit()
        return self.value

    def sample(
        self,
        latency_s: float,
        in_flight: int,
        dropped: bool = False,
        binding: bool = True,
        lag_s: float = 0.0,
        others_busy_s: float = 0.0,
    ) -> float:
        """Fold one finished request in (`in_flight` counts it); returns the limit to use.

        `dropped`: it failed from overload (its deadline passed), after `latency_s` (0:
        not known). One cut sooner than the route's tolerated latency (`tolerance` x its
        floor) is no evidence: the caller asked for less time than the route needs when
        it keeps up (any client may send a 1 ms deadline), and it is not a sample.
        `lag_s`: the event loop's recent lag (the limiter's fading peak); while it is
        large, slow samples are the loop's, never evidence of a stale floor.
        `others_busy_s`: the time the route's other requests in flight take on the
        same event loop (the busy floor's measure; 0: not known): an excess they
        explain is load too."""
        spec = self.spec
        if dropped and latency_s > 0.0:
            floor = self.baseline_s
            if floor <= 0.0 and self._measured:
                floor = min(self._measured)
            if latency_s <= spec.tolerance * floor:
                return self.current()
        if self._measuring:
            if dropped:
                # An overload failure (timeout, shed downstream) is the clearest signal
                # there is, also while measuring: the limit returns lower.
                self._resume = max(float(spec.min_limit), self._resume * 0.9)
            elif latency_s > 0.0 and in_flight <= self._probe_slots():
                self._measured.append(latency_s)
                if len(self._measured) >= spec.measure_samples:
                    self.baseline_s = min(self._measured)
                    self._measuring = False
                    self.value = self._resume
                    self._since = 0
                    self._trust_floor()
                    self._doubt_needed = max(spec.measure_samples, DOUBT_SAMPLES)
            return self.current()
        if dropped:
            self.value = max(float(spec.min_limit), self.value * 0.9)
            return self.value
        if latency_s <= 0.0:
            return self.value
        self._since += 1
        if self.baseline_s == 0.0 or latency_s < self.baseline_s:
            self.baseline_s = latency_s
        gradient = max(0.5, min(1.0, spec.tolerance * self.baseline_s / latency_s))
        stale = False
        if gradient < 1.0:
            # Latency is past tolerance: shrink, with no headroom (see the module doc).
            target = self.value * gradient
            stale = self._doubt_floor(latency_s, in_flight, lag_s, others_busy_s)
        elif in_flight >= self.value / 2.0 and binding:
            target = self.value + math.sqrt(self.value)
        else:
            # An idle server says nothing about its capacity: grow only while the
            # limit is actually being used.
            target = self.value
        value = (1.0 - spec.smoothing) * self.value + spec.smoothing * target
        self.value = max(float(spec.min_limit), min(float(spec.max_limit), value))
        if gradient >= 1.0:
            self._settled = self.value
            if self._doubt:  # (the common case without the stores)
                self._trust_floor()
        elif stale:
            # The floor moved, not the load: the slow samples, each taken as a measurement
            # would take it, are the new floor, and the limit the old one shrank returns.
            self.baseline_s = self._doubt_min
            self.value = max(self.value, self._settled)
            self._trust_floor()
            # Noise can look like a step (a floor that is the one fast outlier of a route
            # whose latencies spread wide): each early replacement wants twice the evidence
            # of the last, until the next measurement.
            self._doubt_needed *= 2
        if spec.remeasure_every and self._since >= spec.remeasure_every:
            self._measuring = True
            self._measured = []
            self._resume = self.value
        return self.current()

    def _doubt_floor(
        self, latency_s: float, in_flight: int, lag_s: float, others_busy_s: float = 0.0
    ) -> bool:
        """One sample past tolerance: is it evidence the floor is stale? True once
        `_doubt_needed` in a row were (see the class doc)."""
        spec = self.spec
        excess = latency_s - spec.tolerance * self.baseline_s
        # (The CPU steps of the route's other requests on this loop, which a request
        # waits out: with `newest_first` the deferral lets the lag probe run before
        # them, so the lag alone no longer shows that load.)
        if 4.0 * lag_s >= min(self.baseline_s, excess) or others_busy_s >= excess:
            # The loop lags (by the measure pacing uses) or its lag explains the excess:
            # the loop, not the route, is slow; that is load, whatever is in flight.
            self._doubt = 0
            self._doubt_min = math.inf
            return False
        if in_flight > max(spec.measure_limit, spec.min_limit):
            return False  # (queued behind our own requests: says nothing of the floor)
        self._doubt += 1
        self._doubt_min = min(self._doubt_min, latency_s)
        return self._doubt >= self._doubt_needed

    def _trust_floor(self) -> None:
        self._doubt = 0
        self._doubt_min = math.inf
        self._settled = self.value


class ConcurrencyLimiter:
    """In-flight count, the limit (fixed or adaptive) and the waiters of one route."""

    __slots__ = (
        "_admitted_at",
        "_busy_floor",
        "_busy_s",
        "_displaced",
        "_lag_peak",
        "_lock",
        "_seq",
        "_waiters",
        "admitted_in_turn",
        "binding",
        "estimate",
        "holding",
        "in_flight",
        "spec",
    )

    def __init__(self, spec: ConcurrencySpec) -> None:
        self.spec = spec
        self.in_flight = 0
        self.estimate = GradientEstimate(spec) if spec.adaptive else None
        self.admitted_in_turn = 0  # since the caller last called `new_turn`
        # The caller holds a turn's arrivals for `admit_turn` (module doc).
        self.holding = spec.newest_first and spec.adaptive
        self.binding = False  # the limit refused a request since the last sample
        self._admitted_at = -math.inf  # the `now` of the last admission
        # The event loop's recent lag: the latest report, or an earlier, larger one
        # fading by LAG_FADE per report.
        self._lag_peak = 0.0
        # `newest_first`: the smoothed time an admitted request runs on the event loop
        # (0: none reported yet), and the least limit it asks for (0: none; module doc).
        self._busy_s = 0.0
        self._busy_floor = 0
        # (priority rank, arrival seq, token) - the token is the caller's waiter handle
        self._waiters: list[tuple[int, int, object]] = []
        self._seq = itertools.count()
        # waiters that gave their place to a better class (`displace`) and have not yet
        # said they saw it (`abandon`): they hold no slot
        self._displaced: set[object] = set()
        # One route's bulkhead may serve event loops in several threads (one middleware,
        # several loops): the count and the queue change together, under this lock.
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        if self.estimate is None:
            return self.spec.limit
        # Rounded, not truncated: truncating biases the limit down by half a request on
        # average, which at the small limits of a CPU-bound route (1.9 -> 1) halves it.
        limit = max(self.spec.min_limit, int(self.estimate.current() + 0.5))
        return limit if limit >= self._busy_floor else self._busy_floor

    def _room(self, priority: str) -> int:
        limit = self.limit
        if priority == CRITICAL:
            return limit
        # Rounded up: every class keeps at least one slot, and a small limit is not
        # cut down further (limit 2 at share 0.9 is 2, not 1).
        return min(limit, math.ceil(limit * self.spec.share(priority) - 1e-9))

    @property
    def pacing(self) -> bool:
        """True while the event loop is the bottleneck: one admission per turn."""
        estimate = self.estimate
        return (
            estimate is not None
            and estimate.baseline_s > 0.0
            and 4.0 * self._lag_peak >= estimate.baseline_s
        )

    def busy_sample(self, busy_s: float) -> None:
        """An admitted request of a `newest_first` route ran `busy_s` on the event loop
        (its awaits not counted): the busy floor follows (module doc)."""
        if busy_s <= 0.0 or not self.spec.newest_first:
            return
        with self._lock:
            smoothing = self.spec.smoothing
            if self._busy_s == 0.0:
                self._busy_s = busy_s
            else:
                self._busy_s = (1.0 - smoothing) * self._busy_s + smoothing * busy_s
            estimate = self.estimate
            if estimate is None or estimate.baseline_s <= 0.0:
                return
            spec = self.spec
            ratio = estimate.baseline_s / self._busy_s
            want = math.ceil(BUSY_SHARE * ratio - 1e-9)
            self._busy_floor = min(
                max(want, spec.min_limit), max(spec.measure_limit, spec.min_limit), spec.max_limit
            )

    @property
    def busy_floor(self) -> int:
        """The least limit the busy floor asks for (0: none; module doc)."""
        return self._busy_floor

    def admit_turn(self, priorities: Sequence[str], now: float | None = None) -> list[Admission]:
        """Decide one turn's held arrivals together (`priorities` in arrival order; the
        answers in the same order): the newest of the best class that has room is
        admitted; while pacing at most one per turn (module doc), else as many as have
        room, the best class first and the newest of each first. The others take no
        slot.

        Critical requests are not held (the caller decides them at once with
        `try_acquire`), so none waits here behind a lower class."""
        count = len(priorities)
        answers: list[Admission | None] = [None] * count
        with self._lock:
            limit = self.limit
            pacing = self.pacing
            quota = 1 if pacing else count
            ranks = [PRIORITIES.index(priority) for priority in priorities]
            chosen = -1  # while pacing: the one admitted
            for rank in sorted(set(ranks)):
                priority = PRIORITIES[rank]
                for i in range(count - 1, -1, -1):  # newest first
                    if ranks[i] != rank:
                        continue
                    if (
                        not quota
                        or self.in_flight >= self._room(priority)
                        or self._waiters_ahead(priority)
                    ):
                        break
                    quota -= 1
                    chosen = i
                    self.in_flight += 1
                    self.admitted_in_turn += 1
                    if now is not None:
                        self._admitted_at = now
                    answers[i] = Admission(True, NEWEST_IN_TURN, self.in_flight, limit)
            for i, priority in enumerate(priorities):
                if answers[i] is not None:
                    continue
                if pacing and chosen >= 0:
                    reason = OLDER_IN_TURN if i < chosen else PACED
                elif self.in_flight >= self._room(priority):
                    reason = AT_LIMIT if self.in_flight >= limit else PRIORITY_SHARE
                    self.binding = True
                else:  # room, but requests of its class or better wait ahead of it
                    reason = PACED
                answers[i] = Admission(False, reason, self.in_flight, limit)
        return [answer for answer in answers if answer is not None]

    def new_turn(self) -> None:
        """The caller's event loop went round once since an admission."""
        self.admitted_in_turn = 0

    @property
    def stale_after_s(self) -> float:
        """How long a request may have waited unseen and still queue behind another:
        the latency the route tolerates above its floor (inf: not known)."""
        estimate = self.estimate
        if estimate is None or estimate.baseline_s <= 0.0:
            return math.inf
        return (self.spec.tolerance - 1.0) * estimate.baseline_s

    def _stale(self, waited_s: float, now: float | None) -> bool | None:
        """True: shed as stale; False: fresh (may join in-flight work at once); None:
        the rule does not apply (the loop keeps up)."""
        if not self.pacing:
            return None
        # A bound finer than the caller's clock can tell is no evidence: a request read
        # just now may measure a couple of ms (the loop clock's heartbeat grain).
        allowance = max(self.stale_after_s, STALE_RESOLUTION_S)
        if self.in_flight:
            return waited_s > allowance
        # Nothing in flight: it runs at once, so it may have waited the whole tolerance;
        # past that it is shed only while the route is busy with its own arrivals (it
        # admitted one lately), so other work hogging the loop cannot starve the route.
        tolerance = self.spec.tolerance
        whole = (
            max(self.stale_after_s * tolerance / (tolerance - 1.0), STALE_RESOLUTION_S)
            if tolerance > 1.0
            else math.inf
        )
        recent = now is not None and now - self._admitted_at < 2.0 * whole
        return waited_s > whole and recent

    def try_acquire(
        self, priority: str = DEFAULT, now: float | None = None, waited_s: float | None = None
    ) -> Admission:
        """Admit one request now, or say why not (it takes no slot when refused).

        `now` (the caller's clock) spaces paced admissions by PACE_S; without it,
        pacing goes by loop turns alone. `waited_s` bounds how long the request
        waited before the caller could see it (None: not known)."""
        # (acquire / release, not `with`: on every request, half the cost of the lock)
        lock = self._lock
        lock.acquire()
        try:
            limit = self.limit
            fresh = False
            if self.in_flight < self._room(priority) and not self._waiters_ahead(priority):
                if self.spec.shed_stale and waited_s is not None and priority != CRITICAL:
                    stale = self._stale(waited_s, now)
                    if stale is not None:
                        if stale:
                            return Admission(False, STALE, self.in_flight, limit)
                        fresh = True
                if (
                    self.in_flight
                    and priority != CRITICAL
                    and (
                        self.admitted_in_turn
                        or (not fresh and now is not None and now - self._admitted_at < PACE_S)
                    )
                    and self.pacing
                ):
                    return Admission(False, PACED, self.in_flight, limit)
                self.in_flight += 1
                self.admitted_in_turn += 1
                if now is not None:
                    self._admitted_at = now
                return Admission(True, UNDER_LIMIT, self.in_flight, limit)
            if self.in_flight >= self._room(priority):
                reason = AT_LIMIT if self.in_flight >= limit else PRIORITY_SHARE
                # A request the stale rule would have shed anyway says nothing of the limit:
                # it is no reason to grow it (module doc).
                if not (
                    self.spec.shed_stale
                    and waited_s is not None
                    and priority != CRITICAL
                    and self._stale(waited_s, now)
                ):
                    self.binding = True
            else:
                # Room, but requests of its class or better wait ahead of it: queued while
                # pacing (their turn first), or under a limit that grew since. Neither the
                # limit nor the class's share refused it, and the record must not say so.
                reason = PACED if self.pacing else AT_LIMIT
            return Admission(False, reason, self.in_flight, limit)
        finally:
            lock.release()

    def _waiters_ahead(self, priority: str) -> bool:
        # A newcomer does not overtake a queued request of the same or higher priority.
        return bool(self._waiters) and self._waiters[0][0] <= PRIORITIES.index(priority)

    def can_queue(self) -> bool:
        return len(self._waiters) < self.spec.max_queue

    def displace(self, priority: str) -> object | None:
        """The queue is full: its worst waiter (lowest class, latest arrival) leaves it to
        make room for a request of a better class than its own. Returns its token (the
        caller tells it it was refused), or None: the queue has room, or nobody in it is
        of a lower class. Without this, a queue full of `sheddable` waiters, which may
        not take a slot while better classes fill the limit, turned `critical` away."""
        rank = PRIORITIES.index(priority)
        with self._lock:
            waiters = self._waiters
            if not waiters or len(waiters) < self.spec.max_queue:
                return None
            worst = max(waiters, key=lambda entry: (entry[0], entry[1]))
            if worst[0] <= rank:
                return None
            waiters.remove(worst)
            heapq.heapify(waiters)
            self._displaced.add(worst[2])
            return worst[2]

    def enqueue(self, priority: str, token: object, paced: bool = False) -> bool:
        """Wait for a slot; `release` hands slots to waiters, best priority first.

        True: the slot is taken now instead. Between the refusal and this call a
        request on another thread's event loop may have freed a slot, with no waiter
        yet to hand it to; queued, this request would wait for the next release, or
        its whole queue timeout, beside a free slot. A `paced` refusal had room: it
        waits its turn in the queue."""
        entry = (PRIORITIES.index(priority), next(self._seq), token)
        with self._lock:
            if (
                not paced
                and self.in_flight < self._room(priority)
                and not self._waiters_ahead(priority)
            ):
                self.in_flight += 1
                return True
            heapq.heappush(self._waiters, entry)
            return False

    def queue_has_room(self) -> bool:
        """A waiter waits though the limit has room for it: it was refused by pacing (or
        queued behind one that was), not by the limit, and no release may come to wake
        it (`admit_waiter`)."""
        with self._lock:
            if not self._waiters:
                return False
            return self.in_flight < self._room(PRIORITIES[self._waiters[0][0]])

    def admit_waiter(self, now: float) -> object | None:
        """The queue's pacing turn: the best waiter takes a slot the limit has room for,
        while pacing at most one per PACE_S (by the caller's `now`), as an arrival would.
        Returns its token (it now holds a slot), or None: nobody, no room, or not yet.
        Woken only by a release, a waiter refused by pacing waited beside free slots
        for as long as the requests in flight ran, and every later arrival of its class
        queued behind it (`_waiters_ahead`): one long request shut the route."""
        with self._lock:
            if not self._waiters:
                return None
            rank, _seq, token = self._waiters[0]
            if self.in_flight >= self._room(PRIORITIES[rank]):
                return None
            if self.in_flight and now - self._admitted_at < PACE_S and self.pacing:
                return None
            heapq.heappop(self._waiters)
            self.in_flight += 1
            self._admitted_at = now
            return token

    def abandon(self, token: object) -> bool:
        """A waiter gave up (timeout, disconnect), or saw it was displaced. True if it
        holds no slot (it was still waiting, or displaced); False: a release handed it
        one."""
        with self._lock:
            for i, entry in enumerate(self._waiters):
                if entry[2] is token:
                    self._waiters.pop(i)
                    heapq.heapify(self._waiters)
                    return True
            if token in self._displaced:
                self._displaced.discard(token)
                return True
            return False

    def release(
        self,
        latency_s: float | None = None,
        *,
        dropped: bool = False,
        lag_s: float = 0.0,
        now: float | None = None,
    ) -> list[object]:
        """One admitted request finished. Returns the waiters that now hold a slot.

        `latency_s` (None: not a sample, e.g. the client went away) feeds the
        adaptive limit; `dropped` says the request failed from overload (its deadline
        passed after `latency_s`, when given: see `GradientEstimate.sample`). `lag_s`
        is how long work that is ready waits to run (the event loop's lag): a
        request arriving now waits that long before anything can admit it, a
        queue the route's own latency does not show, so it counts in the sample.
        While pacing, the freed slot goes to one waiter (at `now`, the caller's clock,
        for the pacing gap), whatever room a limit that grew with this sample has
        besides: the queue's pacing turns (`admit_waiter`) hand that out, one per
        PACE_S, as arrivals get it.
        """
        lock = self._lock
        lock.acquire()
        try:
            if self.estimate is not None:
                self._lag_peak = max(lag_s, LAG_FADE * self._lag_peak)
                if latency_s is not None or dropped:
                    sample = latency_s + lag_s if latency_s is not None else 0.0
                    # Shedding stale requests keeps fewer in flight than the limit allows:
                    # half the limit in use no longer shows it is what holds requests back.
                    binding = self.binding or not self.spec.shed_stale
                    # (newest_first: the others in flight each take `_busy_s` on the loop)
                    others = (self.in_flight - 1) * self._busy_s
                    self.estimate.sample(
                        sample, self.in_flight, dropped, binding, self._lag_peak, others
                    )
                    self.binding = False
            if not self._waiters:  # the common case, without a call
                self.in_flight = max(0, self.in_flight - 1)
                return []
            return self._free_one(now)
        finally:
            lock.release()

    def give_back(self, now: float | None = None) -> list[object]:
        """A slot that served no request (its waiter gave up, or could not be woken):
        free it for the waiters, without a sample. Returns those that now hold a slot
        (while pacing one at most, as `release`)."""
        with self._lock:
            return self._free_one(now)

    def _free_one(self, now: float | None = None) -> list[object]:
        self.in_flight = max(0, self.in_flight - 1)
        woken: list[object] = []
        # While pacing, the slot freed goes to one waiter: a limit that grew at this
        # release has room for more, but let in together they would wake side by side,
        # which pacing is there to prevent (the module doc); the queue's own pacing
        # turns admit them one per PACE_S. Not pacing, every waiter the room allows.
        paced = self.pacing
        while self._waiters:
            rank, _seq, token = self._waiters[0]
            if self.in_flight >= self._room(PRIORITIES[rank]):
                break
            heapq.heappop(self._waiters)
            self.in_flight += 1
            woken.append(token)
            if paced:
                if now is not None:
                    self._admitted_at = now
                break
        return woken

    @property
    def waiting(self) -> int:
        return len(self._waiters)
