"""A cost per request for the middleware's limits: `RateLimit(cost=fn)`.

A route whose limits all have a constant cost never comes here (its plan admits at
the middleware's common step). A route with a cost function: the function is called
once per request (with a Starlette `Request`, which is also the scope as a Mapping;
plain or async), and the request is admitted by a plan of its own costs
(`routeplan.costed_plan`), through the same store call, refunds and fields as any
other, so the memory, Redis and tiered stores all take the cost. A cost above a
limit's burst is refused at once (429 `cost-over-burst`, no `Retry-After`: waiting
never admits it); 0 takes nothing (that limit is not asked); a function that fails
(or says no whole number) charges the burst, as `Depends(fidelity.limit(cost=fn))`
does, and is logged (throttled).

A function that reads the body (`await request.json()` for a batch's length) reads it
here; the app then receives the same messages again. It runs before any limit is
asked, those of a constant cost on the route too (one store call for them all, after
the costs: checking those first would cost a second round trip on Redis for every
request of the route), so a client over one of them has its body read before its 429.
The route's deadline bounds the functions (a slow body, a slow lookup: 504), and a
client that leaves while they read is charged nothing: the app does not run for it
(outcome `disconnected`).

A function that raises Starlette's `HTTPException` (a 413 for a body too large, a 400
for a malformed batch) answers the request itself, as the FastAPI form lets it: the
middleware sends that status, detail and headers as Starlette's default handler does
(plain text), charges nothing, and the app does not run (`CostAnswer`); raised for
the deadline's cancellation, swallowed, it is the deadline's 504.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response

from .._logs import exception as log_exception
from .._logs import warn
from .._types import Message, Receive, Scope
from ..context import (
    ALLOW,
    LAYER_RATELIMIT,
    REJECT,
    SOURCE_REQUEST,
    WOULD_REJECT,
    Decision,
    DecisionContext,
    DetailValue,
)
from ..policy import CostFunc, RateLimit
from ..routeplan import RoutePlan
from ..state.base import InboundResult
from .admission import admission_decisions
from .responses import OUTCOME_REJECTED, Rejection, problem_body

logger: Final = logging.getLogger("fidelity_mw")


class CostAnswer(Exception):
    """A cost function raised Starlette's `HTTPException`: the app's own answer to the
    request (the limit `name`'s function), sent instead of running the app."""

    def __init__(self, name: str, answer: HTTPException) -> None:
        super().__init__(name, answer)
        self.name = name
        self.answer = answer

    def response(self) -> Response:
        """The answer as Starlette's default `HTTPException` handler gives it."""
        exc = self.answer
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        return PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)


class NoBody(Exception):
    """A cost function read the body of a request that has none to give (a check of
    another route: `check_limits(request, path=...)`)."""


async def no_body() -> Message:
    raise NoBody


class BodyReplay:
    """`receive` for the cost function, keeping what it read; `replay` hands the app
    those messages first, then the server's."""

    __slots__ = ("read", "receive")

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        # (a deque: a large body comes in many messages, handed back one by one)
        self.read: deque[Message] = deque()

    async def record(self) -> Message:
        message = await self.receive()
        self.read.append(message)
        return message

    async def replay(self) -> Message:
        if self.read:
            return self.read.popleft()
        return await self.receive()


async def cost_of(
    fn: CostFunc, request: Request, lim: RateLimit, waits: Callable[[], None] | None = None
) -> int:
    """The units `request` takes of `lim`: `fn`'s whole number >= 0, or the burst when
    `fn` fails or answers anything else (what it cannot read passes no limit). `waits`
    is called before an async function's answer is awaited (the deadline's arming)."""
    try:
        cost: object = fn(request)
        if inspect.isawaitable(cost):
            if waits is not None:
                waits()
            cost = await cost
    except (ClientDisconnect, HTTPException):
        # the client left mid-body: not the function's failure (no cost, no log); an
        # HTTPException is the app's own answer (request_costs: CostAnswer)
        raise
    except NoBody:
        raise ValueError(
            f"check_limits: the cost function of rate limit {lim.name!r} reads the body, "
            "and a check of another route has no body to give it: pass cost="
        ) from None
    except Exception:
        log_exception(
            logger, lim.name, "fidelity_mw: the cost function of %r failed; the request "
            "costs the burst (%d)", lim.name, lim.burst_size,
        )  # fmt: skip
        return lim.burst_size
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
        warn(
            logger, lim.name, "fidelity_mw: the cost function of %r returned %r, not a whole "
            "number of units >= 0; the request costs the burst (%d)", lim.name, cost,
            lim.burst_size, level=logging.ERROR,
        )  # fmt: skip
        return lim.burst_size
    return cost


