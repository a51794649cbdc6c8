"""Instance choice for a service with several instances, pure.

Power of two choices over the admissible instances, each scored by its
outstanding requests weighted by its latency EWMA (cost = latency x
(outstanding + 1)), one that failed lately taken for slower than the slowest
by a penalty that fades with the failure's age; a retry avoids instances
the call already tried while another is admissible (and, all avoided,
prefers one no 429 paused); an instance whose breaker is known open is ejected, but never more than
`max_ejected_ratio` of them at once (at least one may be), and one the bound keeps in
rotation is picked only when no candidate is better (not known open, or answered around its
open breaker last): then as its breaker's probe; when fewer than
`panic_threshold` of the instances are admissible, the pick spreads over
all of them instead of refusing (panic mode).

Time (`now`) and randomness (`rng`, uniform floats in [0, 1)) are arguments;
nothing here does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Final, NamedTuple

RandomSource = Callable[[], float]

PICK_P2C: Final = "p2c"  # the better of two random admissible instances
PICK_ONLY: Final = "only_candidate"  # a single admissible instance left
PICK_PANIC: Final = "panic"  # too few admissible: spread over all instances
PICK_BOUND: Final = "ejection_bound"  # chosen although its breaker is open: the bound holds

EWMA_TAU_S: Final = 5.0  # latency estimates lose half their weight in about 3.5 s
# Right after an instance failed an attempt, it counts as this many times as slow as the
# slowest instance of the service; the penalty fades to nothing over FAILURE_FADE_S. The
# defaults of `[[upstream]]`'s `failure_penalty` and `failure_fade_s`.
FAILURE_PENALTY: Final = 4.0
FAILURE_FADE_S: Final = 10.0
# The retries that waited for an instance to answer again go to it `first` at once, then
# twice as many every RAMP_STEP_S (`ramp_room`); a ramp with no such retry for RAMP_QUIET_S
# is over (the next one starts again from `first`).
RAMP_STEP_S: Final = 0.05
RAMP_QUIET_S: Final = 0.2


class InstanceView(NamedTuple):
    """What the balancer knows about one instance."""

    outstanding: int  # requests in flight from this process
    latency_s: float  # EWMA of attempt latency; 0.0 when not measured yet
    open_until: float  # its breaker is known open until then (0.0: not known open)
    seen_at: float  # when that breaker state was learned (its age is now - seen_at)
    paused_until: float = 0.0  # a 429's Retry-After paused retries to it until then
    failed_at: float = 0.0  # its last failed attempt ended then, none since succeeded (0.0: none)
    # Known open, and the last attempt sent around its breaker succeeded: it answers again
    # before its breaker has probed (newer evidence than the breaker's state).
    answered: bool = False


class Pick(NamedTuple):
    """The balancer's answer: which instance, why, and whether its breaker is bypassed."""

    chosen: int
    reason: str
    panic: bool
    bypass: bool  # its breaker is known open and the pick overrides it (panic, bound)
    admissible: int  # instances admissible when the pick was made


def ejected(views: Sequence[InstanceView], now: float, max_ejected_ratio: float) -> set[int]:
    """Indices of the instances ejected now: known-open breakers, at most the bound.

    Beyond the bound, the instances whose open time ends first stay in (they are
    the nearest to a probe); ties go to the lower index.
    """
    open_ones = [i for i, v in enumerate(views) if v.open_until > now]
    if not open_ones:
        return set()
    bound = max(1, math.floor(len(views) * max_ejected_ratio + 1e-9))
    if len(open_ones) <= bound:
        return set(open_ones)
    open_ones.sort(key=lambda i: (-views[i].open_until, i))
    return set(open_ones[:bound])


def open_in_rotation(
    views: Sequence[InstanceView],
    now: float,
    *,
    panic_threshold: float = 0.5,
    max_ejected_ratio: float = 0.5,
) -> bool:
    """Whether a new request may go to an instance whose breaker is known open.

    True when the ejection bound keeps an open instance in, or too few are
    admissible and the pick spreads over all (panic): `choose` then sends
    attempts to open instances, and how long their breakers stay open says
    nothing about when the service answers again.
    """
    n_open = sum(1 for v in views if v.open_until > now)
    if n_open == 0:
        return False
    out = len(ejected(views, now, max_ejected_ratio))
    admissible = len(views) - out
    return n_open > out or admissible == 0 or admissible < panic_threshold * len(views)


