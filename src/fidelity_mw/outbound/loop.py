"""The attempt loop, sans I/O: one generator that both transports drive.

`attempts(...)` yields effects and takes their results back:

- `(SEND, request)` -> the response (or the inner transport's exception, thrown in);
- `(SLEEP, seconds, response)` -> None: read what is left of `response` (a failed
  attempt's) when it is short (`wire.worth_reading`), close it, then wait;
- `(GATE, breaker_key, breaker, budget_key, cfg, retry, now)` -> the store's
  `outbound_gate` answer `(gate, allowed, source, age_s)` (or its exception);
- `(RECORD, breaker_key, breaker, gate, outcome, slow, now)` -> the store's `record`
  answer (the breaker state afterwards, or its exception);
- `(CLOSE, response, spend)` -> None: close a response we will not hand back (with
  `spend`, read what is left of it first when it is short, as for SLEEP);
- `(REFUND, budget_key, cfg, source, age_s, now[, spent_at])` -> None: the store's
  `budget_refund` (`spent_at` when its gate answer said it: `GateAnswer.spent_at`; a
  retry the budget counted whose attempt is not sent; best effort, errors ignored);
- `(READ, response)` -> None: read a short answer to its end and keep its body (its
  connection goes back to the pool while the call waits with it in hand: `_parked`);
- `(WAIT, race)` -> None: a hedged call's retry waits until none of the call's attempts
  is out any more (`hedge.Race.settled`; the async transport only: the sync one never
  hedges);
- `(PARK,)` -> whether the driver lets a retry wait for evidence (`_parked`): the async
  transport does (a waiting coroutine holds nothing); the sync one does not (it would
  hold a worker thread for up to the callee's Retry-After, in every call of an outage);

A store that answers in process (`Local`: memory) is called directly instead
of through GATE and RECORD effects: nothing to await, in either transport.
With one, a plain upstream's first attempt is decided without the generator
(`First`): most calls are one attempt that succeeds, and that path then costs
no generator resumptions; anything else goes on in `attempts` from right
after the send, so every later decision is the loop's.

It returns the response for the caller, or raises (`CircuitOpen`,
`DeadlineExceeded`, the last transport error). The async transport awaits the
effects, the sync one blocks on them: the order of decisions, the store
operations and their number are the same for both by construction.

Per call, outermost first: pick the instance (services only), the deadline,
the host (or instance) breaker, the attempt, then on a retryable failure the
retry plan, the budget and the next gate (one store operation), the backoff.
Every exit that makes no attempt gives back what it took: a probe slot held
for an attempt that is not made (deadline passed, cancelled during backoff)
is released with an `ignored` outcome, and a retry the budget counted for it
is given back (`budget_refund`, recorded as `budget` / `refund`). A retry is
recorded when it is decided, before its backoff, with the state age of the
answer it was decided on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Generator, Mapping
from typing import Any, Final, NamedTuple

import httpx

from ..clock import SystemClock
from ..context import (
    ALLOW,
    ATTEMPT_DECISIONS,
    LAYER_BREAKER,
    LAYER_BUDGET,
    LAYER_DEADLINE,
    LAYER_RETRY,
    REJECT,
    RETRY,
    SOURCE_FALLBACK,
    SOURCE_MEMORY,
    SOURCE_REQUEST,
    Decision,
    DecisionContext,
    DetailValue,
)
from ..decide.balance import (
    EWMA_TAU_S,
    RAMP_QUIET_S,
    Pick,
    choose,
    choose_only,
    ewma,
    ramp_room,
)
from ..decide.breaker import FAILURE, IGNORED, OPEN, SUCCESS, Gate, known_open_s, open_time
from ..decide.retry import (
    EXHAUSTING_REASONS,
    GIVE_UP_BREAKER,
    GIVE_UP_BUDGET,
    GIVE_UP_DEADLINE,
    GIVE_UP_FAILED_AFTER_RETRY,
    GIVE_UP_RETRY_AFTER,
)
from ..engine import Engine
from ..hooks import AttemptObserver
from ..policy import BreakerConfig
from ..state.local import LocalState, OutboundCells
from .body import Watch, watch_body
from .decisions import (
    GIVE_UP_EXTENSION,
    SCOPE_CALL,
    SPENT_SHORT,
    call_end,
    cause_of,
    classify,
    closed_on_store_error,
    deadline_passed,
    deadline_spent,
    fell,
    forget_give_up,
    gate_answer,
    gave_up,
    give_up,
    heed_retry_after,
    is_slow,
    lb_decision,
    mark,
    observe_end,
    observe_start,
    plan_call,
    shed_itself,
    store_failed,
    with_why,
)
from .hedge import HEDGE, HEDGE_PAUSED, NO_HEDGE, SLOW_ATTEMPT, NoHedge, Race
from .upstream import Instance, Upstream
from .wire import (
    FAST_HEADERS,
    OWN_TIMEOUT,
    Stamps,
    advertised_ms,
    at_instance,
    bounded_timeouts,
    deadline_bound_s,
    first_stamps,
    give_ours_back,
    keep_own_timeouts,
    own_timeouts,
    replayable,
    restore,
    snapshot,
    spend_timeouts,
    stamp,
    stamp_first,
    take_ours,
    take_ours_late,
    worth_reading,
)

logger = logging.getLogger("fidelity_mw")

SEND: Final = 0
SLEEP: Final = 1
GATE: Final = 2
RECORD: Final = 3
CLOSE: Final = 4
REFUND: Final = 5
WAIT: Final = 6
READ: Final = 7
PARK: Final = 8

CONTEXT_EXTENSION: Final = "fidelity_context"
SNI_EXTENSION: Final = "sni_hostname"  # httpcore's: the TLS server name of a connection

Effect = tuple[Any, ...]
Steps = Generator[Effect, Any, httpx.Response]
# A service's first attempt (`First.aim`): the instance, its breaker key, whether its breaker
# gated the attempt, and the request's own URL and TLS name (`_aim`)
Aim = tuple[Instance, str, bool, httpx.URL, Any]

FIRST_ATTEMPT: Final[Mapping[str, int]] = {"attempt": 1}
_new_tuple: Final = (
    tuple.__new__
)  # Decision(...) without the keyword-default wrapper: hot path only
_monotonic: Final = time.monotonic
_BYTE_STREAM: Final = httpx.ByteStream  # a body in memory: it cannot break any more
_NOT_RECORDED: Final = "fidelity_mw: could not record an outcome for %s: %s"
UNTAKEN: Final = object()  # `first_attempt`: the first gate is not taken yet
REFUND_VERDICT: Final = "refund"  # a retry the budget counted, given back: it was not sent
RETRY_NOT_SENT: Final = "retry_not_sent"
WAIT_VERDICT: Final = "wait"  # a hedged call's retry waits for its hedge's answer
HEDGE_OUT: Final = "hedge_in_flight"


class Local:
    """An in-process store's synchronous operations: `outbound_gate_now` (answers
    (gate, budget allowed)), `outbound_begin_now` (a first attempt's: the gate or
    None), `record_now`, and the breaker states a balancer reads fresh,
    `breakers_open_until_now`; and the same first attempt's gate and record on an
    upstream plan's own cells (`cells_of`): `begin_at`, `record_at`, and `cells`, which
    makes the plan's handle. (A slotted class: compiled, a native class whose fields
    are struct reads.)"""

    __slots__ = ("begin", "begin_at", "cells", "gate", "peek", "record", "record_at", "refund")

    def __init__(
        self,
        gate: Callable[..., Any],
        record: Callable[..., Any],
        peek: Callable[..., Any] | None,
        begin: Callable[..., Any],
        refund: Callable[..., Any] | None = None,
        cells: Callable[..., OutboundCells] = OutboundCells,
        begin_at: Callable[..., Any] | None = None,
        record_at: Callable[..., Any] | None = None,
    ) -> None:
        self.gate = gate
        self.record = record
        self.peek = peek
        self.begin = begin
        self.refund = refund
        self.cells = cells
        self.begin_at: Callable[..., Any] = begin_at or _begin_by_keys(begin)
        self.record_at: Callable[..., Any] = record_at or _record_by_keys(record)


# A store whose keyed operations are `LocalState`'s own decides a first attempt on the
# plan's cells; one that overrides any of them (a test's store that fails or counts)
# gets each call through them, by the handle's keys.
_CELL_SAFE: Final = ("outbound_begin_now", "outbound_gate_now", "record_now")


def local_ops(store: object) -> Local | None:
    """The store's in-process operations, when it has them."""
    gate = getattr(store, "outbound_gate_now", None)
    record = getattr(store, "record_now", None)
    if gate is None or record is None:
        return None
    begin = getattr(store, "outbound_begin_now", None)
    if begin is None:
        begin = _begin_with(gate)
    peek = getattr(store, "breakers_open_until_now", None)
    refund = getattr(store, "budget_refund_now", None)
    if isinstance(store, LocalState) and all(_own(store, name) for name in _CELL_SAFE):
        return Local(
            gate, record, peek, begin, refund,
            store.outbound_cells, store.outbound_begin_cells, store.record_cells,
        )  # fmt: skip
    return Local(gate, record, peek, begin, refund)


