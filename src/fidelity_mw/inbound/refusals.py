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

from collections.abc import Iterable, MutableMapping
from typing import Any, Final

import httpx
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..context import (
    GIVE_UP,
    LAYER_BREAKER,
    LAYER_BUDGET,
    LAYER_DEADLINE,
    LAYER_RATELIMIT,
    LAYER_RETRY,
    LAYER_STATE,
    REJECT,
    SOURCE_REQUEST,
    Decision,
    DecisionContext,
)
from ..decide.gcra import retry_after_header
from ..decide.retry import EXHAUSTING_REASONS, GIVE_UP_BODY, GIVE_UP_NOT_IDEMPOTENT
from ..errors import CircuitOpen, DeadlineExceeded, StateUnavailable
from ..outbound.advice import spread_wait
from ..outbound.body import BROKEN_BODY
from ..outbound.decisions import GIVE_UP_EXTENSION
from .responses import (
    DECIDED_BY_HEADER,
    EXHAUSTED,
    OUTCOME_EXPIRED,
    OUTCOME_SHED,
    UPSTREAM_FAULT,
    Headers,
    Rejection,
    problem_body,
    refusal_retry_after,
)

# How a refusal's detail says why the control state could not decide (`fallback_why`),
# as responses.STATE_UNAVAILABLE_DETAILS does: nothing internal (no address, no exception)
_STATE_WHAT: dict[str | None, str] = {
    "unreachable": "is unreachable",
    "read_only": "is read-only for now",
    "error": "failed to answer",
    "deadline": "did not answer before the request's deadline",
    None: "is unavailable",
}
_NO_HEDGE = "no_hedge"  # (outbound.hedge.NO_HEDGE, without importing the race's module)
ADVISE = "advise"  # a verdict that changes no outcome, only what the caller is told
RETRY_AFTER = b"retry-after"
# An upstream's failure let out of the app, answered: the answer, and what happened (its
# problem's `detail`, which the middleware's warning says)
UpstreamAnswer = tuple[Rejection, str]


def httpx_leaves(exc: BaseException) -> list[BaseException] | None:
    """The errors of the exception group `exc` (nested groups flattened) when every one
    is an httpx error, else None: a task group's (`asyncio.TaskGroup`, anyio's) calls
    that failed, which we answer as the first of them we would answer let out alone. An
    error of the app's own among them keeps the group the app's (its 500); one raised
    `from` an httpx error (`causes`) stands for that error."""
    if not isinstance(exc, BaseExceptionGroup):
        return None
    leaves: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        err = todo.pop(0)
        if isinstance(err, BaseExceptionGroup):
            todo[:0] = err.exceptions
            continue
        if len(leaves) >= 32:
            return None  # (not read through)
        cause = next((c for c in causes(err) if isinstance(c, httpx.HTTPError)), None)
        if cause is None:
            return None
        leaves.append(cause)
    return leaves or None


def causes(exc: BaseException) -> list[BaseException]:
    """`exc` and the errors it was raised `from`, outermost first (bounded: a cycle). An
    app that turns the transport's error into one of its own (`raise PaymentsDown(...)
    from exc`) lets out that error still: answered as it, not with the server's bare
    500. Only an explicit cause: an error raised while handling one (`__context__`, a
    fallback's own bug) is the app's."""
    chain = [exc]
    cause = exc.__cause__
    while cause is not None and len(chain) < 32 and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__
    return chain


def may_answer(exc: BaseException) -> bool:
    """Whether `exc` is an error the middleware may answer itself (`control_refusal`,
    `upstream_failure`): an httpx error, a group of them, or an error raised from one."""
    for err in causes(exc):
        if isinstance(err, httpx.HTTPError) or httpx_leaves(err) is not None:
            return True
    return False