async def request_costs(
    plan: RoutePlan, scope: Scope, receive: Receive, waits: Callable[[], None] | None = None
) -> tuple[tuple[int, ...], BodyReplay | None]:
    """Each limit's cost for this request (a function's, else the constant), and what
    the functions read of the body (None: nothing). `waits`: see `cost_of`."""
    fns = plan.cost_fns
    assert fns is not None
    replay: BodyReplay | None = None
    request: Request | None = None
    costs = []
    for lim, fn in zip(plan.limits, fns, strict=True):
        if fn is None:
            costs.append(lim.fixed_cost)
            continue
        if request is None:
            replay = BodyReplay(receive)
            request = Request(scope, replay.record)
        try:
            costs.append(await cost_of(fn, request, lim, waits))
        except HTTPException as exc:
            raise CostAnswer(lim.name, exc) from None
    return tuple(costs), replay if replay is not None and replay.read else None


def asked_costs(
    ctx: DecisionContext, plan: RoutePlan, costs: Sequence[int], now: float
) -> tuple[tuple[int, ...], Rejection | None]:
    """The costs the store is asked (0: that limit is not asked), with the records of
    the limits the request alone decides: a cost of 0, a cost above the burst. A
    limit that is not shadow and a cost above its burst: the 429."""
    asked = []
    refused: Rejection | None = None
    append = ctx.decisions.append
    for lim, cost in zip(plan.limits, costs, strict=True):
        burst = lim.burst_size
        if cost == 0:  # (an empty batch) takes nothing: the store is not asked
            append(
                Decision(
                    LAYER_RATELIMIT, lim.name, ALLOW, "zero_cost", SOURCE_REQUEST, 0.0, now,
                    {"cost": 0},
                )
            )  # fmt: skip
            asked.append(0)
        elif cost > burst:
            details: dict[str, DetailValue] = {"cost": cost, "burst": burst}
            if lim.shadow:
                details["shadow"] = True
                verdict, reason = WOULD_REJECT, "cost_over_burst_shadow"
            else:
                verdict, reason = REJECT, "cost_over_burst"
            append(
                Decision(LAYER_RATELIMIT, lim.name, verdict, reason, SOURCE_REQUEST, 0.0, now,
                         details)
            )  # fmt: skip
            asked.append(0)
            if refused is None and not lim.shadow:
                refused = over_burst(ctx, plan, lim, cost)
        else:
            asked.append(cost)
    return tuple(asked), refused


def over_burst(ctx: DecisionContext, plan: RoutePlan, lim: RateLimit, cost: int) -> Rejection:
    """A request costing more than a limit's burst: no wait would ever admit it, so it
    is refused at once, without asking the store, and without a Retry-After (retrying
    the same request cannot help)."""
    ctx.decided_by = LAYER_RATELIMIT
    ctx.outcome = OUTCOME_REJECTED
    burst = lim.burst_size
    body = problem_body(
        429,
        "Too Many Requests",
        f"this request costs {cost} units and rate limit {lim.name!r} admits at most "
        f"{burst} at once: it is never admitted as it is; make it smaller",
        "cost-over-burst",
        limit=lim.name,
        cost=cost,
        burst=burst,
    )
    policy = ctx.engine.policy
    headers: list[tuple[bytes, bytes]] = []
    if (
        policy.rate_limit_headers != "never"
        and policy.rate_limit_header_names != "x-ratelimit"
        and plan.policy_header is not None
    ):
        headers.append(plan.policy_field)
    return 429, headers, body


def costed_decisions(
    ctx: DecisionContext, plan: RoutePlan, result: InboundResult | None, now: float
) -> None:
    """`admission_decisions` for a request of a plan of its own costs: each limit's
    record says what the request cost (`details["cost"]`)."""
    start = len(ctx._decisions)
    admission_decisions(ctx, plan, result, now)
    with_costs(ctx, plan, start)


def with_costs(ctx: DecisionContext, plan: RoutePlan, start: int) -> None:
    """The limits' records from `start` on, with the request's cost in their details
    (a limit whose cost is a function, or not 1, as the FastAPI form's records say)."""
    shown: dict[str, int] = {
        spec.name: spec.cost
        for lim, spec in zip(plan.limits, plan.specs, strict=True)
        if lim.cost_fn is not None or spec.cost != 1
    }
    records = ctx._decisions
    for i in range(start, len(records)):
        record = records[i]
        cost = shown.get(record.subject) if record.layer == LAYER_RATELIMIT else None
        if cost is not None:
            details: dict[str, Any] = dict(record.details or {})
            details["cost"] = cost
            records[i] = record._replace(details=details)