def _own(store: LocalState, name: str) -> bool:
    """Whether `store.<name>` is `LocalState`'s own method, bound to the store (neither a
    subclass's nor an instance attribute). Not by `store.__dict__`: reading it turns
    CPython 3.11's inline attribute values into a dict, whose reads its specializer
    cannot serve (LOAD_ATTR_WITH_HINT misses a split dict's values), so every read of the
    store's fields went the generic way: +1k machine instructions a call, pure."""
    own = getattr(LocalState, name)
    if getattr(type(store), name, None) is not own:
        return False
    bound = getattr(store, name, None)
    # (compiled, a native method bound to the store has no `__func__`: its name tells
    # another of the store's methods put in its place)
    return (
        getattr(bound, "__self__", None) is store
        and getattr(bound, "__name__", None) == name
        and getattr(bound, "__func__", own) is own
    )


def cells_of(up: Upstream, local: Local) -> OutboundCells:
    """The plan's handle on its breaker and budget cells for these operations (made
    anew for another store's: a handle is one store's, fetched and refetched under its
    lock). Made whole before the plan holds it: threads of the sync transport may read
    it at once."""
    cells = up.cells
    if cells.home is not local:
        cells = local.cells(up.breaker_key, up.breaker, up.budget_key, up.retry)
        cells.home = local
        up.cells = cells
    return cells


def _begin_by_keys(begin: Callable[..., Any]) -> Callable[..., Any]:
    def begin_at(cells: OutboundCells, now: float) -> Any:
        return begin(cells.breaker_key, cells.breaker, cells.budget_key, cells.cfg, now)

    return begin_at


def _record_by_keys(record: Callable[..., Any]) -> Callable[..., Any]:
    def record_at(cells: OutboundCells, gate: Gate, outcome: str, slow: bool, now: float) -> Any:
        return record(cells.breaker_key, cells.breaker, gate, outcome, slow, now)

    return record_at


def _begin_with(gate: Callable[..., Any]) -> Callable[..., Any]:
    def begin(key: str, breaker: BreakerConfig | None, budget: str, cfg: Any, now: float) -> Any:
        return gate(key, breaker, budget, cfg, False, now)[0]

    return begin


class First(NamedTuple):
    """The first attempt of a call to a plain upstream (no instances) on in-process state,
    unhedged: gated and stamped by `first_attempt`, sent by the transport, and, when its
    response ends the call (`finish`), recorded there too. Otherwise the call goes on in
    `attempts` (`resume`) from right after the send, with what was taken here. (A tuple:
    built in one step, without a class's per-call construction cost.)"""

    ctx: DecisionContext
    up: Upstream
    request: httpx.Request
    own: bool
    observer: AttemptObserver | None
    now: float
    local: Local
    gate: Gate | None
    source: str
    prior: list[tuple[bytes, bytes, bytes]] | None
    token: Any
    original_timeout: Mapping[str, float | None] | None
    can_replay: bool
    saved: list[tuple[bytes, bytes, bytes]] | None  # (`wire.restore`)
    # A service's first attempt (None: a plain upstream's): the instance picked, the breaker
    # key gated (the instance's), whether its breaker gated it (False: the pick goes around
    # a known-open one), and the request's own URL and TLS name (`_aim`)
    aim: Aim | None

    def finish(self, response: httpx.Response) -> httpx.Response | None:
        """The response, recorded, when it ends the call (no retry to consider); None
        when the call goes on in the loop (`resume`)."""
        (ctx, up, request, own, observer, now, local, gate, source, prior, token, own_timeout, _,
         saved, aim) = self  # fmt: skip
        if up.listening:  # (a name the rule could not place: its first answer's address)
            up.heard(response, ctx.engine)
        status = response.status_code
        if status >= 500 or status in up.retry_statuses:
            return None
        clock = ctx.engine.clock
        ended = _monotonic() if type(clock) is SystemClock else clock.monotonic()
        if up.window is not None:
            up.window.add(ended - now)
        breaker = up.breaker
        if aim is not None:
            # A service's instance: the steps the loop takes when its first attempt ends
            # the call, in its order (the instance's latency and failure, the breaker and
            # what it says of the instance, the observer, the body's watch), then the
            # request as it came (`attempts`' `finally`).
            target, breaker_key, gated, original_url, own_sni = aim
            outcome = FAILURE if status in up.fail_statuses else SUCCESS
            _weigh(target, up, response, now, ended)
            _answered(target, up, outcome, now, ended)
            counted = None
            if gate is not None and gated:
                assert breaker is not None
                if outcome == SUCCESS:
                    counted = gate
                state = _record_now(local, up, breaker_key, gate, outcome, now, ended)
                _learned_state(target, breaker, state, ended)
            elif not gated and breaker is not None:  # around it
                target.answered = outcome == SUCCESS
            if observer is not None:
                observe_end(observer, token, response, None)
            if (
                outcome == SUCCESS
                and (breaker is None or counted is not None or not gated)
                and response.stream.__class__ is not _BYTE_STREAM
            ):  # its body still to be read: a break there fails the call after all
                watch = Watch(ctx, up.key, ctx.engine.store, local, breaker_key, breaker,
                              counted, source, target, up.shut, 1,
                              up.attempt_timeout_s)  # fmt: skip
                watch_body(response, watch)
            if own:
                response.extensions[CONTEXT_EXTENSION] = ctx
            _unaim(request, original_url, own_sni)
            restore(request.headers, prior, saved)
            _own_timeouts_back(request, own_timeout)
            if own and observer is not None:
                call_end(observer, ctx)
            return response
        if gate is not None and breaker is not None:  # a lost outcome is logged, not raised
            outcome = FAILURE if status in up.fail_statuses else SUCCESS
            slow = breaker.slow_call_ms is not None and is_slow(breaker, now, ended)
            try:  # (`_record_now`, on the plan's cells)
                local.record_at(cells_of(up, local), gate, outcome, slow, ended)
            except Exception as exc:
                logger.warning(_NOT_RECORDED, up.key, exc)
            if outcome == SUCCESS and response.stream.__class__ is not _BYTE_STREAM:
                # (its body still to be read: a break there fails the call after all)
                watch = Watch(ctx, up.key, None, local, up.breaker_key, breaker, gate,
                              source, None, up.shut, 1, up.attempt_timeout_s)  # fmt: skip
                watch_body(response, watch)
        if observer is not None:
            observe_end(observer, token, response, None)
        restore(request.headers, prior, saved)
        keep_own_timeouts(request.extensions, own_timeout)
        if own:
            response.extensions[CONTEXT_EXTENSION] = ctx
            if observer is not None:
                call_end(observer, ctx)
        return response

    def resume(self, response: httpx.Response | None, thrown: BaseException | None) -> Steps:
        """The rest of the call, as the loop: from the first attempt's result."""
        ctx = self.ctx
        return attempts(
            ctx, ctx.engine, self.up, self.request, self.own, self.observer, self.now,
            self.local, first=self, sent=(response, thrown),
        )  # fmt: skip


def first_attempt(
    ctx: DecisionContext,
    up: Upstream,
    request: httpx.Request,
    own: bool,
    observer: AttemptObserver | None,
    now: float,
    local: Local,
    taken: Any = UNTAKEN,
) -> First:
    """Gate and stamp a call's first attempt (`First`); raises when it is refused.

    `taken` is what `local.begin` answered (its gate, or what it raised) when the
    async transport's shortcut asked already: only what it does not handle comes here.
    """
    extensions = request.extensions
    timeouts = extensions.get("timeout")
    if OWN_TIMEOUT in extensions:  # a request sent again: its own timeouts, not the last's
        timeouts = own_timeouts(extensions)
    if GIVE_UP_EXTENSION in extensions:  # a request sent again: its last call's give-up
        del extensions[GIVE_UP_EXTENSION]
    stream = request.stream  # judged before the attempt consumes it (see `attempts`)
    can_replay = type(stream) is httpx.ByteStream or replayable(stream)
    prior = take_ours(request.headers) if up.speaks else None
    saved = snapshot(request.headers) if observer is not None else None
    breaker = up.breaker
    instances = up.instances
    aim: Aim | None = None
    try:
        remaining = ctx.deadline_at
        if remaining is not None:
            remaining -= now
            if remaining <= 0.0:
                raise deadline_passed(ctx, up, 0, now, None)  # nothing taken yet
        if instances is not None:
            # A service's instance, picked and gated by the loop's own step (an in-process
            # store: it asks for no I/O, and its answers' age is 0.0), so the picks and their
            # random draws are the loop's; the request's own URL and TLS name as `attempts`
            # takes them
            g = _gate_now(_gate_next(ctx, ctx.engine, up, local, [], False, 0, now, None))
            gate, source, target = g.gate, g.source, g.target
            assert target is not None  # (a service's: always an instance)
            aim = (target, g.breaker_key, g.gated, request.url, extensions.get(SNI_EXTENSION))
        else:
            try:
                if taken is UNTAKEN:
                    gate = local.begin_at(cells_of(up, local), now)
                elif isinstance(taken, Exception):
                    raise taken
                else:
                    gate = taken
            except Exception as exc:
                gate, _, source, _ = _settle(ctx, up, exc, False, breaker is not None, 0, now, None)
            else:
                source = SOURCE_REQUEST if gate is None else SOURCE_MEMORY
        if gate is not None and gate.verdict != "allow":
            gate_answer(ctx, up, gate, source, 0.0, 0, now, None)
        if FAST_HEADERS and (remaining is None or remaining >= up.uncut_s):
            # `prepare(ctx, up, request, 1, timeouts, remaining)`, inlined for its common
            # case: the whole attempt timeout fits in the deadline.
            request.extensions["timeout"], stamps = attempt_timeouts(up, timeouts)
            request.headers._list += stamps
            counts = ctx._attempts
            if counts is None:
                ctx._attempts = {up.key: 1}
            else:
                counts[up.key] = counts.get(up.key, 0) + 1
        else:
            prepare(ctx, up, request, 1, timeouts, remaining)
        details: Mapping[str, DetailValue] | None = FIRST_ATTEMPT
        if aim is not None:
            _aim(request, aim[0], aim[3], aim[4])
            if source == SOURCE_FALLBACK:  # (as the loop's first attempt to an instance says)
                details = with_why(source, FIRST_ATTEMPT)
        decision = _new_tuple(
            Decision, (LAYER_RETRY, up.key, ALLOW, "attempt", source, 0.0, now, details)
        )
        if ctx._pending is None and len(ctx._decisions) < ctx._room_at:
            ctx._decisions.append(decision)
        else:  # the admission's records built first, or room made (a long request)
            ctx.decisions.append(decision)
        token = observe_start(observer, ctx, request, 1) if observer else None
    except BaseException:
        if aim is not None:
            _unaim(request, aim[3], aim[4])
        restore(request.headers, prior, saved)
        if own and observer is not None:
            call_end(observer, ctx)
        raise
    if aim is not None:
        aim[0].outstanding += 1
    return _new_tuple(
        First,
        (ctx, up, request, own, observer, now, local, gate, source, prior, token, timeouts,
         can_replay, saved, aim),
    )  # fmt: skip