def control_refusal(ctx: DecisionContext, exc: BaseException, now: float) -> Rejection | None:
    """Our answer to an exception the app let out, if a control layer caused it (for a
    group of httpx errors, the first of them that one caused; for an error raised from
    one, as that one: `causes`)."""
    if exc.__cause__ is not None:
        for err in causes(exc):
            answer = _control_refusal(ctx, err, now)
            if answer is not None:
                return answer
        return None
    return _control_refusal(ctx, exc, now)


def _control_refusal(ctx: DecisionContext, exc: BaseException, now: float) -> Rejection | None:
    if isinstance(exc, BaseExceptionGroup):
        for leaf in httpx_leaves(exc) or ():
            answer = _control_refusal(ctx, leaf, now)
            if answer is not None:
                return answer
        return None
    if isinstance(exc, CircuitOpen):
        wait = refusal_retry_after(exc.retry_after_s)
        # The store's failure when the breaker's state could not be read: said so by the
        # error itself, not by its `__cause__`, which a refused retry sets to the failed
        # attempt's error (the breaker is open then). One an app raises `from` a
        # StateUnavailable is read so too.
        unread = getattr(exc, "state_error", None)
        if unread is None and isinstance(exc.__cause__, StateUnavailable):
            unread = exc.__cause__
        if unread is None:
            detail = f"the circuit breaker for upstream {exc.host!r} is open; retry in {wait} s"
        else:
            # `on_error = "closed"`: the breaker is not open, its state could not be
            # read; said as the inbound 503 says it (the problem's type stays the
            # layer's: what a client may rely on)
            state_of = getattr(exc, "state_of", "breaker")
            state_of = "circuit breaker" if state_of == "breaker" else state_of
            detail = (
                f"the {state_of} state for upstream {exc.host!r} "
                f"{_STATE_WHAT.get(getattr(unread, 'why', None), _STATE_WHAT[None])} "
                f"and the policy says to fail closed; retry in {wait} s"
            )
        # decided by the breaker, or (its state unread) by the state's absence
        by = LAYER_BREAKER if unread is None else LAYER_STATE
        return _answer(ctx, 503, LAYER_BREAKER, exc.host, detail, "upstream-circuit-open", wait, by)
    if isinstance(exc, DeadlineExceeded):
        return _answer(
            ctx,
            504,
            LAYER_DEADLINE,
            exc.host,
            f"the request's deadline passed before upstream {exc.host!r} could be called",
            "deadline-exceeded",
        )
    if isinstance(exc, httpx.HTTPStatusError):
        # `raise_for_status()` on the response the outbound layer gave up on: answered as
        # the same give-up with a transport error (a spent budget here, else below)
        gave_up = given_up_response(ctx, exc)
        if gave_up is None or gave_up.layer != LAYER_BUDGET:
            return None
        return _answer(
            ctx,
            503,
            LAYER_BUDGET,
            gave_up.subject,
            f"upstream {gave_up.subject!r} answered {exc.response.status_code} "
            "and its retry budget is spent",
            "retry-budget-exhausted",
            retry_advice(ctx, now, gave_up),
        )
    if not isinstance(exc, httpx.TransportError):
        return None
    gave_up = given_up_error(ctx, exc, _REFUSING_LAYERS)
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
            retry_advice(ctx, now, gave_up),
        )
    return None


def upstream_failure(ctx: DecisionContext, exc: BaseException) -> UpstreamAnswer | None:
    """Our answer when the app let out the transport error of an upstream the outbound
    layer retried and gave up on: 502 (504 for a timeout) with a problem document naming
    the upstream, sent as if the app had answered it, so the give-up's marker
    (`x-fidelity-retry: exhausted`) and `Retry-After` advice go with it. Unanswered,
    the server's bare 500 carried neither, and a caller could retry a request we already
    retried. Not a control decision: the upstream failed, and the outcome is `failed`.
    The same for `raise_for_status()`'s HTTPStatusError on the response given up on
    (`given_up_response`): 502 (504 for a 504). An error raised from one (`causes`) as
    that one. With the answer, its problem's `detail`: what happened, for the log (the
    words "after retrying" only where the outbound layer retried)."""
    if exc.__cause__ is not None:
        for err in causes(exc):
            answer = _upstream_failure(ctx, err)
            if answer is not None:
                return answer
        return None
    return _upstream_failure(ctx, exc)


