"""What the attempt loop decides and records, apart from the loop itself: the outcome of
an attempt, the retry plan, the give-ups and their records, the observer calls.

Plain functions over the call's context and upstream plan; none of them does I/O
(the loop asks for that by yielding effects).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextvars import ContextVar, Token
from typing import Any, Final, NamedTuple

import httpx

from .._logs import exception as log_exception
from .._logs import warn
from ..context import (
    ALLOW,
    GIVE_UP,
    LAYER_BREAKER,
    LAYER_DEADLINE,
    LAYER_LB,
    LAYER_RETRY,
    LAYER_STATE,
    PROBE,
    REJECT,
    SOURCE_FALLBACK,
    SOURCE_MEMORY,
    SOURCE_REQUEST,
    Decision,
    DecisionContext,
    DetailValue,
)
from ..decide.balance import Pick, failure_weight, open_in_rotation
from ..decide.breaker import FAILURE, IGNORED, OPEN, SUCCESS, Gate, open_time
from ..decide.retry import (
    ERROR_CONNECT,
    ERROR_NETWORK,
    ERROR_TIMEOUT,
    GIVE_UP_BREAKER,
    GIVE_UP_DEADLINE,
    GIVE_UP_DOWNSTREAM,
    GIVE_UP_RETRY_AFTER,
    RetryPlan,
    exhausting,
    parse_retry_after,
    plan_retry,
    retryable_error,
)
from ..engine import Engine
from ..errors import CircuitOpen, DeadlineExceeded, FidelityError
from ..hooks import AttemptObserver
from ..policy import BreakerConfig
from .advice import FROM_UPSTREAM, retry_hint, retry_spread_s
from .upstream import Instance, Upstream
from .wire import (
    DECIDED_BY,
    EXHAUSTED,
    FAULT_HEADER,
    FAULT_UPSTREAM,
    IDEMPOTENCY_KEY,
    RETRY_SIGNAL_HEADER,
    _new_tuple,
    connected_peer_trusted,
    deadline_bound_s,
    error_kind,
    has_header,
)

logger = logging.getLogger("fidelity_mw")

# Why the latest gate answer of this call's context was decided without the shared state
# ("unreachable", "read_only", "error": `FallbackAnswer.why`, `StateUnavailable.why`):
# every outbound decision taken on a `fallback` answer says it, as the inbound ones do.
# (Set by the loop as each answer arrives, read as the decisions on it are recorded: only
# for a decision whose source is `fallback`, so an older value is never read for a newer
# answer from the state.)
_FELL: Final[ContextVar[str | None]] = ContextVar("fidelity_mw_outbound_fell", default=None)

# The give-up on a response the transport hands back: its
# `response.extensions[GIVE_UP_EXTENSION]` holds the give-up's `Decision` when the call
# gave up retrying that response and so exhausted the upstream (the middleware maps
# `raise_for_status()` on it by this marker, not by the request's records, which two
# calls at once to one upstream share). Noted by `give_up` for the loop of this task
# (each task, thread and hedge has its own).
GIVE_UP_EXTENSION: Final = "fidelity_give_up"
_GAVE_UP: Final[ContextVar[Decision | None]] = ContextVar("fidelity_mw_gave_up", default=None)


class HeldFlags:
    """The marks a hedged call's give-ups would set on the request's context
    (`upstream_exhausted`, `shed_by`), held until the race is over (`hold_flags`): its
    good answer drops them, any other outcome sets them then (`release_flags`). The race
    awaits (its loops' sends, a remote store's gates), and another call of the request
    (`asyncio.gather`) may give up meanwhile: setting the context's flags back to what
    they were when the race began, as before, took that call's marks too."""

    __slots__ = ("ctx", "shed_by", "upstream_exhausted", "upstream_failed", "upstream_throttled")

    def __init__(self, ctx: DecisionContext) -> None:
        self.ctx = ctx
        self.upstream_exhausted = False
        self.upstream_failed = False
        self.upstream_throttled = False
        self.shed_by: str | None = None


