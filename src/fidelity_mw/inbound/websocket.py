"""Websocket handshakes under the route's rate limits.

A handshake is an HTTP GET (RFC 6455 section 4.1): on a path whose `[[rate_limit]]`s
cover a GET it is admitted by those limits as a GET request would be (the same keys,
the same store call, the same decision records and telemetry). It is not a request
in the other layers' sense: a connection's life is not a request's latency (no
deadline), it holds no slot of the route's bulkhead, and it has no status for the
route breaker to count. So the plan asks the limits alone.

Refused, the app is not run: the handshake's `websocket.connect` is read, then
answered with the same 429 (or, with `on_error = "closed"` and the store away, 503)
problem document, `Retry-After` and RateLimit fields as HTTP, sent as
`websocket.http.response.start` / `.body` where the server offers that extension
(uvicorn, Starlette's TestClient), else as `websocket.close` with code 1013 (try
again later) and a short reason. Admitted, the app runs with `send` watched until it
answers the handshake (accept, close or its own HTTP response): that answer ends the
handshake's decision context, and every later message passes as it is.

The middleware builds a gate only when the policy has rate limits, and a path none
of whose limits covers a GET passes through untouched (docs/inbound.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from functools import partial
from typing import Any, Final, Protocol

from .._logs import exception as log_exception
from .._types import ASGIApp, Message, Receive, Scope, Send
from ..context import LAYER_RATELIMIT, DecisionContext
from ..engine import Engine
from ..engine import _routes_by_host as routes_by_host
from ..hooks import RequestObserver
from ..routeplan import RoutePlan
from ..routes import _host as routes_host
from ..state.base import InboundResult
from .admission import Admission
from .appfields import FIELD_NAMES, beside_app
from .refusals import reports_refusal
from .request import RequestReader, scan_headers
from .responses import (
    DECIDED_BY_APP,
    OUTCOME_DISCONNECTED,
    OUTCOME_FAILED,
    OUTCOME_SERVED,
    Rejection,
)
from .watch import OutcomeRecorder, ResponseEndHook
from .xratelimit import refunded_fields

logger: Final = logging.getLogger("fidelity_mw")

# The server's extension for an HTTP answer to a handshake (ASGI spec 2.4, "Websocket
# Denial Response"); without it a close before the accept is the only refusal.
DENIAL_EXTENSION: Final = "websocket.http.response"
# RFC 6455 / IANA: "Try Again Later", a temporary condition on the server's side. A
# limit's refusal is temporary (Retry-After says when) and so is the store's absence;
# 1008 (policy violation) would tell a client it did something it must not do again.
CLOSE_TRY_AGAIN_LATER: Final = 1013
# A handshake closed before its accept reaches the client as HTTP 403 (ASGI spec): the
# status the context records for that refusal.
CLOSED_BEFORE_ACCEPT: Final = 403
SWITCHING_PROTOCOLS: Final = 101
_MAX_REASON_BYTES: Final = 123  # a close frame's reason (RFC 6455 section 5.5)
_MAX_PLANS: Final = 1024


class Host(Protocol):
    """What the gate reads of its FidelityMiddleware (a protocol: no import cycle)."""

    app: ASGIApp
    engine: Engine
    observer: RequestObserver | None
    _reader: RequestReader
    _admission: Admission
    _outcomes: OutcomeRecorder
    _before_response_end: ResponseEndHook | None
    _nested_said: bool

    def _monotonic(self) -> float: ...

    def _say_nested(self) -> None: ...

    async def _send_rejection(
        self,
        ctx: DecisionContext,
        scope: Scope,
        receive: Receive,
        send: Send,
        rejection: Rejection,
        before_end: ResponseEndHook | None,
        obs_token: Any,
    ) -> None: ...


def websocket_plan(plan: RoutePlan) -> RoutePlan:
    """The plan of a handshake on `plan`'s route (a GET's): its limits alone, no
    breaker, deadline or bulkhead; a limit whose cost is a function of the request
    costs 1 (a handshake has no body to weigh), a constant cost stays as it is."""
    costs = tuple(1 if lim.cost_fn is not None else lim.fixed_cost for lim in plan.limits)
    return RoutePlan(plan.route, None, plan.limits, None, None, False, costs, plan.template)


def _retry_after(rejection: Rejection) -> str | None:
    for name, value in rejection[1]:
        if name == b"retry-after":
            return value.decode("latin-1")
    return None


def close_reason(ctx: DecisionContext, rejection: Rejection) -> str:
    """The close frame's reason for a refusal: short, and what the problem's title and
    Retry-After would have said (no limit name: it is for a person, and bounded)."""
    return refusal_reason(ctx.decided_by == LAYER_RATELIMIT, _retry_after(rejection))


def refusal_reason(limited: bool, wait: str | None) -> str:
    """A refused handshake's close reason: a limit's (`limited`) or another layer's, and
    when to retry (Retry-After's value, if any)."""
    what = "rate limited" if limited else "service unavailable"
    reason = what if wait is None else f"{what}; retry in {wait} s"
    return reason.encode("utf-8")[:_MAX_REASON_BYTES].decode("utf-8", "ignore")


class WebsocketGate:
    """Admits the websocket handshakes of limited routes, for one FidelityMiddleware."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.engine = host.engine
        # a handshake's plan by path and root path (and host, for an app that routes by
        # Host), or the plan of a path no limit of which covers a GET (its `limits`
        # empty). Not the
        # engine's (GET, path) plans: a websocket is named by the websocket route that
        # serves it, a GET by its HTTP route (or `!unmatched`, the router's 404).
        self._plans: dict[tuple[str, str, object], RoutePlan] = {}

    def plan_for(self, scope: Scope) -> RoutePlan | None:
        """The handshake's plan; None when no limit of its path covers a GET."""
        engine = self.engine
        by_host = engine._by_host
        if by_host is None:
            by_host = engine._by_host = routes_by_host(scope.get("app") or engine.route_app)
        # (the root path too: the policy's globs match the path without it)
        key = (scope["path"], routes_host(scope) if by_host else "", scope.get("root_path", ""))
        plan = self._plans.get(key)
        if plan is None:
            base = engine._build_plan({**scope, "method": "GET"}, "GET", key[0])
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = websocket_plan(base) if base.limits else base
        return plan if plan.limits else None

    def app_for(self, scope: Scope) -> ASGIApp:
        """What serves this websocket: the app itself when no limit of its path covers
        a GET (the middleware then awaits it as it did every websocket: no frame or
        wrapper of ours in between), else the handshake's admission."""
        try:
            plan = self.plan_for(scope)
        except Exception:  # never a failure of ours: the socket goes on undecided
            log_exception(
                logger, "setup", "fidelity_mw: could not set up a websocket; passing it through"
            )
            return self.host.app
        if plan is None:
            return self.host.app
        return partial(self.admit, plan)

    async def admit(self, plan: RoutePlan, scope: Scope, receive: Receive, send: Send) -> None:
        """Admit a handshake by its route's limits, then run the app or refuse it."""
        host = self.host
        now = host._monotonic()
        ctx = DecisionContext(self.engine, plan.route, "GET", now)
        state = scope.get("state")
        if state is None:
            scope["state"] = {"fidelity": ctx}
        else:
            if "fidelity" in state and not host._nested_said:
                host._say_nested()
            state["fidelity"] = ctx
        observer = host.observer
        obs_token = None
        if observer is not None:
            try:
                obs_token = observer.start(ctx, scope)
            except Exception:
                log_exception(logger, "start", "fidelity_mw: telemetry observer failed")
                observer = None
        handshake = Handshake(send, ctx, scope, observer, obs_token)
        try:
            result: InboundResult | None = None
            keys: Sequence[str] = ()
            try:
                found = scan_headers(scope.get("headers") or (), host._reader.wanted)
                keys = host._reader.limit_keys(scope, plan, found, ctx)
                store = self.engine.store
                if store.admit_now is not None:
                    result = store.admit_now(None, None, keys, plan.specs, now)
                if result is None:
                    result = await store.admit(None, None, keys, plan.specs, now)
                rejection = host._admission.verdict(ctx, plan, result, now)
            except Exception as exc:
                result = None
                rejection = host._admission.state_failure(ctx, plan, exc, now)
            if rejection is not None:
                before_end = host._before_response_end if observer is not None else None
                await self._refuse(ctx, scope, receive, send, rejection, before_end, obs_token)
                return
            handshake.outcomes = (host._outcomes, plan, result, keys)
            try:
                await host.app(scope, receive, handshake)
            except BaseException as exc:
                if not handshake.answered:
                    ctx.decided_by = DECIDED_BY_APP
                    if isinstance(exc, asyncio.CancelledError):
                        ctx.outcome = OUTCOME_DISCONNECTED
                        ctx.client_disconnected = True
                    else:
                        ctx.outcome = OUTCOME_FAILED
                raise
            if not handshake.answered:
                # returned without answering: the server closes the handshake (403)
                await handshake.settle(CLOSED_BEFORE_ACCEPT)
        finally:
            handshake.end()

    async def _refuse(
        self,
        ctx: DecisionContext,
        scope: Scope,
        receive: Receive,
        send: Send,
        rejection: Rejection,
        before_end: ResponseEndHook | None,
        obs_token: Any,
    ) -> None:
        """Answer a refused handshake, the app not run: read its `websocket.connect`
        (the first message, ASGI spec), then deny it over HTTP where the server can
        (`on_reject` shapes it as for HTTP), else close it."""
        first = await receive()
        if first.get("type") != "websocket.connect":  # the client left first
            ctx.outcome = OUTCOME_DISCONNECTED
            ctx.client_disconnected = True
            return
        extensions = scope.get("extensions") or {}
        if DENIAL_EXTENSION in extensions:
            await self.host._send_rejection(
                ctx, scope, receive, _denial_send(send), rejection, before_end, obs_token
            )
            return
        ctx.status = CLOSED_BEFORE_ACCEPT
        try:
            await send(
                {
                    "type": "websocket.close",
                    "code": CLOSE_TRY_AGAIN_LATER,
                    "reason": close_reason(ctx, rejection),
                }
            )
        finally:
            ctx.response_complete = True


def _denial_send(send: Send) -> Send:
    """`send` for an HTTP answer to a handshake: the middleware's own answers are
    `http.response.*` messages, sent as `websocket.http.response.*` (a Starlette
    response from `on_reject` names them so itself)."""

    async def denial_send(message: Message) -> None:
        kind = message["type"]
        if kind.startswith("http."):
            message = {**message, "type": "websocket." + kind}
        await send(message)

    return denial_send


class Handshake:
    """The app's `send` on an admitted handshake: watches for its answer (accept,
    close, or an HTTP response), which settles and ends the handshake's context;
    adds the RateLimit fields to the accept when the policy sends them always."""

    __slots__ = ("answered", "ctx", "ended", "obs_token", "observer", "outcomes", "scope", "send")

    def __init__(
        self,
        send: Send,
        ctx: DecisionContext,
        scope: Scope,
        observer: RequestObserver | None,
        obs_token: Any,
    ) -> None:
        self.send = send
        self.ctx = ctx
        self.scope = scope
        self.observer = observer
        self.obs_token = obs_token
        self.answered = False
        self.ended = False
        self.outcomes: (
            tuple[OutcomeRecorder, RoutePlan, InboundResult | None, Sequence[str]] | None
        ) = None

    async def __call__(self, message: Message) -> None:
        if self.answered:
            await self.send(message)
            return
        kind = message.get("type")
        if kind == "websocket.accept":
            extra = self.ctx.response_headers
            if extra:
                message = _with_fields(message, extra)
            status: int | None = SWITCHING_PROTOCOLS
        elif kind == "websocket.close":
            status = CLOSED_BEFORE_ACCEPT
        elif kind == "websocket.http.response.start":
            status = message.get("status")
            extra = self.ctx.response_headers
            if extra:  # as on an HTTP response of the app's (watch.py)
                if reports_refusal(self.ctx, status):
                    extra = refunded_fields(self.ctx, extra)  # its units come back
                message = _with_fields(message, extra)
        else:
            status = None
        if status is None:
            await self.send(message)
            return
        await self.send(message)
        await self.settle(status)
        self.end()

    async def settle(self, status: int) -> None:
        """The app answered the handshake with `status`: its outcome, as for an HTTP
        response; an answer that reports a refusal by a layer inside the app
        (`Depends(fidelity.limit)`'s 429, or its close) gives the middleware's limits
        their units back, as for HTTP (`reports_refusal`): not a close of the app's own
        after an optional call an upstream's breaker refused (a bad token's 403)."""
        self.answered = True
        ctx = self.ctx
        ctx.status = status
        ctx.response_complete = True
        ctx.decided_by = DECIDED_BY_APP
        ctx.outcome = OUTCOME_SERVED if status < 500 else OUTCOME_FAILED
        if self.outcomes is not None and reports_refusal(ctx, status):
            recorder, plan, result, keys = self.outcomes
            try:
                pending = recorder.shed_downstream(ctx, plan, result, keys)
                if pending is not None:
                    await pending
            except Exception:
                log_exception(
                    logger, "refund", "fidelity_mw: could not refund quota of %s", ctx.route
                )

    def end(self) -> None:
        """The handshake's context is complete: the observer's end (once)."""
        if self.ended:
            return
        self.ended = True
        self.answered = True
        observer = self.observer
        if observer is not None:
            try:
                observer.end(self.ctx, self.scope, self.obs_token)
            except Exception:
                log_exception(logger, "end", "fidelity_mw: telemetry observer failed")


def _with_fields(message: Message, ours: list[tuple[bytes, bytes]]) -> Message:
    """The app's handshake answer with our rate-limit fields, beside any it set itself
    as on an HTTP response (appfields.py)."""
    app: Any = message.get("headers") or ()
    if not FIELD_NAMES.isdisjoint(item[0] for item in app):
        app, ours = beside_app(app, ours)
    return {**message, "headers": [*app, *ours]}