def failure_weight(failed_at: float, now: float, fade_s: float = FAILURE_FADE_S) -> float:
    """How much an instance's last failure (ended at `failed_at`) still weighs in its
    cost: 1.0 right after it, down to 0.0 `fade_s` later; 0.0 when there is none.

    A failure that comes back fast says nothing of the instance's speed, so it leaves
    the latency estimate as it was; without a penalty the instance failing fastest
    would keep its place in the power of two choices, or win it (Finagle and Linkerd
    weigh failures into the load they balance on, gRPC's weighted round robin its
    error rate). A retry of the same call avoids it anyway; this is for the other
    calls, and for a caller's retry that reaches us as a new call. It fades rather
    than ejects: an instance that failed once is picked again when the others are
    busier by enough, and on equal terms once the failure is `fade_s` old (an
    exponential fade would leave an instance as fast as the others behind them for
    as long as nothing else tells them apart); a success since ends it."""
    if failed_at <= 0.0:
        return 0.0
    age = now - failed_at
    if age <= 0.0:
        return 1.0
    return max(0.0, 1.0 - age / fade_s)


def cost(
    view: InstanceView,
    default_latency_s: float,
    now: float,
    slowest_s: float,
    penalty: float = FAILURE_PENALTY,
    fade_s: float = FAILURE_FADE_S,
) -> float:
    """Latency x (outstanding + 1); right after a failure the latency taken is
    `penalty` x the slowest instance's (`slowest_s`), fading back to its own over
    `fade_s`."""
    latency = view.latency_s if view.latency_s > 0.0 else default_latency_s
    if view.failed_at > 0.0:
        weight = failure_weight(view.failed_at, now, fade_s)
        latency += (penalty * max(latency, slowest_s) - latency) * weight
    return latency * (view.outstanding + 1)


def choose(
    views: Sequence[InstanceView],
    tried: Collection[int],
    now: float,
    rng: RandomSource,
    *,
    panic_threshold: float = 0.5,
    max_ejected_ratio: float = 0.5,
    paused_at: float | None = None,
    failure_penalty: float = FAILURE_PENALTY,
    failure_fade_s: float = FAILURE_FADE_S,
) -> Pick:
    """Pick the instance for the next attempt. Never refuses: `views` must not be empty.

    `tried`: the instances to avoid (those the call tried, those a retry must not go to).
    When every candidate is to be avoided, the pick falls back on them all, preferring
    the ones not paused at `paused_at` (when the attempt goes out; default `now`), then,
    all paused, the one whose pause ends first: a paused instance asked for the wait.
    `failure_penalty`, `failure_fade_s`: how a recent failure weighs (`cost`)."""
    n = len(views)
    kept_open = False
    for view in views:
        if view.open_until > now:
            out = ejected(views, now, max_ejected_ratio)
            admissible = [i for i in range(n) if i not in out]
            kept_open = len(out) < sum(1 for v in views if v.open_until > now)
            break
    else:  # (none known open, most picks: nothing ejected, no set of them to build)
        admissible = list(range(n))
    panic = len(admissible) < panic_threshold * n or not admissible
    candidates = list(range(n)) if panic else admissible
    fresh = [i for i in candidates if i not in tried] if tried else candidates
    if fresh:
        candidates = fresh
        if kept_open and not panic:
            # The bound keeps an open instance in rotation so that the service is not
            # refused, not to send it calls another instance would take: its own breaker
            # says it fails, and weighed on cost alone it won the power of two choices
            # against a closed or half-open one about half the time (right after an
            # outage, first attempts went to instances known open and the callee shed
            # them). It is picked when no candidate is better (all the others known open
            # too, or tried), as its breaker's probe: the attempt's answer is the evidence
            # (`answered`) that brings it back before its breaker probes.
            better = [i for i in candidates if views[i].open_until <= now or views[i].answered]
            if better:
                candidates = better
    elif len(candidates) > 1:
        at = now if paused_at is None else paused_at
        free = [i for i in candidates if views[i].paused_until <= at]
        if free:
            candidates = free
        else:
            first = min(views[i].paused_until for i in candidates)
            candidates = [i for i in candidates if views[i].paused_until == first]
    measured = [views[i].latency_s for i in candidates if views[i].latency_s > 0.0]
    # An unmeasured instance is assumed as fast as the fastest measured one: it gets tried.
    default_latency = min(measured) if measured else 1.0
    slowest = max(measured) if measured else default_latency
    if len(candidates) == 1:
        index, reason = candidates[0], PICK_ONLY
    else:
        a = candidates[min(len(candidates) - 1, int(rng() * len(candidates)))]
        rest = [i for i in candidates if i != a]
        b = rest[min(len(rest) - 1, int(rng() * len(rest)))]
        ca = cost(views[a], default_latency, now, slowest, failure_penalty, failure_fade_s)
        cb = cost(views[b], default_latency, now, slowest, failure_penalty, failure_fade_s)
        index = b if cb < ca else a
        reason = PICK_P2C
    bypass = views[index].open_until > now
    if panic:
        reason = PICK_PANIC
    elif bypass:
        reason = PICK_BOUND
    return Pick(index, reason, panic, bypass, len(admissible))