# The flags of the hedged call this task runs a loop of (the race's tasks inherit it).
_HELD: Final[ContextVar[HeldFlags | None]] = ContextVar("fidelity_mw_held_flags", default=None)


def hold_flags(ctx: DecisionContext) -> tuple[HeldFlags, Token[HeldFlags | None]]:
    """Hold the flags a hedged call's give-ups set on `ctx`, in this task and the race's."""
    held = HeldFlags(ctx)
    return held, _HELD.set(held)


def release_flags(held: HeldFlags, token: Token[HeldFlags | None], keep: bool) -> None:
    """The race is over: its held flags go to the context (`keep`), or are dropped."""
    _HELD.reset(token)
    if keep:
        mark(
            held.ctx, held.upstream_exhausted, held.shed_by, held.upstream_failed,
            held.upstream_throttled,
        )  # fmt: skip


def mark(
    ctx: DecisionContext,
    exhausted: bool,
    shed_by: str | None,
    failed: bool = False,
    throttled: bool = False,
) -> None:
    """Set `ctx`'s flags (or those a race holds for it): never clears one."""
    flags = _flags(ctx)
    if exhausted:
        flags.upstream_exhausted = True
    if failed:
        flags.upstream_failed = True
    if throttled:
        flags.upstream_throttled = True
    if shed_by is not None and flags.shed_by is None:
        flags.shed_by = shed_by


def _flags(ctx: DecisionContext) -> DecisionContext | HeldFlags:
    held = _HELD.get()
    return held if held is not None and held.ctx is ctx else ctx


def gave_up() -> Decision | None:
    """The give-up `give_up` recorded last in this task (`forget_give_up`) that the call's
    response or error is marked with: an exhausting one, or `retry_after_too_long` after
    an attempt (its readers tell them apart: `decide.retry.exhausting`)."""
    return _GAVE_UP.get()


def forget_give_up() -> None:
    _GAVE_UP.set(None)


def fell(why: object) -> None:
    """A gate answer decided without the shared state (or the store's exception) arrived:
    note why (`GateAnswer.why`, `StateUnavailable.why`; None: the store cannot say)."""
    _FELL.set(why if isinstance(why, str) else None)


def with_why(
    source: str, details: Mapping[str, DetailValue] | None
) -> Mapping[str, DetailValue] | None:
    """`details` of an outbound decision taken on a gate answer, with `fallback_why` when
    the store decided without its state."""
    if source != SOURCE_FALLBACK:
        return details
    why = _FELL.get()
    if why is None:
        return details
    return {**(details or {}), "fallback_why": why}


def lb_decision(
    ctx: DecisionContext,
    up: Upstream,
    target: Instance,
    pick: Pick,
    n: int,
    now: float,
    gate_age_s: float,
) -> None:
    """The pick's decision. Its age is that of the breaker state the attempt goes on: the
    gate's answer when the attempt's gate read the instance's breaker (a rarely called
    service's transport knowledge is old, but the gate just read the shared state), the
    transport's knowledge of it (`seen_at`) when the pick goes around a breaker known
    open without reading it."""
    known_s = now - target.seen_at if target.seen_at else 0.0
    age = known_s if pick.bypass else gate_age_s
    decision = _new_tuple(
        Decision,
        (
            LAYER_LB,
            up.key,
            ALLOW,
            pick.reason,
            SOURCE_MEMORY,
            age,
            now,
            {
                "instance": target.key,
                "outstanding": target.outstanding,
                "latency_ms": round(target.latency_s * 1000.0, 3),
                "admissible": pick.admissible,
                "instances": n,
                "panic": pick.panic,
                "breaker_known_open": pick.bypass,
                "answered_around_open": pick.bypass and target.answered,
                # how much its last failure still weighs in its cost (0.0: none)
                "failure_weight": (
                    round(failure_weight(target.failed_at, now, up.failure_fade_s), 3)
                    if target.failed_at
                    else 0.0
                ),
            },
        ),
    )
    if ctx._pending is None and len(ctx._decisions) < ctx._room_at:
        ctx._decisions.append(decision)  # (`decisions`, without its call)
    else:
        ctx.decisions.append(decision)