def attempts(
    ctx: DecisionContext,
    engine: Engine,
    up: Upstream,
    request: httpx.Request,
    own: bool,
    observer: AttemptObserver | None,
    now: float,
    local: Local | None,
    race: Race | None = None,
    hedge: bool = False,
    first: First | None = None,
    sent: tuple[httpx.Response | None, BaseException | None] | None = None,
) -> Steps:
    """One outbound call: every attempt, decision and wait, as effects (module docstring).

    With `race` the call is hedged (outbound/hedge.py): the attempts of every loop of the
    call share one count, and each loop notes the instances it sends to. A `hedge` loop
    makes one attempt, asks the retry budget for it like a retry, avoids the instances
    the call already uses, and raises `NoHedge` when the budget or a breaker refuses it.

    With `first` the first attempt was made already (`First`), and `sent` is its result:
    the response, or what the inner transport raised.
    """
    clock = engine.clock
    breaker = up.breaker
    instances = up.instances
    aimed = None if first is None else first.aim
    if aimed is not None:  # (its first attempt was sent to an instance: `_aim`)
        original_url, own_sni = aimed[3], aimed[4]
    else:
        original_url = request.url
        # the caller's own TLS name, if any (`sni_hostname`), which an instance's never
        # replaces
        own_sni = request.extensions.get(SNI_EXTENSION) if instances is not None else None
    if first is None:
        extensions = request.extensions
        original_timeout = extensions.get("timeout")
        if OWN_TIMEOUT in extensions:  # a request sent again: its own timeouts
            original_timeout = own_timeouts(extensions)
        if GIVE_UP_EXTENSION in extensions:  # a request sent again: its last call's give-up
            del extensions[GIVE_UP_EXTENSION]
        # Judged before the first attempt, which consumes a streaming body (and may
        # buffer it: a transport that reads it leaves bytes behind).
        stream = request.stream
        can_replay = type(stream) is httpx.ByteStream or replayable(stream)
        prior = take_ours(request.headers) if up.speaks else None
        saved = snapshot(request.headers) if observer is not None else None
    else:
        original_timeout, can_replay, prior = first.original_timeout, first.can_replay, first.prior
        saved = first.saved
    # The instances this call sent to (not their positions: another call may rename the
    # service's instances while this one backs off, and the list is then a new one).
    tried: list[Instance] = []
    target: Instance | None = None
    breaker_key = up.breaker_key
    gated = breaker is not None  # False when the balancer overrides an open instance breaker
    gate: Gate | None = None
    source, age = SOURCE_REQUEST, 0.0
    attempt = 0
    cause = ""
    delay = 0.0
    previous_delay: float | None = None
    last_error: BaseException | None = None
    token: Any = None
    # A retry (or hedge) the budget counted whose attempt is not sent yet: when it was
    # counted (`now` then) and the gate's source; given back if the attempt is not made.
    # a retry counted and not sent yet: (when, the gate's source, the store's `spent_at`)
    unsent: tuple[float, str, float | None] | None = None
    regate = False  # the retry's probe slot was given back for its wait: take it again
    # this attempt's retry-layer decision, and a probe its regate took (the observer's
    # `ATTEMPT_DECISIONS`): recorded before the backoff, another call's may follow it
    marked: tuple[Decision, ...] = ()
    number = 0  # the attempt's number (a retry's is taken when it is decided)
    # the last attempt's success as counted (its gate), or its target's, for a broken body
    counted: Gate | None = None
    response: httpx.Response | None
    thrown: BaseException | None
    try:
        if first is not None:
            gate, source, attempt, token = first.gate, first.source, 1, first.token
            if aimed is not None:
                target, breaker_key, gated = aimed[:3]
        elif ctx.deadline_at is not None and ctx.deadline_at - now <= 0.0:
            raise deadline_passed(ctx, up, 0, now, None)  # nothing taken yet
        # --- first attempt: count the request on the budget and gate the target
        elif hedge:
            assert race is not None
            tried = list(race.targets)
            g = yield from _gate_hedge(ctx, engine, up, local, tried, race, now)
            target, breaker_key, gated, gate, source, age = g[:6]
            if g.spent:
                unsent = (now, source, g.spent_at)
        elif instances is None and local is not None:
            gate, _, source, age, _ = _gate_plain(ctx, up, local, False, 0, now, None)
        else:
            g = yield from _gate_next(ctx, engine, up, local, tried, False, 0, now, None)
            target, breaker_key, gated, gate, source, age = g[:6]
        while True:
            if sent is None:
                attempt += 1
                deadline_at = ctx.deadline_at
                remaining = None if deadline_at is None else deadline_at - now
                if remaining is not None and remaining <= 0.0:
                    if gate is not None and gated:
                        yield from _release(local, breaker_key, breaker, gate, now)
                    if unsent is not None:
                        yield from _unsent(
                            ctx, up, local, unsent, max(number, attempt), "deadline", now
                        )
                    raise deadline_passed(ctx, up, attempt - 1, now, last_error)
                if regate:  # (a retry's probe slot, given back for its wait)
                    regate = False
                    gate, source, age = yield from _regate(
                        ctx, up, local, target, breaker_key, unsent, number, attempt - 1, now,
                        last_error,
                    )  # fmt: skip
                    if gate is not None and gate.probe_id and marked:
                        # (its probe decision, the record's last: `gate_answer`, no wait after)
                        marked = (marked[0], ctx.decisions[-1])
                if number < attempt and gate is not None and gate.verdict != "allow":
                    # (a retry's gate was answered when the retry was decided)
                    gate_answer(ctx, up, gate, source, age, attempt - 1, now, last_error)
                # --- the attempt
                if number < attempt:  # not a retry numbered when it was decided
                    number = attempt if race is None else race.next()
                elif race is not None:
                    race.resume()  # the call's retry goes out: the hedge delay starts again
                unsent = None
                if attempt > 1:  # (a retry: `heard`, or a renaming, may have changed it)
                    if not up.speaks:  # (a service renamed meanwhile, no longer all ours)
                        saved, prior = give_ours_back(request.headers, prior, saved), None
                    elif prior is None:
                        # (the call began with a stranger, which its first answer showed to
                        # be one of ours: the caller's own headers of our names go aside now)
                        prior, saved = take_ours_late(request.headers, saved)
                prepare(ctx, up, request, number, original_timeout, remaining)
                if target is not None:
                    _aim(request, target, original_url, own_sni)
                if race is not None and hedge:
                    after_ms = round(race.delay_s * 1000.0, 3)
                    hedged = Decision(
                        LAYER_RETRY, up.key, HEDGE, SLOW_ATTEMPT, source, age, now,
                        with_why(source, {"attempt": number, "after_ms": after_ms}),
                    )  # fmt: skip
                    ctx.decisions.append(hedged)
                    marked = (hedged,)
                elif attempt == 1:
                    decision = _new_tuple(
                        Decision,
                        (
                            LAYER_RETRY,
                            up.key,
                            ALLOW,
                            "attempt",
                            source,
                            age,
                            now,
                            FIRST_ATTEMPT
                            if source != SOURCE_FALLBACK
                            else with_why(source, FIRST_ATTEMPT),
                        ),
                    )
                    if ctx._pending is None and len(ctx._decisions) < ctx._room_at:
                        ctx._decisions.append(decision)  # (`decisions`, without its call)
                    else:
                        ctx.decisions.append(decision)
                    if observer is not None:
                        marked = (decision,)
                if observer is not None:
                    if marked:
                        request.extensions[ATTEMPT_DECISIONS] = marked
                    token = observe_start(observer, ctx, request, number)
                    if marked:
                        request.extensions.pop(ATTEMPT_DECISIONS, None)
                        marked = ()
                else:
                    token = None
                if target is not None:
                    target.outstanding += 1
                    if race is not None:
                        race.targets.append(target)
                        race.out.append(target)
                try:
                    response, thrown = (yield (SEND, request)), None
                except GeneratorExit:
                    raise
                except BaseException as exc:
                    response, thrown = None, exc
                if race is not None:
                    if target is not None:
                        race.out.remove(target)
                    if not hedge:
                        race.pause()  # answered: a hedge now is for the retry's attempt only
            else:  # the first attempt, made by `First`
                (response, thrown), sent = sent, None
            error: BaseException | None = None
            if thrown is not None:
                if not isinstance(thrown, Exception):  # cancelled or interrupted: never retried
                    # (a hedge's loser, mostly): its time so far is a lower bound of its
                    # latency, still a sample; without it a slow instance that always loses
                    # to its hedge would keep the estimate it had before, and the balancer
                    # would keep sending it the first attempt of every call.
                    ended = clock.monotonic()
                    if up.window is not None:
                        up.window.add(ended - now)
                    if target is not None:
                        target.outstanding -= 1
                        target.latency_s = ewma(
                            target.latency_s, target.latency_at, ended - now, ended, EWMA_TAU_S
                        )
                        target.latency_at = ended
                    if gate is not None and gated:
                        yield from _release(local, breaker_key, breaker, gate, now)
                    observe_end(observer, token, None, thrown)
                    raise thrown
                error = thrown
            elif up.listening:
                assert response is not None
                up.heard(response, engine)
            # (the system clock's method only calls time.monotonic: read it directly)
            ended = _monotonic() if type(clock) is SystemClock else clock.monotonic()
            if up.window is not None:
                up.window.add(ended - now)
            if target is not None:
                _weigh(target, up, response, now, ended)
            try:
                if (
                    response is not None
                    and (status := response.status_code) < 500
                    and (status not in up.retry_statuses)
                ):  # the success path, inlined
                    outcome = FAILURE if status in up.fail_statuses else SUCCESS
                    retryable = downstream = False
                    ran_out = 0
                    if target is not None:
                        _answered(target, up, outcome, now, ended)
                else:
                    outcome, retryable, downstream = classify(engine, up, target, response, error)
                    ran_out = deadline_spent(ctx, up, request, response, error, now, ended)
                    if ran_out == SPENT_SHORT and outcome == FAILURE:
                        outcome = IGNORED  # (the caller's short deadline: no evidence)
                    if (
                        target is not None
                        and ran_out != SPENT_SHORT
                        and (retryable or outcome != IGNORED)
                    ):
                        # A 5xx, an answer to retry, a network error: the balancer weighs
                        # the instance up for a while (`failure_weight`), a breaker or none.
                        # Not a callee's give-up (its upstream failed), our own error, nor
                        # a timeout at the caller's short deadline.
                        target.failed_at = ended
                state = ""
                counted = None
                if gate is not None and gated:
                    assert breaker is not None
                    if outcome == SUCCESS:
                        counted = gate
                    if local is not None:
                        state = _record_now(local, up, breaker_key, gate, outcome, now, ended)
                    else:
                        slow = breaker.slow_call_ms is not None and is_slow(breaker, now, ended)
                        try:
                            state = yield (RECORD, breaker_key, breaker, gate, outcome, slow, ended)
                        except Exception as exc:
                            logger.warning(_NOT_RECORDED, up.key, exc)
                        if state and state != gate.state:
                            # moved by this outcome (a probe's success closed it, a
                            # failure opened it): no decision says so, and the gauge of a
                            # store it cannot read showed the gate's state until the
                            # breaker's next decision
                            ctx.note_breaker(
                                target.key if target is not None else up.key, "upstream", state
                            )
                    if target is not None:
                        _learned_state(target, breaker, state, ended)
                elif not gated and target is not None and breaker is not None:  # around it
                    target.answered = outcome == SUCCESS
                gate = None
                if observer is not None:
                    observe_end(observer, token, response, error)
                if hedge:
                    if retryable and response is not None:  # (no retry of its own)
                        heed_retry_after(engine, up, target, response, clock.monotonic())
                elif retryable or downstream:
                    # --- a retryable failure: retry, or give up with a reason
                    now = clock.monotonic()
                    forget_give_up()  # (an earlier call's: this one notes its own)
                    plan, scoped = plan_call(
                        engine, ctx, up, request, response, attempt, downstream,
                        state if target is None else "", previous_delay, can_replay, now,
                        target, tried if race is None else (*tried, *race.targets), ran_out > 0,
                    )  # fmt: skip
                    if plan.retry:
                        delay = plan.delay_s
                        # the retry's budget and the next target's gate: one store operation
                        if target is not None:
                            tried.append(target)
                            if race is not None:  # and its hedges' instances, too
                                tried.extend(i for i in race.targets if i not in tried)
                        spent_at: float | None = None
                        scope = "" if scoped is None else scoped.scope
                        if instances is None and local is not None:
                            gate, allowed, source, age, spent_budget = _gate_plain(
                                ctx, up, local, True, attempt, now, error,
                                None if scoped is None else scoped.retry_after_s,
                                scoped is not None and scoped.advised,
                            )  # fmt: skip
                        else:
                            # A callee's own refusal (its route breaker's shed: the breaker
                            # next to the fault owns it) whose Retry-After the call waits,
                            # and every other instance known open here: the retry waits
                            # up to that Retry-After for an instance to answer well again
                            # (`_parked`) rather than give up at once (`breaker_open`).
                            # Right after a whole-service outage the callee's breakers
                            # probe one by one, and ours for them stay open as long: given
                            # up, a request was refused while an instance already answered
                            # (tests/test_defects_review45_hop_parked.py). Nothing is sent
                            # while it waits, so an outage costs no call more.
                            # So too when the Retry-After paused only the instance that
                            # sent it (another instance looked free when the retry was
                            # planned: a half-open one, whose probe slot another call
                            # took meanwhile): up to the end of that Retry-After, when the
                            # call could wait it (`RetryAfter.wait_until`). Given up at
                            # once, healthy requests were refused right after an outage
                            # while an instance answered again
                            # (tests/test_defects_review46_hop_half_open.py).
                            park_until = (
                                (
                                    now + delay
                                    if scoped.scope == SCOPE_CALL
                                    else -math.inf
                                    if scoped.wait_until is None
                                    else scoped.wait_until
                                )
                                if scoped is not None
                                and instances is not None
                                and race is None
                                and outcome == IGNORED
                                and response is not None
                                and shed_itself(response)
                                and worth_reading(response)
                                else -math.inf
                            )
                            if park_until > now and not (yield (PARK,)):
                                # (the sync transport: a thread is not held for evidence
                                # that may never come; it gives up at once, as before)
                                park_until = -math.inf
                            prefer: Instance | None = None
                            while True:
                                # (sent then: a microsecond's slack, a wait to a pause's
                                # end ends at its end, whatever the floats' rounding)
                                sent_at = now + delay + 1e-6
                                # An answer without a Retry-After whose retry finds only
                                # paused instances (the one tried just opened its breaker,
                                # say, in an outage of the whole service) waits for the
                                # first pause to end, as a Retry-After the call could wait:
                                # each is at most `retry_after_max_s`. Given up at once
                                # (not exhausted: one attempt), the caller sent the request
                                # again after our advice and C saw a second round
                                # (tests/test_defects_review44_hop_paused.py).
                                g = yield from _gate_next(
                                    ctx, engine, up, local, tried, True, attempt, now, error,
                                    False, sent_at,
                                    _until_deadline(ctx) if scoped is None
                                    else -math.inf if scoped.wait_until is None
                                    else scoped.wait_until,
                                    GIVE_UP_DEADLINE if scoped is None else scoped.refused,
                                    None if scoped is None else scoped.retry_after_s,
                                    None if race is None else race.out,
                                    scoped is not None and scoped.advised,
                                    now < park_until and prefer is None,
                                    prefer,
                                )  # fmt: skip
                                if not g.waits:
                                    break
                                if race is None:
                                    assert response is not None
                                    prefer = yield from _parked(
                                        instances or [], tried, clock, now, park_until,
                                        response,
                                        1 if up.breaker is None
                                        else up.breaker.half_open_probes,
                                    )  # fmt: skip
                                    now = clock.monotonic()
                                    if prefer is None:
                                        # no instance answered in time: given up as before,
                                        # passing on the callee's Retry-After (its breaker
                                        # probed meanwhile, and failed: as long again)
                                        give_up(ctx, up, LAYER_BREAKER, GIVE_UP_BREAKER,
                                                attempt, now, SOURCE_MEMORY, 0.0,
                                                upstream_retry_after_s=None if scoped is None
                                                else scoped.retry_after_s,
                                                upstream_advised=scoped is not None
                                                and scoped.advised)  # fmt: skip
                                        g = _Gated(g.target, g.breaker_key, False, None,
                                                   SOURCE_MEMORY, 0.0, False)  # fmt: skip
                                        break
                                    delay = 0.0  # (it waited longer than any backoff)
                                    continue
                                assert race is not None
                                # Every instance left was tried, and one of them still has
                                # the call's hedge out: no second request to it while the
                                # first is at work. The retry waits for that answer (a good
                                # one ends the call and this loop; a failure: decided again,
                                # with its outcome known). The failed answer is kept as it
                                # is meanwhile: it is the call's answer if no retry follows.
                                ctx.decisions.append(
                                    Decision(LAYER_RETRY, up.key, WAIT_VERDICT, HEDGE_OUT,
                                             SOURCE_MEMORY, 0.0, now,
                                             {"attempt": attempt, "waiting": len(race.out)})
                                )  # fmt: skip
                                waited_from = now
                                yield (WAIT, race)
                                now = clock.monotonic()
                                # (the backoff runs on from the failure, not the wait)
                                delay = max(0.0, delay - (now - waited_from))
                            target, breaker_key, gated, gate, source, age, allowed = g[:7]
                            spent_budget, spent_at = g.spent, g.spent_at
                            if g.resend_at is not None:
                                # no other instance took it after all: the retry goes back
                                # to the one paused, once the Retry-After it sent is over
                                delay = max(delay, g.resend_at - now)
                                scope = SCOPE_CALL
                        if allowed and gate is not None and gate.verdict == "reject":
                            # the breaker refuses the retry: no point in waiting for it
                            last_error = error
                            gate_answer(
                                ctx, up, gate, source, age, attempt, now, last_error,
                                None if scoped is None else scoped.retry_after_s,
                                scoped is not None and scoped.advised,
                            )  # fmt: skip
                        if allowed:
                            # --- decided: record it now, on the state it was decided on
                            # (the backoff is the plan, not the state's age); back off, go
                            # again (the gate is held through the wait)
                            cause = cause_of(response, error)
                            last_error = error
                            previous_delay = delay
                            # A probe slot is not held through a wait: given back now, taken
                            # again when the attempt goes out (`_regate`). Held, another
                            # call could not probe the breaker while this one only waited
                            # (up to a Retry-After: `retry_after_max_s`), and was refused
                            # (tests/test_defects_review46_hop_probe_wait.py).
                            regate = (
                                delay > 0.0 and gate is not None and gated and gate.probe_id != 0
                            )
                            if gate is not None and gate.probe_id and not regate:
                                gate_answer(ctx, up, gate, source, age, attempt, now, error)
                            number = attempt + 1 if race is None else race.next()
                            details: dict[str, DetailValue] = {
                                "attempt": number, "delay_ms": round(delay * 1000.0, 3)
                            }  # fmt: skip
                            if scoped is not None:  # what the response's Retry-After did
                                details["retry_after_s"] = round(scoped.retry_after_s, 3)
                                details["retry_after_scope"] = scope
                            retried = Decision(LAYER_RETRY, up.key, RETRY, cause, source, age,
                                               now, with_why(source, details))  # fmt: skip
                            ctx.decisions.append(retried)
                            marked = (retried,)
                            if spent_budget:
                                unsent = (now, source, spent_at)
                            if regate:
                                assert gate is not None
                                yield from _release(local, breaker_key, breaker, gate, now)
                                gate = None
                            spent, response = response, None
                            if spent is not None:  # (its rest is read: each read short)
                                spend_timeouts(request)
                            interrupted: BaseException | None = None
                            try:
                                yield (SLEEP, delay, spent)
                            except GeneratorExit:
                                raise
                            except BaseException as exc:
                                interrupted = exc
                            if interrupted is not None:
                                # (given back outside the handler: compiled, a generator
                                # that yields in an `except` block and then re-raises
                                # crashed the interpreter)
                                if gate is not None and gated:
                                    yield from _release(local, breaker_key, breaker, gate, now)
                                if unsent is not None:
                                    yield from _unsent(
                                        ctx, up, local, unsent, number, "cancelled",
                                        clock.monotonic(),
                                    )  # fmt: skip
                                raise interrupted
                            now = clock.monotonic()
                            continue
            except GeneratorExit:
                raise
            except BaseException as exc:  # refused, or cancelled, while deciding
                if response is not None:
                    # Refused (the breaker refuses the retry: `CircuitOpen`): the failed
                    # answer is read to its end when short, as before a backoff, so its
                    # connection goes back to the pool. Cancelled: dropped with it.
                    spend = isinstance(exc, Exception)
                    if spend:
                        spend_timeouts(request)
                    with contextlib.suppress(BaseException):
                        yield (CLOSE, response, spend)
                raise
            if response is None:
                assert error is not None
                # said on the error itself, as on a response given up on: the give-up
                # that exhausted this call, or none (not another call's of the request)
                # (Any: compiled, a named tuple's declared type would be unboxed and
                # boxed again as a plain tuple)
                exhausted: Any = gave_up() if (retryable or downstream) and not hedge else None
                with contextlib.suppress(Exception):  # (an error that takes no attribute)
                    setattr(error, GIVE_UP_EXTENSION, exhausted)
                if (
                    (outcome == FAILURE and breaker is not None) or ran_out == SPENT_SHORT
                ) and not hedge:
                    # (our 5xx for it: the upstream's fault, or the caller's short deadline:
                    # not ours either way, for our route breaker and our callers')
                    mark(ctx, False, None, True)
                raise error
            if not hedge and (
                (outcome == FAILURE and breaker is not None)
                or (outcome == IGNORED and response.status_code >= 500)
            ):
                # the call ends on a failure our breaker for the upstream counted, or on a
                # trusted callee's 5xx that says the fault is not its own (a breaker past
                # it counted it, or its control layer refused): our 5xx for it says so
                # (`x-fidelity-fault: upstream`), and our callers' breakers leave it to the
                # breaker that owns it instead of opening on us for it. (Unmarked, A's
                # breaker for B opened on a fault C's breaker for D had counted.)
                mark(ctx, False, None, True)
            if (
                attempt > 1
                and not hedge
                and not (retryable or downstream)
                and response.status_code >= 500
            ):
                # Retried, then answered a 5xx this call does not retry (a 500): this hop
                # owned the call's retries, so it is exhausted as after its last attempt.
                # Unmarked, a caller that retries the status we answer sent the whole
                # round again, once per attempt of its own: attempts^hops.
                forget_give_up()
                give_up(ctx, up, LAYER_RETRY, GIVE_UP_FAILED_AFTER_RETRY, attempt,
                        clock.monotonic(), details={"status": response.status_code})  # fmt: skip
                retryable = True  # (said on the response below, as any give-up)
            if (retryable or downstream) and not hedge:
                # given up on (retries, budget, breaker, deadline, an exhausted callee):
                # said on the response itself, exactly (`raise_for_status()` on it)
                exhausted = gave_up()
                if exhausted is not None:
                    response.extensions[GIVE_UP_EXTENSION] = exhausted
                    # and on the request, for a response built anew from this one (its
                    # request this one's): with the status it was for
                    request.extensions[GIVE_UP_EXTENSION] = (exhausted, response.status_code)
                    if response.status_code == 429 and (
                        attempt > 1 or exhausted.reason in EXHAUSTING_REASONS
                    ):
                        # The upstream throttled us and we gave up on it: no breaker's
                        # failure (a 429 never is), and the app's gateway answer for it
                        # (its own 502, not raised) none of the route breaker's either,
                        # as when the app lets the 429 out (`inbound.watch.owned_upstream`).
                        mark(ctx, False, None, False, True)
            if (
                outcome == SUCCESS
                and (
                    # (no breaker: the instance's failure weight only, `Watch.broke`)
                    (breaker is None or counted is not None or not gated)
                    if target is not None
                    else breaker is not None and counted is not None
                )
                and response.stream.__class__ is not _BYTE_STREAM
            ):  # its body still to be read: a break there fails the call after all
                watch = Watch(ctx, up.key, engine.store, local, breaker_key, breaker, counted,
                              source, target, up.shut, attempt,
                              up.attempt_timeout_s)  # fmt: skip
                watch_body(response, watch)
            if own:
                response.extensions[CONTEXT_EXTENSION] = ctx
            return response
    finally:
        if target is not None:
            _unaim(request, original_url, own_sni)
        restore(request.headers, prior, saved)
        _own_timeouts_back(request, original_timeout)
        if own and observer is not None:
            call_end(observer, ctx)