def _upstream_failure(ctx: DecisionContext, exc: BaseException) -> UpstreamAnswer | None:
    if isinstance(exc, BaseExceptionGroup):  # a task group's calls: the first we answer
        for leaf in httpx_leaves(exc) or ():
            answer = _upstream_failure(ctx, leaf)
            if answer is not None:
                return answer
        return None
    if isinstance(exc, httpx.HTTPStatusError):
        gave_up = given_up_response(ctx, exc)
        status = exc.response.status_code
        if gave_up is None:
            if status >= 500 and ctx.upstream_failed and _not_resendable(ctx, exc):
                # A POST's 5xx that our breaker for the upstream counted, not sent again
                # (not idempotent: B may not retry it, nor may A): the upstream's failure,
                # answered 502 marked `x-fidelity-fault: upstream` (our route breaker and
                # the client's units already leave it to that breaker). As the server's
                # bare 500, A's breaker for B counted it against B: C failing POSTs
                # opened A's breaker for B, which then refused A's every call to B.
                return _upstream_answer(exc, _status_host(exc), f"answered {status}")
            if status not in GATEWAY_STATUSES or not (
                (ctx.upstream_failed and DECIDED_BY_HEADER_STR in exc.response.headers)
                or _response_give_up(exc) is not None
            ):
                return None
            # A callee's control layer refused (its breaker's 503, its deadline's 504),
            # and the transport did not retry it (its Retry-After longer than we wait,
            # every instance paused) but believed it (`upstream_failed`: a trusted peer).
            # The app's 500 for it carried no marker: our callers' breakers counted us
            # for it, and the callee's refusal reached the client as a 500. A 502 marked
            # `x-fidelity-fault: upstream` (not `exhausted`: we did not retry, our caller
            # may). (The callee's own header on the response it raised for: not a 503
            # the app built, nor another call's.) So too a 5xx the transport did not retry
            # because the upstream, or every other instance of it, asked for a longer
            # wait than the call waits (its `retry_after_too_long` marks the response):
            # our decision, answered as one, never the app's 500 (every instance of C
            # paused by C's own `Retry-After`: B's bare 500 reached the client without
            # the wait, and A's breaker for B counted it against B).
            return _upstream_answer(exc, _status_host(exc), f"answered {status}")
        upstream: str | None = gave_up.subject
        why = f"answered {status}"
        if status == 429:  # throttled, retried, given up on: no breaker's failure
            ctx.upstream_throttled = True
    elif isinstance(exc, httpx.TransportError):
        if ctx.upstream_failed and getattr(exc, BROKEN_BODY, False) and not _exhausting_mark(exc):
            # The body of an upstream's answer broke while the app read it (after its
            # head: not retried), and our breaker for it counted that: the upstream's
            # failure, answered as such (marked `x-fidelity-fault: upstream`, not
            # `exhausted`: we did not retry, our caller may, and nothing of ours was sent
            # yet). As the app's bare 500, our callers' breakers counted it against us:
            # C's instances resetting mid-body opened A's breaker for B.
            return _upstream_answer(exc, _host(exc), f"broke off its answer ({type(exc).__name__})")
        layers = (LAYER_RETRY, LAYER_BUDGET, LAYER_DEADLINE, LAYER_BREAKER)
        if getattr(exc, GIVE_UP_EXTENSION, _UNMARKED) is _UNMARKED:
            # not raised by the transport: the request's flag and last give-up, as before
            if not ctx.upstream_exhausted:
                return None
            gave_up = _outbound_give_up(ctx, layers)
            upstream = gave_up.subject if gave_up is not None else _host(exc)
        else:
            gave_up = given_up_error(ctx, exc, layers)
            if gave_up is None:
                return None
            ctx.upstream_exhausted = True  # (as `given_up_response`: the call's own)
            upstream = gave_up.subject
        why = f"failed ({type(exc).__name__})"
    else:
        return None
    return _upstream_answer(exc, upstream, f"{why} after retrying")