def give_up(
    ctx: DecisionContext,
    up: Upstream,
    layer: str,
    reason: str,
    attempts_made: int,
    now: float,
    source: str = SOURCE_REQUEST,
    age_s: float = 0.0,
    *,
    breaker_wait_s: float | None = None,
    upstream_retry_after_s: float | None = None,
    upstream_advised: bool = False,
    details: dict[str, DetailValue] | None = None,
) -> None:
    """Record why there is no (further) attempt; mark the context when we are exhausted.

    The verdict is `reject` when no attempt was made, `give_up` after one. When the
    outbound layer knows how long no attempt could help (advice.py), the record
    carries it (`retry_hint_s`, `retry_hint_from`) with the window the advice is spread
    over (`retry_hint_spread_s`): the middleware turns it into the `Retry-After` of a
    5xx that follows. `upstream_advised`: the upstream's `Retry-After` is a callee's
    advice, spread already (see `advised`): passed on as it is, not spread again.
    Every give-up (the breaker's refusal of a retry too) passes on the `Retry-After` of
    the answer given up on (`upstream_retry_after_s`): the hint is never before it.
    `details`: the record's own details besides these (the caller's dict, added to).
    """
    # (`details` is a dict, not `**details`: mypyc 2.4.1 cannot write the text signature
    # of a function with both a `float` default and `**kwargs`, and fails the build.)
    if details is None:
        details = {}
    instances = up.instances
    opens: list[float] | None = None
    wait_cap: float | None = None
    if instances is not None:
        views = [i.view() for i in instances]
        opens = [v.open_until for v in views]
        if up.breaker is not None and open_in_rotation(
            views,
            now,
            panic_threshold=up.cfg.panic_threshold,
            max_ejected_ratio=up.cfg.max_ejected_ratio,
        ):
            wait_cap = open_time(up.breaker, 0)  # the shortest open time
    hint = retry_hint(
        now,
        instances_open_until=opens,
        instances_wait_cap_s=wait_cap,
        breaker_wait_s=breaker_wait_s,
        upstream_retry_after_s=upstream_retry_after_s,
        paused_until=up.paused_until,
    )
    if hint is not None:
        # An upstream's Retry-After is its word, not ours to pass on unbounded.
        wait = min(hint.wait_s, up.retry.advice_max_s)
        details["retry_hint_s"] = round(wait, 3)
        details["retry_hint_from"] = hint.source
        spread = (
            0.0
            if upstream_advised and hint.source == FROM_UPSTREAM
            else retry_spread_s(wait, up.retry.advice_spread, up.retry.advice_spread_min_s)
        )
        if spread > 0.0:
            details["retry_hint_spread_s"] = round(spread, 3)
    decision = Decision(
        layer,
        up.key,
        GIVE_UP if attempts_made > 0 else REJECT,
        reason,
        source,
        age_s,
        now,
        with_why(source, {"attempts": attempts_made, **details}),
    )
    ctx.decisions.append(decision)
    flags = _flags(ctx)
    if attempts_made == 0 and layer in (LAYER_BREAKER, LAYER_DEADLINE) and flags.shed_by is None:
        flags.shed_by = layer  # refused before anything was sent
    if attempts_made == 0 and up.cfg.client_chosen:
        ctx.refused_client_chosen = True  # (no attempt counted it: the client pays)
    if exhausting(reason, attempts_made, up.retry.attempts):
        flags.upstream_exhausted = True
        _GAVE_UP.set(decision)
    elif reason == GIVE_UP_RETRY_AFTER and attempts_made > 0:
        # Not retried because the upstream (or every other instance of it) asked for a
        # longer wait than this call waits: a control decision of ours, marked on the
        # response as well, though not exhausting (our callers may retry, after the wait)
        _GAVE_UP.set(decision)