def _aim(request: httpx.Request, target: Instance, original_url: httpx.URL, own_sni: Any) -> None:
    """Send the attempt to the service's instance `target`."""
    request.url = at_instance(original_url, target.address, target.scheme, target.host, target.port)
    if own_sni is None:
        # HTTPS to an address: TLS speaks the service's name (SNI, and the certificate is
        # verified against it), as the Host header does
        if target.sni:
            request.extensions[SNI_EXTENSION] = original_url.host
        else:
            request.extensions.pop(SNI_EXTENSION, None)


def _unaim(request: httpx.Request, original_url: httpx.URL | None, own_sni: Any) -> None:
    """The request's own URL and TLS name again (`_aim` undone)."""
    if original_url is not None:
        request.url = original_url
    if own_sni is None:
        request.extensions.pop(SNI_EXTENSION, None)


def _own_timeouts_back(request: httpx.Request, original_timeout: Any) -> None:
    """The request's own timeouts again (not the last attempt's, nor the short reads of a
    failed answer's: a request sent again would carry them)."""
    if original_timeout is None:
        request.extensions.pop("timeout", None)
    else:
        request.extensions["timeout"] = original_timeout


def _weigh(
    target: Instance, up: Upstream, response: httpx.Response | None, now: float, ended: float
) -> None:
    """An attempt sent to `target` at `now` is over: one call fewer in flight, and its
    latency estimate with what the attempt took."""
    target.outstanding -= 1
    sample = ended - now
    if (
        response is None or response.status_code >= 500 or response.status_code in up.retry_statuses
    ) and sample <= _known_latency(target, up.instances):
        # A quick failure is no evidence of speed (a slow one is of slowness): taken as
        # one, an instance failing fast would look the fastest and draw more calls. Its
        # estimate stands as of now (not aged as if the instance had not been asked); an
        # unmeasured one stays unmeasured.
        if target.latency_s > 0.0:
            target.latency_at = ended
    else:
        target.latency_s = ewma(target.latency_s, target.latency_at, sample, ended, EWMA_TAU_S)
        target.latency_at = ended