def _upstream_answer(exc: BaseException, upstream: str | None, why: str) -> UpstreamAnswer:
    """The problem document of an upstream's failure let out of the app: 504 for a
    timeout, 502 otherwise. An upstream's 504 is a timeout too (its deadline, or its own
    upstream's, ran out on the time we told it), given up on or not retried: as a 502, a
    hop's timeout reached the client as a bad gateway, where the same time running out
    at a callee without fidelity_mw (our read timeout) is a 504."""
    detail = (f"upstream {upstream!r}" if upstream else "an upstream") + f" {why}"
    extra = {} if upstream is None else {"upstream": upstream}
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 429:
        # The upstream throttled us and our retries after its waits ran out: a 429 is a
        # valid answer, not a bad gateway, and the client did not cause the upstream's
        # limit, so it gets neither a 502 nor a 429 but a 503 with the wait
        # (`after_give_up` adds it and `x-fidelity-fault: upstream`); as a 502, a
        # client could not tell throttling one hop down from a broken upstream.
        body = problem_body(503, "Service Unavailable", detail, "upstream-throttled", **extra)
        return (503, [], body), detail
    timeout = isinstance(exc, httpx.TimeoutException) or (
        isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 504
    )
    status = 504 if timeout else 502
    title = "Gateway Timeout" if timeout else "Bad Gateway"
    return (status, [], problem_body(status, title, detail, "upstream-failed", **extra)), detail


def given_up_response(ctx: DecisionContext, exc: httpx.HTTPStatusError) -> Decision | None:
    """The outbound layer's give-up on the response `exc` was raised for, or None.

    The transport hands the last response back when it gives up retrying it (attempts
    or retry budget spent, the breaker opened, no time left, a callee's
    `x-fidelity-retry: exhausted`), and marks it with that give-up
    (`response.extensions["fidelity_give_up"]`): exact for two calls to one upstream at
    once (`asyncio.gather`), which share the request's records. The marker says it, not
    the request's `upstream_exhausted`: a hedged call at once, ended by its hedge's good
    answer, sets that flag back to what it was when it began (marked again here)."""
    marker = _response_give_up(exc)
    if marker is None or not _exhausting(marker):
        return None
    ctx.upstream_exhausted = True
    return marker


def _response_give_up(exc: httpx.HTTPStatusError) -> Decision | None:
    """The give-up the transport marked the response `exc` was raised for with, exhausting
    or not (`retry_after_too_long` after one attempt), or None."""
    marker = exc.response.extensions.get(GIVE_UP_EXTENSION)
    if marker is None:  # a response built anew from it: its request says it
        try:
            on = exc.request.extensions.get(GIVE_UP_EXTENSION)
        except RuntimeError:  # raised without its request
            on = None
        if isinstance(on, tuple) and on[1] == exc.response.status_code:
            marker = on[0]
    if not isinstance(marker, Decision) or marker.verdict != GIVE_UP:
        return None
    return marker


def given_up_error(
    ctx: DecisionContext, exc: BaseException, layers: tuple[str, ...]
) -> Decision | None:
    """The outbound give-up (of one of `layers`) that ended the call `exc` was raised
    from, or None.

    The transport marks every error it raises (`exc.fidelity_give_up`, as it marks a
    response given up on): the give-up that exhausted that call, or None when it gave
    none. The mark says it, not the request's records: two calls at once
    (`asyncio.gather`) record on one context, and the last give-up there may be the
    other call's. An error without the mark (not raised by the transport: made by the
    app) is read as before, by the request's last give-up."""
    marker = getattr(exc, GIVE_UP_EXTENSION, _UNMARKED)
    if marker is _UNMARKED:
        return _outbound_give_up(ctx, layers)
    if (
        not isinstance(marker, Decision)
        or marker.verdict not in (GIVE_UP, REJECT)
        or not _exhausting(marker)
        or marker.layer not in layers
    ):
        return None
    return marker