def gate_answer(
    ctx: DecisionContext,
    up: Upstream,
    gate: Gate,
    source: str,
    age_s: float,
    attempts_made: int,
    now: float,
    last_error: BaseException | None,
    upstream_retry_after_s: float | None = None,
    upstream_advised: bool = False,
) -> None:
    """Act on the breaker's gate: raise CircuitOpen when it rejects, record probes. A
    retry's refusal passes on the `Retry-After` of the answer it was to retry
    (`upstream_retry_after_s`; a trusted callee's advice, `upstream_advised`, as it is),
    as a budget's refusal does."""
    if gate.verdict == "reject":
        give_up(
            ctx, up, LAYER_BREAKER, GIVE_UP_BREAKER, attempts_made, now, source, age_s,
            breaker_wait_s=gate.retry_after_s,
            upstream_retry_after_s=upstream_retry_after_s, upstream_advised=upstream_advised,
            details={"retry_after_s": round(gate.retry_after_s, 3)},
        )  # fmt: skip
        error = CircuitOpen(
            f"circuit breaker for {up.key} is {gate.state.replace('_', '-')}; "
            f"retry in {gate.retry_after_s:.3f} s",
            host=up.key,
            retry_after_s=gate.retry_after_s,
            attempts_made=attempts_made,
        )
        # chained by hand: compiled, `raise ... from` drops its cause (mypyc 2.4.1)
        error.__cause__ = last_error
        raise error
    if gate.probe_id:
        ctx.decisions.append(
            Decision(
                LAYER_BREAKER,
                up.key,
                PROBE,
                "half_open_probe",
                source,
                age_s,
                now,
                with_why(source, None),
            )
        )


def deadline_passed(
    ctx: DecisionContext,
    up: Upstream,
    attempts_made: int,
    now: float,
    last: BaseException | None,
) -> DeadlineExceeded:
    give_up(ctx, up, LAYER_DEADLINE, GIVE_UP_DEADLINE, attempts_made, now)
    error = DeadlineExceeded(f"deadline exceeded before calling {up.key}", host=up.key)
    error.__cause__ = last
    return error


def store_failed(ctx: DecisionContext, up: Upstream, what: str, exc: Exception) -> bool:
    """A store operation failed: log it; True when the policy says to fail closed."""
    warn(
        logger,
        f"{up.key} {type(exc).__name__}",
        "fidelity_mw: outbound %s for %s without state (%s: %s)",
        what,
        up.key,
        type(exc).__name__,
        exc,
    )
    return ctx.engine.policy.state.on_error == "closed"


def closed_on_store_error(
    ctx: DecisionContext,
    up: Upstream,
    exc: Exception,
    attempts_made: int,
    now: float,
    last_error: BaseException | None,
) -> None:
    """The breaker could not be asked: go ahead (fallback), or refuse when failing closed."""
    if store_failed(ctx, up, "breaker gate", exc):
        # No breaker is open: its state could not be read. The record says so (not
        # `breaker_open`, which the breaker gauge would read as open), and an answer
        # the app makes of the refusal is decided by the state's absence.
        mark(ctx, False, LAYER_STATE if attempts_made == 0 else None)
        reason = f"state_error:{type(exc).__name__}"
        give_up(ctx, up, LAYER_BREAKER, reason, attempts_made, now, SOURCE_FALLBACK)
        mark(ctx, True, None)  # as a breaker's refusal: not to be retried at once
        why = getattr(exc, "why", None)
        what = (
            "on a read-only replica"
            if why == "read_only"
            else "too slow for the request's deadline"
            if why == "deadline"
            else "unreachable"
        )
        # (an upstream without a breaker (`breaker = false`) failed on its retry budget's
        # count: its refusal spoke of a breaker's state all the same)
        state_of = "breaker" if up.breaker is not None else "retry budget"
        error = CircuitOpen(
            f"{state_of} state for {up.key} is {what} and the policy fails closed",
            host=up.key,
            retry_after_s=1.0,
            attempts_made=attempts_made,
            state_error=exc,  # (what the refusal says: no breaker is open)
            state_of=state_of,
        )
        error.__cause__ = exc  # (by hand: compiled, `raise ... from` drops it)
        raise error