def _answered(target: Instance, up: Upstream, outcome: str, now: float, ended: float) -> None:
    """The instance's answer ended the attempt (no retry to consider): its failure weight,
    and the pause its own `Retry-After` put on it."""
    if outcome != SUCCESS:  # (a status the policy counts as a failure)
        target.failed_at = ended
    elif target.failed_at and now >= target.failed_at:
        target.failed_at = 0.0  # sent after it failed, and answered well
        if target.paused_until > ended:
            # Its pause was its word about itself when it failed; an attempt sent since
            # that it answered well outlives it (as `_evidence` reads it). Kept, it left
            # the instance to first attempts and sent other calls' retries to instances
            # refusing or timing out: calls failed beside an instance answering every
            # call it got (tests/test_defects_review48_usr_paused_instance.py).
            up.unpause(target)


def _gate_now(steps: Generator[Effect, Any, _Gated]) -> _Gated:
    """`_gate_next`'s answer on an in-process store (it asks for no I/O then)."""
    try:
        steps.send(None)
    except StopIteration as done:
        gated: _Gated = done.value
        return gated
    steps.close()
    raise RuntimeError("fidelity_mw: an in-process gate asked for I/O")  # pragma: no cover


# ---------------------------------------------------------------- steps


class _Gated(NamedTuple):
    target: Instance | None  # the service instance picked; None for a plain upstream
    breaker_key: str
    gated: bool  # False when the pick overrides the instance's known-open breaker
    gate: Gate | None
    source: str
    age_s: float
    allowed: bool  # the retry budget's answer (always True for a first attempt)
    spent: bool = False  # a retry was counted on the budget (the store answered, admitted)
    spent_at: float | None = None  # ... at this time of the store's clock, when it said
    resend_at: float | None = None  # the retry waits for its instance's pause to end
    waits: bool = False  # no instance left untried, one with the call's attempt out: wait