_UNMARKED: Any = object()


def _exhausting(marker: Decision) -> bool:
    """A give-up the transport marks a response or error with exhausted the call
    (`decide.retry.exhausting`): an exhausting reason, or any after a retry."""
    made = (marker.details or {}).get("attempts")
    return marker.reason in EXHAUSTING_REASONS or (isinstance(made, int) and made > 1)


DECIDED_BY_HEADER_STR: Final = "x-fidelity-decided-by"


def _exhausting_mark(exc: BaseException) -> bool:
    """Does the transport's mark on `exc` say the call was given up on exhaustingly?"""
    marker = getattr(exc, GIVE_UP_EXTENSION, None)
    return isinstance(marker, Decision) and marker.verdict == GIVE_UP and _exhausting(marker)


def _not_resendable(ctx: DecisionContext, exc: httpx.HTTPStatusError) -> bool:
    """Did the outbound layer decline to send the request `exc` was raised for again
    because it may not (`not_idempotent`, `body_not_replayable`), on its first attempt?"""
    # The upstream as the transport's decisions name it (`Upstream.key`: the host, with
    # its port when the URL has one). Split at a colon instead, every IPv6 address read
    # as "" (`fd00::5:8080`): its POST's 5xx went out as the app's bare 500.
    try:
        url = exc.request.url
        key: str | None = url.host if url.port is None else f"{url.host}:{url.port}"
    except RuntimeError:  # raised without its request
        key = None
    for decision in reversed(ctx.decisions):
        if (
            decision.layer == LAYER_RETRY
            and decision.verdict == GIVE_UP
            and decision.reason in (GIVE_UP_NOT_IDEMPOTENT, GIVE_UP_BODY)
            and (not key or decision.subject == key)
        ):
            return True
    return False


def _status_host(exc: httpx.HTTPStatusError) -> str | None:
    try:
        return exc.request.url.host or None
    except RuntimeError:  # raised without its request
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


def _outbound_give_up(
    ctx: DecisionContext, layers: tuple[str, ...] = (LAYER_BUDGET, LAYER_DEADLINE, LAYER_BREAKER)
) -> Decision | None:
    """The outbound layer's last refusal or give-up recorded on this context. (A refused
    hedge, `no_hedge`, is neither: its call went on, and may have answered well.)"""
    for decision in reversed(ctx.decisions):
        if (
            decision.verdict in (GIVE_UP, REJECT)
            and decision.subject != ctx.route
            and decision.layer in layers
            and decision.reason != _NO_HEDGE
        ):
            return decision
    return None


def retry_advice(ctx: DecisionContext, now: float, give_up: Decision | None = None) -> str | None:
    """`Retry-After` for a 5xx that follows an outbound give-up, from what the outbound
    layer knew when it gave up (outbound/advice.py), less the time since, plus a draw
    from the engine's random source over the give-up's spread window; None when it
    knew of nothing that blocks a retry, or that time has passed. Recorded as an
    `advise` decision of the give-up's layer, the reason naming what it came from.
    `give_up`: the one the answer is for (the mark on what the app let out), else the
    request's last."""
    if give_up is None:
        give_up = _outbound_give_up(ctx, _ADVISING_LAYERS)
    details = give_up.details if give_up is not None else None
    if not details:
        return None
    hint = details.get("retry_hint_s")
    if not isinstance(hint, int | float) or isinstance(hint, bool):
        return None
    assert give_up is not None
    left = hint - max(0.0, now - give_up.at)
    if left <= 0.0:
        return None
    spread = details.get("retry_hint_spread_s")
    if not isinstance(spread, int | float) or isinstance(spread, bool) or spread <= 0.0:
        spread = 0.0
    # spread so the callers of one burst do not all come back in the same second
    value = retry_after_header(spread_wait(left, spread, ctx.engine.rng))
    ctx.decisions.append(
        Decision(
            give_up.layer,
            give_up.subject,
            ADVISE,
            f"retry_after_{details.get('retry_hint_from', 'outbound')}",
            give_up.state_source,
            max(0.0, now - give_up.at) + give_up.state_age_s,
            now,
            {"retry_after_s": int(value), "wait_s": round(left, 3), "spread_s": spread},
        )
    )
    return value