def classify(
    engine: Engine,
    up: Upstream,
    target: Instance | None,
    response: httpx.Response | None,
    error: BaseException | None,
) -> tuple[str, bool, bool]:
    """(breaker outcome, retryable, downstream exhausted) of one finished attempt."""
    if response is not None:
        status = response.status_code
        if status >= 500:
            headers = response.headers
            signal = headers.get(RETRY_SIGNAL_HEADER)
            exhausted = signal is not None and signal.strip().lower() == EXHAUSTED
            fault = headers.get(FAULT_HEADER)
            fault_upstream = fault is not None and fault.strip().lower() == FAULT_UPSTREAM
            decided_by = headers.get(DECIDED_BY)
            if (
                decided_by is not None
                and status == 504
                and not exhausted
                and not fault_upstream
                and decided_by.strip().lower() == LAYER_DEADLINE
            ):
                # The callee's deadline ran out in the callee itself (its app, its queue,
                # its arrival), with no call of its own to blame: the time we gave it
                # passed, as if our attempt had timed out (a tenth later). Evidence against
                # the callee, counted here as our own timeout is; ignored, a callee that
                # hangs opened no breaker on any hop. (Out of time at an upstream of its
                # own, the callee says so: `x-fidelity-fault: upstream`, below.)
                decided_by = None
            if (exhausted or decided_by is not None or fault_upstream) and trusted_peer(
                engine, up, target, response
            ):
                # The callee's own control layer answered (it gave up after retrying,
                # a breaker of it refused), or the fault is an upstream's of the callee,
                # counted by the callee's breaker for it: no evidence against the callee,
                # so no failure for our breaker; the breaker next to the fault owns it.
                # An exhausted callee is not retried; another is, after its Retry-After.
                return IGNORED, not exhausted and status in up.retry_statuses, exhausted
        return (
            FAILURE if status in up.fail_statuses else SUCCESS,
            status in up.retry_statuses,
            False,
        )
    assert error is not None
    kind = error_kind(error)
    # Connect errors, timeouts and broken connections count against the
    # host; our own pool, bad URLs and bugs do not.
    outcome = FAILURE if kind in (ERROR_CONNECT, ERROR_TIMEOUT, ERROR_NETWORK) else IGNORED
    return outcome, retryable_error(kind, up.retry), False


def shed_itself(response: httpx.Response) -> bool:
    """A trusted callee's 5xx that `classify` ignored: did its own control layer refuse
    the request itself (a route breaker's shed, a limit), rather than relay an upstream's
    fault of its own or give up after retrying?"""
    headers = response.headers
    if headers.get(DECIDED_BY) is None:
        return False
    fault = headers.get(FAULT_HEADER)
    retried = headers.get(RETRY_SIGNAL_HEADER)
    return (fault is None or fault.strip().lower() != FAULT_UPSTREAM) and (
        retried is None or retried.strip().lower() != EXHAUSTED
    )


# `deadline_spent`: how a failed attempt's time ran out
SPENT: Final = 1  # at the rest of the deadline, which bounded the attempt
SPENT_SHORT: Final = 2  # ... and that rest was under half the attempt timeout