def ramp_room(sent: int, since: float, now: float, first: int, step_s: float = RAMP_STEP_S) -> bool:
    """Whether an instance that answered again may take one more of the retries that
    waited for an instance to answer (slow start): `first` at once, then twice as many
    every `step_s` since the first of them went to it (`since`), `sent` having gone.

    Right after a whole-service outage the retries waiting out the callee's Retry-After
    all saw the first instance that answered within one look (`_PARK_STEP_S`), and went
    there at once: about 20 within 5 ms at one instance whose breaker had just closed on
    one probe. Paced so, they go as the instance keeps answering, and spread over the
    instances that answer meanwhile (Envoy's slow_start_window ramps a host's weight
    over a window after it turned healthy; TCP's slow start doubles its window a round
    trip)."""
    if sent < first:
        return True
    return sent < first * math.pow(2.0, min(30.0, max(0.0, now - since) / step_s))


def choose_only(open_until: float, now: float, panic_threshold: float = 0.5) -> Pick:
    """`choose` for a service of one instance, from its breaker's known open time alone:
    with one view there is one candidate whatever the call tried or a 429 paused, no
    random draw and no cost to weigh, so the views need not be built (a service's
    attempt paid ~170 bytecodes for them). Known open, the bound ejects it and leaves
    none admissible: panic, around its breaker."""
    if open_until > now:
        return Pick(0, PICK_PANIC, True, True, 0)
    panic = panic_threshold > 1.0  # (`len(admissible) < panic_threshold * n`, n = 1)
    return Pick(0, PICK_PANIC if panic else PICK_ONLY, panic, False, 1)


def decayed(latency_s: float, at: float, now: float, tau_s: float) -> float:
    """A latency estimate as read at `now`, made at `at`: it loses weight with its age, as
    Finagle's peak EWMA and Linkerd's decay theirs on every read. An instance whose
    estimate went up (one slow answer) loses every comparison and so gets no new sample
    to bring it down: without the decay it would never be picked again. With it, its
    estimate falls until the instance is tried, and that answer speaks for it."""
    if latency_s <= 0.0 or tau_s <= 0.0 or now <= at:
        return latency_s
    return latency_s * math.exp(-(now - at) / tau_s)


def ewma(previous: float, previous_at: float, sample: float, now: float, tau_s: float) -> float:
    """Latency EWMA with time decay: an old estimate weighs less (Finagle's peak EWMA,
    without the peak). The first sample is taken as it is."""
    if previous <= 0.0:
        return sample
    if tau_s <= 0.0:
        return sample
    weight = math.exp(-max(0.0, now - previous_at) / tau_s)
    return previous * weight + sample * (1.0 - weight)