_ADVISING_LAYERS = (LAYER_BUDGET, LAYER_DEADLINE, LAYER_BREAKER, LAYER_RETRY)
_REFUSING_LAYERS = (LAYER_BUDGET, LAYER_DEADLINE, LAYER_BREAKER)


# What an answer says when a server it relies on failed it (RFC 9110 15.6: Bad Gateway,
# Service Unavailable, Gateway Timeout). A 500 is the server's own "unexpected condition".
GATEWAY_STATUSES: Final = (502, 503, 504)


def reports_upstream(ctx: DecisionContext, status: int | None) -> bool:
    """Whether the app's answer `status` reports the upstream failure a call of the
    request met (`upstream_failed`, `upstream_exhausted`): a gateway status. Not any 5xx
    after one: a page whose optional call failed (and that went on without it) and which
    then fails on its own answers its own 500, and marked, it switched off its callers'
    breakers and retries for its own fault and gave the client its units back. (A 500
    cannot tell the two apart, so it is the app's: a gateway answers 502 for its
    upstream's 500, as `upstream_failure_response` does.)"""
    return (ctx.upstream_failed or ctx.upstream_exhausted) and status in GATEWAY_STATUSES


def reports_refusal(ctx: DecisionContext, status: int | None) -> bool:
    """Whether the app's answer `status` reports the refusal a layer inside it made
    (`shed_by`): a gateway status or a 429 for any of them, and any other 4xx for a
    per-route form's own refusal (what its `on_reject` hook made of its 429 or 503).

    Not a 500 of its own after one: a page whose optional call its upstream's breaker
    refused (it went on without it) and that then failed on its own is the route's
    failure (its breaker counts it; the client's units stay spent). Nor a 4xx of its own
    after an outbound refusal: a login's 401, a 404 for an item that is not there, a
    422 for a bad body, each after an optional call (a risk score, recommendations) that
    the upstream's breaker refused, are the client's own answers. Taken for the refusal,
    they gave the units back under `charge = "always"` too: a login route's limit held
    no password guess while its risk service's breaker was open."""
    shed_by = ctx.shed_by
    if shed_by is None or status is None:
        return False
    if status in GATEWAY_STATUSES or status == 429:
        return True
    return 400 <= status < 500 and _refused_by_form(ctx, shed_by)


def _refused_by_form(ctx: DecisionContext, shed_by: str) -> bool:
    """Whether `shed_by` is a per-route form's refusal (`Depends(fidelity.limit)`): its
    over-limit 429 (`ratelimit`), or its 503 when its state could not be read (`state`,
    recorded as a limit's `reject`; the transport's own `state` refusal is the breaker's
    record)."""
    if shed_by == LAYER_RATELIMIT:
        return True
    if shed_by != LAYER_STATE:
        return False
    decision = ctx.last(LAYER_RATELIMIT)
    return decision is not None and decision.verdict == REJECT


def charged_for_upstream(ctx: DecisionContext) -> bool:
    """Whether the request called an upstream its client chose (an `[[upstream]]` entry
    with `client_chosen`: webhook targets, callback URLs), and so keeps paying its units
    whatever ends it: an upstream's failure or a give-up, a refusal of ours for that host
    (its breaker, the deadline), our deadline's 504. The client picks the host; refunded,
    a client pointing its requests at a host of its own that fails (or hangs) made every
    request free, and earned retry credit besides. Nor does such an end count on the
    route's breaker: one client's dead host would shed every client's requests.

    Read off the request's attempts per upstream (`ctx.attempts`), only on the paths that
    would give units back: nothing on the way of a request that succeeds."""
    if ctx.refused_client_chosen:
        return True
    counts = ctx._attempts
    if not counts:
        return False
    policy = ctx.engine.policy
    if not any(up.client_chosen for up in policy.upstreams):
        return False
    for key in counts:  # "host" or "host:port" (the entries match on the host alone)
        if policy.upstream_for(key).client_chosen:
            return True
        host, _, port = key.rpartition(":")
        if host and port.isdigit() and policy.upstream_for(host).client_chosen:
            return True
    return False