def deadline_spent(
    ctx: DecisionContext,
    up: Upstream,
    request: httpx.Request,
    response: httpx.Response | None,
    error: BaseException | None,
    started: float,
    ended: float,
) -> int:
    """Did this failed attempt (from `started` to `ended`) end because the rest of the
    deadline ran out? 0 when not: its time was its whole attempt timeout, or a shorter
    timeout of the caller's client ended it, or it failed otherwise or sooner. `SPENT`
    when the deadline bounded it (`prepare`) and it timed out at that bound (our
    timeout, or the callee's deadline 504 for the time we told it): a retry has only the
    margin left (at most a tenth of what this attempt had), so there is none.
    `SPENT_SHORT` when that time was also under half the attempt timeout: a caller's
    deadline that short is its choice, and a callee that could not answer in it is no
    more failing than one our own attempt timeout would have waited for (the route
    breaker leaves the deadline's 504 alone for the same reason). Counted, a client that
    sends short deadlines opened our breakers for a healthy callee, and every other
    request lost it.
    """
    deadline_at = ctx.deadline_at
    if deadline_at is None:
        return 0
    left = deadline_at - started
    if left >= up.uncut_s:
        return 0
    key = "read"
    if response is not None:
        if response.status_code != 504:
            return 0
        decided = response.headers.get(DECIDED_BY)
        if decided is None or decided.strip().lower() != LAYER_DEADLINE:
            return 0
    elif not isinstance(error, httpx.TimeoutException) or isinstance(
        error, httpx.PoolTimeout | FidelityError
    ):
        return 0
    elif isinstance(error, httpx.ConnectTimeout):
        key = "connect"
    elif isinstance(error, httpx.WriteTimeout):
        key = "write"
    given = deadline_bound_s(left)
    if ended - started < given * 0.5:
        return 0  # not at the bound: a timeout (or a 504) of another's, sooner
    timeouts = request.extensions.get("timeout")
    bound = timeouts.get(key) if isinstance(timeouts, Mapping) else None
    if bound is not None and bound < given * 0.999999:
        return 0  # the client's own shorter timeout ended it, not the deadline
    return SPENT_SHORT if left < up.attempt_timeout_s * 0.5 else SPENT


def advised(
    engine: Engine, up: Upstream, target: Instance | None, response: httpx.Response | None
) -> bool:
    """Is this 5xx's `Retry-After` a trusted callee's advice after its own give-up (its
    answer says `x-fidelity-retry: exhausted` or `x-fidelity-fault: upstream`, which its
    middleware writes, with the advice, spread over its window)? Spread again at every
    hop, C's `Retry-After: 5` reached the client of A -> B -> C as up to 12 s, each hop
    adding half of what it was told: the client waited for a spread of spreads, long
    after C was back. The hop next to the give-up spreads it, once."""
    if response is None or response.status_code < 500:
        return False
    headers = response.headers
    signal = headers.get(RETRY_SIGNAL_HEADER)
    fault = headers.get(FAULT_HEADER)
    marked = (signal is not None and signal.strip().lower() == EXHAUSTED) or (
        fault is not None and fault.strip().lower() == FAULT_UPSTREAM
    )
    return marked and trusted_peer(engine, up, target, response)


def trusted_peer(
    engine: Engine, up: Upstream, target: Instance | None, response: httpx.Response
) -> bool:
    """Is the peer that answered inside `trusted_peers` (its signals are believed)? A DNS
    name is judged by the address its connection reached, unless that is a proxy's."""
    trusted = up.trusted if target is None else target.trusted
    if trusted is None:
        trusted = not up.proxied and connected_peer_trusted(response, engine.trusted_peers)
    return trusted


# What a planned retry did with the failed response's `Retry-After` (`RetryAfter.scope`,
# the retry decision's `retry_after_scope`).
SCOPE_CALL: Final = "call"  # waited before the retry: it goes to the same host or instance
SCOPE_INSTANCE: Final = "instance"  # paused only the instance that sent it: the retry goes
# to another instance after the plain backoff
SCOPE_SERVICE: Final = "service"  # (`retry_after_scope`: a service's speaks for them all)


class RetryAfter(NamedTuple):
    """The failed response's `Retry-After` and what the retry planned on it does."""

    retry_after_s: float
    scope: str  # SCOPE_CALL or SCOPE_INSTANCE
    # SCOPE_INSTANCE: until when the call could still wait it, should the retry find no
    # other instance after all (another's gate refuses it); None when it could not.
    wait_until: float | None = None
    # ... and then why the call gives up: the wait reaches the deadline, or is too long
    refused: str = GIVE_UP_RETRY_AFTER
    # a trusted callee's advice (`advised`): a refusal of the retry passes it on as it is
    advised: bool = False