# How often a parked retry looks for an instance that answered again (`_parked`): no
# I/O, the instances' state in process memory.
_PARK_STEP_S: Final = 0.05


def _parked(
    instances: list[Instance],
    tried: list[Instance],
    clock: Any,
    now: float,
    until: float,
    shed: httpx.Response,
    first: int = 1,
) -> Generator[Effect, Any, Instance | None]:
    """Wait until `until` for an instance the retry may go to (`_evidence`, paced by
    its ramp: `first` at once); None when none came. It sends nothing and takes no
    budget. The shed it holds is read first (short: `worth_reading`), so the wait holds
    no connection: a pool shared with other upstreams is not drained by calls waiting
    out an outage; a read that fails waits for nothing."""
    try:
        yield (READ, shed)
    except Exception:
        return None
    now = clock.monotonic()
    while now < until:
        yield (SLEEP, min(_PARK_STEP_S, until - now), None)
        now = clock.monotonic()
        found = _evidence(instances, tried, now, first, now >= until)
        if found is not None:
            return found
    return None


def _evidence(
    instances: list[Instance],
    tried: list[Instance],
    now: float,
    first: int = 1,
    last: bool = False,
) -> Instance | None:
    """An instance not tried by the call that answered well since its last failure (and
    so since any pause its Retry-After put on it): its breaker not known open and no
    failure of it since its last success (another call's attempt found it answering), or
    known open and answered around it. Of those, one whose ramp has room for one more
    waiting retry (`ramp_room`: `first` at once, twice as many each step), the one with
    the fewest requests in flight; at the wait's `last` look, one without room too (the
    pace never costs a retry its wait). The instance's ramp counts the retry.
    A breaker's half-open state alone is no evidence: in an outage it is the next
    failure."""
    found: Instance | None = None
    full: Instance | None = None
    least = least_full = 0
    for i in instances:
        if i in tried or (i.paused_until > now and i.failed_at != 0.0):
            # (a pause stands until the instance answers well again: the answer that
            # paused it was a failure (`failed_at`), and only an attempt sent after it
            # that succeeded clears that; a pause outlived by such an answer is no reason
            # to refuse the call: in an outage's end the callee's shed paused instances
            # that answered first attempts well a moment later)
            continue
        if i.answered or (i.open_until <= now and i.failed_at == 0.0):
            sent = 0 if now - i.ramp_last > RAMP_QUIET_S else i.ramp_sent
            load = i.outstanding + sent  # (the retries it took count before they are out)
            if sent == 0 or ramp_room(sent, i.ramp_at, now, first):
                if found is None or load < least:
                    found, least = i, load
            elif full is None or load < least_full:
                full, least_full = i, load
    if found is None:
        if not last or full is None:
            return None
        found = full
    if found.ramp_sent == 0 or now - found.ramp_last > RAMP_QUIET_S:
        found.ramp_at, found.ramp_sent = now, 0  # (a ramp of its own: a new recovery)
    found.ramp_sent += 1
    found.ramp_last = now
    return found


def _until_deadline(ctx: DecisionContext) -> float:
    """Until when a retry may wait for an instance's pause: the deadline (none: any)."""
    deadline_at = ctx.deadline_at
    return math.inf if deadline_at is None else deadline_at


def _gate_next(
    ctx: DecisionContext,
    engine: Engine,
    up: Upstream,
    local: Local | None,
    tried: list[Instance],
    retry: bool,
    attempts_made: int,
    now: float,
    last_error: BaseException | None,
    hedge: bool = False,
    sent_at: float = math.inf,
    wait_until: float = -math.inf,
    refused: str = GIVE_UP_RETRY_AFTER,
    retry_after_s: float | None = None,
    out: list[Instance] | None = None,
    advised: bool = False,
    park: bool = False,
    prefer: Instance | None = None,
) -> Generator[Effect, Any, _Gated]:
    """Pick the target (a service's instance) and take its gate together with the budget:
    one store operation, made again only when the instance's breaker turns out to be open
    (the balancer learns it and picks another; a rejected gate spent no retry). A retry
    (sent at `sent_at`, after its backoff) never goes to an instance a Retry-After
    paused beyond then, but to one whose pause ends by `wait_until` (the call could wait
    the Retry-After that paused it) when no other is left: then after that pause
    (`_Gated.resend_at`); else it gives up, as `refused` (the call's own Retry-After
    reached the deadline: `deadline`). A hedged call's retry whose pick falls back on an
    instance the call tried while one of its attempts is still `out` takes no gate and
    says `waits` (Envoy's previous-hosts predicate gives way then; we wait for the hedge
    instead: a second request to the instance at work only doubles its work). A retry
    that would give up because every instance left is known open (`breaker_open`) says
    `waits` instead when it may `park` (`_parked`): nothing recorded, nothing taken. A
    retry sent to `prefer` (an instance `_evidence` found) goes there."""
    breaker = up.breaker
    instances = up.instances
    target: Instance | None = None
    pick = None
    breaker_key = up.breaker_key
    gated = breaker is not None
    gate: Gate | None = None
    source, age, allowed = SOURCE_REQUEST, 0.0, True
    count = True  # a first attempt counts the request once; a retry asks the budget each time
    if instances is not None and local is not None and local.peek is not None:
        known, keys = up.breaker_keys  # (paired with the list they are of: threads)
        fresh = local.peek(keys if known is instances else [i.breaker_key for i in instances], now)
        if fresh is not None:
            for instance, open_until in zip(instances, fresh, strict=True):
                instance.open_until = open_until
                instance.seen_at = now
    failed = False
    planned_at = sent_at
    resend_at: float | None = None
    for _ in range(len(instances) + 1 if instances else 1):
        sent_at, resend_at = planned_at, None
        if instances is not None:
            if len(instances) == 1:
                # (one instance: `choose`'s answer needs only its breaker's known open time)
                pick = choose_only(instances[0].open_until, now, up.panic_threshold)
            else:
                pick = choose(
                    [i.view(now) for i in instances],
                    # a retry (or hedge) avoids the instances tried, and those a 429 paused
                    [
                        n
                        for n, i in enumerate(instances)
                        if i in tried or (retry and i.paused_until > now)
                    ]
                    if tried or retry
                    else [],
                    now,
                    engine.rng,
                    panic_threshold=up.panic_threshold,
                    max_ejected_ratio=up.max_ejected_ratio,
                    # (all avoided: not one paused when the attempt goes out, if any)
                    paused_at=now if sent_at == math.inf else sent_at,
                    failure_penalty=up.failure_penalty,
                    failure_fade_s=up.failure_fade_s,
                )
            if prefer is not None and prefer in instances:
                # (parked until an instance answered again: the retry goes to that one)
                n = instances.index(prefer)
                pick = Pick(n, pick.reason, pick.panic, prefer.open_until > now, pick.admissible)
            chosen = instances[pick.chosen]
            if (
                retry
                and not hedge
                and chosen is not prefer  # (its evidence outweighs a pause it outlived)
                and ((pick.bypass and not chosen.answered) or chosen.paused_until > sent_at)
            ):
                # (a hedge goes to another instance than those the call waits on, or not)
                pick = _closed_instead(instances, tried, pick, now, sent_at, engine, up)
                until = instances[pick.chosen].paused_until
                if sent_at < until <= wait_until:
                    # Only the instance whose Retry-After the call can wait is left (the
                    # others refused the retry, or were paused meanwhile): the retry goes
                    # there once it is over, as to a single host.
                    sent_at = resend_at = until + 1e-6
                elif until > sent_at:
                    # Only instances paused beyond the retry's backoff are left (the one
                    # whose Retry-After the call could not wait, and whose pause sent the
                    # retry elsewhere, among them): no retry, rather than one they refused.
                    layer = LAYER_RETRY if refused == GIVE_UP_RETRY_AFTER else LAYER_DEADLINE
                    give_up(ctx, up, layer, refused, attempts_made, now, SOURCE_MEMORY, 0.0)
                    paused = instances[pick.chosen]
                    return _Gated(paused, breaker_key, False, None, SOURCE_MEMORY, 0.0, False)
            target = instances[pick.chosen]
            breaker_key = target.breaker_key
            gated = breaker is not None and not pick.bypass
            if retry and pick.bypass and not target.answered:
                if park:  # (the caller waits for evidence first: `_parked`)
                    return _Gated(target, breaker_key, False, None, SOURCE_MEMORY, 0.0, False,
                                  waits=True)  # fmt: skip
                # Overriding an open breaker keeps a call from being refused; a retry is
                # optional: it goes to an instance whose breaker admits it, or to one whose
                # last attempt around its open breaker succeeded, or not at all.
                # (passing on the Retry-After of the answer it was to retry, as the
                # budget's and the gate's refusals do)
                give_up(ctx, up, LAYER_BREAKER, GIVE_UP_BREAKER, attempts_made, now,
                        SOURCE_MEMORY, now - target.seen_at,
                        upstream_retry_after_s=retry_after_s,
                        upstream_advised=advised)  # fmt: skip
                return _Gated(target, breaker_key, False, None, SOURCE_MEMORY, 0.0, False)
            if out and target in tried:
                return _Gated(target, breaker_key, False, None, SOURCE_MEMORY, 0.0, False,
                              waits=True)  # fmt: skip
        failed = False
        budget = retry or count
        count = False
        args = (
            breaker_key,
            breaker if gated else None,
            up.budget_key if budget else None,
            up.retry if budget else None,
            retry,
            now,
        )
        try:
            if local is not None:
                gate, allowed = local.gate(*args)
                # (Any, not the union `_settle` takes: compiled, a value assigned to that
                # union is unboxed and boxed again, a `GateAnswer` as a plain tuple)
                answer: Any = (gate, allowed, SOURCE_MEMORY, 0.0)
            else:
                answer = yield (GATE, *args)
        except Exception as exc:
            answer = exc
        failed = isinstance(answer, Exception)
        # (`GateAnswer`, read before `_settle`: compiled, its argument is unboxed, and
        # boxed again as a plain tuple without these)
        said = getattr(answer, "spent_at", None)  # when a remote store spent the retry
        why = getattr(answer, "why", None)  # why a fallback answer is one
        if not failed:
            fell(why)  # (before `_settle`: the decisions it records say why)
        gate, allowed, source, age = _settle(
            ctx, up, answer, retry, gated, attempts_made, now, last_error, retry_after_s, advised
        )
        if not allowed:
            break
        if target is None or gate is None or gate.verdict != "reject":
            break
        _learned_open(target, gate, breaker, now)
    if allowed and pick is not None and target is not None:
        lb_decision(ctx, up, target, pick, len(instances or ()), now, age)
    # (the store spends a retry only when it admits it and the breaker does not refuse)
    spent = retry and allowed and not failed and (gate is None or gate.verdict != "reject")
    # (every field given: one C call, not the named tuple's keyword wrapper; every call)
    return _new_tuple(
        _Gated,
        (target, breaker_key, gated, gate, source, age, allowed, spent, said if spent else None,
         resend_at, False),
    )  # fmt: skip


