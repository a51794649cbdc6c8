"""Control decisions that escaped the app, answered as what they are.

An outbound layer refused or gave up (the upstream's breaker is open, the retry
budget is spent, the deadline passed) and the app let the exception out. The
server would answer a plain 500 and log a traceback, and the caller's breaker
would count our refusal as our failure. The middleware answers instead: 503
(504 for the deadline) with `Retry-After` where it is known, a problem
document naming the layer and the upstream, `x-fidelity-retry: exhausted` when
the outbound layer gave up after retrying, and `x-fidelity-decided-by`. The
same answer serves a deadline that passes while the app still runs.
"""

from __future__ import annotations

import httpx

from ..context import (
    GIVE_UP,
    LAYER_BREAKER,
    LAYER_BUDGET,
    LAYER_DEADLINE,
    REJECT,
    SOURCE_REQUEST,
    Decision,
    DecisionContext,
)
from ..decide.gcra import retry_after_header
from ..errors import CircuitOpen, DeadlineExceeded
from .responses import EXHAUSTED, OUTCOME_EXPIRED, OUTCOME_SHED, Headers, Rejection, problem_body


def control_refusal(ctx: DecisionContext, exc: BaseException, now: float) -> Rejection | None:
    """Our answer to an exception the app let out, if a control layer caused it."""
    if isinstance(exc, CircuitOpen):
        wait = retry_after_header(exc.retry_after_s)
        return _answer(
            ctx,
            503,
            LAYER_BREAKER,
            exc.host,
            f"the circuit breaker for upstream {exc.host!r} is open; retry in {wait} s",
            "upstream-circuit-open",
            wait,
        )
    if isinstance(exc, DeadlineExceeded):
        return _answer(
            ctx,
            504,
            LAYER_DEADLINE,
            exc.host,
            f"the request's deadline passed before upstream {exc.host!r} could be called",
            "deadline-exceeded",
        )
    if not isinstance(exc, httpx.TransportError):
        return None
    gave_up = _outbound_give_up(ctx)
    if isinstance(exc, httpx.TimeoutException) and (
        (gave_up is not None and gave_up.layer == LAYER_DEADLINE)
        or (ctx.deadline_at is not None and now >= ctx.deadline_at)
    ):
        # the attempt's timeout was the rest of the deadline
        upstream = gave_up.subject if gave_up is not None else _host(exc)
        return _answer(
            ctx,
            504,
            LAYER_DEADLINE,
            upstream,
            "the request's deadline passed while calling "
            + (f"upstream {upstream!r}" if upstream else "an upstream"),
            "deadline-exceeded",
        )
    if gave_up is None:
        return None
    upstream = gave_up.subject
    if gave_up.layer == LAYER_BUDGET:
        return _answer(
            ctx,
            503,
            LAYER_BUDGET,
            upstream,
            f"upstream {upstream!r} failed and its retry budget is spent",
            "retry-budget-exhausted",
        )
    return None


def _host(exc: httpx.TransportError) -> str | None:
    try:
        return exc.request.url.host or None
    except RuntimeError:  # an error raised without its request
        return None


def deadline_refusal(ctx: DecisionContext, now: float) -> Rejection:
    """The deadline passed while the app ran, before its response started."""
    ctx.decisions.append(
        Decision(
            LAYER_DEADLINE, ctx.route, REJECT, "expired_while_running", SOURCE_REQUEST, 0.0, now
        )
    )
    return _answer(
        ctx,
        504,
        LAYER_DEADLINE,
        None,
        "the request's deadline passed before the response started",
        "deadline-expired",
    )


def _outbound_give_up(ctx: DecisionContext) -> Decision | None:
    """The outbound layer's last refusal or give-up recorded on this context."""
    for decision in reversed(ctx.decisions):
        if (
            decision.verdict in (GIVE_UP, REJECT)
            and decision.subject != ctx.route
            and decision.layer in (LAYER_BUDGET, LAYER_DEADLINE, LAYER_BREAKER)
        ):
            return decision
    return None


def _answer(
    ctx: DecisionContext,
    status: int,
    layer: str,
    upstream: str | None,
    detail: str,
    kind: str,
    retry_after: str | None = None,
) -> Rejection:
    ctx.decided_by = layer
    ctx.outcome = OUTCOME_EXPIRED if status == 504 else OUTCOME_SHED
    headers: Headers = []
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode()))
    if ctx.upstream_exhausted:
        headers.append(EXHAUSTED)
    title = "Gateway Timeout" if status == 504 else "Service Unavailable"
    extra = {"layer": layer} if upstream is None else {"layer": layer, "upstream": upstream}
    return status, headers, problem_body(status, title, detail, kind, **extra)