def own_word(up: Upstream, target: Instance | None) -> bool:
    """Does a `Retry-After` from `target` speak for that instance alone: one of a service
    of several whose `retry_after_scope` is `instance`? (A service of one answers as a
    plain host; one scoped `service` too, with all of its instances.)"""
    instances = up.instances
    return (
        target is not None
        and instances is not None
        and len(instances) > 1
        and up.cfg.retry_after_scope != SCOPE_SERVICE
    )


def heed_retry_after(
    engine: Engine, up: Upstream, target: Instance | None, response: httpx.Response, now: float
) -> None:
    """An instance's retryable answer that no retry is planned on (a hedge's): its
    `Retry-After` pauses it all the same, as `plan_call` pauses the instance a call's
    answer came from."""
    if own_word(up, target):
        retry_after = parse_retry_after(response.headers.get("retry-after"), engine.clock.wall())
        if retry_after is not None:
            up.pause(target, now + min(retry_after, up.retry.retry_after_max_s))


def plan_call(
    engine: Engine,
    ctx: DecisionContext,
    up: Upstream,
    request: httpx.Request,
    response: httpx.Response | None,
    attempt: int,
    downstream: bool,
    breaker_state: str,
    previous_delay: float | None,
    replayable: bool,
    now: float,
    target: Instance | None = None,
    used: Sequence[Instance] = (),
    spent: bool = False,
) -> tuple[RetryPlan, RetryAfter | None]:
    """Retry this retryable failure? Records the give-up (but not a budget one) if not.
    `used`: the instances of the service the call sent to before (its hedges' too).

    A `Retry-After` on the response is one instance's word about itself (as Envoy and
    Finagle take it) for a service of several (`own_word`): that instance is paused for
    it (at most `retry_after_max_s`) whatever the call does next, and when the service
    has another instance the retry may go to, the retry goes there after its plain
    backoff (`SCOPE_INSTANCE`). Otherwise (a plain host, no other instance, or a
    service whose `retry_after_scope` is `service`) the call waits it before the retry
    (`SCOPE_CALL`), or gives up when it cannot; a planned retry after a 429 then pauses
    the host (the service) for it. `spent`: the attempt timed out at the rest of the
    deadline (`deadline_spent`): what is left is no time for another."""
    status: int | None = None
    retry_after: float | None = None
    breaker_wait: float | None = None
    scoped: RetryAfter | None = None
    own = own_word(up, target)
    if response is not None:
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("retry-after"), engine.clock.wall())
    if downstream:
        plan = RetryPlan(False, 0.0, GIVE_UP_DOWNSTREAM)
    elif breaker_state == OPEN:  # our failure (or another's) just opened it: stop now
        plan = RetryPlan(False, 0.0, GIVE_UP_BREAKER)
        if up.breaker is not None:  # it just opened: its shortest open time at least
            breaker_wait = open_time(up.breaker, 0)
    else:
        deadline_at = ctx.deadline_at
        remaining = None if deadline_at is None else 0.0 if spent else deadline_at - now
        wait = retry_after
        if retry_after is not None and own and _another(up, target, used, now):
            # One instance's Retry-After is about that instance (as its 429's pause is):
            # it is paused for what it said (below), and the retry goes to another one
            # after its backoff (one the call has not tried, not paused, not known open:
            # the retry's pick goes there, never back to the paused one while another is
            # there), whether the call could have waited it or not.
            late = remaining is not None and retry_after >= remaining
            waitable = retry_after <= up.retry.retry_after_max_s and not late
            scoped = RetryAfter(
                retry_after,
                SCOPE_INSTANCE,
                now + retry_after + 1e-6 if waitable else None,
                GIVE_UP_DEADLINE if late else GIVE_UP_RETRY_AFTER,
                advised(engine, up, target, response),
            )
            wait = 0.0 if status == 429 else None  # (a 429's is usable: not `missing`)
        elif retry_after is not None:
            scoped = RetryAfter(
                retry_after, SCOPE_CALL, advised=advised(engine, up, target, response)
            )
        plan = plan_retry(
            cfg=up.retry,
            attempt=attempt,
            idempotent=request.method in up.retry_methods
            or has_header(request.headers, IDEMPOTENCY_KEY),
            replayable=replayable,
            downstream_exhausted=False,
            retry_after_s=wait,
            status=status,
            remaining_s=remaining,
            rng=engine.rng,
            previous_delay_s=previous_delay,
            paused_s=max(0.0, up.paused_until - now),
        )
    if not plan.retry:
        reason = plan.reason
        layer = (
            LAYER_DEADLINE
            if reason == GIVE_UP_DEADLINE
            else LAYER_BREAKER
            if reason == GIVE_UP_BREAKER
            else LAYER_RETRY
        )
        give_up(
            ctx, up, layer, reason, attempt, now,
            breaker_wait_s=breaker_wait, upstream_retry_after_s=retry_after,
            upstream_advised=retry_after is not None and advised(engine, up, target, response),
        )  # fmt: skip
        scoped = None
    if retry_after is not None:
        pause = now + min(retry_after, up.retry.retry_after_max_s)  # never beyond the cap
        if own:
            # An instance's word about itself stands whatever the call does with it (goes
            # elsewhere, waits it, gives up): other calls' retries and hedges keep away.
            up.pause(target, pause)
        elif status == 429 and plan.retry:
            # A planned retry after a 429 pauses other calls' retries to this host (to
            # this instance of a service of one, to every instance of one scoped
            # `service`) too (a refused Retry-After pauses nothing).
            up.pause(None if up.cfg.retry_after_scope == SCOPE_SERVICE else target, pause)
    return plan, scoped