def _closed_instead(
    instances: list[Instance],
    tried: list[Instance],
    pick: Pick,
    now: float,
    sent_at: float,
    engine: Engine,
    up: Upstream,
) -> Pick:
    """A retry's pick fell on an instance whose breaker is known open (kept in rotation by
    the ejection bound, or panic): it rather goes to an instance whose breaker is not
    known open and that no 429 paused, one not tried yet first (the power of two choices
    weighs cost alone, and the bound's open instance may cost less), else back to one
    the call tried (as Envoy's previous-hosts predicate gives way when no other host is
    left), than give up as `breaker_open` (which tells callers not to retry either) while
    that instance is there. `pick` when there is none. So too when the pick fell on an
    instance paused beyond the retry's backoff (`sent_at`)."""
    again = [
        n for n, i in enumerate(instances) if i.open_until <= now and i.paused_until <= sent_at
    ]
    if not again:
        return pick
    views = [instances[n].view(now) for n in again]
    used = [k for k, n in enumerate(again) if instances[n] in tried]
    best = choose(
        views,
        used,
        now,
        engine.rng,
        failure_penalty=up.failure_penalty,
        failure_fade_s=up.failure_fade_s,
    )
    return Pick(again[best.chosen], best.reason, pick.panic, False, pick.admissible)


def _gate_hedge(
    ctx: DecisionContext,
    engine: Engine,
    up: Upstream,
    local: Local | None,
    tried: list[Instance],
    race: Race,
    now: float,
) -> Generator[Effect, Any, _Gated]:
    """A hedge's gate: the retry budget and the breaker, as for a retry. A refusal is no
    give-up of the call (its other attempts go on): what the gate would record is replaced
    by one `no_hedge` decision, and `NoHedge` ends this loop. The gate decides on a
    context of its own (its records and flags go to the request's only when it admits
    the hedge): a remote store's gate is awaited, and another call of the request may
    record meanwhile, which taking the gate's records back out of the request's list, as
    before, took with them."""
    own = DecisionContext(engine, ctx.route, ctx.method, ctx.started_at, ctx.deadline_at)
    said: list[Decision] = own._decisions
    sent = race.sent
    layer, why, source, age = LAYER_BUDGET, "store_error", SOURCE_FALLBACK, 0.0
    if up.paused_until > now:
        # A 429's Retry-After pauses retries to the host, and a hedge is one: the call's
        # first attempt waits the pause out for its own retry.
        layer, why, source = LAYER_RETRY, HEDGE_PAUSED, SOURCE_MEMORY
    else:
        try:
            g = yield from _gate_next(own, engine, up, local, tried, True, sent, now, None, True)
        except Exception:  # a store failing closed: the call's other attempts still stand
            pass
        else:
            gate, source, age = g.gate, g.source, g.age_s
            if g.allowed and (gate is None or gate.verdict != "reject"):
                ctx.decisions.extend(said)  # (the instance picked)
                mark(ctx, own.upstream_exhausted, own.shed_by)
                return g
            if gate is not None and gate.verdict == "reject":
                layer, why = LAYER_BREAKER, GIVE_UP_BREAKER
            elif said:
                layer, why = said[-1].layer, said[-1].reason
            else:
                why = GIVE_UP_BUDGET
    details = with_why(source, {"attempts": sent, "why": why})
    ctx.decisions.append(Decision(layer, up.key, REJECT, NO_HEDGE, source, age, now, details))
    raise NoHedge(why)


def _gate_plain(
    ctx: DecisionContext,
    up: Upstream,
    local: Local,
    retry: bool,
    attempts_made: int,
    now: float,
    last_error: BaseException | None,
    retry_after_s: float | None = None,
    advised: bool = False,
) -> tuple[Gate | None, bool, str, float, bool]:
    """`_gate_next` for the common case, without a generator: one upstream, in-process state.
    The last value says whether a retry was counted on the budget (as `_Gated.spent`)."""
    breaker = up.breaker
    answer: tuple[Gate | None, bool, str, float] | Exception
    try:
        gate, allowed = local.gate(up.breaker_key, breaker, up.budget_key, up.retry, retry, now)
        answer = (gate, allowed, SOURCE_MEMORY, 0.0)
    except Exception as exc:
        answer = exc
    gate, allowed, source, age = _settle(
        ctx, up, answer, retry, breaker is not None, attempts_made, now, last_error,
        retry_after_s, advised,
    )  # fmt: skip
    spent = (
        retry
        and allowed
        and not isinstance(answer, Exception)
        and (gate is None or gate.verdict != "reject")
    )
    return gate, allowed, source, age, spent


def _settle(
    ctx: DecisionContext,
    up: Upstream,
    answer: tuple[Gate | None, bool, str, float] | Exception,
    retry: bool,
    gated: bool,
    attempts_made: int,
    now: float,
    last_error: BaseException | None,
    retry_after_s: float | None = None,
    advised: bool = False,
) -> tuple[Gate | None, bool, str, float]:
    """The store's answer to a gate operation (or its failure) as the loop acts on it; a
    retry the budget denies is recorded, with the `Retry-After` of the answer it was to
    retry (`retry_after_s`: the advice for our own answer, as any give-up's; `advised`: a
    trusted callee's advice, spread there already, passed on as it is)."""
    if isinstance(answer, Exception):
        fell(getattr(answer, "why", None) or "error")  # (the decisions on it say why)
        if gated or not retry:
            closed_on_store_error(ctx, up, answer, attempts_made, now, last_error)
        allowed = not retry or not store_failed(ctx, up, "retry budget", answer)
        return None, allowed, SOURCE_FALLBACK, 0.0
    gate, allowed, source, age = answer
    if not retry and gate is None and source == SOURCE_MEMORY:
        source = SOURCE_REQUEST
    if not allowed:
        # (without the upstream's word, the budget's 503 said no wait at all: C's own
        # bulkhead shed B's retries with `Retry-After: 1`, and neither B's answer nor A's
        # passed it on)
        give_up(
            ctx, up, LAYER_BUDGET, GIVE_UP_BUDGET, attempts_made, now, source, age,
            upstream_retry_after_s=retry_after_s, upstream_advised=advised,
        )  # fmt: skip
    return gate, allowed, source, age


