"""The route class: documents a route's rejections and, without the middleware, enforces
its breaker and deadline on the `Fidelity` engine."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from ..context import (
    _CURRENT,
    ALLOW,
    LAYER_BREAKER,
    LAYER_DEADLINE,
    PROBE,
    REJECT,
    SHED,
    SOURCE_REQUEST,
    WOULD_REJECT,
    Decision,
    DecisionContext,
    context_from_scope,
)
from ..decide.breaker import FAILURE, IGNORED, SUCCESS, Gate
from ..engine import Engine, RoutePlan
from ..headers import deadline_parser
from ..inbound.responses import refusal_retry_after
from ..inbound.watch import ClientReceive
from ..rejections import (
    problem_document,
)
from ..state.base import InboundResult
from .exceptions import BreakerOpen, DeadlineExpired, Rejected
from .limit import FormsOwner, decide_without_state, state_unavailable
from .openapi import document

logger = logging.getLogger("fidelity_mw")


# ---------------------------------------------------------------- the route class


def route_class_for(owner: FormsOwner) -> type[APIRoute]:
    class FidelityRoute(APIRoute):
        """Documents the route's rejections; without the middleware, enforces its
        breaker and deadline on the `Fidelity` engine."""

        fidelity = owner

        def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
            super().__init__(path, endpoint, **kwargs)
            document(self, enforced=True)

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            inner = super().get_route_handler()

            async def handler(request: Request) -> Response:
                if context_from_scope(request.scope) is not None:
                    return await inner(request)  # the middleware (or a form) decided already
                return await _standalone(owner, request, inner)

            return handler

    return FidelityRoute


async def _standalone(
    owner: FormsOwner,
    request: Request,
    inner: Callable[[Request], Coroutine[Any, Any, Response]],
) -> Response:
    """Deadline and route breaker around the handler, as the middleware would do them."""
    engine = owner.engine
    plan = owner.plan(request.scope)
    now = engine.clock.monotonic()
    ctx = owner.context(request)
    remaining = _deadline(engine, plan, request, ctx)
    if remaining is not None:
        ctx.deadline_at = now + remaining
        if remaining <= 0.0 and not plan.enforce:
            # a route that does not enforce deadlines (`enforce = false`): recorded, the
            # request served (as the middleware does)
            ctx.decide(
                LAYER_DEADLINE,
                ctx.route,
                WOULD_REJECT,
                "expired_on_arrival",
                source=SOURCE_REQUEST,
                at=now,
                details={"remaining_ms": round(remaining * 1000.0, 3), "enforce": False},
            )
        elif remaining <= 0.0:
            decision = ctx.decide(
                LAYER_DEADLINE,
                ctx.route,
                REJECT,
                "expired_on_arrival",
                source=SOURCE_REQUEST,
                at=now,
            )
            raise _expired(ctx, decision, "the caller's deadline had passed on arrival")
        else:
            ctx.decide(
                LAYER_DEADLINE,
                ctx.route,
                ALLOW,
                "caller_deadline" if ctx.deadline_from_caller else "route_default",
                source=SOURCE_REQUEST,
                at=now,
                details={"remaining_ms": round(remaining * 1000.0, 3)},
            )
    gate: Gate | None = None
    result: InboundResult | None = None
    if plan.breaker is not None and plan.breaker_key is not None:
        result = await _admit(engine, plan, ctx, now)  # None: decided without its state
    if result is not None:
        gate = result.gate
        assert gate is not None
        if gate.verdict == "reject":
            decision = ctx.decide(
                LAYER_BREAKER,
                ctx.route,
                SHED,
                f"breaker_{gate.state}",
                source=result.source,
                age_s=result.age_s,
                at=now,
                details={"retry_after_s": round(gate.retry_after_s, 3)},
            )
            wait = refusal_retry_after(gate.retry_after_s)
            problem = problem_document(
                503,
                "Service Unavailable",
                f"the circuit breaker of route {ctx.route!r} is "
                f"{gate.state.replace('_', '-')}; retry in {wait} s",
                "circuit-open",
                route=ctx.route,
            )
            raise BreakerOpen(503, problem, {"Retry-After": wait}, ctx, decision)
        probe = gate.verdict == "probe"
        ctx.decide(
            LAYER_BREAKER,
            ctx.route,
            PROBE if probe else ALLOW,
            "half_open_probe" if probe else "breaker_closed",
            source=result.source,
            age_s=result.age_s,
            at=now,
        )
    if plan.timed:
        # The handler reads the body: a body that trickles in is the client's time, not
        # a slow call of the route's (inbound/watch.ClientReceive; Starlette's Request
        # reads through `_receive`).
        request._receive = ClientReceive(request._receive, ctx, engine.clock.monotonic)
    token = _CURRENT.set(ctx)
    outcome = IGNORED
    try:
        try:
            response = await inner(request)
        except Rejected:
            raise  # another form's decision: not the route's failure
        except HTTPException as exc:
            outcome = _judge(plan, exc.status_code)
            ctx.status = exc.status_code
            raise
        except RequestValidationError:
            # The client's malformed request (FastAPI answers it 422), not the route
            # failing: counted as a failure, a client sending junk opened the breaker and
            # had every valid request shed. The middleware judges the 422 it sees the same.
            outcome = _judge(plan, 422)
            ctx.status = 422
            raise
        except Exception:
            outcome = FAILURE
            raise
        outcome = _judge(plan, response.status_code)
        ctx.status = response.status_code
        return response
    finally:
        try:  # noqa: SIM105 - per request: a try costs nothing, suppress() does
            _CURRENT.reset(token)
        except ValueError:  # finalised in another context (a dropped coroutine):
            pass  # the variable there was never ours to restore
        if gate is not None and plan.breaker is not None and plan.breaker_key is not None:
            await _record(engine, plan, gate, outcome, ctx)


async def _admit(
    engine: Engine, plan: RoutePlan, ctx: DecisionContext, now: float
) -> InboundResult | None:
    """The route breaker's gate; None when its state could not be read and the policy
    lets the request go on (`state.on_error`, the middleware's rule: not a 500)."""
    assert plan.breaker is not None
    assert plan.breaker_key is not None
    try:
        return await engine.store.admit(plan.breaker_key, plan.breaker, (), (), now)
    except Exception as exc:
        _state_failure(engine, ctx, exc, now)
        return None


def _state_failure(engine: Engine, ctx: DecisionContext, exc: Exception, now: float) -> None:
    """The breaker's state could not be read: go on, or answer 503 `state-unavailable`
    when the policy fails closed."""
    closed = engine.policy.state.on_error == "closed"
    if decide_without_state(ctx, LAYER_BREAKER, ctx.route, exc, now, refuse=closed):
        raise state_unavailable(ctx)


def _judge(plan: RoutePlan, status: int) -> str:
    breaker = plan.breaker
    return FAILURE if breaker is not None and status in breaker.failure_statuses else SUCCESS


async def _record(
    engine: Engine, plan: RoutePlan, gate: Gate, outcome: str, ctx: DecisionContext
) -> None:
    assert plan.breaker is not None
    assert plan.breaker_key is not None
    now = engine.clock.monotonic()
    slow = plan.breaker.slow_call_ms is not None and (
        (now - ctx.started_at - ctx.client_wait_s) * 1000.0 >= plan.breaker.slow_call_ms
    )
    try:
        await engine.store.record(plan.breaker_key, plan.breaker, gate, outcome, slow, now)
    except Exception:  # the outcome is lost; the response is not
        logger.exception("fidelity_mw: could not record the outcome of %s", ctx.route)


def _deadline(
    engine: Engine, plan: RoutePlan, request: Request, ctx: DecisionContext
) -> float | None:
    """The caller's deadline (shortest valid header, capped by the route), else the route's."""
    remaining = plan.deadline_default_s
    caller: float | None = None
    for name in engine.policy.deadline.header:
        # Every line of it, joined as the middleware reads them: two hops that each
        # added one allow the shorter (`get` read the first line alone).
        values = request.headers.getlist(name)
        if not values:
            continue
        seconds = deadline_parser(name)(", ".join(values).encode("latin-1"))
        if seconds is not None and (caller is None or seconds < caller):
            caller = seconds
    if caller is None:
        return remaining
    ctx.deadline_from_caller = True
    cap = plan.deadline_cap_s
    return caller if cap is None or caller < cap else cap


def _expired(ctx: DecisionContext, decision: Decision, detail: str) -> DeadlineExpired:
    problem = problem_document(504, "Gateway Timeout", detail, "deadline-expired")
    return DeadlineExpired(504, problem, {}, ctx, decision)
