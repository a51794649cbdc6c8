"""The attempt loop, sans I/O: one generator that both transports drive.

`attempts(...)` yields effects and takes their results back:

- `(SEND, request)` -> the response (or the inner transport's exception, thrown in);
- `(SLEEP, seconds, response)` -> None: close `response` (a failed attempt's), then wait;
- `(GATE, breaker_key, breaker, budget_key, cfg, retry, now)` -> the store's
  `outbound_gate` answer `(gate, allowed, source, age_s)` (or its exception);
- `(RECORD, breaker_key, breaker, gate, outcome, slow, now)` -> the store's `record`
  answer (the breaker state afterwards, or its exception);
- `(CLOSE, response)` -> None: close a response we will not hand back;
- `(PEEK, breaker_keys, now)` -> until when each breaker is open (0.0: not open),
  or None when the store cannot say without a round trip (the balancer then
  uses what it learned from earlier answers).

It returns the response for the caller, or raises (`CircuitOpen`,
`DeadlineExceeded`, the last transport error). The async transport awaits the
effects, the sync one blocks on them: the order of decisions, the store
operations and their number are the same for both by construction.

Per call, outermost first: pick the instance (services only), the deadline,
the host (or instance) breaker, the attempt, then on a retryable failure the
retry plan, the budget and the next gate (one store operation), the backoff.
Every exit that makes no attempt gives back what it took: a probe slot held
for an attempt that is not made (deadline passed, cancelled during backoff)
is released with an `ignored` outcome.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator, Mapping
from typing import Any, Final, NamedTuple

import httpx

from ..context import (
    ALLOW,
    GIVE_UP,
    LAYER_BREAKER,
    LAYER_BUDGET,
    LAYER_DEADLINE,
    LAYER_LB,
    LAYER_RETRY,
    PROBE,
    REJECT,
    RETRY,
    SOURCE_FALLBACK,
    SOURCE_MEMORY,
    SOURCE_REQUEST,
    Decision,
    DecisionContext,
    DetailValue,
)
from ..decide.balance import EWMA_TAU_S, choose, ewma
from ..decide.breaker import FAILURE, IGNORED, OPEN, SUCCESS, Gate
from ..decide.retry import (
    ERROR_CONNECT,
    ERROR_NETWORK,
    ERROR_TIMEOUT,
    EXHAUSTING_REASONS,
    GIVE_UP_ATTEMPTS,
    GIVE_UP_BREAKER,
    GIVE_UP_BUDGET,
    GIVE_UP_DEADLINE,
    GIVE_UP_DOWNSTREAM,
    IDEMPOTENT_METHODS,
    RetryPlan,
    parse_retry_after,
    plan_retry,
    retryable_error,
)
from ..engine import Engine
from ..errors import CircuitOpen, DeadlineExceeded
from ..hooks import AttemptObserver
from ..policy import BreakerConfig
from .upstream import Instance, Upstream
from .wire import (
    DECIDED_BY,
    EXHAUSTED,
    IDEMPOTENCY_KEY,
    RETRY_SIGNAL_HEADER,
    bounded_timeouts,
    connected_peer_trusted,
    error_kind,
    has_header,
    replayable,
    stamp,
    take_ours,
    unstamp,
)

logger = logging.getLogger("fidelity_mw")

SEND: Final = 0
SLEEP: Final = 1
GATE: Final = 2
RECORD: Final = 3
CLOSE: Final = 4
PEEK: Final = 5

CONTEXT_EXTENSION: Final = "fidelity_context"
_ASSUMED_OPEN_S: Final = 0.5

Effect = tuple[Any, ...]
Steps = Generator[Effect, Any, httpx.Response]

_FIRST_ATTEMPT: Final[Mapping[str, DetailValue]] = {"attempt": 1}
_new_tuple = tuple.__new__  # Decision(...) without the keyword-default wrapper: hot path only


def attempts(
    ctx: DecisionContext,
    engine: Engine,
    up: Upstream,
    request: httpx.Request,
    own: bool,
    observer: AttemptObserver | None,
    now: float,
) -> Steps:
    """One outbound call: every attempt, decision and wait, as effects (module docstring)."""
    clock = engine.clock
    breaker = up.breaker
    instances = up.instances
    original_url = request.url
    original_timeout = request.extensions.get("timeout")
    # Only a body held in memory can be sent again; judged before the first
    # attempt, which consumes a streaming one (and may buffer it).
    can_replay = replayable(request.stream)
    tried: list[int] = []
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
    prior = take_ours(request.headers)
    try:
        if ctx.deadline_at is not None and ctx.deadline_at - now <= 0.0:
            raise _deadline_passed(ctx, up, 0, now, None)  # nothing taken yet
        # --- first attempt: count the request on the budget and gate the target
        g = yield from _gate_next(ctx, engine, up, tried, False, 0, now, None)
        target, breaker_key, gated, gate, source, age = g[:6]
        while True:
            attempt += 1
            deadline_at = ctx.deadline_at
            remaining = None if deadline_at is None else deadline_at - now
            if remaining is not None and remaining <= 0.0:
                if gate is not None and gated:
                    yield from _release(breaker_key, breaker, gate, now)
                raise _deadline_passed(ctx, up, attempt - 1, now, last_error)
            if gate is not None and gate.verdict != "allow":
                _gate_answer(ctx, up, gate, source, age, attempt - 1, now, last_error)
            # --- the attempt
            _prepare(ctx, up, request, attempt, original_timeout, remaining)
            if target is not None:
                request.url = original_url.copy_with(
                    scheme=target.scheme, host=target.host, port=target.port
                )
            if attempt == 1:
                ctx.decisions.append(
                    _new_tuple(
                        Decision,
                        (LAYER_RETRY, up.key, ALLOW, "attempt", source, age, now, _FIRST_ATTEMPT),
                    )
                )
            else:
                details = {"attempt": attempt, "delay_ms": round(delay * 1000.0, 3)}
                ctx.decisions.append(
                    Decision(LAYER_RETRY, up.key, RETRY, cause, source, age, now, details)
                )
            token = _observe_start(observer, ctx, request, attempt) if observer else None
            response: httpx.Response | None = None
            error: BaseException | None = None
            if target is not None:
                target.outstanding += 1
            try:
                response = yield (SEND, request)
            except Exception as exc:
                error = exc
            except GeneratorExit:
                raise
            except BaseException as exc:  # cancelled or interrupted: never retried
                if target is not None:
                    target.outstanding -= 1
                if gate is not None and gated:
                    yield from _release(breaker_key, breaker, gate, now)
                _observe_end(observer, token, None, exc)
                raise
            ended = clock.monotonic()
            if target is not None:
                target.outstanding -= 1
                target.latency_s = ewma(
                    target.latency_s, target.latency_at, ended - now, ended, EWMA_TAU_S
                )
                target.latency_at = ended
            try:
                if (
                    response is not None
                    and (status := response.status_code) < 500
                    and (status not in up.retry_statuses)
                ):  # the success path, inlined
                    outcome = FAILURE if status in up.fail_statuses else SUCCESS
                    retryable = downstream = False
                else:
                    outcome, retryable, downstream = _outcome(engine, up, target, response, error)
                state = ""
                if gate is not None and gated:
                    assert breaker is not None
                    slow = breaker.slow_call_ms is not None and _slow(breaker, now, ended)
                    try:
                        state = yield (RECORD, breaker_key, breaker, gate, outcome, slow, ended)
                    except Exception as exc:
                        logger.warning(
                            "fidelity_mw: could not record an outcome for %s: %s", up.key, exc
                        )
                    if target is not None:
                        _learned_state(target, breaker, state, ended)
                gate = None
                if observer is not None:
                    _observe_end(observer, token, response, error)
                if retryable or downstream:
                    # --- a retryable failure: retry, or give up with a reason
                    now = clock.monotonic()
                    plan = _plan(
                        engine, ctx, up, request, response, attempt, downstream,
                        state if target is None else "", previous_delay, can_replay, now,
                    )  # fmt: skip
                    if plan.retry:
                        # the retry's budget and the next target's gate: one store operation
                        if target is not None and instances is not None:
                            tried.append(instances.index(target))
                        g = yield from _gate_next(ctx, engine, up, tried, True, attempt, now, error)
                        target, breaker_key, gated, gate, source, age, allowed = g
                        if (
                            allowed
                            and target is None
                            and gate is not None
                            and gate.verdict == "reject"
                        ):
                            # the breaker refuses the retry: no point in waiting for it
                            last_error = error
                            _gate_answer(ctx, up, gate, source, age, attempt, now, last_error)
                        if allowed:
                            # --- back off, go again (the gate is held through the wait)
                            cause = _cause(response, error)
                            last_error = error
                            delay = previous_delay = plan.delay_s
                            age += delay  # the gate was read before the wait: that much older
                            spent, response = response, None
                            try:
                                yield (SLEEP, delay, spent)
                            except GeneratorExit:
                                raise
                            except BaseException:
                                if gate is not None and gated:
                                    yield from _release(breaker_key, breaker, gate, now)
                                raise
                            now = clock.monotonic()
                            continue
            except GeneratorExit:
                raise
            except BaseException:  # cancelled while deciding: do not leak the connection
                if response is not None:
                    with contextlib.suppress(BaseException):
                        yield (CLOSE, response)
                raise
            if response is None:
                assert error is not None
                raise error
            if own:
                response.extensions[CONTEXT_EXTENSION] = ctx
            return response
    finally:
        request.url = original_url
        unstamp(request.headers, prior)
        if own and observer is not None:
            _call_end(observer, ctx)


# ---------------------------------------------------------------- steps


class _Gated(NamedTuple):
    target: Instance | None  # the service instance picked; None for a plain upstream
    breaker_key: str
    gated: bool  # False when the pick overrides the instance's known-open breaker
    gate: Gate | None
    source: str
    age_s: float
    allowed: bool  # the retry budget's answer (always True for a first attempt)


def _gate_next(
    ctx: DecisionContext,
    engine: Engine,
    up: Upstream,
    tried: list[int],
    retry: bool,
    attempts_made: int,
    now: float,
    last_error: BaseException | None,
) -> Generator[Effect, Any, _Gated]:
    """Pick the target (a service's instance) and take its gate together with the budget:
    one store operation, made again only when the instance's breaker turns out to be open
    (the balancer learns it and picks another; a rejected gate spent no retry)."""
    breaker = up.breaker
    instances = up.instances
    target: Instance | None = None
    pick = None
    breaker_key = up.breaker_key
    gated = breaker is not None
    gate: Gate | None = None
    source, age, allowed = SOURCE_REQUEST, 0.0, True
    count = True  # a first attempt counts the request once; a retry asks the budget each time
    if instances is not None:
        fresh = yield (PEEK, [i.breaker_key for i in instances], now)
        if fresh is not None:
            for instance, open_until in zip(instances, fresh, strict=True):
                instance.open_until = open_until
                instance.seen_at = now
    for _ in range(len(instances) + 1 if instances else 1):
        if instances is not None:
            pick = choose(
                [i.view() for i in instances],
                tried,
                now,
                engine.rng,
                panic_threshold=up.cfg.panic_threshold,
                max_ejected_ratio=up.cfg.max_ejected_ratio,
            )
            target = instances[pick.chosen]
            breaker_key = target.breaker_key
            gated = breaker is not None and not pick.bypass
            if retry and pick.bypass:
                # Overriding an open breaker keeps a call from being refused; a retry is
                # optional: it goes to an instance whose breaker admits it, or not at all.
                _give_up(ctx, up, LAYER_BREAKER, GIVE_UP_BREAKER, attempts_made, now,
                         SOURCE_MEMORY, now - target.seen_at)  # fmt: skip
                return _Gated(target, breaker_key, False, None, SOURCE_MEMORY, 0.0, False)
        budget = retry or count
        count = False
        try:
            gate, allowed, source, age = yield (
                GATE,
                breaker_key,
                breaker if gated else None,
                up.budget_key if budget else None,
                up.retry if budget else None,
                retry,
                now,
            )
        except Exception as exc:
            gate, source, age = None, SOURCE_FALLBACK, 0.0
            if gated or not retry:
                _closed_on_store_error(ctx, up, exc, attempts_made, now, last_error)
            allowed = not retry or not _store_failed(ctx, up, "retry budget", exc)
        if not retry and gate is None and source == SOURCE_MEMORY:
            source = SOURCE_REQUEST
        if not allowed:
            _give_up(ctx, up, LAYER_BUDGET, GIVE_UP_BUDGET, attempts_made, now, source, age)
            break
        if target is None or gate is None or gate.verdict != "reject":
            break
        _learned_open(target, gate, now)
    if allowed and pick is not None and target is not None:
        _lb_decision(ctx, up, target, pick, len(instances or ()), now)
    return _Gated(target, breaker_key, gated, gate, source, age, allowed)


def _release(
    breaker_key: str, breaker: BreakerConfig | None, gate: Gate, now: float
) -> Generator[Effect, Any, None]:
    """Give back a gate whose attempt will not be made (frees a probe slot)."""
    if breaker is None:
        return
    try:
        yield (RECORD, breaker_key, breaker, gate, IGNORED, False, now)
    except BaseException as exc:  # best effort: the probe lease frees it at the latest
        logger.debug("fidelity_mw: could not release a breaker gate: %s", exc)


def _learned_open(target: Instance, gate: Gate, now: float) -> None:
    target.open_until = now + max(gate.retry_after_s, 0.001)
    target.seen_at = now


def _learned_state(target: Instance, breaker: BreakerConfig, state: str, now: float) -> None:
    if not state:
        return
    target.seen_at = now
    # The real open time is the breaker's (it may start short and grow): assume a short
    # one; when it is over the next pick asks the breaker, whose rejection says how long.
    target.open_until = now + min(breaker.open_s, _ASSUMED_OPEN_S) if state == OPEN else 0.0


def _lb_decision(
    ctx: DecisionContext, up: Upstream, target: Instance, pick: Any, n: int, now: float
) -> None:
    ctx.decisions.append(
        Decision(
            LAYER_LB,
            up.key,
            ALLOW,
            pick.reason,
            SOURCE_MEMORY,
            now - target.seen_at if target.seen_at else 0.0,
            now,
            {
                "instance": target.key,
                "outstanding": target.outstanding,
                "latency_ms": round(target.latency_s * 1000.0, 3),
                "admissible": pick.admissible,
                "instances": n,
                "panic": pick.panic,
                "breaker_known_open": pick.bypass,
            },
        )
    )


def _prepare(
    ctx: DecisionContext,
    up: Upstream,
    request: httpx.Request,
    attempt: int,
    original_timeout: Mapping[str, float | None] | None,
    remaining: float | None,
) -> None:
    """Timeouts, headers and the attempt counter of one attempt."""
    bound = up.attempt_timeout_s
    if remaining is not None and remaining < bound:
        bound = remaining
        ms = round(remaining * 1000.0)
        timeout_header = str(ms if ms > 0 else 1).encode()
    else:
        timeout_header = up.timeout_header
    request.extensions["timeout"] = bounded_timeouts(original_timeout, bound)
    stamp(request.headers, attempt, timeout_header)
    counts = ctx.attempts
    counts[up.key] = counts.get(up.key, 0) + 1


def _give_up(
    ctx: DecisionContext,
    up: Upstream,
    layer: str,
    reason: str,
    attempts_made: int,
    now: float,
    source: str = SOURCE_REQUEST,
    age_s: float = 0.0,
    **details: DetailValue,
) -> None:
    """Record why there is no (further) attempt; mark the context when we are exhausted.

    The verdict is `reject` when no attempt was made, `give_up` after one.
    """
    ctx.decisions.append(
        Decision(
            layer,
            up.key,
            GIVE_UP if attempts_made > 0 else REJECT,
            reason,
            source,
            age_s,
            now,
            {"attempts": attempts_made, **details},
        )
    )
    if attempts_made == 0 and layer in (LAYER_BREAKER, LAYER_DEADLINE) and ctx.shed_by is None:
        ctx.shed_by = layer  # refused before anything was sent
    # "attempts" with retries configured off is not exhaustion: we did
    # not retry, so the caller is the nearest owner and may.
    if reason in EXHAUSTING_REASONS and (reason != GIVE_UP_ATTEMPTS or up.retry.attempts > 1):
        ctx.upstream_exhausted = True


def _gate_answer(
    ctx: DecisionContext,
    up: Upstream,
    gate: Gate,
    source: str,
    age_s: float,
    attempts_made: int,
    now: float,
    last_error: BaseException | None,
) -> None:
    """Act on the breaker's gate: raise CircuitOpen when it rejects, record probes."""
    if gate.verdict == "reject":
        _give_up(
            ctx, up, LAYER_BREAKER, GIVE_UP_BREAKER, attempts_made, now, source, age_s,
            retry_after_s=round(gate.retry_after_s, 3),
        )  # fmt: skip
        raise CircuitOpen(
            f"circuit breaker for {up.key} is {gate.state.replace('_', '-')}; "
            f"retry in {gate.retry_after_s:.3f} s",
            host=up.key,
            retry_after_s=gate.retry_after_s,
            attempts_made=attempts_made,
        ) from last_error
    if gate.probe_id:
        ctx.decisions.append(
            Decision(LAYER_BREAKER, up.key, PROBE, "half_open_probe", source, age_s, now)
        )


def _deadline_passed(
    ctx: DecisionContext,
    up: Upstream,
    attempts_made: int,
    now: float,
    last: BaseException | None,
) -> DeadlineExceeded:
    _give_up(ctx, up, LAYER_DEADLINE, GIVE_UP_DEADLINE, attempts_made, now)
    error = DeadlineExceeded(f"deadline exceeded before calling {up.key}", host=up.key)
    error.__cause__ = last
    return error


def _store_failed(ctx: DecisionContext, up: Upstream, what: str, exc: Exception) -> bool:
    """A store operation failed: log it; True when the policy says to fail closed."""
    logger.warning(
        "fidelity_mw: outbound %s for %s without state (%s: %s)",
        what,
        up.key,
        type(exc).__name__,
        exc,
    )
    return ctx.engine.policy.state.on_error == "closed"


def _closed_on_store_error(
    ctx: DecisionContext,
    up: Upstream,
    exc: Exception,
    attempts_made: int,
    now: float,
    last_error: BaseException | None,
) -> None:
    """The breaker could not be asked: go ahead (fallback), or refuse when failing closed."""
    if _store_failed(ctx, up, "breaker gate", exc):
        _give_up(ctx, up, LAYER_BREAKER, GIVE_UP_BREAKER, attempts_made, now, SOURCE_FALLBACK)
        raise CircuitOpen(
            f"breaker state for {up.key} is unreachable and the policy fails closed",
            host=up.key,
            retry_after_s=1.0,
            attempts_made=attempts_made,
        ) from exc


def _outcome(
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
            if (exhausted or DECIDED_BY in headers) and _trusted(engine, up, target, response):
                # The callee's own control layer answered (it gave up after retrying,
                # a breaker of it refused): no evidence against the callee, so no
                # failure for our breaker; the breaker next to the fault owns it. An
                # exhausted callee is not retried; another refusal is, after its
                # Retry-After.
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


def _trusted(
    engine: Engine, up: Upstream, target: Instance | None, response: httpx.Response
) -> bool:
    """Is the peer that answered inside `trusted_peers` (its signals are believed)?"""
    trusted = up.trusted if target is None else target.trusted
    if trusted is None:
        trusted = connected_peer_trusted(response, engine.trusted_peers)
    return trusted


def _plan(
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
) -> RetryPlan:
    """Retry this retryable failure? Records the give-up (but not a budget one) if not."""
    status: int | None = None
    retry_after: float | None = None
    if downstream:
        plan = RetryPlan(False, 0.0, GIVE_UP_DOWNSTREAM)
    elif breaker_state == OPEN:  # our failure (or another's) just opened it: stop now
        plan = RetryPlan(False, 0.0, GIVE_UP_BREAKER)
    else:
        if response is not None:
            status = response.status_code
            retry_after = parse_retry_after(
                response.headers.get("retry-after"), engine.clock.wall()
            )
        deadline_at = ctx.deadline_at
        plan = plan_retry(
            cfg=up.retry,
            attempt=attempt,
            idempotent=request.method in IDEMPOTENT_METHODS
            or has_header(request.headers, IDEMPOTENCY_KEY),
            replayable=replayable,
            downstream_exhausted=False,
            retry_after_s=retry_after,
            status=status,
            remaining_s=None if deadline_at is None else deadline_at - now,
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
        _give_up(ctx, up, layer, reason, attempt, now)
    elif status == 429 and retry_after is not None:
        # A planned retry after a 429 pauses other calls' retries to this host
        # too, never longer than the cap (a refused Retry-After pauses nothing).
        pause = min(retry_after, up.retry.retry_after_max_s)
        up.paused_until = max(up.paused_until, now + pause)
    return plan


# ---------------------------------------------------------------- small helpers


def _slow(breaker: BreakerConfig, started: float, ended: float) -> bool:
    """A slow call for the host breaker's slow-call ratio (`slow_call_ms`)."""
    limit = breaker.slow_call_ms
    return limit is not None and (ended - started) * 1000.0 >= limit


def _cause(response: httpx.Response | None, error: BaseException | None) -> str:
    """The reason recorded on the retry that follows this failure."""
    if response is not None:
        return f"status_{response.status_code}"
    assert error is not None
    return f"{error_kind(error)}_error"


def _observe_start(
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
        logger.exception("fidelity_mw: attempt observer failed")
        return None


def _observe_end(
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
        logger.exception("fidelity_mw: attempt observer failed")


def _call_end(observer: AttemptObserver, ctx: DecisionContext) -> None:
    """A call made outside any request is over: no RequestObserver will see it."""
    call_end = getattr(observer, "call_end", None)  # hooks.CallObserver, optional
    if call_end is None:
        return
    try:
        call_end(ctx)
    except Exception:
        logger.exception("fidelity_mw: attempt observer failed")