def _record_now(
    local: Local, up: Upstream, breaker_key: str, gate: Gate, outcome: str, now: float, ended: float
) -> str:
    """Record an attempt's outcome on in-process state: the breaker state afterwards, or
    "" when the store failed (logged: an outcome lost is no reason to fail the call)."""
    breaker = up.breaker
    assert breaker is not None
    slow = breaker.slow_call_ms is not None and is_slow(breaker, now, ended)
    try:
        state: str = local.record(breaker_key, breaker, gate, outcome, slow, ended)
    except Exception as exc:
        logger.warning(_NOT_RECORDED, up.key, exc)
        return ""
    return state


def _release(
    local: Local | None, breaker_key: str, breaker: BreakerConfig | None, gate: Gate, now: float
) -> Generator[Effect, Any, None]:
    """Give back a gate whose attempt will not be made (frees a probe slot)."""
    if breaker is None:
        return
    try:
        if local is not None:
            local.record(breaker_key, breaker, gate, IGNORED, False, now)
        else:
            yield (RECORD, breaker_key, breaker, gate, IGNORED, False, now)
    except BaseException as exc:  # best effort: the probe lease frees it at the latest
        logger.debug("fidelity_mw: could not release a breaker gate: %s", exc)


def _regate(
    ctx: DecisionContext,
    up: Upstream,
    local: Local | None,
    target: Instance | None,
    breaker_key: str,
    unsent: tuple[float, str, float | None] | None,
    number: int,
    attempts_made: int,
    now: float,
    last_error: BaseException | None,
) -> Generator[Effect, Any, tuple[Gate | None, str, float]]:
    """A retry whose probe slot was given back for its wait takes the breaker's gate again
    as its attempt goes out (the breaker alone: the budget counted the retry when it was
    decided): (gate, source, age). Refused (another call's probe is out, or failed and the
    breaker opened again), or the store failing closed: the budget gets the retry back
    (`retry_not_sent`, why `breaker`) and the call ends as the breaker's refusal."""
    breaker = up.breaker
    assert breaker is not None
    answer: Any  # (Any: compiled, a `GateAnswer` would be unboxed as a plain tuple)
    try:
        if local is not None:
            answer = (local.gate(breaker_key, breaker, None, None, False, now)[0], True,
                      SOURCE_MEMORY, 0.0)  # fmt: skip
        else:
            answer = yield (GATE, breaker_key, breaker, None, None, False, now)
    except Exception as exc:
        answer = exc
    if isinstance(answer, Exception):
        fell(getattr(answer, "why", None) or "error")
        if unsent is not None and ctx.engine.policy.state.on_error == "closed":
            yield from _unsent(ctx, up, local, unsent, number, "breaker", now)
        closed_on_store_error(ctx, up, answer, attempts_made, now, last_error)  # (or raises)
        return None, SOURCE_FALLBACK, 0.0
    fell(getattr(answer, "why", None))
    gate: Gate | None = answer[0]
    source: str = answer[2]
    age: float = answer[3]
    if gate is not None and gate.verdict == "reject":
        if target is not None:
            _learned_open(target, gate, breaker, now)
        if unsent is not None:
            yield from _unsent(ctx, up, local, unsent, number, "breaker", now)
    if gate is not None:
        # (a refusal raises `CircuitOpen`; a probe is recorded as one)
        gate_answer(ctx, up, gate, source, age, attempts_made, now, last_error)
    return gate, source, age


def _unsent(
    ctx: DecisionContext,
    up: Upstream,
    local: Local | None,
    unsent: tuple[float, str, float | None],
    number: int,
    why: str,
    now: float,
) -> Generator[Effect, Any, None]:
    """A retry (or hedge) the budget counted is not sent after all (`why`: `cancelled`
    during its backoff, or the `deadline` passed first): say so, and give it back."""
    spent_at, source, said = unsent
    ctx.decisions.append(
        Decision(LAYER_BUDGET, up.key, REFUND_VERDICT, RETRY_NOT_SENT, source, 0.0, now,
                 with_why(source, {"attempt": number, "why": why}))
    )  # fmt: skip
    age = max(0.0, now - spent_at)
    try:
        if local is not None:
            if local.refund is not None:
                local.refund(up.budget_key, up.retry, age, now)
        else:
            if said is None:
                yield (REFUND, up.budget_key, up.retry, source, age, now)
            else:  # the store's own time of the spend: its bucket, whatever the clocks say
                yield (REFUND, up.budget_key, up.retry, source, age, now, said)
    except BaseException as exc:  # best effort: the window forgets it at the latest
        logger.debug("fidelity_mw: could not give a retry back to the budget: %s", exc)


def _known_latency(target: Instance, instances: list[Instance] | None) -> float:
    """The instance's latency estimate; unmeasured, the fastest measured of the service
    (what the balancer takes for it), or infinite when none is (a failure then tells
    nothing of any speed)."""
    if target.latency_s > 0.0:
        return target.latency_s
    return min((i.latency_s for i in instances or () if i.latency_s > 0.0), default=math.inf)


def _learned_open(target: Instance, gate: Gate, breaker: BreakerConfig | None, now: float) -> None:
    if breaker is not None:
        # (a half-open refusal: its probes are out, here or in another process, and may
        # close it any moment: asked again after the shortest open time at the latest)
        wait = known_open_s(gate.state, gate.retry_after_s, breaker)
    else:
        wait = max(gate.retry_after_s, 0.001)
    target.open_until = now + wait
    target.seen_at = now


def _learned_state(target: Instance, breaker: BreakerConfig, state: str, now: float) -> None:
    if not state:
        return
    target.seen_at = now
    target.answered = False  # its breaker admitted the call: it speaks for itself again
    # The real open time is the breaker's (it starts at open_min_s and grows with failed
    # probes): assume the shortest; when it is over the next pick asks the breaker, whose
    # rejection says how long.
    target.open_until = now + open_time(breaker, 0) if state == OPEN else 0.0


def prepare(
    ctx: DecisionContext,
    up: Upstream,
    request: httpx.Request,
    attempt: int,
    original_timeout: Mapping[str, float | None] | None,
    remaining: float | None,
) -> None:
    """Timeouts, headers and the attempt counter of one attempt."""
    if remaining is not None and remaining < up.uncut_s:
        # (a little inside the deadline: our timeout, not its cancellation, ends a hang)
        bound = deadline_bound_s(remaining)
        bounded = bounded_timeouts(original_timeout, bound)
        request.extensions["timeout"] = bounded
        if up.speaks:
            told = advertised_ms(round(_waits(bounded, bound) * 1000.0))
            stamp(request.headers, attempt, told)
    else:
        request.extensions["timeout"], stamps = attempt_timeouts(up, original_timeout)
        if attempt == 1:
            stamp_first(request.headers, stamps)
        elif stamps:
            stamp(request.headers, attempt, stamps[1][2])
    counts = ctx._attempts  # (the `attempts` property, without its call)
    if counts is None:
        ctx._attempts = {up.key: 1}
    else:
        counts[up.key] = counts.get(up.key, 0) + 1


def _waits(bounded: Mapping[str, float | None], bound_s: float) -> float:
    """How long an attempt with these (capped) timeouts waits for its answer: its read
    timeout (each read, the one for the response's head included), at most `bound_s`.
    The next hop is told that (less a tenth): told the attempt timeout while httpx's read
    timeout is shorter (its default is 5 s, the attempt's 10 s), it worked on, and retried
    its own upstreams, long after this side had timed out and sent its retry."""
    read = bounded.get("read")
    return bound_s if read is None or read > bound_s else read


def attempt_timeouts(
    up: Upstream, timeouts: Mapping[str, float | None] | None
) -> tuple[Mapping[str, float | None], Stamps]:
    """An attempt's timeouts when the whole attempt timeout fits in the deadline: the
    request's own capped at it (the request's own mapping when it caps none of them), and
    a first attempt's headers for them (`x-request-timeout-ms`: the attempt's time, or
    the read timeout when that is shorter, see `_waits`). Remembered with the timeouts
    they came from: a client sends equal ones with every request, and comparing is
    cheaper than capping."""
    seen = up.timeouts
    if seen is not None and timeouts == seen[0]:
        capped = seen[1]
        if capped is None:
            assert timeouts is not None  # (a missing mapping is always capped)
            return timeouts, seen[2]
        # each request its own mapping, as `bounded_timeouts` gives
        return dict(capped), seen[2]
    spoken = up.first_stamps  # (empty: not told; read once, `heard` may change it)
    bounded = bounded_timeouts(timeouts, up.attempt_timeout_s)
    waits = _waits(bounded, up.attempt_timeout_s)
    stamps = (
        spoken
        if waits >= up.attempt_timeout_s or not spoken
        else first_stamps(advertised_ms(round(waits * 1000.0)))
    )
    up.timeouts = (
        None if timeouts is None else dict(timeouts),
        None if bounded is timeouts else dict(bounded),
        stamps,
    )
    if up.first_stamps is not spoken:
        # Another thread's call heard the host meanwhile (`Upstream.heard`) and cleared
        # the cache before this wrote it: headers for what the host was are not kept
        # (`_set_speaks` sets `first_stamps` before it clears the cache).
        up.timeouts = None
    return bounded, stamps