# ---------------------------------------------------------------- small helpers


def _another(up: Upstream, target: Instance | None, used: Sequence[Instance], now: float) -> bool:
    """Is there an instance of the service besides `target` that a retry may go to now:
    not tried by the call, not paused by a 429, not known open?"""
    return any(
        i is not target and i not in used and i.paused_until <= now and i.open_until <= now
        for i in up.instances or ()
    )


def is_slow(breaker: BreakerConfig, started: float, ended: float) -> bool:
    """A slow call for the host breaker's slow-call ratio (`slow_call_ms`)."""
    limit = breaker.slow_call_ms
    return limit is not None and (ended - started) * 1000.0 >= limit


def cause_of(response: httpx.Response | None, error: BaseException | None) -> str:
    """The reason recorded on the retry that follows this failure."""
    if response is not None:
        return f"status_{response.status_code}"
    assert error is not None
    return f"{error_kind(error)}_error"


def observe_start(
    observer: AttemptObserver | None,
    ctx: DecisionContext,
    request: httpx.Request,
    attempt: int,
) -> Any:
    if observer is None:
        return None
    try:
        return observer.attempt_start(ctx, request, attempt)
    except Exception:
        # the app's code, failing on every call while it is broken: one traceback per interval
        log_exception(logger, "observer", "fidelity_mw: attempt observer failed")
        return None


def observe_end(
    observer: AttemptObserver | None,
    token: Any,
    response: httpx.Response | None,
    error: BaseException | None,
) -> None:
    if observer is None:
        return
    try:
        observer.attempt_end(token, response, error)
    except Exception:
        # the app's code, failing on every call while it is broken: one traceback per interval
        log_exception(logger, "observer", "fidelity_mw: attempt observer failed")


def call_end(observer: AttemptObserver, ctx: DecisionContext) -> None:
    """A call made outside any request is over: no RequestObserver will see it."""
    call_end = getattr(observer, "call_end", None)  # hooks.CallObserver, optional
    if call_end is None:
        return
    try:
        call_end(ctx)
    except Exception:
        # the app's code, failing on every call while it is broken: one traceback per interval
        log_exception(logger, "observer", "fidelity_mw: attempt observer failed")