def raised_by_refusal(exc: BaseException) -> bool:
    """Whether the error the app let out is a layer's refusal (an outbound `CircuitOpen`,
    `DeadlineExceeded`, any transport error; a form's HTTPException), itself or raised
    `from` one: not an error of the app's own after a refusal it handled."""
    return _in_chain(exc, (httpx.TransportError, StarletteHTTPException))


def _in_chain(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    todo: list[BaseException] = [exc]
    seen = 0
    while todo and seen < 32:  # (bounded: a cycle, a huge group)
        seen += 1
        err = todo.pop()
        if isinstance(err, kinds):
            return True
        if isinstance(err, BaseExceptionGroup):
            todo.extend(err.exceptions)
        if err.__cause__ is not None:
            todo.append(err.__cause__)
    return False


def raised_by_upstream(exc: BaseException) -> bool:
    """Whether the error the app let out is an upstream's failure: an httpx transport
    error or `raise_for_status()` on a 5xx, or on a 429 the outbound layer retried and gave
    up on (`upstream_throttled`), itself or raised `from` one (or in a group with one). An
    error of the app's own making that comes after an upstream failure it handled is not
    (nor one raised while handling it: `__context__` is no cause)."""
    return _upstream_error(exc) is not None


def upstream_throttled(exc: BaseException) -> bool:
    """Whether the upstream error the app let out is `raise_for_status()` on a 429 that the
    outbound layer retried (after its `Retry-After`) and gave up on: answered 502 with the
    give-up's marker and advice (`upstream_failure`), as the upstream's; and no breaker's
    failure, the route breaker's no more than the upstream's (an upstream's 429 is never
    one). As the app's own 500, it counted on the route breaker: C throttling B opened B's
    route breaker, which then shed B's requests for its open period after C's limit had
    room again (`tests/test_defects_review40_hops_shed.py`)."""
    err = _upstream_error(exc)
    return isinstance(err, httpx.HTTPStatusError) and _given_up_throttle(err)


def _given_up_throttle(err: httpx.HTTPStatusError) -> bool:
    try:
        if err.response.status_code != 429:
            return False
    except Exception:  # raised without a response: not ours to read
        return False
    marker = _response_give_up(err)
    return marker is not None and _exhausting(marker)


def _upstream_error(exc: BaseException) -> BaseException | None:
    """The upstream's error among `exc`, its causes and its group (`raised_by_upstream`)."""
    todo: list[BaseException] = [exc]
    seen = 0
    while todo and seen < 32:  # (bounded: a cycle, a huge group)
        seen += 1
        err = todo.pop()
        if isinstance(err, httpx.TransportError):
            return err
        if isinstance(err, httpx.HTTPStatusError):
            try:
                if err.response.status_code >= 500:
                    return err
            except Exception:  # raised without a response: not ours to read
                pass
            if _given_up_throttle(err):
                return err
        if isinstance(err, BaseExceptionGroup):
            todo.extend(err.exceptions)
        if err.__cause__ is not None:
            todo.append(err.__cause__)
    return None


def after_give_up(
    ctx: DecisionContext, headers: Headers | None, start: MutableMapping[str, Any]
) -> Headers | None:
    """The headers we add to the app's own 5xx after an outbound give-up or refusal:
    `x-fidelity-retry: exhausted` when we gave up after retrying, `x-fidelity-fault:
    upstream` after a failure the upstream's breaker counted (both only on a 5xx that
    reports it: `reports_upstream`), and `Retry-After` from `retry_advice` unless the
    app set one (the app's wins). Never raises: a response is never failed for its
    advice."""
    status = start.get("status")
    reported = reports_upstream(ctx, status)
    shed = reports_refusal(ctx, status)
    if not reported and not shed:
        return headers  # the app's own failure: nothing of an upstream's to say
    extra: Headers = list(headers or ())
    if ctx.upstream_exhausted:
        extra.append(EXHAUSTED)
    if reported and (ctx.upstream_failed or ctx.upstream_throttled):
        # (an upstream's 429 given up on: its limit, not our fault, as its failure is)
        extra.append(UPSTREAM_FAULT)
    try:
        app_headers = start.get("headers") or ()
        if not isinstance(app_headers, list | tuple):  # any iterable: read it only once
            start["headers"] = app_headers = list(app_headers)
        if not _has_retry_after(app_headers):
            value = retry_advice(ctx, ctx.engine.clock.monotonic())
            if value is not None:
                extra.append((RETRY_AFTER, value.encode()))
    except Exception:  # malformed app headers, an odd clock: no advice, the response stands
        pass
    return extra or None


# The markers a 5xx of ours carries that only this middleware writes, from what its
# request's own calls found (`after_give_up`); and the refusal marker, which a per-route
# form inside the app writes too, on its own refusals (those set `shed_by`).
_OWN_MARKERS = (EXHAUSTED[0], UPSTREAM_FAULT[0])
_MARKERS = (*_OWN_MARKERS, DECIDED_BY_HEADER)


def without_passed_on_markers(
    start: MutableMapping[str, Any], decided: bool
) -> MutableMapping[str, Any]:
    """The app's 5xx start message without the `x-fidelity-retry`, `x-fidelity-fault` or
    (unless a layer of ours `decided` it: `shed_by`) `x-fidelity-decided-by` it carries:
    one there was passed on from an upstream's answer (a gateway answering with its
    upstream's response, headers and all). Our callers trust us, not the third party
    behind us that our transport does not believe; passed on, its headers switched off
    their retries and their breaker for us. Ours are added after this, as our own calls
    found them (a trusted callee's markers among them). A new message when one goes (the
    app's may be shared); never raises."""
    try:
        headers = start.get("headers")
        if not headers:
            return start
        if not isinstance(headers, list | tuple):  # any iterable: read it only once
            start["headers"] = headers = list(headers)
        drop = _OWN_MARKERS if decided else _MARKERS
        kept = [item for item in headers if bytes(item[0]).lower() not in drop]
        if len(kept) == len(headers):
            return start
        return {**start, "headers": kept}
    except Exception:  # malformed app headers: the server will say so, not us
        return start


def _has_retry_after(headers: Iterable[Any]) -> bool:
    for item in headers:
        name = item[0]
        if isinstance(name, bytes | bytearray) and name.lower() == RETRY_AFTER:
            return True
    return False


def _answer(
    ctx: DecisionContext,
    status: int,
    layer: str,
    upstream: str | None,
    detail: str,
    kind: str,
    retry_after: str | None = None,
    decided_by: str | None = None,
) -> Rejection:
    ctx.decided_by = decided_by or layer
    ctx.outcome = OUTCOME_EXPIRED if status == 504 else OUTCOME_SHED
    headers: Headers = []
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode()))
    if ctx.upstream_exhausted:
        headers.append(EXHAUSTED)
    if status == 504 and (ctx.upstream_failed or ctx._attempts):
        # Out of time after calling an upstream: the time may have gone there, and the
        # breaker for it counts that (a callee of ours that ran out of its own time told
        # us so with a bare 504). Unmarked, our callers' breakers count this 504 against
        # us, as they count their own timeouts: the time ran out here.
        headers.append(UPSTREAM_FAULT)
    title = "Gateway Timeout" if status == 504 else "Service Unavailable"
    extra = {"layer": layer} if upstream is None else {"layer": layer, "upstream": upstream}
    return status, headers, problem_body(status, title, detail, kind, **extra)
